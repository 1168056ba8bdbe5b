"""Shared helpers for methods: find target modules by name, freeze, swap modules in place."""
from __future__ import annotations

import re
import sys
from typing import Iterable

import torch
from torch import nn

from ..errors import ConfigError
from .lora_fused import cast, op_dtype


class WrappedLinear(nn.Module):
    """Base of modules that wrap a (possibly 4-/8-bit) Linear as `base_layer` (peft's naming) and add
    an adapter to it; model code that reads `.weight` or the feature sizes still finds them."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base_layer = base
        self.adapter_enabled = True
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

# Output heads are never targets of "all-linear" (peft does the same).
HEAD_NAMES = ("lm_head", "score", "classifier", "cls", "pooler")


def adapter_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as an adapter's products take it: under autocast as it is (they compute in the 16-bit dtype anyway: an
    fp32 copy would be cast back, and each adapter would keep its own 16-bit copy instead of sharing x with its
    neighbours), else in the adapter's dtype."""
    return x if torch.is_autocast_enabled(x.device.type) else x.to(dtype)


def plus_base_product(base: nn.Linear, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """base(x) + delta for a plain Linear base (plus_product)."""
    delta2 = cast(delta.reshape(-1, delta.shape[-1]), op_dtype(x))
    y = plus_product(x.reshape(-1, x.shape[-1]), base.weight, delta2, base.bias)
    return y.view(*x.shape[:-1], y.shape[-1])


def plus_product(x2: torch.Tensor, w: torch.Tensor, delta2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x2 wᵀ + delta2 + bias, delta2 added by the GEMM in its epilogue (addmm, beta 1), then the bias: no separate
    pass over the output, and on the CPU in a 16-bit compute dtype the sum is rounded once, where a small update
    added to an output already rounded is mostly lost (tests/test_update_rounding.py; cuBLAS rounds its product
    before adding, as peft's order does)."""
    y = torch.addmm(delta2, x2, w.t())
    if bias is not None:  # after the sum: added first, the bias would round the small delta away
        y = y.add_(cast(bias, y.dtype))
    return y


def linear_types() -> tuple[type, ...]:
    """nn.Linear plus the bitsandbytes 4-/8-bit linears when bitsandbytes is already loaded.

    A quantized model has imported bitsandbytes while loading; otherwise none of its layers can be
    bitsandbytes layers, and importing it (slow, noisy on CPU) is not needed.
    """
    types: list[type] = [nn.Linear]
    bnb = sys.modules.get("bitsandbytes")
    if bnb is not None:
        types += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    return tuple(types)


def match_targets(model: nn.Module, target_modules: str | list[str], kinds: tuple[type, ...] | None = None,
                  exclude: Iterable[str] = ()) -> list[str]:
    """Module paths selected by `target_modules`: a list of name suffixes, a regex, or "all-linear"."""
    kinds = kinds or linear_types()
    exclude = list(exclude)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, kinds) or any(name == e or name.endswith("." + e) for e in exclude):
            continue
        short = name.rsplit(".", 1)[-1]
        if target_modules == "all-linear":
            hit = short not in HEAD_NAMES
        elif isinstance(target_modules, str):
            hit = re.fullmatch(target_modules, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in target_modules)
        if hit:
            names.append(name)
    if not names:
        found = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, kinds)})
        raise ConfigError(f"target_modules {target_modules!r} matched no layer; this model's linear layers are "
                          f"named: {', '.join(found)}.")
    return names


def get_submodule_parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, child = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), child


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, child = get_submodule_parent(model, path)
    setattr(parent, child, new)


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def layer_index(name: str) -> int | None:
    """The decoder layer number in a module/parameter path (`model.layers.3.mlp...` -> 3)."""
    m = re.search(r"\.(?:layers|layer|h|blocks)\.(\d+)\.", "." + name + ".")
    return int(m.group(1)) if m else None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a decoder-only or encoder model."""
    for path in ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers",
                 "bert.encoder.layer", "encoder.layer", "vit.encoder.layer", "model.decoder.layers"):
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList):
            return mod
    raise ConfigError("Could not find this model's transformer layers; the method does not support it yet.")
