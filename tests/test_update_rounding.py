"""An adapter's update and the base product are summed before rounding: under bf16 autocast a small update
(the start of training, B just off zero) survives on average instead of being rounded away against an output
already rounded to bf16 (LoRA's fused op, AdaLoRA, the delta methods on the CPU, whose GEMM adds the term in its
epilogue; DoRA's, IA3's and SSF's rescale of a product made in fp32 everywhere); in fp32 a full-size ΔW joins W in
one GEMM, with the outputs and gradients of the two-product form."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from studio.methods import method_config
from studio.methods.adalora import SVDLinear
from studio.methods.dylora import DyLoraLinear
from studio.methods.common import adapter_input
from studio.methods.glora import GloraLinear
from studio.methods.ia3 import IA3Linear
from studio.methods.loha import LoHaLinear
from studio.methods.lokr import LoKrLinear
from studio.methods.lora import LoraLinear
from studio.methods.rescaled_product import fp32_product, mm_fp32_output
from studio.methods.ssf import SsfLinear


# the rounding tests run on CUDA where there is one (baselines/gpu_check.sh runs this file there): its GEMMs'
# epilogues and fp32-output GEMM. cuBLAS rounds its product before the epilogue adds a term (an H200 kept exactly
# the rounded-first share at every shape, baselines/epilogue_check.py, 2026-11-30): there the epilogue's way
# keeps what peft's order keeps, not more
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPILOGUE_KEEPS_TERMS = DEVICE == "cpu"


def _base(bias: bool = False, dtype: torch.dtype = torch.float32, features: int = 256) -> nn.Linear:
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(features, features, bias=bias)
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=gen) * 0.05)
        if bias:
            base.bias.copy_(torch.randn(features, generator=gen) * 0.5)
    return base.to(dtype).requires_grad_(False)


def _perturb(module: nn.Module, scale: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


# each module with the parameter its update is linear in (scaled to make the update small)
MODULES = {
    "lora": (lambda base: LoraLinear(base, 8, 16, 0.0, False, False), "lora_B.weight"),
    "loha": (lambda base: LoHaLinear(base, method_config({"name": "loha", "r": 8})), "hada_w1_a"),
    "lokr": (lambda base: LoKrLinear(base, method_config({"name": "lokr", "r": 8})), "lokr_w1"),
    "dylora": (lambda base: DyLoraLinear(base, method_config({"name": "dylora", "r": 8})), "lora_B.weight"),
    "adalora": (lambda base: SVDLinear(base, 8, 32, 0.0), "lora_B"),
}


def _kept_share(y: torch.Tensor, base_exact: torch.Tensor, update: torch.Tensor) -> float:
    """How much of the update the rounded output holds, as the slope of (y - exact base product) on it."""
    got = y.float() - base_exact
    return float((got * update).sum() / (update * update).sum())


@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_small_update_survives_bf16_rounding(name, bias):
    """Also beside a bias as large as the product (Qwen's q/k/v have such): added before the small term is,
    the bias rounds it away at its own scale. On CUDA where there is one: no less than peft's order keeps."""
    make, linear_in = MODULES[name]
    module = make(_base(bias=bias, dtype=torch.bfloat16)).train()
    _perturb(module)
    x = torch.randn(4096, 256, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    w = module.base_layer.weight.float()
    base_exact = x.float() @ w.t()  # the products of the bf16 operands, unrounded
    with torch.no_grad():
        if bias:  # about the size of the product
            module.base_layer.bias.mul_(2 * base_exact.std() / module.base_layer.bias.float().std())
            base_exact += module.base_layer.bias.float()
        update = module.delta_weight() if name != "lora" else \
            module.lora_B.weight.float() @ module.lora_A.weight.float() * module.scaling
        u = x.float() @ update.float().t()
        # the update about 1/1000 of the output: mostly under half a bf16 step of the values it is added to
        shrink = 1e-3 * base_exact.std() / u.std()
        module.get_parameter(linear_in).mul_(shrink)
        u = u * shrink
        module.to(DEVICE)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            y = module(x.to(DEVICE)).cpu()
    assert y.dtype == torch.bfloat16
    # the way peft adds it (the base output rounded first) keeps much less: the check can tell them apart
    twice = (base_exact.to(torch.bfloat16) + u.to(torch.bfloat16)).float()
    peft_share = _kept_share(twice, base_exact, u)
    assert peft_share < 0.7
    if EPILOGUE_KEEPS_TERMS:
        assert _kept_share(y, base_exact, u) == pytest.approx(1.0, abs=0.1)
    else:
        assert _kept_share(y, base_exact, u) >= peft_share - 0.05


def _plain(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The two-product form through autograd (what keeps ΔW from forward to backward)."""
    return module.base_layer(x) + module.delta_forward(x).to(x.dtype)


FULL_WIDTH = {
    "loha": lambda base: LoHaLinear(base, method_config({"name": "loha", "r": 8})),
    "lokr": lambda base: LoKrLinear(base, method_config({"name": "lokr", "r": 8})),
    "glora": lambda base: GloraLinear(base, method_config({"name": "glora", "r": 4})),
}


@pytest.mark.parametrize("name", sorted(FULL_WIDTH))
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_full_delta_joins_the_weight_with_the_same_outputs_and_gradients(name, bias):
    module = FULL_WIDTH[name](_base(bias=bias)).train()
    _perturb(module)
    assert module.full_width()
    x = torch.randn(3, 16, 256, generator=torch.Generator().manual_seed(3), requires_grad=True)

    runs = []
    for forward in (module, lambda t: _plain(module, t)):
        y = forward(x)
        grads = torch.autograd.grad((y * y).sum(), [x, *[p for p in module.parameters() if p.requires_grad]])
        runs.append((y, grads))
    (y, grads), (want_y, want_grads) = runs
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_low_rank_updates_and_16_bit_layers_keep_two_products():
    """A cheaper delta_forward (DyLoRA, VeRA) or a 16-bit layer is not merged into the weight."""
    dylora = DyLoraLinear(_base(), method_config({"name": "dylora", "r": 8}))
    assert not dylora.full_width()
    loha = LoHaLinear(_base(dtype=torch.bfloat16), method_config({"name": "loha", "r": 8}))
    _perturb(loha)
    x = torch.randn(8, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        got = loha(x)
        want = loha.base_layer(x).float() + loha.delta_forward(x.float()).float()
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", sorted(FULL_WIDTH))
def test_bf16_delta_rebuilt_in_backward_gives_autograds_gradients(name):
    module = FULL_WIDTH[name](_base(bias=True, dtype=torch.bfloat16)).train()
    _perturb(module)
    x = torch.randn(2, 32, 256, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16).requires_grad_()
    params = [p for p in module.parameters() if p.requires_grad]
    runs = []
    for forward in (module, lambda t: _plain(module, t)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = forward(x)
        runs.append((y, torch.autograd.grad(y.float().pow(2).sum(), [x, *params])))
    (y, grads), (want_y, want_grads) = runs
    torch.testing.assert_close(y.float(), want_y.float(), rtol=2e-2, atol=2e-2)
    for got, want in zip(grads, want_grads):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2 * float(want.abs().max()))


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(FULL_WIDTH))
def test_a_full_size_delta_keeps_only_its_input(name, autocast):
    from studio.memory_bench import saved_bytes
    dtype = torch.bfloat16 if autocast else torch.float32
    module = FULL_WIDTH[name](_base(dtype=dtype)).train()
    x = torch.randn(64, 256, dtype=dtype, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        kept, _ = saved_bytes(lambda: module(x), module)
        plain, _ = saved_bytes(lambda: _plain(module, x), module)
    assert kept == x.numel() * x.element_size()
    assert plain >= kept + module.base_layer.weight.numel() * 2  # autograd's way keeps ΔW (and LoHa's factors)


def test_rank_dropout_keeps_autograds_path():
    """Random rows of ΔW in training cannot be rebuilt in backward: such a layer keeps ΔW as autograd does."""
    from studio.memory_bench import saved_bytes
    module = LoHaLinear(_base(), method_config({"name": "loha", "r": 8, "rank_dropout": 0.5})).train()
    x = torch.randn(64, 256, requires_grad=True)
    kept, _ = saved_bytes(lambda: module(x), module)
    assert kept > x.numel() * 4 + module.base_layer.weight.numel() * 4
    module.eval()
    kept, _ = saved_bytes(lambda: module(x), module)
    assert kept == x.numel() * 4


def _dora(base: nn.Linear, dropout: float = 0.0) -> LoraLinear:
    module = LoraLinear(base, 8, 16, dropout, False, True)
    module.init_weights(True)
    return module


def _rescale_reference(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rescaled output through autograd, each term rounded to the activations' dtype as it is made."""
    base = module.base_layer
    if isinstance(module, IA3Linear):
        out = base(x)
        return out * module.ia3_l.flatten().to(out.dtype)
    if isinstance(module, SsfLinear):
        out = base(x)
        return (out.float() * module.ssf_scale + module.ssf_shift).to(out.dtype)
    xa = adapter_input(x, module.lora_A.weight.dtype)
    # the keep-mask drawn as the op draws it (bernoulli_, one byte per element): torch's dropout draws the same
    # numbers on the CPU alone, CUDA's fused dropout other ones
    p = getattr(module.lora_dropout, "p", 0.0)
    keep = torch.empty(xa.shape, dtype=torch.bool, device=xa.device).bernoulli_(1 - p) if p else None
    xd = (xa * keep).mul_(1 / (1 - p)) if p else xa
    lora = module.lora_B(module.lora_A(xd)) * module.scaling
    with torch.no_grad():
        norm = module._combined_weight().norm(dim=1)
    scale = (module.lora_magnitude_vector / norm).to(lora.dtype)
    inner = F.linear(xd, base.weight.to(xd.dtype)) if xd is not xa else base(x) - (0 if base.bias is None else base.bias)
    return base(x) + ((scale - 1) * inner.to(lora.dtype) + scale * lora).to(x.dtype)


RESCALED = {"dora": lambda base: _dora(base), "ia3": lambda base: IA3Linear(base, feedforward=False),
            "ssf": lambda base: SsfLinear(base, shift=True)}


@pytest.fixture(params=["epilogue", "fp32-output"])
def rescale_path(request, monkeypatch):
    """Without an fp32-output GEMM (the CPU: the small terms added in the base GEMM's epilogue; a GPU: the
    operands cast up) or with one (CUDA's 16-bit GEMM with an fp32 output; on the CPU emulated by casting up)."""
    from studio.methods import rescaled_product
    exact = request.param == "fp32-output"
    monkeypatch.setattr(rescaled_product, "fp32_output_gemm", lambda device, dtype: exact)
    if exact and DEVICE == "cpu":
        monkeypatch.setattr(rescaled_product, "mm_fp32_output", lambda a, b: a.float() @ b.float())
    return request.param


@pytest.mark.parametrize("name", sorted(RESCALED))
def test_a_small_rescale_survives_bf16_rounding(name, rescale_path):
    """DoRA's magnitude and direction, IA3's output scale, SSF's scale and shift: a change under half a bf16 step
    of 1 is kept."""
    module = RESCALED[name](_base(bias=True, dtype=torch.bfloat16)).train()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4096, 256, generator=gen).to(torch.bfloat16)
    w, b = module.base_layer.weight.float(), module.base_layer.bias.float()
    on = torch.device(DEVICE)
    base_exact = x.float() @ w.t()
    with torch.no_grad():
        if name == "ia3":
            module.ia3_l.add_(torch.randn(module.ia3_l.shape, generator=gen) * 1e-3)
            want = (base_exact + b) * module.ia3_l.flatten()
        elif name == "ssf":
            module.ssf_scale.add_(torch.randn(256, generator=gen) * 1e-3)
            module.ssf_shift.add_(torch.randn(256, generator=gen) * 1e-4)
            want = (base_exact + b) * module.ssf_scale + module.ssf_shift
        else:
            module.lora_B.weight.normal_(generator=gen).mul_(1e-4)
            module.lora_magnitude_vector.mul_(1 + torch.randn(256, generator=gen) * 1e-3)
            delta = module.delta_weight()
            scale = module.lora_magnitude_vector / (w + delta).norm(dim=1)
            want = scale * (base_exact + x.float() @ delta.t()) + b
        update = want - base_exact - b
        module.to(on)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            y = module(x.to(on)).cpu()
            rounded_first = _rescale_reference(module, x.to(on)).cpu()
    assert y.dtype == torch.bfloat16
    assert _kept_share(y.float() - b, base_exact, update) == pytest.approx(1.0, abs=0.1)
    assert _kept_share(rounded_first.float() - b, base_exact, update) < 0.7


@pytest.mark.parametrize("name,dropout", [("dora", 0.0), ("dora", 0.3), ("ia3", 0.0), ("ssf", 0.0)])
def test_the_rescaled_product_has_autograds_outputs_and_gradients(name, dropout, rescale_path):
    make = (lambda base: _dora(base, dropout)) if name == "dora" else RESCALED[name]
    fp32_tol = 1e-5 if DEVICE == "cpu" else 1e-4  # CUDA's GEMMs sum in other orders
    for dtype, autocast, tol in ((torch.float32, False, fp32_tol), (torch.bfloat16, True, 3e-2)):
        module = make(_base(bias=True, dtype=dtype)).train()
        _perturb(module, 0.05)
        module.to(DEVICE)
        x = torch.randn(2, 32, 256, generator=torch.Generator().manual_seed(6)).to(DEVICE, dtype).requires_grad_()
        params = [p for p in module.parameters() if p.requires_grad]
        runs = []
        for forward in (module, lambda t: _rescale_reference(module, t)):
            torch.manual_seed(7)  # the same dropout draw
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
                y = forward(x)
            runs.append((y, torch.autograd.grad(y.float().pow(2).sum(), [x, *params])))
        (y, grads), (want_y, want_grads) = runs
        assert y.dtype == want_y.dtype == dtype
        torch.testing.assert_close(y.float(), want_y.float(), rtol=tol, atol=tol)
        for got, want in zip(grads, want_grads):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * float(want.abs().max()))


def test_cuda_takes_16_bit_operands_with_an_fp32_output():
    """The CUDA branch of fp32_product: torch's mm with out_dtype (checked on meta tensors here)."""
    x = torch.empty(64, 32, dtype=torch.bfloat16, device="meta")
    w = torch.empty(16, 32, dtype=torch.bfloat16, device="meta")
    y = mm_fp32_output(x, w.t())
    assert y.dtype == torch.float32 and y.shape == (64, 16)
    cpu = fp32_product(torch.randn(8, 32).to(torch.bfloat16), torch.randn(16, 32).to(torch.bfloat16))
    assert cpu.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dora_row_norms_without_the_combined_weight(dtype):
    from studio.methods.dora_norm import dora_row_norms
    torch.manual_seed(0)
    module = _dora(_base(dtype=dtype))
    _perturb(module, 0.05)
    want = module._combined_weight().norm(dim=1)
    torch.testing.assert_close(dora_row_norms(module), want, rtol=1e-5, atol=0)
    with torch.no_grad():  # a changed base weight (merge, PiSSA's residual) is read again
        module.base_layer.weight.mul_(2)
    torch.testing.assert_close(dora_row_norms(module), module._combined_weight().norm(dim=1), rtol=1e-5, atol=0)


def test_off_the_cpu_without_an_fp32_output_gemm_the_operands_cast_up(monkeypatch):
    """The epilogue's way is the CPU's alone (on an H200 it kept 20-46% of the small terms): a GPU without
    torch.mm(out_dtype=) computes the products from operands cast to fp32."""
    from studio.methods import rescaled_product
    monkeypatch.setattr(rescaled_product, "fp32_output_gemm", lambda device, dtype: False)
    assert rescaled_product.exact_products(torch.device("cuda"), torch.bfloat16)
    assert not rescaled_product.exact_products(torch.device("cpu"), torch.bfloat16)
    assert rescaled_product.exact_products(torch.device("cpu"), torch.float32)
