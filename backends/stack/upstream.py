"""Upstream's own percpu selftests, built from the stack's source tree and run as a reference column.

From `<source>/tools/testing/selftests/bpf`, read at build time and never kept in this repository:
- a vmlinux.h for the stack's kernel: `scripts/extract-vmlinux` on the bzImage, then the stack's
  `bpftool btf dump file vmlinux format c`;
- the unmodified `progs/test_global_percpu_data.c` and `progs/verifier_percpu_addr.c`, compiled with the flags of
  the selftests Makefile (BPF_CFLAGS, CLANG_SYS_INCLUDES, CLANG_BPF_BUILD_RULE), their skeletons made as the
  Makefile makes them (three `gen object` passes, then `gen skeleton`, and `gen skeleton -L` for the lskel);
- a `test_progs` holding only the `global_percpu_data` and `verifier_percpu_addr` tests: upstream's test_progs.c
  and helpers, `prog_tests/global_data_init.c` and `prog_tests/verifier.c` unmodified, a generated tests.h listing
  only those two tests, and stub skeletons for the ~130 other programs verifier.c includes (their tests are not in
  the list, so nothing can run them); linked statically against the stack's libbpf.a, as upstream links it.

The build is one piece under the stack's cache directory (made in a scratch directory, renamed when complete, and
stamped with what it was made from), so a second call only verifies. Standard library only, like provision.py.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from backends.stack.provision import (
    DEFAULT_STACK,
    Log,
    StackPaths,
    StackUnavailable,
    _check,
    _jobs,
    _locked,
    _piece,
    _piece_ready,
    _stderr,
    bpftool_version,
    cache_root,
    load_pins,
    stack_paths,
)
from toolchain.clang import Clang, ToolchainError

__all__ = [
    "REFERENCE_TESTS", "UpstreamBuild", "UpstreamUnavailable", "build_upstream", "guest_command",
    "reference_verdicts", "run_reference",
]

SELFTESTS = Path("tools/testing/selftests/bpf")
BPF_PROGRAMS = ("test_global_percpu_data", "verifier_percpu_addr")  # progs/<name>.c
LIGHT_SKELETONS = ("test_global_percpu_data",)  # also `gen skeleton -L`, as the Makefile's LSKELS_EXTRA
TEST_FILES = ("global_data_init", "verifier")  # prog_tests/<name>.c
REFERENCE_TESTS = ("global_percpu_data", "verifier_percpu_addr")  # the generated tests.h, nothing else
# The runner's own sources (the Makefile's TRUNNER_EXTRA_SOURCES) that these two tests and test_progs.c link to
RUNNER_SOURCES = (
    "test_progs.c", "testing_helpers.c", "trace_helpers.c", "cap_helpers.c", "unpriv_helpers.c", "test_loader.c",
    "disasm.c", "disasm_helpers.c", "io_helpers.c", "json_writer.c", "cgroup_helpers.c", "network_helpers.c",
    "btf_helpers.c",
)
LLVM_CONFIG = "llvm-config-19"  # jit_disasm_helpers.c needs LLVM's disassembler for __jited; without it they skip
LLVM_COMPONENTS = ("mcdisassembler", "all-targets")
BUILD_FORMAT = 1

# Exit codes beyond provision.py's (2, 4, 6, 7, 8), one per failing step of this build
EXIT_VMLINUX, EXIT_BPF, EXIT_RUNNER, EXIT_RUN = 9, 10, 11, 12
UPSTREAM_STEP_EXIT = {"extract-vmlinux": EXIT_VMLINUX, "btf-dump": EXIT_VMLINUX, "build-bpf": EXIT_BPF,
                      "build-test_progs": EXIT_RUNNER, "run": EXIT_RUN}

# bzImage payload magics as scripts/extract-vmlinux tries them, with the tool each needs and its Debian package
DECOMPRESSORS = (
    (b"\x1f\x8b\x08", "gunzip", "gzip"), (b"\xfd7zXZ\x00", "unxz", "xz-utils"), (b"BZh", "bunzip2", "bzip2"),
    (b"\x5d\x00\x00\x00", "unlzma", "xz-utils"), (b"\x89LZO", "lzop", "lzop"), (b"\x02\x21\x4c\x18", "lz4", "lz4"),
    (b"\x28\xb5\x2f\xfd", "unzstd", "zstd"),
)

_VERDICT_LINE = re.compile(r"^#(\d+)(?:/(\d+))?\s+(.+?):(OK|SKIP|FAIL)\b.*$", re.M)
_SKEL_INCLUDE = re.compile(r'^#include "(\w+)\.skel\.h"', re.M)


class UpstreamUnavailable(StackUnavailable):
    """A step of the upstream build failed; its exit code says which (vmlinux, BPF programs, test_progs)."""

    @property
    def exit_code(self) -> int:
        return UPSTREAM_STEP_EXIT.get(self.step, super().exit_code)


@dataclass(frozen=True)
class UpstreamBuild:
    directory: Path        # holds test_progs; also its working directory (the guest sees it read-only)
    vmlinux_h: Path
    objects: tuple[Path, ...]
    test_progs: Path
    jit_disassembly: bool  # built with LLVM: the __jited checks of verifier_percpu_addr run instead of skipping
    seconds: float         # of the build that made it (cold)

    def as_json(self) -> dict[str, object]:
        return {"directory": str(self.directory), "vmlinux_h": str(self.vmlinux_h),
                "objects": [str(p) for p in self.objects], "test_progs": str(self.test_progs),
                "jit_disassembly": self.jit_disassembly, "build_seconds": self.seconds}


# -- test_progs output --------------------------------------------------------------------------------------------


def reference_verdicts(output: str) -> dict[str, str]:
    """Each test's and subtest's verdict in test_progs output: "name" or "name/subtest" -> OK, SKIP or FAIL.

    "OK (SKIP: 1/5)" counts as OK and "SKIP (not built)" as SKIP; the summary test_progs repeats after
    "All error logs:" says the same again."""
    return {m.group(3): m.group(4) for m in _VERDICT_LINE.finditer(output)}


# -- the build ---------------------------------------------------------------------------------------------------


def _sys_includes(clang: str) -> list[str]:
    """CLANG_SYS_INCLUDES: clang's own search list as -idirafter, so the host's asm/ headers are found."""
    done = subprocess.run([clang, "-v", "-E", "-"], input="", capture_output=True, text=True, timeout=60)
    lines = done.stderr.splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.startswith("#include <...> search starts here:"))
    except StopIteration:
        return []
    dirs = [ln.strip() for ln in lines[start + 1:] if ln.startswith(" /")]
    return [arg for d in dirs for arg in ("-idirafter", d)]


def bpf_cflags(paths: StackPaths, vmlinux_dir: Path, clang: str) -> list[str]:
    """The selftests Makefile's flags for test_progs' BPF objects. -fms-extensions is needed, not only upstream's
    habit: bpftool 7.8's vmlinux.h embeds structs as `struct NAME;` members, which without it clang drops (a
    warning, and a wrong layout)."""
    selftests = paths.source / SELFTESTS
    tools = paths.source / "tools"
    return [
        "-g", "-Wall", "-Werror", "-D__TARGET_ARCH_x86", "-mlittle-endian",
        f"-I{paths.include}", f"-I{selftests}", f"-I{tools / 'include' / 'uapi'}", f"-I{tools / 'include'}",
        f"-I{selftests / 'libarena' / 'include'}", f"-I{vmlinux_dir}",
        "-std=gnu11", "-fno-strict-aliasing", "-Wno-microsoft-anon-tag", "-fms-extensions",
        "-Wno-compare-distinct-pointer-types", "-Wno-initializer-overrides",
        *_sys_includes(clang), "-DENABLE_ATOMICS_TESTS",
        "-O2", "--target=bpfel", "-mcpu=v3",  # CLANG_BPF_BUILD_RULE
    ]


def host_cflags(paths: StackPaths, build: Path) -> list[str]:
    """COMMON_CFLAGS (OPT_FLAGS -O0) and lib.mk's -D_GNU_SOURCE=; the build directory comes first so its tests.h
    and skeletons are the ones found."""
    selftests = paths.source / SELFTESTS
    tools = paths.source / "tools"
    return [
        "-g", "-O0", "-rdynamic", "-std=gnu11", "-Wall", "-Werror", "-fno-omit-frame-pointer",
        "-Wno-unused-but-set-variable", "-D_GNU_SOURCE=",
        f"-I{build}", f"-I{selftests}", f"-I{paths.include}", f"-I{tools / 'lib'}", f"-I{tools / 'include'}",
        f"-I{tools / 'arch' / 'x86' / 'include'}", f"-I{tools / 'include' / 'uapi'}",
        f"-I{selftests / 'libarena' / 'include'}", f"-I{paths.source / 'tools' / 'testing' / 'selftests'}",
    ]


def _llvm_flags() -> tuple[list[str], list[str]] | None:
    """(cflags, link flags) for jit_disasm_helpers.c, or None without LLVM's development files."""
    if shutil.which(LLVM_CONFIG) is None:
        return None
    try:
        def ask(*args: str) -> list[str]:
            done = subprocess.run([LLVM_CONFIG, *args], capture_output=True, text=True, timeout=60, check=True)
            return done.stdout.split()
        # both llvm-config and lib.mk define _GNU_SOURCE (the Makefile filters llvm's out too)
        cflags = [f for f in ask("--cflags") if not f.startswith("-D_GNU_SOURCE")] + ["-DHAVE_LLVM_SUPPORT"]
        libs = ask("--link-shared", "--libs", *LLVM_COMPONENTS) + ask("--ldflags")
    except (OSError, subprocess.SubprocessError):
        return None
    return cflags, libs


