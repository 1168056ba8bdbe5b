"""DyLoRA: LoRA trained at a random rank b <= r each step, usable at every rank afterwards.

y = W x + (alpha / r) · B[:, :b] A[:b] x (the scale stays alpha / r, as in the DyLoRA code).
After each optimizer step a new b is drawn uniformly from [min_rank, r] (the same b for every
layer, as in the paper); evaluation, saving and merging use `eval_rank` (0 = r). One run therefore gives an adapter that can be truncated to any rank without
retraining. B starts at 0 (output == base). Own file format (`DYLORA`) with LoRA's key names.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import opt
from ..errors import ConfigError
from . import register
from .base import MethodConfig, applied
from .deltas import DeltaLinear, DeltaMethod

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class DyLoraConfig(MethodConfig):
    r: int = opt(8, "Largest rank trained")
    lora_alpha: float = opt(16, "Scale numerator: the update is multiplied by lora_alpha / r at every rank")
    lora_dropout: float = opt(0.0, "Dropout on the adapter's input")
    target_modules: list | str = opt(ATTENTION, "Layer names, a regex, or all-linear")
    min_rank: int = opt(1, "Smallest rank sampled in training")
    eval_rank: int = opt(0, "Rank used for evaluation, saving-time inference and merge (0 = r)")
    seed: int = opt(0, "Seed of the rank sampling")


class DyLoraLinear(DeltaLinear):
    def __init__(self, base: nn.Linear, cfg: DyLoraConfig):
        super().__init__(base)
        if cfg.r <= 0 or not 1 <= cfg.min_rank <= cfg.r or not 0 <= cfg.eval_rank <= cfg.r:
            raise ConfigError(f"DyLoRA needs 1 <= min_rank <= r and 0 <= eval_rank <= r; got r={cfg.r}, "
                              f"min_rank={cfg.min_rank}, eval_rank={cfg.eval_rank}.")
        dev = base.weight.device
        self.lora_A = nn.Linear(base.in_features, cfg.r, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(cfg.r, base.out_features, bias=False, device=dev, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(cfg.lora_dropout) if cfg.lora_dropout > 0 else nn.Identity()
        self.r, self.scaling = cfg.r, cfg.lora_alpha / cfg.r  # fixed scale: truncation keeps the step size
        self.eval_rank = cfg.eval_rank or cfg.r
        # training truncates with a 0/1 mask over A's rows, not a slice: the sampled rank changes a buffer's
        # values between steps, never the step's shapes, so a captured step (train.cuda_graphs) stays valid
        self.register_buffer("rank_mask", torch.ones(cfg.r, device=dev), persistent=False)
        self.train_rank = cfg.r

    def adapter_dtype(self) -> torch.dtype:
        return self.lora_A.weight.dtype

    @property
    def train_rank(self) -> int:
        return self._train_rank

    @train_rank.setter
    def train_rank(self, b: int) -> None:
        self._train_rank = b
        with torch.no_grad():
            self.rank_mask[:b].fill_(1.0)
            self.rank_mask[b:].fill_(0.0)

    def _a_rows(self) -> torch.Tensor:
        """A as the step uses it: rows past the sampled rank zeroed in training (so are their gradients,
        and B's columns past it get none), the first eval_rank rows otherwise."""
        a = self.lora_A.weight
        return a * self.rank_mask[:, None] if self.training and not self.merged else a[:self.eval_rank]

    def delta_weight(self) -> torch.Tensor:
        a = self._a_rows()
        return self.lora_B.weight[:, :a.shape[0]] @ a * self.scaling

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self._a_rows()
        return F.linear(F.linear(self.lora_dropout(x), a), self.lora_B.weight[:, :a.shape[0]]) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_layer.weight.data = (self.base_layer.weight.float() + self._eval_delta()).to(
                self.base_layer.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight.data = (self.base_layer.weight.float() - self._eval_delta()).to(
                self.base_layer.weight.dtype)
            self.merged = False

    def _eval_delta(self) -> torch.Tensor:
        b = self.eval_rank
        return self.lora_B.weight[:, :b] @ self.lora_A.weight[:b] * self.scaling


class DyLoraMethod(DeltaMethod):
    name = "dylora"
    summary = "LoRA trained at a random rank each step; the adapter works at every rank up to r; mergeable."
    graph_safe = True  # the rank drawn between steps only changes DyLoraLinear.rank_mask's values
    config_cls = DyLoraConfig
    peft_type = "DYLORA"

    def make_module(self, model, path, base, cfg: DyLoraConfig) -> DyLoraLinear:
        return DyLoraLinear(base, cfg)

    def after_optimizer_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        cfg: DyLoraConfig = applied(model).cfg
        b = random.Random(cfg.seed * 1_000_003 + step).randint(cfg.min_rank, cfg.r)
        self.set_rank(model, train_rank=b)

    def set_rank(self, model: nn.Module, train_rank: int | None = None, eval_rank: int | None = None) -> None:
        """Set the training rank (sampled) or the rank used for inference (any b <= r, no retraining)."""
        for _, m in self.wrappers(model):
            if m.merged and eval_rank is not None:
                raise ConfigError("Unmerge the DyLoRA adapter before changing its rank.")
            if train_rank is not None:
                m.train_rank = train_rank
            if eval_rank is not None:
                if not 1 <= eval_rank <= m.r:
                    raise ConfigError(f"DyLoRA eval rank must be between 1 and r={m.r}, got {eval_rank}.")
                m.eval_rank = eval_rank

    def trainable_summary(self, model: nn.Module) -> dict:
        w = self.wrappers(model)
        return {"wrapped_layers": len(w), "max_rank": w[0][1].r if w else 0,
                "eval_rank": w[0][1].eval_rank if w else 0}


register(DyLoraMethod())
