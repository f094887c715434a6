"""ctypes binding to a shipped libbpf, to observe how it treats BPF objects with global data.

The suite must judge the libbpf a user actually ships (the distribution's `libbpf.so.1` or a patched
build given by path), so nothing here reimplements libbpf: every answer comes from its public API.
Programs are only run through BPF_PROG_TEST_RUN; the only attachment is an extension program's freplace link to
a program the suite loaded itself, never a live hook.

libbpf reports most of its reasoning only through its print callback (for instance the INFO line it prints
when it skips a section it does not understand), so every line it prints while an object is opened, loaded
or closed is captured into that object's `log`, at every level including DEBUG.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as _errno
import os
import platform
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

__all__ = [
    "BPF_F_MMAPABLE",
    "BPF_F_RDONLY_PROG",
    "BPF_F_TEST_RUN_ON_CPU",
    "BPF_MAP_TYPE_ARRAY",
    "LIBBPF_DEBUG",
    "LIBBPF_INFO",
    "LIBBPF_WARN",
    "Libbpf",
    "LibbpfError",
    "LibbpfMissing",
    "LibbpfLink",
    "LibbpfObject",
    "LogRecord",
    "MapView",
    "PLACEHOLDER_FD_NAME",
    "ProgView",
    "fd_kind",
]

# enum libbpf_print_level
LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG = 0, 1, 2

from toolchain.uapi import (  # noqa: E402, F401  (re-exported)
    BPF_F_MMAPABLE,
    BPF_F_RDONLY_PROG,
    BPF_F_TEST_RUN_ON_CPU,
    BPF_MAP_TYPE_ARRAY,
    BPF_MAP_TYPE_PERCPU_ARRAY,
)

# enum libbpf_errno: libbpf's own error codes, above the kernel's errno range.
_LIBBPF_ERRNO_NAMES = {
    4000: "LIBBPF_ERRNO__LIBELF",
    4001: "LIBBPF_ERRNO__FORMAT",
    4002: "LIBBPF_ERRNO__KVERSION",
    4003: "LIBBPF_ERRNO__ENDIAN",
    4004: "LIBBPF_ERRNO__INTERNAL",
    4005: "LIBBPF_ERRNO__RELOC",
    4006: "LIBBPF_ERRNO__LOAD",
    4007: "LIBBPF_ERRNO__VERIFY",
    4008: "LIBBPF_ERRNO__PROG2BIG",
    4009: "LIBBPF_ERRNO__KVER",
    4010: "LIBBPF_ERRNO__PROGTYPE",
    4011: "LIBBPF_ERRNO__WRNGPID",
    4012: "LIBBPF_ERRNO__INVSEQ",
    4013: "LIBBPF_ERRNO__NLPARSE",
}

# Pointers libbpf < 1.0 (or 1.x in legacy mode) returns to encode an error: the top 4095 addresses.
_MAX_ERRNO = 4095
_PTR_MASK = (1 << (8 * ctypes.sizeof(ctypes.c_void_p))) - 1


# libbpf >= 1.8 gives every map a memfd of this name from open until the map is created; a map it then never
# creates (autocreate cleared on a kernel without the feature) keeps it, and bpf_map__fd returns it (>= 0).
PLACEHOLDER_FD_NAME = "libbpf-placeholder-fd"


def fd_kind(fd: int) -> str:
    """What a descriptor from bpf_map__fd really is: "map" (a kernel bpf map), "placeholder" (libbpf's memfd),
    "none" (negative or closed) or "other". Only a "map" is a created map."""
    if fd < 0:
        return "none"
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "none"
    if target == "anon_inode:bpf-map":
        return "map"
    if target.startswith(f"/memfd:{PLACEHOLDER_FD_NAME}"):
        return "placeholder"
    return "other"


def errno_name(err: int) -> str:
    """Symbolic name of a positive errno or libbpf error code, e.g. `EINVAL`, `LIBBPF_ERRNO__RELOC`."""
    return _errno.errorcode.get(err) or _LIBBPF_ERRNO_NAMES.get(err) or f"errno {err}"


class LibbpfMissing(RuntimeError):
    """The library cannot be used at all: file absent, not loadable, or missing a required symbol."""


@dataclass(frozen=True)
class LogRecord:
    level: int  # LIBBPF_WARN / LIBBPF_INFO / LIBBPF_DEBUG
    line: str


class LibbpfError(RuntimeError):
    """A libbpf call failed. `errno` is positive; `log` holds the lines libbpf printed for the object."""

    def __init__(self, op: str, err: int, records: list[LogRecord] | None = None) -> None:
        self.op = op
        self.errno = abs(err)
        self.records: list[LogRecord] = list(records or [])
        self.log: list[str] = [r.line for r in self.records]
        detail = _most_relevant(self.records)
        msg = f"{op} failed: {errno_name(self.errno)} ({self.errno})"
        super().__init__(f"{msg}: {detail}" if detail else msg)


_VERIFIER_BEGIN = "-- BEGIN PROG LOAD LOG --"
_VERIFIER_END = "-- END PROG LOAD LOG --"
# Trailing verifier statistics, never the reason for a rejection.
_VERIFIER_NOISE = re.compile(r"^(processed \d+ insns|verification time|stack depth|mark_precise)")
# libbpf's closing summaries that only repeat that something above failed.
_GENERIC_WARN = re.compile(r"^libbpf: (failed to load object|failed to open|prog '[^']*': failed to load)")


def _most_relevant(records: list[LogRecord]) -> str:
    """Pick the line that explains a failure.

    A verifier rejection is explained by the last verifier line before libbpf's END marker; anything else
    by the first WARN line, since libbpf prints the cause before its generic "failed to ..." summaries.
    """
    lines = [r.line for r in records]
    for end in range(len(lines) - 1, -1, -1):
        if _VERIFIER_END not in lines[end]:
            continue
        for i in range(end - 1, -1, -1):
            text = lines[i].strip()
            if _VERIFIER_BEGIN in text:
                break
            if text and not _VERIFIER_NOISE.match(text):
                return text
        break
    warns = [r.line for r in records if r.level == LIBBPF_WARN]
    for line in warns:
        if not _GENERIC_WARN.match(line):
            return line
    return warns[0] if warns else ""


# ---------------------------------------------------------------------------------------------------------
# Print capture. libbpf_set_print() is global per loaded .so, so one callback serves every instance and
# routes lines to whichever object is being opened/loaded/closed right now (the "current sink").

_SINK_LOCK = threading.RLock()
_sink: list[LogRecord] | None = None

_libc = ctypes.CDLL(None, use_errno=True)
_vsnprintf = _libc.vsnprintf
_vsnprintf.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p]
_vsnprintf.restype = ctypes.c_int

# Size of the va_list object the callback receives a pointer to. Copying those bytes is what va_copy does
# on these ABIs; it lets us measure the message first and still format it in full afterwards.
_VA_LIST_BYTES = {"x86_64": 24, "amd64": 24}.get(platform.machine().lower())
_FIRST_BUF = 1024
# Without a known va_list layout the list can be consumed only once, so a buffer this large must do.
_FALLBACK_BUF = 1 << 20


_AP_COPY = ctypes.create_string_buffer(_VA_LIST_BYTES or 1)
_LINE_BUF = ctypes.create_string_buffer(_FIRST_BUF)


def _format(fmt: int, ap: int) -> str:
    if _VA_LIST_BYTES is None:
        buf = ctypes.create_string_buffer(_FALLBACK_BUF)
        _vsnprintf(buf, _FALLBACK_BUF, fmt, ap)
        return buf.value.decode("utf-8", "replace")
    # one pair of buffers for every message (libbpf prints dozens per load; the callback runs in the calling
    # thread, one at a time)
    ap_copy, buf = _AP_COPY, _LINE_BUF
    ctypes.memmove(ap_copy, ap, _VA_LIST_BYTES)
    n = _vsnprintf(buf, _FIRST_BUF, fmt, ctypes.addressof(ap_copy))
    if n >= _FIRST_BUF:
        buf = ctypes.create_string_buffer(n + 1)
        _vsnprintf(buf, n + 1, fmt, ap)
    return buf.value.decode("utf-8", "replace")


_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


# A Ctrl-C that lands inside the print callback: ctypes would report and drop it, so it is kept here and raised
# again by `_capture` as soon as libbpf returns.
_interrupted = False


def _on_print(level: int, fmt: int | None, ap: int | None) -> int:
    # An exception cannot cross back into C; a lost line is better than a crash.
    global _interrupted
    try:
        sink = _sink
        if sink is None or not fmt:
            return 0
        text = _format(fmt, ap or 0)
        for line in text.rstrip("\n").split("\n"):
            sink.append(LogRecord(level, line.rstrip("\r")))
    except KeyboardInterrupt:
        _interrupted = True
    except Exception:
        pass
    return 0


# Module-level so the C-callable thunk outlives every library that points at it.
_PRINT_CB = _PRINT_FN(_on_print)


@contextlib.contextmanager
def _capture(records: list[LogRecord]) -> Iterator[None]:
    """Route libbpf's printing to `records` for the duration, one object at a time."""
    global _sink, _interrupted
    with _SINK_LOCK:
        previous, _sink = _sink, records
        try:
            yield
        finally:
            _sink = previous
            if _interrupted:
                _interrupted = False
                raise KeyboardInterrupt


# ---------------------------------------------------------------------------------------------------------
# Symbol table.

_vp, _cp, _i, _u32, _sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_size_t

# name: (restype, argtypes)
_REQUIRED: dict[str, tuple[Any, list[Any]]] = {
    "bpf_object__open_file": (_vp, [_cp, _vp]),
    "libbpf_set_print": (_vp, [_PRINT_FN]),
    "bpf_object__load": (_i, [_vp]),
    "bpf_object__close": (None, [_vp]),
    "bpf_object__next_map": (_vp, [_vp, _vp]),
    "bpf_object__next_program": (_vp, [_vp, _vp]),
    "bpf_object__find_map_by_name": (_vp, [_vp, _cp]),
    "bpf_object__find_program_by_name": (_vp, [_vp, _cp]),
    "bpf_map__name": (_cp, [_vp]),
    "bpf_map__type": (_i, [_vp]),
    "bpf_map__key_size": (_u32, [_vp]),
    "bpf_map__value_size": (_u32, [_vp]),
    "bpf_map__max_entries": (_u32, [_vp]),
    "bpf_map__map_flags": (_u32, [_vp]),
    "bpf_map__fd": (_i, [_vp]),
    "bpf_map__set_initial_value": (_i, [_vp, _vp, _sz]),
    "bpf_map__set_value_size": (_i, [_vp, _u32]),
    "bpf_program__name": (_cp, [_vp]),
    "bpf_program__section_name": (_cp, [_vp]),
    "bpf_program__fd": (_i, [_vp]),
    "bpf_map_lookup_elem": (_i, [_i, _vp, _vp]),
    "bpf_prog_test_run_opts": (_i, [_i, _vp]),
}

# Absent from older or trimmed builds; the views report None (or fall back) without them.
_OPTIONAL: dict[str, tuple[Any, list[Any]]] = {
    "libbpf_major_version": (_u32, []),
    "libbpf_minor_version": (_u32, []),
    "libbpf_get_error": (ctypes.c_long, [_vp]),
    "bpf_map__initial_value": (_vp, [_vp, ctypes.POINTER(_sz)]),
    "bpf_map__is_internal": (ctypes.c_bool, [_vp]),
    "bpf_map__autocreate": (ctypes.c_bool, [_vp]),
    "bpf_program__type": (_i, [_vp]),
    "bpf_program__autoload": (ctypes.c_bool, [_vp]),
    # object sets: map reuse and extension programs
    "bpf_map__reuse_fd": (_i, [_vp, _i]),
    "bpf_program__set_attach_target": (_i, [_vp, _i, _cp]),
    "bpf_program__attach_freplace": (_vp, [_vp, _i, _cp]),
    "bpf_link__destroy": (_i, [_vp]),
}


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _loaded_from(func: Any, fallback: str) -> str:
    """Real path of the file the loader picked for the library that defines `func`."""
    try:
        dladdr = _libc.dladdr
        dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
        dladdr.restype = ctypes.c_int
        info = _DlInfo()
        addr = ctypes.cast(func, ctypes.c_void_p).value
        if dladdr(addr, ctypes.byref(info)) and info.dli_fname:
            return os.path.realpath(os.fsdecode(info.dli_fname))
    except (AttributeError, OSError):
        pass
    return os.path.realpath(fallback) if os.sep in fallback else fallback


class _TestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts as of libbpf 1.1 (sz tells newer/older builds which fields we know)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


def _decode(raw: bytes | None) -> str:
    return raw.decode("utf-8", "replace") if raw is not None else ""


def _err_from(ret: int) -> int:
    """Positive errno from a low-level call: 1.x returns -errno, 0.x returns -1 and sets errno."""
    err = ctypes.get_errno()
    if ret == -1 and err:
        return err
    return -ret if ret < 0 else (err or _errno.EIO)


# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MapView:
    """A snapshot of what libbpf reports for one map at the time of the call."""

    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int
    initial_value: bytes | None
    # From bpf_map__is_internal when the library has it. Otherwise a heuristic: libbpf names the maps it
    # makes for data sections ".data.foo" or "<obj>.data", and a map declared in C is a C identifier, so a
    # '.' anywhere in the name marks an internal map.
    internal: bool
    autocreate: bool | None
    fd: int
    fd_kind: str = "none"  # what `fd` is (`fd_kind`): a placeholder memfd is no created map

    @property
    def created(self) -> bool:
        return self.fd_kind == "map"


@dataclass(frozen=True)
class ProgView:
    name: str
    section: str
    type: int | None
    fd: int  # -1 until loaded (libbpf itself may report -ENOENT; normalised)
    autoload: bool | None


class Libbpf:
    """One libbpf shared object, loaded privately (RTLD_LOCAL) so several builds can coexist."""

    def __init__(self, path: str | None = None) -> None:
        if path is None:
            name = "libbpf.so.1"
        elif os.sep in path:
            name = os.path.abspath(path)
            if not os.path.exists(name):
                raise LibbpfMissing(f"libbpf.so not found at {name}")
        else:
            name = path
        try:
            self._lib = ctypes.CDLL(name, use_errno=True)
        except OSError as e:
            raise LibbpfMissing(f"libbpf.so not loadable from {name}: {e}") from None
        self._fn: dict[str, Any] = {}
        for sym, (restype, argtypes) in _REQUIRED.items():
            self._fn[sym] = self._bind(sym, restype, argtypes, name, required=True)
        for sym, (restype, argtypes) in _OPTIONAL.items():
            fn = self._bind(sym, restype, argtypes, name, required=False)
            if fn is not None:
                self._fn[sym] = fn
        self.path: str = _loaded_from(self._fn["bpf_object__open_file"], name)
        self.version: str = self._version()
        self._keep_print_cb = _PRINT_CB
        self._fn["libbpf_set_print"](_PRINT_CB)

    def _bind(self, sym: str, restype: Any, argtypes: list[Any], name: str, *, required: bool) -> Any:
        try:
            fn = getattr(self._lib, sym)
        except AttributeError:
            if required:
                raise LibbpfMissing(f"{name} lacks symbol {sym}") from None
            return None
        fn.restype = restype
        fn.argtypes = argtypes
        return fn

    def has(self, sym: str) -> bool:
        """Whether this build exports `sym` (of the symbols this binding knows about)."""
        return sym in self._fn

    def require(self, *syms: str) -> None:
        """Raise LibbpfMissing unless this build exports every one of `syms`."""
        missing = [s for s in syms if s not in self._fn]
        if missing:
            raise LibbpfMissing(f"{self.path} lacks symbol(s) {', '.join(missing)}")

    def _version(self) -> str:
        m = re.search(r"libbpf\.so\.(\d+)\.(\d+)\.(\d+)$", os.path.basename(self.path))
        if self.has("libbpf_major_version") and self.has("libbpf_minor_version"):
            major = int(self._fn["libbpf_major_version"]())
            minor = int(self._fn["libbpf_minor_version"]())
            # The patch level is only in the file name, and only trusted when it agrees with the library.
            if m and (int(m.group(1)), int(m.group(2))) == (major, minor):
                return f"{major}.{minor}.{m.group(3)}"
            return f"{major}.{minor}"
        return ".".join(m.groups()) if m else "unknown"

    def version_tuple(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.version.split(".") if p.isdigit())

    def open(self, obj_path: str) -> LibbpfObject:
        records: list[LogRecord] = []
        with _capture(records):
            ctypes.set_errno(0)
            raw = self._fn["bpf_object__open_file"](os.fsencode(obj_path), None)
            err = self._pointer_error(raw)
        if err:
            raise LibbpfError("open", err, records)
        return LibbpfObject(self, raw, obj_path, records)

    def _pointer_error(self, raw: int | None) -> int:
        """The positive errno behind a pointer-returning call's failure, or 0 when `raw` is a valid pointer.
        1.x returns NULL and sets errno; older builds return an ERR_PTR. libbpf_get_error understands both, and
        the ERR_PTR decoding covers builds without it."""
        if raw and raw <= _PTR_MASK - _MAX_ERRNO:
            return 0
        if "libbpf_get_error" in self._fn:
            err = -int(self._fn["libbpf_get_error"](raw))
        elif raw:
            err = _PTR_MASK + 1 - raw
        else:
            err = ctypes.get_errno()
        return err or _errno.EINVAL


class LibbpfLink:
    """A `struct bpf_link` (an freplace link); close() destroys it exactly once."""

    def __init__(self, lib: Libbpf, ptr: int) -> None:
        self._fn = lib._fn
        self._ptr: int | None = ptr

    def close(self) -> None:
        ptr, self._ptr = self._ptr, None
        if ptr:
            self._fn["bpf_link__destroy"](ptr)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class LibbpfObject:
    """An opened `struct bpf_object`. Use as a context manager; close() frees it exactly once."""

    def __init__(self, lib: Libbpf, ptr: int, path: str, records: list[LogRecord]) -> None:
        self._lib = lib
        self._fn = lib._fn
        self._ptr: int | None = ptr
        self.path = path
        self.records: list[LogRecord] = records
        # Buffers handed to libbpf stay alive as long as the object, in case a build keeps the pointer.
        self._buffers: list[Any] = []

    @property
    def log(self) -> list[str]:
        """Every line libbpf printed for this object (open, load, close), in order."""
        return [r.line for r in self.records]

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def close(self) -> None:
        ptr, self._ptr = self._ptr, None
        if ptr:
            with _capture(self.records):
                self._fn["bpf_object__close"](ptr)

    def __enter__(self) -> LibbpfObject:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # A forgotten close() must not leak the object's map and program fds.
        with contextlib.suppress(Exception):
            self.close()

    def _obj(self) -> int:
        if self._ptr is None:
            raise ValueError(f"BPF object {self.path} is closed")
        return self._ptr

    # -- enumeration -----------------------------------------------------------------------------------

    def _map_ptrs(self) -> Iterator[int]:
        obj, pos = self._obj(), None
        while True:
            pos = self._fn["bpf_object__next_map"](obj, pos)
            if not pos:
                return
            yield pos

    def _prog_ptrs(self) -> Iterator[int]:
        obj, pos = self._obj(), None
        while True:
            pos = self._fn["bpf_object__next_program"](obj, pos)
            if not pos:
                return
            yield pos

    def _view_map(self, m: int) -> MapView:
        f = self._fn
        name = _decode(f["bpf_map__name"](m))
        init: bytes | None = None
        if "bpf_map__initial_value" in f:
            size = ctypes.c_size_t(0)
            data = f["bpf_map__initial_value"](m, ctypes.byref(size))
            if data:
                init = ctypes.string_at(data, size.value)
        if "bpf_map__is_internal" in f:
            internal = bool(f["bpf_map__is_internal"](m))
        else:
            internal = "." in name
        fd = int(f["bpf_map__fd"](m))
        return MapView(
            name=name,
            type=int(f["bpf_map__type"](m)),
            key_size=int(f["bpf_map__key_size"](m)),
            value_size=int(f["bpf_map__value_size"](m)),
            max_entries=int(f["bpf_map__max_entries"](m)),
            map_flags=int(f["bpf_map__map_flags"](m)),
            initial_value=init,
            internal=internal,
            autocreate=bool(f["bpf_map__autocreate"](m)) if "bpf_map__autocreate" in f else None,
            fd=fd,
            fd_kind=fd_kind(fd),
        )

    def maps(self) -> list[MapView]:
        return [self._view_map(m) for m in self._map_ptrs()]

    def programs(self) -> list[ProgView]:
        f, out = self._fn, []
        for p in self._prog_ptrs():
            fd = int(f["bpf_program__fd"](p))
            out.append(
                ProgView(
                    name=_decode(f["bpf_program__name"](p)),
                    section=_decode(f["bpf_program__section_name"](p)),
                    type=int(f["bpf_program__type"](p)) if "bpf_program__type" in f else None,
                    fd=fd if fd >= 0 else -1,
                    autoload=bool(f["bpf_program__autoload"](p)) if "bpf_program__autoload" in f else None,
                )
            )
        return out

    def _map(self, name: str) -> int:
        # The name bpf_map__name reports first; then libbpf's own resolution, which also accepts the ELF
        # section name (".data", ".bss") of an internal map.
        for m in self._map_ptrs():
            if _decode(self._fn["bpf_map__name"](m)) == name:
                return m
        m = self._fn["bpf_object__find_map_by_name"](self._obj(), name.encode())
        if not m:
            raise KeyError(f"no map {name!r} in {self.path}")
        return m

    def _prog(self, name: str) -> int:
        p = self._fn["bpf_object__find_program_by_name"](self._obj(), name.encode())
        if not p:
            raise KeyError(f"no program {name!r} in {self.path}")
        return p

    def map(self, name: str) -> MapView:
        return self._view_map(self._map(name))

    def map_index(self, name: str) -> int:
        """Where the map `name` (resolved as `map` does) stands in maps(); KeyError when there is none."""
        target = self._map(name)
        return next(i for i, m in enumerate(self._map_ptrs()) if m == target)

    # -- mutation before load --------------------------------------------------------------------------

    def set_initial_value(self, map_name: str, data: bytes) -> int:
        """libbpf's return value: 0 or -errno."""
        buf = ctypes.create_string_buffer(bytes(data), len(data))
        self._buffers.append(buf)
        return int(self._fn["bpf_map__set_initial_value"](self._map(map_name), buf, len(data)))

    def set_value_size(self, map_name: str, size: int) -> int:
        """libbpf's return value: 0 or -errno."""
        return int(self._fn["bpf_map__set_value_size"](self._map(map_name), size))

    def reuse_fd(self, map_name: str, fd: int) -> int:
        """bpf_map__reuse_fd: the map takes (a duplicate of) `fd` instead of being created; 0 or -errno."""
        self._lib.require("bpf_map__reuse_fd")
        with _capture(self.records):
            return int(self._fn["bpf_map__reuse_fd"](self._map(map_name), fd))

    def set_attach_target(self, prog_name: str, target_fd: int, func: str) -> int:
        """bpf_program__set_attach_target (before load): the program replaces `func` of program `target_fd`;
        0 or -errno."""
        self._lib.require("bpf_program__set_attach_target")
        with _capture(self.records):
            return int(self._fn["bpf_program__set_attach_target"](self._prog(prog_name), target_fd, func.encode()))

    def attach_freplace(self, prog_name: str, target_fd: int, func: str) -> LibbpfLink:
        """bpf_program__attach_freplace (after load); raises LibbpfError when libbpf or the kernel refuses."""
        self._lib.require("bpf_program__attach_freplace", "bpf_link__destroy")
        with _capture(self.records):
            ctypes.set_errno(0)
            raw = self._fn["bpf_program__attach_freplace"](self._prog(prog_name), target_fd, func.encode())
            err = self._lib._pointer_error(raw)
        if err:
            raise LibbpfError("attach_freplace", err, self.records)
        return LibbpfLink(self._lib, raw)

    def load(self) -> None:
        obj = self._obj()
        with _capture(self.records):
            ctypes.set_errno(0)
            ret = int(self._fn["bpf_object__load"](obj))
            err = ctypes.get_errno()
        if ret < 0:
            raise LibbpfError("load", -ret if ret != -1 else (err or 1), self.records)

    # -- after load ------------------------------------------------------------------------------------

    def map_fd(self, name: str) -> int:
        return int(self._fn["bpf_map__fd"](self._map(name)))

    def prog_fd(self, name: str) -> int:
        fd = int(self._fn["bpf_program__fd"](self._prog(name)))
        return fd if fd >= 0 else -1

    def lookup(self, map_name: str, key: bytes, value_len: int) -> bytes:
        """bpf_map_lookup_elem on the map's fd; `value_len` must cover all CPUs for per-CPU maps."""
        fd = self.map_fd(map_name)
        kbuf = ctypes.create_string_buffer(bytes(key), max(len(key), 1))
        vbuf = ctypes.create_string_buffer(value_len)
        ctypes.set_errno(0)
        ret = int(self._fn["bpf_map_lookup_elem"](fd, kbuf, vbuf))
        if ret < 0:
            raise LibbpfError("lookup", _err_from(ret))
        return vbuf.raw

    def test_run(
        self,
        prog_name: str,
        *,
        cpu: int | None,
        ctx: bytes | None = None,
        data: bytes | None = None,
    ) -> int:
        """Run a loaded program once through BPF_PROG_TEST_RUN and return its return value.

        `cpu` pins the run with BPF_F_TEST_RUN_ON_CPU (raw_tp and similar types only); None lets the kernel
        run it on the current CPU.
        """
        fd = self.prog_fd(prog_name)
        opts = _TestRunOpts()
        opts.sz = ctypes.sizeof(_TestRunOpts)
        keep = []
        if ctx is not None:
            cbuf = ctypes.create_string_buffer(bytes(ctx), max(len(ctx), 1))
            keep.append(cbuf)
            opts.ctx_in, opts.ctx_size_in = ctypes.addressof(cbuf), len(ctx)
        if data is not None:
            dbuf = ctypes.create_string_buffer(bytes(data), max(len(data), 1))
            keep.append(dbuf)
            opts.data_in, opts.data_size_in = ctypes.addressof(dbuf), len(data)
        if cpu is not None:
            opts.flags, opts.cpu = BPF_F_TEST_RUN_ON_CPU, cpu
        ctypes.set_errno(0)
        ret = int(self._fn["bpf_prog_test_run_opts"](fd, ctypes.byref(opts)))
        if ret < 0:
            raise LibbpfError("test_run", _err_from(ret))
        return int(opts.retval)
