"""DoRA's dropped input (studio/methods/dropped_input.py): the outputs and gradients of nn.Dropout + lora_A for the
same mask, one mask for both reads, and no dropped copy of the input kept."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from studio.memory_bench import random_batch, saved_tensor_bytes
from studio.methods import apply_method, method_config
from studio.methods.lora import LoraLinear

P = 0.25


def _fixed_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A keep-mask from its own seeded generator: the same for the same shape, in either path."""
    g = torch.Generator().manual_seed(x.numel() % 7919)
    return torch.rand(x.shape, generator=g) >= p


class _PinnedDropout(nn.Module):
    """The module path's dropout with the pinned mask (scaled as the fused ops scale: by 1 / (1 - p) in fp32, where
    nn.Dropout on the CPU scales by that number rounded to x's dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * _fixed_mask(x, P) * (1.0 / (1.0 - P))


def _dora(dtype: torch.dtype, dropout: float) -> LoraLinear:
    torch.manual_seed(1)
    base = nn.Linear(40, 24, bias=True).to(dtype).requires_grad_(False)
    lora = LoraLinear(base, r=4, alpha=8, dropout=dropout, rslora=False, dora=True)
    lora.init_weights("false")  # B != 0: every gradient non-trivial
    return lora


def _outputs(lora: LoraLinear, x: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = lora(x)
    params = [lora.lora_A.weight, lora.lora_B.weight, lora.lora_magnitude_vector]
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.dtype)
    return y, list(torch.autograd.grad(y, [x, *params], dy))


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("dropout", [0.0, P], ids=["nodrop", "dropout"])
def test_equal_to_dropout_and_linear_modules(monkeypatch, dropout, autocast):
    monkeypatch.setattr("studio.methods.dropped_input.dropout_mask", _fixed_mask)
    lora = _dora(torch.bfloat16 if autocast else torch.float32, dropout)
    x = torch.randn(2, 7, 40, generator=torch.Generator().manual_seed(2)).to(lora.base_layer.weight.dtype)
    y, grads = _outputs(lora, x, autocast)
    with monkeypatch.context() as m:  # the module path: nn.Dropout's place taken by the pinned mask
        m.setattr(LoraLinear, "drops_in_op", lambda self: False)
        if dropout:
            m.setattr(lora, "lora_dropout", _PinnedDropout())
        y_ref, grads_ref = _outputs(lora, x, autocast)
    assert torch.equal(y, y_ref)
    # x's gradient: the dropout's backward runs once per read here (drop(a) + drop(b), not drop(a + b)): the
    # same sum in another order
    tol = 1e-6 if not autocast else 1e-2
    torch.testing.assert_close(grads[0], grads_ref[0], atol=tol, rtol=tol)
    for got, want in zip(grads[1:], grads_ref[1:]):
        assert torch.equal(got, want)


def test_one_mask_serves_both_reads():
    """The rescaled base product and A's product see the same dropped input (peft's DoRA with dropout)."""
    lora = _dora(torch.float32, P)
    x = torch.randn(3, 5, 40)
    torch.manual_seed(7)
    y = lora(x)
    torch.manual_seed(7)
    keep = torch.empty(x.shape, dtype=torch.bool).bernoulli_(1 - P)  # the op's draw, repeated
    xd = x * keep / (1 - P)
    w = lora.base_layer.weight
    lora_out = lora.lora_B(lora.lora_A(xd)) * lora.scaling
    norm = (w + lora.scaling * lora.lora_B.weight @ lora.lora_A.weight).norm(dim=1).detach()
    scale = lora.lora_magnitude_vector / norm
    want = x @ w.t() + (scale - 1) * (xd @ w.t()) + scale * lora_out + lora.base_layer.bias
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dropout_keeps_only_a_bool_mask(tiny_model, monkeypatch, dtype):
    """With dropout, q, k, v and o kept a dropped copy of their input each (and the CPU's dropout a noise tensor);
    now dropout costs one bool mask per adapted input element over DoRA without it."""
    import contextlib
    ctx = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    b, s = 2, 64
    batch = random_batch(512, b, s)

    def saved(dropout: float, plain: bool = True) -> int:
        model = tiny_model("tiny-llama", dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
        apply_method(model, method_config({"name": "dora", "lora_dropout": dropout}))
        with ctx, monkeypatch.context() as m:
            if not plain:
                m.setattr(LoraLinear, "drops_in_op", lambda self: False)
            return saved_tensor_bytes(model, batch)
    cfg = tiny_model("tiny-llama").config
    masks = cfg.num_hidden_layers * 4 * b * s * cfg.hidden_size  # q, k, v, o: one byte per input element
    assert saved(0.05) - saved(0.0) == masks
    # the module path kept a dropped copy in x's dtype per adapter besides its mask
    assert saved(0.05, plain=False) - saved(0.05) >= masks * dtype.itemsize
