"""Where a libbpf under test comes from: a path, this machine's own, or the provisioned stack's.

`resolve_libbpf(spec)` turns a `libbpf=` setting into the path of a libbpf.so: `PATH`, `system` (the one the
dynamic loader finds) or `stack` (the provisioned stack's libbpf 1.8). It only checks that the file is there; the
backend that opens it reports what it makes of it.
"""

from __future__ import annotations

import ctypes.util
import os
from pathlib import Path

__all__ = ["LibbpfSourceError", "resolve_libbpf", "system_libbpf"]

_LIBDIRS = ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib")


class LibbpfSourceError(RuntimeError):
    """The libbpf a setting names cannot be had; the message is one line with what to do."""


def system_libbpf() -> Path:
    """This machine's own libbpf.so, as the dynamic loader would find it."""
    found = ctypes.util.find_library("bpf")
    for d in _LIBDIRS:
        if found and os.path.isfile(os.path.join(d, found)):
            return Path(os.path.realpath(os.path.join(d, found)))
    raise LibbpfSourceError("no system libbpf.so (apt-get install libbpf1)")


def resolve_libbpf(spec: str) -> str:
    if spec == "system":
        return str(system_libbpf())
    if spec == "stack":
        from backends.stack import StackUnavailable, stack_paths

        try:
            return str(stack_paths().libbpf)
        except StackUnavailable as e:
            raise LibbpfSourceError(f"the stack's libbpf: {e}") from None
    path = Path(spec)
    if not path.is_file():
        raise LibbpfSourceError(f"no libbpf at {spec} (want a libbpf.so path, system or stack)")
    return str(path.resolve())
