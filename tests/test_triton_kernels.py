"""The Triton kernels against their torch references: compiled on a CUDA machine, else on the CPU through
Triton's interpreter (conftest sets TRITON_INTERPRET=1 there)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # requirements-dev.txt installs it; CUDA builds of torch bring it

from studio import kernels  # noqa: E402
from studio.fused_norm import FusedRMSNorm, torch_backward, torch_forward  # noqa: E402
from studio.fused_mlp import _act, _act_backward  # noqa: E402
from studio.fused_rope import torch_rope, torch_rope_backward  # noqa: E402
from studio.kernels import gated, rmsnorm, rope, softmax_block  # noqa: E402
from studio.losses import _online_softmax  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _close(a, b, tol):
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_rmsnorm_kernels_match_the_torch_reference(gemma, dtype, tol):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 200, generator=g).to(DEVICE, dtype)[:, :, :96]  # rows with a stride, width not a power of 2
    w = (1 + 0.1 * torch.randn(96, generator=g)).to(DEVICE, dtype)
    y, r = rmsnorm.forward(x, w, 1e-6, gemma)
    y0, r0 = torch_forward(x, w, 1e-6, gemma)
    _close(y, y0, tol)
    torch.testing.assert_close(r, r0.reshape(-1), atol=1e-5, rtol=1e-5)
    dy = torch.randn(y.shape, generator=g).to(DEVICE, y.dtype)
    for need_w in (True, False):
        dx, dw = rmsnorm.backward(dy, x, w, r, gemma, need_w)
        dx0, dw0 = torch_backward(dy, x, w, r0, gemma)
        _close(dx, dx0, tol)
        if need_w:
            _close(dw, dw0, tol * 4)  # a sum over 15 rows
        else:
            assert dw is None


def test_mixed_dtypes_follow_the_module_casts():
    """An fp32 weight on bf16 activations (a norm kept in fp32): llama's product is fp32, gemma's output bf16."""
    x = torch.randn(4, 64, device=DEVICE).to(torch.bfloat16)
    w = torch.ones(64, device=DEVICE)
    assert rmsnorm.forward(x, w, 1e-6, False)[0].dtype == torch.float32
    assert rmsnorm.forward(x, w, 1e-6, True)[0].dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_gated_kernels_match_the_torch_reference(kind, dtype, tol):
    g = torch.Generator().manual_seed(0)
    gate, up, dh = (3 * torch.randn(3, 2, 7, 300, generator=g)).to(DEVICE, dtype)[..., :250].unbind(0)  # strided
    _close(gated.forward(gate, up, kind), _act(gate, kind) * up, tol)
    d_gate, d_up = gated.backward(dh, gate, up, kind, True, True)
    _close(d_up, _act(gate, kind) * dh, tol)
    _close(d_gate, _act_backward(dh * up, gate, kind), tol)
    own = dh.contiguous()
    d_gate2, none = gated.backward(own, gate, up, kind, True, False, overwrite_dh=True)
    assert none is None and d_gate2.data_ptr() == own.data_ptr()  # written over the caller's buffer
    _close(d_gate2, d_gate, 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_softmax_block_kernel_matches_the_torch_reference(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(5, 400, generator=g)).to(DEVICE, dtype)[:, :300]  # rows with a stride, 300 columns
    m = torch.tensor([[-float("inf")], [0.0], [20.0], [-5.0], [1.0]], device=DEVICE)
    e, m_new, sums = softmax_block.forward(logits, m, block=128)  # three column blocks, the last one partial
    want_m = torch.maximum(m, logits.float().amax(1, keepdim=True))
    want_e = (logits.float() - want_m).exp()
    assert torch.equal(m_new, want_m)
    _close(e, want_e.to(dtype), 1e-2)
    torch.testing.assert_close(sums, want_e.sum(1, keepdim=True), rtol=1e-5, atol=1e-6)
    assert e[2].float().max() < 1  # a running max above the block's: every exponential below 1


def test_the_loss_online_softmax_on_the_kernel_matches_the_torch_ops():
    g = torch.Generator().manual_seed(1)
    hs = torch.randn(6, 32, generator=g).to(DEVICE, torch.bfloat16)
    weight = (0.5 * torch.randn(700, 32, generator=g)).to(DEVICE, torch.bfloat16)
    with kernels.disabled():
        lse0, g0 = _online_softmax(hs, weight, torch.bfloat16, None, 256, True)
    with kernels.forced():
        lse1, g1 = _online_softmax(hs, weight, torch.bfloat16, None, 256, True)
    assert ("softmax_block", DEVICE, torch.bfloat16) in kernels._verdicts
    assert kernels._verdicts[("softmax_block", DEVICE, torch.bfloat16)]
    torch.testing.assert_close(lse1, lse0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1, g0, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("batch_cos", [1, 2])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_rope_kernel_matches_the_torch_reference(batch_cos, dtype, tol):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, 12, generator=g).to(DEVICE, dtype).transpose(1, 2)  # attention's transposed view
    angle = torch.randn(batch_cos, 7, 6, generator=g).repeat(1, 1, 2)
    for cos, sin in ((angle.cos(), angle.sin()), (torch.randn(batch_cos, 7, 12, generator=g),
                                                  torch.randn(batch_cos, 7, 12, generator=g))):
        cos, sin = cos.to(DEVICE, dtype), sin.to(DEVICE, dtype)
        assert rope.supported(x, cos, sin)
        y = rope.apply(x, cos, sin)
        assert y.stride() == torch.empty_like(x).stride()
        _close(y, torch_rope(x, cos, sin), tol)
        _close(rope.apply(x, cos, sin, backward=True), torch_rope_backward(x, cos, sin), tol)
    strided_last = torch.randn(2, 3, 12, 7, generator=g).to(DEVICE, dtype).transpose(2, 3)
    assert not rope.supported(x[..., :6], cos, sin) and not rope.supported(strided_last, cos, sin)


@pytest.mark.parametrize("terms", [True, False], ids=["terms in the gated kernels", "terms written"])
@pytest.mark.parametrize("name,kinds", [("tiny-llama", {"silu"}), ("tiny-gemma3", {"gelu_tanh"})])
def test_a_model_on_the_kernels_trains_like_the_torch_ops(tiny_model, monkeypatch, name, kinds, terms):
    """A LoRA training step with the norms, the gated MLPs and RoPE on the kernels: the same loss and gradients;
    gate's and up's LoRA terms added by the gated kernels (kernels/gated_terms.py), or written out first
    (STUDIO_TERMS_IN_GATED=0)."""
    from studio import fused_mlp
    from studio.memory_bench import random_batch
    from studio.methods import apply_method, method_config
    monkeypatch.setattr(kernels, "_verdicts", {})
    monkeypatch.setattr(fused_mlp, "terms_wanted", lambda: terms)
    gated_key = "gated_terms" if terms else "gated"
    runs = []
    for force in (False, True):
        model = tiny_model(name, device=DEVICE, dtype="float32")
        apply_method(model, method_config({"name": "lora", "r": 4, "lora_dropout": 0.0,
                                           "target_modules": "all-linear"}))
        for p in model.parameters():
            if p.dim() == 1:
                p.requires_grad_(True)  # the norm weights train too: their kernel gradient is checked
        batch = random_batch(model.config.vocab_size, 2, 16, DEVICE)
        with kernels.forced() if force else kernels.disabled():
            loss = model(**batch).loss
            loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert {k[0] for k, ok in kernels._verdicts.items() if ok} == {"rmsnorm", gated_key, "rope"}  # all ran, checked
    assert all(kernels.verdicts().values()) and any(v.startswith(gated_key + " ") for v in kernels.verdicts())
    assert {k[3] for k in kernels._verdicts if k[0] == gated_key} == kinds
    (l0, g0), (l1, g1) = runs
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    assert g0.keys() == g1.keys() and any("norm" in n for n in g0) and any("down_proj" in n for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-4, rtol=1e-3)


def test_a_kernel_that_disagrees_or_fails_is_set_aside(monkeypatch):
    monkeypatch.setattr(kernels, "_verdicts", {})
    with pytest.warns(UserWarning, match="disagrees"):
        assert kernels.checked(("k", 1), lambda: False) is False
    assert kernels.checked(("k", 1), lambda: True) is False  # the verdict stands for the process

    def broken():
        raise RuntimeError("no such instruction")

    with pytest.warns(UserWarning, match="failed to run"):
        assert kernels.checked(("k", 2), broken) is False
    x = torch.randn(2, 8)
    with kernels.forced():
        monkeypatch.setattr(kernels, "_verdicts", {("rmsnorm", "cpu", torch.float32, torch.float32, "llama"): False})
        y = FusedRMSNorm.apply(x, torch.ones(8), 1e-6, False)  # falls back to the torch ops
    torch.testing.assert_close(y, torch_forward(x, torch.ones(8), 1e-6, False)[0])


def test_the_run_log_names_the_kernels_in_use(monkeypatch):
    from studio.trainer import kernel_note
    monkeypatch.setattr(kernels, "_verdicts", {})
    assert kernel_note() is None  # the CPU path: nothing to report
    monkeypatch.setattr(kernels, "_verdicts", {("rmsnorm", "cuda", torch.bfloat16, torch.bfloat16, "llama"): True,
                                               ("gated", "cuda", torch.bfloat16, "silu"): False})
    note = kernel_note()
    assert "in use: rmsnorm cuda bfloat16 bfloat16 llama." in note and "Set aside" in note and "gated cuda" in note


def test_every_kernel_variant_compiles_for_ampere_and_hopper(tmp_path):
    """The compiler's rules, which the interpreter does not apply (tests/kernel_compile.py)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path),
                                                                             "TRITON_DEFAULT_FP_FUSION": "1"}
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(root / "tests" / "kernel_compile.py")], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    # 10 per dtype and variant flag (the NF4 dequantization's flag: nested absmax; it has a strided output and a
    # contiguous one), the softmax block and the seeded dropout once per dtype: 3 dtypes, 2 archs; the seeded
    # uniform draws once per arch; the gated kernels with LoRA terms 4 per dtype, flag and padded rank (bf16: 2)
    assert "compiled 186 kernel variants" in done.stdout


