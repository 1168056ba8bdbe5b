"""Reading dataset rows: shipped names, json/jsonl/csv/parquet files, folders of them, hub ids.

`load_rows(dcfg)` returns plain dicts (one per row), with `{placeholders}` filled from the dataset's
declared `template_vars` defaults (sidecar `<name>.yaml`, or a top-level `template_vars` key of a
.json file holding `{"template_vars": ..., "rows": [...]}`) overridden by `dcfg.template_vars`, and
cut to `dcfg.limit`. Every failure is a DatasetError naming the problem and the fix.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from .config import DataConfig
from .errors import DatasetError

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "presets" / "datasets"
SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
PLACEHOLDER = re.compile(r"\{(\w+)\}")


def shipped_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.jsonl"))


def sidecar(path: Path) -> dict:
    """The metadata next to a dataset file (`<stem>.yaml`), or {}."""
    meta = path.with_suffix(".yaml")
    if not meta.is_file():
        return {}
    try:
        data = yaml.safe_load(meta.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise DatasetError(f"{meta} is not valid YAML ({e}); fix or delete it.") from None
    return data if isinstance(data, dict) else {}


def dataset_info(name: str) -> dict:
    """Sidecar metadata of a shipped dataset (description, format, template_vars, heldout_questions...)."""
    if name not in shipped_names():
        raise DatasetError(f"{name!r} is not a shipped dataset; shipped: {', '.join(shipped_names())}.")
    return sidecar(SHIPPED_DIR / f"{name}.jsonl")


def dataset_choices() -> list[dict]:
    """Shipped datasets for the page: name, description, rows, format (test splits are left out)."""
    out = []
    for name in shipped_names():
        path = SHIPPED_DIR / f"{name}.jsonl"
        meta = sidecar(path)
        if meta.get("split_of"):
            continue
        with open(path, encoding="utf-8") as f:
            rows = sum(1 for line in f if line.strip())
        out.append({"name": name, "description": meta.get("description", ""), "rows": rows,
                    "format": meta.get("format", "auto"), "test_split": meta.get("test_split")})
    return out


def load_rows(dcfg: DataConfig) -> list[dict]:
    """All rows of dcfg.path as dicts, placeholders filled, cut to dcfg.limit."""
    rows, defaults = _read_source(dcfg.path, dcfg.limit)
    rows = rows[:dcfg.limit] if dcfg.limit > 0 else rows
    if not rows:
        raise DatasetError(f"Dataset {dcfg.path!r} has no rows; add examples or point data.path at another dataset.")
    values = {**defaults, **(dcfg.template_vars or {})}
    if defaults and set(dcfg.template_vars or {}) - set(defaults):
        unknown = sorted(set(dcfg.template_vars) - set(defaults))
        raise DatasetError(f"Unknown template variable(s) {unknown} for {dcfg.path!r}; it uses "
                           f"{', '.join(sorted(defaults))}.")
    if values:
        rows = [fill_placeholders(r, values) for r in rows]
    return rows


def fill_placeholders(value: Any, values: dict) -> Any:
    """Replace {name} in every string of a row by values[name]; unknown {braces} are left as they are."""
    if isinstance(value, str):
        return PLACEHOLDER.sub(lambda m: str(values[m[1]]) if m[1] in values else m[0], value)
    if isinstance(value, list):
        return [fill_placeholders(v, values) for v in value]
    if isinstance(value, dict):
        return {k: fill_placeholders(v, values) for k, v in value.items()}
    return value


def _read_source(ref: str, limit: int) -> tuple[list[dict], dict]:
    """(rows, template_vars defaults) of a shipped name, a file, a folder or a hub id."""
    ref = str(ref).strip()
    if not ref:
        raise DatasetError(f"data.path is empty; use a shipped dataset ({', '.join(shipped_names())}) or a file.")
    if ref in shipped_names():
        path = SHIPPED_DIR / f"{ref}.jsonl"
        return read_file(path), dict(sidecar(path).get("template_vars") or {})
    path = Path(ref).expanduser()
    if not path.exists() and path.suffix == ".jsonl" and path.stem in shipped_names() and len(path.parts) == 1:
        return _read_source(path.stem, limit)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
        if not files:
            raise DatasetError(f"Folder {path} holds no .json, .jsonl, .csv or .parquet files; add some or "
                               f"point data.path at a file.")
        rows: list[dict] = []
        for f in files:
            rows.extend(read_file(f))
        return rows, dict(sidecar(files[0]).get("template_vars") or {})
    if path.is_file():
        defaults = dict(sidecar(path).get("template_vars") or {})
        rows = read_file(path, defaults)
        return rows, defaults
    if path.suffix.lower() in SUFFIXES or path.is_absolute() or ref.startswith(".") or "\\" in ref:
        raise DatasetError(f"Dataset file {path} does not exist; check data.path.")
    if ref.count("/") == 1:
        return read_hub(ref, limit), {}
    raise DatasetError(f"{ref!r} is not a shipped dataset, a file, a folder or a hub id (owner/name); "
                       f"shipped: {', '.join(shipped_names())}.")


def read_file(path: Path, defaults: dict | None = None) -> list[dict]:
    """Rows of one .json/.jsonl/.csv/.parquet file. A .json object may carry `template_vars` (into defaults)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = _read_jsonl(path)
        elif suffix == ".json":
            rows = _read_json(path, defaults)
        elif suffix == ".csv":
            import pandas as pd
            rows = _clean(pd.read_csv(path, dtype=str, keep_default_na=False).to_dict("records"))
        elif suffix == ".parquet":
            import pandas as pd
            rows = _clean(pd.read_parquet(path).to_dict("records"))
        else:
            raise DatasetError(f"{path} has an unsupported type {suffix or '(none)'}; use .json, .jsonl, .csv "
                               f"or .parquet.")
    except DatasetError:
        raise
    except UnicodeDecodeError:
        raise DatasetError(f"{path} is not UTF-8 text; save it as UTF-8 and retry.") from None
    except Exception as e:  # pandas/pyarrow parse errors come in many classes
        first = str(e).splitlines()[0][:160] if str(e) else e.__class__.__name__
        raise DatasetError(f"Could not read {path} ({first}); check that it is a valid {suffix[1:]} file.") from None
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DatasetError(f"Row {bad + 1} of {path} is a {type(rows[bad]).__name__}, not an object with "
                           f"named columns; write one JSON object per row.")
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DatasetError(f"Line {n} of {path} is not valid JSON ({e.msg}); fix that line.") from None
    return rows


