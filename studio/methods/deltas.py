"""Shared machinery of the weight-delta methods (VeRA, LoKr, LoHa, DyLoRA, GLoRA, Compacter, SSF).

Each of them wraps a target Linear as `DeltaLinear`: y = W x + ΔW x, where the subclass defines
ΔW (`delta_weight`, fp32, out x in) and may compute ΔW x more cheaply (`delta_forward`). The base GEMM
adds ΔW x onto its own product in its epilogue (addmm): no separate pass over the output, and on the CPU one
rounding of the sum in a 16-bit compute dtype, where adding the small update to an output already rounded to
bf16 would lose most of it early in training (peft's way; cuBLAS rounds its product before adding too). In
fp32 a full-size ΔW (LoHa, LoKr, Compacter, GLoRA) joins W instead: y = x (W + ΔW)ᵀ, one GEMM forward and
one for x's gradient instead of two each; and a full-size ΔW is rebuilt in backward rather than kept from
forward (delta_product.py). Merge adds
ΔW into the base weight (W' = W + ΔW) and unmerge subtracts it again, so every such method is
mergeable. Adapter parameters sit directly on the wrapper under peft's names (`lokr_w1`,
`hada_w1_a`, `vera_lambda_b`, ...), so model parameter paths equal peft's file keys once peft's
`base_model.model.` prefix and `.default` adapter name are removed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import seeded_dropout
from ..errors import ConfigError
from .base import Method, MethodConfig
from .common import (WrappedLinear, adapter_input, freeze_all, match_targets, plus_base_product,
                     replace_module)
from .delta_product import DeltaProduct, trainable


class DeltaLinear(WrappedLinear):
    """A Linear plus a weight update ΔW; subclasses define `delta_weight()`.

    LyCORIS-style regularisers, off unless a subclass sets them: `rank_dropout` drops whole rows of
    ΔW in training (`drop_rows`), `module_dropout` skips the whole update for a training step.
    """

    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    # weight-sized buffers (out x in x 4 bytes each) held at once while delta_product.py's backward builds ΔW again
    # and takes its factors' gradients, (fp32 run, under autocast); measured at the method's defaults
    # (tests/test_memory.py::test_rebuilt_delta_transient), for the memory estimate of the largest layer's
    rebuilt_buffers: tuple[float, float] = (2.0, 2.0)

    def __init__(self, base: nn.Module):
        super().__init__(base)
        if type(base) is not nn.Linear:
            raise ConfigError(f"This method needs plain 16/32-bit Linear layers, got {type(base).__name__}; "
                              f"turn quantization off or use LoRA (QLoRA) for 4-/8-bit bases.")

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def adapter_dtype(self) -> torch.dtype:
        for p in self.parameters(recurse=False):
            return p.dtype
        return torch.float32

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def delta_bias(self) -> torch.Tensor | None:
        """The update of the base bias (GLoRA's); None: the bias stays as it is."""
        return None

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.delta_weight(), self.delta_bias())

    def full_width(self) -> bool:
        """Whether the update runs as the full ΔW (the subclass has no cheaper delta_forward of its own)."""
        return type(self).delta_forward is DeltaLinear.delta_forward

    def rebuilds_delta(self) -> bool:
        """Whether forward drops a full-size ΔW and backward builds it again (delta_product.py): not while rank
        dropout draws its rows."""
        return self.full_width() and not (self.training and self.rank_dropout)

    def seedable_draws(self) -> bool:
        """Whether a training forward draws rank dropout's rows (studio/seeded_dropout.py may seed it)."""
        return self.rank_dropout > 0

    def drop_rows(self, w: torch.Tensor) -> torch.Tensor:
        if self.training and self.rank_dropout and not self.merged:
            keep = (seeded_dropout.uniform(self, (w.shape[0],), w.device) > self.rank_dropout).to(w.dtype)
            w = w * keep.unsqueeze(1)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.adapter_enabled:
            return self.base_layer(x)
        if self.training and self.module_dropout and torch.rand(1).item() < self.module_dropout:
            return self.base_layer(x)
        if self.rebuilds_delta() and (torch.is_autocast_enabled(x.device.type)
                                      or all_fp32(x, self.base_layer.weight, self.adapter_dtype())):
            return DeltaProduct.apply(x, self, *trainable(self))
        return plus_base_product(self.base_layer, x, self.delta_forward(adapter_input(x, self.adapter_dtype())))

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        w = self.base_layer.weight
        w.data = (w.float() + self.delta_weight().float()).to(w.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base_layer.weight
        w.data = (w.float() - self.delta_weight().float()).to(w.dtype)
        self.merged = False


def all_fp32(x: torch.Tensor, weight: torch.Tensor, adapter_dtype: torch.dtype) -> bool:
    """Whether the layer computes in fp32 throughout (no autocast), where W + ΔW keeps every bit of ΔW."""
    return not torch.is_autocast_enabled(x.device.type) and x.dtype == weight.dtype == adapter_dtype == torch.float32


class DeltaMethod(Method):
    """apply/save/load/merge for methods built from one DeltaLinear subclass per target layer."""

    category = "reparameterised"
    mergeable = True
    host_random = ("module_dropout",)  # drawn on the host: skip the whole update this step or not

    def make_module(self, model: nn.Module, path: str, base: nn.Linear, cfg: MethodConfig) -> DeltaLinear:
        raise NotImplementedError

    def before_wrap(self, model: nn.Module, targets: list[str], cfg: MethodConfig) -> None:
        """Hook for state shared by all wrapped layers (VeRA projections, Compacter rules)."""

    def apply(self, model: nn.Module, cfg: MethodConfig) -> None:
        freeze_all(model)
        targets = match_targets(model, cfg.target_modules)
        self.before_wrap(model, targets, cfg)
        for path in targets:
            base = model.get_submodule(path)
            module = self.make_module(model, path, base, cfg)
            replace_module(model, path, module)
            for name, p in module.named_parameters():
                if not name.startswith("base_layer."):
                    p.requires_grad_(True)

    @staticmethod
    def wrappers(model: nn.Module) -> list[tuple[str, DeltaLinear]]:
        return [(n, m) for n, m in model.named_modules() if isinstance(m, DeltaLinear)]

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for path, module in self.wrappers(model):
            for name, p in module.named_parameters():
                if name.startswith("base_layer.") or id(p) in seen:
                    continue
                seen.add(id(p))
                out[f"{path}.{name}"] = p.detach()
        return out


    def adapter_config(self, model: nn.Module, cfg: MethodConfig) -> dict:
        out = super().adapter_config(model, cfg)
        out.update(task_type="CAUSAL_LM", inference_mode=True, base_model_name_or_path=None,
                   layers_to_transform=None, layers_pattern=None, modules_to_save=None)
        return out

    def trainable_summary(self, model: nn.Module) -> dict:
        return {"wrapped_layers": len(self.wrappers(model))}
