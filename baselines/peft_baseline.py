"""transformers + peft, set up the way their docs show: the baseline of `python -m studio bench`."""
from __future__ import annotations

from torch import nn

import peft


def prepare(model: nn.Module, method: str, r: int, lora_alpha: float) -> nn.Module:
    """LoRA on all linear layers through peft (QLoRA: the same over a 4-bit base); full: everything trains."""
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                                      target_modules="all-linear"))


def loss(model: nn.Module, batch: dict):
    """transformers' own loss (full logits, upcast to fp32)."""
    return model(**batch).loss
