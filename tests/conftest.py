"""Shared fixtures. Keep this file small: fixtures used by one test file belong in that file."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter here (set before Triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def studio_home(tmp_path_factory):
    """A fresh STUDIO_HOME per session, so the tiny tokenizer is trained on the current shipped datasets."""
    old = os.environ.get("STUDIO_HOME")
    path = tmp_path_factory.mktemp("studio_home")
    os.environ["STUDIO_HOME"] = str(path)
    yield path
    if old is None:
        os.environ.pop("STUDIO_HOME", None)
    else:
        os.environ["STUDIO_HOME"] = old


@pytest.fixture(scope="session")
def tiny_tok(studio_home):
    """The tiny byte-level BPE tokenizer (vocab 512, Gemma-style chat template) of the random presets."""
    from studio.models import tiny_tokenizer
    return tiny_tokenizer()


@pytest.fixture
def tiny_model(studio_home):
    """Factory: tiny_model(name="tiny-llama", seed=0, **ModelConfig fields) -> a fresh frozen model on CPU."""
    from studio.config import ModelConfig
    from studio.models import load_model

    def make(name: str = "tiny-llama", seed: int = 0, task: str = "causal_lm", **fields):
        fields.setdefault("device", "cpu")
        model, _ = load_model(ModelConfig(name=name, **fields), task=task, seed=seed)
        return model
    return make
