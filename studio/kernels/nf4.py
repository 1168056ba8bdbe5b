"""bitsandbytes' NF4 weights dequantized in one kernel, the double-quantized (nested) absmax included.

bitsandbytes dequantizes a double-quantized weight in three launches from Python: the 8-bit absmax through
its blockwise code, the offset added, then the 4-bit values, each launch behind a custom op's dispatch. On the
H200's host that took about 120 µs a weight, and a checkpointed 7B QLoRA step dequantizes 557 weights: its GPU
idled 54 of its 645 ms (profile of 2026-11-29). Here one launch reads the packed bytes, the absmax (8-bit with
its block scales and offset, or fp32) and writes the weight in the compute dtype, with bitsandbytes' arithmetic:

    w[2b], w[2b + 1] = nf4[byte_b >> 4] · a(2b // blocksize), nf4[byte_b & 15] · a(2b // blocksize)
    a(j) = code2[absmax_q[j]] · absmax2[j // blocksize2] + offset   (nested; else the fp32 absmax[j])

in fp32 (no fused multiply-add: bitsandbytes rounds the product and the sum apart), then cast.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK = 1024  # packed bytes a program reads (2,048 weights)


@triton.jit
def _dequant(PACKED, ABSMAX, CODE2, ABSMAX2, OFFSET, CODE4, OUT, n, n_bytes, half_block, blocksize2,
             NESTED: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = b < n_bytes
    byte = tl.load(PACKED + b, mask=valid, other=0).to(tl.int32)
    j = b // half_block  # both weights of a byte are in one absmax block (blocksize is even)
    if NESTED:
        q = tl.load(ABSMAX + j, mask=valid, other=0).to(tl.int32)
        scale = tl.load(CODE2 + q, mask=valid, other=0.0) * tl.load(ABSMAX2 + j // blocksize2, mask=valid, other=0.0)
        scale = scale + tl.load(OFFSET)
    else:
        scale = tl.load(ABSMAX + j, mask=valid, other=0.0)
    hi = tl.load(CODE4 + (byte >> 4), mask=valid, other=0.0) * scale
    lo = tl.load(CODE4 + (byte & 15), mask=valid, other=0.0) * scale
    w = tl.reshape(tl.join(hi, lo), (2 * BLOCK,))  # hi0, lo0, hi1, lo1, ...: the weights in order
    offs = 2 * tl.program_id(0) * BLOCK + tl.arange(0, 2 * BLOCK)
    tl.store(OUT + offs, w.to(OUT.dtype.element_ty), mask=offs < n)


def dequantize(packed: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """The weight of a bitsandbytes NF4 parameter (its packed data and quant_state) in dtype, shaped as the
    quant state says."""
    n = math.prod(quant_state.shape)
    data = packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)  # other quant_storage dtypes
    out = torch.empty(tuple(quant_state.shape), dtype=dtype, device=packed.device)
    n_bytes = (n + 1) // 2
    nested = bool(quant_state.nested)
    absmax = quant_state.absmax
    inner = quant_state.state2 if nested else None
    code2 = inner.code if nested else absmax  # unread without nesting: any pointer will do
    absmax2 = inner.absmax if nested else absmax
    offset = quant_state.offset if nested else absmax
    blocksize2 = inner.blocksize if nested else 1
    _dequant[(triton.cdiv(n_bytes, BLOCK),)](data, absmax, code2, absmax2, offset, quant_state.code, out, n,
                                            n_bytes, quant_state.blocksize // 2, blocksize2,
                                            NESTED=nested, BLOCK=BLOCK, num_warps=8,
                                            enable_fp_fusion=False)
    return out
