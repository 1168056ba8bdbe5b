"""Prefix tuning and P-tuning v2: n trainable key/value vectors prepended in every attention layer.

The prefix goes in through the model's KV cache (soft_prompt_common.PrefixHook): it never passes
through the key/value projections, so no rotary position is applied to it, and the attention mask
is extended by n. Grouped-query models get kv_dim = num_key_value_heads · head_dim per layer.
With prefix_projection the prefix is produced during training by an MLP from a small (n x kv_dim)
embedding (Li & Liang's reparameterisation, for stability); only the projected prefix is saved.
P-tuning v2 is the same with the projection off (a preset: presets/methods/p_tuning_v2.yaml).
Files are peft's PREFIX_TUNING format: `prompt_embeddings` (n x L·2·kv_dim), per layer key then
value, heads, head_dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import opt
from ..errors import ConfigError
from . import register
from .base import Method, MethodConfig, applied
from .common import freeze_all
from .soft_prompt_common import PrefixHook, PromptTable, SoftPromptSource, kv_geometry, load_prompt_embeddings, \
    prompt_embeddings_state, soft_prompt_summary, text_config


@dataclass
class PrefixTuningConfig(MethodConfig):
    num_virtual_tokens: int = opt(20, "Number of prefix key/value vectors per layer")
    prefix_projection: bool = opt(True, "Reparameterise the prefix by an MLP during training (off = P-tuning v2)")
    encoder_hidden_size: int = opt(0, "Hidden size of the projection MLP (0 = the per-layer kv width)")


class PrefixMLP(nn.Module):
    """kv_dim -> hidden -> L·2·kv_dim with tanh, as in peft's PrefixEncoder (same module names)."""

    def __init__(self, kv_dim: int, hidden: int, out: int, device=None):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(kv_dim, hidden, device=device), nn.Tanh(),
                                       nn.Linear(hidden, out, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform(x)


class PrefixTuningMethod(Method):
    name = "prefix_tuning"
    graph_safe = True
    category = "soft_prompt"
    summary = "Trainable key/value prefixes in every attention layer, fed through the KV cache."
    config_cls = PrefixTuningConfig
    mergeable = False
    peft_type = "PREFIX_TUNING"
    promises_identity_at_init = False
    file_key_prefix = ""  # peft writes `prompt_embeddings` without the base_model.model. prefix

    def apply(self, model: nn.Module, cfg: PrefixTuningConfig) -> None:
        freeze_all(model)
        if getattr(model, "prompt_encoder", None) is not None:
            raise ConfigError("This model already carries a soft prompt; load a fresh base model.")
        layers, kv_heads, head_dim = kv_geometry(model)
        kv_dim = kv_heads * head_dim
        width = layers * 2 * kv_dim
        n = cfg.num_virtual_tokens
        device = model.get_input_embeddings().weight.device
        if cfg.prefix_projection:
            hidden = cfg.encoder_hidden_size or kv_dim
            source = SoftPromptSource(n, PromptTable(n, kv_dim, device=device), PrefixMLP(kv_dim, hidden, width, device))
        else:
            source = SoftPromptSource(n, PromptTable(n, width, device=device))
        window = getattr(text_config(model), "sliding_window", None)
        if window and n >= window:
            raise ConfigError(f"num_virtual_tokens={n} does not fit this model's sliding window ({window}); use fewer.")
        model.add_module("prompt_encoder", source)
        for p in source.parameters():
            p.requires_grad_(True)
        applied(model).extra = {"hook": PrefixHook(model, source)}

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return prompt_embeddings_state(model)

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        layers, kv_heads, head_dim = kv_geometry(model)
        load_prompt_embeddings(model, state, layers * 2 * kv_heads * head_dim, "prefix-tuning",
                               f" = {layers} layers x key+value x {kv_heads} kv heads x {head_dim}")

    def adapter_config(self, model: nn.Module, cfg: PrefixTuningConfig) -> dict:
        out = super().adapter_config(model, cfg)
        layers, kv_heads, head_dim = kv_geometry(model)
        out.update(task_type="CAUSAL_LM", inference_mode=True, num_transformer_submodules=1,
                   token_dim=kv_heads * head_dim, num_layers=layers, num_attention_heads=kv_heads,
                   encoder_hidden_size=cfg.encoder_hidden_size or kv_heads * head_dim, modules_to_save=None,
                   init_weights=None, base_model_name_or_path=getattr(model, "studio_model_ref", None))
        return out

    def trainable_summary(self, model: nn.Module) -> dict:
        return soft_prompt_summary(model.prompt_encoder)


register(PrefixTuningMethod())
