"""The training loop end to end on tiny models: loss goes down, run directory, resume, stop, errors."""
from __future__ import annotations

import json
import threading

import pytest

from studio.config import load_config
from studio.errors import ConfigError, DatasetError, StudioError
from studio.rundir import RunDir
from studio.runner import execute


LORA = {"method.name": "lora", "method.r": 8, "method.target_modules": "all-linear"}


def tiny_cfg(method: dict | None = None, **sets):
    base = {"model.name": "tiny-llama", "model.device": "cpu", "data.path": "arith", "data.max_length": 64,
            "data.limit": 200, "train.batch_size": 4, "train.max_steps": 12, "train.lr": 3e-3,
            **(LORA if method is None else method)}
    base.update(sets)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def run(tmp_path, cfg, **kw):
    rd = RunDir.create(tmp_path / "runs", cfg)
    execute(rd, cfg, **kw)
    return rd


def test_training_lowers_loss_and_fills_the_run_directory(tmp_path):
    cfg = tiny_cfg(**{"train.max_steps": 30, "data.eval_fraction": 0.1, "train.eval_every": 10,
                      "train.save_every": 10, "train.lr": 1e-2})
    rd = run(tmp_path, cfg)
    rows = rd.metrics()
    assert [r["step"] for r in rows] == list(range(1, 31))
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.25, (first, last)
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_bytes", "time"} <= set(rows[0])
    assert [r["step"] for r in rows if r.get("eval_loss") is not None] == [10, 20, 30]
    assert rd.status()["state"] == "done"
    assert [p.name for p in rd.checkpoints()] == ["step-10", "step-20", "step-30"]
    adapter = json.loads((rd.adapter() / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 8
    assert rd.config().method.r == 8  # config.yaml re-runs the same thing


def run_stopped_after(path, cfg, step: int) -> RunDir:
    """A run whose Stop is pressed when the page receives step `step`'s event."""
    stop = threading.Event()
    rd = RunDir.create(path / "runs", cfg)

    def press(event):
        if event["type"] == "step" and event["step"] == step:
            stop.set()
    execute(rd, cfg, stop=stop, on_event=press)
    return rd


def losses(rd):
    return [r["loss"] for r in rd.metrics()]


@pytest.mark.parametrize("method", ["lora", "full", "lora-adamw_8bit", "lora-sgd"])
def test_resume_continues_the_same_trajectory(tmp_path, method):
    sets = {"train.max_steps": 8, "train.scheduler": "cosine", "train.warmup_steps": 2}
    if "-" in method:  # bitsandbytes' 8-bit AdamW keeps nested quantized state; SGD keeps momentum
        method, sets["train.optimizer"] = method.split("-")
    if method == "lora":
        cfg = tiny_cfg(**sets, **{"method.lora_dropout": 0.1})  # dropout: RNG state must be restored too
    else:
        cfg = tiny_cfg({"method.name": "full"}, **sets, **{"train.lr": 1e-3})
    straight = run(tmp_path / "a", cfg)

    rd = run_stopped_after(tmp_path / "b", cfg, 4)
    assert rd.status()["state"] == "stopped"
    assert [p.name for p in rd.checkpoints()] == ["step-4"]
    assert len(rd.metrics()) == 4
    execute(rd, cfg, resume=True)
    assert rd.status()["state"] == "done"
    assert [r["step"] for r in rd.metrics()] == list(range(1, 9))
    assert losses(rd) == pytest.approx(losses(straight), abs=1e-6)


def test_gradient_accumulation_checkpointing_and_packing_train(tmp_path):
    cfg = tiny_cfg(**{"train.grad_accum": 2, "train.gradient_checkpointing": True, "train.checkpoint_fraction": 0.5,
                      "data.packing": True,
                      "train.max_steps": 10, "data.path": "identity"})
    rd = run(tmp_path, cfg)
    rows = rd.metrics()
    assert len(rows) == 10 and rows[-1]["loss"] < rows[0]["loss"]


def test_bad_dataset_fails_with_a_clear_status(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": "yo"}\n{"question": "no columns we know"}\n')
    cfg = tiny_cfg(**{"data.path": str(bad)})
    rd = RunDir.create(tmp_path / "runs", cfg)
    with pytest.raises(DatasetError) as err:
        execute(rd, cfg)
    status = rd.status()
    assert status["state"] == "failed" and "Row 2" in status["error"] and "question" in status["error"] and str(err.value) == status["error"]


def test_impossible_settings_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="target_modules"):
        run(tmp_path, tiny_cfg(**{"method.target_modules": "[nope_proj]"}))
    with pytest.raises(ConfigError, match="needs CUDA"):
        run(tmp_path / "2", tiny_cfg(**{"train.optimizer": "paged_adamw"}))
    with pytest.raises(StudioError, match="one of"):
        tiny_cfg(**{"train.scheduler": "sometimes"})


def test_classification_task_trains_a_head_and_reports_accuracy(tmp_path):
    cfg = tiny_cfg(**{"model.task": "classification", "data.path": "sentiment", "data.eval_fraction": 0.25,
                      "train.max_steps": 30, "train.eval_every": 10})
    rd = run(tmp_path, cfg)
    rows = rd.metrics()
    assert rows[-1]["eval_accuracy"] >= 0.6 and rows[-1]["loss"] < rows[0]["loss"]
    from studio.checkpoint import read_adapter_config
    assert read_adapter_config(rd.adapter()).get("studio_task_head")


def test_mixed_precision_follows_the_compute_dtype():
    import torch
    from torch import nn

    from studio.trainer import mixed_precision

    class Tiny(nn.Module):
        def __init__(self, dtype, compute=None):
            super().__init__()
            self.lin = nn.Linear(2, 2, dtype=dtype)
            if compute is not None:
                self.lin.compute_dtype = compute

        @property
        def dtype(self):
            return self.lin.weight.dtype

    assert mixed_precision(Tiny(torch.bfloat16), cpu=False) == "bf16"
    assert mixed_precision(Tiny(torch.float16), cpu=False) == "fp16"  # T4-class GPUs: loss scaling
    assert mixed_precision(Tiny(torch.float32), cpu=False) == "no"
    assert mixed_precision(Tiny(torch.float32, compute=torch.bfloat16), cpu=False) == "bf16"  # 4-bit base
    assert mixed_precision(Tiny(torch.bfloat16), cpu=True) == "bf16"  # AMX / AVX512-BF16 matmuls
    assert mixed_precision(Tiny(torch.float16), cpu=True) == "no"


def test_bf16_base_trains_on_the_cpu_under_autocast(tmp_path):
    import torch

    from studio.checkpoint import load_adapter_state_file
    from studio.models import cpu_bf16_faster
    fp32 = run(tmp_path / "fp32", tiny_cfg(**{"train.max_steps": 1}))  # the studio runs both in one process
    assert ("bfloat16 trains" in (fp32.path / "events.log").read_text()) == cpu_bf16_faster()
    cfg = tiny_cfg(**{"model.dtype": "bfloat16", "train.max_steps": 20, "train.lr": 1e-2})
    rd = run(tmp_path, cfg)
    assert "bfloat16 trains" not in (rd.path / "events.log").read_text()
    rows = rd.metrics()
    assert sum(r["loss"] for r in rows[-3:]) < sum(r["loss"] for r in rows[:3]) - 0.75
    state = load_adapter_state_file(rd.adapter())
    assert {t.dtype for t in state.values()} == {torch.float32}  # adapters train in fp32 over the bf16 base


@pytest.mark.parametrize("ckpt", [False, True])
def test_compiled_layers_train_like_eager(tmp_path, ckpt):
    """With checkpointing, the attention and MLP are compiled inside each layer's checkpoint."""
    sets = {"train.max_steps": 3, "method.lora_dropout": 0.0, "train.gradient_checkpointing": ckpt}
    eager = run(tmp_path / "eager", tiny_cfg(**sets))
    compiled = run(tmp_path / "compiled", tiny_cfg(**sets, **{"train.compile": True}))
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-4)
    assert "train.compile: each decoder layer is compiled" in (compiled.path / "events.log").read_text()


def test_the_bf16_tip_follows_the_measured_speed_of_this_cpus_products(monkeypatch):
    """bf16 instructions do not make bf16 faster (an AVX512-BF16 Xeon without AMX multiplied bf16 at ~0.6x its fp32
    speed): the tip is offered only where a bf16 product measured clearly faster, and says by how much."""
    from components.estimates import cpu_speed_hint
    from studio import models
    from studio.config import RunConfig
    speedup = models.cpu_bf16_speedup()
    assert speedup == models.cpu_bf16_speedup()  # measured once a process
    assert speedup == 0.0 if not models.cpu_has_bf16_instructions() else speedup > 0
    cfg = RunConfig.from_dict({"model": {"name": "tiny-llama"}})
    for measured, tip in ((0.6, False), (1.1, False), (1.9, True)):
        monkeypatch.setattr(models, "cpu_bf16_speedup", lambda measured=measured: measured)
        assert models.cpu_bf16_faster() == tip
        assert ("1.9x as fast as fp32" in cpu_speed_hint(cfg)) == tip
    cfg.model.dtype = "bfloat16"  # asked for already
    assert cpu_speed_hint(cfg) == ""
