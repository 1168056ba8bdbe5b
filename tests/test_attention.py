"""Varlen attention for packed batches equals the block-diagonal mask, on every tiny architecture."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from studio import attention
from studio.attention import Segments, packed_kwargs, use_varlen_attention
from studio.config import ModelConfig
from studio.data import collate, fit_attention_mask, pack
from studio.losses import causal_lm_loss
from studio.models import load_model


def test_segments_tile_each_row_and_give_flat_offsets():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    seg = Segments.from_position_ids(pos)
    assert seg.spans == ((0, 0, 3), (0, 3, 5), (0, 5, 6), (1, 0, 4), (1, 4, 6))
    assert seg.cu_seqlens.tolist() == [0, 3, 5, 6, 10, 12] and seg.max_len == 4 and seg.total == 12


def _packed_batch(lengths: list[int], max_length: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(5, 500, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": list(ids)})
    return collate(pack(examples, max_length), pad_id=0)


def _loss_and_grads(model, batch):
    model.zero_grad()
    batch = fit_attention_mask(batch, model)
    loss, _ = causal_lm_loss(model, batch | packed_kwargs(batch, model))
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2", "tiny-gemma3"])
def test_varlen_attention_equals_the_block_mask(arch):
    model, _ = load_model(ModelConfig(name=arch, device="cpu"))
    for p in model.parameters():
        p.requires_grad_(True)
    # rows of several examples plus padding; tiny-gemma3's window is 64, so the 90-token example
    # exercises a sliding layer inside one segment
    batch = _packed_batch([20, 35, 9, 90, 14, 3, 40], max_length=128)
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    assert use_varlen_attention(model)
    calls = []
    original = attention._per_segment
    attention._per_segment = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        loss, grads = _loss_and_grads(model, batch)
    finally:
        attention._per_segment = original
    assert calls, "the segments did not reach the attention function"
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-5, rtol=1e-4, msg=k)


def test_without_segments_or_with_longer_keys_it_is_plain_sdpa():
    torch.manual_seed(0)

    class Module(torch.nn.Module):
        is_causal = True
    q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)  # 3 prefix keys
    mask = torch.ones(1, 1, 6, 9, dtype=torch.bool).tril(3)
    seg = Segments.from_position_ids(torch.tensor([[0, 1, 2, 0, 1, 2]]))
    out, _ = attention.varlen_attention_forward(Module(), q, k, v, mask, studio_segments=seg)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    torch.testing.assert_close(out, ref)


def _reference_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                           enable_gqa=False, **_):
    """torch.nn.attention.varlen.varlen_attn's documented semantics, on the CPU (T x H x D layout)."""
    left = window_size[0]
    out = []
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        n = e - s
        i = torch.arange(n)
        mask = i[:, None] >= i[None, :]
        if left >= 0:
            mask &= i[:, None] - i[None, :] <= left
        o = F.scaled_dot_product_attention(*(x[s:e].transpose(0, 1)[None] for x in (q, k, v)), attn_mask=mask,
                                           scale=scale, enable_gqa=enable_gqa)
        out.append(o[0].transpose(0, 1))
    return torch.cat(out)


def _torch_2_11_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
    """torch 2.11's varlen_attn (the H200's): a window, no enable_gqa, so keys need every query head's."""
    assert k.shape[1] == q.shape[1], "grouped keys given to a varlen_attn without enable_gqa"
    return _reference_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size)


@pytest.mark.parametrize("kernel", [_reference_varlen_attn, _torch_2_11_varlen_attn], ids=["torch 2.13", "torch 2.11"])
@pytest.mark.parametrize("window", [None, 4])
def test_flash_varlen_layout_matches_per_segment(monkeypatch, window, kernel):
    """The CUDA path's flattening and offsets, checked against a CPU stand-in of the flash kernel; on a torch
    whose varlen_attn has no enable_gqa (2.11: a TypeError stopped packed training on the H200) the grouped
    key/value heads are repeated for their query heads, with the same output."""
    import torch.nn.attention.varlen as varlen
    monkeypatch.setattr(varlen, "varlen_attn", kernel)
    attention._varlen_takes.cache_clear()
    try:
        torch.manual_seed(0)
        q, k, v = torch.randn(2, 4, 10, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
        seg = Segments.from_position_ids(torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4, 5, 6, 7]]))
        flash = attention._flash_varlen(q, k, v, seg, 0.3, window, gqa=True)
        ref = attention._per_segment(q, k, v, seg, 0.3, window, gqa=True, dropout=0.0)
        torch.testing.assert_close(flash, ref)
    finally:
        attention._varlen_takes.cache_clear()


def test_packed_training_uses_varlen_and_matches_eager_masks(tmp_path):
    from studio.config import load_config
    from studio.rundir import RunDir
    from studio.runner import execute
    losses = {}
    for impl in ("sdpa", "eager"):  # eager keeps the block mask: the reference
        cfg = load_config(None, [f"model.attn_implementation={impl}", "model.name=tiny-llama", "model.device=cpu",
                                 "data.path=arith", "data.limit=120", "data.packing=true", "data.max_length=96",
                                 "train.batch_size=2", "train.max_steps=3", "method.lora_dropout=0.0"])
        rd = RunDir.create(tmp_path / impl, cfg)
        execute(rd, cfg)
        losses[impl] = [r["loss"] for r in rd.metrics()]
        assert ("varlen attention" in (rd.path / "events.log").read_text()) == (impl == "sdpa")
    assert losses["sdpa"] == pytest.approx(losses["eager"], rel=1e-4)


@pytest.mark.parametrize("method", [{"method.name": "prefix_tuning", "method.num_virtual_tokens": 4},
                                    {"method.name": "prompt_tuning", "method.num_virtual_tokens": 4,
                                     "method.prompt_tuning_init": "RANDOM"}])
def test_soft_prompt_methods_refuse_packing_with_a_clear_error(tmp_path, method):
    from studio.config import load_config
    from studio.errors import ConfigError
    from studio.rundir import RunDir
    from studio.runner import execute
    sets = {"model.name": "tiny-llama", "model.device": "cpu", "data.path": "arith", "data.limit": 40,
            "data.packing": True, "data.max_length": 96, "train.batch_size": 2, "train.max_steps": 1, **method}
    cfg = load_config(None, [f"{k}={v}" for k, v in sets.items()])
    rd = RunDir.create(tmp_path, cfg)
    with pytest.raises(ConfigError, match="data.packing false"):
        execute(rd, cfg)
    assert rd.status()["state"] == "failed" and "packing" in rd.status()["error"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_additive_mask_attends_where_the_block_mask_does(dtype):
    """What sdpa gets under CUDA autocast for a packed batch (one additive mask shared by the layers) gives
    the bool block mask's attention."""
    from studio.data_render import additive_mask, block_causal_mask
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1]])
    mask = block_causal_mask(pos)
    q, k, v = (torch.randn(2, 3, 8, 16, generator=torch.Generator().manual_seed(i)).to(dtype) for i in range(3))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask(mask, dtype))
    torch.testing.assert_close(got, want)
    assert additive_mask(mask, dtype).dtype == dtype

