"""The gated MLP's act(gate) · up as one autograd op, swapped into the transformers MLP modules we know.

transformers computes `down(act(gate(x)) * up(x))` as two ops: the activation keeps its input
(gate's output) and the product keeps both of its inputs (act(gate) and up), three rows x
intermediate tensors per layer, the largest activations of a decoder layer. Ours keeps gate and up
and recomputes act(gate) in the backward (one elementwise pass), so a layer saves a third less in
its MLP. The forward runs the same ops in the same dtype, so outputs are bitwise equal;
d(up) = dy · act(gate), d(gate) = act'(gate) · dy · up (aten's own activation backward). On CUDA with
Triton, the product and both gradients are one kernel each (studio/kernels/gated.py; same casts).

When down_proj carries IA3's feed-forward scale, act(gate) · up, the scale and down_proj are one op too, which
rebuilds act(gate) · up for the scale's gradient instead of keeping it. Other adapter ops on down_proj that
need its input again (DoRA's, AdaLoRA's, the rebuilt-ΔW methods') keep gate and up instead of act(gate) · up
and rebuild it (studio/rebuilt_inputs.py).

When down_proj is a LoRA that runs as one op (studio/methods/lora_fused.py), act(gate) · up and
down_proj run as one op too: LoRA's A needs down's input for its gradient, which would keep a
fourth rows x intermediate tensor per layer; here it is recomputed from gate and up in the backward
(the same ops, so the gradients are bitwise those of the two ops apart). In a checkpoint's
recomputation of a Llama-style layer, whose MLP output only feeds the residual add, the fused op
rebuilds what it keeps and skips down's product (and, 4-bit, its dequantization): a third of down's
frozen GEMM work in a checkpointed step.

When gate_proj and up_proj carry LoRA too and run as one op (studio/sibling_lora.py), their rank-r terms are not
written out where the Triton kernels run: the base GEMMs make gate's and up's base products and the gated kernels
add each term as they read them (studio/kernels/gated_terms.py; STUDIO_TERMS_IN_GATED=0 writes them out).

Covered: SiLU (Llama, Qwen2/3, Mistral) and tanh-GELU (Gemma 1/2/3) MLPs with gate_proj / up_proj /
down_proj. Only the module's forward is replaced (an instance attribute): names, state dicts and
hooks on the projections are untouched. Other MLPs (Phi-3's fused gate_up_proj, other activations)
keep their code.
"""
from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F
from torch import nn

from .checkpointing import recomputing_layer
from .chunked_mlp import OUTPUT_TO_RESIDUAL_LAYERS, chunks_for, run_deferred, run_skips_output, running_deferred
from .methods.lora_fused import (adapter_copies, cast, lora_linear_backward, lora_linear_forward, op_dtype,
                                 rank_r_input)
from .rebuilt_inputs import GatedOutput, attach
from .seeded_dropout import SeededDrop
from . import ab_switches, sibling_lora

MLP_CLASSES = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP", "GemmaMLP", "Gemma2MLP", "Gemma3MLP")
# config model_type values whose MLPs are of the classes above (the memory estimator's switch), and their activations
FUSED_MLP_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "gemma3_text")
FUSED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


