"""A checkpointed layer's recomputation skips the gated MLP's down projection where nothing reads its
output (studio/checkpointing.py marks the layer, studio/fused_mlp.py skips): the gradients stay bitwise
those of the full recomputation, for every layer class the skip is claimed for, and the skip stays off
where the output is read (Gemma-3's post-MLP norm, a hook or a wrapper on the MLP, torch.compile).
The skipped output is filled with NaN here, so a reader of it would show in the gradients."""
from __future__ import annotations

import pytest
import torch
import transformers

import studio.fused_mlp as fused_mlp
from studio.checkpointing import enable_gradient_checkpointing, recomputing_layer, setup_checkpointing
from studio.config import TrainConfig
from studio.losses import causal_lm_loss
from studio.memory_bench import random_batch
from studio.methods import apply_method, method_config
from studio.offload import CheckpointOffloader

LORA = {"name": "lora", "r": 4, "target_modules": "all-linear"}  # lora_dropout 0.05 (the default)
# one tiny config per layer class of OUTPUT_TO_RESIDUAL_LAYERS, built by transformers from its model type
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=128)
LAYER_TYPES = {"LlamaDecoderLayer": "llama", "Qwen2DecoderLayer": "qwen2", "Qwen3DecoderLayer": "qwen3",
               "MistralDecoderLayer": "mistral", "GemmaDecoderLayer": "gemma"}


@pytest.fixture
def skips(monkeypatch) -> list[bool]:
    """Records each fused down projection's `output` flag; a skipped output is NaN, not left as it was."""
    seen: list[bool] = []
    real = fused_mlp.lora_linear_forward

    def spy(*args):
        seen.append(not args[-1])
        out = real(*args)
        if not args[-1]:
            out[0].fill_(float("nan"))
        return out
    monkeypatch.setattr(fused_mlp, "lora_linear_forward", spy)
    return seen


def _model(model_type: str, seed: int = 0, method: dict = LORA) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(model_type, **TINY)
    cfg._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(cfg).float()
    model.requires_grad_(False)
    apply_method(model, method_config(method))
    return model.train()


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    batch = random_batch(model.config.vocab_size, 2, 24)
    loss, _ = causal_lm_loss(model, batch)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _checkpointed_grads(model_type: str, mark: bool, offload: bool = False, prepare=None) -> dict:
    model = _model(model_type)
    if prepare is not None:
        prepare(model)
    offloader = CheckpointOffloader(min_bytes=0, devices=("cpu",)) if offload else None
    enable_gradient_checkpointing(model, 1.0, offloader, mark=mark)
    return _grads(model)


def test_every_claimed_layer_class_is_tested():
    assert set(fused_mlp.OUTPUT_TO_RESIDUAL_LAYERS) == set(LAYER_TYPES)


@pytest.mark.parametrize("layer_class", sorted(LAYER_TYPES))
def test_recompute_skips_down_and_keeps_the_gradients(skips, layer_class):
    model_type = LAYER_TYPES[layer_class]
    assert type(_model(model_type).model.layers[0]).__name__ == layer_class
    skips.clear()
    marked = _checkpointed_grads(model_type, mark=True)
    assert skips == [False, False, True, True]  # two layers' forwards, then their recomputations
    skips.clear()
    full = _checkpointed_grads(model_type, mark=False)
    assert skips == [False] * 4
    plain = _grads(_model(model_type))
    assert len(marked) == 28 and set(marked) == set(full) == set(plain)
    for name in marked:
        assert torch.equal(marked[name], full[name]), name
        torch.testing.assert_close(marked[name], plain[name], rtol=1e-4, atol=1e-6)


def test_with_dropout_the_recomputation_draws_the_same_masks(skips):
    def grads(mark: bool) -> dict:
        model = _model("llama")
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.1
        enable_gradient_checkpointing(model, 1.0, mark=mark)
        torch.manual_seed(1)
        return _grads(model)
    marked, full = grads(True), grads(False)
    assert skips.count(True) == 2
    assert all(torch.equal(marked[n], full[n]) for n in full)


