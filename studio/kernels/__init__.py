"""Triton kernels for the engine's fused ops on CUDA (RMSNorm, the gated MLP activation, RoPE).

The torch code of each fused op stays the reference and the path everywhere else: on the CPU, when
Triton is missing, when STUDIO_TRITON=0, and when a kernel fails its first-use check against that
reference (a card or Triton version that miscompiles it then costs speed, never correctness).
Tests run the kernels on the CPU through Triton's interpreter (TRITON_INTERPRET=1 before import;
`forced()` routes CPU tensors to them).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import warnings
from typing import Callable, Iterator

import torch

from .. import ab_switches

MAX_NORM_WIDTH = 16384  # wider norm rows keep the torch path (one row must fit a program's registers)
_routing = {"forced": False, "off": False}
_verdicts: dict[tuple, bool] = {}


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _enabled() -> bool:
    return ab_switches.on("STUDIO_TRITON") and triton_available()


def use_triton(t: torch.Tensor) -> bool:
    """Whether a fused op runs its Triton kernel for this tensor (not inside torch.compile, whose
    inductor fuses the torch ops itself)."""
    return (t.is_cuda or _routing["forced"]) and not _routing["off"] and _enabled() and \
        not torch.compiler.is_compiling()


@contextlib.contextmanager
def _routed(key: str) -> Iterator[None]:
    before, _routing[key] = _routing[key], True
    try:
        yield
    finally:
        _routing[key] = before


def forced() -> contextlib.AbstractContextManager:
    """Route CPU tensors to the kernels too (tests, with TRITON_INTERPRET=1 set before Triton loads)."""
    return _routed("forced")


def disabled() -> contextlib.AbstractContextManager:
    """The torch ops everywhere, CUDA included (the reference side of a comparison)."""
    return _routed("off")


def verdicts() -> dict[str, bool]:
    """Which kernels this process has checked, and whether each is in use ("rmsnorm cuda bfloat16 ...")."""
    return {" ".join(str(p).removeprefix("torch.") for p in key): ok for key, ok in _verdicts.items()}


def checked(key: tuple, check: Callable[[], bool]) -> bool:
    """A kernel's verdict for `key` (op, dtypes, variant): `check()` compares it once with the torch
    reference on a small input; a kernel that fails, or raises, is set aside with a warning."""
    if key not in _verdicts:
        try:
            _verdicts[key] = bool(check())
        except Exception as exc:  # noqa: BLE001 - a kernel that cannot build here is a fallback, not an error
            warnings.warn(f"Triton kernel {key} failed to run ({type(exc).__name__}: {exc}); using torch ops.",
                          stacklevel=2)
            _verdicts[key] = False
        else:
            if not _verdicts[key]:
                warnings.warn(f"Triton kernel {key} disagrees with the torch reference here; using torch ops.",
                              stacklevel=2)
    return _verdicts[key]


def agree(tol: float, *pairs: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Each (kernel output, torch reference) pair within tol, relative to the reference (first-use checks)."""
    return all(bool(((a.float() - b.float()).abs() <= tol * (1 + b.float().abs())).all()) for a, b in pairs)


def block_size(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()


def num_warps(block: int) -> int:
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


def programs_for(rows: int, device: torch.device) -> int:
    """Programs of a row-looping kernel: a few per multiprocessor (each keeps a partial sum)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(rows, 4 * sms))
