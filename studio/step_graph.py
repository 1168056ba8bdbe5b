"""CUDA-graph replay of a training micro-batch (forward + backward) for fixed-shape batches.

A small model on a fast GPU is launch-bound: Qwen2.5-0.5B LoRA at 4x1024 on an H200 ran 53 ms of
kernels in a 139 ms step; the rest was the host queueing ~5,800 kernels one by one. Captured once, a
micro-batch replays as one graph launch; train.cuda_graphs=auto (the default) does so on CUDA for
runs whose micro-batches are host-bound (GRAPHS_PAY_BELOW). What capture needs, and how it is met here:
- fixed shapes: `pad_batch` pads to batch_size rows and a length bucket (one graph per bucket);
- no host sync inside: the loss runs in losses.static_shapes(), transformers is told whether the batch
  is packed (`capturing`); lazy set-up (kernel first-use checks, Triton compiles, cuBLAS
  workspaces) happens in warm-up runs on a side stream before capture;
- gradients accumulate into buffers that exist before capture (the warm-up's) and are never replaced,
  so the optimizer zeroes them in place (zero_grad(set_to_none=False));
- the batch enters through static tensors, copied in before each replay.
The caller owns the fallback: a capture that raises leaves its micro-batch to run eagerly.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from .data_render import IGNORE, block_causal_mask
from .host_ahead import to_device
from .losses import static_shapes

LENGTH_BUCKET = 128  # captured lengths are multiples of this: little padding, few graphs


@contextlib.contextmanager
def capturing(packed: bool) -> Iterator[None]:
    """The loss in static shapes, and transformers told whether the positions are packed.

    transformers looks at position_ids to see whether a batch is packed, and the look is a host sync, so
    while a stream captures it cannot look and assumes packing: it builds an explicit B x T x T mask, which
    keeps sdpa off its causal flash kernel. Here the answer is known: an unpacked batch's positions are
    0..T-1 (no packing), and a packed one carries its block mask (pad_batch); should a model rebuild that
    mask (a sliding window shorter than the batch), its segments are computed on the device, unlooked-at."""
    from transformers import masking_utils
    found = getattr(masking_utils, "find_packed_sequence_indices", None)  # absent: nothing to tell
    if found is not None:
        masking_utils.find_packed_sequence_indices = _packed_segments if packed else (lambda position_ids: None)
    try:
        with static_shapes():
            yield
    finally:
        if found is not None:
            masking_utils.find_packed_sequence_indices = found


def _packed_segments(position_ids: torch.Tensor) -> torch.Tensor:
    """transformers' segment index of each position (a new example where positions do not step by 1),
    without its host check for the unpacked case."""
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    return (step != 1).cumsum(-1)


CUDA_ONLY = "it needs a CUDA device"
FP16 = "fp16 needs a loss scaler that reads the gradients on the host (use bf16)"
COMPILE = "train.compile already compiles the layers (pick one)"
OFFLOAD = "train.offload_checkpoints moves tensors through host memory"
RECOMPUTED_DROPOUT = ("a checkpointed layer draws random numbers (dropout, AdaMix's routing, diff pruning's gates) that "
                      "the GPU seed could not take here (attention dropout, or no working Triton kernel), so its "
                      "recomputation redraws them by resetting the random state on the host, which a replay is not "
                      "known to repeat (dropout 0 or gradient checkpointing off)")
PACKED_MASK_MAX = 2048  # tokens: a longer packed row attends through varlen attention, not a T x T block mask
PACKED_LONG = (f"packed rows longer than {PACKED_MASK_MAX} tokens keep varlen attention, where a captured step would "
               f"read them through a T x T block mask (data.max_length <= {PACKED_MASK_MAX}, or packing off)")
SETTINGS_THAT_BLOCK = (PACKED_LONG, FP16, COMPILE, OFFLOAD, RECOMPUTED_DROPOUT)  # what a user may change for graphs


def graph_blocker(*, device: torch.device, task: str, method: Any, method_cfg: Any,
                  mixed_precision: str, processes: int, compile: bool, offload: bool,
                  recomputed_dropout: bool = False, packed_length: int = 0) -> str | None:
    """Why train.cuda_graphs cannot apply to this run (one sentence), or None when it can.
    recomputed_dropout: gradient checkpointing over layers that draw random numbers; packed_length:
    data.max_length of a packed run (0: not packed)."""
    if device.type != "cuda":
        return CUDA_ONLY
    if task != "causal_lm":
        return "it covers causal-LM training only"
    if not method.capturable(method_cfg):
        return f"{method.name} with these settings is not marked safe to capture (its step changes on the host)"
    if mixed_precision == "fp16":
        return FP16
    if processes > 1:
        return "it runs on one process only"
    if compile:
        return COMPILE
    if offload:
        return OFFLOAD
    if recomputed_dropout:
        return RECOMPUTED_DROPOUT
    if packed_length > PACKED_MASK_MAX:
        return PACKED_LONG
    return None


# parameters x tokens of a micro-batch (the GPU work of its step grows with both; the host's, with the
# layer count): replayed on an H200, 0.5B x 4,096 ran 2.2-8.9x, 1.5B x 8,192 1.8x, 7.6B x 8,192 1.01x
GRAPHS_PAY_BELOW = 3_000_000_000 * 8192


def micro_batch_tokens(rows: int, lengths: list[int] | None, max_length: int) -> int:
    """Positions of the largest micro-batch: rows x the longest example (capped at max_length)."""
    return rows * min(max_length, max(lengths, default=max_length))


def graphs_decision(setting: str, n_params: int, blocker: str | None, tokens: int) -> tuple[bool, str | None]:
    """Whether train.cuda_graphs ("auto" | "on" | "off") captures this run, and a line for the user.

    auto captures where it pays: where a micro-batch's GPU work (n_params x tokens, its largest) is below
    GRAPHS_PAY_BELOW, the step waits on the host launching kernels, and replay removes that wait (Qwen2.5
    0.5B to 1.5B at 4 x 1,024-2,048 on an H200, or a 7B with short batches). Above it the step is GPU-bound
    (7B at 4 x 2,048: replay gained 1%), so the padding to a multiple of 128 tokens would cost more than
    replay saves. Where auto would have paid but a setting of the run stops it, the line says which."""
    if setting == "off":
        return False, None
    pays = n_params * tokens < GRAPHS_PAY_BELOW
    if blocker is None and (setting == "on" or pays):
        return True, None
    if setting == "on":
        return False, f"train.cuda_graphs is off for this run: {blocker}."
    if blocker in SETTINGS_THAT_BLOCK and pays:
        return False, f"train.cuda_graphs (auto) stays off for this run: {blocker}."
    return False, None


def config_captures(run_cfg: Any, n_params: int, dtype: torch.dtype, tokens: int) -> bool:
    """Whether a one-process CUDA run of `run_cfg` (base computing in `dtype`, largest micro-batch of
    `tokens` positions) would replay its micro-batches from graphs: what the memory estimate pads for.
    Random draws under checkpointing do not stop it there: that run takes them from the GPU seed
    (studio/seeded_dropout.py)."""
    from .methods import get_method
    t = run_cfg.train
    blocker = graph_blocker(device=torch.device("cuda"), task=run_cfg.model.task,
                            method=get_method(run_cfg.method.name), method_cfg=run_cfg.method,
                            mixed_precision={torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "no"),
                            processes=1, compile=t.compile, offload=t.offload_checkpoints and t.gradient_checkpointing,
                            packed_length=run_cfg.data.max_length if run_cfg.data.packing else 0)
    return graphs_decision(t.cuda_graphs, n_params, blocker, tokens)[0]


def captured_length(tokens: int, max_length: int) -> int:
    """The length a micro-batch of `tokens` positions is padded to for capture (its graph's length)."""
    return min(max_length, -(-tokens // LENGTH_BUCKET) * LENGTH_BUCKET)


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters as the model's config counts them (a 4-bit weight stores two in a byte)."""
    total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)  # bitsandbytes Params4bit: packed storage, logical shape
        total += state.shape.numel() if state is not None and hasattr(state, "shape") else p.numel()
    return total


def pad_batch(batch: dict, rows: int, length: int, pad_id: int) -> dict:
    """A right-padded causal-LM batch {input_ids, labels[, attention_mask]} grown to rows x length (pad
    tokens, labels -100: padding carries no loss and counts no tokens).

    Unpacked, without its attention mask: under a causal mask a right-side pad is never seen by a real
    token, and the pads' own outputs are weighted 0 by the loss; without a mask, sdpa keeps its causal
    flash kernel during capture. Packed (position_ids restarting at 0 for each example), with its block
    mask rebuilt at the new size: each run of padding is an example of its own (positions from 0), so no
    real token sees it and every pad row attends to something."""
    b, t = batch["input_ids"].shape
    if b > rows or t > length:
        raise ValueError(f"a {b}x{t} batch does not fit the captured {rows}x{length} shape")
    out = {}
    for key, fill in (("input_ids", pad_id), ("labels", IGNORE)):
        out[key] = batch[key].new_full((rows, length), fill)
        out[key][:b, :t] = batch[key]
    if "position_ids" in batch:
        pos = torch.arange(length, device=batch["position_ids"].device).repeat(rows, 1)
        pos[:b, :t] = batch["position_ids"]
        pos[:b, t:] = pos[0, :length - t]
        out["position_ids"] = pos
        out["attention_mask"] = block_causal_mask(pos)
    return out


class GraphedMicroStep:
    """fn(batch) -> tensors (forward and backward of one micro-batch), captured once and replayed.

    `params` are the trained parameters: the graph adds into their .grad buffers on every replay."""

    def __init__(self, fn: Callable[[dict], Any], params: list[torch.Tensor], warmup: int = 3, pool: Any = None):
        self.fn, self.params, self.warmup, self.pool = fn, params, warmup, pool
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: dict[str, torch.Tensor] = {}
        self.out: Any = None

    def capture(self, batch: dict) -> None:
        """Warm up (on a side stream), then capture fn on a static copy of `batch`. Gradients are zero after."""
        self.static = {k: v.clone() for k, v in batch.items() if torch.is_tensor(v)}
        cuda = next(iter(self.static.values())).is_cuda
        side = torch.cuda.Stream() if cuda else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext(), static_shapes():
            for _ in range(self.warmup):
                self.fn(self.static)
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.empty_cache()  # the warm-up's cached blocks: the graph gets a pool of its own
        self.zero_grads()
        self.graph = self.record()

    def record(self) -> Any:
        """Capture fn on the static batch (nothing runs: replay() runs it); sets self.out."""
        graph = torch.cuda.CUDAGraph()
        # thread_local: the page's thread may touch CUDA (memory readings, chat) while the trainer captures
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"), \
                capturing(packed="position_ids" in self.static):
            self.out = self.fn(self.static)
        return graph

    def zero_grads(self) -> None:
        """In place: the captured backward adds into these very buffers (made by the warm-up's backward;
        a parameter that got none stays without, as in an eager step)."""
        for p in self.params:
            if p.grad is not None:
                p.grad.zero_()

    def __call__(self, batch: dict) -> Any:
        """Replay on `batch` (same shapes as the captured one); returns fn's (static) outputs."""
        for key, static in self.static.items():
            value = batch[key]
            if value.shape != static.shape:
                raise ValueError(f"{key} is {tuple(value.shape)}; the graph was captured for {tuple(static.shape)}")
            static.copy_(value, non_blocking=True)
        self.graph.replay()
        return self.out


class CaptureFailed(RuntimeError):
    """A capture (or its warm-up) raised; the cause is chained. The gradients hold the warm-up's additions."""


class GraphedTrainStep:
    """The trainer's micro-batch under train.cuda_graphs: one graph per padded length (a multiple of
    LENGTH_BUCKET up to data.max_length, all rows padded to batch_size), captured on first use and
    replayed after. The graphs share one memory pool: between replays only their gradient buffers
    (outside the pool) and their loss scalars stay alive, so any replay order is safe."""

    def __init__(self, fn: Callable[[dict], Any], params: list[torch.Tensor], rows: int, max_length: int,
                 pad_id: int, device: torch.device):
        self.fn, self.params, self.rows, self.max_length, self.pad_id, self.device = \
            fn, params, rows, max_length, pad_id, device
        self.graphs: dict[int, GraphedMicroStep] = {}
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None

    def __call__(self, batch: dict, may_capture: bool = True) -> Any:
        """fn's outputs for this micro-batch, or None when its length has no graph yet and may_capture
        is off (capture zeroes the gradients: only right while they hold nothing, at a step's start)."""
        length = captured_length(batch["input_ids"].shape[1], self.max_length)
        micro = self.graphs.get(length)
        if micro is None and not may_capture:
            return None
        padded = to_device(pad_batch(batch, self.rows, length, self.pad_id), self.device)
        if micro is None:
            micro = GraphedMicroStep(self.fn, self.params, pool=self.pool)
            try:
                micro.capture(padded)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:
                raise CaptureFailed(f"capture failed ({type(exc).__name__}: {exc})") from exc
            self.graphs[length] = micro
        return micro(padded)
