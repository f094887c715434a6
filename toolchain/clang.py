"""clang as a subprocess: find it, record its version, compile with a timeout into a content-addressed cache."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CANDIDATES = ("clang-19", "clang-20", "clang-18", "clang")
MIN_MAJOR = 18  # clang 17 crashed on 1-byte variables in .percpu sections (spec §7)


class ToolchainError(RuntimeError):
    """A one-line reason the toolchain cannot be used (missing, too old, crashing)."""


class CompileError(RuntimeError):
    """clang rejected a source: carries the source and clang's stderr for the report."""

    def __init__(self, message: str, source: str, stderr: str) -> None:
        super().__init__(message)
        self.source = source
        self.stderr = stderr

    def report(self) -> str:
        numbered = "\n".join(f"{i + 1:4} {line}" for i, line in enumerate(self.source.splitlines()))
        return f"{self}\n--- source ---\n{numbered}\n--- clang stderr ---\n{self.stderr}"


@dataclass(frozen=True)
class CompileOptions:
    opt: str = "-O2"
    mcpu: str = "v3"
    debug: bool = True  # BTF needs -g

    def flags(self) -> list[str]:
        out = ["-target", "bpf", self.opt, f"-mcpu={self.mcpu}", "-c", "-x", "c"]
        return out + (["-g"] if self.debug else [])


@dataclass(frozen=True)
class Clang:
    path: str
    version: str

    @classmethod
    def find(cls, explicit: str | None = None) -> Clang:
        if explicit:
            path = shutil.which(explicit) or (explicit if os.access(explicit, os.X_OK) else None)
            if not path:
                raise ToolchainError(f"clang not found at {explicit!r}")
        else:
            path = next((p for p in map(shutil.which, DEFAULT_CANDIDATES) if p), None)
            if not path:
                raise ToolchainError("clang not found (looked for " + ", ".join(DEFAULT_CANDIDATES)
                                     + "); run `make setup` or pass --clang PATH")
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ToolchainError(f"clang at {path} does not run: {e}") from None
        m = re.search(r"clang version (\d+)\.(\d+)\.(\d+)", out)
        if not m:
            raise ToolchainError(f"{path} does not look like clang: {out.splitlines()[:1]}")
        if int(m.group(1)) < MIN_MAJOR:
            raise ToolchainError(f"clang {m.group(0)[14:]} at {path} is too old (need >= {MIN_MAJOR})")
        return cls(path, ".".join(m.groups()))


def cache_dir() -> Path:
    root = Path(os.environ.get("PERCPU_CACHE", Path.home() / ".cache" / "percpu-conformance")) / "objects"
    root.mkdir(parents=True, exist_ok=True)
    return root


def compile_c(clang: Clang, source: str, options: CompileOptions = CompileOptions(),
              *, timeout: float = 60.0, name: str = "prog") -> Path:
    """Compile `source` to an object named `<name>.bpf.o` (libbpf derives the object name from the file).

    The cache key covers the clang binary, its flags and the source, so a hit is the same object.
    """
    key = hashlib.sha256("\0".join([clang.path, clang.version, *options.flags(), source]).encode()).hexdigest()
    out_dir = cache_dir() / key[:2] / key
    obj = out_dir / f"{name}.bpf.o"
    if obj.exists():
        return obj
    out_dir.mkdir(parents=True, exist_ok=True)
    # write to a temporary name first so a concurrent worker never sees a half-written object
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".o.tmp")
    os.close(fd)
    try:
        proc = subprocess.run([clang.path, *options.flags(), "-", "-o", tmp], input=source,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        Path(tmp).unlink(missing_ok=True)
        raise CompileError(f"clang timed out after {timeout:g}s", source, "") from None
    if proc.returncode != 0:
        Path(tmp).unlink(missing_ok=True)  # clang removes its own output on failure
        what = "crashed" if proc.returncode < 0 or "PLEASE submit a bug report" in proc.stderr else "failed"
        first = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip()[:200])
        raise CompileError(f"clang {what} (exit {proc.returncode}): {first}", source, proc.stderr)
    os.replace(tmp, obj)
    return obj
