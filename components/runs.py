"""Runs tab: every run directory with its status; open one (curves, config, estimate vs measured);
resume a stopped run; compare runs on one chart; delete with confirmation. All read from workspace/runs."""
from __future__ import annotations

import html
import time
from typing import Any

import gradio as gr
import yaml

from studio.errors import StudioError
from studio.rundir import list_runs

from . import state
from .charts import compare_figure, empty_figure, fmt_bytes, fmt_count, loss_figure
from .train import estimated_total, fmt_duration, progress_html, run_config

HEADERS = ["run", "state", "method", "model", "step", "loss", "eval loss", "duration", "started"]


def _num(v: Any, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "–"


def runs_rows() -> list[list[Any]]:
    rows = []
    for run in list_runs(state.ws().runs):
        s = run.summary()
        created = run.status().get("created")
        rows.append([s["name"], s["state"], s["method"], s["model"], s["step"], _num(s["loss"]),
                     _num(s["eval_loss"]), fmt_duration(s["duration_s"]),
                     time.strftime("%m-%d %H:%M", time.localtime(created)) if created else "–"])
    return rows


def refresh(sig: Any, picked: str | None, compare: list[str] | None) -> list[Any]:
    """[sig, table, run dropdown, compare dropdown] when any run changed; else skips."""
    rows = runs_rows()
    new = tuple(tuple(r[:6]) for r in rows)
    if new == sig:
        return [gr.skip()] * 4
    names = [r[0] for r in rows]
    picked = picked if picked in names else (names[0] if names else None)
    compare = [c for c in (compare or []) if c in names]
    return [new, rows, gr.update(choices=names, value=picked), gr.update(choices=names, value=compare)]


def trainable_params(run) -> int | None:
    est = run.read_json("estimate.json") or {}
    if est.get("trainable_params"):
        return int(est["trainable_params"])
    from studio.params import breakdown_for_config
    try:
        b = breakdown_for_config(run_config(run))
    except StudioError:
        return None
    return b.get("trainable")


def open_run(name: str | None) -> list[Any]:
    """[status html, curves figure, config yaml] of one run."""
    if not name:
        return ["<div class='muted'>No run selected.</div>", empty_figure("Pick a run"), ""]
    try:
        run = state.ws().run(name)
        cfg = run_config(run)
    except StudioError as e:
        return [f"<div class='verdict bad'>✗ {html.escape(str(e))}</div>", empty_figure("No run"), ""]
    status, metrics = run.status(), run.metrics()
    peak = max((m.get("peak_mem_bytes") or 0 for m in metrics), default=0)
    tps = [m["tokens_per_s"] for m in metrics if m.get("tokens_per_s")]
    facts = [f"checkpoints: {', '.join(p.name for p in run.checkpoints()) or 'none'}",
             f"adapter: {'yes' if run.adapter() else 'not yet'}",
             f"trainable params: {fmt_count(trainable_params(run))}",
             f"estimated memory: {fmt_bytes(estimated_total(run))}",
             f"measured peak: {fmt_bytes(peak)}" if peak else "measured peak: – (CPU)",
             f"tokens/s: {sum(tps) / len(tps):,.0f}" if tps else "tokens/s: –",
             f"folder: <code>{html.escape(str(run.path))}</code>"]
    details = "<div class='facts'>" + "".join(f"<span>{f}</span>" for f in facts) + "</div>"
    return [progress_html(run, status, metrics) + details, loss_figure(metrics, title=f"Loss · {run.name}"),
            yaml.safe_dump(cfg.to_dict(), sort_keys=False)]


def resume(name: str | None) -> str:
    try:
        run = state.ws().run(name or "")
        if run.status().get("state") in ("running", "stopping", "queued"):
            raise StudioError(f"Run {run.name} is already training.")
        if not run.checkpoints():
            raise StudioError(f"Run {run.name} has no checkpoint to resume from; start it again from the Train tab.")
        state.runner.start(run.config(), resume_run=run.path)
    except StudioError as e:
        gr.Warning(str(e))
        return f"<div class='verdict bad'>✗ {html.escape(str(e))}</div>"
    return f"<div class='verdict ok'>▶ Resumed <b>{html.escape(run.name)}</b> from its last checkpoint; watch it in the Train tab.</div>"


def ask_delete(name: str | None) -> list[Any]:
    if not name:
        gr.Warning("Pick a run first.")
        return [gr.update(visible=False), ""]
    return [gr.update(visible=True), f"<b>Delete run {html.escape(name)}?</b> Its folder, checkpoints and adapter "
                                     f"are removed for good."]


def confirm_delete(name: str | None) -> list[Any]:
    try:
        run = state.ws().run(name or "")
        if state.runner.busy() and state.runner.active is not None and state.runner.active.path == run.path:
            raise StudioError(f"Run {run.name} is still training; stop it before deleting.")
        state.forget_chat_model(run)
        run.delete()
    except StudioError as e:
        gr.Warning(str(e))
        return [gr.update(visible=False), f"<div class='verdict bad'>✗ {html.escape(str(e))}</div>"]
    gr.Info(f"Deleted {name}")
    return [gr.update(visible=False), f"<div class='verdict ok'>Deleted <b>{html.escape(name)}</b>.</div>"]


def compare(names: list[str] | None) -> list[Any]:
    """[figure, table rows] comparing the picked runs."""
    names = names or []
    series, rows = {}, []
    for name in names:
        try:
            run = state.ws().run(name)
            cfg = run_config(run)
        except StudioError:
            continue
        metrics = run.metrics()
        series[name] = metrics
        evals = [m["eval_loss"] for m in metrics if m.get("eval_loss") is not None]
        losses = [m["loss"] for m in metrics if m.get("loss") is not None]
        tps = [m["tokens_per_s"] for m in metrics if m.get("tokens_per_s")]
        peak = max((m.get("peak_mem_bytes") or 0 for m in metrics), default=0)
        est = estimated_total(run)
        rows.append([name, cfg.method.name, fmt_count(trainable_params(run)),
                     fmt_bytes(peak) if peak else (f"est. {fmt_bytes(est)}" if est else "–"),
                     f"{sum(tps) / len(tps):,.0f}" if tps else "–", _num(losses[-1] if losses else None),
                     _num(evals[-1] if evals else None)])
    return [compare_figure(series) if series else empty_figure("Pick two or more runs to compare", 320), rows]


def load_into_wizard(name: str | None, form: Any) -> list[Any]:
    """The run's config.yaml shown in the Train tab's form (all fields), to re-run it with changes."""
    try:
        cfg = state.ws().run(name).config()
    except StudioError as e:
        gr.Warning(str(e))
        return [gr.skip()] * (len(form.load_outputs) + 1)
    return [*form.load_updates(cfg.to_dict()),
            f"<div class='ok'>Loaded the settings of <b>{html.escape(name)}</b> into the Train tab; change what you "
            f"like and press Start training.</div>"]


def create_runs(train_form: Any = None) -> dict[str, Any]:
    with gr.Tab("Runs", id="runs", elem_id="tab-runs") as tab:
        with gr.Row(equal_height=True):
            gr.HTML("<h3 class='step'>All runs <small class='muted'>· from workspace/runs; a refresh or restart "
                    "never loses one</small></h3>")
            refresh_btn = gr.Button("↻ Refresh", size="sm", scale=0, min_width=110, elem_id="runs-refresh")
        table = gr.Dataframe(runs_rows(), headers=HEADERS, interactive=False, max_height=300, elem_id="runs-table",
                             show_label=False)
        with gr.Row(equal_height=True):
            pick = gr.Dropdown(state.ws().run_names(), label="Open run", scale=3, elem_id="runs-pick")
            resume_btn = gr.Button("▶ Resume", scale=1, elem_id="resume-btn")
            load_btn = gr.Button("↺ Load into Train", scale=1, elem_id="load-btn", visible=train_form is not None)
            delete_btn = gr.Button("Delete", variant="stop", scale=1, elem_id="delete-btn")
        with gr.Row(visible=False, elem_classes=["confirm"], equal_height=True) as confirm_row:
            confirm_text = gr.HTML()
            yes_btn = gr.Button("Yes, delete", variant="stop", scale=0, min_width=130, elem_id="delete-yes")
            no_btn = gr.Button("Cancel", scale=0, min_width=100)
        message = gr.HTML(elem_id="runs-msg")
        detail = gr.HTML(elem_id="run-detail")
        with gr.Row(equal_height=False):
            curve = gr.Plot(empty_figure("Pick a run"), show_label=False, scale=3, elem_id="run-curve")
            config = gr.Code(language="yaml", label="config.yaml", scale=2, max_lines=22, elem_id="run-config")
        gr.HTML("<h3 class='step'>Compare runs</h3>")
        with gr.Row(equal_height=True):
            pick_many = gr.Dropdown(state.ws().run_names(), multiselect=True, label="Runs to compare", scale=4,
                                    elem_id="compare-pick")
            compare_btn = gr.Button("Compare", scale=1, elem_id="compare-btn")
        compare_plot = gr.Plot(empty_figure("Pick two or more runs to compare", 320), show_label=False,
                               elem_id="compare-plot")
        compare_table = gr.Dataframe(headers=["run", "method", "trainable params", "peak memory", "tokens/s",
                                              "final loss", "eval loss"], interactive=False, show_label=False,
                                     elem_id="compare-table")
        sig = gr.State(None)
        timer = gr.Timer(3.0)

    refresh_outputs = [sig, table, pick, pick_many]
    timer.tick(refresh, [sig, pick, pick_many], refresh_outputs, show_progress="hidden")
    refresh_btn.click(lambda p, c: refresh(None, p, c), [pick, pick_many], refresh_outputs).then(
        open_run, pick, [detail, curve, config])
    tab.select(lambda p, c: refresh(None, p, c), [pick, pick_many], refresh_outputs)

    def on_select(evt: gr.SelectData, rows):
        try:
            return rows.iloc[evt.index[0], 0] if hasattr(rows, "iloc") else rows[evt.index[0]][0]
        except (IndexError, KeyError, TypeError):
            return gr.skip()

    table.select(on_select, table, pick)
    pick.change(open_run, pick, [detail, curve, config], show_progress="hidden")
    resume_btn.click(resume, pick, message)
    if train_form is not None:
        load_btn.click(lambda name: load_into_wizard(name, train_form), pick, [*train_form.load_outputs, message])
    delete_btn.click(ask_delete, pick, [confirm_row, confirm_text])
    no_btn.click(lambda: gr.update(visible=False), None, confirm_row)
    yes_btn.click(confirm_delete, pick, [confirm_row, message]).then(
        lambda p, c: refresh(None, p, c), [pick, pick_many], refresh_outputs)
    compare_btn.click(compare, pick_many, [compare_plot, compare_table])
    pick_many.change(compare, pick_many, [compare_plot, compare_table], show_progress="hidden")
    return {"tab": tab}
