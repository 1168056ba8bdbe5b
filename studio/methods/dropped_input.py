"""DoRA's and AdaLoRA's dropped adapter input as autograd ops that keep no dropped copy of it.

DoRA (lora.py) reads drop(x) twice: in A's product x_d Aᵀ, whose gradient for A needs x_d again, and in the
base product it rescales (W x_d, as peft's DoRA does with dropout). Through nn.Dropout and nn.Linear autograd
keeps the dropout's mask (on the CPU a noise tensor in x's dtype) and x_d itself, for every adapter: q, k and
v each keep their own copy of the same normalised input. Here one keep-mask is drawn for both reads (one byte
per element; none on CUDA, where the run's seeded dropout regenerates it, seeded_dropout.py): `MaskedDropout`
keeps only that mask, and `DroppedDown` (x -> x_d Aᵀ) keeps x, which its neighbours share (for a norm's output or
act(gate)·up, what their producer keeps: rebuilt_inputs.py), and builds x_d again in backward. AdaLoRA (adalora.py) reads it
once, in x_d (A ⊙ E)ᵀ: the same op. The products, casts and masks are those of the modules they replace, so
outputs and gradients equal theirs for the same mask (x's gradient up to the order of its sum).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import rebuilt_inputs
from ..seeded_dropout import SeededDrop, SeededDropout, module_drop
from .lora_fused import _dropped, cast, dropout_mask, op_dtype, weight_grad_mm


def plain_dropout(module: nn.Module) -> bool:
    """Whether module.lora_dropout is torch's dropout (or none) without hooks, so its draw can move into these ops."""
    d = module.lora_dropout
    return type(d) in (nn.Identity, nn.Dropout, SeededDropout) and not (d._forward_hooks or d._forward_pre_hooks)


def draw(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor | None, float | SeededDrop]:
    """This forward's dropout of the module's input x: (the keep-mask its reads share, or None without dropout or
    for a seeded one, whose seed is in p; p)."""
    p = module_drop(module)
    return (dropout_mask(x, p) if p else None), p


def dropped_down(x: torch.Tensor, lora_a: torch.Tensor, mask: torch.Tensor | None, p: float | SeededDrop,
                 xd: torch.Tensor | None = None) -> torch.Tensor:
    """drop(x) Aᵀ in the dtype F.linear would compute it in (autocast's, else x's), as DroppedDown; xd: drop(x)
    made already (MaskedDropout's output, for the forward's product; not kept)."""
    return DroppedDown.apply(x, lora_a, mask, p, op_dtype(x), xd)


class MaskedDropout(torch.autograd.Function):
    """(x, keep-mask or None, p) -> x · mask / (1 - p) (a seeded p applies its own mask); gradient for x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor | None, p: float | SeededDrop) -> torch.Tensor:
        ctx.save_for_backward(mask)
        ctx.p = p
        return _dropped(x, mask, p)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return _dropped(dy, mask, ctx.p), None, None


class DroppedDown(torch.autograd.Function):
    """(x, A, keep-mask or None, p, compute dtype, drop(x) when the caller made it already) -> drop(x) Aᵀ in that
    dtype; gradients for x and A."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lora_a: torch.Tensor, mask: torch.Tensor | None, p: float | SeededDrop,
                cdt: torch.dtype, xd: torch.Tensor | None = None) -> torch.Tensor:
        x2 = cast(x.reshape(-1, x.shape[-1]), cdt)
        xd2 = _dropped(x2, _flat(mask), p) if xd is None else cast(xd.reshape(-1, xd.shape[-1]), cdt)
        low = xd2 @ cast(lora_a, cdt).t()
        ctx.save_for_backward(*rebuilt_inputs.saved_input(ctx, x, x2, lora_a.requires_grad), lora_a, mask)
        ctx.p, ctx.cdt, ctx.x_dtype = p, cdt, x.dtype
        return low.view(*x.shape[:-1], low.shape[-1])

    @staticmethod
    def backward(ctx, d_low: torch.Tensor):
        inputs, (lora_a, mask) = rebuilt_inputs.split_saved(ctx, ctx.saved_tensors)
        cdt = ctx.cdt
        d2 = cast(d_low.reshape(-1, d_low.shape[-1]), cdt)
        dx = da = None
        if ctx.needs_input_grad[0]:
            dx = _dropped(d2 @ cast(lora_a, cdt), _flat(mask), ctx.p)
            dx = cast(dx.view(*d_low.shape[:-1], dx.shape[-1]), ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            x = rebuilt_inputs.restored_input(ctx, inputs)
            x2 = cast(x.reshape(-1, x.shape[-1]), cdt)
            da = weight_grad_mm(d2.t(), _dropped(x2, _flat(mask), ctx.p), lora_a.dtype)
        return dx, da, None, None, None, None


def _flat(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else mask.reshape(-1, mask.shape[-1])
