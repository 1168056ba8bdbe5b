"""SSF (scale and shift features): y = γ ⊙ (W x + b) + β after each chosen linear layer.

γ starts at 1 and β at 0 (output == base). Merge folds the pair into the layer it follows:
W' = diag(γ) W, b' = γ ⊙ b + β. A layer without a bias gets one while merged (llama/gemma
projections have none): in-process merge is exact; exporting a merged SSF model of such an
architecture would need the bias in its config, so the studio says so (set `shift: false` for a
scale-only SSF that exports cleanly). Own file format (`SSF`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import opt
from . import register
from .base import MethodConfig
from .deltas import DeltaLinear, DeltaMethod
from .rescaled_product import RescaledProduct


@dataclass
class SsfConfig(MethodConfig):
    target_modules: list | str = opt("all-linear", "Layers whose outputs are scaled and shifted")
    shift: bool = opt(True, "Learn the shift β as well as the scale γ")


class SsfLinear(DeltaLinear):
    def __init__(self, base: nn.Linear, shift: bool):
        super().__init__(base)
        dev = base.weight.device
        self.ssf_scale = nn.Parameter(torch.ones(base.out_features, device=dev))
        self.ssf_shift = nn.Parameter(torch.zeros(base.out_features, device=dev)) if shift else None
        self._added_bias = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.adapter_enabled:
            return self.base_layer(x)
        # γ ⊙ (W x + b) + β summed in fp32 and rounded once; keeps W x + b in the activations' dtype for γ's
        # gradient (an fp32 copy of every adapted output before)
        return RescaledProduct.apply(x, None, None, self.ssf_scale, self.base_layer, True, self.ssf_shift)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        base = self.base_layer
        w, g = base.weight, self.ssf_scale.float()
        w.data = (w.float() * g.unsqueeze(1)).to(w.dtype)
        if self.ssf_shift is not None and base.bias is None:
            base.bias = nn.Parameter(torch.zeros(base.out_features, device=w.device, dtype=w.dtype),
                                     requires_grad=False)
            self._added_bias = True
        if base.bias is not None:
            b = base.bias.float() * g + (self.ssf_shift.float() if self.ssf_shift is not None else 0)
            base.bias.data = b.to(base.bias.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        base = self.base_layer
        g = self.ssf_scale.float()
        base.weight.data = (base.weight.float() / g.unsqueeze(1)).to(base.weight.dtype)
        if self._added_bias:
            base.bias = None
            self._added_bias = False
        elif base.bias is not None:
            b = base.bias.float() - (self.ssf_shift.float() if self.ssf_shift is not None else 0)
            base.bias.data = (b / g).to(base.bias.dtype)
        self.merged = False


class SsfMethod(DeltaMethod):
    name = "ssf"
    graph_safe = True
    summary = "Learned per-channel scale and shift after chosen layers; folds into the weights on merge."
    config_cls = SsfConfig
    peft_type = "SSF"

    def make_module(self, model, path, base, cfg: SsfConfig) -> SsfLinear:
        return SsfLinear(base, cfg.shift)


register(SsfMethod())
