"""AdaMix: a mixture of M adapter copies per site, routed at random in training, averaged for inference.

Every training forward pass picks, per site, a random copy of W_down and (independently) of W_up;
at evaluation the copies' weights are averaged into one adapter, so inference costs one adapter.
Placement and AdapterDrop options as for `adapter` (Houlsby by default). All copies are saved, so
training can resume; the averaged adapter is what evaluation and chat use. Own format (`ADAMIX`).
The paper's optional consistency regulariser between two routings is not implemented.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import opt
from . import register
from .adapter import AdapterConfig, AdapterMethod


@dataclass
class AdaMixConfig(AdapterConfig):
    num_experts: int = opt(4, "Adapter copies M per site")


class AdaMixMethod(AdapterMethod):
    name = "adamix"
    graph_safe = True  # its routing is drawn on the device (adapter.Bottleneck), inside the captured step
    summary = "M adapter copies per site, random routing in training, weight-averaged for inference."
    config_cls = AdaMixConfig
    peft_type = "ADAMIX"

    def num_copies(self, cfg: AdaMixConfig) -> int:
        return cfg.num_experts


register(AdaMixMethod())
