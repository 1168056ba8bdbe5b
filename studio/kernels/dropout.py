"""Dropout whose keep-mask is a function of a seed on the device, a site number and the element's index;
uniform draws made the same way (a method's own random choices: AdaMix's routing, diff pruning's gates,
LoHa/LoKr's rank dropout).

keep(i) = philox(seed + site · SITE_STRIDE, i) >= p, so the same (seed, site) gives the same mask for
any tensor of the same layout: the backward applies it to the gradient without a stored mask, and a
checkpoint's recomputation draws exactly the forward's mask without resetting any generator (which a
replayed CUDA graph would not repeat). The seed is read from device memory, so a captured step reads
whatever seed is there at each replay.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
SITE_STRIDE = tl.constexpr(1_000_003)  # globals a kernel reads must be constexpr


@triton.jit
def _drop(X, Y, SEED, site, n, p, scale, first, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    seed = tl.load(SEED) + site * SITE_STRIDE
    keep = tl.rand(seed, offs + first) >= p
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.where(keep, x * scale, 0.0)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _uniform(Y, SEED, site, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(SEED) + site * SITE_STRIDE
    tl.store(Y + offs, tl.rand(seed, offs), mask=offs < n)


def _check_size(n: int) -> None:
    if n >= 2 ** 31:
        raise ValueError("seeded draws index elements with 32-bit offsets")


def apply(t: torch.Tensor, seed: torch.Tensor, site: int, p: float, first: int = 0,
          inplace: bool = False) -> torch.Tensor:
    """t with the (seed, site) mask applied: kept elements times 1 / (1 - p), dropped ones 0. first: the index
    t's first element has in the mask (a chunk of rows of a larger tensor takes that tensor's mask there).
    inplace: written over t (contiguous), each element read before it is written."""
    x = t if t.is_contiguous() else t.contiguous()
    n = x.numel()
    _check_size(first + n)
    y = x if inplace and x is t else torch.empty_like(x)
    _drop[(triton.cdiv(n, BLOCK),)](x, y, seed, site, n, p, 1.0 / (1.0 - p), first, BLOCK=BLOCK, num_warps=4)
    return y


def uniform(shape: tuple[int, ...] | torch.Size, seed: torch.Tensor, site: int) -> torch.Tensor:
    """fp32 numbers in [0, 1) on the seed's device, a function of (seed, site, index) as the masks are."""
    y = torch.empty(shape, dtype=torch.float32, device=seed.device)
    n = y.numel()
    _check_size(n)
    _uniform[(triton.cdiv(n, BLOCK),)](y, seed, site, n, BLOCK=BLOCK, num_warps=4)
    return y
