"""Selective methods: BitFit, Freeze, Child-Tuning (F and D), Diff Pruning.

What changed is reported exactly, the saved adapter reproduces the tuned model on a fresh base,
and Child-Tuning D / Diff Pruning keep what they store proportional to what they change.
"""
from __future__ import annotations

import pytest
import torch

from training import fit
from studio.checkpoint import load_adapter, save_adapter
from studio.config import ModelConfig
from studio.errors import ConfigError
from studio.losses import causal_lm_loss
from studio.methods import applied, apply_method, method_config
from studio.models import load_model


def fresh(arch="tiny-llama"):
    model, tok = load_model(ModelConfig(name=arch, device="cpu"))
    return model.eval(), tok


def batch(tok):
    enc = tok(["Add 12 and 30.", "Who are you, really?"], return_tensors="pt", padding=True)
    return {**enc, "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}


def logits(model, data):
    with torch.no_grad():
        return model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits


def train(model, tok, steps=4, lr=1e-2, prepare=None):
    info = applied(model)
    if prepare is not None:
        info.method.prepare_for_training(model, prepare, info.cfg)
    _, opt = fit(model, batch(tok), steps, lr, protocol=True)
    model.eval()
    return opt


def examples(tok, n=8):
    texts = [f"Question {i}: what is {i} plus {i}? Answer: {2 * i}." for i in range(n)]
    return [{"input_ids": tok(t)["input_ids"], "labels": tok(t)["input_ids"]} for t in texts]


def test_bitfit_without_biases_names_the_alternatives():
    model, _ = fresh("tiny-llama")
    with pytest.raises(ConfigError, match="no bias terms.*missing_bias=add_zero.*missing_bias=norm_weights"):
        apply_method(model, method_config({"name": "bitfit"}))


def test_bitfit_trains_existing_biases_of_chosen_modules():
    model, _ = fresh("tiny-qwen2")  # Qwen2 has q/k/v biases
    apply_method(model, method_config({"name": "bitfit", "bias_modules": ["q_proj", "k_proj", "v_proj"]}))
    names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert names and all(n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for n in names)
    assert len(names) == 3 * model.config.num_hidden_layers


def test_bitfit_norm_weights_alternative():
    model, _ = fresh("tiny-gemma3")
    apply_method(model, method_config({"name": "bitfit", "missing_bias": "norm_weights"}))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("norm" in n and n.endswith("weight") for n in names)


CASES = {
    "bitfit": ({"missing_bias": "add_zero"}, 1e-2),
    "freeze": ({"last_k_layers": 1, "patterns": ["mlp"]}, 1e-3),
    "child_tuning-F": ({"name": "child_tuning", "mode": "F", "reserve_p": 0.3, "target_modules": ["q_proj"]}, 1e-2),
    "child_tuning-D": ({"name": "child_tuning", "mode": "D", "reserve_p": 0.05}, 1e-2),
    "diff_pruning": ({"target_sparsity": 0.9}, 1e-2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_saved_adapter_reproduces_the_tuned_model_and_reports_changes(case, tmp_path):
    fields, lr = CASES[case]
    fields = dict(fields)
    name = fields.pop("name", case)
    model, tok = fresh("tiny-llama")
    data = batch(tok)
    base = logits(model, data)
    apply_method(model, method_config({"name": name, **fields}))
    train(model, tok, lr=lr, prepare=examples(tok) if case == "child_tuning-D" else None)
    want = logits(model, data)
    assert not torch.allclose(want, base, atol=1e-4)
    summary = applied(model).method.trainable_summary(model)
    assert summary.get("changed_entries", 0) > 0
    save_adapter(model, tmp_path / "a")
    other, _ = fresh("tiny-llama")
    load_adapter(other, tmp_path / "a")
    torch.testing.assert_close(logits(other.eval(), data), want, atol=1e-6, rtol=1e-6)
    with applied(model).method.disable_adapter(model):
        torch.testing.assert_close(logits(model, data), base, atol=1e-6, rtol=1e-6)


def test_child_tuning_d_uses_fisher_and_keeps_optimizer_state_sparse():
    from studio.methods.child_tuning import DeltaLinear, fisher_information
    model, tok = fresh("tiny-llama")
    apply_method(model, method_config({"name": "child_tuning", "mode": "D", "reserve_p": 0.05,
                                       "target_modules": ["q_proj", "down_proj"]}))
    info = applied(model)
    assert info.method.trainable_summary(model)["mask_source"] == "random"
    data = examples(tok)
    modules = info.extra["modules"]
    fisher = fisher_information(model, modules, data, 64, 4)  # on the base (all deltas still zero)
    opt = train(model, tok, steps=3, prepare=data)
    for n, m in modules.items():
        k = m.values.numel()
        assert k == int(0.05 * m.base_layer.weight.numel())
        assert set(m.indices.tolist()) == set(fisher[n].view(-1).topk(k).indices.tolist())
        # optimizer state exists for the k child entries only, not for the full matrix
        state = opt.state[m.values]
        assert state["exp_avg"].numel() == k and state["exp_avg_sq"].numel() == k
    summary = info.method.trainable_summary(model)
    assert summary["mask_source"] == "fisher"
    total = sum(m.base_layer.weight.numel() for m in modules.values())
    assert summary["changed_entries"] <= sum(m.values.numel() for m in modules.values())
    assert abs(summary["changed_fraction"] - summary["changed_entries"] / total) < 1e-12
    assert all(isinstance(m, DeltaLinear) for m in modules.values())


def test_child_tuning_f_masks_gradients_per_step():
    model, tok = fresh("tiny-llama")
    apply_method(model, method_config({"name": "child_tuning", "mode": "F", "reserve_p": 0.25,
                                       "target_modules": ["q_proj"]}))
    info = applied(model)
    loss, _ = causal_lm_loss(model, batch(tok))
    loss.backward()
    dense = {n: m.delta.grad.clone() for n, m in info.extra["modules"].items()}
    info.method.on_step(model, 0, 1)
    for n, m in info.extra["modules"].items():
        g = m.delta.grad
        kept = g != 0
        frac = kept.float().mean().item()
        assert 0.18 < frac < 0.32  # Bernoulli(0.25)
        torch.testing.assert_close(g[kept], dense[n][kept] / 0.25)


def test_diff_pruning_gates_shrink_and_projection_hits_the_target_sparsity(tmp_path):
    from safetensors.torch import load_file
    model, tok = fresh("tiny-llama")
    apply_method(model, method_config({"name": "diff_pruning", "target_sparsity": 0.95, "l0_weight": 5.0}))
    info = applied(model)
    before = info.method.trainable_summary(model)["expected_density"]
    train(model, tok, steps=6, lr=0.05)
    summary = info.method.trainable_summary(model)
    assert summary["expected_density"] < before      # the L0 penalty closes gates
    assert summary["projected"]                        # magnitude projection after the last step
    for n, m in info.extra["modules"].items():
        assert summary["changed_per_module"][n] <= int(0.05 * m.w.numel())
    save_adapter(model, tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    stored = sum(v.numel() for k, v in tensors.items() if k.endswith("diff_values"))
    assert stored == summary["changed_entries"]       # the file is the sparse diff only
    assert all(v.dtype == torch.int64 for k, v in tensors.items() if k.endswith("diff_indices"))


def test_freeze_trains_only_the_chosen_layers():
    model, tok = fresh("tiny-gemma3")
    apply_method(model, method_config({"name": "freeze", "last_k_layers": 1}))
    last = model.config.num_hidden_layers - 1
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(f"layers.{last}." in n for n in names)
    train(model, tok, steps=2, lr=1e-3)
    summary = applied(model).method.trainable_summary(model)
    assert summary["changed_tensors"] and all(f"layers.{last}." in n for n in summary["changed_tensors"])
    with pytest.raises(ConfigError, match="last_k_layers"):
        apply_method(fresh()[0], method_config({"name": "freeze", "last_k_layers": 0}))
