"""`methods`: list every method and preset with category, mergeability and defaults."""
from __future__ import annotations

import json

HELP = "List every PEFT method and preset (name, category, mergeable, config fields with defaults)."


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="one JSON array instead of a table")


def run(args) -> int:
    from ..methods import list_methods
    rows = list_methods()
    if args.json:
        print(json.dumps(rows, default=str, indent=1))
        return 0
    print(f"{'name':<18}{'base':<16}{'category':<17}{'merge':<7}summary")
    for r in rows:
        print(f"{r['name']:<18}{r['base']:<16}{r['category']:<17}{'yes' if r['mergeable'] else 'no':<7}{r['summary']}")
        preset = ", ".join(f"{k}={v}" for k, v in r["preset_fields"].items())
        if preset:
            print(f"{'':<18}preset: {preset}")
    return 0
