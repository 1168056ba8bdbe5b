"""train.checkpoint_budget_gb: the fewest recomputed layers whose memory estimate fits a budget, in the
estimate, the trainer, the calculator page's answer, the CLI and the bench's fitted rows."""
from __future__ import annotations

import json

import pytest

from studio.config import RunConfig, load_config, with_changes
from studio.memory import ALLOCATOR_ROOM_BYTES, checkpoint_share, estimate
from studio.memory_bench import _apply, measured_step_peak, random_batch
from studio.memory_search import fewest_recomputed
from studio.models import build_random_model, hf_config_from_dict, model_presets
from studio.rundir import RunDir
from studio.runner import execute


def _four_layers(tmp_path) -> RunConfig:
    facts = dict(model_presets()["tiny-llama"]["config"])
    facts.update(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4)
    hf_config_from_dict(facts).save_pretrained(tmp_path / "m")
    return RunConfig.from_dict({"model": {"name": str(tmp_path / "m")}, "data": {"max_length": 256},
                                "method": {"name": "lora"},
                                "train": {"batch_size": 4, "gradient_checkpointing": True, "loss_chunk": 64}})


def _total(cfg: RunConfig, share: float) -> int:
    return estimate(with_changes(cfg, **{"train.checkpoint_fraction": share}), "cpu", padding=False).total


def _budgeted(cfg: RunConfig, budget_bytes: float) -> RunConfig:
    return with_changes(cfg, **{"train.checkpoint_budget_gb": budget_bytes / 2**30})


def test_the_budget_picks_the_fewest_recomputed_layers_that_fit(tmp_path):
    cfg = _four_layers(tmp_path)
    totals = [_total(cfg, k / 4) for k in range(4)]  # the bottom k of 4 layers recomputed
    # fewer recomputed layers keep more
    assert totals == sorted(totals, reverse=True)
    budget = (totals[1] + totals[2]) / 2  # 2 recomputed fit, 1 does not
    est = estimate(_budgeted(cfg, budget), "cpu", padding=False)
    d = est.details
    assert (d["checkpointed_layers"], d["layers"], d["checkpoint_fits"]) == (2, 4, True)
    assert est.total == totals[2] <= d["checkpoint_budget"] == int(budget / 2**30 * 2**30)
    roomy = estimate(_budgeted(cfg, totals[0] + 1), "cpu", padding=False)
    assert roomy.details["checkpointed_layers"] == 0 and roomy.total == totals[0]
    tight = estimate(_budgeted(cfg, totals[3] - 1), "cpu", padding=False)  # the least total, not all 4 layers
    assert tight.details["checkpointed_layers"] == 3 and tight.details["checkpoint_fits"] is False
    assert estimate(_budgeted(cfg, totals[3]), "cpu", padding=False).details["checkpoint_fits"] is True
    share, line = checkpoint_share(_budgeted(cfg, budget), "cpu")
    assert share == 0.5 and "2 of 4 layers recomputed" in line
    share, line = checkpoint_share(_budgeted(cfg, totals[3] - 1), "cpu")
    assert share == 0.75 and "does not fit" in line and "3 of 4 layers" in line


def test_without_checkpointing_the_budget_changes_nothing(tmp_path):
    cfg = with_changes(_four_layers(tmp_path), **{"train.gradient_checkpointing": False})
    assert estimate(_budgeted(cfg, 1), "cpu").total == estimate(cfg, "cpu").total


