"""Measure what a training step really holds, to check the estimator (tests, `bench --memory`).

`saved_tensor_bytes(model, batch, ...)`: one forward + backward with causal_lm_loss under
torch.autograd.graph.saved_tensors_hooks, counting the unique storages autograd saved during the
forward (views of one storage count once; parameters and buffers are not activations). This is
the quantity the estimator's `details["saved_for_backward"]` predicts, on any device.

`step_peak_bytes(step, held)`: the CPU's stand-in for torch.cuda.max_memory_allocated. The bytes of
the tensors held across steps (weights, optimizer state, batch) plus the peak of the storages the
step creates while they live, seen op by op through a dispatch mode (forward and backward; not the
scratch buffers inside one kernel, so a lower bound of what the allocator sees).

`memory_grid(quick, methods)`: on CUDA, random-init models of real shapes (presets), LoRA r=16 all-linear,
QLoRA, full, IA3, prefix (those registered), batch x seq from 1x512 to 8x2048, checkpointing on/off;
one real step (loss, backward, AdamW step, twice so optimizer states exist) per row; yields
{shape, method, batch, seq, grad_ckpt, estimated_bytes, measured_bytes, ratio} (measured =
torch.cuda.max_memory_allocated + the estimate's context item) and what the card held: the
allocator's peak reservation plus the bytes outside the allocator (on_card_bytes, ratio_on_card).
OOM rows say so. `memory_grid(methods="all")` (`bench --memory --methods`): every causal-LM method at its
defaults instead, on Qwen2.5-0.5B at 4 x 512 with checkpointing off and on. On CPU (or with quick=True) it runs
one tiny shape and measures saved-tensor bytes and the whole step's peak (`measured_step_peak`) instead.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .checkpointing import enable_gradient_checkpointing
from .losses import causal_lm_loss
from .runner import release_memory


def random_batch(vocab: int, batch: int, seq: int, device: Any = "cpu", seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def saved_bytes(run: Callable[[], Any], module: nn.Module) -> tuple[int, Any]:
    """Unique storage bytes autograd saves for backward while `run()` runs (the parameters and buffers
    of `module` excluded); returns them and what `run` returned."""
    skip = {p.untyped_storage().data_ptr() for p in module.parameters()}
    skip |= {b.untyped_storage().data_ptr() for b in module.buffers()}
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not t.is_meta:
            try:
                st = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # e.g. tensor subclasses without storage
                return t
            ptr = st.data_ptr()
            if ptr and ptr not in skip:
                seen[(ptr, t.device.type)] = max(seen.get((ptr, t.device.type), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(seen.values()), out


def saved_tensor_bytes(model: nn.Module, batch: dict, chunk: int = 1024, backward: bool = True) -> int:
    """Unique storage bytes autograd saved for backward during one forward of causal_lm_loss."""
    n, (loss, _) = saved_bytes(lambda: causal_lm_loss(model, batch, chunk=chunk), model)
    if backward:
        loss.backward()
    return n


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages op outputs create while the mode is on and that are still alive; their peak."""

    def __init__(self, skip: Iterable[int] = ()) -> None:
        super().__init__()
        self.skip, self.seen = set(skip), set()
        self.live = self.peak = 0

    def _freed(self, key: int, n: int) -> None:
        self.live -= n
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.seen and key not in self.skip:
                    self.seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, key, storage.nbytes())
        return out


def step_peak_bytes(step: Callable[[], Any], held: Iterable[torch.Tensor]) -> int:
    """Peak bytes of one call of `step`: the unique storages of `held` plus the peak of what it creates."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}
    with LiveBytes(storages) as mode:
        step()
    return sum(storages.values()) + mode.peak


def measured_step_peak(model: nn.Module, batch: dict, chunk: int = 1024) -> int:
    """step_peak_bytes of a training step (causal_lm_loss, backward, AdamW), after one step that
    creates the optimizer state; on the CPU (CUDA has max_memory_allocated)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        loss, _ = causal_lm_loss(model, batch, chunk=chunk)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()
    return step_peak_bytes(step, held_across_steps(model, opt, batch))


def held_across_steps(model: nn.Module, opt: torch.optim.Optimizer, batch: dict) -> list[torch.Tensor]:
    """What lives from one training step to the next: weights, buffers, optimizer state, the batch, and a
    method's CPU copy of the original values (keep_base_copy)."""
    states = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
    extra = getattr(getattr(model, "studio_adapter", None), "extra", None) or {}  # none on peft's models
    copies = list((extra.get("base") or {}).values()) if isinstance(extra, dict) else []  # keep_base_copy
    return [*model.parameters(), *model.buffers(), *states, *batch.values(), *copies]


