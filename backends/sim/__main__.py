"""`python -m backends.sim run FILE.{c,o}`: print the simulator's Observation of one object as JSON.
`python -m backends.sim run-set A B ...`: the same for an object set (docs/object-sets.md), as one document.

Bad input (a missing or corrupt file, no usable clang, an unknown profile, a malformed --run, --reuse,
--attach or CPU list) ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from backends.sim.observe import FAULT_ROWS, observe, observe_set, sim_rows
from schema import profiles as registry
from schema.objectset import SetPlan, parse_attach, parse_reuse
from toolchain.clang import Clang, CompileError, ToolchainError, compile_c
from toolchain.elf import ObjectError

_RUN = re.compile(r"(?P<prog>[A-Za-z_][A-Za-z0-9_]*)@(?P<cpu>\d+)(?::(?P<count>\d+))?")


class UsageError(Exception):
    """A one-line reason the command line cannot be carried out."""


def parse_cpulist(text: str) -> list[int]:
    """The kernel's cpulist format: `0-3`, `0,2`, `0-1,4`."""
    cpus: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise UsageError(f"bad CPU list {text!r} (expected e.g. 0-3 or 0,2)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise UsageError(f"bad CPU range {part.strip()!r} in {text!r}")
        cpus.update(range(lo, hi + 1))
    return sorted(cpus)


def parse_run(text: str) -> tuple[str, int, int]:
    m = _RUN.fullmatch(text)
    if not m:
        raise UsageError(f"bad --run {text!r} (expected PROG@CPU or PROG@CPU:COUNT)")
    count = int(m.group("count") or 1)
    if count < 1:
        raise UsageError(f"bad --run {text!r}: COUNT must be at least 1")
    return m.group("prog"), int(m.group("cpu")), count


def _object_path(path: Path, clang_path: str | None) -> Path:
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    if path.suffix != ".c":
        return path
    clang = Clang.find(clang_path)
    name = path.name.removesuffix(".c").removesuffix(".bpf")
    try:
        source = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read: {e}") from None
    try:
        return compile_c(clang, source, name=name)
    except CompileError as e:  # name the file: with several objects the message alone does not say which
        raise UsageError(f"{path}: {e}") from None


def _add_common(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--profile", default="merged", help=f"one of: {', '.join([*registry.PROFILES, *FAULT_ROWS])}, "
                     f"optionally with {', '.join('+' + m for m in registry.MODIFIERS)}")
    cmd.add_argument("--possible-cpus", type=int, default=4)
    cmd.add_argument("--online-cpus", help="cpulist, e.g. 0-3 or 0,2 (default: every possible CPU)")
    cmd.add_argument("--run", action="append", default=[], metavar="PROG@CPU[:COUNT]")
    cmd.add_argument("--clang", help="clang binary for .c input")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m backends.sim",
                                     description="Observe a BPF object on the percpu-conformance simulator.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="load FILE (.c is compiled first), run programs, print the Observation")
    run.add_argument("file", type=Path)
    _add_common(run)
    run_set = sub.add_parser("run-set", help="load FILEs in order into one kernel (.c compiled first), attach "
                                             "extensions, run programs, print the object-set document")
    run_set.add_argument("files", type=Path, nargs="+")
    run_set.add_argument("--reuse", action="append", default=[], metavar="K:KEY=SRC",
                         help="object K's map KEY (a section or a .maps name) reuses object SRC's")
    run_set.add_argument("--attach", action="append", default=[], metavar="K:EXT=PROG:FUNC",
                         help="object K's extension EXT replaces FUNC in program PROG")
    _add_common(run_set)
    return parser


def _online(args: argparse.Namespace) -> list[int]:
    try:
        sim_rows(args.profile)
    except registry.UnknownProfile as e:
        raise UsageError(str(e)) from None
    if args.possible_cpus < 1:
        raise UsageError(f"--possible-cpus must be at least 1, not {args.possible_cpus}")
    online = (parse_cpulist(args.online_cpus) if args.online_cpus is not None
              else list(range(args.possible_cpus)))
    outside = [c for c in online if c >= args.possible_cpus]
    if outside:
        raise UsageError(f"online CPU {outside[0]} is not possible (--possible-cpus {args.possible_cpus})")
    return online


def _observe(args: argparse.Namespace) -> dict[str, Any]:
    online = _online(args)
    runs = [parse_run(r) for r in args.run]
    if args.command == "run":
        obj = _object_path(args.file, args.clang)
        return observe(obj, profile=args.profile, possible_cpus=args.possible_cpus, online_cpus=online, runs=runs)
    reuse = tuple(parse_reuse(r) for r in args.reuse)
    attach = tuple(parse_attach(a) for a in args.attach)
    objects = tuple(_object_path(f, args.clang) for f in args.files)
    plan = SetPlan(objects, reuse, attach, tuple(runs))
    return observe_set(plan, profile=args.profile, possible_cpus=args.possible_cpus, online_cpus=online)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = _observe(args)
    except (UsageError, ObjectError, ToolchainError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
