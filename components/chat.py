"""Chat tab: talk to a run's adapter (streaming, multi-turn, chat template); side by side with the base
from ONE loaded model (adapter switched off/on, same seed); blind A/B with votes saved as preference pairs."""
from __future__ import annotations

import html
import random
from dataclasses import asdict
from typing import Any, Iterator

import gradio as gr

from studio.chat import GenerationSettings
from studio.config import build_dataclass
from studio.errors import StudioError
from studio.rundir import list_runs

from . import state
from .forms import SectionForm

MODES = ["Tuned only", "Side by side", "Blind A/B"]
FINAL = "final"


def chat_runs() -> list[str]:
    """Runs that have something to talk to: a final adapter or a checkpoint."""
    return [r.name for r in list_runs(state.ws().runs) if r.adapter() or r.checkpoints()]


def checkpoints_of(run_name: str | None) -> list[tuple[str, str]]:
    """("final adapter", "final") when the run finished, then its checkpoints, newest first."""
    if not run_name:
        return []
    try:
        run = state.ws().run(run_name)
    except StudioError:
        return []
    return ([("final adapter", FINAL)] if run.adapter() else []) + [(p.name, p.name) for p in reversed(run.checkpoints())]


def checkpoint_choices(run_name: str | None) -> Any:
    choices = checkpoints_of(run_name)
    return gr.update(choices=choices, value=choices[0][1] if choices else None)


def refresh_runs(current: str | None, current_ckpt: str | None) -> list[Any]:
    """Run and checkpoint lists read again (keeping the picks that still exist)."""
    names = chat_runs()
    run = current if current in names else (names[0] if names else None)
    choices = checkpoints_of(run)
    values = [v for _, v in choices]
    ckpt = current_ckpt if current_ckpt in values else (values[0] if values else None)
    return [gr.update(choices=names, value=run), gr.update(choices=choices, value=ckpt)]


def memory_note(run_name: str | None) -> str:
    """What chatting with this run needs in memory (weights + KV cache), from its config alone."""
    if not run_name:
        return "<div class='muted'>Pick a run; its base model and adapter load on the first message.</div>"
    from studio.memory_inference import estimate_chat
    from studio.trainer import use_cpu

    from .charts import fmt_bytes
    try:
        cfg = state.ws().run(run_name).config()
        cpu = use_cpu(cfg)
        context = cfg.data.max_length + GenerationSettings().max_new_tokens
        inf = estimate_chat(cfg, context, cfg.model.dtype, "cpu" if cpu else "cuda")
    except Exception as e:  # noqa: BLE001 - an estimate is a hint; chatting still works without it
        return f"<div class='muted'>{html.escape(run_name)}: loads on the first message ({html.escape(str(e)[:120])}).</div>"
    merged = (f" Merging the adapter for base-speed answers adds a copy of the adapted weights "
              f"({fmt_bytes(inf['merged_copy'])}), made only where it fits." if inf["merged_copy"] else "")
    return (f"<div class='muted'>{html.escape(run_name)}: loads on the first message; chatting needs about "
            f"<b>{fmt_bytes(inf['total'])}</b> ({fmt_bytes(inf['weights'])} weights + {fmt_bytes(inf['adapter'])} "
            f"adapter + {fmt_bytes(inf['kv_cache'])} KV cache for {context} tokens) on {'CPU' if cpu else 'the GPU'}, "
            f"one model for base and tuned.{merged}</div>")


def labels(mode: str, revealed: dict | None = None, **extra: Any) -> list[Any]:
    """Chatbot updates (label, visibility, + `extra` such as value=[]) for a mode: [left, right]."""
    if mode == "Tuned only":
        names = (None, "Tuned (adapter on)")
    elif mode == "Side by side":
        names = ("Base (adapter off)", "Tuned (adapter on)")
    elif revealed:
        left = "tuned" if revealed.get("tuned_side") == "A" else "base"
        names = (f"Model A = {left}", f"Model B = {'base' if left == 'tuned' else 'tuned'}")
    else:
        names = ("Model A", "Model B")
    return [gr.update(label=n, visible=True, **extra) if n else gr.update(visible=False, **extra) for n in names]


