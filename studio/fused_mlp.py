"""The gated MLP's act(gate) · up as one autograd op, swapped into the transformers MLP modules we know.

transformers computes `down(act(gate(x)) * up(x))` as two ops: the activation keeps its input
(gate's output) and the product keeps both of its inputs (act(gate) and up), three rows x
intermediate tensors per layer, the largest activations of a decoder layer. Ours keeps gate and up
and recomputes act(gate) in the backward (one elementwise pass), so a layer saves a third less in
its MLP. The forward runs the same ops in the same dtype, so outputs are bitwise equal;
d(up) = dy · act(gate), d(gate) = act'(gate) · dy · up (aten's own activation backward).

Covered: SiLU (Llama, Qwen2/3, Mistral) and tanh-GELU (Gemma 1/2/3) MLPs with gate_proj / up_proj /
down_proj. Only the module's forward is replaced (an instance attribute): names, state dicts and
hooks on the projections are untouched. Other MLPs (Phi-3's fused gate_up_proj, other activations)
keep their code.
"""
from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F
from torch import nn

MLP_CLASSES = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP", "GemmaMLP", "Gemma2MLP", "Gemma3MLP")
# config model_type values whose MLPs are of the classes above (the memory estimator's switch), and their activations
FUSED_MLP_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "gemma3_text")
FUSED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


class GatedActivation(torch.autograd.Function):
    """(gate, up, kind) -> act(gate) * up with act = silu or tanh-gelu; gradients for gate and up."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        ctx.kind = kind
        return _act(gate, kind) * up

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        d_gate = d_up = None
        if ctx.needs_input_grad[1]:
            d_up = dy * _act(gate, ctx.kind)
        if ctx.needs_input_grad[0]:
            g = dy * up
            if ctx.kind == "silu":
                d_gate = torch.ops.aten.silu_backward(g, gate)
            else:
                d_gate = torch.ops.aten.gelu_backward(g, gate, approximate="tanh")
        return d_gate, d_up, None


def _act(x: torch.Tensor, kind: str) -> torch.Tensor:
    return F.silu(x) if kind == "silu" else F.gelu(x, approximate="tanh")


def activation_kind(act_fn: nn.Module) -> str | None:
    """silu / gelu_tanh for the activation modules transformers builds from a config; None for others."""
    name = type(act_fn).__name__
    if isinstance(act_fn, nn.SiLU) or name == "SiLUActivation":
        return "silu"
    inner = getattr(act_fn, "act", None)
    if name == "GELUTanh" and isinstance(inner, functools.partial) and inner.keywords.get("approximate") == "tanh":
        return "gelu_tanh"
    return None


def _fused_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(GatedActivation.apply(self.gate_proj(x), self.up_proj(x), self.studio_act_kind))


def fusable_mlp(module: nn.Module) -> bool:
    if type(module).__name__ not in MLP_CLASSES or "forward" in vars(module):
        return False
    return all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")) and \
        activation_kind(getattr(module, "act_fn", None)) is not None and \
        not module.act_fn._forward_hooks and not module.act_fn._forward_pre_hooks


def fuse_mlps(model: nn.Module) -> int:
    """Swap the fused forward into every supported gated MLP of `model`; returns how many."""
    count = 0
    for module in model.modules():
        if fusable_mlp(module):
            module.studio_act_kind = activation_kind(module.act_fn)
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count