def _quantized(shape, nested, dtype):
    import bitsandbytes.functional as bnbf
    weight = (torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))) * 0.05).to(DEVICE, dtype)
    return bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=nested, quant_type="nf4")


@pytest.mark.parametrize("nested", [True, False], ids=["nested", "flat"])
# rows a multiple of the block size, or an odd count: bitsandbytes' CPU kernel (the reference here without a GPU)
# misplaces the block scales of rows that end inside a block, e.g. 64 x 96 (its pure-torch path and CUDA do not)
@pytest.mark.parametrize("shape", [(96, 64), (37, 129), (512, 192)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_nf4_dequantization_is_bitsandbytes(shape, nested, dtype):
    """One launch for bitsandbytes' three (double-quantized absmax, offset, 4-bit values), the same weight: bitwise,
    except that Triton's CPU interpreter rounds fp32 to bf16 toward zero (one bf16 step at most)."""
    import bitsandbytes.functional as bnbf
    from studio.kernels import nf4
    packed, state = _quantized(shape, nested, dtype)
    got, want = nf4.dequantize(packed, state, dtype), bnbf.dequantize_4bit(packed, state)
    assert got.shape == want.shape == shape and got.dtype == want.dtype == dtype
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        assert int((got != want).sum()) > 0  # truncated, so this branch is needed (and taken)
        torch.testing.assert_close(got, want, atol=0, rtol=2 ** -7)
    else:
        assert torch.equal(got, want)


def test_4bit_weights_take_the_kernel_where_it_agrees_and_bitsandbytes_elsewhere(monkeypatch):
    """studio/dequant_4bit.py: NF4 through the checked kernel (its verdict recorded), FP4 through bitsandbytes."""
    import bitsandbytes.functional as bnbf
    from studio import dequant_4bit
    from studio.kernels import nf4
    monkeypatch.setattr(kernels, "_verdicts", {})
    calls = []
    monkeypatch.setattr(nf4, "dequantize", lambda *a, _real=nf4.dequantize: calls.append(1) or _real(*a))
    packed, state = _quantized((64, 128), True, torch.bfloat16)
    with kernels.forced():
        got = dequant_4bit.dense_4bit(packed, state, torch.float32)
    assert got.dtype == torch.float32 and calls  # the weight's dtype, then cast, as bitsandbytes' way
    torch.testing.assert_close(got, bnbf.dequantize_4bit(packed, state).float(), atol=0, rtol=2 ** -7)
    assert kernels.verdicts() == {f"nf4 {DEVICE} bfloat16 nested": True}
    fp4 = bnbf.quantize_4bit(torch.randn(64, 128).to(DEVICE, torch.bfloat16), quant_type="fp4")
    calls.clear()
    with kernels.forced():
        dequant_4bit.dense_4bit(*fp4, torch.bfloat16)
    assert not calls
