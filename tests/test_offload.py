"""Offloaded gradient checkpointing (studio/offload.py): the same gradients as torch's checkpoint for
every method, the layer inputs held by the offloader (not by autograd) and fetched back one layer
ahead, and the estimator's account of it. On the CPU the offloader runs with devices=("cpu",): the
same pack / fetch / prefetch logic, with plain copies where CUDA would use a side stream."""
from __future__ import annotations

import weakref

import pytest
import torch

from method_matrix import CASES
from studio.checkpointing import enable_gradient_checkpointing, setup_checkpointing
from studio.config import ModelConfig, RunConfig, TrainConfig
from studio.losses import causal_lm_loss
from studio.memory import estimate
from studio.memory_search import switches
from studio.memory_bench import random_batch, saved_tensor_bytes
from studio.methods import apply_method, method_config
from studio.models import load_model
from studio.offload import CheckpointOffloader


def _model(arch: str, method: dict, mode: str) -> tuple[torch.nn.Module, CheckpointOffloader | None]:
    """mode: plain (no checkpointing), ckpt (torch's checkpoint), offload (ours, on the CPU)."""
    model, _ = load_model(ModelConfig(name=arch, device="cpu"), seed=0)
    apply_method(model, method_config(method))
    offloader = CheckpointOffloader(min_bytes=0, devices=("cpu",)) if mode == "offload" else None
    if mode != "plain":
        enable_gradient_checkpointing(model, 1.0, offloader)
    return model.train(), offloader


def _grads(arch: str, method: dict, mode: str) -> tuple[float, dict[str, torch.Tensor]]:
    model, _ = _model(arch, method, mode)
    torch.manual_seed(1)  # the same dropout masks in every mode
    loss, _ = causal_lm_loss(model, random_batch(model.config.vocab_size, 2, 24))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


CASE_PARAMS = [pytest.param({"name": c.name, **c.overrides}, id=c.id) for c in CASES]


@pytest.mark.parametrize("method", CASE_PARAMS)
def test_offloaded_checkpointing_gives_the_checkpoint_gradients(method):
    """Bitwise the gradients of torch's checkpoint (the same recompute), and those of no checkpointing."""
    loss_c, ckpt = _grads("tiny-llama", method, "ckpt")
    loss_o, off = _grads("tiny-llama", method, "offload")
    loss_p, plain = _grads("tiny-llama", method, "plain")
    assert ckpt and set(off) == set(ckpt) == set(plain)
    assert loss_o == loss_c
    for name in ckpt:
        assert torch.equal(off[name], ckpt[name]), name
        torch.testing.assert_close(off[name], plain[name], rtol=1e-4, atol=1e-6)
    assert abs(loss_o - loss_p) < 1e-5


