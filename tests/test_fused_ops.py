"""The engine's fused ops (fused_norm.py, fused_mlp.py, methods/lora_fused.py) against the code they replace.

RMSNorm and the gated MLP: the forward is bitwise the transformers module's, the gradients equal
autograd's through it, for every class we swap. LoRA: output and gradients equal the unfused module path (fp32 exact,
bf16 autocast within bf16 noise). Training: loss curves of the fused engine equal the unfused one.
"""
from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import nn

from studio.fused_mlp import MLP_CLASSES, fuse_mlps, fusable_mlp
from studio.fused_norm import GEMMA_NORMS, LLAMA_NORMS, fuse_norms, fusable_norm
from studio.memory_bench import saved_bytes
from studio.methods import apply_method, method_config
from studio.methods.lora import LoraLinear

from training import fit

NORM_MODULES = {"GemmaRMSNorm": "gemma", "Gemma2RMSNorm": "gemma2", "Gemma3RMSNorm": "gemma3",
                "LlamaRMSNorm": "llama", "Qwen2RMSNorm": "qwen2", "Qwen3RMSNorm": "qwen3",
                "MistralRMSNorm": "mistral", "Phi3RMSNorm": "phi3"}


def _norm(cls_name: str, width: int = 48) -> nn.Module:
    mod = importlib.import_module(f"transformers.models.{NORM_MODULES[cls_name]}.modeling_{NORM_MODULES[cls_name]}")
    norm = getattr(mod, cls_name)(width, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(0, 0.5)
    return norm


def test_every_swapped_class_is_covered():
    assert set(NORM_MODULES) == set(GEMMA_NORMS + LLAMA_NORMS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cls_name", sorted(NORM_MODULES))
def test_fused_rmsnorm_equals_transformers(cls_name, dtype):
    torch.manual_seed(0)
    ref = _norm(cls_name).to(dtype)
    ours = copy.deepcopy(ref)
    assert fuse_norms(ours) == 1 and fuse_norms(ours) == 0  # swapped once; a second call leaves it
    x = (torch.randn(3, 5, 48) * 3).to(dtype)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_ours = ref(x_ref), ours(x_ours)
    assert y_ours.dtype == y_ref.dtype and torch.equal(y_ours, y_ref)  # bitwise: the same ops in the same order
    dy = torch.randn_like(y_ref)
    (y_ref.float() * dy.float()).sum().backward()
    (y_ours.float() * dy.float()).sum().backward()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(x_ours.grad.float(), x_ref.grad.float(), **tol)
    torch.testing.assert_close(ours.weight.grad.float(), ref.weight.grad.float(), **tol)


def test_fused_rmsnorm_saves_less_than_transformers():
    """Under bf16 the fused norm keeps its bf16 input and the per-row rsqrt, not an fp32 copy."""
    ref = _norm("Gemma3RMSNorm", 256).to(torch.bfloat16)
    ours = copy.deepcopy(ref)
    fuse_norms(ours)
    x = torch.randn(8, 256, dtype=torch.bfloat16, requires_grad=True)

    assert _saved(ours, x) == 8 * 256 * 2 + 8 * 4
    assert _saved(ref, x) > 2 * _saved(ours, x)


MLP_CONFIGS = {"LlamaMLP": ("llama", "LlamaConfig"), "Qwen2MLP": ("qwen2", "Qwen2Config"),
               "Qwen3MLP": ("qwen3", "Qwen3Config"), "MistralMLP": ("mistral", "MistralConfig"),
               "GemmaMLP": ("gemma", "GemmaConfig"), "Gemma2MLP": ("gemma2", "Gemma2Config"),
               "Gemma3MLP": ("gemma3", "Gemma3TextConfig")}


def _mlp(cls_name: str) -> nn.Module:
    import transformers
    folder, config_cls = MLP_CONFIGS[cls_name]
    config = getattr(transformers, config_cls)(hidden_size=32, intermediate_size=72)
    mod = importlib.import_module(f"transformers.models.{folder}.modeling_{folder}")
    torch.manual_seed(0)
    return getattr(mod, cls_name)(config)


def _saved(module: nn.Module, *inputs: torch.Tensor) -> int:
    """Unique storage bytes autograd keeps for backward through `module`, parameters excluded."""
    return saved_bytes(lambda: module(*inputs), module)[0]


def test_every_mlp_class_is_covered():
    assert set(MLP_CONFIGS) == set(MLP_CLASSES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cls_name", sorted(MLP_CONFIGS))
def test_fused_mlp_equals_transformers(cls_name, dtype):
    ref = _mlp(cls_name).to(dtype)
    ours = copy.deepcopy(ref)
    assert fuse_mlps(ours) == 1 and fuse_mlps(ours) == 0
    x = torch.randn(3, 5, 32, dtype=dtype) * 2
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_ours = ref(x_ref), ours(x_ours)
    assert torch.equal(y_ours, y_ref)
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    y_ours.backward(dy)
    assert torch.equal(x_ours.grad, x_ref.grad)  # the same ops on the same values: bitwise
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        assert torch.equal(q.grad, p.grad), name
    rows = 3 * 5 * 72 * x.element_size()
    assert _saved(ref, x_ref) - _saved(ours, x_ours) == rows  # act(gate) is not kept


def test_mlps_with_other_code_keep_it():
    import transformers
    from transformers.models.phi3.modeling_phi3 import Phi3MLP
    assert not fusable_mlp(Phi3MLP(transformers.Phi3Config(hidden_size=32, intermediate_size=64)))
    relu = _mlp("LlamaMLP")
    relu.act_fn = nn.ReLU()
    assert not fusable_mlp(relu)
    hooked = _mlp("LlamaMLP")
    hooked.act_fn.register_forward_hook(lambda *a: None)  # a hook on the activation must still run
    assert not fusable_mlp(hooked)


def test_fuse_norms_keeps_names_state_and_other_norms(tiny_model):
    model = tiny_model("tiny-gemma3")
    keys = list(model.state_dict())
    norms = [m for m in model.modules() if type(m).__name__ in GEMMA_NORMS]
    assert fuse_norms(model) == len(norms) > 0
    assert list(model.state_dict()) == keys
    clone = copy.deepcopy(model)  # the bound forward follows the copy, not the original module
    layer_norm = clone.model.norm
    assert layer_norm.forward.__self__ is layer_norm
    assert not fusable_norm(nn.LayerNorm(8)) and not fusable_norm(clone.model.norm)


def _lora(bias: bool, dtype: torch.dtype) -> LoraLinear:
    torch.manual_seed(1)
    base = nn.Linear(40, 24, bias=bias).to(dtype).requires_grad_(False)
    lora = LoraLinear(base, r=4, alpha=8, dropout=0.0, rslora=False, dora=False)
    lora.init_weights("false")  # B != 0 so both adapter gradients are non-trivial
    return lora


def _fixed_mask(x2: torch.Tensor, p: float) -> torch.Tensor:
    """A keep-mask from its own seeded generator: the same for the same shape, in any path."""
    g = torch.Generator().manual_seed(x2.shape[0] * 7919 + x2.shape[1])
    return torch.rand(x2.shape, generator=g) >= p


def _unfused(lora: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """The module path written out: W x + b + s · B A x, with autograd through each op."""
    base = lora.base_layer(x)
    return base + (lora.lora_B(lora.lora_A(x.to(lora.lora_A.weight.dtype))) * lora.scaling).to(base.dtype)


@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["nodrop", "dropout"])
@pytest.mark.parametrize("bias", [False, True, "first"], ids=["nobias", "bias", "bias-first"])
def test_fused_lora_equals_the_module_path_fp32(monkeypatch, bias, dropout):
    """W x + b + s · B A drop(x), and its gradients; with dropout for the mask the op drew (pinned here),
    kept for backward as a bool, not as a dropped copy of x. bias-first: the bias joined to the rank-r term by
    its GEMM, as on CUDA."""
    monkeypatch.setattr("studio.methods.lora_fused.dropout_mask", _fixed_mask)
    monkeypatch.setattr("studio.methods.lora_fused.bias_joins_term", lambda device: bias == "first")
    lora = _lora(bool(bias), torch.float32)
    if dropout:
        lora.lora_dropout = nn.Dropout(dropout)
    x = torch.randn(2, 7, 40)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = lora(x1)
    assert type(y.grad_fn).__name__ == "FusedLoraLinearBackward"
    assert any(t is not None and t.dtype == torch.bool for t in y.grad_fn.saved_tensors) == bool(dropout)
    mask = _fixed_mask(x.reshape(-1, 40), dropout).view(x.shape)
    ref = _unfused(lora, x2) if not dropout else \
        lora.base_layer(x2) + lora.lora_B(lora.lora_A(x2 * mask / (1 - dropout))) * lora.scaling
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-6)
    dy = torch.randn_like(y)
    ga = torch.autograd.grad(y, [x1, lora.lora_A.weight, lora.lora_B.weight], dy)
    gb = torch.autograd.grad(ref, [x2, lora.lora_A.weight, lora.lora_B.weight], dy)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    y[..., 0].mul_(2)  # model code may modify a projection's output in place
    lora.eval()  # no dropout at evaluation
    torch.testing.assert_close(lora(x), _unfused(lora, x))


def test_fused_lora_under_bf16_autocast_keeps_fp32_adapter_grads():
    lora = _lora(True, torch.bfloat16)
    x = torch.randn(3, 5, 40, dtype=torch.bfloat16)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora(x1)
        assert type(y.grad_fn).__name__ == "FusedLoraLinearBackward"
        base = lora.base_layer(x2)
        low = lora.lora_A(x2)
        ref = torch.addmm(base.reshape(-1, 24), low.reshape(-1, 4), (lora.lora_B.weight * lora.scaling).t()).view(
            base.shape)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, atol=1e-2, rtol=1e-2)
    dy = torch.randn_like(y)
    ga = torch.autograd.grad(y, [x1, lora.lora_A.weight, lora.lora_B.weight], dy)
    gb = torch.autograd.grad(ref, [x2, lora.lora_A.weight, lora.lora_B.weight], dy)
    for a, b in zip(ga, gb):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)


