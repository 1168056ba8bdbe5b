"""`bench`: speed (and with --memory, memory-estimate) benchmarks as JSON lines."""
from __future__ import annotations

import json
import sys

HELP = "Benchmark our engine vs transformers+peft (JSON lines); --memory checks the estimator on CUDA."


def add_arguments(p) -> None:
    p.add_argument("--quick", action="store_true", help="the short grid (under 5 minutes on one H100)")
    p.add_argument("--memory", action="store_true",
                   help="estimate vs measured peak over the memory grid (with --methods: every method at its defaults)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu (cpu: the default model, small batch)")
    p.add_argument("--no-peft", action="store_true", help="skip the transformers+peft baseline")
    p.add_argument("--steps", type=int, default=5, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds per engine (default: 3 on CPU, 1 on GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile our engine's decoder layers")
    p.add_argument("--triton-ab", action="store_true",
                   help="each of our rows also with the torch ops instead of the Triton kernels (CUDA A/B)")
    p.add_argument("--eager-ab", action="store_true",
                   help="each of our rows that replays CUDA graphs (train.cuda_graphs=auto) also run eagerly")
    p.add_argument("--graphs-grid", action="store_true",
                   help="both sides of train.cuda_graphs=auto's line (3B at 4x2048, 7B at 1x512; eager and replayed)")
    p.add_argument("--packed-grid", action="store_true",
                   help="packed rows (examples of 64-512 tokens): ours eager (varlen attention) and replayed (block mask)")
    p.add_argument("--long-grid", action="store_true",
                   help="long sequences (7B at 1x16384 and 1x32768): ours with the recomputed MLPs in row chunks "
                        "and whole, vs peft")
    p.add_argument("--methods", nargs="?", const="all", default=None, metavar="PRESETS",
                   help="every preset peft trains too (or these, comma-separated), at the preset's settings, ours vs "
                        "peft given the same adapter (default model on the CPU, 0.5B on a GPU)")
    p.add_argument("--chat", action="store_true",
                   help="chat speed: greedy generation from the base, the adapter unmerged, and merged (tokens/s)")
    p.add_argument("--trainer", action="store_true",
                   help="each of our rows also run by the trainer (a user's run: batches, metrics, status files); "
                        "adds trainer_ms_per_step and trainer_vs_loop")
    p.add_argument("--only", default=None, help="run only these shapes of the grid, comma-separated (e.g. qwen2.5-7b; "
                   "qwen2.5-7b:qlora for one method's rows; qwen2.5-7b:qlora:default for its row at default "
                   "settings alone)")
    p.add_argument("--out", default=None, help="also append the rows to this file")


def run(args) -> int:
    sink = open(args.out, "a") if args.out else None
    try:
        if args.memory:
            from ..memory_bench import memory_grid
            rows = memory_grid(args.quick, args.methods)
        elif args.chat:
            from ..bench_chat import chat_rows
            from ..models import resolve_device
            rows = chat_rows(resolve_device(args.device), args.only.split(",") if args.only else None,
                             rounds=args.rounds or 3)
        else:
            from ..bench import bench
            from ..bench_grid import GRAPHS_GRID, LONG_GRID, PACKED_GRID, methods_grid
            from ..models import resolve_device
            cuda_only = [flag for flag, on in (("--graphs-grid", args.graphs_grid), ("--packed-grid", args.packed_grid),
                                               ("--long-grid", args.long_grid)) if on]
            if cuda_only and resolve_device(args.device).type != "cuda":
                print(f"bench {cuda_only[0]} measures what only a GPU runs: it needs a CUDA device.", file=sys.stderr)
                return 2
            rows = bench(args.quick, args.device, not args.no_peft, args.warmup, args.steps, rounds=args.rounds,
                         compile=args.compile, only=args.only.split(",") if args.only else None,
                         triton_ab=args.triton_ab, eager_ab=args.eager_ab, trainer=args.trainer,
                         grid=GRAPHS_GRID if args.graphs_grid else PACKED_GRID if args.packed_grid else
                         LONG_GRID if args.long_grid else
                         methods_grid(resolve_device(args.device), args.methods) if args.methods else None)
        for row in rows:
            line = json.dumps(row)
            print(line, flush=True)
            if sink:
                sink.write(line + "\n")
                sink.flush()
    finally:
        if sink:
            sink.close()
    print("bench finished", file=sys.stderr)
    return 0
