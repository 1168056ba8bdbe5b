"""LoRA and its family: rsLoRA, DoRA, PiSSA/OLoRA init, LoRA+, and QLoRA (LoRA over a 4-bit base).

y = W x + s · B A dropout(x), s = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)). DoRA rescales
each output row: y = m ⊙ (W + s·BA) x / ‖W + s·BA‖_row with the norm detached. Field names follow
peft's LoraConfig so configs and files carry over; files are peft's `LORA` format.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import sibling_lora
from ..config import opt
from ..errors import ConfigError
from ..models import keep_4bit_layout
from ..seeded_dropout import module_drop
from ..step_copies import current_copies
from . import register
from .base import Method, MethodConfig, applied
from .common import WrappedLinear, adapter_input, freeze_all, match_targets, replace_module
from .lora_fused import FusedLoraLinear, compute_dtype, fusable, is_4bit
from .dora_norm import dora_row_norms
from .dropped_input import MaskedDropout, draw, dropped_down, plain_dropout
from .rescaled_product import RescaledProduct

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class LoraConfig(MethodConfig):
    r: int = opt(8, "Rank of the update B·A")
    lora_alpha: float = opt(16, "Scale numerator: the update is multiplied by lora_alpha / r")
    lora_dropout: float = opt(0.05, "Dropout on the adapter's input (at 0, LoRA without DoRA runs q/k/v and "
                                    "gate/up as one op each: faster)")
    target_modules: list | str = opt(ATTENTION, "Layer names, a regex, or all-linear")
    bias: str = opt("none", "Which biases train", ("none", "all", "lora_only"))
    modules_to_save: list = opt([], "Modules trained in full and saved (e.g. lm_head)")
    init_lora_weights: bool | str = opt(True, "true (B=0), gaussian, pissa (top-r SVD), olora (QR)",
                                        (True, False, "true", "gaussian", "pissa", "olora"))
    use_rslora: bool = opt(False, "Scale by lora_alpha / sqrt(r) (stable at large r)")
    use_dora: bool = opt(False, "Weight-decomposed LoRA: learn a magnitude per output row")
    loraplus_lr_ratio: float = opt(0.0, "LoRA+: learning rate of B = ratio x lr of A (0 = off, ~16)")


def _dequantized_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's weight as a float tensor (dequantizes bitsandbytes 4-/8-bit weights)."""
    w = base.weight
    if w.__class__.__name__ == "Params4bit":
        import bitsandbytes.functional as bnbf
        if getattr(w.quant_state, "packing_format_for_cpu", False):
            raise RuntimeError("a 4-bit weight repacked for bitsandbytes' CPU inference kernel cannot be read back; "
                               "models.keep_4bit_layout must run before its first forward")
        return bnbf.dequantize_4bit(w.data, w.quant_state).float()
    if w.__class__.__name__ == "Int8Params":
        scb = getattr(w, "SCB", None) or getattr(base.state, "SCB", None)
        return (w.data.float() * scb.float().unsqueeze(1) / 127.0)
    return w.detach().float()


