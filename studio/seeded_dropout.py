"""Every random draw of a training forward taken from one per-forward seed on the device (CUDA), armed by the trainer.

torch's dropout draws from the generator's running state. Under gradient checkpointing the recomputation
must draw the forward's numbers again, which torch does by saving the generator state and setting it back
on the host; whether a replayed CUDA graph repeats that is unknown, so such runs used to step eagerly.
Armed, each training forward of the model first writes a fresh random seed into one device buffer (an
op inside the forward, so a captured step draws a new one at every replay), and every draw site numbers
itself from (that seed, its site) through kernels/dropout.py:
- each nn.Dropout of the method's modules becomes a SeededDropout (LoRA's fused op reads the same (seed,
  site) from its lora_dropout): the backward regenerates the mask, so no one-byte mask per element is kept;
- each module with draws of its own (`seedable_draws()`: AdaMix's routing, diff pruning's gates, LoHa and
  LoKr's rank dropout) takes its uniform numbers from `uniform(module, shape)`.
The recomputation reads the same seed and draws the same numbers, and nothing resets a generator. Off the
CUDA path (the CPU, no Triton, a kernel that fails its first-use check) everything keeps torch's generator.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch
from torch import nn

from . import kernels


METHOD_MODULES = "studio.methods."  # the modules arm() may seed the dropouts of: ours, whose forward calls them


@dataclass(frozen=True)
class SeededDrop:
    """A dropout for one forward: probability p, the seed buffer and the dropout's site number; row0: the rows
    (of the last dimension's width) before the tensor it drops, which runs as a chunk of a larger one."""
    p: float
    seed: torch.Tensor
    site: int
    row0: int = 0

    def apply(self, t: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        from .kernels import dropout
        return dropout.apply(t, self.seed, self.site, self.p, self.row0 * t.shape[-1], inplace)


_chunk = threading.local()


@contextlib.contextmanager
def rows_from(row0: int):
    """Within: the seeded dropouts made here drop a chunk that starts at row `row0` of the whole batch's rows,
    with the whole batch's mask there (studio/chunked_mlp.py)."""
    before = getattr(_chunk, "row0", 0)
    _chunk.row0 = row0
    try:
        yield
    finally:
        _chunk.row0 = before


def _row0() -> int:
    return getattr(_chunk, "row0", 0)


def ready(device: torch.device) -> bool:
    """Whether the seeded kernel runs here and behaves as dropout (checked once per device)."""
    if not kernels.use_triton(torch.empty(0, device=device)):
        return False
    return kernels.checked(("seeded_dropout", str(device)), lambda: _check(device))


def _check(device: torch.device) -> bool:
    """Same seed and site: the same mask; another site: another; about p dropped; kept ones scaled exactly.
    Uniform draws: the same for the same (seed, site), in [0, 1), mean about 1/2."""
    from .kernels import dropout
    x = torch.ones(64, 1024, device=device)
    seed = torch.tensor(12345, dtype=torch.int64, device=device)
    a, b, other = dropout.apply(x, seed, 3, 0.25), dropout.apply(x, seed, 3, 0.25), dropout.apply(x, seed, 4, 0.25)
    kept = a != 0
    u = dropout.uniform((64, 1024), seed, 5)
    return bool(torch.equal(a, b) and not torch.equal(kept, other != 0)
                and abs(1 - kept.float().mean().item() - 0.25) < 0.02
                and torch.equal(a[kept], torch.full_like(a[kept], 1 / 0.75))
                and torch.equal(u, dropout.uniform((64, 1024), seed, 5))
                and 0 <= u.min().item() and u.max().item() < 1 and abs(u.mean().item() - 0.5) < 0.01)


def module_drop(module: nn.Module) -> float | SeededDrop:
    """A LoRA-like module's dropout for this forward: 0.0 (none, or not training), its p (torch's dropout),
    or a SeededDrop when the run armed it."""
    drop = getattr(module, "lora_dropout", None)
    if not (isinstance(drop, nn.Dropout) and drop.training and drop.p > 0):
        return 0.0
    seeded = getattr(drop, "seeded_drop", None)
    return SeededDrop(drop.p, *seeded, _row0()) if seeded is not None else drop.p


def uniform(module: nn.Module, shape: tuple[int, ...] | torch.Size, device: torch.device) -> torch.Tensor:
    """fp32 numbers in [0, 1) for one of the module's own draws in a training forward: from its (seed, site)
    when the run armed it, else from torch's generator."""
    rng = getattr(module, "seeded_rng", None)
    if rng is None:
        return torch.rand(shape, device=device)
    from .kernels import dropout
    return dropout.uniform(shape, *rng)


class SeededDropoutFn(torch.autograd.Function):
    """x -> x · keep / (1 - p) with the (seed, site) mask, regenerated for the gradient (SeededDropout)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, drop: SeededDrop) -> torch.Tensor:
        ctx.drop = drop
        return drop.apply(x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        return ctx.drop.apply(dy), None


def _draws_on_its_own(module: nn.Module) -> bool:
    """Whether a training forward of the module makes draws of its own (its seedable_draws())."""
    return callable(getattr(type(module), "seedable_draws", None)) and module.seedable_draws()


def draws_unseeded(module: nn.Module) -> bool:
    """Whether a training forward of the module draws from torch's generator: a dropout with p > 0, or
    draws of its own, that arm() did not give a seed."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p > 0 and getattr(module, "seeded_drop", None) is None
    return _draws_on_its_own(module) and getattr(module, "seeded_rng", None) is None


def draws_own(module: nn.Module) -> bool:
    """Whether a training forward of the module makes draws of its own (not a dropout's), seeded or not."""
    return not isinstance(module, nn.modules.dropout._DropoutNd) and _draws_on_its_own(module)


class SeededDropout(nn.Dropout):
    """An nn.Dropout that arm() gave a (seed, site) as .seeded_drop: its training mask comes from them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.p > 0:
            return SeededDropoutFn.apply(x, SeededDrop(self.p, *self.seeded_drop, _row0()))
        return super().forward(x)


def arm(model: nn.Module, device: torch.device) -> bool:
    """Give every draw site of the method a (seed buffer, site number): each nn.Dropout of the method's own
    modules with 0 < p < 1 becomes a SeededDropout (.seeded_drop), each module whose seedable_draws() is
    true gets .seeded_rng; then make each training forward of `model` draw a new seed first. False, with
    nothing changed, where there is no draw or the kernel cannot serve. The model's own dropouts stay
    torch's: its attention code may read a Dropout's p and draw inside a fused kernel instead of calling it
    (checkpointing.draws_at_random still sees them)."""
    drops = list(dict.fromkeys(child for m in model.modules() if type(m).__module__.startswith(METHOD_MODULES)
                               for child in m.children() if type(child) is nn.Dropout and 0 < child.p < 1))
    drawers = [m for m in model.modules() if _draws_on_its_own(m)]
    if not (drops or drawers) or not ready(device):
        return False
    seed = torch.zeros((), dtype=torch.int64, device=device)
    for site, module in enumerate(drops):
        module.__class__ = SeededDropout
        module.seeded_drop = (seed, site)
    for site, module in enumerate(drawers, start=len(drops)):
        module.seeded_rng = (seed, site)

    def draw(_module, _args):
        if model.training and torch.is_grad_enabled():
            seed.random_()  # in place: a captured step draws at every replay, a recomputation reads it
    # the embeddings run once a forward, outside any checkpointed layer (whose recomputation must not redraw)
    model.get_input_embeddings().register_forward_pre_hook(draw)
    return True
