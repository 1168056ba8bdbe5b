"""The gated MLP's act(gate) · up and its gradients as Triton kernels (SiLU and tanh-GELU), one pass each.

Forward: h = cast(act(g)) · u, rounded as the torch ops round (act in fp32, cast, product cast).
Backward: from d(h), g and u in one pass, d(u) = cast(act(g)) · d(h) and
d(g) = act'(g) · cast(d(h) · u), written over d(h) when the caller owns it (one rows x intermediate
buffer fewer than the torch ops, which take five kernels and as many passes over the largest
activations of a layer).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # globals a kernel reads must be constexpr
KAPPA = tl.constexpr(0.044715)


@triton.jit
def _act_and_grad(g, SILU: tl.constexpr, NEED_GRAD: tl.constexpr):
    """act(g) in fp32 and, if asked, act'(g) (aten's formulas)."""
    if SILU:
        sig = tl.sigmoid(g)
        act = g * sig
        grad = act
        if NEED_GRAD:
            grad = sig * (1.0 + g * (1.0 - sig))
    else:
        inner = SQRT_2_OVER_PI * (g + KAPPA * g * g * g)
        tanh = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        act = 0.5 * g * (1.0 + tanh)
        grad = act
        if NEED_GRAD:
            grad = 0.5 * (1.0 + tanh) + 0.5 * g * (1.0 - tanh * tanh) * SQRT_2_OVER_PI * (1.0 + 3.0 * KAPPA * g * g)
    return act, grad


@triton.jit
def _forward(G, U, H, n, SILU: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0)
    act, _ = _act_and_grad(g, SILU, False)
    h = act.to(U.dtype.element_ty).to(tl.float32) * u.to(tl.float32)
    tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)


@triton.jit
def _backward(DH, G, U, DG, DU, n, SILU: tl.constexpr, NEED_G: tl.constexpr, NEED_U: tl.constexpr,
              BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    act, grad = _act_and_grad(g, SILU, NEED_G)
    if NEED_U:
        du = act.to(DU.dtype.element_ty).to(tl.float32) * dh
        tl.store(DU + offs, du.to(DU.dtype.element_ty), mask=mask)
    if NEED_G:
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        t = (dh * u).to(DG.dtype.element_ty).to(tl.float32)
        tl.store(DG + offs, (t * grad).to(DG.dtype.element_ty), mask=mask)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def forward(gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
    g, u = _flat(gate), _flat(up)
    h = torch.empty_like(g)
    n = g.numel()
    _forward[(triton.cdiv(n, BLOCK),)](g, u, h, n, SILU=kind == "silu", BLOCK=BLOCK, num_warps=4)
    return h


def backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, kind: str, need_gate: bool, need_up: bool,
             overwrite_dh: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(d(gate), d(up)); with overwrite_dh, d(gate) is written over dh. dh, gate and up share one dtype."""
    dh_, g, u = _flat(dh), _flat(gate), _flat(up)
    n = g.numel()
    dg = (dh_ if overwrite_dh else torch.empty_like(g)) if need_gate else g
    du = torch.empty_like(u) if need_up else u
    _backward[(triton.cdiv(n, BLOCK),)](dh_, g, u, dg, du, n, SILU=kind == "silu", NEED_G=need_gate,
                                        NEED_U=need_up, BLOCK=BLOCK, num_warps=4)
    return (dg.view(gate.shape) if need_gate else None), (du.view(up.shape) if need_up else None)
