"""The wire to the persistent guest agent: whole documents however the bytes arrive, end of file when the host is
gone, files that keep their names, and the agent's port found by its name."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from backends.vm.agent import _unpacked
from backends.vm.channel import PORT_NAME, LineChannel, find_port, pack_file, qemu_options, unpack_file


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield LineChannel(a.fileno()), LineChannel(b.fileno()), a, b
    a.close()
    b.close()


def test_documents_arrive_whole_and_in_order(pair):
    host, guest, a, _ = pair
    big = {"stdout": "x" * 300_000}  # larger than one read and than the socket's buffer takes at once
    for doc in ({"kind": "probe"}, {"kind": "observe", "runs": [["p", 0, 1]]}):
        guest.send(doc)
    assert host.receive() == {"kind": "probe"}
    assert host.receive() == {"kind": "observe", "runs": [["p", 0, 1]]}
    pid = os.fork()
    if pid == 0:  # the writer blocks until the reader drains: write from a child
        guest.send(big)
        os._exit(0)
    assert host.receive() == big
    os.waitpid(pid, 0)


def test_end_of_file_means_the_other_side_is_gone(pair):
    host, guest, _, b = pair
    guest.send({"ok": True})
    b.shutdown(socket.SHUT_RDWR)
    assert host.receive() == {"ok": True}
    assert host.receive() is None


def test_files_keep_their_names_and_bytes(tmp_path):
    src = tmp_path / "host" / "prog_7.bpf.o"
    src.parent.mkdir()
    src.write_bytes(bytes(range(256)) * 3)
    packed = pack_file(src)
    out = Path(unpack_file(packed, tmp_path / "guest" / "0"))
    assert out.name == "prog_7.bpf.o" and out.read_bytes() == src.read_bytes()


def test_a_request_names_the_guest_copies_of_its_files(tmp_path):
    a, b = tmp_path / "a.o", tmp_path / "b.o"
    a.write_bytes(b"A")
    b.write_bytes(b"B")
    req = {"kind": "observe_set", "files": {"objects": [pack_file(a), pack_file(b)], "object": pack_file(a)}}
    doc = _unpacked(req, tmp_path / "guest")
    assert "files" not in doc and doc["kind"] == "observe_set"
    assert [Path(p).read_bytes() for p in doc["objects"]] == [b"A", b"B"]
    assert len({Path(p).parent for p in doc["objects"]}) == 2  # same-named objects must not overwrite each other
    assert Path(doc["object"]).read_bytes() == b"A"


def test_the_agent_port_is_found_by_its_name(tmp_path):
    ports = tmp_path / "virtio-ports"
    for port, name in (("vport2p1", "virtme.stdin"), ("vport8p1", PORT_NAME), ("vport9p1", None)):
        (ports / port).mkdir(parents=True)
        if name:
            (ports / port / "name").write_text(name + "\n")
    assert find_port(ports, tmp_path / "dev") == tmp_path / "dev" / "vport8p1"
    (ports / "vport8p1" / "name").write_text("something.else\n")
    with pytest.raises(FileNotFoundError, match=PORT_NAME):
        find_port(ports, tmp_path / "dev")


def test_qemu_connects_the_named_port_to_the_host_socket(tmp_path):
    opts = qemu_options(tmp_path / "agent.sock")
    chardev = opts[opts.index("-chardev") + 1]
    assert chardev.startswith("socket,") and f"path={tmp_path / 'agent.sock'}" in chardev
    assert "server" not in chardev  # the host listens; QEMU connects as it starts
    assert f"name={PORT_NAME}" in opts[-1]


def test_a_non_blocking_end_waits_for_data_and_sees_the_hangup(pair):
    """The guest's end is non-blocking: a read waits in poll() for data or the host's end, never spins, never
    blocks past a hangup; a write to a host that is gone raises instead of waiting for ever."""
    host, guest, a, b = pair
    os.set_blocking(b.fileno(), False)
    pid = os.fork()
    if pid == 0:
        time.sleep(0.2)
        host.send({"kind": "probe"})
        host.send({"stdout": "y" * 300_000})
        os._exit(0)
    assert guest.receive() == {"kind": "probe"}
    assert guest.receive() == {"stdout": "y" * 300_000}
    os.waitpid(pid, 0)
    a.shutdown(socket.SHUT_RDWR)
    assert guest.receive() is None
    with pytest.raises(BrokenPipeError):
        guest.send({"answer": "x" * 300_000})
