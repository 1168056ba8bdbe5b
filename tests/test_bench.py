"""The benchmark runs our engine and the peft baseline on the same shape and reports ratios."""
from __future__ import annotations

import json

import pytest
import torch

from studio.__main__ import main
from studio.bench import Row, bench
from studio.errors import ConfigError


def test_bench_rows_compare_engines_on_cpu():
    rows = list(bench(device="cpu", warmup=1, steps=1, rounds=2, grid=[Row("tiny-llama", "lora", 2, 32, False),
                                                            Row("tiny-llama", "full", 2, 32, False)]))
    assert [(r["engine"], r["method"]) for r in rows] == [("peft", "lora"), ("studio", "lora"),
                                                          ("peft", "full"), ("studio", "full")]
    ours = rows[1]
    assert ours["tokens_per_s"] > 0 and ours["ms_per_step"] > 0 and ours["speedup_vs_peft"] > 0
    assert ours["estimated_bytes"] > 0 and ours["mfu"] is None  # no MFU claim on the CPU
    assert len(ours["rounds_ms_per_step"]) == 2
    assert ours["peak_bytes"] > 0 and rows[0]["peak_bytes"] > 0 and 0 < ours["memory_ratio_vs_peft"] < 1


def test_bench_bf16_rows_autocast_both_engines_on_cpu():
    rows = list(bench(device="cpu", warmup=1, steps=1, rounds=1,
                      grid=[Row("tiny-llama", "lora", 2, 32, False, "prompt", "bf16")]))
    assert [(r["engine"], r["dtype"], r["labels"]) for r in rows] == [("peft", "bfloat16", "prompt"),
                                                                      ("studio", "bfloat16", "prompt")]
    assert rows[1]["time_ratio_vs_peft"] > 0 and rows[1]["estimated_bytes"] > 0


def test_bench_memory_cli_writes_json_lines(capsys):
    assert main(["bench", "--memory", "--quick"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines and all("estimated_bytes" in row for row in lines)


def test_peft_qlora_baseline_follows_the_qlora_guide():
    """prepare_model_for_kbit_training: the weights that are not 4-bit train-time fp32 (what makes peft's
    QLoRA heavy in the issue's table); LoRA on every linear layer on top."""
    import torch

    from baselines.peft_baseline import prepare
    from studio.models import build_random_model, model_presets
    model = build_random_model(model_presets()["tiny-llama"]["config"], dtype=torch.bfloat16)
    model = prepare(model, "qlora", 8, 16)
    assert model.get_input_embeddings().weight.dtype == torch.float32
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_bench_offload_row_shares_the_peft_run():
    """A row that differs only in our offloading reuses the peft row of the same settings."""
    rows = list(bench(device="cpu", warmup=1, steps=1, rounds=1, grid=[Row("tiny-llama", "lora", 2, 32, True),
                                                            Row("tiny-llama", "lora", 2, 32, True, offload=True)]))
    assert [(r["engine"], r["offload"]) for r in rows] == [("peft", False), ("studio", False), ("studio", True)]
    assert all(r["speedup_vs_peft"] > 0 for r in rows[1:])


def test_bench_only_filters_the_grid_and_names_unknown_shapes():
    grid = [Row("tiny-llama", "lora", 2, 16, False), Row("tiny-qwen2", "lora", 2, 16, False)]
    rows = list(bench(device="cpu", warmup=0, steps=1, rounds=1, with_peft=False, grid=grid, only=["tiny-qwen2"]))
    assert [r["shape"] for r in rows] == ["tiny-qwen2"]
    with pytest.raises(ConfigError, match="tiny-gemma3"):
        list(bench(device="cpu", grid=grid, only=["tiny-gemma3"]))


def test_step_peak_bytes_counts_what_is_held_and_the_step_peak():
    from studio.memory_bench import step_peak_bytes
    held = torch.ones(1000)

    def step():
        doubled = held * 2            # 4,000 bytes
        shifted = doubled + 1         # 4,000 more while both live
        del doubled, shifted
        (held * 3).sum()              # a new 4,000 after the first two are freed

    assert step_peak_bytes(step, [held, held[:10]]) == 4000 + 8000  # a view of a held tensor counts once
