"""AdaLoRA specifics: budget schedule, importance-based pruning, orthogonality regulariser, rank per layer."""
from __future__ import annotations

import pytest
import torch

from studio.config import ModelConfig
from studio.errors import ConfigError
from studio.losses import causal_lm_loss
from studio.methods import applied, apply_method, method_config
from studio.methods.adalora import SVDLinear
from studio.models import load_model


def adalora(arch="tiny-llama", **fields):
    model, tok = load_model(ModelConfig(name=arch, device="cpu"))
    cfg = {"name": "adalora", "init_r": 4, "target_r": 2, **fields}
    apply_method(model, method_config(cfg))
    return model, tok


def batch(tok):
    enc = tok(["Add 12 and 30.", "Who are you, really?"], return_tensors="pt", padding=True)
    return {**enc, "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}


def run(model, tok, steps, lr=0.02, record=None):
    info = applied(model)
    data = batch(tok)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        loss, _ = causal_lm_loss(model, data)
        (loss + info.method.extra_loss(model)).backward()
        info.method.on_step(model, step, steps)
        opt.step()
        opt.zero_grad()
        info.method.after_optimizer_step(model, step, steps)
        if record is not None:
            record.append(info.method.trainable_summary(model))


def test_budget_schedule_is_cubic_between_tinit_and_total_minus_tfinal():
    model, _ = adalora(init_r=8, target_r=2, tinit=10, tfinal=10, deltaT=5)
    alloc = applied(model).extra["allocator"]
    layers = len(alloc.layers)
    total = 110
    assert alloc.schedule(5, total) == (8 * layers, False)
    assert alloc.schedule(10, total) == (8 * layers, False)
    budget, prune = alloc.schedule(55, total)  # halfway: target + (init - target) * 0.5**3
    assert budget == int(6 * layers * 0.125 + 2 * layers) and prune  # 55 % deltaT == 0
    assert alloc.schedule(56, total)[1] is False
    assert alloc.schedule(101, total) == (2 * layers, True)
    with pytest.raises(ConfigError, match="total_step"):
        alloc.total(20)  # 20 - tfinal <= tinit


def test_ranks_follow_the_budget_and_end_at_target():
    model, tok = adalora(tinit=1, tfinal=2, deltaT=1)
    history = []
    run(model, tok, 8, record=history)
    alloc = applied(model).extra["allocator"]
    layers = len(alloc.layers)
    totals = [sum(h["rank_per_layer"].values()) for h in history]
    assert totals[0] == 4 * layers                    # step 0 <= tinit: nothing pruned
    assert all(a >= b for a, b in zip(totals, totals[1:]))  # the budget only shrinks
    assert totals[-1] == 2 * layers                   # final pattern = target budget
    assert history[-1]["budget"] == 2 * layers
    for layer in alloc.layers.values():               # pruned triplets are exactly zero after the last step
        assert torch.all(layer.lora_E[~layer.rank_mask] == 0)
    # the allocation is uneven in general: importance moves rank between layers
    assert set(history[-1]["rank_per_layer"]) == set(alloc.layers)


def test_pruning_keeps_the_most_important_triplets():
    model, _ = adalora()
    alloc = applied(model).extra["allocator"]
    names = list(alloc.layers)
    for name, layer in alloc.layers.items():  # make layer 0 triplets 0 and 1 the only important ones
        for pname in ("lora_A", "lora_B", "lora_E"):
            p = getattr(layer, pname)
            alloc.exp_ipt[f"{name}.{pname}"] = torch.full_like(p, 1e-3)
            alloc.exp_unc[f"{name}.{pname}"] = torch.full_like(p, 1e-3)
    hot = alloc.layers[names[0]]
    alloc.exp_ipt[f"{names[0]}.lora_E"][:2] = 10.0
    alloc.prune_to(2)
    assert hot.rank == 2 and hot.rank_mask[:2].all()
    assert all(alloc.layers[n].rank == 0 for n in names[1:])


def test_orthogonality_regulariser():
    model, _ = adalora()
    model.train()
    info = applied(model)
    reg = info.method.extra_loss(model)
    assert reg.item() > 0 and reg.requires_grad
    with torch.no_grad():  # orthonormal P and Q: the regulariser vanishes
        for layer in model.modules():
            if isinstance(layer, SVDLinear):
                q, _ = torch.linalg.qr(torch.randn(layer.lora_A.shape[1], layer.r))
                layer.lora_A.copy_(q.T)
                q, _ = torch.linalg.qr(torch.randn(layer.lora_B.shape[0], layer.r))
                layer.lora_B.copy_(q)
    assert info.method.extra_loss(model).item() < 1e-4
    model.eval()
    assert info.method.extra_loss(model) is None  # not part of evaluation losses


def test_saved_adapter_is_pruned_and_reloads_exactly(tmp_path):
    import json
    from studio.checkpoint import load_adapter, save_adapter
    model, tok = adalora(tinit=1, tfinal=2)
    run(model, tok, 8)
    model.eval()
    data = batch(tok)
    with torch.no_grad():
        want = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    ranks = config["studio_rank_per_layer"]
    assert sum(ranks.values()) == 2 * len(ranks)
    assert {k: sum(v) for k, v in config["rank_pattern"].items()} == {f"{k}.lora_E": r for k, r in ranks.items()}
    other, _ = load_model(ModelConfig(name="tiny-llama", device="cpu"))
    load_adapter(other, tmp_path / "a")
    with torch.no_grad():
        got = other.eval()(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert applied(other).method.trainable_summary(other)["rank_per_layer"] == ranks
