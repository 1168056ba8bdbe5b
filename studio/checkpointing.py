"""Gradient checkpointing, whole or selective: recompute a chosen share of the decoder layers.

`train.checkpoint_fraction` = 1.0 recomputes every layer, but the top one where the memory estimate says
keeping it costs nothing (memory.top_layer_kept_if_free); 0.5 the bottom half (about half the recompute time
for half the saving). The memory estimator reads the same choice from `checkpointed_layers`.
`train.checkpoint_budget_gb` picks the fraction instead: the fewest recomputed layers whose estimate fits
(memory.checkpoint_share gives the trainer either choice).
`train.offload_checkpoints` keeps the checkpointed layers' inputs in pinned CPU RAM on CUDA
(studio/offload.py).

A checkpointed layer's recomputation runs with the layer marked (`recomputing_layer`): the recompute
only has to rebuild what the layer's ops save for backward, and an op whose output nothing saves
(the gated MLP's down projection at the end of a Llama-style layer, studio/fused_mlp.py) can skip
its product there. Its first forward is marked too (`checkpointed_layer`), so that an op can save the same
tensors in both passes while choosing what they are (studio/chunked_mlp.py: the MLP's input only).
`compile_layers` (train.compile) compiles a checkpointed layer's parts inside its checkpoint, not the layer
around it.
"""
from __future__ import annotations

import functools
import threading
import weakref
from typing import Any, Callable

from torch import nn
from torch.utils.checkpoint import checkpoint

from .seeded_dropout import draws_unseeded

_state = threading.local()  # the backward (and so the recompute) of one graph runs on one thread


def checkpointed_layers(n_layers: int, fraction: float) -> list[bool]:
    """Which of n layers are recomputed in backward: the first round(n · fraction). Backward reaches the
    bottom layers last, after the kept layers above have freed what they held, so a recomputation there
    never adds to the peak (a recomputed top layer would: its rebuilt activations on top of all the kept
    ones)."""
    fraction = min(max(fraction, 0.0), 1.0)
    k = int(n_layers * fraction + 0.5)
    return [i < k for i in range(n_layers)]


def draws_at_random(model: nn.Module) -> bool:
    """Whether a training forward draws random numbers from torch's generator (a dropout with p > 0,
    attention dropout, a method's own draws: AdaMix's routing, diff pruning's gates, rank dropout), which
    a checkpoint's recomputation can only repeat by resetting it; draws that studio/seeded_dropout.py armed
    come from its seed instead."""
    if float(getattr(model.config, "attention_dropout", 0.0) or 0.0) > 0:
        return True
    return any(draws_unseeded(m) for m in model.modules())


def recomputing_layer() -> nn.Module | None:
    """The decoder layer whose checkpoint this thread is recomputing (in backward), else None."""
    ref = getattr(_state, "layer", None)
    return ref() if ref is not None else None


def checkpointed_layer() -> nn.Module | None:
    """The decoder layer whose checkpoint this thread is running: its first forward or its recomputation."""
    layer = recomputing_layer()
    if layer is not None:
        return layer
    ref = getattr(_state, "forward_layer", None)
    return ref() if ref is not None else None


class _Marked:
    """Marks a layer (in `_state.<attr>`) while entered; enterable again (a retained graph's second backward
    recomputes again)."""

    def __init__(self, ref: weakref.ref, attr: str = "layer") -> None:
        self.ref, self.attr, self.before = ref, attr, []

    def __enter__(self) -> None:
        self.before.append(getattr(_state, self.attr, None))
        setattr(_state, self.attr, self.ref)

    def __exit__(self, *exc: Any) -> None:
        setattr(_state, self.attr, self.before.pop())


def _contexts(ref: weakref.ref) -> tuple[Any, Any]:
    """torch checkpoint's context_fn: one mark around the first forward, another around the recomputation."""
    return _Marked(ref, "forward_layer"), _Marked(ref)


def layer_checkpoint(layer: nn.Module, preserve_rng: bool = True, offloader: Any = None,
                     mark: bool = True) -> Callable:
    """transformers' `_gradient_checkpointing_func(fn, *args)` for one layer: torch's non-reentrant
    checkpoint (the offloader's with one), whose recomputation marks the layer unless mark is False
    (train.compile: compiled code should not branch on a per-call flag). Without torch's determinism check, which
    records every saved tensor's shape, dtype and device in forward to compare them after the recomputation
    (host time: 7B QLoRA's 28 layers at test width, `python -m baselines.host_time --shape qwen2.5-7b --method
    qlora --ckpt`, 261 against 269 ms a step on this project's CPU; a 7B QLoRA step on an H200 kept the host
    nearly as busy as the GPU). torch still checks that the recomputation saves as many tensors as the forward,
    and the tests compare checkpointed gradients with unchecked ones."""
    kwargs: dict[str, Any] = {"use_reentrant": False, "preserve_rng_state": preserve_rng, "determinism_check": "none"}
    if mark:
        kwargs["context_fn"] = functools.partial(_contexts, weakref.ref(layer))
    return functools.partial(offloader.checkpoint_function() if offloader is not None else checkpoint, **kwargs)


