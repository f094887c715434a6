"""Command line of the kernel backend.

    python -m backends.kernel run FILE.{c,o} [--loader libbpf|raw] [--libbpf PATH] [--run PROG@CPU[:COUNT] ...]
                                             [--clang PATH]
    python -m backends.kernel run-set A.{c,o} B.{c,o} ... [--loader libbpf|raw] [--libbpf PATH] [--clang PATH]
                                             [--reuse K:KEY=SRC ...] [--attach K:EXT=PROG:FUNC ...]
                                             [--run PROG@CPU[:COUNT] ...]
    python -m backends.kernel probe [--loader libbpf|raw] [--libbpf PATH]

`run` prints the Observation JSON, `run-set` the object set's document (docs/object-sets.md), `probe` the
environment. Every failure is one line on stderr and an exit code:
2 bad input or corrupt object, 3 toolchain, 4 backend unavailable (not root, bpf() refused, libbpf missing).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from schema.objectset import SetPlan, parse_attach, parse_reuse

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_TOOLCHAIN, EXIT_UNAVAILABLE = 0, 1, 2, 3, 4

_RUN = re.compile(r"^([A-Za-z_]\w*)@(\d+)(?::(\d+))?$")


class Failure(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    # argparse's own errors print the usage too; one line is the contract
    def error(self, message: str) -> NoReturn:
        raise Failure(EXIT_INPUT, message)


MAX_RUN_COUNT = 100_000  # test runs of one --run: each is a syscall and a result slot, so more is a typo


def parse_run(text: str) -> tuple[str, int, int]:
    m = _RUN.match(text)
    if m is None or (m.group(3) is not None and not 1 <= int(m.group(3)) <= MAX_RUN_COUNT):
        raise argparse.ArgumentTypeError(f"bad run {text!r} (want PROG@CPU[:COUNT], 1 <= COUNT <= {MAX_RUN_COUNT})")
    return m.group(1), int(m.group(2)), int(m.group(3) or 1)


def check_runs(runs: Sequence[tuple[str, int, int]], programs: set[str], online: Sequence[int], where: str) -> None:
    """A run of a program the object lacks, or on a CPU that is not online, is bad input: never a silent error
    entry in the observation."""
    for prog, cpu, _ in runs:
        if prog not in programs:
            raise Failure(EXIT_INPUT, f"--run {prog}@{cpu}: no program {prog!r} in {where} "
                                      f"(programs: {', '.join(sorted(programs)) or 'none'})")
        if cpu not in online:
            raise Failure(EXIT_INPUT, f"--run {prog}@{cpu}: CPU {cpu} is not online "
                                      f"(online: {', '.join(map(str, online))})")


def _plan_arg(parse: Callable[[str], tuple]) -> Callable[[str], tuple]:
    """An argparse type from a schema.objectset parser (whose ValueError names the expected form)."""
    def convert(text: str) -> tuple:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m backends.kernel", description="observe BPF objects on the running kernel")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="load an object (or a C file, compiled first), run it, print the Observation")
    run.add_argument("file", help="BPF object (.o) or C source (.c)")
    run.add_argument("--loader", choices=("libbpf", "raw"), default="libbpf")
    run.add_argument("--libbpf", metavar="PATH", default=None, help="libbpf.so to use (default: the system's)")
    run.add_argument("--run", dest="runs", metavar="PROG@CPU[:COUNT]", type=parse_run, action="append",
                     default=[], help="BPF_PROG_TEST_RUN PROG COUNT times on CPU; repeatable, in order")
    run.add_argument("--clang", metavar="PATH", default=None, help="clang for .c input (default: clang-19 or newer)")
    run_set = sub.add_parser("run-set", help="load several objects into one kernel (map reuse, freplace), run "
                                             "them, print the object set's document")
    run_set.add_argument("files", nargs="+", help="BPF objects (.o) or C sources (.c), loaded in this order")
    run_set.add_argument("--loader", choices=("libbpf", "raw"), default="libbpf")
    run_set.add_argument("--libbpf", metavar="PATH", default=None, help="libbpf.so to use (default: the system's)")
    run_set.add_argument("--reuse", metavar="K:KEY=SRC", type=_plan_arg(parse_reuse), action="append", default=[],
                         help="object K's map KEY (an internal map's section or a map's name) reuses object SRC's")
    run_set.add_argument("--attach", metavar="K:EXT=PROG:FUNC", type=_plan_arg(parse_attach), action="append",
                         default=[], help="object K's extension EXT replaces FUNC in program PROG")
    run_set.add_argument("--run", dest="runs", metavar="PROG@CPU[:COUNT]", type=parse_run, action="append",
                         default=[], help="BPF_PROG_TEST_RUN PROG COUNT times on CPU; repeatable, in order")
    run_set.add_argument("--clang", metavar="PATH", default=None,
                         help="clang for .c input (default: clang-19 or newer)")
    probe = sub.add_parser("probe", help="print the probed environment")
    probe.add_argument("--loader", choices=("libbpf", "raw"), default="libbpf")
    probe.add_argument("--libbpf", metavar="PATH", default=None)
    return parser


def _compile(path: Path, clang_path: str | None) -> tuple[Path, str]:
    from toolchain.clang import Clang, CompileError, ToolchainError, compile_c

    try:
        source = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise Failure(EXIT_INPUT, f"{path}: cannot read: {e}") from None
    try:
        clang = Clang.find(clang_path)
        return compile_c(clang, source, name=path.name.split(".")[0] or "prog"), clang.version
    except ToolchainError as e:
        raise Failure(EXIT_TOOLCHAIN, f"toolchain: {e}") from None
    except CompileError as e:
        # a source clang refuses is bad input; a crash or a timeout is the toolchain's fault
        code = EXIT_INPUT if "failed" in str(e) else EXIT_TOOLCHAIN
        raise Failure(code, f"{path}: {e}") from None
    except FileNotFoundError:
        # clang deletes its output when it fails, and compile_c's cleanup then trips over the missing file
        raise Failure(EXIT_INPUT, f"{path}: clang failed (run clang on it for the diagnostics)") from None


def _libbpf(path: str | None):  # noqa: ANN202 - Libbpf, imported lazily
    from backends.kernel.observe import open_libbpf

    return open_libbpf(path)


def cmd_run(args: argparse.Namespace) -> dict:
    from backends.kernel.observe import observe_libbpf, observe_raw
    from toolchain.elf import ObjectError, read_object

    path = Path(args.file)
    if not path.is_file():
        raise Failure(EXIT_INPUT, f"{path}: no such file")
    obj, clang_version = _compile(path, args.clang) if path.suffix == ".c" else (path, None)
    from backends.kernel import probes
    from backends.kernel.observe import program_names

    try:
        check_runs(args.runs, set(program_names(read_object(obj))), probes.online_cpus(), str(obj))
        if args.loader == "raw":
            doc = observe_raw(obj, runs=args.runs)
        else:
            doc = observe_libbpf(obj, libbpf=_libbpf(args.libbpf), runs=args.runs)
    except ObjectError as e:
        raise Failure(EXIT_INPUT, str(e)) from None
    doc["env"]["clang"] = clang_version
    return doc


def cmd_run_set(args: argparse.Namespace) -> dict:
    from backends.kernel.objectset import observe_set_libbpf, observe_set_raw
    from toolchain.elf import ObjectError, read_object

    objects, clang_version = [], None
    for name in args.files:
        path = Path(name)
        if not path.is_file():
            raise Failure(EXIT_INPUT, f"{path}: no such file")
        if path.suffix == ".c":
            path, clang_version = _compile(path, args.clang)
        objects.append(path)
    try:
        plan = SetPlan(tuple(objects), tuple(args.reuse), tuple(args.attach), tuple(args.runs))
        from backends.kernel import probes
        from backends.kernel.observe import program_names

        names = {n for obj in objects for n in program_names(read_object(obj))}
        check_runs(args.runs, names, probes.online_cpus(), " + ".join(map(str, objects)))
        if args.loader == "raw":
            doc = observe_set_raw(plan)
        else:
            doc = observe_set_libbpf(plan, libbpf=_libbpf(args.libbpf))
    except (ObjectError, ValueError) as e:
        # a corrupt object, or a plan naming an object, program or map that is not there
        raise Failure(EXIT_INPUT, str(e)) from None
    doc["env"]["clang"] = clang_version
    return doc


def cmd_probe(args: argparse.Namespace) -> dict:
    from backends.kernel.observe import (
        BackendUnavailable,
        environment,
        kernel_features,
        libbpf_profile_name,
        raw_profile_name,
    )

    features = kernel_features()
    if args.loader == "raw":
        return environment(None, raw_profile_name(features))
    try:
        lib = _libbpf(args.libbpf)
    except BackendUnavailable:
        if args.libbpf:
            raise
        return environment(None, raw_profile_name(features))
    return environment(lib, libbpf_profile_name(lib, features))


_COMMANDS: dict[str, Callable[[argparse.Namespace], dict]] = {"run": cmd_run, "run-set": cmd_run_set,
                                                              "probe": cmd_probe}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from backends.kernel.observe import BackendUnavailable

        args = build_parser().parse_args(argv)
        try:
            doc = _COMMANDS[args.command](args)
        except BackendUnavailable as e:
            raise Failure(EXIT_UNAVAILABLE, f"kernel backend unavailable: {e}") from None
        print(json.dumps(doc, indent=1))
        return EXIT_OK
    except Failure as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the contract is one line, never a traceback
        text = " ".join(str(e).split())
        print(f"internal error: {type(e).__name__}: {text}", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
