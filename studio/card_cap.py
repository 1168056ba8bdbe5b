"""Run as on a smaller card: the caching allocator capped at what a named GPU would leave it.

A bench row fitted to a card (`fit`, train.checkpoint_budget_gb) is measured on a larger GPU. Uncapped, its
allocator keeps every block it ever cached (on the H200, 2026-11-30, the 7B QLoRA row fitted to an RTX 4090
reserved 25.6 GB beside the 0.8 GB the process holds outside the allocator, more than the 4090's 25.8 GB),
so whether the run fits that card is not shown. Capped (torch.cuda.set_per_process_memory_fraction), the
allocator frees cached blocks and retries when it reaches the card's memory, as it would on that card, and
raises out-of-memory only where the run does not fit it: the row then says so, and a row that fits shows
the time the retries cost (allocator_per_step's alloc_retries).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def on_card_bytes(device: torch.device) -> tuple[int, int]:
    """(what the process holds on the card outside the caching allocator: CUDA context, library handles,
    loaded kernels; the allocator's peak reservation)."""
    free, total = torch.cuda.mem_get_info(device)
    return total - free - torch.cuda.memory_reserved(device), torch.cuda.max_memory_reserved(device)


def allocator_cap(card_bytes: int, outside: int, total: int) -> float:
    """The fraction of this GPU's memory the allocator may reserve to stay within a card of card_bytes, given
    what the process holds outside it; 1.0 where the card is as large as this GPU or larger."""
    if card_bytes >= total:
        return 1.0
    return max(card_bytes - outside, 0) / total


@contextlib.contextmanager
def capped_to(card_bytes: int, device: torch.device) -> Iterator[dict]:
    """Within: this process's caching allocator reserves at most what a card of card_bytes leaves it (read now:
    the bytes outside the allocator grow as kernels load, so the caller checks on_card_bytes again after).
    Yields {card_bytes, allocator_cap_bytes}; the cap is lifted on the way out, whatever happened."""
    torch.cuda.empty_cache()  # cached blocks of earlier rows are not this row's
    outside, _ = on_card_bytes(device)
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = allocator_cap(card_bytes, outside, total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    try:
        yield {"card_bytes": card_bytes, "allocator_cap_bytes": int(fraction * total)}
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
