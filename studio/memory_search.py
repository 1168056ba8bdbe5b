"""The memory calculator's questions, each answered from memory.estimate: which cards a run fits, the
largest batch / sequence / rank that fits one, the fewest recomputed layers that do, and which memory
switch saves the most."""
from __future__ import annotations

from typing import Any, Callable, Iterable

from . import gpus
from .config import with_changes
from .errors import ConfigError, StudioError
from .memory import allocator_room, estimate, tight_fit


def fit_table(run_cfg: Any, dataset_lengths: Iterable[int] | None = None) -> list[dict]:
    """One row per GPU preset and one for this machine's RAM: {gpu, memory_bytes, total, fits, tight} (tight: fits
    with less room than the caching allocator may take beyond the estimate, memory.ALLOCATOR_ROOM_BYTES)."""
    rows = []
    cuda = estimate(run_cfg, "cuda", dataset_lengths=dataset_lengths)
    for name in gpus.gpu_presets():
        mem = gpus.gpu_memory(name)
        rows.append({"gpu": name, "memory_bytes": mem, "total": cuda.total, "fits": cuda.total <= mem,
                     "tight": tight_fit(cuda.total, mem, "cuda")})
    cpu = estimate(run_cfg, "cpu", dataset_lengths=dataset_lengths)
    mem = gpus.cpu_ram()
    rows.append({"gpu": "CPU RAM", "memory_bytes": mem, "total": cpu.total, "fits": cpu.total <= mem,
                 "tight": tight_fit(cpu.total, mem, "cpu")})
    return rows


def largest_fitting(run_cfg: Any, gpu: str, what: str = "batch_size", limit: int | None = None) -> int:
    """The largest batch_size, max_length or LoRA rank r that fits on `gpu` (0 if even 1 does not); on a GPU with
    the caching allocator's room to spare (memory.allocator_room: not a tight fit)."""
    keys = {"batch_size": "train.batch_size", "max_length": "data.max_length", "r": "method.r"}
    if what not in keys:
        raise ConfigError(f"largest_fitting answers batch_size, max_length or r, not {what!r}.")
    if what == "r" and not hasattr(run_cfg.method, "r"):
        raise ConfigError(f"Method {run_cfg.method.name} has no rank r.")
    mem, device = gpus.gpu_memory(gpu), gpus.device_for(gpu)
    room = allocator_room(device)
    if limit is None:
        limit = {"batch_size": 4096, "max_length": 131072, "r": 4096}[what]
        if what == "max_length":
            from .models import resolve_model_config
            c = resolve_model_config(run_cfg.model.name, run_cfg.model.trust_remote_code)
            limit = int(getattr(getattr(c, "text_config", None) or c, "max_position_embeddings", limit) or limit)

    def fits(v: int) -> bool:
        return estimate(with_changes(run_cfg, **{keys[what]: v}), device).total <= mem - room

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def fewest_recomputed(run_cfg: Any, gpu: str) -> tuple[int, int] | None:
    """(recomputed layers, layers) of the fastest gradient checkpointing that fits `gpu` (0 recomputed: none
    needed), as train.checkpoint_budget_gb set to its memory would run; None when no count of recomputed
    layers fits."""
    budget = {"train.gradient_checkpointing": True, "train.checkpoint_budget_gb": gpus.gpu_memory(gpu) / 2**30}
    d = estimate(with_changes(run_cfg, **budget), gpus.device_for(gpu)).details
    return (d["checkpointed_layers"], d["layers"]) if d["checkpoint_fits"] else None


def switches(run_cfg: Any) -> list[tuple[str, dict]]:
    """The memory switches that apply to this config: (label, changes)."""
    out = []
    tc, mc = run_cfg.train, run_cfg.model
    if not tc.gradient_checkpointing:
        out.append(("gradient checkpointing on", {"train.gradient_checkpointing": True}))
    if not (tc.gradient_checkpointing and tc.offload_checkpoints):
        out.append(("gradient checkpointing, layer inputs in CPU RAM",
                    {"train.gradient_checkpointing": True, "train.offload_checkpoints": True}))
    if mc.quantization == "none" and run_cfg.method.name != "full":
        out.append(("4-bit NF4 base (QLoRA)", {"model.quantization": "nf4"}))
    if tc.optimizer in ("adamw", "paged_adamw"):
        out.append(("8-bit AdamW", {"train.optimizer": tc.optimizer.replace("adamw", "adamw_8bit")}))
    if not tc.optimizer.startswith("paged") and tc.optimizer != "sgd":
        out.append(("paged optimizer (states in host memory)", {"train.optimizer": "paged_" + tc.optimizer}))
    if run_cfg.data.max_length > 64:
        half = run_cfg.data.max_length // 2
        out.append((f"shorter sequences (max_length {half})", {"data.max_length": half}))
    if tc.batch_size > 1:
        out.append((f"batch_size {max(1, tc.batch_size // 2)} (grad_accum x2)",
                    {"train.batch_size": max(1, tc.batch_size // 2), "train.grad_accum": tc.grad_accum * 2}))
    return out


def saving_text(saved: int, fmt: Callable[[int], str]) -> str:
    """A switch's effect in a table: the bytes it saves; for one that spends memory on speed (checkpointing
    fitted to the card of a run that already fits with every layer recomputed), how much more it uses."""
    return fmt(saved) if saved >= 0 else f"{fmt(-saved)} more, faster"


def best_switch(run_cfg: Any, gpu: str) -> list[tuple[str, int]]:
    """(switch, saved bytes), switches that make the run fit first, then by bytes saved; except that
    checkpointing fitted to the card, when it makes the run fit, comes first: it recomputes only the
    layers that must be, the fastest way to fit that checkpointing has."""
    mem, device = gpus.gpu_memory(gpu), gpus.device_for(gpu)
    base = estimate(run_cfg, device).total
    options = switches(run_cfg)
    tc = run_cfg.train
    offer_fitted = not (tc.gradient_checkpointing and tc.checkpoint_budget_gb > 0)
    if offer_fitted:
        options.insert(0, (f"gradient checkpointing fitted to {gpu}",
                           {"train.gradient_checkpointing": True, "train.checkpoint_budget_gb": mem / 2**30}))
    rows = []
    for k, (label, changes) in enumerate(options):
        try:
            est = estimate(with_changes(run_cfg, **changes), device)
        except StudioError:
            continue
        fits, first = est.total <= mem, offer_fitted and k == 0
        if first:
            if not fits:
                continue  # then the plain checkpointing switches below say what it can do
            label += f" (recomputes {est.details['checkpointed_layers']} of {est.details['layers']} layers)"
        rows.append((label, base - est.total, (not fits, not first, est.total - base)))
    rows.sort(key=lambda r: r[2])
    return [(label, saved) for label, saved, _ in rows]
