"""`export`: copy a run's adapter (peft format, + zip) or merge it into the base as a full model."""
from __future__ import annotations

HELP = "Export a run: export --run RUN_DIR --out DIR [--merge] (merged = plain transformers model folder)."


def add_arguments(p) -> None:
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--checkpoint", help="a checkpoints/step-N folder instead of the final adapter")
    p.add_argument("--merge", action="store_true", help="merge into the base weights and save a full model")


def run(args) -> int:
    from ..export import export_run
    out = export_run(args.run, args.out, merge=args.merge, checkpoint=args.checkpoint)
    print(out)
    return 0
