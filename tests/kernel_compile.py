"""Compile every variant of the engine's Triton kernels for Ampere and Hopper, no GPU needed.

Triton's interpreter (the CPU tests) runs the kernels' Python; it does not apply the compiler's rules
(a global a kernel reads must be constexpr, types must agree across branches). This script runs the
real front end, LLVM and ptxas. Run with TRITON_INTERPRET unset (tests/test_triton_kernels.py does).
"""
from __future__ import annotations

import itertools
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from studio.kernels import dropout, gated, gated_terms, nf4, rmsnorm, rope, softmax_block


def cases():
    for dt, flag in itertools.product(("bf16", "fp16", "fp32"), (True, False)):
        p = f"*{dt}"
        yield rmsnorm._forward, dict(X=p, W=p, Y=p, R="*fp32", stride_x="i32", stride_y="i32", n="i32", eps="fp32",
                                     GEMMA="constexpr", BLOCK="constexpr"), dict(GEMMA=flag, BLOCK=4096)
        for need_w in (True, False):
            yield rmsnorm._backward, dict(DY=p, X=p, W=p, R="*fp32", DX=p, DW="*fp32", stride_dy="i32", stride_x="i32",
                                          stride_dx="i32", n="i32", rows="i32", rows_per_program="i32",
                                          GEMMA="constexpr", NEED_W="constexpr", BLOCK="constexpr"), \
                dict(GEMMA=flag, NEED_W=need_w, BLOCK=4096)
        yield gated._forward, dict(G=p, U=p, H=p, n="i32", SILU="constexpr", BLOCK="constexpr"), \
            dict(SILU=flag, BLOCK=gated.BLOCK)
        yield rope._rope, dict(X=p, Y=p, COS=p, SIN=p, seq="i32", heads="i32", sxb="i32", sxh="i32", sxt="i32",
                               syb="i32", syh="i32", syt="i32", scb="i32", sct="i32", HALF="constexpr",
                               BLOCK_H="constexpr", BLOCK_D="constexpr", BACKWARD="constexpr"), \
            dict(HALF=64, BLOCK_H=32, BLOCK_D=64, BACKWARD=flag)
        if flag:  # no variant flag: once per dtype
            yield softmax_block._block, dict(L=p, M="*fp32", E=p, MN="*fp32", S="*fp32", n_cols="i32", stride_l="i32",
                                             stride_e="i32", BLOCK="constexpr"), dict(BLOCK=softmax_block.BLOCK)
            yield dropout._drop, dict(X=p, Y=p, SEED="*i64", site="i32", n="i32", p="fp32", scale="fp32", first="i32",
                                      BLOCK="constexpr"), dict(BLOCK=dropout.BLOCK)
        yield nf4._dequant, dict(PACKED="*u8", ABSMAX="*u8" if flag else "*fp32", CODE2="*fp32", ABSMAX2="*fp32",
                                 OFFSET="*fp32", CODE4="*fp32", OUT=p, n="i32", n_bytes="i32", half_block="i32",
                                 blocksize2="i32", NESTED="constexpr", BLOCK="constexpr"), \
            dict(NESTED=flag, BLOCK=nf4.BLOCK)
        if dt == "fp32" and flag:  # dtype-free: once
            yield dropout._uniform, dict(Y="*fp32", SEED="*i64", site="i32", n="i32", BLOCK="constexpr"), \
                dict(BLOCK=dropout.BLOCK)
        for need_g, need_u in ((True, True), (True, False), (False, True)):
            yield gated._backward, dict(DH=p, G=p, U=p, DG=p, DU=p, n="i32", SILU="constexpr", NEED_G="constexpr",
                                        NEED_U="constexpr", BLOCK="constexpr"), \
                dict(SILU=flag, NEED_G=need_g, NEED_U=need_u, BLOCK=gated.BLOCK)
        # with gate's and up's LoRA terms: 16-bit operands dot natively, fp32 ones in IEEE fp32; the padded ranks
        # 16 and (bf16) 128, the largest
        terms = dict(LOW=p, BG=p, BU=p, rows="i32", cols="i32", r="i32", stride_low="i32", SILU="constexpr",
                     BM="constexpr", BN="constexpr", RP="constexpr", NATIVE="constexpr")
        tiles = dict(BM=gated_terms.BM, BN=gated_terms.BN, NATIVE=dt != "fp32")
        for rp in (16, 128) if dt == "bf16" else (16,):
            yield gated_terms._forward, dict(G=p, U=p, H=p) | terms, dict(SILU=flag, RP=rp) | tiles
            for need_g, need_u in ((True, True), (True, False), (False, True)):
                yield gated_terms._backward, dict(DH=p, G=p, U=p, DG=p, DU=p) | terms | dict(
                    NEED_G="constexpr", NEED_U="constexpr"), dict(SILU=flag, RP=rp, NEED_G=need_g, NEED_U=need_u) | tiles


def main() -> int:
    done = 0
    for arch in (80, 90):
        for fn, signature, constexprs in cases():
            triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": 8})
            done += 1
    print(f"compiled {done} kernel variants")
    return 0


if __name__ == "__main__":
    sys.exit(main())
