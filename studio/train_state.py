"""Optimizer, schedule and RNG state of a checkpoint, stored as safetensors + JSON (no pickle).

With the adapter beside it, this is everything a resumed run needs to continue the same loss
trajectory: data order is derived from (seed, step), so only the step count is stored for it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import StudioError

TENSORS = "train_state.safetensors"
META = "train_state.json"


def save_train_state(folder: Path, step: int, optimizer: torch.optim.Optimizer, scheduler) -> None:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    scalars: dict[str, dict] = {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{pid}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    save_file(tensors, folder / TENSORS)
    meta = {"step": step, "param_groups": state["param_groups"], "scalars": scalars,
            "scheduler": scheduler.state_dict()}
    (folder / META).write_text(json.dumps(meta, default=_jsonable))


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.item()
    return str(value)


def load_train_state(folder: Path, model, optimizer: torch.optim.Optimizer, scheduler) -> int:
    """Restore adapter weights, optimizer, schedule and RNG from a checkpoint folder; return its step."""
    from .checkpoint import load_adapter_state_file
    from .methods import applied
    if not (folder / META).is_file():
        raise StudioError(f"{folder} is not a resumable checkpoint (no {META}); pick a checkpoints/step-N folder.")
    meta = json.loads((folder / META).read_text())
    device = next(model.parameters()).device
    state = load_adapter_state_file(folder)
    applied(model).method.load_adapter_state(model, {k: v.to(device) for k, v in state.items()})
    tensors = load_file(folder / TENSORS)
    opt_state: dict = {"state": {}, "param_groups": meta["param_groups"]}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            opt_state["state"].setdefault(int(pid), {})[name] = value
    for pid, values in meta["scalars"].items():
        opt_state["state"].setdefault(int(pid), {}).update(values)
    optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return int(meta["step"])