@pytest.mark.parametrize("arch", ["tiny-qwen2", "tiny-gemma3"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_offloaded_lora_on_other_architectures(arch, dropout):
    method = {"name": "lora", "r": 4, "target_modules": "all-linear", "lora_dropout": dropout}
    _, ckpt = _grads(arch, method, "ckpt")
    _, off = _grads(arch, method, "offload")
    assert all(torch.equal(off[n], ckpt[n]) for n in ckpt)


def test_layer_inputs_leave_autograd_and_return_after_backward():
    """While the graph lives the offloader holds exactly one rows x hidden input per layer, autograd
    saves exactly that much less, and after backward nothing is left behind."""
    method = {"name": "lora", "r": 4, "lora_dropout": 0.0}
    ckpt, _ = _model("tiny-llama", method, "ckpt")
    model, offloader = _model("tiny-llama", method, "offload")
    c = model.config
    batch = random_batch(c.vocab_size, 2, 24)
    inputs = c.num_hidden_layers * 2 * 24 * c.hidden_size * 4
    assert saved_tensor_bytes(ckpt, batch) - saved_tensor_bytes(model, batch) == inputs
    loss, _ = causal_lm_loss(model, batch)
    assert offloader.offloaded_bytes == inputs
    loss.backward()
    del loss
    assert offloader.offloaded_bytes == 0


def test_backward_fetches_each_input_once_one_layer_ahead(monkeypatch):
    method = {"name": "lora", "r": 4, "lora_dropout": 0.0}
    model, offloader = _model("tiny-llama", method, "offload")
    events: list[tuple[str, int]] = []
    order: dict[int, int] = {}
    pack, fetch, unpack = offloader.pack, offloader._fetch, offloader.unpack

    stores = []
    most_on_device = [0]

    def spy_pack(t):
        stored = pack(t)
        order[id(stored)] = len(order)
        stores.append(weakref.ref(stored))
        return stored

    def spy_fetch(stored):
        events.append(("fetch", order[id(stored)]))
        fetch(stored)

    def spy_unpack(stored):
        events.append(("use", order[id(stored)]))
        out = unpack(stored)
        held = sum(1 for ref in stores if ref() is not None and ref().fetched is not None)
        most_on_device[0] = max(most_on_device[0], held)
        return out

    monkeypatch.setattr(offloader, "pack", spy_pack)
    monkeypatch.setattr(offloader, "_fetch", spy_fetch)
    monkeypatch.setattr(offloader, "unpack", spy_unpack)
    enable_gradient_checkpointing(model, 1.0, offloader)  # re-bind the hooks to the spies
    loss, _ = causal_lm_loss(model, random_batch(model.config.vocab_size, 2, 24))
    loss.backward()
    n = model.config.num_hidden_layers
    # the top layer is fetched when needed; every other layer was already fetched by the layer above
    expected = [("use", n - 1), ("fetch", n - 1), ("fetch", n - 2)]
    for k in range(n - 2, 0, -1):
        expected += [("use", k), ("fetch", k - 1)]
    expected.append(("use", 0))
    assert events == expected
    assert most_on_device[0] == 1  # besides the input in use, only the one fetched ahead is on the device


def test_retained_graph_backs_up_twice():
    method = {"name": "lora", "r": 4, "lora_dropout": 0.0}
    model, _ = _model("tiny-llama", method, "offload")
    ids = random_batch(model.config.vocab_size, 2, 24)["input_ids"]
    loss = model(input_ids=ids).logits.pow(2).mean()  # the fused loss does not replay; the layers must
    loss.backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    loss.backward()
    assert all(torch.allclose(p.grad, 2 * first[n]) for n, p in model.named_parameters() if p.grad is not None)


def test_small_tensors_and_other_devices_stay_where_they_are():
    offloader = CheckpointOffloader(min_bytes=1024, devices=("cpu",))
    small = torch.ones(8)
    assert offloader.pack(small) is small and offloader.unpack(small) is small
    cpu_big = torch.ones(1 << 20)
    assert CheckpointOffloader().pack(cpu_big) is cpu_big  # by default only CUDA tensors move
    big = torch.arange(1024, dtype=torch.float32)
    stored = offloader.pack(big)
    assert stored is not big and offloader.offloaded_bytes == 4096
    assert torch.equal(offloader.unpack(stored), big)


def test_setup_checkpointing_says_when_offloading_does_nothing(tiny_model):
    model = tiny_model()
    assert "ignored" in setup_checkpointing(model, TrainConfig(offload_checkpoints=True), cpu=True)
    note = setup_checkpointing(model, TrainConfig(offload_checkpoints=True, checkpoint_budget_gb=20), cpu=True)
    assert "train.offload_checkpoints and train.checkpoint_budget_gb" in note and "ignored" in note
    note = setup_checkpointing(model, TrainConfig(gradient_checkpointing=True, offload_checkpoints=True), cpu=True)
    assert "no effect on the CPU" in note
    assert setup_checkpointing(model, TrainConfig(gradient_checkpointing=True), cpu=False) is None


def test_setup_checkpointing_offloads_on_cuda_runs(tiny_model):
    model = tiny_model()
    note = setup_checkpointing(model, TrainConfig(gradient_checkpointing=True, offload_checkpoints=True), cpu=False)
    assert "pinned CPU RAM" in note
    funcs = {layer._gradient_checkpointing_func.func.__name__ for layer in model.model.layers}
    assert funcs == {"offloaded_checkpoint"}


def _est(offload: bool, device: str = "cuda", model: str = "qwen2.5-7b"):
    cfg = RunConfig.from_dict({"model": {"name": model}, "data": {"max_length": 2048},
                               "method": {"name": "lora", "r": 16, "target_modules": "all-linear", "lora_dropout": 0.0},
                               "train": {"batch_size": 4, "gradient_checkpointing": True,
                                         "offload_checkpoints": offload}})
    return estimate(cfg, device, padding=False)


def test_estimate_moves_the_layer_inputs_to_host_memory():
    on, off = _est(True), _est(False)
    layers, rows, hidden = 27, 4 * 2048, 3584  # recomputed: all 28 but the top one, kept for free in both
    assert on.details["checkpointed_layers"] == off.details["checkpointed_layers"] == layers
    one_input = rows * hidden * 2
    assert off.details["saved_for_backward"] - on.details["saved_for_backward"] == layers * one_input
    assert on.details["offloaded_to_host"] == layers * one_input and off.details["offloaded_to_host"] == 0
    assert any("pinned CPU RAM" in note for note in on.details["notes"])
    # the peak keeps the input being recomputed and the one fetched ahead, and moves to the bottom
    # layers, where the adapters' gradients have piled up: most, not all, of the inputs are saved
    assert 0.8 * layers * one_input <= off.total - on.total < layers * one_input
    assert _est(True, "cpu").total == _est(False, "cpu").total  # nothing to move on the CPU


def test_offloading_is_a_memory_switch():
    run = RunConfig.from_dict({"model": {"name": "qwen2.5-7b"}, "train": {"gradient_checkpointing": True}})
    labels = [label for label, _ in switches(run)]
    assert any("CPU RAM" in label for label in labels)
    run.train.offload_checkpoints = True
    assert not any("CPU RAM" in label for label in (label for label, _ in switches(run)))


def test_checkpointing_does_not_make_the_embeddings_output_require_grad():
    """transformers' switch hooks the embeddings so their output requires grad (for the reentrant
    checkpoint); ours removes it: with frozen embeddings no layer computes input gradients for nothing."""
    model, _ = _model("tiny-llama", {"name": "lora", "r": 4}, "ckpt")
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    causal_lm_loss(model, random_batch(model.config.vocab_size, 2, 8))
    assert seen == [False]
