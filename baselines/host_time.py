"""Host time of a training step: a real architecture's layer code at a width where compute is ~zero.

    python -m baselines.host_time [--shape qwen2.5-0.5b] [--method lora] [--ckpt] [--steps 20] [--profile N]
                                  [--trainer]

On a GPU the small bench rows wait on the host (Qwen2.5-0.5B LoRA on an H200: 156 ms eager, 39 ms of
the same kernels replayed from a CUDA graph), so Python time per layer is what their eager speed is
made of. This keeps the shape's layer count and layer type but shrinks every width (hidden 64, 4
heads, vocabulary 512), runs a bench row's step (bf16 base under bf16 autocast, as on CUDA) for ours
and peft, and prints one JSON line per engine: ms a step and per decoder layer. --profile N prints
cProfile's N most expensive functions (cumulative) of ours. --trainer adds a line for the same row run
by the trainer (studio/bench_trainer.py: batches, metrics, status files), the host time a user's run adds.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time

import torch


def tiny_twin(shape: str) -> str:
    """Register `shape`'s layer count and model type at test width; the new preset's name."""
    from studio.models import add_random_preset, model_presets
    cfg = dict(model_presets()[shape]["config"])
    cfg.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               vocab_size=512, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return add_random_preset(f"host-{shape}", cfg)


def main() -> None:
    from studio.bench import build_step
    from studio.bench_grid import Row
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="qwen2.5-0.5b")
    p.add_argument("--method", default="lora", choices=["lora", "qlora", "full"])
    p.add_argument("--ckpt", action="store_true")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--engines", default="studio,peft")
    p.add_argument("--profile", type=int, default=0)
    p.add_argument("--trainer", action="store_true")
    p.add_argument("--precision", default="bf16", choices=["bf16", "auto"], help="auto: fp32 on the CPU")
    a = p.parse_args()
    torch.set_num_threads(1)  # tiny ops: threads only add hand-off time
    name = tiny_twin(a.shape)
    row = Row(name, a.method, a.batch, a.seq, a.ckpt, precision=a.precision)
    for engine in a.engines.split(","):
        step = build_step(row, engine, torch.device("cpu"))
        for _ in range(3):
            step.run()
        times = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            step.run()
            times.append(time.perf_counter() - t0)
        ms = statistics.median(times) * 1e3
        layers = step.model.config.num_hidden_layers
        print(json.dumps({"engine": engine, "shape": a.shape, "method": a.method, "ckpt": a.ckpt,
                          "ms_step": round(ms, 2), "ms_min": round(min(times) * 1e3, 2),
                          "ms_per_layer": round(ms / layers, 3)}), flush=True)
        if a.profile and engine == "studio":
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(5):
                step.run()
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(a.profile)
            print(out.getvalue())
    if a.trainer:
        from studio.bench_trainer import trainer_ms_per_step
        got = trainer_ms_per_step(row, torch.device("cpu"), 3, a.steps)
        print(json.dumps({"engine": "studio-trainer", "shape": a.shape, "method": a.method, "ckpt": a.ckpt} | got),
              flush=True)


if __name__ == "__main__":
    main()
