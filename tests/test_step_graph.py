"""train.cuda_graphs: the padded, static-shape micro-batch equals the eager one, and the trainer's graph
path (capture, replay into fixed gradient buffers, fallback) follows the eager trajectory.

The CPU cannot capture a CUDA graph, so the trainer tests stand a re-running replay in for
torch.cuda.CUDAGraph (training.emulate_graph_capture): everything around the capture runs as on a GPU.
Whether a method may be captured at all is checked with a stricter stand-in (graph_replay.py) that
re-issues the recorded operations without running the model's Python, as a real replay does.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from studio import step_graph
from studio.config import RunConfig, load_config
from studio.errors import ConfigError
from studio.losses import causal_lm_loss, static_shapes
from studio.methods import apply_method, method_config, registry, resolve
from studio.models import build_random_model, model_presets
from studio.step_graph import GraphedMicroStep, capturing, graph_blocker, pad_batch
from studio.trainer import train
from graph_replay import emulate_strict_graph_capture
from method_matrix import CASES
from training import emulate_graph_capture


def test_pad_batch_grows_to_the_captured_shape_without_a_mask():
    batch = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
             "labels": torch.tensor([[-100, 6, 7], [8, 9, -100]])}
    out = pad_batch(batch, rows=3, length=5, pad_id=0)
    assert set(out) == {"input_ids", "labels"}
    assert out["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 0, 0, 0], [0] * 5]
    assert out["labels"].tolist() == [[-100, 6, 7, -100, -100], [8, 9, -100, -100, -100], [-100] * 5]
    with pytest.raises(ValueError, match="does not fit"):
        pad_batch(batch, rows=1, length=5, pad_id=0)


def test_pad_batch_keeps_a_packed_batch_s_examples_apart():
    """A packed batch keeps its positions and gets its block mask at the new size: each run of padding is an
    example of its own, positions from 0 (so no real token sees a pad, and each pad row sees itself)."""
    from studio.data_render import block_causal_mask, collate
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "position_ids": [0, 1, 2, 0, 1]},
            {"input_ids": [3, 4], "labels": [-100, 4], "position_ids": [0, 1]}]
    batch = collate(rows, pad_id=0)
    out = pad_batch(batch, rows=3, length=8, pad_id=0)
    assert set(out) == {"input_ids", "labels", "position_ids", "attention_mask"}
    # row 2: collate's padding (0, 1, 2) and pad_batch's (0, 1, 2), each a block of its own
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 0, 1, 2, 0, 1, 2], list(range(8))]
    mask = out["attention_mask"]
    assert mask.shape == (3, 1, 8, 8) and torch.equal(mask, block_causal_mask(out["position_ids"]))
    assert not mask[0, 0, 3, :3].any() and mask[0, 0, 4, 3:5].all()  # the second example sees only itself
    assert not mask[:, 0, :5, 5:].any()  # no real token sees the padding
    assert mask.diagonal(dim1=-2, dim2=-1).all()
    torch.testing.assert_close(out["attention_mask"][:2, :, :5, :5], batch["attention_mask"][:, :, :5, :5])


def _blocker(**changes):
    facts = dict(device=torch.device("cuda"), task="causal_lm", method=registry()["lora"],
                 method_cfg=method_config({"name": "lora"}), mixed_precision="bf16", processes=1, compile=False,
                 offload=False) | changes
    return graph_blocker(**facts)


@pytest.mark.parametrize("changes, reason", [
    ({"device": torch.device("cpu")}, "CUDA"), ({"task": "classification"}, "causal-LM"),
    ({"mixed_precision": "fp16"}, "bf16"), ({"processes": 2}, "one process"),
    ({"compile": True}, "train.compile"), ({"offload": True}, "offload_checkpoints"),
    ({"recomputed_dropout": True}, "redraws them"), ({"packed_length": 4096}, "block mask"),
    ({"method": registry()["adapter"], "method_cfg": method_config({"name": "adapter", "drop_prob": 0.2})},
     "not marked safe")])
def test_graph_blocker_names_what_stops_capture(changes, reason):
    assert _blocker() is None and _blocker(packed_length=2048) is None
    assert reason in _blocker(**changes)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gemma3"])
def test_padded_static_micro_batch_equals_the_eager_one(arch):
    """pad_batch drops the mask and adds pad rows/columns; static_shapes weighs them 0: same loss, same grads."""
    model = build_random_model(model_presets()[arch]["config"], seed=0)
    apply_method(model, method_config({"name": "lora", "r": 4, "lora_dropout": 0.0, "target_modules": "all-linear",
                                       "init_lora_weights": "gaussian"}))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 200, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    batch = {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "labels": labels}

    def loss_and_grads(b: dict, static: bool):
        model.zero_grad(set_to_none=True)
        with static_shapes() if static else torch.enable_grad():
            loss, count = causal_lm_loss(model, b, chunk=5)
        loss.backward()
        return loss.detach(), count, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    eager = loss_and_grads(batch, False)
    padded = loss_and_grads(pad_batch(batch, rows=3, length=16, pad_id=0), True)
    torch.testing.assert_close(padded[0], eager[0], atol=1e-5, rtol=1e-5)
    assert padded[1] == eager[1]
    for name, grad in eager[2].items():
        torch.testing.assert_close(padded[2][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def _cfg(**sets):
    base = {"model.name": "tiny-llama", "model.device": "cpu", "data.path": "arith", "data.max_length": 48,
            "data.limit": 64, "train.batch_size": 3, "train.grad_accum": 2, "train.max_steps": 4, "train.lr": 3e-3,
            "method.name": "lora", "method.r": 4, "method.lora_dropout": 0.0, "method.target_modules": "all-linear"}
    return load_config(None, [f"{k}={v}" for k, v in (base | sets).items()])


def _run(cfg) -> tuple[list[float], list[str]]:
    events = list(train(cfg))
    return [e["loss"] for e in events if e["type"] == "step"], [e["message"] for e in events if e["type"] == "status"]


@pytest.mark.parametrize("model, max_length", [("tiny-llama", 48), ("tiny-gemma3", 100)])  # Gemma's window: 64
def test_a_packed_run_replays_like_its_eager_varlen_run(monkeypatch, model, max_length):
    """With data.packing, an eager run attends per example (varlen attention, segments read on the host);
    a captured one takes the padded batch's block mask through sdpa, or on a sliding-window model shorter
    than the batch, the segments transformers rebuilds from the positions on the device: the same
    losses, and nothing in the recording a real capture would refuse."""
    sets = {"model": model, "packing": True, "max_length": max_length}
    eager, replayed, captures, notes = _eager_and_replayed(monkeypatch, "lora", {"r": 4, "target_modules": "all-linear"},
                                                           **sets)
    assert any("micro-batches replay" in n for n in notes)
    assert captures and all(found == [] for found in captures)
    assert replayed == pytest.approx(eager, rel=1e-5)


def test_on_the_cpu_the_run_says_graphs_need_cuda_and_trains():
    losses, notes = _run(_cfg(**{"train.cuda_graphs": True}))
    assert len(losses) == 4
    assert any("train.cuda_graphs is off for this run: it needs a CUDA device" in n for n in notes)


def test_auto_captures_a_small_model_run_that_can_take_it(monkeypatch):
    """The default (auto): on the CPU nothing to say; where capture can apply, a small model's
    micro-batches replay without being asked; "off" keeps them eager."""
    eager, notes = _run(_cfg())
    assert not any("cuda_graphs" in n for n in notes)
    monkeypatch.setattr("studio.trainer.graph_blocker", lambda **_: None)
    replays = emulate_graph_capture(monkeypatch)
    graphed, notes = _run(_cfg())
    assert len(replays) == 4 * 2 and any("micro-batches replay as CUDA graphs" in n for n in notes)
    assert graphed == pytest.approx(eager, rel=1e-4)
    replays.clear()
    _run(_cfg(**{"train.cuda_graphs": "off"}))
    assert replays == []


def test_auto_says_what_keeps_graphs_off_for_a_small_model(monkeypatch):
    monkeypatch.setattr("studio.trainer.graph_blocker", lambda **_: step_graph.COMPILE)
    replays = emulate_graph_capture(monkeypatch)
    _, notes = _run(_cfg())
    assert f"train.cuda_graphs (auto) stays off for this run: {step_graph.COMPILE}." in notes
    assert replays == []


def test_graphs_decision_pays_where_a_micro_batch_is_host_bound_under_auto():
    """auto weighs parameters x tokens of the largest micro-batch: the measured H200 rows keep their
    decisions (0.5B and 1.5B replay, 7B at 4 x 2,048 steps eagerly), and a 7B with short batches replays."""
    decide = step_graph.graphs_decision
    assert decide("auto", 494_000_000, None, 4 * 1024) == (True, None)
    assert decide("auto", 1_540_000_000, None, 4 * 2048) == (True, None)
    assert decide("auto", 7_600_000_000, None, 4 * 2048) == (False, None)  # GPU-bound: replay gained 1% on 7B
    assert decide("auto", 7_600_000_000, None, 1 * 512) == (True, None)  # the host's ~28 layers outweigh its work
    assert decide("auto", 494_000_000, None, 64 * 2048) == (False, None)
    assert decide("on", 7_600_000_000, None, 4 * 2048) == (True, None)  # asked for: done
    assert decide("off", 494_000_000, None, 512) == (False, None)
    assert decide("auto", 494_000_000, step_graph.CUDA_ONLY, 512) == (False, None)  # CPU runs: nothing to say
    assert decide("auto", 7_600_000_000, step_graph.COMPILE, 4 * 2048) == (False, None)
    assert decide("auto", 494_000_000, step_graph.COMPILE, 512) == (
        False, f"train.cuda_graphs (auto) stays off for this run: {step_graph.COMPILE}.")
    assert decide("auto", 494_000_000, "it runs on one process only", 512) == (False, None)  # nothing to change
    assert decide("on", 494_000_000, step_graph.CUDA_ONLY, 512) == (
        False, "train.cuda_graphs is off for this run: it needs a CUDA device.")


def test_micro_batch_tokens_takes_the_longest_example_up_to_max_length():
    assert step_graph.micro_batch_tokens(4, [100, 300, 200], 2048) == 4 * 300
    assert step_graph.micro_batch_tokens(4, [100, 3000], 2048) == 4 * 2048
    assert step_graph.micro_batch_tokens(2, [], 512) == 2 * 512


@pytest.mark.parametrize("value, setting", [(True, "on"), (False, "off"), ("auto", "auto"), ("true", "on")])
def test_cuda_graphs_keeps_accepting_yes_and_no(value, setting):
    """It was a yes/no switch: YAML true/false (and --set train.cuda_graphs=true) still mean on/off."""
    assert _cfg(**{"train.cuda_graphs": value}).train.cuda_graphs == setting


def test_cuda_graphs_refuses_other_words():
    with pytest.raises(ConfigError, match="must be one of auto, on, off"):
        _cfg(**{"train.cuda_graphs": "always"})


@pytest.mark.parametrize("ckpt,dtype", [(False, "float32"), (True, "float32"), (True, "bfloat16"), (0.5, "float32")])
def test_replayed_micro_batches_follow_the_eager_trajectory(monkeypatch, ckpt, dtype):
    """bf16: under autocast, the LoRA ops read the step's 16-bit weight copies (refreshed in place). 0.5: only
    the bottom layer recomputed (train.checkpoint_fraction, as a checkpoint_budget_gb run may pick)."""
    sets = {"train.gradient_checkpointing": bool(ckpt), "model.dtype": dtype, "train.checkpoint_fraction": float(ckpt or 1)}
    eager, _ = _run(_cfg(**sets))
    monkeypatch.setattr("studio.trainer.graph_blocker", lambda **_: None)
    replays = emulate_graph_capture(monkeypatch)
    graphed, notes = _run(_cfg(**sets, **{"train.cuda_graphs": True}))
    assert len(replays) == 4 * 2  # every micro-batch of every step replayed (one graph: 48 <= 128 tokens)
    assert any("micro-batches replay as CUDA graphs" in n for n in notes)
    assert graphed == pytest.approx(eager, rel=1e-4)  # gradients accumulate into the captured buffers


def test_replayed_losses_read_a_step_late_are_each_steps_own(monkeypatch):
    """On CUDA the trainer reads a step's loss while the next step runs (studio/host_ahead.py); a graph's loss
    is overwritten by its next replay, so the step keeps its own copy."""
    eager, _ = _run(_cfg())
    monkeypatch.setattr("studio.trainer.graph_blocker", lambda **_: None)
    monkeypatch.setattr("studio.host_ahead.READ_LATE_ON", {"cpu"})
    replays = emulate_graph_capture(monkeypatch)
    graphed, _ = _run(_cfg(**{"train.cuda_graphs": True}))
    assert len(replays) == 4 * 2 and graphed == pytest.approx(eager, rel=1e-4)


def test_each_padded_length_gets_its_graph_captured_at_a_step_start(monkeypatch):
    """Length buckets: a new length met at micro-batch 0 is captured (the gradients are empty then);
    met later in a step, that micro-batch runs eagerly, adding into the same buffers."""
    monkeypatch.setattr(step_graph, "LENGTH_BUCKET", 2)
    eager, _ = _run(_cfg(**{"train.max_steps": 6}))
    monkeypatch.setattr("studio.trainer.graph_blocker", lambda **_: None)
    replays = emulate_graph_capture(monkeypatch)
    captured = []
    real_capture = GraphedMicroStep.capture
    monkeypatch.setattr(GraphedMicroStep, "capture",
                        lambda self, batch: captured.append(batch["input_ids"].shape) or real_capture(self, batch))
    graphed, _ = _run(_cfg(**{"train.cuda_graphs": True, "train.max_steps": 6}))
    assert len(captured) >= 2 and all(rows == 3 and length % 2 == 0 for rows, length in captured)
    assert len(set(captured)) == len(captured)  # one graph per length
    assert 0 < len(replays) < 6 * 2  # some micro-batches met an uncaptured length mid-step: eager
    assert graphed == pytest.approx(eager, rel=1e-4)


def test_a_failed_capture_leaves_the_run_stepping_eagerly(monkeypatch):
    eager, _ = _run(_cfg())
    monkeypatch.setattr("studio.trainer.graph_blocker", lambda **_: None)

    def refuse(self):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(GraphedMicroStep, "record", refuse)
    fallback, notes = _run(_cfg(**{"train.cuda_graphs": True}))
    assert any("capture failed (RuntimeError: operation not permitted" in n and "steps eagerly" in n for n in notes)
    assert fallback == pytest.approx(eager, rel=1e-4)  # the warm-up's gradients were dropped


def _replay_cfg(name: str, overrides: dict, graphs: str, model: str = "tiny-llama", ckpt: bool = False,
                keep_dropout: bool = False, packing: bool = False, max_length: int = 48) -> RunConfig:
    """A short run of a method on a tiny model; its dropout-like settings at 0 unless keep_dropout (a padded
    batch draws more random numbers than the eager one, so with them the two runs part for a fair reason)."""
    method = {"name": name, **overrides}
    for f in dataclasses.fields(resolve(name)[0].config_cls):
        if ("dropout" in f.name or f.name == "drop_prob") and not keep_dropout:
            method[f.name] = 0.0
    return RunConfig.from_dict({
        "model": {"name": model, "device": "cpu"}, "method": method,
        "data": {"path": "arith", "max_length": max_length, "limit": 64, "packing": packing},
        "train": {"batch_size": 3, "grad_accum": 2, "max_steps": 4, "lr": 1e-2, "seed": 0, "cuda_graphs": graphs,
                  "gradient_checkpointing": ckpt}})


def _eager_and_replayed(monkeypatch, name: str, overrides: dict, **run) -> tuple[list[float], list[float], list, list]:
    """Losses of an eager run and of the same run replayed from recorded steps (tests/graph_replay.py),
    the host-bound operations each capture met, and the run's graph notes."""
    eager, _ = _run(_replay_cfg(name, overrides, "off", **run))
    monkeypatch.setattr("studio.trainer.graph_blocker", lambda **_: None)
    captures = emulate_strict_graph_capture(monkeypatch)
    replayed, notes = _run(_replay_cfg(name, overrides, "on", **run))
    return eager, replayed, captures, [n for n in notes if "cuda_graphs" in n]


