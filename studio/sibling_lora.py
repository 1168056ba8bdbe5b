"""Projections that read one input, each with LoRA (q, k, v; gate, up), as one autograd op.

Apart, each projection's fused op (methods/lora_fused.py) reads the input for its A product, reads it again for
A's gradient, and returns an input gradient of its own, which autograd then sums (for q, k and v two more passes
over a rows x hidden tensor, for gate and up one). Together, where no adapter drops its input (each would draw
its own mask) and all share one scale and compute dtype: the A products are one GEMM over the adapters' A stacked
(rows x n·r), as are their gradients (n·r x in), and the input gradient is one buffer that the stacked rank-r
product writes and each base GEMM adds onto (addmm, beta 1). Each output is made as the projection's own op makes
it (its rank-r term first, then the base GEMM adding onto it); the input gradient is the same sum in another
order. Saved for backward: the input once (the norm's input, when it is a fused norm's output:
studio/rebuilt_inputs.py), the stacked rank-r input (the n adapters' lows, the same bytes), the adapters' A and B
in the compute dtype.

The fused MLP runs gate and up this way (studio/fused_mlp.py). q, k and v are called by the attention's own code,
so the engine's attention forward (studio/fused_rope.py) makes their outputs here first and each projection's
forward then returns the one made for it (`given_output`), when it is called on the same input tensor.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from typing import Iterator, Sequence

import torch
from torch import nn

from . import ab_switches, rebuilt_inputs
from .methods.lora_fused import (_scaled_mm, adapter_copies, base_plus_term, cast, dense_weight, rank_r_input,
                                 weight_grad_mm)

PER_SIBLING = 6  # weight, bias, A, B, 4-bit quant state, the step's copies of A and B
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
_given = threading.local()  # .outputs: {id(module): (input, output)} inside an attention forward


class SiblingLora(torch.autograd.Function):
    """(x, n, compute dtype, scaling, terms_left, then per projection: W, bias, A, B, 4-bit quant state, A and B in
    the compute dtype) -> the n projections' outputs; W and bias frozen; gradients for x and every A and B.
    terms_left: the outputs are the base products alone, followed by the stacked rank-r input (not
    differentiable), from which their consumer adds each term as it reads them (studio/kernels/gated_terms.py);
    the gradients are the same, as an output's gradient is its term's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, n: int, cdt: torch.dtype, scaling: float, terms_left: bool,
                *flat) -> tuple[torch.Tensor, ...]:
        groups = [flat[i * PER_SIBLING:(i + 1) * PER_SIBLING] for i in range(n)]
        x2 = cast(x.reshape(-1, x.shape[-1]), cdt)
        ab = [adapter_copies(g[2], g[3], cdt, g[5]) for g in groups]
        low = rank_r_input(x2, torch.cat([a for a, _ in ab]), scaling)
        outputs, start = [], 0
        for (weight, bias, _, _, state, _), (a, b) in zip(groups, ab):
            r = a.shape[0]
            term = None if terms_left else low[:, start:start + r]
            outputs.append(base_plus_term(x2, x.shape[:-1], weight, bias, term, b, state))
            start += r
        trains = any(t.requires_grad for g in groups for t in g[2:4])
        ctx.save_for_backward(*rebuilt_inputs.saved_input(ctx, x, x2, trains), low,
                              *[t for g, (a, b) in zip(groups, ab) for t in (g[0], a, b)])
        ctx.n, ctx.cdt, ctx.scaling, ctx.x_dtype = n, cdt, scaling, x.dtype
        ctx.states = [g[4] for g in groups]
        ctx.a_dtype, ctx.b_dtype = groups[0][2].dtype, groups[0][3].dtype  # one for all (sibling_parts)
        if terms_left:
            ctx.mark_non_differentiable(low)
            outputs.append(low)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *dys: torch.Tensor):
        dys = dys[:ctx.n]  # (not the stacked rank-r input's, when it was an output)
        inputs, (low, *held) = rebuilt_inputs.split_saved(ctx, ctx.saved_tensors)
        weights, a_s, b_s = held[0::3], held[1::3], held[2::3]
        needs = ctx.needs_input_grad
        need_a = [needs[5 + i * PER_SIBLING + 2] for i in range(ctx.n)]
        need_b = [needs[5 + i * PER_SIBLING + 3] for i in range(ctx.n)]
        x = rebuilt_inputs.restored_input(ctx, inputs)
        x2 = cast(x.reshape(-1, x.shape[-1]), ctx.cdt)
        dy2s = [cast(dy.reshape(-1, dy.shape[-1]), ctx.cdt) for dy in dys]
        # s · dy B for each, side by side: with the scale in it (and in the forward's low) no product below needs one
        d_low = torch.cat([_scaled_mm(dy2, b, ctx.scaling) for dy2, b in zip(dy2s, b_s)], dim=1)
        dx = None
        if needs[0]:  # the adapters' terms first, each base GEMM adding onto them
            dx = d_low @ torch.cat(a_s)
            for dy2, weight, state in zip(dy2s, weights, ctx.states):
                dx.addmm_(dy2, dense_weight(weight, state, ctx.cdt))
            dx = cast(dx.view(*dys[0].shape[:-1], dx.shape[-1]), ctx.x_dtype)
        grads: list[torch.Tensor | None] = [dx, None, None, None, None]
        das: list[torch.Tensor | None] = [None] * ctx.n
        if any(need_a):  # one GEMM for every A's gradient, split by rows
            das = list(weight_grad_mm(d_low.t(), x2, ctx.a_dtype).split([a.shape[0] for a in a_s]))
        start = 0
        for i, (dy2, a) in enumerate(zip(dy2s, a_s)):
            r = a.shape[0]
            db = weight_grad_mm(dy2.t(), low[:, start:start + r], ctx.b_dtype) if need_b[i] else None
            grads += [None, None, das[i] if need_a[i] else None, db, None, None]
            start += r
        return tuple(grads)


