"""transformers + peft, set up the way their docs show: the baseline of `python -m studio bench`."""
from __future__ import annotations

from torch import nn

import peft


def prepare(model: nn.Module, method: str, r: int, lora_alpha: float) -> nn.Module:
    """LoRA on all linear layers through peft; full: everything trains. QLoRA follows peft's QLoRA guide:
    prepare_model_for_kbit_training (non-4-bit weights to fp32) over the 4-bit base, then the same LoRA.
    Gradient checkpointing, when the row asks for it, is already on (non-reentrant), so it is not redone."""
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method == "qlora":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                                      target_modules="all-linear"))


def loss(model: nn.Module, batch: dict):
    """transformers' own loss (full logits, upcast to fp32)."""
    return model(**batch).loss
