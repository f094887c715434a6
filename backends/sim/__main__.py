"""`python -m backends.sim run FILE.{c,o}`: print the simulator's Observation of one object as JSON.

Bad input (a missing or corrupt file, no usable clang, an unknown profile, a malformed --run or CPU list)
ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from backends.sim.observe import SIM_PROFILES, observe
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
    return compile_c(clang, source, name=name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backends.sim",
                                     description="Observe a BPF object on the percpu-conformance simulator.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="load FILE (.c is compiled first), run programs, print the Observation")
    run.add_argument("file", type=Path)
    run.add_argument("--profile", default="merged", help=f"one of: {', '.join(SIM_PROFILES)}")
    run.add_argument("--possible-cpus", type=int, default=4)
    run.add_argument("--online-cpus", help="cpulist, e.g. 0-3 or 0,2 (default: every possible CPU)")
    run.add_argument("--run", action="append", default=[], metavar="PROG@CPU[:COUNT]")
    run.add_argument("--clang", help="clang binary for .c input")
    args = parser.parse_args(argv)
    try:
        if args.profile not in SIM_PROFILES:
            raise UsageError(f"unknown profile {args.profile!r} (known: {', '.join(SIM_PROFILES)})")
        if args.possible_cpus < 1:
            raise UsageError(f"--possible-cpus must be at least 1, not {args.possible_cpus}")
        online = (parse_cpulist(args.online_cpus) if args.online_cpus is not None
                  else list(range(args.possible_cpus)))
        outside = [c for c in online if c >= args.possible_cpus]
        if outside:
            raise UsageError(f"online CPU {outside[0]} is not possible (--possible-cpus {args.possible_cpus})")
        runs = [parse_run(r) for r in args.run]
        obj = _object_path(args.file, args.clang)
        result = observe(obj, profile=args.profile, possible_cpus=args.possible_cpus, online_cpus=online,
                         runs=runs)
    except (UsageError, ObjectError, ToolchainError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CompileError as e:
        print(f"error: {args.file}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
