"""The gated MLP's kernels (kernels/gated.py) with gate's and up's LoRA terms added as they read gate and up.

gate = x W_gᵀ + low_g B_gᵀ (low_g = s · x A_gᵀ, rank r), and so up. Made apart, each rank-r term is a rows x
intermediate tensor written before the base GEMM adds onto it: at Qwen2.5-7B 4 x 2,048, 310 MB written twice a
layer in forward and twice again in its recomputation (~96 µs each on an H200). Here the base GEMMs write the
base products alone and these kernels add low · Bᵀ to a tile of them as they load it (one small dot per tile:
a block of low's rows against a block of B's rows), so no term is ever written; g and u are summed in fp32 and
not rounded before the activation.

Forward: h = cast(act(g)) · u. Backward: from d(h), d(u) = cast(act(g)) · d(h) and d(g) = act'(g) ·
cast(d(h) · u), with g and u rebuilt with their terms the same way (d(h) may be overwritten by d(g)).
Tiles of BM rows x BN columns; the rank padded to a power of two of at least 16 (RP) for the dot. On CUDA the dot
takes bf16/fp16 operands (exact products, fp32 sums); in Triton's interpreter (the CPU tests), whose bf16 dot is
wrong, and for fp32 operands it multiplies in fp32 (IEEE).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .gated import _act_and_grad

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read once, as Triton itself does at import
BM, BN = 32, 128  # with 8 warps 16 elements a thread: the backward's five fp32 tiles stay in registers
MAX_RANK = 128  # the dot's operands stay in a program's registers up to this rank


@triton.jit
def _term(LOW, B, rm, rn, rows, cols, r, stride_low, col0, RP: tl.constexpr, NATIVE: tl.constexpr):
    """low[rm, col0:col0 + r] · B[rn, :r]ᵀ as a BM x BN fp32 tile."""
    rr = tl.arange(0, RP)
    low = tl.load(LOW + rm[:, None] * stride_low + (col0 + rr)[None, :],
                  mask=(rm[:, None] < rows) & (rr[None, :] < r), other=0.0)
    b = tl.load(B + rn[:, None] * r + rr[None, :], mask=(rn[:, None] < cols) & (rr[None, :] < r), other=0.0)
    if NATIVE:
        return tl.dot(low, tl.trans(b))
    return tl.dot(low.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")


@triton.jit
def _forward(G, U, H, LOW, BG, BU, rows, cols, r, stride_low, SILU: tl.constexpr, BM: tl.constexpr,
             BN: tl.constexpr, RP: tl.constexpr, NATIVE: tl.constexpr):
    rm = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rm[:, None] < rows) & (rn[None, :] < cols)
    offs = rm[:, None] * cols + rn[None, :]
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32) + \
        _term(LOW, BG, rm, rn, rows, cols, r, stride_low, 0, RP, NATIVE)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32) + \
        _term(LOW, BU, rm, rn, rows, cols, r, stride_low, r, RP, NATIVE)
    act, _ = _act_and_grad(g, SILU, False)
    h = act.to(H.dtype.element_ty).to(tl.float32) * u
    tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)


@triton.jit
def _backward(DH, G, U, DG, DU, LOW, BG, BU, rows, cols, r, stride_low, SILU: tl.constexpr, BM: tl.constexpr,
              BN: tl.constexpr, RP: tl.constexpr, NATIVE: tl.constexpr, NEED_G: tl.constexpr, NEED_U: tl.constexpr):
    rm = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rm[:, None] < rows) & (rn[None, :] < cols)
    offs = rm[:, None] * cols + rn[None, :]
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32) + \
        _term(LOW, BG, rm, rn, rows, cols, r, stride_low, 0, RP, NATIVE)
    act, grad = _act_and_grad(g, SILU, NEED_G)
    if NEED_U:
        du = act.to(DU.dtype.element_ty).to(tl.float32) * dh
        tl.store(DU + offs, du.to(DU.dtype.element_ty), mask=mask)
    if NEED_G:
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32) + \
            _term(LOW, BU, rm, rn, rows, cols, r, stride_low, r, RP, NATIVE)
        t = (dh * u).to(DG.dtype.element_ty).to(tl.float32)
        tl.store(DG + offs, (t * grad).to(DG.dtype.element_ty), mask=mask)


def supported(gate: torch.Tensor, up: torch.Tensor, low: torch.Tensor, b_gate: torch.Tensor,
              b_up: torch.Tensor) -> bool:
    """The layouts these kernels read: gate and up alike and contiguous, low rows x 2r with unit column stride,
    each B out x r contiguous in gate's dtype, r at most MAX_RANK."""
    r = b_gate.shape[-1]
    return gate.shape == up.shape and gate.is_contiguous() and up.is_contiguous() and gate.dtype == up.dtype \
        and low.dim() == 2 and low.shape[0] * gate.shape[-1] == gate.numel() and low.shape[1] == 2 * r \
        and low.stride(1) == 1 and b_up.shape == b_gate.shape == (gate.shape[-1], r) \
        and b_gate.is_contiguous() and b_up.is_contiguous() and b_gate.dtype == b_up.dtype == low.dtype == gate.dtype \
        and r <= MAX_RANK


