"""y = x (W + ΔW)ᵀ + b for a full-size ΔW (LoHa, LoKr, GLoRA, Compacter), keeping only x from forward to backward.

Autograd through `F.linear(x, ΔW)` keeps ΔW for x's gradient, and LoHa's Hadamard product keeps both of its
factors' products too: one to three weight-sized tensors per adapted layer from forward to backward (a 7B model
with LoKr on every linear layer: about 13 GB in bf16, all layers at once). Here ΔW is built without a graph in
forward, used and dropped; the backward builds it again from the factors (a few weight-sized ops, no tokens
involved) with its graph, takes x's gradient from it and passes d(ΔW) = dyᵀ x back through that graph to the
factors. What is kept is x, which the base product's neighbours keep anyway (or, for a fused norm's output or the
gated MLP's act(gate)·up, what their producer keeps, from which the backward rebuilds x: studio/rebuilt_inputs.py).

The sum follows DeltaLinear's rules (deltas.py): in fp32 ΔW joins W (one GEMM); under autocast the base GEMM
adds x ΔWᵀ in its epilogue. Used in those two cases only (fp32 throughout, or autocast), and not for a layer
whose ΔW is random in training (rank dropout): the rebuilt rows would differ.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import rebuilt_inputs
from .lora_fused import cast, weight_grad_mm


class DeltaProduct(torch.autograd.Function):
    """(x, module, *the module's trainable parameters) -> the module's output; gradients for x and them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module, *params: torch.Tensor) -> torch.Tensor:
        from .common import plus_base_product
        from .deltas import all_fp32
        device = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.module, ctx.fp32 = module, all_fp32(x, module.base_layer.weight, module.adapter_dtype())
        with torch.no_grad():
            dw, db = module.delta_weight(), module.delta_bias()
            if ctx.fp32:
                bias = module.base_layer.bias
                y = F.linear(x, module.base_layer.weight + dw, db if bias is None else
                             (bias if db is None else bias + db))
            else:
                y = plus_base_product(module.base_layer, x, F.linear(x, dw, db))
        ctx.save_for_backward(*rebuilt_inputs.saved_input(ctx, x))  # x, or the inputs x is rebuilt from
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x = rebuilt_inputs.restored_input(ctx, ctx.saved_tensors)
        module = ctx.module
        params = trainable(module)
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            dw, db = module.delta_weight(), module.delta_bias()
        cdt = dtype if enabled else x.dtype  # it runs in fp32 throughout or under autocast (deltas.py)
        x2, dy2 = cast(x.reshape(-1, x.shape[-1]), cdt), cast(dy.reshape(-1, dy.shape[-1]), cdt)
        dx = None
        if ctx.needs_input_grad[0]:
            w = module.base_layer.weight
            if ctx.fp32:  # one GEMM, as in forward
                dx = dy2 @ (w + dw.detach())
            else:  # as autograd would: d(x ΔWᵀ) built in the buffer of the base product's gradient
                dx = (dy2 @ cast(w, cdt)).addmm_(dy2, cast(dw.detach(), cdt))
            dx = dx.view(*dy.shape[:-1], dx.shape[-1]).to(x.dtype)
        outputs, grads = [dw], [weight_grad_mm(dy2.t(), x2, dw.dtype)]
        if db is not None:
            outputs.append(db)
            grads.append(dy2.sum(0, dtype=torch.float32).to(db.dtype))
        wanted = [p for p, need in zip(params, ctx.needs_input_grad[2:]) if need]
        found = iter(torch.autograd.grad(outputs, wanted, grads, allow_unused=True)) if wanted else iter(())
        return (dx, None, *[next(found) if need else None for need in ctx.needs_input_grad[2:]])


def trainable(module) -> list[torch.Tensor]:
    """The module's own trainable parameters (not its base layer's), in a fixed order."""
    return [p for name, p in module.named_parameters() if p.requires_grad and not name.startswith("base_layer.")]
