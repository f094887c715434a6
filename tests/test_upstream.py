"""Upstream's own percpu selftests built from the stack's source: test_progs output parsing (on output captured
from this build on a 6.18 host kernel without the feature), the build's one-line failures and exit codes, and the
real build and run here when the stack is provisioned."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from backends.stack import upstream
from backends.stack.provision import StackPaths, StackUnavailable, stack_paths

ROOT = Path(__file__).resolve().parent.parent

# `./test_progs -t global_percpu_data` then `-t verifier_percpu_addr`, stdout and stderr together, as built by
# `python -m backends.stack upstream` from linux-source-7.3 7.3.4-1~bpo13+1 and run on host kernel 6.18
HOST_OUTPUT = """\
WARNING! Selftests relying on bpf_testmod.ko will be skipped.
Failed to unload bpf_testmod.ko from kernel: -38
Can't find bpf_testmod.ko kernel module: -2
#1       global_percpu_data:SKIP
Summary: 1/0 PASSED, 1 SKIPPED, 0/0 FAILED
WARNING! Selftests relying on bpf_testmod.ko will be skipped.
Failed to unload bpf_testmod.ko from kernel: -38
Can't find bpf_testmod.ko kernel module: -2
tester_init:PASS:tester_log_buf 0 nsec
process_subtest:PASS:obj_open_mem 0 nsec
process_subtest:PASS:specs_alloc 0 nsec
run_subtest:PASS:obj_open_mem 0 nsec
libbpf: prog 'percpu_addr': BPF program load failed: -EINVAL
libbpf: prog 'percpu_addr': failed to load: -EINVAL
libbpf: failed to load object 'verifier_percpu_addr'
run_subtest:FAIL:unexpected_load_failure unexpected error: -22 (errno 22)
VERIFIER LOG:
=============
fd 5 is not pointing to valid bpf_map
processed 0 insns (limit 1000000) max_states_per_insn 0 total_states 0 peak_states 0 mark_read 0
=============
#2/1     verifier_percpu_addr/per-CPU address resolution:FAIL
#2       verifier_percpu_addr:FAIL

