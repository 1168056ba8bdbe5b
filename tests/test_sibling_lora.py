"""Projections that read one input, each with LoRA (studio/sibling_lora.py), as one op: the outputs and gradients of
the projections apart, alone, in the fused MLP (gate, up) and in the engine's attention (q, k, v), with
checkpointing and a 4-bit base too; and where it does not apply, the projections run apart."""
from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

from studio import sibling_lora
from studio.losses import causal_lm_loss
from studio.memory_bench import random_batch
from studio.methods import apply_method, method_config
from studio.methods.lora import LoraLinear


def _siblings(bias: bool, dtype: torch.dtype = torch.float32, r: tuple[int, ...] = (4, 4, 4)) -> list[LoraLinear]:
    """q-, k- and v-like projections of one 40-wide input, with LoRA (B != 0, no dropout)."""
    torch.manual_seed(0)
    out = []
    for width, rank in zip((24, 8, 8), r):
        base = nn.Linear(40, width, bias=bias).to(dtype).requires_grad_(False)
        lora = LoraLinear(base, r=rank, alpha=2 * rank, dropout=0.0, rslora=False, dora=False)  # one scale
        lora.init_weights("false")
        out.append(lora)
    return out


# the op alone runs on CUDA where there is one (baselines/gpu_check.sh runs this file there: cuBLAS's GEMMs on the
# stacked rank-r input's column slices, the bias in the term's GEMM); the models on the CPU
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _run(modules: list[LoraLinear], x: torch.Tensor, together: bool, autocast: bool = False,
         device: str = DEVICE) -> tuple:
    modules = [m.to(device) for m in modules]
    x = x.to(device).clone().requires_grad_()
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        ys = sibling_lora.run(sibling_lora.sibling_parts(modules, x), x) if together else [m(x) for m in modules]
    loss = sum((y.float() * torch.linspace(-1, 1, y.shape[-1], device=device)).sum() for y in ys)
    return ys, torch.autograd.grad(loss, [x, *params])


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("ranks", [(4, 4, 4), (4, 2, 8)], ids=["one-rank", "ranks"])
def test_siblings_equal_the_projections_apart_fp32(bias, ranks):
    modules = _siblings(bias, r=ranks)
    x = torch.randn(2, 7, 40)
    assert sibling_lora.sibling_parts(modules, x) is not None
    (ys, grads), (want_ys, want_grads) = _run(modules, x, True), _run(modules, x, False)
    assert all(type(y.grad_fn).__name__ == "SiblingLoraBackward" for y in ys)
    for y, want in zip(ys, want_ys):
        torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-6)
    for g, want in zip(grads, want_grads):
        assert g.dtype == want.dtype
        torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-5)


def test_siblings_under_bf16_autocast_keep_fp32_adapter_grads():
    modules = _siblings(True)
    x = torch.randn(3, 5, 40)
    (ys, grads), (want_ys, want_grads) = _run(modules, x, True, True), _run(modules, x, False, True)
    for y, want in zip(ys, want_ys):
        assert y.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(y, want, atol=2e-2, rtol=2e-2)
    for g, want in zip(grads, want_grads):
        assert g.dtype == want.dtype
        torch.testing.assert_close(g.float(), want.float(), atol=3e-2, rtol=3e-2)


def test_where_one_op_does_not_apply_the_projections_run_apart():
    x = torch.randn(2, 3, 40)
    modules = _siblings(False)
    assert sibling_lora.sibling_parts(modules[:1], x) is None  # one alone
    modules[1].lora_dropout = nn.Dropout(0.1)  # its own mask
    assert sibling_lora.sibling_parts(modules, x) is None
    modules[1].lora_dropout.eval()  # no dropout at evaluation: together again
    assert sibling_lora.sibling_parts(modules, x) is not None
    modules[1].scaling = 3.0  # another scale
    assert sibling_lora.sibling_parts(modules, x) is None
    modules = _siblings(False)
    handle = modules[2].register_forward_hook(lambda *a: None)  # a hook must see its call
    assert sibling_lora.sibling_parts(modules, x) is None
    handle.remove()
    modules[0].adapter_enabled = False  # disabled (the chat's base side): not LoRA's op
    assert sibling_lora.sibling_parts(modules, x) is None
    assert sibling_lora.sibling_parts([modules[1], nn.Linear(40, 8)], x) is None


def _count_siblings(monkeypatch) -> collections.Counter:
    """How many projections each SiblingLora call joined."""
    counts: collections.Counter = collections.Counter()
    apply = sibling_lora.SiblingLora.apply

    def counted(*args):
        counts[args[1]] += 1
        return apply(*args)
    monkeypatch.setattr(sibling_lora.SiblingLora, "apply", counted)
    return counts


