"""Chat speed (`bench --chat`): tokens per second of greedy generation from the base model, from the tuned
model with its adapter unmerged, and with it merged into a copy of the weights (studio/merged_weights.py,
what the chat tab and `chat` do where it fits).

Random-init models of real shapes (presets, no download), LoRA r16 on every linear layer with its B moved
off zero, a random prompt; each variant generates the same number of tokens (no early stop) and reports
its median round: base and unmerged alternate, then the adapter is merged and merged and base_swapped (the
merged model's base answers) alternate. Rows: {what: "chat", shape, variant, prompt_tokens, new_tokens,
ms_per_token, tokens_per_s, rounds_ms_per_token, same_tokens (as the base's, or the unmerged adapter's)}
plus the machine.
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch

from .bench_grid import bench_method_cfg
from .machine_facts import machine_facts
from .memory_bench import random_base_model

CHAT_SHAPES = {"cpu": ["gemma-3-270m"], "cuda": ["qwen2.5-0.5b", "qwen2.5-7b"]}
VARIANTS = ("base", "unmerged", "merged", "base_swapped")  # base_swapped: the base answers of the merged model


def chat_rows(device: torch.device, shapes: list[str] | None = None, prompt_tokens: int = 32,
              new_tokens: int = 64, rounds: int = 3) -> Iterator[dict]:
    """One row per (shape, variant)."""
    from .chat import ChatModel
    from .methods import apply_method, method_config
    facts = machine_facts(device)
    for shape in shapes or CHAT_SHAPES["cuda" if device.type == "cuda" else "cpu"]:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = random_base_model(shape, device, dtype)
        apply_method(model, method_config(bench_method_cfg("lora")))  # the speed bench's LoRA
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
        chat = ChatModel(model.eval(), None, label=shape)
        vocab = int(model.config.get_text_config().vocab_size)
        ids = torch.randint(3, vocab, (1, prompt_tokens), generator=gen).to(device)

        def generate() -> tuple[float, list[int]]:
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            sync()
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            sync()
            return (time.perf_counter() - start) * 1000 / new_tokens, out[0, prompt_tokens:].tolist()

        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        tokens: dict[str, list[int]] = {}
        generate()  # warm-up: kernels, caches
        for phase in ("unmerged", "merged"):  # base and tuned alternate within each phase
            if phase == "merged":
                chat.merge()  # exact and fits, or it stays unmerged
                if chat.merged is None:
                    break
            for _ in range(rounds):
                for variant in (("base", "unmerged") if phase == "unmerged" else ("merged", "base_swapped")):
                    with chat.adapter_off() if variant.startswith("base") else contextlib.nullcontext():
                        ms, tokens[variant] = generate()
                    times[variant].append(ms)
        for variant in VARIANTS:
            if not times[variant]:
                yield {"what": "chat", "shape": shape, "variant": variant, "error": chat.merge_note} | facts
                continue
            ms = sorted(times[variant])[len(times[variant]) // 2]
            yield {"what": "chat", "shape": shape, "variant": variant, "prompt_tokens": prompt_tokens,
                   "new_tokens": new_tokens, "dtype": str(dtype).removeprefix("torch."),
                   "ms_per_token": round(ms, 3), "tokens_per_s": round(1000 / ms, 1),
                   "rounds_ms_per_token": [round(t, 3) for t in times[variant]],
                   "same_tokens": tokens[variant] == tokens["base" if variant.startswith("base") else "unmerged"]} \
                | facts
        del chat, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
