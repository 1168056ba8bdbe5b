"""Adapters on disk in peft's format; merge into the base; export a merged full model.

An adapter folder holds adapter_config.json (with `peft_type`) and adapter_model.safetensors
(metadata {"format": "pt"}, keys `base_model.model.<module path>.<name>`). Where peft has the
method, files are exactly what peft writes and reads; other methods use the same two files with
our own peft_type. Safetensors only: nothing here unpickles.
"""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import ConfigError, StudioError
from .methods import applied, apply_method, registry, resolve

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def save_adapter(model: nn.Module, folder: str | Path, extra_config: dict | None = None) -> Path:
    """Write the applied method's adapter to `folder` (written to a temp name, then moved in place)."""
    info = applied(model)
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = info.method.adapter_state_dict(model)
    from .tasks import head_state  # classification heads trained alongside the method (tasks.py)
    head = head_state(model)
    state = {**state, **head}
    # Keys already starting with "base_model." are peft's model-level keys (e.g. VeRA's shared
    # `base_model.vera_A`) and are written as they are.
    # Methods whose peft keys are bare (soft prompts: `prompt_embeddings`) set file_key_prefix = "".
    prefix = getattr(info.method, "file_key_prefix", PREFIX)
    tensors = {(k if k.startswith("base_model.") else prefix + k): v.detach().to("cpu").contiguous().clone()
               for k, v in state.items()}
    save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
    config = info.method.adapter_config(model, info.cfg)
    config.setdefault("base_model_name_or_path", getattr(model, "studio_model_ref", None))
    if head:
        config["studio_task_head"] = sorted(head)
    config.update(extra_config or {})
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def read_adapter_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise StudioError(f"{folder} has no {CONFIG_NAME}; pick a run's adapter/ or checkpoints/step-N/ folder.")
    return json.loads(path.read_text())


def method_for_adapter(config: dict):
    """Our Method for an adapter config written by us or by peft."""
    name = config.get("studio_method")
    if name:
        return resolve(name)[0]
    peft_type = str(config.get("peft_type", "")).upper()
    candidates = [m for m in registry().values() if (m.peft_type or "").upper() == peft_type]
    if not candidates:
        raise ConfigError(f"Adapter type {peft_type or '?'} is not supported by the studio; supported: "
                          f"{', '.join(sorted({m.peft_type for m in registry().values() if m.peft_type}))}.")
    exact = [m for m in candidates if m.name.upper() == peft_type]
    return (exact or candidates)[0]


def load_adapter_state_file(folder: str | Path) -> dict[str, torch.Tensor]:
    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        if (Path(folder) / "adapter_model.bin").is_file():
            raise StudioError("This adapter is a pickle (.bin) file; the studio loads safetensors only. Re-save it "
                              "with safe_serialization=True.")
        raise StudioError(f"{folder} has no {WEIGHTS_NAME}.")
    state = load_file(path)
    out = {}
    for key, value in state.items():
        key = key[len(PREFIX):] if key.startswith(PREFIX) else key
        out[key.replace(".default.", ".")] = value
    return out


def load_adapter(model: nn.Module, folder: str | Path) -> Any:
    """Apply the adapter's method (from its config) to a base model and load its tensors."""
    config = read_adapter_config(folder)
    method = method_for_adapter(config)
    cfg = method.config_from_adapter(config)
    info = apply_method(model, cfg)
    state = load_adapter_state_file(folder)
    device = next(model.parameters()).device
    head_names = config.get("studio_task_head") or []  # a classification head saved with the adapter
    head = {k: state.pop(k) for k in head_names if k in state}
    info.method.load_adapter_state(model, {k: v.to(device) for k, v in state.items()})
    if head_names:
        from .tasks import load_head_state
        load_head_state(model, head_names, head)
    return info


def unwrap(model: nn.Module) -> nn.Module:
    """Replace merged wrapper modules by plain ones so the model saves like the original architecture."""
    for name, module in list(model.named_modules()):
        if not name:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if hasattr(module, "modules_to_save") and isinstance(module.modules_to_save, nn.Module):
            setattr(parent, child, module.modules_to_save)
        elif hasattr(module, "base_layer") and getattr(module, "merged", False):
            setattr(parent, child, module.base_layer)
    for p in model.parameters():
        p.requires_grad_(False)
    if hasattr(model, "studio_adapter"):
        del model.studio_adapter
    return model


def export_merged(model: nn.Module, tokenizer: Any, out: str | Path) -> Path:
    """Merge the applied adapter into the (16/32-bit) base and save a plain transformers model folder."""
    info = applied(model)
    if not info.method.mergeable:
        raise ConfigError(f"{info.cfg.name} cannot be merged into the base; export the adapter (without --merge).")
    info.method.merge(model)
    unwrap(model)
    _check_plain_architecture(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _check_plain_architecture(model: nn.Module) -> None:
    """A merged model must have exactly the tensors its config declares, or reloading it silently drops
    some (e.g. a merged shift adds biases to layers that the architecture builds without one)."""
    with torch.device("meta"):
        plain = type(model)(model.config)
    want = set(plain.state_dict())
    extra = sorted(set(model.state_dict()) - want)
    if extra:
        raise ConfigError(f"The merged model has tensors its architecture does not declare ({extra[0]}, ... "
                          f"{len(extra)} in all), so a plain reload would lose them; export the adapter instead, "
                          f"or train without that option (e.g. ssf with shift: false).")


def zip_adapter(folder: str | Path, zip_path: str | Path) -> Path:
    """The adapter folder as a zip (the page offers it as a download)."""
    folder, zip_path = Path(folder), Path(zip_path)
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in (CONFIG_NAME, WEIGHTS_NAME):  # the adapter only, not a checkpoint's optimizer state
            zf.write(folder / name, name)
    return zip_path
