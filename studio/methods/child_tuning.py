"""Child-Tuning: only a "child network" of the chosen weight matrices changes.

Child-Tuning_F: every step a Bernoulli(p) mask on the gradients, scaled by 1/p (the update is a
random sub-network each step; over a run most entries move). The changing mask needs a dense
delta, so F costs what full tuning of the targets costs (delta + grad + 2 Adam states per entry).

Child-Tuning_D: a fixed child network: the top-p entries of each target by Fisher information
(the sum of squared gradients over a pass on the training data, `prepare_for_training`). Because the
mask is fixed, only those entries exist as trainable values: each target holds `indices` (int64)
and `values` (fp32) of length k = p·numel, and the optimizer keeps state for k entries only
(memory ∝ p). The Fisher pass itself needs one dense gradient of the targets at a time (no
optimizer state). Without a Fisher pass (e.g. a bare test loop) D starts from a random child
network and says so in trainable_summary.

The weights stay frozen; the forward uses W + Δ (Δ scattered from the sparse values). Merge adds Δ
into W. The adapter file holds, per target, `child_indices` and `child_values` (the sparse diff).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import opt
from ..errors import ConfigError
from . import register
from .base import Method, MethodConfig, applied
from .common import WrappedLinear, freeze_all, match_targets, replace_module


@dataclass
class ChildTuningConfig(MethodConfig):
    mode: str = opt("D", "F: random gradient mask each step; D: fixed child network from Fisher information",
                    ("F", "D"))
    reserve_p: float = opt(0.3, "Fraction of entries in the child network (F: keep probability per step)")
    target_modules: list | str = opt("all-linear", "Weight matrices that may change (names, regex, all-linear)")
    fisher_examples: int = opt(64, "D: training examples used to estimate the Fisher information")
    fisher_batch_size: int = opt(4, "D: batch size of the Fisher pass")
    seed: int = opt(0, "Seed of the masks")


class DeltaLinear(WrappedLinear):
    """y = (W + Δ) x + b with Δ dense (mode F) or k scattered entries (mode D)."""

    def __init__(self, base: nn.Linear, k: int | None):
        super().__init__(base)
        dev = base.weight.device
        if k is None:
            self.delta = nn.Parameter(torch.zeros_like(base.weight, dtype=torch.float32))
        else:
            self.register_buffer("indices", torch.zeros(k, dtype=torch.long, device=dev))
            self.values = nn.Parameter(torch.zeros(k, dtype=torch.float32, device=dev))
        self.sparse = k is not None

    def dense_delta(self) -> torch.Tensor:
        if not self.sparse:
            return self.delta
        w = self.base_layer.weight
        flat = torch.zeros(w.numel(), dtype=self.values.dtype, device=w.device).index_add(0, self.indices, self.values)
        return flat.view_as(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.adapter_enabled:
            return self.base_layer(x)
        w = self.base_layer.weight
        if self.sparse:
            weight = w.reshape(-1).index_add(0, self.indices, self.values.to(w.dtype)).view_as(w)
        else:
            weight = w + self.delta.to(w.dtype)
        return F.linear(x, weight, self.base_layer.bias)

    def sparse_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, values) of the entries that differ from the base."""
        if self.sparse:
            keep = self.values != 0
            return self.indices[keep].detach(), self.values[keep].detach()
        flat = self.delta.detach().reshape(-1)
        idx = flat.nonzero().view(-1)
        return idx, flat[idx]

    @torch.no_grad()
    def load_sparse(self, idx: torch.Tensor, values: torch.Tensor) -> None:
        if self.sparse:
            if idx.numel() > self.values.numel():
                raise ConfigError(f"The adapter changes {idx.numel()} entries of a layer, more than this config's child "
                                  f"network holds ({self.values.numel()}); load it with its own adapter_config.json.")
            self.values.zero_()
            self.values[:idx.numel()] = values.to(self.values)
            rest = torch.ones(self.base_layer.weight.numel(), dtype=torch.bool, device=idx.device)
            rest[idx] = False
            filler = rest.nonzero().view(-1)[: self.values.numel() - idx.numel()]
            self.indices.copy_(torch.cat([idx.to(self.indices), filler.to(self.indices)]))
        else:
            self.delta.zero_()
            self.delta.view(-1)[idx.to(self.delta.device)] = values.to(self.delta)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            w = self.base_layer.weight
            w.data = (w.float() + self.dense_delta()).to(w.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.base_layer.weight
            w.data = (w.float() - self.dense_delta()).to(w.dtype)
            self.merged = False


def child_size(numel: int, p: float) -> int:
    return max(1, int(p * numel))


def pad_batch(examples: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad tokenized examples ({input_ids, labels}) into a batch with an attention mask."""
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.as_tensor(e["input_ids"])
        labels[i, :k] = torch.as_tensor(e.get("labels", e["input_ids"]))
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def iter_batches(train_data: Any, count: int, batch_size: int):
    """Batches from a list of tokenized examples, or from an iterable of ready batches."""
    if isinstance(train_data, dict):
        yield train_data
        return
    data = list(train_data)[:count] if not isinstance(train_data, torch.utils.data.DataLoader) else train_data
    if data and isinstance(data[0], dict) and torch.is_tensor(data[0].get("input_ids")) \
            and data[0]["input_ids"].dim() == 2:
        yield from data
        return
    for i in range(0, len(data), batch_size):
        yield pad_batch(data[i:i + batch_size])


def fisher_information(model: nn.Module, modules: dict[str, nn.Module], train_data: Any, count: int,
                       batch_size: int) -> dict[str, torch.Tensor]:
    """Sum of squared gradients of each module's base weight over a pass on the data (one batch at a time)."""
    from ..losses import causal_lm_loss
    device = next(model.parameters()).device
    weights = {n: m.base_layer.weight for n, m in modules.items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    fisher = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
    was_training = model.training
    model.eval()
    for p in trainable:
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    seen = 0
    try:
        for batch in iter_batches(train_data, count, batch_size):
            batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
            loss, _ = causal_lm_loss(model, batch)
            loss.backward()
            for n, w in weights.items():
                fisher[n] += w.grad.float() ** 2
                w.grad = None
            seen += 1
    finally:
        for w in weights.values():
            w.requires_grad_(False)
            w.grad = None
        for p in trainable:
            p.requires_grad_(True)
        model.train(was_training)
    if not seen:
        raise ConfigError("Child-Tuning D needs training examples for its Fisher pass; the training split is empty.")
    return fisher


class ChildTuningMethod(Method):
    name = "child_tuning"
    graph_safe = True
    category = "selective"
    summary = "Only a child network of the weights changes: random per-step (F) or Fisher-selected fixed (D)."
    config_cls = ChildTuningConfig
    mergeable = True
    peft_type = "STUDIO_CHILD_TUNING"

    def apply(self, model: nn.Module, cfg: ChildTuningConfig) -> None:
        if not 0 < cfg.reserve_p <= 1:
            raise ConfigError(f"child_tuning.reserve_p must be in (0, 1], got {cfg.reserve_p}.")
        freeze_all(model)
        gen = torch.Generator().manual_seed(cfg.seed)
        modules = {}
        for path in match_targets(model, cfg.target_modules):
            base = model.get_submodule(path)
            k = child_size(base.weight.numel(), cfg.reserve_p) if cfg.mode == "D" else None
            module = DeltaLinear(base, k)
            if module.sparse:  # random child network until a Fisher pass picks it
                module.indices.copy_(torch.randperm(base.weight.numel(), generator=gen)[:k].sort().values)
            for p in module.parameters(recurse=False):
                p.requires_grad_(True)
            replace_module(model, path, module)
            modules[path] = module
        applied(model).extra = {"modules": modules, "mask_source": "random" if cfg.mode == "D" else "per-step"}

    @staticmethod
    def _modules(model: nn.Module) -> dict[str, DeltaLinear]:
        return applied(model).extra["modules"]

    def prepare_for_training(self, model: nn.Module, train_data: Any, cfg: ChildTuningConfig) -> None:
        if cfg.mode != "D":
            return
        modules = self._modules(model)
        fisher = fisher_information(model, modules, train_data, cfg.fisher_examples, cfg.fisher_batch_size)
        with torch.no_grad():
            for n, m in modules.items():
                top = fisher[n].view(-1).topk(m.values.numel()).indices.sort().values
                m.indices.copy_(top)
                m.values.zero_()
        applied(model).extra["mask_source"] = "fisher"

    def on_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        cfg: ChildTuningConfig = applied(model).cfg
        if cfg.mode != "F":
            return
        extra = applied(model).extra
        for m in self._modules(model).values():
            g = m.delta.grad
            if g is None:
                continue
            gen = extra.setdefault(f"generator:{g.device}", torch.Generator(device=g.device).manual_seed(cfg.seed + 1))
            keep = torch.rand(g.shape, generator=gen, device=g.device) < cfg.reserve_p
            g.mul_(keep.to(g.dtype) / cfg.reserve_p)

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out = {}
        for n, m in self._modules(model).items():
            idx, val = m.sparse_state()
            out[f"{n}.child_indices"] = idx
            out[f"{n}.child_values"] = val
        return out

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        for n, m in self._modules(model).items():
            if f"{n}.child_indices" not in state:
                raise ConfigError(f"The adapter has no entries for {n}; it was trained on other layers.")
            m.load_sparse(state[f"{n}.child_indices"], state[f"{n}.child_values"])
        applied(model).extra["mask_source"] = "loaded"

    def trainable_summary(self, model: nn.Module) -> dict:
        per = {}
        total = 0
        for n, m in self._modules(model).items():
            per[n] = int(m.sparse_state()[0].numel())
            total += m.base_layer.weight.numel()
        changed = sum(per.values())
        return {"changed_entries": changed, "target_entries": total, "changed_fraction": changed / max(1, total),
                "changed_per_module": per, "mask_source": applied(model).extra.get("mask_source")}


register(ChildTuningMethod())
