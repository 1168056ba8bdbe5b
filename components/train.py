"""Train tab: the one-screen wizard (model, data, method, training), the live estimate beside it, and the
live view of the watched run (progress, loss curve, stats, log) read back from its run directory."""
from __future__ import annotations

import html
import shutil
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import gradio as gr

from studio.config import DataConfig, ModelConfig, TrainConfig
from studio.errors import StudioError

from . import state
from .charts import empty_figure, fmt_bytes, loss_figure
from .estimates import detected_device, memory_panel, params_panel
from .forms import MethodForm, RunForm, SectionForm, safe_list_methods

UPLOAD_TYPES = [".json", ".jsonl", ".csv", ".parquet"]


def model_picker(doc: dict, elem_id: str = "model-name") -> gr.Dropdown:
    from studio.models import model_presets
    choices = [(f"{name} — {p.get('summary', '')}", name) for name, p in model_presets().items()]
    return gr.Dropdown(choices, value=doc["default"], allow_custom_value=True, label="Model",
                       info="A preset, or type a local folder / .gguf file / hub id (owner/name)",
                       elem_classes=["field", "field-name"], elem_id=elem_id, scale=2)


def dataset_picker(doc: dict) -> gr.Dropdown:
    from studio.data_io import dataset_choices
    choices = [(f"{d['name']} — {d['description']} ({d['rows']} rows)", d["name"]) for d in dataset_choices()]
    return gr.Dropdown(choices, value=doc["default"], allow_custom_value=True, label="Dataset",
                       info="Shipped, uploaded (button below), a file/folder path, or a hub id",
                       elem_classes=["field", "field-path"], elem_id="data-path", scale=2)


def build_run_form(methods: list[dict] | None = None) -> RunForm:
    model = SectionForm(ModelConfig, "model", primary=["name", "dtype", "quantization"],
                        overrides={"name": model_picker})
    data = SectionForm(DataConfig, "data", primary=["path", "format", "max_length", "eval_fraction", "limit",
                                                    "template_vars"],
                       overrides={"path": dataset_picker})
    method = MethodForm(methods)
    train = SectionForm(TrainConfig, "train", primary=["max_steps", "epochs", "batch_size", "grad_accum", "lr",
                                                       "scheduler", "warmup_steps", "eval_every", "save_every"])
    return RunForm(model, data, method, train)


# --------------------------------------------------------------------------------------------- handlers
def estimate_view(form: RunForm, *values: Any) -> list[Any]:
    """[memory figure, verdict html, params html, params rows, layer figure] for the form's config."""
    try:
        cfg = form.to_config(values)
    except StudioError as e:
        msg = f"<div class='verdict warn'>⚠ {html.escape(str(e))}</div>"
        return [gr.skip(), msg, gr.skip(), gr.skip(), gr.skip()]
    fig, verdict = memory_panel(cfg)
    head, rows, layers = params_panel(cfg)
    return [fig, verdict, head, rows, layers]


@lru_cache(maxsize=2)
def _tokenizer(name: str, trust_remote_code: bool) -> Any:
    from studio.models import load_tokenizer
    return load_tokenizer(ModelConfig(name=name, trust_remote_code=trust_remote_code))


def data_preview(form: RunForm, *values: Any) -> tuple[str, str]:
    """(summary html, rendered examples html with trained tokens highlighted); errors inline."""
    from studio.data import build_datasets, load_rows, preview
    try:
        cfg = form.to_config(values)
        tok = _tokenizer(cfg.model.name, cfg.model.trust_remote_code)
        items = preview(cfg.data, tok, n=3)
        stats = build_datasets(cfg.data, tok, cfg.train.seed).stats
        columns = list(load_rows(cfg.data)[0])
    except StudioError as e:
        return f"<div class='verdict bad'>✗ {html.escape(str(e))}</div>", ""
    fmt = items[0]["format"] if items else "?"
    summary = (f"<div class='data-summary'>Format <b>{fmt}</b> · {stats['rows']:,} rows → "
               f"<b>{stats['examples']:,}</b> examples ({stats['train_examples']:,} train / "
               f"{stats['eval_examples']:,} eval) · <b>{stats['tokens']:,}</b> tokens, "
               f"{stats['trained_tokens']:,} trained · longest {stats['max_tokens']} · "
               f"{stats['truncated']} truncated, {stats['dropped']} dropped<br><span class='muted'>columns: "
               f"{html.escape(', '.join(columns))}" + (f" · mapping {html.escape(str(cfg.data.columns))}"
                                                       if cfg.data.columns else "") + "</span></div>")
    cards = []
    for it in items:
        spans = "".join(f"<span class='{'tr' if s['trained'] else 'ctx'}'>{html.escape(s['text'])}</span>"
                        for s in it["segments"])
        cards.append(f"<div class='example'><div class='ex-head'>row {it['row']} · {it['tokens']} tokens, "
                     f"{it['trained_tokens']} trained{' · truncated' if it['truncated'] else ''}</div>"
                     f"<pre>{spans}</pre></div>")
    legend = "<div class='legend'><span class='tr'>trained tokens</span> <span class='ctx'>context (masked)</span></div>"
    return summary, legend + "".join(cards)


