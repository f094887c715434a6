"""The VM backend: accelerator choice, kernel image checks, the boot's failure paths (timeout, panic, no answer)
with a stand-in `vng`, the host/guest plumbing with the agent run on this host, and one real boot (slow)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from backends.vm import runner
from backends.vm.runner import VmConfig, VmError, VmSession, VmUnavailable

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_forced_accel(monkeypatch):
    monkeypatch.delenv(runner.ACCEL_ENV, raising=False)


# -- choose_accel --------------------------------------------------------------------------------------------


def _fake_host(monkeypatch, tmp_path, *, kvm: bool, pvm: bool, probe: tuple[bool, str] | None = (True, "")):
    device = tmp_path / "kvm"
    if kvm:
        device.write_bytes(b"")
    module = tmp_path / "kvm_pvm"
    if pvm:
        module.mkdir()
    monkeypatch.setattr(runner, "KVM_DEVICE", device)
    monkeypatch.setattr(runner, "PVM_MODULE", module)
    calls = []

    def fake_probe(accel, timeout=runner.KVM_PROBE_TIMEOUT):
        calls.append(accel)
        if probe is None:
            raise AssertionError("the QEMU probe must not run here")
        return probe

    monkeypatch.setattr(runner, "probe_guest_code", fake_probe)
    return calls


def test_accel_tcg_under_paravirtual_kvm_without_running_qemu(monkeypatch, tmp_path):
    _fake_host(monkeypatch, tmp_path, kvm=True, pvm=True, probe=None)
    accel, notice = runner.choose_accel()
    assert accel == "tcg"
    assert "kvm_pvm" in notice and "\n" not in notice


def test_accel_tcg_when_dev_kvm_does_not_open(monkeypatch, tmp_path):
    _fake_host(monkeypatch, tmp_path, kvm=False, pvm=False, probe=None)
    accel, notice = runner.choose_accel()
    assert accel == "tcg" and "does not open" in notice


def test_accel_kvm_only_when_the_probe_runs_a_guest(monkeypatch, tmp_path):
    calls = _fake_host(monkeypatch, tmp_path, kvm=True, pvm=False, probe=(True, ""))
    assert runner.choose_accel()[0] == "kvm"
    assert calls == ["kvm"]


def test_accel_tcg_when_the_probe_fails(monkeypatch, tmp_path):
    _fake_host(monkeypatch, tmp_path, kvm=True, pvm=False,
               probe=(False, "a test guest failed under kvm (exit 1: failed to set MSR 0x10a)"))
    accel, notice = runner.choose_accel()
    assert accel == "tcg" and "MSR 0x10a" in notice


def test_accel_forced_by_environment(monkeypatch, tmp_path):
    _fake_host(monkeypatch, tmp_path, kvm=True, pvm=False, probe=None)
    monkeypatch.setenv(runner.ACCEL_ENV, "tcg")
    assert runner.choose_accel() == ("tcg", f"accelerator tcg: forced by {runner.ACCEL_ENV}")
    monkeypatch.setenv(runner.ACCEL_ENV, "hvf")
    with pytest.raises(VmUnavailable, match="want kvm or tcg"):
        runner.choose_accel()


@pytest.mark.skipif(shutil.which(runner.QEMU) is None, reason="qemu-system-x86_64 not installed")
def test_probe_payload_reaches_long_mode_under_tcg():
    # the same payload decides KVM; TCG runs it anywhere, so this checks the payload itself
    assert runner.probe_guest_code("tcg", timeout=30) == (True, "")


# -- kernel images ---------------------------------------------------------------------------------------------


def test_default_image_is_the_newest_generic_one(monkeypatch, tmp_path):
    for name in ("vmlinuz-6.1.0-9-amd64", "vmlinuz-6.1.0-56-amd64", "vmlinuz-6.1.0-60-cloud-amd64",
                 "vmlinuz-6.1.0-60-rt-amd64", "vmlinuz-5.10.0-30-amd64", "config-6.1.0-56-amd64"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setattr(runner, "BOOT_DIR", tmp_path)
    assert runner.default_kernel_image(install=False) == tmp_path / "vmlinuz-6.1.0-56-amd64"


def test_no_default_image_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr(runner, "BOOT_DIR", tmp_path)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(VmUnavailable) as e:
        runner.default_kernel_image()
    assert "apt-get install -y linux-image-amd64" in str(e.value) and "\n" not in str(e.value)


def test_missing_image_is_unavailable_in_one_line(tmp_path):
    with pytest.raises(VmUnavailable) as e:
        VmSession(VmConfig(kernel_image=tmp_path / "bzImage"))
    assert str(e.value) == f"no kernel image at {tmp_path / 'bzImage'}"


def _bzimage(path: Path, release: str) -> Path:
    head = bytearray(0x1000)
    head[0x202:0x206] = b"HdrS"
    head[0x20E:0x210] = (0x400).to_bytes(2, "little")
    version = f"{release} (builder@host) #1 SMP".encode()
    head[0x600:0x600 + len(version)] = version
    path.write_bytes(bytes(head))
    return path


def test_release_and_config_checks(tmp_path):
    image = _bzimage(tmp_path / "vmlinuz-6.1.0-60-cloud-amd64", "6.1.0-60-cloud-amd64")
    assert runner.kernel_release(image) == "6.1.0-60-cloud-amd64"
    assert runner.check_kernel(image) == "6.1.0-60-cloud-amd64"  # no config beside it: decided after boot
    config = tmp_path / "config-6.1.0-60-cloud-amd64"
    config.write_text("CONFIG_BPF_SYSCALL=y\nCONFIG_NET_9P=m\n# CONFIG_9P_FS is not set\n")
    with pytest.raises(VmUnavailable, match=r"over 9p \(CONFIG_NET_9P_VIRTIO not set"):
        runner.check_kernel(image)
    config.write_text("# CONFIG_BPF_SYSCALL is not set\n")
    with pytest.raises(VmUnavailable, match="has no BPF syscall"):
        runner.check_kernel(image)
    assert runner.kernel_release(tmp_path / "config-6.1.0-60-cloud-amd64") is None


# -- the boot, with a stand-in vng -----------------------------------------------------------------------------


def _fake_vng(tmp_path: Path, body: str) -> Path:
    """An executable `vng` that runs `body` (Python) with `args` (its argv) and `rwdir` (the scratch dir)."""
    script = tmp_path / "bin" / "vng"
    script.parent.mkdir(exist_ok=True)
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent("""\
        import os, subprocess, sys, time
        args = sys.argv[1:]
        rwdir = args[args.index("--rwdir") + 1]
        command = args[args.index("--exec") + 1]
    """) + textwrap.dedent(body))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    (script.parent / "virtme-run").write_text("#!/bin/sh\nexit 1\n")
    (script.parent / "virtme-run").chmod(0o755)
    return script


@pytest.fixture
def fake_env(monkeypatch, tmp_path):
    """A session whose tools all exist: a fake image, and QEMU and busybox replaced by `true`. Scratch
    directories go to tmp_path/scratch, so a test can see that none is left behind."""
    monkeypatch.setattr(runner, "QEMU", shutil.which("true"))
    monkeypatch.setattr(runner, "BUSYBOX_NAMES", ("true",))
    (tmp_path / "scratch").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))
    image = tmp_path / "bzImage"
    image.write_bytes(b"\0" * 1024)
    return image


def _object(tmp_path: Path) -> str:
    obj = tmp_path / "x.bpf.o"
    obj.write_bytes(b"\x7fELF")
    return str(obj)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_timeout_kills_the_whole_guest(tmp_path, fake_env):
    pids = tmp_path / "pids"
    vng = _fake_vng(tmp_path, f"""
        child = subprocess.Popen(["sleep", "600"])  # stands in for QEMU
        open({str(pids)!r}, "w").write(f"{{os.getpid()}} {{child.pid}}")
        print("booting", flush=True)
        time.sleep(600)
    """)
    session = VmSession(VmConfig(kernel_image=fake_env, accel="tcg", vng=vng, timeout=1.5, timeout_per_request=0.5))
    start = time.monotonic()
    with pytest.raises(VmError) as e:
        session.run_batch([{"object": _object(tmp_path), "loader": "libbpf", "runs": []}])
    assert time.monotonic() - start < 30
    assert "timed out after 2s" in str(e.value)
    assert "booting" in e.value.console_tail
    for pid in map(int, pids.read_text().split()):
        assert not _alive(pid), f"process {pid} survived the timeout"
    assert not list((tmp_path / "scratch").iterdir())


def test_panic_is_reported_with_the_console_tail(tmp_path, fake_env):
    vng = _fake_vng(tmp_path, """
        print("[    1.0] VFS: Cannot open root device")
        print("[    1.1] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)")
    """)
    session = VmSession(VmConfig(kernel_image=fake_env, accel="tcg", vng=vng))
    with pytest.raises(VmError) as e:
        session.run_batch([{"object": _object(tmp_path), "loader": "raw", "runs": [["p", 0, 1]]}])
    assert str(e.value) == "guest kernel panicked: not syncing: VFS: Unable to mount root fs on unknown-block(0,0)"
    assert "VFS: Cannot open root device" in e.value.console_tail


def test_no_results_is_an_error(tmp_path, fake_env):
    vng = _fake_vng(tmp_path, """
        print("virtme-run: error: something", file=sys.stderr)
        sys.exit(2)
    """)
    session = VmSession(VmConfig(kernel_image=fake_env, accel="tcg", vng=vng))
    with pytest.raises(VmError, match=r"guest wrote no results \(vng exit 2") as e:
        session.run_batch([{"object": _object(tmp_path)}])
    assert "virtme-run: error: something" in e.value.console_tail
    assert not list((tmp_path / "scratch").iterdir())


def test_answers_are_mapped_back_to_the_host(tmp_path, fake_env):
    # the stand-in answers as the agent would, and the kernel complains while it runs
    vng = _fake_vng(tmp_path, """
        import json
        requests = json.load(open(os.path.join(rwdir, "requests.json")))["requests"]
        print("[ 0.5] WARNING: early boot noise is not a finding")
        print("[ 9.0] virtme-ng-init: starting script")
        print("[ 9.5] WARNING: CPU: 1 PID: 80 at kernel/bpf/verifier.c:1234 check_mem_access")
        obs = {"source": "kernel", "env": {"kernel_release": "6.1.0-56-amd64"},
               "object": {"path": requests[0]["object"], "sha256": "00"}}
        answer = {"guest": {"kernel_release": "6.1.0-56-amd64", "probe": {"bpf_usable": True}},
                  "results": [{"observation": obs}, {"error": {"type": "ValueError", "message": "bad map"}}]}
        json.dump(answer, open(os.path.join(rwdir, "results.json"), "w"))
    """)
    session = VmSession(VmConfig(kernel_image=fake_env, accel="tcg", vng=vng))
    obj = _object(tmp_path)
    ok, failed = session.run_batch([{"object": obj, "loader": "libbpf"}, {"object": obj, "loader": "raw"}])
    assert ok["source"] == "vm" and ok["object"] == {"path": obj, "sha256": "00"}
    assert ok["env"]["vm_accel"] == "tcg" and ok["env"]["vm_seconds"] > 0
    assert ok["env"]["vm_kernel_warnings"] == ["[ 9.5] WARNING: CPU: 1 PID: 80 at kernel/bpf/verifier.c:1234 "
                                               "check_mem_access"]
    assert failed["error"] == {"type": "ValueError", "message": "bad map"}
    assert failed["object"] == {"path": obj} and failed["env"]["kernel_release"] == "6.1.0-56-amd64"
    assert not list((tmp_path / "scratch").iterdir())


def test_a_kernel_without_bpf_is_unavailable(tmp_path, fake_env):
    vng = _fake_vng(tmp_path, """
        import json
        probe = {"bpf_usable": False, "bpf_unusable_reason": "bpf() not implemented (ENOSYS)"}
        answer = {"guest": {"kernel_release": "6.1.0-x", "probe": probe},
                  "results": [{"error": {"type": "BackendUnavailable", "message": "bpf() not implemented"}}]}
        json.dump(answer, open(os.path.join(rwdir, "results.json"), "w"))
    """)
    session = VmSession(VmConfig(kernel_image=fake_env, accel="tcg", vng=vng))
    with pytest.raises(VmUnavailable, match=r"^kernel 6.1.0-x cannot load BPF programs: bpf\(\) not implemented"):
        session.run_batch([{"object": _object(tmp_path)}])


def test_command_line(tmp_path, fake_env):
    vng = _fake_vng(tmp_path, "")
    session = VmSession(VmConfig(kernel_image=fake_env, accel="tcg", vng=vng, cpus=3, memory="2G"))
    argv = session.command(tmp_path, fake_env)
    assert argv[:4] == [str(vng), "--run", str(fake_env), "--disable-kvm"]
    for flag, value in (("--cpus", "3"), ("--memory", "2G"), ("--rwdir", str(tmp_path))):
        assert argv[argv.index(flag) + 1] == value
    assert "--force-9p" in argv and "--verbose" in argv
    guest = argv[argv.index("--exec") + 1]
    assert guest.startswith(f"env PYTHONPATH={ROOT} ") and f"{sys.executable} -m backends.vm.agent" in guest
    session.accel = "kvm"
    assert "--disable-kvm" not in session.command(tmp_path, fake_env)


def test_bad_requests_are_refused_before_booting(tmp_path, fake_env):
    session = VmSession(VmConfig(kernel_image=fake_env, accel="tcg", vng=_fake_vng(tmp_path, "raise SystemExit(9)")))
    with pytest.raises(ValueError, match="absolute path"):
        session.run_batch([{"object": "x.o"}])
    with pytest.raises(ValueError, match="loader"):
        session.run_batch([{"object": _object(tmp_path), "loader": "bpftool"}])
    with pytest.raises(ValueError, match="libbpf must be the absolute path"):
        session.run_batch([{"object": _object(tmp_path), "libbpf": "libbpf.so"}])
    with pytest.raises(ValueError, match="not hex"):
        session.run_batch([{"object": _object(tmp_path), "initial_values": {".data": "zz"}}])


# -- the agent, run on this host in place of a guest -----------------------------------------------------------

SOURCE = """\
#define SEC(n) __attribute__((section(n), used))
typedef unsigned int __u32;
static __u32 (*bpf_get_smp_processor_id)(void) = (void *) 8;
char _license[] SEC("license") = "GPL";
int hits = 7;
SEC("raw_tp") int touch(void *ctx) { hits += 1; return bpf_get_smp_processor_id(); }
"""


@pytest.fixture(scope="module")
def smoke_object() -> str:
    from toolchain.clang import Clang, ToolchainError, compile_c

    try:
        return str(compile_c(Clang.find(), SOURCE, name="vm_test"))
    except ToolchainError as e:
        pytest.skip(f"toolchain: {e}")


@pytest.mark.kernel
def test_agent_plumbing_on_this_host(tmp_path, fake_env, smoke_object):
    from backends.kernel.observe import BackendUnavailable, require_bpf

    try:
        require_bpf()
    except BackendUnavailable as e:
        pytest.skip(f"kernel backend unavailable: {e}")
    # the stand-in runs the guest command here, so the whole round trip but the boot is exercised
    vng = _fake_vng(tmp_path, """
        sys.exit(subprocess.run(command, shell=True).returncode)
    """)
    session = VmSession(VmConfig(kernel_image=fake_env, accel="tcg", vng=vng, timeout=120))
    bad = tmp_path / "bad.o"
    bad.write_bytes(b"not an object")
    requests = [
        {"object": smoke_object, "loader": "libbpf", "runs": [["touch", 0, 2]], "initial_values": {}},
        {"object": smoke_object, "loader": "raw", "runs": [["touch", 0, 1]],
         "initial_values": {"vm_test.data": "2a000000"}},
        {"object": str(bad), "loader": "libbpf", "runs": []},
        # an object set: the same object twice, the second reusing the first's .data map
        {"objects": [smoke_object, smoke_object], "loader": "raw", "reuse": [[1, ".data", 0]], "attach": [],
         "runs": [["touch", 0, 1]], "initial_values": [{}, {}]},
    ]
    libbpf_doc, raw_doc, bad_doc, set_doc = session.run_batch(requests)
    for doc in (libbpf_doc, raw_doc):
        assert doc["source"] == "vm" and doc["object"]["path"] == smoke_object
        assert doc["env"]["vm_accel"] == "tcg" and doc["env"]["vm_seconds"] > 0
        assert doc["env"]["kernel_release"] == os.uname().release
    assert libbpf_doc["runs"][0]["retval"] == [0, 0]
    data = next(m for m in libbpf_doc["maps"] if m["name"].endswith(".data"))
    assert data["before"] == ["07000000"] and data["after"] == ["09000000"]
    data = next(m for m in raw_doc["maps"] if m["name"] == "vm_test.data")
    assert data["before"] == ["2a000000"] and data["after"] == ["2b000000"]
    assert bad_doc["error"]["type"] and bad_doc["object"]["path"] == str(bad)
    assert [o["object"]["path"] for o in set_doc["objects"]] == [smoke_object, smoke_object]
    assert all(o["source"] == "vm" for o in set_doc["objects"])
    assert set_doc["objects"][0]["maps"][0]["after"] == set_doc["objects"][1]["maps"][0]["after"]
    assert session.guest["probe"]["bpf_usable"] is True
    assert re.search(r"percpu-vm: \[ *[0-9.]+s\] 3/4 bad.o \[libbpf\] error", session.last_console)


def test_agent_reports_a_fatal_failure(tmp_path):
    (tmp_path / "requests.json").write_text("{not json")
    proc = subprocess.run([sys.executable, "-m", "backends.vm.agent", str(tmp_path)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert json.loads((tmp_path / "results.json").read_text())["fatal"].startswith("JSONDecodeError")


# -- one real boot ---------------------------------------------------------------------------------------------


def _real_boot_prerequisites() -> str | None:
    if shutil.which(runner.QEMU) is None:
        return "qemu-system-x86_64 not installed (apt-get install qemu-system-x86)"
    try:
        runner._find_vng(None)
    except VmUnavailable as e:
        return str(e)
    if not any(shutil.which(n) for n in runner.BUSYBOX_NAMES):
        return "busybox not installed (apt-get install busybox-static)"
    images = [p for p in runner._generic_images(runner.BOOT_DIR) if p.name.startswith("vmlinuz-6.1.")]
    if not images:
        return "no Debian 6.1 generic kernel in /boot (apt-get install linux-image-amd64)"
    return None


@pytest.mark.slow
def test_real_boot_smoke():
    reason = _real_boot_prerequisites()
    if reason:
        pytest.skip(reason)
    from backends.vm.__main__ import run_smoke

    image = [p for p in runner._generic_images(runner.BOOT_DIR) if p.name.startswith("vmlinuz-6.1.")][-1]
    try:
        session, docs = run_smoke(image, cpus=2, timeout=600)
    except VmUnavailable as e:
        pytest.skip(f"vm backend unavailable: {e}")
    assert session.guest["kernel_release"].startswith("6.1.")
    for doc in docs:
        assert "error" not in doc, doc.get("error")
        assert doc["source"] == "vm" and doc["env"]["kernel_release"].startswith("6.1.")
        assert doc["env"]["features"]["percpu_data"] is False
        assert doc["env"]["possible_cpus"] == 2 and doc["env"]["vm_seconds"] > 0
        assert [(r["cpu"], r["retval"]) for r in doc["runs"]] == [(0, [0]), (1, [1])]
    assert docs[0]["env"]["profile"] == "unpatched"
