"""Method comparison: the same model, data, steps and seed for several methods, one table + chart.

`compare(cfg, methods, runs_dir)` trains one run per method through runner.execute (each a normal
run directory, so the page's Runs tab shows them too), then reads every run directory back and
writes `<runs_dir>/compare-<name>/` with comparison.json, comparison.md (a table) and
comparison.html (a plotly chart). Columns: trainable params, estimated and measured peak memory,
tokens/s (median over steps), final train loss and eval loss.

`budget` (optional): scale each method's size knob so its trainable count is close to a target
(e.g. the LoRA r=8 count) — see `match_budget`; methods without a size knob run at their defaults.
"""
from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path
from typing import Any, Callable

from .config import RunConfig
from .errors import ConfigError
from .methods import method_config

# The field that sets each method's size, for matching a parameter budget.
SIZE_KNOBS = {"lora": "r", "rslora": "r", "dora": "r", "pissa": "r", "olora": "r", "loraplus": "r", "dylora": "r",
              "loha": "r", "lokr": "r", "vera": "r", "glora": "r", "adalora": "init_r", "adapter": "bottleneck",
              "pfeiffer_adapter": "bottleneck", "parallel_adapter": "bottleneck", "adaptformer": "bottleneck",
              "adamix": "bottleneck", "mam_adapter": "bottleneck", "unipelt": "r", "prompt_tuning": "num_virtual_tokens",
              "prefix_tuning": "num_virtual_tokens", "p_tuning_v2": "num_virtual_tokens", "lst": "reduction"}


def trainable_count(cfg: RunConfig, method: dict) -> int:
    """Trainable parameters of a method on cfg's model, counted on a meta-device copy (no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .methods import apply_method
    from .models import resolve_model_config
    hf = resolve_model_config(cfg.model.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    for p in model.parameters():
        p.requires_grad_(False)
    apply_method(model, method_config(method))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def match_budget(cfg: RunConfig, name: str, budget: int) -> dict:
    """The method's config with its size knob set so the trainable count is nearest to `budget`."""
    knob = SIZE_KNOBS.get(name)
    if knob is None:
        return {"name": name}
    best, best_gap = {"name": name}, None
    candidates = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    for value in candidates:
        raw = {"name": name, knob: value}
        if name == "adalora":
            raw["target_r"] = max(1, value // 2)
        try:
            n = trainable_count(cfg, raw)
        except Exception:  # noqa: BLE001 - a size that does not fit this model: skip it
            continue
        gap = abs(n - budget)
        if best_gap is None or gap < best_gap:
            best, best_gap = raw, gap
    return best


def summarize(run_path: Path) -> dict[str, Any]:
    """One row of the comparison from a finished run directory."""
    from .rundir import RunDir
    run = RunDir(run_path)
    metrics = run.metrics()
    est = run.read_json("estimate.json") or {}
    steps = [m for m in metrics if m.get("loss") is not None]
    evals = [m["eval_loss"] for m in metrics if m.get("eval_loss") is not None]
    tps = [m["tokens_per_s"] for m in steps if m.get("tokens_per_s")]
    peaks = [m["peak_mem_bytes"] for m in metrics if m.get("peak_mem_bytes")]
    measured = (est.get("measured") or {}).get("measured") if isinstance(est.get("measured"), dict) else None
    return {"method": run.config().method.name, "run": run.name, "state": run.status().get("state"),
            "trainable_params": est.get("trainable_params"), "estimated_peak_bytes": est.get("total"),
            "measured_peak_bytes": measured or (max(peaks) if peaks else None),
            "tokens_per_s": statistics.median(tps) if tps else None,
            "final_train_loss": steps[-1]["loss"] if steps else None, "eval_loss": evals[-1] if evals else None,
            "losses": [m["loss"] for m in steps]}


def _fmt_bytes(n) -> str:
    return "-" if not n else f"{n / 2**20:,.1f} MiB"


def _fmt(x, spec=".4f") -> str:
    return "-" if x is None else format(x, spec)


def table_markdown(rows: list[dict]) -> str:
    head = "| method | trainable params | est. peak | measured peak | tokens/s | final train loss | eval loss |"
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        lines.append(f"| {r['method']} | {_fmt(r['trainable_params'], ',')} | {_fmt_bytes(r['estimated_peak_bytes'])} | "
                     f"{_fmt_bytes(r['measured_peak_bytes'])} | {_fmt(r['tokens_per_s'], ',.0f')} | "
                     f"{_fmt(r['final_train_loss'])} | {_fmt(r['eval_loss'])} |")
    return "\n".join(lines) + "\n"


def figure(rows: list[dict]):
    """Plotly figure: loss curves (left) and trainable params vs final loss (right)."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go
    fig = make_subplots(rows=1, cols=2, subplot_titles=("train loss", "trainable params vs final loss"))
    for r in rows:
        fig.add_trace(go.Scatter(y=r["losses"], mode="lines", name=r["method"]), row=1, col=1)
        if r["trainable_params"] and r["final_train_loss"] is not None:
            fig.add_trace(go.Scatter(x=[r["trainable_params"]], y=[r["final_train_loss"]], mode="markers+text",
                                     text=[r["method"]], textposition="top center", showlegend=False), row=1, col=2)
    fig.update_xaxes(title_text="step", row=1, col=1)
    fig.update_xaxes(title_text="trainable params", type="log", row=1, col=2)
    return fig


def compare(cfg: RunConfig, methods: list[str], runs_dir: str | Path, name: str = "compare",
            budget_method: str | None = None, on_event: Callable[[str, dict], None] | None = None) -> Path:
    """Train every method with cfg's model/data/train settings; write the comparison folder; return it."""
    from .rundir import RunDir
    from .runner import execute
    if not methods:
        raise ConfigError("Name at least one method to compare, e.g. --methods lora,ia3,prefix_tuning.")
    for m in methods:
        method_config({"name": m})  # unknown names fail here, before any training
    budget = trainable_count(cfg, {"name": budget_method}) if budget_method else None
    runs_dir = Path(runs_dir)
    rows = []
    for m in methods:
        raw = match_budget(cfg, m, budget) if budget else {"name": m}
        run_cfg = copy.deepcopy(cfg)
        run_cfg.method = method_config(raw)
        run = RunDir.create(runs_dir, run_cfg, f"{name}-{m}")
        try:
            execute(run, run_cfg, on_event=(lambda e, m=m: on_event(m, e)) if on_event else None)
        except Exception as e:  # noqa: BLE001 - one failing method must not end the comparison
            run.log(f"compare: {m} failed: {e}")
        row = summarize(run.path)
        row["method_config"] = {k: v for k, v in raw.items() if k != "name"}
        rows.append(row)
    out = runs_dir / f"{name}-table"
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps({"budget": budget, "rows": rows}, indent=2, default=str))
    (out / "comparison.md").write_text(table_markdown(rows))
    figure(rows).write_html(out / "comparison.html", include_plotlyjs=True, full_html=True)
    return out
