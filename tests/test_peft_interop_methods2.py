"""peft as an oracle (test-only) for the soft prompts, IA3 and AdaLoRA: files go both ways.

Our adapters saved with studio.checkpoint load in peft (PeftModel.from_pretrained on the same tiny
base) with equal logits (fp32, atol 1e-5) and identical greedy generations; peft-saved adapters load
in ours with equal logits. tiny-llama (4 heads / 2 kv heads) and tiny-gemma3 (1 kv head, sliding
window) are grouped-query models, so the prefix layout is checked with kv_dim < hidden size.

Note (peft 0.21.2 + transformers 5.24): peft's `generate` for PREFIX_TUNING passes the prefix as
the deprecated `past_key_values` next to generate's own `cache`, and transformers keeps `cache`, so
peft's generations silently drop the prefix. For prefix tuning the greedy reference is therefore
peft's own forward pass, token by token without a cache (what generate must reproduce). The same
goes for prompt tuning / P-tuning: peft's cached decoding steps can differ from its own forward pass
(measured: tiny-gemma3 prompt tuning, logits off by 0.25-0.5 from the 2nd generated token; tiny-llama
P-tuning diverging at the 4th), while our generate equals our and peft's token-by-token forward.
"""
from __future__ import annotations

import pytest
import torch

from studio.checkpoint import load_adapter, save_adapter
from studio.config import ModelConfig
from studio.methods import applied, apply_method, method_config
from studio.models import load_model

ARCHS = ["tiny-llama", "tiny-qwen2", "tiny-gemma3"]
SOFT = {
    "prompt_tuning": {"num_virtual_tokens": 5, "prompt_tuning_init": "TEXT"},
    "p_tuning": {"num_virtual_tokens": 5, "encoder_hidden_size": 24},
    "p_tuning-lstm": {"name": "p_tuning", "num_virtual_tokens": 3, "encoder_hidden_size": 16,
                      "encoder_reparameterization_type": "LSTM"},
    "prefix_tuning": {"num_virtual_tokens": 5, "encoder_hidden_size": 24},
    "p_tuning_v2": {"num_virtual_tokens": 5},
}


def fresh(arch):
    model, tok = load_model(ModelConfig(name=arch, device="cpu"))
    return model.eval(), tok


def batch(tok):
    enc = tok(["Add 12 and 30.", "Who are you, really?"], return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def logits(model, tok, last: int | None = None):
    x, m = batch(tok)
    with torch.no_grad():
        out = model(input_ids=x, attention_mask=m).logits
    return out[:, -x.shape[1]:]  # peft returns the virtual positions of prompt tuning too


def eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()


def greedy_loop(model, ids: torch.Tensor, steps: int, eos: set[int]) -> torch.Tensor:
    """Greedy decoding by full forward passes without a cache (the reference generate must match)."""
    cur = ids
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=cur, attention_mask=torch.ones_like(cur)).logits[:, -1].argmax(-1, keepdim=True)
            cur = torch.cat([cur, nxt], dim=1)
            if nxt.item() in eos:
                break
    return cur


def generate(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                              do_sample=False)


def perturb(model, scale=0.5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale * (p.std() if p.numel() > 1 else 1))


