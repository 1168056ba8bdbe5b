"""Adapter family specifics: placements, AdapterDrop, AdaptFormer preset, AdaMix averaging,
AdapterFusion of real finished adapters, LST's backbone without backward and its memory saving."""
from __future__ import annotations

import shutil

import pytest
import torch

from training import fit
from studio.checkpoint import load_adapter, save_adapter
from studio.config import ModelConfig
from studio.losses import causal_lm_loss
from studio.memory_bench import saved_tensor_bytes
from studio.methods import applied, apply_method, method_config
from studio.methods.adapter import adapter_sites
from studio.models import load_model


def fresh(arch="tiny-llama"):
    model, tok = load_model(ModelConfig(name=arch))
    return model, tok


def batch(tok):
    enc = tok(["the garden grows tiny models", "two plus two is four"], return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def logits(model, b):
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def train(model, b, steps=6, lr=1e-2):
    losses, _ = fit(model, b, steps, lr)
    model.eval()
    return losses


def test_houlsby_pfeiffer_sites_and_counts():
    d, m = 64, 8
    per = 2 * d * m + m + d
    model, _ = fresh()
    apply_method(model, method_config({"name": "adapter", "bottleneck": m}))
    paths = [p for p, _ in adapter_sites(model)]
    assert paths == ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp", "model.layers.1.self_attn.o_proj",
                     "model.layers.1.mlp"]
    assert trainable(model) == 4 * per
    model, _ = fresh()
    apply_method(model, method_config({"name": "pfeiffer_adapter", "bottleneck": m}))
    assert [p for p, _ in adapter_sites(model)] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert trainable(model) == 2 * per


def test_adapterdrop_lowest_layers_have_no_adapters():
    model, tok = fresh()
    apply_method(model, method_config({"name": "adapter", "bottleneck": 8, "drop_lowest": 1}))
    assert {s.layer for _, s in adapter_sites(model)} == {1}
    assert trainable(model) == 2 * (2 * 64 * 8 + 8 + 64)
    with pytest.raises(Exception, match="drop_lowest"):
        m2, _ = fresh()
        apply_method(m2, method_config({"name": "adapter", "drop_lowest": 5}))


def test_adapterdrop_random_only_in_training():
    model, tok = fresh()
    apply_method(model, method_config({"name": "adapter", "bottleneck": 8, "drop_prob": 0.5, "init": "near_zero"}))
    b = batch(tok)
    with torch.no_grad():
        for _, s in adapter_sites(model):
            s.adapter.up_weight.normal_(std=0.5)
    model.eval()
    torch.testing.assert_close(logits(model, b), logits(model, b))
    model.train()
    torch.manual_seed(0)
    outs = [model(input_ids=b["input_ids"]).logits.detach() for _ in range(6)]
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])


def test_adaptformer_is_parallel_with_small_scale():
    model, _ = fresh()
    cfg = method_config({"name": "adaptformer"})
    assert cfg.scale == 0.1
    apply_method(model, cfg)
    sites = adapter_sites(model)
    assert all(s.parallel and s.scale == 0.1 for _, s in sites) and len(sites) == 2


def test_adamix_inference_uses_the_average_of_copies():
    model, tok = fresh()
    apply_method(model, method_config({"name": "adamix", "bottleneck": 8, "num_experts": 3}))
    b = batch(tok)
    with torch.no_grad():
        for _, s in adapter_sites(model):
            s.adapter.up_weight.normal_(std=0.3)
    model.eval()
    want = logits(model, b)
    single, _ = fresh()
    apply_method(single, method_config({"name": "adapter", "bottleneck": 8}))
    with torch.no_grad():
        for (_, a), (_, s) in zip(adapter_sites(model), adapter_sites(single)):
            for name in ("down_weight", "down_bias", "up_weight", "up_bias"):
                getattr(s.adapter, name).copy_(getattr(a.adapter, name).mean(0, keepdim=True))
    single.eval()
    torch.testing.assert_close(logits(single, b), want, atol=1e-5, rtol=1e-5)