class LoraLinear(WrappedLinear):
    """A Linear (or 4-/8-bit Linear) with a low-rank update; module names match peft's."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, rslora: bool, dora: bool):
        super().__init__(base)
        if r <= 0:
            raise ConfigError(f"LoRA rank r must be at least 1, got {r}.")
        in_f, out_f = base.in_features, base.out_features
        dev = base.weight.device
        self.lora_A = nn.Linear(in_f, r, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(r, out_f, bias=False, device=dev, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.step_copies = None  # set by studio/step_copies.py while a run trains
        self.r = r
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.use_dora = dora
        if dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty(out_f, device=dev, dtype=torch.float32))
            # DoRA reads the base weight itself (its row norms) in the layout it was quantized in, which
            # bitsandbytes' CPU inference repack (AVX512-BF16) would change under it
            keep_4bit_layout(base)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def init_weights(self, mode: bool | str) -> None:
        mode = "true" if mode is True else str(mode).lower()
        with torch.no_grad():
            if mode in ("true", "false"):
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B.weight) if mode == "true" else nn.init.normal_(self.lora_B.weight, std=0.02)
            elif mode == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1 / self.r)
                nn.init.zeros_(self.lora_B.weight)
            elif mode in ("pissa", "olora"):
                self._init_from_weight(mode)
            else:
                raise ConfigError(f"init_lora_weights must be true, gaussian, pissa or olora; got {mode!r}.")
            if self.use_dora:
                self.lora_magnitude_vector.copy_(self._combined_weight().norm(dim=1))

    def _init_from_weight(self, mode: str) -> None:
        """PiSSA (top-r SVD) or OLoRA (QR): A, B take the principal part, W keeps the residual."""
        if not isinstance(self.base_layer, nn.Linear) or type(self.base_layer) is not nn.Linear:
            raise ConfigError(f"{mode} init needs a 16/32-bit base; turn quantization off or use init true.")
        w = self.base_layer.weight.detach().float()
        r = self.r
        if mode == "pissa":
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            sr = s[:r] / self.scaling
            a = torch.diag(sr.sqrt()) @ vh[:r]
            b = u[:, :r] @ torch.diag(sr.sqrt())
        else:
            q, rr = torch.linalg.qr(w)
            a, b = rr[:r], q[:, :r]
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.copy_(b)
        self.base_layer.weight.data = (w - self.scaling * b @ a).to(self.base_layer.weight.dtype)
        # Kept to convert the trained adapter into a plain LoRA on the original base when saving.
        self.register_buffer("lora_A_init", a.clone(), persistent=False)
        self.register_buffer("lora_B_init", b.clone(), persistent=False)

    def _combined_weight(self) -> torch.Tensor:
        return _dequantized_weight(self.base_layer) + self.delta_weight()

    def uses_fused_op(self) -> bool:
        """Whether forward runs as one autograd op (lora_fused.py): this class's forward (a subclass with
        its own keeps it), no DoRA, plain dropout or none, a frozen 16/32-bit or 4-bit base."""
        return type(self).forward is LoraLinear.forward and self.adapter_enabled and not self.merged \
            and not self.use_dora and plain_dropout(self) and fusable(self.base_layer)

    def fused_parts(self, x: torch.Tensor) -> tuple | None:
        """(W, bias, A, B, scaling, compute dtype, dropout p, 4-bit quant state or None, the step's copies
        of A and B in the compute dtype or None) when forward on x runs as the fused op; else None. The
        gated MLP (studio/fused_mlp.py) asks this of down_proj to fuse it with act(gate) * up. A 4-bit base
        fuses only while training (generation keeps bitsandbytes' 4-bit kernels) and when it computes in
        the fused op's dtype."""
        if not self.uses_fused_op():
            return None
        base = self.base_layer
        cdt = compute_dtype(x, self.lora_A.weight, base.weight)
        if cdt is None:
            return None
        state = None
        if is_4bit(base):
            if not torch.is_grad_enabled() or getattr(base, "compute_dtype", None) not in (None, cdt):
                return None
            state = base.weight.quant_state
        return base.weight, base.bias, self.lora_A.weight, self.lora_B.weight, self.scaling, cdt, module_drop(self), \
            state, current_copies(self, cdt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        given = sibling_lora.given_output(self, x)  # made with its attention's other projections
        if given is not None:
            return given
        parts = self.fused_parts(x)
        if parts is not None:
            return FusedLoraLinear.apply(x, *parts)
        if self.use_dora and self.adapter_enabled and not self.merged:
            return self._dora_forward(x)
        result = self.base_layer(x)
        if self.merged:
            return result
        if not self.adapter_enabled:
            if hasattr(self, "lora_A_init"):  # PiSSA/OLoRA: the base is residual + initial principal part
                init = F.linear(F.linear(x.to(self.lora_A_init.dtype), self.lora_A_init), self.lora_B_init)
                return result + (init * self.scaling).to(result.dtype)
            return result
        low = self.lora_A(self.lora_dropout(adapter_input(x, self.lora_A.weight.dtype)))
        if low.dtype == result.dtype or torch.is_autocast_enabled(low.device.type):
            # result + low @ (s·B)^T in one addmm: the scale lands on the small B, not the activation.
            flat = torch.addmm(result.reshape(-1, result.shape[-1]), low.reshape(-1, self.r),
                               (self.lora_B.weight * self.scaling).t())
            return flat.view(result.shape)
        return result + (self.lora_B(low) * self.scaling).to(result.dtype)

    def _dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """m ⊙ (W x + s·B A x_d) / ‖W + s·BA‖_row + b, the norm detached (dora_norm.py), summed in fp32 and
        rounded once (rescaled_product.py); with dropout W x_d replaces W x inside the rescale, as in peft."""
        xa = adapter_input(x, self.lora_A.weight.dtype)
        if self.drops_in_op():  # one mask for both reads, no dropped copy kept (dropped_input.py)
            mask, p = draw(self, xa)
            xd = MaskedDropout.apply(xa, mask, p) if p else xa
            low = dropped_down(xa, self.lora_A.weight, mask, p, xd if p else None)
        else:
            xd = self.lora_dropout(xa)
            low = self.lora_A(xd)
        lora = self.lora_B(low) * self.scaling
        norm = dora_row_norms(self)
        return RescaledProduct.apply(x, None if xd is xa else xd, lora, self.lora_magnitude_vector / norm,
                                     self.base_layer, False, None)

    def drops_in_op(self) -> bool:
        """DoRA whose dropout (torch's, or none) and A (a plain Linear without bias or hooks) run as the ops of
        dropped_input.py (the memory estimator asks this too)."""
        a = self.lora_A
        return self.use_dora and plain_dropout(self) and type(a) is nn.Linear and a.bias is None \
            and not (a._forward_hooks or a._forward_pre_hooks)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if type(self.base_layer) is not nn.Linear:
            raise ConfigError("Cannot merge into a 4-/8-bit base in place; use export --merge, which reloads the "
                              "base in 16-bit and merges there.")
        w = self.base_layer.weight
        new = self._combined_weight()
        if self.use_dora:
            self._merge_norm = new.norm(dim=1)
            new = new * (self.lora_magnitude_vector / self._merge_norm).unsqueeze(1)
        self._orig_weight_dtype = w.dtype
        w.data = new.to(w.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base_layer.weight
        cur = w.float()
        if self.use_dora:
            cur = cur / (self.lora_magnitude_vector / self._merge_norm).unsqueeze(1)
        w.data = (cur - self.delta_weight()).to(w.dtype)
        self.merged = False


class ModulesToSave(nn.Module):
    """A trainable copy of a whole module (e.g. lm_head); the original stays for disable_adapter."""

    def __init__(self, module: nn.Module):
        super().__init__()
        import copy
        self.original_module = module
        self.modules_to_save = copy.deepcopy(module)
        for p in self.original_module.parameters():
            p.requires_grad_(False)
        for p in self.modules_to_save.parameters():
            p.data = p.data.float() if p.is_floating_point() else p.data
            p.requires_grad_(True)
        self.adapter_enabled = True

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.original_module, name)

    def forward(self, *args, **kwargs):
        mod = self.modules_to_save if self.adapter_enabled else self.original_module
        out = mod(*args, **kwargs)
        return out


class LoraMethod(Method):
    name = "lora"
    graph_safe = True
    category = "reparameterised"
    summary = "Low-rank update B·A added to chosen linear layers; merges into the base."
    config_cls = LoraConfig
    mergeable = True
    peft_type = "LORA"

    def apply(self, model: nn.Module, cfg: LoraConfig) -> None:
        freeze_all(model)
        targets = match_targets(model, cfg.target_modules, exclude=cfg.modules_to_save)
        for path in targets:
            base = model.get_submodule(path)
            module = LoraLinear(base, cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora, cfg.use_dora)
            module.init_weights(cfg.init_lora_weights)
            replace_module(model, path, module)
        for path in cfg.modules_to_save:
            matches = [n for n, _ in model.named_modules() if n == path or n.endswith("." + path)]
            if not matches:
                raise ConfigError(f"modules_to_save entry {path!r} matches no module of this model.")
            for name in matches:
                replace_module(model, name, ModulesToSave(model.get_submodule(name)))
        if cfg.bias != "none":
            for name, module in model.named_modules():
                bias = getattr(module, "bias", None)
                if isinstance(bias, nn.Parameter) and (cfg.bias == "all" or isinstance(module, nn.Linear)
                                                       and name.endswith(".base_layer")):
                    bias.requires_grad_(True)
        for module in model.modules():
            if isinstance(module, LoraLinear):
                for p in module.parameters(recurse=False):
                    p.requires_grad_(True)
                module.lora_A.weight.requires_grad_(True)
                module.lora_B.weight.requires_grad_(True)

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        cfg: LoraConfig = applied(model).cfg
        for name, module in model.named_modules():
            if isinstance(module, LoraLinear):
                a, b = module.lora_A.weight, module.lora_B.weight
                if hasattr(module, "lora_A_init"):  # PiSSA/OLoRA: express as LoRA on the original base
                    a = torch.cat([a, module.lora_A_init], 0)
                    b = torch.cat([b, -module.lora_B_init], 1)
                out[f"{name}.lora_A.weight"] = a.detach()
                out[f"{name}.lora_B.weight"] = b.detach()
                if module.use_dora:
                    out[f"{name}.lora_magnitude_vector"] = module.lora_magnitude_vector.detach()
            elif isinstance(module, ModulesToSave):
                for pname, p in module.modules_to_save.named_parameters():
                    out[f"{name}.{pname}"] = p.detach()
        if cfg.bias != "none":
            for pname, p in model.named_parameters():
                if pname.endswith("bias") and p.requires_grad:
                    out[pname] = p.detach()
        return out

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, LoraLinear):
                    for key in ("lora_A.weight", "lora_B.weight"):
                        if f"{name}.{key}" not in state:
                            raise ConfigError(f"Adapter lacks {name}.{key}; it was trained on other layers.")
                    a, b = state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]
                    if a.shape != module.lora_A.weight.shape:
                        raise ConfigError(f"Adapter rank {a.shape[0]} at {name} does not match r={module.r}.")
                    module.lora_A.weight.copy_(a)
                    module.lora_B.weight.copy_(b)
                    if module.use_dora:
                        module.lora_magnitude_vector.copy_(state[f"{name}.lora_magnitude_vector"])
                elif isinstance(module, ModulesToSave):
                    for pname, p in module.modules_to_save.named_parameters():
                        p.copy_(state[f"{name}.{pname}"])
            params = dict(model.named_parameters())
            for key, value in state.items():
                if key.endswith("bias") and key in params:
                    params[key].copy_(value)

    def adapter_config(self, model: nn.Module, cfg: LoraConfig) -> dict:
        out = super().adapter_config(model, cfg)
        init = cfg.init_lora_weights
        if str(init).lower() in ("pissa", "olora"):  # saved already converted to plain LoRA (rank 2r)
            # Same scaling at rank 2r: alpha/r -> 2·alpha/2r; rsLoRA alpha/sqrt(r) -> sqrt(2)·alpha/sqrt(2r).
            alpha = cfg.lora_alpha * (math.sqrt(2) if cfg.use_rslora else 2)
            out.update(r=2 * cfg.r, lora_alpha=alpha, init_lora_weights=True, studio_trained_as=str(init),
                       studio_method="lora")
        elif isinstance(init, str):
            out["init_lora_weights"] = True if init == "true" else init
        out.pop("loraplus_lr_ratio", None)
        out.update(task_type="CAUSAL_LM", fan_in_fan_out=False, inference_mode=True, rank_pattern={},
                   alpha_pattern={}, base_model_name_or_path=None, layers_to_transform=None,
                   layers_pattern=None, lora_bias=False, target_modules=cfg.target_modules,
                   loraplus_lr_ratio=cfg.loraplus_lr_ratio)
        return out

    def config_from_adapter(self, data: dict) -> LoraConfig:
        data = dict(data)
        if data.get("rank_pattern") or data.get("alpha_pattern"):
            raise ConfigError("This adapter uses per-layer rank_pattern/alpha_pattern, which the studio does not "
                              "load yet; save it without patterns.")
        if data.get("init_lora_weights") not in (True, False, "gaussian"):
            data["init_lora_weights"] = True  # saved pissa/olora adapters are loaded as plain LoRA
        data["modules_to_save"] = data.get("modules_to_save") or []
        data.pop("loraplus_lr_ratio", None) if data.get("loraplus_lr_ratio") is None else None
        return super().config_from_adapter(data)


    def optimizer_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        ratio = applied(model).cfg.loraplus_lr_ratio
        if not ratio:
            return super().optimizer_groups(model, lr, weight_decay)
        fast = [p for n, p in model.named_parameters() if p.requires_grad and ".lora_B." in n]
        slow = [p for n, p in model.named_parameters() if p.requires_grad and ".lora_B." not in n]
        return [{"params": slow, "lr": lr, "weight_decay": weight_decay},
                {"params": fast, "lr": lr * ratio, "weight_decay": weight_decay, "lr_ratio": ratio}]


register(LoraMethod())
