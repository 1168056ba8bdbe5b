"""Speed benchmark: our engine vs transformers + peft on the same shapes and settings, in one process.

Each row builds a random-init model of a real shape (presets/models.yaml, no download), applies
the method, runs warm-up steps, then times steps of loss + backward + optimizer step. The peft
baseline (baselines/peft_baseline.py, outside the engine; used when peft is installed) uses the
same base weights, batch and optimizer, with transformers' own loss. Rows are JSON objects: shape, method,
batch, seq, grad_ckpt, packed, engine, ms_per_step, tokens_per_s, mfu, peak_bytes, estimated_bytes, loss_first_last,
warmup_s (the untimed first steps: set-up, a graph's capture, a compile), checkpointed_layers (how many of how
many layers a checkpointed row of ours recomputes) and fit (rows that recompute only the layers a GPU's memory
needs, as train.checkpoint_budget_gb; on CUDA they run with the allocator capped at what that card would leave
it, studio/card_cap.py: card_capped, card_bytes, on_card_bytes, fits_card, or oom), the machine (device_name; on the
CPU threads and bf16_hardware) and the torch / transformers / peft versions, and on our rows the ratios to the
baseline and the Triton kernels in use; a row that ran out of memory or failed says so (oom, error) and the grid goes on. peak_bytes is torch.cuda.max_memory_allocated on CUDA over the
whole row (steady_peak_bytes: over the timed steps alone; reserved_bytes: the caching allocator's largest
reservation, what the card must hold); on the CPU, the tensor bytes of one more
(untimed) step watched op by op (memory_bench.step_peak_bytes).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from . import kernels
from .attention import model_batch, use_varlen_attention
from .bench_grid import BENCH_LR, BENCH_TOTAL_STEPS, Row, bench_method_cfg, default_grid
from .bench_trainer import runs_as_configured, with_trainer_time
from .checkpointing import compile_layers, enable_gradient_checkpointing, transformers_checkpointing
from .data_render import without_padding_mask
from .dequant_4bit import nf4_kernel_wanted
from .errors import ConfigError
from .host_ahead import to_device
from .losses import causal_lm_loss
from .machine_facts import machine_facts
from .memory_bench import held_across_steps, random_base_model, random_batch, step_peak_bytes
from .runner import release_memory
from .step_copies import StepCopies
from .step_graph import parameter_count

H100_BF16_FLOPS = 989e12  # dense bf16 peak of one H100 SXM (the target's reference)


def flops_per_token(n_params: int, trainable: int, method: str, layers: int, seq: int, hidden: int) -> float:
    """Training FLOPs per token: forward 2N, backward 2N for activations (+2N weight grads when full)."""
    matmul = (6 if method == "full" else 4) * n_params + 6 * trainable
    attention = 12 * layers * seq * hidden  # QK^T and AV, forward and backward
    return matmul + attention


def time_steps(step, warmup: int, steps: int, device: torch.device,
                on_warm: Callable[[], None] = lambda: None) -> tuple[float, list[float]]:
    """Seconds per timed step, and the losses of the first and the last step (read after the clock stops,
    so no step waits on the GPU; both engines start from the same weights and batch, so they compare).
    on_warm runs between the warm-up and the timed steps."""
    losses = [step() for _ in range(warmup)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    on_warm()
    t0 = time.perf_counter()
    for _ in range(steps):
        losses.append(step())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    return seconds, [round(float(losses[0]), 4), round(float(losses[-1]), 4)]


def _row_facts(row: Row, engine: str) -> dict[str, Any]:
    return {"shape": row.shape, "method": row.method, "batch": row.batch, "seq": row.seq, "grad_ckpt": row.grad_ckpt,
            "labels": row.labels, "engine": engine, "offload": row.offload and engine == "studio",
            "triton": row.triton and engine == "studio", "cuda_graphs": row.graphs if engine == "studio" else "off",
            "packed": row.packed} | ({"fit": row.fit} if row.fit and engine == "studio" else {}) | \
        ({"preset": True} if row.preset else {}) | \
        ({"mlp_chunks": row.mlp_chunks} if engine == "studio" and row.grad_ckpt else {})


def run_row(row: Row, engine: str, device: torch.device, warmup: int, steps: int, compile: bool = False) -> dict:
    """One engine's row; out of memory, or any other failure, becomes a row that says so (the grid goes on)."""
    facts = machine_facts(device)
    try:
        with _mlps(row, engine):
            return _measure_row(row, engine, device, warmup, steps, compile) | facts
    except torch.OutOfMemoryError:
        return _row_facts(row, engine) | {"oom": True} | _cap_facts(row, engine, device) | facts
    except Exception as exc:  # noqa: BLE001 - a broken row is reported, not fatal to a long GPU run
        traceback.print_exc()
        return _row_facts(row, engine) | {"error": f"{type(exc).__name__}: {exc}"[:500]} | facts
    finally:
        release_memory()


