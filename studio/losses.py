"""Task losses. The causal-LM loss never builds the full fp32 logits tensor.

The decoder body runs once; the output head and cross-entropy run on chunks of labelled positions
(Gemma's 262k vocabulary makes this matter). For a plain Linear head the chunk's gradients are computed
right in the forward (fused linear + cross-entropy, nothing recomputed): a frozen head one vocabulary
block at a time with an online softmax (the largest logits buffer is chunk x block), a trained head
from one whole-vocabulary product per smaller chunk. Other heads (wrapped by a method) run each chunk
under activation checkpointing.
On CUDA with Triton, a vocabulary block's max, exp and sum run as one kernel over its 16-bit logits
(studio/kernels/softmax_block.py; the torch ops stay the reference and the path elsewhere).
Soft-prompt methods may prepend virtual tokens inside the body: the last T positions are kept.
Inside `static_shapes()` (CUDA-graph capture, studio/step_graph.py) no shape depends on the labels: every
position goes through the head and the masked ones are weighted 0, so no step waits on the GPU.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


_static = False


@contextlib.contextmanager
def static_shapes() -> Iterator[None]:
    """Within it, the loss computes every position (masked ones weighted 0) instead of selecting the
    labelled ones: the same value, no data-dependent shape (CUDA-graph capture needs that)."""
    global _static
    before, _static = _static, True
    try:
        yield
    finally:
        _static = before


def decoder_body(model: nn.Module) -> nn.Module:
    """The transformer body of a causal LM (everything before the output head)."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    return body if body is not None else model.model


def _chunk_ce(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, labels, reduction="sum")