def ours(arch, name, fields):
    model, tok = fresh(arch)
    fields = dict(fields)
    apply_method(model, method_config({"name": fields.pop("name", name), **fields}))
    perturb(model)
    return model.eval(), tok


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", list(SOFT))
def test_our_soft_prompt_loads_in_peft(case, arch, tmp_path):
    from peft import PeftModel
    model, tok = ours(arch, case, SOFT[case])
    want = logits(model, tok)
    folder = save_adapter(model, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(fresh(arch)[0], folder).eval()
    torch.testing.assert_close(logits(theirs, tok), want, atol=1e-5, rtol=1e-5)
    ids = tok(["Who are you?"], return_tensors="pt")["input_ids"]
    got = generate(model, ids, 6)
    assert torch.equal(got, greedy_loop(model, ids, 6, eos_ids(model)))  # our cache path == no-cache path
    assert torch.equal(got, greedy_loop(theirs, ids, 6, eos_ids(model)))  # peft's forward, token by token


PEFT_SOFT = {
    "prompt_tuning": lambda p: p.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                    prompt_tuning_init="RANDOM"),
    "p_tuning": lambda p: p.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
    "prefix_tuning": lambda p: p.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                    prefix_projection=True, encoder_hidden_size=16),
    "p_tuning_v2": lambda p: p.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
}


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("case", list(PEFT_SOFT))
def test_peft_soft_prompt_loads_in_ours(case, arch, tmp_path):
    import peft
    base, tok = fresh(arch)
    theirs = peft.get_peft_model(base, PEFT_SOFT[case](peft)).eval()
    perturb(theirs, scale=0.3)
    want = logits(theirs, tok)
    theirs.save_pretrained(tmp_path / "peft")
    model, _ = fresh(arch)
    load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(logits(model.eval(), tok), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_ia3_both_ways(arch, tmp_path):
    import peft
    model, tok = ours(arch, "ia3", {})
    want = logits(model, tok)
    save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(fresh(arch)[0], tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs, tok), want, atol=1e-5, rtol=1e-5)
    ids = tok(["Who are you?"], return_tensors="pt")["input_ids"]
    assert torch.equal(generate(model, ids, 6), generate(theirs, ids, 6))

    cfg = peft.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj", "up_proj"],
                         feedforward_modules=["down_proj", "up_proj"])
    theirs = peft.get_peft_model(fresh(arch)[0], cfg).eval()
    perturb(theirs, scale=0.3)
    want = logits(theirs, tok)
    theirs.save_pretrained(tmp_path / "peft")
    model, _ = fresh(arch)
    load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(logits(model.eval(), tok), want, atol=1e-5, rtol=1e-5)


def _train_ours_adalora(arch, steps=6):
    from studio.losses import causal_lm_loss
    model, tok = fresh(arch)
    apply_method(model, method_config({"name": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2,
                                       "deltaT": 1, "total_step": steps}))
    info = applied(model)
    x, m = batch(tok)
    data = {"input_ids": x, "attention_mask": m, "labels": x.masked_fill(m == 0, -100)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for step in range(steps):
        loss, _ = causal_lm_loss(model, data)
        (loss + info.method.extra_loss(model)).backward()
        info.method.on_step(model, step, steps)
        opt.step()
        opt.zero_grad()
        info.method.after_optimizer_step(model, step, steps)
    return model.eval(), tok


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gemma3"])
def test_our_adalora_loads_in_peft(arch, tmp_path):
    import json
    import peft
    model, tok = _train_ours_adalora(arch)
    ranks = applied(model).method.trainable_summary(model)["rank_per_layer"]
    assert sum(ranks.values()) == 2 * len(ranks)  # pruned to the target budget
    want = logits(model, tok)
    save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["rank_pattern"]
    theirs = peft.PeftModel.from_pretrained(fresh(arch)[0], tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs, tok), want, atol=1e-5, rtol=1e-5)
    ids = tok(["Who are you?"], return_tensors="pt")["input_ids"]
    assert torch.equal(generate(model, ids, 6), generate(theirs, ids, 6))


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2"])
def test_peft_adalora_loads_in_ours(arch, tmp_path):
    import peft
    base, tok = fresh(arch)
    cfg = peft.AdaLoraConfig(task_type="CAUSAL_LM", init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1,
                             total_step=6, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    theirs = peft.get_peft_model(base, cfg)
    x, m = batch(tok)
    opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=0.05)
    theirs.train()
    for step in range(6):  # peft's documented loop: backward, step, update_and_allocate, zero_grad
        theirs(input_ids=x, attention_mask=m, labels=x.masked_fill(m == 0, -100)).loss.backward()
        opt.step()
        theirs.base_model.update_and_allocate(step)
        opt.zero_grad()
    theirs.eval()
    want = logits(theirs, tok)
    theirs.save_pretrained(tmp_path / "peft")
    model, _ = fresh(arch)
    load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(logits(model.eval(), tok), want, atol=1e-5, rtol=1e-5)
    ranks = applied(model).method.trainable_summary(model)["rank_per_layer"]
    assert sum(ranks.values()) == 2 * len(ranks)
