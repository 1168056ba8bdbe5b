"""Variable-length ("varlen") attention for packed batches: each packed example attends only to itself.

A packed row holds several examples, their position_ids restarting at 0. The block-diagonal causal
mask is correct but costs attention over the whole row (T^2) and keeps sdpa off its flash kernel.
`studio_varlen` is registered with transformers' attention interface and, given the batch's segments,
runs attention per example instead: on CUDA one flash varlen call (torch.nn.attention.varlen), elsewhere
one causal sdpa call per segment. Without segments, or when keys and queries differ in length (prefix
methods add key/value vectors), it is plain sdpa with the batch's mask, so correctness never depends on
a model passing the segments through: the block mask stays in the batch as the fallback.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .data_render import fit_attention_mask

NAME = "studio_varlen"
_flash_ok = True  # cleared after the first failure of the flash varlen kernel (then per-segment sdpa)


@dataclass(frozen=True)
class Segments:
    """The examples of a packed batch: (row, start, end) spans tiling every row, and the same as
    cumulative offsets into the flattened B*T positions (what flash varlen kernels take)."""
    spans: tuple[tuple[int, int, int], ...]
    cu_seqlens: torch.Tensor  # int32, len(spans) + 1
    max_len: int
    total: int  # B * T

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor) -> "Segments":
        pos = position_ids.detach().cpu()
        b, t = pos.shape
        spans = []
        for row in range(b):
            starts = [0] + (torch.nonzero(pos[row, 1:] == 0).flatten() + 1).tolist()
            spans.extend((row, s, e) for s, e in zip(starts, starts[1:] + [t]))
        offsets = [0] + [row * t + e for row, _, e in spans]
        return cls(tuple(spans), torch.tensor(offsets, dtype=torch.int32), max(e - s for _, s, e in spans), b * t)

    def to(self, device: torch.device) -> "Segments":
        return Segments(self.spans, self.cu_seqlens.to(device), self.max_len, self.total)


def _window(module: nn.Module, kwargs: dict) -> int | None:
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    return int(window) if window else None


@functools.cache
def _varlen_takes() -> frozenset[str]:
    """The keyword arguments of this torch's varlen_attn (2.10: is_causal; 2.11: window_size, no enable_gqa)."""
    from torch.nn.attention.varlen import varlen_attn
    return frozenset(inspect.signature(varlen_attn).parameters)


def _flash_varlen(query, key, value, seg: Segments, scaling, window: int | None, gqa: bool) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn
    takes = _varlen_takes()
    if window and "window_size" not in takes:
        raise NotImplementedError("this torch's varlen_attn has no sliding window")
    b, hq, t, d = query.shape
    if gqa and "enable_gqa" not in takes:  # each key/value head repeated for the query heads it serves
        key, value = (x.repeat_interleave(hq // x.shape[1], dim=1) for x in (key, value))
    flat = [x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (query, key, value)]
    cu = seg.cu_seqlens.to(query.device)
    extra = {"window_size": (window - 1, 0) if window else (-1, 0)} if "window_size" in takes else {"is_causal": True}
    if gqa and "enable_gqa" in takes:
        extra["enable_gqa"] = True
    out = varlen_attn(*flat, cu, cu, seg.max_len, seg.max_len, scale=scaling, **extra)
    return out.view(b, t, hq, d)


def _per_segment(query, key, value, seg: Segments, scaling, window: int | None, gqa: bool,
                 dropout: float) -> torch.Tensor:
    pieces = []
    for row, start, end in seg.spans:
        n = end - start
        q, k, v = (x[row:row + 1, :, start:end] for x in (query, key, value))
        mask = None
        if window and n > window:  # a sliding layer: causal and at most `window` tokens back
            i = torch.arange(n, device=query.device)
            mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                             is_causal=mask is None and n > 1, enable_gqa=gqa)
        pieces.append(out[0].transpose(0, 1))  # n x H x D
    b, hq, t, d = query.shape
    return torch.cat(pieces).view(b, t, hq, d)


def varlen_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, studio_segments: Segments | None = None,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature; query B x Hq x T x D, key/value B x Hkv x S x D -> B x T x Hq x D."""
    seg = studio_segments
    b, _, t, _ = query.shape
    if seg is None or key.shape[2] != t or seg.total != b * t or kwargs.get("softcap") is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    window = _window(module, kwargs)
    global _flash_ok
    if _flash_ok and query.device.type == "cuda" and dropout == 0.0 and query.dtype in (torch.float16, torch.bfloat16):
        try:
            return _flash_varlen(query, key, value, seg, scaling, window, gqa), None
        except (RuntimeError, ImportError, NotImplementedError) as err:  # e.g. an older GPU or torch
            _flash_ok = False
            warnings.warn(f"flash varlen attention unavailable ({err}); packed attention runs per example.")
    return _per_segment(query, key, value, seg, scaling, window, gqa, dropout), None


def register() -> None:
    """Make `studio_varlen` a known attention implementation (its masks are built like sdpa's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_varlen_attention(model: nn.Module) -> bool:
    """Switch an sdpa model to `studio_varlen` for packed training; False (unchanged) when it cannot."""
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa" or getattr(config, "attn_logit_softcapping", None):
        return False
    register()
    model.set_attn_implementation(NAME)
    return True


def model_batch(batch: dict, model: nn.Module) -> dict:
    """A causal-LM batch as the model takes it: a packed batch's mask fitted to its attention kernel
    (data_render.fit_attention_mask) and, on a `studio_varlen` model, its segments."""
    batch = fit_attention_mask(batch, model)
    return batch | packed_kwargs(batch, model)


def packed_kwargs(batch: dict, model: nn.Module) -> dict:
    """Model keyword arguments for a packed batch on a `studio_varlen` model: its segments."""
    if batch.get("position_ids") is None or getattr(model.config, "_attn_implementation", None) != NAME:
        return {}
    return {"studio_segments": Segments.from_position_ids(batch["position_ids"])}