def extract_vmlinux(paths: StackPaths, into: Path) -> Path:
    """The ELF vmlinux out of the stack's bzImage, by the source's own scripts/extract-vmlinux."""
    step = "extract-vmlinux"
    script = paths.source / "scripts" / "extract-vmlinux"
    if not script.is_file():
        raise UpstreamUnavailable(step, f"no {script}; the source tree lacks scripts/ (re-provision: make stack)")
    if shutil.which("readelf") is None:
        raise UpstreamUnavailable(step, "extract-vmlinux needs readelf; run: apt-get install binutils")
    image = paths.kernel_image.read_bytes()
    needed = [(tool, pkg) for magic, tool, pkg in DECOMPRESSORS if magic in image]
    vmlinux = into / "vmlinux"
    with open(vmlinux, "wb") as out:
        done = subprocess.run(["bash", str(script), str(paths.kernel_image)], stdout=out, stderr=subprocess.PIPE,
                              text=True, timeout=600)
    if done.returncode != 0 or vmlinux.stat().st_size == 0:
        missing = sorted({pkg for tool, pkg in needed if shutil.which(tool) is None})
        why = (done.stderr.strip().splitlines() or ["no output"])[-1]
        hint = (f"the image's decompressor is not installed; run: apt-get install {' '.join(missing)}" if missing
                else "no known compression in the image")
        raise UpstreamUnavailable(step, f"{paths.kernel_image.name}: {why} ({hint})")
    return vmlinux


