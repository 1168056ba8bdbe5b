"""A base product rescaled per output row with the adapter's terms, summed in fp32 and rounded once (DoRA, IA3, SSF).

    y = s ⊙ q + (W x - W x_d) + β + b_out,    q = W x_d + u + b_in

DoRA: s = m / ‖W + ΔW‖_row, u = B A x_d · scaling, b_out the bias (x_d = x without dropout: y = s ⊙ (W x + u) + b).
IA3 on an output: s = l, no u, b_in the bias (y = l ⊙ (W x + b)). SSF: s = γ, the shift β, b_in the bias
(y = γ ⊙ (W x + b) + β).

In a 16-bit compute dtype, rescaling a product already rounded loses the small change of s (s starts at 1,
and a change below half a bf16 step of 1, 0.2%, leaves every output as it was), and DoRA's u added to it is
mostly lost too: peft's DoRA returns an fp32 output (promoted by the fp32 magnitude) and its IA3 rounds.
Here the products come out in fp32 (fp32 throughout, or CUDA's bf16/fp16 GEMM with an fp32 output,
`mm(out_dtype=)`), everything is added and rescaled there, and the output is rounded once. On the CPU, where
a 16-bit product cannot come out in fp32, the rounded product gives the small terms (s - 1) ⊙ q + u, and the
base GEMM adds them in its epilogue: y = W x + (s - 1) ⊙ q + u + b, one more 16-bit GEMM (without dropout), much
cheaper there than one in fp32 (tests/test_update_rounding.py). A GPU without the fp32-output GEMM (an older
torch) casts the operands up instead: cuBLAS rounds its product before its epilogue adds (an H200 kept exactly
the rounded-first share, baselines/epilogue_check.py), and the epilogue's way kept only 20-46% of the terms there.

Kept for backward: q in the compute dtype (for s's gradient; autograd's way keeps W x_d and u); the weight is
read again (a 4-bit one dequantized again, as the fused LoRA op does).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from .common import plus_product
from .lora_fused import cast, dense_weight, is_4bit, op_dtype


def fp32_output_gemm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a GEMM of dtype operands on this device can write its output in fp32 (torch's `mm(out_dtype=)`:
    CUDA, in the torch versions that have it)."""
    return device.type == "cuda" and _cuda_mm_out_dtype(dtype)


@functools.cache
def _cuda_mm_out_dtype(dtype: torch.dtype) -> bool:
    try:
        a = torch.ones(16, 16, dtype=dtype, device="cuda")
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def exact_products(device: torch.device, cdt: torch.dtype) -> bool:
    """Whether the products come out in fp32 (fp32 throughout, CUDA's 16-bit GEMM with an fp32 output, or operands
    cast up off the CPU), rather than rounded with the small terms added in the base GEMM's epilogue (the CPU's)."""
    return cdt == torch.float32 or device.type != "cpu" or fp32_output_gemm(device, cdt)


def fp32_product(x2: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x2 wᵀ in fp32 for x2 and w in one dtype, without rounding the products to that dtype first (on a device
    without an fp32-output GEMM, the operands cast up: a slower GEMM)."""
    if x2.dtype == torch.float32:
        return x2 @ w.t()
    if fp32_output_gemm(x2.device, x2.dtype):
        return mm_fp32_output(x2, w.t())
    return x2.float() @ w.float().t()


def mm_fp32_output(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.mm(a, b, out_dtype=torch.float32)


def base_weight(base: nn.Module, cdt: torch.dtype | None = None) -> torch.Tensor:
    """The base layer's weight in cdt, or by default in its own dtype (a 4-bit one dequantized to its compute dtype,
    an 8-bit one to fp32)."""
    if is_4bit(base):
        state = base.weight.quant_state
        return dense_weight(base.weight.data, state, cdt or state.dtype)
    if base.weight.__class__.__name__ == "Int8Params":
        from .lora import _dequantized_weight
        return cast(_dequantized_weight(base), cdt or torch.float32)
    return cast(base.weight.detach(), cdt or base.weight.dtype)


class RescaledProduct(torch.autograd.Function):
    """(x, x_d or None, u or None, s, base layer, bias inside the rescale?, shift or None) -> y + shift; gradients
    for x, x_d, u, s and the shift (SSF's β). With x_d (DoRA's dropout) u is given and the bias is outside:
    y = W x + (s - 1) ⊙ q + u + b."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, xd: torch.Tensor | None, u: torch.Tensor | None, s: torch.Tensor,
                base: nn.Module, bias_in: bool, shift: torch.Tensor | None) -> torch.Tensor:
        cdt = op_dtype(x)
        bias = base.bias
        exact = exact_products(x.device, cdt)
        with torch.autocast(x.device.type, enabled=False):
            w = base_weight(base, cdt)
            x2 = cast(x.reshape(-1, x.shape[-1]), cdt)
            xin = x2 if xd is None else cast(xd.reshape(-1, xd.shape[-1]), cdt)
            q = fp32_product(xin, w) if exact else (xin @ w.t()).float()
            u2 = None if u is None else u.reshape(q.shape)
            if u2 is not None:
                q.add_(u2)
            if bias is not None and bias_in:
                q.add_(bias)
            kept = cast(q, cdt)
            if exact and xd is None:
                y = q * s if kept is q else q.mul_(s)
                if bias is not None and not bias_in:
                    y.add_(bias)
                if shift is not None:
                    y.add_(shift)
            else:  # y = W x + (s - 1) ⊙ q + u + shift + b (the bias's scaled part is in q)
                small = q * (s - 1) if kept is q else q.mul_(s - 1)
                if u2 is not None:
                    small.add_(u2)
                if shift is not None:
                    small.add_(shift)
                if exact:
                    y = small.add_(fp32_product(x2, w))
                    if bias is not None:
                        y.add_(bias)
                else:  # without an fp32-output GEMM: the small terms added by the base GEMM in its epilogue
                    y = plus_product(x2, w, small.to(cdt), bias)
        ctx.save_for_backward(kept, s)
        ctx.base, ctx.cdt, ctx.has_xd = base, cdt, xd is not None
        ctx.dtypes = (x.dtype, None if xd is None else xd.dtype, None if u is None else u.dtype)
        ctx.shift_dtype = None if shift is None else shift.dtype
        return cast(y, cdt).view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        q, s = ctx.saved_tensors
        cdt = ctx.cdt
        need_x, need_xd, need_u, need_s = ctx.needs_input_grad[:4]
        dy2 = cast(dy.reshape(-1, dy.shape[-1]), cdt)
        dx = dxd = du = ds = dshift = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[6]:
                dshift = dy2.sum(0, dtype=torch.float32).to(ctx.shift_dtype)
            if need_s:
                ds = (dy2 * q).sum(0, dtype=torch.float32).to(s.dtype)
            dq = dy2 * cast(s, cdt)
            if need_x or need_xd:
                w = base_weight(ctx.base, cdt)
                if ctx.has_xd:
                    dx = (dy2 @ w) if need_x else None
                    dxd = ((dy2 * cast(s - 1, cdt)) @ w) if need_xd else None
                else:
                    dx = dq @ w
            du = dq if need_u else None
        shape, (x_dt, xd_dt, u_dt) = dy.shape[:-1], ctx.dtypes
        return (None if dx is None else cast(dx, x_dt).view(*shape, -1),
                None if dxd is None else cast(dxd, xd_dt).view(*shape, -1),
                None if du is None else cast(du, u_dt).view(dy.shape), ds, None, None, dshift)
