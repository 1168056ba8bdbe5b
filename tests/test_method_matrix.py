"""Every generic promise of every method, on every tiny architecture (see method_matrix.py)."""
from __future__ import annotations

import pytest
import torch

from method_matrix import CASES, Case
from studio.config import ModelConfig
from studio.losses import causal_lm_loss
from studio.methods import applied, apply_method, method_config
from studio.models import load_model
from training import fit

PARAMS = [pytest.param(case, arch, id=f"{case.id}-{arch}") for case in CASES for arch in case.archs]


def fresh(arch: str):
    model, tok = load_model(ModelConfig(name=arch))
    model.eval()
    return model, tok


def batch_for(tok) -> dict:
    text = [[{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}],
            [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue, like the sky."}]]
    enc = tok.apply_chat_template(text, return_dict=True, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def tuned(case: Case, arch: str):
    """Base logits, and a model with the method applied and its trainable params moved off init."""
    model, tok = fresh(arch)
    batch = batch_for(tok)
    base = logits(model, batch)
    cfg = method_config({"name": case.name, **case.overrides})
    apply_method(model, cfg)
    model.eval()
    return model, tok, batch, base, cfg


def perturb(model) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.05)


@pytest.mark.parametrize("case,arch", PARAMS)
def test_identity_at_init(case, arch):
    model, _, batch, base, _ = tuned(case, arch)
    if case.identity_at_init:
        torch.testing.assert_close(logits(model, batch), base, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case,arch", PARAMS)
def test_only_intended_params_train(case, arch):
    model, _, _, _, _ = tuned(case, arch)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if case.count is None:  # full fine-tuning: every unique parameter
        expected = sum(p.numel() for p in model.parameters())
    else:
        expected = case.count(model.config)
    assert trainable == expected


@pytest.mark.parametrize("case,arch", PARAMS)
def test_save_load_round_trip(case, arch, tmp_path):
    from studio.checkpoint import load_adapter, save_adapter
    model, _, batch, _, _ = tuned(case, arch)
    perturb(model)
    want = logits(model, batch)
    save_adapter(model, tmp_path / "adapter")
    other, _ = fresh(arch)
    load_adapter(other, tmp_path / "adapter")
    other.eval()
    torch.testing.assert_close(logits(other, batch), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case,arch", PARAMS)
def test_disable_gives_base(case, arch):
    model, _, batch, base, _ = tuned(case, arch)
    perturb(model)
    info = applied(model)
    with info.method.disable_adapter(model):
        torch.testing.assert_close(logits(model, batch), base, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(logits(model, batch), base, atol=1e-4)


@pytest.mark.parametrize("case,arch", [p for p in PARAMS if p.values[0].mergeable])
def test_merge_equals_unmerged(case, arch):
    model, _, batch, base, _ = tuned(case, arch)
    perturb(model)
    want = logits(model, batch)
    info = applied(model)
    info.method.merge(model)
    torch.testing.assert_close(logits(model, batch), want, atol=1e-4, rtol=1e-4)
    with info.method.disable_adapter(model):
        torch.testing.assert_close(logits(model, batch), base, atol=1e-4, rtol=1e-4)
    info.method.unmerge(model)
    torch.testing.assert_close(logits(model, batch), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case,arch", PARAMS)
def test_loss_goes_down(case, arch):
    torch.manual_seed(0)
    model, tok, batch, _, _ = tuned(case, arch)
    losses, _ = fit(model, batch, 8, case.lr, lambda m, b: causal_lm_loss(m, b, chunk=5), protocol=True)
    assert losses[-1] < losses[0] - 0.1, losses  # tiny random models start near ln(vocab)


@pytest.mark.parametrize("case,arch", PARAMS)
def test_chat_merges_exactly_or_leaves_the_adapter_unmerged(case, arch):
    """Chat (studio/merged_weights.py): tuned answers as the unmerged adapter gives them and base answers
    bitwise the same however often the two alternate; merged for every mergeable method whose disabled
    adapter is the plain base (PiSSA and OLoRA rebuild theirs from a residual and the initial part)."""
    from studio.chat import ChatModel
    model, tok, batch, _, _ = tuned(case, arch)
    perturb(model)
    chat = ChatModel(model, tok)
    want = logits(model, batch)
    with chat.adapter_off():
        want_base = logits(model, batch)
    chat.merge()
    assert (chat.merged is not None) == (case.mergeable and case.name not in ("pissa", "olora")), chat.merge_note
    for _ in range(3):
        torch.testing.assert_close(logits(model, batch), want, atol=1e-4, rtol=1e-4)
        with chat.adapter_off():
            assert torch.equal(logits(model, batch), want_base)
