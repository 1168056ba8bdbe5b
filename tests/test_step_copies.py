"""The step's 16-bit copies of the LoRA weights (studio/step_copies.py) and the adapters' fp32 gradient GEMM.

With the copies current, the fused LoRA ops cast nothing in the forward and the results are bitwise those
of the casting path; stale copies are never read; the trainer refreshes them once per optimizer step.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from studio.memory_bench import random_batch
from studio.methods import apply_method, method_config
from studio.methods.lora import LoraLinear
from studio.methods.lora_fused import out_dtype_ok, probe_out_dtype, weight_grad_mm
from studio.step_copies import StepCopies, current_copies

LORA = {"name": "lora", "r": 8, "lora_alpha": 24, "lora_dropout": 0.0, "target_modules": "all-linear"}  # scale 3


class Casts(TorchDispatchMode):
    """Counts the casts (`_to_copy`) for which `which(source tensor, target dtype)` holds."""

    def __init__(self, which):
        super().__init__()
        self.which, self.count = which, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "_to_copy" and self.which(args[0], (kwargs or {}).get("dtype")):
            self.count += 1
        return func(*args, **(kwargs or {}))


def weight_casts(sources: list[torch.Tensor]) -> Casts:
    """Casts whose source is one of the given tensors."""
    ptrs = {t.data_ptr() for t in sources}
    return Casts(lambda t, dtype: t.data_ptr() in ptrs)


def gradient_casts() -> Casts:
    """Casts to fp32 of tensors shaped like the test adapter's A (4 x 16) or B (12 x 4)."""
    return Casts(lambda t, dtype: dtype == torch.float32 and tuple(t.shape) in {(4, 16), (12, 4)})


def _model(tiny_model, arch: str = "tiny-qwen2"):
    model = tiny_model(arch, dtype="bfloat16")
    apply_method(model, method_config(dict(LORA)))
    return model


def _step(model, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    from studio.losses import causal_lm_loss
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = causal_lm_loss(model, batch)
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), list(grads)


@pytest.mark.parametrize("arch", ["tiny-qwen2", "tiny-gemma3"])
def test_current_copies_replace_the_casts_bitwise(tiny_model, arch):
    model = _model(tiny_model, arch)
    batch = random_batch(512, 2, 24)
    adapters = [m for m in model.modules() if isinstance(m, LoraLinear)]
    weights = [w for m in adapters for w in (m.lora_A.weight, m.lora_B.weight)]
    casting = weight_casts(weights)
    with casting:
        loss, grads = _step(model, batch)
    assert casting.count == len(weights)  # one cast each (the forward's copy serves the backward)

    copies = StepCopies.for_model(model, torch.bfloat16)
    assert copies is not None and copies.modules == adapters  # every adapter, the MLP's down_proj included
    copies.refresh()
    reading = weight_casts(weights)
    with reading:
        loss2, grads2 = _step(model, batch)
    assert reading.count == 0
    assert torch.equal(loss, loss2)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2))
    assert all(g.dtype == torch.float32 for g in grads2)
    copies.release()
    assert all(m.step_copies is None for m in adapters)


def test_stale_copies_are_never_read():
    base = torch.nn.Linear(16, 12, bias=False).to(torch.bfloat16).requires_grad_(False)
    lora = LoraLinear(base, r=4, alpha=8, dropout=0.0, rslora=False, dora=False)
    lora.init_weights("false")
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    copies = StepCopies([lora], torch.bfloat16)
    assert current_copies(lora, torch.bfloat16) is None  # not refreshed yet
    ptrs = [c.data_ptr() for c in copies.copies]
    copies.refresh()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = lora(x)
        with torch.no_grad():
            lora.lora_B.weight.mul_(3)  # what the optimizer does: the copies now hold the old B
        assert torch.equal(lora(x), before)  # proof the op reads the copies while they are current
        copies.stale()
        assert current_copies(lora, torch.bfloat16) is None and current_copies(lora, torch.float16) is None
        after = lora(x)
        copies.refresh()
        assert torch.equal(lora(x), after)
    assert not torch.equal(after, before)
    assert [c.data_ptr() for c in copies.copies] == ptrs  # refreshed in place: a captured graph reads them
    lora.lora_A.weight = torch.nn.Parameter(lora.lora_A.weight.detach().clone())  # replaced, not updated
    assert current_copies(lora, torch.bfloat16) is None


