"""A checkpointed layer's gated MLP run in row chunks that keep only its input.

In a recomputed (checkpointed) layer the MLP's widest tensors, gate's and up's outputs (rows x intermediate
each) and then their gradients, exist for all rows at once while the layer's backward runs; at long sequences
they set the step's peak (Qwen2.5-7B, LoRA at 1 x 16,384: about 3 GiB of its 3.7 GiB backward buffers).
Where rows x intermediate exceeds MLP_CHUNK_ELEMENTS, such an MLP runs as one op (DeferredMLP) that saves
only its input x:
- the layer's first forward computes the MLP's output a chunk of rows at a time, its graph keeping nothing;
- the layer's recomputation skips the MLP: in a Llama-style layer its output only feeds the residual add,
  which saves nothing (as for fused_mlp's down projection), so the op saves x and returns a placeholder;
- the op's backward runs the MLP again, a chunk at a time, with a graph and with fused_mlp skipping down's
  product, and takes that chunk's gradients: one chunk's intermediates are alive at a time.
gate's and up's products run once in forward and once in backward, down's in forward, as in the unchunked
recomputed layer: no GEMM work is added, and chunks hold at least MLP_CHUNK_ELEMENTS / 2 elements (7B: 7,000
rows), large enough to keep the GEMMs efficient. The chunk's gradients come from the same ops as the
unchunked MLP's (the weights' gradients summed chunk by chunk).

Dropout inside the MLP draws the same masks in a chunk's two runs (DeferredMLP); on CUDA, seeded, they are the
unchunked run's masks. Not used (the MLP runs as before) where a module in the MLP makes draws of its own
(AdaMix's routing, diff pruning's gates, rank dropout: one draw a step, which each chunk would draw again from
torch's generator), where hooks or wrappers sit on it or its modules, where its base weights train (their
gradient would be built once a chunk), under torch.compile (no marks), in a captured CUDA graph, with several
processes (DDP marks a gradient ready once a backward), and where nothing in it needs grad. Gemma 2/3 normalise
the MLP's output before the residual add: there the op runs that norm too (so nothing outside it reads the MLP's
output; its run in backward computes down's product, which the norm reads, as the whole layer's recomputation
does). The memory estimator applies the same rule (`defers` on its meta model, `mlp_chunks`).
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable

import torch
from torch import nn

from .checkpointing import checkpointed_layer, recomputing_layer
from .seeded_dropout import draws_own, draws_unseeded, rows_from

# rows x intermediate above which a recomputed layer's MLP runs in chunks (2^28: 512 MiB per tensor in 16 bits);
# Qwen2.5-7B at 4 x 2,048 (155M) stays whole, at 1 x 16,384 (310M) runs in two chunks of 8,192 rows
MLP_CHUNK_ELEMENTS = 1 << 28
# decoder layers whose MLP output goes straight into the residual add (Gemma 2/3 normalise it first)
OUTPUT_TO_RESIDUAL_LAYERS = ("LlamaDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer", "MistralDecoderLayer",
                             "GemmaDecoderLayer")
# decoder layers that normalise the MLP's output (post_feedforward_layernorm) before the residual add: the deferred
# op runs that norm too, and the norm module passes the op's output on
POST_NORM_LAYERS = ("Gemma2DecoderLayer", "Gemma3DecoderLayer")
# their config model types (the memory estimator's switch)
DEFERRED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "gemma3_text")

_state = threading.local()


def mlp_chunks(rows: int, intermediate: int) -> int:
    """How many row chunks a deferred MLP of `rows` rows runs in; 1: it runs whole (as before)."""
    return max(1, -(-rows * intermediate // MLP_CHUNK_ELEMENTS))


@contextlib.contextmanager
def kept_whole():
    """Within: every MLP runs whole, whatever its rows (the A/B rows of `bench --long-grid`)."""
    global MLP_CHUNK_ELEMENTS
    before, MLP_CHUNK_ELEMENTS = MLP_CHUNK_ELEMENTS, 1 << 62
    try:
        yield
    finally:
        MLP_CHUNK_ELEMENTS = before


def running_deferred() -> bool:
    """Whether this thread is inside a deferred MLP's own run of its chunks (forward or backward)."""
    return getattr(_state, "run", None) is not None


