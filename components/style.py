"""Look of the page: a calm theme (system fonts, works offline) and a little CSS for panels and cards."""
from __future__ import annotations

import gradio as gr

FONTS = ["Inter", "ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "sans-serif"]
MONO = ["JetBrains Mono", "ui-monospace", "SFMono-Regular", "Menlo", "monospace"]


def theme() -> gr.themes.Base:
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="sky", neutral_hue="slate", font=FONTS,
                          font_mono=MONO, radius_size="md", spacing_size="sm", text_size="sm")


HEADER = """<div class='studio-header'><div class='logo'>◆</div><div><h1>PEFT Studio</h1>
<p>Pick a model, a dataset and a method · see memory and trainable parameters before you start ·
train · chat with the result next to the base.</p></div></div>"""

CSS = """
.gradio-container { max-width: 1480px !important; margin: 0 auto !important; }
.studio-header { display:flex; gap:14px; align-items:center; padding:6px 4px 2px; }
.studio-header .logo { font-size:28px; color:var(--color-accent); }
.studio-header h1 { margin:0; font-size:22px; font-weight:700; letter-spacing:-0.01em; }
.studio-header p { margin:2px 0 0; color:var(--body-text-color-subdued); font-size:13px; }
h3.step { display:flex; align-items:center; gap:8px; margin:14px 0 4px; font-size:15px; font-weight:650; }
h3.step span { display:inline-flex; width:22px; height:22px; border-radius:50%; align-items:center;
  justify-content:center; background:var(--color-accent); color:white; font-size:12px; }
h3.step.live span { background:#16a34a; }
h3.panel-title { margin:4px 0; font-size:15px; font-weight:650; }
h3.panel-title small, .muted { color:var(--body-text-color-subdued); font-weight:400; font-size:12.5px; }
.side-panel { position:sticky; top:8px; align-self:flex-start; background:var(--block-background-fill);
  border:1px solid var(--border-color-primary); border-radius:12px; padding:10px 12px !important; }
.verdict { padding:8px 12px; border-radius:8px; margin:4px 0; font-size:13.5px; line-height:1.45; }
.verdict.ok { background:#ecfdf5; border:1px solid #a7f3d0; color:#065f46; }
.verdict.bad { background:#fef2f2; border:1px solid #fecaca; color:#991b1b; }
.verdict.warn { background:#fffbeb; border:1px solid #fde68a; color:#92400e; }
.params-head { font-size:13.5px; margin:6px 0 2px; }
.params-head .big { font-size:20px; font-weight:700; color:var(--color-accent); }
.tiles { display:grid; grid-template-columns:repeat(auto-fill, minmax(140px, 1fr)); gap:8px; margin:4px 0; }
.method-facts { font-size:12px; line-height:1.5; padding:8px 10px; margin-top:6px; border:1px solid var(--border-color-primary); border-radius:8px; max-height:160px; overflow:auto; }
.tile { border:1px solid var(--border-color-primary); border-radius:10px; padding:8px 10px;
  background:var(--background-fill-primary); }
.t-label { font-size:11.5px; text-transform:uppercase; letter-spacing:.04em; color:var(--body-text-color-subdued); }
.t-value { font-size:18px; font-weight:700; margin-top:2px; font-variant-numeric:tabular-nums; }
.t-sub { font-size:11.5px; color:var(--body-text-color-subdued); }
.run-card { border:1px solid var(--border-color-primary); border-radius:12px; padding:10px 14px;
  background:var(--background-fill-primary); }
.run-card.empty { color:var(--body-text-color-subdued); }
.run-head { display:flex; gap:10px; align-items:center; flex-wrap:wrap; font-size:14px; }
.badge { font-size:11.5px; padding:2px 8px; border-radius:999px; background:#e5e7eb; color:#374151; }
.badge.running, .badge.queued { background:#dbeafe; color:#1d4ed8; }
.badge.stopping, .badge.stopped { background:#fef3c7; color:#92400e; }
.badge.done { background:#dcfce7; color:#166534; }
.badge.failed { background:#fee2e2; color:#991b1b; }
.bar { height:10px; background:#e5e7eb; border-radius:999px; overflow:hidden; margin:8px 0 4px; }
.bar > div { height:100%; background:linear-gradient(90deg, #6366f1, #22c55e); border-radius:999px;
  transition:width .6s ease; }
.run-meta { font-size:12.5px; color:var(--body-text-color-subdued); font-variant-numeric:tabular-nums; }
.run-error { margin-top:6px; color:#991b1b; font-size:13px; }
.facts { display:flex; flex-wrap:wrap; gap:6px 14px; font-size:12.5px; margin:6px 2px;
  color:var(--body-text-color-subdued); }
.data-summary { font-size:13px; margin:4px 0; }
.legend { font-size:12px; margin:4px 0 6px; display:flex; gap:10px; }
.example { border:1px solid var(--border-color-primary); border-radius:8px; margin:6px 0; overflow:hidden; }
.ex-head { font-size:11.5px; padding:3px 8px; background:var(--background-fill-secondary);
  color:var(--body-text-color-subdued); }
.example pre { margin:0; padding:8px; white-space:pre-wrap; word-break:break-word; font-size:12.5px;
  max-height:180px; overflow:auto; background:transparent; }
span.tr { background:#bbf7d0; color:#14532d; border-radius:3px; padding:0 1px; }
span.ctx { color:#6b7280; }
.legend span { padding:1px 6px; border-radius:4px; }
.legend span.ctx { background:#f3f4f6; }
ul.files { margin:4px 0 4px 18px; font-size:12.5px; }
.confirm { background:#fef2f2; border:1px solid #fecaca; border-radius:10px; padding:6px 10px; }
.method-about { font-size:13px; }
"""
