"""Memory calculator tab: model (preset, local folder or hub id: config only, never weights), method and
settings -> itemised chart, fit table over common GPUs, largest batch / sequence / rank that fits, and the
switches that save the most."""
from __future__ import annotations

import html
from typing import Any

import gradio as gr

from studio.config import DataConfig, ModelConfig, TrainConfig
from studio.errors import StudioError

from .charts import fmt_bytes, fit_figure
from .estimates import detected_device, gpu_choices, memory_panel, params_panel
from .forms import MethodForm, RunForm, SectionForm, safe_list_methods
from .train import model_picker


def build_calc_form(methods: list[dict] | None = None) -> RunForm:
    return RunForm(SectionForm(ModelConfig, "model", only=["name", "dtype", "quantization"],
                               overrides={"name": lambda d: model_picker(d, "calc-model")}),
                   SectionForm(DataConfig, "data", only=["max_length"]),
                   MethodForm(methods),
                   SectionForm(TrainConfig, "train", only=["batch_size", "optimizer", "gradient_checkpointing",
                                                             "offload_checkpoints"]))


def calculate(form: RunForm, gpu: str, *values: Any) -> list[Any]:
    """[memory figure, verdict, fit figure, fit rows, answers html, switch rows, params html]."""
    from studio.memory_search import best_switch, fit_table, largest_fitting, saving_text
    try:
        cfg = form.to_config(values)
        fig, verdict = memory_panel(cfg, gpu=gpu)
        table = fit_table(cfg)
    except StudioError as e:
        msg = f"<div class='verdict bad'>✗ {html.escape(str(e))}</div>"
        return [gr.skip(), msg, gr.skip(), gr.skip(), "", gr.skip(), ""]
    fit_rows = [{"device": r["gpu"], "capacity": r["memory_bytes"], "needed": r["total"], "fits": r["fits"],
                 "tight": r["tight"]} for r in table]
    rows = [[r["gpu"], fmt_bytes(r["memory_bytes"]), fmt_bytes(r["total"]),
             "⚠ tight" if r["tight"] else "✓ fits" if r["fits"] else "✗ no",
             f"{100 * r['total'] / r['memory_bytes']:.0f}%"] for r in table]
    answers = []
    for what, label in (("batch_size", "batch size"), ("max_length", "sequence length"), ("r", "rank r")):
        try:
            n = largest_fitting(cfg, gpu, what)
            answers.append(f"<div class='tile'><div class='t-label'>Largest {label}</div>"
                           f"<div class='t-value'>{n:,}</div><div class='t-sub'>on {html.escape(gpu)}</div></div>"
                           if n else f"<div class='tile'><div class='t-label'>Largest {label}</div>"
                           f"<div class='t-value'>none</div><div class='t-sub'>even 1 does not fit</div></div>")
        except StudioError as e:
            answers.append(f"<div class='tile'><div class='t-label'>Largest {label}</div>"
                           f"<div class='t-value'>–</div><div class='t-sub'>{html.escape(str(e))}</div></div>")
    answers.append(checkpointing_tile(cfg, gpu))
    answers.append(chat_tile(cfg))
    try:
        switches = [[label, saving_text(saved, fmt_bytes)] for label, saved in best_switch(cfg, gpu)]
    except StudioError:
        switches = []
    head, _, _ = params_panel(cfg)
    return [fig, verdict, fit_figure(fit_rows), rows, "<div class='tiles'>" + "".join(answers) + "</div>",
            switches, head]


def chat_tile(cfg: Any) -> str:
    """Chatting with the run on a GPU: base weights + adapter + KV cache, and the merged copy the chat adds."""
    from studio.memory_inference import estimate_chat
    try:
        inf = estimate_chat(cfg, cfg.data.max_length, cfg.model.dtype)
    except Exception:  # noqa: BLE001 - an extra answer, never a failure of the tab
        return ""
    merged = (f"; +{fmt_bytes(inf['merged_copy'])} for a merged copy (base-speed answers, made where it fits)"
              if inf["merged_copy"] else "")
    return (f"<div class='tile'><div class='t-label'>Chat (inference)</div><div class='t-value'>{fmt_bytes(inf['total'])}"
            f"</div><div class='t-sub'>{cfg.data.max_length} tokens context, KV {fmt_bytes(inf['kv_cache'])}"
            f"{merged}</div></div>")


