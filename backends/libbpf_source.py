"""Where a libbpf under test comes from: a path, this machine's own, the provisioned stack's, or one built here.

`resolve_libbpf(spec, patch)` turns a `libbpf=` setting into the path of a libbpf.so: `PATH`, `system` (the one the
dynamic loader finds), `stack` (the provisioned stack's libbpf 1.8), `src:DIR` (built from a kernel's tools/lib/bpf
or a standalone libbpf tree, after `patch -p1 < patch` inside a copy of DIR) or `debian:VERSION` (Debian's source
package of that upstream version, from sid). Builds are cached under the stack cache, keyed by what they are made
from. It only checks that the library is there; the backend that opens it reports what it makes of it.
"""

from __future__ import annotations

import ctypes.util
import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

__all__ = ["LibbpfSourceError", "resolve_libbpf", "system_libbpf"]

_LIBDIRS = ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib")


DEBIAN_SUITE = "sid"  # where Debian's libbpf versions (1.7.0 and on) are
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


class LibbpfSourceError(RuntimeError):
    """The libbpf a setting names cannot be had; the message is one line with what to do. `kind` is what failed:
    "usage" (a bad setting), "download" (Debian's archive) or "build"."""

    def __init__(self, message: str, kind: str = "usage") -> None:
        super().__init__(message)
        self.kind = kind


def system_libbpf() -> Path:
    """This machine's own libbpf.so, as the dynamic loader would find it."""
    found = ctypes.util.find_library("bpf")
    for d in _LIBDIRS:
        if found and os.path.isfile(os.path.join(d, found)):
            return Path(os.path.realpath(os.path.join(d, found)))
    raise LibbpfSourceError("no system libbpf.so (apt-get install libbpf1)")


def resolve_libbpf(spec: str, patch: str | None = None) -> str:
    if patch is not None and not spec.startswith("src:"):
        raise LibbpfSourceError(f"patch={patch} applies to a libbpf=src:DIR build only, not libbpf={spec}")
    if spec.startswith("src:"):
        return str(build_from_tree(Path(spec.removeprefix("src:")), Path(patch) if patch else None))
    if spec.startswith("debian:"):
        return str(build_from_debian(spec.removeprefix("debian:")))
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
        raise LibbpfSourceError(f"no libbpf at {spec} (want a libbpf.so path, system, stack, src:DIR or "
                                "debian:VERSION)")
    return str(path.resolve())


# -- built here --------------------------------------------------------------------------------------------------


def builds_root() -> Path:
    from backends.stack.provision import cache_root

    return cache_root() / "libbpf"


def _make_dir(tree: Path) -> Path:
    """Where make runs: a standalone libbpf (Debian's, GitHub's) builds in src/, a tools/lib/bpf in itself."""
    if (tree / "src" / "Makefile").is_file() and not (tree / "Makefile").is_file():
        return tree / "src"
    return tree


