"""The page's logic without a browser: form generation from dataclass docs, event handlers called directly
with a temporary workspace, and the command-line safety rules of app.py."""
from __future__ import annotations

import json
import os
import warnings

import gradio as gr
import pytest

import app
from components import state
from components.forms import MethodForm, SectionForm, safe_list_methods, to_display, to_value
from studio.config import DataConfig, ModelConfig, RunConfig, TrainConfig, field_docs
from studio.methods import method_config

warnings.filterwarnings("ignore", message=".*Warning.*outside.*")


# --------------------------------------------------------------------------------------------- app.py
def test_defaults_listen_locally():
    args = app.parse_args([])
    assert (args.port, args.workspace, args.listen, args.share) == (7860, "workspace", False, False)


@pytest.mark.parametrize("flag", ["--listen", "--share"])
def test_public_flags_need_auth(flag, monkeypatch, capsys):
    monkeypatch.delenv("STUDIO_AUTH", raising=False)
    with pytest.raises(SystemExit):
        app.parse_args([flag])
    assert "--auth" in capsys.readouterr().err
    assert app.parse_args([flag, "--auth", "me:secret"]).auth == "me:secret"
    monkeypatch.setenv("STUDIO_AUTH", "me:secret")
    assert app.parse_args([flag]).auth == "me:secret"


def test_auth_must_be_user_colon_password(monkeypatch):
    monkeypatch.delenv("STUDIO_AUTH", raising=False)
    for bad in ("nopassword", ":pw", "user:"):
        with pytest.raises(SystemExit):
            app.parse_args(["--listen", "--auth", bad])


# --------------------------------------------------------------------------------------------- forms
@pytest.mark.parametrize("cls", [ModelConfig, DataConfig, TrainConfig])
def test_section_defaults_round_trip(cls):
    docs = field_docs(cls)
    shown = [to_display(d, d["default"]) for d in docs]
    back = {d["name"]: to_value(d, v) for d, v in zip(docs, shown)}
    assert cls(**back) == cls()


def test_values_parse_by_type():
    docs = {d["name"]: d for d in field_docs(DataConfig)}
    assert to_value(docs["template_vars"], "name: Nova, maker: Us") == {"name": "Nova", "maker": "Us"}
    assert to_value(docs["template_vars"], "") == {}
    lora = next(m for m in safe_list_methods() if m["name"] == "lora")
    target = next(d for d in lora["fields"] if d["name"] == "target_modules")
    assert to_value(target, "q_proj, v_proj") == ["q_proj", "v_proj"]
    assert to_value(target, "q_proj") == ["q_proj"]
    assert to_value(target, "all-linear") == "all-linear"
    assert to_value(target, r".*\.(q|v)_proj") == r".*\.(q|v)_proj"
    init = next(d for d in lora["fields"] if d["name"] == "init_lora_weights")
    assert to_value(init, "True") is True and to_value(init, "pissa") == "pissa"


def test_every_method_form_round_trips_its_defaults():
    """The generated form shows each method's defaults and gives back exactly its config (no per-method code)."""
    methods = safe_list_methods()
    assert {m["category"] for m in methods} >= {"reparameterised"}
    with gr.Blocks():
        form = MethodForm(methods).render()
    for m in methods:
        updates = form.on_method(m["name"])[1:]
        shown = {k: u.get("value") for k, u in zip(form.keys, updates) if u.get("visible")}
        assert set(shown) == set(form.fields_of[m["name"]].values()), m["name"]
        raw = [shown.get(k) for k in form.keys]
        assert method_config(form.values(m["name"], raw)) == method_config({"name": m["name"]}), m["name"]


def test_category_lists_its_methods():
    form = MethodForm(safe_list_methods())
    for label, cat in form.categories():
        names = [n for _, n in form.choices(cat)]
        assert names and all(form.methods[n]["category"] == cat for n in names)
        assert label.endswith(f"({len(names)})")


# --------------------------------------------------------------------------------------------- handlers
@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return state.init(tmp_path_factory.mktemp("workspace"))


@pytest.fixture(scope="module")
def run_form(ws):
    from components.train import build_run_form
    with gr.Blocks():
        form = build_run_form()
        for part in (form.model, form.data, form.method, form.train):
            part.render()
    return form


def values(form, **changes):
    """The form's initial values with some replaced: values(form, model__name="tiny-llama", method__r=4)."""
    sections = {"model": form.model, "data": form.data, "train": form.train}
    out = [c.value for c in form.inputs]
    for key, value in changes.items():
        section, name = key.split("__")
        if section == "method":
            comp = form.method.comps[form.method.fields_of[form.method.default][name]] if name != "name" \
                else form.method.name
        else:
            comp = sections[section].comps[name]
        out[form.inputs.index(comp)] = value
    return out


