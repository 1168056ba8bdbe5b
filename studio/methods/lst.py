"""Ladder Side-Tuning (LST): a small side network reads the frozen backbone through gated ladders.

The backbone runs under torch.no_grad (its activations are never kept for backward and no
gradient flows through it). A side network of width d_s = d / reduction runs next to it:

    s_0 = D_0 h_0                                   (h_0: the embeddings entering layer 0)
    s_i = μ_i · D_i h_i + (1 − μ_i) · s_{i−1},  μ_i = σ(α_i / T)      (ladder from layer i's output)
    s_i = s_i + FFN_i(RMSNorm(s_i))                  (side block i)
    out = Norm(h_L) + U RMSNorm(s_L)                 (fed to the output head)

Each side FFN is a pruned copy of the backbone layer's FFN: the d_s residual dimensions and
f / reduction intermediate units with the largest L1 weight norms are kept (LST's structural
pruning); each D_i starts as the selection of those d_s dimensions. U starts at zero, so the output
equals the base at init. Only the side network trains.

Memory: backward stores only the side network's activations and the L + 1 ladder inputs
(B·T·d each), instead of every backbone layer's attention and FFN activations. Measured with
autograd's saved-tensor hooks (bytes kept for backward, weights excluded) on a random model with
Gemma-3-270M's shape, B=1, T=256, fp32, through studio.losses.causal_lm_loss: LoRA r=8 on
q/k/v/o keeps 234 MiB, LST (reduction 8) keeps 38 MiB (6.2x less; the rest is the ladder inputs
and the loss head's input). tests/test_adapters.py checks the same ordering on tiny-llama.
Own file format (`LST`): keys `lst_side.*`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import opt
from ..errors import ConfigError
from . import register
from .adapter import hidden_size, layer_prefix
from .base import Method, MethodConfig, applied
from .common import decoder_layers, freeze_all


@dataclass
class LstConfig(MethodConfig):
    reduction: int = opt(8, "Side network width = hidden size / reduction")
    gate_temperature: float = opt(0.1, "Temperature T of the ladder gates μ = σ(α / T)")
    init_from_backbone: bool = opt(True, "Initialise side FFNs as pruned copies of the backbone FFNs (else random)")


class RMSNorm(nn.Module):
    def __init__(self, d: int, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class SideBlock(nn.Module):
    """RMSNorm + gated FFN (SwiGLU-like, with the backbone's activation) of width d_s -> f_s -> d_s."""

    def __init__(self, d_s: int, f_s: int, act, device=None):
        super().__init__()
        self.norm = RMSNorm(d_s, device)
        self.gate_proj = nn.Linear(d_s, f_s, bias=False, device=device)
        self.up_proj = nn.Linear(d_s, f_s, bias=False, device=device)
        self.down_proj = nn.Linear(f_s, d_s, bias=False, device=device)
        self.act = act

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        h = self.norm(s)
        return s + self.down_proj(self.act(self.gate_proj(h)) * self.up_proj(h))


class SideNetwork(nn.Module):
    def __init__(self, d: int, d_s: int, f_s: int, layers: int, act, temperature: float, device=None):
        super().__init__()
        self.ladders = nn.ModuleList(nn.Linear(d, d_s, bias=False, device=device) for _ in range(layers + 1))
        self.gates = nn.Parameter(torch.zeros(layers, device=device))
        self.blocks = nn.ModuleList(SideBlock(d_s, f_s, act, device) for _ in range(layers))
        self.final_norm = RMSNorm(d_s, device)
        self.up = nn.Linear(d_s, d, bias=False, device=device)
        nn.init.zeros_(self.up.weight)
        self.temperature = temperature
        self.adapter_enabled = True
        self.captured: list[torch.Tensor] = []

    def forward(self, states: list[torch.Tensor]) -> torch.Tensor:
        """states: [h_0 (embeddings), h_1 .. h_L (layer outputs)] of the frozen backbone."""
        dtype = self.up.weight.dtype
        s = self.ladders[0](states[0].to(dtype))
        mu = torch.sigmoid(self.gates / self.temperature)
        for i, block in enumerate(self.blocks):
            s = mu[i] * self.ladders[i + 1](states[i + 1].to(dtype)) + (1 - mu[i]) * s
            s = block(s)
        return self.up(self.final_norm(s))


def _mlp_weights(layer: nn.Module):
    mlp = getattr(layer, "mlp", None)
    if mlp is None or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return None
    return mlp


@torch.no_grad()
def prune_from_backbone(side: SideNetwork, layers: nn.ModuleList, d_s: int, f_s: int) -> None:
    """Copy the largest-norm residual dims (shared by all layers) and intermediate units of each FFN."""
    mlps = [_mlp_weights(layer) for layer in layers]
    if any(m is None for m in mlps):
        return
    score = sum(m.down_proj.weight.detach().float().abs().sum(1) for m in mlps)  # per residual dim
    keep_d = score.topk(d_s).indices.sort().values
    for i, (mlp, block) in enumerate(zip(mlps, side.blocks)):
        down = mlp.down_proj.weight.detach().float()
        keep_f = down.abs().sum(0).topk(f_s).indices.sort().values
        block.gate_proj.weight.copy_(mlp.gate_proj.weight.float()[keep_f][:, keep_d])
        block.up_proj.weight.copy_(mlp.up_proj.weight.float()[keep_f][:, keep_d])
        block.down_proj.weight.copy_(down[keep_d][:, keep_f])
    for ladder in side.ladders:  # D_i starts as the selection of the kept dims
        ladder.weight.zero_()
        ladder.weight[torch.arange(d_s), keep_d] = 1.0


class LstHooks:
    """Backbone under no_grad from layer 0 to the final norm; records the ladder inputs; adds U s_L."""

    def __init__(self, model: nn.Module, side: SideNetwork):
        self.side = side
        layers = decoder_layers(model)
        body = model.get_submodule(layer_prefix(model).rsplit(".", 1)[0])
        norm = getattr(body, "norm", None)
        if norm is None:
            raise ConfigError("LST needs a decoder with a final norm (Llama, Qwen, Gemma, Mistral...).")
        self.prev_grad = True
        self.handles = [layers[0].register_forward_pre_hook(self.start, with_kwargs=True),
                        norm.register_forward_pre_hook(self.stop),
                        norm.register_forward_hook(self.finish)]
        self.handles += [layer.register_forward_hook(self.record) for layer in layers]

    def start(self, module, args, kwargs):
        if not self.side.adapter_enabled:
            return None
        h = args[0] if args else kwargs["hidden_states"]
        self.side.captured = [h.detach()]
        self.prev_grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)  # the backbone: nothing kept for backward
        return None

    def record(self, module, args, output):
        if self.side.adapter_enabled:
            self.side.captured.append((output[0] if isinstance(output, tuple) else output).detach())

    def stop(self, module, args):
        if self.side.adapter_enabled:
            torch.set_grad_enabled(self.prev_grad)

    def finish(self, module, args, output):
        if not self.side.adapter_enabled or not self.side.captured:
            return None
        states, self.side.captured = self.side.captured, []
        return output + self.side(states).to(output.dtype)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class LstMethod(Method):
    name = "lst"
    graph_safe = True
    category = "adapter"
    summary = "Ladder side-tuning: a small side network reads the frozen backbone; no backward through it."
    config_cls = LstConfig
    mergeable = False
    peft_type = "LST"

    def apply(self, model: nn.Module, cfg: LstConfig) -> None:
        freeze_all(model)
        d = hidden_size(model)
        layers = decoder_layers(model)
        if cfg.reduction < 1 or d % cfg.reduction:
            raise ConfigError(f"LST reduction must divide the hidden size {d}; got {cfg.reduction}.")
        d_s = d // cfg.reduction
        mlp = _mlp_weights(layers[0])
        f = mlp.down_proj.in_features if mlp is not None else 4 * d
        f_s = max(1, f // cfg.reduction)
        act = getattr(mlp, "act_fn", None) or F.silu
        dev = model.get_input_embeddings().weight.device
        side = SideNetwork(d, d_s, f_s, len(layers), act, cfg.gate_temperature, dev)
        if cfg.init_from_backbone:
            prune_from_backbone(side, layers, d_s, f_s)
        model.add_module("lst_side", side)
        for p in side.parameters():
            p.requires_grad_(True)
        applied(model).extra = {"hooks": LstHooks(model, side)}

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"lst_side.{n}": p.detach() for n, p in model.lst_side.named_parameters()}

    def trainable_summary(self, model: nn.Module) -> dict:
        side = model.lst_side
        d_s = side.up.in_features
        layers = len(side.blocks)
        return {"side_width": d_s, "backbone_backward": False,
                "activations_kept_per_token": {"ladder_inputs_floats": (layers + 1) * side.up.out_features,
                                               "side_network_floats_approx": layers * (4 * d_s + 3 * side.blocks[
                                                   0].up_proj.out_features)},
                "note": "The backbone runs under no_grad: none of its attention/FFN activations are stored."}


register(LstMethod())