def make_vmlinux_h(paths: StackPaths, into: Path) -> Path:
    vmlinux = extract_vmlinux(paths, into)
    header = into / "vmlinux.h"
    with open(header, "w") as out:
        done = subprocess.run([str(paths.bpftool), "btf", "dump", "file", str(vmlinux), "format", "c"], stdout=out,
                              stderr=subprocess.PIPE, text=True, timeout=600)
    vmlinux.unlink()  # 64 MB, and only its BTF is wanted
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UpstreamUnavailable("btf-dump", f"bpftool btf dump of the extracted vmlinux failed: {why}")
    return header


def _run_all(commands: Sequence[list[str]], step: str, what: str, logs: Path, cwd: Path) -> None:
    """Compiles (`... -o OUT`) in parallel (the stack's job count), each logged to logs/OUT.log; the first
    failure is the step's error."""
    def one(argv: list[str]) -> None:
        out = Path(argv[-1]).name
        log_file = logs / f"{out}.log"
        log_file.write_text("")
        _check(argv, step, f"{what} -o {out}", log_file, cwd=cwd)
    with concurrent.futures.ThreadPoolExecutor(_jobs()) as pool:
        for future in [pool.submit(one, argv) for argv in commands]:
            future.result()


def _step_error(e: StackUnavailable, step: str) -> UpstreamUnavailable:
    return e if isinstance(e, UpstreamUnavailable) else UpstreamUnavailable(step, str(e).split(": ", 1)[-1])