def vocab_block(rows: int, vocab: int, device_type: str, hidden: int = 0, weight_bytes: int = 4) -> int:
    """Vocabulary columns per block of the fused loss. On the CPU a block's fp32 logits and its slice of
    the head weight stay near 6 MB together, so the softmax passes and the second product find them in
    cache (2-core EPYC, Gemma-3-270M's head over 254 and 1016 rows: 1024-2048 columns ran 7-11% faster
    than 8192); on a GPU the logits stay near 64 MB, so kernel launches stay few."""
    if device_type == "cpu":
        block = (6 << 20) // max(rows * 4 + hidden * weight_bytes, 1)
    else:
        block = (1 << 24) // max(rows, 1)
    return min(max(1024, block) // 256 * 256, vocab)


WEIGHT_GRAD_LOGITS = 1 << 26  # a trained head's chunk holds its whole-vocabulary logits: at most 256 MB fp32


class FusedLinearCrossEntropy(torch.autograd.Function):
    """sum CE(softcap(h @ W.T), y) over rows, with d(loss)/d(h) (and d(loss)/d(W)) computed in the forward.

    Frozen head: flash-attention style over the vocabulary. Each block of logits updates a running max
    m, a running sum S of exp(l - m) and G = sum exp(l - m) · W_block, rescaled when m grows; then
    lse = m + log S and d(loss)/d(h) = G / S - W_y. The logits of a row never exist whole, W is read
    once, and the softmax never leaves the cache (the CPU is memory-bound on it, not on the matmuls).
    Trained head (full fine-tuning): d(loss)/d(W) needs the normalised softmax, so each (smaller)
    chunk takes its whole-vocabulary logits once and both gradients come from the same product:
    three head matmuls, as in an unfused loss, and no recomputation in backward.
    keep (optional, static shapes): a 0/1 weight per row; y must then hold valid ids on every row.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, chunk: int,
                softcap: float | None, block: int | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        dev = h.device.type
        cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        if need_w:
            chunk = min(chunk, max(1, WEIGHT_GRAD_LOGITS // weight.shape[0]))
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(dev, enabled=False):
            for start in range(0, h.shape[0], chunk):
                hs, ys = h[start:start + chunk].to(cdt), y[start:start + chunk]
                ks = keep[start:start + chunk, None].float() if keep is not None else None
                w_y = weight[ys].float()
                l_y = (hs.float() * w_y).sum(1, keepdim=True)
                f_y = None
                if softcap:
                    t_y = torch.tanh(l_y / softcap)
                    l_y, f_y = t_y * softcap, 1 - t_y * t_y
                if need_w:
                    lse, g = _softmax_grads(hs, ys, weight, cdt, softcap, f_y, grad_w, need_h, ks)
                else:
                    vb = block or vocab_block(hs.shape[0], weight.shape[0], dev, weight.shape[1],
                                              torch.finfo(cdt).bits // 8)
                    lse, g = _online_softmax(hs, weight, cdt, softcap, vb, need_h)
                    if need_h:
                        g = g - (w_y if f_y is None else w_y * f_y)
                        g = g * ks if ks is not None else g
                total += ((lse - l_y) * ks).sum() if ks is not None else (lse - l_y).sum()
                if need_h:
                    grad_h[start:start + chunk] = g
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        # in place: these buffers exist only for this backward, and a fresh vocab x hidden one costs page faults
        gh = grad_h.mul_(grad_out.to(grad_h.dtype)) if grad_h is not None else None
        gw = grad_w.mul_(grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None


def _softcap_(logits: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softcap · tanh(logits / softcap) in place, and the tanh (None without a soft cap)."""
    if not softcap:
        return logits, None
    if logits.is_cpu:  # tanh(x) = 2·sigmoid(2x) - 1: torch's CPU tanh takes about 3x as long as its sigmoid
        tanh = torch.sigmoid(logits.mul_(2 / softcap)).mul_(2).sub_(1)
    else:
        tanh = torch.tanh(logits.div_(softcap))
    return torch.mul(tanh, softcap, out=logits), tanh


def _tanh_grad_(tanh: torch.Tensor) -> torch.Tensor:
    """1 - tanh^2 (the soft cap's derivative), in place."""
    return tanh.mul_(tanh).neg_().add_(1)


def _softmax_grads(hs: torch.Tensor, ys: torch.Tensor, weight: torch.Tensor, cdt: torch.dtype,
                   softcap: float | None, f_y: torch.Tensor | None, grad_w: torch.Tensor, need_h: bool,
                   ks: torch.Tensor | None = None) -> tuple:
    """A trained head's chunk: logsumexp, d(loss)/d(hs) (if needed), and d(loss)/d(W) added into grad_w
    (ks: optional 0/1 row weights)."""
    w = weight.to(cdt)
    logits = (hs @ w.t()).float()
    logits, tanh = _softcap_(logits, softcap)
    m = logits.amax(1, keepdim=True)
    d = logits.sub_(m).exp_()
    s = d.sum(1, keepdim=True)
    d.div_(s)  # softmax; d(loss)/d(logits) = softmax - onehot, times the soft cap's tanh'
    if tanh is not None:
        d.mul_(_tanh_grad_(tanh))
    rows = torch.arange(ys.shape[0], device=ys.device)
    d[rows, ys] -= 1 if f_y is None else f_y[:, 0]
    if ks is not None:
        d.mul_(ks)
    d = d.to(cdt)
    if cdt == torch.float32:
        grad_w.addmm_(d.t(), hs)  # no vocab x hidden temporary
    else:
        grad_w += (d.t() @ hs).float()
    return m + s.log(), (d @ w if need_h else None)


def _online_softmax(hs: torch.Tensor, weight: torch.Tensor, cdt: torch.dtype, softcap: float | None,
                    block: int, need_h: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logsumexp over the vocabulary of softcap(hs @ W.T) and softmax · W, one vocabulary block at a time."""
    rows = hs.shape[0]
    m = torch.full((rows, 1), -float("inf"), device=hs.device)
    s = torch.zeros((rows, 1), device=hs.device)
    g = torch.zeros((rows, weight.shape[1]), device=hs.device) if need_h else None
    kernel = softcap is None and need_h and _block_kernel_ok(hs, cdt)
    for v in range(0, weight.shape[0], block):
        w = weight[v:v + block].to(cdt)
        if kernel:  # the block's max, exp and sum in one pass over its 16-bit logits (studio/kernels/softmax_block.py)
            from .kernels import softmax_block
            e, m_new, block_sum = softmax_block.forward(hs @ w.t(), m)
        else:
            logits = (hs @ w.t()).float()
            logits, tanh = _softcap_(logits, softcap)
            m_new = torch.maximum(m, logits.amax(1, keepdim=True))
            e = logits.sub_(m_new).exp_()
            block_sum = e.sum(1, keepdim=True)
            if need_h and tanh is not None:
                e.mul_(_tanh_grad_(tanh))  # through the tanh soft cap
        rescale = (m - m_new).exp_()
        s.mul_(rescale).add_(block_sum)
        if need_h:
            g.mul_(rescale).add_(e.to(cdt) @ w)
        m = m_new
    return m + s.log(), (g / s if need_h else None)


def _block_kernel_ok(hs: torch.Tensor, cdt: torch.dtype) -> bool:
    from . import kernels
    if cdt not in (torch.bfloat16, torch.float16) or not kernels.use_triton(hs):
        return False
    return kernels.checked(("softmax_block", hs.device.type, cdt), lambda: _block_kernel_agrees(hs.device, cdt))


def _block_kernel_agrees(device: torch.device, cdt: torch.dtype) -> bool:
    """The kernel against the torch ops on a small tile (first use of a dtype): a finite and an empty running max."""
    from .kernels import agree, softmax_block
    gen = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(6, 1000, generator=gen)).to(device, cdt)
    m = torch.tensor([[-float("inf")], [0.5], [9.0], [-3.0], [-float("inf")], [2.0]], device=device)
    e, m_new, sums = softmax_block.forward(logits, m, block=256)
    want_m = torch.maximum(m, logits.float().amax(1, keepdim=True))
    want_e = (logits.float() - want_m).exp()
    return agree(1e-2, (e, want_e.to(cdt))) and agree(1e-4, (m_new, want_m), (sums, want_e.sum(1, keepdim=True)))


def chunked_lm_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, chunk: int = 1024,
                    softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy over labelled positions, and their count.

    Only labelled positions go through the head (prompt tokens masked with -100 cost nothing),
    `chunk` of them at a time; inside `static_shapes()` all positions do, the masked ones weighted 0.
    """
    y = labels[:, 1:]
    keep = y != -100
    if _static:  # F.cross_entropy skips -100 itself; the fused op takes the mask as row weights
        h, y, rows = hidden[:, :-1].reshape(-1, hidden.shape[-1]), y.reshape(-1), keep.reshape(-1)
    else:
        h, y, rows = hidden[:, :-1][keep], y[keep], None
    if type(head) is nn.Linear and head.bias is None and torch.is_grad_enabled() \
            and (h.requires_grad or head.weight.requires_grad):
        ids = y if rows is None else y.clamp(min=0)  # masked rows need a valid id to index
        return FusedLinearCrossEntropy.apply(h, head.weight, ids, max(1, chunk), softcap, None, rows), keep.sum()
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
