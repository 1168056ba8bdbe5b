"""A 4-bit base weight (bitsandbytes NF4) in the compute dtype, for the fused ops' GEMMs.

On CUDA one Triton launch (studio/kernels/nf4.py) instead of bitsandbytes' three, where the kernel gives
bitsandbytes' own result on its first use for that dtype and nesting; everywhere else, and for FP4 weights,
bitsandbytes' dequantize_4bit (also with STUDIO_NF4_KERNEL=0, for A/B runs). Either way the weight comes out in the quant state's dtype, then is cast to the
compute dtype, as before.

`wide_4bit` dequantizes into the first columns of a wider matrix [W | B], so that LoRA's rank-r term becomes r
more columns of one GEMM over [x | low] (lora_fused.py): for a layer whose output is much wider than its input
(gate/up: 5x on Qwen2.5-7B) the output-sized term is then neither written nor read back. Off unless
STUDIO_WIDE_GEMM=1, until a GPU measures it (baselines/lora_order_ab.py, gpu_check.sh's wide stage).
With STUDIO_KEEP_DEQUANT=1 a checkpointed layer's recomputation keeps what it dequantizes for the layer's
backward (studio/kept_dequant.py).
"""
from __future__ import annotations

import functools
import os

import torch

from . import kept_dequant, kernels


def dense_4bit(packed: torch.Tensor, quant_state, cdt: torch.dtype) -> torch.Tensor:
    kept = kept_dequant.take(packed)  # dequantized by this layer's recomputation (STUDIO_KEEP_DEQUANT=1)
    if kept is not None and kept.dtype == cdt:
        return kept
    if _kernel_ok(packed, quant_state):
        from .kernels import nf4
        weight = nf4.dequantize(packed, quant_state, quant_state.dtype).to(cdt)
    else:
        import bitsandbytes.functional as bnbf
        weight = bnbf.dequantize_4bit(packed, quant_state).to(cdt)
    kept_dequant.remember(packed, weight)
    return weight


def _kernel_ok(packed: torch.Tensor, quant_state) -> bool:
    if not kernels.use_triton(packed) or not nf4_kernel_wanted() or quant_state.quant_type != "nf4" or quant_state.blocksize % 2 \
            or getattr(quant_state, "packing_format_for_cpu", False) \
            or quant_state.dtype not in (torch.bfloat16, torch.float16, torch.float32) \
            or packed.numel() >= 2 ** 30:  # the kernel's offsets are 32-bit
        return False
    nested = bool(quant_state.nested)
    return kernels.checked(("nf4", packed.device.type, quant_state.dtype, "nested" if nested else "flat"),
                           lambda: _kernel_agrees(packed.device, quant_state.dtype, nested))


@functools.cache
def nf4_kernel_wanted() -> bool:
    return os.environ.get("STUDIO_NF4_KERNEL", "1") != "0"


def _kernel_agrees(device: torch.device, dtype: torch.dtype, nested: bool) -> bool:
    """The kernel against bitsandbytes on a small weight quantized here (an odd size: a half-used last byte)."""
    import bitsandbytes.functional as bnbf

    from .kernels import agree, nf4
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 129, generator=gen).to(device, dtype)  # unit size: the tolerance is a bf16 step
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=nested, quant_type="nf4")
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    return agree(tol, (nf4.dequantize(packed, state, dtype), bnbf.dequantize_4bit(packed, state)))


@functools.cache
def wide_gemm_enabled() -> bool:
    return os.environ.get("STUDIO_WIDE_GEMM", "0") == "1"


def wide_4bit(packed: torch.Tensor, quant_state, cdt: torch.dtype, extra: torch.Tensor) -> torch.Tensor | None:
    """[W | extra] in cdt (out x (in + r)): the weight dequantized by the kernel straight into the first columns,
    `extra` (out x r) copied beside it; None where the kernel does not run or the dtypes differ."""
    if not wide_gemm_enabled() or quant_state.dtype != cdt or len(quant_state.shape) != 2 \
            or not _kernel_ok(packed, quant_state):
        return None
    from .kernels import nf4
    n_out, n_in = quant_state.shape
    wide = torch.empty(n_out, n_in + extra.shape[1], dtype=cdt, device=packed.device)
    nf4.dequantize(packed, quant_state, cdt, out=wide[:, :n_in])
    wide[:, n_in:].copy_(extra)
    kept_dequant.remember(packed, wide[:, :n_in])
    return wide
