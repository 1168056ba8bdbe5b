"""Export tab: the adapter (peft format) as a folder + zip download, or the adapter merged into the base
as a full model folder that plain transformers loads. Outputs stay in workspace/exports."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr

from studio.errors import StudioError

from . import state
from .charts import fmt_bytes
from .chat import FINAL, checkpoint_choices, checkpoints_of, chat_runs, refresh_runs


def default_folder(run_name: str | None, merge: bool) -> str:
    return f"{run_name}-{'merged' if merge else 'adapter'}" if run_name else ""


def listing(folder: Path) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    rows = "".join(f"<li><code>{html.escape(str(p.relative_to(folder)))}</code> {fmt_bytes(p.stat().st_size)}</li>"
                   for p in files[:30])
    return f"<ul class='files'>{rows}</ul>"


def do_export(run_name: str | None, ckpt: str | None, folder: str, merge: bool) -> list[Any]:
    """[result html, zip file for download (adapter export) or None]."""
    from studio.export import export_run
    try:
        run = state.ws().run(run_name or "")
        name = (folder or "").strip() or default_folder(run.name, merge)
        out = state.ws().inside(name, state.ws().exports)
        checkpoint = None if ckpt in (None, "", FINAL) else run.path / "checkpoints" / ckpt
        if checkpoint is None and run.adapter() is None:
            last = run.checkpoints()
            if not last:
                raise StudioError(f"Run {run.name} has no adapter or checkpoint yet; train it first.")
            checkpoint = last[-1]
        result = export_run(run.path, out, merge=merge, checkpoint=checkpoint)
    except StudioError as e:
        gr.Warning(str(e))
        return [f"<div class='verdict bad'>✗ {html.escape(str(e))}</div>", None]
    zip_path = out.with_suffix(".zip")
    what = "Merged full model" if merge else "Adapter (peft format)"
    text = (f"<div class='verdict ok'>✓ {what} saved to <code>{html.escape(str(result))}</code></div>"
            + listing(Path(result)))
    if not merge and zip_path.is_file():
        text += f"<div class='muted'>Zip: <code>{html.escape(str(zip_path))}</code> ({fmt_bytes(zip_path.stat().st_size)})</div>"
        return [text, str(zip_path)]
    load = ("from transformers import AutoModelForCausalLM<br>"
            f"model = AutoModelForCausalLM.from_pretrained('{html.escape(str(result))}')")
    return [text + f"<div class='muted'>Load it with plain transformers:<br><code>{load}</code></div>", None]


def create_export() -> dict[str, Any]:
    with gr.Tab("Export", id="export", elem_id="tab-export") as tab:
        gr.HTML("<p class='muted'>Files are written under <code>"
                f"{html.escape(str(state.ws().exports))}</code>; nothing already there is overwritten.</p>")
        with gr.Row(equal_height=True):
            runs = chat_runs()
            run = gr.Dropdown(runs, value=runs[0] if runs else None, label="Run", scale=3, elem_id="export-run")
            first = checkpoints_of(runs[0] if runs else None)
            ckpt = gr.Dropdown(first, value=first[0][1] if first else None, label="Checkpoint", scale=2,
                               elem_id="export-ckpt")
            folder = gr.Textbox(label="Output folder (inside workspace/exports)", scale=3, elem_id="export-folder",
                                placeholder="default: <run>-adapter or <run>-merged")
        with gr.Row(equal_height=True):
            adapter_btn = gr.Button("Export adapter + zip", variant="primary", elem_id="export-adapter")
            merge_btn = gr.Button("Merge into base → full model", elem_id="export-merge")
        result = gr.HTML(elem_id="export-result")
        download = gr.File(label="Download the adapter zip", interactive=False, elem_id="export-zip")

    tab.select(refresh_runs, [run, ckpt], [run, ckpt])
    run.change(checkpoint_choices, run, ckpt)
    adapter_btn.click(lambda r, c, f: do_export(r, c, f, False), [run, ckpt, folder], [result, download])
    merge_btn.click(lambda r, c, f: do_export(r, c, f, True), [run, ckpt, folder], [result, download])
    return {"tab": tab}
