"""The memory estimate against a whole training step of the shipped Gemma-3-270M on the CPU, watched op by op.

    python -m baselines.memory_real [--methods lora,dora,...] [--dtypes float32,bfloat16] [--batch 2] [--seq 256]
                                    [--model gemma-3-270m] [--ckpt both|on|off] [--mlp-chunk-elements N]

One step (loss, backward, AdamW) after a first one that creates the optimizer state, with and without gradient
checkpointing, each method at its defaults (`lokr-all` and the like: on every linear layer); a bf16 base runs under
the trainer's autocast. studio.memory_bench.measured_step_peak is the CPU's stand-in for max_memory_allocated.
--model: another preset, built at random from its config (no download); --mlp-chunk-elements: the threshold of
studio/chunked_mlp.py (rows x intermediate above which a recomputed layer's MLP runs in row chunks), lowered to
reach it at a length this CPU runs.
JSON lines: model, dtype, method, grad_ckpt, mlp_chunks, estimated_bytes, measured_bytes, ratio, peak_phase.
"""
from __future__ import annotations

import argparse
import json

import torch


def _method(spec: str) -> dict:
    name, _, where = spec.partition("-")
    return {"name": name, "target_modules": "all-linear"} if where == "all" else {"name": name}


def main() -> None:
    from studio import chunked_mlp
    from studio.config import ModelConfig, RunConfig
    from studio.memory import estimate
    from studio.memory_bench import _apply, measured_step_peak, random_base_model, random_batch
    from studio.models import load_model

    p = argparse.ArgumentParser()
    p.add_argument("--methods", default="lora,dora,ia3,lokr-all,prefix_tuning,full")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--ckpt", choices=("both", "on", "off"), default="both")
    p.add_argument("--mlp-chunk-elements", type=int, default=chunked_mlp.MLP_CHUNK_ELEMENTS)
    args = p.parse_args()
    chunked_mlp.MLP_CHUNK_ELEMENTS = args.mlp_chunk_elements
    for dtype in args.dtypes.split(","):
        for spec in args.methods.split(","):
            method = _method(spec)
            for gc in {"both": (False, True), "on": (True,), "off": (False,)}[args.ckpt]:
                if args.model == "gemma-3-270m":
                    model, _ = load_model(ModelConfig(name=args.model, device="cpu", dtype=dtype))
                else:
                    model = random_base_model(args.model, torch.device("cpu"), getattr(torch, dtype))
                model.requires_grad_(False)
                cfg = RunConfig.from_dict({"model": {"name": args.model, "dtype": dtype},
                                           "data": {"max_length": args.seq}, "method": method,
                                           "train": {"batch_size": args.batch, "gradient_checkpointing": gc,
                                                     "loss_chunk": 1024}})
                est = estimate(cfg, "cpu", padding=False)
                _apply(model, method, est.recomputed_share)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                    measured = measured_step_peak(model, random_batch(model.config.vocab_size, args.batch,
                                                                      args.seq), chunk=1024)
                rows = args.batch * args.seq
                chunks = chunked_mlp.mlp_chunks(rows, model.config.intermediate_size)
                print(json.dumps({"model": args.model, "dtype": dtype, "method": spec, "grad_ckpt": gc,
                                  "mlp_chunks": chunks if gc else 1, "estimated_bytes": est.total,
                                  "measured_bytes": measured, "ratio": round(est.total / measured, 4),
                                  "peak_phase": est.details["peak_phase"]}), flush=True)


if __name__ == "__main__":
    main()
