"""Task losses. The causal-LM loss never builds the full fp32 logits tensor.

The decoder body runs once; the output head and cross-entropy run on chunks of labelled positions
(Gemma's 262k vocabulary makes this matter). For a plain frozen Linear head the chunk's gradient is
computed right in the forward, one vocabulary block at a time with an online softmax (fused linear +
cross-entropy: the largest logits buffer is chunk x block, nothing is recomputed, only d(loss)/d(hidden)
is kept for backward); other heads (wrapped by a method) run each chunk under activation checkpointing.
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


def vocab_block(rows: int, vocab: int, device_type: str) -> int:
    """Vocabulary columns per block of the fused loss: on the CPU a block of fp32 logits stays near
    8 MB, so its softmax passes run in cache; on a GPU near 64 MB, so kernel launches stay few."""
    target = (1 << 21) if device_type == "cpu" else (1 << 24)
    block = max(1024, target // max(rows, 1)) // 256 * 256
    return min(block, vocab)


class FusedLinearCrossEntropy(torch.autograd.Function):
    """sum CE(softcap(h @ W.T), y) over rows of a frozen head, with d(loss)/d(h) computed in the forward.

    Flash-attention style over the vocabulary: each block of logits updates a running max m, a running
    sum S of exp(l - m) and G = sum exp(l - m) · W_block, rescaled when m grows. Then
    lse = m + log S and d(loss)/d(h) = G / S - W_y. The logits of a row never exist whole, W is read
    once, and the softmax never leaves the cache (the CPU is memory-bound on it, not on the matmuls).
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, chunk: int,
                softcap: float | None, block: int | None = None) -> torch.Tensor:
        dev = h.device.type
        cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        need_h = ctx.needs_input_grad[0]
        grad_h = torch.empty_like(h) if need_h else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(dev, enabled=False):
            for start in range(0, h.shape[0], chunk):
                hs, ys = h[start:start + chunk].to(cdt), y[start:start + chunk]
                lse, g = _online_softmax(hs, weight, cdt, softcap, block or vocab_block(hs.shape[0], weight.shape[0], dev),
                                         need_h)
                w_y = weight[ys].float()
                l_y = (hs.float() * w_y).sum(1, keepdim=True)
                if softcap:
                    t_y = torch.tanh(l_y / softcap)
                    l_y, w_y = t_y * softcap, w_y * (1 - t_y * t_y)
                total += (lse - l_y).sum()
                if need_h:
                    grad_h[start:start + chunk] = g - w_y
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        return gh, None, None, None, None, None


def _online_softmax(hs: torch.Tensor, weight: torch.Tensor, cdt: torch.dtype, softcap: float | None,
                    block: int, need_h: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logsumexp over the vocabulary of softcap(hs @ W.T) and softmax · W, one vocabulary block at a time."""
    rows = hs.shape[0]
    m = torch.full((rows, 1), -float("inf"), device=hs.device)
    s = torch.zeros((rows, 1), device=hs.device)
    g = torch.zeros((rows, weight.shape[1]), device=hs.device) if need_h else None
    for v in range(0, weight.shape[0], block):
        w = weight[v:v + block].to(cdt)
        logits = (hs @ w.t()).float()
        tanh = None
        if softcap:
            tanh = torch.tanh(logits.div_(softcap))
            logits = torch.mul(tanh, softcap, out=logits)
        m_new = torch.maximum(m, logits.amax(1, keepdim=True))
        rescale = (m - m_new).exp_()
        e = logits.sub_(m_new).exp_()
        s.mul_(rescale).add_(e.sum(1, keepdim=True))
        if need_h:
            if tanh is not None:
                e.mul_(tanh.mul_(tanh).neg_().add_(1))  # through the tanh soft cap
            g.mul_(rescale).add_(e.to(cdt) @ w)
        m = m_new
    return m + s.log(), (g / s if need_h else None)


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
    # Fused only for a frozen head: a trained head (full fine-tuning) needs d(loss)/d(W), which takes the
    # normalised softmax (a second pass) and an fp32 vocab x hidden buffer; checkpointed chunks cost less.
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
    """Mean token loss of a batch {input_ids, attention_mask, labels[, position_ids, studio_segments]} and the
    token count (studio_segments: studio.attention.Segments of a packed batch, for varlen attention)."""
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "studio_segments")
              if batch.get(k) is not None}
    out = decoder_body(model)(**kwargs, use_cache=False)
    labels = batch["labels"]
    hidden = out.last_hidden_state[:, -labels.shape[1]:]
    softcap = getattr(model.config, "final_logit_softcapping", None)
    total, count = chunked_lm_loss(hidden, labels, model.get_output_embeddings(), chunk, softcap)
    return total / count.clamp(min=1), count
