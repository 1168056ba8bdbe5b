"""Export a run: its adapter folder (+ a zip of it) or a merged full model that plain transformers loads."""
from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, export_merged, load_adapter, zip_adapter
from .config import ModelConfig
from .errors import StudioError
from .rundir import RunDir


def export_run(run_dir: str | Path, out: str | Path, merge: bool = False, checkpoint: str | Path | None = None) -> Path:
    run = RunDir(run_dir)
    folder = Path(checkpoint) if checkpoint else run.adapter()
    if folder is None or not (folder / "adapter_config.json").is_file():
        raise StudioError(f"Run {run.name} has no finished adapter; pass --checkpoint runs/.../checkpoints/step-N.")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise StudioError(f"{out} exists and is not empty; choose a new folder so nothing is overwritten.")
    if not merge:
        out.mkdir(parents=True, exist_ok=True)
        for name in (CONFIG_NAME, WEIGHTS_NAME):  # a checkpoint's optimizer state stays behind
            shutil.copy2(folder / name, out / name)
        zip_adapter(folder, out.with_suffix(".zip"))
        return out
    from .models import load_model
    cfg = run.config()
    # Merging needs the base in 16/32-bit: a 4-bit base is reloaded unquantized for the export.
    mcfg = ModelConfig(**{**asdict(cfg.model), "quantization": "none", "device": "cpu",
                          "dtype": "float32" if cfg.model.dtype == "auto" else cfg.model.dtype})
    model, tok = load_model(mcfg, seed=cfg.train.seed)
    load_adapter(model, folder)
    return export_merged(model, tok, out)
