"""Gradient checkpointing, whole or selective: recompute a chosen share of the decoder layers.

`train.checkpoint_fraction` = 1.0 recomputes every layer (least memory); 0.5 every other layer
(about half the recompute time for half the saving). The layers are spread evenly, and the memory
estimator reads the same choice from `checkpointed_layers`.
"""
from __future__ import annotations

from torch import nn


def checkpointed_layers(n_layers: int, fraction: float) -> list[bool]:
    """Which of n layers are recomputed in backward: round(n · fraction) of them, evenly spread."""
    fraction = min(max(fraction, 0.0), 1.0)
    return [int((k + 1) * fraction + 1e-9) > int(k * fraction + 1e-9) for k in range(n_layers)]


def enable_gradient_checkpointing(model: nn.Module, fraction: float = 1.0) -> list[bool]:
    """Turn on transformers' per-layer checkpointing (non-reentrant), then off again for the layers
    the fraction leaves out. Returns the per-layer choice."""
    from .methods.common import decoder_layers
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    layers = decoder_layers(model)
    chosen = checkpointed_layers(len(layers), fraction)
    for layer, on in zip(layers, chosen):
        if hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = on
    return chosen
