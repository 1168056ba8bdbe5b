"""Model references and run configs: what resolves, and the errors a user gets when nothing does."""
from __future__ import annotations

import pytest
import torch

from studio.config import RunConfig, load_config, parse_set
from studio.errors import ConfigError, ModelNotFoundError
from studio.models import ModelConfig, load_model, resolve_dtype, resolve_model_config


def test_set_values_are_yaml():
    assert parse_set(["method.target_modules=[q_proj,v_proj]", "train.lr=0.5", "data.packing=true"]) == {
        "method": {"target_modules": ["q_proj", "v_proj"]}, "train": {"lr": 0.5}, "data": {"packing": True}}
    assert load_config(None, ["train.lr=1e-4"]).train.lr == 1e-4  # YAML 1.1 reads 1e-4 as text; coerced
    cfg = load_config(None, ["method.name=dora", "method.r=4"])
    assert cfg.method.use_dora and cfg.method.r == 4 and cfg.method.name == "dora"


def test_config_round_trip_and_unknown_keys(tmp_path):
    cfg = load_config("presets/runs/quickstart.yaml")
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ConfigError, match="Unknown key.*learning_rate.*valid keys"):
        load_config(None, ["train.learning_rate=1"])
    with pytest.raises(ConfigError, match="Unknown method 'lorax'"):
        load_config(None, ["method.name=lorax"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["lr=1"])


def test_model_references_resolve_or_explain(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_config("qwen2.5-7b").num_hidden_layers == 28
    with pytest.raises(ModelNotFoundError, match="not a preset, a local folder or a hub id"):
        load_model(ModelConfig(name="no-such-model"))
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE=1"):
        load_model(ModelConfig(name="someone/nonexistent-model-xyz"))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model(ModelConfig(name=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(ModelConfig(name=str(tmp_path / "empty")))


def test_local_folder_loads_with_dtype_and_without_remote_code(tmp_path):
    model, tok = load_model(ModelConfig(name="tiny-qwen2", device="cpu"))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    again, tok2 = load_model(ModelConfig(name=str(tmp_path / "m"), dtype="bfloat16", device="cpu"))
    assert again.dtype == torch.bfloat16 and tok2.chat_template
    assert not any(p.requires_grad for p in again.parameters())
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_cuda_and_mps_requests_without_the_device_are_clear():
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            load_model(ModelConfig(name="tiny-llama", device="cuda"))
