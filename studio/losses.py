"""Task losses. The causal-LM loss never builds the full fp32 logits tensor.

The decoder body runs once; the output head and cross-entropy run on chunks of labelled positions,
so the largest logits buffer is chunk x vocab (Gemma's 262k vocabulary makes this matter). For a
plain frozen Linear head the chunk's gradients are computed right in the forward (fused linear + cross-
entropy: nothing to recompute, only d(loss)/d(hidden) kept for backward); other heads (wrapped by a
method) run each chunk under activation checkpointing instead.
Soft-prompt methods may prepend virtual tokens inside the body: the last T positions are kept.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def decoder_body(model: nn.Module) -> nn.Module:
    """The transformer body of a causal LM (everything before the output head)."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    return body if body is not None else model.model


def _chunk_ce(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, labels, reduction="sum")


class FusedLinearCrossEntropy(torch.autograd.Function):
    """sum CE(softcap(h @ W.T), y) over rows, with gradients for h (and W) computed chunk by chunk
    in the forward, so neither the logits nor a recomputation are needed in backward."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, chunk: int,
                softcap: float | None) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        h = h.to(weight.dtype)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk):
            hs, ys = h[start:start + chunk], y[start:start + chunk]
            logits = (hs @ weight.t()).float()
            tanh = None
            if softcap:
                tanh = torch.tanh(logits.div_(softcap))
                logits = tanh * softcap
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # one fused pass
            total += (lse - logits.gather(1, ys[:, None])).sum()
            if need_h or need_w:
                d = logits.sub_(lse).exp_()  # softmax in place; d loss / d logits = softmax - onehot
                d[torch.arange(ys.shape[0], device=d.device), ys] -= 1
                if tanh is not None:
                    d *= 1 - tanh * tanh  # through the tanh soft cap
                d = d.to(weight.dtype)
                if need_h:
                    grad_h[start:start + chunk] = d @ weight
                if need_w:
                    grad_w += d.t().float() @ hs.float()
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def chunked_lm_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, chunk: int = 1024,
                    softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy over labelled positions, and their count.

    Only labelled positions go through the head (prompt tokens masked with -100 cost nothing),
    `chunk` of them at a time.
    """
    y = labels[:, 1:]
    keep = y != -100
    h = hidden[:, :-1][keep]
    y = y[keep]
    # Fused only for a frozen head: a trained head (full fine-tuning) would need an fp32 vocab x hidden
    # gradient buffer held from forward to backward, more than the checkpointed chunks cost.
    if type(head) is nn.Linear and head.bias is None and torch.is_grad_enabled() and h.requires_grad \
            and not head.weight.requires_grad:
        return FusedLinearCrossEntropy.apply(h, head.weight, y, max(1, chunk), softcap), keep.sum()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], max(1, chunk)):
        hs, ys = h[start:start + chunk], y[start:start + chunk]
        if torch.is_grad_enabled() and hs.requires_grad:
            total = total + checkpoint(_chunk_ce, hs, ys, head, softcap, use_reentrant=False)
        else:
            total = total + _chunk_ce(hs, ys, head, softcap)
    return total, keep.sum()


def causal_lm_loss(model: nn.Module, batch: dict, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean token loss of a batch {input_ids, attention_mask, labels[, position_ids]} and the token count."""
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if batch.get(k) is not None}
    out = decoder_body(model)(**kwargs, use_cache=False)
    labels = batch["labels"]
    hidden = out.last_hidden_state[:, -labels.shape[1]:]
    softcap = getattr(model.config, "final_logit_softcapping", None)
    total, count = chunked_lm_loss(hidden, labels, model.get_output_embeddings(), chunk, softcap)
    return total / count.clamp(min=1), count
