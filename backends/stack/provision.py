"""Provision a real kernel + libbpf + bpftool stack from Debian packages, into the suite's cache.

The pins (`stacks.toml`) name a Debian suite and exact package versions. `apt-get download` fetches them through a
private apt configuration under the cache directory (its own sources list, lists, cache and an empty dpkg status),
so the system's apt state is never read for packages nor written; the packages are only unpacked (`dpkg-deb -x`).
From the source package only the parts the builds (and the upstream selftests) need are extracted, and libbpf and
bpftool are built from them.

Every piece is made in a temporary directory next to its target and renamed into place when complete, and the
manifest is written last, so an interrupted run never looks provisioned; a second run only verifies. Standard
library only: `scripts/setup.sh stack` runs this with the system's python3.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.vm.runner import kernel_release

__all__ = [
    "DEFAULT_STACK", "PINS_FILE", "StackPaths", "StackPins", "StackUnavailable", "apt_options", "cache_root",
    "load_pins", "provision_stack", "stack_paths",
]

DEFAULT_STACK = "7.3.4"
PINS_FILE = Path(__file__).with_name("stacks.toml")
CACHE_ENV = "PERCPU_STACK_CACHE"  # apart from the compile cache (PERCPU_CACHE), which benchmarks make cold
SYSTEM_SOURCES = Path("/etc/apt")
MANIFEST = "manifest.json"
PIECE_STAMP = ".piece.json"  # inside each finished piece: the packages it was made from
MANIFEST_FORMAT = 1
PACKAGE_ROLES = ("image", "base", "modules", "source")

# What the builds read from the kernel tree, plus tools/testing/selftests/bpf (under tools/) for the upstream
# selftests; everything else of the ~1.5 GB tree is skipped, which makes extraction a single xz pass.
SOURCE_MEMBERS = (
    "tools", "include/uapi", "arch/x86/include/uapi", "kernel/bpf/disasm.c", "kernel/bpf/disasm.h", "scripts",
    "Makefile",
)

# Exit codes of the CLI, by failing step; one table so the CLI and the tests agree.
EXIT_USAGE, EXIT_NOT_PROVISIONED, EXIT_DOWNLOAD, EXIT_PACKAGE, EXIT_BUILD = 2, 4, 6, 7, 8
STEP_EXIT = {
    "usage": EXIT_USAGE, "override": EXIT_USAGE, "not-provisioned": EXIT_NOT_PROVISIONED,
    "download": EXIT_DOWNLOAD, "package": EXIT_PACKAGE,
}  # every other step (unpack-*, build-*, verify) is EXIT_BUILD

Log = Callable[[str], None]


class StackUnavailable(RuntimeError):
    """A stack could not be provisioned or used; `step` names where, the message what to do."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"stack {step}: {message}")
        self.step = step

    @property
    def exit_code(self) -> int:
        return STEP_EXIT.get(self.step, EXIT_BUILD)


@dataclass(frozen=True)
class StackPaths:
    name: str
    kernel_image: Path
    modules: Path      # holds lib/modules/<release> (an INSTALL_MOD_PATH)
    libbpf: Path       # the shared object itself (libbpf.so.X.Y.Z)
    bpftool: Path
    source: Path       # the extracted part of the kernel tree
    release: str
    libbpf_version: str
    bpftool_version: str
    include: Path      # libbpf's installed headers (bpf/bpf_helpers.h ...)

    def as_json(self) -> dict[str, str]:
        return {
            "name": self.name, "kernel_image": str(self.kernel_image), "modules": str(self.modules),
            "libbpf": str(self.libbpf), "bpftool": str(self.bpftool), "source": str(self.source),
            "release": self.release, "libbpf_version": self.libbpf_version,
            "bpftool_version": self.bpftool_version, "include": str(self.include),
        }


@dataclass(frozen=True)
class Package:
    role: str
    name: str
    version: str


