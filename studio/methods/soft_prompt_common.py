"""Shared plumbing of the soft-prompt methods: virtual tokens / prefix key-values on the decoder body.

Both kinds hook the *decoder body* (`model.get_decoder()`), not the causal-LM wrapper, so they act the
same whether the body is called by our trainer (losses.py calls it directly, use_cache=False), by
`model(...)`, or by `model.generate(...)` with its KV cache:

- prompt embeddings (prompt tuning, P-tuning): on the first call of a sequence (no cache, or an empty
  one) `input_ids` become `inputs_embeds` with the n virtual embeddings prepended; the virtual
  positions are cut from `last_hidden_state` again on the way out, so callers see T positions. Later
  decoding steps find the virtual tokens in the cache.
- prefix key-values (prefix tuning, P-tuning v2): the body gets a transformers Cache pre-filled with
  n key/value vectors per layer (no rotary embedding is applied to them: they never pass through the
  attention's projection). With use_cache=False (training) the cache is read-only, so a layer re-run
  under gradient checkpointing sees the same prefix; with a cache from `generate` the prefix is
  written into that cache once, before the prompt.

Virtual tokens are invisible to callers: a 2-D attention mask from a caller never includes them, so
n ones are always prepended; explicit `position_ids` (generate passes them) are shifted by n, which
is what the model computes itself when it is given none (positions n..n+T-1 for the real tokens,
as peft does).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .common import decoder_layers

BODY_ARGS = ("input_ids", "attention_mask", "position_ids", "cache", "inputs_embeds", "use_cache")


def body_of(model: nn.Module) -> nn.Module:
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if body is None:
        raise ConfigError("Soft prompts need a decoder-only causal LM (model.get_decoder()); this model has none.")
    return body


def text_config(model: nn.Module):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def kv_geometry(model: nn.Module) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of the decoder; grouped-query models use their kv head count."""
    c = text_config(model)
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return c.num_hidden_layers, kv_heads, head_dim


