"""studio/host_ahead.py: a step's numbers read a step late, batches copied without waiting; and the trainer
run that way (as on CUDA), which must write the same metrics, checkpoints and stops as reading at once."""
from __future__ import annotations

import json
import time

import pytest
import torch

from studio import host_ahead
from studio.bench_grid import Row
from studio.bench_trainer import filler_text, runs_as_configured, trainer_config, trainer_ms_per_step
from studio.config import RunConfig
from studio.data import build_datasets
from studio.host_ahead import StepReadings, to_device
from studio.models import load_tokenizer, model_presets
from studio.runner import execute
from tests.test_trainer import losses, run, run_stopped_after, tiny_cfg

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def read_late(monkeypatch):
    """The CPU's steps read a step late, as a GPU's are."""
    monkeypatch.setattr(host_ahead, "READ_LATE_ON", {"cpu", "cuda"})


@pytest.mark.parametrize("device", DEVICES)
def test_a_step_is_handed_out_once_the_next_one_is_queued(read_late, device):
    readings = StepReadings(torch.device(device))
    t0 = time.perf_counter() - 3.0
    loss = torch.tensor(2.5, device=device)
    first = {"step": 1}
    readings.add(first, {"loss": loss, "grad_norm": None}, tokens=100, started=t0)
    loss.fill_(-1.0)  # as a CUDA graph's output is overwritten by its next replay: the reading took a copy
    assert readings.ready() == []  # the newest step may still be running
    second = {"step": 2}
    readings.add(second, {"loss": torch.tensor(1.5, device=device), "grad_norm": torch.tensor(0.25, device=device)},
                 tokens=100, started=t0 + 0.5)
    assert readings.ready() == [first]
    assert first == {"step": 1, "loss": 2.5, "grad_norm": None, "tokens_per_s": pytest.approx(200.0)}  # 100 in 0.5 s
    assert readings.ready(flush=True) == [second]  # an eval, a checkpoint, the last step, a stop: all now
    assert second["loss"] == 1.5 and second["grad_norm"] == 0.25
    assert 100 / (time.perf_counter() - t0 - 0.5) <= second["tokens_per_s"] < 100 / 2.4  # until it was read
    assert readings.ready(flush=True) == []


def test_a_synchronous_device_hands_each_step_out_at_once():
    readings = StepReadings(torch.device("cpu"))
    started = time.perf_counter() - 0.25
    event = {"step": 1}
    readings.add(event, {"loss": torch.tensor(3.0)}, tokens=50, started=started)
    assert readings.ready() == [event] and event["loss"] == 3.0
    assert 50 / (time.perf_counter() - started) <= event["tokens_per_s"] <= 200


@pytest.mark.parametrize("device", DEVICES)
def test_to_device_copies_every_tensor_and_keeps_the_rest(device):
    batch = {"input_ids": torch.arange(6).reshape(2, 3), "labels": torch.ones(2, 3, dtype=torch.long), "n": 2}
    out = to_device(batch, torch.device(device))
    if device == "cuda":
        torch.cuda.synchronize()
    assert out["n"] == 2 and all(out[k].device.type == device for k in ("input_ids", "labels"))
    assert torch.equal(out["input_ids"].cpu(), batch["input_ids"])


def test_the_trainer_writes_the_same_run_reading_late(tmp_path, monkeypatch):
    """grad_accum 2, an eval split, checkpoints: reading each step's loss and gradient norm a step late
    changes no number the run writes, nor where it evaluates and saves."""
    cfg = tiny_cfg(**{"train.max_steps": 10, "train.grad_accum": 2, "data.eval_fraction": 0.1,
                      "train.eval_every": 4, "train.save_every": 3})
    at_once = run(tmp_path / "a", cfg)
    monkeypatch.setattr(host_ahead, "READ_LATE_ON", {"cpu"})
    late = run(tmp_path / "b", cfg)
    keys = ("step", "epoch", "loss", "lr", "grad_norm", "eval_loss")
    def written(rd):
        return [{k: r.get(k) for k in keys} for r in rd.metrics()]
    assert written(late) == written(at_once)
    assert [r["step"] for r in late.metrics() if "eval_loss" in r] == [4, 8, 10]
    assert [p.name for p in late.checkpoints()] == [p.name for p in at_once.checkpoints()] == \
        ["step-3", "step-6", "step-9", "step-10"]
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in late.metrics())


