"""The memory a run is checked against: GPU presets (presets/gpus.yaml) by name, and this machine's RAM."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml

from .errors import ConfigError

GPUS_FILE = Path(__file__).resolve().parents[1] / "presets" / "gpus.yaml"
CPU_NAMES = ("cpu", "cpu ram", "ram")


@lru_cache(maxsize=1)
def gpu_presets() -> dict[str, dict]:
    return yaml.safe_load(GPUS_FILE.read_text()) or {}


def gpu_memory(name: str) -> int:
    """Total bytes of a GPU preset (case-insensitive name), or of this machine's RAM for "CPU"."""
    if name.lower() in CPU_NAMES:
        return cpu_ram()
    for key, val in gpu_presets().items():
        if key.lower() == name.lower() or key.lower().replace(" ", "") == name.lower().replace(" ", ""):
            return int(val["memory_mib"]) * 2**20
    raise ConfigError(f"Unknown GPU {name!r}; choose one of: {', '.join(gpu_presets())}, CPU.")


def cpu_ram() -> int:
    try:
        import psutil
        return int(psutil.virtual_memory().total)
    except ImportError:  # pragma: no cover - psutil is normally present
        import os
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_for(gpu: str) -> str:
    """The device a run on `gpu` trains on: "cpu" for this machine's RAM, else "cuda"."""
    return "cpu" if gpu.lower() in CPU_NAMES else "cuda"
