"""The test matrix: one line per registered method (and preset worth its own row).

Each Case names a method (or preset), config overrides for the tiny models, and the closed-form
number of trainable parameters as a function of the model config `c` (a transformers config).
tests/test_method_matrix.py runs every generic check over every case and every tiny model.
Adding a method = one line here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


def head_dim(c) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def kv_dim(c) -> int:
    return c.num_key_value_heads * head_dim(c)


def q_dim(c) -> int:
    return c.num_attention_heads * head_dim(c)


def attn_shapes(c) -> dict[str, tuple[int, int]]:
    """(in, out) of each attention projection."""
    d = c.hidden_size
    return {"q_proj": (d, q_dim(c)), "k_proj": (d, kv_dim(c)), "v_proj": (d, kv_dim(c)), "o_proj": (q_dim(c), d)}


def mlp_shapes(c) -> dict[str, tuple[int, int]]:
    d, f = c.hidden_size, c.intermediate_size
    return {"gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def lora_count(c, r: int, modules: list[str], dora: bool = False) -> int:
    shapes = attn_shapes(c) | mlp_shapes(c)
    per_layer = sum(r * (i + o) + (o if dora else 0) for m, (i, o) in shapes.items() if m in modules)
    return per_layer * c.num_hidden_layers


ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = ATTN + ["gate_proj", "up_proj", "down_proj"]


@dataclass
class Case:
    name: str                                   # registered method or preset name
    overrides: dict = field(default_factory=dict)
    count: Callable | None = None               # closed-form trainable count from the model config
    identity_at_init: bool = True               # output == base right after apply
    mergeable: bool = False                     # merged output == unmerged output
    lr: float = 3e-2                            # learning rate for the loss-goes-down check
    archs: tuple = ("tiny-llama", "tiny-qwen2", "tiny-gemma3")

    @property
    def id(self) -> str:
        return self.name + ("-" + "-".join(f"{k}={v}" for k, v in self.overrides.items()) if self.overrides else "")


CASES: list[Case] = [
    Case("lora", {"r": 4}, lambda c: lora_count(c, 4, ATTN), mergeable=True),
    Case("lora", {"r": 4, "target_modules": "all-linear", "lora_dropout": 0.0},
         lambda c: lora_count(c, 4, ALL), mergeable=True),
    Case("rslora", {"r": 8}, lambda c: lora_count(c, 8, ATTN), mergeable=True),
    Case("dora", {"r": 4}, lambda c: lora_count(c, 4, ATTN, dora=True), mergeable=True),
    Case("pissa", {"r": 4}, lambda c: lora_count(c, 4, ATTN), mergeable=True, lr=5e-3),
    Case("olora", {"r": 4}, lambda c: lora_count(c, 4, ATTN), mergeable=True, lr=5e-3),
    Case("loraplus", {"r": 4}, lambda c: lora_count(c, 4, ATTN), mergeable=True, lr=2e-3),
    Case("full", {}, None, lr=1e-3),
    Case("vera", {"r": 16}, lambda c: c.num_hidden_layers * (2 * 16 + q_dim(c) + kv_dim(c)), mergeable=True, lr=0.1),
    Case("lokr", {"r": 4}, lambda c: c.num_hidden_layers * sum(__import__("studio.methods.lokr", fromlist=["x"]).lokr_count(i, o, 4) for m, (i, o) in attn_shapes(c).items() if m in ("q_proj", "v_proj")), mergeable=True, lr=3e-2),
    Case("loha", {"r": 4}, lambda c: lora_count(c, 2 * 4, ["q_proj", "v_proj"]), mergeable=True, lr=3e-2),
    Case("dylora", {"r": 4}, lambda c: lora_count(c, 4, ATTN), mergeable=True, lr=3e-2),
    Case("glora", {"r": 4}, lambda c: lora_count(c, 8, ATTN) + (c.num_hidden_layers * 3 * (4 * (c.hidden_size + 1) + 2) if c.model_type == "qwen2" else 0), mergeable=True),
    Case("compacter", {"n": 4, "r": 1}, lambda c: 4 ** 3 + lora_count(c, 1, ["q_proj", "v_proj"]), mergeable=True, lr=3e-2),
    Case("ssf", {}, lambda c: 2 * c.num_hidden_layers * (q_dim(c) + 2 * kv_dim(c) + 2 * c.hidden_size + 2 * c.intermediate_size), mergeable=True),
    Case("prompt_tuning", {"num_virtual_tokens": 16}, lambda c: 16 * c.hidden_size, identity_at_init=False, lr=0.1, archs=("tiny-llama", "tiny-gemma3")),  # random tiny-qwen2 barely reacts to input prompts (loss plateaus ~0.08 lower); covered in test_soft_prompts.py
    Case("p_tuning", {"num_virtual_tokens": 8, "encoder_hidden_size": 32}, lambda c: 8 * c.hidden_size + (c.hidden_size * 32 + 32) + (32 * 32 + 32) + (32 * c.hidden_size + c.hidden_size), identity_at_init=False, lr=1e-2, archs=("tiny-llama", "tiny-gemma3")),
    Case("prefix_tuning", {"num_virtual_tokens": 4, "encoder_hidden_size": 32}, lambda c: 4 * kv_dim(c) + (kv_dim(c) * 32 + 32) + (32 + 1) * 2 * c.num_hidden_layers * kv_dim(c), identity_at_init=False, lr=1e-2),
    Case("p_tuning_v2", {"num_virtual_tokens": 4}, lambda c: 4 * 2 * c.num_hidden_layers * kv_dim(c), identity_at_init=False, lr=0.1),
    Case("ia3", {}, lambda c: c.num_hidden_layers * (2 * kv_dim(c) + c.intermediate_size), mergeable=True, lr=0.3),
    Case("adalora", {"init_r": 4, "target_r": 2}, lambda c: lora_count(c, 4, ATTN) + 4 * 4 * c.num_hidden_layers, mergeable=True, lr=0.03),
    Case("adapter", {"bottleneck": 8}, lambda c: c.num_hidden_layers * 2 * (2 * c.hidden_size * 8 + 8 + c.hidden_size)),
    Case("parallel_adapter", {"bottleneck": 8}, lambda c: c.num_hidden_layers * (2 * c.hidden_size * 8 + 8 + c.hidden_size)),
    Case("adamix", {"bottleneck": 8, "num_experts": 2}, lambda c: c.num_hidden_layers * 2 * 2 * (2 * c.hidden_size * 8 + 8 + c.hidden_size)),
    Case("lst", {"reduction": 8}, lambda c: (c.num_hidden_layers + 1) * c.hidden_size * (c.hidden_size // 8) + c.num_hidden_layers * (1 + c.hidden_size // 8 + 3 * (c.hidden_size // 8) * (c.intermediate_size // 8)) + c.hidden_size // 8 + c.hidden_size // 8 * c.hidden_size),
    Case("adapter_fusion", {"adapters": ["random:1", "random:2:4"]}, lambda c: c.num_hidden_layers * 2 * 3 * (c.hidden_size ** 2 + c.hidden_size), identity_at_init=False, lr=3e-3),
    Case("mam_adapter", {"bottleneck": 16, "num_virtual_tokens": 4, "prefix_projection": False}, lambda c: c.num_hidden_layers * (2 * c.hidden_size * 16 + 16 + c.hidden_size + 4 * 2 * kv_dim(c)), identity_at_init=False),
    Case("unipelt", {"r": 4, "bottleneck": 8, "num_virtual_tokens": 4, "prefix_projection": False}, lambda c: c.num_hidden_layers * (4 * (2 * c.hidden_size + q_dim(c) + kv_dim(c)) + 2 * (c.hidden_size + 1) + 2 * c.hidden_size * 8 + 8 + c.hidden_size + c.hidden_size + 1 + 4 * 2 * kv_dim(c) + 1), identity_at_init=False),
    Case("bitfit", {"missing_bias": "add_zero"}, lambda c: c.num_hidden_layers * (q_dim(c) + 2 * kv_dim(c) + 2 * c.hidden_size + 2 * c.intermediate_size)),
    Case("freeze", {"last_k_layers": 1, "patterns": ["mlp"]}, lambda c: 3 * c.hidden_size * c.intermediate_size, lr=1e-3),
    Case("child_tuning", {"mode": "D", "reserve_p": 0.1, "target_modules": ATTN}, lambda c: c.num_hidden_layers * sum(int(0.1 * (i * o)) for i, o in attn_shapes(c).values()), mergeable=True, lr=1e-2),
    Case("diff_pruning", {}, lambda c: 2 * c.num_hidden_layers * c.hidden_size * (q_dim(c) + kv_dim(c)), mergeable=True, lr=1e-2),
]
