"""Measured memory of a training step where no allocator statistics exist (CPU).

On CUDA the trainer reads torch.cuda.max_memory_allocated. On CPU it measures the tensors a step
holds: weights, buffers, gradients and optimizer states (unique storages) plus what autograd saved
for backward during the forward (counted with saved_tensors_hooks), which is what the memory
estimator predicts item by item.
"""
from __future__ import annotations

import torch
from torch import nn


class SavedTensorMeter:
    """Context manager: unique storage bytes autograd saves for backward inside it (params excluded)."""

    def __init__(self, model: nn.Module):
        self.skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.skip |= {b.untyped_storage().data_ptr() for b in model.buffers()}
        self.seen: dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
            return t
        ptr = storage.data_ptr()
        if ptr and ptr not in self.skip:
            self.seen[ptr] = max(self.seen.get(ptr, 0), storage.nbytes())
        return t

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())


def static_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Weights, buffers, gradients and optimizer states held by a step (each storage once)."""
    seen: dict[int, int] = {}

    def add(t: torch.Tensor | None) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()

    for p in model.parameters():
        add(p)
        add(p.grad)
    for b in model.buffers():
        add(b)
    if optimizer is not None:
        for state in optimizer.state.values():
            for value in state.values():
                add(value)
    return sum(seen.values())
