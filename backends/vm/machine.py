"""A guest that stays up: boot once, then answer requests one at a time (docs/vm-backend.md).

`VmMachine.request` hands the guest agent (`backends.vm.agent --serve`) one request over its virtio-serial port
(`backends.vm.channel`) and waits for its answer. A guest that panics, hangs past the request's timeout or stops
answering is killed; the request fails with `GuestFailure` carrying the end of the console, and the next request
boots a new guest, so one bad example never ends a session. `close` shuts the guest down and always leaves nothing
running.
"""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from backends.vm import runner
from backends.vm.channel import LineChannel, pack_file, qemu_options
from backends.vm.runner import PROJECT_ROOT, VmConfig, VmError, VmSession, VmUnavailable

__all__ = ["GuestFailure", "VmMachine"]

BOOT_TIMEOUT = 240.0  # TCG boots a distribution kernel in 20-45 s; a loaded machine takes longer
REQUEST_TIMEOUT = 120.0  # one observation takes 0.1-1 s under TCG; past this the guest is taken for hung
WAIT_SLICE = 0.25  # how often a wait for the guest looks whether QEMU is still there
_PANIC = re.compile(r"Kernel panic|end Kernel panic|Out of memory: Killed process|oom-kill:")


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
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._channel: LineChannel | None = None

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
        return [*argv, "--qemu-opts=" + shlex.join(qemu_options(scratch / "agent.sock"))]

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> dict[str, Any]:
        """Boot and wait for the agent's probe; VmError with the console tail when the guest never gets there.
        A boot that fails (under TCG a distribution kernel rarely panics in early boot) is tried once more, and
        kept in `boot_failures`."""
        if self.running:
            assert self.guest is not None
            return self.guest
        try:
            return self._boot()
        except GuestFailure as e:
            self.boot_failures.append(f"{e}\n{e.console_tail}")
            return self._boot()

    def _boot(self) -> dict[str, Any]:
        self._cleanup()
        scratch = Path(tempfile.mkdtemp(prefix="percpu-vm-"))
        self._scratch, self._console, self._seq = scratch, scratch / "console.log", 0
        # listening before QEMU starts: QEMU connects the agent's port to this socket as it comes up
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(scratch / "agent.sock"))
        self._listener.listen(1)
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(self.session.vng.parent), env.get("PATH", os.defpath)])
        start = time.monotonic()
        self._proc = subprocess.Popen(self.command(scratch), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, env=env, cwd=PROJECT_ROOT, start_new_session=True)
        assert self._proc.stdout is not None
        self._copier = threading.Thread(target=runner._copy, args=(self._proc.stdout, self._console), daemon=True)
        self._copier.start()
        self.boots += 1
        deadline = start + min(self.config.timeout, BOOT_TIMEOUT) if self.config.timeout else start + BOOT_TIMEOUT
        doc = self._wait_ready(scratch, deadline, start)
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

    def _wait_ready(self, scratch: Path, deadline: float, start: float) -> dict[str, Any]:
        """QEMU's connection, then the agent's first line (its probe); a failure before serving lands in
        ready.json on the shared directory instead."""
        assert self._listener is not None
        while True:
            if not self.running:
                assert self._proc is not None
                raise self._fail(f"guest ended during boot (vng exit {self._proc.returncode})")
            if time.monotonic() > deadline:
                raise self._fail(f"guest not ready within {deadline - start:.0f}s of boot")
            fatal = scratch / "ready.json"
            if fatal.exists():
                return dict(json.loads(fatal.read_text()))
            if self._conn is None:
                if select.select([self._listener], [], [], WAIT_SLICE)[0]:
                    self._conn, _ = self._listener.accept()
                    self._channel = LineChannel(self._conn.fileno())
                continue
            assert self._channel is not None
            if self._channel.has_line():
                return self._channel.take()
            if select.select([self._conn], [], [], WAIT_SLICE)[0] and not self._channel.feed():
                raise self._fail("the guest closed its channel during boot")

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
        for sock in (self._conn, self._listener):
            if sock is not None:
                sock.close()
        self._conn = self._listener = self._channel = None
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

    def _send(self, req: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        assert self._channel is not None and self._conn is not None
        seq = self._seq
        try:
            self._channel.send(req)
        except OSError as e:
            raise self._fail(f"guest channel broke sending request {seq} ({req.get('kind')}): {e}") from None
        deadline = time.monotonic() + timeout
        while not self._channel.has_line():
            if not self.running:
                raise self._fail(f"guest died during request {seq} ({req.get('kind')})")
            if time.monotonic() > deadline:
                raise self._fail(f"guest did not answer request {seq} ({req.get('kind')}) within {timeout:g}s; "
                                 "killed")
            ready = select.select([self._conn], [], [], min(WAIT_SLICE, max(0.0, deadline - time.monotonic())))[0]
            if ready and not self._channel.feed():
                raise self._fail(f"guest closed its channel during request {seq} ({req.get('kind')})")
        self._seq += 1
        return self._channel.take()

    def request(self, req: Mapping[str, Any], *, objects: Mapping[str, str | os.PathLike[str]] | None = None,
                timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]:
        """Send one request, booting first when no guest is up. `objects` names request keys whose host files
        travel with the request ("object", or "objects" for a list); the agent puts the guest's copies' paths
        there. Returns the agent's answer:
        {"observation"|"probe"|"error": ..., "kernel_log": [...], "seconds": s}."""
        if not self.running:
            self.start()
        files = {key: [pack_file(p) for p in value] if isinstance(value, list | tuple) else pack_file(value)
                 for key, value in (objects or {}).items()}
        return self._send({**req, "files": files} if files else req, timeout)
