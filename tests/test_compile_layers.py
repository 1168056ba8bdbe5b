"""train.compile with gradient checkpointing (studio/checkpointing.py compile_layers): a checkpointed
layer's attention and MLP are compiled inside its checkpoint, so the forward keeps what the eager
checkpoint keeps; compiled whole, the layer traced the checkpoint and kept most of its activations.
The aot_eager backend runs AOTAutograd's partitioning (where the saving is decided) without inductor's
code generation."""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from studio.checkpointing import compile_layers, enable_gradient_checkpointing
from studio.losses import causal_lm_loss
from studio.memory_bench import random_batch
from studio.methods import apply_method, method_config


def _model(tiny_model, ckpt: bool):
    model = tiny_model("tiny-llama")
    apply_method(model, method_config({"name": "lora", "r": 4, "target_modules": "all-linear"}))
    if ckpt:
        enable_gradient_checkpointing(model, 1.0, mark=False)
    return model.train()


def _kept_after_forward(model) -> tuple[int, torch.Tensor]:
    """CPU bytes allocated and not freed during one forward (what it keeps for backward), and the loss."""
    batch = random_batch(model.config.vocab_size, 4, 256)
    causal_lm_loss(model, batch)[0].backward()  # the compile happens here, outside the measured forward
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss, _ = causal_lm_loss(model, batch)
    kept = sum(e.self_cpu_memory_usage for e in prof.events())
    loss.backward()
    return kept, loss.detach()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_checkpointed_layers_compile_their_parts_and_keep_what_eager_keeps(tiny_model):
    eager_kept, eager_loss = _kept_after_forward(_model(tiny_model, ckpt=True))
    model = _model(tiny_model, ckpt=True)
    assert compile_layers(model, backend="aot_eager") == 2 * len(model.model.layers)
    assert all(layer.self_attn._compiled_call_impl is not None and layer._compiled_call_impl is None
               for layer in model.model.layers)
    kept, loss = _kept_after_forward(model)
    assert kept <= eager_kept * 1.1
    torch.testing.assert_close(loss, eager_loss)

    whole = _model(tiny_model, ckpt=True)
    for layer in whole.model.layers:  # what train.compile did before: the layer, checkpoint included
        layer.compile(dynamic=True, backend="aot_eager")
    assert _kept_after_forward(whole)[0] > 2 * eager_kept


def test_layers_without_checkpointing_compile_whole(tiny_model):
    model = _model(tiny_model, ckpt=False)
    assert compile_layers(model, backend="aot_eager") == len(model.model.layers)
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)


@pytest.mark.parametrize("method", [{"name": "dora", "target_modules": "all-linear", "lora_dropout": 0.0},
                                    {"name": "ia3"}, {"name": "ssf"}], ids=lambda m: m["name"])
def test_checkpointed_rescaled_methods_compile_with_eagers_gradients(tiny_model, method):
    """DoRA, IA3 and SSF run their own autograd op (methods/rescaled_product.py): compiled inside a checkpoint,
    the recomputation must trace what the forward traced (a cache filled in one and read in the other did not)."""
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = tiny_model("tiny-llama")
        apply_method(model, method_config(method))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.01)
        enable_gradient_checkpointing(model, 1.0, mark=False)
        if compiled:
            compile_layers(model.train(), backend="aot_eager")
        loss, _ = causal_lm_loss(model.train(), random_batch(model.config.vocab_size, 2, 64))
        loss.backward()
        runs.append((loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    (eager_loss, eager_grads), (loss, grads) = runs
    torch.testing.assert_close(loss, eager_loss)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
