"""Compacter (as a weight update): ΔW = (alpha) · Σ_i A_i ⊗ (s_i t_i) on the target layers.

The n "rule" matrices A_i (n x n) are shared by every adapted layer of the model; each layer owns
low-rank factors s_i (out/n x r) and t_i (r x in/n), so a layer costs r·(in + out) parameters and
the whole model n³ more. This is the parameterised-hypercomplex (PHM) layer of Compacter applied
to the model's own projections instead of to bottleneck adapters, which keeps it mergeable
(W' = W + ΔW). s starts at 0, so the output equals the base at init. Own file format (`COMPACTER`);
the shared rule is saved once, under the first adapted layer.
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
class CompacterConfig(MethodConfig):
    n: int = opt(4, "Number of Kronecker terms and size of the shared n x n rule matrices (must divide in/out)")
    r: int = opt(1, "Rank of each layer's factor s_i t_i (Compacter uses 1)")
    alpha: float = opt(1.0, "Scale of the update")
    target_modules: list | str = opt(["q_proj", "v_proj"], "Layer names, a regex, or all-linear")


class CompacterLinear(DeltaLinear):
    rebuilt_buffers = (4.25, 2.125)

    def __init__(self, base: nn.Linear, rule: nn.Parameter, cfg: CompacterConfig):
        super().__init__(base)
        n, r = cfg.n, cfg.r
        o, i = base.out_features, base.in_features
        if o % n or i % n:
            raise ConfigError(f"Compacter n={n} must divide both sizes of every target layer; one has in={i}, "
                              f"out={o}. Pick n among the common divisors (e.g. 2, 4, 8).")
        dev = base.weight.device
        self.phm_rule = rule  # the same Parameter object in every layer (shared across the model)
        self.phm_s = nn.Parameter(torch.zeros(n, o // n, r, device=dev))
        self.phm_t = nn.Parameter(torch.empty(n, r, i // n, device=dev))
        nn.init.kaiming_uniform_(self.phm_t, a=math.sqrt(5))
        self.alpha = cfg.alpha

    def delta_weight(self) -> torch.Tensor:
        n = self.phm_rule.shape[0]
        blocks = self.phm_s @ self.phm_t  # (n, out/n, in/n)
        w = torch.einsum("iab,ixy->axby", self.phm_rule, blocks)  # Σ_i kron(A_i, B_i)
        return w.reshape(n * blocks.shape[1], n * blocks.shape[2]) * self.alpha


class CompacterMethod(DeltaMethod):
    name = "compacter"
    graph_safe = True
    summary = "Sum of Kronecker products of shared n x n rules and per-layer low-rank factors; mergeable."
    config_cls = CompacterConfig
    peft_type = "COMPACTER"

    def before_wrap(self, model: nn.Module, targets: list[str], cfg: CompacterConfig) -> None:
        if cfg.n < 1 or cfg.r < 1:
            raise ConfigError(f"Compacter needs n >= 1 and r >= 1; got n={cfg.n}, r={cfg.r}.")
        dev = model.get_submodule(targets[0]).weight.device
        rule = torch.empty(cfg.n, cfg.n, cfg.n, device=dev)
        nn.init.normal_(rule, std=1.0 / math.sqrt(cfg.n))
        self._rule = nn.Parameter(rule)

    def make_module(self, model, path, base, cfg: CompacterConfig) -> CompacterLinear:
        return CompacterLinear(base, self._rule, cfg)


register(CompacterMethod())
