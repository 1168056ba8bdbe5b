"""GLoRA: W' = W + W ⊙ A + B, b' = b + b ⊙ D + E + W C, each support chosen from a small menu.

A and B (out x in) are a low-rank product (`lora`), a per-row vector, one scalar (`constant`) or
absent; C (in x 1) is low-rank or a vector; D, E (out) are vectors or scalars. C, D and E exist only
where the base layer has a bias (as in peft). Every support starts at zero, so the output equals the
base at init; the update is a pure function of W and b, so it merges exactly. Files use peft's
`GLORA` format (`glora_A.Xd`, `glora_A.Xu`, `glora_B.X`, ...).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import opt
from ..errors import ConfigError
from . import register
from .base import MethodConfig
from .deltas import DeltaLinear, DeltaMethod

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class GloraConfig(MethodConfig):
    r: int = opt(8, "Rank of the supports chosen as lora")
    target_modules: list | str = opt(ATTENTION, "Layer names, a regex, or all-linear")
    config_A_B: str = opt("lora", "Support of the weight scale A and weight shift B",
                          ("lora", "vector", "constant", "none"))
    config_C: str = opt("lora", "Support of C (bias shift W·C); only on layers with a bias", ("lora", "vector", "none"))
    config_D_E: str = opt("constant", "Support of bias scale D and bias shift E; only on layers with a bias",
                          ("vector", "constant", "none"))


class GloraPath(nn.Module):
    """One support: `lora` (Xd @ Xu), `vector` (X), `constant` (X[0]) or `none` (0)."""

    def __init__(self, kind: str, rows: int, cols: int, r: int, column: bool, device):
        super().__init__()
        self.kind = kind
        if kind == "lora":
            self.Xd = nn.Parameter(torch.zeros(rows, r, device=device))
            self.Xu = nn.Parameter(torch.empty(r, cols, device=device))
            nn.init.kaiming_uniform_(self.Xu, a=math.sqrt(5))
        elif kind == "vector":
            self.X = nn.Parameter(torch.zeros((rows, 1) if column else (rows,), device=device))
        elif kind == "constant":
            self.X = nn.Parameter(torch.zeros(1, device=device))

    def forward(self) -> torch.Tensor | float:
        if self.kind == "lora":
            return self.Xd @ self.Xu
        if self.kind == "vector":
            return self.X
        if self.kind == "constant":
            return self.X[0]
        return 0.0


class GloraLinear(DeltaLinear):
    rebuilt_buffers = (3.0, 4.5)  # under autocast also W's fp32 copy and 16-bit supports promoted

    def __init__(self, base: nn.Linear, cfg: GloraConfig):
        super().__init__(base)
        if cfg.r <= 0:
            raise ConfigError(f"GLoRA rank r must be at least 1, got {cfg.r}.")
        dev, o, i = base.weight.device, base.out_features, base.in_features
        has_bias = base.bias is not None
        self.glora_A = GloraPath(cfg.config_A_B, o, i, cfg.r, True, dev)
        self.glora_B = GloraPath(cfg.config_A_B, o, i, cfg.r, True, dev)
        self.glora_C = GloraPath(cfg.config_C if has_bias else "none", i, 1, cfg.r, True, dev)
        self.glora_D = GloraPath(cfg.config_D_E if has_bias else "none", o, 1, cfg.r, False, dev)
        self.glora_E = GloraPath(cfg.config_D_E if has_bias else "none", o, 1, cfg.r, False, dev)

    def delta_weight(self) -> torch.Tensor:
        w = self.base_layer.weight.float()
        return w * self.glora_A() + self.glora_B() + torch.zeros_like(w)

    def delta_bias(self) -> torch.Tensor | None:
        b = self.base_layer.bias
        if b is None:
            return None
        w, b = self.base_layer.weight.float(), b.float()
        c = self.glora_C()
        wc = (w @ c).squeeze(-1) if isinstance(c, torch.Tensor) else torch.zeros_like(b)
        return b * self.glora_D() + self.glora_E() + wc + torch.zeros_like(b)

    def adapter_dtype(self) -> torch.dtype:
        return torch.float32

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        dw, db = self.delta_weight(), self.delta_bias()  # both read the original W, b
        w, b = self.base_layer.weight, self.base_layer.bias
        w.data = (w.float() + dw).to(w.dtype)
        if b is not None:
            b.data = (b.float() + db).to(b.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Invert W' = W (1 + A) + B and b' = b (1 + D) + E + W C for the original W and b."""
        if not self.merged:
            return
        w, b = self.base_layer.weight, self.base_layer.bias
        w0 = (w.float() - self.glora_B()) / (1 + self.glora_A())
        if b is not None:
            c = self.glora_C()
            wc = (w0 @ c).squeeze(-1) if isinstance(c, torch.Tensor) else 0.0
            b.data = ((b.float() - self.glora_E() - wc) / (1 + self.glora_D())).to(b.dtype)
        w.data = w0.to(w.dtype)
        self.merged = False


class GloraMethod(DeltaMethod):
    name = "glora"
    graph_safe = True
    summary = "Generalised LoRA: weight scale/shift and bias scale/shift with chosen supports; mergeable."
    config_cls = GloraConfig
    peft_type = "GLORA"

    def make_module(self, model, path, base, cfg: GloraConfig) -> GloraLinear:
        return GloraLinear(base, cfg)

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        # peft also saves the zero buffers of absent supports (`glora_C.zeros`); they carry nothing.
        super().load_adapter_state(model, {k: v for k, v in state.items() if not k.endswith(".zeros")})

    def adapter_config(self, model: nn.Module, cfg: GloraConfig) -> dict:
        out = super().adapter_config(model, cfg)
        out.update(bias="none", init_weights=True)
        return out


register(GloraMethod())
