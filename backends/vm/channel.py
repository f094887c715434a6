"""The wire between the host and the persistent guest agent (docs/vm-backend.md): one JSON document per line
over a virtio-serial port that QEMU connects to a Unix socket the host listens on.

Files a request needs (objects, the host's reading of them) travel inside it, base64-encoded, and the agent
writes them into the guest's own tmpfs: a file read over 9p costs about 9 ms under TCG and a written one 16 ms,
against well under 1 ms a kilobyte over the port. The port also tells the guest when the host is gone, however
the host ended: once the socket closes, a read returns end of file and poll() reports a hangup. A blocking
write would wait for a host that never comes back, so the guest opens its port non-blocking.
"""

from __future__ import annotations

import base64
import json
import os
import select
from pathlib import Path
from typing import Any

__all__ = ["PORT_NAME", "LineChannel", "find_port", "pack_file", "qemu_options", "unpack_file"]

PORT_NAME = "percpu.agent"
_CHARDEV = "percpuagent"
_PORTS = Path("/sys/class/virtio-ports")


def qemu_options(socket_path: str | os.PathLike[str]) -> list[str]:
    """QEMU arguments adding the agent's port, connected to the host's listening socket at `socket_path`."""
    return ["-chardev", f"socket,id={_CHARDEV},path={socket_path}", "-device", "virtio-serial-pci",
            "-device", f"virtserialport,name={PORT_NAME},chardev={_CHARDEV}"]


def find_port(ports: Path = _PORTS, dev: Path = Path("/dev")) -> Path:
    """The guest's device node for the agent's port (devtmpfs names it vportNpM; udev's alias may be absent)."""
    for entry in sorted(ports.glob("*")):
        try:
            if (entry / "name").read_text().strip() == PORT_NAME:
                return dev / entry.name
        except OSError:
            continue
    raise FileNotFoundError(f"no virtio-serial port named {PORT_NAME} under {ports}")


class LineChannel:
    """JSON documents, one per line, over a file descriptor (the guest's port, the host's socket), blocking or
    not: on a non-blocking one, a wait is a poll() that a hangup ends."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = b""

    def _wait(self, event: int) -> int:
        poller = select.poll()
        poller.register(self.fd, event | select.POLLHUP)
        return poller.poll()[0][1]

    def send(self, doc: Any) -> None:  # noqa: ANN401 - any JSON document
        """Write one document; BrokenPipeError when the other side is gone."""
        data = (json.dumps(doc) + "\n").encode()
        while data:  # a port or socket may take part of a large answer at a time
            try:
                data = data[os.write(self.fd, data):]
            except BlockingIOError:
                if not self._wait(select.POLLOUT) & select.POLLOUT:
                    raise BrokenPipeError("the other side of the channel is gone") from None

    def has_line(self) -> bool:
        return b"\n" in self._buffer

    def feed(self) -> bool:
        """Read what is there (waiting until something is); False at end of file."""
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
                break
            except BlockingIOError:
                self._wait(select.POLLIN)  # data, or a hangup, after which the read returns end of file
        self._buffer += chunk
        return bool(chunk)

    def take(self) -> dict[str, Any]:
        line, _, self._buffer = self._buffer.partition(b"\n")
        return dict(json.loads(line))

    def receive(self) -> dict[str, Any] | None:
        """The next document, or None when the other side is gone."""
        while not self.has_line():
            if not self.feed():
                return None
        return self.take()


def pack_file(path: str | os.PathLike[str]) -> dict[str, str]:
    path = Path(path)
    return {"name": path.name, "data": base64.b64encode(path.read_bytes()).decode()}


def unpack_file(packed: dict[str, str], directory: Path) -> str:
    """Write a packed file under `directory`, keeping its name (libbpf derives map names from it)."""
    directory.mkdir(parents=True, exist_ok=True)
    dst = directory / Path(packed["name"]).name
    dst.write_bytes(base64.b64decode(packed["data"]))
    return str(dst)