@dataclass
class Step:
    """One engine's training step on a row's model, batch and optimizer (bench and profiling share it)."""
    run: Any  # () -> the loss tensor; loss, backward, optimizer step
    model: Any
    params: list
    opt: Any
    batch: dict
    n_params: int
    dtype: torch.dtype
    graphs: bool  # each micro-batch replayed from a captured CUDA graph


def build_step(row: Row, engine: str, device: torch.device, compile: bool = False) -> Step:
    dtype = torch.bfloat16 if device.type == "cuda" or row.precision == "bf16" else torch.float32
    model = random_base_model(row.shape, device, dtype, "nf4" if row.method == "qlora" else "none")
    if device.type == "cuda":  # after the build: a 4-bit model is quantised from a bf16 one here, not loaded
        torch.cuda.empty_cache()  # the reservation measured is this row's own (not earlier rows' cached blocks)
        torch.cuda.reset_peak_memory_stats()
    n_params = sum(p.numel() for p in model.parameters())
    graphs = engine == "studio" and graphs_wanted(row, device, parameter_count(model), compile)  # as the trainer
    from .methods import apply_method, method_config
    fields = bench_method_cfg(row.method, row.preset)
    fused = device.type in ("cuda", "cpu") or None
    if engine == "studio":
        from .trainer import build_optimizer
        info = apply_method(model, method_config(fields))
        if row.grad_ckpt:
            from .offload import CheckpointOffloader
            enable_gradient_checkpointing(model, recomputed_share(row, device),
                                          CheckpointOffloader() if row.offload else None,
                                          preserve_rng=not graphs, mark=not compile)  # no dropout in its rows
        if compile:
            compile_layers(model)
        copies = None if compile else StepCopies.for_model(model, dtype)  # as the trainer (fp32: none)
        opt = build_optimizer("adamw", info.method.optimizer_groups(model, BENCH_LR, 0.0), BENCH_LR, device)

        def loss_fn(batch):  # as the trainer's LossModule, plus the method's regulariser (AdaLoRA, Diff-Pruning)
            loss = causal_lm_loss(model, model_batch(batch, model))[0]
            extra = info.method.extra_loss(model)
            return loss if extra is None else loss + extra

        def before_opt(i: int) -> None:
            info.method.on_step(model, i, BENCH_TOTAL_STEPS)

        def after_opt(i: int) -> None:
            info.method.after_optimizer_step(model, i, BENCH_TOTAL_STEPS)
    else:
        copies = None
        baseline = importlib.import_module("baselines.peft_baseline")  # outside the engine; needs peft
        if row.grad_ckpt:  # as a transformers user turns it on
            transformers_checkpointing(model)
        if not row.preset:
            model = baseline.prepare(model, row.method, fields.get("r", 0), fields.get("lora_alpha", 0))
        else:
            model = _peft_like_ours(row, model, fields, device, dtype, baseline)
        opt = baseline.optimizer(model, dataclasses.asdict(method_config(fields)), BENCH_LR, fused)

        def loss_fn(batch):
            return baseline.loss(model, batch)

        def before_opt(i: int) -> None:
            pass

        def after_opt(i: int) -> None:
            baseline.after_optimizer_step(model, i)
    params = [p for p in model.parameters() if p.requires_grad]
    batch = random_batch(model.config.vocab_size, row.batch, row.seq)
    if row.labels == "prompt":  # chat fine-tuning: prompt tokens carry label -100 (both engines get the same)
        batch["labels"][:, : row.seq // 2] = -100
    if row.packed:
        batch = packed_batch(batch)
        if engine == "studio" and not graphs:  # as the trainer: eager packed steps attend per example
            use_varlen_attention(model)
    if engine == "studio":  # as the trainer: no padding mask where the rows need none
        batch = without_padding_mask(batch)
    batch = to_device(batch, device)

    routing = kernels.disabled if not row.triton else contextlib.nullcontext

    def forward_backward(b: dict) -> torch.Tensor:
        with routing():  # forward and backward: the gated MLP picks its backward kernel there
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                loss = loss_fn(b)
            loss.backward()
        return loss.detach()

    micro = None
    counter = [0]
    if graphs:
        from .step_graph import GraphedMicroStep, pad_batch  # as the trainer: padded batch, no mask, replayed
        micro = GraphedMicroStep(forward_backward, params)
        batch = pad_batch(batch, row.batch, row.seq, 0)

    def run() -> torch.Tensor:
        if copies is not None:
            copies.refresh()
        if micro is None:
            loss = forward_backward(batch)
        else:
            if micro.graph is None:
                micro.capture(batch)
            loss = micro(batch).clone()  # the graph's output is overwritten by the next replay
        before_opt(counter[0])
        if copies is not None:
            copies.stale()
        opt.step()
        after_opt(counter[0])
        counter[0] += 1
        opt.zero_grad(set_to_none=micro is None)  # a graph adds into its own buffers
        return loss

    return Step(run, model, params, opt, batch, n_params, dtype, micro is not None)


def _peft_like_ours(row: Row, model: Any, fields: dict, device: torch.device, dtype: torch.dtype,
                    baseline: Any) -> Any:
    """peft's counterpart of our preset: LoRA-family presets from the same settings (peft runs its own init);
    other methods from our adapter's files written by a twin of the row's model (same config and weights)."""
    import tempfile

    from .checkpoint import save_adapter
    from .methods import apply_method, get_method, method_config
    cfg = method_config(fields)
    if get_method(cfg.name).name == "lora":
        return baseline.prepare_lora_like(model, dataclasses.asdict(cfg))
    twin = random_base_model(row.shape, device, dtype)
    apply_method(twin, cfg)
    with tempfile.TemporaryDirectory() as folder:
        save_adapter(twin, Path(folder) / "adapter")
        del twin
        return baseline.prepare_from_adapter(model, Path(folder) / "adapter", BENCH_TOTAL_STEPS)


def packed_batch(batch: dict, seed: int = 0) -> dict:
    """The batch's rows cut into examples of 64-512 tokens (the last one what is left), packed as data.packing
    packs: positions restarting at each example, its first label -100, the block-diagonal causal mask."""
    from .data_render import block_causal_mask
    ids = batch["input_ids"]
    g = torch.Generator().manual_seed(seed)
    pos = torch.empty(ids.shape, dtype=torch.long)
    for r in range(ids.shape[0]):
        start = 0
        while start < ids.shape[1]:
            n = min(int(torch.randint(64, 513, (1,), generator=g)), ids.shape[1] - start)
            pos[r, start:start + n] = torch.arange(n)
            start += n
    pos = pos.to(ids.device)
    labels = batch["labels"].masked_fill(pos == 0, -100)
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": block_causal_mask(pos)}


def graphs_wanted(row: Row, device: torch.device, n_params: int, compile: bool) -> bool:
    """Whether our row replays CUDA graphs: "on" always (the bench may emulate capture on the CPU),
    "auto" where train.cuda_graphs=auto would in a run of the same settings."""
    from .methods import get_method, method_config
    from .step_graph import graph_blocker, graphs_decision
    if row.graphs != "auto":
        return row.graphs == "on"
    cfg = method_config(bench_method_cfg(row.method, row.preset))
    blocker = graph_blocker(device=device, task="causal_lm", method=get_method(cfg.name), method_cfg=cfg,
                            mixed_precision="bf16", processes=1, compile=compile, offload=row.offload,
                            packed_length=row.seq if row.packed else 0)
    return graphs_decision("auto", n_params, blocker, row.batch * row.seq)[0]


def _cap_facts(row: Row, engine: str, device: torch.device) -> dict:
    """Our fitted rows on CUDA run within the card's memory (studio/card_cap.py), and say so."""
    return {"card_capped": True} if row.fit and engine == "studio" and device.type == "cuda" else {}


def _card(row: Row, engine: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Within: the allocator capped at what row.fit's card would leave it, for our fitted rows on CUDA."""
    if not _cap_facts(row, engine, device):
        return contextlib.nullcontext({})
    from .card_cap import capped_to
    from .gpus import gpu_memory
    return capped_to(gpu_memory(row.fit), device)


def _measure_row(row: Row, engine: str, device: torch.device, warmup: int, steps: int, compile: bool) -> dict:
    step = build_step(row, engine, device, compile)  # (a 4-bit model is quantized from a 16-bit one: uncapped)
    with _card(row, engine, device) as card:
        out = _timed_row(row, engine, device, warmup, steps, compile, step)
        if card:  # the card holds the allocator's reservation and what the process holds outside it
            from .card_cap import on_card_bytes
            outside, reserved = on_card_bytes(device)
            out |= card | _cap_facts(row, engine, device) | {"outside_allocator_bytes": outside,
                                                             "on_card_bytes": outside + reserved,
                                                             "fits_card": outside + reserved <= card["card_bytes"]}
    return out


def _timed_row(row: Row, engine: str, device: torch.device, warmup: int, steps: int, compile: bool,
               step: Step) -> dict:
    out = _row_facts(row, engine) | {"device": str(device), "dtype": str(step.dtype).removeprefix("torch."),
                                     "graphs": step.graphs}
    if compile and engine == "studio":
        out["compiled"] = True
    if engine == "studio" and row.method == "qlora" and not nf4_kernel_wanted():  # an A/B run (dequant_4bit.py)
        out["nf4_kernel"] = False
    warm_peak, counts = [], []

    def on_warm() -> None:  # the first steps' peak (a compile, the optimizer state's birth) vs the steady one
        if device.type == "cuda":
            warm_peak.append(torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
            counts.append(allocator_counts())

    start = time.perf_counter()
    seconds, out["loss_first_last"] = time_steps(step.run, warmup, steps, device, on_warm)
    # the untimed first steps: the optimizer's set-up, kernel checks, and a graph's capture or a compile
    out["warmup_s"] = round(time.perf_counter() - start - seconds * steps, 3)
    if device.type == "cpu":  # one more, untimed step, watched op by op (the CPU has no allocator peak)
        out["peak_bytes"] = step_peak_bytes(step.run, held_across_steps(step.model, step.opt, step.batch))
    if engine == "studio" and row.triton and kernels.verdicts():
        out["triton_kernels"] = kernels.verdicts()  # which ran (True) or were set aside (False) in this process
    tokens = row.batch * row.seq
    cfg = step.model.config
    fpt = flops_per_token(step.n_params, sum(p.numel() for p in step.params), row.method, cfg.num_hidden_layers,
                          row.seq, cfg.hidden_size)
    out.update(ms_per_step=round(seconds * 1000, 2), tokens_per_s=round(tokens / seconds, 1),
               mfu=round(fpt * tokens / seconds / H100_BF16_FLOPS, 4) if device.type == "cuda" else None,
               peak_what="max_memory_allocated" if device.type == "cuda" else "tensor bytes, op by op (CPU)")
    if device.type == "cuda":
        out["steady_peak_bytes"] = torch.cuda.max_memory_allocated()
        out["peak_bytes"] = max(warm_peak + [out["steady_peak_bytes"]])
        # what the caching allocator held at most (reservations are kept until emptied, so this covers the
        # warm-up too): a card must hold this, not just the allocated peak
        out["reserved_bytes"] = torch.cuda.max_memory_reserved()
        out["allocator_per_step"] = allocator_churn(counts[0], allocator_counts(), steps)
    return out  # the model, optimizer and batch are freed with this frame


ALLOCATOR_COUNTS = ("num_device_alloc", "num_device_free", "num_alloc_retries")


def allocator_counts() -> dict[str, int]:
    stats = torch.cuda.memory_stats()
    return {k: int(stats.get(k, 0)) for k in ALLOCATOR_COUNTS}


def allocator_churn(before: dict[str, int], after: dict[str, int], steps: int) -> dict[str, float]:
    """cudaMalloc and cudaFree calls and allocation retries per timed step: a steady step should make none (a
    cudaFree waits for the whole GPU, so one each step would keep the host from running ahead)."""
    return {k.removeprefix("num_"): round((after[k] - before[k]) / max(steps, 1), 2) for k in ALLOCATOR_COUNTS}


def _only_names(row: Row) -> set[str]:
    """What `--only` may call a row: its shape, shape:method (qwen2.5-7b:qlora), or shape:method:default for the
    row at default settings alone (not fitted to a card, not offloaded)."""
    names = {row.shape, f"{row.shape}:{row.method}"}
    return names | ({f"{row.shape}:{row.method}:default"} if not row.fit and not row.offload else set())


def row_config(row: Row) -> Any:
    """The run config a trainer would take for our side of the row."""
    from .config import RunConfig
    from .gpus import gpu_memory
    model = {"name": row.shape, "quantization": "nf4" if row.method == "qlora" else "none"}
    if row.precision == "bf16":
        model["dtype"] = "bfloat16"
    train = {"batch_size": row.batch, "gradient_checkpointing": row.grad_ckpt, "offload_checkpoints": row.offload}
    if row.fit:
        train["checkpoint_budget_gb"] = gpu_memory(row.fit) / 2**30
    return RunConfig.from_dict({"model": model, "data": {"max_length": row.seq},
                                "method": bench_method_cfg(row.method, row.preset), "train": train})


def recomputed_share(row: Row, device: torch.device) -> float:
    """Share of layers our row recomputes, as the trainer chooses it: every layer (but a top one kept for free),
    or with row.fit as many as the budget leaves."""
    from .memory import checkpoint_share
    return checkpoint_share(row_config(row), device.type, padding=False)[0]  # as estimated(): no padding


def _mlps(row: Row, engine: str) -> Any:
    """Our row's MLPs kept whole where it says so (row.mlp_chunks), else as the engine runs them."""
    from . import chunked_mlp
    return chunked_mlp.kept_whole() if engine == "studio" and not row.mlp_chunks else contextlib.nullcontext()


def estimated(row: Row, device: torch.device) -> dict:
    """estimated_bytes of our row (and, checkpointed, checkpointed_layers: how many it recomputes, of how many)."""
    from .memory import estimate
    try:
        with _mlps(row, "studio"):
            est = estimate(row_config(row), device.type, padding=False)
    except Exception:  # noqa: BLE001 - an estimate gap must not stop the speed benchmark
        return {"estimated_bytes": None}
    recomputed = {"checkpointed_layers": [est.details["checkpointed_layers"], est.details["layers"]]} \
        if row.grad_ckpt else {}
    return {"estimated_bytes": est.total} | recomputed


def baseline_available() -> bool:
    """peft installed and the repo's baselines/ package importable (run from the repository root)."""
    return importlib.util.find_spec("peft") is not None and importlib.util.find_spec("baselines") is not None


def paired_ratios(mine: list[dict], theirs: list[dict]) -> list[float]:
    """Our step time over peft's, round by round (both engines' runs of one round back to back)."""
    return [round(m["ms_per_step"] / t["ms_per_step"], 3) for m, t in zip(mine, theirs)
            if "ms_per_step" in m and "ms_per_step" in t]


def _median_row(rows: list[dict]) -> dict:
    """The round with the median step time (rounds alternate engines, so load drift hits both alike)."""
    done = sorted((r for r in rows if "ms_per_step" in r), key=lambda r: r["ms_per_step"])
    if not done:
        return rows[0]  # out of memory or an error: the row says which
    out = dict(done[len(done) // 2])
    out["rounds_ms_per_step"] = [r["ms_per_step"] for r in rows if "ms_per_step" in r]
    return out


def bench(quick: bool = False, device: str = "auto", with_peft: bool = True, warmup: int = 2,
          steps: int = 5, grid: list[Row] | None = None, rounds: int | None = None,
          compile: bool = False, only: list[str] | None = None, triton_ab: bool = False,
          eager_ab: bool = False, trainer: bool = False) -> Iterator[dict]:
    """Yield one row per (shape, method, engine); our row carries the ratios to the peft row.

    Our rows run as a trainer with default settings would (train.cuda_graphs=auto: small models on CUDA
    replay each micro-batch from a captured graph); eager_ab adds each such row again without graphs,
    triton_ab each row (eagerly) with the torch ops instead of the Triton kernels; trainer adds to our row
    the time of the same row run by the trainer (studio/bench_trainer.py), where its settings are a run's.

    The engines run in alternating rounds (peft, ours, peft, ours, ...) and each reports its median
    round: on a shared CPU the load changes over a minute, and alternating keeps the ratio fair.
    """
    from .models import resolve_device
    dev = resolve_device(device)
    grid = grid or default_grid(dev, quick)
    if only:
        unknown = set(only).difference(*map(_only_names, grid))
        if unknown:
            raise ConfigError(f"--only names shapes not in this grid: {sorted(unknown)}; it has "
                              f"{sorted({row.shape for row in grid})} (or shape:method).")
        grid = [row for row in grid if _only_names(row) & set(only)]
    if triton_ab:  # again with the torch ops instead of the Triton kernels (eager), same peft row
        grid = [variant for row in grid for variant in
                ((row, dataclasses.replace(row, triton=False, graphs="off")) if row.graphs == "auto" else (row,))]
    if eager_ab and dev.type == "cuda":  # again eagerly, unless its auto row turns out not to replay graphs
        grid = [variant for row in grid for variant in
                ((row, dataclasses.replace(row, graphs="off")) if row.graphs == "auto" else (row,))]
    rounds = rounds or (3 if dev.type == "cpu" else 1)
    have_peft = with_peft and baseline_available()
    baselines: dict[tuple, dict] = {}  # rows differing only in our own settings share one peft run
    replayed: dict[tuple, bool] = {}  # (settings, offload) -> whether its auto row replayed graphs
    for row in grid:
        if (row.method == "qlora" or row.graphs == "on") and dev.type != "cuda":
            continue
        if row.graphs == "off" and row.triton and replayed.get((row.baseline_key(), row.offload)) is False:
            continue  # its auto row already ran eagerly: the same run again
        known = baselines.get(row.baseline_key())
        theirs, mine = [], []
        for _ in range(rounds):
            if have_peft and known is None:
                theirs.append(run_row(row, "peft", dev, warmup, steps))
            mine.append(run_row(row, "studio", dev, warmup, steps, compile))
        baseline = known or (_median_row(theirs) if theirs else None)
        if baseline and known is None:
            baselines[row.baseline_key()] = baseline
            yield baseline
        ours = _median_row(mine)
        if row.graphs == "auto":
            replayed[(row.baseline_key(), row.offload)] = bool(ours.get("graphs"))
        ours.update(estimated(row, dev))
        if trainer and not compile and runs_as_configured(row):
            ours = with_trainer_time(ours, row, dev, warmup, steps)
        if baseline and "ms_per_step" in baseline and "ms_per_step" in ours:
            ours["speedup_vs_peft"] = round(ours["tokens_per_s"] / baseline["tokens_per_s"], 3)
            ours["time_ratio_vs_peft"] = round(ours["ms_per_step"] / baseline["ms_per_step"], 3)
            paired = paired_ratios(mine, theirs)
            if len(paired) > 1:  # each round's two runs are minutes apart at most: load drift cancels
                ours["time_ratio_rounds"] = paired
                ours["time_ratio_median_of_rounds"] = sorted(paired)[len(paired) // 2]
            if ours.get("peak_bytes") and baseline.get("peak_bytes"):
                ours["memory_ratio_vs_peft"] = round(ours["peak_bytes"] / baseline["peak_bytes"], 3)
        yield ours