All error logs:
tester_init:PASS:tester_log_buf 0 nsec
process_subtest:PASS:obj_open_mem 0 nsec
process_subtest:PASS:specs_alloc 0 nsec
run_subtest:PASS:obj_open_mem 0 nsec
libbpf: prog 'percpu_addr': BPF program load failed: -EINVAL
libbpf: prog 'percpu_addr': failed to load: -EINVAL
libbpf: failed to load object 'verifier_percpu_addr'
run_subtest:FAIL:unexpected_load_failure unexpected error: -22 (errno 22)
VERIFIER LOG:
=============
fd 5 is not pointing to valid bpf_map
processed 0 insns (limit 1000000) max_states_per_insn 0 total_states 0 peak_states 0 mark_read 0
=============
#2/1     verifier_percpu_addr/per-CPU address resolution:FAIL
#2       verifier_percpu_addr:FAIL
Summary: 0/0 PASSED, 0 SKIPPED, 1/1 FAILED
"""


def test_verdicts_of_the_host_run() -> None:
    assert upstream.reference_verdicts(HOST_OUTPUT) == {
        "global_percpu_data": "SKIP",
        "verifier_percpu_addr/per-CPU address resolution": "FAIL",
        "verifier_percpu_addr": "FAIL",
    }


def test_verdicts_of_subtests_and_partial_skips() -> None:
    # print_test_result's other forms, and subtests as the 7.3.4 guest prints them
    output = ("#1/1     global_percpu_data/init:OK\n#1/2     global_percpu_data/lskel:SKIP\n"
              "#1/3     global_percpu_data/verifier_strncmp:OK\n#1       global_percpu_data:OK (SKIP: 1/3)\n"
              "#2       verifier_percpu_addr:SKIP (not built)\n"
              "run_subtest:FAIL:unexpected_load_failure unexpected error: -22 (errno 22)\n#3/1     x/started\n")
    assert upstream.reference_verdicts(output) == {
        "global_percpu_data/init": "OK", "global_percpu_data/lskel": "SKIP",
        "global_percpu_data/verifier_strncmp": "OK", "global_percpu_data": "OK", "verifier_percpu_addr": "SKIP",
    }


# -- failures: one line, a distinct exit code --------------------------------------------------------------------


def _fake_paths(tmp_path: Path, image: bytes) -> StackPaths:
    """A stack whose source is the real scripts/extract-vmlinux (when provisioned) and whose image is `image`."""
    try:
        real = stack_paths(provision=False, log=lambda _line: None)
    except StackUnavailable as e:
        pytest.skip(f"needs the provisioned stack's extract-vmlinux: {e}")
    kernel = tmp_path / "vmlinuz-fake"
    kernel.write_bytes(image)
    return dataclasses.replace(real, kernel_image=kernel)


def test_an_image_without_vmlinux_is_one_line_and_exit_9(tmp_path: Path) -> None:
    paths = _fake_paths(tmp_path, b"MZ" + b"\0" * 4096)
    with pytest.raises(upstream.UpstreamUnavailable) as caught:
        upstream.extract_vmlinux(paths, tmp_path)
    assert caught.value.exit_code == upstream.EXIT_VMLINUX == 9
    message = str(caught.value)
    assert "\n" not in message
    assert message == ("stack extract-vmlinux: vmlinuz-fake: extract-vmlinux: Cannot find vmlinux. "
                       "(no known compression in the image)")


def test_a_missing_decompressor_is_named_with_its_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _fake_paths(tmp_path, b"\0" * 64 + b"\x28\xb5\x2f\xfd" + b"junk" * 64)  # a zstd payload's magic
    real_which = shutil.which
    monkeypatch.setattr(upstream.shutil, "which", lambda tool: None if tool == "unzstd" else real_which(tool))
    with pytest.raises(upstream.UpstreamUnavailable) as caught:
        upstream.extract_vmlinux(paths, tmp_path)
    assert str(caught.value).endswith("(the image's decompressor is not installed; run: apt-get install zstd)")


def test_exit_codes_are_apart_from_provisioning() -> None:
    provisioning = {2, 4, 6, 7, 8}
    assert not set(upstream.UPSTREAM_STEP_EXIT.values()) & provisioning
    assert upstream.UpstreamUnavailable("build-bpf", "x").exit_code == 10
    assert upstream.UpstreamUnavailable("verify", "x").exit_code == 8  # provisioning's own steps keep theirs


def test_cli_unknown_stack_is_one_line_exit_2() -> None:
    done = subprocess.run([sys.executable, "-m", "backends.stack", "upstream", "--stack", "no-such"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith("backends.stack: stack usage: unknown stack 'no-such'"), done.stderr


# -- the real build, run on this kernel --------------------------------------------------------------------------


@pytest.mark.kernel
@pytest.mark.slow
def test_build_and_run_here() -> None:
    """test_progs runs here: global_percpu_data skips by its feature probe on a kernel without the feature and
    verifier_percpu_addr, which has no such probe, fails on libbpf's placeholder fd; on a merged kernel both pass."""
    from backends.kernel import probes

    usable, why = probes.bpf_usable()
    if not usable:
        pytest.skip(why)
    try:
        build = upstream.build_upstream(log=lambda _line: None)
    except StackUnavailable as e:
        if e.exit_code == 4:
            pytest.skip(str(e))
        raise
    assert build.test_progs.is_file() and build.vmlinux_h.stat().st_size > 1_000_000
    feature = probes.probe_percpu_data()
    runs = {t: upstream.run_reference(build, t) for t in upstream.REFERENCE_TESTS}
    percpu = runs["global_percpu_data"]
    if feature:
        assert percpu.verdicts["global_percpu_data"] == "OK", percpu.output
        assert runs["verifier_percpu_addr"].verdicts["verifier_percpu_addr"] == "OK"
    else:
        assert percpu.verdicts == {"global_percpu_data": "SKIP"} and percpu.exit_code == 0, percpu.output
        addr = runs["verifier_percpu_addr"]
        assert addr.verdicts["verifier_percpu_addr/per-CPU address resolution"] == "FAIL", addr.output
        assert "is not pointing to valid bpf_map" in addr.output
