"""Kernel launches a training step issues, counted on the CPU: the launch-bound GPU rows' currency.

    python -m baselines.op_count [--shape tiny-qwen2] [--method lora] [--ckpt] [--engines studio,peft]
    python -m baselines.op_count --presets [dora,vera,...]   (bench --methods' presets at their own settings)

Runs a bench row's step (bf16 base under bf16 autocast, as on CUDA) and counts the aten operations
that would each launch at least one GPU kernel (views and other metadata-only ops left out), plus the
engine's Triton launches (run on the CPU through Triton's interpreter, as the tests do). Tiny models
have the real architectures' layer code, so per-layer counts carry over to the full-size shapes.
One JSON line per engine: ops per step, per decoder layer, and the most frequent ops.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
from typing import Iterator

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton loads: the kernels run on the CPU

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

FREE = {"view", "_unsafe_view", "t", "transpose", "expand", "slice", "select", "unsqueeze", "squeeze", "as_strided",
        "detach", "alias", "permute", "split", "split_with_sizes", "unbind", "empty", "empty_like", "empty_strided",
        "new_empty", "new_empty_strided", "_reshape_alias", "lift_fresh", "_to_copy_noop", "set_", "resize_",
        "is_same_size", "_local_scalar_dense", "result_type", "unflatten", "diagonal", "narrow", "chunk", "clone_noop"}


_in_kernel = [0]  # > 0 while a Triton kernel runs in the interpreter (its tensor copies are not GPU work)


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in FREE and not _in_kernel[0]:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting_triton(counter: collections.Counter) -> Iterator[None]:
    """Count each call of a kernel wrapper as (at least) one launch; the wrappers are restored after."""
    from studio.kernels import gated, rmsnorm, rope, softmax_block
    saved = []
    for module, names in ((rmsnorm, ("forward", "backward")), (gated, ("forward", "backward")), (rope, ("apply",)),
                          (softmax_block, ("forward",))):
        for name in names:
            real = getattr(module, name)
            saved.append((module, name, real))

            def counted(*a, _real=real, _key=f"triton.{module.__name__.rsplit('.', 1)[-1]}.{name}", **k):
                counter[_key] += 1
                _in_kernel[0] += 1
                try:
                    return _real(*a, **k)
                finally:
                    _in_kernel[0] -= 1
            setattr(module, name, counted)
    try:
        yield
    finally:
        for module, name, real in saved:
            setattr(module, name, real)


def count(shape: str, method: str, batch: int, seq: int, ckpt: bool, engine: str, preset: bool = False) -> dict:
    """One engine's second step (the first does the kernels' checks and the optimizer's set-up), counted."""
    from studio import kernels
    from studio.bench import build_step
    from studio.bench_grid import Row
    step = build_step(Row(shape, method, batch, seq, ckpt, precision="bf16", preset=preset), engine, torch.device("cpu"))
    ops, launches = OpCounter(), collections.Counter()
    with kernels.forced():
        step.run()
        with counting_triton(launches), ops:
            step.run()
    layers = step.model.config.num_hidden_layers
    total = sum(ops.ops.values()) + sum(launches.values())
    return {"shape": shape, "method": method, "preset": preset, "batch": batch, "seq": seq, "grad_ckpt": ckpt, "engine": engine,
            "ops_per_step": total, "layers": layers, "ops_per_layer": round(total / layers, 1),
            "top": dict(ops.ops.most_common(25)) | dict(launches)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="tiny-qwen2")
    p.add_argument("--method", default="lora")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--ckpt", action="store_true")
    p.add_argument("--engines", default="studio,peft")
    p.add_argument("--presets", nargs="?", const="all", default=None,
                   help="each preset bench --methods runs (or these, comma-separated), at its own settings")
    a = p.parse_args()
    if a.presets:
        from studio.bench_grid import methods_grid
        # all: those peft trains too; named ones may be any preset (with --engines studio if peft lacks it)
        methods = [row.method for row in methods_grid(torch.device("cpu"))] if a.presets == "all" else \
            a.presets.split(",")
    else:
        methods = [a.method]
    for method in methods:
        for engine in a.engines.split(","):
            print(json.dumps(count(a.shape, method, a.batch, a.seq, a.ckpt, engine, a.presets is not None)), flush=True)


if __name__ == "__main__":
    main()
