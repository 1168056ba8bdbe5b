"""The memory estimate and the trainable-parameter breakdown as page panels (figures + short text).

Both call studio.memory / studio.params, which build the model on the meta device: no weights are
loaded, so this works for any preset before anything is downloaded.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

from studio.errors import StudioError

from .charts import empty_figure, fmt_bytes, fmt_count, layer_figure, memory_figure


@lru_cache(maxsize=1)
def detected_device() -> dict:
    """This machine's training device: {device, label, capacity, gpu (a presets/gpus.yaml name or 'CPU')}."""
    from studio.gpus import cpu_ram, gpu_presets
    from studio.models import resolve_device
    dev = resolve_device("auto").type
    if dev == "cuda":
        import torch
        props = torch.cuda.get_device_properties(0)
        name = props.name
        preset = next((k for k in gpu_presets() if all(w.lower() in name.lower() for w in k.split())), None)
        return {"device": "cuda", "label": name, "capacity": int(props.total_memory), "gpu": preset}
    return {"device": "cpu", "label": "CPU RAM", "capacity": cpu_ram(), "gpu": "CPU"}


def gpu_choices() -> list[tuple[str, str]]:
    from studio.gpus import gpu_presets
    return [(f"{k} — {v.get('summary', '')}", k) for k, v in gpu_presets().items()] + [("CPU RAM (this machine)", "CPU")]


def device_for(gpu: str) -> str:
    return "cpu" if gpu.lower() in ("cpu", "cpu ram", "ram") else "cuda"


def verdict(total: int, capacity: int, where: str, switch: tuple[str, int] | None = None,
            device: str = "cuda") -> str:
    from studio.memory import ALLOCATOR_ROOM_BYTES, tight_fit
    share = 100 * total / capacity if capacity else 0
    if tight_fit(total, capacity, device):
        return (f"<div class='verdict warn'>⚠ <b>Fits tightly</b> on {where}: {fmt_bytes(total)} of "
                f"{fmt_bytes(capacity)} ({share:.0f}%). PyTorch's allocator keeps blocks beyond those in use (up to "
                f"{fmt_bytes(ALLOCATOR_ROOM_BYTES)} more was measured): it may have to give them back as it runs, "
                f"or run out of memory. A smaller batch or sequence, or more recomputed layers, leaves room.</div>")
    if total <= capacity:
        return f"<div class='verdict ok'>✓ <b>Fits</b> on {where}: {fmt_bytes(total)} of {fmt_bytes(capacity)} ({share:.0f}%)</div>"
    text = f"<div class='verdict bad'>✗ <b>Does not fit</b> on {where}: needs {fmt_bytes(total)}, has {fmt_bytes(capacity)}"
    if switch:
        label, saved = switch
        fits = total - saved <= capacity
        text += (f"<br>Try <b>{label}</b>: saves {fmt_bytes(saved)}" + (" and then it fits." if fits else
                 " (not enough on its own)."))
    return text + "</div>"