def _tree_digest(tree: Path, patch: bytes) -> str:
    """What a build is made from: every file of the tree (path and bytes) and the patch."""
    h = hashlib.sha256()
    for path in sorted(p for p in tree.rglob("*") if p.is_file() and not p.is_symlink()):
        h.update(str(path.relative_to(tree)).encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(b"patch\0" + patch)
    return h.hexdigest()[:16]


def _kernel_root(tree: Path) -> Path | None:
    """The kernel tree around a tools/lib/bpf, whose tools/include and tools/build its Makefile reads."""
    full = tree.resolve()
    if full.parts[-3:] == ("tools", "lib", "bpf") and (full.parents[2] / "tools" / "build").is_dir():
        return full.parents[2]
    return None


def build_from_tree(tree: Path, patch: Path | None = None) -> Path:
    """libbpf.so built from a copy of tree with patch applied, cached by both."""
    if not tree.is_dir():
        raise LibbpfSourceError(f"src:{tree}: no such directory (want a tools/lib/bpf or libbpf source tree)")
    if not ((tree / "Makefile").is_file() or (tree / "src" / "Makefile").is_file()):
        raise LibbpfSourceError(f"src:{tree}: no Makefile there or in src/ (want a tools/lib/bpf or libbpf tree)")
    if patch is not None and not patch.is_file():
        raise LibbpfSourceError(f"patch={patch}: no such file")
    patch_bytes = patch.read_bytes() if patch else b""
    target = builds_root() / f"src-{_tree_digest(tree, patch_bytes)}"
    return _build_cached(target, lambda scratch: _copy_and_patch(tree, patch, scratch),
                         what=f"src:{tree}" + (f",patch={patch}" if patch else ""))


def _copy_and_patch(tree: Path, patch: Path | None, scratch: Path) -> Path:
    """A copy of tree to patch. A tools/lib/bpf finds its build rules and headers three levels up, so it is copied
    into a skeleton of its kernel tree whose other entries are links to the original's."""
    root = _kernel_root(tree)
    copy = scratch / "tree"
    if root is not None:
        for parent, keep in ((root, "tools"), (root / "tools", "lib"), (root / "tools" / "lib", "bpf")):
            mirror = copy / parent.relative_to(root)
            mirror.mkdir(parents=True, exist_ok=True)
            for entry in parent.iterdir():
                if entry.name != keep:
                    (mirror / entry.name).symlink_to(entry)
        copy = copy / "tools" / "lib" / "bpf"
    shutil.copytree(tree, copy, symlinks=True)
    if patch is not None:
        done = subprocess.run(["patch", "-p1", "--batch", "--forward", "-i", str(patch.resolve())], cwd=copy,
                              capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stdout + done.stderr).strip().splitlines() or ["no output"]
            raise LibbpfSourceError(f"patch -p1 < {patch} does not apply to {tree}: {last[-1]}", "build")
    return copy


def _build_cached(target: Path, prepare: Callable[[Path], Path], what: str) -> Path:
    """The libbpf.so in target, building it first (in a scratch directory renamed in once complete)."""
    from backends.stack.provision import StackUnavailable, make_libbpf

    found = _built_so(target)
    if found is not None:
        return found
    scratch = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    log_file = target.with_name(f"{target.name}.build.log")
    try:
        tree = prepare(scratch)
        out = scratch / "out"
        out.mkdir()
        log_file.unlink(missing_ok=True)
        try:
            make_libbpf(_make_dir(tree), out, log_file, "build-libbpf")
        except StackUnavailable as e:
            raise LibbpfSourceError(f"{what}: {str(e).removeprefix(f'stack {e.step}: ')}", "build") from None
        if _built_so(out) is None:
            raise LibbpfSourceError(f"{what}: the build made no libbpf.so.X.Y.Z; see {log_file}", "build")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(out, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return _built_so(target)  # type: ignore[return-value]


def _built_so(directory: Path) -> Path | None:
    found = sorted(p for p in directory.glob("libbpf.so.*.*.*") if p.is_file()) if directory.is_dir() else []
    return found[-1] if found else None


def build_from_debian(version: str) -> Path:
    """Debian's libbpf source package of upstream version `version`, fetched from sid and built."""
    if not re.fullmatch(r"[0-9][0-9A-Za-z.+~:-]*", version):
        raise LibbpfSourceError(f"debian:{version}: want an upstream version such as debian:1.7.0")
    target = builds_root() / f"debian-{version}"
    if _built_so(target) is not None:
        return _built_so(target)  # type: ignore[return-value]
    return _build_cached(target, lambda scratch: _fetch_debian_source(version, scratch), what=f"debian:{version}")


def _fetch_debian_source(version: str, scratch: Path) -> Path:
    """apt-get source of libbpf at that version through a private apt configuration, unpacked into scratch/tree."""
    from backends.stack.provision import StackUnavailable, _apt_error, _run_apt, apt_options, system_debian_archive

    archive = system_debian_archive()
    if archive is None:
        raise LibbpfSourceError("debian: no Debian mirror in /etc/apt's sources", "download")
    apt_dir = builds_root() / "apt"
    for sub in ("lists/partial", "cache/archives/partial"):
        (apt_dir / sub).mkdir(parents=True, exist_ok=True)
    (apt_dir / "status").touch()
    (apt_dir / "sources.list").write_text(f"deb-src [signed-by={DEBIAN_KEYRING}] {archive} {DEBIAN_SUITE} main\n")
    options = apt_options(apt_dir)
    try:
        update = _run_apt(["apt-get", "-q", *options, "update", "--error-on=any"])
        if update.returncode != 0:
            raise LibbpfSourceError(f"debian: cannot read {archive} {DEBIAN_SUITE}: "
                                    f"{_apt_error(update.stdout + update.stderr)}", "download")
        shown = _run_apt(["apt-cache", *options, "showsrc", "libbpf"])
        versions = re.findall(r"^Version: (\S+)$", shown.stdout, re.M)
        wanted = [v for v in versions if v == version or re.sub(r"^\d+:|-[^-]*$", "", v) == version]
        if not wanted:
            raise LibbpfSourceError(f"debian:{version}: {archive} {DEBIAN_SUITE} has libbpf "
                                    f"{', '.join(versions) or 'none'}", "download")
        got = _run_apt(["apt-get", "-q", *options, "source", "--download-only", f"libbpf={wanted[0]}"], cwd=scratch)
    except StackUnavailable as e:
        raise LibbpfSourceError(f"debian:{version}: {e}", "download") from None
    if got.returncode != 0:
        raise LibbpfSourceError(f"debian:{version}: apt-get source: {_apt_error(got.stdout + got.stderr)}",
                                "download")
    dsc = next(iter(scratch.glob("libbpf_*.dsc")), None)
    if dsc is None:
        raise LibbpfSourceError(f"debian:{version}: apt-get source left no .dsc", "download")
    unpack = subprocess.run(["dpkg-source", "-x", dsc.name, "tree"], cwd=scratch, capture_output=True, text=True)
    if unpack.returncode != 0:
        last = (unpack.stdout + unpack.stderr).strip().splitlines() or ["no output"]
        raise LibbpfSourceError(f"debian:{version}: dpkg-source -x {dsc.name}: {last[-1]}", "build")
    return scratch / "tree"
