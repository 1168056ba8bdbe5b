"""Memory of generation, for the chat tab and the calculator: the base model's weights, KV cache and
prefill peak (estimate_inference), and what chatting with a run adds (estimate_chat: its adapter and the
merged copy the chat makes)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .memory import CUDA_CONTEXT_BYTES, model_dtype, nf4_bytes
from .memory_act import Arch, Dtypes, Shape, rope_saved


def estimate_inference(model_ref_or_config: Any, context_len: int, batch: int = 1, dtype: str = "bfloat16",
                       quantization: str = "none", device: str = "cuda") -> dict[str, int]:
    """Weights + KV cache (+ context and the prefill peak) of generation, for the chat tab. The prefill peak: one
    layer's MLP intermediates and hidden states over the prompt, its rotary tables and attention masks, and the
    last position's fp32 logits."""
    from transformers import AutoModelForCausalLM

    from .methods.common import decoder_layers
    from .models import hf_config_from_dict, resolve_model_config
    if isinstance(model_ref_or_config, str):
        config = resolve_model_config(model_ref_or_config)
    elif isinstance(model_ref_or_config, dict):
        config = hf_config_from_dict(model_ref_or_config)
    else:
        config = model_ref_or_config
    pdtype = model_dtype(dtype, device)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=pdtype)
    base = {id(m.weight) for lay in decoder_layers(model) for m in lay.modules() if type(m) is nn.Linear}
    weights = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        weights += nf4_bytes(p.numel()) if quantization == "nf4" and id(p) in base else p.numel() * p.element_size()
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    arch = Arch.from_config(model.config)
    elt = torch.finfo(pdtype).bits // 8
    kv = 0
    for k in range(arch.layers):
        sliding = k < len(arch.layer_types) and arch.layer_types[k] == "sliding_attention" and arch.sliding_window
        length = min(context_len, arch.sliding_window) if sliding else context_len
        kv += 2 * batch * length * arch.kv_heads * arch.head_dim * elt
    prefill = batch * context_len * (3 * arch.inter + 4 * arch.hidden) * elt + batch * arch.vocab * 4
    prefill += rope_saved(arch, Shape(batch, context_len), Dtypes(elt, False))  # the prompt's cos and sin
    if arch.sliding_window and "sliding_attention" in arch.layer_types and context_len > arch.sliding_window:
        # the prompt's bool masks (a sliding one, and a causal one beside it where layers mix), as in training
        kinds = 2 if len(set(arch.layer_types)) > 1 else 1
        prefill += kinds * batch * context_len * context_len
        # a sliding layer's keys and values over the whole prompt, beyond the window its cache keeps
        prefill += 2 * batch * (context_len - arch.sliding_window) * arch.kv_heads * arch.head_dim * elt
    context = CUDA_CONTEXT_BYTES if device == "cuda" else 0
    return {"context": context, "weights": weights, "kv_cache": kv, "prefill": prefill,
            "total": context + weights + kv + prefill, "context_len": context_len, "batch": batch}


def estimate_chat(run_cfg: Any, context_len: int, dtype: str = "auto", device: str = "cuda") -> dict[str, int]:
    """What the chat tab holds for a run: estimate_inference of its base, plus the adapter's own weights
    ("adapter") and the merged copy of the adapted layers ("merged_copy", 0 where the chat cannot merge);
    "total" counts the adapter, "total_merged" the copy too (made only where it fits: merged_weights)."""
    from .merged_weights import copy_bytes, merge_plan
    from .params import meta_model
    pdtype = model_dtype(dtype, device)
    out = dict(estimate_inference(run_cfg.model.name, context_len, 1, str(pdtype).removeprefix("torch."),
                                  run_cfg.model.quantization, device))
    base: set[int] = set()
    model = meta_model(run_cfg, dtype=pdtype, before_apply=lambda m: base.update(id(p) for p in m.parameters()))
    out["adapter"] = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()
                         if id(p) not in base)
    wrappers, why_not = merge_plan(model)
    # PiSSA/OLoRA move part of the weight into the adapter: their base answers are not the original weights,
    # so the chat's probe leaves them unmerged (merged_weights)
    residual = str(getattr(run_cfg.method, "init_lora_weights", "")).lower() in ("pissa", "olora")
    out["merged_copy"] = 0 if why_not or residual or run_cfg.model.quantization != "none" else copy_bytes(wrappers)
    out["total"] += out["adapter"]
    out["total_merged"] = out["total"] + out["merged_copy"]
    return out
