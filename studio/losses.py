"""Task losses. The causal-LM loss never builds the full fp32 logits tensor.

The decoder body runs once; the output head and cross-entropy run on chunks of positions, each
chunk under activation checkpointing, so only the hidden states stay alive for backward and the
largest logits buffer is chunk x vocab (Gemma's 262k vocabulary makes this matter).
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
