"""Process-wide state of the page: the workspace folders, the one Runner, and the one cached ChatModel.

Everything else the page shows is read back from the run directories, so a refresh (or a second
tab) sees the same runs. `init(workspace)` is called once by app.py before the page is built.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from studio.errors import StudioError
from studio.rundir import RunDir, list_runs, safe_name
from studio.runner import Runner


class Workspace:
    """workspace/runs, workspace/uploads, workspace/exports, workspace/preferences."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.runs = self.root / "runs"
        self.uploads = self.root / "uploads"
        self.exports = self.root / "exports"
        self.preferences = self.root / "preferences"
        for p in (self.runs, self.uploads, self.exports, self.preferences):
            p.mkdir(parents=True, exist_ok=True)

    def inside(self, path: str | Path, base: Path | None = None) -> Path:
        """Resolve `path` (relative to `base`, default the workspace) and refuse anything outside the workspace."""
        base = base or self.root
        p = Path(path).expanduser()
        p = (p if p.is_absolute() else base / p).resolve()
        if p != self.root and self.root not in p.parents:
            raise StudioError(f"{path} is outside the workspace {self.root}; choose a folder inside it.")
        return p

    def run(self, name: str) -> RunDir:
        """The run folder called `name` (refuses names that leave workspace/runs)."""
        if not name:
            raise StudioError("Pick a run first.")
        path = self.inside(safe_name(name), self.runs)
        if not (path / "config.yaml").is_file():
            raise StudioError(f"Run {name!r} does not exist (any more); refresh the runs list.")
        return RunDir(path)

    def run_names(self) -> list[str]:
        return [r.name for r in list_runs(self.runs)]


workspace: Workspace | None = None
runner: Runner | None = None

_chat_lock = threading.Lock()
_chat: dict[str, Any] = {"key": None, "model": None}


def init(root: str | Path) -> Workspace:
    """Create the workspace folders and the one Runner (marks runs left 'running' by a dead process failed)."""
    global workspace, runner
    workspace = Workspace(root)
    runner = Runner(workspace.runs)
    return workspace


def ws() -> Workspace:
    if workspace is None:
        raise RuntimeError("components.state.init(workspace) was not called")
    return workspace


def current_run() -> RunDir | None:
    """The run the Train tab watches: the runner's job (running or just ended), else the newest run."""
    if runner is not None and runner.active is not None and runner.active.path.is_dir():
        return runner.active
    runs = list_runs(ws().runs)
    return runs[0] if runs else None


def chat_model(run: RunDir, checkpoint: str | None = None, dtype: str = "auto"):
    """The ChatModel for (run, checkpoint, weights' dtype), loaded once; loading another frees the previous one."""
    from studio.chat import ChatModel
    key = f"{run.path}|{checkpoint or ''}|{dtype}"
    with _chat_lock:
        if _chat["key"] != key:
            _chat.update(key=None, model=None)  # drop the old model before loading the next
            folder = run.path / "checkpoints" / checkpoint if checkpoint else None
            _chat.update(key=key, model=ChatModel.from_run(run.path, folder, dtype=dtype))
        return _chat["model"]


def forget_chat_model(run: RunDir | None = None) -> None:
    with _chat_lock:
        if run is None or (_chat["key"] or "").startswith(f"{run.path}|"):
            _chat.update(key=None, model=None)


def save_preference(run_name: str, prompt: Any, chosen: str, rejected: str, **meta: Any) -> Path:
    """Append one preference pair (prompt, chosen, rejected) to workspace/preferences/<run>.jsonl."""
    path = ws().preferences / f"{safe_name(run_name)}.jsonl"
    row = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "time": time.time(), **meta}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
