"""train.cuda_graphs end to end: the same short run eager and with graphs; the loss curves must agree.

    python -m baselines.graphs_check [--device cuda] [--models tiny-llama,tiny-gemma3] [--steps 8]

Prints one JSON line per model: both loss curves, their largest difference, the graph run's status
lines (capture used, or why not) and both runs' tokens/s. Tiny random models and the built-in
arithmetic data: no download, so it runs on the GPU machine of baselines/gpu_check.sh.
"""
from __future__ import annotations

import argparse
import json


def run(model: str, device: str, steps: int, graphs: bool) -> dict:
    from studio.config import load_config
    from studio.trainer import train
    sets = {"model.name": model, "model.device": device, "data.path": "arith", "data.max_length": 64,
            "data.limit": 256, "train.batch_size": 4, "train.grad_accum": 2, "train.max_steps": steps,
            "train.lr": 3e-3, "train.seed": 0, "train.cuda_graphs": graphs, "method.name": "lora",
            "method.r": 8, "method.lora_dropout": 0.0, "method.target_modules": "all-linear"}
    events = list(train(load_config(None, [f"{k}={v}" for k, v in sets.items()])))
    step_events = [e for e in events if e["type"] == "step"]
    return {"losses": [round(e["loss"], 5) for e in step_events],
            "tokens_per_s": round(sum(e["tokens_per_s"] for e in step_events[1:]) / max(1, len(step_events) - 1)),
            "notes": [e["message"] for e in events if e["type"] == "status" and "cuda_graphs" in e["message"]]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default="tiny-llama,tiny-gemma3")
    p.add_argument("--steps", type=int, default=8)
    a = p.parse_args()
    for model in a.models.split(","):
        row: dict = {"model": model, "device": a.device}
        try:
            eager, graphed = run(model, a.device, a.steps, False), run(model, a.device, a.steps, True)
            row |= {"eager": eager, "graphs": graphed,
                    "max_loss_diff": max((abs(x - y) for x, y in zip(eager["losses"], graphed["losses"])), default=None)}
        except Exception as exc:  # noqa: BLE001 - report and go on to the next model
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
