"""AdapterFusion: attention over the outputs of several finished adapters; only the fusion trains.

Stage 1 is two or more ordinary `adapter` runs on the same base (their adapter/ folders, saved by
studio.checkpoint.save_adapter). Stage 2 (this method) loads them frozen and, at every adapter
site, combines them: with h the site's output and o_k = h + s_k · adapter_k(h),

    w_k = softmax_k((Q h) · (K o_k)),   fused = Σ_k w_k · V o_k

Q, K, V (d x d with bias) are the only trainable tensors; V starts as the identity and Q, K near
zero, so training starts from the plain average of the adapters (not from the base model). The
saved fusion file also holds the frozen component adapters, so it loads without the source folders.
`adapters` entries may be `random:<seed>[:<bottleneck>]` (a random adapter, for tests and demos).
Own file format (`ADAPTER_FUSION`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import opt
from ..errors import ConfigError
from . import register
from .adapter import AdapterFamily, Bottleneck, add_sites, adapter_sites, hidden_size
from .base import MethodConfig
from .common import freeze_all


@dataclass
class AdapterFusionConfig(MethodConfig):
    adapters: list = opt([], "Adapter folders of finished `adapter` runs on this base (two or more)")
    components: list = opt([], "Filled in automatically: the component adapters' settings (saved with the fusion)")


class Fusion(nn.Module):
    """Frozen component adapters + trainable Q, K, V; returns fused − h (AdapterSite adds it to h)."""

    def __init__(self, d: int, adapters: list[Bottleneck], scales: list[float], device=None):
        super().__init__()
        self.adapters = nn.ModuleList(adapters)
        self.scales = scales
        self.query = nn.Linear(d, d, device=device)
        self.key = nn.Linear(d, d, device=device)
        self.value = nn.Linear(d, d, device=device)
        with torch.no_grad():
            for lin in (self.query, self.key):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
            self.value.weight.copy_(torch.eye(d))
            nn.init.zeros_(self.value.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h.to(self.query.weight.dtype)
        outs = torch.stack([h + s * a(h) for a, s in zip(self.adapters, self.scales)], dim=-2)  # (..., K, d)
        q = self.query(h).unsqueeze(-2)
        scores = (q * self.key(outs)).sum(-1) / math.sqrt(h.shape[-1])
        weights = torch.softmax(scores, dim=-1).unsqueeze(-1)
        return (weights * self.value(outs)).sum(-2) - h


def _random_component(spec: str) -> dict:
    parts = spec.split(":")
    try:
        seed = int(parts[1])
        m = int(parts[2]) if len(parts) > 2 else 8
    except (IndexError, ValueError):
        raise ConfigError(f"Random adapter spec {spec!r} must look like random:<seed> or random:<seed>:<bottleneck>.") \
            from None
    return {"bottleneck": m, "activation": "relu", "scale": 1.0, "placement": "houlsby", "drop_lowest": 0,
            "random_seed": seed}


def _read_component(folder: str) -> tuple[dict, dict | None]:
    """Settings and tensors of a finished adapter folder (or a random: spec)."""
    if folder.startswith("random:"):
        return _random_component(folder), None
    from ..checkpoint import load_adapter_state_file, read_adapter_config  # lazy: checkpoint imports methods
    if not Path(folder).is_dir():
        raise ConfigError(f"Adapter folder {folder} does not exist; pick the adapter/ folder of a finished adapter run.")
    cfg = read_adapter_config(folder)
    if cfg.get("peft_type") != "ADAPTER":
        raise ConfigError(f"{folder} holds a {cfg.get('studio_method') or cfg.get('peft_type')} adapter; AdapterFusion "
                          f"fuses serial bottleneck adapters (method adapter or pfeiffer_adapter).")
    spec = {k: cfg[k] for k in ("bottleneck", "activation", "scale", "placement", "drop_lowest")}
    return spec, load_adapter_state_file(folder)


class AdapterFusionMethod(AdapterFamily):
    graph_safe = True  # frozen components and the fusion's attention: the same device work every step
    name = "adapter_fusion"
    summary = "Attention over several finished adapters' outputs per layer; only the fusion Q, K, V train."
    config_cls = AdapterFusionConfig
    peft_type = "ADAPTER_FUSION"
    promises_identity_at_init = False

    def apply(self, model: nn.Module, cfg: AdapterFusionConfig) -> None:
        freeze_all(model)
        if len(cfg.adapters) < 2:
            raise ConfigError("AdapterFusion needs at least two adapter folders in `adapters`.")
        specs, states = [], []
        for i, folder in enumerate(cfg.adapters):
            folder = str(folder)
            try:
                spec, state = _read_component(folder)
            except ConfigError:
                if i < len(cfg.components):  # a saved fusion: the components travel in its own file
                    spec, state = cfg.components[i], None
                else:
                    raise
            specs.append(spec)
            states.append(state)
        placement = {(s["placement"], s["drop_lowest"]) for s in specs}
        if len(placement) != 1:
            raise ConfigError(f"The adapters to fuse must share placement and drop_lowest; got {sorted(placement)}.")
        cfg.components = specs
        place, drop = placement.pop()
        d = hidden_size(model)
        dev = model.get_input_embeddings().weight.device

        def make(kind: str, layer: int) -> Fusion:
            parts = []
            for spec in specs:
                if "random_seed" in spec:
                    torch.manual_seed(spec["random_seed"] * 1000 + layer * 2 + (kind == "ffn"))
                b = Bottleneck(d, spec["bottleneck"], spec["activation"], 1, "zeros", dev)
                if "random_seed" in spec:
                    with torch.no_grad():
                        nn.init.normal_(b.up_weight, std=0.05)
                parts.append(b)
            return Fusion(d, parts, [s["scale"] for s in specs], dev)

        kinds = ["attn", "ffn"] if place == "houlsby" else ["ffn"]
        add_sites(model, kinds, make, 1.0, drop)
        with torch.no_grad():
            for path, site in adapter_sites(model):
                for k, state in enumerate(states):
                    if state is None:
                        continue
                    for name, p in site.adapter.adapters[k].named_parameters():
                        key = f"{path}.adapter.{name}"
                        if key not in state:
                            raise ConfigError(f"Adapter {cfg.adapters[k]} has no tensor {key}; it was trained on "
                                              f"another base model or placement.")
                        p.copy_(state[key])
        for _, site in adapter_sites(model):
            site.adapter.adapters.requires_grad_(False)
            for lin in (site.adapter.query, site.adapter.key, site.adapter.value):
                for p in lin.parameters():
                    p.requires_grad_(True)

    def trainable_summary(self, model: nn.Module) -> dict:
        out = super().trainable_summary(model)
        out["fused_adapters"] = len(model.studio_adapter.cfg.adapters)
        return out


register(AdapterFusionMethod())