class GatedActivation(torch.autograd.Function):
    """(gate, up, kind) -> act(gate) * up with act = silu or tanh-gelu; gradients for gate and up."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        ctx.kind = kind
        return gated(gate, up, kind)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        return *_gated_backward(dy, gate, up, ctx.kind, ctx.needs_input_grad[0], ctx.needs_input_grad[1]), None


class GatedDownLora(torch.autograd.Function):
    """(gate, up, kind, W, bias, A, B, scaling, dtype, dropout p, 4-bit quant state, A and B in dtype, output,
    terms) -> down(act(gate) * up) with down a frozen (16/32-bit or 4-bit) Linear plus LoRA; keeps gate, up, the
    rank-sized low (and the dropout mask), recomputes act(gate) * up for A's gradient. output=False: what
    it keeps, without the down projection itself (a recomputation that discards the output); there, unless a
    mask drawn from torch's generator must be drawn again, nothing at all: the backward rebuilds act(gate) * up
    anyway and makes low from it (one elementwise pass over the layer's widest tensors less).
    terms (gate's and up's LoRA terms left to this op: the stacked rank-r input [low_g | low_u], B_g, B_u in
    dtype; none of them differentiable here): gate and up are then their base products, and the kernels of
    studio/kernels/gated_terms.py add each term as they read them; gate's and up's gradients are those of the
    projections with their terms."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, kind: str, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, cdt: torch.dtype,
                p=0.0, quant_state=None, copies: tuple | None = None, output: bool = True,
                terms: tuple | None = None) -> torch.Tensor:
        if not output and (not p or isinstance(p, SeededDrop)):  # low left to the backward (no mask to draw)
            a, b = adapter_copies(lora_a, lora_b, cdt, copies)
            y, mask = gate.new_empty(*gate.shape[:-1], b.shape[0], dtype=cdt), None
            low = _left_to_backward(gate.numel() // gate.shape[-1], a.shape[0], cdt, gate.device)
        else:
            h = gated(gate, up, kind, terms)
            y, low, mask, a, b = lora_linear_forward(cast(h.reshape(-1, h.shape[-1]), cdt), h.shape[:-1], weight,
                                                     bias, lora_a, lora_b, scaling, p, quant_state, copies, output)
        ctx.save_for_backward(gate, up, low, weight, a, b, mask, *(terms or ()))
        ctx.kind, ctx.scaling, ctx.cdt, ctx.p, ctx.ab_dtypes = kind, scaling, cdt, p, (lora_a.dtype, lora_b.dtype)
        ctx.quant_state = quant_state
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up, low, weight, a, b, mask, *terms = ctx.saved_tensors
        terms = tuple(terms) or None
        needs = ctx.needs_input_grad
        # the torch ops: act(gate) once, for h and then (in place) for d(up); the kernels recompute it
        act = None if terms or _kernel_ok(gate, gate, up, ctx.kind) else _act(gate, ctx.kind)
        h = gated(gate, up, ctx.kind, terms) if act is None else act * up
        h2 = cast(h.reshape(-1, h.shape[-1]), ctx.cdt)
        if _was_left(low) and needs[6]:  # the recomputation left it: from the rebuilt h, as it would have made it
            low = rank_r_input(h2, a, ctx.scaling, ctx.p)
        dh, da, db = lora_linear_backward(dy, h2, low, weight, a, b,
                                          ctx.scaling, needs[0] or needs[1], needs[5], needs[6], mask, ctx.p,
                                          ctx.ab_dtypes, ctx.quant_state,
                                          # h: rebuilt, ours (traced by compile, left to its own buffer reuse)
                                          x2_own=not torch.compiler.is_compiling())
        del h, h2
        d_gate = d_up = None
        if dh is not None:  # dh is ours: written over in place, so at most three rows x intermediate tensors live
            dh = cast(dh.view(gate.shape), gate.dtype)
            if terms:
                from .kernels import gated_terms
                d_gate, d_up = gated_terms.backward(dh, gate, up, ctx.kind, *terms, needs[0], needs[1],
                                                    overwrite_dh=True)
            elif _kernel_ok(dh, gate, up, ctx.kind):
                from .kernels import gated as kernel
                d_gate, d_up = kernel.backward(dh, gate, up, ctx.kind, needs[0], needs[1], overwrite_dh=True)
            else:
                if needs[1]:
                    d_up = (act if act is not None else _act(gate, ctx.kind)).mul_(dh)
                if needs[0]:
                    d_gate = _act_backward(dh.mul_(up), gate, ctx.kind)
        return d_gate, d_up, None, None, None, da, db, None, None, None, None, None, None, None


def _left_to_backward(rows: int, r: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A stand-in for low: its shape, dtype and device (what a checkpoint compares between a layer's forward and
    its recomputation, which must save alike) over one element; its zero strides tell the backward to make low."""
    return torch.zeros((), dtype=dtype, device=device).expand(rows, r)


def _was_left(low: torch.Tensor) -> bool:
    return low.dim() == 2 and low.stride() == (0, 0)  # a GEMM's output never has zero strides


class GatedScaledDown(torch.autograd.Function):
    """(gate, up, kind, l, W, bias, output) -> ((act(gate) · up) ⊙ l) Wᵀ + b with W and b frozen: IA3's
    feed-forward scale (methods/ia3.py) and the gated product as one op. IA3 through autograd keeps act(gate) · up for l's
    gradient, a fourth rows x intermediate tensor per layer; here it is rebuilt from gate and up in the backward.
    The forward runs IA3's own ops (the product scaled in the activations' dtype, then the linear), so outputs
    are bitwise equal; output=False as GatedDownLora's."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, kind: str, scale: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, output: bool = True) -> torch.Tensor:
        ctx.save_for_backward(gate, up, scale, weight)
        ctx.kind, ctx.cdt = kind, op_dtype(gate)
        if not output:
            return gate.new_empty(*gate.shape[:-1], weight.shape[0], dtype=ctx.cdt)
        h = gated(gate, up, kind)
        return F.linear(h * scale.to(h.dtype), weight, bias)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up, scale, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        d_scaled = cast(dy, ctx.cdt) @ cast(weight, ctx.cdt)  # as the linear's own backward, in its dtype
        d_scaled = cast(d_scaled, gate.dtype)
        d_scale = None
        if needs[3]:
            h = gated(gate, up, ctx.kind)
            d_scale = (d_scaled * h).reshape(-1, h.shape[-1]).sum(0).to(scale.dtype)
            del h
        d_gate = d_up = None
        if needs[0] or needs[1]:
            d_gate, d_up = _gated_backward(d_scaled.mul_(scale.to(d_scaled.dtype)), gate, up, ctx.kind, needs[0],
                                           needs[1])
        return d_gate, d_up, None, d_scale, None, None, None


def _gated_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, kind: str, need_gate: bool,
                    need_up: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """d(gate), d(up) of act(gate) * up; act(gate) is recomputed."""
    if _kernel_ok(dy, gate, up, kind):
        from .kernels import gated as kernel
        return kernel.backward(dy, gate, up, kind, need_gate, need_up)
    d_gate = d_up = None
    if need_up:
        d_up = dy * _act(gate, kind)
    if need_gate:
        d_gate = _act_backward(dy * up, gate, kind)
    return d_gate, d_up


def gated(gate: torch.Tensor, up: torch.Tensor, kind: str, terms: tuple | None = None) -> torch.Tensor:
    """act(gate) * up: one Triton kernel on CUDA, else the two torch ops (the reference); with terms (GatedDownLora)
    gate's and up's LoRA terms added in the kernel (terms_ride_along chose them only where it runs)."""
    if terms:
        from .kernels import gated_terms
        return gated_terms.forward(gate, up, kind, *terms)
    if _kernel_ok(gate, gate, up, kind):
        from .kernels import gated as kernel
        return kernel.forward(gate, up, kind)
    return _act(gate, kind) * up


def _kernel_ok(t: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, kind: str) -> bool:
    from . import kernels
    if not kernels.use_triton(gate) or not t.dtype == gate.dtype == up.dtype or gate.shape != up.shape:
        return False
    return kernels.checked(("gated", gate.device.type, gate.dtype, kind), lambda: _kernel_agrees(gate, kind))


def _kernel_agrees(like: torch.Tensor, kind: str) -> bool:
    """The kernels against the torch ops on a small input (first use of a dtype and activation)."""
    from .kernels import gated as kernel
    gen = torch.Generator(device=like.device).manual_seed(0)
    g, u, dh = (3 * torch.randn(3, 1000, generator=gen, device=like.device)).to(like.dtype).unbind(0)
    from .kernels import agree
    tol = 1e-4 if like.dtype == torch.float32 else 2e-2  # tanh-GELU: tanh from a sigmoid, a few ulp apart
    dg, du = kernel.backward(dh, g, u, kind, True, True)
    return agree(tol, (kernel.forward(g, u, kind), _act(g, kind) * u), (du, _act(g, kind) * dh),
                 (dg, _act_backward(dh * u, g, kind)))


def _act_backward(g: torch.Tensor, gate: torch.Tensor, kind: str) -> torch.Tensor:
    """g · act'(gate), aten's own activation backward."""
    if kind == "silu":
        return torch.ops.aten.silu_backward(g, gate)
    return torch.ops.aten.gelu_backward(g, gate, approximate="tanh")


def _act(x: torch.Tensor, kind: str) -> torch.Tensor:
    return F.silu(x) if kind == "silu" else F.gelu(x, approximate="tanh")


def activation_kind(act_fn: nn.Module) -> str | None:
    """silu / gelu_tanh for the activation modules transformers builds from a config; None for others."""
    name = type(act_fn).__name__
    if isinstance(act_fn, nn.SiLU) or name == "SiLUActivation":
        return "silu"
    inner = getattr(act_fn, "act", None)
    if name == "GELUTanh" and isinstance(inner, functools.partial) and inner.keywords.get("approximate") == "tanh":
        return "gelu_tanh"
    return None


def _fused_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    chunks = chunks_for(self, x)
    if chunks:  # a long batch in a checkpointed layer: row chunks that keep only x (studio/chunked_mlp.py)
        return run_deferred(self, x, chunks, _fused_forward)
    siblings = sibling_lora.sibling_parts((self.gate_proj, self.up_proj), x)  # both fused LoRA: one op
    down = self.down_proj
    riding = _terms_ride_along(self, x, siblings)
    if riding is not None:  # gate's and up's terms added by the gated kernels (studio/kernels/gated_terms.py)
        parts, b_gate, b_up = riding
        gate, up, low = sibling_lora.run(siblings, x, terms_left=True)
        return GatedDownLora.apply(gate, up, self.studio_act_kind, *parts, not _output_unread(self),
                                   (low, b_gate, b_up))
    if siblings is not None:
        gate, up = sibling_lora.run(siblings, x)
    else:
        gate, up = self.gate_proj(x), self.up_proj(x)
    parts = down.fused_parts(gate) if hasattr(down, "fused_parts") and not _has_hooks(down) else None
    if parts is not None:
        return GatedDownLora.apply(gate, up, self.studio_act_kind, *parts, not _output_unread(self))
    scaled = down.gated_scale_parts() if hasattr(down, "gated_scale_parts") and not _has_hooks(down) else None
    if scaled is not None:  # IA3 on down_proj
        return GatedScaledDown.apply(gate, up, self.studio_act_kind, *scaled, not _output_unread(self))
    h = GatedActivation.apply(gate, up, self.studio_act_kind)
    if h.requires_grad:  # the op keeps gate and up: an adapter op on down can rebuild h from them
        attach(h, (gate, up), GatedOutput(self.studio_act_kind))
    return down(h)


def _terms_ride_along(mlp: nn.Module, x: torch.Tensor, siblings: list[tuple] | None) -> tuple | None:
    """(down's fused-op parts, B_g and B_u in the compute dtype) where gate's and up's LoRA terms can be added by
    the gated kernels instead of written out (studio/kernels/gated_terms.py): gate and up joined as one op, down a
    fused LoRA, one rank, the Triton kernels in use and agreeing with their reference here; else None.
    STUDIO_TERMS_IN_GATED=0 writes the terms out (A/B runs)."""
    down = mlp.down_proj
    if siblings is None or not terms_wanted() or not hasattr(down, "fused_parts") or _has_hooks(down):
        return None
    cdt = siblings[0][5]
    if not _terms_kernel_ok(x, cdt, mlp):
        return None
    from .kernels import gated_terms
    ranks = {s[3].shape[1] for s in siblings}
    if len(ranks) > 1 or max(ranks) > gated_terms.MAX_RANK:
        return None
    parts = down.fused_parts(x)
    if parts is None:
        return None
    b_gate, b_up = (adapter_copies(s[2], s[3], cdt, s[8])[1] for s in siblings)
    if not (b_gate.is_contiguous() and b_up.is_contiguous()):  # (the kernels read B's rows whole)
        return None
    return parts, b_gate, b_up


def terms_wanted() -> bool:
    return ab_switches.on("STUDIO_TERMS_IN_GATED")


def _terms_kernel_ok(x: torch.Tensor, cdt: torch.dtype, mlp: nn.Module) -> bool:
    from . import kernels
    if not kernels.use_triton(x) or cdt not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    kind = mlp.studio_act_kind
    return kernels.checked(("gated_terms", x.device.type, cdt, kind), lambda: _terms_kernel_agrees(x.device, cdt, kind))


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def _terms_kernel_agrees(device: torch.device, dtype: torch.dtype, kind: str) -> bool:
    """The kernels with terms against the torch ops on a small input (first use of a dtype and activation, maybe
    inside a forward under autocast: the reference is not cast): 70 rows, 150 columns and rank 5, none of them a
    multiple of the kernels' tiles."""
    from .kernels import agree, gated_terms
    gen = torch.Generator(device="cpu").manual_seed(0)
    gate, up, dh = (2 * torch.randn(3, 70, 150, generator=gen)).to(device, dtype).unbind(0)
    low = torch.randn(70, 10, generator=gen).to(device, dtype)
    b_gate, b_up = (0.3 * torch.randn(2, 150, 5, generator=gen)).to(device, dtype).unbind(0)
    terms = (low, b_gate.contiguous(), b_up.contiguous())
    d_gate, d_up = gated_terms.backward(dh, gate, up, kind, *terms, True, True)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    return agree(tol, *zip((gated_terms.forward(gate, up, kind, *terms), d_gate, d_up),
                           gated_with_terms_reference(gate, up, dh, kind, *terms)))


def gated_with_terms_reference(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor, kind: str, low: torch.Tensor,
                               b_gate: torch.Tensor, b_up: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(h, d(gate), d(up)) of act(g) · u with g and u their base products plus LoRA terms, as the kernels of
    studio/kernels/gated_terms.py round them, from the torch ops (their first-use check and tests)."""
    from .kernels import gated_terms
    g, u = gated_terms.reference(gate, up, low, b_gate, b_up)
    dtype = gate.dtype
    act = _act(g, kind).to(dtype).float()
    return ((act * u).to(dtype), _act_backward((dh.float() * u).to(dtype).float(), g, kind).to(dtype),
            (act * dh.float()).to(dtype))


def _output_unread(mlp: nn.Module) -> bool:
    """In a checkpoint's recomputation of a layer that ends in `residual + mlp(x)`, with this MLP its own
    (not wrapped by an adapter) and no hook on it: nothing saves the MLP's output for backward, so the
    recomputation need not compute it (one of the three passes of down_proj's product each step). So too in
    a deferred MLP's run in its backward (studio/chunked_mlp.py)."""
    if running_deferred():
        return run_skips_output()
    layer = recomputing_layer()
    return (layer is not None and type(layer).__name__ in OUTPUT_TO_RESIDUAL_LAYERS
            and getattr(layer, "mlp", None) is mlp and not _has_hooks(mlp))


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def fusable_mlp(module: nn.Module) -> bool:
    if type(module).__name__ not in MLP_CLASSES or "forward" in vars(module):
        return False
    return all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")) and \
        activation_kind(getattr(module, "act_fn", None)) is not None and \
        not _has_hooks(module.act_fn)


def fuse_mlps(model: nn.Module) -> int:
    """Swap the fused forward into every supported gated MLP of `model`; returns how many."""
    count = 0
    for module in model.modules():
        if fusable_mlp(module):
            module.studio_act_kind = activation_kind(module.act_fn)
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count
