"""`estimate`: itemised peak memory of a run config, the fit table, and what fits on a chosen GPU."""
from __future__ import annotations

import json

HELP = "Estimate the memory a run needs (itemised), which GPUs it fits, and the largest batch/seq/rank."


def add_arguments(p) -> None:
    p.add_argument("config", nargs="?", default=None, help="run config YAML (default: the built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a field")
    p.add_argument("--gpu", default=None, help="a GPU from presets/gpus.yaml (e.g. 'RTX 4090', T4) or CPU")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="estimate for this device "
                   "(default: cpu if --gpu CPU, else cuda)")
    p.add_argument("--json", action="store_true", help="one JSON object (bytes) instead of tables")


def run(args) -> int:
    from ..config import load_config
    from ..gpus import device_for
    from ..memory import ALLOCATOR_ROOM_BYTES, estimate as make_estimate
    from ..memory_inference import estimate_chat
    from ..memory_report import format_estimate, human
    from ..memory_search import best_switch, fewest_recomputed, fit_table, largest_fitting, saving_text
    cfg = load_config(args.config, args.set)
    device = args.device or (device_for(args.gpu) if args.gpu else "cuda")
    gpu = args.gpu if args.gpu and device == "cuda" else None
    est = make_estimate(cfg, device, gpu=gpu)
    table = fit_table(cfg)
    chat = None
    if cfg.model.task == "causal_lm":  # what the chat tab holds for the run
        try:
            chat = estimate_chat(cfg, cfg.data.max_length, cfg.model.dtype, device)
        except Exception:  # noqa: BLE001 - an extra line; the training estimate above stands without it
            chat = None
    largest: dict = {}
    switches: list = []
    if args.gpu:
        for what in ("batch_size", "max_length", "r"):
            if what == "r" and not hasattr(cfg.method, "r"):
                continue
            largest[what] = largest_fitting(cfg, args.gpu, what)
        fit = fewest_recomputed(cfg, args.gpu)
        largest["recomputed_layers"] = list(fit) if fit else None  # the fastest checkpointing that fits
        switches = best_switch(cfg, args.gpu)
    if args.json:
        out = est.to_dict()
        out["fits"] = out["details"].get("fits")
        out["fit_table"] = table
        out["largest"] = largest
        out["switches"] = [{"switch": s, "saved_bytes": b} for s, b in switches]
        out["chat"] = chat
        print(json.dumps(out, default=str))
        return 0
    print(format_estimate(est))
    if chat:
        merged = f"; a merged copy for base-speed answers adds {human(chat['merged_copy'])}" if chat["merged_copy"] else ""
        print(f"\nchatting with it: {human(chat['total'])} ({human(chat['weights'])} weights + {human(chat['adapter'])} "
              f"adapter + {human(chat['kv_cache'])} KV cache for {cfg.data.max_length} tokens){merged}")
    print("\nfits on:")
    for row in table:
        answer = "tight" if row["tight"] else "yes" if row["fits"] else "no"
        print(f"  {row['gpu']:<12}{human(row['memory_bytes']):>12}  {answer:<6}(needs {human(row['total'])})")
    if any(row["tight"] for row in table):
        print(f"  (tight: fits with less than {human(ALLOCATOR_ROOM_BYTES)} to spare, which PyTorch's allocator may "
              "need beyond the estimate)")
    if args.gpu:
        fit = largest.pop("recomputed_layers")
        print(f"\non {args.gpu}: " + ", ".join(f"largest {k} {v}" for k, v in largest.items()))
        print("fastest checkpointing that fits: " + ("none does" if fit is None else "none needed" if fit[0] == 0
              else f"recompute {fit[0]} of {fit[1]} layers (train.checkpoint_budget_gb)"))
        if switches:
            print("switches (memory saved):")
            for s, b in switches:
                print(f"  {s:<65} {saving_text(b, human)}")
    return 0