def test_fused_lora_casts_each_adapter_weight_once_a_step():
    """Under autocast the forward's 16-bit copies of A and B serve the backward too (launch-bound GPU steps
    pay per kernel): two casts down in the forward, and only the two gradients cast back up."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "_to_copy" and args[0].shape in {(4, 40), (24, 4)}:
                self.seen.append((tuple(args[0].shape), args[0].dtype))
            return func(*args, **(kwargs or {}))

    lora = _lora(True, torch.bfloat16)
    x = torch.randn(3, 5, 40, dtype=torch.bfloat16, requires_grad=True)
    forward, backward = Casts(), Casts()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with forward:
            y = lora(x)
    with backward:
        y.sum().backward()
    assert sorted(forward.seen) == [((4, 40), torch.float32), ((24, 4), torch.float32)]
    assert sorted(backward.seen) == [((4, 40), torch.bfloat16), ((24, 4), torch.bfloat16)]  # the grads, to fp32
    assert lora.lora_A.weight.grad.dtype == lora.lora_B.weight.grad.dtype == torch.float32


def test_module_path_when_fusing_does_not_apply():
    lora = _lora(False, torch.float32)
    x = torch.randn(4, 40, requires_grad=True)
    lora.lora_dropout = nn.AlphaDropout(0.1)  # a dropout of another kind: the module path
    assert type(lora(x).grad_fn).__name__ != "FusedLoraLinearBackward"
    lora.lora_dropout = nn.Identity()
    lora.base_layer.weight.requires_grad_(True)  # a training base (e.g. full + LoRA): the module path
    assert type(lora(x).grad_fn).__name__ != "FusedLoraLinearBackward"
    lora.base_layer.weight.requires_grad_(False)
    from studio.methods.unipelt import GatedLoraLinear
    gated = GatedLoraLinear(nn.Linear(40, 24).requires_grad_(False), 4, 8)  # its own forward: not fused
    assert not gated.uses_fused_op() and gated.fused_parts(x) is None
    lora.adapter_enabled = False  # disabled: the base alone
    torch.testing.assert_close(lora(x), lora.base_layer(x))


@pytest.mark.parametrize("method", [{"name": "lora", "lora_dropout": 0.0, "target_modules": "all-linear"},
                                    {"name": "full", "keep_base_copy": False}], ids=["lora", "full"])
@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gemma3"])
def test_training_curve_equals_the_unfused_engine(tiny_model, monkeypatch, arch, method):
    from studio.memory_bench import random_batch
    batch = random_batch(512, 2, 32)

    def curve(fused: bool) -> list[float]:
        model = tiny_model(arch)
        with monkeypatch.context() as m:
            if not fused:
                m.setattr("studio.methods.fuse_norms", lambda model: 0)
                m.setattr("studio.fused_mlp.fuse_mlps", lambda model: 0)
                m.setattr("studio.methods.lora.fusable", lambda base: False)
            apply_method(model, method_config(dict(method)))
            losses, _ = fit(model, batch, 6, 1e-3)
        return losses
    fused, plain = curve(True), curve(False)
    assert fused[-1] < fused[0]
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)


def _lora_mlp(cls_name: str, dtype: torch.dtype, bias: bool = False) -> nn.Module:
    """A transformers MLP with LoRA (no dropout, B != 0) on gate, up and down, not yet fused."""
    mlp = _mlp(cls_name).to(dtype)
    for name in ("gate_proj", "up_proj", "down_proj"):
        base = getattr(mlp, name)
        if bias and name == "down_proj":
            base = nn.Linear(base.in_features, base.out_features, bias=True).to(dtype)
        base.requires_grad_(False)
        lora = LoraLinear(base, r=4, alpha=8, dropout=0.0, rslora=False, dora=False)
        lora.init_weights("false")
        setattr(mlp, name, lora)
    return mlp


def _mlp_grads(mlp: nn.Module, x: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = mlp(x)
    y.backward(torch.ones_like(y) * 0.1 + y.detach() * 0.01)
    return y, [x.grad] + [p.grad for p in mlp.parameters() if p.requires_grad]


def _one_op_and_apart(apart: nn.Module, dtype: torch.dtype, autocast: bool) -> tuple:
    """The MLP fused with down (one) and kept apart from it by a hook on down (apart): one, (output, gradients)
    of each, and the bytes apart keeps for backward beyond one when its down keeps its input (with
    studio/rebuilt_inputs.py a fused LoRA apart rebuilds it too)."""
    fuse_mlps(apart)
    apart.down_proj.register_forward_pre_hook(lambda *a: None)  # a hook on down keeps the ops apart
    one = copy.deepcopy(apart)
    one.down_proj._forward_pre_hooks.clear()
    x = torch.randn(3, 5, 32, dtype=dtype)
    out_apart, out_one = _mlp_grads(apart, x, autocast), _mlp_grads(one, x, autocast)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), pytest.MonkeyPatch.context() as m:
        one_keeps = _saved(one, x.clone().requires_grad_())
        m.setattr("studio.rebuilt_inputs.source", lambda t: None)  # apart, as autograd keeps it (no rebuilt input)
        kept = _saved(apart, x.clone().requires_grad_()) - one_keeps
    return one, out_one, out_apart, kept


@pytest.mark.parametrize("case", ["fp32", "fp32-bias", "bf16-autocast", "fp32-dropout", "bf16-autocast-dropout"])
@pytest.mark.parametrize("cls_name", ["LlamaMLP", "Gemma3MLP"])
def test_mlp_with_lora_down_runs_as_one_op_bitwise(monkeypatch, cls_name, case):
    """act(gate)·up and down's LoRA as one op: the outputs and every gradient are bitwise those of the
    two fused ops apart (with dropout: for the same mask), and down's input (a rows x intermediate
    tensor) is no longer kept."""
    autocast = case.startswith("bf16-autocast")
    dtype = torch.bfloat16 if autocast else torch.float32
    apart = _lora_mlp(cls_name, dtype, bias=case == "fp32-bias")
    if case.endswith("dropout"):
        monkeypatch.setattr("studio.methods.lora_fused.dropout_mask", _fixed_mask)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(apart, name).lora_dropout = nn.Dropout(0.1)
    _, (y_one, g_one), (y_apart, g_apart), kept = _one_op_and_apart(apart, dtype, autocast)
    assert type(y_one.grad_fn).__name__ == "GatedDownLoraBackward"
    assert type(y_apart.grad_fn).__name__ == "FusedLoraLinearBackward"
    assert torch.equal(y_one, y_apart)
    assert all(torch.equal(a, b) for a, b in zip(g_one, g_apart))
    assert kept == 3 * 5 * 72 * dtype.itemsize


@pytest.mark.parametrize("case", ["fp32", "fp32-bias", "bf16-autocast"])
@pytest.mark.parametrize("cls_name", ["LlamaMLP", "Gemma3MLP"])
def test_mlp_with_ia3_on_down_runs_as_one_op_bitwise(cls_name, case):
    """act(gate)·up, IA3's feed-forward scale and down as one op: outputs and gradients bitwise those of the
    modules apart, and down's input (which IA3's vector needs for its gradient) no longer kept."""
    from studio.methods.ia3 import IA3Linear
    autocast = case == "bf16-autocast"
    dtype = torch.bfloat16 if autocast else torch.float32
    apart = _mlp(cls_name).to(dtype).requires_grad_(False)
    base = apart.down_proj
    if case == "fp32-bias":
        base = nn.Linear(base.in_features, base.out_features, bias=True).requires_grad_(False)
    apart.down_proj = IA3Linear(base, feedforward=True)
    with torch.no_grad():
        apart.down_proj.ia3_l.normal_(1.0, 0.1, generator=torch.Generator().manual_seed(4))
    one, (y_one, g_one), (y_apart, g_apart), kept = _one_op_and_apart(apart, dtype, autocast)
    assert type(y_one.grad_fn).__name__ == "GatedScaledDownBackward"
    assert torch.equal(y_one, y_apart)
    assert len(g_one) == 2 and all(torch.equal(a, b) for a, b in zip(g_one, g_apart))  # x and the vector
    assert kept >= 3 * 5 * 72 * dtype.itemsize
    one.down_proj.merge()  # merged: the module's own path
    assert type(one(torch.randn(3, 5, 32, dtype=dtype)).grad_fn).__name__ != "GatedScaledDownBackward"


def test_mlp_keeps_down_apart_when_its_lora_cannot_fuse():
    mlp = _lora_mlp("LlamaMLP", torch.float32)
    fuse_mlps(mlp)
    x = torch.randn(2, 3, 32, requires_grad=True)
    assert type(mlp(x).grad_fn).__name__ == "GatedDownLoraBackward"
    mlp.down_proj.lora_dropout = nn.AlphaDropout(0.1)
    assert type(mlp(x).grad_fn).__name__ != "GatedDownLoraBackward"
    mlp.down_proj.lora_dropout = nn.Dropout(0.1)  # plain dropout fuses (a saved keep-mask)
    assert type(mlp(x).grad_fn).__name__ == "GatedDownLoraBackward"
    mlp.down_proj.lora_dropout = nn.Identity()
    mlp.down_proj.adapter_enabled = False
    assert type(mlp(x).grad_fn).__name__ != "GatedDownLoraBackward"



def test_dropout_mask_keeps_the_asked_share():
    from studio.methods.lora_fused import dropout_mask
    torch.manual_seed(0)
    mask = dropout_mask(torch.empty(400, 250), 0.1)
    assert mask.dtype == torch.bool and abs(mask.float().mean().item() - 0.9) < 0.005