def checkpointing_tile(cfg: Any, gpu: str) -> str:
    """The fastest gradient checkpointing that fits: how many layers must be recomputed on `gpu`."""
    from studio.gpus import gpu_memory
    from studio.memory_search import fewest_recomputed
    label = "<div class='tile'><div class='t-label'>Fastest checkpointing that fits</div>"
    try:
        fit = fewest_recomputed(cfg, gpu)
    except StudioError as e:
        return label + f"<div class='t-value'>–</div><div class='t-sub'>{html.escape(str(e))}</div></div>"
    if fit is None:
        return label + "<div class='t-value'>none</div><div class='t-sub'>even recomputing every layer does not fit</div></div>"
    k, n = fit
    if k == 0:
        return label + "<div class='t-value'>not needed</div><div class='t-sub'>fits without recomputing</div></div>"
    return label + (f"<div class='t-value'>{k} of {n} layers</div><div class='t-sub'>recomputed: "
                    f"train.checkpoint_budget_gb={gpu_memory(gpu) / 2**30:.1f}</div></div>")


def create_calculator() -> dict[str, Any]:
    form = build_calc_form(safe_list_methods())
    det = detected_device()
    names = [v for _, v in gpu_choices()]
    default_gpu = det["gpu"] if det["gpu"] in names and det["device"] == "cuda" else "RTX 4090"
    with gr.Tab("Memory calculator", id="calculator", elem_id="tab-calc"):
        gr.HTML("<p class='muted'>Will it fit? Works from the model's config alone: no weights are downloaded "
                "or loaded. Pick a preset or type a local folder or a hub id.</p>")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=480):
                form.model.render()
                form.method.render()
                form.data.render()
                form.train.render()
                with gr.Row(equal_height=True):
                    gpu = gr.Dropdown(gpu_choices(), value=default_gpu, label="GPU", scale=3, elem_id="calc-gpu")
                    go = gr.Button("Calculate", variant="primary", scale=1, elem_id="calc-btn")
            init = calculate(form, default_gpu, *[c.value for c in form.inputs])
            init = [None if isinstance(v, dict) and v.get("__type__") == "update" else v for v in init]
            with gr.Column(scale=2, min_width=400, elem_classes=["side-panel"]):
                mem_plot = gr.Plot(init[0], show_label=False, elem_id="calc-mem")
                verdict = gr.HTML(init[1], elem_id="calc-verdict")
                params = gr.HTML(init[6], elem_id="calc-params")
                answers = gr.HTML(init[4], elem_id="calc-answers")
        with gr.Row(equal_height=False):
            fit_plot = gr.Plot(init[2], show_label=False, scale=3, elem_id="calc-fit-plot")
            with gr.Column(scale=2):
                fit_table = gr.Dataframe(init[3], headers=["device", "memory", "needed", "fits", "use"],
                                         interactive=False, show_label=False, elem_id="calc-fit-table")
                switch_table = gr.Dataframe(init[5], headers=["switch that saves the most", "saves"],
                                            interactive=False, show_label=False, elem_id="calc-switches")

    def run(gpu_name, *values):
        return calculate(form, gpu_name, *values)

    outputs = [mem_plot, verdict, fit_plot, fit_table, answers, switch_table, params]
    go.click(run, [gpu, *form.inputs], outputs)
    gr.on([gpu.change, *[c.change for c in form.inputs]], run, [gpu, *form.inputs], outputs,
          trigger_mode="always_last", show_progress="hidden")
    return {"form": form, "button": go}