def save_upload(file: str | None) -> Any:
    """Copy an uploaded dataset into workspace/uploads and point the dataset field at it."""
    if not file:
        return gr.skip()
    src = Path(file)
    if src.suffix.lower() not in UPLOAD_TYPES:
        gr.Warning(f"{src.name}: upload a {', '.join(UPLOAD_TYPES)} file.")
        return gr.skip()
    dest = state.ws().uploads / src.name
    if dest.exists():
        dest = dest.with_name(f"{dest.stem}-{time.strftime('%Y%m%d-%H%M%S')}{dest.suffix}")
    shutil.copyfile(src, dest)
    gr.Info(f"Saved {src.name} to {dest}")
    return gr.update(value=str(dest))


def start_run(form: RunForm, run_name: str, *values: Any) -> str:
    try:
        cfg = form.to_config(values)
        run = state.runner.start(cfg, name=(run_name or "").strip() or None)
    except StudioError as e:
        gr.Warning(str(e))
        return f"<div class='verdict bad'>✗ {html.escape(str(e))}</div>"
    return f"<div class='verdict ok'>▶ Started <b>{html.escape(run.name)}</b>; its progress is below.</div>"


def stop_run() -> str:
    if not state.runner.stop():
        gr.Warning("Nothing is training right now.")
        return gr.skip()
    return "<div class='verdict warn'>■ Stopping after the current step; a checkpoint is kept.</div>"


# ------------------------------------------------------------------------------------------- live view
_config_cache: dict[str, tuple[float, Any]] = {}
_estimate_cache: dict[str, int | None] = {}


def run_config(run) -> Any:
    """A run's config.yaml, read once per change of the file."""
    path = run.path / "config.yaml"
    mtime = path.stat().st_mtime
    hit = _config_cache.get(str(path))
    if hit and hit[0] == mtime:
        return hit[1]
    cfg = run.config()
    _config_cache[str(path)] = (mtime, cfg)
    return cfg


def estimated_total(run) -> int | None:
    """The run's estimate.json total, or the estimate of its config.yaml for this device (cached)."""
    est = run.read_json("estimate.json")
    if est and est.get("total"):
        return int(est["total"])
    key = str(run.path)
    if key not in _estimate_cache:
        from studio.memory import estimate
        try:
            _estimate_cache[key] = estimate(run_config(run), device=detected_device()["device"]).total
        except Exception:  # noqa: BLE001 - an estimate is optional here
            _estimate_cache[key] = None
    return _estimate_cache[key]


def fmt_duration(s: float | None) -> str:
    if s is None:
        return "–"
    s = int(round(s))
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s")


def progress_html(run, status: dict, metrics: list[dict]) -> str:
    state_ = status.get("state", "?")
    total = status.get("total_steps") or 0
    step = metrics[-1]["step"] if metrics else status.get("step", 0) or 0
    pct = 100 * step / total if total else 0
    recent = [m for m in metrics[-20:] if m.get("time") is not None]
    eta = rate = None
    if len(recent) >= 2 and recent[-1]["step"] > recent[0]["step"] and recent[-1]["time"] > recent[0]["time"]:
        rate = (recent[-1]["time"] - recent[0]["time"]) / (recent[-1]["step"] - recent[0]["step"])
        eta = rate * max(0, total - step) if state_ in ("running", "queued") else None
    try:
        cfg = run_config(run)
        what = f"{cfg.method.name} on {cfg.model.name} · {cfg.data.path}"
    except StudioError:
        what = ""
    meta = [f"step {step} / {total or '?'}", f"{pct:.0f}%"]
    if rate:
        meta.append(f"{rate:.2f} s/step")
    if eta is not None:
        meta.append(f"ETA {fmt_duration(eta)}")
    err = status.get("error")
    err_html = f"<div class='run-error'>{html.escape(err)}</div>" if err else ""
    return (f"<div class='run-card state-{state_}' id='live-run' data-run='{html.escape(run.name)}' data-state='{state_}'>"
            f"<div class='run-head'><b class='run-name'>{html.escape(run.name)}</b>"
            f"<span class='badge {state_}'>{state_}</span><span class='muted'>{html.escape(what)}</span></div>"
            f"<div class='bar'><div style='width:{pct:.1f}%'></div></div>"
            f"<div class='run-meta'>{' · '.join(meta)}</div>{err_html}</div>")


