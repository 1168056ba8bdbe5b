"""How fast can a 7B QLoRA step's frozen GEMMs go, and which of their forms is fastest?

On an H200 (2026-11-30) the frozen GEMMs took ~417 of a 7B QLoRA step's 621 ms of kernels, at ~690 TFLOP/s:
cuBLAS's `badd` kernels, each adding its product onto the rank-r term already in the output (addmm_, beta 1;
studio/methods/lora_fused.py). This times, at Qwen2.5-7B's shapes, the same product as
- `addmm_`: onto an output already written (the engine's way),
- `mm`: into a fresh output (beta 0: the product alone, the GEMM's own speed),
- `linear`: F.linear (cuBLASLt's path in torch),
- `addmm_lt` and `mm_lt`: the first two with torch's preferred BLAS library set to cuBLASLt,
and, for gate and up, which share their input, `joined`: one GEMM over both weights stacked (N = 2 x 18944)
against the two apart (`apart`). TFLOP/s of each, and their outputs checked against `mm`'s.

    python -m baselines.gemm_ab [--rows 8192] [--iters 20]

One JSON line per (shape, form). bf16 on CUDA; fp32 and smaller rows on the CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import json
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from baselines.lora_order_ab import clock

# (name, K, N, whether the weight comes transposed) of the frozen GEMMs a Qwen2.5-7B layer runs: the forward (and
# recomputation) x Wᵀ, and the input gradient dy W, with W stored out x in as a Linear keeps it
SHAPES = [("gate/up forward", 3584, 18944, True), ("down forward", 18944, 3584, True),
          ("q/o forward", 3584, 3584, True), ("k/v forward", 3584, 512, True),
          ("gate/up input gradient", 18944, 3584, False), ("down input gradient", 3584, 18944, False)]


@contextlib.contextmanager
def _blas(library: str | None) -> Iterator[None]:
    if library is None or not torch.cuda.is_available():
        yield
        return
    before = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(library)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(before)


def forms(x: torch.Tensor, m: torch.Tensor, c: torch.Tensor) -> dict[str, tuple[Callable[[], torch.Tensor], str | None]]:
    """The product x m (m: K x N, a view of a stored weight) in each form, and the BLAS library each runs under
    (None: torch's choice). The addmm_ forms add onto c (zeros here, so every form's output is the product)."""
    return {"mm": (lambda: x @ m, None),
            "addmm_": (lambda: c.zero_().addmm_(x, m), None),
            "linear": (lambda: F.linear(x, m.t()), None),
            "mm_lt": (lambda: x @ m, "cublaslt"),
            "addmm_lt": (lambda: c.zero_().addmm_(x, m), "cublaslt")}


def joined_gate_up(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, both: torch.Tensor) -> dict:
    """gate and up as two GEMMs (`apart`) or one over both weights stacked (`joined`, both = [w_gate; w_up])."""
    return {"apart": lambda: (x @ w_gate.t(), x @ w_up.t()),
            "joined": lambda: (x @ both.t()).split(w_gate.shape[0], dim=1)}


def setup(description: str) -> tuple[argparse.Namespace, torch.device, torch.dtype, int, int, str, torch.Generator]:
    """An A/B script's start: its --rows and --iters; CUDA in bf16, else the CPU in fp32 with fewer rows and shapes
    16x smaller (to finish); the rows, that scale, the device's name and a seeded generator."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--rows", type=int, default=None, help="tokens (default 8192 on CUDA, 256 on the CPU)")
    p.add_argument("--iters", type=int, default=20)
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = a.rows or (8192 if device.type == "cuda" else 256)
    scale = 1 if device.type == "cuda" else 16
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return a, device, dtype, rows, scale, name, torch.Generator(device=device).manual_seed(0)


def main() -> None:
    a, device, dtype, rows, scale, name, gen = setup(__doc__.split("\n")[0])
    for what, k, n, transposed in SHAPES:
        k, n = k // scale, n // scale
        x = torch.randn(rows, k, device=device, dtype=dtype, generator=gen)
        stored = torch.randn(*((n, k) if transposed else (k, n)), device=device, dtype=dtype, generator=gen)
        m = (stored.t() if transposed else stored) / k ** 0.5
        c = torch.empty(rows, n, device=device, dtype=dtype)
        want = (x.float() @ m.float())
        for form, (fn, library) in forms(x, m, c).items():
            with _blas(library):
                err = (fn().float() - want).abs().max().item()
                ms = clock(fn, (), a.iters, device)
            print(json.dumps({"device": name, "shape": what, "rows": rows, "k": k, "n": n, "form": form,
                              "ms": round(ms, 4), "tflops": round(2 * rows * k * n / ms / 1e9, 1),
                              "max_abs_diff": err}), flush=True)
    k, n = 3584 // scale, 18944 // scale
    x = torch.randn(rows, k, device=device, dtype=dtype, generator=gen)
    w_gate, w_up = (torch.randn(n, k, device=device, dtype=dtype, generator=gen) / k ** 0.5 for _ in range(2))
    both = torch.cat([w_gate, w_up])
    want = [(x @ w_gate.t()).float(), (x @ w_up.t()).float()]
    for form, fn in joined_gate_up(x, w_gate, w_up, both).items():
        err = max((got.float() - ref).abs().max().item() for got, ref in zip(fn(), want))
        ms = clock(fn, (), a.iters, device)
        print(json.dumps({"device": name, "shape": "gate and up forward", "rows": rows, "k": k, "n": 2 * n,
                          "form": form, "ms": round(ms, 4), "tflops": round(4 * rows * k * n / ms / 1e9, 1),
                          "max_abs_diff": err}), flush=True)


if __name__ == "__main__":
    main()
