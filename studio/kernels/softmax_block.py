"""One vocabulary block of the fused loss's online softmax (studio/losses.py) as one Triton kernel.

Given a rows x block tile of 16-bit logits l and the running row max m, the torch ops make six passes
over the tile: the fp32 copy, the row max, the subtraction, the exp, the row sum and the 16-bit copy
of the exponentials for the next GEMM (about 36 bytes of memory traffic a logit; over a 150-260k
vocabulary that is as much time as the head's GEMMs on a small model). Here one program per row
reads its logits twice (the max, then the exp and the sum) and writes the exponentials once in 16 bits,
about 6 bytes a logit. Same math in fp32: m_new = max(m, max_j l_j), e = exp(l - m_new), the row sum
of the fp32 e (before it is rounded), e stored in the logits' dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import block_size, num_warps

BLOCK = 2048


@triton.jit
def _block(L, M, E, MN, S, n_cols, stride_l, stride_e, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    l_row = L + row * stride_l
    e_row = E + row * stride_e
    top = tl.full((BLOCK,), float("-inf"), tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(l_row + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        top = tl.maximum(top, x)
    m_new = tl.maximum(tl.load(M + row), tl.max(top, axis=0))
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(l_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        e = tl.exp(x - m_new)  # 0 where masked
        acc += e
        tl.store(e_row + cols, e.to(E.dtype.element_ty), mask=mask)
    tl.store(MN + row, m_new)
    tl.store(S + row, tl.sum(acc, axis=0))


def forward(logits: torch.Tensor, m: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
    """(e, m_new, row sums) for 2-D logits (unit column stride) and the running max m (rows x 1, fp32)."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    rows, n = logits.shape
    e = torch.empty((rows, n), dtype=logits.dtype, device=logits.device)
    m_new = torch.empty((rows, 1), dtype=torch.float32, device=logits.device)
    sums = torch.empty((rows, 1), dtype=torch.float32, device=logits.device)
    b = min(block, block_size(n))
    _block[(rows,)](logits, m.contiguous(), e, m_new, sums, n, logits.stride(0), e.stride(0), BLOCK=b,
                    num_warps=num_warps(b))
    return e, m_new, sums
