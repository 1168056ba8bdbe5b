"""Full fine-tuning: every weight trains. The baseline every comparison needs.

The "adapter" is the whole set of trained weights. To offer `disable_adapter` (base vs tuned in the
chat tab) a CPU copy of the original weights is kept when keep_base_copy is on.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..config import opt
from ..errors import ConfigError
from . import register
from .base import Method, MethodConfig, applied


@dataclass
class FullConfig(MethodConfig):
    train_embeddings: bool = opt(True, "Also train the token embeddings (and a tied output head)")
    keep_base_copy: bool = opt(True, "Keep the original weights in CPU RAM so base vs tuned can be compared")


def _unique_params(model: nn.Module):
    """Named parameters without tied duplicates (safetensors refuses shared storage)."""
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        yield name, p


class FullMethod(Method):
    name = "full"
    graph_safe = True
    category = "selective"
    summary = "Every weight trains (most memory); the baseline."
    config_cls = FullConfig
    base_copy = "all"
    mergeable = False
    peft_type = "STUDIO_FULL"

    def apply(self, model: nn.Module, cfg: FullConfig) -> None:
        embed = model.get_input_embeddings()
        embed_ids = {id(p) for p in embed.parameters()} if embed is not None else set()
        for p in model.parameters():
            p.requires_grad_(cfg.train_embeddings or id(p) not in embed_ids)
            if p.requires_grad and not p.is_floating_point():
                raise ConfigError("Full fine-tuning needs a 16/32-bit model; turn quantization off.")
        if cfg.keep_base_copy:
            applied(model).extra = {"base": {n: p.detach().to("cpu", copy=True) for n, p in _unique_params(model)}}

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in _unique_params(model) if p.requires_grad}

    @contextlib.contextmanager
    def disable_adapter(self, model: nn.Module) -> Iterator[None]:
        extra = applied(model).extra or {}
        if "base" not in extra:
            raise ConfigError("This full fine-tune kept no copy of the base; set method.keep_base_copy=true "
                              "or load the base model separately.")
        params = dict(_unique_params(model))
        tuned = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(extra["base"][n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(tuned[n])


register(FullMethod())
