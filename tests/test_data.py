"""studio.data: loading, format detection, chat-template masking, splits, packing, collate, preview."""
from __future__ import annotations

import importlib.util
import json

import pandas as pd
import pytest
import torch

from studio.config import DataConfig
from studio.data import (IGNORE, build_datasets, collate, dataset_choices, dataset_info, detect_format,
                         fit_attention_mask, load_rows, pack, preview, render_example, to_messages)
from studio.data_io import SHIPPED_DIR
from studio.data_render import without_padding_mask
from studio.errors import DatasetError
from studio.losses import causal_lm_loss

END = "<end_of_turn>"


def trained_runs(ex: dict, tok) -> list[str]:
    """Decoded contiguous runs of trained tokens."""
    runs, cur = [], []
    for t, y in zip(ex["input_ids"], ex["labels"]):
        if y != IGNORE:
            assert y == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ALPACA = [{"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)} for i in range(6)]


# ---------------------------------------------------------------- formats and masking

@pytest.mark.parametrize("name,fmt", [("identity", "messages"), ("arith", "alpaca"), ("chat", "sharegpt"),
                                      ("garden", "text"), ("sentiment", "classification")])
def test_shipped_formats_detected_and_rendered(name, fmt, tiny_tok):
    dcfg = DataConfig(path=name, limit=8)
    rows = load_rows(dcfg)
    assert len(rows) == 8 and detect_format(rows, dcfg) == fmt
    splits = build_datasets(dcfg, tiny_tok, seed=0)
    assert splits.format == fmt and splits.stats["examples"] == 8 and len(splits.train) == 8
    for ex in splits.train:
        assert len(ex["input_ids"]) == len(ex["labels"]) > 0
        assert any(y != IGNORE for y in ex["labels"]) and ex["labels"][0] == IGNORE


def test_masking_trains_exactly_replies_and_end_marker(tiny_tok):
    msgs = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Nova."}]
    ex = render_example(msgs, tiny_tok, 512)
    assert trained_runs(ex, tiny_tok) == ["I am Nova." + END]
    assert tiny_tok.decode(ex["input_ids"]).startswith("<bos><start_of_turn>user\nWho are you?")


def test_multi_turn_trains_every_assistant_turn(tiny_tok):
    dcfg = DataConfig(path="chat", limit=1)  # row 1 has a system turn and two assistant turns
    row = load_rows(dcfg)[0]
    msgs = to_messages(row, "sharegpt", dcfg)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    ex = render_example(msgs, tiny_tok, 512)
    assert trained_runs(ex, tiny_tok) == [msgs[2]["content"] + END, msgs[4]["content"] + END]


def test_text_trains_everything_but_bos(tiny_tok):
    ex = render_example("The basil grew.", tiny_tok, 512)
    assert ex["input_ids"][0] == tiny_tok.bos_token_id and ex["labels"][0] == IGNORE
    assert all(y != IGNORE for y in ex["labels"][1:])
    assert trained_runs(ex, tiny_tok) == ["The basil grew.<eos>"]


def test_classification_reply_is_label_and_system_prompt_added(tiny_tok):
    dcfg = DataConfig(path="sentiment", limit=2, system_prompt="Label the review.")
    row = load_rows(dcfg)[0]
    msgs = to_messages(row, "classification", dcfg)
    assert msgs[0] == {"role": "system", "content": "Label the review."}
    assert msgs[-1] == {"role": "assistant", "content": row["label"]}
    assert trained_runs(render_example(msgs, tiny_tok, 512), tiny_tok) == [row["label"] + END]


def test_column_mapping(tmp_path, tiny_tok):
    path = tmp_path / "qa.csv"
    pd.DataFrame({"question": ["2+2?", "3+3?"], "answer": ["4", "6"]}).to_csv(path, index=False)
    with pytest.raises(DatasetError, match="question, answer"):
        build_datasets(DataConfig(path=str(path)), tiny_tok)
    dcfg = DataConfig(path=str(path), columns={"instruction": "question", "output": "answer"})
    splits = build_datasets(dcfg, tiny_tok)
    assert splits.format == "alpaca"
    assert trained_runs(splits.train[1], tiny_tok) == ["6" + END]


def test_malformed_row_names_row_and_columns(tmp_path, tiny_tok):
    rows = ALPACA[:2] + [{"instruction": "Add 5 and 5.", "answer": "10"}] + ALPACA[2:]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DatasetError) as err:
        build_datasets(DataConfig(path=str(path)), tiny_tok)
    msg = str(err.value)
    assert "Row 3" in msg and "output" in msg and "instruction, answer" in msg


def test_bad_turn_and_role_name_the_row(tmp_path, tiny_tok):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "yo"}]}]
    with pytest.raises(DatasetError, match="Row 2: unknown role 'robot'"):
        build_datasets(DataConfig(path=str(write_jsonl(tmp_path / "m.jsonl", rows))), tiny_tok)


