"""RunConfig = ModelConfig + DataConfig + MethodConfig + TrainConfig, with YAML load/save.

Every field has a default and a one-line help (dataclass metadata), so the page can render a form
and the CLI can accept `--set section.key=value` for any of them. Validation raises ConfigError
with a message that names the bad key or value and what would work instead.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


def opt(default: Any, help: str, choices: tuple | None = None, **meta: Any) -> Any:
    """A dataclass field with a default, a help line and optional choices (drives forms and docs)."""
    meta = {"help": help, "choices": choices, **meta}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = opt("gemma-3-270m", "Preset name, local folder, hub id, or a .gguf file")
    dtype: str = opt("auto", "Weights dtype (auto = bf16 on CUDA that supports it, else fp32)",
                     ("auto", "float32", "bfloat16", "float16"))
    quantization: str = opt("none", "Load the base in 4-bit NF4 or 8-bit (bitsandbytes)",
                            ("none", "nf4", "int8"))
    compute_dtype: str = opt("auto", "Compute dtype of a quantized base (auto = bf16 if supported)",
                             ("auto", "float32", "bfloat16", "float16"))
    device: str = opt("auto", "Where to run (auto = cuda, else mps, else cpu)",
                      ("auto", "cpu", "cuda", "mps"))
    trust_remote_code: bool = opt(False, "Run model code shipped with a hub repo (only if you trust it)")
    attn_implementation: str = opt("sdpa", "Attention kernel", ("sdpa", "eager"))
    task: str = opt("causal_lm", "causal_lm (chat / text) or classification (a head over data.columns.label)",
                    ("causal_lm", "classification"))


@dataclass
class DataConfig:
    path: str = opt("identity", "Shipped dataset name, a json/jsonl/csv/parquet file, a folder, or a hub id")
    format: str = opt("auto", "Row format (auto = detect)",
                      ("auto", "alpaca", "sharegpt", "messages", "text", "classification"))
    columns: dict = opt({}, "Column mapping, e.g. {instruction: question, output: answer}")
    max_length: int = opt(512, "Tokens per example; longer examples are truncated")
    eval_fraction: float = opt(0.0, "Share of examples held out for evaluation (0 = none)")
    packing: bool = opt(False, "Pack several short examples into one sequence (each attends only to itself)")
    system_prompt: str = opt("", "System prompt added to every conversation (empty = none)")
    template_vars: dict = opt({}, "Values for {placeholders} in shipped datasets, e.g. {name: Nova}")
    limit: int = opt(0, "Use only the first N examples (0 = all)")


@dataclass
class TrainConfig:
    max_steps: int = opt(0, "Optimizer steps (0 = run for `epochs`)")
    epochs: float = opt(1.0, "Passes over the training data when max_steps is 0")
    batch_size: int = opt(4, "Examples per micro-batch")
    grad_accum: int = opt(1, "Micro-batches per optimizer step")
    lr: float = opt(2e-4, "Peak learning rate")
    scheduler: str = opt("cosine", "Learning-rate schedule after warmup", ("cosine", "linear", "constant"))
    warmup_steps: int = opt(0, "Steps of linear warmup")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "Clip the gradient norm (0 = no clipping)")
    optimizer: str = opt("adamw", "Optimizer (8-bit and paged ones need bitsandbytes)",
                         ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit", "sgd"))
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory")
    checkpoint_fraction: float = opt(1.0, "Share of layers recomputed when checkpointing (0.5 = the bottom half: "
                                          "faster, more memory; 1 = all but the top one where keeping it costs "
                                          "no memory)")
    checkpoint_budget_gb: float = opt(0.0, "With gradient checkpointing: recompute only as many layers as keep the "
                                           "memory estimate within this many GB (e.g. your card's; the fastest "
                                           "checkpointing that fits; 0 = checkpoint_fraction decides)")
    offload_checkpoints: bool = opt(False, "With gradient checkpointing on CUDA: keep the checkpointed layers' inputs "
                                           "in pinned CPU RAM, fetched back one layer ahead in backward")
    compile: bool = opt(False, "torch.compile each decoder layer (slow first step, faster after; mainly for CUDA)")
    cuda_graphs: str = opt("auto", "CUDA: replay each micro-batch as one captured graph (one per length, padded to "
                                   "a multiple of 128 tokens); auto = where a micro-batch's work (parameters x "
                                   "tokens) is below a 3B model's at 4 x 2,048, so its step waits on kernel launches", ("auto", "on", "off"))
    seed: int = opt(42, "Seed for init, data order and dropout")
    eval_every: int = opt(0, "Evaluate every N steps (0 = only at the end if there is an eval split)")
    save_every: int = opt(0, "Save a checkpoint every N steps (0 = only at the end)")
    log_every: int = opt(1, "Write a metrics line every N steps")
    loss_chunk: int = opt(1024, "Positions per chunk of the loss (never all fp32 logits at once)")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: Any = None  # a MethodConfig subclass instance, resolved through the method registry
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = ""  # run name; empty = generated from method and time

    def __post_init__(self) -> None:
        if self.method is None:
            from .methods import method_config
            self.method = method_config({"name": "lora"})

    def to_dict(self) -> dict:
        out = {k: dataclasses.asdict(getattr(self, k)) for k in ("model", "data", "method", "train")}
        out["name"] = self.name
        return out

    @classmethod
    def from_dict(cls, raw: dict | None) -> "RunConfig":
        from .methods import method_config
        raw = dict(raw or {})
        unknown = set(raw) - {"model", "data", "method", "train", "name"}
        if unknown:
            raise ConfigError(f"Unknown config section(s) {sorted(unknown)}; use model, data, method, train, name.")
        method_raw = raw.get("method") or {"name": "lora"}
        if isinstance(method_raw, str):
            method_raw = {"name": method_raw}
        model_raw = _with_requirements(dict(raw.get("model") or {}), str(method_raw.get("name") or "lora"))
        return cls(
            model=build_dataclass(ModelConfig, model_raw, "model"),
            data=build_dataclass(DataConfig, raw.get("data"), "data"),
            method=method_config(method_raw),
            train=build_dataclass(TrainConfig, raw.get("train"), "train"),
            name=str(raw.get("name") or ""),
        )


def _with_requirements(model_raw: dict, method_name: str) -> dict:
    """Apply what a method preset implies for the model (qlora -> quantization nf4) unless the config
    says otherwise; a contradiction (qlora with quantization none) is an error, not a silent LoRA."""
    from .methods import model_requirements
    for key, value in model_requirements(method_name).items():
        given = model_raw.get(key)
        if given is None:
            model_raw[key] = value
        elif given != value:
            raise ConfigError(f"Method {method_name} needs model.{key}={value} (got {given}); set it, or pick "
                              f"a method without that requirement (e.g. lora).")
    return model_raw


def build_dataclass(cls: type, raw: dict | None, section: str) -> Any:
    """Build `cls` from a dict, rejecting unknown keys and values of the wrong type."""
    raw = dict(raw or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise ConfigError(f"Unknown key(s) {unknown} in `{section}`; valid keys: {', '.join(fields)}.")
    values = {k: coerce(v, fields[k], section) for k, v in raw.items()}
    return cls(**values)


def coerce(value: Any, f: dataclasses.Field, section: str) -> Any:
    """Check and convert one value to the field's type; choices are enforced."""
    kind = field_kind(f)
    where = f"`{section}.{f.name}`"
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                value = value.lower() in ("true", "yes", "1")
            if not isinstance(value, bool):
                raise TypeError
        elif kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            value = int(value)
        elif kind is float:
            if isinstance(value, bool):
                raise TypeError
            value = float(value)
        elif kind is str:
            if isinstance(value, bool) and {"on", "off"} <= set(f.metadata.get("choices") or ()):
                value = "on" if value else "off"  # a yes/no switch grown an "auto" keeps YAML's true/false
            if value is None:
                value = ""
            if not isinstance(value, (str, int, float)):
                raise TypeError
            value = str(value)
        elif kind is dict:
            if value in (None, ""):
                value = {}
            if not isinstance(value, dict):
                raise TypeError
        elif kind is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if value is None:
                value = []
            if not isinstance(value, (list, tuple)):
                raise TypeError
            value = list(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be {kind.__name__ if kind else 'valid'}, got {value!r}.") from None
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, choices))}; got {value!r}.")
    return value


