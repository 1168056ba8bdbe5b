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


def _split(value, prefix: str, tensors: dict[str, torch.Tensor]):
    """JSON-able copy of `value` with every tensor moved into `tensors` (a {"__tensor__": key} marker)."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().to("cpu").contiguous()
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        return {"__dict__": [[_split(k, f"{prefix}.k{i}", tensors), _split(v, f"{prefix}.{i}", tensors)]
                             for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        return [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(value)]
    return value


def _join(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, dict) and "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if isinstance(value, dict) and "__dict__" in value:
        return {_join(k, tensors): _join(v, tensors) for k, v in value["__dict__"]}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def save_train_state(folder: Path, step: int, optimizer: torch.optim.Optimizer, scheduler) -> None:
    """Optimizer (any layout: torch's or bitsandbytes' nested states), schedule and RNG of a checkpoint."""
    tensors: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    meta = {"step": step, "optimizer": _split(optimizer.state_dict(), "opt", tensors),
            "scheduler": _split(scheduler.state_dict(), "sched", tensors)}
    save_file(tensors, folder / TENSORS)
    (folder / META).write_text(json.dumps(meta))


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
    optimizer.load_state_dict(_join(meta["optimizer"], tensors))
    scheduler.load_state_dict(_join(meta["scheduler"], tensors))
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return int(meta["step"])
