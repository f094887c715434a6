"""The persistent guest on the provisioned stack: it answers, survives its own failures, and reports the kernel's
complaints. A guest that panics or hangs fails that request with the console's end and the next request boots a
new one; a WARN printed while a request runs is in that request's answer. Skipped, with the reason, where the
stack is not provisioned or QEMU cannot run."""

from __future__ import annotations

import socket

import pytest

from backends.vm.machine import GuestFailure, VmMachine
from backends.vm.runner import VmConfig, VmUnavailable

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def machine():
    from backends.stack import StackUnavailable, stack_paths

    try:
        paths = stack_paths(provision=False)
        vm = VmMachine(VmConfig(kernel_image=paths.kernel_image, modules=paths.modules, cpus=2), maxcpus=3)
    except (StackUnavailable, VmUnavailable) as e:
        pytest.skip(str(e))
    yield vm
    vm.close()
    assert not vm.running


def test_guest_has_more_possible_than_online_cpus(machine):
    probe = machine.start()["probe"]
    assert probe["possible_cpus"] == 3 and probe["online_cpus"] == [0, 1]
    assert probe["features"]["percpu_data"] is True


def test_a_kernel_complaint_is_in_the_answer(machine):
    answer = machine.request({"kind": "complain"})
    assert any("WARNING: injected complaint" in line for line in answer["kernel_log"])
    assert machine.request({"kind": "probe"})["kernel_log"] == []


def test_a_panic_fails_the_request_and_the_next_one_boots_anew(machine):
    machine.start()
    boots, retried = machine.boots, len(machine.boot_failures)
    with pytest.raises(GuestFailure) as failed:
        machine.request({"kind": "crash"}, timeout=60)
    assert "Kernel panic" in str(failed.value) and "sysrq" in failed.value.console_tail.lower()
    assert not machine.running
    assert "probe" in machine.request({"kind": "probe"})
    # one new boot, and one more for each boot that panicked by itself and was retried
    assert machine.boots == boots + 1 + len(machine.boot_failures) - retried, machine.boot_failures


def test_a_hang_is_killed_at_the_request_timeout(machine):
    machine.start()
    boots, retried = machine.boots, len(machine.boot_failures)
    with pytest.raises(GuestFailure, match="did not answer"):
        machine.request({"kind": "hang"}, timeout=5)
    assert not machine.running
    assert "probe" in machine.request({"kind": "probe"})
    # one new boot, and one more for each boot that panicked by itself and was retried
    assert machine.boots == boots + 1 + len(machine.boot_failures) - retried, machine.boot_failures


def test_a_host_that_goes_away_leaves_no_guest(machine):
    """However the host ends (SIGKILL, a lost xdist worker), its socket closes: the agent sees the end of its
    port and powers the guest off, with no shutdown request."""
    machine.start()
    proc = machine._proc
    assert proc is not None and machine._conn is not None
    machine._conn.shutdown(socket.SHUT_RDWR)  # what the kernel does to a dead process's socket
    proc.wait(timeout=120)
    machine._copier.join(5)
    assert "the host is gone; powering off" in machine.console_tail()
    machine.close()
    assert "probe" in machine.request({"kind": "probe"})


def test_a_host_gone_during_boot_leaves_no_guest(machine, monkeypatch):
    """The host ends while the guest still boots: the agent's first word finds nobody, and the guest ends
    rather than wait for ever on its port."""
    machine.close()
    consoles: list[str] = []

    def leave_at_once(self, scratch, deadline, start):
        conn, _ = self._listener.accept()  # QEMU connected; the host goes away before the agent speaks
        conn.close()
        self._listener.close()
        self._listener = None
        self._proc.wait(timeout=240)  # TimeoutExpired if the guest outlives its host
        self._copier.join(5)
        consoles.append(self.console_tail())
        raise GuestFailure("left", "")

    monkeypatch.setattr(VmMachine, "_wait_ready", leave_at_once)
    for _ in range(2):  # a boot that panics by itself under TCG (rare, early) proves nothing either way
        with pytest.raises(GuestFailure, match="left"):
            machine._boot()
        if "Kernel panic" not in consoles[-1]:
            break
    assert "the host is gone; powering off" in consoles[-1]
    monkeypatch.undo()
    machine.close()
    assert not machine.running
