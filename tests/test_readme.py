"""The README's commands run as written from the project root, with the exit codes it implies.

Every command the README shows is one of: a synopsis (placeholders, optional parts), one this test runs, or one
named below with the reason it is not run here (a VM boot, provisioning, minutes of work). A new command is
none of these until it is classified, so the README cannot quietly grow a command that fails.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SUITE_BIN = ROOT / ".tox" / "suite" / "bin"

# a command's start -> why it is not run here
NOT_RUN_HERE = {
    "make ": "installs packages, provisions the stack, boots the VM",
    "tox -e vm": "boots a VM",
    "tox -e gate": "builds libbpf and boots the VM",
    "tox -e nightly": "fuzzes for a budget (minutes)",
    "tox -e bench": "benchmarks (minutes)",
    "python -m backends.vm": "boots a VM",
    "pytest suites --backend vm": "boots a VM",
    "python -m suites.gate": "builds libbpf and boots the VM",
    "python3 -m backends.stack": "provisions the stack (a 289 MB download and two builds)",
    "pytest -n 2": "the whole suite on two workers (minutes)",
}

# a command's start -> the exit code the README gives it here (root, this machine's kernel)
RUN_HERE = {
    ".tox/suite/bin/python -m oracle predict": 0,
    ".tox/suite/bin/python -m pytest suites/test_maps.py -k corpus --backend sim": 0,
    "python -m backends.sim run corpus/": 0,
    "python -m backends.kernel probe": 0 if os.geteuid() == 0 else 4,  # 4: backend unavailable
}

_COMMAND_START = re.compile(r"(\.tox/|\.venv/|python3? -m |pytest |make |tox )")
# placeholders and optional parts: a synopsis of a command, not one to run
_SYNOPSIS = re.compile(r"\[|…|\{|\$|\bFILE\b|\bCONFIG\b|\bPATH\b|\bSECONDS\b|\bBUNDLE\b|\bA\.o\b")


def readme_commands() -> list[str]:
    """Each command shown in the README: the lines of shell blocks and `$ ` transcript lines (without their
    comments), and inline code that starts like a command."""
    text = README.read_text()
    commands: list[str] = []
    fence = re.compile(r"^ *```(\w*)\n(.*?)^ *```", re.S | re.M)
    for lang, body in fence.findall(text):
        for line in body.splitlines():
            line = line.strip()
            if lang == "sh" and not line.startswith("#"):
                commands.append(line.split("  #")[0].split(" # ")[0].strip())
            elif line.startswith("$ "):
                commands.append(line[2:].strip())
    for span in re.findall(r"`([^`\n]+)`", fence.sub("", text)):
        if _COMMAND_START.match(span) and " " in span:
            commands.append(span.strip())
    return [c for c in commands if c]


def _kind(command: str) -> str:
    if any(command.startswith(p) for p in RUN_HERE):
        return "run"
    if any(command.startswith(p) for p in NOT_RUN_HERE):
        return "not here"
    return "synopsis" if _SYNOPSIS.search(command) else "unclassified"


def test_every_readme_command_is_run_or_excused():
    commands = readme_commands()
    assert [c for c in commands if _kind(c) == "unclassified"] == []
    ran = {p for p in RUN_HERE if any(c.startswith(p) for c in commands)}
    assert ran == set(RUN_HERE), "a command this test runs is gone from the README"


def _demo_model() -> str:
    """The README's hand-written model (its one JSON block), which the predict command reads as demo.json."""
    blocks = re.findall(r"^```json\n(.*?)^```", README.read_text(), re.S | re.M)
    assert len(blocks) == 1
    return blocks[0]


@pytest.mark.parametrize("command", [c for c in readme_commands() if _kind(c) == "run"])
def test_readme_command_runs_as_written(command, tmp_path):
    expected = next(code for prefix, code in RUN_HERE.items() if command.startswith(prefix))
    argv = shlex.split(command)
    if "demo.json" in argv:  # the file the README asks the reader to save; kept out of the shared tree
        (tmp_path / "demo.json").write_text(_demo_model())
        argv[argv.index("demo.json")] = str(tmp_path / "demo.json")
    # as a reader runs it: from the project root, `python` the suite's environment's, no PYTHONPATH
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PATH=f"{SUITE_BIN}{os.pathsep}{env.get('PATH', '')}", PERCPU_REPORTS=str(tmp_path / "reports"),
               PERCPU_FAILURES=str(tmp_path / "failures"))
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == expected, (command, done.stdout[-1500:], done.stderr[-1500:])
    if argv[-1] != "sim" and expected == 0:  # the CLIs print one JSON document; pytest prints its summary
        assert isinstance(json.loads(done.stdout), dict)