def settings_from(form: SectionForm, values: list[Any]) -> GenerationSettings:
    return build_dataclass(GenerationSettings, form.values(values), "generation")


def respond(form: SectionForm, prompt: str, run_name: str | None, ckpt: str | None, mode: str,
            left: list[dict], right: list[dict], blind: dict | None, *gen_values: Any) -> Iterator[list[Any]]:
    """Stream the answer(s) to `prompt`: yields [left chat, right chat, left state, right state, blind, box, status]."""
    prompt = (prompt or "").strip()
    left, right, blind = list(left or []), list(right or []), dict(blind or {})
    if not prompt:
        gr.Warning("Type a message first.")
        yield [gr.skip()] * 7
        return
    try:
        settings = settings_from(form, list(gen_values))
        run = state.ws().run(run_name or "")
        model = state.chat_model(run, None if ckpt in (None, "", FINAL) else ckpt, settings.precision)
    except StudioError as e:
        gr.Warning(str(e))
        yield [gr.skip()] * 6 + [f"<div class='verdict bad'>✗ {html.escape(str(e))}</div>"]
        return
    how = ("one model, tuned weights merged (base speed), base weights swapped back in" if model.merged is not None
           else "one model, adapter switched off/on")
    status = f"<div class='muted'>{html.escape(model.label)} · seed {settings.seed} · {how}</div>"
    if mode == "Blind A/B" and "tuned_side" not in blind:
        blind = {"tuned_side": random.choice("AB")}
    blind.pop("voted", None)
    # which side gets which model: (history, use_adapter)
    if mode == "Tuned only":
        sides = [(right, True)]
    elif mode == "Side by side":
        sides = [(left, False), (right, True)]
    else:
        tuned_left = blind["tuned_side"] == "A"
        sides = [(left, tuned_left), (right, not tuned_left)]
    for hist, _ in sides:
        hist.append({"role": "user", "content": prompt})
    yield [left, right, left, right, blind, "", status]
    try:
        for hist, use_adapter in sides:
            messages = [{"role": m["role"], "content": m["content"]} for m in hist]
            hist.append({"role": "assistant", "content": ""})
            for piece in model.stream(messages, settings, use_adapter=use_adapter):
                hist[-1]["content"] += piece
                yield [left, right, left, right, blind, "", status]
            if not hist[-1]["content"].strip():
                hist[-1]["content"] = "(empty reply)"
    except StudioError as e:
        gr.Warning(str(e))
        status = f"<div class='verdict bad'>✗ {html.escape(str(e))}</div>"
    if mode == "Blind A/B":
        status += "<div class='muted'>Which answer is better? Vote below; the sides are revealed after your vote.</div>"
    yield [left, right, left, right, blind, "", status]


def vote(choice: str, run_name: str | None, ckpt: str | None, left: list[dict], right: list[dict],
         blind: dict | None, *gen_values: Any, form: SectionForm | None = None) -> list[Any]:
    """Record an A/B vote as a preference pair; returns [message, blind state, left label, right label]."""
    blind = dict(blind or {})
    if "tuned_side" not in blind or not left or not right or left[-1]["role"] != "assistant":
        gr.Warning("Ask something in Blind A/B mode first, then vote.")
        return [gr.skip()] * 4
    if blind.get("voted"):
        gr.Warning("You already voted on this answer; ask the next question.")
        return [gr.skip()] * 4
    chosen, rejected = (left, right) if choice == "A" else (right, left)
    tuned_side = blind["tuned_side"]
    winner = "tuned" if choice == tuned_side else "base"
    settings = asdict(settings_from(form, list(gen_values))) if form else {}
    path = state.save_preference(run_name or "unknown", prompt=left[:-1], chosen=chosen[-1]["content"],
                                 rejected=rejected[-1]["content"], chosen_model=winner, run=run_name,
                                 checkpoint=ckpt or FINAL, settings=settings)
    blind["voted"] = choice
    msg = (f"<div class='verdict ok'>Saved: you preferred <b>{choice}</b>, which was the <b>{winner}</b> model. "
           f"Pairs so far: {sum(1 for _ in open(path, encoding='utf-8'))} in <code>{html.escape(str(path))}</code></div>")
    return [msg, blind, *labels("Blind A/B", blind)]