def _apply(model: nn.Module, method: dict, recomputed: float, offload: bool = False) -> None:
    """The method applied, and checkpointing for the share of layers `recomputed` (0: none; an estimate's
    recomputed_share, to measure what it estimated)."""
    from .methods import apply_method, method_config
    apply_method(model, method_config(method))
    if recomputed:
        from .offload import CheckpointOffloader
        enable_gradient_checkpointing(model, recomputed, CheckpointOffloader() if offload else None)
    model.train()


def _run_cfg(model_name: str, method: dict, batch: int, seq: int, grad_ckpt: bool, quant: str = "none",
             optimizer: str = "adamw", offload: bool = False) -> Any:
    from .config import RunConfig
    return RunConfig.from_dict({"model": {"name": model_name, "quantization": quant},
                                "data": {"max_length": seq},
                                "method": method,
                                "train": {"batch_size": batch, "gradient_checkpointing": grad_ckpt,
                                          "optimizer": optimizer, "offload_checkpoints": offload}})


GRID_SHAPES = ("qwen2.5-0.5b", "llama-3.2-1b", "qwen2.5-1.5b", "qwen2.5-7b")
GRID_SIZES = ((1, 512), (4, 512), (1, 2048), (4, 1024), (8, 2048))


def grid_methods() -> list[tuple[str, dict, str]]:
    """(label, method config, quantization) of the grid, for the methods registered here."""
    from .methods import registry
    reg = registry()
    rows = [("lora-r16-all", {"name": "lora", "r": 16, "lora_alpha": 32, "target_modules": "all-linear"}, "none"),
            ("qlora", {"name": "qlora"}, "nf4"), ("full", {"name": "full", "keep_base_copy": False}, "none")]
    if "ia3" in reg:
        rows.append(("ia3", {"name": "ia3"}, "none"))
    if "prefix_tuning" in reg:
        rows.append(("prefix", {"name": "prefix_tuning"}, "none"))
    return rows


def _cuda_step(cfg: Any, model_name: str, method: dict, quant: str, batch: int, seq: int, recomputed: float,
               offload: bool = False) -> dict[str, int]:
    """Two real training steps of a random-init model of the preset's shape: max_memory_allocated, the
    allocator's max_memory_reserved, and what the process holds on the card outside the allocator (the CUDA
    context, library handles, loaded kernels: mem_get_info's used bytes less the reserved ones)."""
    torch.cuda.empty_cache()
    model = random_base_model(model_name, torch.device("cuda"), torch.bfloat16, quant)
    _apply(model, method, recomputed, offload)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    data = random_batch(model.config.vocab_size, batch, seq, "cuda")
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = causal_lm_loss(model, data, chunk=cfg.train.loss_chunk)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    out = {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved(),
           "outside_allocator": total - free - torch.cuda.memory_reserved()}
    del model, opt, params, data, loss
    return out


