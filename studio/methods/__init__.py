"""The one registry of PEFT methods, and the presets that name variants of them.

A method is registered by its engine file (`register(MyMethod())` at import). A preset is a YAML
file in presets/methods/ (`name`, `base`, `summary`, `fields`): `dora` is `lora` with
use_dora=true. `method_config({"name": "dora", "r": 16})` gives the base method's config with the
preset's fields and then the user's values applied.
"""
from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from pathlib import Path

import yaml
from torch import nn

from ..config import build_dataclass, field_docs
from ..errors import ConfigError
from ..fused_norm import fuse_norms
from ..fused_rope import fuse_rope
from .base import CATEGORIES, AppliedAdapter, Method, MethodConfig, applied, attach

PRESET_DIR = Path(__file__).resolve().parents[2] / "presets" / "methods"
_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.category not in CATEGORIES:
        raise ValueError(f"{method.name}: category must be one of {CATEGORIES}")
    _REGISTRY[method.name] = method
    return method


@lru_cache(maxsize=1)
def _load_all() -> None:
    """Import every module in this package so each registers its method(s)."""
    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("base", "common"):
            importlib.import_module(f"{__name__}.{info.name}")


@lru_cache(maxsize=1)
def presets() -> dict[str, dict]:
    """Preset name -> {base, summary, fields}; every method has at least its own-name preset."""
    out: dict[str, dict] = {}
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        name = data.get("name", path.stem)
        out[name] = {"base": data.get("base", name), "summary": data.get("summary", ""),
                     "fields": data.get("fields") or {}, "requires": data.get("requires") or {}}
    return out


def registry() -> dict[str, Method]:
    _load_all()
    return dict(_REGISTRY)


def resolve(name: str) -> tuple[Method, dict]:
    """Method object and preset field values for a registered name or preset name."""
    _load_all()
    preset = presets().get(name)
    base = preset["base"] if preset else name
    if base not in _REGISTRY:
        known = sorted(set(_REGISTRY) | set(presets()))
        raise ConfigError(f"Unknown method {name!r}; choose one of: {', '.join(known)}.")
    return _REGISTRY[base], (preset["fields"] if preset else {})


def model_requirements(name: str) -> dict:
    """Model settings a preset implies (qlora: quantization nf4)."""
    return dict((presets().get(name) or {}).get("requires") or {})


def get_method(name: str) -> Method:
    return resolve(name)[0]


def method_config(raw: dict) -> MethodConfig:
    """Build a method config from {"name": ..., field: value, ...} (preset fields, then user's)."""
    raw = dict(raw)
    name = raw.pop("name", None) or "lora"
    method, preset_fields = resolve(str(name))
    values = {**preset_fields, **raw, "name": name}
    return build_dataclass(method.config_cls, values, "method")


def apply_method(model: nn.Module, cfg: MethodConfig) -> AppliedAdapter:
    """Apply the configured method to the model in place and remember it on the model."""
    method = get_method(cfg.name)
    info = attach(model, method, cfg)
    method.apply(model, cfg)
    from ..fused_mlp import fuse_mlps  # here, not at the top: fused_mlp uses methods/lora_fused.py
    fuse_norms(model)  # the engine's RMSNorm, gated MLP and RoPE: the same outputs, fewer saved bytes and ops
    fuse_mlps(model)
    fuse_rope(model)
    return info


def list_methods() -> list[dict]:
    """Every method and preset: name, base, category, mergeable, summary, fields with defaults."""
    rows = []
    for name, preset in sorted(presets().items()):
        try:
            method, fields = resolve(name)
        except ConfigError:
            continue
        cfg = method_config({"name": name})
        docs = [d | {"default": getattr(cfg, d["name"])} for d in field_docs(method.config_cls) if d["name"] != "name"]
        rows.append({"name": name, "base": method.name, "category": method.category,
                     "mergeable": method.mergeable, "peft_type": method.peft_type,
                     "cuda_graphs": method.graph_safe,
                     "cuda_graphs_unless": [f for f in method.host_random if hasattr(cfg, f)],
                     "summary": preset["summary"] or method.summary, "preset_fields": fields,
                     "requires": preset.get("requires") or {}, "fields": docs})
    return rows


def methods_without_preset() -> list[str]:
    """Registered methods lacking presets/methods/<name>.yaml (a test keeps this empty)."""
    return sorted(set(registry()) - set(presets()))


__all__ = ["Method", "MethodConfig", "AppliedAdapter", "register", "registry", "resolve", "get_method",
           "method_config", "apply_method", "applied", "list_methods", "presets"]
