"""The run directory: the contract between engine, page, CLI and users (see DESIGN.md).

runs/<run-name>/ config.yaml, status.json, metrics.jsonl, estimate.json, events.log,
checkpoints/step-<N>/, adapter/. Everything the page shows about a run is read from here, so a
refresh or a restart of the page never loses a run. Writes are atomic (temp file + rename).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from .config import RunConfig, load_config, save_config
from .errors import StudioError

STATES = ("queued", "running", "stopping", "stopped", "done", "failed")


_STATUS_LOCK = threading.Lock()  # the trainer thread and the page's Stop both update status.json


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def safe_name(name: str) -> str:
    """A run name usable as one folder name (no path separators or dots at the start)."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip(".-")
    if not cleaned:
        raise StudioError(f"Run name {name!r} has no usable characters; use letters, digits, - or _.")
    return cleaned[:80]


class RunDir:
    """One run's folder, with typed readers and writers for each file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def create(cls, runs_dir: str | Path, cfg: RunConfig, name: str | None = None) -> "RunDir":
        base = safe_name(name or cfg.name or f"{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        runs_dir = Path(runs_dir)
        runs_dir.mkdir(parents=True, exist_ok=True)
        path, n = runs_dir / base, 1
        while path.exists():
            n += 1
            path = runs_dir / f"{base}-{n}"
        path.mkdir()
        run = cls(path)
        save_config(cfg, path / "config.yaml")
        run.write_status("queued")
        return run

    @property
    def name(self) -> str:
        return self.path.name

    def config(self) -> RunConfig:
        return load_config(self.path / "config.yaml")

    def write_status(self, state: str, error: str | None = None, **extra: Any) -> None:
        assert state in STATES, state
        with _STATUS_LOCK:  # read-modify-write: one writer at a time
            current = self.status()
            current.update(extra)
            current.update(state=state, error=error, updated=time.time(), pid=os.getpid())
            current.setdefault("created", time.time())
            _atomic_write(self.path / "status.json", json.dumps(current, indent=1))

    def status(self) -> dict:
        try:
            return json.loads((self.path / "status.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def append_metrics(self, row: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row, default=float) + "\n")

    def keep_metrics_through(self, step: int) -> None:
        """Drop the metric rows after `step` (a resume from that step's checkpoint). The file is replaced
        whole, never truncated in place: the page may be reading it right now."""
        kept = [m for m in self.metrics() if m.get("step", 0) <= step]
        _atomic_write(self.path / "metrics.jsonl", "".join(json.dumps(m, default=float) + "\n" for m in kept))

    def metrics(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written right now
                continue
        return rows

    def log(self, message: str) -> None:
        with open(self.path / "events.log", "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {message}\n")

    def log_text(self, last: int = 200) -> str:
        path = self.path / "events.log"
        return "\n".join(path.read_text().splitlines()[-last:]) if path.is_file() else ""

    def write_json(self, name: str, data: dict) -> None:
        _atomic_write(self.path / name, json.dumps(data, indent=1, default=str))

    def read_json(self, name: str) -> dict | None:
        try:
            return json.loads((self.path / name).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def checkpoints(self) -> list[Path]:
        folder = self.path / "checkpoints"
        found = [p for p in folder.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def adapter(self) -> Path | None:
        path = self.path / "adapter"
        return path if (path / "adapter_config.json").is_file() else None

    def summary(self) -> dict:
        """One row for the runs table."""
        status, metrics = self.status(), self.metrics()
        losses = [m["loss"] for m in metrics if "loss" in m]
        evals = [m["eval_loss"] for m in metrics if m.get("eval_loss") is not None]
        try:
            cfg = self.config()
            method, model = cfg.method.name, cfg.model.name
        except StudioError:
            method = model = "?"
        created, updated = status.get("created"), status.get("updated")
        return {"name": self.name, "state": status.get("state", "?"), "method": method, "model": model,
                "step": metrics[-1]["step"] if metrics else 0, "loss": losses[-1] if losses else None,
                "eval_loss": evals[-1] if evals else None,
                "duration_s": round(updated - created, 1) if created and updated else None,
                "error": status.get("error"), "path": str(self.path)}

    def delete(self) -> None:
        if self.status().get("state") in ("running", "stopping"):
            raise StudioError(f"Run {self.name} is still running; stop it before deleting.")
        shutil.rmtree(self.path)


def list_runs(runs_dir: str | Path) -> list[RunDir]:
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    runs = [RunDir(p) for p in runs_dir.iterdir() if (p / "config.yaml").is_file()]
    return sorted(runs, key=lambda r: r.status().get("created", 0), reverse=True)
