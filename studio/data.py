"""Datasets: load rows, detect their format, turn them into chat messages, tokenize with labels.

    rows  = load_rows(dcfg)                       # list of dicts (data_io.py: files, folders, hub, shipped)
    fmt   = detect_format(rows, dcfg)             # alpaca | sharegpt | messages | text | classification
    msgs  = to_messages(rows[0], fmt, dcfg)       # [{"role", "content"}] (a str for the text format)
    ex    = render_example(msgs, tokenizer, 512)  # {"input_ids", "labels"} (data_render.py)
    splits = build_datasets(dcfg, tokenizer, seed)  # DataSplits(train, eval, format, stats)
    batch = collate(splits.train[:4], tokenizer.pad_token_id)

`dcfg.columns` maps canonical names (instruction, input, output, system, conversations, messages,
text, label) to the user's column names. Rows are numbered from 1 in error messages, in file order.
Classification rows become a one-turn chat whose reply is the label.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from .config import DataConfig
from .data_io import dataset_choices, dataset_info, load_rows  # noqa: F401  (public API)
from .data_render import (IGNORE, collate, fit_attention_mask, pack, render_example,  # noqa: F401
                          segments_of, tokenize_segments, chat_segments, text_segments)
from .errors import DatasetError

FORMATS = ("alpaca", "sharegpt", "messages", "text", "classification")
REQUIRED = {"alpaca": ("instruction", "output"), "sharegpt": ("conversations",), "messages": ("messages",),
            "text": ("text",), "classification": ("text", "label")}
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "model": "assistant", "bot": "assistant", "chatgpt": "assistant"}


@dataclass
class DataSplits:
    train: list[dict]  # examples: {"input_ids", "labels"[, "position_ids" when packed]}
    eval: list[dict]
    format: str
    stats: dict = field(default_factory=dict)  # examples, tokens, trained_tokens, truncated, dropped, ...


def col(dcfg: DataConfig, name: str) -> str:
    """The user's column for a canonical name."""
    return (dcfg.columns or {}).get(name, name)


def detect_format(rows: list[dict], dcfg: DataConfig) -> str:
    """The row format (dcfg.format unless auto), after checking every row has the columns it needs."""
    fmt = dcfg.format
    if fmt not in ("auto", *FORMATS):
        raise DatasetError(f"Unknown data.format {fmt!r}; use auto or one of {', '.join(FORMATS)}.")
    if fmt == "auto":
        fmt = _guess(rows[0], dcfg) if rows else "text"
    for i, row in enumerate(rows, 1):
        missing = [c for c in (col(dcfg, n) for n in REQUIRED[fmt]) if row.get(c) is None]
        if missing:
            raise DatasetError(f"Row {i} has no {', '.join(missing)} column(s) needed by the {fmt} format; it has "
                               f"{', '.join(map(str, row)) or 'no columns'}; fix the row or map columns with "
                               f"data.columns, e.g. {{{REQUIRED[fmt][0]}: your_column}}.")
    return fmt


def _guess(row: dict, dcfg: DataConfig) -> str:
    has = lambda name: row.get(col(dcfg, name)) is not None  # noqa: E731
    if has("messages") and isinstance(row[col(dcfg, "messages")], list):
        return "messages"
    if has("conversations") and isinstance(row[col(dcfg, "conversations")], list):
        return "sharegpt"
    if has("instruction") and has("output"):
        return "alpaca"
    if has("text") and has("label"):
        return "classification"
    if has("text"):
        return "text"
    raise DatasetError(f"Row 1 matches no known format (it has columns {', '.join(map(str, row))}); use "
                       f"instruction/input/output, conversations, messages, text or text+label, or map yours with "
                       f"data.columns, e.g. {{instruction: question, output: answer}}.")


def to_messages(row: dict, fmt: str, dcfg: DataConfig) -> list[dict] | str:
    """A row as [{"role", "content"}] (the system prompt first if configured), or a str for the text format."""
    if fmt == "text":
        return str(row[col(dcfg, "text")])
    if fmt == "alpaca":
        prompt = str(row[col(dcfg, "instruction")]).strip()
        extra = row.get(col(dcfg, "input"))
        if extra not in (None, ""):
            prompt = f"{prompt}\n\n{str(extra).strip()}"
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(row[col(dcfg, "output")])}]
        if row.get(col(dcfg, "system")):
            msgs.insert(0, {"role": "system", "content": str(row[col(dcfg, "system")])})
    elif fmt == "classification":
        msgs = [{"role": "user", "content": str(row[col(dcfg, "text")])},
                {"role": "assistant", "content": str(row[col(dcfg, "label")])}]
    elif fmt in ("sharegpt", "messages"):
        key, rk, ck = ((col(dcfg, "conversations"), "from", "value") if fmt == "sharegpt"
                       else (col(dcfg, "messages"), "role", "content"))
        turns = row[key]
        if not isinstance(turns, list):
            raise DatasetError(f"{key} must be a list of turns, got {type(turns).__name__}.")
        msgs = []
        for t in turns:
            if not isinstance(t, dict) or rk not in t or ck not in t:
                raise DatasetError(f"each turn in {key} needs {rk!r} and {ck!r} keys; got {t!r:.80}.")
            role = ROLES.get(str(t[rk]).lower())
            if role is None:
                raise DatasetError(f"unknown role {t[rk]!r} in {key}; use {', '.join(sorted(ROLES))}.")
            msgs.append({"role": role, "content": "" if t[ck] is None else str(t[ck])})
    else:
        raise DatasetError(f"Unknown format {fmt!r}; use one of {', '.join(FORMATS)}.")
    if dcfg.system_prompt and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": dcfg.system_prompt})
    return msgs


