"""One readable training loop that yields events: step, eval, checkpoint, done.

Read it top to bottom: load the model, apply the method, prepare data, build the optimizer and
schedule, then loop over optimizer steps (each of `grad_accum` micro-batches). Built on
accelerate's Accelerator for device placement, mixed precision and data parallelism, so
`accelerate launch -m studio train CONFIG.yaml` runs this same loop on several processes; only the
main process writes files. Data order is a pure function of (seed, epoch), and checkpoints hold
optimizer, schedule and RNG state, so a resumed run continues the same loss trajectory.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from . import checkpoint as ckpt
from . import seeded_dropout
from .attention import model_batch, use_varlen_attention
from .checkpointing import compile_layers, draws_at_random, setup_checkpointing
from .config import RunConfig
from .data import build_datasets, collate
from .data_render import without_padding_mask
from .errors import ConfigError, OutOfMemoryError, StoppedError, StudioError
from .host_ahead import StepReadings, to_device
from .losses import causal_lm_loss
from .measure import SavedTensorMeter, static_bytes
from .memory import checkpoint_share
from .methods import apply_method
from .models import cpu_bf16_faster, cpu_bf16_speedup, keep_4bit_layout, load_model
from .step_copies import StepCopies
from .step_graph import (CaptureFailed, GraphedTrainStep, graph_blocker, graphs_decision,
                         micro_batch_tokens, parameter_count)
from .train_state import load_train_state, save_train_state


class LossModule(nn.Module):
    """Wraps the model so DDP sees one forward per micro-batch (its gradient sync hooks need that)."""

    def __init__(self, model: nn.Module, chunk: int, task: str):
        super().__init__()
        self.model = model
        self.chunk = chunk
        self.task = task

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.task == "classification":
            from .tasks import classification_loss
            return classification_loss(self.model, batch)
        return causal_lm_loss(self.model, model_batch(batch, self.model), self.chunk)


@dataclass
class TaskData:
    """What the loop needs from the task: model, tokenizer, examples and how to batch them."""
    model: nn.Module
    tokenizer: Any
    train: list
    eval: list
    collate: Any
    stats: dict
    labels: list | None = None


def load_task(cfg: RunConfig) -> TaskData:
    """Model + data for the configured task (a causal LM, or a sequence classifier with its labels)."""
    if cfg.model.task == "classification":
        from . import tasks
        from .models import load_tokenizer
        data = tasks.build_classification(cfg.data, load_tokenizer(cfg.model), cfg.train.seed)
        model, tok = tasks.load_classifier(cfg.model, data.labels, cfg.train.seed)
        stats = {"examples": len(data.train) + len(data.eval), "labels": data.labels}
        return TaskData(model, tok, data.train, data.eval, tasks.collate_classification, stats, data.labels)
    model, tok = load_model(cfg.model, seed=cfg.train.seed)
    splits = build_datasets(cfg.data, tok, cfg.train.seed)
    return TaskData(model, tok, splits.train, splits.eval, collate, splits.stats)


@dataclass
class Batches:
    """Deterministic micro-batches: micro-batch i of the whole run is always the same examples."""
    examples: list
    batch_size: int
    seed: int
    pad_id: int
    collate: Any = collate
    rank: int = 0
    world: int = 1

    @property
    def per_epoch(self) -> int:
        return max(1, len(self.examples) // (self.batch_size * self.world))

    _order: tuple[int, list[int]] | None = field(default=None, repr=False, compare=False)

    def order(self, epoch: int) -> list[int]:
        """The examples' order in an epoch, a function of seed and epoch (the latest kept: a large dataset's
        permutation takes a while to draw, every micro-batch)."""
        if self._order is None or self._order[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1000 + epoch)
            self._order = (epoch, torch.randperm(len(self.examples), generator=gen).tolist())
        return self._order[1]

    def get(self, index: int) -> dict:
        epoch, pos = divmod(index, self.per_epoch)
        order = self.order(epoch)
        start = (pos * self.world + self.rank) * self.batch_size
        n = len(order)  # wraps around when the data is smaller than one batch per process
        picked = [self.examples[order[(start + j) % n]] for j in range(min(self.batch_size, n))]
        return self.collate(picked, self.pad_id)


def build_optimizer(name: str, groups: list[dict], lr: float, device: torch.device) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    if name == "adamw":
        # one kernel over all tensors (on the CPU too: 4 vs 19 ms a step for Gemma-3-270M's 252 LoRA tensors)
        fused = device.type in ("cuda", "cpu") and all(p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                                                       for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=fused or None)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(f"optimizer {name} needs bitsandbytes; pip install bitsandbytes or use adamw.") from None
    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
           "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name]
    if name.startswith("paged") and device.type != "cuda":
        raise ConfigError(f"{name} pages optimizer state between GPU and host memory and needs CUDA; "
                          f"use adamw or adamw_8bit on {device.type}.")
    return cls(groups, lr=lr)


def lr_lambda(scheduler: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if scheduler == "linear":
            return 1.0 - progress
        return 1.0
    return factor


def total_steps(cfg: RunConfig, n_train: int, world: int) -> int:
    t = cfg.train
    if t.max_steps:
        return t.max_steps
    per_epoch = max(1, n_train // (t.batch_size * world)) / t.grad_accum
    return max(1, math.ceil(per_epoch * t.epochs))


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return 0


def use_cpu(cfg: RunConfig) -> bool:
    return cfg.model.device == "cpu" or (cfg.model.device == "auto" and not torch.cuda.is_available())


def process_state(cfg: RunConfig):
    """accelerate's process state (rank, world size); set up once, before the Accelerator."""
    from accelerate import PartialState
    return PartialState(cpu=use_cpu(cfg))


