"""Plotly figures of the page: memory estimate, per-layer parameters, loss curves, run comparison."""
from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

# The estimate's items in stack order, with the colour each keeps on every chart.
MEMORY_ITEMS = (
    ("weights", "Weights", "#4C78A8"),
    ("gradients", "Gradients", "#F58518"),
    ("optimizer", "Optimizer", "#E45756"),
    ("activations", "Activations", "#72B7B2"),
    ("logits", "Logits", "#54A24B"),
    ("method_extra", "Method extra", "#B279A2"),
    ("transient", "Transient", "#FF9DA6"),
    ("context", "Context", "#9D755D"),
)
PALETTE = ("#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#B279A2", "#EECA3B", "#9D755D")
FONT = dict(family="Inter, system-ui, sans-serif", size=12, color="#1f2937")


def nbytes(value: Any) -> float:
    """Bytes of one estimate item: a number, or a dict holding `bytes`/`total` or numbers per part."""
    if isinstance(value, bool) or value is None:
        return 0.0
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        for key in ("bytes", "total", "total_bytes"):
            if isinstance(value.get(key), (int, float)):
                return float(value[key])
        return sum(nbytes(v) for v in value.values() if isinstance(v, (int, float, dict)))
    return 0.0


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    n = float(n)
    for unit, div in (("TB", 1024 ** 4), ("GB", 1024 ** 3), ("MB", 1024 ** 2), ("KB", 1024)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_count(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _layout(fig: go.Figure, title: str = "", height: int = 260, **kw: Any) -> go.Figure:
    kw.setdefault("legend", dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1))
    fig.update_layout(template="plotly_white", height=height, font=FONT,
                      title=dict(text=title, x=0.01, xanchor="left", font=dict(size=14)) if title else None,
                      margin=dict(l=56, r=20, t=44 if title else 16, b=40), **kw)
    return fig


def empty_figure(message: str, height: int = 220) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font=dict(size=13, color="#6b7280"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, height=height)


def memory_items(est: dict) -> list[tuple[str, str, float, str]]:
    """(key, label, bytes, colour) of each estimate item with bytes > 0, in stack order."""
    out = []
    for key, label, colour in MEMORY_ITEMS:
        b = nbytes(est.get(key))
        if b > 0:
            out.append((key, label, b, colour))
    return out


def _unit(n: float) -> tuple[str, float]:
    for unit, div in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= div:
            return unit, div
    return "B", 1


def memory_figure(est: dict, capacity: float | None = None, device: str = "", measured: float | None = None,
                  height: int = 230) -> go.Figure:
    """One stacked horizontal bar of the estimate's items, against the device's memory when comparable."""
    fig = go.Figure()
    items = memory_items(est)
    total = nbytes(est.get("total")) or sum(i[2] for i in items)
    top = max(total, measured or 0)
    show_capacity = bool(capacity) and capacity <= 4 * top  # a 5 MB bar against 24 GB would be invisible
    unit, div = _unit(max(top, capacity or 0) if show_capacity else top)
    for key, label, b, colour in items:
        fig.add_bar(y=["estimate"], x=[b / div], name=label, orientation="h", marker_color=colour,
                    hovertemplate=f"{label}: {fmt_bytes(b)}<extra></extra>")
    if measured:
        fig.add_bar(y=["measured"], x=[measured / div], name="Measured peak", orientation="h",
                    marker_color="#374151", hovertemplate=f"measured: {fmt_bytes(measured)}<extra></extra>")
    stacked = sum(i[2] for i in items)
    if stacked > total * 1.001:  # items that are not all alive at the peak: mark the peak itself
        fig.add_vline(x=total / div, line_width=2, line_color="#111827",
                      annotation_text="peak", annotation_position="bottom right", annotation_font_size=10)
    right = max(stacked, top)
    if show_capacity:
        right = max(right, capacity)
        fig.add_vline(x=capacity / div, line_width=2, line_dash="dash", line_color="#dc2626" if total > capacity
                      else "#111827", annotation_text=f"{device} {fmt_bytes(capacity)}",
                      annotation_position="top left", annotation_font_size=11)
    fig.update_xaxes(title_text=unit, range=[0, right / div * 1.08 if right else 1], rangemode="tozero")
    fig.update_yaxes(showticklabels=bool(measured))
    title = f"Memory: {fmt_bytes(total)}" + (f" of {fmt_bytes(capacity)} ({device})" if capacity else "")
    return _layout(fig, title, height=height, barmode="stack", bargap=0.35,
                   legend=dict(orientation="h", yanchor="top", y=-0.35, x=0, font=dict(size=11)))


def layer_figure(breakdown: dict, height: int = 220) -> go.Figure:
    """Trainable parameters per decoder layer (plus what sits outside the layers)."""
    layers = breakdown.get("by_layer") or []
    if not layers:
        return empty_figure("No per-layer breakdown", height)
    x = [str(r["layer"]) for r in layers]
    y = [r["trainable"] for r in layers]
    fig = go.Figure(go.Bar(x=x, y=y, marker_color="#4C78A8", name="in layer",
                           hovertemplate="layer %{x}: %{y:,} trainable<extra></extra>"))
    if breakdown.get("outside_layers"):
        fig.add_bar(x=["outside"], y=[breakdown["outside_layers"]], marker_color="#F58518", name="outside layers",
                    hovertemplate="outside the layers: %{y:,}<extra></extra>")
    fig.update_xaxes(title_text="layer", type="category")
    fig.update_yaxes(title_text="trainable params")
    return _layout(fig, "Trainable parameters per layer", height=height, showlegend=False)


def loss_figure(metrics: list[dict], title: str = "Loss", height: int = 300) -> go.Figure:
    """Train loss (line), eval loss (markers) and learning rate (dotted, right axis) by step."""
    rows = [m for m in metrics if m.get("loss") is not None]
    if not rows:
        return empty_figure("Waiting for the first step…", height)
    fig = go.Figure()
    fig.add_scatter(x=[m["step"] for m in rows], y=[m["loss"] for m in rows], mode="lines+markers" if len(rows) < 40
                    else "lines", name="train loss", line=dict(color="#4C78A8", width=2), marker=dict(size=5))
    evals = [m for m in metrics if m.get("eval_loss") is not None]
    if evals:
        fig.add_scatter(x=[m["step"] for m in evals], y=[m["eval_loss"] for m in evals], mode="lines+markers",
                        name="eval loss", line=dict(color="#E45756", width=2, dash="dot"), marker=dict(size=8))
    lrs = [m for m in metrics if m.get("lr") is not None]
    if lrs:
        fig.add_scatter(x=[m["step"] for m in lrs], y=[m["lr"] for m in lrs], mode="lines", name="learning rate",
                        yaxis="y2", line=dict(color="#9ca3af", width=1, dash="dot"))
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="loss")
    return _layout(fig, title, height=height,
                   yaxis2=dict(overlaying="y", side="right", showgrid=False, title="lr", tickformat=".1e",
                              rangemode="tozero"))


