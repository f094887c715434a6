"""Command line of the VM backend. Both `run` and `probe` boot the provisioned stack (Linux 7.3.4, libbpf 1.8.0)
unless told otherwise, building whatever of it is missing.

    python -m backends.vm run FILE.{c,o} [--loader libbpf|raw|system] [--run PROG@CPU[:COUNT] ...] [--jit on|off]
                              [--stack NAME | --kernel-image PATH --modules DIR] [--libbpf PATH] [--clang PATH]
    python -m backends.vm probe [--loader libbpf|raw|system] [--jit on|off] [--stack NAME | --kernel-image ...]
    python -m backends.vm smoke [--kernel-image PATH] [--modules DIR] [--vm-cpus N] [--vm-memory M]
                                [--vm-timeout S] [--clang PATH]

`run` prints one observation in the result schema; `probe` the guest's release, libbpf, features, possible and
online CPUs and the profile they select; `smoke` boots an image once and observes a built-in object through both
loaders on every guest CPU. Every failure is one line on stderr and an exit code: 1 an observation that came back
wrong, 2 bad input, 3 toolchain, 4 the VM backend is unavailable here, 5 the guest failed (the end of its console
follows the line).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from backends.vm.runner import VmConfig, VmError, VmSession, VmUnavailable, default_kernel_image

LOADERS = ("libbpf", "raw")
EXIT_OK, EXIT_WRONG, EXIT_INPUT, EXIT_TOOLCHAIN, EXIT_UNAVAILABLE, EXIT_VM = 0, 1, 2, 3, 4, 5

# Returns the CPU it ran on, so each run shows test_run really ran where it was asked to.
SMOKE_SOURCE = """\
#define SEC(n) __attribute__((section(n), used))
typedef unsigned int __u32;
static __u32 (*bpf_get_smp_processor_id)(void) = (void *) 8;
char _license[] SEC("license") = "GPL";

int hits = 7;
__u32 seen;

