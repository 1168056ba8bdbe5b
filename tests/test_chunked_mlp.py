"""A recomputed layer's MLP in row chunks that keep only its input (studio/chunked_mlp.py), its threshold lowered
to these tiny models: the gradients are those of the whole MLP (to the summation order of the weights' gradients
over the chunks), dropout draws the same masks in a chunk's forward and in its run in backward (with a seed on
the device, the whole batch's masks), and the rule leaves the MLP whole where it must."""
from __future__ import annotations

import contextlib

import pytest
import torch
import transformers

import studio.chunked_mlp as chunked_mlp
import studio.methods.lora_fused as lora_fused
from studio.checkpointing import enable_gradient_checkpointing
from studio.losses import causal_lm_loss
from studio.memory_bench import random_batch
from studio.methods import apply_method, method_config

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=128)
ROWS = 2 * 24
LORA = {"name": "lora", "r": 4, "target_modules": "all-linear", "lora_dropout": 0.0}


class Deferred:
    """Runs a step with the MLPs in `n` chunks (n=1: whole) and records the chunk rows of each deferred call."""

    def __init__(self, monkeypatch) -> None:
        self.monkeypatch, self.calls = monkeypatch, []
        real = chunked_mlp.DeferredMLP.apply
        monkeypatch.setattr(chunked_mlp.DeferredMLP, "apply", lambda *a: self.calls.append(a[2]) or real(*a))

    @contextlib.contextmanager
    def chunks(self, n: int, rows: int = ROWS):
        with self.monkeypatch.context() as m:
            m.setattr(chunked_mlp, "MLP_CHUNK_ELEMENTS", -(-rows * 128 // n) if n > 1 else 1 << 40)
            self.calls.clear()
            yield self


@pytest.fixture
def deferred(monkeypatch) -> Deferred:
    return Deferred(monkeypatch)


def _model(model_type: str, method: dict, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(model_type, **TINY)
    cfg._attn_implementation = "eager" if model_type == "gemma2" else "sdpa"  # Gemma-2: soft-capped scores
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype)
    model.requires_grad_(False)
    apply_method(model, method_config(method))
    return model.train()


def _step(model: torch.nn.Module, ckpt: bool = True, seed: int = 1,
          device: torch.device = torch.device("cpu")) -> tuple[float, dict[str, torch.Tensor]]:
    if ckpt:
        enable_gradient_checkpointing(model, 1.0)
    torch.manual_seed(seed)
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, _ = causal_lm_loss(model, random_batch(model.config.vocab_size, 2, 24, device=device))
        loss.backward()
    return loss.item(), {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}


def _run(deferred: Deferred, n: int, model_type: str, method: dict, dtype: torch.dtype = torch.float32,
         ckpt: bool = True) -> tuple[float, dict[str, torch.Tensor], list[int]]:
    with deferred.chunks(n):
        loss, grads = _step(_model(model_type, method, dtype), ckpt)
        return loss, grads, list(deferred.calls)


def _assert_same(a: tuple, b: tuple, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    assert a[0] == pytest.approx(b[0], rel=1e-6)
    assert set(a[1]) == set(b[1]) and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=rtol, atol=atol, msg=name)


# "gemma3" is the multimodal config (its text model: gemma3_text)
@pytest.mark.parametrize("model_type", [t for t in chunked_mlp.DEFERRED_MODEL_TYPES if t != "gemma3"])
def test_every_layer_class_gets_the_whole_mlps_gradients(deferred, model_type):
    whole = _run(deferred, 1, model_type, LORA)
    chunked = _run(deferred, 4, model_type, LORA)
    assert whole[2] == [] and chunked[2] == [12] * 4  # two layers' forwards, then their recomputations
    _assert_same(chunked, whole)


@pytest.mark.parametrize("method", [
    {"name": "ia3"}, {"name": "dora", "target_modules": "all-linear", "lora_dropout": 0.0},
    {"name": "loha", "target_modules": "all-linear"}, {"name": "vera", "target_modules": "all-linear"},
    {"name": "adalora", "target_modules": "all-linear"}, {"name": "bitfit"},
    {"name": "prompt_tuning", "prompt_tuning_init": "RANDOM"},
    {"name": "prefix_tuning"}, {"name": "lora"}], ids=lambda m: m["name"])
def test_other_methods_get_the_whole_mlps_gradients(deferred, method):
    """Adapters on the MLP's projections of every kind (and none: LoRA on q and v, whose MLP still passes the
    gradient on)."""
    whole = _run(deferred, 1, "qwen2", method)
    chunked = _run(deferred, 3, "qwen2", method)
    assert len(chunked[2]) == 4
    _assert_same(chunked, whole)


def test_bf16_under_autocast_matches_to_rounding(deferred):
    whole = _run(deferred, 1, "llama", LORA, torch.bfloat16)
    chunked = _run(deferred, 4, "llama", LORA, torch.bfloat16)
    assert len(chunked[2]) == 4
    assert chunked[0] == pytest.approx(whole[0], rel=1e-3)
    for name, g in whole[1].items():  # the weights' gradients summed in 16-bit products chunk by chunk
        torch.testing.assert_close(chunked[1][name], g, rtol=2e-2, atol=2e-2 * g.abs().max().item(), msg=name)


def test_dropout_draws_each_chunks_masks_again_in_backward(deferred, monkeypatch):
    """torch's generator (the CPU): every mask the backward's runs draw is the one the chunk's forward drew."""
    masks: list[torch.Tensor] = []
    real = lora_fused.dropout_mask

    def spy(x2, p):
        mask = real(x2, p)
        masks.append(mask.clone())
        return mask
    monkeypatch.setattr(lora_fused, "dropout_mask", spy)
    with deferred.chunks(4):
        model = _model("llama", dict(LORA, lora_dropout=0.5))
        enable_gradient_checkpointing(model, 1.0)
        loss, _ = causal_lm_loss(model, random_batch(256, 2, 24))
        mlp_forward = [m for m in masks if m.shape[0] == 12]  # the MLP's chunks (12 rows); attention's: 48
        masks.clear()
        loss.backward()
        mlp_backward = [m for m in masks if m.shape[0] == 12]
    assert len(mlp_forward) == len(mlp_backward) == 2 * 4 * 3  # layers x chunks x (gate, up, down)
    for m in mlp_backward:
        assert sum(torch.equal(m, f) for f in mlp_forward if f.shape == m.shape) == 1
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_seeded_dropout_takes_the_whole_batchs_masks(deferred):
    """A seed on the device (the CUDA path; on a CPU machine through Triton's interpreter): the chunked step is
    the whole step, masks included."""
    pytest.importorskip("triton")
    from studio import kernels, seeded_dropout
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def run(n: int) -> tuple:
        routed = kernels.forced() if device.type == "cpu" else contextlib.nullcontext()
        with deferred.chunks(n), routed:
            model = _model("llama", dict(LORA, lora_dropout=0.3)).to(device)
            assert seeded_dropout.arm(model, device)
            return _step(model, device=device)
    whole, chunked = run(1), run(4)
    assert len(deferred.calls) == 4
    _assert_same(chunked, whole)


def test_offloaded_checkpoints_defer_too(deferred):
    """train.offload_checkpoints: the layer inputs wait in host memory (CPU here), the MLP's input is the op's."""
    from studio.offload import CheckpointOffloader

    def run(n: int) -> tuple:
        with deferred.chunks(n):
            model = _model("mistral", LORA)
            enable_gradient_checkpointing(model, 1.0, CheckpointOffloader(min_bytes=0, devices=("cpu",)))
            return _step(model, ckpt=False)
    whole, chunked = run(1), run(4)
    assert len(deferred.calls) == 4
    _assert_same(chunked, whole)


def test_chunks_cover_every_row_when_they_do_not_divide_it(deferred):
    whole = _run(deferred, 1, "llama", LORA)
    chunked = _run(deferred, 5, "llama", LORA)  # 48 rows in chunks of 10: the last one 8
    assert chunked[2] == [10] * 4
    _assert_same(chunked, whole)


@pytest.mark.parametrize("case", ["gemma3-norm-hook", "no-ckpt", "own-draws", "base-trains", "hook", "eval"])
def test_the_mlp_stays_whole_where_the_rule_says(deferred, case):
    """A hook on Gemma-3's post-MLP norm (the op would run the norm without it); without checkpointing there is no
    recomputation to move; LoHa's rank dropout on the MLP draws once a step; full fine-tuning trains the
    weights (their gradient would be built once a chunk); a hook may read anything; no grad, nothing kept."""
    model_type, method, ckpt = "llama", LORA, True
    if case == "gemma3-norm-hook":
        model_type = "gemma3_text"
    elif case == "no-ckpt":
        ckpt = False
    elif case == "own-draws":
        method = {"name": "loha", "target_modules": "all-linear", "rank_dropout": 0.3}
    elif case == "base-trains":
        method = {"name": "full", "keep_base_copy": False}
    with deferred.chunks(4):
        model = _model(model_type, method)
        for layer in model.model.layers:
            if case == "hook":
                layer.mlp.up_proj.register_forward_hook(lambda *a: None)
            elif case == "gemma3-norm-hook":
                layer.post_feedforward_layernorm.register_forward_hook(lambda *a: None)
        if case == "eval":
            enable_gradient_checkpointing(model, 1.0)
            with torch.no_grad():
                causal_lm_loss(model, random_batch(256, 2, 24))
        else:
            _step(model, ckpt)
        assert deferred.calls == []


def test_the_estimate_keeps_a_chunk_of_the_mlp(deferred):
    """Qwen2.5-7B, LoRA on every linear layer (dropout 0.05), checkpointed, 1 x 16,384 on CUDA: the MLP in two
    chunks of 8,192 rows; at 4 x 2,048 whole (the bench rows keep their kernels' shapes). Every layer recomputed
    in each (with whole MLPs the estimate would keep the top layer's activations: no dearer there)."""
    from studio import memory
    from studio.config import RunConfig
    from studio.memory import estimate
    deferred.monkeypatch.setattr(memory, "top_layer_kept_if_free", lambda cfg, estimate_of: estimate_of(cfg))

    def est(batch: int, seq: int):
        cfg = RunConfig.from_dict({"model": {"name": "qwen2.5-7b", "dtype": "bfloat16"},
                                   "data": {"max_length": seq},
                                   "method": {"name": "lora", "r": 16, "target_modules": "all-linear"},
                                   "train": {"batch_size": batch, "gradient_checkpointing": True}})
        return estimate(cfg, "cuda", padding=False)
    assert chunked_mlp.mlp_chunks(16384, 18944) == 2 and chunked_mlp.mlp_chunks(8192, 18944) == 1
    long = est(1, 16384)
    with deferred.monkeypatch.context() as m:
        m.setattr(chunked_mlp, "MLP_CHUNK_ELEMENTS", 1 << 40)
        whole, whole_short = est(1, 16384), est(4, 2048)
    assert est(4, 2048).total == whole_short.total
    rows, inter, act = 16384, 18944, 2
    saved = whole.total - long.total
    # half of gate's and up's outputs and of their three backward buffers, less the input the op keeps
    assert saved >= (2 + 3) * rows * inter * act // 2 - rows * 3584 * act * 2, saved


@pytest.mark.parametrize("dropout, rel", [(0.0, 1e-5), (0.05, 2e-3)])
def test_the_trainer_gets_the_same_loss_curve(tmp_path, deferred, dropout, rel):
    """Through the real trainer (checkpointing, LoRA on every linear layer, gradient accumulation): the curve of a
    run whose MLPs run in chunks is the whole MLPs' curve; with dropout on the CPU, within its noise (each chunk
    draws its masks from torch's generator in turn: other draws than the whole tensor's)."""
    from studio.config import load_config
    from studio.rundir import RunDir
    from studio.runner import execute

    def curve(n: int, name: str) -> list[float]:
        sets = {"model.name": "tiny-llama", "model.device": "cpu", "data.path": "arith", "data.max_length": 64,
                "data.limit": 64, "train.batch_size": 4, "train.max_steps": 4, "train.lr": 3e-3,
                "train.grad_accum": 2, "train.gradient_checkpointing": True, "method.name": "lora",
                "method.target_modules": "all-linear", "method.lora_dropout": dropout}
        cfg = load_config(None, [f"{k}={v}" for k, v in sets.items()])
        rd = RunDir.create(tmp_path / name, cfg)
        with deferred.chunks(n, rows=4 * 64):  # the longest micro-batch's rows: four chunks there
            execute(rd, cfg)
            calls = len(deferred.calls)
        assert (calls > 0) == (n > 1)
        return [row["loss"] for row in rd.metrics()]
    whole, chunked = curve(1, "whole"), curve(4, "chunked")
    assert len(whole) == 4 and chunked == pytest.approx(whole, rel=rel)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_no_matmul_work_is_added(deferred, model_type):
    """The step's matrix-product FLOPs (forward, recomputation and backward, counted op by op) are the whole
    MLPs': the recomputation's gate and up move into the op's backward, and down's product is skipped there as
    in the whole layer's recomputation (Gemma: computed there as the whole recomputation does, for the norm)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Flops(TorchDispatchMode):  # torch's FlopCounterMode without its module hooks (which the rule sees)
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            count = flop_registry.get(func._overloadpacket)
            if count is not None:
                self.total += count(*args, **(kwargs or {}), out_val=out)
            return out

    def flops(n: int) -> int:
        with deferred.chunks(n):
            model = _model(model_type, LORA)
            enable_gradient_checkpointing(model, 1.0)
            with Flops() as counter:
                loss, _ = causal_lm_loss(model, random_batch(256, 2, 24))
                loss.backward()
            assert (len(deferred.calls) > 0) == (n > 1)
            return counter.total
    whole = flops(1)
    assert whole > 0 and flops(4) == whole


def test_a_4bit_base_chunks_with_the_trainings_ops(deferred, tmp_path):
    """QLoRA (bitsandbytes' CPU backend): the chunks' forward takes the training path (the fused op over the
    dequantized base, not bitsandbytes' no-grad kernels), so the loss and the gradients are the whole MLP's."""
    pytest.importorskip("bitsandbytes")
    from studio.config import ModelConfig
    from studio.models import load_model
    base, tok = load_model(ModelConfig(name="tiny-llama", device="cpu"))
    base.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")

    def run(n: int) -> tuple:
        with deferred.chunks(n):
            model, _ = load_model(ModelConfig(name=str(tmp_path / "tiny"), quantization="nf4", device="cpu"))
            torch.manual_seed(0)
            apply_method(model, method_config({"name": "qlora", "r": 4, "lora_dropout": 0.0}))
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.05)
            return _step(model.train())
    whole, chunked = run(1), run(4)
    assert len(deferred.calls) == 4
    _assert_same(chunked, whole, rtol=1e-4, atol=1e-6)
