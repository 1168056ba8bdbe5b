"""The engine's RoPE op: transformers' outputs and gradients, only in models the engine prepared."""
from __future__ import annotations

import pytest
import torch
from transformers.models.llama import modeling_llama

from studio import fused_rope
from studio.fused_rope import FusedRope, fuse_rope, torch_rope, torch_rope_backward


def _original():
    fn = modeling_llama.apply_rotary_pos_emb
    return getattr(fn, "studio_original", fn)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_gradients_are_bitwise_transformers(dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 4, 8, generator=g).to(dtype).transpose(1, 2).requires_grad_()  # attention's layout
    k = torch.randn(2, 5, 2, 8, generator=g).to(dtype).transpose(1, 2).requires_grad_()
    angle = torch.randn(2, 5, 4, generator=g).repeat(1, 1, 2)
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    ours, theirs = FusedRope.apply(q, k, cos, sin), _original()(q, k, cos, sin)
    grads = [torch.randn(t.shape, generator=g).to(dtype) for t in theirs]
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b) and a.stride() == b.stride()
    for a, b in zip(torch.autograd.grad(ours, (q, k), grads), torch.autograd.grad(theirs, (q, k), grads)):
        assert torch.equal(a, b)


def test_backward_formula_holds_for_any_cos_and_sin():
    """Halves of cos and sin that differ (not RoPE's, but the formula must not assume equal halves)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    cos, sin, dy = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((1, 4, 6), (1, 4, 6), (1, 3, 4, 6)))
    (expected,) = torch.autograd.grad(torch_rope(x, cos, sin), x, dy)
    torch.testing.assert_close(torch_rope_backward(dy, cos, sin), expected)


def _count_calls(monkeypatch) -> list:
    calls = []
    real = FusedRope.apply
    monkeypatch.setattr(FusedRope, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-gemma3"])
def test_prepared_models_use_it_and_train_the_same(tiny_model, monkeypatch, name):
    from studio.memory_bench import random_batch
    from studio.methods import apply_method, method_config
    calls = _count_calls(monkeypatch)
    results = []
    for fused in (False, True):
        model = tiny_model(name, dtype="float32")
        apply_method(model, method_config({"name": "lora", "r": 4, "lora_dropout": 0.0, "target_modules": "all-linear"}))
        if not fused:  # undo the marking: the original code path
            for module in model.modules():
                vars(module).pop("forward", None) if type(module).__name__ in fused_rope.ROPE_ATTENTIONS else None
        calls.clear()
        batch = random_batch(model.config.vocab_size, 2, 12, "cpu")
        loss = model(**batch).loss
        loss.backward()
        layers = model.config.num_hidden_layers
        assert len(calls) == (layers if fused else 0)
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1) and g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-5)


def test_other_models_of_the_class_keep_the_original_code(tiny_model, monkeypatch):
    """The peft baseline of `studio bench` runs in the same process: it must not get our op."""
    from studio.memory_bench import random_batch
    prepared, plain = tiny_model("tiny-llama"), tiny_model("tiny-llama")
    assert fuse_rope(prepared) == prepared.config.num_hidden_layers
    assert fuse_rope(prepared) == 0  # marking twice changes nothing
    calls = _count_calls(monkeypatch)
    batch = random_batch(plain.config.vocab_size, 1, 8, "cpu")
    with torch.no_grad():
        plain(**batch)
        assert not calls
        prepared(**batch)
    assert len(calls) == prepared.config.num_hidden_layers
    assert modeling_llama.apply_rotary_pos_emb.studio_original is _original()


def test_checkpointed_recompute_takes_the_same_path(tiny_model, monkeypatch):
    """Recomputation runs the marked forward again (possibly on autograd's thread): same op, same loss."""
    from studio.checkpointing import enable_gradient_checkpointing
    from studio.memory_bench import random_batch
    from studio.methods import apply_method, method_config
    model = tiny_model("tiny-llama", dtype="float32")
    apply_method(model, method_config({"name": "lora", "r": 4, "lora_dropout": 0.0, "target_modules": "all-linear"}))
    batch = random_batch(model.config.vocab_size, 2, 12, "cpu")
    reference = model(**batch).loss
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    enable_gradient_checkpointing(model)
    model.train()
    calls = _count_calls(monkeypatch)
    loss = model(**batch).loss
    loss.backward()
    assert len(calls) == 2 * model.config.num_hidden_layers  # forward, then recomputation
    torch.testing.assert_close(loss, reference)
    for n, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, grad, atol=1e-6, rtol=1e-5)