def _segments(i: int, row: dict, fmt: str, dcfg: DataConfig, tokenizer: Any) -> list[tuple[str, bool]]:
    """Rendered (text, trained) segments of row i (1-based), errors prefixed with the row number."""
    try:
        content = to_messages(row, fmt, dcfg)
        if isinstance(content, str):
            return text_segments(content, tokenizer)
        return chat_segments(content, tokenizer)
    except DatasetError as e:
        msg = str(e)
        raise DatasetError(msg if msg.startswith("Row ") else f"Row {i}: {msg[0].lower()}{msg[1:]}") from None


def _examples(rows: list[dict], fmt: str, dcfg: DataConfig, tokenizer: Any) -> tuple[list[dict], dict]:
    """Tokenized examples (with their 1-based row number) and counts; rows with nothing to train are dropped."""
    out, truncated, dropped = [], 0, 0
    for i, row in enumerate(rows, 1):
        ex = tokenize_segments(_segments(i, row, fmt, dcfg, tokenizer), tokenizer, dcfg.max_length)
        truncated += ex.pop("truncated")
        if all(y == IGNORE for y in ex["labels"]):
            dropped += 1
            continue
        ex["row"] = i
        out.append(ex)
    return out, {"rows": len(rows), "truncated": truncated, "dropped": dropped}


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) indices: a seeded shuffle picks round(n * eval_fraction) eval items (>= 1 if asked)."""
    if eval_fraction <= 0 or n < 2:
        return list(range(n)), []
    if eval_fraction >= 1:
        raise DatasetError(f"data.eval_fraction must be below 1 (got {eval_fraction}); use e.g. 0.1.")
    k = min(n - 1, max(1, round(n * eval_fraction)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[k:]), sorted(order[:k])


def build_datasets(dcfg: DataConfig, tokenizer: Any, seed: int = 42) -> DataSplits:
    """Load, detect, render and split a dataset; pack the splits if dcfg.packing."""
    rows = load_rows(dcfg)
    fmt = detect_format(rows, dcfg)
    examples, stats = _examples(rows, fmt, dcfg, tokenizer)
    if not examples:
        raise DatasetError(f"No example of {dcfg.path!r} has a trained token within data.max_length="
                           f"{dcfg.max_length}; raise max_length or check the assistant replies.")
    train_idx, eval_idx = split_indices(len(examples), dcfg.eval_fraction, seed)
    train = [_strip(examples[i]) for i in train_idx]
    evals = [_strip(examples[i]) for i in eval_idx]
    stats.update(examples=len(examples), train_examples=len(train), eval_examples=len(evals),
                 tokens=sum(len(e["input_ids"]) for e in examples),
                 trained_tokens=sum(sum(y != IGNORE for y in e["labels"]) for e in examples),
                 max_tokens=max(len(e["input_ids"]) for e in examples))
    if dcfg.packing:
        train, evals = pack(train, dcfg.max_length), pack(evals, dcfg.max_length)
        stats.update(packed_train=len(train), packed_eval=len(evals))
    return DataSplits(train=train, eval=evals, format=fmt, stats=stats)


def _strip(ex: dict) -> dict:
    return {"input_ids": ex["input_ids"], "labels": ex["labels"]}


def preview(dcfg: DataConfig, tokenizer: Any, n: int = 3) -> list[dict]:
    """The first n examples as highlighted segments, with the detected format and counts.

    Each item: {"row", "format", "rows", "segments": [{"text", "trained"}], "tokens", "trained_tokens",
    "truncated"}. Problems raise DatasetError.
    """
    rows = load_rows(dcfg)
    fmt = detect_format(rows, dcfg)
    out = []
    for i, row in enumerate(rows[:max(0, n)], 1):
        ex = tokenize_segments(_segments(i, row, fmt, dcfg, tokenizer), tokenizer, dcfg.max_length)
        out.append({"row": i, "format": fmt, "rows": len(rows), "segments": segments_of(ex, tokenizer),
                    "tokens": len(ex["input_ids"]), "trained_tokens": sum(y != IGNORE for y in ex["labels"]),
                    "truncated": ex["truncated"]})
    return out