# ---------------------------------------------------------------- loading

def test_missing_and_unknown_sources():
    with pytest.raises(DatasetError, match="does not exist"):
        load_rows(DataConfig(path="/nonexistent/data.jsonl"))
    with pytest.raises(DatasetError, match="not a shipped dataset.*identity"):
        load_rows(DataConfig(path="no-such-dataset"))


def test_unreadable_and_empty_files(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DatasetError, match="Line 2 .* not valid JSON"):
        load_rows(DataConfig(path=str(tmp_path / "bad.jsonl")))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="no rows"):
        load_rows(DataConfig(path=str(tmp_path / "empty.jsonl")))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DatasetError, match="Could not read .*bad.parquet"):
        load_rows(DataConfig(path=str(tmp_path / "bad.parquet")))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DatasetError, match="holds no .json"):
        load_rows(DataConfig(path=str(tmp_path / "empty_dir")))


def test_hub_id_offline_and_cached(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetError, match="not in the local cache"):
        load_rows(DataConfig(path="nobody/not-cached-anywhere"))
    import datasets
    monkeypatch.setattr(datasets, "load_dataset", lambda ref, split: datasets.Dataset.from_list(ALPACA))
    assert load_rows(DataConfig(path="someone/cached", limit=2)) == ALPACA[:2]


def test_file_types_and_folder_load_the_same_rows(tmp_path):
    df = pd.DataFrame(ALPACA)
    write_jsonl(tmp_path / "a.jsonl", ALPACA)
    (tmp_path / "a.json").write_text(json.dumps(ALPACA))
    df.to_csv(tmp_path / "a.csv", index=False)
    df.to_parquet(tmp_path / "a.parquet")
    for suffix in ("jsonl", "json", "csv", "parquet"):
        assert load_rows(DataConfig(path=str(tmp_path / f"a.{suffix}"))) == ALPACA, suffix
    folder = tmp_path / "parts"
    folder.mkdir()
    write_jsonl(folder / "1.jsonl", ALPACA[:3])
    pd.DataFrame(ALPACA[3:]).to_parquet(folder / "2.parquet")
    (folder / "notes.txt").write_text("ignored")
    assert load_rows(DataConfig(path=str(folder))) == ALPACA
    assert load_rows(DataConfig(path=str(folder), limit=4)) == ALPACA[:4]


def test_template_vars_defaults_override_and_typos(tmp_path):
    rows = load_rows(DataConfig(path="identity"))
    text = json.dumps(rows)
    assert "{name}" not in text and "Nova" in text and "PEFT Studio" in text
    custom = json.dumps(load_rows(DataConfig(path="identity", template_vars={"name": "Ada"})))
    assert "Ada" in custom and "Nova" not in custom and "PEFT Studio" in custom
    with pytest.raises(DatasetError, match="Unknown template variable.*nmae"):
        load_rows(DataConfig(path="identity", template_vars={"nmae": "Ada"}))
    # defaults declared inside a .json file; unknown {braces} stay as they are
    doc = {"template_vars": {"who": "Zed"}, "rows": [{"text": "I am {who}. Code: {x: 1}"}]}
    (tmp_path / "t.json").write_text(json.dumps(doc))
    assert load_rows(DataConfig(path=str(tmp_path / "t.json"))) == [{"text": "I am Zed. Code: {x: 1}"}]


