"""Observations from the real kernel: one BPF object loaded, run on chosen CPUs and read back.

Two loaders feed the same result document (`shared/spec/result-schema.md`):
  * `observe_libbpf` judges a shipped libbpf (through its public API) together with the running kernel;
  * `observe_raw` uses the suite's own object preparation (`backends.objload`, profile "raw") and talks to the
    kernel through `bpf()` alone, so kernel behaviour is observed independently of any libbpf.

Both follow libbpf's object semantics: the first program the kernel rejects fails the object, later programs
are never offered and no run happens. Programs only ever run through BPF_PROG_TEST_RUN; every descriptor
opened here is closed on every path.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import functools
import os
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from backends import objload
from backends.kernel import bpf, probes
from backends.kernel.libbpf import Libbpf, LibbpfError, LibbpfMissing, LogRecord
from schema import messages
from schema.result import Result, map_entry, new_env, new_result, program_entry
from toolchain import insn as I
from toolchain.elf import ObjectFacts, read_object

__all__ = [
    "BackendUnavailable", "Run", "environment", "kernel_features", "kernel_profile_name", "libbpf_profile_name",
    "raw_profile_name", "classify_message", "observe", "observe_libbpf", "observe_raw", "open_libbpf", "require_bpf",
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

# (libbpf axis, kernel axis) -> the oracle's profile name.
_LIBBPF_PROFILES = {
    ("old", "unpatched"): "unpatched",
    ("merged", "patched"): "merged",
    ("merged", "unpatched"): "merged-unpatched-kernel",
    ("old", "patched"): "old-patched-kernel",
}


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


def kernel_profile_name(features: Mapping[str, bool | None]) -> str:
    """The kernel axis, always from the probe: direct value access on a 1-entry PERCPU_ARRAY or not."""
    return "patched" if features.get("percpu_data") else "unpatched"


def libbpf_axis(libbpf: Libbpf) -> str:
    return "merged" if libbpf.version_tuple()[:2] >= LIBBPF_PERCPU_VERSION else "old"


def libbpf_profile_name(libbpf: Libbpf, features: Mapping[str, bool | None]) -> str:
    return _LIBBPF_PROFILES[libbpf_axis(libbpf), kernel_profile_name(features)]


def raw_profile_name(features: Mapping[str, bool | None]) -> str:
    return f"raw-{kernel_profile_name(features)}"


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
    if map_type == objload.BPF_MAP_TYPE_PROG_ARRAY:
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


def _program_names(facts: ObjectFacts) -> list[str]:
    return [f.name for f in facts.functions if f.is_program]


def _license(facts: ObjectFacts) -> str:
    sec = facts.section("license")
    return sec.data.split(b"\0", 1)[0].decode(errors="replace") if sec is not None and sec.data else "GPL"


@functools.lru_cache(maxsize=64)
def _read_cached(path: str, _stamp: tuple[int, int, int]) -> ObjectFacts:
    return read_object(path)


def _facts(obj_path: str | os.PathLike[str]) -> ObjectFacts:
    """The object's facts; parsing dominates an observation, so a file unchanged since its last read (same inode,
    size and mtime) is parsed once."""
    path = os.path.realpath(obj_path)
    try:
        st = os.stat(path)
    except OSError:
        return read_object(obj_path)  # raises ObjectError with the reason
    return _read_cached(path, (st.st_ino, st.st_size, st.st_mtime_ns))


def _base_result(obj_path: str | os.PathLike[str], facts: ObjectFacts, env: dict[str, Any], loader: str) -> Result:
    result = new_result("kernel", env, {"path": os.fspath(obj_path), "sha256": facts.sha256})
    result["loader"] = loader
    result["load"] = {"ok": False, "errno": None, "message": None}
    return result


def _fail_open(result: Result, facts: ObjectFacts, error_class: str, message: str | None,
               err: int | None) -> Result:
    result["open"] = {"ok": False, "error_class": error_class, "message": message}
    result["programs"] = [program_entry(name, "not_loaded", errno=err) for name in _program_names(facts)]
    # nothing to run against: like a prediction, an object that never opened has no runs
    result["runs"] = []
    return result


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


def observe_libbpf(obj_path: str | os.PathLike[str], *, libbpf: Libbpf, runs: Sequence[Run] = (),
                   initial_values: Mapping[str, bytes] | None = None) -> Result:
    """Open, load and run an object with `libbpf`; `initial_values` maps bpf_map__name to the new value (an
    internal map's before load, any other map's after load, on every possible CPU for per-CPU maps).

    Raises BackendUnavailable, toolchain.elf.ObjectError for a file that is not a BPF object, and ValueError
    for an initial value that names no map or has the wrong size."""
    require_bpf()
    facts = _facts(obj_path)
    features = kernel_features()
    result = _base_result(obj_path, facts, environment(libbpf, libbpf_profile_name(libbpf, features)), "libbpf")
    ncpus = len(probes.possible_cpus())
    online = probes.online_cpus()
    initial_values = dict(initial_values or {})
    try:
        obj = libbpf.open(os.fspath(obj_path))
    except LibbpfError as e:
        cls, message = _open_failure(e)
        return _fail_open(result, facts, cls, message, e.errno)
    with obj:
        views = obj.maps()
        by_name = {v.name: v for v in views}
        unknown = initial_values.keys() - by_name.keys()
        if unknown:
            raise ValueError(f"initial value for unknown map(s) {sorted(unknown)} in {obj_path}")
        after_load: dict[str, bytes] = {}
        for name, data in initial_values.items():
            v = by_name[name]
            _check_size(name, data, v.value_size)
            if v.internal and v.type not in bpf.PERCPU_MAP_TYPES:
                rc = obj.set_initial_value(name, data)
                if rc:
                    raise ValueError(f"bpf_map__set_initial_value({name}) = {rc}")
            else:
                after_load[name] = data
        sections = [_internal_section(v.name) if v.internal else None for v in views]
        result["variables"] = _variables(facts, [s for s in sections if s is not None])
        programs = obj.programs()
        try:
            obj.load()
            load_error: LibbpfError | None = None
        except LibbpfError as e:
            load_error = e

        if load_error is not None:
            failed, err, message, cls = _rejection(load_error)
            result["load"] = {"ok": False, "errno": load_error.errno, "message": message}
            # libbpf destroys every map of an object that failed to load
            result["maps"] = [map_entry(name=v.name, kernel_name=None, section=s, type=_type_name(v.type),
                                        key_size=v.key_size, value_size=v.value_size, max_entries=v.max_entries,
                                        flags=v.map_flags, internal=v.internal, created=False)
                              for v, s in zip(views, sections, strict=True)]
            verdict = "accepted" if failed is not None else "not_loaded"
            for p in programs:
                if p.name == failed:
                    result["programs"].append(program_entry(p.name, "rejected", errno=err, message_class=cls,
                                                            message=message))
                    verdict = "not_loaded"
                elif verdict == "accepted" and p.autoload is not False:
                    result["programs"].append(program_entry(p.name, "accepted", xlated_insns=None))
                else:
                    result["programs"].append(program_entry(p.name, "not_loaded", errno=None))
            result["runs"] = _do_runs(runs, {}, online, "object failed to load")
            return result

        result["load"] = {"ok": True, "errno": 0, "message": None}
        views = obj.maps()
        for v in views:
            if v.name in after_load and v.fd >= 0:
                _write_key0(v.fd, v.type, v.key_size, v.value_size, after_load[v.name], ncpus)
        for v, section in zip(views, sections, strict=True):
            created = v.fd >= 0
            result["maps"].append(map_entry(
                name=v.name, kernel_name=bpf.map_info(v.fd).name if created else None, section=section,
                type=_type_name(v.type), key_size=v.key_size, value_size=v.value_size,
                max_entries=v.max_entries, flags=v.map_flags, internal=v.internal, created=created,
                before=_read_key0(v.fd, v.type, v.key_size, v.value_size, ncpus) if created else None))
        prog_fds: dict[str, int] = {}
        for p in obj.programs():
            if p.fd < 0:
                result["programs"].append(program_entry(p.name, "not_loaded", errno=None))
                continue
            prog_fds[p.name] = p.fd
            result["programs"].append(program_entry(
                p.name, "accepted", xlated_insns=bpf.prog_info(p.fd).xlated_prog_len // 8))
        result["runs"] = _do_runs(runs, prog_fds, online, None)
        for v, m in zip(views, result["maps"], strict=True):
            if m["created"]:
                m["after"] = _read_key0(v.fd, v.type, v.key_size, v.value_size, ncpus)
    return result


# -- the suite's own loader ------------------------------------------------------------------------------------


def observe_raw(obj_path: str | os.PathLike[str], *, runs: Sequence[Run] = (),
                initial_values: Mapping[str, bytes] | None = None) -> Result:
    """Prepare the object with `backends.objload` (profile "raw": merged semantics, no feature probe) and load
    it with bpf() directly. `initial_values` maps MapSpec.name to a value written after the initial image.

    Map creation stops at the first failure (that map carries `errno`); the object then counts as not loaded.
    The first rejected program fails the object: later programs are not offered and nothing runs, but the
    maps stay readable, so `before`/`after` still show what the kernel holds."""
    require_bpf()
    facts = _facts(obj_path)
    features = kernel_features()
    result = _base_result(obj_path, facts, environment(None, raw_profile_name(features)), "raw")
    ncpus = len(probes.possible_cpus())
    online = probes.online_cpus()
    initial_values = dict(initial_values or {})
    try:
        prepared = objload.prepare(facts, objload.LOADER_PROFILES["raw"])
    except objload.OpenFailure as e:
        return _fail_open(result, facts, e.error_class, e.message, e.errno)
    specs = prepared.maps
    by_name = {m.name: m for m in specs}
    unknown = initial_values.keys() - by_name.keys()
    if unknown:
        raise ValueError(f"initial value for unknown map(s) {sorted(unknown)} in {obj_path}")
    for name, data in initial_values.items():
        _check_size(name, data, by_name[name].value_size)
    result["variables"] = [{"name": n, "section": s, "offset": o, "size": z} for n, s, o, z in prepared.variables]
    entries = [map_entry(name=m.name, kernel_name=m.kernel_name, section=m.section, type=_type_name(m.type),
                         key_size=m.key_size, value_size=m.value_size, max_entries=m.max_entries, flags=m.flags,
                         internal=m.internal, created=False) for m in specs]
    result["maps"] = entries

    with contextlib.ExitStack() as stack:
        fds: list[int] = []
        for spec, entry in zip(specs, entries, strict=True):
            try:
                fd = stack.enter_context(bpf.map_create(spec.type, spec.key_size, spec.value_size,
                                                        spec.max_entries, flags=spec.flags,
                                                        name=spec.kernel_name or ""))
                if spec.initial is not None:
                    _write_key0(fd.fileno(), spec.type, spec.key_size, spec.value_size,
                                spec.initial[:spec.value_size].ljust(spec.value_size, b"\0"), ncpus)
                if spec.name in initial_values:
                    _write_key0(fd.fileno(), spec.type, spec.key_size, spec.value_size,
                                initial_values[spec.name], ncpus)
                if spec.freeze:
                    bpf.map_freeze(fd)
            except (bpf.BpfError, ValueError) as e:
                # ValueError: a name the kernel would refuse (bpf.map_create checks the length first)
                err = e.errno if isinstance(e, bpf.BpfError) else _errno.EINVAL
                entry["errno"] = err
                result["load"] = {"ok": False, "errno": err, "message": f"map {spec.name!r}: {e}"}
                break
            fds.append(fd.fileno())
            entry["created"] = True
        if len(fds) < len(specs):
            # an object whose maps cannot all be made never loads (as in libbpf)
            for entry in entries:
                entry["created"] = False
            result["programs"] = [program_entry(p.name, "not_loaded", errno=None) for p in prepared.programs]
            result["runs"] = _do_runs(runs, {}, online, "object failed to load")
            return result

        license = _license(facts)
        prog_fds: dict[str, int] = {}
        failed = False
        for prog in prepared.programs:
            if failed or not prog.autoload:
                result["programs"].append(program_entry(prog.name, "not_loaded", errno=None))
                continue
            insns = I.encode(objload.resolve(prog, fds))
            try:
                fd, _ = bpf.prog_load(bpf.RAW_TRACEPOINT, insns, license=license, name=prog.name[:15],
                                      log_size=VERIFIER_LOG_SIZE)
            except bpf.BpfError as e:
                message = e.reason or str(e)
                result["programs"].append(program_entry(prog.name, "rejected", errno=e.errno,
                                                        message_class=classify_message(e.log.splitlines()
                                                                                       or [message], e.errno),
                                                        message=message))
                result["load"] = {"ok": False, "errno": e.errno, "message": message}
                failed = True
                continue
            stack.enter_context(fd)
            prog_fds[prog.name] = fd.fileno()
            result["programs"].append(program_entry(prog.name, "accepted",
                                                    xlated_insns=bpf.prog_info(fd).xlated_prog_len // 8))
        if not failed:
            failed = not _init_prog_arrays(specs, entries, fds, prog_fds, result)
        if not failed:
            result["load"] = {"ok": True, "errno": 0, "message": None}
        for spec, entry, fd in zip(specs, entries, fds, strict=True):
            entry["before"] = _read_key0(fd, spec.type, spec.key_size, spec.value_size, ncpus)
        result["runs"] = _do_runs(runs, prog_fds, online, "object failed to load" if failed else None)
        for spec, entry, fd in zip(specs, entries, fds, strict=True):
            entry["after"] = _read_key0(fd, spec.type, spec.key_size, spec.value_size, ncpus)
    return result


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
