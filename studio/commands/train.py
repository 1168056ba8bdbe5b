"""`train CONFIG.yaml`: fine-tune in the foreground with a progress bar; prints the run directory last."""
from __future__ import annotations

HELP = "Fine-tune: train CONFIG.yaml [--set section.key=value ...] [--runs-dir DIR] [--run-name NAME]."


def add_arguments(p) -> None:
    p.add_argument("config", nargs="?", help="run config YAML (defaults when omitted)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (YAML syntax, e.g. method.target_modules=[q_proj,v_proj])")
    p.add_argument("--runs-dir", default="runs", help="folder that holds run directories (default: runs)")
    p.add_argument("--run-name", default=None, help="name of the run directory (default: method + time)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    import sys

    from tqdm import tqdm

    from ..config import load_config
    from ..rundir import RunDir
    from ..runner import execute

    if args.resume:
        run_dir = RunDir(args.resume)
        cfg = run_dir.config()
    else:
        cfg = load_config(args.config, args.set)
        from ..trainer import process_state
        run_dir = _shared_run_dir(process_state(cfg), args.runs_dir, cfg, args.run_name)
    bar = None

    def show(event: dict) -> None:
        nonlocal bar
        if args.quiet:
            return
        if event["type"] == "start":
            bar = tqdm(total=event["total_steps"], initial=event["start_step"], desc="train", unit="step",
                       file=sys.stderr, dynamic_ncols=True)
        elif event["type"] == "step" and bar is not None:
            post = {"loss": f"{event['loss']:.4f}", "lr": f"{event['lr']:.2e}"}
            if event.get("eval_loss") is not None:
                post["eval"] = f"{event['eval_loss']:.4f}"
            bar.set_postfix(post)
            bar.update(1)
        elif event["type"] in ("status", "checkpoint", "stopped"):
            print(event.get("message") or f"{event['type']} at step {event['step']}", file=sys.stderr)

    try:
        execute(run_dir, cfg, resume=bool(args.resume), on_event=show)
    finally:
        if bar is not None:
            bar.close()
        _end_process_group()
    print(run_dir.path)
    return 0


def _end_process_group() -> None:
    """Data-parallel runs (torchrun / accelerate launch) end their process group here: left to the
    interpreter's exit, gloo's threads can be torn down mid-flight and abort the process."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _shared_run_dir(state, runs_dir: str, cfg, name: str | None):
    """The main process creates the run directory; other processes (accelerate launch) use the same one."""
    from pathlib import Path

    from ..rundir import RunDir
    if state.num_processes == 1:
        return RunDir.create(runs_dir, cfg, name)
    from accelerate.utils import broadcast_object_list
    holder = [str(RunDir.create(runs_dir, cfg, name).path) if state.is_main_process else None]
    broadcast_object_list(holder)
    return RunDir(Path(holder[0]))