def create_chat() -> dict[str, Any]:
    gen = SectionForm(GenerationSettings, "generation", columns=4)
    with gr.Tab("Chat", id="chat", elem_id="tab-chat") as tab:
        with gr.Row(equal_height=True):
            runs = chat_runs()
            run = gr.Dropdown(runs, value=runs[0] if runs else None, label="Run", scale=3, elem_id="chat-run")
            first = checkpoints_of(runs[0] if runs else None)
            ckpt = gr.Dropdown(first, value=first[0][1] if first else None, label="Checkpoint", scale=2,
                               elem_id="chat-ckpt")
            mode = gr.Radio(MODES, value="Side by side", label="Mode", scale=3, elem_id="chat-mode")
            refresh_btn = gr.Button("↻", size="sm", scale=0, min_width=50)
        status = gr.HTML(memory_note(runs[0] if runs else None), elem_id="chat-status")
        with gr.Row(equal_height=True):
            chat_l = gr.Chatbot(label="Base (adapter off)", height=380, elem_id="chat-left")
            chat_r = gr.Chatbot(label="Tuned (adapter on)", height=380, elem_id="chat-right")
        with gr.Row(equal_height=True):
            box = gr.Textbox(placeholder="Ask something… (Enter to send)", show_label=False, scale=5,
                             elem_id="chat-input")
            send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
            clear = gr.Button("Clear", scale=1)
        with gr.Row(visible=False, elem_classes=["vote-row"]) as vote_row:
            vote_a = gr.Button("◀ A is better", elem_id="vote-a")
            vote_b = gr.Button("B is better ▶", elem_id="vote-b")
        vote_msg = gr.HTML(elem_id="vote-msg")
        with gr.Accordion("Generation settings", open=False):
            gen.render()
        hist_l, hist_r, blind = gr.State([]), gr.State([]), gr.State({})

    def reset(mode_value):
        return [*labels(mode_value, value=[]), [], [], {}, "", gr.update(visible=mode_value == "Blind A/B")]

    reset_outputs = [chat_l, chat_r, hist_l, hist_r, blind, vote_msg, vote_row]

    def on_respond(prompt, run_name, ckpt_name, mode_value, left, right, blind_value, *values):
        yield from respond(gen, prompt, run_name, ckpt_name, mode_value, left, right, blind_value, *values)

    send_inputs = [box, run, ckpt, mode, hist_l, hist_r, blind, *gen.inputs]
    send_outputs = [chat_l, chat_r, hist_l, hist_r, blind, box, status]
    send.click(on_respond, send_inputs, send_outputs)
    box.submit(on_respond, send_inputs, send_outputs)
    clear.click(reset, mode, reset_outputs)
    mode.change(reset, mode, reset_outputs)
    run.change(checkpoint_choices, run, ckpt).then(reset, mode, reset_outputs).then(memory_note, run, status)
    ckpt.change(reset, mode, reset_outputs)

    refresh_btn.click(refresh_runs, [run, ckpt], [run, ckpt])
    tab.select(refresh_runs, [run, ckpt], [run, ckpt])

    def on_vote(choice):
        def handler(run_name, ckpt_name, left, right, blind_value, *values):
            return vote(choice, run_name, ckpt_name, left, right, blind_value, *values, form=gen)
        return handler

    vote_inputs = [run, ckpt, hist_l, hist_r, blind, *gen.inputs]
    vote_a.click(on_vote("A"), vote_inputs, [vote_msg, blind, chat_l, chat_r])
    vote_b.click(on_vote("B"), vote_inputs, [vote_msg, blind, chat_l, chat_r])
    return {"tab": tab, "run": run, "ckpt": ckpt}
