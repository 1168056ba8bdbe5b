"""Inputs rebuilt in backward (studio/rebuilt_inputs.py): a fused norm's output and the gated MLP's act(gate)·up,
bitwise the gradients of keeping them, fewer bytes kept, one rebuild per output, and the cases that must keep them."""
from __future__ import annotations

import pytest
import torch

from studio import rebuilt_inputs
from studio.fused_norm import norm_forward
from studio.memory_bench import random_batch, saved_tensor_bytes
from studio.methods import apply_method, method_config

LORA = {"name": "lora", "r": 4, "lora_dropout": 0.0, "target_modules": "all-linear"}
# the gradient tests run on a GPU where there is one (gpu_check.sh's kernels stage: the Triton norm rebuilt)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _lora_model(tiny_model, arch: str, dtype: torch.dtype, method: dict = LORA, device: str = "cpu"):
    model = tiny_model(arch, dtype="bfloat16" if dtype == torch.bfloat16 else "float32", device=device)
    apply_method(model, method_config(dict(method)))
    for name, p in model.named_parameters():  # B away from zero, so every gradient is non-trivial
        if "lora_B" in name:
            with torch.no_grad():  # drawn on the CPU: the same values on a GPU
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.02)
    return model


def _as_trained(dtype: torch.dtype, device: str = "cpu"):
    """The trainer's context: a 16-bit model runs under autocast (its fp32 adapters then fuse)."""
    import contextlib
    return torch.autocast(device, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


def _grads(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from studio.losses import causal_lm_loss
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    with _as_trained(next(model.parameters()).dtype, device.type):
        loss, _ = causal_lm_loss(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _without_rebuild(monkeypatch):
    monkeypatch.setattr(rebuilt_inputs, "source", lambda t: None)


# the fused LoRA op (methods/lora_fused.py) and the rebuilt-ΔW op (methods/delta_product.py) read norm outputs
METHODS = {"lora": LORA, "loha": {"name": "loha", "target_modules": "all-linear"}, "glora": {"name": "glora"}}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gemma3"])
def test_gradients_bitwise_those_of_keeping_the_output(tiny_model, monkeypatch, arch, dtype, method):
    batch = random_batch(512, 2, 24)
    model = _lora_model(tiny_model, arch, dtype, METHODS[method], DEVICE)
    loss, rebuilt = _grads(model, batch)
    with monkeypatch.context() as m:
        _without_rebuild(m)
        loss_kept, kept = _grads(model, batch)
    assert torch.equal(loss, loss_kept)
    assert rebuilt.keys() == kept.keys() and len(rebuilt) > 0
    for name in kept:
        assert torch.equal(rebuilt[name], kept[name]), name


def test_fp32_model_under_bf16_autocast_equal_too(tiny_model, monkeypatch):
    batch = random_batch(512, 2, 24)
    model = _lora_model(tiny_model, "tiny-llama", torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, rebuilt = _grads(model, batch)
        with monkeypatch.context() as m:
            _without_rebuild(m)
            _, kept = _grads(model, batch)
        with monkeypatch.context() as m:
            rebuilds = []
            m.setattr(rebuilt_inputs.NormOutput, "_make", lambda self, x: rebuilds.append(1) or norm_forward(
                x, self.weight, self.eps, self.gemma)[0])
            _grads(model, batch)
    assert rebuilds  # the fused ops did rebuild their input (bf16 copies of fp32 norm outputs)
    for name in kept:
        assert torch.equal(rebuilt[name], kept[name]), name


@pytest.mark.parametrize("method", ["lora", "loha"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_normalised_and_gated_inputs_not_kept(tiny_model, monkeypatch, dtype, method):
    """Two normalised tensors a layer fewer kept; with LoHa on down_proj (whose op keeps its input) also
    act(gate)·up, rebuilt from gate and up (LoRA's down op rebuilds it already: fused_mlp.GatedDownLora)."""
    model = _lora_model(tiny_model, "tiny-llama", dtype, METHODS[method])
    b, s = 2, 64
    batch = random_batch(512, b, s)
    with _as_trained(dtype):
        now = saved_tensor_bytes(model, batch)
        with monkeypatch.context() as m:
            _without_rebuild(m)
            before = saved_tensor_bytes(model, batch)
    cfg = model.config
    # every layer's two norms (layer 0's input norm too: its weight is frozen, but the embeddings' output
    # needs no grad, so that norm records no graph: its readers keep its output)
    per_norm = b * s * cfg.hidden_size * dtype.itemsize
    gated = b * s * cfg.intermediate_size * dtype.itemsize if method == "loha" else 0
    assert before - now == (2 * cfg.num_hidden_layers - 1) * per_norm + cfg.num_hidden_layers * gated


def test_each_norm_output_rebuilt_once_and_not_held_after(tiny_model, monkeypatch):
    import weakref

    from studio.losses import causal_lm_loss
    model = _lora_model(tiny_model, "tiny-llama", torch.float32)
    made = []
    real = norm_forward

    def counting(*args):
        out = real(*args)
        made.append(weakref.ref(out[0]))
        return out
    monkeypatch.setattr("studio.fused_norm.norm_forward", counting)
    loss, _ = causal_lm_loss(model, random_batch(512, 2, 24))
    forward_norms = len(made)
    assert forward_norms == 2 * model.config.num_hidden_layers + 1
    loss.backward()  # the graph stays alive (loss holds it) ...
    # ... but each rebuilt output is gone: one rebuild per norm output the fused ops read (all but layer 0's
    # input norm, which recorded no graph)
    assert len(made) - forward_norms == 2 * model.config.num_hidden_layers - 1
    assert all(ref() is None for ref in made[forward_norms:])


def test_an_output_changed_in_place_is_kept_not_rebuilt():
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.ones(8)
    y = norm_forward(x.detach(), w, 1e-6, False)[0]
    rebuilt_inputs.attach(y, (x,), rebuilt_inputs.NormOutput(w, 1e-6, False))
    assert rebuilt_inputs.source(y) is not None
    with torch.no_grad():
        y.mul_(2)  # changed after the norm: rebuilding would not give these values
    assert rebuilt_inputs.source(y) is None
    assert rebuilt_inputs.source(torch.randn(3, 8)) is None


def test_only_an_output_with_a_graph_is_marked(tiny_model):
    model = _lora_model(tiny_model, "tiny-llama", torch.float32)
    norm = model.model.layers[1].input_layernorm  # frozen weight
    x = torch.randn(2, 5, model.config.hidden_size)
    assert rebuilt_inputs.source(norm(x)) is None  # no grad anywhere: the norm keeps nothing to rebuild from
    with torch.no_grad():
        assert rebuilt_inputs.source(norm(x.requires_grad_())) is None
    assert rebuilt_inputs.source(norm(x)) is not None


def test_a_changed_norm_weight_fails_loudly(tiny_model):
    w = torch.ones(8, requires_grad=True)
    x = torch.randn(3, 8, requires_grad=True)
    rebuild = rebuilt_inputs.NormOutput(w, 1e-6, False)
    rebuild.readers = 1
    rebuild.output(x.detach())  # one pass: fine
    with torch.no_grad():
        w.add_(1)
    with pytest.raises(RuntimeError, match="modified in place"):
        rebuild.output(x.detach())


def test_checkpointed_and_compiled_layers_train_alike(tiny_model, monkeypatch):
    """Checkpointed layers rebuild inside their recomputation; gradients equal those of keeping the outputs."""
    from studio.checkpointing import enable_gradient_checkpointing
    batch = random_batch(512, 2, 24)
    model = _lora_model(tiny_model, "tiny-llama", torch.float32)
    enable_gradient_checkpointing(model, 0.5)
    _, rebuilt = _grads(model, batch)
    with monkeypatch.context() as m:
        _without_rebuild(m)
        _, kept = _grads(model, batch)
    for name in kept:
        assert torch.equal(rebuilt[name], kept[name]), name


def test_a_retained_graph_rebuilds_again_in_its_second_backward(tiny_model):
    model = _lora_model(tiny_model, "tiny-llama", torch.float32)
    ids = random_batch(512, 2, 24)["input_ids"]
    loss = model(input_ids=ids).logits.pow(2).mean()  # the fused loss does not back up twice; the layers must
    loss.backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    loss.backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, 2 * first[n])