def stats_html(run, metrics: list[dict]) -> str:
    last = metrics[-1] if metrics else {}
    evals = [m["eval_loss"] for m in metrics if m.get("eval_loss") is not None]
    peak = max((m.get("peak_mem_bytes") or 0 for m in metrics), default=0)
    est = estimated_total(run)
    peak_txt = fmt_bytes(peak) if peak else "–"

    def tile(label: str, value: str, sub: str = "") -> str:
        return f"<div class='tile'><div class='t-label'>{label}</div><div class='t-value'>{value}</div><div class='t-sub'>{sub}</div></div>"

    return ("<div class='tiles'>"
            + tile("Loss", f"{last['loss']:.4f}" if last.get("loss") is not None else "–", f"epoch {last.get('epoch', '–')}")
            + tile("Eval loss", f"{evals[-1]:.4f}" if evals else "–", f"{len(evals)} evals")
            + tile("Learning rate", f"{last['lr']:.2e}" if last.get("lr") is not None else "–",
                   f"grad norm {last['grad_norm']:.2f}" if last.get("grad_norm") is not None else "")
            + tile("Tokens / s", f"{last['tokens_per_s']:,.0f}" if last.get("tokens_per_s") else "–")
            + tile("Peak memory", peak_txt, ("" if peak else "not measured on CPU · ")
                   + (f"estimate {fmt_bytes(est)}" if est else ""))
            + "</div>" + method_facts_html(metrics))


def method_facts_html(metrics: list[dict]) -> str:
    """What the method reports as it trains (AdaLoRA's rank per layer, changed fractions), latest first."""
    facts = next((m["method"] for m in reversed(metrics) if m.get("method")), None)
    if not facts:
        return ""
    rows = []
    for key, value in facts.items():
        if isinstance(value, dict):
            value = " · ".join(f"{k}: {v}" for k, v in list(value.items())[:48])
        elif isinstance(value, float):
            value = f"{value:.4g}"
        rows.append(f"<div><b>{html.escape(key.replace('_', ' '))}</b> {html.escape(str(value))}</div>")
    return "<div class='method-facts'>" + "".join(rows) + "</div>"


def live_view(sig: Any) -> list[Any]:
    """[sig, progress, loss figure, stats, log, start button, stop button]; skips what did not change."""
    run = state.current_run()
    busy = state.runner.busy()
    buttons = [gr.update(interactive=not busy), gr.update(interactive=busy)]
    if run is None:
        new = ("none", busy)
        if sig == new:
            return [gr.skip()] * 7
        return [new, "<div class='run-card empty'>No runs yet: fill in the wizard and press <b>Start training</b>.</div>",
                empty_figure("The loss curve appears here while training"), "", "", *buttons]
    status, metrics, log = run.status(), run.metrics(), run.log_text(60)
    new = (run.name, status.get("state"), status.get("step"), len(metrics), len(log), busy)
    if sig == new:
        return [gr.skip()] * 7
    changed = tuple(sig or ())[:4] != new[:4]
    fig = loss_figure(metrics, title=f"Loss · {run.name}") if changed else gr.skip()
    return [new, progress_html(run, status, metrics), fig, stats_html(run, metrics), log, *buttons]


