"""Parallel adapter (He et al.) / AdaptFormer: h_ffn + s · W_up σ(W_down x) beside the FFN.

x is the FFN's input, so the adapter runs in parallel with the FFN instead of after it. AdaptFormer
is the same mechanism with a small fixed scale (s = 0.1, preset `adaptformer`). W_up starts at zero,
so the output equals the base at init. AdapterDrop options as for `adapter`. Own format.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..config import opt
from . import register
from .adapter import ACTIVATIONS, AdapterFamily, Bottleneck, add_sites, hidden_size
from .base import MethodConfig
from .common import freeze_all


@dataclass
class ParallelAdapterConfig(MethodConfig):
    bottleneck: int = opt(64, "Bottleneck size m")
    scale: float = opt(1.0, "Multiplier s of the adapter output (AdaptFormer: 0.1; MAM: 4)")
    activation: str = opt("relu", "Non-linearity inside the adapter", tuple(ACTIVATIONS))
    init: str = opt("zeros", "W_up init: zeros (output == base) or near_zero", ("zeros", "near_zero"))
    drop_lowest: int = opt(0, "AdapterDrop: no adapters in the lowest k layers")
    drop_prob: float = opt(0.0, "AdapterDrop: probability of skipping a layer's adapter in a training pass")


class ParallelAdapterMethod(AdapterFamily):
    name = "parallel_adapter"
    graph_safe = True
    summary = "Bottleneck adapter in parallel to each FFN, scaled by s (AdaptFormer: s = 0.1)."
    config_cls = ParallelAdapterConfig
    peft_type = "PARALLEL_ADAPTER"

    def apply(self, model: nn.Module, cfg: ParallelAdapterConfig) -> None:
        freeze_all(model)
        d = hidden_size(model)
        dev = model.get_input_embeddings().weight.device
        add_sites(model, ["ffn_parallel"], lambda kind, i: Bottleneck(d, cfg.bottleneck, cfg.activation, 1, cfg.init,
                                                                      dev),
                  cfg.scale, cfg.drop_lowest, cfg.drop_prob)
        self.unfreeze(model)


register(ParallelAdapterMethod())
