"""How much of a small term does a 16-bit GEMM keep when it adds that term in its epilogue (addmm, beta 1)?

LoRA's fused op (studio/methods/lora_fused.py) writes the rank-r term first and lets the base GEMM add onto it,
so that the sum is rounded once. On an H200 (2026-11-29) the rescaled product's epilogue way kept only 20-46%
of its small terms (tests/test_update_rounding.py), where the CPU keeps all of them. A suspect: cuBLAS's
reduced-precision reductions (torch's allow_bf16_reduced_precision_reduction, on by default), which may sum a
split-K GEMM's partial products in bf16. This measures the kept share (the slope of the rounded output's
error on the small term: 1 kept whole, about 0.15 rounded first) on CUDA for Qwen2.5-7B's layer shapes and
the test's, with the reductions allowed and not, and the time of each.

    python -m baselines.epilogue_check [--rows 8192]

One JSON line per (shape, reductions allowed).
"""
from __future__ import annotations

import argparse
import json

import torch

SHAPES = [(256, 256), (3584, 18944), (18944, 3584), (3584, 3584), (3584, 512)]  # the test's, then 7B's


def kept_share(rows: int, fan_in: int, fan_out: int, device: torch.device, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, fan_in, generator=gen).to(device, dtype)
    w = (torch.randn(fan_out, fan_in, generator=gen) / fan_in ** 0.5).to(device, dtype)
    exact = x.float() @ w.float().t()
    small = exact * torch.randn(fan_out, generator=gen).to(device) * 1e-3  # about 1/1000 of the output
    y = torch.addmm(small.to(dtype), x, w.t())
    rounded_first = (x @ w.t()).float() + small.to(dtype).float()
    err = y.float() - exact
    return {"kept": round(float((err * small).sum() / (small * small).sum()), 3),
            "kept_if_rounded_first": round(float(((rounded_first.to(dtype).float() - exact) * small).sum()
                                                 / (small * small).sum()), 3)}


def main() -> None:
    from studio.bench import time_steps
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=8192)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    rows = args.rows if device.type == "cuda" else 512
    matmul = torch.backends.cuda.matmul
    for fan_in, fan_out in SHAPES:
        for allowed in (True, False):
            matmul.allow_bf16_reduced_precision_reduction = allowed
            out = {"shape": [rows, fan_in, fan_out], "reduced_precision_reduction": allowed, "device": str(device)}
            out.update(kept_share(rows, fan_in, fan_out, device, dtype))
            x = torch.randn(rows, fan_in, device=device, dtype=dtype)
            w = torch.randn(fan_out, fan_in, device=device, dtype=dtype)
            c = torch.randn(rows, fan_out, device=device, dtype=dtype)
            seconds, _ = time_steps(lambda: c.addmm_(x, w.t()).sum(), 3, 20, device)
            out["ms"] = round(seconds * 1000, 3)
            print(json.dumps(out), flush=True)
    matmul.allow_bf16_reduced_precision_reduction = True


if __name__ == "__main__":
    main()