def build_bpf(paths: StackPaths, build: Path, clang: Clang, logs: Path) -> list[Path]:
    """The unmodified BPF programs and their skeletons, as the Makefile's skeleton rules make them."""
    step = "build-bpf"
    progs = paths.source / SELFTESTS / "progs"
    flags = bpf_cflags(paths, build, clang.path)
    objects = [build / f"{name}.bpf.o" for name in BPF_PROGRAMS]
    try:
        for name in BPF_PROGRAMS:
            if not (progs / f"{name}.c").is_file():
                raise UpstreamUnavailable(step, f"no progs/{name}.c in {progs}; is this the stack's source?")
        _run_all([[clang.path, *flags, "-c", str(progs / f"{name}.c"), "-o", str(obj)]
                  for name, obj in zip(BPF_PROGRAMS, objects, strict=True)], step, "clang", logs, build)
        for name, obj in zip(BPF_PROGRAMS, objects, strict=True):
            linked = [build / f"{name}.linked{i}.o" for i in (1, 2, 3)]
            for out, src in zip(linked, [obj, *linked[:2]], strict=True):
                _check([str(paths.bpftool), "gen", "object", str(out), str(src)], step, f"gen object {out.name}")
            if linked[1].read_bytes() != linked[2].read_bytes():  # the Makefile's diff: linking must be stable
                raise UpstreamUnavailable(step, f"bpftool gen object of {name} is not idempotent")
            _skeleton(paths, linked[2], name, build / f"{name}.skel.h", step)
            if name in LIGHT_SKELETONS:
                _skeleton(paths, linked[2], f"{name}_lskel", build / f"{name}.lskel.h", step, "-L")
            for path in linked:
                path.unlink()
    except StackUnavailable as e:
        raise _step_error(e, step) from None
    return objects


