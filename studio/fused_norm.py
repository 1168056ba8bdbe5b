"""RMSNorm as one autograd op, swapped into the transformers norm modules whose formula we know.

transformers' RMSNorm is six to eight tensor ops, and autograd keeps an fp32 copy of the input plus
intermediates for each. Ours computes the same forward, op for op (the outputs are bitwise equal;
on CUDA with Triton, one kernel each way, equal up to the order of the row sum),
keeps only the input in its own dtype and the rsqrt per row (half the bytes under bf16; and the fused
ops that read the output keep that input instead of it, studio/rebuilt_inputs.py), and writes the
backward directly: with x̂ = x·r, r = rsqrt(mean(x²) + eps) and u = d(loss)/d(x̂),
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

from .rebuilt_inputs import NormOutput, attach

GEMMA_NORMS = ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm")
LLAMA_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm", "Phi3RMSNorm")
# config model_type values whose norms are all of the classes above (the memory estimator's switch)
FUSED_NORM_MODEL_TYPES = ("gemma", "gemma2", "gemma3", "gemma3_text", "llama", "qwen2", "qwen3", "mistral", "phi3")


class FusedRMSNorm(torch.autograd.Function):
    """(x, weight, eps, gemma) -> y, as the transformers module computes it; gradients for x and weight.
    On CUDA with Triton, one kernel each way (studio/kernels/rmsnorm.py); else the torch ops below."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
        y, r, ctx.triton = norm_forward(x, weight, eps, gemma)
        ctx.gemma = gemma
        ctx.save_for_backward(x, r, weight)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, r, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.triton:
            from .kernels import rmsnorm
            dx, dw = rmsnorm.backward(dy, x, weight, r, ctx.gemma, need_w)
        else:
            dx, dw = torch_backward(dy, x, weight, r, ctx.gemma, need_x, need_w)
        return dx, dw, None, None


def norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 gemma: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """y, r and whether the Triton kernel made them (else the torch ops); deterministic, so a second call on the
    same input gives the same y bit for bit (studio/rebuilt_inputs.py relies on it)."""
    if _triton_ok(x, weight, eps, gemma):
        from .kernels import rmsnorm
        return *rmsnorm.forward(x, weight, eps, gemma), True
    return *torch_forward(x, weight, eps, gemma), False


def torch_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """y, and r = rsqrt(mean(x²) + eps) per row (keepdim), with transformers' ops and casts."""
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xf * r
    if gemma:
        return xhat.mul_(1.0 + weight.float()).type_as(x), r
    return weight * xhat.to(x.dtype), r


def torch_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, r: torch.Tensor, gemma: bool,
                   need_x: bool = True, need_w: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    r = r.reshape(*x.shape[:-1], 1)
    xhat = x.float() * r
    u = dy.float() * (1.0 + weight.float()) if gemma else (dy * weight).float()
    dw = dx = None
    if need_w:
        scaled = xhat if gemma else xhat.to(x.dtype).float()
        dw = (dy.float() * scaled).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    if need_x:
        dot = (u * xhat).mean(-1, keepdim=True)
        dx = u.sub_(xhat.mul_(dot)).mul_(r).to(x.dtype)
    return dx, dw


def _triton_ok(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> bool:
    from . import kernels
    if not kernels.use_triton(x) or x.numel() == 0 or x.shape[-1] > kernels.MAX_NORM_WIDTH:
        return False
    key = ("rmsnorm", x.device.type, x.dtype, weight.dtype, "gemma" if gemma else "llama")
    return kernels.checked(key, lambda: _kernel_agrees(x, weight, eps, gemma))


def _kernel_agrees(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> bool:
    """The kernels against torch_forward / torch_backward on a few rows like x (first use of a dtype pair)."""
    from .kernels import rmsnorm
    gen = torch.Generator(device=x.device).manual_seed(0)
    n = x.shape[-1]
    xs = torch.randn(8, n, generator=gen, device=x.device).to(x.dtype)
    w = (weight.detach().float() + 0.1 * torch.randn(n, generator=gen, device=x.device)).to(weight.dtype)
    dy = torch.randn(8, n, generator=gen, device=x.device).to(torch.result_type(w, xs) if not gemma else xs.dtype)
    y, r = rmsnorm.forward(xs, w, eps, gemma)
    dx, dw = rmsnorm.backward(dy, xs, w, r, gemma, True)
    y0, r0 = torch_forward(xs, w, eps, gemma)
    dx0, dw0 = torch_backward(dy, xs, w, r0, gemma)
    from .kernels import agree
    return agree(1e-4 if x.dtype == torch.float32 else 3e-2, (y, y0), (dx, dx0), (dw, dw0))


def _fused_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if not torch.compiler.is_compiling() and getattr(hidden_states, "studio_normed_by", None) is self:
        return hidden_states  # a deferred MLP ran this norm (studio/chunked_mlp.py; never under compile)
    gemma = self.studio_gemma_norm
    eps = self.eps if gemma else self.variance_epsilon
    y = FusedRMSNorm.apply(hidden_states, self.weight, eps, gemma)
    if y.requires_grad:  # the op recorded a graph, so it keeps its input: readers can rebuild y from it
        attach(y, (hidden_states,), NormOutput(self.weight, eps, gemma))
    return y


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