def compare_figure(series: dict[str, list[dict]], height: int = 320) -> go.Figure:
    """Train (solid) and eval (dotted) loss of several runs on one chart."""
    if not series:
        return empty_figure("Pick two or more runs to compare", height)
    fig = go.Figure()
    for i, (name, metrics) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        rows = [m for m in metrics if m.get("loss") is not None]
        fig.add_scatter(x=[m["step"] for m in rows], y=[m["loss"] for m in rows], mode="lines", name=name,
                        line=dict(color=colour, width=2), legendgroup=name)
        evals = [m for m in metrics if m.get("eval_loss") is not None]
        if evals:
            fig.add_scatter(x=[m["step"] for m in evals], y=[m["eval_loss"] for m in evals], mode="lines+markers",
                            name=f"{name} (eval)", line=dict(color=colour, dash="dot"), legendgroup=name)
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="loss")
    return _layout(fig, "Loss by run", height=height)


def fit_figure(rows: list[dict], height: int = 300) -> go.Figure:
    """Needed memory vs each device's memory (green fits, amber fits tightly, red does not)."""
    if not rows:
        return empty_figure("No fit table", height)
    gib = 1024 ** 3
    names = [r["device"] for r in rows]
    fig = go.Figure(go.Bar(x=names, y=[r["capacity"] / gib for r in rows], name="device memory",
                           marker_color=["#F2A93B" if r.get("tight") else "#54A24B" if r["fits"] else "#E45756"
                                         for r in rows], opacity=0.35))
    fig.add_scatter(x=names, y=[r["needed"] / gib for r in rows], mode="markers", name="needed",
                    marker=dict(color="#111827", size=10, symbol="line-ew-open", line=dict(width=3)))
    fig.update_yaxes(title_text="GiB")
    return _layout(fig, "Fits on…", height=height)
