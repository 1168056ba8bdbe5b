"""The chunked / fused loss equals transformers' loss, with the same gradients."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from studio.losses import FusedLinearCrossEntropy, causal_lm_loss, chunked_lm_loss, static_shapes


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
    assert total.grad_fn.name().startswith("FusedLinearCrossEntropy")  # frozen or trained plain head
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


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("head_kind", ["frozen", "trained", "wrapped"])
def test_static_shapes_give_the_same_loss_and_gradients(softcap, head_kind):
    """CUDA-graph capture computes every position with masked ones weighted 0: same value, same gradients."""
    def run(static: bool):
        torch.manual_seed(1)
        head = nn.Linear(16, 50, bias=False)
        head.weight.requires_grad_(head_kind != "frozen")
        module = nn.Sequential(head) if head_kind == "wrapped" else head
        hidden = torch.randn(3, 9, 16, requires_grad=True)
        labels = torch.randint(0, 50, (3, 9))
        labels[0, :4] = labels[2, 6:] = -100  # a masked prompt and right padding
        with static_shapes() if static else contextlib.nullcontext():
            total, count = chunked_lm_loss(hidden, labels, module, chunk=4, softcap=softcap)
        total.backward()
        return total.detach(), count, hidden.grad, head.weight.grad

    dynamic, static = run(False), run(True)
    torch.testing.assert_close(static[0], dynamic[0], atol=1e-4, rtol=1e-5)
    assert static[1] == dynamic[1] == 24 - 4 - 2
    assert static[2][2, 6:].abs().max() == 0  # masked positions get no gradient
    torch.testing.assert_close(static[2], dynamic[2], atol=1e-5, rtol=1e-4)
    if head_kind != "frozen":
        torch.testing.assert_close(static[3], dynamic[3], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_wrapped_head_runs_checkpointed_chunks_with_the_same_gradients(softcap):
    torch.manual_seed(3)
    head = nn.Sequential(nn.Linear(16, 50, bias=False))  # what a method's wrapper looks like to the loss
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 7))
    total, _ = chunked_lm_loss(hidden, labels, head, chunk=4, softcap=softcap)
    assert not total.grad_fn.name().startswith("FusedLinearCrossEntropy")
    total.backward()
    got_h, got_w = hidden.grad.clone(), head[0].weight.grad.clone()
    hidden.grad = head[0].weight.grad = None
    logits = head(hidden[:, :-1])
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    nn.functional.cross_entropy(logits.reshape(-1, 50), labels[:, 1:].reshape(-1), reduction="sum").backward()
    torch.testing.assert_close(got_h, hidden.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_w, head[0].weight.grad, atol=1e-5, rtol=1e-4)


def test_trained_head_chunks_stay_under_the_logits_cap(monkeypatch):
    import studio.losses as losses
    monkeypatch.setattr(losses, "WEIGHT_GRAD_LOGITS", 50 * 3)  # 3 rows of a 50-token vocabulary per chunk
    seen = []
    original = losses._softmax_grads
    monkeypatch.setattr(losses, "_softmax_grads", lambda hs, *a: seen.append(hs.shape[0]) or original(hs, *a))
    weight = torch.randn(50, 16, requires_grad=True)
    hidden = torch.randn(10, 16, requires_grad=True)
    y = torch.randint(0, 50, (10,))
    total = FusedLinearCrossEntropy.apply(hidden, weight, y, 1024, None, None)
    total.backward()
    assert seen == [3, 3, 3, 1]
    ref_w = weight.detach().clone().requires_grad_()
    nn.functional.cross_entropy(hidden.detach() @ ref_w.t(), y, reduction="sum").backward()
    torch.testing.assert_close(weight.grad, ref_w.grad, atol=1e-5, rtol=1e-4)
    weight.grad = None  # only the head trains: no d(loss)/d(h), the same d(loss)/d(W)
    FusedLinearCrossEntropy.apply(hidden.detach(), weight, y, 1024, None, None).backward()
    torch.testing.assert_close(weight.grad, ref_w.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("block", [7, 16, 64])
def test_online_softmax_over_vocabulary_blocks_matches_full_softmax(softcap, block):
    torch.manual_seed(1)
    weight = torch.randn(50, 16) * 2  # large logits: the running max must rescale earlier blocks
    hidden = torch.randn(10, 16, requires_grad=True)
    y = torch.randint(0, 50, (10,))
    total = FusedLinearCrossEntropy.apply(hidden, weight, y, 3, softcap, block)
    (grad,) = torch.autograd.grad(total * 2, hidden)
    logits = hidden @ weight.t()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    ref = nn.functional.cross_entropy(logits, y, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref * 2, hidden)
    torch.testing.assert_close(total, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-4)


def test_fused_loss_under_bf16_autocast_stays_close_to_fp32():
    torch.manual_seed(2)
    weight = torch.randn(300, 32).to(torch.bfloat16)
    hidden = torch.randn(12, 32, requires_grad=True)  # fp32, as a norm's output under autocast
    y = torch.randint(0, 300, (12,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total = FusedLinearCrossEntropy.apply(hidden, weight, y, 5, None, 64)
    (grad,) = torch.autograd.grad(total, hidden)
    assert grad.dtype == torch.float32
    ref = nn.functional.cross_entropy(hidden @ weight.float().t(), y, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, hidden)
    torch.testing.assert_close(total, ref, rtol=2e-2, atol=0.0)
    assert (grad - ref_grad).abs().max() < 2e-2 * ref_grad.abs().max()


def test_vocab_blocks_fit_the_cache_on_cpu_and_stay_few_on_gpu():
    from studio.losses import vocab_block
    assert vocab_block(254, 262144, "cpu", 640) * (254 + 640) * 4 <= 6 << 20  # logits + weight slice near 6 MB
    assert vocab_block(254, 262144, "cpu", 640) == 1536 and vocab_block(1016, 262144, "cpu", 640) == 1024
    assert vocab_block(254, 262144, "cpu", 640, 2) > vocab_block(254, 262144, "cpu", 640)  # a bf16 head
    assert vocab_block(1024, 262144, "cuda") == 16384
    assert vocab_block(4, 300, "cpu") == 300  # never wider than the vocabulary


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
