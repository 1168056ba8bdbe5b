"""LoRA's forward and backward as one autograd op, for the common case (frozen 16/32-bit or 4-bit base, no DoRA).

y = x Wᵀ (+ b) + low Bᵀ with low = s · drop(x) Aᵀ (the scale rides in A's GEMM, and kept in low it
needs no pass of its own in the backward either). Unfused, autograd runs the base linear, the
dropout, A, the scale on B and an addmm as separate nodes: each allocates its output, and the two
gradients that reach x (base path and adapter path) are summed into a third tensor. Here the output
is one buffer: the rank-r term is written into it and the base GEMM adds its product onto it in its
epilogue, so the full-width output is never read back by a separate pass, and on the CPU in bf16 the sum is
rounded once (a small update added to an output already rounded is mostly lost, as at the start of training
when B has just left zero: peft's bf16 loss curve lags its fp32 one for that reason, ours follows it there;
cuBLAS rounds its product before its epilogue adds, so on CUDA the term is rounded as in peft's order, and
a bias joins it in its GEMM's epilogue there instead of taking a pass of its own: `bias_joins_term`);
d(x) = d(low) A (· mask / keep) + dy W is built the same way. Saved for backward: x (which A needs
anyway, and which q, k, v share; when x is a fused norm's output, the norm's input, from which the first
backward to need it rebuilds it: studio/rebuilt_inputs.py), low (rank-sized) and, with dropout, a bool mask
(one byte per element; drop(x) = x · mask / keep is recomputed in backward) instead of a dropped copy of x
per adapter. The mask is drawn from torch's generator, so checkpointing's RNG replay recomputes it; or, in a
run that armed studio/seeded_dropout.py (CUDA), from a seed on the device: then p is a SeededDrop, nothing
is kept, and the backward regenerates the mask from the seed.
The gradients of A and B are written in fp32 by their GEMMs on CUDA (no cast kernel after them).
A 4-bit base (QLoRA) is dequantized into the compute dtype for the forward's GEMM and again for the
backward's, as bitsandbytes' training path does; only the packed weight is kept in between.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ab_switches, rebuilt_inputs
from ..dequant_4bit import dense_4bit
from ..seeded_dropout import SeededDrop


class FusedLoraLinear(torch.autograd.Function):
    """(x, W, bias, A, B, scaling, dtype, dropout p, 4-bit quant state, A and B in dtype) -> y; W and bias
    frozen; gradients for x, A, B."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, cdt: torch.dtype, p: float | SeededDrop = 0.0,
                quant_state=None, copies: tuple | None = None) -> torch.Tensor:
        x2 = cast(x.reshape(-1, x.shape[-1]), cdt)
        y, low, mask, a, b = lora_linear_forward(x2, x.shape[:-1], weight, bias, lora_a, lora_b, scaling, p,
                                                 quant_state, copies)
        # x is often a norm's output: keep the norm's input, which its own backward keeps anyway, and rebuild x
        trains = lora_a.requires_grad or lora_b.requires_grad
        ctx.cdt = cdt
        ctx.save_for_backward(*rebuilt_inputs.saved_input(ctx, x, x2, trains), low, weight, a, b, mask)
        ctx.scaling, ctx.x_dtype, ctx.p, ctx.ab_dtypes = scaling, x.dtype, p, (lora_a.dtype, lora_b.dtype)
        ctx.quant_state = quant_state
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        inputs, (low, weight, a, b, mask) = rebuilt_inputs.split_saved(ctx, ctx.saved_tensors)
        x = rebuilt_inputs.restored_input(ctx, inputs)
        x2 = cast(x.reshape(-1, x.shape[-1]), ctx.cdt)
        needs = ctx.needs_input_grad
        dx, da, db = lora_linear_backward(dy, x2, low, weight, a, b, ctx.scaling, needs[0], needs[3],
                                          needs[4], mask, ctx.p, ctx.ab_dtypes, ctx.quant_state)
        if dx is not None:
            dx = cast(dx.view(*dy.shape[:-1], dx.shape[-1]), ctx.x_dtype)
        return dx, None, None, da, db, None, None, None, None, None


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype, without the call when it is already (a no-op `.to` still costs microseconds of host time,
    and a step makes dozens a layer)."""
    return t if t.dtype == dtype else t.to(dtype)


def op_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype an op on t computes in: autocast's where autocast is on for t's device, else t's own."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


def dense_weight(weight: torch.Tensor, quant_state, cdt: torch.dtype) -> torch.Tensor:
    """The base weight in cdt for the GEMMs (no copy when it is in cdt already); a 4-bit one (quant_state
    given) dequantized, as bitsandbytes' own training path does, once forward and once backward
    (studio/dequant_4bit.py: one kernel on CUDA)."""
    if quant_state is None:
        return cast(weight, cdt)
    return dense_4bit(weight, quant_state, cdt)


def dropout_mask(x2: torch.Tensor, p: float | SeededDrop) -> torch.Tensor | None:
    """Keep-mask of dropout with probability p (True = kept), one byte per element; None for a seeded
    dropout (studio/seeded_dropout.py), whose mask the seed regenerates."""
    if isinstance(p, SeededDrop):
        return None
    return torch.empty(x2.shape, dtype=torch.bool, device=x2.device).bernoulli_(1.0 - p)


def _dropped(x2: torch.Tensor, mask: torch.Tensor | None, p: float | SeededDrop, inplace: bool = False) -> torch.Tensor:
    """x2 with the dropout applied (the same ops, so the same values, either way); inplace: written over x2, a
    tensor of the caller's own (the backward's products), not a second one beside it."""
    if isinstance(p, SeededDrop):
        return p.apply(x2, inplace)
    if mask is None:
        return x2
    return (x2.mul_(mask) if inplace else x2 * mask).mul_(1.0 / (1.0 - p))


def lora_linear_forward(x2: torch.Tensor, lead: torch.Size, weight: torch.Tensor, bias: torch.Tensor | None,
                        lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, p: float | SeededDrop = 0.0,
                        quant_state=None, copies: tuple | None = None, output: bool = True) -> tuple:
    """y (shape lead + out) = x2 Wᵀ (+ b) + low Bᵀ, low = s · drop(x2) Aᵀ, all in x2's dtype; x2 is
    rows x in; W is 4-bit when quant_state is given; copies: A and B already in x2's dtype (the step's,
    studio/step_copies.py), else they are cast here. Returns y, low, the dropout keep-mask (None when p
    is 0) and A and B in x2's dtype, which the backward takes instead of casting again. output=False
    (a recomputation no one reads y of): y is left unwritten and W is not touched."""
    a, b = adapter_copies(lora_a, lora_b, x2.dtype, copies)
    mask = dropout_mask(x2, p) if p else None
    low = rank_r_input(x2, a, scaling, p, mask)
    if not output:
        return x2.new_empty(*lead, b.shape[0]), low, mask, a, b
    return base_plus_term(x2, lead, weight, bias, low, b, quant_state), low, mask, a, b


def base_plus_term(x2: torch.Tensor, lead: torch.Size, weight: torch.Tensor, bias: torch.Tensor | None,
                   low: torch.Tensor | None, b: torch.Tensor, quant_state=None) -> torch.Tensor:
    """y (shape lead + out) = x2 Wᵀ (+ bias) + low Bᵀ in x2's dtype, B in that dtype already; low may be a column
    slice of a wider rank-r input (studio/sibling_lora.py); low None: the base product alone, its term left to a
    consumer that adds it (studio/kernels/gated_terms.py)."""
    cdt = x2.dtype
    # the output is a fresh tensor written through a 2-D view: a view of it would be an output
    # autograd refuses to see modified in place later (and model code may do that)
    y = x2.new_empty(*lead, b.shape[0])
    y2 = y.view(-1, b.shape[0])
    w = dense_weight(weight, quant_state, cdt)
    if low is None:
        if bias is None:
            torch.mm(x2, w.t(), out=y2)
        else:
            torch.addmm(cast(bias, cdt), x2, w.t(), out=y2)
        return y
    # the rank-r term is written first and the base GEMM adds onto it (beta=1, read in its epilogue): adding it
    # after would read and write the whole output once more, and on the CPU in bf16 would round most of the
    # small term away against an output already rounded (cuBLAS rounds its product before adding, either way:
    # baselines/epilogue_check.py)
    bias_first = bias is not None and bias_joins_term(y2.device)
    if bias_first:
        torch.addmm(cast(bias, cdt), low, b.t(), out=y2)
    else:
        torch.mm(low, b.t(), out=y2)
    y2.addmm_(x2, w.t())
    if bias is not None and not bias_first:
        y2.add_(cast(bias, cdt))
    return y


def bias_joins_term(device: torch.device) -> bool:
    """Whether the bias is added to the rank-r term by its GEMM's epilogue (no pass of its own over the output)
    rather than last. On CUDA, whose base GEMM rounds its product before adding the term anyway, the term
    rounded beside the bias keeps no less of a small update than peft's order (the bias-free layers keep what
    peft's keep); on the CPU, whose base GEMM keeps the term whole, the bias comes last: joined first, it would
    round the term at its own scale (Qwen's q/k/v biases). STUDIO_BIAS_FIRST=0: last on CUDA too (A/B runs)."""
    return device.type == "cuda" and ab_switches.on("STUDIO_BIAS_FIRST")


def adapter_copies(lora_a: torch.Tensor, lora_b: torch.Tensor, cdt: torch.dtype, copies: tuple | None) -> tuple:
    """A and B in the compute dtype: the step's copies where given (studio/step_copies.py), else cast here."""
    return copies if copies is not None else (cast(lora_a, cdt), cast(lora_b, cdt))


def rank_r_input(x2: torch.Tensor, a: torch.Tensor, scaling: float, p: float | SeededDrop = 0.0,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """low = s · drop(x2) Aᵀ, kept for B's gradient (the scale rides in the GEMM, and low keeps it)."""
    return _scaled_mm(_dropped(x2, mask, p), a.t(), scaling)


def lora_linear_backward(dy: torch.Tensor, x2: torch.Tensor, low: torch.Tensor, weight: torch.Tensor,
                         lora_a: torch.Tensor, lora_b: torch.Tensor, s: float, need_x: bool, need_a: bool,
                         need_b: bool, mask: torch.Tensor | None = None, p: float | SeededDrop = 0.0,
                         ab_dtypes: tuple[torch.dtype, torch.dtype] | None = None, quant_state=None,
                         x2_own: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx as rows x in in x2's dtype, dA, dB) of lora_linear_forward; None where not needed. dA and dB come
    in ab_dtypes (the trained weights' dtypes, when lora_a and lora_b are their compute-dtype copies); a
    4-bit W (quant_state given) is dequantized only if dx is needed. x2_own: x2 is the caller's to overwrite
    (rebuilt for this backward), so its dropout is applied in place."""
    cdt = x2.dtype
    dy2 = cast(dy.reshape(-1, dy.shape[-1]), cdt)
    # s · dy B: with the scale in it (and in the forward's low), none of the products below needs one
    d_low = _scaled_mm(dy2, cast(lora_b, cdt), s)
    dx = None
    if need_x:  # as in the forward: the adapter's term first, the base GEMM adds onto it
        dx = _dropped(d_low @ cast(lora_a, cdt), mask, p, inplace=True)
        dx = dx.addmm_(dy2, dense_weight(weight, quant_state, cdt))
    a_dtype, b_dtype = ab_dtypes or (lora_a.dtype, lora_b.dtype)
    da = weight_grad_mm(d_low.t(), _dropped(x2, mask, p, inplace=x2_own), a_dtype) if need_a else None
    db = weight_grad_mm(dy2.t(), low, b_dtype) if need_b else None
    return dx, da, db


def _scaled_mm(m1: torch.Tensor, m2: torch.Tensor, s: float) -> torch.Tensor:
    """s · m1 @ m2 as one GEMM (beta=0: the placeholder input is never read, as torch.addmm documents)."""
    return torch.addmm(m1.new_empty(()), m1, m2, beta=0, alpha=s)


_OUT_DTYPE_OK: dict[tuple, bool] = {}


def weight_grad_mm(m1: torch.Tensor, m2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """m1 @ m2 in dtype (an adapter weight's gradient, fp32 from 16-bit operands): on CUDA the GEMM writes
    fp32 itself (torch.mm's out_dtype: fp32 accumulators stored as they are, and no cast kernel after);
    elsewhere, or where that op is missing, the 16-bit product is cast."""
    if m1.dtype == dtype:
        return m1 @ m2
    if out_dtype_ok(m1.device, m1.dtype, dtype):
        return torch.mm(m1, m2, out_dtype=dtype)
    return (m1 @ m2).to(dtype)


def out_dtype_ok(device: torch.device, src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether torch.mm(..., out_dtype=dst) runs on this CUDA device for src operands and agrees with the
    fp32 product; tried once per (device, dtypes), before any capture (the check reads the result)."""
    if device.type != "cuda":
        return False
    key = (device.type, device.index, src, dst)
    if key not in _OUT_DTYPE_OK:
        _OUT_DTYPE_OK[key] = probe_out_dtype(device, src, dst)
    return _OUT_DTYPE_OK[key]


def probe_out_dtype(device: torch.device, src: torch.dtype, dst: torch.dtype) -> bool:
    """One small product through torch.mm(..., out_dtype=dst), compared with the fp32 product."""
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        m1, m2 = (torch.randn(shape, generator=gen).to(device, src) for shape in ((96, 16), (96, 24)))
        m1, m2 = m1.t(), m2[:, 8:16]  # transposed, and a column slice (studio/sibling_lora.py), as the products take
        got = torch.mm(m1, m2, out_dtype=dst)
        want = m1.float() @ m2.float()
        return got.dtype == dst and bool(torch.allclose(got.float(), want, rtol=1e-3, atol=1e-3))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def fusable(base: nn.Module) -> bool:
    """A Linear whose weight and bias do not train: a plain 16/32-bit one, or a bitsandbytes 4-bit one in
    the packing its CUDA and CPU dequantization read (8-bit bases take the module path)."""
    if not (type(base) is nn.Linear or is_4bit(base)) or base.weight.requires_grad:
        return False
    return base.bias is None or not base.bias.requires_grad


def is_4bit(base: nn.Module) -> bool:
    weight = getattr(base, "weight", None)
    state = getattr(weight, "quant_state", None)
    return type(base).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4") and state is not None \
        and not getattr(state, "packing_format_for_cpu", False)


def compute_dtype(x: torch.Tensor, lora_a: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype the fused op computes in: autocast's, or the one all operands share; None: do not fuse.
    A 4-bit weight counts as the dtype it dequantizes to."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    state = getattr(weight, "quant_state", None)
    w_dtype = state.dtype if state is not None else weight.dtype
    return x.dtype if x.dtype == lora_a.dtype == w_dtype else None
