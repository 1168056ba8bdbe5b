"""A few optimizer steps on one batch: the training loop the method tests share.

`protocol=True` runs the whole Method protocol as the trainer does (optimizer_groups, extra_loss,
on_step, after_optimizer_step); without it, a plain AdamW loop over the trainable parameters.
"""
from __future__ import annotations

from typing import Callable

import torch

from studio.losses import causal_lm_loss
from studio.methods import applied


def fit(model, batch: dict | Callable[[int], dict], steps: int, lr: float, loss_fn=causal_lm_loss,
        protocol: bool = False) -> tuple[list[float], torch.optim.Optimizer]:
    """Train `steps` steps on `batch` (or batch(step)); returns the losses and the optimizer (model left in train())."""
    info = applied(model) if protocol else None
    params = info.method.optimizer_groups(model, lr, 0.0) if protocol else \
        [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        loss, _ = loss_fn(model, batch(step) if callable(batch) else batch)
        extra = info.method.extra_loss(model) if protocol else None
        (loss + extra if extra is not None else loss).backward()
        if protocol:
            info.method.on_step(model, step, steps)
        opt.step()
        opt.zero_grad()
        if protocol:
            info.method.after_optimizer_step(model, step, steps)
        losses.append(loss.item())
    return losses, opt


def emulate_graph_capture(monkeypatch) -> list[int]:
    """Stand a re-running replay in for torch.cuda.CUDAGraph (the CPU cannot capture): capture runs the
    step once and zeroes the gradients (a real capture runs nothing); replay() re-runs it on the static
    batch and writes the outputs in place. Returns a list that grows by one per replay."""
    from studio.step_graph import GraphedMicroStep, capturing
    replays: list[int] = []

    class Rerun:
        def __init__(self, micro: GraphedMicroStep):
            self.micro = micro

        def replay(self) -> None:
            replays.append(1)
            with capturing(packed="position_ids" in self.micro.static):
                self.micro.out.copy_(self.micro.fn(self.micro.static))

    def record(self: GraphedMicroStep) -> Rerun:
        with capturing(packed="position_ids" in self.static):
            self.out = self.fn(self.static)
        self.zero_grads()
        return Rerun(self)

    monkeypatch.setattr(GraphedMicroStep, "record", record)
    return replays
