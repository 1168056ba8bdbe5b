"""Diff Pruning: θ = θ₀ + δ with δ = z ⊙ w, z hard-concrete L0 gates, pushed toward a target sparsity.

Per target weight matrix: w (the diff, init 0 so output == base) and log_alpha (gate logits). In
training, z = clamp(sigmoid((log u − log(1−u) + log_alpha)/β)·(ζ−γ) + γ, 0, 1) with u ~ U(0,1)
(Louizos et al.'s hard-concrete); in eval z = clamp(sigmoid(log_alpha)·(ζ−γ) + γ, 0, 1), which is
exactly 0 for closed gates. `extra_loss` is l0_weight · max(0, E[density] − (1 − target_sparsity)),
E[density] the expected fraction of open gates. After the last step a magnitude projection keeps
the (1 − target_sparsity) largest |δ| per matrix and closes every other gate, so the trained model
is exactly the sparse diff that is saved: `<path>.diff_indices` (int64) and `<path>.diff_values`.

Cost: the gates must see every entry during training, so w and log_alpha are dense (2 trainable
values per target entry: grads + 2 Adam states each, i.e. ~2x full tuning of the targets); only the
result is sparse. Pick narrow target_modules to bound it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import seeded_dropout
from ..config import opt
from ..errors import ConfigError
from . import register
from .base import Method, MethodConfig, applied
from .common import WrappedLinear, freeze_all, match_targets, replace_module

OPEN, CLOSED = 10.0, -10.0  # gate logits that give z == 1 / z == 0 exactly in eval


@dataclass
class DiffPruningConfig(MethodConfig):
    target_modules: list | str = opt(["q_proj", "v_proj"], "Weight matrices that get a diff (names, regex, all-linear)")
    target_sparsity: float = opt(0.99, "Fraction of entries left unchanged at the end (0.99 = 1% change)")
    l0_weight: float = opt(1.0, "Weight of the L0 penalty on the expected density above the target")
    gate_init: float = opt(1.0, "Initial gate logit (log_alpha): higher = more gates open at the start")
    beta: float = opt(2 / 3, "Hard-concrete temperature")
    gamma: float = opt(-0.1, "Hard-concrete stretch lower bound")
    zeta: float = opt(1.1, "Hard-concrete stretch upper bound")
    project_at_end: bool = opt(True, "After the last step keep only the largest diffs (exact target sparsity)")


class GatedDiffLinear(WrappedLinear):
    def __init__(self, base: nn.Linear, cfg: DiffPruningConfig):
        super().__init__(base)
        self.w = nn.Parameter(torch.zeros_like(base.weight, dtype=torch.float32))
        self.log_alpha = nn.Parameter(torch.full_like(base.weight, cfg.gate_init, dtype=torch.float32))
        self.beta, self.gamma, self.zeta = cfg.beta, cfg.gamma, cfg.zeta

    def seedable_draws(self) -> bool:
        """A training forward draws the gates' noise (studio/seeded_dropout.py may seed it)."""
        return True

    def gates(self) -> torch.Tensor:
        if self.training:
            u = seeded_dropout.uniform(self, self.log_alpha.shape, self.log_alpha.device).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((u.log() - (1 - u).log() + self.log_alpha) / self.beta)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0, 1)

    def diff(self) -> torch.Tensor:
        return self.gates() * self.w

    def expected_density(self) -> torch.Tensor:
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta)).mean()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.adapter_enabled:
            return self.base_layer(x)
        w = self.base_layer.weight
        return F.linear(x, w + self.diff().to(w.dtype), self.base_layer.bias)

    @torch.no_grad()
    def eval_diff(self) -> torch.Tensor:
        was = self.training
        self.training = False
        try:
            return self.diff()
        finally:
            self.training = was

    @torch.no_grad()
    def set_sparse(self, idx: torch.Tensor, values: torch.Tensor) -> None:
        self.w.zero_()
        self.log_alpha.fill_(CLOSED)
        self.w.view(-1)[idx] = values.to(self.w)
        self.log_alpha.view(-1)[idx] = OPEN

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            w = self.base_layer.weight
            w.data = (w.float() + self.eval_diff()).to(w.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.base_layer.weight
            w.data = (w.float() - self.eval_diff()).to(w.dtype)
            self.merged = False


class DiffPruningMethod(Method):
    name = "diff_pruning"
    category = "reparameterised"
    summary = "A sparse diff on chosen weights learned with hard-concrete L0 gates; saved as indices + values."
    config_cls = DiffPruningConfig
    mergeable = True
    peft_type = "STUDIO_DIFF_PRUNING"
    graph_safe = True  # gates drawn on the device; the projection after the last step works in place

    def apply(self, model: nn.Module, cfg: DiffPruningConfig) -> None:
        if not 0 <= cfg.target_sparsity < 1:
            raise ConfigError(f"diff_pruning.target_sparsity must be in [0, 1), got {cfg.target_sparsity}.")
        if not (cfg.gamma < 0 and cfg.zeta > 1 and cfg.beta > 0):
            raise ConfigError("diff_pruning needs gamma < 0, zeta > 1 and beta > 0 (defaults -0.1, 1.1, 2/3).")
        freeze_all(model)
        modules = {}
        for path in match_targets(model, cfg.target_modules):
            module = GatedDiffLinear(model.get_submodule(path), cfg)
            module.w.requires_grad_(True)
            module.log_alpha.requires_grad_(True)
            replace_module(model, path, module)
            modules[path] = module
        applied(model).extra = {"modules": modules, "projected": False}

    @staticmethod
    def _modules(model: nn.Module) -> dict[str, GatedDiffLinear]:
        return applied(model).extra["modules"]

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        cfg: DiffPruningConfig = applied(model).cfg
        if cfg.l0_weight <= 0 or not model.training:
            return None
        modules = list(self._modules(model).values())
        total = sum(m.w.numel() for m in modules)
        # weights as Python numbers: no host tensor copied to the device in a (captured) step
        density = sum(m.expected_density() * (m.w.numel() / total) for m in modules)
        return cfg.l0_weight * F.relu(density - (1 - cfg.target_sparsity))

    def after_optimizer_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        if step == total_steps - 1 and applied(model).cfg.project_at_end:
            self.project(model)

    @torch.no_grad()
    def project(self, model: nn.Module) -> None:
        """Keep the (1 - target_sparsity) largest |diff| entries of each matrix; close all other gates."""
        keep_frac = 1 - applied(model).cfg.target_sparsity
        for m in self._modules(model).values():
            d = m.eval_diff().view(-1)
            k = min(int((d != 0).sum()), max(1, int(keep_frac * d.numel())))
            idx = d.abs().topk(k).indices if k else d.new_zeros(0, dtype=torch.long)
            m.set_sparse(idx, d[idx])
        applied(model).extra["projected"] = True

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out = {}
        for n, m in self._modules(model).items():
            d = m.eval_diff().view(-1)
            idx = d.nonzero().view(-1)
            out[f"{n}.diff_indices"] = idx
            out[f"{n}.diff_values"] = d[idx]
        return out

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        for n, m in self._modules(model).items():
            if f"{n}.diff_indices" not in state:
                raise ConfigError(f"The adapter has no diff for {n}; it was trained on other layers.")
            m.set_sparse(state[f"{n}.diff_indices"].to(m.w.device), state[f"{n}.diff_values"])
        applied(model).extra["projected"] = True

    def trainable_summary(self, model: nn.Module) -> dict:
        per, total = {}, 0
        with torch.no_grad():
            for n, m in self._modules(model).items():
                per[n] = int((m.eval_diff() != 0).sum())
                total += m.w.numel()
            density = float(sum(m.expected_density() * m.w.numel() for m in self._modules(model).values()) / total)
        changed = sum(per.values())
        return {"changed_entries": changed, "target_entries": total, "changed_fraction": changed / max(1, total),
                "expected_density": density, "projected": applied(model).extra.get("projected", False),
                "changed_per_module": per}


register(DiffPruningMethod())
