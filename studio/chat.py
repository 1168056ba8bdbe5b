"""Generation: settings, streaming, and base vs tuned on ONE loaded base (adapter switched off/on).

A ChatModel holds one base model with the run's adapter applied. `reply(..., use_adapter=False)`
runs the same weights with the adapter disabled, so side-by-side answers cost no second model. Where it
is exact and fits, the adapter is merged into its own copy of the adapted weights (studio/merged_weights.py),
so tuned answers generate at the base model's speed.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .config import ModelConfig, opt
from .errors import StudioError


@dataclass
class GenerationSettings:
    max_new_tokens: int = opt(128, "Most tokens to generate")
    temperature: float = opt(0.7, "Sampling temperature (ignored when greedy)")
    top_k: int = opt(50, "Sample from the k most likely tokens (0 = off)")
    top_p: float = opt(0.95, "Sample from the smallest set with this total probability")
    repetition_penalty: float = opt(1.1, "Penalise tokens already generated (1 = off)")
    num_beams: int = opt(1, "Beam search width (1 = off; no streaming with beams)")
    do_sample: bool = opt(True, "Sample (true) or pick the most likely token (false)")
    seed: int = opt(0, "Seed, so base and tuned see the same randomness")
    precision: str = opt("auto", "Weights while chatting (auto = as the run trained; bfloat16 reads half the bytes "
                                 "a token: faster on a GPU, and on a CPU whose bf16 products are fast)",
                         ("auto", "bfloat16", "float16", "float32"))

    def generate_kwargs(self) -> dict:
        kw = dict(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=self.do_sample,
                  repetition_penalty=self.repetition_penalty)
        if self.do_sample:
            kw.update(temperature=max(self.temperature, 1e-5), top_k=self.top_k or None, top_p=self.top_p)
        return kw


class ChatModel:
    """A base model (+ optional adapter) and its tokenizer, ready to answer."""

    def __init__(self, model: Any, tokenizer: Any, label: str = ""):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.label = label
        self.lock = threading.Lock()  # one generation at a time on the shared weights
        self.merged = None  # studio/merged_weights.py: the adapter merged into a copy of the weights
        self.merge_note = ""

    @classmethod
    def from_run(cls, run_dir: str | Path, checkpoint: str | Path | None = None,
                 device: str | None = None, merge: bool = True, dtype: str = "auto") -> "ChatModel":
        """Load the run's base model and its final adapter (or a checkpoints/step-N folder); device and
        dtype (of a 16/32-bit base) override the run's; merge: into a copy of the weights where that is exact
        and fits (ChatModel.merge)."""
        from .checkpoint import load_adapter
        from .models import load_model
        from .rundir import RunDir
        run = RunDir(run_dir)
        if not (run.path / "config.yaml").is_file():
            raise StudioError(f"{run_dir} is not a run directory (no config.yaml); pass runs/<name>.")
        cfg = run.config()
        if cfg.model.task != "causal_lm":
            raise StudioError(f"Run {run.name} trained a {cfg.model.task} head, which does not generate text; "
                              f"chat needs a causal_lm run (its eval accuracy is in the Runs tab).")
        folder = Path(checkpoint) if checkpoint else (run.adapter() or (run.checkpoints() or [None])[-1])
        if folder is None:
            raise StudioError(f"Run {run.name} has no adapter or checkpoint yet; wait for its first checkpoint.")
        mcfg = cfg.model
        if device:
            mcfg = ModelConfig(**{**asdict(mcfg), "device": device})
        if dtype != "auto" and mcfg.quantization == "none":
            mcfg = ModelConfig(**{**asdict(mcfg), "dtype": dtype})
        model, tok = load_model(mcfg, seed=cfg.train.seed)
        load_adapter(model, folder)
        chat = cls(model, tok, label=f"{run.name}:{Path(folder).name}")
        if merge:
            chat.merge()
        return chat

    @classmethod
    def from_model(cls, mcfg: ModelConfig) -> "ChatModel":
        from .models import load_model
        model, tok = load_model(mcfg)
        return cls(model, tok, label=mcfg.name)

    @property
    def has_adapter(self) -> bool:
        return getattr(self.model, "studio_adapter", None) is not None

    def merge(self) -> None:
        """Generate tuned answers from merged weights where that is exact and fits (merge_note says which)."""
        from .merged_weights import merge_for_chat
        if self.has_adapter:
            with self.lock:
                self.merged, self.merge_note = merge_for_chat(self.model)

    def adapter_off(self):
        if not self.has_adapter:
            return contextlib.nullcontext()
        if self.merged is not None:
            return self.merged.base_weights()
        info = self.model.studio_adapter
        return info.method.disable_adapter(self.model)

    def encode(self, messages: list[dict] | str, raw: bool = False) -> dict:
        tok = self.tokenizer
        device = next(self.model.parameters()).device
        if raw:
            enc = tok(messages if isinstance(messages, str) else messages[-1]["content"], return_tensors="pt")
        else:
            if isinstance(messages, str):
                messages = [{"role": "user", "content": messages}]
            enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                          return_tensors="pt")
        return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def _gen_args(self, enc: dict, settings: GenerationSettings) -> dict:
        tok = self.tokenizer
        stop_ids = [tok.eos_token_id]
        end_turn = tok.convert_tokens_to_ids("<end_of_turn>") if "<end_of_turn>" in tok.get_vocab() else None
        if end_turn is not None:
            stop_ids.append(end_turn)
        return dict(**enc, **settings.generate_kwargs(), eos_token_id=[i for i in stop_ids if i is not None],
                    pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

    def reply(self, messages: list[dict] | str, settings: GenerationSettings | None = None,
              use_adapter: bool = True, raw: bool = False) -> str:
        """The whole reply at once."""
        return "".join(self.stream(messages, settings, use_adapter, raw, stream=False))

    def stream(self, messages: list[dict] | str, settings: GenerationSettings | None = None,
               use_adapter: bool = True, raw: bool = False, stream: bool = True) -> Iterator[str]:
        """Yield the reply in pieces as they are generated (one piece when stream=False or beams > 1)."""
        from transformers import TextIteratorStreamer
        settings = settings or GenerationSettings()
        enc = self.encode(messages, raw)
        args = self._gen_args(enc, settings)
        with self.lock:
            with (contextlib.nullcontext() if use_adapter else self.adapter_off()):
                torch.manual_seed(settings.seed)
                if not stream or settings.num_beams > 1:
                    with torch.no_grad():
                        out = self.model.generate(**args)
                    yield self.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                    return
                streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
                errors: list[BaseException] = []

                def work() -> None:
                    try:
                        with torch.no_grad():
                            self.model.generate(**args, streamer=streamer)
                    except BaseException as e:  # surfaced to the caller below
                        errors.append(e)
                        streamer.end()

                thread = threading.Thread(target=work, daemon=True)
                thread.start()
                yield from streamer
                thread.join()
                if errors:
                    raise StudioError(f"Generation failed: {errors[0]}")

    def side_by_side(self, messages: list[dict] | str, settings: GenerationSettings | None = None) -> dict:
        """Base and tuned answers to the same prompt with the same seed, from the one loaded model."""
        settings = settings or GenerationSettings()
        return {"base": self.reply(messages, settings, use_adapter=False),
                "tuned": self.reply(messages, settings, use_adapter=True)}
