"""4-bit weights dequantized in a checkpointed layer's recomputation, kept for that layer's backward.

A checkpointed QLoRA layer dequantizes each weight three times a step: for the forward, again in the
recomputation that backward starts with, and again for the input gradient's GEMM right after. Kept from the
recomputation (the layer's q/k/v/o/gate/up weights, 16-bit: ~330 MB on Qwen2.5-7B; down's product is skipped
there) until the backward takes each one, that third dequantization goes: on the H200 a 7B QLoRA step's host
spent ~120 µs on each of its 557 dequantizations, 196 of them in backward (2026-11-29). Only one layer's weights
are held at a time: a recomputation of another layer drops what is left. Off unless STUDIO_KEEP_DEQUANT=1, until
a GPU measures it (gpu_check.sh's keep stage); not inside a CUDA graph's capture.
"""
from __future__ import annotations

import functools
import os
import threading

import torch

from .checkpointing import recomputing_layer

class _Kept:
    """The weights kept now: those of one recomputed layer (its id), by their packed data's address."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.layer: int | None = None
        self.weights: dict[int, torch.Tensor] = {}


_kept = _Kept()


@functools.cache
def keep_enabled() -> bool:
    return os.environ.get("STUDIO_KEEP_DEQUANT", "0") == "1"


def _capturing(t: torch.Tensor) -> bool:
    # a graph must not read a tensor that only this dict keeps alive (nor keep one of its pool's)
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def remember(packed: torch.Tensor, weight: torch.Tensor) -> None:
    """Keep `weight`, dequantized from `packed`, if this is a layer's recomputation (for its backward)."""
    if not keep_enabled():
        return
    layer = recomputing_layer()
    if layer is None or _capturing(weight):
        return
    with _kept.lock:
        if _kept.layer != id(layer):  # another layer's leftovers (a weight whose input needs no gradient)
            _kept.weights, _kept.layer = {}, id(layer)
        _kept.weights[packed.data_ptr()] = weight


def take(packed: torch.Tensor) -> torch.Tensor | None:
    """The weight kept for `packed` by its layer's recomputation (handed out once), outside a recomputation."""
    if not _kept.weights or recomputing_layer() is not None or _capturing(packed):
        return None
    with _kept.lock:
        return _kept.weights.pop(packed.data_ptr(), None)


def forget() -> None:
    """Drop whatever is kept (a run's end: runner.release_memory)."""
    with _kept.lock:
        _kept.weights, _kept.layer = {}, None
