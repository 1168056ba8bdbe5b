"""Inputs rebuilt in backward from what their producer keeps anyway, instead of kept a second time.

A decoder layer's normalised hidden states feed q/k/v, and again (after the attention) gate/up; the gated MLP's
act(gate)·up feeds down_proj. An adapter op on those projections needs its input again in backward (A's
gradient, d(ΔW) = dyᵀ x), so autograd kept it: two rows x hidden tensors and a rows x intermediate one a layer,
about a seventh of what a Llama-shaped layer keeps without them. Their producers keep their own inputs for their
own backward anyway: the fused RMSNorm its input (studio/fused_norm.py), the gated product gate and up
(studio/fused_mlp.py). So an op reading such an output keeps those inputs instead (the same storages: no bytes),
and the first of its readers to run backward rebuilds the output with the producer's own forward (the same kernel
or ops on the same inputs: bitwise the tensor the forward had), which the others then share; the last one drops
it. A norm or a gated product is one pass over its inputs, next to the layer's GEMMs.

Only an output nothing has changed in place since it was made is rebuilt; a producer that records no graph keeps
nothing to rebuild from, and its readers keep their input as before. Off inside torch.compile, which picks what to
keep itself. Readers: the fused LoRA op (methods/lora_fused.py), the rebuilt-ΔW op (methods/delta_product.py) and
DoRA's / AdaLoRA's A product (methods/dropped_input.py).
"""
from __future__ import annotations

import torch

_ATTR = "_studio_rebuild_source"


class Rebuild:
    """How to rebuild one output from its producer's inputs, shared by the ops that read it; holds no activation
    except the rebuilt output between the first and the last of its readers' backward in one backward pass (a
    retained graph's next pass rebuilds it again)."""

    __slots__ = ("readers", "_out", "_pass", "_pending")

    def __init__(self) -> None:
        self.readers, self._out, self._pass, self._pending = 0, None, None, 0

    def output(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The output, from the producer's inputs (as the reader saved them); the pass's last reader leaves nothing
        held."""
        this_pass = torch._C._current_graph_task_id()
        if self._out is None or self._pass != this_pass:
            self._out, self._pass, self._pending = self._make(*inputs), this_pass, self.readers
        out = self._out
        self._pending -= 1
        if self._pending <= 0:
            self._out = None
        return out

    def _make(self, *inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class NormOutput(Rebuild):
    """A fused RMSNorm's output, from its input."""

    __slots__ = ("weight", "weight_version", "eps", "gemma")

    def __init__(self, weight: torch.Tensor, eps: float, gemma: bool) -> None:
        super().__init__()
        self.weight, self.weight_version, self.eps, self.gemma = weight, weight._version, eps, gemma

    def _make(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight._version != self.weight_version:
            raise RuntimeError("A norm weight needed to rebuild a normalised input for the backward was "
                               "modified in place after the forward; run backward before changing it.")
        from .fused_norm import norm_forward
        return norm_forward(x, self.weight, self.eps, self.gemma)[0]


class GatedOutput(Rebuild):
    """The gated MLP's act(gate)·up, from gate and up."""

    __slots__ = ("kind",)

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def _make(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        from .fused_mlp import gated
        return gated(gate, up, self.kind)


def attach(y: torch.Tensor, inputs: tuple[torch.Tensor, ...], rebuild: Rebuild) -> None:
    """Mark y as made from `inputs` by an op whose graph keeps them (call only when y requires grad)."""
    if not torch.compiler.is_compiling():
        setattr(y, _ATTR, (inputs, y._version, rebuild))


def source(t: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], Rebuild] | None:
    """(the producer's inputs, its Rebuild) when t is a marked output unchanged since, for a reader that will save
    the inputs and call Rebuild.output once in its backward; else None (the reader keeps t)."""
    if torch.compiler.is_compiling():
        return None
    found = getattr(t, _ATTR, None)
    if found is None:
        return None
    inputs, version, rebuild = found
    if t._version != version:
        return None
    rebuild.readers += 1
    return inputs, rebuild


def saved_input(ctx, x: torch.Tensor, kept: torch.Tensor | None = None, rebuild: bool = True) -> tuple:
    """What an autograd op that needs its input x again in backward saves for it (splat into save_for_backward,
    first): the producer's inputs when x is a marked output (ctx then knows how to rebuild x), else `kept` (x as the
    op keeps it; by default x). rebuild=False keeps x as given; rebuild only from an op that records a graph (one
    of its inputs or parameters trains)."""
    src = source(x) if rebuild else None
    ctx.input_rebuild = src[1] if src else None
    out = src[0] if src else ((x if kept is None else kept),)
    ctx.input_count = len(out)
    return out


def split_saved(ctx, saved: tuple) -> tuple[tuple, tuple]:
    """In backward: (what saved_input saved, the op's other saved tensors)."""
    return saved[:ctx.input_count], saved[ctx.input_count:]


def restored_input(ctx, inputs: tuple) -> torch.Tensor:
    """In backward, once: the input saved_input stood in for, rebuilt, or what it saved."""
    return inputs[0] if ctx.input_rebuild is None else ctx.input_rebuild.output(*inputs)
