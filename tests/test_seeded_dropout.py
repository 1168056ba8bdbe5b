"""LoRA dropout drawn from a seed on the device (studio/seeded_dropout.py, kernels/dropout.py): compiled on a
CUDA machine, else on the CPU through Triton's interpreter (conftest sets TRITON_INTERPRET=1 there;
kernels.forced() routes CPU tensors)."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from studio import kernels, seeded_dropout  # noqa: E402
from studio.checkpointing import enable_gradient_checkpointing, has_dropout  # noqa: E402
from studio.kernels import dropout  # noqa: E402
from studio.losses import causal_lm_loss  # noqa: E402
from studio.methods import apply_method, method_config  # noqa: E402
from studio.methods.lora import LoraLinear  # noqa: E402
from studio.models import build_random_model, model_presets  # noqa: E402
from studio.seeded_dropout import SeededDrop  # noqa: E402


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _routed() -> contextlib.AbstractContextManager:
    """CPU tensors to the kernels (the interpreter); CUDA ones go there anyway."""
    return kernels.forced() if DEVICE.type == "cpu" else contextlib.nullcontext()


@pytest.fixture
def forced():
    with _routed():
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_mask_is_a_function_of_seed_site_and_position(forced, dtype):
    x = torch.randn(37, 300).to(DEVICE, dtype)
    seed = torch.tensor(2024, device=DEVICE)
    a = dropout.apply(x, seed, 5, 0.3)
    assert torch.equal(a, dropout.apply(x, seed, 5, 0.3))  # drawn again: the same
    kept = a != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.02
    torch.testing.assert_close(a[kept], (x[kept].float() / 0.7).to(dtype))
    g = torch.randn(37, 300).to(DEVICE, dtype)  # another tensor of the layout (the gradient): the same mask
    assert torch.equal(dropout.apply(g, seed, 5, 0.3) != 0, kept & (g != 0))
    assert not torch.equal(dropout.apply(x, seed, 6, 0.3) != 0, kept)  # another site
    assert not torch.equal(dropout.apply(x, torch.tensor(2025, device=DEVICE), 5, 0.3) != 0, kept)  # another seed
    assert seeded_dropout.ready(DEVICE)


def test_ready_only_where_the_kernels_run():
    assert not seeded_dropout.ready(torch.device("cpu"))  # the CPU keeps torch's dropout
    with kernels.forced(), kernels.disabled():
        assert not seeded_dropout.ready(torch.device("cpu"))


@pytest.mark.parametrize("fused", [True, False], ids=["fused-op", "module-path"])
def test_lora_with_a_seeded_drop_keeps_no_mask_and_matches_the_masked_reference(forced, fused):
    """y = W x + s · B A (x · keep / (1 - p)) and its gradients, keep the seed's mask; the fused op keeps no
    bool mask for backward (it regenerates it); DoRA's module path takes the same draw."""
    torch.manual_seed(0)
    base = nn.Linear(40, 24).to(DEVICE)
    base.requires_grad_(False)
    lora = LoraLinear(base, 4, 8, 0.25, False, not fused)
    if not fused:
        with torch.no_grad():
            lora.lora_magnitude_vector.copy_(base.weight.norm(dim=1))
    nn.init.normal_(lora.lora_B.weight, std=0.1)
    seed = torch.tensor(99, device=DEVICE)
    lora.seeded_drop = (seed, 3)
    x = torch.randn(2, 7, 40).to(DEVICE)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = lora(x1)
    keep = (dropout.apply(torch.ones(14, 40, device=DEVICE), seed, 3, 0.25) != 0).view(x.shape)
    assert (type(y.grad_fn).__name__ == "FusedLoraLinearBackward") == fused
    if fused:
        assert not any(t is not None and t.dtype == torch.bool for t in y.grad_fn.saved_tensors)
        ref = base(x2) + lora.lora_B(lora.lora_A(x2 * keep / 0.75)) * lora.scaling
    else:
        del lora.seeded_drop  # the module path with torch's dropout, its mask pinned to the seed's
        lora.lora_dropout.forward = lambda t: t * keep / 0.75
        ref = lora(x2)
        lora.seeded_drop = (seed, 3)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(y)
    params = [p for p in lora.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(y, [x1, *params], dy), torch.autograd.grad(ref, [x2, *params], dy)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _losses(arm: bool, ckpt: bool, steps: int = 2) -> list[float]:
    """A few SGD steps of a tiny Llama with LoRA dropout 0.2; checkpointed without restoring the generator
    for the recomputation (as a captured step checkpoints)."""
    model = build_random_model(model_presets()["tiny-llama"]["config"], seed=0).to(DEVICE).train()
    apply_method(model, method_config({"name": "lora", "r": 4, "lora_dropout": 0.2}))
    if arm:
        with _routed():  # only to arm: on the CPU the other fused ops keep their torch path (faster there)
            assert seeded_dropout.arm(model, DEVICE)
    if ckpt:
        enable_gradient_checkpointing(model, 1.0, preserve_rng=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    ids = torch.randint(5, 200, (2, 24), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    torch.manual_seed(7)
    out = []
    for _ in range(steps):
        loss, _ = causal_lm_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                         "labels": ids.clone()}, chunk=16)
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return out


def test_a_recomputed_layer_draws_the_forward_masks_without_the_generator_reset():
    """What lets a checkpointed step with LoRA dropout be captured: armed, the recomputation reads the
    forward's seed, so training matches the run without checkpointing even when the checkpoint does not
    put the generator back; torch's dropout, without that reset, draws other masks and parts from it."""
    plain = _losses(arm=True, ckpt=False)
    assert _losses(arm=True, ckpt=True) == pytest.approx(plain, rel=1e-5)
    assert _losses(arm=False, ckpt=True) != pytest.approx(_losses(arm=False, ckpt=False), rel=1e-4)


def test_arming_marks_the_lora_dropouts_seeded_and_draws_a_seed_per_training_forward():
    model = build_random_model(model_presets()["tiny-llama"]["config"], seed=0).to(DEVICE).train()
    apply_method(model, method_config({"name": "lora", "r": 4, "lora_dropout": 0.1}))
    assert has_dropout(model)
    with _routed():
        assert seeded_dropout.arm(model, DEVICE)
    assert not has_dropout(model)  # checkpointing need not restore the generator for these
    loras = [m for m in model.modules() if isinstance(m, LoraLinear)]
    seed = loras[0].seeded_drop[0]
    assert [m.seeded_drop[1] for m in loras] == list(range(len(loras)))
    assert all(m.seeded_drop[0] is seed for m in loras)
    ids = torch.randint(5, 200, (1, 8)).to(DEVICE)
    model(input_ids=ids)
    first = int(seed)
    model(input_ids=ids)
    second = int(seed)
    assert second != first
    model.eval()
    model(input_ids=ids)
    with torch.no_grad():
        model.train()
        model(input_ids=ids)  # generation and evaluation draw nothing
    assert int(seed) == second
    assert isinstance(seeded_dropout.module_drop(loras[0]), SeededDrop)
    model.eval()
    assert seeded_dropout.module_drop(loras[0]) == 0.0


def test_adalora_takes_the_seeded_dropout_too():
    """AdaLoRA's SVD layers arm as LoRA's do; checkpointed without the generator reset they train as without
    checkpointing."""
    def losses(ckpt: bool) -> list[float]:
        model = build_random_model(model_presets()["tiny-llama"]["config"], seed=0).to(DEVICE).train()
        apply_method(model, method_config({"name": "adalora", "init_r": 4, "target_r": 2, "lora_dropout": 0.2}))
        with _routed():
            assert seeded_dropout.arm(model, DEVICE)
        assert not has_dropout(model)
        if ckpt:
            enable_gradient_checkpointing(model, 1.0, preserve_rng=False)
        ids = torch.randint(5, 200, (2, 24), generator=torch.Generator().manual_seed(1)).to(DEVICE)
        torch.manual_seed(7)
        out = []
        for _ in range(2):
            loss, _ = causal_lm_loss(model, {"input_ids": ids, "labels": ids.clone()}, chunk=16)
            loss.backward()
            out.append(loss.item())
        return out
    assert losses(True) == pytest.approx(losses(False), rel=1e-5)


def test_nothing_to_arm_without_lora_dropout(forced):
    model = build_random_model(model_presets()["tiny-llama"]["config"], seed=0)
    apply_method(model, method_config({"name": "lora", "r": 4, "lora_dropout": 0.0}))
    assert not seeded_dropout.arm(model, DEVICE)
