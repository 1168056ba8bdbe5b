"""peft interop for VeRA, LoKr, LoHa (and GLoRA, whose peft format we also use): both directions.

Our saved adapter loads in peft with equal logits (fp32, atol 1e-5), and an adapter saved by peft
loads into our engine with equal logits. peft is a test-only oracle.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from studio.checkpoint import load_adapter, save_adapter
from studio.config import ModelConfig
from studio.methods import apply_method, method_config
from studio.models import load_model

import peft  # noqa: E402,F401 - the test oracle (requirements-dev.txt)

CASES = {
    "vera": (dict(r=8, target_modules=["q_proj", "v_proj"]), lambda kw: peft.VeraConfig(**kw)),
    "lokr": (dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), lambda kw: peft.LoKrConfig(**kw)),
    "lokr_small_r": (dict(r=2, alpha=4, target_modules=["up_proj", "down_proj"]), lambda kw: peft.LoKrConfig(**kw)),
    "loha": (dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]), lambda kw: peft.LoHaConfig(**kw)),
    "glora": (dict(r=4, target_modules=["q_proj", "k_proj", "v_proj"]), lambda kw: peft.GloraConfig(**kw)),
}
ARCHS = ["tiny-llama", "tiny-qwen2"]


def ids(tok):
    enc = tok(["a garden of tiny models", "two plus two is four"], return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch[0], attention_mask=batch[1]).logits


def perturb(model, names=None):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def method_name(case: str) -> str:
    return case.split("_")[0]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", list(CASES))
def test_ours_loads_in_peft(case, arch, tmp_path):
    kw, _ = CASES[case]
    model, tok = load_model(ModelConfig(name=arch))
    apply_method(model, method_config({"name": method_name(case), **kw}))
    perturb(model)
    model.eval()
    batch = ids(tok)
    want = logits(model, batch)
    save_adapter(model, tmp_path / "ours")
    base, _ = load_model(ModelConfig(name=arch))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(base, tmp_path / "ours")
    pm.eval()
    torch.testing.assert_close(logits(pm, batch), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", list(CASES))
def test_peft_saved_loads_in_ours(case, arch, tmp_path):
    kw, make = CASES[case]
    base, tok = load_model(ModelConfig(name=arch))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(base, make(dict(kw)))
    perturb(pm)
    pm.eval()
    batch = ids(tok)
    want = logits(pm, batch)
    pm.save_pretrained(tmp_path / "theirs")
    model, _ = load_model(ModelConfig(name=arch))
    info = load_adapter(model, tmp_path / "theirs")
    assert info.method.name == method_name(case)
    model.eval()
    torch.testing.assert_close(logits(model, batch), want, atol=1e-5, rtol=1e-5)


def test_vera_projections_match_peft_seed():
    """Our shared A, B are peft's for the same seed, so adapters saved without projections also agree."""
    base, _ = load_model(ModelConfig(name="tiny-llama"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(base, peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj"],
                                                       projection_prng_key=7))
    model, _ = load_model(ModelConfig(name="tiny-llama"))
    apply_method(model, method_config({"name": "vera", "r": 8, "projection_prng_key": 7}))
    ours = model.model.layers[0].self_attn.q_proj
    theirs = pm.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(ours.vera_A, theirs.vera_A["default"])
    torch.testing.assert_close(ours.vera_B, theirs.vera_B["default"])


@pytest.mark.parametrize("r,decompose_both", [(1, False), (2, True), (4, False), (8, True)])
def test_lokr_count_matches_peft(r, decompose_both):
    from studio.methods.lokr import lokr_count
    base, _ = load_model(ModelConfig(name="tiny-llama"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(base, peft.LoKrConfig(r=r, decompose_both=decompose_both,
                                                       target_modules=["q_proj", "v_proj", "down_proj"]))
    theirs = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    c = base.config
    ours = c.num_hidden_layers * sum(lokr_count(i, o, r, decompose_both) for i, o in
                                     [(64, 64), (64, 32), (c.intermediate_size, c.hidden_size)])
    assert ours == theirs
