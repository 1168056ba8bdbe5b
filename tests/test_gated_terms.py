"""Gate's and up's LoRA terms added by the gated MLP's kernels (studio/kernels/gated_terms.py) instead of written out:
the kernels against their torch reference, and a model's loss and gradients against the terms written first, with
checkpointing (the recomputation that skips down's product) and with the MLP in row chunks. Compiled on a CUDA
machine, else in Triton's interpreter (conftest sets TRITON_INTERPRET=1)."""
from __future__ import annotations

import collections

import pytest
import torch

pytest.importorskip("triton")

from studio import chunked_mlp, fused_mlp, kernels  # noqa: E402
from studio.checkpointing import enable_gradient_checkpointing  # noqa: E402
from studio.kernels import gated_terms  # noqa: E402
from studio.losses import causal_lm_loss  # noqa: E402
from studio.memory_bench import random_batch  # noqa: E402
from studio.methods import apply_method, method_config  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(dtype: torch.dtype, rows: int = 70, cols: int = 150, r: int = 5) -> tuple:
    """gate, up, d(h) (2 x 35 rows), the stacked rank-r input as a column slice of a wider tensor, B_g, B_u:
    no size a multiple of the kernels' tiles or of the padded rank."""
    g = torch.Generator().manual_seed(0)
    gate, up, dh = (2 * torch.randn(3, 2, rows // 2, cols, generator=g)).to(DEVICE, dtype).unbind(0)
    low = torch.randn(rows, 2 * r + 3, generator=g).to(DEVICE, dtype)[:, 1:1 + 2 * r]
    b_gate, b_up = (0.3 * torch.randn(2, cols, r, generator=g)).to(DEVICE, dtype).unbind(0)
    return gate, up, dh, low, b_gate.contiguous(), b_up.contiguous()


@pytest.mark.parametrize("kind", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_the_kernels_add_the_terms_as_the_torch_reference_does(kind, dtype, tol):
    """h = cast(act(g)) · u and its gradients, g and u summed with their terms in fp32 (the interpreter rounds bf16
    otherwise than CUDA does: hence the bf16 tolerance)."""
    gate, up, dh, low, b_gate, b_up = _inputs(dtype)
    assert gated_terms.supported(gate, up, low, b_gate, b_up)
    want_h, want_gate, want_up = fused_mlp.gated_with_terms_reference(gate, up, dh, kind, low, b_gate, b_up)
    close = dict(atol=tol, rtol=tol)
    torch.testing.assert_close(gated_terms.forward(gate, up, kind, low, b_gate, b_up).float(), want_h.float(), **close)
    d_gate, d_up = gated_terms.backward(dh, gate, up, kind, low, b_gate, b_up, True, True)
    torch.testing.assert_close(d_up.float(), want_up.float(), **close)
    torch.testing.assert_close(d_gate.float(), want_gate.float(), **close)
    own = dh.clone()
    d_gate2, none = gated_terms.backward(own, gate, up, kind, low, b_gate, b_up, True, False, overwrite_dh=True)
    assert none is None and d_gate2.data_ptr() == own.data_ptr()  # written over the caller's buffer
    torch.testing.assert_close(d_gate2, d_gate, atol=0, rtol=0)
    none, d_up2 = gated_terms.backward(dh, gate, up, kind, low, b_gate, b_up, False, True)
    assert none is None and torch.equal(d_up2, d_up)


def test_layouts_the_kernels_do_not_read_are_refused():
    gate, up, _, low, b_gate, b_up = _inputs(torch.float32)
    assert not gated_terms.supported(gate.transpose(1, 2), up.transpose(1, 2), low, b_gate, b_up)
    assert not gated_terms.supported(gate, up, low.t().contiguous().t(), b_gate, b_up)  # columns strided
    assert not gated_terms.supported(gate, up, low[:, :6], b_gate[:, :3], b_up[:, :3].contiguous())  # B strided
    big = torch.zeros(gate.shape[-1], 129, device=DEVICE)
    assert not gated_terms.supported(gate, up, torch.zeros(70, 258, device=DEVICE), big, big)  # rank over 128


def _step(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    loss, _ = causal_lm_loss(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _count_terms(monkeypatch) -> collections.Counter:
    """GatedDownLora calls with and without terms."""
    counts: collections.Counter = collections.Counter()
    apply = fused_mlp.GatedDownLora.apply

    def counted(*args):
        counts["terms" if len(args) > 13 and args[13] is not None else "written"] += 1
        return apply(*args)
    monkeypatch.setattr(fused_mlp.GatedDownLora, "apply", counted)
    return counts


@pytest.mark.parametrize("case", ["", "ckpt", "ckpt, chunks", "bf16 autocast"])
@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gemma3"])
def test_a_model_step_with_the_terms_in_the_kernels_equals_the_terms_written(tiny_model, monkeypatch, arch, case):
    """fp32, the kernels on both sides: the loss and every gradient as with gate's and up's terms written first.
    Checkpointed, the recomputation adds them too (it saves what the forward saved); in row chunks, each chunk's.
    Under bf16 autocast within bf16's rounding (the terms summed in fp32 here, rounded to bf16 there)."""
    batch = random_batch(512, 2, 24, DEVICE)
    runs = []
    for terms in (True, False):
        model = tiny_model(arch, device=DEVICE, dtype="float32")
        torch.manual_seed(0)
        apply_method(model, method_config({"name": "lora", "r": 4, "lora_dropout": 0.0, "target_modules": "all-linear"}))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B off zero: the terms count
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(name)))
        if "ckpt" in case:  # as the trainer: the recomputation marked, down's product skipped there
            enable_gradient_checkpointing(model, 1.0)
        model.train()
        with monkeypatch.context() as m, kernels.forced():
            m.setattr(fused_mlp, "terms_wanted", lambda terms=terms: terms)
            deferred = []
            if "chunks" in case:  # every checkpointed MLP in two row chunks
                m.setattr(chunked_mlp, "MLP_CHUNK_ELEMENTS", 24 * model.config.intermediate_size)
                real = chunked_mlp.DeferredMLP.apply
                m.setattr(chunked_mlp.DeferredMLP, "apply", lambda *a: deferred.append(1) or real(*a))
            counts = _count_terms(m)
            unread = [0]
            real_unread = fused_mlp._output_unread
            m.setattr(fused_mlp, "_output_unread", lambda mlp: real_unread(mlp) and not unread.__setitem__(
                0, unread[0] + 1))
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled="bf16" in case):
                runs.append(_step(model, batch))
        layers = model.config.num_hidden_layers
        assert set(counts) == {"terms" if terms else "written"}, counts
        if "chunks" in case:
            assert len(deferred) == 2 * layers  # the forward and the recomputation
        elif "ckpt" in case:  # Llama's recomputation keeps gate and up (and the terms' inputs) only; Gemma's
            # MLP output feeds a norm, so its recomputation makes it
            assert sum(counts.values()) == layers * 2 and unread[0] == (layers if arch == "tiny-llama" else 0)
        else:
            assert sum(counts.values()) == layers * (2 if "ckpt" in case else 1)
    (loss, grads), (want_loss, want_grads) = runs
    bf16 = "bf16" in case
    torch.testing.assert_close(loss, want_loss, atol=1e-2 if bf16 else 1e-5, rtol=1e-2 if bf16 else 1e-5)
    assert grads.keys() == want_grads.keys() and any("gate_proj" in n for n in grads)
    for n in grads:
        if bf16:  # the same direction and size within bf16's noise
            cos = torch.nn.functional.cosine_similarity(grads[n].flatten(), want_grads[n].flatten(), dim=0)
            assert cos > 0.99 and grads[n].norm() == pytest.approx(want_grads[n].norm().item(), rel=0.05), n
        else:
            torch.testing.assert_close(grads[n], want_grads[n], atol=1e-4, rtol=1e-3)


def test_terms_ride_along_only_where_the_kernels_can_add_them(tiny_model, monkeypatch):
    """Not on the torch ops (kernels off, the CPU's default), not where gate and up run apart (dropout), not with
    different ranks on gate and up."""
    from studio import sibling_lora
    batch = random_batch(512, 2, 16, DEVICE)
    cases = [({"lora_dropout": 0.0}, kernels.disabled, 0), ({"lora_dropout": 0.1}, kernels.forced, 0),
             ({"lora_dropout": 0.0}, kernels.forced, 2)]
    for settings, routing, riding in cases:
        model = tiny_model("tiny-llama", device=DEVICE, dtype="float32")
        apply_method(model, method_config({"name": "lora", "r": 4, "target_modules": "all-linear"} | settings))
        model.train()
        with monkeypatch.context() as m, routing():
            counts = _count_terms(m)
            _step(model, batch)
        assert counts["terms"] == riding, (settings, counts)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, model.config.hidden_size, device=DEVICE)
    with kernels.forced():
        siblings = sibling_lora.sibling_parts((mlp.gate_proj, mlp.up_proj), x)
        assert fused_mlp._terms_ride_along(mlp, x, siblings) is not None
        gate = siblings[0]
        other_rank = torch.zeros(gate[3].shape[0], 8, device=DEVICE)
        assert fused_mlp._terms_ride_along(mlp, x, [gate[:3] + (other_rank,) + gate[4:], siblings[1]]) is None


def test_a_4bit_model_step_with_the_terms_in_the_kernels_equals_the_terms_written(monkeypatch):
    """QLoRA: gate's and up's base products from their 4-bit weights, then the terms added by the kernels."""
    from studio.config import ModelConfig
    from studio.models import load_model
    runs = []
    for terms in (True, False):
        model, _ = load_model(ModelConfig(name="tiny-llama", quantization="nf4", device=DEVICE, dtype="float32"))
        model.train()  # as training runs it (bitsandbytes repacks for inference in eval mode on some CPUs)
        torch.manual_seed(0)
        apply_method(model, method_config({"name": "qlora", "r": 4, "lora_dropout": 0.0}))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(name)))
        batch = random_batch(model.config.vocab_size, 2, 12, DEVICE)
        with monkeypatch.context() as m, kernels.forced():
            m.setattr(fused_mlp, "terms_wanted", lambda terms=terms: terms)
            counts = _count_terms(m)
            runs.append(_step(model, batch))
        assert set(counts) == {"terms" if terms else "written"}, counts
    (loss, grads), (want_loss, want_grads) = runs
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == want_grads.keys() and any("gate_proj" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n], want_grads[n], atol=1e-4, rtol=1e-3)
