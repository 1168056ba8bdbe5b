"""`compare CONFIG.yaml --methods lora,ia3,...`: same data, steps and seed per method; a table and a chart."""
from __future__ import annotations

HELP = "Compare methods: compare CONFIG.yaml --methods lora,ia3,prefix_tuning [--budget-of lora] [--runs-dir DIR]."


def add_arguments(p) -> None:
    p.add_argument("config", nargs="?", help="run config YAML (its method section is replaced per method)")
    p.add_argument("--methods", required=True, help="comma-separated method or preset names")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--runs-dir", default="runs", help="folder for the run directories (default: runs)")
    p.add_argument("--name", default="compare", help="prefix of the run names and of the table folder")
    p.add_argument("--budget-of", default=None, metavar="METHOD",
                   help="match every method's trainable-parameter count to this method's (size knob search)")


def run(args) -> int:
    import sys

    from ..compare import compare
    from ..config import load_config
    cfg = load_config(args.config, args.set)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    def show(method: str, event: dict) -> None:
        if event.get("type") == "done":
            print(f"{method}: done", file=sys.stderr)

    out = compare(cfg, methods, args.runs_dir, args.name, args.budget_of, on_event=show)
    print((out / "comparison.md").read_text())
    print(out)
    return 0