def _step(model: nn.Module, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss, _ = causal_lm_loss(model, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), list(torch.autograd.grad(loss, params))


@pytest.mark.parametrize("ckpt", [False, True], ids=["", "ckpt"])
@pytest.mark.parametrize("arch", ["tiny-qwen2", "tiny-gemma3"])
def test_a_model_joins_qkv_and_gate_up_with_the_gradients_of_the_projections_apart(tiny_model, monkeypatch, arch,
                                                                                     ckpt):
    """tiny-qwen2: q, k and v with biases; gemma3: norms on q and k after their projections. With checkpointing,
    the recomputation joins them too (it must save what the forward saved)."""
    batch = random_batch(512, 2, 24)
    runs = []
    for together in (True, False):
        model = tiny_model(arch)
        apply_method(model, method_config({"name": "lora", "lora_dropout": 0.0, "target_modules": "all-linear"}))
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        with monkeypatch.context() as m:
            counts = _count_siblings(m)
            if not together:
                m.setattr(sibling_lora, "sibling_parts", lambda modules, x: None)
            runs.append(_step(model, batch))
        layers = model.config.num_hidden_layers
        assert counts == ({3: layers * (2 if ckpt else 1), 2: layers * (2 if ckpt else 1)} if together else {})
    (loss, grads), (want_loss, want_grads) = runs
    torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=1e-6)
    for g, want in zip(grads, want_grads):
        torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-5)


def test_only_the_projections_with_lora_join(tiny_model, monkeypatch):
    """LoRA on q and v only (peft's default targets): those two join, k stays the plain Linear."""
    model = tiny_model("tiny-llama")
    apply_method(model, method_config({"name": "lora", "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}))
    model.train()
    counts = _count_siblings(monkeypatch)
    _step(model, random_batch(512, 2, 16))
    assert counts == {2: model.config.num_hidden_layers}


class _OtherAttention(nn.Module):
    """Attention code that calls its projections on a copy of its hidden states."""

    def __init__(self, modules: list[LoraLinear]):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = modules

    def forward(self, hidden_states: torch.Tensor) -> list[torch.Tensor]:
        h = hidden_states.clone()
        return [self.q_proj(h), self.k_proj(h), self.v_proj(h)]


def test_outputs_made_for_another_tensor_go_unclaimed_with_a_warning():
    attention = _OtherAttention(_siblings(False))
    x = torch.randn(2, 3, 40)
    want = [m(x) for m in (attention.q_proj, attention.k_proj, attention.v_proj)]
    with pytest.warns(UserWarning, match="did not call its q/k/v projections"):
        with sibling_lora.attention_projections(attention, (), {"hidden_states": x}):
            got = attention(hidden_states=x)
    for y, w in zip(got, want):
        assert type(y.grad_fn).__name__ == "FusedLoraLinearBackward"
        torch.testing.assert_close(y, w)
    assert not getattr(sibling_lora._given, "outputs", None)


@pytest.fixture
def env_switch(monkeypatch):
    """Set an A/B switch's variable for one test, the cached readings cleared before and after."""
    from studio import ab_switches

    def set_(name: str, value: str) -> None:
        monkeypatch.setenv(name, value)
        ab_switches.on.cache_clear()
    yield set_
    monkeypatch.undo()
    ab_switches.on.cache_clear()


def test_ab_switches_run_the_projections_apart_and_the_bias_last(env_switch):
    from studio.methods import lora_fused
    x = torch.randn(2, 3, 40)
    assert sibling_lora.sibling_parts(_siblings(False), x) is not None
    assert lora_fused.bias_joins_term(torch.device("cuda")) and not lora_fused.bias_joins_term(x.device)
    env_switch("STUDIO_SIBLING_LORA", "0")
    env_switch("STUDIO_BIAS_FIRST", "0")
    assert sibling_lora.sibling_parts(_siblings(False), x) is None
    assert not lora_fused.bias_joins_term(torch.device("cuda"))


def test_siblings_take_the_fp32_gradient_gemm_where_the_device_has_it(monkeypatch):
    """CUDA's branch on the CPU (torch.mm with an out_dtype, emulated): the adapters' gradients come from the GEMM
    in fp32, B's from a column slice of the stacked rank-r input, as apart."""
    from test_step_copies import _mm_with_out_dtype
    calls: list = []
    monkeypatch.setattr(torch, "mm", _mm_with_out_dtype(calls))
    monkeypatch.setattr("studio.methods.lora_fused.out_dtype_ok", lambda device, src, dst: True)
    modules = [m.to(torch.bfloat16) for m in _siblings(True)]
    for m in modules:  # adapters train in fp32 under autocast, as the trainer sets them
        m.lora_A.float(), m.lora_B.float()
    x = torch.randn(2, 5, 40, dtype=torch.bfloat16)
    (_, grads), (_, want_grads) = _run(modules, x, True, True, "cpu"), _run(modules, x, False, True, "cpu")
    assert calls and set(calls) == {torch.float32}
    for g, want in zip(grads, want_grads):
        assert g.dtype == want.dtype
        torch.testing.assert_close(g.float(), want.float(), atol=3e-2, rtol=3e-2)


def test_adapters_trained_in_other_dtypes_run_apart():
    """One A and one B dtype for all (their gradients come from one GEMM in that dtype)."""
    modules, x = _siblings(False), torch.randn(2, 3, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the compute dtype autocast's, whatever A's and B's
        assert sibling_lora.sibling_parts(modules, x) is not None
        modules[2].lora_B.to(torch.bfloat16)
        assert modules[2].fused_parts(x) is not None
        assert sibling_lora.sibling_parts(modules, x) is None
