"""What a benchmark row ran on, so that a saved line names its machine and software versions."""
from __future__ import annotations

import functools
import importlib.metadata
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def machine_facts(device: torch.device) -> dict:
    """The device's name (on the CPU also its threads and whether it multiplies bf16 in hardware) and the
    versions of torch, transformers and peft (the baseline's; None where it is not installed)."""
    if device.type == "cuda":
        where = {"device_name": torch.cuda.get_device_name(device)}
    else:
        from .models import cpu_has_bf16_instructions
        where = {"device_name": cpu_name(), "threads": torch.get_num_threads(),
                 "bf16_hardware": cpu_has_bf16_instructions()}
    return where | {"torch": torch.__version__, "transformers": _version("transformers"), "peft": _version("peft")}
