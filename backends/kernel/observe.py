"""Observations from the real kernel: one BPF object loaded, run on chosen CPUs and read back.

Two loaders feed the same result document (`shared/spec/result-schema.md`):
  * `observe_libbpf` judges a shipped libbpf (through its public API) together with the running kernel;
  * `observe_raw` uses the suite's own object preparation (`backends.objload`, profile "raw") and talks to the
    kernel through `bpf()` alone, so kernel behaviour is observed independently of any libbpf.

Both follow libbpf's object semantics: the first program the kernel rejects fails the object, later programs
are never offered and no run happens. Each object goes through phases (`LibbpfSession`, `RawSession`) that
`backends.kernel.objectset` also orders across several objects (docs/object-sets.md).
Programs only ever run through BPF_PROG_TEST_RUN and nothing is attached to a live hook; every descriptor
opened here is closed on every path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno as _errno
import functools
import os
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, Self

from backends import objload
from backends.kernel import bpf, probes
from backends.kernel.libbpf import (
    Libbpf,
    LibbpfError,
    LibbpfMissing,
    LibbpfObject,
    LogRecord,
    MapView,
    ProgView,
    fd_kind,
)
from schema import messages, profiles
from schema.result import (
    REUSE_FAILED,
    Result,
    map_entry,
    new_env,
    new_result,
    program_entry,
)
from toolchain import insn as I
from toolchain.btf import Btf, BtfError, fixup_datasecs
from toolchain.btf import encode as btf_encode
from toolchain.elf import ObjectFacts, read_object
from toolchain.uapi import BPF_MAP_TYPE_PROG_ARRAY

__all__ = [
    "BackendUnavailable", "Run", "environment", "kernel_features", "libbpf_knows_percpu", "libbpf_profile_name",
    "raw_profile_name", "classify_message", "observe", "observe_libbpf", "observe_raw", "open_libbpf", "require_bpf",
    "LibbpfSession", "RawSession", "object_facts", "base_result", "program_names",
]

Run = tuple[str, int, int]  # (program, cpu, count)

# enum bpf_map_type, lower case without the prefix (the schema's `type`).
MAP_TYPE_NAMES = dict(enumerate((
    "unspec", "hash", "array", "prog_array", "perf_event_array", "percpu_hash", "percpu_array", "stack_trace",
    "cgroup_array", "lru_hash", "lru_percpu_hash", "lpm_trie", "array_of_maps", "hash_of_maps", "devmap",
    "sockmap", "cpumap", "xskmap", "sockhash", "cgroup_storage", "reuseport_sockarray", "percpu_cgroup_storage",
    "queue", "stack", "sk_storage", "devmap_hash", "struct_ops", "ringbuf", "inode_storage", "task_storage",
    "bloom_filter", "user_ringbuf", "cgrp_storage", "arena")))

# The first libbpf release that knows `.percpu*` sections: the one after 1.7 (spec §1) [I: by version only;
# a patched build that kept an older version string is classified as old].
LIBBPF_PERCPU_VERSION = (1, 8)



_PROG_FAILED = re.compile(r"^libbpf: prog '([^']+)': (?:failed to load|BPF program load failed|-- BEGIN PROG LOAD LOG)")
_PROG_ERRNO = re.compile(r"^libbpf: prog '([^']+)': failed to load: -?(\w+)")
_LOG_BEGIN = "-- BEGIN PROG LOAD LOG --"
_LOG_END = "-- END PROG LOAD LOG --"
_GENERIC_LIBBPF = re.compile(r"^libbpf: (failed to load object|failed to open|prog '[^']*': failed to load)")

VERIFIER_LOG_SIZE = 1 << 16  # the verifier's log rotates, so the tail (the reason) always survives


class BackendUnavailable(RuntimeError):
    """The kernel backend cannot run here; the message is a one-line reason (suites turn it into a skip)."""


# -- environment ---------------------------------------------------------------------------------------------


@functools.cache
def _bpf_usable() -> tuple[bool, str]:
    return probes.bpf_usable()


def require_bpf() -> None:
    """Raise BackendUnavailable unless this process can create maps and load programs."""
    usable, reason = _bpf_usable()
    if not usable:
        raise BackendUnavailable(reason or "bpf() unusable")


def open_libbpf(path: str | None = None) -> Libbpf:
    try:
        return Libbpf(path)
    except LibbpfMissing as e:
        raise BackendUnavailable(f"libbpf missing: {e}") from None


@functools.cache
def kernel_features() -> dict[str, bool | None]:
    """The probed kernel features; fixed for the life of the process, so probed once."""
    return dict(probes.probe_all()["features"])


@functools.cache
def bpftool_version(bpftool: str = "bpftool") -> str | None:
    try:
        out = subprocess.run([bpftool, "version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.splitlines()
    if out.returncode != 0 or not lines:
        return None
    m = re.search(r"v?(\d+\.\d+\.\d+)", lines[0])
    return m.group(1) if m else lines[0].strip()


def libbpf_knows_percpu(libbpf: Libbpf) -> bool:
    return libbpf.version_tuple()[:2] >= LIBBPF_PERCPU_VERSION


def kernel_modifiers(features: Mapping[str, bool | None]) -> str:
    """Probed kernel facts beside the feature, as profile suffixes (`+noext`, `+jitoff`), per the registry."""
    return profiles.join_modifiers("", profiles.modifiers_for(features))


def libbpf_profile_name(libbpf: Libbpf, features: Mapping[str, bool | None]) -> str:
    return profiles.profile_for_probe("libbpf", libbpf_knows_percpu(libbpf), features)


def raw_profile_name(features: Mapping[str, bool | None]) -> str:
    return profiles.profile_for_probe("raw", True, features)


def environment(libbpf: Libbpf | None, profile: str) -> dict[str, Any]:
    return new_env(profile, kernel_release=probes.kernel_release(), possible_cpus=len(probes.possible_cpus()),
                   online_cpus=probes.online_cpus(), features=kernel_features(),
                   libbpf=libbpf.version if libbpf is not None else None, bpftool=bpftool_version(), clang=None)


# -- shared helpers ------------------------------------------------------------------------------------------


def classify_message(lines: Iterable[str], err: int | None = None) -> str:
    return messages.classify(lines, err)


def _type_name(map_type: int) -> str:
    return MAP_TYPE_NAMES.get(map_type, f"type_{map_type}")


def _stride(value_size: int) -> int:
    return bpf.round_up(value_size, 8)


def _read_key0(fd: int, map_type: int, key_size: int, value_size: int, ncpus: int) -> list[str] | None:
    """Key 0's value: one hex slot per possible CPU for per-CPU maps, else one; None when there is none."""
    if map_type == BPF_MAP_TYPE_PROG_ARRAY:
        return None  # prog arrays hold programs (a lookup gives a program id that changes every load), not bytes
    percpu = map_type in bpf.PERCPU_MAP_TYPES
    length = ncpus * _stride(value_size) if percpu else max(value_size, 1)
    try:
        raw = bpf.map_lookup_elem(fd, bytes(key_size), length)
    except bpf.BpfError:
        return None
    if not percpu:
        return [raw[:value_size].hex()]
    return [raw[i * _stride(value_size):i * _stride(value_size) + value_size].hex() for i in range(ncpus)]


