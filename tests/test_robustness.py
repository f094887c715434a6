"""Bad input gets a one-line reason and a distinct outcome — never a traceback, never a silent pass."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corpus.selftest import selftest_model
from generators.model import dumps
from toolchain.clang import Clang, CompileError, ToolchainError, compile_c

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def run(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env or ENV, capture_output=True, text=True,
                          timeout=timeout)


def one_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{text}"
    assert "Traceback" not in text
    return lines[0]


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(dumps(selftest_model()))
    return path


def fake_clang(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "clang"
    script.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'clang version 19.1.7'; exit 0; fi\n"
                      + body + "\n")
    script.chmod(0o755)
    return script


def test_missing_clang_is_one_line_and_exit_2(model_file):
    proc = run("-m", "oracle", "predict", str(model_file), "--clang", "/nonexistent/clang")
    assert proc.returncode == 2
    assert "clang not found at '/nonexistent/clang'" in one_line(proc.stderr)


def test_missing_clang_stops_the_conformance_run_with_exit_3():
    proc = run("-m", "pytest", "suites/test_compiler_layout.py", "-q", "--clang", "/nonexistent/clang")
    assert proc.returncode == 3
    assert "toolchain: clang not found at '/nonexistent/clang'" in proc.stdout + proc.stderr


def test_crashing_clang_is_reported_as_a_crash(tmp_path):
    clang = Clang.find(str(fake_clang(tmp_path, "kill -SEGV $$")))
    with pytest.raises(CompileError, match="clang crashed"):
        compile_c(clang, "int x;", name=f"crash{time.time_ns()}")


def test_compile_timeout(tmp_path):
    clang = Clang.find(str(fake_clang(tmp_path, "sleep 30")))
    with pytest.raises(CompileError, match="timed out after 1s"):
        compile_c(clang, "int y;", name=f"slow{time.time_ns()}", timeout=1)


def test_too_old_clang_is_refused(tmp_path):
    script = tmp_path / "clang"
    script.write_text("#!/bin/sh\necho 'clang version 17.0.6'\n")
    script.chmod(0o755)
    with pytest.raises(ToolchainError, match="too old"):
        Clang.find(str(script))


def test_corrupt_object_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.o"
    bad.write_bytes(b"\x7fELF" + os.urandom(200))
    for module in ("backends.sim", "backends.kernel"):
        proc = run("-m", module, "run", str(bad))
        assert proc.returncode == 2, (module, proc.stderr)
        assert "bad.o" in one_line(proc.stderr)


def test_unknown_profile(model_file):
    proc = run("-m", "oracle", "predict", str(model_file), "--profile", "bogus")
    assert proc.returncode == 2
    assert "unknown profile 'bogus'" in one_line(proc.stderr)
    proc = run("-m", "pytest", "suites/test_maps.py", "--profile", "bogus", "-q")
    assert proc.returncode == 4  # pytest's usage error
    assert "unknown profile 'bogus'" in proc.stderr


def test_missing_libbpf_so_is_exit_4(tmp_path):
    src = tmp_path / "x.bpf.c"
    src.write_text('__attribute__((section("raw_tp"), used)) int p(void *c) { return 0; }\n'
                   'char LICENSE[] __attribute__((section("license"), used)) = "GPL";\n')
    proc = run("-m", "backends.kernel", "run", str(src), "--libbpf", "/nonexistent/libbpf.so.1")
    assert proc.returncode == 4
    assert "/nonexistent/libbpf.so.1" in one_line(proc.stderr)


def test_unwritable_bundle_directory_is_its_own_error(clang, monkeypatch):
    from suites.support import BundleError, compile_global, write_bundle

    monkeypatch.setenv("PERCPU_FAILURES", "/proc/no-such-dir")
    with pytest.raises(BundleError, match="cannot write the failure bundle"):
        write_bundle("x", compile_global(clang, selftest_model()), {}, "")


def _in_child(setup, target, queue) -> None:  # noqa: ANN001
    try:
        setup()
        queue.put(("ok", target()))
    except Exception as e:  # the reason is the point of the test
        queue.put((type(e).__name__, str(e)))


def _child(setup, target) -> tuple[str, str]:  # noqa: ANN001
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_in_child, args=(setup, target, queue))
    proc.start()
    proc.join(60)
    return queue.get(timeout=5)


def _drop_root() -> None:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)


def _refuse_bpf() -> None:
    """seccomp: bpf(2) fails with EPERM, everything else is allowed (a container that forbids BPF)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    ld_nr = (0x20, 0, 0, 0)  # BPF_LD|BPF_W|BPF_ABS, seccomp_data.nr
    filt = [ld_nr, (0x15, 0, 1, 321), (0x06, 0, 0, 0x00050000 | 1), (0x06, 0, 0, 0x7FFF0000)]
    raw = b"".join(struct.pack("<HBBI", *f) for f in filt)
    buf = ctypes.create_string_buffer(raw)
    prog = struct.pack("<HxxxxxxQ", len(filt), ctypes.addressof(buf))
    prog_buf = ctypes.create_string_buffer(prog)
    assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    assert libc.prctl(22, 2, ctypes.addressof(prog_buf), 0, 0) == 0  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