CAPTURABLE = [c for c in CASES if "causal_lm" in resolve(c.name)[0].task_types
              and resolve(c.name)[0].capturable(method_config({"name": c.name, **c.overrides}))]


@pytest.mark.parametrize("case", CAPTURABLE, ids=[c.id for c in CAPTURABLE])
def test_a_method_marked_safe_trains_the_same_replayed_from_its_recorded_step(monkeypatch, case):
    """What capture freezes (every host decision of the step) must not matter: the recorded step
    re-issued on the recorded buffers follows the eager trajectory, and meets nothing a real capture
    would refuse."""
    eager, replayed, captures, notes = _eager_and_replayed(monkeypatch, case.name, case.overrides)
    assert notes == ["train.cuda_graphs: micro-batches replay as CUDA graphs (one per padded length, "
                     "captured on its first use)."]
    assert captures and all(found == [] for found in captures)
    assert replayed == pytest.approx(eager, rel=1e-5)


@pytest.mark.parametrize("model", ["tiny-qwen2", "tiny-gemma3"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_lora_replays_like_eager_on_each_architecture_with_and_without_checkpointing(monkeypatch, model, ckpt):
    """The default method on the other layer types (q/k/v biases; Gemma-3's sliding window and extra
    norms), with the checkpoint's recomputation inside the recorded step too."""
    eager, replayed, captures, _ = _eager_and_replayed(
        monkeypatch, "lora", {"r": 4, "target_modules": "all-linear"}, model=model, ckpt=ckpt)
    assert captures and all(found == [] for found in captures)
    assert replayed == pytest.approx(eager, rel=1e-5)


def test_the_replay_check_catches_a_step_decided_on_the_host(monkeypatch):
    """AdapterDrop draws on the host whether a layer's adapters run; a replay repeats the captured choice,
    so its training parts from the eager one, and the capture meets the host read: the check above can
    fail, and such settings keep a run eager."""
    overrides = {"bottleneck": 8, "drop_prob": 0.5}
    assert not registry()["adapter"].capturable(method_config({"name": "adapter", **overrides}))
    eager, replayed, captures, _ = _eager_and_replayed(monkeypatch, "adapter", overrides, keep_dropout=True)
    assert any("_local_scalar_dense" in found for found in captures)
    assert replayed != pytest.approx(eager, rel=1e-3)


def test_dylora_trains_its_sampled_rank_through_a_mask_a_replay_reads(monkeypatch):
    """DyLoRA draws its rank on the host between steps and writes it into a mask buffer, so the replayed
    steps train at the ranks the eager run samples (with ranks 1..4 drawn over the run)."""
    eager, replayed, captures, _ = _eager_and_replayed(monkeypatch, "dylora", {"r": 4, "min_rank": 1})
    assert captures and all(found == [] for found in captures)
    assert replayed == pytest.approx(eager, rel=1e-5)


@pytest.mark.parametrize("name, overrides", [("adapter", {"drop_prob": 0.2}), ("parallel_adapter", {"drop_prob": 0.2}),
                                             ("loha", {"module_dropout": 0.1}), ("lokr", {"module_dropout": 0.1})])
def test_settings_that_draw_on_the_host_keep_a_safe_method_eager(name, overrides):
    method = registry()[name]
    assert method.capturable(method_config({"name": name}))
    assert not method.capturable(method_config({"name": name, **overrides}))
    assert "not marked safe" in _blocker(method=method, method_cfg=method_config({"name": name, **overrides}))


def test_every_causal_lm_method_is_marked_safe_to_capture():
    """Each is checked above (AdaLoRA prunes and DyLoRA sets its rank between steps, in place; AdaMix routes
    and diff pruning draws its gates on the device). VPT trains image classifiers, which graphs do not cover."""
    left = {name for name, method in registry().items() if not method.graph_safe}
    assert left == {"vpt"}
    assert registry()["vpt"].task_types == ("image_classification",)


@pytest.mark.parametrize("dropout, graphs, preserved", [(0.0, True, False), (0.1, True, True), (0.0, False, True)])
def test_checkpointing_skips_the_rng_state_only_for_a_captured_step_without_dropout(dropout, graphs, preserved):
    """Restoring the RNG around a recomputed layer matters only when the forward draws random numbers;
    capture skips it (not every torch can read that state while capturing)."""
    from studio.checkpointing import draws_at_random, setup_checkpointing
    from studio.config import TrainConfig
    model = build_random_model(model_presets()["tiny-llama"]["config"], seed=0)
    apply_method(model, method_config({"name": "lora", "lora_dropout": dropout}))
    assert draws_at_random(model) == (dropout > 0)
    setup_checkpointing(model, TrainConfig(gradient_checkpointing=True), cpu=False, graphs=graphs)
    func = model.model.layers[0]._gradient_checkpointing_func
    assert func.keywords.get("preserve_rng_state", True) == preserved


class _HostSyncWatch(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that make the host wait for a CUDA device (a scalar read, a data-dependent shape):
    a captured graph can contain none of them."""
    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "unique_dim",
               "_unique2", "unique_consecutive", "bincount", "repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        bool_index = name in ("index", "index_put", "index_put_") and any(
            torch.is_tensor(i) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or [])
        if name in self.SYNCING or bool_index:
            self.seen.append(name + (" (bool mask)" if bool_index else ""))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2", "tiny-gemma3"])
@pytest.mark.parametrize("method", ["lora", "full", "ia3", "bitfit"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_the_captured_micro_batch_never_waits_on_the_device(monkeypatch, arch, method, ckpt):
    """What capture runs (padded batch, static loss, forward and backward, with transformers seeing a
    capturing stream) has no host sync, and full-attention layers keep sdpa's causal kernel (no mask).
    The eager loss, which selects the labelled positions, has a sync: the watch does see them."""
    import torch.nn.functional as F

    from studio.checkpointing import enable_gradient_checkpointing
    model = build_random_model(model_presets()[arch]["config"], seed=0).train()
    raw = {"lora": {"name": "lora", "lora_dropout": 0.0, "target_modules": "all-linear"},
           "bitfit": {"name": "bitfit", "missing_bias": "add_zero"}}.get(method, {"name": method})
    apply_method(model, method_config(raw))
    if ckpt:
        enable_gradient_checkpointing(model, 1.0, preserve_rng=False)
    ids = torch.randint(5, 200, (2, 70), generator=torch.Generator().manual_seed(0))  # past Gemma's window of 64
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    padded = pad_batch(batch, rows=2, length=80, pad_id=0)
    masks, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: masks.append((k.get("attn_mask") is None, k.get("is_causal"))) or sdpa(*a, **k))
    monkeypatch.setattr("transformers.utils.import_utils.is_cuda_stream_capturing", lambda: True)
    watch = _HostSyncWatch()
    with watch, capturing(packed=False):
        loss, _ = causal_lm_loss(model, padded, chunk=7)
        loss.backward()
    assert watch.seen == []
    windows = [getattr(m, "sliding_window", None) for m in model.modules() if hasattr(m, "is_causal")]
    full = sum(1 for w in windows if not w)
    assert masks[:len(windows)].count((True, True)) >= full  # forward calls (checkpointing re-runs some)
    assert full > 0 or arch == "tiny-gemma3"  # whose tiny config has sliding layers only (masked here)
    monkeypatch.undo()
    watch = _HostSyncWatch()
    with watch:
        causal_lm_loss(model, batch, chunk=7)[0].backward()
    assert "index (bool mask)" in watch.seen


def test_graphs_check_script_compares_both_runs(monkeypatch, capsys):
    """baselines/graphs_check (run by gpu_check.sh on a GPU): on the CPU both runs are eager, so the
    curves are equal and the graph run says why it stayed eager."""
    import json
    import sys

    from baselines import graphs_check
    monkeypatch.setattr(sys, "argv", ["graphs_check", "--device", "cpu", "--models", "tiny-llama", "--steps", "2"])
    graphs_check.main()
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["max_loss_diff"] == 0.0 and len(row["eager"]["losses"]) == 2
    assert row["graphs"]["notes"] == ["train.cuda_graphs is off for this run: it needs a CUDA device."]


def test_parameter_count_counts_a_4bit_weight_as_its_config_does():
    """What auto's line counts: a 4-bit model's packed storage holds half its parameters."""
    from studio.models import quantize_nf4
    model = build_random_model(model_presets()["tiny-llama"]["config"], seed=0)
    dense = sum(p.numel() for p in model.parameters())
    assert step_graph.parameter_count(model) == dense
    quantized = quantize_nf4(model)
    assert sum(p.numel() for p in quantized.parameters()) < dense
    assert step_graph.parameter_count(quantized) == dense


def test_recorded_step_replays_what_was_recorded_and_names_what_a_capture_refuses():
    """The stand-in itself: a replay re-issues the recorded operations on the recorded buffers (the host
    value folded in at recording stays), and host reads and host data copied in are listed."""
    from graph_replay import RecordedStep
    x = torch.ones(3)
    scale = [2.0]
    step = RecordedStep(lambda: (x * scale[0]).sum())
    assert float(step.out) == 6.0 and step.would_not_capture == []
    x.fill_(2.0)
    scale[0] = 10.0  # a host value: the replay keeps the recorded 2.0
    step.replay()
    assert float(step.out) == 12.0
    assert RecordedStep(lambda: x + torch.tensor([1.0, 2.0, 3.0])).would_not_capture == ["lift_fresh"]
    assert RecordedStep(lambda: torch.cat([torch.tensor([]), x])).would_not_capture == []  # an empty copy: nothing
    assert RecordedStep(lambda: x.sum().item()).would_not_capture == ["_local_scalar_dense"]


@pytest.mark.parametrize("name, overrides", [("lora", {"r": 4, "lora_dropout": 0.1}),
                                             ("loha", {"r": 4, "rank_dropout": 0.3}),
                                             ("adalora", {"init_r": 4, "target_r": 2, "lora_dropout": 0.1})])
def test_dropout_drawn_inside_the_replay_follows_the_eager_draws(monkeypatch, name, overrides):
    """A dropout in a replayed step draws what the eager step draws, given the same shapes (one-token
    length buckets here: a padded batch draws more numbers) and the capture's own draws given back
    (graph_replay does): the masks are made inside the replay, not frozen at capture."""
    monkeypatch.setattr(step_graph, "LENGTH_BUCKET", 1)
    eager, replayed, captures, notes = _eager_and_replayed(monkeypatch, name, overrides, keep_dropout=True)
    assert any("micro-batches replay" in n for n in notes) and all(found == [] for found in captures)
    assert replayed == pytest.approx(eager, rel=1e-5)


def test_checkpointing_over_dropout_keeps_graphs_off(monkeypatch):
    """A checkpoint redraws a layer's dropout masks by resetting the random state on the host; replayed,
    that reset is not part of the recording (graph_replay shows the recomputed masks differing), so a run
    whose draws are not seeded (here: not armed, as where the kernel cannot serve) steps eagerly and says
    why. The estimate assumes the CUDA run that seeds every draw (tests/test_seeded_dropout.py), so it pads
    for graphs with LoRA's dropout, LoHa's rank dropout, AdaMix's routing and diff pruning's gates alike."""
    monkeypatch.setattr(step_graph, "LENGTH_BUCKET", 1)
    replays = emulate_strict_graph_capture(monkeypatch)
    cfg = _replay_cfg("lora", {"r": 4, "lora_dropout": 0.1}, "auto", ckpt=True, keep_dropout=True)
    real = step_graph.graph_blocker
    monkeypatch.setattr("studio.trainer.graph_blocker", lambda **facts: real(**facts | {"device": torch.device("cuda")}))
    monkeypatch.setattr("studio.trainer.GraphedTrainStep", None)  # must not be reached
    _, notes = _run(cfg)
    assert f"train.cuda_graphs (auto) stays off for this run: {step_graph.RECOMPUTED_DROPOUT}." in notes
    assert replays == []
    for name, fields in [("lora", {"r": 4, "lora_dropout": 0.1}), ("loha", {"r": 4, "rank_dropout": 0.1}),
                         ("adamix", {"num_experts": 2}), ("diff_pruning", {})]:
        assert step_graph.config_captures(_replay_cfg(name, fields, "auto", ckpt=True, keep_dropout=True),
                                          500_000_000, torch.bfloat16, 3 * 48), name
    monkeypatch.undo()
    monkeypatch.setattr(step_graph, "LENGTH_BUCKET", 1)
    eager, replayed, _, _ = _eager_and_replayed(monkeypatch, "lora", {"r": 4, "lora_dropout": 0.1},
                                                ckpt=True, keep_dropout=True)  # what the block avoids
    assert replayed != pytest.approx(eager, rel=1e-4)


@pytest.mark.parametrize("name, fields", [("loha", {"r": 4, "rank_dropout": 0.1}), ("lokr", {"r": 4, "rank_dropout": 0.1}),
                                          ("adamix", {"num_experts": 2}), ("diff_pruning", {})])
def test_the_methods_own_draws_count_as_drawing_at_random(name, fields):
    """Rank dropout, routing and gates draw in the methods' own code, not in an nn.Dropout: each module says
    so (seedable_draws), so an unarmed run keeps the generator reset for them; with the setting at 0 (or
    one AdaMix copy) nothing draws."""
    from studio.checkpointing import draws_at_random
    model = build_random_model(model_presets()["tiny-llama"]["config"], seed=0)
    apply_method(model, method_config({"name": name, **fields}))
    assert draws_at_random(model)
    off = {k: (1 if k == "num_experts" else 0.0) for k in fields if k != "r"}
    if off:
        model = build_random_model(model_presets()["tiny-llama"]["config"], seed=0)
        apply_method(model, method_config({"name": name, **fields, **off}))
        assert not draws_at_random(model)


@pytest.mark.parametrize("name, fields", [("lora", {"r": 4, "lora_dropout": 0.1}), ("adamix", {"num_experts": 2}),
                                          ("diff_pruning", {}), ("loha", {"r": 4, "rank_dropout": 0.1})])
def test_armed_draws_let_a_checkpointed_run_capture(monkeypatch, name, fields):
    """Where the trainer arms seeded draws (CUDA), dropout, AdaMix's routing, diff pruning's gates or rank
    dropout under checkpointing no longer keep the run eager: the run says so and replays its micro-batches
    (re-run here: the CPU cannot capture)."""
    import studio.seeded_dropout as sd
    monkeypatch.setattr(sd, "ready", lambda device: True)
    monkeypatch.setattr(step_graph, "LENGTH_BUCKET", 1)
    real = step_graph.graph_blocker
    monkeypatch.setattr("studio.trainer.graph_blocker", lambda **facts: real(**facts | {"device": torch.device("cuda")}))
    replays = emulate_graph_capture(monkeypatch)
    cfg = _replay_cfg(name, fields, "auto", ckpt=True, keep_dropout=True)
    cfg.train.max_steps = 2  # the kernel runs in Triton's interpreter here: slow
    losses, notes = _run(cfg)
    assert any("random draws come from a seed" in n for n in notes)
    assert not any(step_graph.RECOMPUTED_DROPOUT in n for n in notes)
    assert replays and len(losses) == 2 and all(0 < x < 20 for x in losses)


