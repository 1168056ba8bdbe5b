"""Rotary position embedding (rotate-half form) and its gradient as one Triton kernel, one pass each.

x is (batch, heads, seq, head_dim) in any layout whose last dimension is contiguous (attention's
q and k are transposed views); cos and sin are (batch or 1, seq, head_dim). With x = [x1, x2] and
the halves of cos and sin written c1, c2, s1, s2:
forward  y = [x1·c1 − x2·s1, x2·c2 + x1·s2]        (x·cos + rotate_half(x)·sin)
backward d = [g1·c1 + g2·s2, g2·c2 − g1·s1]        (g·cos + rotate_halfᵀ(g·sin))
in fp32, rounded once (the torch ops round after each product and the sum).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import block_size


@triton.jit
def _rope(X, Y, COS, SIN, seq, heads, sxb, sxh, sxt, syb, syh, syt, scb, sct,
          HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one (batch, position) per program, all heads at once
    b, t = row // seq, row % seq
    d = tl.arange(0, BLOCK_D)
    h = tl.arange(0, BLOCK_H)
    dmask = d < HALF
    cs = b * scb + t * sct + d
    c1 = tl.load(COS + cs, mask=dmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(COS + cs + HALF, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(SIN + cs, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(SIN + cs + HALF, mask=dmask, other=0.0).to(tl.float32)[None, :]
    mask = (h < heads)[:, None] & dmask[None, :]
    xs = b * sxb + t * sxt + h[:, None].to(tl.int64) * sxh + d[None, :]
    x1 = tl.load(X + xs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + xs + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    ys = b * syb + t * syt + h[:, None].to(tl.int64) * syh + d[None, :]
    tl.store(Y + ys, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + ys + HALF, y2.to(Y.dtype.element_ty), mask=mask)


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False) -> torch.Tensor:
    """The rotation of x (or, with backward, of a gradient), in x's dtype and layout."""
    batch, heads, seq, dim = x.shape
    y = torch.empty_like(x)  # keeps x's strides (dense permuted views stay permuted)
    half = dim // 2
    scb = cos.stride(0) if cos.shape[0] > 1 else 0
    _rope[(batch * seq,)](x, y, cos, sin, seq, heads, x.stride(0), x.stride(1), x.stride(2), y.stride(0),
                          y.stride(1), y.stride(2), scb, cos.stride(1), HALF=half, BLOCK_H=block_size(heads),
                          BLOCK_D=block_size(half), BACKWARD=backward, num_warps=4)
    return y


def supported(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Shapes and layouts the kernel reads correctly (anything else keeps the torch ops)."""
    return (x.dim() == 4 and cos.dim() == 3 and cos.shape == sin.shape and cos.stride() == sin.stride()
            and cos.shape[-1] == x.shape[-1] and x.shape[-1] % 2 == 0 and cos.shape[1] == x.shape[2]
            and cos.shape[0] in (1, x.shape[0]) and x.stride(-1) == 1 and cos.stride(-1) == 1
            and x.shape[1] <= 256)