def test_the_calculator_and_the_cli_answer_the_fastest_checkpointing_that_fits(tmp_path, monkeypatch, capsys):
    """fewest_recomputed answers for any config (checkpointing on or off) on a GPU preset."""
    import studio.gpus as gpus
    from components.calculator import checkpointing_tile
    from studio.__main__ import main
    cfg = with_changes(_four_layers(tmp_path), **{"train.gradient_checkpointing": False})
    on = with_changes(cfg, **{"train.gradient_checkpointing": True})
    totals = [estimate(with_changes(on, **{"train.checkpoint_fraction": k / 4}), "cuda").total for k in range(5)]
    room = ALLOCATOR_ROOM_BYTES  # a GPU plan leaves the caching allocator's room
    cards = {"roomy": totals[0] + room, "middle": (totals[2] + totals[3]) // 2 + room, "tight": min(totals) - 1}
    monkeypatch.setattr(gpus, "gpu_memory", lambda name: cards.get(name) or 80 * 2**30)
    assert fewest_recomputed(cfg, "middle") == (3, 4)
    assert fewest_recomputed(cfg, "roomy") == (0, 4) and fewest_recomputed(cfg, "tight") is None
    assert "3 of 4 layers" in checkpointing_tile(cfg, "middle")
    assert "not needed" in checkpointing_tile(cfg, "roomy") and "does not fit" in checkpointing_tile(cfg, "tight")
    assert main(["estimate", "--set", f"model.name={tmp_path / 'm'}", "--set", "data.max_length=256",
                 "--set", "train.batch_size=4", "--set", "train.loss_chunk=64", "--gpu", "middle", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["largest"]["recomputed_layers"] == [3, 4]


def test_the_trainer_recomputes_the_layers_the_budget_leaves(tmp_path, monkeypatch):
    """Packed batches of max_length tokens: the trainer's estimate is the one computed here."""
    import studio.trainer as trainer
    sets = {"model.name": "tiny-llama", "model.device": "cpu", "data.path": "arith", "data.max_length": 64,
            "data.limit": 200, "train.batch_size": 4, "train.max_steps": 3, "data.packing": True,
            "train.gradient_checkpointing": True}
    cfg = load_config(None, [f"{k}={v}" for k, v in sets.items()])
    totals = [estimate(with_changes(cfg, **{"train.checkpoint_fraction": k / 2}), "cpu").total for k in range(3)]
    assert totals[0] > totals[1] > totals[2]
    seen = []

    def spy(model, train_cfg, cpu, graphs=False, fraction=None):
        note = setup(model, train_cfg, cpu, graphs, fraction)
        seen.append([layer.gradient_checkpointing for layer in model.model.layers])
        return note

    setup = trainer.setup_checkpointing
    monkeypatch.setattr(trainer, "setup_checkpointing", spy)
    for budget, recomputed in (((totals[0] + totals[1]) / 2, 1), (totals[0] + 1, 0), (totals[2] - 1, 2)):
        run_cfg = _budgeted(cfg, budget)
        rd = RunDir.create(tmp_path / "runs", run_cfg)
        execute(rd, run_cfg)
        assert rd.status()["state"] == "done" and sum(seen[-1]) == recomputed, (budget, seen)
        log = (rd.path / "events.log").read_text()
        assert f"{recomputed} of 2 layers" in log
        assert json.loads((rd.path / "estimate.json").read_text())["details"]["checkpointed_layers"] == recomputed


def test_a_bench_row_fitted_to_a_card_recomputes_what_the_trainer_would(monkeypatch):
    import studio.gpus as gpus
    from studio.bench import bench, row_config
    from studio.bench_grid import Row
    row = Row("tiny-llama", "lora", 2, 32, True)
    totals = [estimate(with_changes(row_config(row), **{"train.checkpoint_fraction": k / 2}), "cpu",
                       padding=False).total for k in range(3)]
    monkeypatch.setattr(gpus, "gpu_memory", lambda name: (totals[0] + totals[1]) // 2)
    rows = list(bench(device="cpu", warmup=1, steps=1, rounds=1, grid=[row, Row("tiny-llama", "lora", 2, 32, True,
                                                                                 fit="card")]))
    assert [r["engine"] for r in rows] == ["peft", "studio", "studio"]  # the fitted row shares peft's run
    assert "fit" not in rows[1] and rows[2]["fit"] == "card" and rows[2]["checkpointed_layers"] == [1, 2]
    assert rows[2]["estimated_bytes"] == totals[1] and rows[2]["speedup_vs_peft"] > 0


def test_the_estimate_says_how_many_layers_a_fitted_run_recomputes():
    """`estimate` printed "checkpointing off" for a run fitted to a budget (some layers recomputed)."""
    from studio.memory_report import format_estimate
    cfg = load_config(None, ["model.name=qwen2.5-7b", "method.name=qlora", "train.batch_size=4", "data.max_length=2048",
                             "train.gradient_checkpointing=true", "train.checkpoint_budget_gb=23.99"])
    est = estimate(cfg, "cuda")
    k, n = est.details["checkpointed_layers"], est.details["layers"]
    assert 0 < k < n and f"checkpointing {k} of {n} layers" in format_estimate(est).splitlines()[0]


@pytest.mark.parametrize("vocab, hidden, inter, seq, kept", [(512, 256, 688, 256, True), (32000, 64, 128, 64, False)],
                         ids=["layers weigh: top kept", "the loss weighs: every layer recomputed"])
def test_checkpointing_every_layer_keeps_the_top_one_only_where_that_costs_nothing(tmp_path, vocab, hidden, inter,
                                                                                   seq, kept):
    """train.checkpoint_fraction 1.0: the estimate keeps the top layer's activations from forward where that adds
    nothing to the peak (its recomputation would come first in backward, beside the same bytes), and the measured
    peak agrees; where the end of the forward is the peak (a large vocabulary's loss chunks beside a small
    model's layers) keeping it costs more, measured too, and every layer is recomputed."""
    facts = dict(model_presets()["tiny-llama"]["config"])
    facts.update(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=4, num_attention_heads=4,
                 vocab_size=vocab)
    hf_config_from_dict(facts).save_pretrained(tmp_path / "m")
    cfg = RunConfig.from_dict({"model": {"name": str(tmp_path / "m")}, "data": {"max_length": seq},
                               "method": {"name": "lora"},
                               "train": {"batch_size": 2, "gradient_checkpointing": True, "loss_chunk": 1024}})
    est = estimate(cfg, "cpu", padding=False)
    assert est.details["top_layer_kept"] is kept and est.details["checkpointed_layers"] == (3 if kept else 4)
    assert est.total == _total(cfg, 0.75 if kept else 1.0)
    peaks = []
    for share in (1.0, 0.75):
        model = build_random_model(facts)
        model.requires_grad_(False)
        _apply(model, {"name": "lora"}, share)
        peaks.append(measured_step_peak(model, random_batch(vocab, 2, seq), chunk=1024))
    assert peaks[1] == peaks[0] if kept else peaks[1] > peaks[0]
    share, line = checkpoint_share(cfg, "cpu", padding=False)
    assert share == est.recomputed_share
    assert ("top layer's activations are kept" in line) if kept else line is None


def test_the_trainer_recomputes_the_share_the_estimate_chose(tmp_path, monkeypatch):
    """Without a budget too, the trainer recomputes the layers checkpoint_share names and logs its line (here a
    stand-in choice: the tiny presets' loss weighs more than their layers, so their estimate keeps no layer)."""
    import studio.trainer as trainer
    sets = {"model.name": "tiny-llama", "model.device": "cpu", "data.path": "arith", "data.max_length": 64,
            "data.limit": 200, "train.batch_size": 4, "train.max_steps": 2, "train.gradient_checkpointing": True}
    cfg = load_config(None, [f"{k}={v}" for k, v in sets.items()])
    assert checkpoint_share(cfg, "cpu") == (1.0, None)
    monkeypatch.setattr(trainer, "checkpoint_share", lambda *a: (0.5, "Checkpointing 1 of 2 layers: a stand-in."))
    rd = RunDir.create(tmp_path / "runs", cfg)
    model_layers = []
    setup = trainer.setup_checkpointing

    def spy(model, train_cfg, cpu, graphs=False, fraction=None):
        note = setup(model, train_cfg, cpu, graphs, fraction)
        model_layers.append([layer.gradient_checkpointing for layer in model.model.layers])
        return note
    monkeypatch.setattr(trainer, "setup_checkpointing", spy)
    execute(rd, cfg)
    assert rd.status()["state"] == "done" and model_layers == [[True, False]]
    assert "Checkpointing 1 of 2 layers: a stand-in." in (rd.path / "events.log").read_text()
