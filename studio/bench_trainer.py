"""A bench row run through the trainer, as a user's run goes: `python -m studio bench --trainer`.

The bench's own loop times the step alone (one batch on the device, losses read after the clock stops).
A user's run also collates and copies each batch, reads the loss and gradient norm, writes the run's
metrics and status and hands events to the page. This runs the row's settings through
`runner.execute` on text long enough to fill every row (a synthetic file, all tokens trained, so each
micro-batch is the row's batch x seq) and reports the steady pace of its steps from the metrics the run
wrote (their `time`, when each step was queued); its ratio to the loop's time is what the trainer adds.
"""
from __future__ import annotations

import json
import random
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from .bench_grid import Row


def runs_as_configured(row: Row) -> bool:
    """Whether a run config says all of the row's settings (the A/B switches are the bench's own)."""
    return row.triton and row.mlp_chunks and not row.packed and row.labels == "all"


def filler_text(seq: int, examples: int, seed: int = 0) -> list[str]:
    """Texts of more than seq random short words each: no tokenizer merges words across a space, so each
    text fills seq tokens."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(500)]
    return [" ".join(rng.choice(words) for _ in range(seq + 16)) for _ in range(examples)]


def trainer_config(row: Row, device: torch.device, data_file: Path, steps: int) -> Any:
    """The row's run config (bench.row_config) on data_file, `steps` optimizer steps, a metrics line each."""
    from .bench import row_config
    from .config import with_changes
    from .models import add_random_preset, model_presets
    twin = add_random_preset(f"bench-{row.shape}", model_presets()[row.shape]["config"])  # as the bench's own rows
    return with_changes(row_config(row), **{
        "model.name": twin, "model.device": device.type, "data.path": str(data_file),
        "data.format": "text", "data.max_length": row.seq, "train.max_steps": steps, "train.log_every": 1,
        "train.save_every": 0, "train.cuda_graphs": row.graphs, "train.lr": 1e-5})


def trainer_ms_per_step(row: Row, device: torch.device, warmup: int, steps: int) -> dict:
    """{trainer_ms_per_step, trainer_tokens_per_s, trainer_steps} of the row run by the trainer (the median time
    between the metrics' consecutive steps after warmup), or {trainer_error} when the run failed."""
    from .errors import StudioError
    from .rundir import RunDir
    from .runner import execute
    with tempfile.TemporaryDirectory(prefix="studio-bench-trainer-") as tmp:
        data = Path(tmp) / "filler.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in filler_text(row.seq, 2 * row.batch)))
        cfg = trainer_config(row, device, data, warmup + steps)
        run = RunDir.create(Path(tmp) / "runs", cfg)
        try:
            execute(run, cfg)
        except (StudioError, torch.OutOfMemoryError) as exc:
            return {"trainer_error": f"{type(exc).__name__}: {exc}"[:300]}
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        times = [r["time"] for r in run.metrics() if r["step"] >= warmup]
    periods = [b - a for a, b in zip(times, times[1:])]  # from one step's queuing to the next one's: the loop's pace
    if not periods:
        return {"trainer_error": "no timed steps"}
    ms = 1000 * statistics.median(periods)
    return {"trainer_ms_per_step": round(ms, 2), "trainer_tokens_per_s": round(1000 * row.batch * row.seq / ms, 1),
            "trainer_steps": len(periods)}


def with_trainer_time(ours: dict, row: Row, device: torch.device, warmup: int, steps: int) -> dict:
    """Our bench row with the trainer's time of the same row added, and its ratio to the loop's."""
    out = trainer_ms_per_step(row, device, warmup, steps)
    if "trainer_ms_per_step" in out and ours.get("ms_per_step"):
        out["trainer_vs_loop"] = round(out["trainer_ms_per_step"] / ours["ms_per_step"], 3)
    return ours | out
