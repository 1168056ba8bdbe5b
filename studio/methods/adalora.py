"""AdaLoRA: an SVD-form update ΔW = P Λ Q whose rank budget moves to where it matters.

Each target Linear gets P = lora_B (out x r), Λ = lora_E (r x 1, init 0 so output == base) and
Q = lora_A (r x in), r = init_r; y = W x + (lora_alpha / init_r) · B (E ⊙ A) x, the update added in the base
GEMM's epilogue (methods.common.plus_base_product: one rounding of the sum in bf16 on the CPU) on a plain Linear
base.

Rank allocation (Zhang et al. 2023), run by `on_step` after backward and before optimizer.step:
- sensitivity I = |w · ∇w| per entry, smoothed  Ī ← β1 Ī + (1-β1) I, and its uncertainty
  Ū ← β2 Ū + (1-β2) |I - Ī|; the entry score is Ī · Ū;
- a triplet's (i-th singular value and vectors) score = score(E_i) + mean score of row A_i +
  mean score of column B_:,i;
- the total budget b(t) stays at init_r · (layers) until tinit, falls cubically to target_r · (layers)
  at total_step - tfinal, then stays; every deltaT steps of that window the lowest-scoring
  triplets are pruned (their E set to 0) so that b(t) remain; at total_step - tfinal the final
  pattern is fixed and enforced after every optimizer step.
The orthogonality regulariser orth_reg_weight · mean(‖AAᵀ - I‖_F, ‖BᵀB - I‖_F) is `extra_loss`.
Files are peft's ADALORA format: `lora_A`, `lora_B`, `lora_E` (no `.weight`), pruned to the kept
triplets, with `rank_pattern` (kept flags per layer) in adapter_config.json.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import opt
from ..errors import ConfigError
from . import register
from .base import Method, MethodConfig, applied
from .common import WrappedLinear, adapter_input, freeze_all, match_targets, plus_base_product, replace_module
from .dropped_input import draw, dropped_down, plain_dropout


@dataclass
class AdaLoraConfig(MethodConfig):
    init_r: int = opt(12, "Starting rank of every target layer")
    target_r: int = opt(8, "Average rank per layer after pruning (the final budget is target_r x layers)")
    tinit: int = opt(0, "Warm-up steps before any pruning")
    tfinal: int = opt(0, "Final steps with the rank pattern fixed")
    deltaT: int = opt(1, "Prune every deltaT steps during the budget schedule")
    beta1: float = opt(0.85, "EMA factor of the sensitivity")
    beta2: float = opt(0.85, "EMA factor of the uncertainty")
    orth_reg_weight: float = opt(0.5, "Weight of the orthogonality regulariser on P and Q")
    total_step: int = opt(0, "Total training steps for the budget schedule (0 = the run's step count)")
    lora_alpha: float = opt(32, "Scale numerator: the update is multiplied by lora_alpha / init_r")
    lora_dropout: float = opt(0.0, "Dropout on the adapter's input")
    target_modules: list | str = opt(["q_proj", "k_proj", "v_proj", "o_proj"], "Layer names, a regex, or all-linear")


class SVDLinear(WrappedLinear):
    """y = W x + s · B (E ⊙ A) x with s = alpha / init_r; names match peft's AdaLoRA layer."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__(base)
        if r < 1:
            raise ConfigError(f"AdaLoRA init_r must be at least 1, got {r}.")
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features, device=dev) * 0.02)
        self.lora_B = nn.Parameter(torch.randn(base.out_features, r, device=dev) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, device=dev))
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=dev), persistent=False)
        self.r = r
        self.scaling = (alpha if alpha > 0 else float(r)) / (r + 1e-5)  # peft: lora_alpha / (ranknum + 1e-5)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ (self.lora_A * self.lora_E)) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.adapter_enabled:
            return self.base_layer(x)
        xa = adapter_input(x, self.lora_A.dtype)
        if self.drops_in_op():  # the dropout's mask kept, not a dropped copy of x (dropped_input.py)
            low = dropped_down(xa, self.lora_A * self.lora_E, *draw(self, xa))
        else:
            low = self.lora_dropout(xa) @ (self.lora_A * self.lora_E).T
        delta = low @ (self.lora_B * self.scaling).T  # the scale on the small B
        if type(self.base_layer) is nn.Linear:
            return plus_base_product(self.base_layer, x, delta)
        result = self.base_layer(x)
        return result + delta.to(result.dtype)

    def drops_in_op(self) -> bool:
        """Whether the dropout (torch's, or none) and A's product run as one op of dropped_input.py."""
        return plain_dropout(self)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if type(self.base_layer) is not nn.Linear:
            raise ConfigError("Cannot merge into a 4-/8-bit base in place; export with --merge instead.")
        w = self.base_layer.weight
        w.data = (w.float() + self.delta_weight()).to(w.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base_layer.weight
        w.data = (w.float() - self.delta_weight()).to(w.dtype)
        self.merged = False

    @property
    def rank(self) -> int:
        return int(self.rank_mask.sum())


class RankAllocator:
    """Importance scores (EMA sensitivity x uncertainty) and the cubic budget schedule."""

    def __init__(self, cfg: AdaLoraConfig, layers: dict[str, SVDLinear]):
        if not 0 < cfg.beta1 < 1 or not 0 < cfg.beta2 < 1:
            raise ConfigError("AdaLoRA beta1 and beta2 must be between 0 and 1 (e.g. 0.85).")
        if cfg.target_r > cfg.init_r:
            raise ConfigError(f"AdaLoRA target_r ({cfg.target_r}) must not exceed init_r ({cfg.init_r}).")
        if cfg.deltaT < 1:
            raise ConfigError("AdaLoRA deltaT must be at least 1.")
        self.cfg = cfg
        self.layers = layers
        self.init_budget = cfg.init_r * len(layers)
        self.target_budget = cfg.target_r * len(layers)
        self.budget = self.init_budget
        self.exp_ipt: dict[str, torch.Tensor] = {}
        self.exp_unc: dict[str, torch.Tensor] = {}
        self.allocated = False      # any pruning happened (then a rank_pattern exists)
        self.final = False          # pattern fixed for the last tfinal steps
        self.total_seen = 0         # the run's total steps, as given to on_step

    def total(self, total_steps: int) -> int:
        total = self.cfg.total_step or total_steps
        self.total_seen = total
        if total - self.cfg.tfinal <= self.cfg.tinit:
            raise ConfigError(f"AdaLoRA needs total_step ({total}) > tinit ({self.cfg.tinit}) + tfinal "
                              f"({self.cfg.tfinal}); lower tinit/tfinal or train longer.")
        return total

    def schedule(self, step: int, total: int) -> tuple[int, bool]:
        """(budget, prune now?) at `step` (peft's schedule: cubic between tinit and total - tfinal)."""
        c = self.cfg
        if step <= c.tinit:
            return self.init_budget, False
        if step > total - c.tfinal:
            return self.target_budget, True
        progress = 1 - (step - c.tinit) / (total - c.tfinal - c.tinit)
        budget = int((self.init_budget - self.target_budget) * progress ** 3 + self.target_budget)
        return budget, step % c.deltaT == 0

    @torch.no_grad()
    def update_importance(self) -> None:
        """EMA sensitivity |p·grad| and its uncertainty, for every adapter tensor at once (a few multi-tensor
        ops a step, not ten small ones per tensor: this runs eagerly between steps, graphs or not)."""
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        keys, params, grads = [], [], []
        for name, layer in self.layers.items():
            for pname in ("lora_A", "lora_B", "lora_E"):
                p = getattr(layer, pname)
                if p.grad is not None:
                    keys.append(f"{name}.{pname}")
                    params.append(p)
                    grads.append(p.grad)
        if not keys:
            return
        for key, p in zip(keys, params):
            if key not in self.exp_ipt:
                self.exp_ipt[key] = torch.zeros_like(p)
                self.exp_unc[key] = torch.zeros_like(p)
        exp_ipt, exp_unc = [self.exp_ipt[k] for k in keys], [self.exp_unc[k] for k in keys]
        ipt = torch._foreach_mul(params, grads)
        torch._foreach_abs_(ipt)
        torch._foreach_mul_(exp_ipt, b1)
        torch._foreach_add_(exp_ipt, torch._foreach_mul(ipt, 1 - b1))
        spread = torch._foreach_sub(ipt, exp_ipt)
        torch._foreach_abs_(spread)
        torch._foreach_mul_(spread, 1 - b2)
        torch._foreach_mul_(exp_unc, b2)
        torch._foreach_add_(exp_unc, spread)

    def _score(self, key: str, like: torch.Tensor) -> torch.Tensor:
        if key not in self.exp_ipt:
            return torch.zeros_like(like)
        return self.exp_ipt[key] * self.exp_unc[key]

    @torch.no_grad()
    def prune_to(self, budget: int) -> None:
        """Keep the `budget` highest-scoring triplets over all layers; zero E of the others."""
        scores = {}
        for name, layer in self.layers.items():
            s_e = self._score(f"{name}.lora_E", layer.lora_E).view(-1)
            s_a = self._score(f"{name}.lora_A", layer.lora_A).mean(dim=1)
            s_b = self._score(f"{name}.lora_B", layer.lora_B).mean(dim=0)
            scores[name] = s_e + s_a + s_b
        everything = torch.cat([s.float().cpu() for s in scores.values()])
        k = self.init_budget - budget
        threshold = torch.kthvalue(everything, k).values.item() if k > 0 else float("-inf")
        for name, layer in self.layers.items():
            keep = scores[name] > threshold
            layer.rank_mask.copy_(keep)
            layer.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
        self.allocated = True
        self.budget = budget

    @torch.no_grad()
    def enforce_mask(self) -> None:
        for layer in self.layers.values():
            layer.lora_E.masked_fill_(~layer.rank_mask.view(-1, 1), 0.0)


class AdaLoraMethod(Method):
    name = "adalora"
    graph_safe = True  # its pruning runs between steps, in place on the captured buffers
    category = "reparameterised"
    summary = "SVD-form LoRA whose rank per layer is pruned by importance toward a total budget."
    config_cls = AdaLoraConfig
    mergeable = True
    peft_type = "ADALORA"

    def apply(self, model: nn.Module, cfg: AdaLoraConfig) -> None:
        freeze_all(model)
        layers = {}
        for path in match_targets(model, cfg.target_modules):
            module = SVDLinear(model.get_submodule(path), cfg.init_r, cfg.lora_alpha, cfg.lora_dropout)
            for p in (module.lora_A, module.lora_B, module.lora_E):
                p.requires_grad_(True)
            replace_module(model, path, module)
            layers[path] = module
        applied(model).extra = {"allocator": RankAllocator(cfg, layers)}

    @staticmethod
    def _allocator(model: nn.Module) -> RankAllocator:
        return applied(model).extra["allocator"]

    # --- training hooks -------------------------------------------------------------------
    def on_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        alloc = self._allocator(model)
        total = alloc.total(total_steps)
        end = total - alloc.cfg.tfinal
        if step < end:
            alloc.update_importance()
            budget, prune = alloc.schedule(step, total)
            if prune:
                alloc.prune_to(budget)
        elif step == end or not alloc.final:
            alloc.update_importance()
            alloc.prune_to(alloc.target_budget)
            alloc.final = True
            alloc.exp_ipt.clear()
            alloc.exp_unc.clear()

    def after_optimizer_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        alloc = self._allocator(model)
        if alloc.final:  # fixed pattern: pruned triplets stay exactly zero
            alloc.enforce_mask()

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        alloc = self._allocator(model)
        weight = alloc.cfg.orth_reg_weight
        if weight <= 0 or not model.training:
            return None
        terms = []
        for layer in alloc.layers.values():
            a, b = layer.lora_A, layer.lora_B
            eye = torch.eye(a.shape[0], device=a.device, dtype=a.dtype)
            terms.append(torch.linalg.matrix_norm(a @ a.T - eye))
            terms.append(torch.linalg.matrix_norm(b.T @ b - eye))
        return weight * torch.stack(terms).mean()

    def trainable_summary(self, model: nn.Module) -> dict:
        alloc = self._allocator(model)
        return {"rank_per_layer": {name: layer.rank for name, layer in alloc.layers.items()},
                "budget": alloc.budget, "init_budget": alloc.init_budget, "target_budget": alloc.target_budget}

    # --- files ----------------------------------------------------------------------------
    def _pattern(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """Kept triplets per layer (mask, plus any triplet whose E is not exactly zero), or None before pruning."""
        alloc = self._allocator(model)
        if not alloc.allocated:
            return None
        return {name: layer.rank_mask | (layer.lora_E.detach().view(-1) != 0) for name, layer in alloc.layers.items()}

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        pattern = self._pattern(model)
        out = {}
        for name, layer in self._allocator(model).layers.items():
            keep = pattern[name] if pattern is not None else slice(None)
            out[f"{name}.lora_A"] = layer.lora_A.detach()[keep]
            out[f"{name}.lora_B"] = layer.lora_B.detach()[:, keep]
            out[f"{name}.lora_E"] = layer.lora_E.detach()[keep]
        return out

    def adapter_config(self, model: nn.Module, cfg: AdaLoraConfig) -> dict:
        out = super().adapter_config(model, cfg)
        pattern = self._pattern(model)
        alloc = self._allocator(model)
        out.update(task_type="CAUSAL_LM", fan_in_fan_out=False, inference_mode=True, bias="none",
                   init_lora_weights=True, modules_to_save=None, total_step=cfg.total_step or None,
                   rank_pattern=None if pattern is None else
                   {f"{name}.lora_E": keep.tolist() for name, keep in pattern.items()},
                   studio_rank_per_layer={name: layer.rank for name, layer in alloc.layers.items()})
        if out["total_step"] is None:  # peft requires total_step > tinit + tfinal
            out["total_step"] = alloc.total_seen or cfg.tinit + cfg.tfinal + 1
        return out

    def config_from_adapter(self, data: dict) -> AdaLoraConfig:
        cfg = super().config_from_adapter(data)
        cfg._rank_pattern = data.get("rank_pattern")  # read by load_adapter_state
        return cfg

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        alloc = self._allocator(model)
        pattern = getattr(applied(model).cfg, "_rank_pattern", None) or {}
        with torch.no_grad():
            for name, layer in alloc.layers.items():
                keys = [f"{name}.{p}" for p in ("lora_A", "lora_B", "lora_E")]
                missing = [k for k in keys if k not in state]
                if missing:
                    raise ConfigError(f"AdaLoRA adapter lacks {missing[0]}; it was trained on other layers.")
                a, b, e = (state[k] for k in keys)
                flags = pattern.get(f"{name}.lora_E")
                keep = torch.tensor(flags, dtype=torch.bool, device=layer.lora_E.device) if flags is not None \
                    else torch.ones(layer.r, dtype=torch.bool, device=layer.lora_E.device)
                if keep.numel() != layer.r or int(keep.sum()) != a.shape[0]:
                    raise ConfigError(f"AdaLoRA adapter at {name} has rank {a.shape[0]} with a pattern of "
                                      f"{keep.numel()} flags; this config has init_r={layer.r}.")
                for p in (layer.lora_A, layer.lora_B, layer.lora_E):
                    p.zero_()
                layer.lora_A[keep] = a.to(layer.lora_A)
                layer.lora_B[:, keep] = b.to(layer.lora_B)
                layer.lora_E[keep] = e.to(layer.lora_E)
                layer.rank_mask.copy_(keep)
            if pattern:
                alloc.allocated = True
                alloc.budget = int(sum(layer.rank for layer in alloc.layers.values()))


register(AdaLoraMethod())
