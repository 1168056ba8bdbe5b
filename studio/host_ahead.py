"""Keeping the trainer's host ahead of the GPU: batches copied without waiting, a step's numbers read a step late.

A CUDA step is queued by the host and run by the GPU later. Two things in a plain training loop make the
host wait for the GPU to finish, after which the GPU waits for the host (it logs, writes the run's
status, collates and copies the next batch, queues its first kernels):
- reading a value the step computed (`loss.item()`, the gradient norm): `StepReadings` copies them to
  the host without waiting and hands a step's event out once the next step has been queued, so that
  everything the host does between steps overlaps the GPU's work. Where the run needs the step's
  numbers at once (an evaluation, a checkpoint, the last step, a stop) the caller flushes.
- copying a batch from pageable memory, which waits for the GPU's queue to drain first: `to_device`
  stages it in pinned memory and copies it asynchronously.
On the CPU nothing runs ahead, and every event is ready at once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

READ_LATE_ON = {"cuda"}  # device types whose steps run behind the host (tests add "cpu" to run the late path)


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on device; to CUDA through pinned memory, without the host waiting for the copy."""
    def move(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if device.type == "cuda" and value.device.type == "cpu":
            return value.pin_memory().to(device, non_blocking=True)
        return value.to(device)
    return {k: move(v) for k, v in batch.items()}


@dataclass
class _Pending:
    event: dict
    copies: dict[str, torch.Tensor | None]  # the values, on their way to (or already on) the host
    done: Any  # a CUDA event recorded after the copies, or None
    tokens: int
    started: float  # perf_counter when the step started
    queued: float  # perf_counter when it was queued: its end, on a synchronous device


class StepReadings:
    """Step events whose device values (a 0-dim tensor each, or None) and throughput are filled in on the
    host once the step is done: at once where the device is synchronous, else after the next step was queued."""

    def __init__(self, device: torch.device):
        self.late = device.type in READ_LATE_ON
        self.pending: list[_Pending] = []

    def add(self, event: dict, values: dict[str, torch.Tensor | None], tokens: int, started: float) -> None:
        """The step's event (started at perf_counter `started`, `tokens` trained), whose `values` (device
        tensors) start their way to the host now."""
        copies, done = {}, None
        for key, value in values.items():
            if value is not None and value.device.type == "cuda":
                # lands in pinned host memory; the call returns before the copy is done, hence the event
                value, done = value.detach().reshape(()).to("cpu", non_blocking=True), torch.cuda.Event()
            elif value is not None:
                value = value.detach().reshape(()).clone()
            copies[key] = value
        if done is not None:
            done.record()
        self.pending.append(_Pending(event, copies, done, tokens, started, time.perf_counter()))

    def ready(self, flush: bool = False) -> list[dict]:
        """The events whose values can be read now, in step order, values and tokens_per_s filled in: all of
        them when reading late is off or `flush` is set, else all but the newest (still running on the device).
        A step lasts until the next one starts (or, the newest read late, until it is done): that is the rate
        the device keeps, which the host's time to queue a step alone is not."""
        keep = 1 if self.late and not flush else 0
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        following = out[1:] + self.pending
        for i, step in enumerate(out):
            if step.done is not None:
                step.done.synchronize()  # waits for that step only, not for the one queued after it
            end = following[i].started if i < len(following) else time.perf_counter() if self.late else step.queued
            step.event.update({k: None if v is None else float(v) for k, v in step.copies.items()})
            step.event["tokens_per_s"] = step.tokens / max(end - step.started, 1e-9)
        return [step.event for step in out]
