"""Gradient checkpointing, whole or selective: recompute a chosen share of the decoder layers.

`train.checkpoint_fraction` = 1.0 recomputes every layer (least memory); 0.5 every other layer
(about half the recompute time for half the saving). The layers are spread evenly, and the memory
estimator reads the same choice from `checkpointed_layers`. `train.offload_checkpoints` keeps the
checkpointed layers' inputs in pinned CPU RAM on CUDA (studio/offload.py).
"""
from __future__ import annotations

from typing import Any

from torch import nn


def checkpointed_layers(n_layers: int, fraction: float) -> list[bool]:
    """Which of n layers are recomputed in backward: round(n · fraction) of them, evenly spread."""
    fraction = min(max(fraction, 0.0), 1.0)
    return [int((k + 1) * fraction + 1e-9) > int(k * fraction + 1e-9) for k in range(n_layers)]


def has_dropout(model: nn.Module) -> bool:
    """Whether a training forward draws random numbers (a dropout with p > 0, or attention dropout)."""
    if float(getattr(model.config, "attention_dropout", 0.0) or 0.0) > 0:
        return True
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


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
                                  preserve_rng: bool = True) -> list[bool]:
    """Turn on transformers' per-layer checkpointing (non-reentrant), then off again for the layers
    the fraction leaves out; with an offloader (studio.offload.CheckpointOffloader) the checkpointed
    layers keep their inputs in host memory. Returns the per-layer choice."""
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
            if on and offloader is not None:
                layer._gradient_checkpointing_func = offloader.checkpoint_function()
    return chosen


def setup_checkpointing(model: nn.Module, train_cfg: Any, cpu: bool) -> str | None:
    """Apply train.gradient_checkpointing, checkpoint_fraction and offload_checkpoints to a model;
    returns a line for the user when a setting has no effect here."""
    t = train_cfg
    if not t.gradient_checkpointing:
        if t.offload_checkpoints:
            return "train.offload_checkpoints only applies with train.gradient_checkpointing on; it is ignored."
        return None
    offloader = None
    if t.offload_checkpoints and not cpu:
        from .offload import CheckpointOffloader
        offloader = CheckpointOffloader()
    # a captured step (train.cuda_graphs) has no RNG state to restore unless something in it is random
    enable_gradient_checkpointing(model, t.checkpoint_fraction, offloader,
                                  preserve_rng=not t.cuda_graphs or has_dropout(model))
    if t.offload_checkpoints and cpu:
        return "train.offload_checkpoints has no effect on the CPU: the layer inputs are in RAM already."
    if offloader is not None:
        return "The checkpointed layers' inputs wait in pinned CPU RAM (train.offload_checkpoints)."
    return None
