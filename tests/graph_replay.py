"""A CUDA graph's replay semantics on the CPU: record a step's operations once, then re-issue exactly those.

A captured graph replays the kernels its capture launched, on the same buffers, with every host value
(a Python int, a shape, a random choice, an `if` taken) frozen as it was at capture. What the host
would decide differently on a later step is silently not done. `RecordedStep` reproduces that: capture
records the aten operations (forward, autograd's backward, gradient accumulation) under a dispatch
mode; each replay re-runs the recorded operations on the recorded tensors, writing functional results
into the captured outputs, and no Python of the model runs. A method whose replayed training follows
its eager training is safe to capture (as far as its arithmetic goes); `would_not_capture` lists the
operations a real capture refuses or that read the device from the host.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# operations that make the host wait for the device (a real capture fails on them) or copy host data in
HOST_BOUND = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "unique_dim", "_unique2",
              "unique_consecutive", "bincount", "repeat_interleave", "lift_fresh"}


def _is_view(func) -> bool:
    schema = func._schema
    return not schema.is_mutable and any(r.alias_info is not None for r in schema.returns)


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, tuple, dict, Any]] = []
        self.host_bound: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in HOST_BOUND and not (name == "lift_fresh" and out.numel() == 0):  # an empty one copies nothing
            self.host_bound.add(name)
        if not _is_view(func):  # a view's alias stays an alias of the same buffer: nothing to re-issue
            self.ops.append((func, args, kwargs, out))
        return out


class RecordedStep:
    """fn's operations, recorded while fn runs once, re-issued by replay()."""

    def __init__(self, fn, *args) -> None:
        recorder = _Recorder()
        with recorder:
            self.out = fn(*args)
        self.ops, self.would_not_capture = recorder.ops, sorted(recorder.host_bound)

    @torch.no_grad()  # what the recording did, autograd's backward included, not a new graph of it
    def replay(self) -> None:
        for func, args, kwargs, out in self.ops:
            result = func(*args, **kwargs)
            if func._schema.is_mutable:
                continue  # in place or out=: the recorded buffers got the new values
            for dst, src in zip(tree_flatten(out)[0], tree_flatten(result)[0]):
                if isinstance(dst, torch.Tensor) and dst is not src:
                    dst.copy_(src)


def emulate_strict_graph_capture(monkeypatch) -> list[list[str]]:
    """GraphedMicroStep captures by recording and replays by re-issuing the recording (RecordedStep).
    Returns a list that gets, per capture, the host-bound operations a real capture would trip on."""
    from studio.step_graph import GraphedMicroStep, capturing
    captures: list[list[str]] = []

    def record(self: GraphedMicroStep) -> RecordedStep:
        with capturing(packed="position_ids" in self.static):
            step = RecordedStep(self.fn, self.static)
        self.out = step.out
        captures.append(step.would_not_capture)
        self.zero_grads()  # a real capture computes nothing: the recording's gradients are dropped
        return step

    real_capture = GraphedMicroStep.capture

    def capture(self: GraphedMicroStep, batch: dict) -> None:
        # the warm-up and the recording draw random numbers an eager run does not: put the generator back,
        # so that replays draw what the eager steps draw (a run with dropout can be compared with one)
        state = torch.get_rng_state()
        real_capture(self, batch)
        torch.set_rng_state(state)

    monkeypatch.setattr(GraphedMicroStep, "record", record)
    monkeypatch.setattr(GraphedMicroStep, "capture", capture)
    return captures
