"""Rotary position embedding as one autograd op, for the attention classes whose formula we know.

transformers applies RoPE as q·cos + rotate_half(q)·sin for q and k: about seven kernels each way
per tensor (two slices, a negation and a concatenation inside rotate_half, two products, a sum),
and the backward adds as many again. Ours: the same torch ops forward (bitwise equal outputs) and a
three-op backward; on CUDA with Triton one kernel each way per tensor (studio/kernels/rope.py,
equal up to rounding), which matters most where a step waits on kernel launches.

The attention code calls its modeling module's `apply_rotary_pos_emb` by name, so that name is
replaced, once per module, by a dispatcher that takes our op only inside the forward of an attention
module this engine has marked (an instance attribute, as for the norms). Any other model of the same
class in the process (the peft baseline of `studio bench`, a model loaded elsewhere) keeps the
original code. The flag is per thread, and checkpointing's recomputation runs the marked forward
again, so the recomputed forward takes the same path as the first one. The marked forward also makes q, k and v
as one op where each is a fused LoRA (studio/sibling_lora.py).
"""
from __future__ import annotations

import sys
import threading
import types
from typing import Callable

import torch
from torch import nn

ROPE_ATTENTIONS = ("LlamaAttention", "Qwen2Attention", "Qwen3Attention", "MistralAttention", "GemmaAttention",
                   "Gemma2Attention", "Gemma3Attention")
_inside = threading.local()  # .on: this thread is inside a marked attention forward


class FusedRope(torch.autograd.Function):
    """(q, k, cos, sin) -> (q·cos + rotate_half(q)·sin, same for k); gradients for q and k."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        ctx.triton = _triton_ok(q, k, cos, sin)
        ctx.save_for_backward(cos, sin)
        if ctx.triton:
            from .kernels import rope
            return rope.apply(q, cos, sin), rope.apply(k, cos, sin)
        return torch_rope(q, cos, sin), torch_rope(k, cos, sin)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        cos, sin = ctx.saved_tensors
        if ctx.triton:
            from .kernels import rope
            return rope.apply(dq, cos, sin, True), rope.apply(dk, cos, sin, True), None, None
        return torch_rope_backward(dq, cos, sin), torch_rope_backward(dk, cos, sin), None, None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def torch_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' formula, op for op: x·cos + rotate_half(x)·sin, cos and sin (batch, seq, dim)."""
    return (x * cos.unsqueeze(1)) + (_rotate_half(x) * sin.unsqueeze(1))


def torch_rope_backward(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """g·cos + rotate_halfᵀ(g·sin), where rotate_halfᵀ([a, b]) = [b, −a]."""
    gs = g * sin.unsqueeze(1)
    half = g.shape[-1] // 2
    return (g * cos.unsqueeze(1)) + torch.cat((gs[..., half:], -gs[..., :half]), dim=-1)


def _triton_ok(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    from . import kernels
    if not kernels.use_triton(q) or q.numel() == 0 or not q.dtype == k.dtype == cos.dtype == sin.dtype:
        return False
    from .kernels import rope
    if not (rope.supported(q, cos, sin) and rope.supported(k, cos, sin)):
        return False
    key = ("rope", q.device.type, q.dtype)
    return kernels.checked(key, lambda: _kernel_agrees(q, cos))


def _kernel_agrees(q: torch.Tensor, cos: torch.Tensor) -> bool:
    """The kernel against the torch ops on a small transposed input like attention's (first use of a dtype)."""
    from .kernels import agree, rope
    gen = torch.Generator(device=q.device).manual_seed(0)
    dim, heads = q.shape[-1], min(q.shape[1], 4)
    x, g = (torch.randn(2, 5, heads, dim, generator=gen, device=q.device).to(q.dtype).transpose(1, 2) for _ in "xg")
    angle = torch.randn(1, 5, dim // 2, generator=gen, device=q.device).repeat(1, 1, 2)
    c, s = angle.cos().to(cos.dtype), angle.sin().to(cos.dtype)
    tol = 1e-5 if q.dtype == torch.float32 else 2e-2
    return agree(tol, (rope.apply(x, c, s), torch_rope(x, c, s)),
                 (rope.apply(g, c, s, True), torch_rope_backward(g, c, s)))


def _dispatcher(original: Callable) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if getattr(_inside, "on", False) and unsqueeze_dim == 1 and _fusable_args(q, k, cos, sin):
            return FusedRope.apply(q, k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.studio_original = original
    return apply_rotary_pos_emb


def _fusable_args(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    return (q.dim() == k.dim() == 4 and cos.dim() == 3 and cos.shape == sin.shape and q.shape[-1] == k.shape[-1]
            == cos.shape[-1] and q.shape[-1] % 2 == 0 and not (cos.requires_grad or sin.requires_grad))


def _marked_forward(self: nn.Module, *args, **kwargs):
    if torch.compiler.is_compiling():  # inductor fuses the original ops itself
        return type(self).forward(self, *args, **kwargs)
    from . import sibling_lora  # here: it imports the methods package, which imports this module
    before, _inside.on = getattr(_inside, "on", False), True
    try:
        with sibling_lora.attention_projections(self, args, kwargs):  # q, k, v with LoRA as one op
            return type(self).forward(self, *args, **kwargs)
    finally:
        _inside.on = before


def _install_dispatcher(module_name: str) -> bool:
    modeling = sys.modules.get(module_name)
    fn = getattr(modeling, "apply_rotary_pos_emb", None)
    if fn is None:
        return False
    if not hasattr(fn, "studio_original"):
        modeling.apply_rotary_pos_emb = _dispatcher(fn)
    return True


def fuse_rope(model: nn.Module) -> int:
    """Mark every supported attention module of `model` (and hook its modeling module); returns how many."""
    count = 0
    for module in model.modules():
        cls = type(module)
        if cls.__name__ in ROPE_ATTENTIONS and "forward" not in vars(module) and _install_dispatcher(cls.__module__):
            module.forward = types.MethodType(_marked_forward, module)
            count += 1
    return count