def sibling_parts(modules: Sequence[nn.Module], x: torch.Tensor) -> list[tuple] | None:
    """Each module's fused-op parts (methods/lora.py: LoraLinear.fused_parts) when all of them, two or more, can
    run as one op on x: LoRA's fused op, no forward hooks, no dropout drawn, one scale, compute dtype and A and B
    dtype; else None. Not inside torch.compile, which fuses the projections' ops itself, nor with
    STUDIO_SIBLING_LORA=0."""
    if len(modules) < 2 or torch.compiler.is_compiling() or not wanted():
        return None
    parts = []
    for module in modules:
        ask = getattr(module, "fused_parts", None)
        if ask is None or module._forward_hooks or module._forward_pre_hooks:
            return None
        found = ask(x)
        if found is None:
            return None
        parts.append(found)
    first = parts[0]
    if any(p[4] != first[4] or p[5] != first[5] or p[2].dtype != first[2].dtype or p[3].dtype != first[3].dtype
           or not isinstance(p[6], float) or p[6] != 0.0 for p in parts):
        return None
    return parts


def wanted() -> bool:
    """STUDIO_SIBLING_LORA=0 runs the projections apart (A/B runs)."""
    return ab_switches.on("STUDIO_SIBLING_LORA")


def run(parts: list[tuple], x: torch.Tensor, terms_left: bool = False) -> tuple[torch.Tensor, ...]:
    """The projections' outputs from sibling_parts' parts, as one op; terms_left: their base products and then
    the stacked rank-r input (SiblingLora)."""
    flat = [t for weight, bias, a, b, _, _, _, state, copies in parts for t in (weight, bias, a, b, state, copies)]
    return SiblingLora.apply(x, len(parts), parts[0][5], parts[0][4], terms_left, *flat)


@contextlib.contextmanager
def attention_projections(attention: nn.Module, args: tuple, kwargs: dict) -> Iterator[None]:
    """Around an attention module's forward: its q, k and v projections with fused LoRA made as one op on its
    hidden states, each handed to the projection's forward when called on that tensor. An output left unclaimed
    (attention code that calls them on another tensor) is a warning, once: the forward and a checkpoint's
    recomputation of it must save the same tensors, so the path is not switched off mid-run."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    modules = [m for m in (getattr(attention, n, None) for n in ATTENTION_PROJECTIONS)
               if m is not None and getattr(m, "fused_parts", None) is not None]
    parts = sibling_parts(modules, hidden) if isinstance(hidden, torch.Tensor) else None
    if parts is None:
        yield
        return
    outer = getattr(_given, "outputs", None)
    current = {id(m): (hidden, y) for m, y in zip(modules, run(parts, hidden))}
    _given.outputs = current
    try:
        yield
    finally:
        _given.outputs = outer
    if any(v is not None for v in current.values()):  # (not reached when the forward raised)
        _warn_unclaimed(type(attention).__name__)


@functools.cache
def _warn_unclaimed(name: str) -> None:
    warnings.warn(f"{name} did not call its q/k/v projections on its hidden states: their outputs made together "
                  "went unused (correct results, wasted work).", stacklevel=3)


def given_output(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The output made for module on x by attention_projections (claimed once), or None (always inside
    torch.compile, whose traced forwards make none and should not trace the thread's state)."""
    if torch.compiler.is_compiling():
        return None
    outputs = getattr(_given, "outputs", None)
    if not outputs:
        return None
    held = outputs.get(id(module))
    if held is None or held[0] is not x:
        return None
    outputs[id(module)] = None
    return held[1]
