"""Which order of LoRA's two products is faster: the base GEMM then the rank-r term added in place
(a second pass over the output), or the rank-r term first and the base GEMM adding onto it (beta=1,
what studio/methods/lora_fused.py does)? And a third way: one GEMM over [x | low] and [W | B], the rank-r term
as r more columns of K, where the output-sized term is neither written nor read back (for a 4-bit weight, whose
dequantization could write W into the wide buffer: gate/up's outputs are 5x their inputs on Qwen2.5-7B).

    python -m baselines.lora_order_ab [--rows 8192] [--r 16] [--iters 20]

One JSON line per (in, out) shape of Qwen2.5-7B's linear layers: ms of each order and their ratio.
bf16 on CUDA; fp32 and smaller rows on the CPU.
"""
from __future__ import annotations

import argparse
import json

import torch

SHAPES = [(3584, 18944), (18944, 3584), (3584, 3584), (3584, 512)]  # gate/up, down, q/o, k/v


def base_then_adapter(x: torch.Tensor, w: torch.Tensor, low: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (x @ w.t()).addmm_(low, b.t(), alpha=2.0)


def adapter_then_base(x: torch.Tensor, w: torch.Tensor, low: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.addmm(x.new_empty(()), low, b.t(), beta=0, alpha=2.0).addmm_(x, w.t())


def one_wide_gemm(x: torch.Tensor, wide: torch.Tensor, low: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[x | low] @ [W | 2B]ᵀ: the rank-r term as r more columns of K, no output-sized term written and read back.
    wide holds W in its first columns (a 4-bit weight's dequantization would write it there); B (scale folded)
    is copied in and x and low joined at each call, as a training step would."""
    wide[:, x.shape[1]:].copy_(b).mul_(2.0)
    return torch.cat([x, low], dim=1) @ wide.t()


def clock(fn, args: tuple, iters: int, device: torch.device) -> float:
    """Milliseconds a call, with the bench's warm-up and clock."""
    from studio.bench import time_steps

    def call() -> float:
        fn(*args)
        return 0.0
    return time_steps(call, 3, iters, device)[0] * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=None, help="tokens (default 8192 on CUDA, 512 on the CPU)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--shapes", default=None, help="in:out,... (default: Qwen2.5-7B's)")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = a.rows or (8192 if device.type == "cuda" else 512)
    shapes = [tuple(int(n) for n in s.split(":")) for s in a.shapes.split(",")] if a.shapes else SHAPES
    for n_in, n_out in shapes:
        x = torch.randn(rows, n_in, device=device, dtype=dtype)
        w = torch.randn(n_out, n_in, device=device, dtype=dtype) / n_in ** 0.5
        low = torch.randn(rows, a.r, device=device, dtype=dtype)
        b = torch.randn(n_out, a.r, device=device, dtype=dtype) / a.r
        wide = torch.cat([w, b], dim=1)
        want = adapter_then_base(x, w, low, b).float()
        err = (base_then_adapter(x, w, low, b).float() - want).abs().max().item()
        err_wide = (one_wide_gemm(x, wide, low, b).float() - want).abs().max().item()
        old = clock(base_then_adapter, (x, w, low, b), a.iters, device)
        new = clock(adapter_then_base, (x, w, low, b), a.iters, device)
        one = clock(one_wide_gemm, (x, wide, low, b), a.iters, device)
        print(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                          "dtype": str(dtype).removeprefix("torch."), "rows": rows, "in": n_in, "out": n_out,
                          "r": a.r, "ms_base_then_adapter": round(old, 4), "ms_adapter_then_base": round(new, 4),
                          "ms_one_wide_gemm": round(one, 4), "speedup": round(old / new, 3),
                          "wide_vs_adapter_then_base": round(new / one, 3), "max_abs_diff": err,
                          "max_abs_diff_wide": err_wide}), flush=True)


if __name__ == "__main__":
    main()