def _kernel_backend() -> str:
    from suites.backends import KernelBackend

    KernelBackend("raw", None, None)
    return "constructed"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges from")
def test_non_root_skips_the_kernel_backend_with_its_reason():
    kind, message = _child(_drop_root, _kernel_backend)
    assert kind == "Unavailable", message
    assert "not root" in message and "\n" not in message


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for bpf() to be refused by seccomp, not by uid")
def test_bpf_refused_skips_the_kernel_backend_with_its_reason():
    kind, message = _child(_refuse_bpf, _kernel_backend)
    assert kind == "Unavailable", message
    assert "EPERM" in message or "refused" in message


def test_sigint_mid_run_stops_cleanly_and_keeps_what_it_found(tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "matrix.md").write_text("the last complete run's\n")
    env = {**ENV, "PERCPU_FAILURES": str(tmp_path / "failures"), "PERCPU_CACHE": str(tmp_path / "cache"),
           "PERCPU_REPORTS": str(reports)}
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "suites", "-q", "--backend", "sim",
                             "--backend", "kernel", "--hypothesis-profile=ci"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            # a background job may inherit SIGINT ignored; the user's Ctrl-C is not ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(6)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out[-2000:]  # interrupted, not passed
    assert "KeyboardInterrupt" in out
    assert _group_members(proc.pid) == []
    # an interrupted run's matrix is partial: reports/ keeps the last complete run's
    assert sorted(p.name for p in reports.iterdir()) == ["matrix.md"]
    assert (reports / "matrix.md").read_text() == "the last complete run's\n"


# A Ctrl-C that lands in a garbage-collector callback is raised there, reported as unraisable and dropped by
# CPython. Hypothesis times every collection with such a callback, so a real Ctrl-C was lost now and then (the
# run went on to its end). This plugin makes that happen on purpose, once, during the first test.
_SWALLOWING_PLUGIN = """
import gc

armed = []


def _interrupt_in_gc(phase, info):
    if armed and phase == "start":
        armed.clear()
        raise KeyboardInterrupt


def pytest_runtest_call(item):
    if not hasattr(_interrupt_in_gc, "done"):
        _interrupt_in_gc.done = True
        armed.append(True)
        gc.callbacks.append(_interrupt_in_gc)
"""


def test_an_interrupt_dropped_in_a_gc_callback_still_stops_the_run(tmp_path):
    (tmp_path / "interrupt_in_gc.py").write_text(_SWALLOWING_PLUGIN)
    env = {**ENV, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}", "PERCPU_REPORTS": str(tmp_path / "reports")}
    proc = run("-m", "pytest", "suites/test_compiler_layout.py", "-q", "-p", "interrupt_in_gc", "--backend", "sim",
               "--hypothesis-profile=ci", env=env, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:]  # interrupted: not a run that went on and passed
    assert "KeyboardInterrupt" in proc.stdout


def _group_members(pgid: int) -> list[int]:
    """Processes still in a process group (read from /proc: no procps needed)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    out.append(int(entry))
            except ProcessLookupError:
                pass
    return out


def test_same_seed_twice_gives_identical_examples_and_results(clang):
    from bench.test_bench import fixed_models
    from suites.backends import SimBackend
    from suites.support import compile_global, runs_of

    backend = SimBackend("merged", 4, (0, 1))
    first, second = fixed_models(15), fixed_models(15)
    assert first == second

    def observe_all(models):
        out = []
        for m in models:
            doc = backend.observe(compile_global(clang, m), runs_of(m))
            out.append((doc["maps"], doc["programs"], doc["runs"]))
        return out

    assert observe_all(first) == observe_all(second)


def _node_outcomes(stdout: str) -> dict[str, str]:
    """nodeid -> PASSED/FAILED from pytest -v lines."""
    out = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and "::" in parts[0] and parts[1] in ("PASSED", "FAILED"):
            out[parts[0]] = parts[1]
    return out


def test_last_failed_reruns_only_the_last_failures(tmp_path):
    """--lf works: pytest's cache provider is on (with it off, --lf silently ran everything)."""
    env = {**ENV, "PERCPU_FAILURES": str(tmp_path / "failures"), "PERCPU_REPORTS": str(tmp_path / "reports")}
    args = ("-m", "pytest", "suites/test_runtime.py", "-v", "-p", "no:randomly", "-k", "corpus", "--backend", "sim",
            "--sim-profile", "merged-norewrite", "-o", f"cache_dir={tmp_path / 'cache'}")
    first = run(*args, env=env)
    assert first.returncode == 1, first.stdout[-2000:]
    outcomes = _node_outcomes(first.stdout)
    failed = {n for n, o in outcomes.items() if o == "FAILED"}
    assert failed and len(failed) < len(outcomes), first.stdout[-2000:]
    again = run(*args, "--lf", env=env)
    assert f"run-last-failure: rerun previous {len(failed)} failures" in again.stdout, again.stdout[:2000]
    assert set(_node_outcomes(again.stdout)) == failed


