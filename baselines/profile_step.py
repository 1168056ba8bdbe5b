"""Where a bench row's step spends its time: wall time vs GPU-busy time, kernel count, top kernels and ops.

    python -m baselines.profile_step qwen2.5-0.5b lora 4 1024 [--ckpt] [--engine studio|peft] [--compile]

Launch-bound steps (GPU busy far below wall time) want fewer, larger kernels; GPU-bound ones, better kernels.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    from studio.bench import build_step, time_steps
    from studio.bench_grid import Row
    p = argparse.ArgumentParser()
    p.add_argument("shape")
    p.add_argument("method")
    p.add_argument("batch", type=int)
    p.add_argument("seq", type=int)
    p.add_argument("--ckpt", action="store_true")
    p.add_argument("--engine", default="studio")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--bf16", action="store_true", help="a bf16 base under autocast (the CUDA setting) on the CPU too")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rows", type=int, default=18)
    p.add_argument("--shapes", action="store_true", help="group the ops by their input shapes")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    row = Row(a.shape, a.method, a.batch, a.seq, a.ckpt, precision="bf16" if a.bf16 else "auto",
              graphs="off")  # the kernels one by one, as an eager step issues them
    step = build_step(row, a.engine, device, a.compile)
    wall = time_steps(step.run, 3, a.steps, device)[0] * 1e3  # the bench's own warm-up and clock
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=a.shapes) as prof:
        for _ in range(a.steps):
            step.run()
        sync()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy = sum(e.device_time for e in kernels) / 1e3 / a.steps  # kernel time in ms, overlaps counted twice
    print(f"== {a.engine} {a.shape} {a.method} {a.batch}x{a.seq} ckpt={a.ckpt} compile={a.compile}: "
          f"{wall:.1f} ms/step wall, {busy:.1f} ms/step in kernels, {len(kernels) // a.steps} kernels/step")
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages(group_by_input_shape=a.shapes).table(sort_by=sort, row_limit=a.rows,
                                                                 max_name_column_width=60, max_shapes_column_width=70)
    print(table)


if __name__ == "__main__":
    main()