def mixed_precision(model: nn.Module, cpu: bool) -> str:
    """Autocast to the dtype the base computes in, so fp32 adapter weights meet 16-bit activations;
    fp16 also gets accelerate's loss scaling. A 4-bit base computes in its compute dtype. On the CPU
    only bf16 autocasts (AMX / AVX512-BF16 matmuls); an fp16 base there runs as it is."""
    compute = model.dtype
    for module in model.modules():
        if hasattr(module, "compute_dtype") and module.compute_dtype is not None:  # bitsandbytes Linear4bit
            compute = module.compute_dtype
            break
    if cpu:
        return "bf16" if compute == torch.bfloat16 else "no"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(compute, "no")


def train(cfg: RunConfig, run_dir: str | Path | None = None, stop: threading.Event | None = None,
          resume_from: str | Path | None = None) -> Iterator[dict[str, Any]]:
    """Run training; yield events. A set `stop` ends the run after the current micro-batch with a checkpoint."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t = cfg.train
    cpu = use_cpu(cfg)
    process_state(cfg)
    task = load_task(cfg)
    model, tok = task.model, task.tokenizer
    keep_4bit_layout(model)  # before any forward (a method's set-up may run one)
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state()  # a process-wide singleton: the previous run's precision must not stick
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision(model, cpu))
    set_seed(t.seed)
    is_main = accelerator.is_main_process
    info = apply_method(model, cfg.method)
    if task.labels is not None:
        from .tasks import prepare_head
        prepare_head(model)  # the new classification head trains alongside the method
    yield {"type": "status", "message": f"Loaded {cfg.model.name}; applied {cfg.method.name}."}
    if cpu and model.dtype == torch.float32 and cfg.model.quantization == "none" and cpu_bf16_faster():
        yield {"type": "status", "message": f"Tip: this CPU multiplies bf16 matrices {cpu_bf16_speedup():.1f}x as "
                                            "fast as fp32 ones (measured); model.dtype=bfloat16 trains faster."}

    if not task.train:
        raise ConfigError("The training split is empty; lower data.eval_fraction or add examples.")
    info.method.prepare_for_training(model, task.train, cfg.method)
    if not t.compile and seeded_dropout.arm(model, accelerator.device):
        yield {"type": "status", "message": "Dropout masks and the method's random draws come from a seed on the "
                                            "GPU (a checkpointed layer's recomputation draws the same ones; no "
                                            "dropout mask is kept)."}
    blocker = graph_blocker(device=accelerator.device, task=cfg.model.task, method=info.method, method_cfg=cfg.method,
                            mixed_precision=accelerator.mixed_precision, processes=accelerator.num_processes,
                            compile=t.compile,
                            offload=t.offload_checkpoints and t.gradient_checkpointing,
                            recomputed_dropout=t.gradient_checkpointing and draws_at_random(model),
                            packed_length=cfg.data.max_length if cfg.data.packing and task.labels is None else 0)
    lengths = [len(ex["input_ids"]) for ex in task.train]
    use_graphs, graphs_note = graphs_decision(t.cuda_graphs, parameter_count(model), blocker,
                                              micro_batch_tokens(t.batch_size, lengths, cfg.data.max_length))
    if graphs_note:
        yield {"type": "status", "message": graphs_note}
    if cfg.data.packing and task.labels is None:
        # captured steps take the batch's block mask (sdpa); varlen attention reads its segments on the host
        if use_graphs:
            yield {"type": "status", "message": "Packed examples attend only to themselves (a block mask in the "
                                                "captured step)."}
        elif use_varlen_attention(model):
            yield {"type": "status", "message": "Packed examples attend only to themselves (varlen attention)."}
    fraction, chosen = checkpoint_share(cfg, "cpu" if cpu else "cuda", lengths)
    if chosen:
        yield {"type": "status", "message": chosen}
    note = setup_checkpointing(model, t, cpu, graphs=use_graphs, fraction=fraction)
    if note:
        yield {"type": "status", "message": note}
    if t.compile:
        compile_layers(model)
        yield {"type": "status", "message": "train.compile: each decoder layer is compiled (a checkpointed "
                                            "one's attention and MLP, inside its checkpoint); the first steps "
                                            "compile, and compiled layers may keep more for backward than the "
                                            "memory estimate counts."}

    device = accelerator.device
    steps = total_steps(cfg, len(task.train), accelerator.num_processes)
    groups = info.method.optimizer_groups(model, t.lr, t.weight_decay)
    if not any(len(g["params"]) for g in groups):
        raise ConfigError(f"{cfg.method.name} left nothing to train; check its target settings.")
    optimizer = build_optimizer(t.optimizer, groups, t.lr, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.scheduler, t.warmup_steps, steps))
    wrapped = LossModule(model, t.loss_chunk, cfg.model.task)
    wrapped, optimizer = accelerator.prepare(wrapped, optimizer)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    trainable = [p for p in model.parameters() if p.requires_grad]

    def micro_step(batch: dict, meter: SavedTensorMeter | None = None) -> torch.Tensor:
        """One micro-batch: loss (meter: its forward's saved tensors) and backward; eager or captured."""
        with accelerator.autocast():
            with meter or nullcontext():
                loss, _ = wrapped(batch)
            extra = info.method.extra_loss(model)
            total = loss + extra if extra is not None else loss
            accelerator.backward(total / t.grad_accum)
        return loss.detach()

    graphed = GraphedTrainStep(micro_step, trainable, t.batch_size, cfg.data.max_length, pad_id,
                               accelerator.device) if use_graphs else None
    # 16-bit copies of the LoRA weights made once a step, not cast in every forward (not traced by compile)
    copies = None if t.compile else StepCopies.for_model(
        model, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision))
    batches = Batches(task.train, t.batch_size, t.seed, pad_id, task.collate, accelerator.process_index,
                      accelerator.num_processes)

    start_step = 0
    if resume_from is not None:
        start_step = load_train_state(Path(resume_from), model, optimizer, scheduler)
        yield {"type": "status", "message": f"Resumed from step {start_step}."}
    run_dir = Path(run_dir) if run_dir is not None else None
    yield {"type": "start", "total_steps": steps, "start_step": start_step, "train_examples": len(task.train),
           "eval_examples": len(task.eval), "data_stats": task.stats,
           "lengths": lengths}

    def plain(batch: dict) -> dict:
        """A causal-LM batch without the padding mask it does not need (data_render.without_padding_mask)."""
        return without_padding_mask(batch) if task.labels is None else batch

    def save(step: int) -> Path | None:
        if run_dir is None or not is_main:
            return None
        folder = run_dir / "checkpoints" / f"step-{step}"
        ckpt.save_adapter(model, folder)
        save_train_state(folder, step, optimizer, scheduler)
        return folder

    def evaluate() -> dict[str, float]:
        """Eval loss (token-weighted; per example for classification) and, for classification, accuracy."""
        wrapped.eval()
        # summed on the device and read once: a read per batch would wait for each batch's forward
        total = torch.zeros((), dtype=torch.float64, device=device)
        count = torch.zeros((), dtype=torch.int64, device=device)
        right = torch.zeros((), dtype=torch.int64, device=device)
        with torch.no_grad(), accelerator.autocast():
            for i in range(0, len(task.eval), t.batch_size):
                batch = to_device(plain(task.collate(task.eval[i:i + t.batch_size], pad_id)), device)
                loss, n = wrapped(batch)
                total += loss.double() * n
                count += n
                if task.labels is not None:
                    from .tasks import _forward
                    right += (_forward(model, batch).argmax(-1) == batch["labels"]).sum()
        wrapped.train()
        count = max(1, int(count))
        out = {"eval_loss": float(total) / count}
        if task.labels is not None:
            out["eval_accuracy"] = int(right) / count
        return out

    wrapped.train()
    step = start_step
    measure_cpu = device.type == "cpu"
    saved = cpu_peak = 0
    # accelerate's optimizer wrapper is for fp16 loss scaling; its step also probes for packages every call
    stepper = optimizer if accelerator.scaler is not None else optimizer.optimizer
    readings = StepReadings(device)
    t0 = time.perf_counter()
    try:
        while step < steps:
            step_start = time.perf_counter()
            losses, tokens = [], 0
            if copies is not None:
                copies.refresh()
            for micro in range(t.grad_accum):
                if stop is not None and stop.is_set():
                    raise StoppedError("Stopped by the user.")
                cpu_batch = batches.get(step * t.grad_accum + micro)
                tokens += int(cpu_batch["attention_mask"].sum()) if cpu_batch["attention_mask"].dim() == 2 else \
                    int(cpu_batch["input_ids"].numel())
                if graphed is not None:
                    try:  # a length without a graph yet is captured at a step's start, else run eagerly
                        loss = graphed(cpu_batch, may_capture=micro == 0)
                        if loss is not None:
                            losses.append(loss.clone())  # the graph's output, overwritten by its next replay
                            continue
                    except torch.OutOfMemoryError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - graphs are an optimisation: step eagerly instead
                        if isinstance(exc, CaptureFailed):  # at micro-batch 0: drop what the warm-up added
                            optimizer.zero_grad(set_to_none=True)
                        graphed = None
                        what = str(exc) if isinstance(exc, CaptureFailed) else \
                            f"replay failed ({type(exc).__name__}: {exc})"
                        yield {"type": "status", "message": f"train.cuda_graphs: {what[:240]}; this run steps eagerly."}
                batch = to_device(plain(cpu_batch), device)
                sync = micro == t.grad_accum - 1
                meter = SavedTensorMeter(model) if measure_cpu and step == start_step and micro == 0 else None
                with accelerator.no_sync(wrapped) if not sync else nullcontext():
                    loss = micro_step(batch, meter)
                if meter is not None:
                    saved = meter.bytes
                losses.append(loss)
            info.method.on_step(model, step, steps)
            grad_norm = clip_gradients(accelerator, trainable, t.max_grad_norm) if t.max_grad_norm > 0 else None
            if copies is not None:
                copies.stale()
            stepper.step()
            if measure_cpu and step == start_step:  # grads and optimizer states exist only now
                cpu_peak = static_bytes(model, optimizer) + saved
            scheduler.step()
            stepper.zero_grad(set_to_none=graphed is None)  # a graph adds into its own buffers
            info.method.after_optimizer_step(model, step, steps)
            step += 1
            event = {"type": "step", "step": step, "total_steps": steps,
                     "epoch": round(step * t.grad_accum / batches.per_epoch, 4),
                     "loss": None, "lr": scheduler.get_last_lr()[0], "grad_norm": None, "tokens_per_s": None,
                     "peak_mem_bytes": peak_memory(device) or cpu_peak, "time": time.perf_counter() - t0}
            # the loss and gradient norm reach the host while the next step runs (studio/host_ahead.py)
            loss = torch.stack(losses).float().mean()  # over the micro-batches (MPS has no float64)
            readings.add(event, {"loss": loss, "grad_norm": grad_norm}, tokens * accelerator.num_processes, step_start)
            # Method facts (AdaLoRA ranks, changed fractions) can cost a pass over the weights: not every step.
            summary = info.method.trainable_summary(model) if step % 10 == 0 or step == steps else None
            if summary:
                event["method"] = summary
            evaluating = task.eval and ((t.eval_every and step % t.eval_every == 0) or step == steps)
            saving = t.save_every and step % t.save_every == 0 and step < steps
            handed = readings.ready(flush=bool(evaluating or saving or step == steps or step == start_step + 1
                                               or (stop is not None and stop.is_set())))
            if evaluating:
                event.update(evaluate())
            yield from handed
            if step == start_step + 1 and (note := kernel_note()):
                yield {"type": "status", "message": note}
            if step == start_step + 1 and graphed is not None and graphed.graphs:
                yield {"type": "status", "message": "train.cuda_graphs: micro-batches replay as CUDA graphs (one "
                                                    "per padded length, captured on its first use)."}
            if saving:
                folder = save(step)
                if folder:
                    yield {"type": "checkpoint", "step": step, "path": str(folder)}
    except StoppedError:
        yield from readings.ready(flush=True)
        folder = save(step)
        yield {"type": "stopped", "step": step, "path": str(folder) if folder else None}
        return
    except torch.OutOfMemoryError:
        yield from readings.ready(flush=True)  # the steps done before it keep their metrics
        raise OutOfMemoryError(
            f"Out of memory at step {step + 1} (batch {t.batch_size} x {cfg.data.max_length} tokens); turn on "
            f"train.gradient_checkpointing, lower train.batch_size or data.max_length, or use model.quantization=nf4."
        ) from None
    finally:
        if copies is not None:
            copies.release()
    if accelerator.num_processes > 1:
        # Gradients are all-reduced every step, so every replica must hold the same weights.
        checksum = torch.stack([p.detach().double().sum() for p in trainable]).sum().reshape(1).to(device)
        sums = accelerator.gather(checksum)
        if not torch.allclose(sums, sums[0].expand_as(sums)):
            raise StudioError(f"Data-parallel replicas diverged (weight sums {sums.tolist()}); report this bug.")
        yield {"type": "status", "message": f"{accelerator.num_processes} processes; trainable weights identical "
                                            f"on all replicas (sum {float(sums[0]):.6f})."}
    if run_dir is not None and is_main:
        folder = save(step)
        ckpt.save_adapter(model, run_dir / "adapter")
        yield {"type": "checkpoint", "step": step, "path": str(folder)}
    accelerator.wait_for_everyone()
    yield {"type": "done", "step": step, "adapter": str(run_dir / "adapter") if run_dir else None}


def kernel_note() -> str | None:
    """Which Triton kernels the first step used, and any set aside (studio/kernels); None when none ran."""
    from .kernels import verdicts
    used = sorted(k for k, ok in verdicts().items() if ok)
    dropped = sorted(k for k, ok in verdicts().items() if not ok)
    parts = [f"Triton kernels in use: {', '.join(used)}."] if used else []
    if dropped:
        parts.append(f"Set aside after their first-use check (torch ops instead): {', '.join(dropped)}.")
    return " ".join(parts) or None


def clip_gradients(accelerator: Any, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the gradients' total norm to max_norm; returns the norm before, on the device (not read here).
    accelerate's clip unscales fp16 gradients first and knows sharded ones; a plain run needs neither."""
    if accelerator.scaler is not None or accelerator.num_processes > 1:
        return accelerator.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
