"""The chunked / fused loss equals transformers' loss, with the same gradients."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from studio.losses import FusedLinearCrossEntropy, causal_lm_loss, chunked_lm_loss


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("train_head", [False, True])
def test_fused_head_loss_and_gradients_match_plain(softcap, train_head):
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False)
    head.weight.requires_grad_(train_head)
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 9))
    labels[0, :4] = -100
    total, count = chunked_lm_loss(hidden, labels, head, chunk=4, softcap=softcap)
    assert total.grad_fn.name().startswith("FusedLinearCrossEntropy") != train_head  # trained head: checkpointed
    total.backward()
    got_h, got_w = hidden.grad.clone(), head.weight.grad.clone() if train_head else None
    hidden.grad = None
    head.weight.grad = None
    logits = head(hidden[:, :-1]).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    ref = nn.functional.cross_entropy(logits.reshape(-1, 50), labels[:, 1:].reshape(-1), reduction="sum")
    ref.backward()
    torch.testing.assert_close(total, ref, atol=1e-4, rtol=1e-5)
    assert count == (labels[:, 1:] != -100).sum()
    torch.testing.assert_close(got_h, hidden.grad, atol=1e-5, rtol=1e-4)
    if train_head:
        torch.testing.assert_close(got_w, head.weight.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gemma3"])
def test_model_loss_equals_transformers_loss(arch):
    from studio.config import ModelConfig
    from studio.models import load_model
    model, _ = load_model(ModelConfig(name=arch, device="cpu"))
    for p in model.parameters():
        p.requires_grad_(True)
    ids = torch.randint(5, 500, (2, 20), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :6] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    ours, n = causal_lm_loss(model, batch, chunk=7)
    ours.backward()
    ours_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    ref = model(**batch).loss
    ref.backward()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(ours_grads[k], p.grad, atol=1e-5, rtol=1e-4, msg=k)
    assert FusedLinearCrossEntropy is not None
