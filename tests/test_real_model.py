"""The real default model (Gemma-3-270M from the shipped GGUF package), offline: load, train, generate."""
from __future__ import annotations

import pytest
import torch

from studio.chat import ChatModel, GenerationSettings
from studio.config import ModelConfig, load_config
from studio.rundir import RunDir
from studio.runner import execute

pytestmark = pytest.mark.real_model


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_default_model_trains_three_steps_and_generates(tmp_path):
    cfg = load_config("presets/runs/quickstart.yaml", ["train.max_steps=3", "train.batch_size=2", "data.limit=16",
                                                        "data.max_length=64", "train.eval_every=0",
                                                        "data.eval_fraction=0", "model.device=cpu"])
    run = RunDir.create(tmp_path / "runs", cfg)
    execute(run, cfg)
    losses = [m["loss"] for m in run.metrics()]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    chat = ChatModel.from_run(run.path)
    assert chat.model.config.model_type == "gemma3_text" and chat.model.config.vocab_size == 262144
    both = chat.side_by_side("Who are you?", GenerationSettings(max_new_tokens=8, do_sample=False))
    assert isinstance(both["base"], str) and isinstance(both["tuned"], str)
    pieces = list(chat.stream("Say hello.", GenerationSettings(max_new_tokens=6, do_sample=False)))
    assert "".join(pieces) == chat.reply("Say hello.", GenerationSettings(max_new_tokens=6, do_sample=False))


def test_base_model_answers_coherently_without_adapter():
    chat = ChatModel.from_model(ModelConfig(name="gemma-3-270m", device="cpu"))
    reply = chat.reply("The Eiffel Tower is in the city of", GenerationSettings(max_new_tokens=3, do_sample=False), raw=True)
    assert "Paris" in reply
