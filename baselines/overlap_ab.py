"""Can a 7B QLoRA step's memory-bound work run beside its frozen GEMMs? Two CUDA streams, at Qwen2.5-7B shapes.

On an H200 (2026-11-30) a 7B QLoRA step was GPU-bound: 621 ms of kernels, ~417 of them frozen GEMMs at ~690
TFLOP/s (compute-bound) and ~130 ms of memory-bound kernels one after another between them: the rank-r terms
and their gradients (~55), the Triton kernels (~40), the NF4 dequantizations (~20), elementwise passes (~15).
The 2x target needs ~60 ms less. If a memory-bound kernel on a second stream runs in the SMs and bandwidth a GEMM
leaves free, an engine that makes the next weight's dequantization (or the next projection's rank-r term) while
the current GEMM runs would hide part of that; if the GEMM's tiles take every SM, it hides nothing and that
design is not worth building. This measures it for one gate/up-sized GEMM (8192 x 3584 @ 3584 x 18944, onto an
output already written, as the engine runs it) and each partner:
- `dequant`: the NF4 dequantization of a 18944 x 3584 weight (studio/dequant_4bit.py; needs bitsandbytes),
- `rank_r`: low = x Aᵀ and low Bᵀ written into a 8192 x 18944 output (the next projection's rank-r term),
- `gated`: act(gate) · up over 8192 x 18944 (studio/fused_mlp.gated: the Triton kernel on CUDA).
Per partner: ms of the GEMM alone, the partner alone, both on one stream, and both on two streams (the GEMM
queued first or the partner first; the side stream at the main stream's priority or a higher one); `hidden` is the share of the
partner's own time the best two-stream form saved against one stream.

    python -m baselines.overlap_ab [--rows 8192] [--iters 20]

One JSON line per (partner, form). On the CPU (no streams) it checks only that the forms run, at small shapes.
"""
from __future__ import annotations

import json
from typing import Callable

import torch

from baselines.gemm_ab import setup
from baselines.lora_order_ab import clock

HIDDEN, INTERMEDIATE, RANK = 3584, 18944, 16


def partners(rows: int, hidden: int, inter: int, device: torch.device, dtype: torch.dtype,
             gen: torch.Generator) -> dict[str, Callable[[], object]]:
    """The memory-bound partners, each a closure over its own buffers; dequant only where bitsandbytes loads."""
    from studio.fused_mlp import gated

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen)
    x, a, b = randn(rows, hidden), randn(RANK, hidden) / hidden ** 0.5, randn(inter, RANK) / RANK
    out = torch.empty(rows, inter, device=device, dtype=dtype)
    gate, up = randn(rows, inter), randn(rows, inter)
    kind = "silu"
    found = {"rank_r": lambda: torch.mm(x @ a.t(), b.t(), out=out), "gated": lambda: gated(gate, up, kind)}
    try:
        import bitsandbytes.functional as bnbf
        from studio.dequant_4bit import dense_4bit
        packed, state = bnbf.quantize_4bit(randn(inter, hidden) * 0.02, blocksize=64, compress_statistics=True,
                                           quant_type="nf4")
        found["dequant"] = lambda: dense_4bit(packed, state, dtype)
    except (ImportError, RuntimeError):
        pass
    return found


def forms(gemm: Callable[[], object], partner: Callable[[], object], side) -> dict[str, Callable[[], None]]:
    """Each way of running the GEMM and its partner; side: {"same": stream, "high": stream} (CUDA) or None (the
    CPU: the two-stream forms run on one)."""
    def one_stream() -> None:
        gemm()
        partner()

    def two_streams(stream, gemm_first: bool) -> Callable[[], None]:
        def run() -> None:
            if stream is None:
                return one_stream()
            main = torch.cuda.current_stream()
            stream.wait_stream(main)
            if gemm_first:
                gemm()
            with torch.cuda.stream(stream):
                partner()
            if not gemm_first:
                gemm()
            main.wait_stream(stream)
        return run
    found = {"gemm": lambda: gemm(), "partner": lambda: partner(), "one_stream": one_stream}
    for priority in ("same", "high"):
        stream = side[priority] if side else None
        found[f"gemm_first_{priority}"] = two_streams(stream, True)
        found[f"partner_first_{priority}"] = two_streams(stream, False)
    return found


def main() -> None:
    a, device, dtype, rows, scale, name, gen = setup(__doc__.split("\n")[0])
    hidden, inter = HIDDEN // scale, INTERMEDIATE // scale
    x = torch.randn(rows, hidden, device=device, dtype=dtype, generator=gen)
    w = torch.randn(inter, hidden, device=device, dtype=dtype, generator=gen) / hidden ** 0.5
    c = torch.zeros(rows, inter, device=device, dtype=dtype)
    gemm = lambda: c.addmm_(x, w.t())  # noqa: E731 - onto the output, as the engine's fused LoRA op runs it
    side = None
    if device.type == "cuda":
        # 0 is the lowest priority, the main stream's; a large negative number is clamped to the highest
        side = {"same": torch.cuda.Stream(priority=0), "high": torch.cuda.Stream(priority=-100)}
    for what, partner in partners(rows, hidden, inter, device, dtype, gen).items():
        ms = {form: clock(fn, (), a.iters, device) for form, fn in forms(gemm, partner, side).items()}
        best = min(v for k, v in ms.items() if "_first_" in k)
        for form, v in ms.items():
            print(json.dumps({"device": name, "partner": what, "rows": rows, "form": form, "ms": round(v, 4)}),
                  flush=True)
        print(json.dumps({"device": name, "partner": what, "rows": rows, "form": "summary",
                          "hidden": round((ms["one_stream"] - best) / ms["partner"], 3) if ms["partner"] else None,
                          "saved_ms": round(ms["one_stream"] - best, 4)}), flush=True)


if __name__ == "__main__":
    main()
