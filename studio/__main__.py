"""`python -m studio <command>`: train, estimate, chat, export, methods, bench, compare.

Each command lives in studio/commands/<name>.py with `HELP`, `add_arguments(parser)` and
`run(args) -> int`. A StudioError ends the command with one clear line and exit code 1.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import commands
from .errors import StudioError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m studio", description="PEFT Studio command line.")
    sub = parser.add_subparsers(dest="command", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        p = sub.add_parser(info.name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except StudioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; what was saved stays in the run directory.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
