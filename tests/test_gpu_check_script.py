"""baselines/gpu_check.sh runs where device time is scarce (one call of about ten minutes a session, when a GPU is
lent at all): every command line in it must parse here, so a renamed flag or method cannot waste that call."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = (ROOT / "baselines" / "gpu_check.sh").read_text()


def _commands() -> list[list[str]]:
    """Each `python3 -m <module> args...` of the script, continuation lines joined, up to its redirections."""
    text = re.sub(r"\\\n\s*", " ", SCRIPT)
    text = re.sub(r"\$\((?:[^()]|\([^()]*\))*\)", "", text)  # $( ... ): the optional flags a shell adds
    found = []
    for m in re.finditer(r"python3 -m ([\w.]+)([^|;\n]*)", text):
        args = shlex.split(m.group(2).split("2>")[0].split(">")[0])
        found.append([m.group(1)] + args)
    return found


COMMANDS = _commands()


def test_the_script_runs_the_stages_it_names():
    modules = {c[0] for c in COMMANDS}
    assert {"studio", "pytest", "baselines.graphs_check", "baselines.bf16_curves"} <= modules
    assert sum(c[:2] == ["studio", "bench"] for c in COMMANDS) >= 8


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c[0] == "studio"], ids=lambda c: " ".join(c[1:4]))
def test_studio_command_lines_parse(cmd):
    from studio.__main__ import build_parser
    args = build_parser().parse_args(cmd[1:])
    if getattr(args, "only", None):
        from studio.models import model_presets
        assert {name.split(":")[0] for name in args.only.split(",")} <= set(model_presets())
    if isinstance(getattr(args, "methods", None), str) and args.methods != "all":
        from studio.methods import presets, registry
        assert set(args.methods.split(",")) <= set(registry()) | set(presets())


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c[0].startswith("baselines.")], ids=lambda c: " ".join(c))
def test_baseline_command_lines_use_flags_their_scripts_have(cmd):
    source = (ROOT / (cmd[0].replace(".", "/") + ".py")).read_text()
    for flag in (a for a in cmd[1:] if a.startswith("--")):
        assert f'"{flag}"' in source, f"{cmd[0]} has no {flag}"
    if "--methods" in cmd and cmd[0] == "baselines.graphs_check":
        from studio.methods import presets, registry
        names = set(cmd[cmd.index("--methods") + 1].split(","))
        assert names <= set(registry()) | set(presets()), names - set(registry()) - set(presets())
    if "--models" in cmd:
        from studio.models import model_presets
        assert set(cmd[cmd.index("--models") + 1].split(",")) <= set(model_presets())


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c[0] == "pytest"], ids=lambda c: " ".join(c[-2:]))
def test_the_test_files_it_runs_exist(cmd):
    files = [a for a in cmd[1:] if a.endswith(".py")]
    assert files and all((ROOT / f).is_file() for f in files)
