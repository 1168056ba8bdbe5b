"""LoKr (KronA): ΔW = (alpha / r) · W1 ⊗ W2, a Kronecker product of two small factors.

out = a·b and in = c·d are each split into two factors near their square roots (peft's
`factorization`); W1 is (a x c), W2 is (b x d). W2 (and W1 when `decompose_both`) is itself a
low-rank product W2_a W2_b when r < max(b, d)/2, exactly as peft decides, so files are peft's `LOKR`
format (`lokr_w1`, `lokr_w2` or `lokr_w2_a`/`lokr_w2_b`). W1 starts at 0: output == base.
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
class LoKrConfig(MethodConfig):
    r: int = opt(8, "Rank of a factor when it is decomposed (large factors only)")
    alpha: float = opt(8, "Scale numerator: ΔW is multiplied by alpha / r")
    target_modules: list | str = opt(["q_proj", "v_proj"], "Layer names, a regex, or all-linear")
    decompose_both: bool = opt(False, "Also decompose the left factor W1 into a low-rank product")
    decompose_factor: int = opt(-1, "Split dimensions with this factor (-1 = near the square root)")
    rank_dropout: float = opt(0.0, "Dropout of rows of ΔW in training (ΔW then stays in memory until "
                                   "backward instead of being rebuilt there)")
    module_dropout: float = opt(0.0, "Probability of skipping the whole update in a training step")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Two numbers m <= n with m·n = dimension, m as close to `factor` (or sqrt) as possible (peft's rule)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (m, n) if m <= n else (n, m)


def lokr_shapes(in_f: int, out_f: int, r: int, decompose_both: bool = False, factor: int = -1) -> dict:
    """Parameter name -> shape for one layer (the closed form of what trains)."""
    a, b = factorization(out_f, factor)
    c, d = factorization(in_f, factor)
    shapes = {}
    if decompose_both and r < max(a, c) / 2:
        shapes.update(lokr_w1_a=(a, r), lokr_w1_b=(r, c))
    else:
        shapes["lokr_w1"] = (a, c)
    if r < max(b, d) / 2:
        shapes.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d))
    else:
        shapes["lokr_w2"] = (b, d)
    return shapes


def lokr_count(in_f: int, out_f: int, r: int, decompose_both: bool = False) -> int:
    return sum(x * y for x, y in lokr_shapes(in_f, out_f, r, decompose_both).values())


class LoKrLinear(DeltaLinear):
    rebuilt_buffers = (5.0, 5.0)  # kron's output and backward in fp32 under autocast too (not an autocast op)

    def __init__(self, base: nn.Linear, cfg: LoKrConfig):
        super().__init__(base)
        if cfg.r <= 0:
            raise ConfigError(f"LoKr rank r must be at least 1, got {cfg.r}.")
        dev = base.weight.device
        self.scaling = cfg.alpha / cfg.r
        self.rank_dropout, self.module_dropout = cfg.rank_dropout, cfg.module_dropout
        for name, shape in lokr_shapes(base.in_features, base.out_features, cfg.r, cfg.decompose_both,
                                       cfg.decompose_factor).items():
            setattr(self, name, nn.Parameter(torch.empty(shape, device=dev)))
        with torch.no_grad():  # peft's init: W1 (or W1_a) zero, the rest kaiming-uniform
            for name, p in self.named_parameters(recurse=False):
                nn.init.zeros_(p) if name in ("lokr_w1", "lokr_w1_a") else nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def _factor(self, i: int) -> torch.Tensor:
        full = getattr(self, f"lokr_w{i}", None)
        return full if full is not None else getattr(self, f"lokr_w{i}_a") @ getattr(self, f"lokr_w{i}_b")

    def delta_weight(self) -> torch.Tensor:
        w = torch.kron(self._factor(1), self._factor(2).contiguous()) * self.scaling
        return self.drop_rows(w)


class LoKrMethod(DeltaMethod):
    name = "lokr"
    graph_safe = True
    summary = "Kronecker-product update W1 ⊗ W2 (KronA/LoKr); mergeable; peft's LOKR format."
    config_cls = LoKrConfig
    peft_type = "LOKR"

    def make_module(self, model, path, base, cfg: LoKrConfig) -> LoKrLinear:
        return LoKrLinear(base, cfg)

    def adapter_config(self, model: nn.Module, cfg: LoKrConfig) -> dict:
        out = super().adapter_config(model, cfg)
        out.update(init_weights=True, rank_pattern={}, alpha_pattern={}, use_effective_conv2d=False,
                   rank_dropout_scale=False, exclude_modules=None)
        return out

    def config_from_adapter(self, data: dict) -> LoKrConfig:
        if data.get("rank_pattern") or data.get("alpha_pattern"):
            raise ConfigError("This LoKr adapter uses per-layer rank_pattern/alpha_pattern, which the studio does not "
                              "load yet.")
        return super().config_from_adapter(data)


register(LoKrMethod())