def transformers_checkpointing(model: nn.Module, preserve_rng: bool = True) -> None:
    """Non-reentrant checkpointing of every layer, as a transformers user turns it on. preserve_rng=False
    skips saving and restoring the RNG state around each layer (only right for a forward without dropout;
    CUDA-graph capture cannot read that state on every torch)."""
    kwargs = {"use_reentrant": False} | ({} if preserve_rng else {"preserve_rng_state": False})
    if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.24 on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def enable_gradient_checkpointing(model: nn.Module, fraction: float = 1.0, offloader: Any = None,
                                  preserve_rng: bool = True, mark: bool = True) -> list[bool]:
    """Turn on transformers' per-layer checkpointing (non-reentrant), then off again for the layers
    the fraction leaves out; with an offloader (studio.offload.CheckpointOffloader) the checkpointed
    layers keep their inputs in host memory; mark: recomputations mark their layer (layer_checkpoint).
    Returns the per-layer choice."""
    from .methods.common import decoder_layers
    transformers_checkpointing(model, preserve_rng)
    if getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None) is not None:
        # transformers makes the embeddings' output require grad, which only the reentrant checkpoint
        # needs; with it the first layers would keep and compute input gradients no one uses
        model.disable_input_require_grads()
    model.config.use_cache = False
    layers = decoder_layers(model)
    chosen = checkpointed_layers(len(layers), fraction)
    for layer, on in zip(layers, chosen):
        if hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = on
            if on:
                layer._gradient_checkpointing_func = layer_checkpoint(layer, preserve_rng, offloader, mark)
    return chosen


def compile_layers(model: nn.Module, backend: str = "inductor") -> int:
    """torch.compile each decoder layer (regional: one compile serves identical layers, any length); of a
    checkpointed layer its attention and MLP instead, so that the checkpoint runs eagerly around compiled
    code. Compiled whole, such a layer traces the checkpoint into its own graph and keeps most of what it
    should recompute (a 4-layer Llama shape at 4 x 1024 on the CPU: 184 MB kept after forward against
    24 MB eager; the H200 bench, 0.5B: 5.2 against 1.6 GB). Returns how many modules were compiled."""
    from .methods.common import decoder_layers
    count = 0
    for layer in decoder_layers(model):
        parts = [getattr(layer, name, None) for name in ("self_attn", "mlp")]
        if getattr(layer, "gradient_checkpointing", False) and all(isinstance(p, nn.Module) for p in parts):
            targets = parts
        else:  # not checkpointed, or a layer of other names: the whole layer
            targets = [layer]
        for module in targets:
            module.compile(dynamic=True, backend=backend)
        count += len(targets)
    return count


def setup_checkpointing(model: nn.Module, train_cfg: Any, cpu: bool, graphs: bool = False,
                        fraction: float | None = None) -> str | None:
    """Apply train.gradient_checkpointing, checkpoint_fraction (or the given share of layers: the one
    train.checkpoint_budget_gb fitted) and offload_checkpoints to a model (graphs: its steps will be
    captured); returns a line for the user when a setting has no effect here."""
    t = train_cfg
    if not t.gradient_checkpointing:
        unused = [f"train.{name}" for name in ("offload_checkpoints", "checkpoint_budget_gb") if getattr(t, name)]
        if unused:
            return f"{' and '.join(unused)}: used only with train.gradient_checkpointing on, so ignored here."
        return None
    offloader = None
    if t.offload_checkpoints and not cpu:
        from .offload import CheckpointOffloader
        offloader = CheckpointOffloader()
    # a captured step has no RNG state to restore unless something in it is random
    enable_gradient_checkpointing(model, t.checkpoint_fraction if fraction is None else fraction, offloader,
                                  preserve_rng=not graphs or draws_at_random(model), mark=not t.compile)
    if t.offload_checkpoints and cpu:
        return "train.offload_checkpoints has no effect on the CPU: the layer inputs are in RAM already."
    if offloader is not None:
        return "The checkpointed layers' inputs wait in pinned CPU RAM (train.offload_checkpoints)."
    return None
