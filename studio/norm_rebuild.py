"""A fused RMSNorm's output, rebuilt in backward from the input the norm keeps, instead of kept twice.

A decoder layer's normalised hidden states feed q/k/v, and again (after the attention) gate/up. With LoRA
on those projections each fused LoRA op (methods/lora_fused.py) needs its input again in backward for A's
gradient, so autograd kept both normalised tensors: two rows x hidden tensors a layer, about an eighth of
what a Llama-shaped layer keeps (a seventh of a 7B Qwen layer at 4 x 2,048). The norm keeps its own input
for its backward anyway (studio/fused_norm.py), so an op that reads its output keeps that input instead (the
same storage: no bytes), and the first of those ops to run its backward rebuilds the output with the norm's
own forward (the same kernel or ops on the same input: bitwise the tensor the forward had), which the others
then share; the last one drops it. A norm forward costs one pass over its input, next to the layer's GEMMs.

Only an output nothing has changed in place since the norm wrote it is rebuilt; a norm that records no graph
(its input and weight need no grad) keeps nothing to rebuild from, and its readers keep their input as before.
Off inside torch.compile, which picks what to keep itself.
"""
from __future__ import annotations

import torch

_ATTR = "_studio_norm_source"


class NormOutput:
    """How to rebuild one norm call's output, shared by the ops that read it; holds no activation except the
    rebuilt output between the first and the last of its readers' backward in one backward pass (a retained
    graph's next pass rebuilds it again)."""

    __slots__ = ("weight", "weight_version", "eps", "gemma", "readers", "_out", "_pass", "_pending")

    def __init__(self, weight: torch.Tensor, eps: float, gemma: bool) -> None:
        self.weight, self.weight_version, self.eps, self.gemma = weight, weight._version, eps, gemma
        self.readers, self._out, self._pass, self._pending = 0, None, None, 0

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """The norm's output, from its input x (as the reader saved it); the pass's last reader leaves nothing held."""
        this_pass = torch._C._current_graph_task_id()
        if self._out is None or self._pass != this_pass:
            if self.weight._version != self.weight_version:
                raise RuntimeError("A norm weight needed to rebuild a normalised input for the backward was "
                                   "modified in place after the forward; run backward before changing it.")
            from .fused_norm import norm_forward
            self._out, self._pass, self._pending = norm_forward(x, self.weight, self.eps, self.gemma)[0], this_pass, \
                self.readers
        out = self._out
        self._pending -= 1
        if self._pending <= 0:
            self._out = None
        return out


def attach(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> None:
    """Mark y as the output of a fused norm of x whose graph keeps x (call only when y requires grad)."""
    if not torch.compiler.is_compiling():
        setattr(y, _ATTR, (x, y._version, NormOutput(weight, eps, gemma)))


def source(t: torch.Tensor) -> tuple[torch.Tensor, NormOutput] | None:
    """(the norm's input, its NormOutput) when t is a fused norm's output unchanged since, for a reader that will
    save the input and call NormOutput.output once in its backward; else None (the reader keeps t)."""
    if torch.compiler.is_compiling():
        return None
    found = getattr(t, _ATTR, None)
    if found is None:
        return None
    x, version, rebuild = found
    if t._version != version:
        return None
    rebuild.readers += 1
    return x, rebuild


def saved_input(ctx, x: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
    """What an autograd op that needs its input x again in backward saves for it: the norm's input when x is a
    fused norm's output (ctx then knows how to rebuild x), else `kept` (x as the op keeps it; by default x).
    Call it only from an op that records a graph (one of its inputs or parameters trains)."""
    src = source(x)
    ctx.norm_output = src[1] if src else None
    return src[0] if src else (x if kept is None else kept)


def restored_input(ctx, saved: torch.Tensor) -> torch.Tensor:
    """In backward: the input saved_input stood in for, rebuilt, or what it saved."""
    return saved if ctx.norm_output is None else ctx.norm_output.output(saved)
