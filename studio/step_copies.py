"""Compute-dtype copies of the LoRA weights, made once per optimizer step instead of in every forward.

Adapters train in fp32 under autocast, so each fused LoRA op cast A and B to the 16-bit compute dtype
in its forward, again when a checkpointed layer recomputes it, and again in each micro-batch of an
accumulated step: two small kernels per adapter each time (336 a forward on Qwen2.5-0.5B with LoRA on
every linear layer, twice that with checkpointing). The weights change only at the optimizer step, so
the training loop refreshes every copy right before a step's first micro-batch with one multi-tensor
copy (`torch._foreach_copy_`: a few launches for all adapters) and marks them stale right before the
optimizer changes the weights. A stale or absent copy makes the op cast as before, so everything that
runs outside that window (evaluation, chat, a save) is unaffected; the copies hold the values the cast
gives, so training is bitwise unchanged. They are refreshed in place, so a captured CUDA graph reads
the current ones. Memory: one 16-bit copy of the adapters (0.08 GB for Qwen2.5-7B at rank 16).
"""
from __future__ import annotations

import torch
from torch import nn


class StepCopies:
    """16-bit copies of the fused LoRA modules' A and B, valid between `refresh()` and `stale()`."""

    def __init__(self, modules: list[nn.Module], dtype: torch.dtype):
        self.dtype, self.modules, self.valid = dtype, modules, False
        self.sources = [w for m in modules for w in (m.lora_A.weight, m.lora_B.weight)]
        self.copies = [torch.empty_like(w, dtype=dtype) for w in self.sources]
        for i, module in enumerate(modules):
            module.step_copies = (self, self.copies[2 * i], self.copies[2 * i + 1], *self.sources[2 * i:2 * i + 2])

    @classmethod
    def for_model(cls, model: nn.Module, dtype: torch.dtype | None) -> StepCopies | None:
        """Copies for the model's LoRA modules that run as the fused op in `dtype` (autocast's); None when
        there is nothing to copy (no autocast, no such module, or adapters already in that dtype)."""
        if dtype not in (torch.bfloat16, torch.float16):
            return None
        from .methods.lora import LoraLinear
        modules = [m for m in model.modules() if isinstance(m, LoraLinear) and m.uses_fused_op()
                   and m.lora_A.weight.dtype != dtype]
        return cls(modules, dtype) if modules else None

    @torch.no_grad()
    def refresh(self) -> None:
        torch._foreach_copy_(self.copies, self.sources)
        self.valid = True

    def stale(self) -> None:
        self.valid = False

    def release(self) -> None:
        """Detach the copies from the modules (the end of a run)."""
        self.valid = False
        for module in self.modules:
            module.step_copies = None


def current_copies(module: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The module's (A, B) copies in dtype while they are current (and A and B are still the weights they
    copy, not replaced since); else None (the caller casts)."""
    held = getattr(module, "step_copies", None)
    if held is None or not held[0].valid or held[1].dtype != dtype or held[3] is not module.lora_A.weight \
            or held[4] is not module.lora_B.weight:
        return None
    return held[1], held[2]