def test_nothing_to_copy_without_autocast_or_adapters(tiny_model):
    model = _model(tiny_model)
    assert StepCopies.for_model(model, None) is None  # no autocast: the op computes in the weights' dtype
    assert StepCopies.for_model(model, torch.float32) is None
    assert StepCopies.for_model(tiny_model("tiny-qwen2"), torch.bfloat16) is None  # no LoRA


def test_trainer_refreshes_once_a_step_and_trains_as_without(tmp_path, monkeypatch):
    from test_trainer import losses, run, tiny_cfg
    sets = {"model.dtype": "bfloat16", "train.max_steps": 4, "train.grad_accum": 2,
            "train.gradient_checkpointing": True, "method.lora_dropout": 0.0}
    calls = []
    real = StepCopies.refresh
    monkeypatch.setattr(StepCopies, "refresh", lambda self: calls.append("refresh") or real(self))
    monkeypatch.setattr(StepCopies, "release", lambda self, _real=StepCopies.release: calls.append("release")
                        or _real(self))
    with_copies = run(tmp_path / "copies", tiny_cfg(**sets))
    assert calls == ["refresh"] * 4 + ["release"]
    monkeypatch.setattr(StepCopies, "for_model", classmethod(lambda cls, model, dtype: None))
    without = run(tmp_path / "casts", tiny_cfg(**sets))
    assert losses(with_copies) == losses(without)


def test_weight_grad_mm_writes_the_asked_dtype():
    torch.manual_seed(0)
    m1, m2 = torch.randn(8, 40, dtype=torch.bfloat16), torch.randn(40, 6, dtype=torch.bfloat16)
    got = weight_grad_mm(m1, m2, torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, (m1 @ m2).float())  # the CPU: product, then cast
    assert weight_grad_mm(m1, m2, torch.bfloat16).dtype == torch.bfloat16
    assert out_dtype_ok(torch.device("cpu"), torch.bfloat16, torch.float32) is False  # CUDA only
    assert probe_out_dtype(torch.device("cpu"), torch.bfloat16, torch.float32) is False  # the CPU lacks the op


def _mm_with_out_dtype(calls: list, wrong: bool = False):
    """torch.mm as CUDA has it (an out_dtype keyword: fp32 accumulators stored as fp32), for the CPU."""
    real = torch.mm

    def mm(m1, m2, *, out_dtype=None, out=None):
        if out_dtype is None:
            return real(m1, m2) if out is None else real(m1, m2, out=out)
        calls.append(out_dtype)
        got = real(m1.float(), m2.float())
        return got + 1 if wrong else got
    return mm


def test_the_fp32_gradient_gemm_path_when_the_device_has_it(monkeypatch):
    """The CUDA branch's logic on the CPU: the probe accepts an op that agrees and rejects one that does
    not; with it, the fused op's adapter gradients come from the GEMM in fp32, with no cast after."""
    import studio.methods.lora_fused as fused
    calls: list = []
    monkeypatch.setattr(torch, "mm", _mm_with_out_dtype(calls))
    assert probe_out_dtype(torch.device("cpu"), torch.bfloat16, torch.float32)
    monkeypatch.setattr(torch, "mm", _mm_with_out_dtype(calls, wrong=True))
    assert not probe_out_dtype(torch.device("cpu"), torch.bfloat16, torch.float32)

    base = torch.nn.Linear(16, 12, bias=False).to(torch.bfloat16).requires_grad_(False)
    lora = LoraLinear(base, r=4, alpha=8, dropout=0.0, rslora=False, dora=False)
    lora.init_weights("false")
    x = torch.randn(5, 16, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora(x)
    dy = torch.randn_like(y)
    want = torch.autograd.grad(y, [lora.lora_A.weight, lora.lora_B.weight], dy, retain_graph=True)
    calls.clear()
    monkeypatch.setattr(torch, "mm", _mm_with_out_dtype(calls))
    monkeypatch.setattr(fused, "out_dtype_ok", lambda device, src, dst: True)
    casts = gradient_casts()
    with casts:
        got = torch.autograd.grad(y, [lora.lora_A.weight, lora.lora_B.weight], dy)
    assert calls == [torch.float32, torch.float32] and casts.count == 0
    for g, w in zip(got, want):  # fp32 accumulators vs the bf16-rounded product: close, not equal
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, atol=2e-2, rtol=2e-2)