def _skeleton(paths: StackPaths, obj: Path, name: str, header: Path, step: str, *flags: str) -> None:
    done = subprocess.run([str(paths.bpftool), "gen", "skeleton", *flags, str(obj), "name", name],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UpstreamUnavailable(step, f"bpftool gen skeleton {' '.join(flags)} {name} failed: {why}")
    header.write_text(done.stdout)


def write_tests_list(paths: StackPaths, build: Path) -> None:
    """prog_tests/tests.h in the Makefile's format, with only REFERENCE_TESTS, each checked to exist."""
    step = "build-test_progs"
    tests_dir = paths.source / SELFTESTS / "prog_tests"
    text = "\n".join((tests_dir / f"{name}.c").read_text() for name in TEST_FILES)
    for test in REFERENCE_TESTS:
        if not re.search(rf"^void (serial_)?test_{test}\((void)?\)", text, re.M):
            raise UpstreamUnavailable(step, f"no test_{test}() in prog_tests/{{{','.join(TEST_FILES)}}}.c")
    (build / "prog_tests").mkdir(exist_ok=True)
    (build / "prog_tests" / "tests.h").write_text(
        "/* Generated header, do not edit */\n" + "".join(f"DEFINE_TEST({t})\n" for t in sorted(REFERENCE_TESTS)))


def write_stub_skeletons(paths: StackPaths, build: Path) -> list[str]:
    """A stub for every skeleton a test file includes that is not built here. Only `<name>__elf_bytes` may be
    used (verifier.c's RUN/RUN_TESTS), and only by tests outside the list; anything else needs the real one."""
    step = "build-test_progs"
    stubbed: list[str] = []
    for test_file in TEST_FILES:
        text = (paths.source / SELFTESTS / "prog_tests" / f"{test_file}.c").read_text()
        for name in _SKEL_INCLUDE.findall(text):
            if name in BPF_PROGRAMS:
                continue
            if re.search(rf"\b{name}__(?!elf_bytes\b)\w+|\bstruct {name}\b", text):
                raise UpstreamUnavailable(step, f"prog_tests/{test_file}.c uses more of {name}.skel.h than "
                                          "its object bytes; build that program too")
            (build / f"{name}.skel.h").write_text(
                "/* Generated stub: this program's tests are not in this test_progs */\n#include <stddef.h>\n"
                f"static inline const void *{name}__elf_bytes(size_t *sz) {{ *sz = 0; return NULL; }}\n")
            stubbed.append(name)
    return stubbed


def write_verification_cert(paths: StackPaths, build: Path) -> None:
    """verification_cert.h: test_progs adds this certificate to the session keyring at start and exits when that
    fails, so it is a real one, made by upstream's verify_sig_setup.sh genkey as the Makefile does."""
    step = "build-test_progs"
    if shutil.which("openssl") is None:
        raise UpstreamUnavailable(step, "test_progs needs a signing certificate; run: apt-get install openssl")
    keys = build / "keys"
    keys.mkdir()
    _check(["bash", str(paths.source / SELFTESTS / "verify_sig_setup.sh"), "genkey", str(keys)], step,
           "verify_sig_setup.sh genkey")
    cert = (keys / "signing_key.der").read_bytes()
    rows = [", ".join(f"0x{b:02x}" for b in cert[i:i + 12]) + "," for i in range(0, len(cert), 12)]
    (build / "verification_cert.h").write_text(
        "unsigned char test_progs_verification_cert[] = {\n" + "".join(f"  {r}\n" for r in rows) + "};\n"
        f"unsigned int test_progs_verification_cert_len = {len(cert)};\n")


def build_test_progs(paths: StackPaths, build: Path, logs: Path) -> bool:
    """test_progs in build/, linked against the stack's libbpf.a; True when it can disassemble jited code."""
    step = "build-test_progs"
    selftests = paths.source / SELFTESTS
    libbpf_a = paths.libbpf.with_name("libbpf.a")
    if not libbpf_a.is_file():
        raise UpstreamUnavailable(step, f"no {libbpf_a} (test_progs links libbpf statically); re-provision")
    try:
        write_tests_list(paths, build)
        write_stub_skeletons(paths, build)
        write_verification_cert(paths, build)
        cflags = host_cflags(paths, build)
        llvm = _llvm_flags()
        sources = [selftests / s for s in RUNNER_SOURCES] + [paths.source / "tools" / "lib" / "find_bit.c"]
        sources += [selftests / "prog_tests" / f"{t}.c" for t in TEST_FILES]
        commands = [["gcc", *cflags, "-c", str(src), "-o", str(build / f"{src.stem}.o")] for src in sources]
        jit = selftests / "jit_disasm_helpers.c"
        commands.append(["gcc", *cflags, *(llvm[0] if llvm else []), "-c", str(jit), "-o",
                         str(build / f"{jit.stem}.o")])
        _run_all(commands, step, "gcc", logs, build)
        objects = [cmd[-1] for cmd in commands]
        _check(["gcc", *cflags, *objects, str(libbpf_a), "-lelf", "-lz", "-lrt", "-lpthread",
                *(llvm[1] if llvm else []), "-o", str(build / "test_progs")], step, "linking test_progs",
               logs / "test_progs.log")
        for obj in objects:
            Path(obj).unlink()
    except StackUnavailable as e:
        raise _step_error(e, step) from None
    return llvm is not None


def _made_from(paths: StackPaths, clang: Clang) -> dict[str, str]:
    """What the build depends on; the recipe is this file, so changing it rebuilds."""
    pins = load_pins(paths.name)
    made = {p.name: p.version for p in pins.packages if p.role in ("image", "source")}
    recipe = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    return made | {"release": paths.release, "clang": clang.version, "libbpf": paths.libbpf_version,
                   "bpftool": bpftool_version(paths.bpftool) or "?", "format": str(BUILD_FORMAT), "recipe": recipe}


def upstream_dir(name: str) -> Path:
    return cache_root() / "stack" / name / "upstream"


def build_upstream(name: str = DEFAULT_STACK, log: Log = _stderr) -> UpstreamBuild:
    """The cached build of the stack's upstream percpu selftests, made first when missing or stale."""
    paths = stack_paths(name, provision=False, log=log)
    try:
        clang = Clang.find()
    except ToolchainError as e:
        raise UpstreamUnavailable("build-bpf", str(e)) from None
    target = upstream_dir(name)
    made_from = _made_from(paths, clang)
    pins = load_pins(name)
    with _locked(target.parent, log, pins):
        if not _piece_ready(target, made_from):
            started = time.monotonic()
            logs = target.parent / "logs" / "upstream"  # outside the piece: a failed build's logs stay
            shutil.rmtree(logs, ignore_errors=True)
            logs.mkdir(parents=True)
            with _piece(target, "build-upstream", made_from) as scratch:
                t0 = time.monotonic()
                make_vmlinux_h(paths, scratch)
                log(f"stack {name}: upstream: vmlinux.h from {paths.kernel_image.name} ({time.monotonic() - t0:.1f} s)")
                t0 = time.monotonic()
                build_bpf(paths, scratch, clang, logs)
                log(f"stack {name}: upstream: {', '.join(BPF_PROGRAMS)} and skeletons "
                    f"({time.monotonic() - t0:.1f} s)")
                t0 = time.monotonic()
                jit = build_test_progs(paths, scratch, logs)
                log(f"stack {name}: upstream: test_progs ({time.monotonic() - t0:.1f} s)")
                (scratch / "build.json").write_text(json.dumps(
                    {"seconds": round(time.monotonic() - started, 2), "jit_disassembly": jit}) + "\n")
        else:
            log(f"stack {name}: upstream: already built in {target}")
    facts = json.loads((target / "build.json").read_text())
    return UpstreamBuild(directory=target, vmlinux_h=target / "vmlinux.h",
                         objects=tuple(target / f"{n}.bpf.o" for n in BPF_PROGRAMS),
                         test_progs=target / "test_progs", jit_disassembly=bool(facts["jit_disassembly"]),
                         seconds=float(facts["seconds"]))


# -- running it --------------------------------------------------------------------------------------------------


def guest_command(build: UpstreamBuild, test: str) -> str:
    """The shell line that runs one reference test, wherever the build directory is visible (also read-only)."""
    return f"cd {build.directory} && ./test_progs -t {test}"


@dataclass(frozen=True)
class ReferenceRun:
    test: str
    exit_code: int
    seconds: float
    verdicts: dict[str, str]
    output: str


def run_reference(build: UpstreamBuild, test: str, timeout: float = 600) -> ReferenceRun:
    """`./test_progs -t TEST` in the build directory on this machine's kernel (root: it loads programs)."""
    started = time.monotonic()
    try:
        done = subprocess.run([str(build.test_progs), "-t", test], cwd=build.directory, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UpstreamUnavailable("run", f"test_progs -t {test} took over {timeout:.0f} s") from None
    except OSError as e:
        raise UpstreamUnavailable("run", f"cannot run {build.test_progs}: {e.strerror}") from None
    output = done.stdout + done.stderr
    return ReferenceRun(test=test, exit_code=done.returncode, seconds=round(time.monotonic() - started, 2),
                        verdicts=reference_verdicts(output), output=output)


def upstream_report(name: str = DEFAULT_STACK, run: bool = True, log: Log = _stderr) -> dict[str, object]:
    """The build (timed cold when it was made, and now) and, unless `run` is false, each reference test's run
    here: the document `python -m backends.stack upstream` prints."""
    t0 = time.monotonic()
    build = build_upstream(name, log)
    report: dict[str, object] = build.as_json() | {"seconds_now": round(time.monotonic() - t0, 2), "stack": name,
                                                    "kernel": os.uname().release}
    report["guest_commands"] = {t: guest_command(build, t) for t in REFERENCE_TESTS}
    if run:
        runs = [run_reference(build, t) for t in REFERENCE_TESTS]
        report["runs"] = {r.test: {"exit": r.exit_code, "seconds": r.seconds, "verdicts": r.verdicts}
                          for r in runs}
    return report

