"""RMSNorm forward and backward as Triton kernels: the formulas of studio/fused_norm.py, one pass each.

Forward, one program per row: r = rsqrt(mean(x²) + eps), x̂ = x·r, and y = w · cast(x̂) ("llama") or
cast(x̂ · (1 + w)) ("gemma"), with the same casts as the torch reference; r is kept per row (fp32).
Backward, a few programs per multiprocessor each looping over a share of the rows:
d(x) = r · (u − x̂ · mean(u ⊙ x̂)) with u = d(y) · w (llama, in y's dtype) or d(y) · (1 + w) (gemma), and
each program's partial d(w) = Σ d(y) ⊙ x̂ summed afterwards. The torch reference takes about eight
kernels forward and twelve backward, each a pass over the activations in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import block_size, num_warps, programs_for


@triton.jit
def _forward(X, W, Y, R, stride_x, stride_y, n, eps, GEMMA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, axis=0) / n + eps)
    xhat = x * r
    if GEMMA:
        y = xhat * (1.0 + w)
    else:
        y = xhat.to(X.dtype.element_ty).to(tl.float32) * w
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(R + row, r)


@triton.jit
def _backward(DY, X, W, R, DX, DW, stride_dy, stride_x, stride_dx, n, rows, rows_per_program,
              GEMMA: tl.constexpr, NEED_W: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_program  # 64-bit offsets: rows x width can pass 2^31
    end = tl.minimum(start + rows_per_program, rows)
    for row in range(start, end):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(R + row)
        xhat = x * r
        if GEMMA:
            u = dy * (1.0 + w)
        else:
            u = (dy * w).to(DY.dtype.element_ty).to(tl.float32)
        dot = tl.sum(u * xhat, axis=0) / n
        tl.store(DX + row * stride_dx + cols, ((u - xhat * dot) * r).to(DX.dtype.element_ty), mask=mask)
        if NEED_W:
            if GEMMA:
                acc += dy * xhat
            else:
                acc += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
    if NEED_W:
        tl.store(DW + pid.to(tl.int64) * n + cols, acc, mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def forward(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y shaped like x, r per row in fp32)."""
    x2 = _rows(x)
    rows, n = x2.shape
    out_dtype = x.dtype if gemma else torch.result_type(weight, x)
    y2 = torch.empty((rows, n), dtype=out_dtype, device=x.device)
    r = torch.empty(rows, dtype=torch.float32, device=x.device)
    block = block_size(n)
    _forward[(rows,)](x2, weight, y2, r, x2.stride(0), y2.stride(0), n, eps, GEMMA=gemma, BLOCK=block,
                      num_warps=num_warps(block))
    return y2.view(x.shape), r


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, r: torch.Tensor, gemma: bool,
             need_w: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(d(x) shaped like x, d(w) in the weight's dtype or None)."""
    x2, dy2 = _rows(x), _rows(dy)
    rows, n = x2.shape
    dx2 = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    programs = programs_for(rows, x.device)
    per = -(-rows // programs)
    programs = -(-rows // per)
    partial = torch.empty((programs, n) if need_w else (1, 1), dtype=torch.float32, device=x.device)
    block = block_size(n)
    _backward[(programs,)](dy2, x2, weight, r.reshape(-1), dx2, partial, dy2.stride(0), x2.stride(0), dx2.stride(0),
                           n, rows, per, GEMMA=gemma, NEED_W=need_w, BLOCK=block, num_warps=num_warps(block))
    dw = partial.sum(0).to(weight.dtype) if need_w else None
    return dx2.view(x.shape), dw