def test_adapter_fusion_of_finished_adapters(tmp_path):
    folders = []
    for seed, text in ((1, "the garden grows tiny models"), (2, "two plus two is four")):
        model, tok = fresh()
        torch.manual_seed(seed)
        apply_method(model, method_config({"name": "adapter", "bottleneck": 8}))
        b = batch(tok)
        train(model, b, steps=3)
        folders.append(save_adapter(model, tmp_path / f"a{seed}"))
    model, tok = fresh()
    b = batch(tok)
    base = logits(model, b)
    apply_method(model, method_config({"name": "adapter_fusion", "adapters": [str(f) for f in folders]}))
    assert trainable(model) == 4 * 3 * (64 * 64 + 64)
    names = {n.split(".adapter.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"query", "key", "value"}
    losses = train(model, b, steps=6, lr=3e-3)
    assert losses[-1] < losses[0]
    want = logits(model, b)
    with applied(model).method.disable_adapter(model):
        torch.testing.assert_close(logits(model, b), base)
    save_adapter(model, tmp_path / "fusion")
    for f in folders:  # the fusion file is standalone
        shutil.rmtree(f)
    other, _ = fresh()
    load_adapter(other, tmp_path / "fusion")
    torch.testing.assert_close(logits(other.eval(), b), want, atol=1e-5, rtol=1e-5)


def test_adapter_fusion_rejects_other_methods(tmp_path):
    model, _ = fresh()
    apply_method(model, method_config({"name": "lora", "r": 2}))
    save_adapter(model, tmp_path / "lora")
    m2, _ = fresh()
    with pytest.raises(Exception, match="serial bottleneck adapters"):
        apply_method(m2, method_config({"name": "adapter_fusion", "adapters": [str(tmp_path / "lora"), "random:1"]}))


def test_lst_backbone_gets_no_gradient_and_side_does():
    model, tok = fresh()
    apply_method(model, method_config({"name": "lst"}))
    model.train()
    b = batch(tok)
    seen = []
    model.model.layers[1].register_forward_hook(lambda m, a, o: seen.append(o.requires_grad))
    loss, _ = causal_lm_loss(model, b)
    loss.backward()
    assert seen == [False]  # backbone activations carry no graph
    assert torch.is_grad_enabled()
    assert all(p.grad is not None for p in model.lst_side.parameters())
    assert model.lst_side.blocks[0].gate_proj.weight.shape == (128 // 8, 64 // 8)


def test_lst_saves_activation_memory():
    model, tok = fresh()
    ids = torch.randint(0, 500, (2, 96))
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    apply_method(model, method_config({"name": "lora", "r": 8, "lora_dropout": 0.0}))
    model.train()
    lora = saved_tensor_bytes(model, b)
    model, _ = fresh()
    apply_method(model, method_config({"name": "lst"}))
    model.train()
    lst = saved_tensor_bytes(model, b)
    assert lst * 2.5 < lora, (lst, lora)
    assert applied(model).method.trainable_summary(model)["backbone_backward"] is False


@pytest.mark.parametrize("name,kw", [("mam_adapter", {"bottleneck": 16, "num_virtual_tokens": 3}),
                                     ("unipelt", {"r": 2, "bottleneck": 8, "num_virtual_tokens": 3})])
def test_hybrids_with_prefix_projection_round_trip(name, kw, tmp_path):
    model, tok = fresh("tiny-qwen2")
    apply_method(model, method_config({"name": name, **kw}))
    b = batch(tok)
    losses = train(model, b, steps=4, lr=1e-2)
    assert losses[-1] < losses[0]
    want = logits(model, b)
    save_adapter(model, tmp_path / name)
    other, _ = fresh("tiny-qwen2")
    load_adapter(other, tmp_path / name)
    torch.testing.assert_close(logits(other.eval(), b), want, atol=1e-5, rtol=1e-5)
    summary = applied(other).method.trainable_summary(other)
    assert summary["virtual_tokens"] == 3
    if name == "unipelt":
        assert len(summary["prefix_gates"]) == 2 and summary["lora_layers"] == 4