SEC("raw_tp") int touch(void *ctx)
{
    __u32 cpu = bpf_get_smp_processor_id();
    hits += 1;
    seen |= 1u << cpu;
    return cpu;
}
"""


class Failure(Exception):
    def __init__(self, code: int, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.detail = detail


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise Failure(EXIT_INPUT, message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m backends.vm", description="run the kernel backend inside a booted kernel image")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, text in (("run", "observe an object (or a C file, compiled on the host) in the guest"),
                       ("probe", "print what the guest's probes find")):
        cmd = sub.add_parser(name, help=text)
        if name == "run":
            cmd.add_argument("file", help="BPF object (.o) or C source (.c)")
            cmd.add_argument("--run", dest="runs", metavar="PROG@CPU[:COUNT]", type=_parse_run, action="append",
                             default=[], help="BPF_PROG_TEST_RUN PROG COUNT times on CPU; repeatable, in order")
            cmd.add_argument("--clang", metavar="PATH", default=None, help="clang for .c input")
        cmd.add_argument("--loader", choices=("libbpf", "raw", "system"), default="libbpf",
                         help="the stack's libbpf (default), the raw loader, or this machine's libbpf")
        cmd.add_argument("--jit", choices=("on", "off"), default="on", help="net.core.bpf_jit_enable in the guest")
        cmd.add_argument("--stack", default=None, help="the provisioned stack to boot (default 7.3.4)")
        cmd.add_argument("--kernel-image", default=None, help="boot this bzImage instead of the stack's")
        cmd.add_argument("--modules", default=None, help="the image's modules (a dir holding lib/modules/<rel>)")
        cmd.add_argument("--libbpf", default=None, help="a libbpf.so path, system or stack (default: the stack's)")
        cmd.add_argument("--vm-cpus", type=int, default=2, metavar="N", help="online CPUs (default 2)")
        cmd.add_argument("--vm-maxcpus", type=int, default=3, metavar="N", help="possible CPUs (default 3)")
    smoke = sub.add_parser("smoke", help="boot once and observe a built-in object through both loaders")
    smoke.add_argument("--kernel-image", type=Path, default=None,
                       help="bzImage to boot (default: the newest Debian generic /boot/vmlinuz-*-amd64)")
    smoke.add_argument("--modules", type=Path, default=None,
                       help="INSTALL_MOD_PATH holding the image's lib/modules/<release> (default: found by vng)")
    smoke.add_argument("--vm-cpus", type=int, default=2, metavar="N")
    smoke.add_argument("--vm-memory", default="1G", metavar="M")
    smoke.add_argument("--vm-timeout", type=float, default=300.0, metavar="S")
    smoke.add_argument("--clang", default=None, metavar="PATH", help="clang (default: clang-19 or newer)")
    return parser


def _parse_run(text: str) -> tuple[str, int, int]:
    from backends.kernel.__main__ import parse_run

    return parse_run(text)


def _backend(args: argparse.Namespace) -> Any:  # noqa: ANN401 - suites.vm_backend.VmBackend
    from suites.backends import ConfigError, Unavailable, from_config

    settings = {"loader": args.loader, "jit": args.jit, "cpus": str(args.vm_cpus), "maxcpus": str(args.vm_maxcpus)}
    for key in ("stack", "kernel_image", "modules", "libbpf"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.vm_cpus < 2 or args.vm_maxcpus < args.vm_cpus:
        raise Failure(EXIT_INPUT, "--vm-cpus must be at least 2 and --vm-maxcpus at least --vm-cpus")
    try:
        clang = getattr(args, "clang", None)
        return from_config("vm:" + ",".join(f"{k}={v}" for k, v in settings.items()), {"clang": clang} if clang else {})
    except ConfigError as e:
        raise Failure(EXIT_INPUT, str(e)) from None
    except Unavailable as e:
        raise Failure(EXIT_UNAVAILABLE, f"vm backend unavailable: {e}") from None


def cmd_probe(args: argparse.Namespace) -> int:
    backend = _backend(args)
    print(json.dumps({"profile": backend.profile, "column": backend.name, **backend.env}, indent=1))
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from backends.kernel.__main__ import Failure as KernelFailure
    from backends.kernel.__main__ import _compile as compile_file
    from suites.support import Compiled
    from suites.vm_backend import GuestFailed
    from toolchain.elf import ObjectError, read_object

    path = Path(args.file)
    if not path.is_file():
        raise Failure(EXIT_INPUT, f"{path}: no such file")
    try:
        obj, clang_version = compile_file(path, args.clang) if path.suffix == ".c" else (path, None)
        facts = read_object(obj)
    except KernelFailure as e:
        raise Failure(e.code, str(e)) from None
    except ObjectError as e:
        raise Failure(EXIT_INPUT, str(e)) from None
    from backends.kernel.__main__ import check_runs
    from backends.kernel.observe import program_names

    programs = set(program_names(facts))
    try:  # the program names now; the CPUs once the guest is up
        check_runs(args.runs, programs, range(args.vm_maxcpus), str(obj))
    except KernelFailure as e:
        raise Failure(e.code, str(e)) from None
    backend = _backend(args)
    try:
        check_runs(args.runs, programs, backend.online_cpus, str(obj))
    except KernelFailure as e:
        raise Failure(e.code, str(e)) from None
    try:
        doc = backend.observe(Compiled(None, "", Path(obj), facts), args.runs)  # type: ignore[arg-type]
    except GuestFailed as e:
        raise Failure(EXIT_VM, str(e).split("\n", 1)[0], str(e).partition("--- guest console ---\n")[2]) from None
    except RuntimeError as e:
        raise Failure(EXIT_VM, str(e)) from None
    doc["env"]["clang"] = clang_version
    print(json.dumps(doc, indent=1))
    return EXIT_OK


def _compile(clang_path: str | None) -> tuple[Path, str]:
    from toolchain.clang import Clang, CompileError, ToolchainError, compile_c

    try:
        clang = Clang.find(clang_path)
        return compile_c(clang, SMOKE_SOURCE, name="vm_smoke"), clang.version
    except (ToolchainError, CompileError) as e:
        raise Failure(EXIT_TOOLCHAIN, f"toolchain: {e}") from None


def _describe(doc: dict[str, Any], cpus: int) -> tuple[str, list[str]]:
    """One line for an observation and the problems found in it."""
    loader = doc.get("loader", "?")
    if "error" in doc:
        return f"{loader}: error {doc['error']['type']}: {doc['error']['message']}", []
    problems = []
    env = doc["env"]
    verdicts = ", ".join(f"{p['name']} {p['verdict']}" for p in doc["programs"]) or "no programs"
    runs = " ".join(f"cpu{r['cpu']}->{r['retval']}" for r in doc["runs"])
    for r in doc["runs"]:
        if r["retval"] != [r["cpu"]] * r["count"]:
            problems.append(f"{loader}: run on cpu {r['cpu']} returned {r['retval']} ({r.get('error')})")
    if {r["cpu"] for r in doc["runs"]} != set(range(cpus)):
        problems.append(f"{loader}: runs did not cover cpus 0..{cpus - 1}")
    maps = "; ".join(f"{m['name']} {m['before']}->{m['after']}" for m in doc["maps"] if m["created"])
    line = (f"{loader}: profile {env['profile']}, libbpf {env['libbpf']}, possible {env['possible_cpus']}, "
            f"online {env['online_cpus']}; {verdicts}; runs {runs}; maps {maps}")
    return line, problems


def run_smoke(image: Path | None = None, *, modules: Path | None = None, cpus: int = 2, memory: str = "1G",
              timeout: float = 300.0, clang: str | None = None) -> tuple[VmSession, list[dict[str, Any]]]:
    """Boot once and observe the built-in object through both loaders, one run on each guest CPU."""
    obj, clang_version = _compile(clang)
    session = VmSession(VmConfig(kernel_image=image or default_kernel_image(), modules=modules, cpus=cpus,
                                 memory=memory, timeout=timeout))
    print(f"vm: {session.accel_notice}", flush=True)
    print(f"vm: booting {session.config.kernel_image} ({session.release or 'release unknown'}) with {cpus} vCPUs, "
          f"{memory}", flush=True)
    runs = [["touch", cpu, 1] for cpu in range(cpus)]
    docs = session.run_batch([{"object": str(obj), "loader": loader, "runs": runs, "initial_values": {}}
                              for loader in LOADERS])
    for loader, doc in zip(LOADERS, docs, strict=True):
        doc.setdefault("loader", loader)
        if "error" not in doc:
            doc["env"]["clang"] = clang_version
    return session, docs


def cmd_smoke(args: argparse.Namespace) -> int:
    if args.vm_cpus < 1:
        raise Failure(EXIT_INPUT, f"--vm-cpus {args.vm_cpus}: want >= 1")
    if args.vm_timeout <= 0:
        raise Failure(EXIT_INPUT, f"--vm-timeout {args.vm_timeout:g}: want > 0")
    session, docs = run_smoke(args.kernel_image, modules=args.modules, cpus=args.vm_cpus, memory=args.vm_memory,
                              timeout=args.vm_timeout, clang=args.clang)
    guest = session.guest or {}
    probe = guest.get("probe", {})
    print(f"vm: guest kernel {guest.get('kernel_release')}, features {probe.get('features')}, "
          f"{session.vm_seconds:.1f}s boot+run+shutdown (agent {guest.get('agent_seconds')}s)")
    problems: list[str] = []
    unavailable = 0
    for doc in docs:
        if "error" in doc:
            if doc["error"]["type"] == "BackendUnavailable":
                unavailable += 1
            else:
                problems.append(f"{doc['loader']}: {doc['error']['type']}: {doc['error']['message']}")
        line, found = _describe(doc, args.vm_cpus)
        problems += found
        print(f"  {line}")
    if unavailable == len(docs):
        raise Failure(EXIT_UNAVAILABLE, "vm backend unavailable: no loader could run in the guest")
    if problems:
        raise Failure(EXIT_WRONG, "smoke failed: " + "; ".join(problems))
    print("vm: smoke ok")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        try:
            return {"smoke": cmd_smoke, "run": cmd_run, "probe": cmd_probe}[args.command](args)
        except VmUnavailable as e:
            raise Failure(EXIT_UNAVAILABLE, f"vm backend unavailable: {e}") from None
        except VmError as e:
            raise Failure(EXIT_VM, f"vm failed: {e}", e.console_tail) from None
    except Failure as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        if e.detail:
            print("--- guest console (last lines) ---", file=sys.stderr)
            print(e.detail, file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the contract is one line, never a traceback
        print(f"internal error: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
