"""Each UAPI number has one owner, toolchain/uapi.py: no other module of the suite assigns one."""

from __future__ import annotations

import ast
from pathlib import Path

from toolchain import uapi

ROOT = Path(__file__).resolve().parent.parent
NAMES = {n for n in vars(uapi) if n.startswith("BPF_")}


def test_no_module_defines_a_uapi_number_of_its_own():
    owners = []
    for path in ROOT.glob("[a-z]*/**/*.py"):
        if path.parts[len(ROOT.parts)] in (".tox", ".venv", "tests") or path.name == "uapi.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    for name in ast.walk(target):
                        if isinstance(name, ast.Name) and name.id in NAMES:
                            owners.append(f"{path.relative_to(ROOT)}:{node.lineno} {name.id}")
    assert owners == []
