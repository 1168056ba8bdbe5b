"""The memory estimate against a whole training step of the shipped Gemma-3-270M on the CPU, watched op by op.

    python -m baselines.memory_real [--methods lora,dora,...] [--dtypes float32,bfloat16] [--batch 2] [--seq 256]

One step (loss, backward, AdamW) after a first one that creates the optimizer state, with and without gradient
checkpointing, each method at its defaults (`lokr-all` and the like: on every linear layer); a bf16 base runs under
the trainer's autocast. studio.memory_bench.measured_step_peak is the CPU's stand-in for max_memory_allocated.
JSON lines: dtype, method, grad_ckpt, estimated_bytes, measured_bytes, ratio, peak_phase.
"""
from __future__ import annotations

import argparse
import json

import torch


def _method(spec: str) -> dict:
    name, _, where = spec.partition("-")
    return {"name": name, "target_modules": "all-linear"} if where == "all" else {"name": name}


def main() -> None:
    from studio.config import ModelConfig, RunConfig
    from studio.memory import estimate
    from studio.memory_bench import _apply, measured_step_peak, random_batch
    from studio.models import load_model

    p = argparse.ArgumentParser()
    p.add_argument("--methods", default="lora,dora,ia3,lokr-all,prefix_tuning,full")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    args = p.parse_args()
    for dtype in args.dtypes.split(","):
        for spec in args.methods.split(","):
            method = _method(spec)
            for gc in (False, True):
                model, _ = load_model(ModelConfig(name="gemma-3-270m", device="cpu", dtype=dtype))
                model.requires_grad_(False)
                _apply(model, method, gc)
                cfg = RunConfig.from_dict({"model": {"name": "gemma-3-270m", "dtype": dtype},
                                           "data": {"max_length": args.seq}, "method": method,
                                           "train": {"batch_size": args.batch, "gradient_checkpointing": gc,
                                                     "loss_chunk": 1024}})
                est = estimate(cfg, "cpu", padding=False)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                    measured = measured_step_peak(model, random_batch(model.config.vocab_size, args.batch,
                                                                      args.seq), chunk=1024)
                print(json.dumps({"dtype": dtype, "method": spec, "grad_ckpt": gc, "estimated_bytes": est.total,
                                  "measured_bytes": measured, "ratio": round(est.total / measured, 4),
                                  "peak_phase": est.details["peak_phase"]}), flush=True)


if __name__ == "__main__":
    main()
