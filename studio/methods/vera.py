"""VeRA: ΔW = Λ_b B Λ_d A with A (r x in), B (out x r) frozen random matrices shared by every layer.

Only the vectors d (r) and b (out) train per layer: far fewer parameters than LoRA at the same r.
A and B come from a seeded generator exactly as peft draws them (kaiming-uniform on CPU, sized for
the largest targeted layer and sliced per layer), so an adapter can be rebuilt from the seed; they
are also saved (`save_projection`, peft's default) under peft's model-level keys `base_model.vera_A`
and `base_model.vera_B`. b starts at 0 (output == base), d at `d_initial`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import opt
from ..errors import ConfigError
from . import register
from .base import MethodConfig
from .deltas import DeltaLinear, DeltaMethod

KEY_A, KEY_B = "base_model.vera_A", "base_model.vera_B"  # written as-is (no base_model.model. prefix)


@dataclass
class VeraConfig(MethodConfig):
    r: int = opt(256, "Rank of the shared random projections (VeRA uses much larger r than LoRA)")
    target_modules: list | str = opt(["q_proj", "v_proj"], "Layer names, a regex, or all-linear")
    projection_prng_key: int = opt(0, "Seed of the shared random matrices A and B")
    save_projection: bool = opt(True, "Save A and B in the adapter file (else rebuilt from the seed)")
    vera_dropout: float = opt(0.0, "Dropout on the adapter's input")
    d_initial: float = opt(0.1, "Initial value of the vector d (b starts at 0)")


def kaiming_like_peft(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """peft's `_kaiming_init`: uniform(±sqrt(3)·sqrt(2)/sqrt(fan_in)) drawn from the generator."""
    t = torch.empty(shape)
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    with torch.no_grad():
        return t.uniform_(-bound, bound, generator=generator)


class VeraLinear(DeltaLinear):
    def __init__(self, base: nn.Linear, vera_A: torch.Tensor, vera_B: torch.Tensor, r: int, dropout: float,
                 d_initial: float):
        super().__init__(base)
        dev = base.weight.device
        self.r = r
        # The shared tensors: registered in every layer (non-persistent), the same storage on CPU.
        self.register_buffer("vera_A", vera_A, persistent=False)
        self.register_buffer("vera_B", vera_B, persistent=False)
        self.vera_lambda_b = nn.Parameter(torch.zeros(base.out_features, device=dev))
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial), device=dev))
        self.vera_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _ab(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vera_A[:, :self.in_features], self.vera_B[:self.out_features, :]

    def delta_weight(self) -> torch.Tensor:
        a, b = self._ab()
        return (self.vera_lambda_b.unsqueeze(-1) * b) @ (self.vera_lambda_d.unsqueeze(-1) * a)

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self._ab()
        return self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(self.vera_dropout(x), a), b)


class VeraMethod(DeltaMethod):
    name = "vera"
    graph_safe = True
    summary = "Shared frozen random A, B; only two scaling vectors per layer train (peft's VERA format)."
    config_cls = VeraConfig
    peft_type = "VERA"

    def before_wrap(self, model: nn.Module, targets: list[str], cfg: VeraConfig) -> None:
        if cfg.r <= 0:
            raise ConfigError(f"VeRA rank r must be at least 1, got {cfg.r}.")
        max_out = max(model.get_submodule(t).out_features for t in targets)
        max_in = max(model.get_submodule(t).in_features for t in targets)
        gen = torch.Generator(device="cpu").manual_seed(cfg.projection_prng_key)
        dev = model.get_submodule(targets[0]).weight.device
        self._shared = (kaiming_like_peft((cfg.r, max_in), gen).to(dev),
                        kaiming_like_peft((max_out, cfg.r), gen).to(dev))

    def make_module(self, model, path, base, cfg: VeraConfig) -> VeraLinear:
        return VeraLinear(base, *self._shared, cfg.r, cfg.vera_dropout, cfg.d_initial)

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out = super().adapter_state_dict(model)
        from .base import applied
        wrappers = self.wrappers(model)
        if applied(model).cfg.save_projection and wrappers:
            out[KEY_A] = wrappers[0][1].vera_A.detach()
            out[KEY_B] = wrappers[0][1].vera_B.detach()
        return out

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        a, b = state.pop(KEY_A, None), state.pop(KEY_B, None)
        own = set(DeltaMethod.adapter_state_dict(self, model))
        missing = sorted(own - set(state))
        if missing:
            raise ConfigError(f"VeRA adapter lacks {len(missing)} tensors (e.g. {missing[:2]}); it was trained on "
                              f"other layers or another base model.")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key in own:
                if params[key].shape != state[key].shape:
                    raise ConfigError(f"VeRA tensor {key} has shape {tuple(state[key].shape)}, this model expects "
                                      f"{tuple(params[key].shape)}; the adapter was trained with another r or base.")
                params[key].copy_(state[key])
        if a is not None and b is not None:
            with torch.no_grad():
                for _, m in self.wrappers(model):
                    if m.vera_A.shape != a.shape or m.vera_B.shape != b.shape:
                        raise ConfigError(f"VeRA projections have shapes {tuple(a.shape)}/{tuple(b.shape)}, this "
                                          f"model needs {tuple(m.vera_A.shape)}/{tuple(m.vera_B.shape)}.")
                    m.vera_A.copy_(a)
                    m.vera_B.copy_(b)

    def adapter_config(self, model: nn.Module, cfg: VeraConfig) -> dict:
        out = super().adapter_config(model, cfg)
        out.update(fan_in_fan_out=False, bias="none", init_weights=True)
        return out

    def trainable_summary(self, model: nn.Module) -> dict:
        w = self.wrappers(model)
        return {"wrapped_layers": len(w), "shared_projection_shapes": [list(w[0][1].vera_A.shape),
                                                                      list(w[0][1].vera_B.shape)] if w else []}


register(VeraMethod())
