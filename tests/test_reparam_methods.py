"""Method-specific promises of vera, lokr, loha, dylora, glora, compacter, ssf (generic ones: the matrix)."""
from __future__ import annotations

import torch

from studio.checkpoint import load_adapter, save_adapter
from studio.config import ModelConfig
from studio.methods import applied, apply_method, method_config
from studio.models import load_model


def setup(name, **kw):
    model, tok = load_model(ModelConfig(name="tiny-llama"))
    apply_method(model, method_config({"name": name, **kw}))
    model.eval()
    ids = tok(["hello garden"], return_tensors="pt")["input_ids"]
    return model, ids


def perturb(model, scale=0.1):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def out(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_dylora_truncated_rank_equals_smaller_lora():
    model, ids = setup("dylora", r=4)
    perturb(model)
    method = applied(model).method
    method.set_rank(model, eval_rank=2)
    q = model.model.layers[0].self_attn.q_proj
    want = q.base_layer.weight + q.lora_B.weight[:, :2] @ q.lora_A.weight[:2] * q.scaling
    torch.testing.assert_close(q.delta_weight() + q.base_layer.weight, want)
    at2 = out(model, ids)
    method.merge(model)
    torch.testing.assert_close(out(model, ids), at2, atol=1e-5, rtol=1e-5)
    method.unmerge(model)
    method.set_rank(model, eval_rank=4)
    assert not torch.allclose(out(model, ids), at2)


def test_dylora_samples_ranks_in_training():
    model, _ = setup("dylora", r=8, min_rank=2)
    method = applied(model).method
    seen = set()
    for step in range(30):
        method.after_optimizer_step(model, step, 30)
        seen.add(model.model.layers[0].self_attn.q_proj.train_rank)
    assert seen <= set(range(2, 9)) and len(seen) > 3


def test_compacter_rule_is_shared_and_saved_once(tmp_path):
    model, ids = setup("compacter", n=4, r=1)
    rules = {id(m.phm_rule) for m in model.modules() if hasattr(m, "phm_rule")}
    assert len(rules) == 1
    state = applied(model).method.adapter_state_dict(model)
    assert sum(k.endswith("phm_rule") for k in state) == 1
    perturb(model)
    want = out(model, ids)
    save_adapter(model, tmp_path / "a")
    other, _ = load_model(ModelConfig(name="tiny-llama"))
    load_adapter(other, tmp_path / "a")
    torch.testing.assert_close(out(other.eval(), ids), want)


def test_ssf_merge_adds_and_removes_bias():
    model, ids = setup("ssf")
    perturb(model)
    want = out(model, ids)
    q = model.model.layers[0].self_attn.q_proj
    applied(model).method.merge(model)
    assert q.base_layer.bias is not None
    torch.testing.assert_close(out(model, ids), want, atol=1e-5, rtol=1e-5)
    applied(model).method.unmerge(model)
    assert q.base_layer.bias is None


def test_vera_without_saved_projection_rebuilds_from_seed(tmp_path):
    model, ids = setup("vera", r=8, save_projection=False, projection_prng_key=3)
    perturb(model)
    want = out(model, ids)
    save_adapter(model, tmp_path / "v")
    from safetensors.torch import load_file
    assert not any("vera_A" in k for k in load_file(tmp_path / "v" / "adapter_model.safetensors"))
    other, _ = load_model(ModelConfig(name="tiny-llama"))
    load_adapter(other, tmp_path / "v")
    torch.testing.assert_close(out(other.eval(), ids), want)


def test_vera_trains_far_fewer_params_than_lora():
    vera, _ = setup("vera", r=64)
    lora, _ = setup("lora", r=8, target_modules=["q_proj", "v_proj"])
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(vera) < count(lora) / 2


def test_lokr_loha_dropouts_only_in_training():
    for name in ("lokr", "loha"):
        model, ids = setup(name, rank_dropout=0.5, module_dropout=0.5)
        perturb(model)
        a, b = out(model, ids), out(model, ids)
        torch.testing.assert_close(a, b)  # eval: deterministic
        model.train()
        model(input_ids=ids).logits.sum().backward()


def test_glora_vector_supports_merge_on_biased_layers():
    model, tok = load_model(ModelConfig(name="tiny-qwen2"))
    apply_method(model, method_config({"name": "glora", "config_A_B": "vector", "config_C": "vector",
                                       "config_D_E": "vector"}))
    model.eval()
    ids = tok(["hello"], return_tensors="pt")["input_ids"]
    perturb(model)
    want = out(model, ids)
    m = applied(model).method
    m.merge(model)
    torch.testing.assert_close(out(model, ids), want, atol=1e-5, rtol=1e-5)
    m.unmerge(model)
    torch.testing.assert_close(out(model, ids), want, atol=1e-5, rtol=1e-5)
