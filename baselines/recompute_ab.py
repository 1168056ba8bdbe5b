"""What skipping the down projection in a checkpoint's recomputation saves (studio/checkpointing.py marks
the layer, studio/fused_mlp.py skips): one model, LoRA r16 on all linear layers, every layer checkpointed,
forward + backward timed with the mark on and off in alternating rounds.

    python -m baselines.recompute_ab [--shape qwen2.5-7b] [--batch 4] [--seq 2048] [--rounds 3] [--method qlora]

One JSON line: ms a step with and without the skip, per round, and the median ratio. bf16 on CUDA; fp32
on the CPU (default there: qwen2.5-0.5b, 1 x 256).
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch


def main() -> None:
    from studio.bench import time_steps
    from studio.checkpointing import enable_gradient_checkpointing
    from studio.losses import causal_lm_loss
    from studio.memory_bench import random_base_model, random_batch
    from studio.methods import apply_method, method_config

    p = argparse.ArgumentParser()
    p.add_argument("--shape", default=None)
    p.add_argument("--method", default="lora", choices=["lora", "qlora"])
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    shape = a.shape or ("qwen2.5-7b" if cuda else "qwen2.5-0.5b")
    batch, seq = a.batch or (4 if cuda else 1), a.seq or (2048 if cuda else 256)
    model = random_base_model(shape, device, torch.bfloat16 if cuda else torch.float32,
                              "nf4" if a.method == "qlora" else "none")
    apply_method(model, method_config({"name": "lora", "r": 16, "lora_alpha": 32, "target_modules": "all-linear"}))
    model.train()
    data = random_batch(model.config.vocab_size, batch, seq, device)

    def step() -> torch.Tensor:
        loss, _ = causal_lm_loss(model, data)
        loss.backward()
        for param in model.parameters():
            param.grad = None
        return loss.detach()

    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(a.rounds):
        for mark in (True, False):
            enable_gradient_checkpointing(model, 1.0, mark=mark, preserve_rng=False)
            times[mark].append(time_steps(step, 1, a.steps, device)[0] * 1e3)
    ratios = [round(on / off, 3) for on, off in zip(times[True], times[False])]
    print(json.dumps({"device": torch.cuda.get_device_name() if cuda else "cpu", "shape": shape, "method": a.method,
                      "batch": batch, "seq": seq, "ms_skip": [round(t, 1) for t in times[True]],
                      "ms_full_recompute": [round(t, 1) for t in times[False]], "ratio_per_round": ratios,
                      "median_ratio": statistics.median(ratios)}), flush=True)


if __name__ == "__main__":
    main()