def _junit_cases(path: Path) -> int:
    import xml.etree.ElementTree as ET

    return len(ET.parse(path).getroot().findall(".//testcase"))


def test_reports_are_written_whole_and_keep_coverage_under_xdist(tmp_path):
    """Every run with conformance rows writes junit.xml, the matrix and results.json together; under -n 2 the
    controller adds up the workers' coverage, so the section and results.json's counts equal a serial run's."""
    import json

    from conftest import REPORT_FILES

    docs = {}
    for mode, extra in (("serial", ()), ("xdist", ("-n", "2"))):
        reports = tmp_path / mode
        env = {**ENV, "PERCPU_FAILURES": str(tmp_path / "failures"), "PERCPU_REPORTS": str(reports)}
        proc = run("-m", "pytest", "suites/test_maps.py", "-q", "-p", "no:randomly", "-k", "corpus", "--backend",
                   "sim", *extra, env=env)
        assert proc.returncode == 0, proc.stdout[-2000:]
        assert "layout-space coverage" in proc.stdout, proc.stdout[-2000:]
        assert sorted(p.name for p in reports.iterdir()) == sorted(REPORT_FILES)  # no staging left behind
        docs[mode] = json.loads((reports / "results.json").read_text())
        runs = sum(n for cell in docs[mode]["matrix"].values() for k, n in cell.items()
                   if k in ("passed", "failed", "skipped"))
        assert _junit_cases(reports / "junit.xml") == runs
    assert docs["serial"]["coverage"] and docs["xdist"]["coverage"] == docs["serial"]["coverage"]


def test_reports_that_cannot_be_written_whole_are_not_written_at_all(tmp_path, monkeypatch):
    import errno
    import shutil

    import conftest

    reports = tmp_path / "reports"
    reports.mkdir()
    before = {name: f"old {name}\n" for name in conftest.REPORT_FILES}
    for name, text in before.items():
        (reports / name).write_text(text)
    junit = tmp_path / "junit.xml"
    junit.write_text("<testsuites/>")
    monkeypatch.setenv("PERCPU_REPORTS", str(reports))
    monkeypatch.setitem(conftest._JUNIT, "staged", junit)

    def disk_full(*args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shutil, "copyfile", disk_full)  # the junit copy: after the matrix, before any rename
    problem = conftest._write_reports(["sim"], [("test_x.py::test_p", ["pass"])], ["| x |"], {})
    assert problem == f"reports: cannot write {reports}: No space left on device"
    assert {p.name: p.read_text() for p in reports.iterdir()} == before


# The redelivered interrupt lost as well: code under test that catches it (Hypothesis, interrupted before its
# runner exists, turns it into an internal AssertionError) must not let the run go on to pass or fail as usual.
_SWALLOWING_TWICE_PLUGIN = """
import sys
import time


def pytest_runtest_call(item):
    if hasattr(sys, "_swallowed_twice"):
        return
    sys._swallowed_twice = True
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as e:
        sys.unraisablehook(type("U", (), {"exc_type": KeyboardInterrupt, "exc_value": e, "exc_traceback": None,
                                          "err_msg": None, "object": None})())
    try:
        time.sleep(1)  # the redelivery lands here, and is eaten
    except KeyboardInterrupt:
        pass
"""


def test_an_interrupt_lost_twice_still_stops_the_run(tmp_path):
    (tmp_path / "interrupt_twice.py").write_text(_SWALLOWING_TWICE_PLUGIN)
    env = {**ENV, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}", "PERCPU_REPORTS": str(tmp_path / "reports")}
    proc = run("-m", "pytest", "suites/test_compiler_layout.py", "-q", "-p", "interrupt_twice", "--backend", "sim",
               "--hypothesis-profile=ci", env=env, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert "KeyboardInterrupt" in proc.stdout
