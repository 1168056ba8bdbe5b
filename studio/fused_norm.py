"""RMSNorm as one autograd op, swapped into the transformers norm modules whose formula we know.

transformers' RMSNorm is six to eight tensor ops, and autograd keeps an fp32 copy of the input plus
intermediates for each. Ours computes the same forward, op for op (the outputs are bitwise equal),
keeps only the input in its own dtype and the rsqrt per row (half the bytes under bf16), and writes
the backward directly: with x̂ = x·r, r = rsqrt(mean(x²) + eps) and u = d(loss)/d(x̂),
d(loss)/d(x) = r · (u − x̂ · mean(u ⊙ x̂)).

Two formulas cover the supported classes:
- "gemma": y = cast(x̂ · (1 + w)) in fp32 (Gemma, Gemma 2, Gemma 3, also their q/k norms);
- "llama": y = w · cast(x̂) (Llama, Qwen2, Qwen3, Mistral, Phi-3).
Only the module's forward is replaced (an instance attribute), so parameter names, state dicts and
method code that looks for norm modules by type are untouched. Other norm classes keep their code.
"""
from __future__ import annotations

import types

import torch
from torch import nn

GEMMA_NORMS = ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm")
LLAMA_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm", "Phi3RMSNorm")
# config model_type values whose norms are all of the classes above (the memory estimator's switch)
FUSED_NORM_MODEL_TYPES = ("gemma", "gemma2", "gemma3", "gemma3_text", "llama", "qwen2", "qwen3", "mistral", "phi3")


class FusedRMSNorm(torch.autograd.Function):
    """(x, weight, eps, gemma) -> y, as the transformers module computes it; gradients for x and weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        xhat = xf * r
        if gemma:
            y = xhat.mul_(1.0 + weight.float()).type_as(x)
        else:
            y = weight * xhat.to(x.dtype)
        ctx.save_for_backward(x, r, weight)
        ctx.eps, ctx.gemma = eps, gemma
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, r, weight = ctx.saved_tensors
        xhat = x.float() * r
        if ctx.gemma:
            u = dy.float() * (1.0 + weight.float())
        else:
            u = (dy * weight).float()
        dw = None
        if ctx.needs_input_grad[1]:
            scaled = xhat if ctx.gemma else xhat.to(x.dtype).float()
            dw = (dy.float() * scaled).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            dot = (u * xhat).mean(-1, keepdim=True)
            dx = u.sub_(xhat.mul_(dot)).mul_(r).to(x.dtype)
        return dx, dw, None, None


def _fused_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    gemma = self.studio_gemma_norm
    return FusedRMSNorm.apply(hidden_states, self.weight, self.eps if gemma else self.variance_epsilon, gemma)


def fusable_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    if name not in GEMMA_NORMS + LLAMA_NORMS or "forward" in vars(module):
        return False
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 1 and len(list(module.parameters())) == 1


def fuse_norms(model: nn.Module) -> int:
    """Swap the fused forward into every supported RMSNorm of `model`; returns how many."""
    count = 0
    for module in model.modules():
        if fusable_norm(module):
            module.studio_gemma_norm = type(module).__name__ in GEMMA_NORMS  # the formula, fixed per class
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count
