"""Command line of the stack provisioner.

    python -m backends.stack paths [--stack NAME] [--kernel-image P] [--modules D] [--libbpf P] [--bpftool P]
                                   [--no-provision] [--pins FILE]
    python -m backends.stack upstream [--stack NAME] [--no-run]

`paths` provisions the stack when needed (progress on stderr, one line per step) and prints its paths as JSON.
Every failure is one line on stderr and an exit code: 2 bad input (unknown stack, bad override path), 4 not
provisioned (--no-provision), 6 download failed or no network, 7 a pinned package or version is not in the
archive, 8 an unpack or build failed.

`upstream` builds (once, cached) upstream's own percpu selftests from the stack's source, a vmlinux.h, the
unmodified BPF programs and a test_progs with only global_percpu_data and verifier_percpu_addr, runs both here
unless --no-run, and prints the build, its times, the verdicts and the guest's command lines as JSON
(backends/stack/upstream.py). Its own exit codes: 9 extracting vmlinux or dumping its BTF failed, 10 the BPF
programs or skeletons, 11 test_progs did not build, 12 test_progs did not run; 4 when the stack is not provisioned.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from backends.stack.provision import DEFAULT_STACK, StackUnavailable, stack_paths


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise StackUnavailable("usage", message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m backends.stack", description="provision the real kernel + libbpf + bpftool")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    paths = sub.add_parser("paths", help="provision when needed, then print the stack's paths as JSON")
    paths.add_argument("--stack", default=DEFAULT_STACK, help=f"stack name in the pins (default {DEFAULT_STACK})")
    paths.add_argument("--kernel-image", type=Path, help="use this kernel image instead of the stack's")
    paths.add_argument("--modules", type=Path, help="use this module tree (holds lib/modules/RELEASE)")
    paths.add_argument("--libbpf", type=Path, help="use this libbpf.so instead of the stack's")
    paths.add_argument("--bpftool", type=Path, help="use this bpftool instead of the stack's")
    paths.add_argument("--no-provision", action="store_true", help="fail (exit 4) instead of downloading/building")
    paths.add_argument("--pins", type=Path, help="pins file (default backends/stack/stacks.toml)")
    upstream = sub.add_parser("upstream", help="build upstream's percpu selftests and test_progs, run them here")
    upstream.add_argument("--stack", default=DEFAULT_STACK, help=f"stack name in the pins (default {DEFAULT_STACK})")
    upstream.add_argument("--no-run", action="store_true", help="only build (the guest runs it)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "upstream":
            from backends.stack.upstream import upstream_report  # only this command needs the build's imports

            print(json.dumps(upstream_report(args.stack, run=not args.no_run), indent=2))
            return 0
        found = stack_paths(args.stack, kernel_image=args.kernel_image, modules=args.modules, libbpf=args.libbpf,
                            bpftool=args.bpftool, provision=not args.no_provision, pins_file=args.pins)
    except StackUnavailable as e:
        print(f"backends.stack: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("backends.stack: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(found.as_json(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