def random_base_model(shape: str, device: torch.device, dtype: torch.dtype, quant: str = "none") -> nn.Module:
    """A frozen random-init model of a preset's shape, initialised on `device` itself (a 7B init on
    the CPU takes minutes); quant="nf4" swaps its decoder Linears for 4-bit ones (CUDA, or
    bitsandbytes' CPU backend)."""
    from .models import build_random_model, model_presets, quantize_nf4
    with torch.device(device):
        model = build_random_model(model_presets()[shape]["config"], seed=0, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    if quant == "nf4":
        model = quantize_nf4(model)
        torch.cuda.empty_cache()
    return model.train()


# what a method needs to run on a random model without files: a random prompt init, zero biases where a Llama has
# none, two random component adapters to fuse
METHOD_DEFAULTS = {"prompt_tuning": {"prompt_tuning_init": "RANDOM"}, "bitfit": {"missing_bias": "add_zero"},
                   "adapter_fusion": {"adapters": ["random:1", "random:2"]}}


def every_method(names: str = "all") -> list[tuple[str, dict, str]]:
    """(label, method config, quantization) of every causal-LM method at its defaults, or of those in `names`."""
    from .methods import registry
    wanted = None if names == "all" else set(names.split(","))
    return [(name, {"name": name} | METHOD_DEFAULTS.get(name, {}), "none")
            for name, method in sorted(registry().items())
            if "causal_lm" in method.task_types and (wanted is None or name in wanted)]


# settings whose memory rules differ from the defaults': a ΔW rebuilt in backward on every linear layer (each
# method's own buffers), IA3 and DoRA over a 4-bit base (bitsandbytes' product instead of the fused ops)
METHOD_VARIANTS = [(f"{n}-all-linear", {"name": n, "target_modules": "all-linear"}, "none")
                   for n in ("loha", "lokr", "glora")] + [("ia3-nf4", {"name": "ia3"}, "nf4"),
                                                          ("dora-nf4", {"name": "dora"}, "nf4")]


def memory_grid(quick: bool = False, methods: str | None = None) -> Iterator[dict]:
    """Rows of estimate vs measured peak. CUDA: the real-shape grid, or with `methods` ("all" or names) every
    method at its defaults on Qwen2.5-0.5B at 4 x 512 ("all": and METHOD_VARIANTS); CPU or quick: one tiny shape."""
    rows = (every_method(methods) + (METHOD_VARIANTS if methods == "all" else [])) if methods else grid_methods()
    if quick or not torch.cuda.is_available():
        yield from _cpu_grid(rows)
        return
    if methods:
        for label, method, quant in rows:
            for grad_ckpt in (False, True):
                yield _cuda_row("qwen2.5-0.5b", label, method, quant, 4, 512, grad_ckpt, False)
        return
    for shape in GRID_SHAPES:
        for label, method, quant in rows:
            for batch, seq in GRID_SIZES:
                for grad_ckpt, offload in ((False, False), (True, False), (True, True)):
                    yield _cuda_row(shape, label, method, quant, batch, seq, grad_ckpt, offload)


def _cuda_row(shape: str, label: str, method: dict, quant: str, batch: int, seq: int, grad_ckpt: bool,
              offload: bool) -> dict:
    from .memory import estimate
    cfg = _run_cfg(shape, method, batch, seq, grad_ckpt, quant, offload=offload)
    row = {"shape": shape, "method": label, "batch": batch, "seq": seq, "grad_ckpt": grad_ckpt, "offload": offload}
    try:
        est = estimate(cfg, "cuda", padding=False)
        row["estimated_bytes"] = est.total
    except Exception as e:  # noqa: BLE001 - a method the estimator cannot build
        return row | {"error": f"estimate: {type(e).__name__}: {e}"[:200]}
    try:
        got = _cuda_step(cfg, shape, method, quant, batch, seq, est.recomputed_share, offload)
        measured = got["allocated"] + est.context
        # on the card: the allocator's reservation at its peak plus everything outside it
        on_card = got["reserved"] + got["outside_allocator"]
        row.update(measured_bytes=measured, ratio=est.total / measured, on_card_bytes=on_card,
                   ratio_on_card=est.total / on_card, **{f"{k}_bytes": v for k, v in got.items()})
    except torch.OutOfMemoryError:
        row.update(measured_bytes=None, ratio=None, oom=True)
    except Exception as e:  # noqa: BLE001 - record and go on with the grid
        row.update(error=f"{type(e).__name__}: {e}"[:200])
    finally:
        release_memory()
    return row


def _cpu_grid(rows: list[tuple[str, dict, str]]) -> Iterator[dict]:
    from .memory import estimate
    shape = "tiny-llama"
    for label, method, quant in rows:
        if quant != "none":
            continue
        for grad_ckpt in (False, True):
            batch, seq = 2, 64
            cfg = _run_cfg(shape, method, batch, seq, grad_ckpt)
            est = estimate(cfg, "cpu", padding=False)
            model = random_base_model(shape, torch.device("cpu"), torch.float32)
            _apply(model, method, est.recomputed_share)
            data = random_batch(512, batch, seq)
            measured = saved_tensor_bytes(model, data, chunk=cfg.train.loss_chunk)
            pred = est.details["saved_for_backward"]
            row = {"shape": shape, "method": label, "batch": batch, "seq": seq, "grad_ckpt": grad_ckpt}
            yield row | {"estimated_bytes": pred, "measured_bytes": measured, "ratio": pred / measured,
                         "what": "saved-for-backward bytes (CPU)"}
            peak = measured_step_peak(model, data, chunk=cfg.train.loss_chunk)
            yield row | {"estimated_bytes": est.total, "measured_bytes": peak, "ratio": est.total / peak,
                         "what": "whole step, tensor bytes op by op (CPU)"}