def field_kind(f: dataclasses.Field) -> type | None:
    """The plain Python type behind a field annotation (str | list -> None means 'any')."""
    ann = f.type
    if isinstance(ann, str):
        ann = {"str": str, "int": int, "float": float, "bool": bool, "dict": dict, "list": list}.get(
            ann.split("[")[0].strip(), None)
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        return None
    if origin is not None:
        ann = origin
    return ann if ann in (str, int, float, bool, dict, list) else None


def parse_set(assignments: list[str] | None) -> dict:
    """Turn ["train.lr=1e-4", "method.target_modules=[q_proj,v_proj]"] into a nested dict (YAML values)."""
    out: dict = {}
    for item in assignments or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r} must look like section.key=value, e.g. train.lr=1e-4.")
        key, raw = item.split("=", 1)
        section, name = key.split(".", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.setdefault(section, {})[name] = value
    return out


def merge_dicts(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "columns" else v
    return out


def with_changes(run_cfg: RunConfig, **changes: Any) -> RunConfig:
    """A copy of run_cfg with section.key changes, e.g. with_changes(cfg, **{"train.batch_size": 8})."""
    new = copy.deepcopy(run_cfg)
    for key, value in changes.items():
        section, name = key.split(".", 1)
        setattr(getattr(new, section), name, value)
    return new


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or defaults when path is None) and apply --set overrides."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"Config file {p} does not exist; pass a YAML file such as presets/runs/quickstart.yaml.")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML ({e.__class__.__name__}); fix the line it names: {e}.") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p} must hold a mapping with sections model, data, method, train.")
    sets = parse_set(overrides)
    if "method" in sets and isinstance(raw.get("method"), str):
        raw["method"] = {"name": raw["method"]}
    return RunConfig.from_dict(merge_dicts(raw, sets))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def field_docs(cls: type) -> list[dict]:
    """Name, type, default, help and choices of each field: what forms, CLI help and docs render."""
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kind = field_kind(f)
        rows.append({"name": f.name, "type": kind.__name__ if kind else "any", "default": default,
                     "help": f.metadata.get("help", ""), "choices": f.metadata.get("choices")})
    return rows