def memory_panel(cfg: Any, gpu: str | None = None, measured: float | None = None) -> tuple[Any, str]:
    """(stacked bar figure, verdict html) of `cfg` on `gpu` (a preset name / 'CPU'; None = detected device)."""
    from studio.gpus import gpu_memory
    from studio.memory import estimate
    from studio.memory_search import best_switch
    det = detected_device()
    if gpu is None:
        device, capacity, where, preset = det["device"], det["capacity"], det["label"], det["gpu"]
    else:
        device, capacity, where, preset = device_for(gpu), gpu_memory(gpu), gpu, gpu
    try:
        est = estimate(cfg, device=device)
    except StudioError as e:
        return empty_figure("No estimate"), f"<div class='verdict warn'>⚠ {e}</div>"
    except Exception as e:  # noqa: BLE001 - a method the estimator does not know yet must not break the page
        return empty_figure("No estimate"), (f"<div class='verdict warn'>⚠ No memory estimate for this "
                                             f"configuration yet ({type(e).__name__}: {str(e)[:160]}).</div>")
    d = est.to_dict()
    switch = None
    if est.total > capacity and preset:
        try:
            options = best_switch(cfg, preset)
            switch = options[0] if options else None
        except StudioError:
            switch = None
    fig = memory_figure(d, capacity=capacity, device=where, measured=measured)
    text = verdict(est.total, capacity, where, switch, device)
    details = est.details
    notes = [f"batch {details.get('batch')} × {details.get('seq')} tokens",
             f"{details.get('param_dtype')} weights" + (" (NF4)" if details.get("quantization") == "nf4" else ""),
             f"peak during {details.get('peak_phase')}"]
    if d.get("not_concurrent"):
        notes.append(f"the items add up to {fmt_bytes(d['total'] + d['not_concurrent'])}; "
                     f"{fmt_bytes(d['not_concurrent'])} of it is not held at the peak")
    if details.get("checkpointed_layers") and not details.get("gradient_checkpointing"):  # some layers only
        notes.append(f"{details['checkpointed_layers']} of {details['layers']} layers recomputed"
                     + (f" (fitted to {fmt_bytes(details['checkpoint_budget'])})" if "checkpoint_budget" in details else ""))
    if details.get("optimizer_host"):
        notes.append(f"+{fmt_bytes(details['optimizer_host'])} optimizer states in host memory")
    notes += details.get("notes", [])  # what the method or the run adds (prefix, offloading, CUDA graphs)
    html = text + "<div class='muted'>" + " · ".join(notes) + "</div>"
    every_layer = details.get("gradient_checkpointing") or details.get("top_layer_kept")  # (but a free top one)
    if est.total <= capacity and every_layer and preset and device == "cuda":
        html += checkpointing_tip(cfg, preset)
    return fig, html + (cpu_speed_hint(cfg) if gpu is None and device == "cpu" else "")


def checkpointing_tip(cfg: Any, gpu: str) -> str:
    """A tip when a run that recomputes every layer would still fit `gpu` recomputing fewer (faster)."""
    from studio.gpus import gpu_memory
    from studio.memory_search import fewest_recomputed
    try:
        fit = fewest_recomputed(cfg, gpu)
    except StudioError:
        return ""
    if fit is None or fit[0] >= fit[1]:
        return ""
    k, n = fit
    return (f"<div class='muted'>Tip: recomputing only {k} of {n} layers still fits {gpu} and saves "
            f"{n - k} layers' recomputation: <b>checkpoint_budget_gb {gpu_memory(gpu) / 2**30:.1f}</b>.</div>")


def cpu_speed_hint(cfg: Any) -> str:
    """A tip when bf16 products ran clearly faster than fp32 ones on this CPU but the run would train in fp32."""
    from studio.models import cpu_bf16_faster, cpu_bf16_speedup
    if cfg.model.dtype not in ("auto", "float32") or cfg.model.quantization != "none" or not cpu_bf16_faster():
        return ""
    return (f"<div class='muted'>Tip: this CPU multiplies bf16 matrices {cpu_bf16_speedup():.1f}x as fast as fp32 "
            "ones (measured): <b>dtype bfloat16</b> trains faster here, with fp32 adapter weights.</div>")


def params_panel(cfg: Any) -> tuple[str, list[list[Any]], Any]:
    """(summary html, rows [kind, trainable, total, % of kind], per-layer figure)."""
    from studio.params import breakdown_for_config
    try:
        b = breakdown_for_config(cfg)
    except Exception as e:  # noqa: BLE001 - same: the page keeps working
        b = {"error": f"No parameter breakdown for this configuration yet ({type(e).__name__}: {str(e)[:160]})."}
    if "error" in b:
        return f"<div class='verdict warn'>⚠ {b['error']}</div>", [], empty_figure("No breakdown")
    head = (f"<div class='params-head'><span class='big'>{fmt_count(b['trainable'])}</span> trainable of "
            f"{fmt_count(b['total'])} parameters · <b>{b['percent']:.3f}%</b> · {fmt_bytes(b['trainable_bytes'])}"
            "</div>")
    comps = ", ".join(f"{k} {fmt_count(v)}" for k, v in b.get("by_component", {}).items())
    if comps:
        head += f"<div class='muted'>by part: {comps}</div>"
    rows = [[kind, f"{v['trainable']:,}", f"{v['total']:,}",
             f"{100 * v['trainable'] / v['total']:.2f}%" if v["total"] else "–"]
            for kind, v in b["by_kind"].items()]
    return head, rows, layer_figure(b)
