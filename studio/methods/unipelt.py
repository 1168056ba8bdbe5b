"""UniPELT: LoRA on q/v + prefix tuning + a serial adapter, each switched by a learned gate.

- LoRA (q_proj, v_proj): y = W x + σ(w_L·x + b_L) · s·B A x   (gate per token from the layer input)
- adapter after the FFN: h + σ(w_A·h + b_A) · W_up σ(W_down h)
- prefix (through the KV cache, studio/methods/prefix_tuning.py): the value prefix of layer l is
  scaled by σ(g_l). The prefix enters attention before the layer's input exists, so this gate is a
  learned per-layer scalar instead of the paper's input-dependent G_P (a documented simplification).
Gates start at σ(0) = 0.5. Not identity at init (the prefix). Own file format (`UNIPELT`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import opt
from . import register
from .adapter import ACTIVATIONS, AdapterFamily, Bottleneck, add_sites, adapter_sites, hidden_size
from .base import MethodConfig
from .common import adapter_input, match_targets, replace_module
from .lora import LoraLinear
from .mam_adapter import _copy_exact, prefix_cfg, split_prefix
from .prefix_tuning import PrefixTuningMethod
from .soft_prompt_common import kv_geometry

_PREFIX = PrefixTuningMethod()


@dataclass
class UniPeltConfig(MethodConfig):
    r: int = opt(8, "LoRA rank on q_proj and v_proj")
    lora_alpha: float = opt(16, "LoRA scale numerator (scale = lora_alpha / r)")
    lora_targets: list = opt(["q_proj", "v_proj"], "Layers that get gated LoRA")
    bottleneck: int = opt(48, "Bottleneck size of the gated adapter after each FFN")
    activation: str = opt("relu", "Non-linearity inside the adapter", tuple(ACTIVATIONS))
    num_virtual_tokens: int = opt(10, "Prefix key/value vectors per attention layer")
    prefix_projection: bool = opt(True, "Reparameterise the prefix by an MLP during training")
    encoder_hidden_size: int = opt(0, "Hidden size of the prefix MLP (0 = the per-layer kv width)")


class GatedLoraLinear(LoraLinear):
    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__(base, r, alpha, 0.0, False, False)
        self.init_weights(True)
        self.lora_gate = nn.Linear(base.in_features, 1, device=base.weight.device)
        nn.init.zeros_(self.lora_gate.weight)
        nn.init.zeros_(self.lora_gate.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if not self.adapter_enabled:
            return result
        xf = adapter_input(x, self.lora_A.weight.dtype)
        gate = torch.sigmoid(self.lora_gate(xf))
        return result + (gate * self.lora_B(self.lora_A(xf)) * self.scaling).to(result.dtype)


class GatedBottleneck(nn.Module):
    def __init__(self, d: int, m: int, activation: str, device=None):
        super().__init__()
        self.bottleneck = Bottleneck(d, m, activation, 1, "zeros", device)
        self.gate = nn.Linear(d, 1, device=device)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = adapter_input(h, self.gate.weight.dtype)
        return torch.sigmoid(self.gate(h)) * self.bottleneck(h)


class GatedPrefix(nn.Module):
    """Wraps the prefix source: value prefix of layer l times σ(g_l); what PrefixHook reads."""

    def __init__(self, source: nn.Module, layers: int, kv_dim: int):
        super().__init__()
        self.source = source
        self.layers, self.kv_dim = layers, kv_dim
        self.prefix_gates = nn.Parameter(torch.zeros(layers, device=next(source.parameters()).device))

    @property
    def num_virtual_tokens(self) -> int:
        return self.source.num_virtual_tokens

    @property
    def adapter_enabled(self) -> bool:
        return self.source.adapter_enabled

    @adapter_enabled.setter
    def adapter_enabled(self, value: bool) -> None:
        self.source.adapter_enabled = value

    def forward(self) -> torch.Tensor:
        flat = self.source()
        n = flat.shape[0]
        kv = flat.view(n, self.layers, 2, self.kv_dim)
        scale = torch.stack([torch.ones_like(self.prefix_gates), torch.sigmoid(self.prefix_gates)], dim=-1)
        return (kv * scale.view(1, self.layers, 2, 1)).reshape(n, -1)


class UniPeltMethod(AdapterFamily):
    name = "unipelt"
    graph_safe = True
    category = "hybrid"
    summary = "Gated LoRA (q, v) + gated prefix + gated adapter; the gates learn which sub-method to use."
    config_cls = UniPeltConfig
    peft_type = "UNIPELT"
    promises_identity_at_init = False

    def apply(self, model: nn.Module, cfg: UniPeltConfig) -> None:
        _PREFIX.apply(model, prefix_cfg(cfg))
        hook = model.studio_adapter.extra["hook"]
        layers, kv_heads, head_dim = kv_geometry(model)
        gated = GatedPrefix(model.prompt_encoder, layers, kv_heads * head_dim)
        hook.source = gated
        model.add_module("prefix_gate", gated)  # holds prompt_encoder too; params deduplicated
        d = hidden_size(model)
        dev = model.get_input_embeddings().weight.device
        for path in match_targets(model, cfg.lora_targets):
            replace_module(model, path, GatedLoraLinear(model.get_submodule(path), cfg.r, cfg.lora_alpha))
        add_sites(model, ["ffn"], lambda kind, i: GatedBottleneck(d, cfg.bottleneck, cfg.activation, dev), 1.0)
        self.unfreeze(model)
        for m in model.modules():
            if isinstance(m, GatedLoraLinear):
                for n, p in m.named_parameters():
                    p.requires_grad_(not n.startswith("base_layer."))
        gated.prefix_gates.requires_grad_(True)

    def _own(self, model: nn.Module) -> dict[str, torch.Tensor]:
        own = {f"{p}.adapter.{n}": t for p, s in adapter_sites(model) for n, t in s.adapter.named_parameters()}
        for name, m in model.named_modules():
            if isinstance(m, GatedLoraLinear):
                for n, t in m.named_parameters():
                    if not n.startswith("base_layer."):
                        own[f"{name}.{n}"] = t
        own["prefix_gate.prefix_gates"] = model.prefix_gate.prefix_gates
        return own

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {**{k: v.detach() for k, v in self._own(model).items()}, **_PREFIX.adapter_state_dict(model)}

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        prefix, rest = split_prefix(state)
        _PREFIX.load_adapter_state(model, prefix)
        _copy_exact(self._own(model), rest)

    def trainable_summary(self, model: nn.Module) -> dict:
        with torch.no_grad():
            gates = torch.sigmoid(model.prefix_gate.prefix_gates).tolist()
        return {**super().trainable_summary(model), **_PREFIX.trainable_summary(model), "prefix_gates": [round(g, 3) for g in gates],
                "lora_layers": sum(isinstance(m, GatedLoraLinear) for m in model.modules())}


register(UniPeltMethod())
