"""Dequantizing a 4-bit layer: bitsandbytes' three launches against studio/kernels/nf4.py's one.

The 7B QLoRA step waits on its host (645 ms wall, 591 ms of kernels on an H200, 2026-11-29), and each of its 557
weight dequantizations a step costs host time: bitsandbytes' Python and three custom-op dispatches, or one
Triton launch (whose Python launcher is not free either). This measures both for one Qwen2.5-7B decoder layer's
seven weights (double-quantized NF4): the host's time to queue a dequantization while the GPU is busy, and the
GPU's time per dequantization (CUDA events).

    python -m baselines.dequant_ab [--iters 50]

One JSON line per way: host_us and gpu_us a weight (the layer's mean).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

SHAPES = [(3584, 3584), (512, 3584), (512, 3584), (3584, 3584), (18944, 3584), (18944, 3584), (3584, 18944)]


def layer(device: torch.device) -> list[tuple[torch.Tensor, object]]:
    import bitsandbytes.functional as bnbf
    gen = torch.Generator().manual_seed(0)
    return [bnbf.quantize_4bit((torch.randn(shape, generator=gen) * 0.02).to(device, torch.bfloat16), blocksize=64,
                               compress_statistics=True, quant_type="nf4") for shape in SHAPES]


def measure(way, weights, iters: int) -> dict:
    busy = torch.empty(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for packed, state in weights:  # warm-up: compile, caches
        way(packed, state)
    torch.cuda.synchronize()
    # host: queue the layer's dequantizations behind a long GEMM, so no call waits for the GPU
    host = []
    for _ in range(iters):
        busy @ busy
        t0 = time.perf_counter()
        for packed, state in weights:
            way(packed, state)
        host.append((time.perf_counter() - t0) / len(weights))
        torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        for packed, state in weights:
            way(packed, state)
    end.record()
    torch.cuda.synchronize()
    host.sort()
    return {"host_us": round(host[len(host) // 2] * 1e6, 1),
            "gpu_us": round(start.elapsed_time(end) * 1e3 / (iters * len(weights)), 1)}


def main() -> None:
    import bitsandbytes.functional as bnbf

    from studio.kernels import nf4
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("dequant_ab measures CUDA launches: it needs a GPU.")
    weights = layer(torch.device("cuda"))
    ways = {"bitsandbytes": lambda packed, state: bnbf.dequantize_4bit(packed, state),
            "triton_nf4": lambda packed, state: nf4.dequantize(packed, state, state.dtype)}
    same = all(torch.equal(ways["bitsandbytes"](*w), ways["triton_nf4"](*w)) for w in weights)
    for name, way in ways.items():
        row = {"way": name, "weights": len(weights), "bitwise_same": same} | measure(way, weights, args.iters)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
