"""Data parallel: the same loop on 2 CPU processes (gloo); gradients are synchronised (identical
weights on both replicas) and only the main process writes the run directory.

On GPUs users run `accelerate launch --multi_gpu -m studio train CONFIG.yaml`; accelerate's launcher
has no multi-process CPU mode without MPI, so the test starts the processes with torchrun, which
sets the same environment (RANK, WORLD_SIZE, MASTER_ADDR) that accelerate's launcher sets."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_two_process_cpu_training(tmp_path):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "studio", "train", "presets/runs/quickstart.yaml",
           "--set", "model.name=tiny-llama", "--set", "model.device=cpu", "--set", "data.limit=64", "--set", "data.max_length=64",
           "--set", "train.max_steps=4", "--set", "train.batch_size=2", "--set", "train.eval_every=0",
           "--set", "data.eval_fraction=0", "--set", "method.lora_dropout=0.1",
           "--runs-dir", str(runs), "--run-name", "ddp", "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in runs.iterdir()] == ["ddp"]  # one run directory, made by the main process
    run = runs / "ddp"
    log = (run / "events.log").read_text()
    assert "2 processes; trainable weights identical on all replicas" in log
    assert log.count("Starting lora") == 1  # only the main process writes
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