def _read_json(path: Path, defaults: dict | None) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and "\n{" in text:  # JSON lines saved as .json
            return _read_jsonl(path)
        raise DatasetError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix it.") from None
    if isinstance(data, dict):
        if defaults is not None and isinstance(data.get("template_vars"), dict):
            defaults.update({k: v for k, v in data["template_vars"].items() if k not in defaults})
        for key in ("rows", "data", "train", "examples"):
            if isinstance(data.get(key), list):
                return data[key]
        raise DatasetError(f"{path} holds a JSON object without a list of rows; use a list of objects or "
                           f"{{\"rows\": [...]}}.")
    if not isinstance(data, list):
        raise DatasetError(f"{path} must hold a list of row objects; got a {type(data).__name__}.")
    return data


def _clean(rows: list[dict]) -> list[dict]:
    """Table cells to plain Python: NaN -> None, numpy scalars/arrays -> Python values and lists."""
    def plain(v: Any) -> Any:
        if hasattr(v, "tolist"):
            v = v.tolist()
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return [{str(k): plain(v) for k, v in r.items()} for r in rows]


def read_hub(ref: str, limit: int = 0) -> list[dict]:
    """The train split of a hub dataset: from the local cache first, then the hub unless HF_HUB_OFFLINE=1."""
    import datasets
    try:
        ds = _hub_cached(ref)
    except Exception:
        ds = None
    if ds is None:
        if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "TRUE", "YES") or \
                os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "TRUE", "YES"):
            raise DatasetError(f"Hub dataset {ref} is not in the local cache and offline mode is on; download it on "
                               f"a connected machine or point data.path at a local file.")
        try:
            ds = datasets.load_dataset(ref, split="train")
        except Exception as e:
            first = str(e).splitlines()[0][:160] if str(e) else e.__class__.__name__
            raise DatasetError(f"Could not load hub dataset {ref} ({first}); it is not in the local cache and the "
                               f"hub is unreachable or has no such dataset: check the id, download it on a "
                               f"connected machine, or point data.path at a local file.") from None
    if limit > 0:
        ds = ds.select(range(min(limit, len(ds))))
    return _clean(ds.to_list())


def _hub_cached(ref: str) -> Any:
    """load_dataset with the hub switched off for the call, so a cached dataset loads with no network wait."""
    import datasets
    import huggingface_hub.constants as hub_constants
    saved = hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(ref, split="train")
    finally:
        hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved
