"""Prompt tuning and P-tuning: n trainable virtual token embeddings prepended to the input embeddings.

Prompt tuning trains the (n x d) embeddings directly (init from a text's token embeddings, or from
randomly sampled vocabulary embeddings). P-tuning produces them with a prompt encoder (an MLP, or a
bidirectional LSTM followed by an MLP) from a trainable (n x d) input; only the encoder's output is
saved, as peft does, so a loaded P-tuning adapter is a plain table. Both hook the decoder body (see
soft_prompt_common.py) so training, `model(...)` and `generate` all see the virtual tokens.
Files are peft's PROMPT_TUNING / P_TUNING format: one tensor `prompt_embeddings` (n x d).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import opt
from ..errors import ConfigError
from . import register
from .base import Method, MethodConfig, applied
from .common import freeze_all
from .soft_prompt_common import PromptHook, PromptTable, SoftPromptSource, load_prompt_embeddings, \
    prompt_embeddings_state, soft_prompt_summary, text_config


@dataclass
class PromptTuningConfig(MethodConfig):
    num_virtual_tokens: int = opt(20, "Number of virtual tokens prepended to every input")
    prompt_tuning_init: str = opt("TEXT", "TEXT: embeddings of the init text; RANDOM: sampled vocabulary embeddings",
                                  ("TEXT", "RANDOM", "SAMPLE_VOCAB"))
    prompt_tuning_init_text: str = opt("Answer the following request helpfully.",
                                       "Init text for TEXT (its tokens are repeated or cut to num_virtual_tokens)")


@dataclass
class PTuningConfig(MethodConfig):
    num_virtual_tokens: int = opt(20, "Number of virtual tokens prepended to every input")
    encoder_reparameterization_type: str = opt("MLP", "Prompt encoder: MLP, or a bidirectional LSTM + MLP",
                                               ("MLP", "LSTM"))
    encoder_hidden_size: int = opt(128, "Hidden size of the prompt encoder")
    encoder_num_layers: int = opt(2, "LSTM layers (the MLP always has 3 linear layers)")
    encoder_dropout: float = opt(0.0, "Dropout inside the LSTM")


def _tokenizer_for(model: nn.Module):
    from ..config import ModelConfig
    from ..models import load_tokenizer
    ref = getattr(model, "studio_model_ref", None)
    if not ref:
        raise ConfigError("prompt_tuning_init=TEXT needs the model's tokenizer, but this model was not loaded by the "
                          "studio; set method.prompt_tuning_init=RANDOM or load it with studio.models.load_model.")
    return load_tokenizer(ModelConfig(name=ref))


def init_token_ids(model: nn.Module, cfg: PromptTuningConfig) -> torch.Tensor:
    """The n token ids whose embeddings start the prompt (text repeated/cut, or sampled from the vocabulary)."""
    n = cfg.num_virtual_tokens
    vocab = model.get_input_embeddings().num_embeddings
    if cfg.prompt_tuning_init == "TEXT":
        if not cfg.prompt_tuning_init_text.strip():
            raise ConfigError("prompt_tuning_init=TEXT needs a non-empty prompt_tuning_init_text.")
        ids = _tokenizer_for(model)(cfg.prompt_tuning_init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError("prompt_tuning_init_text tokenized to nothing; give a longer text.")
        ids = (ids * (n // len(ids) + 1))[:n]
        return torch.tensor(ids, dtype=torch.long)
    return torch.randint(0, vocab, (n,), dtype=torch.long)


class PromptEncoder(nn.Module):
    """P-tuning's reparameterisation of the virtual embeddings (same layer layout as peft's)."""

    def __init__(self, width: int, hidden: int, kind: str, num_layers: int, dropout: float, device=None):
        super().__init__()
        self.kind = kind
        if kind == "LSTM":
            self.lstm_head = nn.LSTM(width, hidden, num_layers=num_layers, dropout=dropout, bidirectional=True,
                                     batch_first=True, device=device)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden, device=device), nn.ReLU(),
                                          nn.Linear(2 * hidden, width, device=device))
        elif kind == "MLP":
            self.mlp_head = nn.Sequential(nn.Linear(width, hidden, device=device), nn.ReLU(),
                                          nn.Linear(hidden, hidden, device=device), nn.ReLU(),
                                          nn.Linear(hidden, width, device=device))
        else:
            raise ConfigError(f"encoder_reparameterization_type must be MLP or LSTM, got {kind!r}.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "LSTM":
            x = self.lstm_head(x.unsqueeze(0))[0].squeeze(0)
        return self.mlp_head(x)


class _PromptMethodBase(Method):
    category = "soft_prompt"
    mergeable = False
    promises_identity_at_init = False
    file_key_prefix = ""  # peft writes `prompt_embeddings` without the base_model.model. prefix

    def build_source(self, model: nn.Module, cfg) -> SoftPromptSource:
        raise NotImplementedError

    def apply(self, model: nn.Module, cfg) -> None:
        freeze_all(model)
        if getattr(model, "prompt_encoder", None) is not None:
            raise ConfigError("This model already carries a soft prompt; load a fresh base model.")
        source = self.build_source(model, cfg)
        model.add_module("prompt_encoder", source)
        for p in source.parameters():
            p.requires_grad_(True)
        hook = PromptHook(model, source)
        applied(model).extra = {"hook": hook}

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return prompt_embeddings_state(model)

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        load_prompt_embeddings(model, state, text_config(model).hidden_size, self.name, "")

    def adapter_config(self, model: nn.Module, cfg) -> dict:
        out = super().adapter_config(model, cfg)
        c = text_config(model)
        out.update(task_type="CAUSAL_LM", inference_mode=True, num_transformer_submodules=1,
                   token_dim=c.hidden_size, num_layers=c.num_hidden_layers,
                   num_attention_heads=c.num_attention_heads, modules_to_save=None,
                   base_model_name_or_path=getattr(model, "studio_model_ref", None))
        return out

    def trainable_summary(self, model: nn.Module) -> dict:
        return soft_prompt_summary(model.prompt_encoder)


class PromptTuningMethod(_PromptMethodBase):
    name = "prompt_tuning"
    graph_safe = True
    summary = "Trainable virtual token embeddings prepended to the input (only n x d parameters)."
    config_cls = PromptTuningConfig
    peft_type = "PROMPT_TUNING"

    def build_source(self, model: nn.Module, cfg: PromptTuningConfig) -> SoftPromptSource:
        embed = model.get_input_embeddings()
        ids = init_token_ids(model, cfg).to(embed.weight.device)
        with torch.no_grad():
            init = embed(ids).float()  # the model's own embedding (Gemma's scale included), as peft does
        table = PromptTable(cfg.num_virtual_tokens, init.shape[1], device=init.device)
        with torch.no_grad():
            table.embedding.weight.copy_(init)
        return SoftPromptSource(cfg.num_virtual_tokens, table)

    def adapter_config(self, model: nn.Module, cfg: PromptTuningConfig) -> dict:
        out = super().adapter_config(model, cfg)
        text = cfg.prompt_tuning_init == "TEXT"
        out.update(prompt_tuning_init=cfg.prompt_tuning_init, tokenizer_kwargs=None,
                   prompt_tuning_init_text=cfg.prompt_tuning_init_text if text else None,
                   tokenizer_name_or_path=(getattr(model, "studio_model_ref", None) or "unknown") if text else None)
        return out

    def config_from_adapter(self, data: dict) -> PromptTuningConfig:
        data = dict(data)
        data["prompt_tuning_init"] = "RANDOM"  # the saved embeddings replace any init: skip loading a tokenizer
        data.pop("prompt_tuning_init_text", None)
        return super().config_from_adapter(data)


class PTuningMethod(_PromptMethodBase):
    name = "p_tuning"
    graph_safe = True
    summary = "Virtual token embeddings produced by a small prompt encoder (MLP or LSTM) and prepended."
    config_cls = PTuningConfig
    peft_type = "P_TUNING"

    def build_source(self, model: nn.Module, cfg: PTuningConfig) -> SoftPromptSource:
        width = text_config(model).hidden_size
        device = model.get_input_embeddings().weight.device
        table = PromptTable(cfg.num_virtual_tokens, width, device=device)
        encoder = PromptEncoder(width, cfg.encoder_hidden_size, cfg.encoder_reparameterization_type,
                                cfg.encoder_num_layers, cfg.encoder_dropout, device=device)
        return SoftPromptSource(cfg.num_virtual_tokens, table, encoder)

    def adapter_config(self, model: nn.Module, cfg: PTuningConfig) -> dict:
        return super().adapter_config(model, cfg)


register(PromptTuningMethod())
register(PTuningMethod())
