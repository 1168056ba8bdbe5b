"""Trainable-parameter breakdown: total, trainable, per method component, per module kind, per layer.

`param_breakdown(model)` works on any instantiated model (the meta device is fine) after a method
was applied; `breakdown_for_config(run_cfg)` builds the model on the meta device from the resolved
config (no weights loaded, seconds even for 70B models) and applies the method, so the page can show
the breakdown before anything is downloaded. Tied weights are counted once.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from .errors import StudioError

# Method components, recognised from parameter names (peft's names where peft has the method).
COMPONENTS = (
    ("lora_magnitude_vector", "magnitude"), ("lora_A", "lora_A"), ("lora_B", "lora_B"), ("lora_E", "lora_E"),
    ("ia3_l", "ia3"), ("vera_lambda", "vera"), ("lokr_", "lokr"), ("hada_", "loha"),
    ("prompt_encoder", "prompt_encoder"), ("prompt_embeddings", "prompt"), ("prefix", "prefix"),
    ("modules_to_save", "modules_to_save"), ("adapter", "adapter"), ("side", "side_network"),
    ("ssf_", "ssf"), ("glora", "glora"), ("diff", "diff"), ("gate", None),
)
# Module kinds, from the last meaningful name in the path.
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj")
NORM_WORDS = ("norm", "ln_", "layernorm")
ADAPTER_SUFFIX = re.compile(r"\.(base_layer|lora_[AB]|lora_E|lora_magnitude_vector|modules_to_save|original_module|"
                            r"ia3_l|weight|bias)\b.*$")


def _component(name: str, trainable: bool) -> str:
    for key, label in COMPONENTS:
        if key in name and label:
            return label
    if not trainable:
        return "frozen"
    return "bias" if name.endswith("bias") else "base"


def _kind(name: str) -> str:
    low = name.lower()
    for kind in KINDS:
        if f".{kind}." in f".{name}." or f".{kind}" in name:
            return kind
    if "embed" in low or "wte" in low:
        return "embeddings"
    if "lm_head" in low or low.startswith("score") or "classifier" in low:
        return "lm_head"
    if any(w in low for w in NORM_WORDS):
        return "norms"
    if "mlp" in low or "feed_forward" in low or "ffn" in low:
        return "mlp_other"
    return "other"


def param_breakdown(model: nn.Module) -> dict[str, Any]:
    """Counts as data: total, trainable, percent, by_component, by_kind, by_layer (+ bytes by dtype)."""
    from .methods.common import layer_index
    total = trainable = 0
    by_component: dict[str, int] = {}
    by_kind: dict[str, dict[str, int]] = {}
    by_layer: dict[int, int] = {}
    bytes_by_dtype: dict[str, int] = {}
    trainable_bytes = 0
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        key = id(p)
        if key in seen:  # tied weights (embeddings == lm_head) once
            continue
        seen.add(key)
        n = p.numel()
        total += n
        dt = str(p.dtype).replace("torch.", "")
        bytes_by_dtype[dt] = bytes_by_dtype.get(dt, 0) + n * p.element_size()
        kind = by_kind.setdefault(_kind(name), {"total": 0, "trainable": 0})
        kind["total"] += n
        if p.requires_grad:
            trainable += n
            trainable_bytes += n * p.element_size()
            kind["trainable"] += n
            comp = _component(name, True)
            by_component[comp] = by_component.get(comp, 0) + n
            idx = layer_index(name)
            if idx is not None:
                by_layer[idx] = by_layer.get(idx, 0) + n
    n_layers = _num_layers(model)
    layers = [{"layer": i, "trainable": by_layer.get(i, 0)} for i in range(max(n_layers, max(by_layer, default=-1) + 1))]
    outside = trainable - sum(by_layer.values())
    info = getattr(model, "studio_adapter", None)
    return {
        "method": getattr(getattr(info, "cfg", None), "name", None),
        "total": total,
        "trainable": trainable,
        "frozen": total - trainable,
        "percent": 100.0 * trainable / total if total else 0.0,
        "trainable_bytes": trainable_bytes,
        "bytes_by_dtype": bytes_by_dtype,
        "by_component": dict(sorted(by_component.items(), key=lambda kv: -kv[1])),
        "by_kind": OrderedDict(sorted(by_kind.items(), key=lambda kv: (-kv[1]["trainable"], -kv[1]["total"]))),
        "by_layer": layers,
        "outside_layers": outside,
    }


def _num_layers(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    return int(getattr(cfg, "num_hidden_layers", 0) or 0)


def _fmt(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def format_breakdown(b: dict) -> str:
    """The breakdown as a short text report (CLI, logs)."""
    if "error" in b:
        return f"Parameter breakdown unavailable: {b['error']}"
    lines = [f"method {b.get('method') or '-'}: trainable {b['trainable']:,} of {b['total']:,} "
             f"({b['percent']:.4f}%), frozen {b['frozen']:,}"]
    if b["by_component"]:
        lines.append("by component: " + ", ".join(f"{k} {_fmt(v)}" for k, v in b["by_component"].items()))
    lines.append("by module kind (trainable / total):")
    for kind, v in b["by_kind"].items():
        lines.append(f"  {kind:<12} {_fmt(v['trainable']):>9} / {_fmt(v['total']):>9}")
    counts = [row["trainable"] for row in b["by_layer"]]
    if counts:
        if len(set(counts)) == 1:
            lines.append(f"per layer: {_fmt(counts[0])} in each of {len(counts)} layers")
        else:
            lines.append("per layer: " + " ".join(_fmt(c) for c in counts))
    if b["outside_layers"]:
        lines.append(f"outside the layers (embeddings, head, prompts): {_fmt(b['outside_layers'])}")
    return "\n".join(lines)


def meta_model(run_cfg: Any, dtype: torch.dtype = torch.float32, before_apply: Any = None) -> nn.Module:
    """The run's model on the meta device (no memory, no weights) with its method applied.

    `before_apply(model)` is called on the bare model first (the estimator records the base Linears).
    Methods whose apply() cannot run on meta (e.g. a CPU copy of the base for `full`, an SVD init)
    are retried with those extras switched off (same shapes); otherwise a StudioError explains it.
    """
    import dataclasses

    from transformers import AutoModelForCausalLM

    from .methods import apply_method
    from .models import resolve_model_config
    config = resolve_model_config(run_cfg.model.name, run_cfg.model.trust_remote_code)
    config = getattr(config, "text_config", None) if config.model_type in ("gemma3",) else config
    try:
        config._attn_implementation = run_cfg.model.attn_implementation
    except Exception:  # noqa: BLE001 - older configs without the private field
        pass
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    cfg = run_cfg.method
    tries = [cfg]
    fields = {f.name for f in dataclasses.fields(cfg)}
    meta_safe = {k: v for k, v in (("keep_base_copy", False), ("init_lora_weights", True),
                                                  ("prompt_tuning_init", "RANDOM")) if k in fields}
    if meta_safe:
        tries.append(dataclasses.replace(cfg, **meta_safe))
    last: Exception | None = None
    for attempt in tries:
        if before_apply is not None:
            before_apply(model)
        try:
            with torch.device("meta"):
                apply_method(model, attempt)
            model.studio_adapter.cfg = cfg  # report the user's config, not the meta-safe copy
            return model
        except Exception as e:  # noqa: BLE001 - a method that needs real tensors
            last = e
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    raise StudioError(f"Method {cfg.name} cannot be applied to a weightless (meta) model "
                      f"({type(last).__name__}: {str(last).splitlines()[0][:100] if last else ''}); its parameter "
                      f"breakdown and memory estimate need the loaded model.")


def breakdown_for_config(run_cfg: Any) -> dict[str, Any]:
    """param_breakdown of the run's model built on the meta device; {"error": ...} if that is impossible."""
    try:
        return param_breakdown(meta_model(run_cfg))
    except StudioError as e:
        return {"error": str(e)}
