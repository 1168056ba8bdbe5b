"""BitFit and Freeze: selective tuning of existing parameters (no new modules, no merge needed).

BitFit trains bias terms only (all of them, or those of chosen modules). Many modern LLMs (Llama,
Gemma) have no biases at all; then the method stops with a message that names the two documented
alternatives, offered as `missing_bias`: `add_zero` adds zero biases to the chosen linear layers
(output == base at init, trains out_features values per layer) and `norm_weights` trains the
normalisation scales instead. Freeze trains the last k decoder layers, optionally only the
parameters whose names match patterns (e.g. only the MLPs of the top layers).

The trained tensors themselves are the adapter (saved under their parameter names, our own
peft_type); a CPU copy of their original values (small for BitFit) serves `disable_adapter`.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..config import opt
from ..errors import ConfigError
from . import register
from .base import Method, MethodConfig, applied
from .common import HEAD_NAMES, decoder_layers, freeze_all


@dataclass
class BitFitConfig(MethodConfig):
    bias_modules: list | str = opt("all", "Whose biases train: all, or module names (e.g. q_proj,k_proj,v_proj / mlp)")
    missing_bias: str = opt("error", "If the chosen modules have no biases: error, add_zero (add zero biases to "
                            "them) or norm_weights (train the norm scales instead)",
                            ("error", "add_zero", "norm_weights"))


@dataclass
class FreezeConfig(MethodConfig):
    last_k_layers: int = opt(2, "Train the top k decoder layers (0 = apply `patterns` to the whole model)")
    patterns: list = opt([], "Only parameters whose name matches one of these regexes train (e.g. mlp)")
    keep_base_copy: bool = opt(True, "Keep the original values in CPU RAM so base vs tuned can be compared")


def _selected(path: str, which: list | str) -> bool:
    if which == "all" or which == ["all"]:
        return True
    parts = path.split(".")
    return any(w in parts or path.endswith("." + w) or path == w for w in which)


class _SelectiveMethod(Method):
    """Shared parts: the trained tensors are the adapter; originals kept for disable/changed counts."""
    category = "selective"
    mergeable = False
    base_copy = "trained"

    def _trained(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def _remember(self, model: nn.Module, keep: bool = True, added: list | None = None) -> None:
        trained = self._trained(model)
        weightless = any(p.is_meta for p in trained.values())  # the estimator applies methods on meta models
        base = {n: p.detach().to("cpu", copy=True) for n, p in trained.items()} if keep and not weightless else None
        applied(model).extra = {"base": base, "added": added or []}

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self._trained(model).items()}

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        super().load_adapter_state(model, state)
        # the loaded values are the tuned model; the originals stay what apply() recorded

    @contextlib.contextmanager
    def disable_adapter(self, model: nn.Module) -> Iterator[None]:
        base = (applied(model).extra or {}).get("base")
        if base is None:
            raise ConfigError(f"{self.name} kept no copy of the original values; set method.keep_base_copy=true.")
        params = self._trained(model)
        tuned = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(base[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(tuned[n])

    def trainable_summary(self, model: nn.Module) -> dict:
        extra = applied(model).extra or {}
        base = extra.get("base")
        params = self._trained(model)
        total = sum(p.numel() for p in model.parameters())
        out = {"trained_tensors": len(params), "trained_params": sum(p.numel() for p in params.values()),
               "fraction_of_model": sum(p.numel() for p in params.values()) / max(1, total),
               "added_biases": len(extra.get("added", []))}
        if base is not None:
            changed = {n: int((p.detach().cpu() != base[n]).sum()) for n, p in params.items()}
            out["changed_entries"] = sum(changed.values())
            out["changed_tensors"] = sorted(n for n, c in changed.items() if c)
        return out


class BitFitMethod(_SelectiveMethod):
    name = "bitfit"
    graph_safe = True
    summary = "Only bias terms train (models without biases: add zero biases or train norm scales instead)."
    config_cls = BitFitConfig
    peft_type = "STUDIO_BITFIT"

    def apply(self, model: nn.Module, cfg: BitFitConfig) -> None:
        freeze_all(model)
        which = cfg.bias_modules
        chosen = [(n, m) for n, m in model.named_modules() if n and _selected(n, which)]
        biases = [m.bias for n, m in chosen if isinstance(getattr(m, "bias", None), nn.Parameter)]
        linears = [(n, m) for n, m in chosen if isinstance(m, nn.Linear) and m.bias is None
                   and n.rsplit(".", 1)[-1] not in HEAD_NAMES]
        norms = [m.weight for n, m in chosen if "norm" in type(m).__name__.lower()
                 and isinstance(getattr(m, "weight", None), nn.Parameter)]
        added = []
        if cfg.missing_bias == "add_zero":
            for n, m in linears:
                m.bias = nn.Parameter(torch.zeros(m.out_features, device=m.weight.device, dtype=m.weight.dtype))
                biases.append(m.bias)
                added.append(n)
        elif cfg.missing_bias == "norm_weights":
            biases += norms
        if not biases:
            n_add = sum(m.out_features for _, m in linears)
            n_norm = sum(w.numel() for w in norms)
            raise ConfigError(
                f"This model has no bias terms in {'any module' if which == 'all' else which} (Llama/Gemma-style "
                f"models have none), so BitFit has nothing to train. Choose an alternative: "
                f"method.missing_bias=add_zero adds zero biases to the {len(linears)} linear layers "
                f"({n_add:,} trainable values, output unchanged at start), or method.missing_bias=norm_weights "
                f"trains the normalisation scales ({n_norm:,} values).")
        for p in biases:
            p.requires_grad_(True)
        self._remember(model, True, added)

    def adapter_config(self, model: nn.Module, cfg: BitFitConfig) -> dict:
        out = super().adapter_config(model, cfg)
        out["added_biases"] = (applied(model).extra or {}).get("added", [])
        return out


class FreezeMethod(_SelectiveMethod):
    name = "freeze"
    graph_safe = True
    summary = "Train only the last k decoder layers (or parameters matched by name patterns)."
    config_cls = FreezeConfig
    peft_type = "STUDIO_FREEZE"

    def apply(self, model: nn.Module, cfg: FreezeConfig) -> None:
        freeze_all(model)
        if cfg.last_k_layers < 0:
            raise ConfigError("freeze.last_k_layers must be 0 or more.")
        if cfg.last_k_layers == 0 and not cfg.patterns:
            raise ConfigError("freeze needs last_k_layers > 0 or at least one name pattern (e.g. mlp).")
        if cfg.last_k_layers:
            layers = decoder_layers(model)
            if cfg.last_k_layers > len(layers):
                raise ConfigError(f"freeze.last_k_layers={cfg.last_k_layers} but the model has {len(layers)} layers.")
            ids = {id(p) for layer in list(layers)[-cfg.last_k_layers:] for p in layer.parameters()}
            candidates = [(n, p) for n, p in model.named_parameters() if id(p) in ids]
        else:
            candidates = list(model.named_parameters())
        try:
            regexes = [re.compile(p) for p in cfg.patterns]
        except re.error as e:
            raise ConfigError(f"freeze.patterns has an invalid regex ({e}); use plain names such as mlp.") from None
        chosen = [p for n, p in candidates if not regexes or any(r.search(n) for r in regexes)]
        if not chosen:
            raise ConfigError(f"freeze selected no parameter (last_k_layers={cfg.last_k_layers}, patterns="
                              f"{cfg.patterns}); module names look like {candidates[0][0] if candidates else '?'}.")
        for p in chosen:
            if not p.is_floating_point():
                raise ConfigError("freeze needs a 16/32-bit model for the layers it trains; turn quantization off.")
            p.requires_grad_(True)
        self._remember(model, cfg.keep_base_copy)


register(BitFitMethod())
register(FreezeMethod())
