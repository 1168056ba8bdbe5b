"""peft as an oracle (test-only): our LoRA-family adapters load in peft with equal logits, and back."""
from __future__ import annotations

import pytest
import torch

from studio.checkpoint import load_adapter, save_adapter
from studio.config import ModelConfig
from studio.methods import apply_method, method_config
from studio.models import load_model


CASES = {
    "lora": {"r": 4},
    "lora-all-linear-bias": {"name": "lora", "r": 4, "target_modules": "all-linear", "bias": "all"},
    "dora": {"r": 4},
    "rslora": {"r": 8},
    "pissa": {"r": 4},
    "olora": {"r": 4},
    "lora-modules-to-save": {"name": "lora", "r": 4, "modules_to_save": ["lm_head"]},
}


def fresh(arch):
    model, tok = load_model(ModelConfig(name=arch, device="cpu"))
    return model.eval(), tok


def ids(tok):
    enc = tok(["Add 12 and 30.", "Who are you, really?"], return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def logits(model, tok):
    x, m = ids(tok)
    with torch.no_grad():
        return model(input_ids=x, attention_mask=m).logits


def trained(arch, name, fields):
    model, tok = fresh(arch)
    apply_method(model, method_config({"name": fields.get("name", name), **{k: v for k, v in fields.items()
                                                                             if k != "name"}}))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval(), tok


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2", "tiny-gemma3"])
@pytest.mark.parametrize("case", list(CASES))
def test_our_adapter_loads_in_peft(case, arch, tmp_path):
    from peft import PeftModel
    model, tok = trained(arch, case, CASES[case])
    ours = logits(model, tok)
    save_adapter(model, tmp_path / "adapter")
    base, _ = fresh(arch)
    theirs = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(theirs, tok), ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("peft_kwargs", [
    {"r": 4, "target_modules": ["q_proj", "v_proj"]},
    {"r": 4, "target_modules": "all-linear", "use_dora": True},
    {"r": 8, "target_modules": ["k_proj", "o_proj", "down_proj"], "use_rslora": True, "lora_alpha": 4},
], ids=["lora", "dora", "rslora"])
def test_peft_adapter_loads_in_ours(peft_kwargs, arch, tmp_path):
    from peft import LoraConfig, get_peft_model
    base, tok = fresh(arch)
    theirs = get_peft_model(base, LoraConfig(**peft_kwargs, init_lora_weights=False)).eval()
    want = logits(theirs, tok)
    theirs.save_pretrained(tmp_path / "peft")
    model, _ = fresh(arch)
    load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(logits(model.eval(), tok), want, atol=1e-5, rtol=1e-5)
