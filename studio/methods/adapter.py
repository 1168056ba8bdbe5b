"""Bottleneck adapters (Houlsby serial, Pfeiffer) with AdapterDrop; shared by the adapter family.

Serial adapter at a site with output h: h + s · W_up σ(W_down h) (bottleneck m, biases on both).
Houlsby places one after the attention output projection and one after the FFN of every layer;
Pfeiffer only after the FFN. W_up starts at zero (`init: zeros`, output == base exactly) or near
zero (`near_zero`, N(0, 1e-3²)). AdapterDrop: `drop_lowest` k removes the adapters of the lowest k
layers (fewer parameters, and training/inference of those layers runs at base speed);
`drop_prob` skips each layer's adapters at random in training forward passes.

The `Bottleneck` below holds M stacked copies (AdaMix uses M > 1); `parallel_adapter.py`,
`adamix.py`, `adapter_fusion.py`, `mam_adapter.py` and `unipelt.py` reuse this file's pieces.
Own file format (`ADAPTER`): keys `<site path>.adapter.down_weight` etc.
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
from .base import Method, MethodConfig
from .common import adapter_input, decoder_layers, freeze_all, replace_module

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
# Where the sites are, relative to one transformer block (first match wins).
ATTN_OUT = ("self_attn.o_proj", "attention.output.dense", "attn.c_proj", "self_attn.out_proj", "attention.dense")
FFN_OUT = ("mlp", "feed_forward", "output.dense")  # serial: the FFN's output
FFN_BLOCK = ("mlp", "feed_forward")  # parallel: a module taking the FFN input and returning its output


@dataclass
class AdapterConfig(MethodConfig):
    bottleneck: int = opt(64, "Bottleneck size m of each adapter")
    placement: str = opt("houlsby", "houlsby: after attention and FFN; pfeiffer: after the FFN only",
                         ("houlsby", "pfeiffer"))
    activation: str = opt("relu", "Non-linearity inside the adapter", tuple(ACTIVATIONS))
    scale: float = opt(1.0, "Multiplier s of the adapter output")
    init: str = opt("zeros", "W_up init: zeros (output == base) or near_zero (N(0, 1e-3))", ("zeros", "near_zero"))
    drop_lowest: int = opt(0, "AdapterDrop: no adapters in the lowest k layers")
    drop_prob: float = opt(0.0, "AdapterDrop: probability of skipping a layer's adapters in a training pass")


class Bottleneck(nn.Module):
    """M stacked copies of W_up σ(W_down x + b_down) + b_up; training routes through a random copy,
    inference uses the average of the copies' weights (AdaMix). M = 1 is a plain adapter."""

    def __init__(self, d: int, m: int, activation: str, copies: int = 1, init: str = "zeros", device=None):
        super().__init__()
        if m <= 0 or copies <= 0:
            raise ConfigError(f"Adapter bottleneck and copies must be at least 1; got {m} and {copies}.")
        if activation not in ACTIVATIONS:
            raise ConfigError(f"Unknown adapter activation {activation!r}; choose {', '.join(ACTIVATIONS)}.")
        self.act = ACTIVATIONS[activation]
        self.down_weight = nn.Parameter(torch.empty(copies, m, d, device=device))
        self.down_bias = nn.Parameter(torch.zeros(copies, m, device=device))
        self.up_weight = nn.Parameter(torch.zeros(copies, d, m, device=device))
        self.up_bias = nn.Parameter(torch.zeros(copies, d, device=device))
        with torch.no_grad():
            for i in range(copies):
                nn.init.kaiming_uniform_(self.down_weight[i], a=math.sqrt(5))
            if init == "near_zero":
                nn.init.normal_(self.up_weight, std=1e-3)

    @property
    def copies(self) -> int:
        return self.down_weight.shape[0]

    def seedable_draws(self) -> bool:
        """Whether a training forward draws its routing (studio/seeded_dropout.py may seed it)."""
        return self.copies > 1

    def weights(self) -> tuple[torch.Tensor, ...]:
        if self.copies == 1:
            return self.down_weight[0], self.down_bias[0], self.up_weight[0], self.up_bias[0]
        if self.training:  # AdaMix stochastic routing: independent random copies for down and up
            # drawn on the device, so a captured step draws a new routing at every replay
            u = seeded_dropout.uniform(self, (2,), self.down_weight.device)
            ij = (u * self.copies).long().clamp_(max=self.copies - 1)
            i, j = ij[:1], ij[1:]
            return (self.down_weight.index_select(0, i)[0], self.down_bias.index_select(0, i)[0],
                    self.up_weight.index_select(0, j)[0], self.up_bias.index_select(0, j)[0])
        return (self.down_weight.mean(0), self.down_bias.mean(0), self.up_weight.mean(0), self.up_bias.mean(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wd, bd, wu, bu = self.weights()
        return F.linear(self.act(F.linear(adapter_input(x, wd.dtype), wd, bd)), wu, bu)


class AdapterSite(nn.Module):
    """Wraps a module: serial (h + s·adapter(h), h = module output) or parallel (h + s·adapter(x))."""

    def __init__(self, base: nn.Module, adapter: nn.Module, scale: float, parallel: bool, layer: int,
                 drop_prob: float = 0.0):
        super().__init__()
        self.base_layer = base
        self.adapter = adapter
        self.scale, self.parallel, self.layer, self.drop_prob = scale, parallel, layer, drop_prob
        self.adapter_enabled = True

    def __getattr__(self, name: str):  # model code may read attributes of the wrapped module
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_layer, name)

    def skip(self) -> bool:
        if not self.adapter_enabled:
            return True
        return self.training and self.drop_prob > 0 and torch.rand(()).item() < self.drop_prob

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out = self.base_layer(x, *args, **kwargs)
        if self.skip():
            return out
        h = out[0] if isinstance(out, tuple) else out
        delta = self.adapter(x if self.parallel else h)
        h = h + (self.scale * delta).to(h.dtype)
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h


def find_site(layer: nn.Module, candidates: tuple[str, ...], what: str) -> str:
    for path in candidates:
        try:
            layer.get_submodule(path)
            return path
        except AttributeError:
            continue
    raise ConfigError(f"Could not find the {what} of this model's layers (tried {', '.join(candidates)}); "
                      f"the adapter methods do not support this architecture yet.")


def layer_prefix(model: nn.Module) -> str:
    layers = decoder_layers(model)
    for name, mod in model.named_modules():
        if mod is layers:
            return name
    raise ConfigError("Could not locate the transformer layers.")


def hidden_size(model: nn.Module) -> int:
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    return cfg.hidden_size


def add_sites(model: nn.Module, kinds: list[str], make_adapter, scale: float, drop_lowest: int = 0,
              drop_prob: float = 0.0) -> list[str]:
    """Wrap the chosen sites of every layer >= drop_lowest; kinds from {attn, ffn, ffn_parallel}."""
    prefix = layer_prefix(model)
    layers = decoder_layers(model)
    if not 0 <= drop_lowest < len(layers):
        raise ConfigError(f"drop_lowest must be between 0 and {len(layers) - 1} (this model has {len(layers)} "
                          f"layers); got {drop_lowest}.")
    if not 0 <= drop_prob < 1:
        raise ConfigError(f"drop_prob must be in [0, 1); got {drop_prob}.")
    paths = []
    for i, layer in enumerate(layers):
        if i < drop_lowest:
            continue
        for kind in kinds:
            rel = find_site(layer, {"attn": ATTN_OUT, "ffn": FFN_OUT, "ffn_parallel": FFN_BLOCK}[kind],
                            {"attn": "attention output", "ffn": "FFN output", "ffn_parallel": "FFN block"}[kind])
            path = f"{prefix}.{i}.{rel}"
            base = model.get_submodule(path)
            site = AdapterSite(base, make_adapter(kind, i), scale, kind == "ffn_parallel", i, drop_prob)
            replace_module(model, path, site)
            paths.append(path)
    return paths


def adapter_sites(model: nn.Module) -> list[tuple[str, AdapterSite]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterSite)]


