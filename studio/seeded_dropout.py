"""LoRA's (and AdaLoRA's) dropout drawn from a per-forward seed on the device (CUDA), armed by the trainer.

torch's dropout draws from the generator's running state. Under gradient checkpointing the recomputation
must draw the forward's masks again, which torch does by saving the generator state and setting it back
on the host; whether a replayed CUDA graph repeats that is unknown, so such runs used to step eagerly.
Armed, each training forward of the model first writes a fresh random seed into one device buffer (an
op inside the forward, so a captured step draws a new one at every replay), and each LoRA module masks
with (that seed, its site number) through kernels/dropout.py: the recomputation reads the same seed and
draws the same masks, the backward regenerates them (no one-byte mask per element kept), and nothing
resets a generator. Off the CUDA path (the CPU, no Triton, a kernel that fails its first-use check) the
modules keep torch's dropout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import kernels


@dataclass(frozen=True)
class SeededDrop:
    """A LoRA module's dropout for one forward: probability p, the seed buffer and the module's site."""
    p: float
    seed: torch.Tensor
    site: int

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        from .kernels import dropout
        return dropout.apply(t, self.seed, self.site, self.p)


def ready(device: torch.device) -> bool:
    """Whether the seeded kernel runs here and behaves as dropout (checked once per device)."""
    if not kernels.use_triton(torch.empty(0, device=device)):
        return False
    return kernels.checked(("seeded_dropout", str(device)), lambda: _check(device))


def _check(device: torch.device) -> bool:
    """Same seed and site: the same mask; another site: another; about p dropped; kept ones scaled exactly."""
    from .kernels import dropout
    x = torch.ones(64, 1024, device=device)
    seed = torch.tensor(12345, dtype=torch.int64, device=device)
    a, b, other = dropout.apply(x, seed, 3, 0.25), dropout.apply(x, seed, 3, 0.25), dropout.apply(x, seed, 4, 0.25)
    kept = a != 0
    return bool(torch.equal(a, b) and not torch.equal(kept, other != 0)
                and abs(1 - kept.float().mean().item() - 0.25) < 0.02
                and torch.equal(a[kept], torch.full_like(a[kept], 1 / 0.75)))


def module_drop(module: nn.Module) -> float | SeededDrop:
    """A LoRA-like module's dropout for this forward: 0.0 (none, or not training), its p (torch's dropout),
    or a SeededDrop when the run armed it (module.seeded_drop)."""
    drop = getattr(module, "lora_dropout", None)
    if not (isinstance(drop, nn.Dropout) and drop.training and drop.p > 0):
        return 0.0
    seeded = getattr(module, "seeded_drop", None)
    return SeededDrop(drop.p, *seeded) if seeded is not None else drop.p


def dropped(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x through the module's lora_dropout: from the run's seed when armed, else torch's dropout."""
    drop = module_drop(module)
    return SeededDropoutFn.apply(x, drop) if isinstance(drop, SeededDrop) else module.lora_dropout(x)


class SeededDropoutFn(torch.autograd.Function):
    """x -> x · keep / (1 - p) with the (seed, site) mask, regenerated for the gradient (the LoRA modules
    that do not run as one fused op)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, drop: SeededDrop) -> torch.Tensor:
        ctx.drop = drop
        return drop.apply(x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        return ctx.drop.apply(dy), None


def arm(model: nn.Module, device: torch.device) -> bool:
    """Number the model's modules that can seed their dropout (class attribute seeds_its_dropout; LoRA
    layers) and have one, give each (seed buffer, site) as .seeded_drop, mark their nn.Dropout seeded
    (checkpointing.has_dropout skips it), and make each training forward of `model` draw a new seed
    first. False, with nothing changed, where there is none or the kernel cannot serve."""
    modules = [m for m in model.modules() if getattr(type(m), "seeds_its_dropout", False)
               and isinstance(getattr(m, "lora_dropout", None), nn.Dropout) and m.lora_dropout.p > 0]
    if not modules or not ready(device):
        return False
    seed = torch.zeros((), dtype=torch.int64, device=device)
    for site, module in enumerate(modules):
        module.seeded_drop = (seed, site)
        module.lora_dropout.seeded = True

    def draw(_module, _args):
        if model.training and torch.is_grad_enabled():
            seed.random_()  # in place: a captured step draws at every replay, a recomputation reads it
    # the embeddings run once a forward, outside any checkpointed layer (whose recomputation must not redraw)
    model.get_input_embeddings().register_forward_pre_hook(draw)
    return True