@dataclass(frozen=True)
class StackPins:
    name: str
    suite: str
    components: tuple[str, ...]
    keyring: Path
    release: str
    libbpf_version: str
    bpftool_version: str
    source_tarball: str
    packages: tuple[Package, ...]
    archive: str | None = None  # None: the Debian mirror of the system's apt sources

    def package(self, role: str) -> Package:
        return next(p for p in self.packages if p.role == role)

    def pinned(self) -> dict[str, str]:
        return {p.name: p.version for p in self.packages}


# -- pins --------------------------------------------------------------------------------------------------------


def load_pins(name: str = DEFAULT_STACK, pins_file: Path | None = None) -> StackPins:
    path = pins_file or PINS_FILE
    try:
        tables = tomllib.loads(path.read_text())
    except OSError as e:
        raise StackUnavailable("usage", f"cannot read pins {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise StackUnavailable("usage", f"{path} is not valid TOML: {e}") from None
    stacks = tables.get("stack", {})
    if name not in stacks:
        known = ", ".join(sorted(stacks)) or "none"
        raise StackUnavailable("usage", f"unknown stack {name!r} (known in {path}: {known})")
    table = stacks[name]
    try:
        packages = tuple(Package(role, str(table["packages"][role]["name"]), str(table["packages"][role]["version"]))
                         for role in PACKAGE_ROLES)
        return StackPins(
            name=name, suite=str(table["suite"]), components=tuple(table.get("components", ["main"])),
            keyring=Path(table["keyring"]), release=str(table["release"]),
            libbpf_version=str(table["libbpf_version"]), bpftool_version=str(table["bpftool_version"]),
            source_tarball=str(table["source_tarball"]).lstrip("./"), packages=packages,
            archive=table.get("archive"),
        )
    except (KeyError, TypeError) as e:
        raise StackUnavailable("usage", f"stack {name!r} in {path} lacks {e}") from None


def cache_root() -> Path:
    """The suite's cache. Not /var/cache or /run: the VM guest sees the host root over 9p and those are hidden."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "percpu-conformance"


def system_debian_archive(etc_apt: Path = SYSTEM_SOURCES) -> str | None:
    """The first Debian mirror (a URI whose path ends in /debian) of the system's apt sources, in apt's order."""
    uris: list[str] = []
    files = [etc_apt / "sources.list"] + sorted((etc_apt / "sources.list.d").glob("*"))
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":  # deb822
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
                if "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes") != "no":
                    uris += fields.get("URIs", "").split()
        elif path.suffix == ".list" or path.name == "sources.list":
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 2 and words[0] == "deb":
                    uris.append(words[1])
    return next((u.rstrip("/") for u in uris if u.rstrip("/").endswith("/debian")), None)


# -- the private apt ---------------------------------------------------------------------------------------------


def apt_options(apt_dir: Path) -> list[str]:
    """Options that point apt at `apt_dir` for everything it reads or writes about packages."""
    options = {
        "Dir::Etc::SourceList": apt_dir / "sources.list",
        "Dir::Etc::SourceParts": "/dev/null",
        "Dir::Etc::Preferences": "/dev/null",  # the system's pins must not pick other versions
        "Dir::Etc::PreferencesParts": "/dev/null",
        "Dir::State::Lists": apt_dir / "lists",
        "Dir::State::status": apt_dir / "status",
        "Dir::State::extended_states": apt_dir / "extended_states",
        "Dir::Cache": apt_dir / "cache",
        "Acquire::Check-Valid-Until": "false",  # a suite frozen in a snapshot is still the pinned one
        "Acquire::Languages": "none",
    }
    if os.geteuid() == 0:  # apt's _apt user cannot write into root's home
        options["APT::Sandbox::User"] = "root"
    return [arg for key, value in options.items() for arg in ("-o", f"{key}={value}")]


def write_apt_config(apt_dir: Path, pins: StackPins, archive: str) -> None:
    for sub in ("lists/partial", "cache/archives/partial"):
        (apt_dir / sub).mkdir(parents=True, exist_ok=True)
    (apt_dir / "status").touch()
    components = " ".join(pins.components)
    (apt_dir / "sources.list").write_text(f"deb [signed-by={pins.keyring}] {archive} {pins.suite} {components}\n")


def _apt_error(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.startswith(("E:", "Err:", "W: Failed", "  "))]
    return "; ".join(ln for ln in lines if ln)[:400] or output.strip()[-400:]


def _run_apt(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=1800,
                              env={**os.environ, "LC_ALL": "C"})
    except FileNotFoundError:
        raise StackUnavailable("download", "apt-get is not installed; this needs Debian or Ubuntu") from None
    except subprocess.TimeoutExpired:
        raise StackUnavailable("download", f"{argv[0]} {argv[-1]} took over 30 min; check the network") from None


_NOT_FOUND = re.compile(r"^E: (Version '.*' for '.*' was not found|Unable to locate package .*|"
                        r"Can't select .*|Package .* has no installation candidate)", re.M)


def download(pins: StackPins, stack_dir: Path, log: Log) -> list[Path]:
    """The pinned .debs in stack_dir/debs, downloading those missing (each file renamed in once complete)."""
    debs = stack_dir / "debs"
    found = {p: _find_deb(debs, p) for p in pins.packages}
    missing = [p for p, path in found.items() if path is None]
    if not missing:
        return [path for path in found.values() if path is not None]
    archive = pins.archive or system_debian_archive()
    if archive is None:
        raise StackUnavailable("download", f"no Debian mirror in {SYSTEM_SOURCES}'s sources; "
                               f"set archive = \"http://MIRROR/debian\" in the [stack.\"{pins.name}\"] pins")
    if not pins.keyring.is_file():
        raise StackUnavailable("download", f"no keyring {pins.keyring}; apt-get install debian-archive-keyring")
    apt_dir = stack_dir / "apt"
    write_apt_config(apt_dir, pins, archive)
    started = time.monotonic()
    options = apt_options(apt_dir)
    update = _run_apt(["apt-get", "-q", *options, "update", "--error-on=any"])
    if update.returncode != 0:
        reason = _apt_error(update.stdout + update.stderr)
        raise StackUnavailable("download", f"cannot read {archive} {pins.suite}: {reason}; "
                               "check the network or the archive in the pins")
    partial = debs / f".partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        got = _run_apt(["apt-get", "-q", *options, "download", *(f"{p.name}={p.version}" for p in missing)],
                       cwd=partial)
        output = got.stdout + got.stderr
        if got.returncode != 0:
            not_found = _NOT_FOUND.search(output)
            if not_found:
                raise StackUnavailable("package", f"{not_found.group(1)} in {archive} {pins.suite}; fix the pins "
                                       "(apt-cache policy NAME where that suite is configured shows its versions)")
            raise StackUnavailable("download", f"apt-get download failed: {_apt_error(output)}; check the network")
        for p in missing:
            src = _find_deb(partial, p)
            if src is None:
                raise StackUnavailable("download", f"apt-get download left no {p.name} {p.version}")
            found[p] = debs / src.name
            os.replace(src, debs / src.name)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    size = sum(path.stat().st_size for p in missing if (path := found[p]) is not None)
    _log_step(log, pins, "download", f"{len(missing)} package(s), {size / 1e6:.1f} MB from {archive} {pins.suite}",
              started)
    return [path for path in found.values() if path is not None]


def _find_deb(directory: Path, package: Package) -> Path | None:
    """The complete .deb of exactly this package and version in directory (apt names files NAME_VERSION_ARCH)."""
    for path in sorted(directory.glob(f"{package.name}_*.deb")):
        fields = subprocess.run(["dpkg-deb", "-f", str(path), "Package", "Version"], capture_output=True, text=True)
        if fields.returncode == 0 and fields.stdout.split() == ["Package:", package.name, "Version:", package.version]:
            return path
    return None


def _log_step(log: Log, pins: StackPins, step: str, detail: str, started: float) -> None:
    log(f"stack {pins.name}: {step}: {detail} ({time.monotonic() - started:.1f} s)")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# -- pieces ------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _piece(target: Path, step: str, made_from: Mapping[str, str]) -> Iterator[Path]:
    """A temporary directory next to `target`, renamed to it once the body finished; removed on any failure."""
    scratch = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        yield scratch
        (scratch / PIECE_STAMP).write_text(json.dumps({"made_from": dict(made_from)}, sort_keys=True))
        shutil.rmtree(target, ignore_errors=True)  # a stale piece (other pins) is replaced whole
        os.replace(scratch, target)
    except StackUnavailable:
        raise
    except (OSError, subprocess.SubprocessError) as e:
        raise StackUnavailable(step, f"{e}; free disk space or remove {target.parent} and retry") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _piece_ready(target: Path, made_from: Mapping[str, str]) -> bool:
    try:
        return json.loads((target / PIECE_STAMP).read_text())["made_from"] == dict(made_from)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _check(argv: list[str], step: str, what: str, log_file: Path | None = None, **kwargs: Any) -> None:
    """Run a tool of a step; its output goes to log_file (named in the error) or into the error itself."""
    try:
        if log_file is None:
            done = subprocess.run(argv, capture_output=True, text=True, **kwargs)
            output = done.stdout + done.stderr
        else:
            with open(log_file, "a") as out:
                out.write(f"$ {' '.join(argv)}\n")
                out.flush()
                done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, text=True, **kwargs)
            output = ""
    except FileNotFoundError:
        raise StackUnavailable(step, f"{argv[0]} is not installed; run: bash scripts/setup.sh stack") from None
    if done.returncode != 0:
        detail = f"see {log_file}" if log_file else (output.strip().splitlines() or ["no output"])[-1]
        raise StackUnavailable(step, f"{what} failed (exit {done.returncode}): {detail}")


def _unpack(deb: Path, into: Path, step: str) -> None:
    _check(["dpkg-deb", "-x", str(deb), str(into)], step, f"dpkg-deb -x {deb.name}")


def _modules_tree(root: Path) -> Path:
    """root/lib/modules, whether the package ships it there or under usr/ (merged /usr)."""
    if not (root / "lib" / "modules").is_dir() and (root / "usr" / "lib" / "modules").is_dir():
        (root / "lib").symlink_to("usr/lib")
    return root / "lib" / "modules"


def unpack_kernel(pins: StackPins, debs: Mapping[str, Path], target: Path) -> None:
    """vmlinuz-<release>, config-<release> and System.map-<release> side by side, as /boot holds them."""
    step = "unpack-kernel"
    with _piece(target, step, _made_from(pins, "image", "base")) as scratch:
        tree = scratch / "tree"
        for role in ("image", "base"):
            _unpack(debs[role], tree, step)
        release_dir = _modules_tree(tree) / pins.release
        for name in ("vmlinuz", "config", "System.map"):
            if not (release_dir / name).is_file():
                raise StackUnavailable(step, f"no {name} for release {pins.release} in {debs['image'].name} / "
                                       f"{debs['base'].name}; check release in the pins")
            os.replace(release_dir / name, scratch / f"{name}-{pins.release}")
        shutil.rmtree(tree)
        found = kernel_release(scratch / f"vmlinuz-{pins.release}")
        if found != pins.release:
            raise StackUnavailable(step, f"the image announces release {found}, the pins say {pins.release}")


def unpack_modules(pins: StackPins, debs: Mapping[str, Path], target: Path, log_file: Path) -> None:
    """An INSTALL_MOD_PATH: lib/modules/<release> with modules.dep, which Debian makes at install time."""
    step = "unpack-modules"
    with _piece(target, step, _made_from(pins, "modules", "base")) as scratch:
        for role in ("modules", "base"):
            _unpack(debs[role], scratch, step)
        if not (_modules_tree(scratch) / pins.release).is_dir():
            raise StackUnavailable(step, f"{debs['modules'].name} has no lib/modules/{pins.release}")
        _check(["depmod", "-b", str(scratch), pins.release], step, "depmod", log_file)


def unpack_source(pins: StackPins, debs: Mapping[str, Path], target: Path) -> None:
    """The members of the kernel tree in SOURCE_MEMBERS, top directory stripped, in one pass over the tarball."""
    step = "unpack-source"
    tarball = pins.source_tarball
    top = Path(tarball).name.removesuffix(".tar.xz")
    with _piece(target, step, _made_from(pins, "source")) as scratch:
        deb = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(debs["source"])], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
        member = subprocess.Popen(["tar", "-xO", "-f", "-", f"./{tarball}"], stdin=deb.stdout,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert deb.stdout is not None and member.stdout is not None
        deb.stdout.close()  # tar owns the pipe now: dpkg-deb gets SIGPIPE if tar stops early
        tree = subprocess.run(["tar", "-xJ", "-f", "-", "-C", str(scratch), "--strip-components=1",
                               *(f"{top}/{m}" for m in SOURCE_MEMBERS)],
                              stdin=member.stdout, capture_output=True, text=True)
        member.stdout.close()
        failures = [(name, p.wait(), (p.stderr.read().decode(errors="replace") if p.stderr else ""))
                    for name, p in (("dpkg-deb", deb), ("tar -xO", member))]
        failures.append(("tar -xJ", tree.returncode, tree.stderr))
        for name, code, err in failures:
            if code != 0:
                last = (err.strip().splitlines() or ["no output"])[-1]
                raise StackUnavailable(step, f"{name} on {debs['source'].name} failed (exit {code}): {last}")
        for p in (deb, member):
            if p.stderr:
                p.stderr.close()


def build_libbpf(pins: StackPins, source: Path, target: Path, log_file: Path) -> None:
    """libbpf.so.<version> (+ .so.1, .so, .a, .pc) and its installed headers in include/bpf."""
    step = "build-libbpf"
    with _piece(target, step, _made_from(pins, "source")) as scratch:
        make = make_libbpf(source / "tools" / "lib" / "bpf", scratch, log_file, step)
        _check([*make, f"DESTDIR={scratch}", "prefix=", "install_headers"], step, "make install_headers", log_file)
        so = scratch / f"libbpf.so.{pins.libbpf_version}"
        if not so.is_file():
            raise StackUnavailable(step, f"the build made no {so.name}; is libbpf_version right in the pins?")
        reported = libbpf_so_version(so)
        if reported is None or not pins.libbpf_version.startswith(f"{reported}."):
            raise StackUnavailable(step, f"{so.name} reports version {reported}, pinned {pins.libbpf_version}")
        if not (scratch / "include" / "bpf" / "bpf_helpers.h").is_file():
            raise StackUnavailable(step, f"install_headers left no include/bpf/bpf_helpers.h; see {log_file}")


def make_libbpf(tree: Path, out: Path, log_file: Path, step: str) -> list[str]:
    """`make` of a libbpf tree into out: a kernel's tools/lib/bpf (which reads OUTPUT) or a standalone libbpf's
    src/ (which reads OBJDIR). Returns the make command, for further targets."""
    make = ["make", "-C", str(tree), f"-j{_jobs()}", f"OUTPUT={out}/", f"OBJDIR={out}"]
    shown = "/".join(tree.parts[-3:]) if tree.parts[-3:-1] == ("tools", "lib") else tree.name
    _check(make, step, f"make -C {shown}", log_file)
    return make


def build_bpftool(pins: StackPins, source: Path, target: Path, log_file: Path) -> None:
    """bpftool, built with whatever optional features (llvm, libcap, libbfd) the machine has."""
    step = "build-bpftool"
    with _piece(target, step, _made_from(pins, "source")) as scratch:
        _check(["make", "-C", str(source / "tools" / "bpf" / "bpftool"), f"-j{_jobs()}", f"OUTPUT={scratch}/"],
               step, "make -C tools/bpf/bpftool", log_file)
        reported = bpftool_version(scratch / "bpftool")
        if reported != pins.bpftool_version:
            raise StackUnavailable(step, f"the built bpftool reports version {reported}, pinned {pins.bpftool_version}")


def _made_from(pins: StackPins, *roles: str) -> dict[str, str]:
    return {f"{pins.package(r).name}": pins.package(r).version for r in roles} | {"release": pins.release}


def _jobs() -> int:
    return max(1, min(os.cpu_count() or 1, 4))



# -- versions, read from the pieces themselves -------------------------------------------------------------------

_LIBBPF_VERSION_PROBE = (
    "import ctypes, sys\n"
    "lib = ctypes.CDLL(sys.argv[1])\n"
    "print(f'{lib.libbpf_major_version()}.{lib.libbpf_minor_version()}')\n"
)


def libbpf_so_version(so: Path) -> str | None:
    """"MAJOR.MINOR" as the library reports it, loaded in a child so this process keeps its own libbpf."""
    try:
        done = subprocess.run([sys.executable, "-c", _LIBBPF_VERSION_PROBE, str(so)], capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    text = done.stdout.strip()
    return text if done.returncode == 0 and re.fullmatch(r"\d+\.\d+", text) else None


def libbpf_full_version(so: Path) -> str | None:
    """MAJOR.MINOR.PATCH when the file's real name carries it (libbpf.so.1.8.0) and agrees, else MAJOR.MINOR."""
    reported = libbpf_so_version(so)
    named = re.fullmatch(r"libbpf\.so\.(\d+\.\d+\.\d+)", so.resolve().name)
    if reported and named and named.group(1).startswith(f"{reported}."):
        return named.group(1)
    return reported


def bpftool_version(bpftool: Path) -> str | None:
    try:
        done = subprocess.run([str(bpftool), "version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.match(r"\S*bpftool v(\d+\.\d+\.\d+)", done.stdout)
    return found.group(1) if done.returncode == 0 and found else None


def _bpftool_features(bpftool: Path) -> str:
    done = subprocess.run([str(bpftool), "version"], capture_output=True, text=True, timeout=60)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("features:")), "features:")
    return line.removeprefix("features:").strip()


# -- the stack as a whole ----------------------------------------------------------------------------------------


@dataclass
class _Layout:
    stack_dir: Path
    debs: Path = field(init=False)
    kernel: Path = field(init=False)
    modules: Path = field(init=False)
    source: Path = field(init=False)
    libbpf: Path = field(init=False)
    bpftool: Path = field(init=False)
    logs: Path = field(init=False)
    manifest: Path = field(init=False)

    def __post_init__(self) -> None:
        for name in ("debs", "kernel", "modules", "source", "libbpf", "bpftool", "logs"):
            setattr(self, name, self.stack_dir / name)
        self.manifest = self.stack_dir / MANIFEST

    def paths(self, pins: StackPins) -> StackPaths:
        return StackPaths(
            name=pins.name, kernel_image=self.kernel / f"vmlinuz-{pins.release}", modules=self.modules,
            libbpf=self.libbpf / f"libbpf.so.{pins.libbpf_version}", bpftool=self.bpftool / "bpftool",
            source=self.source, release=pins.release, libbpf_version=pins.libbpf_version,
            bpftool_version=pins.bpftool_version, include=self.libbpf / "include",
        )


def _expected_files(paths: StackPaths) -> list[Path]:
    return [paths.kernel_image, paths.kernel_image.with_name(f"config-{paths.release}"),
            paths.modules / "lib" / "modules" / paths.release / "modules.dep", paths.libbpf, paths.bpftool,
            paths.include / "bpf" / "bpf_helpers.h", paths.source / "tools" / "lib" / "bpf" / "libbpf.c"]


def _verified(layout: _Layout, pins: StackPins) -> StackPaths | None:
    """The stack's paths when its manifest says it was made from these pins and every piece is there."""
    try:
        manifest = json.loads(layout.manifest.read_text())
        made = {p["name"]: p["version"] for p in manifest["packages"].values()}
        same = (manifest.get("format") == MANIFEST_FORMAT and made == pins.pinned()
                and manifest.get("release") == pins.release and manifest.get("libbpf_version") == pins.libbpf_version
                and manifest.get("bpftool_version") == pins.bpftool_version)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    paths = layout.paths(pins)
    return paths if same and all(p.exists() for p in _expected_files(paths)) else None


@contextlib.contextmanager
def _locked(stack_dir: Path, log: Log, pins: StackPins) -> Iterator[None]:
    """One provisioning per stack at a time: concurrent callers wait, then find it done."""
    stack_dir.mkdir(parents=True, exist_ok=True)
    with open(stack_dir / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"stack {pins.name}: waiting for another provisioning of {stack_dir}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def provision_stack(pins: StackPins, stack_dir: Path, log: Log = _stderr) -> StackPaths:
    """Make (or verify) the stack in stack_dir; every step that is already done is skipped."""
    layout = _Layout(stack_dir)
    started = time.monotonic()
    with _locked(stack_dir, log, pins):
        ready = _verified(layout, pins)
        if ready is not None:
            _log_step(log, pins, "verify", f"provisioned in {stack_dir}", started)
            return ready
        timings: dict[str, float] = {}

        def timed(step: str, detail: str, action: Callable[[], object]) -> None:
            t0 = time.monotonic()
            action()
            timings[step] = round(time.monotonic() - t0, 2)
            _log_step(log, pins, step, detail, t0)

        t0 = time.monotonic()
        deb_files = download(pins, stack_dir, log)
        timings["download"] = round(time.monotonic() - t0, 2)
        debs = {p.role: path for p, path in zip(pins.packages, deb_files, strict=True)}
        layout.logs.mkdir(exist_ok=True)
        pieces: list[tuple[str, Path, tuple[str, ...], str, Callable[[], object]]] = [
            ("unpack-kernel", layout.kernel, ("image", "base"), f"{layout.kernel}",
             lambda: unpack_kernel(pins, debs, layout.kernel)),
            ("unpack-modules", layout.modules, ("modules", "base"), f"{layout.modules}",
             lambda: unpack_modules(pins, debs, layout.modules, layout.logs / "depmod.log")),
            ("unpack-source", layout.source, ("source",), f"{', '.join(SOURCE_MEMBERS)} into {layout.source}",
             lambda: unpack_source(pins, debs, layout.source)),
            ("build-libbpf", layout.libbpf, ("source",), f"libbpf {pins.libbpf_version} in {layout.libbpf}",
             lambda: build_libbpf(pins, layout.source, layout.libbpf, _fresh_log(layout, "build-libbpf"))),
            ("build-bpftool", layout.bpftool, ("source",), f"bpftool {pins.bpftool_version} in {layout.bpftool}",
             lambda: build_bpftool(pins, layout.source, layout.bpftool, _fresh_log(layout, "build-bpftool"))),
        ]
        for step, target, roles, detail, action in pieces:
            if _piece_ready(target, _made_from(pins, *roles)):
                _log_step(log, pins, step, "already done", time.monotonic())
                continue
            timed(step, detail, action)
        paths = layout.paths(pins)
        missing = [str(p) for p in _expected_files(paths) if not p.exists()]
        if missing:
            raise StackUnavailable("verify", f"missing after provisioning: {', '.join(missing)}; remove {stack_dir}")
        _write_manifest(layout, pins, debs, paths, timings)
        _log_step(log, pins, "manifest", f"{layout.manifest}", started)
        return paths


def _fresh_log(layout: _Layout, step: str) -> Path:
    path = layout.logs / f"{step}.log"
    path.write_text("")
    return path


def _write_manifest(layout: _Layout, pins: StackPins, debs: Mapping[str, Path], paths: StackPaths,
                    timings: Mapping[str, float]) -> None:
    manifest = {
        "format": MANIFEST_FORMAT, "stack": pins.name, "suite": pins.suite,
        "archive": pins.archive or system_debian_archive(), "release": pins.release,
        "libbpf_version": pins.libbpf_version, "bpftool_version": pins.bpftool_version,
        "bpftool_features": _bpftool_features(paths.bpftool),
        "packages": {
            p.role: {"name": p.name, "version": p.version, "file": debs[p.role].name,
                     "size": debs[p.role].stat().st_size, "sha256": _sha256(debs[p.role])}
            for p in pins.packages
        },
        "paths": paths.as_json(), "seconds": dict(timings),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    scratch = layout.manifest.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
    scratch.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(scratch, layout.manifest)


FAILURE_NOTE = "provision-failed"  # the last provisioning's one-line reason, until one succeeds


def stack_paths(name: str = DEFAULT_STACK, *, kernel_image: Path | None = None, modules: Path | None = None,
                libbpf: Path | None = None, bpftool: Path | None = None, provision: bool = True,
                pins_file: Path | None = None, log: Log = _stderr) -> StackPaths:
    """The stack's paths, provisioning it first unless `provision` is false; each override replaces one piece
    (a user's own build) and its version is read from the piece itself."""
    pins = load_pins(name, pins_file)
    overrides = _check_overrides(kernel_image, modules, libbpf, bpftool)
    stack_dir = cache_root() / "stack" / name
    failed = stack_dir / FAILURE_NOTE
    if provision:
        try:
            paths = provision_stack(pins, stack_dir, log)
        except StackUnavailable as e:  # kept, so a run that only uses the stack can say why it is missing
            stack_dir.mkdir(parents=True, exist_ok=True)
            failed.write_text(f"{e}\n")
            raise
        failed.unlink(missing_ok=True)
    else:
        found = _verified(_Layout(stack_dir), pins)
        if found is None:
            why = failed.read_text().strip() if failed.is_file() else "never provisioned"
            raise StackUnavailable("not-provisioned", f"stack {name} is not provisioned in {stack_dir} ({why}); "
                                   "run: make stack")
        paths = found
    return _with_overrides(paths, overrides)


def _check_overrides(kernel_image: Path | None, modules: Path | None, libbpf: Path | None,
                     bpftool: Path | None) -> dict[str, Any]:
    checked: dict[str, Any] = {}
    if kernel_image is not None:
        image = Path(kernel_image).absolute()
        if not image.is_file():
            raise StackUnavailable("override", f"no kernel image at {image}")
        release = kernel_release(image)
        if release is None:
            raise StackUnavailable("override", f"{image} announces no release (not an x86 bzImage/vmlinuz)")
        checked |= {"kernel_image": image, "release": release}
    if modules is not None:
        directory = Path(modules).absolute()
        if not directory.is_dir():
            raise StackUnavailable("override", f"no module directory at {directory}")
        checked["modules"] = directory
    if libbpf is not None:
        so = Path(libbpf).absolute()
        version = libbpf_full_version(so) if so.is_file() else None
        if version is None:
            raise StackUnavailable("override", f"{so} is not a loadable libbpf (no libbpf_major_version)")
        checked |= {"libbpf": so, "libbpf_version": version}
    if bpftool is not None:
        tool = Path(bpftool).absolute()
        version = bpftool_version(tool) if tool.is_file() else None
        if version is None:
            raise StackUnavailable("override", f"{tool} is not a runnable bpftool (`bpftool version` failed)")
        checked |= {"bpftool": tool, "bpftool_version": version}
    return checked


def _with_overrides(paths: StackPaths, overrides: Mapping[str, Any]) -> StackPaths:
    return dataclasses.replace(paths, **overrides)