def _normalise(args: tuple, kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    for name, value in zip(BODY_ARGS, args):
        kwargs[name] = value
    if "past_key_values" in kwargs:  # deprecated name of `cache` in transformers 5
        pkv = kwargs.pop("past_key_values")
        if kwargs.get("cache") is None:
            kwargs["cache"] = pkv
    return kwargs


def _batch_size(kwargs: dict) -> int:
    x = kwargs.get("inputs_embeds")
    x = x if x is not None else kwargs.get("input_ids")
    if x is None:
        raise ConfigError("The decoder was called without input_ids or inputs_embeds.")
    return x.shape[0]


def _extend_mask_and_positions(kwargs: dict, n: int, first: bool) -> None:
    mask = kwargs.get("attention_mask")
    if isinstance(mask, dict) or (isinstance(mask, torch.Tensor) and mask.dim() != 2):
        raise ConfigError("Soft prompts need a 2-D attention mask (0/1 per token): they cannot train on packed "
                          "batches (set data.packing false) or with static / compiled caches that pre-build 4-D "
                          "masks (use the default dynamic cache).")
    if mask is not None:
        ones = torch.ones(mask.shape[0], n, dtype=mask.dtype, device=mask.device)
        kwargs["attention_mask"] = torch.cat([ones, mask], dim=1)
    pos = kwargs.get("position_ids")
    if pos is not None:
        shifted = pos + n
        if first and kwargs.get("_prepend_positions"):
            lead = torch.arange(n, device=pos.device, dtype=pos.dtype).expand(*pos.shape[:-1], n)
            shifted = torch.cat([lead, shifted], dim=-1)
        kwargs["position_ids"] = shifted
    kwargs.pop("_prepend_positions", None)


class PromptHook:
    """Prepends virtual token embeddings produced by `source()` ((n, d) tensor) to the input embeddings."""

    def __init__(self, model: nn.Module, source: nn.Module):
        self.source = source
        self.embed = model.get_input_embeddings()
        self.injected: list[bool] = []
        body = body_of(model)
        self.handles = [body.register_forward_pre_hook(self.pre, with_kwargs=True),
                        body.register_forward_hook(self.post, with_kwargs=True)]

    def pre(self, body: nn.Module, args: tuple, kwargs: dict):
        if not self.source.adapter_enabled:
            self.injected.append(False)
            return None
        kwargs = _normalise(args, kwargs)
        cache = kwargs.get("cache")
        first = cache is None or cache.get_seq_length() == 0
        n = self.source.num_virtual_tokens
        if first:
            embeds = kwargs.get("inputs_embeds")
            if embeds is None:
                embeds = self.embed(kwargs["input_ids"])
            prompts = self.source().to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
            kwargs["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)
            kwargs["input_ids"] = None
            kwargs["_prepend_positions"] = True
        _extend_mask_and_positions(kwargs, n, first)
        self.injected.append(first)
        return (), kwargs

    def post(self, body: nn.Module, args: tuple, kwargs: dict, output):
        if not (self.injected.pop() if self.injected else False):
            return None
        n = self.source.num_virtual_tokens
        if isinstance(output, tuple):
            return (output[0][:, n:],) + tuple(output[1:])
        output.last_hidden_state = output.last_hidden_state[:, n:]
        return output

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _prefix_cache_class():
    from transformers import DynamicCache

    class PrefixCache(DynamicCache):
        """A DynamicCache holding the prefix; read-only when `readonly` (training without a KV cache)."""
        readonly = False

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            if not self.readonly:
                return super().update(key_states, value_states, layer_idx, *args, **kwargs)
            layer = self.layers[layer_idx]
            return (torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2))

    return PrefixCache


class PrefixHook:
    """Feeds per-layer prefix keys/values ((n, L*2*kv_dim) from `source()`) through the model's KV cache."""

    def __init__(self, model: nn.Module, source: nn.Module):
        self.source = source
        self.model = model
        self.layers = list(decoder_layers(model))
        self.config = text_config(model)
        self.geometry = kv_geometry(model)
        self.cache_cls = _prefix_cache_class()
        self.readonly_calls: list[bool] = []
        body = body_of(model)
        self.handles = [body.register_forward_pre_hook(self.pre, with_kwargs=True),
                        body.register_forward_hook(self.post, with_kwargs=True)]

    def key_values(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (key, value), each (batch, kv_heads, n, head_dim); layout per token: layer, k|v, head, dim."""
        layers, kv_heads, head_dim = self.geometry
        flat = self.source().to(dtype)                                   # (n, L*2*kv_dim)
        n = flat.shape[0]
        kv = flat.view(n, layers * 2, kv_heads, head_dim).permute(1, 2, 0, 3)  # (L*2, kvh, n, hd)
        kv = kv.unsqueeze(1).expand(-1, batch, -1, -1, -1)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(layers)]

    def fill(self, cache, batch: int, dtype: torch.dtype) -> None:
        for i, (k, v) in enumerate(self.key_values(batch, dtype)):
            cache.update(k, v, i)

    def pre(self, body: nn.Module, args: tuple, kwargs: dict):
        if not self.source.adapter_enabled:
            self.readonly_calls.append(False)
            return None
        kwargs = _normalise(args, kwargs)
        cache = kwargs.get("cache")
        batch = _batch_size(kwargs)
        dtype = next(body.parameters()).dtype
        readonly = False
        if cache is None:
            use_cache = kwargs.get("use_cache")
            use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
            cache = self.cache_cls(config=self.config)
            self.fill(cache, batch, dtype)
            cache.readonly = readonly = not use_cache
            kwargs["cache"] = cache
        elif cache.get_seq_length() == 0:
            self.fill(cache, batch, dtype)
        if readonly:  # the cache is only read: a layer re-run by gradient checkpointing may keep it
            for layer in self.layers:
                layer._can_checkpoint_with_cache = True
        self.readonly_calls.append(readonly)
        _extend_mask_and_positions(kwargs, self.source.num_virtual_tokens, first=False)
        return (), kwargs

    def post(self, body: nn.Module, args: tuple, kwargs: dict, output):
        if self.readonly_calls and self.readonly_calls.pop():
            for layer in self.layers:
                layer.__dict__.pop("_can_checkpoint_with_cache", None)
            if not isinstance(output, tuple) and getattr(output, "cache", None) is not None:
                output.cache = None  # the read-only prefix cache is not a cache the caller asked for
        return None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class PromptTable(nn.Module):
    """A (rows x width) table returned as is: what peft saves as `prompt_embeddings`."""

    def __init__(self, rows: int, width: int, device=None):
        super().__init__()
        self.embedding = nn.Embedding(rows, width, device=device, dtype=torch.float32)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


class SoftPromptSource(nn.Module):
    """The trainable part of a soft-prompt method; `forward()` gives the (n, width) tensor it injects.

    `encoder` is the training-time reparameterisation (P-tuning's MLP/LSTM, prefix tuning's MLP); after
    `freeze_to_table()` (loading a saved adapter) only the table with the encoder's output remains.
    """

    def __init__(self, num_virtual_tokens: int, table: nn.Module, encoder: nn.Module | None = None):
        super().__init__()
        if num_virtual_tokens < 1:
            raise ConfigError(f"num_virtual_tokens must be at least 1, got {num_virtual_tokens}.")
        self.num_virtual_tokens = num_virtual_tokens
        self.table = table
        self.encoder = encoder
        self.adapter_enabled = True

    def forward(self) -> torch.Tensor:
        x = self.table()
        return self.encoder(x) if self.encoder is not None else x

    @torch.no_grad()
    def freeze_to_table(self, values: torch.Tensor) -> None:
        """Replace the source by a plain table holding `values` (what a saved adapter stores)."""
        n, width = values.shape
        if n != self.num_virtual_tokens:
            raise ConfigError(f"The adapter has {n} virtual tokens, this config {self.num_virtual_tokens}; "
                              f"load it with its own adapter_config.json.")
        device = next(self.parameters()).device
        table = PromptTable(n, width, device=device)
        table.embedding.weight.copy_(values.to(device, torch.float32))
        self.table = table
        self.encoder = None


def soft_prompt_summary(source: SoftPromptSource) -> dict:
    return {"virtual_tokens": source.num_virtual_tokens,
            "reparameterised": source.encoder is not None}


def prompt_embeddings_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter file of every soft prompt: what the encoder produces now (peft's `prompt_embeddings`)."""
    with torch.no_grad():
        return {"prompt_embeddings": model.prompt_encoder().detach().float()}


def load_prompt_embeddings(model: nn.Module, state: dict[str, torch.Tensor], width: int, kind: str,
                           needs: str) -> None:
    """Replace the soft prompt's source by the saved table (n x width); `needs` explains the width."""
    if "prompt_embeddings" not in state:
        raise ConfigError(f"This adapter has no prompt_embeddings tensor (found {sorted(state)[:3]}); it is not a "
                          f"{kind} adapter.")
    value = state["prompt_embeddings"]
    if value.dim() != 2 or value.shape[1] != width:
        raise ConfigError(f"prompt_embeddings has shape {tuple(value.shape)}; this model needs (n, {width}){needs}. "
                          f"The adapter was trained on another base model.")
    model.prompt_encoder.freeze_to_table(value)
    for p in model.prompt_encoder.parameters():
        p.requires_grad_(True)