def test_without_dropout_the_recomputation_leaves_the_gated_product_to_the_backward(monkeypatch):
    """lora_dropout 0 (no mask to draw again): the fused op's recomputation computes nothing, and the backward
    makes low from the act(gate) * up it rebuilds anyway: one gated pass a layer less, the gradients bitwise
    those of the full recomputation."""
    calls = []
    real = fused_mlp.gated
    monkeypatch.setattr(fused_mlp, "gated", lambda *a: calls.append(a[0].shape) or real(*a))
    runs = []
    for mark, offload in ((True, False), (True, True), (False, False)):
        calls.clear()
        model = _model("qwen2", method=LORA | {"lora_dropout": 0.0})
        enable_gradient_checkpointing(model, 1.0, CheckpointOffloader(min_bytes=0, devices=("cpu",)) if offload
                                      else None, mark=mark)
        runs.append((_grads(model), len(calls)))
    (marked, marked_calls), (offloaded, offloaded_calls), (full, full_calls) = runs
    # gated() per layer: the forward, and the recomputation unless it is left (the CPU's backward rebuilds h as
    # act(gate) * up, keeping act(gate) for d(up); CUDA's through gated's kernel)
    assert (marked_calls, offloaded_calls, full_calls) == (2, 2, 4)
    assert len(marked) == 28 and all(torch.equal(marked[n], full[n]) and torch.equal(offloaded[n], full[n])
                                     for n in full)


def test_offloaded_checkpoint_skips_too(skips):
    marked = _checkpointed_grads("qwen2", mark=True, offload=True)
    assert skips == [False, False, True, True]
    full = _checkpointed_grads("qwen2", mark=False)
    assert all(torch.equal(marked[n], full[n]) for n in full)


def test_gemma3_normalises_the_mlp_output_so_nothing_is_skipped(skips):
    grads = _checkpointed_grads("gemma3_text", mark=True)
    assert skips == [False] * 4
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_a_hook_or_wrapper_on_the_mlp_keeps_the_output(skips):
    seen = []
    _checkpointed_grads("llama", mark=True,
                        prepare=lambda m: [layer.mlp.register_forward_hook(lambda *a: seen.append(a[2].sum()))
                                           for layer in m.model.layers])
    assert skips == [False] * 4 and all(torch.isfinite(s) for s in seen)

    class Wrapped(torch.nn.Module):  # an adapter around the MLP reads its output
        def __init__(self, mlp):
            super().__init__()
            self.inner = mlp

        def forward(self, x):
            return self.inner(x) * 2.0

    skips.clear()
    grads = _checkpointed_grads("llama", mark=True,
                                prepare=lambda m: [setattr(layer, "mlp", Wrapped(layer.mlp)) for layer in m.model.layers])
    assert skips == [False] * 4
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_the_mark_is_set_only_during_a_recomputation(monkeypatch):
    model = _model("llama")
    enable_gradient_checkpointing(model, 1.0)
    marks = []
    real = fused_mlp.recomputing_layer
    monkeypatch.setattr(fused_mlp, "recomputing_layer", lambda: marks.append(real()) or marks[-1])
    _grads(model)
    layers = list(model.model.layers)
    assert marks == [None, None, layers[1], layers[0]]  # backward recomputes the last layer first
    assert recomputing_layer() is None


def test_setup_marks_unless_compiled(tiny_model):
    for compile_, marked in ((False, True), (True, False)):
        model = tiny_model("tiny-qwen2")
        setup_checkpointing(model, TrainConfig(gradient_checkpointing=True, compile=compile_), cpu=True)
        funcs = [layer._gradient_checkpointing_func for layer in model.model.layers]
        assert all(("context_fn" in f.keywords) == marked for f in funcs)


def test_ia3_on_down_skips_too_and_keeps_the_gradients(monkeypatch):
    """IA3's feed-forward scale runs inside the gated MLP's op (fused_mlp.GatedScaledDown): its recomputation
    skips down's product as well (the skipped output NaN here), with the full recomputation's gradients."""
    seen: list[bool] = []
    real = fused_mlp.GatedScaledDown

    class NanWhenSkipped(real):
        @staticmethod
        def forward(ctx, *args):
            y = real.forward(ctx, *args)
            seen.append(not args[-1])
            return y.fill_(float("nan")) if not args[-1] else y
    monkeypatch.setattr(fused_mlp, "GatedScaledDown", NanWhenSkipped)

    def grads(mark: bool | None) -> dict:
        torch.manual_seed(0)
        cfg = transformers.AutoConfig.for_model("llama", **TINY)
        cfg._attn_implementation = "sdpa"
        model = transformers.AutoModelForCausalLM.from_config(cfg).float().requires_grad_(False)
        apply_method(model, method_config({"name": "ia3"}))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "ia3_l" in name:
                    p.normal_(1.0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        if mark is not None:
            enable_gradient_checkpointing(model.train(), 1.0, mark=mark)
        return _grads(model.train())
    marked = grads(True)
    assert seen == [False, False, True, True]  # two layers' forwards, then their recomputations
    full, plain = grads(False), grads(None)
    assert len(marked) == 6 and set(marked) == set(full) == set(plain)  # k, v and down's vectors, two layers
    for name in marked:
        assert torch.equal(marked[name], full[name]), name
        torch.testing.assert_close(marked[name], plain[name], rtol=1e-4, atol=1e-6)