def _write_key0(fd: int, map_type: int, key_size: int, value_size: int, data: bytes, ncpus: int) -> None:
    """Key 0 := data; a per-CPU map gets it on every possible CPU (one full buffer: this kernel generation may
    lack BPF_F_ALL_CPUS, and a full buffer works everywhere)."""
    if map_type in bpf.PERCPU_MAP_TYPES:
        slot = data.ljust(_stride(value_size), b"\0")
        bpf.map_update_elem(fd, bytes(key_size), slot * ncpus)
    else:
        bpf.map_update_elem(fd, bytes(key_size), data)


def _check_size(name: str, data: bytes, value_size: int) -> None:
    if len(data) != value_size:
        raise ValueError(f"initial value for map {name!r} is {len(data)} bytes, value_size is {value_size}")


def _do_runs(runs: Sequence[Run], prog_fds: Mapping[str, int], online: Sequence[int],
             blocked: str | None) -> list[dict[str, Any]]:
    """Run each (program, cpu, count); a run that cannot happen keeps None retvals and says why."""
    out = []
    for prog, cpu, count in runs:
        retval: list[int | None] = []
        error = blocked
        if error is None and prog not in prog_fds:
            error = f"program {prog!r} is not loaded"
        if error is None and cpu not in online:
            error = f"cpu {cpu} is not online"
        for _ in range(count):
            if error is not None:
                retval.append(None)
                continue
            try:
                retval.append(bpf.prog_test_run(prog_fds[prog], cpu=cpu).retval)
            except bpf.BpfError as e:
                error = f"test_run: {e}"
                retval.append(None)
        out.append({"program": prog, "cpu": cpu, "count": count, "retval": retval, "error": error})
    return out


def _variables(facts: ObjectFacts, sections: Iterable[str]) -> list[dict[str, Any]]:
    out = []
    for section in sections:
        for sym in sorted(facts.variables_in(section), key=lambda s: (s.value, s.name)):
            out.append({"name": sym.name, "section": section, "offset": sym.value, "size": sym.size})
    return out


def program_names(facts: ObjectFacts) -> list[str]:
    return [f.name for f in facts.functions if f.is_program]


def _license(facts: ObjectFacts) -> str:
    sec = facts.section("license")
    return sec.data.split(b"\0", 1)[0].decode(errors="replace") if sec is not None and sec.data else "GPL"


