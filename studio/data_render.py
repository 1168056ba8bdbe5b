"""Render conversations with the tokenizer's chat template, mask prompt labels, pack and collate.

Assistant spans are found by rendering prefixes of the conversation: for each assistant turn i,
`template(messages[:i], add_generation_prompt=True)` ends where the reply starts and
`template(messages[:i+1])`, right-stripped, ends just after the reply's end-of-turn marker (so the
model learns to stop). The text is cut at those points into (text, trained) segments and each
segment is tokenized on its own, so the trained tokens decode exactly to the replies + end markers.
Label -100 marks untrained positions; position 0 is never trained (nothing predicts it).

Packed examples carry `position_ids` restarting at 0 per example; `collate` then returns a boolean
block-diagonal causal mask (B x 1 x T x T, True = may attend) in `attention_mask`, which
transformers' SDPA path takes as is. `fit_attention_mask` adapts it to other attention kernels.
"""
from __future__ import annotations

from typing import Any

import torch

from .errors import DatasetError

IGNORE = -100
Segments = list[tuple[str, bool]]


def _template(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raises TemplateError (e.g. roles must alternate) and others
        raise DatasetError(f"The tokenizer's chat template rejected a conversation ({str(e)[:160]}); check the "
                           f"roles (user/assistant alternate, system first) or use another model.") from None


def chat_segments(messages: list[dict], tokenizer: Any) -> Segments:
    """The rendered conversation as (text, trained) pieces; assistant replies + end markers are trained."""
    if not getattr(tokenizer, "chat_template", None):
        raise DatasetError("The tokenizer has no chat template; load it through studio.models (which adds one) or "
                           "use a text dataset.")
    full = _template(tokenizer, messages, False)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _template(tokenizer, messages[:i], True)
        upto = _template(tokenizer, messages[:i + 1], False).rstrip()
        if full.startswith(upto) and upto.startswith(prompt) and len(prompt) >= cursor:
            start, end = len(prompt), len(upto)
        else:  # a template that re-renders earlier turns differently: look for the reply text itself
            start = full.find(m["content"].strip(), cursor)
            if start < 0:
                raise DatasetError("Could not find an assistant reply in the rendered chat template; use a model "
                                   "whose template keeps replies verbatim.")
            end = start + len(m["content"].strip())
        spans.append((start, end))
        cursor = end
    segments: Segments = []
    pos = 0
    for start, end in spans:
        if start > pos:
            segments.append((full[pos:start], False))
        if end > start:
            segments.append((full[start:end], True))
        pos = end
    if pos < len(full):
        segments.append((full[pos:], False))
    return segments


def text_segments(text: str, tokenizer: Any) -> Segments:
    """Plain text: bos (untrained) + text + eos, all trained."""
    bos = tokenizer.bos_token if getattr(tokenizer, "bos_token_id", None) is not None else ""
    eos = tokenizer.eos_token if getattr(tokenizer, "eos_token_id", None) is not None else ""
    return [(bos, False), (text + eos, True)] if bos else [(text + eos, True)]


def tokenize_segments(segments: Segments, tokenizer: Any, max_length: int) -> dict:
    """input_ids and labels of the segments, cut to max_length; `truncated` says whether anything was cut."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        if not text:
            continue
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if trained else [IGNORE] * len(piece))
    truncated = len(ids) > max_length > 0
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    if labels:
        labels[0] = IGNORE  # no position predicts the first token
    return {"input_ids": ids, "labels": labels, "truncated": truncated}


def render_example(messages_or_text: list[dict] | str, tokenizer: Any, max_length: int) -> dict:
    """{"input_ids", "labels"} of a conversation (chat template, only assistant turns trained) or a text."""
    if isinstance(messages_or_text, str):
        segments = text_segments(messages_or_text, tokenizer)
    else:
        segments = chat_segments(messages_or_text, tokenizer)
    ex = tokenize_segments(segments, tokenizer, max_length)
    return {"input_ids": ex["input_ids"], "labels": ex["labels"]}


def segments_of(example: dict, tokenizer: Any) -> list[dict]:
    """Decode an example into [{"text", "trained"}] runs (what the page highlights)."""
    out: list[dict] = []
    ids, labels = example["input_ids"], example["labels"]
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != IGNORE) != (labels[start] != IGNORE):
            out.append({"text": tokenizer.decode(ids[start:i], skip_special_tokens=False),
                        "trained": labels[start] != IGNORE})
            start = i
    return out


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Greedily concatenate examples (in order) into sequences of at most max_length tokens.

    Each packed sequence has `position_ids` restarting at 0 for every example it holds; the first
    label of each example stays -100 so no example is trained to predict across a boundary.
    """
    packed: list[dict] = []
    cur: dict = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        n = len(ex["input_ids"])
        if cur["input_ids"] and len(cur["input_ids"]) + n > max_length:
            packed.append(cur)
            cur = {"input_ids": [], "labels": [], "position_ids": []}
        cur["input_ids"].extend(ex["input_ids"])
        cur["labels"].extend([IGNORE] + list(ex["labels"][1:]))
        cur["position_ids"].extend(range(n))
    if cur["input_ids"]:
        packed.append(cur)
    return packed


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """B x 1 x T x T bool mask: causal within each run of position_ids that restarts at 0."""
    seg = torch.cumsum((position_ids == 0).long(), dim=1)  # B x T: example index of each token
    same = seg[:, :, None] == seg[:, None, :]
    T = position_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    return (same & causal)[:, None]


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into tensors.

    Plain examples -> input_ids, attention_mask (B x T, 1 = token), labels (-100 on padding).
    Packed examples (with position_ids) -> also position_ids, and attention_mask becomes the B x 1 x T x T
    bool block-diagonal causal mask. Padding of a packed row forms its own block (positions from 0).
    """
    if not examples:
        raise DatasetError("Cannot collate an empty batch; the dataset split has no examples.")
    T = max(len(e["input_ids"]) for e in examples)
    packed = any("position_ids" in e for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    pos = torch.zeros((len(examples), T), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[b, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(e["labels"], dtype=torch.long)
        mask[b, :n] = 1
        pos[b, :n] = torch.tensor(e.get("position_ids", range(n)), dtype=torch.long)
        pos[b, n:] = torch.arange(T - n)
    if not packed:
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {"input_ids": ids, "attention_mask": block_causal_mask(pos), "labels": labels, "position_ids": pos}


def without_padding_mask(batch: dict) -> dict:
    """A plain causal-LM batch without its 2-D attention mask where every row is right-padded (collate's are):
    under causal attention no real token sees the pads after it and the pads carry no loss, so the mask changes
    no loss or gradient. With it, a padded batch gets a 4-D mask from transformers, which takes sdpa off its
    causal flash kernel and is kept for backward; without it, sdpa runs causal. Packed batches (block masks),
    other padding, and batches already on a GPU (checked without reading them) keep theirs."""
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2 or "position_ids" in batch or mask.device.type != "cpu":
        return batch
    if not bool((mask.cummin(dim=1).values == mask).all()):  # a token after a pad: not right padding
        return batch
    return {k: v for k, v in batch.items() if k != "attention_mask"}


def fit_attention_mask(batch: dict, model: Any) -> dict:
    """Adapt a packed batch's bool 4D mask to the model's attention kernel (no-op for plain batches).

    sdpa (and studio_varlen, which falls back to it): kept as is, except under CUDA autocast, where sdpa gets
    the additive mask in the autocast dtype, made once for all layers. eager: converted to an additive
    float mask (0 / dtype min). Others (flash, flex)
    and sliding-window models whose window is shorter than the sequence: the mask is dropped, and
    transformers rebuilds the packed mask from position_ids itself.
    """
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 4:
        return batch
    impl = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
    window = getattr(model.config, "sliding_window", None)
    out = dict(batch)
    if impl not in ("sdpa", "eager", "studio_varlen") or (window and mask.shape[-1] > window):
        out["attention_mask"] = None
    elif impl == "eager":
        out["attention_mask"] = additive_mask(mask, next(model.parameters()).dtype)
    elif impl == "sdpa" and mask.is_cuda and torch.is_autocast_enabled("cuda"):
        # sdpa would turn a bool mask into a 16-bit bias in every layer, and each layer's backward keeps
        # its own copy; made once here (in the dtype autocast gives the queries), the layers share one
        out["attention_mask"] = additive_mask(mask, torch.get_autocast_dtype("cuda"))
    return out


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool attention mask (True = attend) as the additive one: 0 where True, dtype's minimum elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
