"""MAM adapter (He et al., "Towards a unified view"): a parallel FFN adapter + prefix tuning.

The FFN of every layer gets a large parallel adapter (h_ffn + s · W_up σ(W_down x), bottleneck 512,
s = 4 by default) and attention gets a small prefix (30 key/value vectors per layer, through the
KV cache exactly as `prefix_tuning` does: this file calls into studio/methods/prefix_tuning.py).
Not identity at init (the prefix changes attention). Own file format (`MAM_ADAPTER`): adapter keys
plus `prompt_embeddings` (the projected prefix, peft's prefix layout).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import opt
from . import register
from .adapter import ACTIVATIONS, AdapterFamily, Bottleneck, add_sites, adapter_sites, hidden_size
from .base import MethodConfig
from .prefix_tuning import PrefixTuningConfig, PrefixTuningMethod

_PREFIX = PrefixTuningMethod()


@dataclass
class MamAdapterConfig(MethodConfig):
    bottleneck: int = opt(512, "Bottleneck size of the parallel FFN adapter")
    scale: float = opt(4.0, "Multiplier s of the parallel adapter output")
    activation: str = opt("relu", "Non-linearity inside the adapter", tuple(ACTIVATIONS))
    num_virtual_tokens: int = opt(30, "Prefix key/value vectors per attention layer")
    prefix_projection: bool = opt(True, "Reparameterise the prefix by an MLP during training")
    encoder_hidden_size: int = opt(0, "Hidden size of the prefix MLP (0 = the per-layer kv width)")


def prefix_cfg(cfg) -> PrefixTuningConfig:
    return PrefixTuningConfig(name="prefix_tuning", num_virtual_tokens=cfg.num_virtual_tokens,
                              prefix_projection=cfg.prefix_projection, encoder_hidden_size=cfg.encoder_hidden_size)


def split_prefix(state: dict) -> tuple[dict, dict]:
    prefix = {k: v for k, v in state.items() if k == "prompt_embeddings"}
    return prefix, {k: v for k, v in state.items() if k != "prompt_embeddings"}


class MamAdapterMethod(AdapterFamily):
    name = "mam_adapter"
    graph_safe = True
    category = "hybrid"
    summary = "Parallel FFN adapter (m=512, s=4) + prefix tuning (30 tokens) on attention."
    config_cls = MamAdapterConfig
    peft_type = "MAM_ADAPTER"
    promises_identity_at_init = False

    def apply(self, model: nn.Module, cfg: MamAdapterConfig) -> None:
        _PREFIX.apply(model, prefix_cfg(cfg))  # freezes the base, adds model.prompt_encoder + its hook
        d = hidden_size(model)
        dev = model.get_input_embeddings().weight.device
        add_sites(model, ["ffn_parallel"], lambda kind, i: Bottleneck(d, cfg.bottleneck, cfg.activation, 1, "zeros",
                                                                      dev), cfg.scale)
        self.unfreeze(model)

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {**super().adapter_state_dict(model), **_PREFIX.adapter_state_dict(model)}

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        prefix, rest = split_prefix(state)
        _PREFIX.load_adapter_state(model, prefix)
        own = {f"{p}.adapter.{n}": t for p, s in adapter_sites(model) for n, t in s.adapter.named_parameters()}
        _copy_exact(own, rest)

    def trainable_summary(self, model: nn.Module) -> dict:
        return {**super().trainable_summary(model), **_PREFIX.trainable_summary(model)}


def _copy_exact(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    from ..errors import ConfigError
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ConfigError(f"Adapter does not match this model/method: {len(missing)} missing (e.g. {missing[:2]}), "
                          f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}); load it onto its own base model.")
    with torch.no_grad():
        for k, t in own.items():
            if t.shape != state[k].shape:
                raise ConfigError(f"Adapter tensor {k} has shape {tuple(state[k].shape)}, the model expects "
                                  f"{tuple(t.shape)}; it was trained with other settings.")
            t.copy_(state[k])


register(MamAdapterMethod())
