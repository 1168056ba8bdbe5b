"""Bytes and memory estimates in words, for the CLI, the page and the run's events.log."""
from __future__ import annotations

from typing import Any


def human(n: float) -> str:
    """Bytes in GiB, MiB or KiB, two decimals."""
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def format_estimate(est: Any) -> str:
    """memory.estimate's Estimate as the `estimate` command prints it: its items, the total and the peak's phase."""
    d = est.details
    k, n = d.get("checkpointed_layers", 0), d.get("layers", 0)
    ckpt = "on" if d["gradient_checkpointing"] else f"{k} of {n} layers" if k else "off"  # some: fitted, or a fraction
    lines = [f"{d['model']} + {d['method']} on {est.device}: batch {d['batch']} x {d['seq']} tokens, "
             f"{d['param_dtype']} params ({d['quantization']}), optimizer {d['optimizer']}, checkpointing {ckpt}",
             f"trainable {est.trainable_params:,} of {est.total_params:,} parameters"]
    for k, n in est.items.items():
        lines.append(f"  {k:<13}{human(n):>12}")
    nc = sum(est.items.values()) - est.total
    if nc:
        lines.append(f"  {'not at peak':<13}{'-' + human(nc):>12}   (not held at the peak, {d['peak_phase']})")
    lines.append(f"  {'total':<13}{human(est.total):>12}   peak during {d['peak_phase']}")
    if d.get("optimizer_host"):
        lines.append(f"  (+ {human(d['optimizer_host'])} optimizer states in paged host memory)")
    if d.get("host_only"):
        lines.append(f"  (+ {human(d['host_only'])} CPU copy of the base weights)")
    lines += [f"  ({note})" for note in d.get("notes", [])]  # what the method or the run adds or changes
    return "\n".join(lines)