TINY = dict(model__name="tiny-llama", model__device="cpu", data__max_length=48, data__limit=24,
            data__eval_fraction=0.2, train__max_steps=4, train__batch_size=4, train__save_every=2,
            train__eval_every=2)


def test_default_form_is_the_default_config(run_form):
    cfg = run_form.to_config(values(run_form))
    default = RunConfig()
    assert (cfg.model, cfg.data, cfg.train, cfg.method) == (default.model, default.data, default.train, default.method)


def test_estimate_follows_rank(run_form):
    from components.train import estimate_view
    small = estimate_view(run_form, *values(run_form, model__name="tiny-llama", method__r=4))
    big = estimate_view(run_form, *values(run_form, model__name="tiny-llama", method__r=32))
    assert "3.58K</span> trainable" in small[2] and "28.67K</span> trainable" in big[2]
    assert small[0].to_json() != big[0].to_json() and small[4].to_json() != big[4].to_json()
    assert small[3][0][0] in ("q_proj", "o_proj")


def test_cpu_bf16_tip_only_where_it_helps(run_form, monkeypatch):
    """Where this CPU's bf16 products measured faster than fp32 ones (studio.models.cpu_bf16_speedup)."""
    from components import estimates
    from components.train import estimate_view
    from studio import models
    monkeypatch.setattr(estimates, "detected_device", lambda: {"device": "cpu", "label": "CPU RAM",
                                                               "capacity": 64 << 30, "gpu": "CPU"})
    monkeypatch.setattr(models, "cpu_bf16_speedup", lambda: 1.9)
    assert "1.9x as fast as fp32 ones (measured): <b>dtype bfloat16</b> trains" in \
        estimate_view(run_form, *values(run_form))[1]
    assert "bfloat16</b> trains" not in estimate_view(run_form, *values(run_form, model__dtype="bfloat16"))[1]
    monkeypatch.setattr(models, "cpu_bf16_speedup", lambda: 0.6)  # bf16 instructions, slower products
    assert "bfloat16</b> trains" not in estimate_view(run_form, *values(run_form))[1]


def test_bad_value_is_inline_not_a_traceback(run_form):
    from components.train import estimate_view
    out = estimate_view(run_form, *values(run_form, data__template_vars="{{{"))
    assert "template_vars" in out[1] and "verdict" in out[1]
    out = estimate_view(run_form, *values(run_form, model__name="no/such-model-here"))
    assert "⚠" in out[1] or "✗" in out[1] or "verdict" in out[1]


def test_data_preview_and_row_errors(run_form, ws, tmp_path):
    from components.train import data_preview, save_upload
    summary, examples = data_preview(run_form, *values(run_form, model__name="tiny-llama"))
    assert "300</b> examples" in summary and "class='tr'" in examples
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "hi", "output": "yo"}) + "\n" + "{not json\n")
    update = save_upload(str(bad))
    copied = update["value"]
    assert copied.startswith(str(ws.uploads)) and os.path.isfile(copied)
    summary, _ = data_preview(run_form, *values(run_form, model__name="tiny-llama", data__path=copied))
    assert "✗" in summary and "2" in summary  # the broken line is named


def test_workspace_refuses_paths_outside(ws):
    from studio.errors import StudioError
    assert ws.inside("a/b", ws.exports) == ws.exports / "a" / "b"
    for bad in ("../../etc", "/tmp/elsewhere", "../runs/../.."):
        with pytest.raises(StudioError):
            ws.inside(bad, ws.exports)


@pytest.fixture(scope="module")
def trained(run_form, ws):
    from components.train import start_run
    msg = start_run(run_form, "unit-run", *values(run_form, **TINY))
    assert "Started" in msg, msg
    busy = start_run(run_form, "second", *values(run_form, **TINY))  # one job at a time: a clear message
    assert state.runner.wait(120)
    assert "still training" in busy or "Started" not in busy
    run = ws.run("unit-run")
    assert run.status()["state"] == "done", run.status()
    return run


def test_live_view_reads_the_run_directory(trained):
    from components.train import live_view
    out = live_view(None)
    assert "unit-run" in out[1] and "done" in out[1] and "step 4 / 4" in out[1]
    assert out[2] is not None and "Loss" in out[3]
    assert live_view(out[0]) == [gr.skip()] * 7 or all(isinstance(x, dict) for x in live_view(out[0]))