class AdapterFamily(Method):
    """Save/load/summary for methods whose trainable tensors live in AdapterSite wrappers."""

    category = "adapter"
    mergeable = False
    host_random = ("drop_prob",)  # AdapterDrop draws on the host whether a layer's adapters run

    def unfreeze(self, model: nn.Module) -> None:
        for _, site in adapter_sites(model):
            for p in site.adapter.parameters():
                p.requires_grad_(True)

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"{path}.adapter.{n}": p.detach() for path, site in adapter_sites(model)
                for n, p in site.adapter.named_parameters()}

    def trainable_summary(self, model: nn.Module) -> dict:
        sites = adapter_sites(model)
        return {"adapter_sites": len(sites), "layers_with_adapters": sorted({s.layer for _, s in sites})}


class AdapterMethod(AdapterFamily):
    name = "adapter"
    graph_safe = True
    summary = "Houlsby bottleneck adapters after attention and FFN (Pfeiffer: FFN only); AdapterDrop options."
    config_cls = AdapterConfig
    peft_type = "ADAPTER"
    copies = 1

    def num_copies(self, cfg) -> int:
        return 1

    def apply(self, model: nn.Module, cfg: AdapterConfig) -> None:
        freeze_all(model)
        d = hidden_size(model)
        dev = model.get_input_embeddings().weight.device
        kinds = ["attn", "ffn"] if cfg.placement == "houlsby" else ["ffn"]
        add_sites(model, kinds, lambda kind, i: Bottleneck(d, cfg.bottleneck, cfg.activation, self.num_copies(cfg),
                                                           cfg.init, dev),
                  cfg.scale, cfg.drop_lowest, cfg.drop_prob)
        self.unfreeze(model)


register(AdapterMethod())