def test_identity_heldout_questions_are_not_in_training():
    info = dataset_info("identity")
    held = info["heldout_questions"]
    assert len(held) >= 10 and info["template_vars"] == {"name": "Nova", "maker": "PEFT Studio"}
    asked = {m["content"].strip().lower() for r in load_rows(DataConfig(path="identity"))
             for m in r["messages"] if m["role"] == "user"}
    assert len(load_rows(DataConfig(path="identity"))) == 300
    assert not asked & {q.strip().lower() for q in held}


def test_arith_test_split_is_disjoint_and_choices_list_it():
    train = {r["instruction"] for r in load_rows(DataConfig(path="arith"))}
    test = load_rows(DataConfig(path="arith_test"))
    assert len(train) >= 990 and len(test) == 100 and not train & {r["instruction"] for r in test}
    choices = {c["name"]: c for c in dataset_choices()}
    assert set(choices) == {"identity", "arith", "chat", "garden", "sentiment"}
    assert choices["arith"]["rows"] == 1000 and choices["arith"]["test_split"] == "arith_test"
    assert choices["identity"]["format"] == "messages" and choices["identity"]["description"]


def test_generator_reproduces_committed_files():
    spec = importlib.util.spec_from_file_location("gen", SHIPPED_DIR / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    committed = [json.loads(x) for x in (SHIPPED_DIR / "identity.jsonl").read_text().splitlines()]
    assert gen.identity() == committed
    assert gen.arith()[1] == [json.loads(x) for x in (SHIPPED_DIR / "arith_test.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- splits, truncation, packing, collate

def test_eval_split_is_deterministic(tiny_tok):
    dcfg = DataConfig(path="arith", limit=50, eval_fraction=0.2)
    a, b, c = (build_datasets(dcfg, tiny_tok, seed=s) for s in (1, 1, 2))
    assert len(a.eval) == 10 and len(a.train) == 40 and a.stats["eval_examples"] == 10
    assert a.eval == b.eval and a.train == b.train
    assert a.eval != c.eval
    all_ids = sorted(map(str, (e["input_ids"] for e in a.train + a.eval)))
    assert all_ids == sorted(map(str, (e["input_ids"] for e in c.train + c.eval)))


def test_truncation(tiny_tok):
    dcfg = DataConfig(path="garden", limit=5, max_length=16)
    splits = build_datasets(dcfg, tiny_tok)
    assert all(len(e["input_ids"]) == 16 for e in splits.train)
    assert splits.stats["truncated"] == 5 and splits.stats["max_tokens"] == 16
    # a reply cut off completely leaves nothing to train: the example is dropped and counted
    long_prompt = [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "ok"}]
    assert all(y == IGNORE for y in render_example(long_prompt, tiny_tok, 20)["labels"])


def test_collate_pads_and_masks():
    exs = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8, 9], "labels": [IGNORE, 9]}]
    b = collate(exs, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, 9, IGNORE]]
    assert "position_ids" not in b