def _launch(kernel, gate: torch.Tensor, up: torch.Tensor, low: torch.Tensor, b_gate: torch.Tensor,
            b_up: torch.Tensor, *args, **flags) -> None:
    if not supported(gate, up, low, b_gate, b_up):
        raise ValueError("gated_terms: gate, up, low and B in layouts these kernels do not read")
    r = b_gate.shape[-1]
    cols = gate.shape[-1]
    rows = gate.numel() // cols
    native = gate.is_cuda and gate.dtype in (torch.bfloat16, torch.float16) and not INTERPRETED
    kernel[(triton.cdiv(rows, BM), triton.cdiv(cols, BN))](*args, rows, cols, r, low.stride(0), BM=BM, BN=BN,
                                                          RP=max(16, triton.next_power_of_2(r)), NATIVE=native,
                                                          num_warps=8, **flags)


def forward(gate: torch.Tensor, up: torch.Tensor, kind: str, low: torch.Tensor, b_gate: torch.Tensor,
            b_up: torch.Tensor) -> torch.Tensor:
    """act(gate + low_g B_gᵀ) · (up + low_u B_uᵀ), low = [low_g | low_u] (supported() layouts)."""
    h = torch.empty_like(gate)
    _launch(_forward, gate, up, low, b_gate, b_up, gate, up, h, low, b_gate, b_up, SILU=kind == "silu")
    return h


def backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, kind: str, low: torch.Tensor,
             b_gate: torch.Tensor, b_up: torch.Tensor, need_gate: bool, need_up: bool,
             overwrite_dh: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(d(gate), d(up)) of forward's output, gate and up with their terms; with overwrite_dh, d(gate) is written
    over dh (contiguous, gate's shape)."""
    dh = dh if dh.is_contiguous() else dh.contiguous()
    dg = (dh if overwrite_dh else torch.empty_like(gate)) if need_gate else gate
    du = torch.empty_like(up) if need_up else up
    _launch(_backward, gate, up, low, b_gate, b_up, dh, gate, up, dg, du, low, b_gate, b_up, SILU=kind == "silu",
            NEED_G=need_gate, NEED_U=need_up)
    return (dg.view(gate.shape) if need_gate else None), (du.view(up.shape) if need_up else None)


def reference(gate: torch.Tensor, up: torch.Tensor, low: torch.Tensor, b_gate: torch.Tensor,
              b_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """g and u in fp32 with their terms, as the kernels make them (the torch side of checks and tests; fp32 products
    even where the caller runs under autocast, as a first-use check may)."""
    r = b_gate.shape[-1]
    cols = gate.shape[-1]
    with torch.autocast(gate.device.type, enabled=False):
        g = gate.reshape(-1, cols).float() + low[:, :r].float() @ b_gate.float().t()
        u = up.reshape(-1, cols).float() + low[:, r:].float() @ b_up.float().t()
    return g.view(gate.shape), u.view(up.shape)
