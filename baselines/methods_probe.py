"""Where a preset's step time goes once the output head is out of the way: `bench --methods` on a 4-layer
Gemma-3-270M-shaped model with a 2,048-word vocabulary (so the layers and adapters are most of the step),
ours vs peft given the same adapter, alternating rounds.

    python -m baselines.methods_probe [--methods lora,dora,...] [--batch 4] [--seq 256] [--rounds 3] [--all-linear]

--all-linear adapts every linear layer (the presets with target_modules all-linear; peft given our adapter).

JSON lines as `bench` writes them (the shape is named "probe").
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json

import torch


def main() -> None:
    from studio.bench import bench
    from studio.bench_grid import PRESET_OVERRIDES, methods_grid
    from studio.models import model_presets

    p = argparse.ArgumentParser()
    p.add_argument("--methods", default=None, help="comma-separated presets (default: every one bench --methods runs)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--all-linear", action="store_true", help="adapt every linear layer")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    probe = copy.deepcopy(model_presets()["gemma-3-270m"])
    config = probe["config"]
    config.update(num_hidden_layers=a.layers, vocab_size=a.vocab)
    if "layer_types" in config:
        config["layer_types"] = config["layer_types"][: a.layers]
    grid = [dataclasses.replace(r, shape="probe", batch=a.batch, seq=a.seq)
            for r in methods_grid(device, a.methods or "all")]
    model_presets()["probe"] = probe  # the preset table is cached: the bench builds the probe from it
    if a.all_linear:
        for r in grid:
            PRESET_OVERRIDES[r.method] = PRESET_OVERRIDES.get(r.method, {}) | {"target_modules": "all-linear"}
    try:
        for row in bench(device=device.type, rounds=a.rounds, grid=grid, steps=a.steps, warmup=a.warmup):
            print(json.dumps(row), flush=True)
    finally:
        del model_presets()["probe"]


if __name__ == "__main__":
    main()