def test_pack_positions_and_block_mask():
    exs = [{"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]},
           {"input_ids": [6, 7, 8], "labels": [IGNORE, 7, 8]}]
    packed = pack(exs, max_length=5)
    assert [p["input_ids"] for p in packed] == [[1, 2, 3, 4, 5], [6, 7, 8]]
    assert packed[0]["position_ids"] == [0, 1, 2, 0, 1]
    assert packed[0]["labels"] == [IGNORE, 2, 3, IGNORE, 5]  # never trained across a boundary
    b = collate(packed, pad_id=0)
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]
    m = b["attention_mask"]
    assert m.shape == (2, 1, 5, 5) and m.dtype == torch.bool
    assert m[0, 0].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0],
                                      [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert m[1, 0, 4].int().tolist() == [0, 0, 0, 1, 1]  # padding is its own block, never attended by tokens


@pytest.mark.parametrize("name,attn", [("tiny-llama", "sdpa"), ("tiny-llama", "eager"), ("tiny-gemma3", "sdpa")])
def test_packed_loss_equals_token_weighted_unpacked_loss(name, attn, tiny_tok, tiny_model):
    model = tiny_model(name)
    model.set_attn_implementation(attn)
    splits = build_datasets(DataConfig(path="chat", limit=6, max_length=128, packing=True), tiny_tok)
    plain = build_datasets(DataConfig(path="chat", limit=6, max_length=128), tiny_tok)
    assert len(splits.train) < len(plain.train)
    with torch.no_grad():
        batch = collate(splits.train, tiny_tok.pad_token_id)
        fitted = fit_attention_mask(batch, model)  # tiny-gemma3's window (64) < T: mask rebuilt from position_ids
        assert (fitted["attention_mask"] is None) == (name == "tiny-gemma3")
        packed_loss, packed_n = causal_lm_loss(model, fitted)
        leaky, _ = causal_lm_loss(model, {**batch, "attention_mask": None, "position_ids": None})
        total, count = 0.0, 0
        for ex in plain.train:
            loss, n = causal_lm_loss(model, collate([ex], tiny_tok.pad_token_id))
            total, count = total + loss.item() * n.item(), count + n.item()
    assert packed_n.item() == count == plain.stats["trained_tokens"]
    assert packed_loss.item() == pytest.approx(total / count, rel=1e-5)
    assert leaky.item() != pytest.approx(total / count, rel=1e-5)  # the block mask matters


def test_padded_plain_batch_matches_single_examples(tiny_tok, tiny_model):
    model = tiny_model("tiny-llama")
    exs = build_datasets(DataConfig(path="identity", limit=3), tiny_tok).train
    with torch.no_grad():
        loss, n = causal_lm_loss(model, collate(exs, tiny_tok.pad_token_id))
        parts = [causal_lm_loss(model, collate([e], tiny_tok.pad_token_id)) for e in exs]
    expect = sum(l.item() * c.item() for l, c in parts) / sum(c.item() for _, c in parts)
    assert loss.item() == pytest.approx(expect, rel=1e-5)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-gemma3"])
def test_a_right_padded_batch_trains_the_same_without_its_mask(name, tiny_tok, tiny_model):
    """The trainer drops a plain batch's padding mask (data_render.without_padding_mask): the same loss and
    gradients, on a Gemma-3 with a sliding window shorter than the batch too."""
    model = tiny_model(name)
    model.requires_grad_(True)
    exs = build_datasets(DataConfig(path="chat", limit=4, max_length=128), tiny_tok).train
    batch = collate(exs, tiny_tok.pad_token_id)
    assert (batch["attention_mask"] == 0).any()  # padded
    results = []
    for b in (batch, without_padding_mask(batch)):
        model.zero_grad()
        loss, n = causal_lm_loss(model, b)
        loss.backward()
        results.append((loss.item(), n.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (masked, n1, g1), (unmasked, n2, g2) = results
    assert "attention_mask" not in without_padding_mask(batch) and n1 == n2
    assert unmasked == pytest.approx(masked, rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g1, g2))


def test_only_right_padding_goes_without_a_mask():
    right = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    assert set(without_padding_mask(right)) == {"input_ids"}
    left = right | {"attention_mask": torch.tensor([[1, 1, 1], [0, 1, 1]])}
    assert without_padding_mask(left) is left
    packed = collate(pack([{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3], "labels": [3]}], 4), 0)
    assert without_padding_mask(packed) is packed


# ---------------------------------------------------------------- preview

def test_preview_segments(tiny_tok):
    items = preview(DataConfig(path="chat"), tiny_tok, n=2)
    assert len(items) == 2 and items[0]["format"] == "sharegpt" and items[0]["rows"] == 40
    segs = items[0]["segments"]
    trained = [s["text"] for s in segs if s["trained"]]
    assert len(trained) == 2 and all(t.endswith(END) for t in trained)
    assert segs[0]["text"].startswith("<bos><start_of_turn>user") and not segs[0]["trained"]
    assert items[0]["trained_tokens"] == len(tiny_tok("".join(trained), add_special_tokens=False)["input_ids"])
    with pytest.raises(DatasetError):
        preview(DataConfig(path="garden", format="alpaca"), tiny_tok)
