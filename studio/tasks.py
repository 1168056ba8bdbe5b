"""Task types beyond chat: sequence classification (text + label) and image classification (VPT).

Sequence classification: rows with a text column and a label column (data.columns may rename them;
the shipped `sentiment` dataset is one). The model is transformers' AutoModelForSequenceClassification
(`load_classifier`: studio.models.load_model(mcfg, task="classification") with a head sized to the
labels); the method is applied as usual and then `prepare_head` makes the classification head
(`score` for decoder LMs, `classifier` for BERT/ViT) trainable alongside it. checkpoint.save_adapter
stores the head's tensors next to the adapter's (config key `studio_task_head`), and
checkpoint.load_adapter restores them. The loss is `classification_loss` (mean cross-entropy over
the batch); the eval metric is `accuracy`.

Image classification: an image folder (one sub-folder per class: `root/<label>/*.png|jpg`) read with
PIL + numpy into pixel tensors normalised like a ViT image processor (mean = std = 0.5 by default).

Trainer integration (for studio/trainer.py): when `task == "classification"` call
`classification_loss(model, batch)` instead of causal_lm_loss, build the data with
`build_classification(...)` and batches with `collate_classification(...)`, and after apply_method
call `prepare_head(model)`; report `accuracy(model, batches)` as eval metric.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .config import DataConfig, ModelConfig
from .errors import DatasetError, StudioError

HEAD_NAMES = ("score", "classifier")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


# --- data --------------------------------------------------------------------------------------
@dataclass
class ClassificationData:
    train: list[dict]
    eval: list[dict]
    labels: list[str]  # id -> label name


def _col(dcfg: DataConfig, name: str) -> str:
    return (dcfg.columns or {}).get(name, name)


def label_names(rows: Iterable[dict], label_col: str) -> list[str]:
    """Label names in a stable order: sorted (numbers numerically)."""
    values = {str(r[label_col]) for r in rows}
    return sorted(values, key=lambda v: (0, int(v), "") if v.lstrip("-").isdigit() else (1, 0, v))


def build_classification(dcfg: DataConfig, tokenizer: Any, seed: int = 42,
                         labels: list[str] | None = None) -> ClassificationData:
    """Tokenized {input_ids, label} examples and the label list, split by dcfg.eval_fraction."""
    from .data import split_indices
    from .data_io import load_rows
    rows = load_rows(dcfg)
    tcol, lcol = _col(dcfg, "text"), _col(dcfg, "label")
    for i, row in enumerate(rows):
        missing = [c for c in (tcol, lcol) if c not in row]
        if missing:
            raise DatasetError(f"Row {i + 1} has no {missing[0]!r} column (it has {', '.join(map(str, row))}); set "
                               f"data.columns, e.g. {{text: sentence, label: category}}.")
    labels = labels or label_names(rows, lcol)
    index = {name: i for i, name in enumerate(labels)}
    examples = []
    for i, row in enumerate(rows):
        label = str(row[lcol])
        if label not in index:
            raise DatasetError(f"Row {i + 1} has label {label!r}, which the model does not know ({', '.join(labels)}).")
        ids = tokenizer(str(row[tcol]), truncation=True, max_length=dcfg.max_length)["input_ids"]
        examples.append({"input_ids": ids, "label": index[label]})
    train_idx, eval_idx = split_indices(len(examples), dcfg.eval_fraction, seed)
    return ClassificationData([examples[i] for i in train_idx], [examples[i] for i in eval_idx], labels)


def collate_classification(examples: list[dict], pad_id: int) -> dict:
    """Right-padded input_ids + attention_mask, labels (B,)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, :len(e["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e["label"] for e in examples])}


def batches(examples: list[dict], batch_size: int, collate, seed: int | None = None, **kw) -> list[dict]:
    order = list(range(len(examples)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    return [collate([examples[j] for j in order[i:i + batch_size]], **kw) for i in range(0, len(order), batch_size)]


def load_image_folder(root: str | Path, image_size: int, mean: float = 0.5, std: float = 0.5,
                      labels: list[str] | None = None) -> ClassificationData:
    """`root/<label>/<image>` -> {pixel_values (3, S, S), label}; all in train (use split_examples)."""
    import numpy as np
    from PIL import Image
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"Image folder {root} does not exist; it needs one sub-folder per class.")
    classes = labels or sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DatasetError(f"{root} needs at least two class sub-folders (found {classes}).")
    examples = []
    for idx, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                img = Image.open(path).convert("RGB").resize((image_size, image_size), Image.BILINEAR)
            except OSError as e:
                raise DatasetError(f"Cannot read image {path} ({e}); remove or replace it.") from None
            arr = (np.asarray(img, dtype=np.float32) / 255.0 - mean) / std
            examples.append({"pixel_values": torch.from_numpy(arr).permute(2, 0, 1).contiguous(), "label": idx})
    if not examples:
        raise DatasetError(f"No images ({', '.join(IMAGE_SUFFIXES)}) under {root}.")
    return ClassificationData(examples, [], classes)


def collate_images(examples: list[dict]) -> dict:
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([e["label"] for e in examples])}


# --- model -------------------------------------------------------------------------------------
def head_module(model: nn.Module) -> tuple[str, nn.Module]:
    for name in HEAD_NAMES:
        mod = getattr(model, name, None)
        if isinstance(mod, nn.Module):
            return name, mod
    raise StudioError("This model has no classification head (score/classifier); load it with task=classification.")


def load_classifier(mcfg: ModelConfig, labels: list[str], seed: int = 0) -> tuple[nn.Module, Any]:
    """A sequence classifier with a head of len(labels) outputs (a new head if the checkpoint's differs)."""
    from .models import load_model
    model, tok = load_model(mcfg, task="classification", seed=seed)
    name, head = head_module(model)
    if head.out_features != len(labels):
        torch.manual_seed(seed)
        new = nn.Linear(head.in_features, len(labels), bias=head.bias is not None, device=head.weight.device,
                        dtype=head.weight.dtype)
        setattr(model, name, new)
        new.requires_grad_(False)
    model.config.num_labels = len(labels)
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {v: k for k, v in enumerate(labels)}
    return model, tok


def prepare_head(model: nn.Module) -> list[str]:
    """Make the classification head trainable (after apply_method) and mark it for saving."""
    name, head = head_module(model)
    names = []
    for pname, p in head.named_parameters():
        p.data = p.data.float()
        p.requires_grad_(True)
        names.append(f"{name}.{pname}")
    model.studio_task_head = names
    return names


def head_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The head tensors to save with the adapter (empty for causal LMs)."""
    names = getattr(model, "studio_task_head", None) or []
    params = dict(model.named_parameters())
    return {n: params[n].detach() for n in names if n in params}


def load_head_state(model: nn.Module, names: list[str], state: dict[str, torch.Tensor]) -> None:
    if not names:
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            if n not in params or n not in state:
                raise StudioError(f"Saved classification head tensor {n} does not fit this model; load the adapter "
                                  f"onto a classifier with the same labels (task=classification).")
            if params[n].shape != state[n].shape:
                raise StudioError(f"Classification head {n} has shape {tuple(state[n].shape)}, the model "
                                  f"{tuple(params[n].shape)}: the number of labels differs.")
            params[n].data = state[n].to(params[n].device).float()
            params[n].requires_grad_(True)
    model.studio_task_head = list(names)


# --- loss and metric ---------------------------------------------------------------------------
def _forward(model: nn.Module, batch: dict) -> torch.Tensor:
    if "pixel_values" in batch:
        return model(pixel_values=batch["pixel_values"]).logits
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits


def classification_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of a batch {input_ids, attention_mask | pixel_values, labels} and its size."""
    logits = _forward(model, batch).float()
    labels = batch["labels"].to(logits.device)
    return F.cross_entropy(logits, labels), torch.tensor(labels.numel(), device=logits.device)


@torch.no_grad()
def accuracy(model: nn.Module, batch_list: Iterable[dict]) -> float:
    was_training = model.training
    model.eval()
    right = total = 0
    for batch in batch_list:
        pred = _forward(model, batch).argmax(-1).cpu()
        right += int((pred == batch["labels"].cpu()).sum())
        total += int(batch["labels"].numel())
    model.train(was_training)
    return right / max(1, total)