def test_the_trainer_drops_the_padding_mask_and_writes_the_same_losses(tmp_path, monkeypatch):
    """Eager steps and the evaluation take right-padded batches without their mask (sdpa runs causal instead of
    over a 4-D mask): the same losses as with it."""
    cfg = tiny_cfg(**{"train.max_steps": 6, "data.eval_fraction": 0.1, "train.eval_every": 3})
    without = run(tmp_path / "a", cfg)
    monkeypatch.setattr("studio.trainer.without_padding_mask", lambda batch: batch)
    masked = run(tmp_path / "b", cfg)
    for key in ("loss", "eval_loss"):
        got = [r[key] for r in without.metrics() if key in r]
        assert got == pytest.approx([r[key] for r in masked.metrics() if key in r], rel=1e-5) and got


def test_stop_while_reading_late_saves_the_last_queued_step_and_resumes(tmp_path, read_late):
    """Step 4's event reaches the page while step 5 runs: Stop then keeps step 5, with its metrics line, and
    the resumed run follows the uninterrupted one's losses."""
    cfg = tiny_cfg(**{"train.max_steps": 8, "train.warmup_steps": 2, "method.lora_dropout": 0.1})
    straight = run(tmp_path / "a", cfg)
    rd = run_stopped_after(tmp_path / "b", cfg, 4)
    assert rd.status()["state"] == "stopped" and rd.status()["step"] == 5
    assert [p.name for p in rd.checkpoints()] == ["step-5"]
    assert [r["step"] for r in rd.metrics()] == [1, 2, 3, 4, 5]
    execute(rd, cfg, resume=True)
    assert [r["step"] for r in rd.metrics()] == list(range(1, 9))
    assert losses(rd) == pytest.approx(losses(straight), abs=1e-6)


def test_filler_text_fills_every_row(tmp_path):
    """bench --trainer's data: each example is max_length tokens, all of them trained (the random presets'
    byte-level tokenizer, which its random twins of real shapes load)."""
    data = tmp_path / "filler.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in filler_text(256, 3)))
    cfg = RunConfig.from_dict({"model": {"name": "tiny-llama"},
                               "data": {"path": str(data), "format": "text", "max_length": 256}})
    train = build_datasets(cfg.data, load_tokenizer(cfg.model), 0).train
    assert [len(e["input_ids"]) for e in train] == [256] * 3
    assert all(sum(label != -100 for label in e["labels"]) == 255 for e in train)


def test_bench_trainer_times_a_row_through_the_runner(tmp_path):
    row = Row("tiny-llama", "lora", 2, 64, False)
    got = trainer_ms_per_step(row, torch.device("cpu"), warmup=2, steps=4)
    assert got["trainer_steps"] == 4 and got["trainer_ms_per_step"] > 0
    assert got["trainer_tokens_per_s"] == pytest.approx(1000 * 2 * 64 / got["trainer_ms_per_step"], rel=1e-2)
    assert runs_as_configured(row) and not runs_as_configured(Row("tiny-llama", "lora", 2, 64, False, "prompt"))
    assert runs_as_configured(Row("qwen2.5-0.5b", "qlora", 2, 64, True))  # a random model loads in 4-bit too
    cfg = trainer_config(Row("qwen2.5-0.5b", "lora", 2, 64, True), torch.device("cpu"), tmp_path / "f.jsonl", 3)
    assert cfg.model.name == "bench-qwen2.5-0.5b" and cfg.train.gradient_checkpointing  # no download: random weights
    assert model_presets()["bench-qwen2.5-0.5b"]["config"] == model_presets()["qwen2.5-0.5b"]["config"]
