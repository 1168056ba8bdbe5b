"""Parameter breakdown: counts from a real model, the meta-device path, tied weights once."""
from __future__ import annotations

from method_matrix import ATTN, lora_count

from studio.config import RunConfig
from studio.methods import apply_method, method_config
from studio.models import build_random_model, model_presets
from studio.params import breakdown_for_config, format_breakdown, param_breakdown


def test_breakdown_of_a_real_model():
    model = build_random_model(model_presets()["tiny-qwen2"]["config"])
    apply_method(model, method_config({"name": "lora", "r": 4}))
    b = param_breakdown(model)
    unique = {id(p): p for p in model.parameters()}.values()   # tied embeddings / head once
    assert b["total"] == sum(p.numel() for p in unique)
    assert b["trainable"] == sum(p.numel() for p in unique if p.requires_grad) == lora_count(model.config, 4, ATTN)
    assert set(b["by_component"]) == {"lora_A", "lora_B"}
    assert sum(r["trainable"] for r in b["by_layer"]) == b["trainable"]
    assert len({r["trainable"] for r in b["by_layer"]}) == 1
    assert b["by_kind"]["q_proj"]["trainable"] > 0 and b["by_kind"]["gate_proj"]["trainable"] == 0
    assert "lora" in format_breakdown(b)


def test_breakdown_without_weights_for_a_big_model():
    cfg = RunConfig.from_dict({"model": {"name": "llama-3.1-70b"}, "method": {"name": "dora", "r": 8}})
    b = breakdown_for_config(cfg)
    assert 70.5e9 < b["total"] < 70.6e9
    assert b["by_component"]["magnitude"] == 80 * (8192 + 1024 + 1024 + 8192)
    full = breakdown_for_config(RunConfig.from_dict({"model": {"name": "tiny-gemma3"}, "method": "full"}))
    assert full["percent"] == 100.0 and full["outside_layers"] > 0
