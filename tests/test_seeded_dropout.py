"""Dropout and the methods' own draws taken from a seed on the device (studio/seeded_dropout.py,
kernels/dropout.py): compiled on a CUDA machine, else on the CPU through Triton's interpreter (conftest
sets TRITON_INTERPRET=1 there; kernels.forced() routes CPU tensors)."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from studio import kernels, seeded_dropout  # noqa: E402
from studio.checkpointing import draws_at_random, enable_gradient_checkpointing  # noqa: E402
from studio.kernels import dropout  # noqa: E402
from studio.losses import causal_lm_loss  # noqa: E402
from studio.methods import apply_method, method_config  # noqa: E402
from studio.methods.lora import LoraLinear  # noqa: E402
from studio.models import build_random_model, model_presets  # noqa: E402
from studio.seeded_dropout import SeededDrop, SeededDropout  # noqa: E402


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


class _Pinned(nn.Module):
    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.scale = scale

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.scale


def test_uniform_draws_are_a_function_of_seed_site_and_position(forced):
    seed = torch.tensor(7, device=DEVICE)
    u = dropout.uniform((50, 41), seed, 2)
    assert u.dtype == torch.float32 and u.shape == (50, 41)
    assert torch.equal(u, dropout.uniform((50, 41), seed, 2))
    assert 0 <= u.min().item() and u.max().item() < 1 and abs(u.mean().item() - 0.5) < 0.03
    assert not torch.equal(u, dropout.uniform((50, 41), seed, 3))
    assert not torch.equal(u, dropout.uniform((50, 41), torch.tensor(8, device=DEVICE), 2))


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
    lora.lora_dropout.__class__ = SeededDropout  # as arm() makes it
    lora.lora_dropout.seeded_drop = (seed, 3)
    x = torch.randn(2, 7, 40).to(DEVICE)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = lora(x1)
    keep = (dropout.apply(torch.ones(14, 40, device=DEVICE), seed, 3, 0.25) != 0).view(x.shape)
    assert (type(y.grad_fn).__name__ == "FusedLoraLinearBackward") == fused
    if fused:
        assert not any(t is not None and t.dtype == torch.bool for t in y.grad_fn.saved_tensors)
        ref = base(x2) + lora.lora_B(lora.lora_A(x2 * keep / 0.75)) * lora.scaling
    else:  # the module path with the mask pinned to the seed's by hand
        armed, lora.lora_dropout = lora.lora_dropout, _Pinned(keep / 0.75)
        ref = lora(x2)
        lora.lora_dropout = armed
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(y)
    params = [p for p in lora.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(y, [x1, *params], dy), torch.autograd.grad(ref, [x2, *params], dy)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


DRAWING = {  # a method config whose training forward draws random numbers, and what draws
    "lora": ({"name": "lora", "r": 4, "lora_dropout": 0.2}, "its fused op's dropout"),
    "dora": ({"name": "lora", "r": 4, "lora_dropout": 0.2, "use_dora": True}, "dropout on the module path"),
    "adalora": ({"name": "adalora", "init_r": 4, "target_r": 2, "lora_dropout": 0.2}, "the SVD layers' dropout"),
    "dylora": ({"name": "dylora", "r": 4, "lora_dropout": 0.2}, "an nn.Dropout of the method's"),
    "vera": ({"name": "vera", "r": 8, "vera_dropout": 0.2}, "an nn.Dropout of the method's"),
    "adamix": ({"name": "adamix", "num_experts": 3}, "the routing"),
    "diff_pruning": ({"name": "diff_pruning"}, "the gates' noise"),
    "loha": ({"name": "loha", "r": 4, "rank_dropout": 0.3}, "rank dropout"),
    "lokr": ({"name": "lokr", "r": 4, "rank_dropout": 0.3}, "rank dropout"),
}


def _train(method: dict, arm: bool, ckpt: bool, steps: int = 2) -> tuple[list[float], torch.Tensor]:
    """Losses and the change of the trained weights over a few SGD steps of a tiny Llama with a method that
    draws in its forward; checkpointed without restoring the generator for the recomputation (as a
    captured step checkpoints)."""
    model = build_random_model(model_presets()["tiny-llama"]["config"], seed=0).to(DEVICE).train()
    apply_method(model, method_config(dict(method)))
    assert draws_at_random(model)
    if arm:
        with _routed():  # only to arm: on the CPU the other fused ops keep their torch path (faster there)
            assert seeded_dropout.arm(model, DEVICE)
        assert not draws_at_random(model)  # checkpointing need not restore the generator for these
    if ckpt:
        enable_gradient_checkpointing(model, 1.0, preserve_rng=False)
    params = [p for p in model.parameters() if p.requires_grad]
    before = torch.cat([p.detach().flatten() for p in params])
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
    return out, torch.cat([p.detach().flatten() for p in params]) - before


@pytest.mark.parametrize("name", list(DRAWING))
def test_a_recomputed_layer_draws_the_forward_numbers_without_the_generator_reset(name):
    """What lets a checkpointed step that draws random numbers be captured: armed, the recomputation reads
    the forward's seed, so training matches the run without checkpointing even when the checkpoint does
    not put the generator back; torch's generator, without that reset, draws other numbers in the
    recomputation, and the weights' updates part from the run's."""
    method = DRAWING[name][0]
    losses, update = _train(method, arm=True, ckpt=False)
    ckpt_losses, ckpt_update = _train(method, arm=True, ckpt=True)
    assert ckpt_losses == pytest.approx(losses, rel=1e-5)
    torch.testing.assert_close(ckpt_update, update, rtol=1e-4, atol=1e-7)
    _, plain = _train(method, arm=False, ckpt=False)
    _, redrawn = _train(method, arm=False, ckpt=True)
    assert (redrawn - plain).norm() > 0.01 * plain.norm()


def test_the_models_own_dropouts_stay_torchs():
    """A model's attention code may read a Dropout's p and draw inside sdpa instead of calling the module
    (GPT-2's attn_dropout): only the method's own dropouts are seeded, and the model's still count."""
    model = build_random_model(model_presets()["tiny-llama"]["config"], seed=0).to(DEVICE).train()
    apply_method(model, method_config({"name": "lora", "r": 4, "lora_dropout": 0.1}))
    model.model.layers[0].self_attn.attn_dropout = own = nn.Dropout(0.1)
    with _routed():
        assert seeded_dropout.arm(model, DEVICE)
    assert type(own) is nn.Dropout and draws_at_random(model)


def test_arming_seeds_every_draw_site_and_draws_a_seed_per_training_forward():
    model = build_random_model(model_presets()["tiny-llama"]["config"], seed=0).to(DEVICE).train()
    apply_method(model, method_config({"name": "lora", "r": 4, "lora_dropout": 0.1}))
    assert draws_at_random(model)
    with _routed():
        assert seeded_dropout.arm(model, DEVICE)
    assert not draws_at_random(model)
    loras = [m for m in model.modules() if isinstance(m, LoraLinear)]
    drops = [m.lora_dropout for m in loras]
    assert all(type(d) is SeededDropout for d in drops)
    seed = drops[0].seeded_drop[0]
    assert sorted(d.seeded_drop[1] for d in drops) == list(range(len(drops)))
    assert all(d.seeded_drop[0] is seed for d in drops)
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


@pytest.mark.parametrize("name", ["adamix", "diff_pruning", "loha"])
def test_own_draws_take_the_seed_when_armed(name):
    """The methods' own draws (routing, gates, rank rows) read (seed, site); a new seed draws anew, and an
    unarmed module keeps torch's generator."""
    model = build_random_model(model_presets()["tiny-llama"]["config"], seed=0).to(DEVICE).train()
    apply_method(model, method_config(dict(DRAWING[name][0])))
    drawers = [m for m in model.modules() if callable(getattr(type(m), "seedable_draws", None)) and m.seedable_draws()]
    assert drawers and all(getattr(m, "seeded_rng", None) is None for m in drawers)
    torch.manual_seed(3)
    unarmed = seeded_dropout.uniform(drawers[0], (5,), DEVICE)
    torch.manual_seed(3)
    assert torch.equal(unarmed, torch.rand(5, device=DEVICE))
    with _routed():
        assert seeded_dropout.arm(model, DEVICE)
    assert sorted(m.seeded_rng[1] for m in drawers) == list(range(len(drawers)))
    seed = drawers[0].seeded_rng[0]
    a = seeded_dropout.uniform(drawers[0], (5,), DEVICE)
    assert torch.equal(a, seeded_dropout.uniform(drawers[0], (5,), DEVICE))
    assert not torch.equal(a, seeded_dropout.uniform(drawers[1], (5,), DEVICE))
    seed.add_(1)
    assert not torch.equal(a, seeded_dropout.uniform(drawers[0], (5,), DEVICE))


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4, "lora_dropout": 0.0}, {"name": "adamix", "num_experts": 1},
                                    {"name": "loha", "r": 4}])
def test_nothing_to_arm_without_draws(forced, method):
    model = build_random_model(model_presets()["tiny-llama"]["config"], seed=0)
    apply_method(model, method_config(method))
    assert not draws_at_random(model.train())
    assert not seeded_dropout.arm(model, DEVICE)