def object_facts(obj_path: str | os.PathLike[str]) -> ObjectFacts:
    """The object's facts; parsing dominates an observation, so toolchain.elf keeps a file unchanged since its
    last read (same inode, size and mtime) parsed: one stat per observation, which over the vm's 9p matters."""
    return read_object(obj_path)


def base_result(obj_path: str | os.PathLike[str], facts: ObjectFacts, env: dict[str, Any], loader: str) -> Result:
    result = new_result("kernel", env, {"path": os.fspath(obj_path), "sha256": facts.sha256})
    result["loader"] = loader
    result["load"] = {"ok": False, "errno": None, "message": None}
    return result


def _fail_open(result: Result, facts: ObjectFacts, error_class: str, message: str | None,
               err: int | None) -> Result:
    result["open"] = {"ok": False, "error_class": error_class, "message": message}
    result["programs"] = [program_entry(name, "not_loaded", errno=err) for name in program_names(facts)]
    # nothing to run against: like a prediction, an object that never opened has no runs
    result["runs"] = []
    return result


# -- one object in the kernel, phase by phase ----------------------------------------------------------------


class _Closeable(Protocol):
    def close(self) -> None: ...


class _Session:
    """One object in the kernel, phase by phase: open; then, in an object set, its map reuses and attach targets;
    load; in a set, attach; read `before`; runs; read `after`; close. A single observation runs the phases back to
    back, an object set interleaves them across its objects (docs/object-sets.md)."""

    loader = ""

    def __init__(self, obj_path: str | os.PathLike[str], env: dict[str, Any],
                 initial_values: Mapping[str, bytes] | None) -> None:
        self.path = obj_path
        self.facts = object_facts(obj_path)
        self.result = base_result(obj_path, self.facts, env, self.loader)
        self.initial_values = dict(initial_values or {})
        self.ncpus = len(probes.possible_cpus())
        self.online = probes.online_cpus()
        self.opened = False  # the open succeeded (a reuse may still fail the object before its load)
        self.loaded = False  # every program accepted: the object counts as loaded
        self.prog_fds: dict[str, int] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError

    def _map_index(self, key: str) -> int:
        raise NotImplementedError

    def require_map(self, key: str) -> None:
        """ValueError unless the object has the map `key`: a plan naming a map that is not there is bad input."""
        self._map_index(key)

    def placeholder_fd(self, key: str) -> int | None:
        """A stand-in descriptor the loader hands out for the map `key` it never created; only libbpf has one."""
        return None

    def run(self, run: Run) -> dict[str, Any]:
        return _do_runs([run], self.prog_fds, self.online, None if self.loaded else "object failed to load")[0]

    def extensions(self) -> list[str]:
        return [f.name for f in self.facts.functions if f.is_program and objload.freplace_target(f.section)]

    def mark_extensions(self) -> None:
        """Extension programs of an object the set opened say whether they are attached (false until they are)."""
        names = set(self.extensions())
        for entry in self.result["programs"]:
            if entry["name"] in names:
                entry["attached"] = False

    def _program(self, name: str) -> dict[str, Any]:
        return next(p for p in self.result["programs"] if p["name"] == name)

    def _attached(self, ext: str, link: _Closeable | None, error: str | None) -> _Closeable | None:
        entry = self._program(ext)
        entry["attached"] = link is not None
        if error is not None:
            entry["attach_error"] = error
        return link

    def _fail_reuse(self, message: str, programs: Iterable[str]) -> None:
        """Rule 2: a map to reuse was never created, so the object fails before its load; nothing of it is
        created, nothing loaded."""
        self.result["open"] = {"ok": False, "error_class": REUSE_FAILED, "message": message}
        self.result["programs"] = [program_entry(name, "not_loaded", errno=None) for name in programs]


# -- libbpf ----------------------------------------------------------------------------------------------------


def _internal_section(name: str) -> str:
    """The ELF section behind one of libbpf's internal maps: ".data.x" names itself, "<obj>.data" is ".data"."""
    if name.startswith("."):
        return name
    for suffix in (".rodata", ".data", ".bss", ".kconfig"):
        if name.endswith(suffix):
            return suffix
    return name


def _libbpf_line(records: Sequence[LogRecord]) -> str | None:
    """libbpf's own explanation of a failure: its first warning that is not a generic summary."""
    warns = [r.line for r in records if r.level == 0]
    for line in warns:
        if not _GENERIC_LIBBPF.match(line):
            return line
    return warns[0] if warns else None


def _open_failure(e: LibbpfError) -> tuple[str, str | None]:
    for line in e.log:
        if line.startswith("libbpf: prog '") and "bad map relo" in line:
            return "bad_map_relo", line
    return "open_failed", _libbpf_line(e.records) or str(e)


