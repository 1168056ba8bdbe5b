"""The background runner: one job at a time, stop within a step, status always true."""
from __future__ import annotations

import json
import os
import time

import pytest

from studio.config import load_config
from studio.errors import BusyError
from studio.rundir import RunDir, list_runs
from studio.runner import Runner, recover_stale


def cfg(steps=400):
    return load_config(None, ["model.name=tiny-llama", "model.device=cpu", "data.path=identity", "data.limit=64",
                              "data.max_length=64", f"train.max_steps={steps}", "train.batch_size=2"])


def wait_for(predicate, timeout=60.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_one_job_at_a_time_and_stop_keeps_a_checkpoint(tmp_path):
    runner = Runner(tmp_path / "runs")
    run = runner.start(cfg(), name="first")
    wait_for(lambda: len(run.metrics()) >= 2)
    with pytest.raises(BusyError, match="first"):
        runner.start(cfg(), name="second")
    assert runner.stop()
    assert runner.wait(60)
    status = run.status()
    assert status["state"] == "stopped"
    step = status["step"]
    assert step < 400 and run.checkpoints()[-1].name == f"step-{step}"
    assert [r.name for r in list_runs(tmp_path / "runs")] == ["first"]

    resumed = runner.start(None, resume_run=run.path)  # resume the stopped run in place
    wait_for(lambda: len(run.metrics()) >= step + 2)
    runner.stop()
    runner.wait(60)
    assert resumed.path == run.path
    steps = [r["step"] for r in run.metrics()]
    assert steps == list(range(1, len(steps) + 1))


def test_a_crash_leaves_a_failed_status_and_the_runner_usable(tmp_path):
    runner = Runner(tmp_path / "runs")
    bad = load_config(None, ["model.name=tiny-llama", "model.device=cpu", "data.path=does-not-exist.jsonl"])
    run = runner.start(bad)
    runner.wait(60)
    assert run.status()["state"] == "failed"
    assert "does-not-exist" in run.status()["error"] and runner.last_error == run.status()["error"]
    ok = runner.start(cfg(3))
    runner.wait(120)
    assert ok.status()["state"] == "done"


def test_runs_left_running_by_a_dead_process_are_marked_failed(tmp_path):
    run = RunDir.create(tmp_path / "runs", cfg(3))
    run.write_status("running")
    status = json.loads((run.path / "status.json").read_text())
    status["pid"] = 2 ** 22 + 12345  # no such process
    (run.path / "status.json").write_text(json.dumps(status))
    assert os.getpid() != status["pid"]
    recover_stale(tmp_path / "runs")
    assert run.status()["state"] == "failed" and "resume" in run.status()["error"]


def test_status_writes_from_two_threads_never_collide(tmp_path):
    """The trainer thread and the page's Stop update status.json at the same moment."""
    import threading
    run = RunDir.create(tmp_path / "runs", cfg(3))
    errors = []

    def hammer(state):
        try:
            for _ in range(200):
                run.write_status(state)
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)
    threads = [threading.Thread(target=hammer, args=(s,)) for s in ("running", "stopping")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and run.status()["state"] in ("running", "stopping")


def _models_alive() -> int:
    import gc

    import torch
    return sum(1 for o in gc.get_objects()
               if isinstance(o, torch.nn.Module) and type(o).__name__.endswith("ForCausalLM"))


@pytest.mark.parametrize("fails", [False, True], ids=["done", "failed mid-run"])
def test_a_finished_run_frees_its_model_at_once(tmp_path, monkeypatch, fails):
    """The model and optimizer sit in reference cycles: left to the cycle collector, a GPU kept their gigabytes
    after the run (bench --trainer's next row measured ~1 GB more on an H200). Done or failed mid-run (an
    exception's frames hold the step's tensors until the Runner drops it), the run frees them as it ends."""
    import gc

    import studio.trainer as trainer
    from studio.errors import StudioError
    if fails:
        def boom(*args, **kwargs):
            raise StudioError("Out of memory at step 1; lower the batch size.")
        monkeypatch.setattr(trainer, "clip_gradients", boom)
    gc.collect()
    before = _models_alive()
    gc.disable()  # only the run's own release may collect
    try:
        runner = Runner(tmp_path / "runs")
        run = runner.start(cfg(3))
        assert runner.wait(120)
        assert run.status()["state"] == ("failed" if fails else "done")
        assert _models_alive() == before
    finally:
        gc.enable()
