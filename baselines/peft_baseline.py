"""transformers + peft, set up the way their docs show: the baseline of `python -m studio bench`."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

import peft

# our LoRA config's fields that peft's LoraConfig takes under the same names (PiSSA / OLoRA: peft runs its own init)
LORA_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_dora", "use_rslora", "init_lora_weights")


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


def prepare_lora_like(model: nn.Module, fields: dict) -> nn.Module:
    """peft's LoRA with our LoRA-family config's settings (DoRA, rsLoRA, PiSSA, OLoRA, LoRA+ share it)."""
    kw = {k: fields[k] for k in LORA_FIELDS if k in fields}
    kw["init_lora_weights"] = True if str(kw.get("init_lora_weights", True)).lower() == "true" else kw["init_lora_weights"]
    return peft.get_peft_model(model, peft.LoraConfig(**kw))


def prepare_from_adapter(model: nn.Module, folder: str | Path, total_step: int) -> nn.Module:
    """peft's model for an adapter of ours (its adapter_config.json and weights, as peft loads them), set to
    train: the same method, targets and initial weights. total_step: AdaLoRA's schedule length."""
    config = peft.PeftConfig.from_pretrained(str(folder))
    config.inference_mode = False  # from_pretrained(is_trainable=True) refuses prompt-learning adapters
    if hasattr(config, "total_step"):
        config.total_step = total_step
    model = peft.get_peft_model(model, config)
    state = load_file(str(Path(folder) / "adapter_model.safetensors"))
    if isinstance(config, peft.PromptLearningConfig):
        # saved: the virtual tokens themselves; peft trains them straight (prompt tuning, prefixes without the
        # MLP) or makes them with an encoder (P-tuning's MLP/LSTM, prefix_projection) that starts at its own init
        if config.peft_type == peft.PeftType.PROMPT_TUNING or not getattr(config, "prefix_projection", True):
            model.prompt_encoder[model.active_adapter].embedding.weight.data.copy_(state["prompt_embeddings"])
        return model
    unexpected = peft.set_peft_model_state_dict(model, state).unexpected_keys
    if unexpected:
        raise RuntimeError(f"peft did not take these weights of our adapter: {unexpected[:5]}")
    return model


def optimizer(model: nn.Module, fields: dict, lr: float, fused: bool | None) -> torch.optim.Optimizer:
    """AdamW over what trains; LoRA+ through peft's own helper (B at loraplus_lr_ratio x lr)."""
    ratio = fields.get("loraplus_lr_ratio") or 0
    if ratio:
        from peft.optimizers import create_loraplus_optimizer
        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio, fused=fused)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, fused=fused)


def after_optimizer_step(model: nn.Module, step: int) -> None:
    """AdaLoRA's rank budget, as peft's docs call it after each optimizer step."""
    if any(isinstance(c, peft.AdaLoraConfig) for c in getattr(model, "peft_config", {}).values()):
        model.base_model.update_and_allocate(step)


def loss(model: nn.Module, batch: dict):
    """transformers' own loss (full logits, upcast to fp32)."""
    return model(**batch).loss
