"""VPT (visual prompt tuning) for a transformers Vision Transformer (image classification).

Shallow: n prompt tokens are inserted after the CLS token of the embedding output (after position
embeddings, so prompts carry no position). Deep: in addition every later layer replaces the n prompt
positions of its input with its own prompts, so each layer has fresh prompts. Only the prompts train
(plus the classification head, made trainable by studio.tasks.prepare_head). Prompts start uniform
in ±sqrt(6 / (3·patch² + d)) as in the VPT paper. Not identity at init (extra tokens change the CLS
output); disabling removes the prompts. Own file format (`VPT`): `vpt_prompts` (L' x n x d).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import opt
from ..errors import ConfigError
from . import register
from .base import Method, MethodConfig, applied
from .common import decoder_layers, freeze_all


@dataclass
class VptConfig(MethodConfig):
    num_tokens: int = opt(10, "Prompt tokens per layer")
    deep: bool = opt(False, "Deep VPT: new prompts at every layer (shallow: input only)")
    prompt_dropout: float = opt(0.0, "Dropout on the prompts in training")


class VisualPrompts(nn.Module):
    def __init__(self, layers: int, n: int, d: int, patch: int, dropout: float, device=None):
        super().__init__()
        bound = math.sqrt(6.0 / float(3 * patch * patch + d))
        self.prompts = nn.Parameter(torch.empty(layers, n, d, device=device).uniform_(-bound, bound))
        self.dropout = nn.Dropout(dropout)
        self.adapter_enabled = True

    def get(self, i: int, batch: int, dtype: torch.dtype) -> torch.Tensor:
        return self.dropout(self.prompts[i]).to(dtype).unsqueeze(0).expand(batch, -1, -1)


class VptMethod(Method):
    name = "vpt"
    category = "soft_prompt"
    summary = "Visual prompt tuning: prompt tokens after CLS (shallow) or at every layer (deep) of a ViT."
    config_cls = VptConfig
    mergeable = False
    peft_type = "VPT"
    promises_identity_at_init = False
    task_types = ("image_classification",)

    def apply(self, model: nn.Module, cfg: VptConfig) -> None:
        freeze_all(model)
        vit = getattr(model, "vit", None)
        if vit is None or not hasattr(vit, "embeddings"):
            raise ConfigError("VPT needs a Vision Transformer image classifier (transformers ViT); this model is not.")
        if cfg.num_tokens < 1:
            raise ConfigError(f"VPT num_tokens must be at least 1, got {cfg.num_tokens}.")
        layers = getattr(vit, "layers", None) or decoder_layers(model)  # transformers 5: vit.layers
        c = model.config
        n = cfg.num_tokens
        count = len(layers) if cfg.deep else 1
        prompts = VisualPrompts(count, n, c.hidden_size, c.patch_size, cfg.prompt_dropout,
                                vit.embeddings.cls_token.device)
        model.add_module("vpt", prompts)
        prompts.prompts.requires_grad_(True)

        def insert(module, args, output):
            if not prompts.adapter_enabled:
                return None
            p = prompts.get(0, output.shape[0], output.dtype)
            return torch.cat([output[:, :1], p, output[:, 1:]], dim=1)

        def replace(i):
            def hook(module, args, kwargs):
                if not prompts.adapter_enabled:
                    return None
                h = args[0] if args else kwargs["hidden_states"]
                h = torch.cat([h[:, :1], prompts.get(i, h.shape[0], h.dtype), h[:, 1 + n:]], dim=1)
                if args:
                    return (h, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": h}
            return hook

        handles = [vit.embeddings.register_forward_hook(insert)]
        if cfg.deep:
            handles += [layer.register_forward_pre_hook(replace(i), with_kwargs=True)
                        for i, layer in enumerate(layers) if i > 0]
        applied(model).extra = {"handles": handles}

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {"vpt.prompts": model.vpt.prompts.detach()}

    def trainable_summary(self, model: nn.Module) -> dict:
        layers, n, d = model.vpt.prompts.shape
        return {"prompt_layers": layers, "tokens_per_layer": n, "deep": layers > 1}


register(VptMethod())