# ---------------------------------------------------------------------------------------------- layout
def create_train() -> dict[str, Any]:
    form = build_run_form(safe_list_methods())
    with gr.Tab("Train", id="train", elem_id="tab-train"):
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=560, elem_classes=["wizard"]):
                gr.HTML("<h3 class='step'><span>1</span> Model</h3>")
                form.model.render()
                gr.HTML("<h3 class='step'><span>2</span> Data</h3>")
                form.data.render()
                with gr.Row(equal_height=True):
                    upload = gr.UploadButton("⬆ Upload a dataset (json, jsonl, csv, parquet)", file_types=UPLOAD_TYPES,
                                             type="filepath", scale=2, elem_id="upload")
                    preview_btn = gr.Button("Preview examples", scale=1, elem_id="preview-btn")
                data_summary = gr.HTML(elem_id="data-summary")
                data_examples = gr.HTML(elem_id="data-examples", max_height=380)
                gr.HTML("<h3 class='step'><span>3</span> Method</h3>")
                form.method.render()
                gr.HTML("<h3 class='step'><span>4</span> Training</h3>")
                form.train.render()
                with gr.Row(equal_height=True, elem_classes=["start-row"]):
                    run_name = gr.Textbox(label="Run name", placeholder="optional: generated from method and time",
                                          scale=2, elem_id="run-name")
                    start_btn = gr.Button("▶ Start training", variant="primary", scale=1, elem_id="start-btn")
                    stop_btn = gr.Button("■ Stop", variant="stop", scale=1, interactive=False, elem_id="stop-btn")
                start_msg = gr.HTML(elem_id="start-msg")
            with gr.Column(scale=2, min_width=400, elem_classes=["side-panel"]):
                gr.HTML(f"<h3 class='panel-title'>Before you press Start <small>· {detected_device()['label']}</small></h3>")
                init = estimate_view(form, *[c.value for c in form.inputs])
                mem_plot = gr.Plot(init[0], show_label=False, elem_id="mem-plot")
                mem_text = gr.HTML(init[1], elem_id="mem-verdict")
                params_text = gr.HTML(init[2], elem_id="params-summary")
                params_table = gr.Dataframe(init[3], headers=["module kind", "trainable", "total", "trained"],
                                            interactive=False, max_height=230, elem_id="params-table",
                                            show_label=False)
                layer_plot = gr.Plot(init[4], show_label=False, elem_id="layer-plot")
        gr.HTML("<h3 class='step live'><span>●</span> Live training</h3>")
        progress = gr.HTML(elem_id="live-progress")
        with gr.Row(equal_height=False):
            loss_plot = gr.Plot(empty_figure("The loss curve appears here while training"), show_label=False,
                                scale=3, elem_id="loss-plot")
            with gr.Column(scale=2, min_width=320):
                stats = gr.HTML(elem_id="live-stats")
                log = gr.Textbox(label="Log", lines=9, max_lines=9, interactive=False, autoscroll=True,
                                 elem_id="live-log")
        timer = gr.Timer(1.5)
        sig = gr.State(None)

    def on_change(*values):
        return estimate_view(form, *values)

    gr.on([c.change for c in form.inputs], on_change, form.inputs,
          [mem_plot, mem_text, params_text, params_table, layer_plot], trigger_mode="always_last",
          show_progress="hidden", queue=True)

    def on_method_pick(name: str):
        """A preset that implies model settings (qlora: a 4-bit base) sets them in the model section."""
        from studio.methods import model_requirements
        quant = model_requirements(name).get("quantization")
        return gr.update(value=quant) if quant else gr.skip()

    form.method.name.input(on_method_pick, form.method.name, form.model.comps["quantization"],
                           show_progress="hidden")

    def on_preview(*values):
        return data_preview(form, *values)

    preview_inputs = form.inputs
    preview_btn.click(on_preview, preview_inputs, [data_summary, data_examples])
    form.data.comps["path"].input(on_preview, preview_inputs, [data_summary, data_examples],
                                  trigger_mode="always_last")
    upload.upload(save_upload, upload, form.data.comps["path"]).then(
        on_preview, preview_inputs, [data_summary, data_examples])

    def on_start(name, *values):
        return start_run(form, name, *values)

    live_outputs = [sig, progress, loss_plot, stats, log, start_btn, stop_btn]
    start_btn.click(on_start, [run_name, *form.inputs], start_msg).then(
        live_view, sig, live_outputs, show_progress="hidden")
    stop_btn.click(stop_run, None, start_msg).then(live_view, sig, live_outputs, show_progress="hidden")
    timer.tick(live_view, sig, live_outputs, show_progress="hidden")
    return {"form": form, "timer": timer}
