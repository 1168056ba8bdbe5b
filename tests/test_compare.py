"""`compare`: same data/steps/seed per method; table, json and plotly chart from the run directories."""
from __future__ import annotations

import json

import pytest
import yaml

from studio.__main__ import main
from studio.compare import match_budget, trainable_count
from studio.config import load_config

CONFIG = {"model": {"name": "tiny-llama", "device": "cpu"},
          "data": {"path": "arith", "max_length": 48, "eval_fraction": 0.1, "limit": 40},
          "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "seed": 3}}


@pytest.fixture()
def config_file(tmp_path):
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def test_compare_cli_writes_table_and_chart(config_file, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["compare", str(config_file), "--methods", "lora,ia3,vera", "--runs-dir", str(runs)]) == 0
    out = runs / "compare-table"
    data = json.loads((out / "comparison.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert list(rows) == ["lora", "ia3", "vera"]
    for r in rows.values():
        assert r["state"] == "done"
        assert r["trainable_params"] and r["final_train_loss"] is not None and len(r["losses"]) == 3
        assert r["eval_loss"] is not None and r["tokens_per_s"]
        assert r["estimated_peak_bytes"]
    assert rows["ia3"]["trainable_params"] < rows["lora"]["trainable_params"]
    table = (out / "comparison.md").read_text()
    assert table.count("\n") == 5 and "| vera |" in table
    assert "plotly" in (out / "comparison.html").read_text()[:5000].lower()
    for m in ("lora", "ia3", "vera"):  # each is an ordinary run directory
        assert (runs / f"compare-{m}" / "adapter" / "adapter_config.json").is_file()


def test_budget_matching_picks_the_nearest_size(config_file):
    cfg = load_config(config_file)
    target = trainable_count(cfg, {"name": "lora"})  # r=8 on q/k/v/o
    raw = match_budget(cfg, "adapter", target)
    assert abs(trainable_count(cfg, raw) - target) <= target * 0.5
    assert match_budget(cfg, "ia3", target) == {"name": "ia3"}


def test_unknown_method_fails_before_training(config_file, tmp_path, capsys):
    runs = tmp_path / "r"
    assert main(["compare", str(config_file), "--methods", "lora,nonsense", "--runs-dir", str(runs)]) != 0
    assert "Unknown method 'nonsense'" in capsys.readouterr().err
    assert not runs.exists()
