"""A guest that stays up: boot once, then answer requests one at a time (docs/vm-backend.md).

`VmMachine.request` hands the guest agent (`backends.vm.agent --serve`) one request through the shared scratch
directory and waits for its answer. A guest that panics, hangs past the request's timeout or stops answering is
killed; the request fails with `GuestFailure` carrying the end of the console, and the next request boots a new
guest, so one bad example never ends a session. `close` shuts the guest down and always leaves nothing running.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from backends.vm import runner
from backends.vm.agent import HEARTBEAT
from backends.vm.runner import PROJECT_ROOT, VmConfig, VmError, VmSession, VmUnavailable

__all__ = ["GuestFailure", "VmMachine"]

BOOT_TIMEOUT = 240.0  # TCG boots a distribution kernel in 20-45 s; a loaded machine takes longer
REQUEST_TIMEOUT = 120.0  # one observation takes 0.1-1 s under TCG; past this the guest is taken for hung
POLL_SECONDS = 0.002
HEARTBEAT_SECONDS = 2.0
_PANIC = re.compile(r"Kernel panic|end Kernel panic|Out of memory: Killed process|oom-kill:")


def _heartbeat(path: Path, stop: threading.Event) -> None:
    """Touch `path` while this process holds the guest: a host killed without closing it (SIGKILL, a lost
    xdist worker) stops beating, and the agent powers the guest off instead of leaving it running."""
    while not stop.is_set():
        try:
            path.touch()
        except OSError:
            return
        stop.wait(HEARTBEAT_SECONDS)


class GuestFailure(VmError):
    """The guest panicked, hung or died during a request; it was killed and the next request boots anew."""


class VmMachine:
    """One persistent guest booted from `config.kernel_image`, with `maxcpus` possible CPUs of which
    `config.cpus` stay online: per-CPU images must reach CPUs that cannot run."""

    def __init__(self, config: VmConfig, maxcpus: int | None = None) -> None:
        self.session = VmSession(config)  # checks the image, QEMU, busybox, vng and chooses the accelerator
        self.config = config
        self.maxcpus = maxcpus if maxcpus is not None else config.cpus
        if self.maxcpus < config.cpus:
            raise ValueError(f"maxcpus {self.maxcpus} < cpus {config.cpus}")
        self.release = self.session.release
        self.accel, self.accel_notice = self.session.accel, self.session.accel_notice
        self.guest: dict[str, Any] | None = None  # the agent's probe at boot
        self.boots = 0
        self.boot_failures: list[str] = []  # boots that failed and were tried again
        self.boot_seconds: float | None = None  # boot to agent ready, the last boot
        self._proc: subprocess.Popen[bytes] | None = None
        self._scratch: Path | None = None
        self._console: Path | None = None
        self._copier: threading.Thread | None = None
        self._seq = 0
        self._beat: threading.Event | None = None

    # -- life cycle ---------------------------------------------------------------------------------------------

    def command(self, scratch: Path) -> list[str]:
        guest = shlex.join(["env", f"PYTHONPATH={PROJECT_ROOT}", "PYTHONDONTWRITEBYTECODE=1",
                            str(self.session.python), "-m", "backends.vm.agent", "--serve", str(scratch),
                            "--online", str(self.config.cpus)])
        argv = self.session.command(scratch, self.session._stage_kernel(scratch))
        argv[argv.index("--exec") + 1] = guest
        # Boot every possible CPU and let the agent take the extra ones offline: QEMU's hotpluggable CPUs
        # (-smp N,maxcpus=M) are not possible CPUs to kernels whose topology code ignores disabled MADT
        # entries (7.3: "Allowing 2 present CPUs plus 0 hotplug CPUs"), while an offlined CPU stays possible.
        argv[argv.index("--cpus") + 1] = str(self.maxcpus)
        return argv

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> dict[str, Any]:
        """Boot and wait for the agent's probe; VmError with the console tail when the guest never gets there."""
        if self.running:
            assert self.guest is not None
            return self.guest
        self._cleanup()
        scratch = Path(tempfile.mkdtemp(prefix="percpu-vm-"))
        self._scratch, self._console, self._seq = scratch, scratch / "console.log", 0
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(self.session.vng.parent), env.get("PATH", os.defpath)])
        start = time.monotonic()
        self._proc = subprocess.Popen(self.command(scratch), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, env=env, cwd=PROJECT_ROOT, start_new_session=True)
        assert self._proc.stdout is not None
        self._copier = threading.Thread(target=runner._copy, args=(self._proc.stdout, self._console), daemon=True)
        self._copier.start()
        self.boots += 1
        self._beat = threading.Event()
        threading.Thread(target=_heartbeat, args=(scratch / HEARTBEAT, self._beat), daemon=True).start()
        ready = scratch / "ready.json"
        deadline = start + min(self.config.timeout, BOOT_TIMEOUT) if self.config.timeout else start + BOOT_TIMEOUT
        while not ready.exists():
            if not self.running:
                raise self._fail(f"guest ended during boot (vng exit {self._proc.returncode})")
            if time.monotonic() > deadline:
                raise self._fail(f"guest not ready within {deadline - start:.0f}s of boot")
            time.sleep(0.05)
        doc = json.loads(ready.read_text())
        if "fatal" in doc:
            raise self._fail(f"guest agent failed: {doc['fatal']}")
        self.boot_seconds = round(time.monotonic() - start, 3)
        guest = doc["guest"]
        probe = guest.get("probe") or {}
        if not probe.get("bpf_usable", True):
            self.close()
            raise VmUnavailable(f"kernel {guest.get('kernel_release')} cannot load BPF programs: "
                                f"{probe.get('bpf_unusable_reason') or 'bpf() unusable'}")
        self.guest = guest
        return guest

    def close(self) -> None:
        """Ask the agent to stop, then make sure vng and QEMU are gone and the scratch directory with them."""
        if self.running and self._scratch is not None:
            try:
                self._send({"kind": "shutdown"}, timeout=10.0)
                assert self._proc is not None
                self._proc.wait(timeout=30)
            except (VmError, subprocess.TimeoutExpired):
                pass
        self._cleanup()

    def _cleanup(self) -> None:
        if self._beat is not None:
            self._beat.set()
        if self._proc is not None:
            if self._proc.poll() is None:
                runner._kill_group(self._proc)
            runner._reap_group(self._proc)
            if self._copier is not None:
                self._copier.join(runner._KILL_GRACE)
            if self._proc.stdout is not None:
                self._proc.stdout.close()
        self._proc = self._copier = None
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
        self._scratch = None

    def __enter__(self) -> VmMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests -----------------------------------------------------------------------------------------------

    def console_tail(self) -> str:
        return runner._tail(runner._read(self._console)) if self._console is not None else ""

    def _fail(self, message: str) -> GuestFailure:
        """Kill the guest (the next request boots a new one) and describe what the console shows."""
        text = runner._read(self._console) if self._console is not None else ""
        panic = next((ln.strip() for ln in text.splitlines() if _PANIC.search(ln)), None)
        if panic is not None:
            message = f"{message}: {runner._one_line(panic)}"
        tail = runner._tail(text)
        self._cleanup()
        return GuestFailure(message, tail)

    def stage(self, path: str | os.PathLike[str], index: int = 0) -> str:
        """Copy an object into the shared directory, keeping its name (libbpf derives map names from it)."""
        assert self._scratch is not None
        dst = self._scratch / "objects" / str(self._seq) / str(index) / Path(path).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dst)
        return str(dst)

    def _send(self, req: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        assert self._scratch is not None
        seq = self._seq
        tmp = self._scratch / f"req-{seq}.json.tmp"
        tmp.write_text(json.dumps(req))
        os.replace(tmp, self._scratch / f"req-{seq}.json")
        answer = self._scratch / f"resp-{seq}.json"
        deadline = time.monotonic() + timeout
        while not answer.exists():
            if not self.running:
                raise self._fail(f"guest died during request {seq} ({req.get('kind')})")
            if time.monotonic() > deadline:
                raise self._fail(f"guest did not answer request {seq} ({req.get('kind')}) within {timeout:g}s; "
                                 "killed")
            time.sleep(POLL_SECONDS)
        self._seq += 1
        return json.loads(answer.read_text())

    def request(self, req: Mapping[str, Any], *, objects: Mapping[str, str | os.PathLike[str]] | None = None,
                timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]:
        """Send one request, booting first when no guest is up. `objects` names request keys whose host paths
        are staged into the shared directory ("object", or "objects" for a list). Returns the agent's answer:
        {"observation"|"probe"|"error": ..., "kernel_log": [...], "seconds": s}."""
        if not self.running:
            try:
                self.start()
            except GuestFailure as e:  # a boot that panicked (seen once under TCG) is tried once more
                self.boot_failures.append(str(e))
                self.start()
        doc = dict(req)
        for key, value in (objects or {}).items():
            doc[key] = ([self.stage(p, k) for k, p in enumerate(value)] if isinstance(value, list | tuple)
                        else self.stage(value))
        return self._send(doc, timeout)
