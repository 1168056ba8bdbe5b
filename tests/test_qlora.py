"""QLoRA: a 4-bit NF4 base (bitsandbytes, double quantization) with LoRA on top, on the CPU."""
from __future__ import annotations

import pytest
import torch

from training import fit
from studio.checkpoint import load_adapter, save_adapter
from studio.config import ModelConfig, load_config
from studio.methods import applied, apply_method, method_config
from studio.models import load_model
from studio.rundir import RunDir
from studio.runner import execute


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model, tok = load_model(ModelConfig(name="tiny-llama", device="cpu"))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_nf4_base_with_lora_trains_and_saves(tiny_folder, tmp_path):
    import bitsandbytes as bnb
    model, tok = load_model(ModelConfig(name=str(tiny_folder), quantization="nf4", device="cpu"))
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_state.nested  # double quantization
    assert model.model.embed_tokens.weight.dtype == torch.float32  # embeddings stay 16/32-bit
    apply_method(model, method_config({"name": "qlora", "r": 4}))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    ids = torch.randint(5, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    losses, _ = fit(model, batch, 6, 1e-2)
    assert losses[-1] < losses[0]
    save_adapter(model, tmp_path / "adapter")
    # The adapter is plain LoRA: it loads onto the 16/32-bit base too, close to the 4-bit outputs.
    full, _ = load_model(ModelConfig(name=str(tiny_folder), device="cpu"))
    load_adapter(full, tmp_path / "adapter")
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = full(input_ids=ids).logits
    assert (a - b).abs().mean() < 0.05
    with pytest.raises(Exception, match="4-/8-bit base"):
        applied(model).method.merge(model)


def test_qlora_run_end_to_end_with_8bit_optimizer_or_clear_error(tiny_folder, tmp_path):
    cfg = load_config(None, [f"model.name={tiny_folder}", "model.quantization=nf4", "model.device=cpu",
                             "method.name=qlora", "data.limit=32", "data.max_length=48", "train.max_steps=3",
                             "train.batch_size=2"])
    run = RunDir.create(tmp_path / "runs", cfg)
    execute(run, cfg)
    assert run.status()["state"] == "done" and run.adapter() is not None
