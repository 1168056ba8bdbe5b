"""IA3: learned rescaling of keys, values and the FFN intermediate activation.

Each target Linear gets a vector l (init ones, so output == base). Attention targets (k, v) scale
their output: y = (W x + b) ⊙ l (l: out x 1), summed in fp32 and rounded once (rescaled_product.py).
Feed-forward targets (the down projection) scale their input: y = W (x ⊙ l) + b (l: 1 x in; inside the gated
MLP's op where it is fused, studio/fused_mlp.py; before a 4-/8-bit base, ScaledInput, which keeps no copy of x).
Merging multiplies the weight rows (and bias) or columns by l.
Files are peft's IA3 format: `<module path>.ia3_l`, with `feedforward_modules` in the config.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import rebuilt_inputs
from ..config import opt
from ..errors import ConfigError
from . import register
from .base import Method, MethodConfig
from .common import WrappedLinear, freeze_all, match_targets, replace_module
from .rescaled_product import RescaledProduct


class ScaledInput(torch.autograd.Function):
    """(x, l) -> x ⊙ l, the feed-forward scale before a base the gated MLP's op does not take (4-/8-bit): for l's
    gradient it keeps what x's producer keeps (the gated MLP's gate and up, kept anyway) when x is such an output,
    and builds x again in backward (studio/rebuilt_inputs.py); else x, as autograd would. Same products and
    reductions as autograd's: bitwise its gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*rebuilt_inputs.saved_input(ctx, x, rebuild=scale.requires_grad), scale)
        return x * scale

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        inputs, (scale,) = rebuilt_inputs.split_saved(ctx, ctx.saved_tensors)
        dx = dy * scale if ctx.needs_input_grad[0] else None
        ds = None
        if ctx.needs_input_grad[1]:
            ds = (dy * rebuilt_inputs.restored_input(ctx, inputs)).sum_to_size(scale.shape)
        return dx, ds


@dataclass
class IA3Config(MethodConfig):
    target_modules: list | str = opt(["k_proj", "v_proj", "down_proj"], "Layers to rescale (names, regex, all-linear)")
    feedforward_modules: list = opt(["down_proj"], "Targets whose input (not output) is rescaled: the FFN's down "
                                    "projection")
    init_ia3_weights: bool = opt(True, "Start from ones (output == base)")


class IA3Linear(WrappedLinear):
    """A Linear whose output (attention) or input (feed-forward) is rescaled by a learned vector."""

    def __init__(self, base: nn.Linear, feedforward: bool, init_ones: bool = True):
        super().__init__(base)
        self.is_feedforward = feedforward
        shape = (1, base.in_features) if feedforward else (base.out_features, 1)
        dev = base.weight.device
        self.ia3_l = nn.Parameter(torch.ones(shape, device=dev) if init_ones else torch.randn(shape, device=dev))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.adapter_enabled:
            return self.base_layer(x)
        scale = self.ia3_l.flatten()
        # scaled in the activations' dtype: an fp32 product of a 16-bit input would be a second,
        # twice-as-large copy of the widest activation (down_proj's input) kept for backward
        if self.is_feedforward:  # a plain Linear inside the gated MLP takes GatedScaledDown instead (fused_mlp.py)
            return self.base_layer(ScaledInput.apply(x, scale.to(x.dtype)))
        if torch.is_grad_enabled() or type(self.base_layer) is nn.Linear:
            # (W x + b) ⊙ l summed in fp32 and rounded once: a change of l under half a bf16 step of 1 is
            # not lost (generation over a 4-/8-bit base keeps bitsandbytes' kernels)
            return RescaledProduct.apply(x, None, None, scale, self.base_layer, True, None)
        out = self.base_layer(x)
        return out * scale.to(out.dtype)

    def gated_scale_parts(self) -> tuple | None:
        """(l, W, bias) when this feed-forward scale over a plain Linear can run inside the gated MLP's op
        (studio/fused_mlp.py GatedScaledDown, which keeps no copy of this layer's input); else None."""
        if not self.is_feedforward or self.merged or not self.adapter_enabled \
                or type(self.base_layer) is not nn.Linear:
            return None
        return self.ia3_l.flatten(), self.base_layer.weight, self.base_layer.bias

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if type(self.base_layer) is not nn.Linear:
            raise ConfigError("Cannot merge IA3 into a 4-/8-bit base in place; export with --merge instead.")
        w = self.base_layer.weight
        w.data = (w.float() * self.ia3_l).to(w.dtype)
        bias = self.base_layer.bias
        if bias is not None and not self.is_feedforward:
            bias.data = (bias.float() * self.ia3_l.flatten()).to(bias.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base_layer.weight
        w.data = (w.float() / self.ia3_l).to(w.dtype)
        bias = self.base_layer.bias
        if bias is not None and not self.is_feedforward:
            bias.data = (bias.float() / self.ia3_l.flatten()).to(bias.dtype)
        self.merged = False


class IA3Method(Method):
    name = "ia3"
    graph_safe = True
    category = "reparameterised"
    summary = "Learned scaling vectors on keys, values and the FFN activation (tiny; merges into the base)."
    config_cls = IA3Config
    mergeable = True
    peft_type = "IA3"

    def apply(self, model: nn.Module, cfg: IA3Config) -> None:
        freeze_all(model)
        targets = match_targets(model, cfg.target_modules)
        ff = list(cfg.feedforward_modules)
        for path in targets:
            is_ff = any(path == f or path.endswith("." + f) for f in ff)
            module = IA3Linear(model.get_submodule(path), is_ff, cfg.init_ia3_weights)
            module.ia3_l.requires_grad_(True)
            replace_module(model, path, module)

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"{n}.ia3_l": m.ia3_l.detach() for n, m in model.named_modules() if isinstance(m, IA3Linear)}

    def adapter_config(self, model: nn.Module, cfg: IA3Config) -> dict:
        out = super().adapter_config(model, cfg)
        out.update(task_type="CAUSAL_LM", fan_in_fan_out=False, inference_mode=True, modules_to_save=None,
                   exclude_modules=None)
        return out


register(IA3Method())