def test_runs_tab(trained, ws):
    from components import runs
    rows = runs.runs_rows()
    assert rows[0][0] == "unit-run" and rows[0][1] == "done"
    detail, fig, config = runs.open_run("unit-run")
    assert "step-2" in detail and "tiny-llama" in config
    fig, table = runs.compare(["unit-run"])
    assert table[0][0] == "unit-run" and table[0][1] == "lora"
    assert "no checkpoint" not in runs.resume("nope")  # unknown run: a message, not an exception
    assert "does not exist" in runs.resume("nope")


def test_chat_tab_says_what_chatting_needs_in_memory(trained, ws):
    from components.chat import memory_note
    note = memory_note("unit-run")
    assert "chatting needs about" in note and "KV cache" in note and "CPU" in note
    assert "adapter +" in note and "adds a copy of the adapted weights" in note  # LoRA merges where it fits
    assert "Pick a run" in memory_note(None)


def test_chat_side_by_side_and_blind_votes(trained, ws):
    from components.chat import respond, vote
    with gr.Blocks():
        gen = SectionForm(__import__("studio.chat", fromlist=["GenerationSettings"]).GenerationSettings,
                          "generation").render()
    raw = [c.value for c in gen.inputs]
    raw[[d["name"] for d in gen.docs].index("max_new_tokens")] = 8
    *_, last = respond(gen, "Who are you?", "unit-run", "final", "Side by side", [], [], {}, *raw)
    left, right = last[0], last[1]
    assert [m["role"] for m in left] == ["user", "assistant"] and right[-1]["content"]
    *_, last = respond(gen, "Hello", "unit-run", "final", "Blind A/B", [], [], {}, *raw)
    left, right, blind = last[0], last[1], last[4]
    assert blind["tuned_side"] in "AB"
    msg, blind2, *_ = vote("A", "unit-run", "final", left, right, blind, *raw, form=gen)
    assert "Saved" in msg and blind2["voted"] == "A"
    row = json.loads((ws.preferences / "unit-run.jsonl").read_text().splitlines()[-1])
    assert row["chosen"] == left[-1]["content"] and row["rejected"] == right[-1]["content"]
    assert row["prompt"][-1]["content"] == "Hello"


def test_switching_the_chat_model_frees_the_previous_one_at_once(trained, ws):
    """Loading another checkpoint's chat model frees the previous one at once, without waiting for a garbage
    collection (a trained model sat in reference cycles until one ran: runner.release_memory); else a GPU would
    hold both while the next one loads."""
    import gc

    import torch

    def alive() -> int:
        return sum(1 for o in gc.get_objects()
                   if isinstance(o, torch.nn.Module) and type(o).__name__.endswith("ForCausalLM"))
    state.forget_chat_model()
    gc.collect()
    before = alive()
    gc.disable()  # only the page's own release may collect
    try:
        state.chat_model(trained)  # the final adapter
        state.chat_model(trained, "step-2")  # another checkpoint: the first model goes
        assert alive() == before + 1
        state.forget_chat_model(trained)
        assert alive() == before
    finally:
        gc.enable()


def test_export_adapter_merge_and_refusals(trained, ws):
    from components.export import do_export
    text, zip_path = do_export("unit-run", "final", "", False)
    assert "saved to" in text and zip_path.endswith("unit-run-adapter.zip") and os.path.isfile(zip_path)
    text, _ = do_export("unit-run", "step-2", "merged-here", True)
    assert "saved to" in text and (ws.exports / "merged-here" / "config.json").is_file()
    text, _ = do_export("unit-run", "final", "../../outside", False)
    assert "outside the workspace" in text
    text, _ = do_export("unit-run", "final", "", False)  # the folder exists now: refuse, never overwrite
    assert "not empty" in text


def test_calculator_answers(ws):
    from components.calculator import build_calc_form, calculate
    with gr.Blocks():
        form = build_calc_form()
        for part in (form.model, form.data, form.method, form.train):
            part.render()
    raw = [c.value for c in form.inputs]
    raw[form.inputs.index(form.model.comps["name"])] = "qwen2.5-7b"
    fig, verdict, fit_fig, rows, answers, switches, params = calculate(form, "T4", *raw)
    assert "T4" in verdict and any(r[0] == "H100 80GB" for r in rows)
    assert "Largest batch size" in answers and "trainable" in params and switches
    # 7B's 16-bit weights alone (15.2 GB) are more than a T4 holds: no checkpointing fits
    assert "Fastest checkpointing that fits</div><div class='t-value'>none" in answers
    assert "Chat (inference)" in answers and "for a merged copy" in answers
    assert {r[3] for r in rows} <= {"✓ fits", "⚠ tight", "✗ no"}


