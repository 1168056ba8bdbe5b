"""What `python -m studio bench` runs: a row's settings (Row), the grids (the issue's GPU shapes, the
quick grid, the CPU rows, the graphs/packed/long grids, one row per preset peft trains too) and the method
config each row trains, shared by both engines."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from .errors import ConfigError


@dataclass
class Row:
    shape: str
    method: str  # lora | qlora | full (the reference settings), or with preset=True any method or preset name
    batch: int
    seq: int
    grad_ckpt: bool
    labels: str = "all"  # all: every token trains; prompt: the first half of each row is a masked prompt (SFT)
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on the CPU; bf16: a bf16 base under autocast anywhere
    offload: bool = False  # ours only: checkpointed layer inputs in pinned CPU RAM (train.offload_checkpoints)
    triton: bool = True  # ours only: False runs the torch ops where the fused ops have Triton kernels (A/B)
    graphs: str = "auto"  # ours only: train.cuda_graphs (auto: replayed on CUDA where the step is host-bound)
    packed: bool = False  # each row packs examples of 64-512 tokens (data.packing): both engines get the same
    fit: str = ""  # ours only, with grad_ckpt: recompute the fewest layers that fit this GPU (train.checkpoint_budget_gb)
    preset: bool = False  # the method at its preset's own settings (the methods grid), not LoRA r16 on all linear layers
    mlp_chunks: bool = True  # ours only: False keeps recomputed MLPs whole at any length (studio/chunked_mlp.py A/B)

    def baseline_key(self) -> tuple:
        """The settings the peft baseline sees (offloading, kernels, graphs are ours alone: variants share one)."""
        return (self.shape, self.method, self.batch, self.seq, self.grad_ckpt, self.labels, self.precision,
                self.packed, self.preset)


GPU_GRID = [Row("qwen2.5-0.5b", "lora", 4, 1024, False), Row("qwen2.5-0.5b", "lora", 4, 1024, True),
            Row("qwen2.5-0.5b", "full", 4, 1024, False), Row("qwen2.5-0.5b", "qlora", 4, 1024, True),
            Row("qwen2.5-1.5b", "lora", 4, 2048, True), Row("llama-3.2-1b", "lora", 8, 2048, True),
            # fit: as a 24 GB card's user runs it, recomputing only the layers its memory needs
            Row("qwen2.5-7b", "lora", 4, 2048, True), Row("qwen2.5-7b", "lora", 4, 2048, True, fit="RTX 4090"),
            Row("qwen2.5-7b", "qlora", 4, 2048, True), Row("qwen2.5-7b", "qlora", 4, 2048, True, fit="RTX 4090"),
            Row("qwen2.5-7b", "lora", 4, 2048, True, offload=True),
            Row("qwen2.5-7b", "qlora", 4, 2048, True, offload=True)]
QUICK_GRID = GPU_GRID[:5]
# both sides of train.cuda_graphs=auto's line (parameters x tokens of a micro-batch): a 3B model at 4 x 2,048
# just above it, and a 7B model at a small batch below it (fewer tokens a step, so more of it waits on the
# host), each eager and replayed; and 7B QLoRA at 4 x 2,048, far above the line but host-bound on the H200
# (645 ms a step, 591 of them in kernels: 4-bit dequantizations launched from Python, 2026-11-29)
GRAPHS_GRID = [Row(shape, method, batch, seq, True, graphs=graphs)
               for shape, method, batch, seq in (("qwen2.5-3b", "lora", 4, 2048), ("qwen2.5-7b", "lora", 1, 512),
                                                 ("qwen2.5-7b", "qlora", 4, 2048))
               for graphs in ("off", "on")]
# packed rows: ours eager (flash varlen attention) and replayed (sdpa with the block mask), and peft (sdpa, the mask)
PACKED_GRID = [Row(shape, "lora", 4, seq, ckpt, graphs=graphs, packed=True)
               for shape, seq, ckpt in (("qwen2.5-0.5b", 1024, False), ("qwen2.5-1.5b", 2048, True))
               for graphs in ("off", "on")]
# long sequences: a recomputed layer's MLP in row chunks (studio/chunked_mlp.py: two at 16,384 tokens, three at
# 32,768), and whole, against peft at the same length
LONG_GRID = [Row("qwen2.5-7b", method, 1, seq, True, mlp_chunks=chunks)
             for method, seq in (("lora", 16384), ("qlora", 16384), ("qlora", 32768)) for chunks in (True, False)]
CPU_GRID = [Row("gemma-3-270m", "lora", 2, 128, False), Row("gemma-3-270m", "lora", 2, 128, False, "prompt"),
            Row("gemma-3-270m", "lora", 2, 128, False, "all", "bf16"),  # AMX / AVX512-BF16 CPUs
            Row("gemma-3-270m", "lora", 2, 128, False, "prompt", "bf16")]


# peft types peft itself trains: the methods grid's rows (each preset of ours whose adapter files peft loads)
PEFT_TRAINS = ("LORA", "LOHA", "LOKR", "IA3", "ADALORA", "VERA", "GLORA", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
# a preset's settings the bench changes: a text-initialised prompt needs a tokenizer, a random-init model has none
PRESET_OVERRIDES = {"prompt_tuning": {"prompt_tuning_init": "RANDOM"}}
BENCH_LR = 1e-5
BENCH_TOTAL_STEPS = 100  # the schedule length step hooks see (AdaLoRA's rank budget), both engines


def bench_method_cfg(method: str, preset: bool = False) -> dict:
    """The method config of a bench row: full fine-tuning, or LoRA r16 on every linear layer (QLoRA too);
    preset: the named method or preset at its own settings."""
    if preset:
        return {"name": method} | PRESET_OVERRIDES.get(method, {})
    if method == "full":
        return {"name": "full", "keep_base_copy": False}
    return {"name": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


def methods_grid(device: torch.device, names: str = "all") -> list[Row]:
    """One row per preset peft can train too (or those of `names`, comma-separated), at the preset's settings
    (no 4-bit presets): the default model at 2 x 128 on the CPU, Qwen2.5-0.5B at 4 x 1,024 on a GPU."""
    from .methods import presets, resolve
    shape, batch, seq = ("gemma-3-270m", 2, 128) if device.type == "cpu" else ("qwen2.5-0.5b", 4, 1024)
    known = [name for name, p in presets().items() if resolve(name)[0].peft_type in PEFT_TRAINS and not p["requires"]]
    wanted = known if names == "all" else names.split(",")
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise ConfigError(f"bench --methods: peft does not train {', '.join(unknown)} here; choose from "
                          f"{', '.join(known)}.")
    return [Row(shape, name, batch, seq, False, preset=True) for name in known if name in wanted]


def default_grid(dev: torch.device, quick: bool) -> list[Row]:
    """The rows `bench` runs when given none: on a CPU without bf16 matrix hardware, the fp32 rows only
    (emulated bf16 takes minutes a step and measures nothing a user of that CPU would run)."""
    if dev.type != "cpu":
        return QUICK_GRID if quick else GPU_GRID
    from .models import cpu_has_bf16_instructions
    if cpu_has_bf16_instructions():
        return CPU_GRID
    print("bench: this CPU has no AMX or AVX512-BF16, so the bf16 rows are left out", file=sys.stderr)
    return [row for row in CPU_GRID if row.precision != "bf16"]
