"""The Method interface every PEFT method implements, and the base of method configs.

A method is a config dataclass (fields with defaults and help: the page renders its form from
them, the CLI accepts them as `--set method.<field>=...`) plus a Method object whose functions act
on a model in place. The model remembers what was applied in `model.studio_adapter`, so later calls
(save, merge, disable, generate) need only the model.

State-dict keys returned by `adapter_state_dict` are module paths of the *unwrapped* model
(e.g. `model.layers.0.self_attn.q_proj.lora_A.weight`); checkpoint.py adds peft's
`base_model.model.` prefix when writing files.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from ..config import opt
from ..errors import ConfigError

CATEGORIES = ("reparameterised", "adapter", "soft_prompt", "selective", "hybrid")


@dataclass
class MethodConfig:
    """Base of every method's config. `name` is the registered name or preset (lora, dora, ...)."""
    name: str = opt("", "Registered method or preset name")


@dataclass
class AppliedAdapter:
    """What was applied to a model: kept on `model.studio_adapter`."""
    method: "Method"
    cfg: MethodConfig
    enabled: bool = True
    merged: bool = False
    extra: dict | None = None  # method-owned state (e.g. AdaLoRA importance, masks)


class Method:
    """Base class: override what the method supports. Stateless; state lives on the model."""

    name: str = ""
    category: str = "reparameterised"
    summary: str = ""
    config_cls: type = MethodConfig
    mergeable: bool = False
    peft_type: str | None = None  # value written to adapter_config.json (own value if peft lacks it)
    promises_identity_at_init: bool = True  # output == base right after apply()
    task_types: tuple = ("causal_lm",)
    graph_safe: bool = False  # its training step is the same GPU work every time (train.cuda_graphs may capture it)
    host_random: tuple = ()  # config fields that, when non-zero, make a random choice on the host each step
    base_copy: str | None = None  # a CPU copy of the original values it keeps (keep_base_copy): "all" or "trained"

    def capturable(self, cfg: MethodConfig | None) -> bool:
        """Whether a training step with this config may be captured once and replayed (train.cuda_graphs):
        graph_safe, and no per-step choice on the host (a replay would repeat the captured one)."""
        return self.graph_safe and not any(getattr(cfg, name, 0) for name in self.host_random)

    # --- required -------------------------------------------------------------------------
    def apply(self, model: nn.Module, cfg: MethodConfig) -> None:
        """Inject modules / freeze / register hooks, in place; mark only the method's params trainable."""
        raise NotImplementedError

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors that make up the adapter, keyed by module path of the unwrapped model."""
        raise NotImplementedError

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load tensors produced by adapter_state_dict (after apply() with the same config)."""
        own = self.adapter_state_dict(model)
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            raise ConfigError(
                f"Adapter does not match this model/method: {len(missing)} missing keys (e.g. {missing[:2]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}); load it onto the base it was trained on.")
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        with torch.no_grad():
            for key, value in state.items():
                target = params.get(key, buffers.get(key))
                if target is None:
                    raise ConfigError(f"Adapter key {key} has no place in the model; wrong base model?")
                if target.shape != value.shape:
                    raise ConfigError(f"Adapter tensor {key} has shape {tuple(value.shape)}, model expects "
                                      f"{tuple(target.shape)}; the adapter was trained with other settings.")
                target.copy_(value.to(target.dtype))

    # --- file format ----------------------------------------------------------------------
    def adapter_config(self, model: nn.Module, cfg: MethodConfig) -> dict:
        """The adapter_config.json content (peft's field names where peft has the method)."""
        from dataclasses import asdict
        out = asdict(cfg)
        out.pop("name", None)  # kept as studio_method
        out["peft_type"] = self.peft_type or self.name.upper()
        out["studio_method"] = cfg.name or self.name
        return out

    def config_from_adapter(self, data: dict) -> MethodConfig:
        """Rebuild our config from an adapter_config.json (ours or peft's); unknown keys ignored."""
        from dataclasses import fields
        names = {f.name for f in fields(self.config_cls)}
        kept = {k: v for k, v in data.items() if k in names and v is not None}
        kept["name"] = data.get("studio_method") or self.name
        from ..config import build_dataclass
        return build_dataclass(self.config_cls, kept, "adapter_config")

    # --- optional -------------------------------------------------------------------------
    def merge(self, model: nn.Module) -> None:
        """Fold the update into the base weights: every wrapper module that can merge() does."""
        self._merge_all(model, merge=True)

    def unmerge(self, model: nn.Module) -> None:
        self._merge_all(model, merge=False)

    def _merge_all(self, model: nn.Module, merge: bool) -> None:
        if not self.mergeable:
            raise ConfigError(f"{self.name} cannot be merged into the base weights; export the adapter instead.")
        from .common import WrappedLinear
        for module in model.modules():
            if isinstance(module, WrappedLinear) and hasattr(module, "merge"):
                module.merge() if merge else module.unmerge()
        applied(model).merged = merge

    @contextlib.contextmanager
    def disable_adapter(self, model: nn.Module) -> Iterator[None]:
        """Run the base model: default flips `studio_adapter.enabled`, which adapter modules read."""
        info = model.studio_adapter
        if info.merged:
            self.unmerge(model)
            try:
                with self.disable_adapter(model):
                    yield
            finally:
                self.merge(model)
            return
        previous = info.enabled
        info.enabled = False
        set_adapter_enabled(model, False)
        try:
            yield
        finally:
            info.enabled = previous
            set_adapter_enabled(model, previous)

    def on_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Called after backward, before optimizer.step() (grad masks, AdaLoRA budget...)."""

    def after_optimizer_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Called after optimizer.step() (e.g. re-apply masks, sample DyLoRA rank)."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A regulariser added to the task loss (AdaLoRA orthogonality, Diff-Pruning L0)."""
        return None

    def optimizer_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """Parameter groups for the optimizer; default = all trainable params at one lr."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}]

    def prepare_for_training(self, model: nn.Module, train_data: Any, cfg: MethodConfig) -> None:
        """A pass before training that needs the data (Child-Tuning_D Fisher mask)."""

    def trainable_summary(self, model: nn.Module) -> dict[str, Any]:
        """Method-specific facts for the params breakdown (e.g. changed fraction, rank per layer)."""
        return {}


def set_adapter_enabled(model: nn.Module, enabled: bool) -> None:
    """Adapter modules that define `adapter_enabled` follow this switch."""
    for module in model.modules():
        if hasattr(module, "adapter_enabled"):
            module.adapter_enabled = enabled


def attach(model: nn.Module, method: Method, cfg: MethodConfig) -> AppliedAdapter:
    info = AppliedAdapter(method=method, cfg=cfg)
    model.studio_adapter = info
    return info


def applied(model: nn.Module) -> AppliedAdapter:
    info = getattr(model, "studio_adapter", None)
    if info is None:
        raise ConfigError("No method has been applied to this model; call studio.methods.apply_method first.")
    return info