def _verifier_block(log: Sequence[str], prog: str) -> list[str]:
    begin = f"libbpf: prog '{prog}': {_LOG_BEGIN}"
    for i, line in enumerate(log):
        if line.startswith(begin):
            block = []
            for text in log[i + 1:]:
                if _LOG_END in text:
                    break
                block.append(text)
            return block
    return []


def _rejection(e: LibbpfError) -> tuple[str | None, int, str | None, str]:
    """(failed program or None, errno, message, message_class) from a failed bpf_object__load."""
    failed = next((m.group(1) for line in e.log if (m := _PROG_FAILED.match(line))), None)
    err = e.errno
    if failed is None:
        return None, err, _libbpf_line(e.records) or str(e), "other"
    for line in e.log:
        m = _PROG_ERRNO.match(line)
        if m and m.group(1) == failed:
            code = m.group(2)
            err = int(code) if code.isdigit() else getattr(_errno, code, err)
            break
    block = _verifier_block(e.log, failed)
    message = bpf.last_meaningful_line("\n".join(block)) or _libbpf_line(e.records) or str(e)
    return failed, err, message, classify_message(block or [message], err)


class LibbpfSession(_Session):
    """One object opened, loaded and run by a shipped libbpf, through its public API."""

    loader = "libbpf"

    def __init__(self, obj_path: str | os.PathLike[str], *, libbpf: Libbpf, env: dict[str, Any],
                 initial_values: Mapping[str, bytes] | None = None) -> None:
        super().__init__(obj_path, env, initial_values)
        self.libbpf = libbpf
        self.obj: LibbpfObject | None = None
        self.views: list[MapView] = []
        self.sections: list[str | None] = []
        self.programs: list[ProgView] = []
        self.after_load: dict[int, bytes] = {}  # map index -> value written after load
        self.reused: set[int] = set()
        self.targets: dict[str, tuple[int, str]] = {}  # extension -> (target program fd, function)

    def close(self) -> None:
        if self.obj is not None:
            self.obj.close()

    def open(self) -> bool:
        """`initial_values` maps bpf_map__name to the new value: an internal map's before load, any other map's
        after load (on every possible CPU for per-CPU maps). ValueError for a value that names no map or has
        the wrong size."""
        try:
            self.obj = obj = self.libbpf.open(os.fspath(self.path))
        except LibbpfError as e:
            cls, message = _open_failure(e)
            _fail_open(self.result, self.facts, cls, message, e.errno)
            return False
        self.opened = True
        views = obj.maps()
        index = {v.name: i for i, v in enumerate(views)}
        unknown = self.initial_values.keys() - index.keys()
        if unknown:
            raise ValueError(f"initial value for unknown map(s) {sorted(unknown)} in {self.path}")
        for name, data in self.initial_values.items():
            v = views[index[name]]
            _check_size(name, data, v.value_size)
            if v.internal and v.type not in bpf.PERCPU_MAP_TYPES:
                rc = obj.set_initial_value(name, data)
                if rc:
                    raise ValueError(f"bpf_map__set_initial_value({name}) = {rc}")
            else:
                self.after_load[index[name]] = data
        self.views = views
        self.sections = [_internal_section(v.name) if v.internal else None for v in views]
        self.result["variables"] = _variables(self.facts, [s for s in self.sections if s is not None])
        self.programs = obj.programs()
        return True

    def _map_index(self, key: str) -> int:
        """A map key (an internal map's section or a map's name); ValueError when the object has no such map."""
        assert self.obj is not None
        try:
            return self.obj.map_index(key)
        except KeyError:
            raise ValueError(f"reuse of {key!r}: {self.path} has no such map") from None

    def map_fd(self, key: str) -> int | None:
        """The fd of the map `key`; None when it was not created (libbpf's placeholder memfd included)."""
        assert self.obj is not None
        self._map_index(key)
        fd = self.obj.map_fd(key)
        return fd if fd_kind(fd) == "map" else None

    def placeholder_fd(self, key: str) -> int | None:
        """The placeholder memfd bpf_map__fd returns for the map `key` libbpf never created, else None: a user
        handing bpf_map__fd's answer to bpf_map__reuse_fd hands over this."""
        assert self.obj is not None
        self._map_index(key)
        fd = self.obj.map_fd(key)
        return fd if fd_kind(fd) == "placeholder" else None

    def reuse(self, key: str, fd: int) -> str | None:
        """bpf_map__reuse_fd before load; the reason when libbpf refuses. Each call is kept in the result's
        `reuse` (map, what the source fd was, libbpf's answer): libbpf accepts a placeholder memfd through its
        fdinfo fallback, which is a fact of its own and no created map."""
        assert self.obj is not None
        index = self._map_index(key)
        kind = fd_kind(fd)
        rc = self.obj.reuse_fd(key, fd)
        self.result.setdefault("reuse", []).append({"map": key, "source_fd": kind, "rc": rc})
        if rc < 0:
            return f"bpf_map__reuse_fd: {-rc} ({os.strerror(-rc)})"
        self.reused.add(index)
        return None

    def fail_reuse(self, message: str) -> None:
        assert self.obj is not None
        self._fail_reuse(message, [p.name for p in self.programs])
        self.result["maps"] = self._uncreated_maps(self.obj.maps())

    def set_attach_target(self, ext: str, target: LibbpfSession | None, prog: str, func: str) -> None:
        """bpf_program__set_attach_target before load. Without a loaded target program nothing is set, and libbpf
        resolves (and fails) the target on its own at load."""
        assert self.obj is not None
        fd = target.obj.prog_fd(prog) if target is not None and target.obj is not None else -1
        if fd >= 0 and self.obj.set_attach_target(ext, fd, func) == 0:
            self.targets[ext] = (fd, func)

    def load(self) -> bool:
        assert self.obj is not None
        try:
            self.obj.load()
        except LibbpfError as e:
            self._load_failed(e)
            return False
        self.result["load"] = {"ok": True, "errno": 0, "message": None}
        self.views = views = self.obj.maps()
        for i, v in enumerate(views):
            # a reused map keeps the source's contents: its own starting value is never written
            if i in self.after_load and i not in self.reused and v.created:
                _write_key0(v.fd, v.type, v.key_size, v.value_size, self.after_load[i], self.ncpus)
        for v, section in zip(views, self.sections, strict=True):
            # bpf_map__fd >= 0 is not enough: a map libbpf never created keeps its placeholder memfd
            entry = map_entry(
                name=v.name, kernel_name=bpf.map_info(v.fd).name if v.created else None, section=section,
                type=_type_name(v.type), key_size=v.key_size, value_size=v.value_size,
                max_entries=v.max_entries, flags=v.map_flags, internal=v.internal, created=v.created)
            if v.fd_kind == "placeholder":
                entry["placeholder_fd"] = True
            self.result["maps"].append(entry)
        for p in self.obj.programs():
            if p.fd < 0:
                self.result["programs"].append(program_entry(p.name, "not_loaded", errno=None))
                continue
            self.prog_fds[p.name] = p.fd
            self.result["programs"].append(program_entry(
                p.name, "accepted", xlated_insns=bpf.prog_info(p.fd).xlated_prog_len // 8))
        self.loaded = True
        return True

    def _uncreated_maps(self, views: Sequence[MapView]) -> list[dict[str, Any]]:
        return [map_entry(name=v.name, kernel_name=None, section=s, type=_type_name(v.type), key_size=v.key_size,
                          value_size=v.value_size, max_entries=v.max_entries, flags=v.map_flags,
                          internal=v.internal, created=False)
                for v, s in zip(views, self.sections, strict=True)]

    def _load_failed(self, e: LibbpfError) -> None:
        failed, err, message, cls = _rejection(e)
        self.result["load"] = {"ok": False, "errno": e.errno, "message": message}
        # libbpf destroys every map of an object that failed to load
        self.result["maps"] = self._uncreated_maps(self.views)
        verdict = "accepted" if failed is not None else "not_loaded"
        for p in self.programs:
            if p.name == failed:
                self.result["programs"].append(program_entry(p.name, "rejected", errno=err, message_class=cls,
                                                             message=message))
                verdict = "not_loaded"
            elif verdict == "accepted" and p.autoload is not False:
                self.result["programs"].append(program_entry(p.name, "accepted", xlated_insns=None))
            else:
                self.result["programs"].append(program_entry(p.name, "not_loaded", errno=None))

    def attach(self, ext: str) -> _Closeable | None:
        """bpf_program__attach_freplace to the target set before load; the link, or None when there is none."""
        assert self.obj is not None
        if ext not in self.targets:
            return self._attached(ext, None, "no attach target")
        fd, func = self.targets[ext]
        try:
            return self._attached(ext, self.obj.attach_freplace(ext, fd, func), None)
        except LibbpfError as e:
            return self._attached(ext, None, str(e))

    def snapshot(self, when: str) -> None:
        if not self.loaded:
            return
        for v, m in zip(self.views, self.result["maps"], strict=True):
            if m["created"]:
                m[when] = _read_key0(v.fd, v.type, v.key_size, v.value_size, self.ncpus)


def observe_libbpf(obj_path: str | os.PathLike[str], *, libbpf: Libbpf, runs: Sequence[Run] = (),
                   initial_values: Mapping[str, bytes] | None = None) -> Result:
    """Open, load and run an object with `libbpf`; `initial_values` maps bpf_map__name to the new value (an
    internal map's before load, any other map's after load, on every possible CPU for per-CPU maps).

    Raises BackendUnavailable, toolchain.elf.ObjectError for a file that is not a BPF object, and ValueError
    for an initial value that names no map or has the wrong size."""
    require_bpf()
    env = environment(libbpf, libbpf_profile_name(libbpf, kernel_features()))
    with LibbpfSession(obj_path, libbpf=libbpf, env=env, initial_values=initial_values) as session:
        _observe_one(session, runs)
    return session.result


def _observe_one(session: LibbpfSession | RawSession, runs: Sequence[Run]) -> None:
    if not session.open():
        return
    session.load()
    session.snapshot("before")
    session.result["runs"] = [session.run(r) for r in runs]
    session.snapshot("after")


# -- the suite's own loader ------------------------------------------------------------------------------------


def _fixed_btf(facts: ObjectFacts, prepared: objload.PreparedObject) -> Btf:
    """The object's BTF after libbpf's DATASEC fix-up (section sizes, variable offsets), as objload computes it."""
    btf = facts.btf
    assert btf is not None
    sizes = {sec.name: sec.size for sec in facts.sections if sec.name in btf.datasecs()}
    sizes.update({m.section: m.value_size for m in prepared.maps if m.internal and m.section is not None})

    def var_offset(section: str, var: str) -> int | None:
        sym = facts.variable_symbol(section, var)
        return sym.value if sym is not None else None

    return fixup_datasecs(btf, sizes, var_offset)


class RawSession(_Session):
    """One object prepared by `backends.objload` (profile "raw": merged semantics, no feature probe) and loaded
    with bpf() directly.

    Map creation stops at the first failure (that map carries `errno`); the object then counts as not loaded.
    The first rejected program fails the object: later programs are not offered and nothing runs, but the maps
    stay readable, so `before`/`after` still show what the kernel holds. The object's BTF (after the DATASEC
    fix-up) goes to the kernel and every program gets its func_info, as with libbpf."""

    loader = "raw"

    def __init__(self, obj_path: str | os.PathLike[str], *, env: dict[str, Any],
                 initial_values: Mapping[str, bytes] | None = None) -> None:
        super().__init__(obj_path, env, initial_values)
        self.stack = contextlib.ExitStack()
        self.prepared: objload.PreparedObject | None = None
        self.specs: list[objload.MapSpec] = []  # a reused map's spec carries the source map's shape
        self.entries: list[dict[str, Any]] = []
        self.fds: list[int] = []
        self.readable = False  # every map exists
        self.reused: dict[int, int] = {}  # map index -> the source's fd, used as it is (owned by the source)
        self.targets: dict[str, tuple[int, int]] = {}  # extension -> (target program fd, target FUNC's BTF id)
        self.btf: Btf | None = None
        self.btf_fd: int = 0

    def close(self) -> None:
        self.stack.close()

    def open(self) -> bool:
        """`initial_values` maps MapSpec.name to a value written after the initial image; ValueError for one that
        names no map or has the wrong size."""
        try:
            prepared = objload.prepare(self.facts, objload.LOADER_PROFILES["raw"])
        except objload.OpenFailure as e:
            _fail_open(self.result, self.facts, e.error_class, e.message, e.errno)
            return False
        by_name = {m.name: m for m in prepared.maps}
        unknown = self.initial_values.keys() - by_name.keys()
        if unknown:
            raise ValueError(f"initial value for unknown map(s) {sorted(unknown)} in {self.path}")
        for name, data in self.initial_values.items():
            _check_size(name, data, by_name[name].value_size)
        self.result["variables"] = [{"name": n, "section": s, "offset": o, "size": z}
                                    for n, s, o, z in prepared.variables]
        self.entries = [map_entry(name=m.name, kernel_name=m.kernel_name, section=m.section,
                                  type=_type_name(m.type), key_size=m.key_size, value_size=m.value_size,
                                  max_entries=m.max_entries, flags=m.flags, internal=m.internal, created=False)
                        for m in prepared.maps]
        self.result["maps"] = self.entries
        self.prepared, self.specs = prepared, list(prepared.maps)
        self.opened = True
        return True

    def _map_index(self, key: str) -> int:
        """A map key: an internal map's section, else a `.maps` map's name; ValueError when there is none."""
        for i, m in enumerate(self.specs):
            if m.section == key:
                return i
        for i, m in enumerate(self.specs):
            if m.section is None and m.name == key:
                return i
        raise ValueError(f"reuse of {key!r}: {self.path} has no such map")

    def map_fd(self, key: str) -> int | None:
        """The fd of the map `key`; None when it was not created."""
        index = self._map_index(key)
        return self.fds[index] if self.readable else None

    def reuse(self, key: str, fd: int) -> str | None:
        """As bpf_map__reuse_fd: the map becomes the source's (its shape and kernel name from the source's info)
        and is neither created nor written."""
        index = self._map_index(key)
        try:
            info = bpf.map_info(fd)
        except bpf.BpfError as e:
            return f"map info of the source: {e}"
        spec = self.specs[index]
        self.specs[index] = dataclasses.replace(
            spec, kernel_name=info.name, type=info.type, key_size=info.key_size, value_size=info.value_size,
            max_entries=info.max_entries, flags=info.map_flags, initial=None, freeze=False)
        self.entries[index].update(name=objload.reused_map_name(spec.name, info.name,
                                                                uses_real_name=objload.map_uses_real_name(spec)),
                                   kernel_name=info.name,
                                   type=_type_name(info.type), key_size=info.key_size, value_size=info.value_size,
                                   max_entries=info.max_entries, flags=info.map_flags)
        self.reused[index] = fd
        return None

    def fail_reuse(self, message: str) -> None:
        assert self.prepared is not None
        self._fail_reuse(message, [p.name for p in self.prepared.programs])
        for entry in self.entries:
            entry["created"] = False

    def _program_spec(self, name: str) -> objload.ProgSpec | None:
        assert self.prepared is not None
        return next((p for p in self.prepared.programs if p.name == name), None)

    def func_btf_id(self, prog: str, func: str) -> int:
        """The BTF id of `func` as linked into `prog` (libbpf looks the name up in the program's BTF); 0 for
        none."""
        spec = self._program_spec(prog)
        fs = spec.func(func) if spec is not None else None
        if fs is not None and fs.btf_id is not None:
            return fs.btf_id
        return (self.btf.find("func", func) or 0) if self.btf is not None else 0

    def set_attach_target(self, ext: str, target: RawSession | None, prog: str, func: str) -> None:
        """The extension's BPF_PROG_LOAD names the target program and its FUNC; without a loaded target both
        stay 0 and the kernel decides."""
        if target is not None and prog in target.prog_fds:
            self.targets[ext] = (target.prog_fds[prog], target.func_btf_id(prog, func))

    def load(self) -> bool:
        if not self._create_maps():
            return False
        self._load_btf()
        failed = not self._load_programs()
        if not failed:
            failed = not _init_prog_arrays(self.specs, self.entries, self.fds, self.prog_fds, self.result)
        if not failed:
            self.result["load"] = {"ok": True, "errno": 0, "message": None}
        self.loaded = not failed
        return self.loaded

    def _create_maps(self) -> bool:
        assert self.prepared is not None
        for index, (spec, entry) in enumerate(zip(self.specs, self.entries, strict=True)):
            if index in self.reused:
                self.fds.append(self.reused[index])
                entry["created"] = True
                continue
            try:
                fd = self._create_map(spec)
            except (bpf.BpfError, ValueError) as e:
                # ValueError: a name the kernel would refuse (bpf.map_create checks the length first)
                err = e.errno if isinstance(e, bpf.BpfError) else _errno.EINVAL
                entry["errno"] = err
                self.result["load"] = {"ok": False, "errno": err, "message": f"map {spec.name!r}: {e}"}
                break
            self.fds.append(fd)
            entry["created"] = True
        if len(self.fds) < len(self.specs):
            # an object whose maps cannot all be made never loads (as in libbpf)
            for entry in self.entries:
                entry["created"] = False
            self.result["programs"] = [program_entry(p.name, "not_loaded", errno=None)
                                       for p in self.prepared.programs]
            return False
        self.readable = True
        return True

    def _create_map(self, spec: objload.MapSpec) -> int:
        fd = self.stack.enter_context(bpf.map_create(spec.type, spec.key_size, spec.value_size, spec.max_entries,
                                                     flags=spec.flags, name=spec.kernel_name or ""))
        if spec.initial is not None:
            _write_key0(fd.fileno(), spec.type, spec.key_size, spec.value_size,
                        spec.initial[:spec.value_size].ljust(spec.value_size, b"\0"), self.ncpus)
        if spec.name in self.initial_values:
            _write_key0(fd.fileno(), spec.type, spec.key_size, spec.value_size, self.initial_values[spec.name],
                        self.ncpus)
        if spec.freeze:
            bpf.map_freeze(fd)
        return fd.fileno()

    def _load_btf(self) -> None:
        """BPF_BTF_LOAD of the fixed-up BTF, as libbpf does for every object with BTF: with func_info a global
        subprogram is verified on its own, a program can be an extension's target, an extension names its FUNC.
        A failure leaves the object without BTF, as libbpf carries on without it; the kernel then judges the
        programs that needed it."""
        if self.facts.btf_data is None:
            return
        assert self.prepared is not None
        try:
            self.btf = _fixed_btf(self.facts, self.prepared)
            self.btf_fd = self.stack.enter_context(bpf.btf_load(btf_encode(self.btf))).fileno()
        except (BtfError, bpf.BpfError):
            self.btf_fd = 0

    def _load_programs(self) -> bool:
        assert self.prepared is not None
        failed = False
        for prog in self.prepared.programs:
            if failed or not prog.autoload:
                self.result["programs"].append(program_entry(prog.name, "not_loaded", errno=None))
                continue
            try:
                fd = self.stack.enter_context(self._load_program(prog))
            except bpf.BpfError as e:
                message = e.reason or str(e)
                self.result["programs"].append(program_entry(
                    prog.name, "rejected", errno=e.errno,
                    message_class=classify_message(e.log.splitlines() or [message], e.errno), message=message))
                self.result["load"] = {"ok": False, "errno": e.errno, "message": message}
                failed = True
                continue
            self.prog_fds[prog.name] = fd.fileno()
            self.result["programs"].append(program_entry(prog.name, "accepted",
                                                         xlated_insns=bpf.prog_info(fd).xlated_prog_len // 8))
        return not failed

    def _load_program(self, prog: objload.ProgSpec) -> bpf.Fd:
        extra: dict[str, Any] = {}
        if self.btf_fd and all(f.btf_id is not None for f in prog.funcs):
            extra.update(prog_btf_fd=self.btf_fd, func_info=[(f.insn_off, f.btf_id) for f in prog.funcs])
        prog_type = bpf.RAW_TRACEPOINT
        if prog.attach_func is not None:
            prog_type = bpf.EXT
            target_fd, btf_id = self.targets.get(prog.name, (0, 0))
            extra.update(attach_prog_fd=target_fd, attach_btf_id=btf_id)
        fd, _ = bpf.prog_load(prog_type, I.encode(objload.resolve(prog, self.fds)), license=_license(self.facts),
                              name=prog.name[:15], log_size=VERIFIER_LOG_SIZE, **extra)
        return fd

    def attach(self, ext: str) -> _Closeable | None:
        """BPF_LINK_CREATE of the extension to the target it was loaded for; the link, or None."""
        if ext not in self.prog_fds or ext not in self.targets:
            return self._attached(ext, None, "not loaded" if ext not in self.prog_fds else "no attach target")
        target_fd, btf_id = self.targets[ext]
        try:
            link = bpf.link_create(self.prog_fds[ext], target_fd, bpf.BPF_TRACE_FREPLACE, btf_id)
        except bpf.BpfError as e:
            return self._attached(ext, None, str(e))
        return self._attached(ext, link, None)

    def snapshot(self, when: str) -> None:
        if not self.readable:
            return
        for spec, entry, fd in zip(self.specs, self.entries, self.fds, strict=True):
            entry[when] = _read_key0(fd, spec.type, spec.key_size, spec.value_size, self.ncpus)


def observe_raw(obj_path: str | os.PathLike[str], *, runs: Sequence[Run] = (),
                initial_values: Mapping[str, bytes] | None = None) -> Result:
    """Observe one object with the suite's own loader (see RawSession). `initial_values` maps MapSpec.name to a
    value written after the initial image."""
    require_bpf()
    env = environment(None, raw_profile_name(kernel_features()))
    with RawSession(obj_path, env=env, initial_values=initial_values) as session:
        _observe_one(session, runs)
    return session.result


def _init_prog_arrays(specs: Sequence[objload.MapSpec], entries: Sequence[dict[str, Any]], fds: Sequence[int],
                      prog_fds: Mapping[str, int], result: Result) -> bool:
    """What libbpf does after loading every program (bpf_object__init_prog_arrays): write each statically
    initialised prog array slot. False, with the failing map's errno recorded, when an update fails."""
    for spec, entry, fd in zip(specs, entries, fds, strict=True):
        for slot, name in sorted(spec.prog_values.items()):
            err, why = _errno.EINVAL, "not loaded"
            if name in prog_fds:
                try:
                    bpf.map_update_elem(fd, slot.to_bytes(4, "little"), prog_fds[name].to_bytes(4, "little"))
                    continue
                except bpf.BpfError as e:
                    err, why = e.errno, e.strerror
            entry["errno"] = err
            result["load"] = {"ok": False, "errno": err,
                              "message": f"map {spec.name!r}: failed to initialize slot [{slot}] to prog {name!r}: "
                                         f"{why}"}
            return False
    return True


def observe(obj_path: str | Path, *, loader: str = "libbpf", libbpf: Libbpf | None = None,
            runs: Sequence[Run] = (), initial_values: Mapping[str, bytes] | None = None) -> Result:
    """Dispatch on the loader name ("libbpf" needs `libbpf`, the system's by default)."""
    if loader == "raw":
        return observe_raw(obj_path, runs=runs, initial_values=initial_values)
    if loader != "libbpf":
        raise ValueError(f"unknown loader {loader!r} (libbpf or raw)")
    return observe_libbpf(obj_path, libbpf=libbpf or open_libbpf(), runs=runs, initial_values=initial_values)


# -- object sets (docs/object-sets.md) ---------------------------------------------------------------------------
