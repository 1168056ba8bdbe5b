"""LoHa: ΔW = (alpha / r) · (W1_a W1_b) ⊙ (W2_a W2_b), the Hadamard product of two rank-r products.

The element-wise product reaches rank up to r² with 2·r·(in + out) parameters. W2_b starts at 0, so
the output equals the base at init. Files are peft's `LOHA` format (`hada_w1_a` (out x r),
`hada_w1_b` (r x in), `hada_w2_a`, `hada_w2_b`). Mergeable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import opt
from ..errors import ConfigError
from . import register
from .base import MethodConfig
from .deltas import DeltaLinear, DeltaMethod


@dataclass
class LoHaConfig(MethodConfig):
    r: int = opt(8, "Rank of each of the two products")
    alpha: float = opt(8, "Scale numerator: ΔW is multiplied by alpha / r")
    target_modules: list | str = opt(["q_proj", "v_proj"], "Layer names, a regex, or all-linear")
    rank_dropout: float = opt(0.0, "Dropout of rows of ΔW in training (ΔW then stays in memory until "
                                   "backward instead of being rebuilt there)")
    module_dropout: float = opt(0.0, "Probability of skipping the whole update in a training step")


class LoHaLinear(DeltaLinear):
    rebuilt_buffers = (7.0, 3.5)  # ΔW, both factor products, ΔW's gradient, scaled, times each factor

    def __init__(self, base: nn.Linear, cfg: LoHaConfig):
        super().__init__(base)
        if cfg.r <= 0:
            raise ConfigError(f"LoHa rank r must be at least 1, got {cfg.r}.")
        dev, r = base.weight.device, cfg.r
        i, o = base.in_features, base.out_features
        self.scaling = cfg.alpha / r
        self.rank_dropout, self.module_dropout = cfg.rank_dropout, cfg.module_dropout
        self.hada_w1_a = nn.Parameter(torch.empty(o, r, device=dev))
        self.hada_w1_b = nn.Parameter(torch.empty(r, i, device=dev))
        self.hada_w2_a = nn.Parameter(torch.empty(o, r, device=dev))
        self.hada_w2_b = nn.Parameter(torch.zeros(r, i, device=dev))
        with torch.no_grad():
            for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        w = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scaling
        return self.drop_rows(w)


class LoHaMethod(DeltaMethod):
    name = "loha"
    graph_safe = True
    summary = "Hadamard product of two low-rank products (LoHa); mergeable; peft's LOHA format."
    config_cls = LoHaConfig
    peft_type = "LOHA"

    def make_module(self, model, path, base, cfg: LoHaConfig) -> LoHaLinear:
        return LoHaLinear(base, cfg)

    def adapter_config(self, model: nn.Module, cfg: LoHaConfig) -> dict:
        out = super().adapter_config(model, cfg)
        out.update(init_weights=True, rank_pattern={}, alpha_pattern={}, use_effective_conv2d=False,
                   exclude_modules=None)
        return out

    def config_from_adapter(self, data: dict) -> LoHaConfig:
        if data.get("rank_pattern") or data.get("alpha_pattern"):
            raise ConfigError("This LoHa adapter uses per-layer rank_pattern/alpha_pattern, which the studio does not "
                              "load yet.")
        return super().config_from_adapter(data)


register(LoHaMethod())
