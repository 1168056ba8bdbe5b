"""The benchmark runs our engine and the peft baseline on the same shape and reports ratios."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from studio.__main__ import main
from studio.bench import bench
from studio.bench_grid import Row
from studio.errors import ConfigError


def test_bench_rows_compare_engines_on_cpu():
    rows = list(bench(device="cpu", warmup=1, steps=1, rounds=2, grid=[Row("tiny-llama", "lora", 2, 32, False),
                                                            Row("tiny-llama", "full", 2, 32, False)]))
    assert [(r["engine"], r["method"]) for r in rows] == [("peft", "lora"), ("studio", "lora"),
                                                          ("peft", "full"), ("studio", "full")]
    ours = rows[1]
    assert ours["tokens_per_s"] > 0 and ours["ms_per_step"] > 0 and ours["speedup_vs_peft"] > 0
    assert ours["estimated_bytes"] > 0 and ours["mfu"] is None  # no MFU claim on the CPU
    assert ours["warmup_s"] > 0 and rows[0]["warmup_s"] > 0  # the untimed first step, set-up included
    assert len(ours["rounds_ms_per_step"]) == 2
    assert len(ours["time_ratio_rounds"]) == 2 and ours["time_ratio_median_of_rounds"] in ours["time_ratio_rounds"]
    assert ours["peak_bytes"] > 0 and rows[0]["peak_bytes"] > 0 and 0 < ours["memory_ratio_vs_peft"] < 1
    for theirs, mine in (rows[0], rows[1]), (rows[2], rows[3]):  # same weights and batch: the same first loss
        assert mine["loss_first_last"][0] == pytest.approx(theirs["loss_first_last"][0], abs=1e-3)
    for row in rows:  # a saved line names its machine and software
        assert row["device_name"] and row["threads"] == torch.get_num_threads()
        assert isinstance(row["bf16_hardware"], bool) and row["torch"] == torch.__version__
        assert row["transformers"] and row["peft"]


def test_bench_trainer_adds_the_trainers_time_of_our_rows():
    """--trainer: our row also run by the trainer (studio/bench_trainer.py); rows whose A/B settings no run
    config says (the masked-prompt labels here) are left alone."""
    grid = [Row("tiny-llama", "lora", 2, 32, False), Row("tiny-llama", "lora", 2, 32, False, "prompt")]
    rows = list(bench(device="cpu", with_peft=False, warmup=1, steps=2, rounds=1, grid=grid, trainer=True))
    assert rows[0]["trainer_ms_per_step"] > 0 and rows[0]["trainer_steps"] == 2
    assert rows[0]["trainer_vs_loop"] == pytest.approx(rows[0]["trainer_ms_per_step"] / rows[0]["ms_per_step"], rel=0.01)
    assert "trainer_ms_per_step" not in rows[1]


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
    grid = [Row("tiny-llama", "lora", 2, 16, False), Row("tiny-qwen2", "lora", 2, 16, False),
            Row("tiny-qwen2", "full", 2, 16, False)]
    rows = list(bench(device="cpu", warmup=0, steps=1, rounds=1, with_peft=False, grid=grid, only=["tiny-qwen2"]))
    assert [(r["shape"], r["method"]) for r in rows] == [("tiny-qwen2", "lora"), ("tiny-qwen2", "full")]
    rows = list(bench(device="cpu", warmup=0, steps=1, rounds=1, with_peft=False, grid=grid,
                      only=["tiny-qwen2:full"]))  # shape:method, one method's rows
    assert [(r["shape"], r["method"]) for r in rows] == [("tiny-qwen2", "full")]
    fitted = dataclasses.replace(grid[1], grad_ckpt=True, fit="card")
    grid_fit = [dataclasses.replace(grid[1], grad_ckpt=True), fitted, dataclasses.replace(fitted, fit="", offload=True)]
    from studio.bench import _only_names
    assert [("tiny-qwen2:lora:default" in _only_names(r)) for r in grid_fit] == [True, False, False]
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


def test_a_failing_row_is_reported_and_the_grid_goes_on(monkeypatch):
    """On a rented GPU the grid runs once: one broken row must not lose the rows after it."""
    import studio.bench as bench_mod
    real = bench_mod._measure_row

    def flaky(row, engine, *args):
        if row.method == "full" and engine == "studio":
            raise RuntimeError("kernel not built for this card")
        return real(row, engine, *args)

    monkeypatch.setattr(bench_mod, "_measure_row", flaky)
    grid = [Row("tiny-llama", "full", 2, 16, False), Row("tiny-llama", "lora", 2, 16, False)]
    rows = list(bench(device="cpu", warmup=0, steps=1, rounds=1, grid=grid))
    assert [(r["engine"], r["method"]) for r in rows] == [("peft", "full"), ("studio", "full"),
                                                          ("peft", "lora"), ("studio", "lora")]
    assert rows[1]["error"] == "RuntimeError: kernel not built for this card" and "speedup_vs_peft" not in rows[1]
    assert rows[3]["speedup_vs_peft"] > 0


def test_qlora_rows_run_both_engines_on_a_4bit_base():
    """The QLoRA rows' path (NF4 base quantised in place, LoRA on top, a step) through bitsandbytes' CPU backend."""
    from studio.bench import run_row
    from studio.memory_bench import random_base_model
    base = random_base_model("tiny-llama", torch.device("cpu"), torch.bfloat16, "nf4")
    assert type(base.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    row = Row("tiny-llama", "qlora", 2, 16, True, precision="bf16")
    for engine in ("peft", "studio"):
        out = run_row(row, engine, torch.device("cpu"), warmup=1, steps=1)
        assert "error" not in out and out["ms_per_step"] > 0, out


def test_bench_table_prints_speed_memory_and_failed_rows(tmp_path, capsys):
    from baselines.bench_table import main as table
    grid = [Row("tiny-llama", "lora", 2, 16, False)]
    rows = list(bench(device="cpu", warmup=0, steps=1, rounds=1, grid=grid))
    rows[1]["trainer_ms_per_step"] = 1234.0  # bench --trainer
    rows.append(rows[1] | {"error": "RuntimeError: no kernel", "offload": True})
    fitted = {"fit": "RTX 4090", "checkpointed_layers": [9, 28], "card_capped": True, "card_bytes": 25.76e9}
    rows += [rows[1] | fitted | {"on_card_bytes": 25.1e9}, rows[1] | fitted | {"oom": True}]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "m.jsonl").write_text(json.dumps({"shape": "s", "method": "lora", "batch": 1, "seq": 8,
                                                  "grad_ckpt": True, "estimated_bytes": 2e9,
                                                  "measured_bytes": 2.5e9, "ratio": 0.8}) + "\n")
    assert table([str(tmp_path / "b.jsonl"), str(tmp_path / "m.jsonl")]) == 0
    lines = capsys.readouterr().out.splitlines()
    ours = next(line for line in lines if "| studio |" in line and "error" not in line)
    assert f"{rows[1]['speedup_vs_peft']:.2f}x" in ours and " (trainer 1,234) |" in ours
    assert any("error: RuntimeError: no kernel" in line for line in lines)
    assert any("| 9 of 28 layers (fit RTX 4090, capped: 25.10 of 25.76 GB on the card) |" in line for line in lines)
    assert any("(fit RTX 4090, capped: out of memory) |" in line and "| out of memory |" in line for line in lines)
    assert "| s | lora | 1x8 | on |  | 2.00 | 2.50 | 0.800 |  |  |" in lines
    assert sum(line.startswith(f"Device: {rows[0]['device_name']}, ") for line in lines) == 1


def test_triton_ab_runs_each_of_our_rows_with_and_without_the_kernels(monkeypatch):
    """--triton-ab: our row twice (kernels, then the torch ops), one peft row; the second never calls a kernel."""
    import studio.bench as bench_mod
    from studio import kernels
    from studio.kernels import rmsnorm
    calls, per_run = [], []
    real_forward, real_run_row = rmsnorm.forward, bench_mod.run_row
    monkeypatch.setattr(rmsnorm, "forward", lambda *a, **k: calls.append(1) or real_forward(*a, **k))

    def counted(row, engine, *args):
        calls.clear()
        out = real_run_row(row, engine, *args)
        per_run.append((engine, row.triton, len(calls)))
        return out

    monkeypatch.setattr(bench_mod, "run_row", counted)
    with kernels.forced():  # CPU tensors through the kernels (Triton's interpreter here)
        rows = list(bench(device="cpu", warmup=0, steps=1, rounds=1, triton_ab=True,
                          grid=[Row("tiny-llama", "lora", 2, 16, False)]))
    assert [(r["engine"], r["triton"]) for r in rows] == [("peft", False), ("studio", True), ("studio", False)]
    assert rows[2]["speedup_vs_peft"] > 0 and "triton_kernels" in rows[1] and "triton_kernels" not in rows[2]
    engines = {(e, t): n for e, t, n in per_run}
    assert engines[("peft", True)] == 0 and engines[("studio", True)] > 0 and engines[("studio", False)] == 0


def test_graphs_row_steps_like_the_eager_row_and_replays_only_on_cuda(monkeypatch):
    """Our step replayed from a capture (emulated here) trains the same as the eager step; on the CPU
    the default (auto) row runs eagerly and a forced graphs row is left out."""
    from studio.bench import build_step
    from training import emulate_graph_capture
    row = Row("tiny-llama", "lora", 2, 16, False)

    def losses(graphs: str) -> tuple[list[float], bool]:
        step = build_step(dataclasses.replace(row, graphs=graphs), "studio", torch.device("cpu"))
        return [float(step.run()) for _ in range(3)], step.graphs

    eager, replayed = losses("auto")
    assert not replayed
    replays = emulate_graph_capture(monkeypatch)
    graphed, replayed = losses("on")
    assert replayed and graphed == pytest.approx(eager, rel=1e-5)
    assert len(replays) == 3
    rows = list(bench(device="cpu", with_peft=False, warmup=0, steps=1, rounds=1, eager_ab=True,
                      grid=[row, dataclasses.replace(row, graphs="on")]))
    assert [(r["engine"], r["cuda_graphs"], r["graphs"]) for r in rows] == [("studio", "auto", False)]


def test_auto_rows_replay_graphs_where_the_trainer_would():
    from studio.bench import graphs_wanted
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    row = Row("qwen2.5-0.5b", "lora", 4, 1024, False)
    assert graphs_wanted(row, cuda, 494_000_000, compile=False)
    assert not graphs_wanted(row, cuda, 7_600_000_000, compile=False)  # GPU-bound: as train.cuda_graphs=auto
    assert graphs_wanted(Row("qwen2.5-7b", "lora", 1, 512, True), cuda, 7_600_000_000, compile=False)
    assert not graphs_wanted(row, cpu, 494_000_000, compile=False)
    assert not graphs_wanted(row, cuda, 494_000_000, compile=True)
    assert not graphs_wanted(dataclasses.replace(row, offload=True), cuda, 494_000_000, compile=False)
    assert not graphs_wanted(dataclasses.replace(row, graphs="off"), cuda, 494_000_000, compile=False)
    assert graphs_wanted(dataclasses.replace(row, graphs="on"), cpu, 7_600_000_000, compile=False)


def test_eager_and_triton_ab_grid_on_a_gpu(monkeypatch):
    """--triton-ab --eager-ab on a GPU: ours as the trainer runs it (graphs for a small model), ours
    eagerly, ours eagerly with the torch ops; one peft row. A 7B row, which auto runs eagerly, is not
    run eagerly twice. (run_row is stubbed: this checks the grid the GPU run gets, not the GPU.)"""
    import studio.bench as bench_mod
    import studio.models as models
    seen = []

    def fake_run_row(row, engine, device, warmup, steps, compile=False):
        seen.append((row.shape, engine, row.triton, row.graphs))
        graphs = engine == "studio" and row.graphs == "auto" and row.shape != "qwen2.5-7b"
        return bench_mod._row_facts(row, engine) | {"ms_per_step": 10.0, "tokens_per_s": 100.0, "graphs": graphs}

    monkeypatch.setattr(models, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(bench_mod, "run_row", fake_run_row)
    monkeypatch.setattr(bench_mod, "estimated", lambda row, device: {"estimated_bytes": None})
    monkeypatch.setattr(bench_mod, "baseline_available", lambda: True)
    rows = list(bench(device="cuda", rounds=1, triton_ab=True, eager_ab=True,
                      grid=[Row("qwen2.5-0.5b", "lora", 4, 1024, False), Row("qwen2.5-7b", "lora", 4, 2048, True)]))
    assert seen == [("qwen2.5-0.5b", "peft", True, "auto"), ("qwen2.5-0.5b", "studio", True, "auto"),
                    ("qwen2.5-0.5b", "studio", True, "off"), ("qwen2.5-0.5b", "studio", False, "off"),
                    ("qwen2.5-7b", "peft", True, "auto"), ("qwen2.5-7b", "studio", True, "auto"),
                    ("qwen2.5-7b", "studio", False, "off")]
    assert [(r["engine"], r["triton"], r["graphs"]) for r in rows][:4] == [
        ("peft", False, False), ("studio", True, True), ("studio", True, False), ("studio", False, False)]


def test_default_cpu_grid_leaves_out_bf16_rows_without_bf16_hardware(monkeypatch):
    import torch

    from studio import bench_grid, models
    cpu = torch.device("cpu")
    monkeypatch.setattr(models, "cpu_has_bf16_instructions", lambda: False)
    assert [r.precision for r in bench_grid.default_grid(cpu, False)] == ["auto", "auto"]
    monkeypatch.setattr(models, "cpu_has_bf16_instructions", lambda: True)
    assert bench_grid.default_grid(cpu, False) == bench_grid.CPU_GRID
    assert bench_grid.default_grid(torch.device("cuda"), True) == bench_grid.QUICK_GRID


@pytest.mark.parametrize("ckpt", [False, True])
def test_our_step_issues_far_fewer_kernel_launches_than_peft(ckpt):
    """What launch-bound GPU rows pay for, counted on the CPU (baselines/op_count.py): a LoRA step on a
    Qwen2-shaped model, bf16 under autocast, with the Triton kernels counted as launches."""
    pytest.importorskip("peft")
    pytest.importorskip("triton")
    from baselines.op_count import count
    ours, theirs = (count("tiny-qwen2", "lora", 2, 32, ckpt, engine) for engine in ("studio", "peft"))
    assert ours["layers"] == theirs["layers"] == 2
    assert ours["top"]["triton.rope.apply"] > 0 and "triton.rope.apply" not in theirs["top"]
    assert ours["ops_per_step"] < 0.55 * theirs["ops_per_step"]


def test_host_time_script_times_both_engines_at_test_width(monkeypatch, capsys):
    """baselines/host_time: a real shape's layer count and layer code at width 64; one JSON line per
    engine (the preset it adds lives in a copy of the presets here)."""
    import json
    import sys

    import studio.models as models
    from baselines import host_time
    presets = dict(models.model_presets())
    monkeypatch.setattr(models, "model_presets", lambda: presets)
    monkeypatch.setattr(sys, "argv", ["host_time", "--steps", "2", "--precision", "auto", "--engines", "studio",
                                      "--trainer"])
    threads = torch.get_num_threads()
    try:
        host_time.main()
    finally:
        torch.set_num_threads(threads)  # the script runs on one thread
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["engine"] for r in rows] == ["studio", "studio-trainer"] and rows[0]["ms_per_layer"] > 0
    assert rows[1]["trainer_ms_per_step"] > 0 and rows[1]["trainer_steps"] == 2
    assert presets["host-qwen2.5-0.5b"]["config"]["num_hidden_layers"] == 24
    assert presets["host-qwen2.5-0.5b"]["config"]["hidden_size"] == 64


def test_graphs_grid_pairs_eager_and_replayed_rows_and_needs_cuda(monkeypatch, capsys):
    """bench --graphs-grid: rows on both sides of auto's line, each eager and replayed (GPU only)."""
    from studio.bench_grid import GRAPHS_GRID
    from studio.__main__ import main
    assert [(r.shape, r.method, r.batch, r.seq, r.graphs) for r in GRAPHS_GRID] == [
        ("qwen2.5-3b", "lora", 4, 2048, "off"), ("qwen2.5-3b", "lora", 4, 2048, "on"),
        ("qwen2.5-7b", "lora", 1, 512, "off"), ("qwen2.5-7b", "lora", 1, 512, "on"),
        ("qwen2.5-7b", "qlora", 4, 2048, "off"), ("qwen2.5-7b", "qlora", 4, 2048, "on")]
    assert main(["bench", "--graphs-grid", "--device", "cpu"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_a_packed_row_trains_the_same_examples_in_both_engines():
    """bench --packed-grid's rows on the CPU: ours attends per example (varlen attention) and peft through the
    block mask; same first loss. The batch packs examples of 64-512 tokens, each first label masked."""
    from studio.bench import packed_batch
    from studio.memory_bench import random_batch
    batch = packed_batch(random_batch(500, 2, 700))
    pos = batch["position_ids"]
    starts = (pos == 0).nonzero().tolist()
    assert len(starts) >= 4 and all(batch["labels"][r, c] == -100 for r, c in starts)
    assert batch["attention_mask"].shape == (2, 1, 700, 700)
    rows = list(bench(device="cpu", warmup=0, steps=1, rounds=1,
                      grid=[Row("tiny-llama", "lora", 2, 256, False, packed=True)]))
    ours, peft = (next(r for r in rows if r["engine"] == e) for e in ("studio", "peft"))
    assert ours["packed"] and peft["packed"]
    assert ours["loss_first_last"][0] == pytest.approx(peft["loss_first_last"][0], rel=1e-3)


def test_packed_grid_needs_cuda(capsys):
    from studio.__main__ import main
    assert main(["bench", "--packed-grid", "--device", "cpu"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_methods_grid_holds_every_preset_peft_trains_too():
    """bench --methods: one row per preset whose adapter peft trains (at the preset's settings), 4-bit ones aside."""
    from studio.bench_grid import PEFT_TRAINS, methods_grid
    from studio.methods import presets, resolve
    cpu = methods_grid(torch.device("cpu"))
    names = {r.method for r in cpu}
    assert {"lora", "dora", "rslora", "pissa", "olora", "loraplus", "adalora", "ia3", "loha", "lokr", "vera",
            "glora", "prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2"} == names
    assert all(resolve(n)[0].peft_type in PEFT_TRAINS for n in names) and "qlora" in presets()
    assert all((r.shape, r.batch, r.seq, r.preset, r.grad_ckpt) == ("gemma-3-270m", 2, 128, True, False) for r in cpu)
    assert {r.shape for r in methods_grid(torch.device("cuda"))} == {"qwen2.5-0.5b"}


@pytest.mark.parametrize("method", ["loha", "adalora", "loraplus", "p_tuning_v2", "pissa", "p_tuning"])
def test_a_preset_row_trains_the_same_adapter_in_both_engines(method):
    """peft gets our preset's settings: the same adapter files (same initial weights), or for the LoRA family the
    same LoraConfig fields (PiSSA: peft's own SVD init, equal to ours); LoRA+ through peft's optimizer helper and
    AdaLoRA's budget step each side's own way. Where weights are shared, the losses of every step match."""
    rows = list(bench(device="cpu", warmup=1, steps=1, rounds=1, grid=[Row("tiny-llama", method, 2, 16, False,
                                                                           preset=True)]))
    theirs, ours = rows
    assert (theirs["engine"], ours["engine"]) == ("peft", "studio") and ours["preset"] and theirs["preset"]
    assert "error" not in theirs and "error" not in ours and ours["speedup_vs_peft"] > 0
    if method == "p_tuning":  # peft trains its prompt encoder from its own init (our files hold its output)
        return
    assert ours["loss_first_last"] == pytest.approx(theirs["loss_first_last"], abs=2e-4)


def test_bench_methods_cli_runs_the_methods_grid(monkeypatch, capsys):
    import studio.bench as bench_mod
    from studio.bench_grid import methods_grid
    seen = {}

    def fake_bench(*args, grid=None, **kwargs):
        seen["grid"] = grid
        return iter([])
    monkeypatch.setattr(bench_mod, "bench", fake_bench)
    assert main(["bench", "--methods", "--device", "cpu"]) == 0
    assert seen["grid"] == methods_grid(torch.device("cpu"))
    assert main(["bench", "--methods", "dora,vera", "--device", "cpu"]) == 0
    assert [r.method for r in seen["grid"]] == ["dora", "vera"]
    with pytest.raises(ConfigError, match="peft does not train adapter"):
        methods_grid(torch.device("cpu"), "dora,adapter")


def test_methods_probe_runs_presets_on_a_small_vocabulary_shape(monkeypatch, capsys):
    """baselines/methods_probe.py: the methods bench on a shape whose head is small (the layers' share)."""
    import sys

    from baselines import methods_probe
    from studio.models import model_presets
    monkeypatch.setattr(sys, "argv", ["methods_probe", "--methods", "loha", "--layers", "1", "--batch", "1",
                                      "--seq", "16", "--rounds", "1", "--steps", "1", "--warmup", "1"])
    methods_probe.main()
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["shape"], r["method"], r["engine"]) for r in rows] == [("probe", "loha", "peft"), ("probe", "loha", "studio")]
    assert rows[1]["loss_first_last"] == pytest.approx(rows[0]["loss_first_last"], abs=2e-4)
    assert "probe" not in model_presets()  # the cached preset table is left as it was


def test_long_grid_pairs_chunked_and_whole_mlps_and_needs_cuda(monkeypatch, capsys):
    """bench --long-grid: 7B rows at 1 x 16,384 and 1 x 32,768, ours with the recomputed MLPs in row chunks and
    whole (one peft row each); on the CPU a tiny row of each kind runs (the threshold lowered to reach it):
    same losses, and the estimate of the chunked row is the lower."""
    import studio.chunked_mlp as chunked_mlp
    from studio.__main__ import main
    from studio.bench_grid import LONG_GRID
    assert [(r.method, r.seq, r.mlp_chunks) for r in LONG_GRID] == [
        ("lora", 16384, True), ("lora", 16384, False), ("qlora", 16384, True), ("qlora", 16384, False),
        ("qlora", 32768, True), ("qlora", 32768, False)]
    assert len({r.baseline_key() for r in LONG_GRID}) == 3
    assert main(["bench", "--long-grid", "--device", "cpu"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    monkeypatch.setattr(chunked_mlp, "MLP_CHUNK_ELEMENTS", 2 * 64 * 64)
    rows = list(bench(device="cpu", with_peft=False, warmup=0, steps=1, rounds=1,
                      grid=[Row("tiny-llama", "lora", 2, 128, True, mlp_chunks=c) for c in (True, False)]))
    chunked, whole = rows
    assert (chunked["mlp_chunks"], whole["mlp_chunks"]) == (True, False)
    assert chunked["loss_first_last"] == pytest.approx(whole["loss_first_last"], rel=1e-5)
    assert chunked["estimated_bytes"] < whole["estimated_bytes"]


def test_epilogue_check_tells_a_kept_term_from_one_rounded_first():
    """baselines/epilogue_check.py (a GPU question: does CUDA's addmm keep a small term it adds in its epilogue?):
    on the CPU the epilogue keeps it whole, and the measure tells that from rounding the product first."""
    from baselines.epilogue_check import kept_share
    got = kept_share(512, 256, 256, torch.device("cpu"), torch.bfloat16)
    assert got["kept"] == pytest.approx(1.0, abs=0.05)
    assert got["kept_if_rounded_first"] < 0.3


def test_allocator_churn_per_timed_step():
    """GPU rows carry allocator_per_step: device mallocs, frees and retries between the warm-up and the end."""
    from studio.bench import allocator_churn
    before = {"num_device_alloc": 40, "num_device_free": 2, "num_alloc_retries": 0}
    after = {"num_device_alloc": 50, "num_device_free": 12, "num_alloc_retries": 5}
    assert allocator_churn(before, after, 5) == {"device_alloc": 2.0, "device_free": 2.0, "alloc_retries": 1.0}


def test_lora_order_ab_ways_compute_the_same_output():
    """baselines/lora_order_ab.py (run on the GPU): the three ways of adding LoRA's term give one output."""
    from baselines.lora_order_ab import adapter_then_base, base_then_adapter, one_wide_gemm
    g = torch.Generator().manual_seed(0)
    x, w, low, b = (torch.randn(shape, generator=g) for shape in ((32, 24), (40, 24), (32, 4), (40, 4)))
    want = adapter_then_base(x, w, low, b)
    torch.testing.assert_close(base_then_adapter(x, w, low, b), want)
    torch.testing.assert_close(one_wide_gemm(x, torch.cat([w, b], dim=1), low, b), want)


def test_gemm_ab_forms_compute_the_same_product():
    """baselines/gemm_ab.py (run on the GPU): every form of a frozen GEMM, and gate and up joined, give one product
    (the addmm_ forms onto an output holding something else before)."""
    from baselines.gemm_ab import forms, joined_gate_up
    g = torch.Generator().manual_seed(0)
    x, stored = torch.randn(32, 24, generator=g), torch.randn(40, 24, generator=g)
    c = torch.full((32, 40), 7.0)
    for m in (stored.t(), stored[:24].contiguous()):  # a forward's transposed weight, an input gradient's
        want = x @ m
        for form, (fn, library) in forms(x, m, c[:, :m.shape[1]]).items():
            torch.testing.assert_close(fn(), want, msg=form)
    w_gate, w_up = stored[:20], stored[20:]
    apart, joined = (fn() for fn in joined_gate_up(x, w_gate, w_up, stored).values())
    for got, want in zip(joined, apart):
        torch.testing.assert_close(got, want)


def test_overlap_ab_forms_run_the_gemm_and_its_partner_once_each():
    """baselines/overlap_ab.py (run on the GPU): each form runs what its name says (on the CPU, without streams),
    and every partner that loads here runs at a small shape."""
    from baselines.overlap_ab import forms, partners
    calls: list[str] = []
    found = forms(lambda: calls.append("gemm"), lambda: calls.append("partner"), None)
    assert set(found) == {"gemm", "partner", "one_stream", "gemm_first_same", "partner_first_same",
                          "gemm_first_high", "partner_first_high"}
    for name, fn in found.items():
        calls.clear()
        fn()
        want = [name] if name in ("gemm", "partner") else ["gemm", "partner"]
        assert sorted(calls) == want, name
    made = partners(8, 32, 48, torch.device("cpu"), torch.float32, torch.Generator().manual_seed(0))
    assert {"rank_r", "gated"} <= set(made)
    for what, fn in made.items():  # rows x intermediate; the dequantized weight intermediate x hidden
        assert fn().shape == ((48, 32) if what == "dequant" else (8, 48)), what


class _FakeCuda:
    """torch.cuda's memory calls as a card of `total` bytes that holds `outside` outside the allocator."""

    def __init__(self, monkeypatch, total: int, outside: int, reserved: int = 0):
        self.total, self.outside, self.reserved, self.fractions = total, outside, reserved, []
        for name, fn in (("mem_get_info", lambda device=None: (self.total - self.outside - self.reserved, self.total)),
                         ("memory_reserved", lambda device=None: self.reserved),
                         ("max_memory_reserved", lambda device=None: self.reserved),
                         ("empty_cache", lambda: None),
                         ("get_device_properties", lambda device=None: type("P", (), {"total_memory": self.total})),
                         ("set_per_process_memory_fraction", lambda f, device=None: self.fractions.append(f))):
            monkeypatch.setattr(torch.cuda, name, fn)


def test_a_fitted_row_runs_within_its_cards_memory_on_cuda(monkeypatch):
    """A row fitted to a card (bench's `fit`) runs on a larger GPU with the allocator capped at what the card would
    leave it (its memory less what the process holds outside the allocator), reports what the card then held,
    and the cap is lifted after it, whatever happened."""
    import studio.bench as bench_mod
    from studio.gpus import gpu_memory
    gib = 2**30
    fake = _FakeCuda(monkeypatch, total=140 * gib, outside=gib)
    card = gpu_memory("RTX 4090")
    monkeypatch.setattr(bench_mod, "build_step", lambda *args: None)

    def timed(*args):
        assert fake.fractions == [(card - gib) / (140 * gib)]  # capped while the steps run
        fake.reserved = 20 * gib
        return {"ms_per_step": 1.0}

    monkeypatch.setattr(bench_mod, "_timed_row", timed)
    cuda = torch.device("cuda")
    row = Row("qwen2.5-7b", "qlora", 4, 2048, True, fit="RTX 4090")
    out = bench_mod._measure_row(row, "studio", cuda, 1, 1, False)
    assert fake.fractions[-1] == 1.0
    assert out["card_capped"] and out["card_bytes"] == card and out["outside_allocator_bytes"] == gib
    assert out["on_card_bytes"] == 21 * gib and out["fits_card"]
    assert out["allocator_cap_bytes"] == pytest.approx(card - gib, abs=1)
    # peft's row and our rows without a card run uncapped
    monkeypatch.setattr(bench_mod, "_timed_row", lambda *args: {"ms_per_step": 1.0})
    for r, engine in ((row, "peft"), (dataclasses.replace(row, fit=""), "studio")):
        fake.fractions.clear()
        assert "card_capped" not in bench_mod._measure_row(r, engine, cuda, 1, 1, False) and not fake.fractions

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(bench_mod, "_timed_row", out_of_memory)
    monkeypatch.setattr(bench_mod, "machine_facts", lambda device: {})
    monkeypatch.setattr(bench_mod, "release_memory", lambda: None)
    got = bench_mod.run_row(row, "studio", cuda, 1, 1)
    assert got["oom"] and got["card_capped"] and got["fit"] == "RTX 4090" and fake.fractions[-1] == 1.0


def test_the_cap_leaves_a_card_as_large_as_the_gpu_uncapped():
    from studio.card_cap import allocator_cap
    assert allocator_cap(80, 2, 80) == 1.0 and allocator_cap(96, 2, 80) == 1.0
    assert allocator_cap(24, 2, 80) == pytest.approx(22 / 80)
    assert allocator_cap(1, 2, 80) == 0.0
