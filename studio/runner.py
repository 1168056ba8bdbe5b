"""The background job: one training run at a time in a thread, with a stop Event and an event queue.

Everything is written to the run directory as it happens (status.json always true, also after a
crash: failed + message), so the page can reattach after a refresh and the CLI shows the same run.
`execute()` is the one function that drives the trainer and writes files; the CLI calls it in the
foreground, the page through Runner in a thread.
"""
from __future__ import annotations

import gc
import os
import queue
import threading
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from .config import RunConfig
from .errors import BusyError, StudioError
from .rundir import RunDir, list_runs


def _write_estimate(run: RunDir, cfg: RunConfig, lengths: list[int] | None = None) -> None:
    """estimate.json before the run: from max_length at first, then from the real example lengths."""
    from .memory import estimate
    from .trainer import use_cpu
    try:
        est = estimate(cfg, device="cpu" if use_cpu(cfg) else "cuda", dataset_lengths=lengths or None)
        run.write_json("estimate.json", est.to_dict())
    except Exception as e:  # an estimate must never stop a run
        run.log(f"memory estimate unavailable: {e}")


def _record_measured(run: RunDir, peak: int) -> None:
    """Put the measured peak next to the estimate (CUDA: max allocated + the CUDA context)."""
    from .memory import measured_vs_estimate
    est = run.read_json("estimate.json")
    if not est or not peak:
        return
    est["measured"] = measured_vs_estimate(est, peak + int(est.get("context") or 0))
    run.write_json("estimate.json", est)


def execute(run: RunDir, cfg: RunConfig, stop: threading.Event | None = None, resume: bool = False,
            on_event: Callable[[dict], None] | None = None) -> dict:
    """Train `cfg` into `run`, writing status, metrics, log, checkpoints and adapter. Returns the last event."""
    from .trainer import process_state, train
    if not process_state(cfg).is_main_process:  # data-parallel workers train; only the main process writes
        last: dict = {}
        for last in train(cfg, run.path, stop=stop, resume_from=run.checkpoints()[-1] if resume else None):
            if on_event is not None:
                on_event(last)
        return last
    resume_from = None
    if resume:
        points = run.checkpoints()
        if not points:
            raise StudioError(f"Run {run.name} has no checkpoint to resume from; start it again instead.")
        resume_from = points[-1]
        step = int(resume_from.name.split("-")[1])
        run.keep_metrics_through(step)
    else:
        _write_estimate(run, cfg)
    run.write_status("running", error=None)
    run.log(("Resuming" if resume else "Starting") + f" {cfg.method.name} on {cfg.model.name}")
    last: dict = {}
    peak = 0
    try:
        for event in train(cfg, run.path, stop=stop, resume_from=resume_from):
            last = event
            kind = event["type"]
            if kind == "step":
                every = max(1, cfg.train.log_every)
                if event["step"] % every == 0 or "eval_loss" in event or event["step"] == event["total_steps"]:
                    run.append_metrics({k: v for k, v in event.items() if k not in ("type", "total_steps")})
                peak = max(peak, event.get("peak_mem_bytes") or 0)
                state = "stopping" if stop is not None and stop.is_set() else "running"
                run.write_status(state, total_steps=event["total_steps"], step=event["step"])
            elif kind == "start":
                if not resume:
                    _write_estimate(run, cfg, event.get("lengths"))
                run.write_status("running", total_steps=event["total_steps"], step=event["start_step"],
                                 data_stats=event["data_stats"])
                run.log(f"{event['train_examples']} training / {event['eval_examples']} eval examples, "
                        f"{event['total_steps']} steps")
            elif kind in ("status", "checkpoint"):
                run.log(event.get("message") or f"checkpoint at step {event['step']}: {event['path']}")
            elif kind == "stopped":
                run.log(f"Stopped at step {event['step']}; checkpoint saved.")
                run.write_status("stopped", step=event["step"])
            elif kind == "done":
                run.log("Done; adapter saved.")
                run.write_status("done", step=event["step"])
            if on_event is not None:
                on_event(event)
    except StudioError as e:
        run.log(f"Failed: {e}")
        run.write_status("failed", error=str(e))
        raise
    except Exception as e:  # an unexpected crash still leaves a true status
        run.log("Crashed:\n" + traceback.format_exc())
        run.write_status("failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        _record_measured(run, peak)
        release_memory()  # an exception in flight keeps its frames' tensors: the Runner releases again after it
    return last


def release_memory() -> None:
    """Free what a finished run held: its model and optimizer sit in reference cycles (hooks, wrappers) that
    only the cycle collector frees, and until it ran a GPU kept their gigabytes from the next run or the chat;
    then torch's cached blocks go back to the driver."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def recover_stale(runs_dir: str | Path) -> None:
    """Runs marked running by a process that no longer exists are marked failed (resumable)."""
    for run in list_runs(runs_dir):
        status = run.status()
        if status.get("state") in ("running", "stopping", "queued") and not _alive(status.get("pid")):
            run.write_status("failed", error="The studio stopped while this run was training; resume it from "
                                             "its last checkpoint.")


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


class Runner:
    """One job at a time in a background thread; events go to a queue and to the run directory."""

    def __init__(self, runs_dir: str | Path):
        self.runs_dir = Path(runs_dir)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.active: RunDir | None = None
        self.events: queue.Queue = queue.Queue(maxsize=10000)
        self.last_error: str | None = None
        recover_stale(self.runs_dir)

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, cfg: RunConfig, name: str | None = None, resume_run: str | Path | None = None) -> RunDir:
        with self._lock:
            if self.busy():
                raise BusyError(f"Run {self.active.name} is still training; stop it or wait for it to finish "
                                f"before starting another.")
            run = RunDir(resume_run) if resume_run else RunDir.create(self.runs_dir, cfg, name)
            if resume_run:
                cfg = run.config()
            self._stop = threading.Event()
            self.active = run
            self.last_error = None
            self._thread = threading.Thread(target=self._work, args=(run, cfg, bool(resume_run)),
                                            name=f"train-{run.name}", daemon=True)
            self._thread.start()
            return run

    def _work(self, run: RunDir, cfg: RunConfig, resume: bool) -> None:
        try:
            execute(run, cfg, self._stop, resume, on_event=self._push)
        except Exception as e:  # execute() already wrote status.json; keep the message for the page
            self.last_error = str(e)
        else:
            return  # execute() released the run's memory
        release_memory()  # the exception's frames (a failed step's tensors) are gone now

    def _push(self, event: dict) -> None:
        try:
            self.events.put_nowait(event)
        except queue.Full:
            pass

    def stop(self) -> bool:
        """Ask the running job to stop after its current micro-batch (it saves a checkpoint)."""
        if not self.busy() or self.active is None:
            return False
        self.active.write_status("stopping")
        self._stop.set()
        return True

    def wait(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.busy()
