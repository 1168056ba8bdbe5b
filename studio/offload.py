"""Offloaded gradient checkpointing: the inputs of checkpointed layers wait in pinned CPU RAM.

With every layer checkpointed, what stays on the GPU between forward and backward is each layer's
input (batch x seq x hidden, 16-bit): 1.6 GB for a 7B model at 4 x 2048. Here those inputs are
copied to pinned host memory on a side CUDA stream while the next layer computes, and copied back
during backward one layer ahead of need: when layer k's input is unpacked (its recompute starts),
layer k-1's input is already on its way. The GPU then holds at most two layer inputs.

It is torch's own non-reentrant checkpoint with a saved-tensor hook around it. The checkpoint
saves only the layer's positional inputs through that hook (everything saved inside the layer goes
through the checkpoint's own hooks and is recomputed), so only the hidden states are offloaded;
keyword tensors (masks, rotary tables, trained prefixes) stay where they are, and gradients, RNG
and autocast replay are the checkpoint's. Tensors under `min_bytes` and tensors on devices not in
`devices` are kept as they are; tests pass devices=("cpu",) to run the same logic without a GPU.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint


class _Stored:
    """One offloaded tensor: the host copy, and the device copy while it is fetched back."""

    __slots__ = ("host", "device", "copied", "fetched", "arrived", "prev", "__weakref__")

    def __init__(self, host: torch.Tensor, device: torch.device, prev: "_Stored | None") -> None:
        self.host, self.device = host, device
        self.copied: Any = None    # CUDA event: the device -> host copy is done
        self.fetched: torch.Tensor | None = None
        self.arrived: Any = None   # CUDA event: the host -> device copy is done
        self.prev = weakref.ref(prev) if prev is not None else None


class CheckpointOffloader:
    """pack / unpack hooks that keep large saved tensors in host memory, prefetching in reverse order."""

    def __init__(self, min_bytes: int = 1 << 20, devices: tuple[str, ...] = ("cuda",)) -> None:
        self.min_bytes, self.devices = min_bytes, devices
        self._last: weakref.ref | None = None
        self._stream: Any = None
        self.offloaded_bytes = 0   # bytes currently held in host memory (for tests and reports)

    def _side_stream(self, device: torch.device) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    @torch.no_grad()
    def pack(self, t: torch.Tensor) -> Any:
        if t.device.type not in self.devices or t.numel() * t.element_size() < self.min_bytes:
            return t
        cuda = t.device.type == "cuda"
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda)
        prev = self._last() if self._last is not None else None
        stored = _Stored(host, t.device, prev)
        if cuda:
            side = self._side_stream(t.device)
            side.wait_stream(torch.cuda.current_stream(t.device))  # t is written on the compute stream
            with torch.cuda.stream(side):
                host.copy_(t, non_blocking=True)
                stored.copied = side.record_event()
            t.record_stream(side)  # the allocator may not reuse t's block until the copy is done
        else:
            host.copy_(t)
        self._last = weakref.ref(stored)
        self.offloaded_bytes += host.numel() * host.element_size()
        weakref.finalize(stored, self._release, host.numel() * host.element_size())
        return stored

    def _release(self, n: int) -> None:
        self.offloaded_bytes -= n

    @torch.no_grad()
    def _fetch(self, stored: _Stored) -> None:
        if stored.device.type != "cuda":
            stored.fetched = stored.host.to(stored.device, copy=True)
            return
        compute = torch.cuda.current_stream(stored.device)
        # allocated on the compute stream, where it is used; the side stream waits for that stream
        # so the copy cannot overwrite a freed block an earlier queued kernel still reads
        fetched = torch.empty(stored.host.shape, dtype=stored.host.dtype, device=stored.device)
        side = self._side_stream(stored.device)
        side.wait_stream(compute)
        side.wait_event(stored.copied)
        with torch.cuda.stream(side):
            fetched.copy_(stored.host, non_blocking=True)
            stored.arrived = side.record_event()
        fetched.record_stream(side)  # if it is dropped unused (an error in backward), the copy still finishes first
        stored.fetched = fetched

    def unpack(self, stored: Any) -> torch.Tensor:
        if not isinstance(stored, _Stored):
            return stored
        if stored.fetched is None:
            self._fetch(stored)
        if stored.arrived is not None:
            torch.cuda.current_stream(stored.device).wait_event(stored.arrived)
        out, stored.fetched, stored.arrived = stored.fetched, None, None  # a second backward fetches again
        prev = stored.prev() if stored.prev is not None else None
        if prev is not None and prev.fetched is None:
            self._fetch(prev)  # the layer below is next in backward
        return out

    def checkpoint_function(self) -> Callable:
        """A drop-in for transformers' `_gradient_checkpointing_func(fn, *args)`."""
        def offloaded_checkpoint(fn: Callable, *args: Any, **kwargs: Any) -> Any:
            kwargs["use_reentrant"] = False  # the reentrant variant does not save its inputs through hooks
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                return checkpoint(fn, *args, **kwargs)
        return offloaded_checkpoint
