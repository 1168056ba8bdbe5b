"""The command line contract: train prints the run dir last, chat --json, --base, export, methods, errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "model.name=tiny-llama", "--set", "model.device=cpu", "--set", "data.limit=64",
        "--set", "data.max_length=64", "--set", "train.max_steps=4", "--set", "train.batch_size=2"]


def cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "studio", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-2000:])
    return proc


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    proc = cli("train", "presets/runs/quickstart.yaml", *TINY, "--set", "method.target_modules=[q_proj,v_proj]",
               "--runs-dir", str(runs), "--run-name", "cli", "--quiet")
    return Path(proc.stdout.strip().splitlines()[-1])


def test_train_prints_the_run_directory_last(trained_run):
    assert trained_run.name == "cli" and (trained_run / "adapter" / "adapter_model.safetensors").is_file()
    cfg = (trained_run / "config.yaml").read_text()
    assert "q_proj" in cfg and "tiny-llama" in cfg


def test_chat_json_tuned_and_base(trained_run):
    args = ["chat", "--run", str(trained_run), "--prompt", "Who are you?", "--greedy", "--max-new-tokens", "8",
            "--json"]
    tuned = json.loads(cli(*args).stdout)
    base = json.loads(cli(*args, "--base").stdout)
    assert tuned["adapter"] is True and base["adapter"] is False
    assert tuned["merged"] is True and base["merged"] is False  # one answer from the base: nothing to merge for
    assert isinstance(tuned["reply"], str) and isinstance(base["reply"], str)
    raw = json.loads(cli(*args, "--raw").stdout)
    assert isinstance(raw["reply"], str)
    half = json.loads(cli(*args, "--dtype", "bfloat16").stdout)  # weights in bf16 while chatting
    assert isinstance(half["reply"], str) and half["merged"] is True


def test_export_merged_loads_in_plain_transformers(trained_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from studio.chat import ChatModel
    out = tmp_path / "merged"
    cli("export", "--run", str(trained_run), "--out", str(out), "--merge")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    tuned = ChatModel.from_run(trained_run, device="cpu")
    ids = torch.tensor([[2, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, tuned.model(input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)
    adapter_out = tmp_path / "adapter"
    cli("export", "--run", str(trained_run), "--out", str(adapter_out))
    assert (adapter_out / "adapter_config.json").is_file() and adapter_out.with_suffix(".zip").is_file()


def test_every_registered_method_has_a_preset():
    from studio.methods import methods_without_preset
    assert methods_without_preset() == []


def test_methods_json_lists_every_method_with_fields():
    rows = json.loads(cli("methods", "--json").stdout)
    names = {r["name"] for r in rows}
    assert {"lora", "dora", "rslora", "pissa", "loraplus", "qlora", "full"} <= names
    lora = next(r for r in rows if r["name"] == "lora")
    assert lora["mergeable"] and {f["name"] for f in lora["fields"]} >= {"r", "lora_alpha", "target_modules"}


def test_errors_are_one_clear_line_and_nonzero(tmp_path):
    proc = cli("train", "presets/runs/quickstart.yaml", "--set", "train.lr=fast", "--runs-dir", str(tmp_path),
               check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: `train.lr` must be float, got 'fast'."]
    proc = cli("train", "nope.yaml", check=False)
    assert proc.returncode == 1 and "does not exist" in proc.stderr
    proc = cli("chat", "--model", "no-such-model", "--prompt", "hi", check=False)
    assert proc.returncode == 1 and "not a preset" in proc.stderr and "Traceback" not in proc.stderr


def test_merged_export_refuses_tensors_the_architecture_would_drop(tmp_path):
    from studio.checkpoint import export_merged
    from studio.config import ModelConfig
    from studio.errors import ConfigError
    from studio.methods import apply_method, method_config
    from studio.models import load_model
    model, tok = load_model(ModelConfig(name="tiny-llama", device="cpu"))  # Llama: no biases
    apply_method(model, method_config({"name": "ssf"}))  # a merged shift would add biases
    with pytest.raises(ConfigError, match="architecture does not declare"):
        export_merged(model, tok, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_method_reference_doc_is_generated_from_the_registry():
    from studio.commands.methods import markdown
    from studio.methods import list_methods
    doc = (ROOT / "docs" / "methods.md").read_text()
    assert doc.strip() == markdown(list_methods()).strip(), \
        "docs/methods.md is stale: python -m studio methods --markdown > docs/methods.md"
