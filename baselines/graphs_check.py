"""train.cuda_graphs end to end: the same short run eager and with graphs; the loss curves must agree.

    python -m baselines.graphs_check [--device cuda] [--models tiny-llama,tiny-gemma3] [--methods lora,dora] [--steps 8]
                                     [--keep-dropout] [--ckpt] [--packing]

Prints one JSON line per model and method: both loss curves, their largest difference, the graph run's
status lines (capture used, or why not) and both runs' tokens/s. A method runs with its defaults, its
dropout-like settings at 0 (the capture's warm-up draws random numbers the eager run does not), unless
--keep-dropout: then the curves differ by the random draws, and the notes say whether the step was captured
(its dropout drawn inside the graph) or fell back to eager steps; --ckpt adds gradient checkpointing;
--packing packs the examples (eager: varlen attention; captured: the block mask). Tiny random models and the built-in
arithmetic data: no download, so it runs on the GPU machine of baselines/gpu_check.sh.
"""
from __future__ import annotations

import argparse
import json


METHOD_SETS = {"lora": {"r": 8, "target_modules": "all-linear"}, "bitfit": {"missing_bias": "add_zero"},
               "adapter_fusion": {"adapters": "[random:1,random:2:4]"}}


def run(model: str, method: str, device: str, steps: int, graphs: bool, keep_dropout: bool = False,
        ckpt: bool = False, packing: bool = False) -> dict:
    import dataclasses

    from studio.config import load_config
    from studio.methods import resolve
    from studio.trainer import train
    sets = {"model.name": model, "model.device": device, "data.path": "arith", "data.max_length": 64,
            "data.limit": 256, "train.batch_size": 4, "train.grad_accum": 2, "train.max_steps": steps,
            "train.lr": 3e-3, "train.seed": 0, "train.cuda_graphs": graphs, "method.name": method,
            "train.gradient_checkpointing": ckpt, "data.packing": packing}
    sets |= {f"method.{k}": v for k, v in METHOD_SETS.get(method, {}).items()}
    if not keep_dropout:
        sets |= {f"method.{f.name}": 0.0 for f in dataclasses.fields(resolve(method)[0].config_cls)
                 if "dropout" in f.name or f.name == "drop_prob"}
    events = list(train(load_config(None, [f"{k}={v}" for k, v in sets.items()])))
    step_events = [e for e in events if e["type"] == "step"]
    return {"losses": [round(e["loss"], 5) for e in step_events],
            "tokens_per_s": round(sum(e["tokens_per_s"] for e in step_events[1:]) / max(1, len(step_events) - 1)),
            "notes": [e["message"] for e in events if e["type"] == "status" and "cuda_graphs" in e["message"]]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default="tiny-llama,tiny-gemma3")
    p.add_argument("--methods", default="lora")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--keep-dropout", action="store_true")
    p.add_argument("--ckpt", action="store_true")
    p.add_argument("--packing", action="store_true", help="packed batches: eager varlen attention vs captured block mask")
    a = p.parse_args()
    for model, method in ((m, k) for m in a.models.split(",") for k in a.methods.split(",")):
        row: dict = {"model": model, "method": method, "device": a.device, "packing": a.packing}
        try:
            eager = run(model, method, a.device, a.steps, False, a.keep_dropout, a.ckpt, a.packing)
            graphed = run(model, method, a.device, a.steps, True, a.keep_dropout, a.ckpt, a.packing)
            row |= {"eager": eager, "graphs": graphed,
                    "max_loss_diff": max((abs(x - y) for x, y in zip(eager["losses"], graphed["losses"])), default=None)}
        except Exception as exc:  # noqa: BLE001 - report and go on to the next model
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