def test_a_run_estimated_within_the_allocators_room_fits_tightly():
    from components.estimates import verdict
    gib = 2**30
    assert "Fits tightly" in verdict(int(23.5 * gib), 24 * gib, "RTX 4090") and "verdict warn" in verdict(
        int(23.5 * gib), 24 * gib, "RTX 4090")
    assert "✓ <b>Fits</b>" in verdict(20 * gib, 24 * gib, "RTX 4090")
    assert "✓ <b>Fits</b>" in verdict(int(23.5 * gib), 24 * gib, "CPU RAM", device="cpu")
    assert "Does not fit" in verdict(25 * gib, 24 * gib, "RTX 4090")


def test_stop_then_resume(run_form, ws, trained):
    from components import runs
    from components.train import start_run, stop_run
    long = {**TINY, "train__max_steps": 400, "train__save_every": 0}
    assert "Started" in start_run(run_form, "resumable", *values(run_form, **long))
    run = ws.run("resumable")
    import time
    deadline = time.time() + 60
    while not run.metrics() and time.time() < deadline:
        time.sleep(0.1)
    assert "Stopping" in stop_run()
    assert state.runner.wait(60) and run.status()["state"] == "stopped" and run.checkpoints()
    step = int(run.checkpoints()[-1].name.split("-")[1])
    assert "Resumed" in runs.resume("resumable")
    deadline = time.time() + 60
    while run.metrics()[-1]["step"] <= step and time.time() < deadline:  # it continues from the checkpoint
        time.sleep(0.1)
    assert state.runner.stop() and state.runner.wait(60)
    assert run.status()["state"] == "stopped" and int(run.checkpoints()[-1].name.split("-")[1]) > step
    assert stop_run() == gr.skip()  # nothing running: a warning, no exception


def test_load_a_run_back_into_the_wizard(trained, ws, run_form):
    """Runs tab -> "Load into Train": every field shows the run's config; the form gives the same config back."""
    from components.runs import load_into_wizard
    outputs = run_form.load_outputs
    updates = load_into_wizard("unit-run", run_form)
    assert len(updates) == len(outputs) + 1 and "Loaded the settings of" in updates[-1]
    shown = {id(c): u["value"] for c, u in zip(outputs, updates) if isinstance(u, dict) and "value" in u}
    raw = [shown.get(id(c), c.value) for c in run_form.inputs]
    assert run_form.to_config(raw).to_dict() == {**trained.config().to_dict(), "name": ""}
    assert load_into_wizard("no-such-run", run_form)[-1] == gr.skip()



def test_delete_run(trained, ws):
    from components import runs
    row, msg = runs.confirm_delete("unit-run")
    assert "Deleted" in msg and not trained.path.exists()


def test_method_facts_show_adalora_ranks_from_the_run_directory():
    from components.train import method_facts_html
    rows = [{"step": 1}, {"step": 10, "method": {"rank_per_layer": {"model.layers.0.self_attn.q_proj": 3}}}]
    out = method_facts_html(rows)
    assert "rank per layer" in out and "q_proj: 3" in out
    assert method_facts_html([{"step": 1}]) == ""


def test_memory_panel_lists_what_the_estimate_adds():
    """The estimate's own notes reach the page (here: a small model on a GPU replays CUDA graphs)."""
    from components.estimates import memory_panel
    cfg = RunConfig.from_dict({"model": {"name": "qwen2.5-0.5b"}, "data": {"max_length": 300}})
    _, html = memory_panel(cfg, gpu="RTX 4090")
    assert "CUDA graphs: batches padded to 300 tokens" in html
    cfg.train.cuda_graphs = "off"
    assert "CUDA graphs" not in memory_panel(cfg, gpu="RTX 4090")[1]
    # checkpointing fitted to a budget: how many layers it recomputes
    cfg = RunConfig.from_dict({"model": {"name": "qwen2.5-7b", "quantization": "nf4"}, "data": {"max_length": 2048},
                               "train": {"batch_size": 4, "gradient_checkpointing": True, "checkpoint_budget_gb": 20}})
    html = memory_panel(cfg, gpu="RTX 4090")[1]
    assert "of 28 layers recomputed (fitted to 20.00 GB)" in html and "Tip: recomputing only" not in html
    cfg.train.checkpoint_budget_gb = 0  # every layer recomputed, where 10 do on a 24 GB card (the allocator's room)
    assert "Tip: recomputing only 10 of 28 layers still fits RTX 4090" in memory_panel(cfg, gpu="RTX 4090")[1]
