"""A 4-bit base weight (bitsandbytes NF4) in the compute dtype, for the fused ops' GEMMs.

On CUDA one Triton launch (studio/kernels/nf4.py) instead of bitsandbytes' three, where the kernel gives
bitsandbytes' own result on its first use for that dtype and nesting; everywhere else, for FP4 weights and
with STUDIO_NF4_KERNEL=0 (A/B runs), bitsandbytes' dequantize_4bit. Either way the weight comes out in the quant
state's dtype, then is cast to the compute dtype. On an H200 (2026-11-30) the kernel took 34 µs of host and 37 of
GPU a 7B weight against bitsandbytes' 85 and 69, and a 7B QLoRA step 640 ms against 647.
"""
from __future__ import annotations

import torch

from . import ab_switches, kernels


def dense_4bit(packed: torch.Tensor, quant_state, cdt: torch.dtype) -> torch.Tensor:
    if _kernel_ok(packed, quant_state):
        from .kernels import nf4
        return nf4.dequantize(packed, quant_state, quant_state.dtype).to(cdt)
    import bitsandbytes.functional as bnbf
    return bnbf.dequantize_4bit(packed, quant_state).to(cdt)


def _kernel_ok(packed: torch.Tensor, quant_state) -> bool:
    if not kernels.use_triton(packed) or not nf4_kernel_wanted() or quant_state.quant_type != "nf4" \
            or quant_state.blocksize % 2 \
            or getattr(quant_state, "packing_format_for_cpu", False) \
            or quant_state.dtype not in (torch.bfloat16, torch.float16, torch.float32) \
            or packed.numel() >= 2 ** 30:  # the kernel's offsets are 32-bit
        return False
    nested = bool(quant_state.nested)
    return kernels.checked(("nf4", packed.device.type, quant_state.dtype, "nested" if nested else "flat"),
                           lambda: _kernel_agrees(packed.device, quant_state.dtype, nested))


def nf4_kernel_wanted() -> bool:
    return ab_switches.on("STUDIO_NF4_KERNEL")


def _kernel_agrees(device: torch.device, dtype: torch.dtype, nested: bool) -> bool:
    """The kernel against bitsandbytes on a small weight quantized here (an odd size: a half-used last byte)."""
    import bitsandbytes.functional as bnbf

    from .kernels import agree, nf4
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 129, generator=gen).to(device, dtype)  # unit size: the tolerance is a bf16 step
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=nested, quant_type="nf4")
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    return agree(tol, (nf4.dequantize(packed, state, dtype), bnbf.dequantize_4bit(packed, state)))