def run_skips_output() -> bool:
    """Inside a deferred MLP's run: whether nothing reads the MLP's output (its run in backward, no norm after
    it), so that fused_mlp skips down's product."""
    return bool(getattr(_state, "run", None))


def post_norm(layer: nn.Module) -> nn.Module | None:
    """The norm a layer applies to its MLP's output before the residual add (Gemma 2/3), else None."""
    return getattr(layer, "post_feedforward_layernorm", None) if type(layer).__name__ in POST_NORM_LAYERS else None


def defers(layer: nn.Module, mlp: nn.Module) -> bool:
    """Whether `mlp`, the MLP of decoder layer `layer`, may run deferred when its layer is checkpointed (the
    structural half of the rule; the rows and the run's state decide each call)."""
    if getattr(layer, "mlp", None) is not mlp:
        return False
    if type(layer).__name__ in POST_NORM_LAYERS:
        norm = post_norm(layer)  # fused_norm's own: it passes the op's output on (studio/fused_norm.py)
        if not isinstance(norm, nn.Module) or "studio_gemma_norm" not in vars(norm) or \
                norm._forward_hooks or norm._forward_pre_hooks:
            return False
    elif type(layer).__name__ not in OUTPUT_TO_RESIDUAL_LAYERS:
        return False
    # fused_mlp's own (not a wrapper, which may pass attribute reads on to what it wraps)
    if "studio_act_kind" not in vars(mlp) or not isinstance(vars(mlp).get("intermediate_size"), int):
        return False
    modules = list(mlp.modules())
    if any(m._forward_hooks or m._forward_pre_hooks for m in modules) or any(draws_own(m) for m in modules):
        return False
    projections = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    for proj in projections:
        weight = getattr(getattr(proj, "base_layer", proj), "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.requires_grad:
            return False
    return True


def chunks_for(mlp: nn.Module, x: torch.Tensor) -> int:
    """Row chunks this call of a fused MLP runs deferred in; 0: it runs as usual (the cheap tests first: this
    runs in every layer's forward)."""
    if torch.compiler.is_compiling() or running_deferred() or not torch.is_grad_enabled():  # compiled: no marks either
        return 0
    n = mlp_chunks(x.numel() // x.shape[-1], getattr(mlp, "intermediate_size", 0) or 0)
    layer = checkpointed_layer() if n > 1 else None
    if layer is None or not defers(layer, mlp):
        return 0
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return 0
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1:
        return 0
    if not (x.requires_grad or any(p.requires_grad for p in mlp.parameters())):
        return 0
    return n


def run_deferred(mlp: nn.Module, x: torch.Tensor, chunks: int, forward: Callable) -> torch.Tensor:
    """The MLP's output through DeferredMLP; forward(mlp, x) is its usual (fused) forward. In a Gemma 2/3 layer the
    op's output is already normalised, and marked so that the layer's post-MLP norm passes it on."""
    rows = x.numel() // x.shape[-1]
    norm = post_norm(checkpointed_layer())
    params = [p for m in (mlp, norm) if m is not None for p in m.parameters() if p.requires_grad]
    unseeded = any(draws_unseeded(m) for m in mlp.modules())
    if norm is None:
        run = functools.partial(forward, mlp)
    else:
        def run(t: torch.Tensor) -> torch.Tensor:
            return norm(forward(mlp, t))
    out = DeferredMLP.apply(x, run, -(-rows // chunks), recomputing_layer() is not None, unseeded, norm is None,
                            *params)
    if norm is not None:
        out.studio_normed_by = norm
    return out


class DeferredMLP(torch.autograd.Function):
    """(x, run, chunk rows, recomputing, unseeded, output unread, *the trained parameters run reaches) -> run(x),
    computed a chunk of rows at a time, its graph keeping nothing (recomputing: not at all, a placeholder); saves
    x only. Its backward runs `run` again on each chunk with a graph (output unread: fused_mlp skips down's
    product) and backpropagates that chunk: x's gradient returned, the parameters' gradients accumulated in place
    (as a reentrant checkpoint does). Dropout draws the same masks in both runs of a chunk: a seeded one takes the
    whole batch's mask at the chunk's rows (seeded_dropout.rows_from); one from torch's generator (unseeded)
    starts each chunk's run again from the generator state of its forward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, run: Callable, chunk: int, recomputing: bool, unseeded: bool,
                output_unread: bool, *params: torch.Tensor):
        ctx.save_for_backward(x)
        ctx.run, ctx.chunk, ctx.autocast = run, chunk, _autocast_state(x.device.type)
        ctx.output_unread = output_unread
        ctx.rng_states = []
        if recomputing:
            return x.new_empty(x.shape)
        flat = x.detach().reshape(-1, x.shape[-1])
        out = None
        # the backward's code path (some ops take another without grad: a 4-bit base's LoRA, IA3), its graph keeping
        # nothing; no cast cache: a 16-bit copy made here would serve the backward's casts
        with _autocast(ctx.autocast, cache=False), torch.enable_grad(), _running(output_unread=False), \
                torch.autograd.graph.saved_tensors_hooks(_discard, _discarded):
            for i in range(0, flat.shape[0], chunk):
                if unseeded:
                    ctx.rng_states.append(_rng_state(x.device))
                with rows_from(i):
                    y = run(flat[i:i + chunk].unsqueeze(0).requires_grad_(x.requires_grad))[0].detach()
                if out is None:
                    out = y.new_empty(flat.shape[0], y.shape[-1])
                out[i:i + chunk] = y
                del y
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, = ctx.saved_tensors
        flat, dflat = x.detach().reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        need_x = ctx.needs_input_grad[0]
        dx = torch.empty_like(flat) if need_x else None
        states = ctx.rng_states
        devices = [x.device] if x.is_cuda else []
        with torch.enable_grad(), _autocast(ctx.autocast, cache=True), _running(ctx.output_unread), \
                torch.random.fork_rng(devices, enabled=bool(states)):
            for k, i in enumerate(range(0, flat.shape[0], ctx.chunk)):
                if states:
                    _set_rng_state(x.device, states[k])
                xc = flat[i:i + ctx.chunk].unsqueeze(0).requires_grad_(need_x)
                with rows_from(i):
                    y = ctx.run(xc)
                    if y.requires_grad:
                        torch.autograd.backward(y, dflat[i:i + ctx.chunk].unsqueeze(0).to(y.dtype))
                if need_x:
                    dx[i:i + ctx.chunk] = xc.grad[0] if xc.grad is not None else 0
                del y, xc
        n_params = len(ctx.needs_input_grad) - 6
        return (dx.view_as(x) if need_x else None), None, None, None, None, None, *([None] * n_params)


def _discard(_t: torch.Tensor) -> None:
    return None


def _discarded(_packed: None) -> torch.Tensor:
    raise RuntimeError("a deferred MLP's forward keeps nothing for a backward (studio/chunked_mlp.py)")


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype] | None:
    if not torch.is_autocast_enabled(device_type):
        return None
    return device_type, torch.get_autocast_dtype(device_type)


def _autocast(state: tuple | None, cache: bool) -> Any:
    """Autocast as the forward had it (the backward runs outside it on CUDA), or nothing."""
    if state is None:
        return contextlib.nullcontext()
    device_type, dtype = state
    return torch.autocast(device_type, dtype=dtype, cache_enabled=cache)


@contextlib.contextmanager
def _running(output_unread: bool):
    before = getattr(_state, "run", None)
    _state.run = output_unread
    try:
        yield
    finally:
        _state.run = before
