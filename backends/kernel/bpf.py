"""A thin ctypes layer over the bpf(2) syscall.

Each wrapper builds one `union bpf_attr` image with the field offsets of /usr/include/linux/bpf.h, makes one
syscall (two where the kernel asks for a buffer size first) and turns failures into `BpfError`. Nothing is
cached and nothing is retried except where stated. Every file descriptor is owned by an `Fd`, and each wrapper
closes the ones it opened on its error paths.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as _errno
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

__all__ = [
    "BpfError", "Fd", "TestRun", "ProgInfo", "MapInfo",
    "map_create", "map_update_elem", "map_lookup_elem", "map_delete_elem", "map_freeze",
    "prog_load", "prog_test_run", "prog_info", "prog_xlated", "prog_jited_insns", "map_info", "btf_load",
    "prog_get_fd_by_id", "map_get_fd_by_id", "percpu_value_size", "round_up", "link_create",
]

SYS_BPF = 321  # x86_64

# enum bpf_cmd
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_BTF_LOAD = 18
BPF_MAP_FREEZE = 22
BPF_LINK_CREATE = 28

_CMD_NAMES = {
    BPF_MAP_CREATE: "BPF_MAP_CREATE",
    BPF_MAP_LOOKUP_ELEM: "BPF_MAP_LOOKUP_ELEM",
    BPF_MAP_UPDATE_ELEM: "BPF_MAP_UPDATE_ELEM",
    BPF_MAP_DELETE_ELEM: "BPF_MAP_DELETE_ELEM",
    BPF_MAP_GET_NEXT_KEY: "BPF_MAP_GET_NEXT_KEY",
    BPF_PROG_LOAD: "BPF_PROG_LOAD",
    BPF_PROG_TEST_RUN: "BPF_PROG_TEST_RUN",
    BPF_PROG_GET_FD_BY_ID: "BPF_PROG_GET_FD_BY_ID",
    BPF_MAP_GET_FD_BY_ID: "BPF_MAP_GET_FD_BY_ID",
    BPF_OBJ_GET_INFO_BY_FD: "BPF_OBJ_GET_INFO_BY_FD",
    BPF_BTF_LOAD: "BPF_BTF_LOAD",
    BPF_MAP_FREEZE: "BPF_MAP_FREEZE",
    BPF_LINK_CREATE: "BPF_LINK_CREATE",
}

# enum bpf_map_type
MAP_TYPE_HASH = 1
MAP_TYPE_ARRAY = 2
MAP_TYPE_PROG_ARRAY = 3
MAP_TYPE_PERF_EVENT_ARRAY = 4
MAP_TYPE_PERCPU_HASH = 5
MAP_TYPE_PERCPU_ARRAY = 6
MAP_TYPE_LRU_HASH = 9
MAP_TYPE_LRU_PERCPU_HASH = 10
MAP_TYPE_ARRAY_OF_MAPS = 12
MAP_TYPE_HASH_OF_MAPS = 13
MAP_TYPE_PERCPU_CGROUP_STORAGE = 21
# Short aliases, as used by callers: bpf.ARRAY, bpf.PERCPU_ARRAY, ...
HASH = MAP_TYPE_HASH
ARRAY = MAP_TYPE_ARRAY
PROG_ARRAY = MAP_TYPE_PROG_ARRAY
PERCPU_HASH = MAP_TYPE_PERCPU_HASH
PERCPU_ARRAY = MAP_TYPE_PERCPU_ARRAY
LRU_PERCPU_HASH = MAP_TYPE_LRU_PERCPU_HASH
PERCPU_MAP_TYPES = frozenset({MAP_TYPE_PERCPU_HASH, MAP_TYPE_PERCPU_ARRAY, MAP_TYPE_LRU_PERCPU_HASH,
                              MAP_TYPE_PERCPU_CGROUP_STORAGE})

# enum bpf_prog_type
PROG_TYPE_SOCKET_FILTER = 1
PROG_TYPE_KPROBE = 2
PROG_TYPE_SCHED_CLS = 3
PROG_TYPE_TRACEPOINT = 5
PROG_TYPE_XDP = 6
PROG_TYPE_RAW_TRACEPOINT = 17
PROG_TYPE_TRACING = 26
PROG_TYPE_EXT = 28
BPF_PROG_TYPE_EXT = PROG_TYPE_EXT
PROG_TYPE_SYSCALL = 31
SOCKET_FILTER = PROG_TYPE_SOCKET_FILTER
KPROBE = PROG_TYPE_KPROBE
SCHED_CLS = PROG_TYPE_SCHED_CLS
XDP = PROG_TYPE_XDP
RAW_TRACEPOINT = PROG_TYPE_RAW_TRACEPOINT
TRACING = PROG_TYPE_TRACING
EXT = PROG_TYPE_EXT
SYSCALL = PROG_TYPE_SYSCALL

# enum bpf_attach_type (the few that tracing loads need)
BPF_TRACE_RAW_TP = 23
BPF_TRACE_FENTRY = 24
BPF_TRACE_FEXIT = 25
# The UAPI has no freplace attach type: an extension program is loaded with expected_attach_type 0, and
# BPF_LINK_CREATE wants the program's expected_attach_type back (libbpf passes 0 too). The name is the suite's.
BPF_TRACE_FREPLACE = 0

# Map, element and test-run flags: toolchain.uapi (BPF_F_CPU / BPF_F_ALL_CPUS exist only on new kernels).
from toolchain.uapi import (  # noqa: E402, F401  (re-exported: callers name them bpf.BPF_F_...)
    BPF_ANY,
    BPF_EXIST,
    BPF_F_ALL_CPUS,
    BPF_F_CPU,
    BPF_F_LOCK,
    BPF_F_MMAPABLE,
    BPF_F_NO_PREALLOC,
    BPF_F_RDONLY,
    BPF_F_RDONLY_PROG,
    BPF_F_TEST_RUN_ON_CPU,
    BPF_F_TEST_XDP_LIVE_FRAMES,
    BPF_F_WRONLY,
    BPF_F_WRONLY_PROG,
    BPF_NOEXIST,
    BPF_OBJ_NAME_LEN,
)

# Program load flags.
BPF_F_STRICT_ALIGNMENT = 1 << 0
BPF_F_ANY_ALIGNMENT = 1 << 1
BPF_F_TEST_RND_HI32 = 1 << 2
BPF_F_SLEEPABLE = 1 << 4


# Larger than any bpf_attr member this module fills (the newest kernels' PROG_LOAD ends near 168 bytes);
# the kernel accepts a larger size as long as the bytes it does not know are zero.
ATTR_SIZE = 192
# bpf_prog_info is 232 bytes and bpf_map_info 88 in the installed header; newer kernels append fields, and
# give back only what fits, so a zeroed buffer with headroom works on old and new kernels alike.
INFO_SIZE = 512

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint]

BPF_FUNC_INFO_REC_SIZE = 8  # struct bpf_func_info: insn_off, type_id

# Trailing verifier-log lines that are statistics, never the reason for a verdict.
_LOG_NOISE = re.compile(
    r"^(processed \d+ insns|verification time|stack depth|max_states_per_insn|"
    r"mark_read|peak_states|-- END)")


class BpfError(OSError):
    """A failed bpf(2) command, with the verifier (or BTF) log when there was one."""

    # OSError allows None for both; __init__ always sets them from a real errno
    errno: int
    strerror: str

    def __init__(self, err: int, op: str, log: str = "") -> None:
        super().__init__(err, os.strerror(err))
        self.op = op
        self.log = log

    def __reduce__(self) -> tuple[type[BpfError], tuple[int, str, str]]:
        return BpfError, (self.errno, self.op, self.log)

    @property
    def errno_name(self) -> str:
        return _errno.errorcode.get(self.errno, str(self.errno))

    @property
    def reason(self) -> str:
        """The last log line that explains the verdict, or ""."""
        return last_meaningful_line(self.log)

    def __str__(self) -> str:
        head = f"{self.op}: {self.strerror} ({self.errno_name})"
        reason = self.reason
        return f"{head}: {reason}" if reason else head


def last_meaningful_line(log: str) -> str:
    for line in reversed(log.splitlines()):
        line = line.strip()
        if line and not _LOG_NOISE.match(line):
            return line
    return ""


class Fd:
    """Owns one file descriptor. close() is idempotent; the descriptor is also closed when collected."""

    __slots__ = ("_fd", "__weakref__")

    def __init__(self, fd: int) -> None:
        if fd < 0:
            raise ValueError(f"invalid file descriptor {fd}")
        self._fd = fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("I/O operation on closed Fd")
        return self._fd

    def __int__(self) -> int:
        return self.fileno()

    __index__ = __int__

    def detach(self) -> int:
        """Give up ownership and return the raw descriptor."""
        fd, self._fd = self.fileno(), -1
        return fd

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Fd:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        # Closing is best effort here: an error cannot be reported from a finaliser.
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                self.close()

    def __repr__(self) -> str:
        return f"Fd({self._fd})" if self._fd >= 0 else "Fd(closed)"


FdLike = Fd | int


@dataclass(frozen=True, slots=True)
class TestRun:
    __test__ = False  # keep pytest from collecting this as a test class

    retval: int
    duration_ns: int
    data_out: bytes = b""
    ctx_out: bytes = b""


@dataclass(frozen=True, slots=True)
class ProgInfo:
    type: int
    id: int
    name: str
    tag: bytes
    xlated_prog_len: int  # bytes
    jited_prog_len: int  # bytes; 0 when the program runs in the interpreter
    nr_map_ids: int
    map_ids: list[int] = field(default_factory=list)
    verified_insns: int = 0

    @property
    def jited(self) -> bool:
        return self.jited_prog_len > 0


@dataclass(frozen=True, slots=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int
    name: str
    btf_id: int = 0
    btf_key_type_id: int = 0
    btf_value_type_id: int = 0


def round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def percpu_value_size(value_size: int, ncpus: int) -> int:
    """Buffer length of a whole-map-element syscall on a per-CPU map: one 8-aligned slot per possible CPU."""
    return ncpus * round_up(value_size, 8)


def _addr(buf: ctypes.Array | None) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


def _name_bytes(name: str) -> bytes:
    raw = name.encode()
    if len(raw) >= BPF_OBJ_NAME_LEN:
        raise ValueError(f"object name {name!r} is longer than {BPF_OBJ_NAME_LEN - 1} bytes")
    return raw


def _sys_bpf(cmd: int, attr: ctypes.Array, log: str = "") -> int:
    """One bpf(2) call; returns its non-negative result or raises BpfError."""
    ret = _syscall(SYS_BPF, cmd, ctypes.addressof(attr), ctypes.sizeof(attr))
    if ret < 0:
        raise BpfError(ctypes.get_errno(), _CMD_NAMES.get(cmd, f"bpf cmd {cmd}"), log)
    return ret


def _attr() -> ctypes.Array:
    return ctypes.create_string_buffer(ATTR_SIZE)


# Maps.

def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, *, flags: int = 0,
               name: str = "", btf_fd: int = 0, btf_key_type_id: int = 0, btf_value_type_id: int = 0,
               inner_map_fd: int = 0, numa_node: int = 0, map_extra: int = 0) -> Fd:
    attr = _attr()
    struct.pack_into("<7I16s", attr, 0, map_type, key_size, value_size, max_entries, flags,
                     int(inner_map_fd), numa_node, _name_bytes(name))
    struct.pack_into("<4I", attr, 48, int(btf_fd), btf_key_type_id, btf_value_type_id, 0)
    struct.pack_into("<Q", attr, 64, map_extra)
    return Fd(_sys_bpf(BPF_MAP_CREATE, attr))


def _elem_attr(fd: FdLike, key: ctypes.Array | None, value: ctypes.Array | None, flags: int) -> ctypes.Array:
    attr = _attr()
    struct.pack_into("<I4xQQQ", attr, 0, int(fd), _addr(key), _addr(value), flags & 0xFFFFFFFFFFFFFFFF)
    return attr


def map_update_elem(fd: FdLike, key: bytes, value: bytes, flags: int = 0) -> None:
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value, len(value))
    _sys_bpf(BPF_MAP_UPDATE_ELEM, _elem_attr(fd, kbuf, vbuf, flags))


def map_lookup_elem(fd: FdLike, key: bytes, value_len: int, flags: int = 0) -> bytes:
    """value_len is the caller's: for per-CPU maps possible_cpus * round_up(value_size, 8) (see
    percpu_value_size), or a single round_up(value_size, 8) slot with BPF_F_CPU."""
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value_len)
    _sys_bpf(BPF_MAP_LOOKUP_ELEM, _elem_attr(fd, kbuf, vbuf, flags))
    return vbuf.raw


def map_delete_elem(fd: FdLike, key: bytes, flags: int = 0) -> None:
    kbuf = ctypes.create_string_buffer(key, len(key))
    _sys_bpf(BPF_MAP_DELETE_ELEM, _elem_attr(fd, kbuf, None, flags))


def map_get_next_key(fd: FdLike, key: bytes | None, key_size: int) -> bytes | None:
    """The key after `key` (the first key when None), or None at the end."""
    kbuf = ctypes.create_string_buffer(key, len(key)) if key is not None else None
    nbuf = ctypes.create_string_buffer(key_size)
    try:
        _sys_bpf(BPF_MAP_GET_NEXT_KEY, _elem_attr(fd, kbuf, nbuf, 0))
    except BpfError as e:
        if e.errno == _errno.ENOENT:
            return None
        raise
    return nbuf.raw


def map_freeze(fd: FdLike) -> None:
    attr = _attr()
    struct.pack_into("<I", attr, 0, int(fd))
    _sys_bpf(BPF_MAP_FREEZE, attr)


# Programs.

def prog_load(prog_type: int, insns: bytes, *, license: str = "GPL", name: str = "", log_level: int = 1,
              log_size: int = 1 << 20, expected_attach_type: int = 0, attach_btf_id: int = 0,
              attach_prog_fd: FdLike = 0, prog_btf_fd: FdLike = 0,
              func_info: bytes | Sequence[tuple[int, int]] | None = None,
              func_info_rec_size: int = 0, line_info: bytes | None = None, line_info_rec_size: int = 0,
              fd_array: Sequence[int] | None = None, prog_flags: int = 0,
              kern_version: int = 0) -> tuple[Fd, str]:
    """Load a program; returns its Fd and the verifier log ("" with log_level 0).

    Since 6.4 a verifier log that overflows its buffer makes the load fail with ENOSPC whatever the verdict
    (the buffer keeps the log's tail). The load is then retried once without a log, so the result and the
    errno are the verifier's; the truncated log is kept.

    `func_info` is either the raw records (with `func_info_rec_size`) or (insn_off, BTF FUNC type id) pairs,
    encoded as struct bpf_func_info.
    """
    if func_info is not None and not isinstance(func_info, bytes | bytearray):
        func_info = b"".join(struct.pack("<II", off, tid) for off, tid in func_info)
        func_info_rec_size = func_info_rec_size or BPF_FUNC_INFO_REC_SIZE
    if len(insns) % 8 or not insns:
        raise ValueError(f"instruction stream of {len(insns)} bytes")
    if func_info is not None and func_info_rec_size <= 0:
        raise ValueError("func_info needs func_info_rec_size")
    if line_info is not None and line_info_rec_size <= 0:
        raise ValueError("line_info needs line_info_rec_size")
    insn_buf = ctypes.create_string_buffer(insns, len(insns))
    lic_buf = ctypes.create_string_buffer(license.encode())
    fi_buf = ctypes.create_string_buffer(func_info, len(func_info)) if func_info else None
    li_buf = ctypes.create_string_buffer(line_info, len(line_info)) if line_info else None
    fds_buf = (ctypes.c_int * len(fd_array))(*(int(f) for f in fd_array)) if fd_array else None
    fds_addr = ctypes.addressof(fds_buf) if fds_buf is not None else 0
    func_info_cnt = len(func_info) // func_info_rec_size if func_info else 0
    line_info_cnt = len(line_info) // line_info_rec_size if line_info else 0

    def attempt(level: int, size: int) -> tuple[int, str, int]:
        log_buf = ctypes.create_string_buffer(size) if level else None
        attr = _attr()
        struct.pack_into("<IIQQIIQII16sIIII", attr, 0,
                         prog_type, len(insns) // 8, _addr(insn_buf), _addr(lic_buf),
                         level, size if level else 0, _addr(log_buf),
                         kern_version, prog_flags, _name_bytes(name),
                         0, expected_attach_type, int(prog_btf_fd),
                         func_info_rec_size if fi_buf is not None else 0)
        struct.pack_into("<QIIQIIIIQ", attr, 80,
                         _addr(fi_buf), func_info_cnt,
                         line_info_rec_size if li_buf is not None else 0, _addr(li_buf), line_info_cnt,
                         attach_btf_id, int(attach_prog_fd), 0, fds_addr)
        ret = _syscall(SYS_BPF, BPF_PROG_LOAD, ctypes.addressof(attr), ctypes.sizeof(attr))
        err = ctypes.get_errno() if ret < 0 else 0
        log = log_buf.value.decode(errors="replace") if log_buf is not None else ""
        return ret, log, err

    ret, log, err = attempt(log_level, log_size)
    if ret < 0 and err == _errno.ENOSPC and log_level:
        ret, _, err = attempt(0, 0)
    if ret < 0:
        raise BpfError(err, "BPF_PROG_LOAD", log)
    return Fd(ret), log


def prog_test_run(prog_fd: FdLike, *, cpu: int | None = None, ctx_in: bytes | None = None,
                  data_in: bytes | None = None, repeat: int = 0, data_out_size: int = 0,
                  ctx_out_size: int = 0, flags: int = 0) -> TestRun:
    """BPF_PROG_TEST_RUN. With `cpu` the kernel runs the program on that CPU (BPF_F_TEST_RUN_ON_CPU; only
    program types whose test_run honours it, e.g. raw_tp, accept it)."""
    din = ctypes.create_string_buffer(data_in, len(data_in)) if data_in else None
    cin = ctypes.create_string_buffer(ctx_in, len(ctx_in)) if ctx_in else None
    dout = ctypes.create_string_buffer(data_out_size) if data_out_size else None
    cout = ctypes.create_string_buffer(ctx_out_size) if ctx_out_size else None
    if cpu is not None:
        flags |= BPF_F_TEST_RUN_ON_CPU
    attr = _attr()
    struct.pack_into("<IIIIQQIIIIQQII", attr, 0,
                     int(prog_fd), 0, len(data_in) if data_in else 0, data_out_size,
                     _addr(din), _addr(dout), repeat, 0,
                     len(ctx_in) if ctx_in else 0, ctx_out_size, _addr(cin), _addr(cout),
                     flags, cpu if cpu is not None else 0)
    _sys_bpf(BPF_PROG_TEST_RUN, attr)
    retval, _, data_size_out = struct.unpack_from("<III", attr, 4)
    duration, _, ctx_size_out = struct.unpack_from("<III", attr, 36)
    return TestRun(retval=retval, duration_ns=duration,
                   data_out=dout.raw[:data_size_out] if dout is not None else b"",
                   ctx_out=cout.raw[:ctx_size_out] if cout is not None else b"")


def _get_info(fd: FdLike, info: ctypes.Array) -> int:
    """BPF_OBJ_GET_INFO_BY_FD into `info`; returns the length the kernel filled in."""
    attr = _attr()
    struct.pack_into("<IIQ", attr, 0, int(fd), ctypes.sizeof(info), ctypes.addressof(info))
    _sys_bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    return struct.unpack_from("<I", attr, 4)[0]


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def prog_info(prog_fd: FdLike) -> ProgInfo:
    info = ctypes.create_string_buffer(INFO_SIZE)
    filled = _get_info(prog_fd, info)
    ptype, pid, tag, jited_len, xlated_len = struct.unpack_from("<II8sII", info, 0)
    nr_map_ids = struct.unpack_from("<I", info, 52)[0]
    name = _cstr(struct.unpack_from("<16s", info, 64)[0])
    verified = struct.unpack_from("<I", info, 216)[0] if filled >= 220 else 0
    map_ids: list[int] = []
    if nr_map_ids:
        # A second call with only the map id array requested; every other pointer stays zero.
        ids = (ctypes.c_uint32 * nr_map_ids)()
        info2 = ctypes.create_string_buffer(INFO_SIZE)
        struct.pack_into("<I", info2, 52, nr_map_ids)
        struct.pack_into("<Q", info2, 56, ctypes.addressof(ids))
        _get_info(prog_fd, info2)
        got = struct.unpack_from("<I", info2, 52)[0]
        map_ids = list(ids)[:min(got, nr_map_ids)]
    return ProgInfo(type=ptype, id=pid, name=name, tag=tag, xlated_prog_len=xlated_len,
                    jited_prog_len=jited_len, nr_map_ids=nr_map_ids, map_ids=map_ids, verified_insns=verified)


def prog_xlated(prog_fd: FdLike) -> bytes:
    """The program as the verifier left it (after its rewrites), in the kernel's dump form."""
    length = prog_info(prog_fd).xlated_prog_len
    if not length:
        return b""
    buf = ctypes.create_string_buffer(length)
    info = ctypes.create_string_buffer(INFO_SIZE)
    struct.pack_into("<I", info, 20, length)
    struct.pack_into("<Q", info, 32, ctypes.addressof(buf))
    _get_info(prog_fd, info)
    return buf.raw[:min(length, struct.unpack_from("<I", info, 20)[0])]


def prog_jited_insns(prog_fd: FdLike) -> bytes:
    """The JIT's machine code for the program (bpf_prog_info jited_prog_len / jited_prog_insns); b"" when it runs
    in the interpreter. The kernel hands it only to a caller allowed raw dumps (root, kptr_restrict)."""
    length = prog_info(prog_fd).jited_prog_len
    if not length:
        return b""
    buf = ctypes.create_string_buffer(length)
    info = ctypes.create_string_buffer(INFO_SIZE)
    struct.pack_into("<I", info, 16, length)
    struct.pack_into("<Q", info, 24, ctypes.addressof(buf))
    _get_info(prog_fd, info)
    if not struct.unpack_from("<Q", info, 24)[0]:  # zeroed by the kernel: raw dumps not allowed to this caller
        raise BpfError(_errno.EPERM, "BPF_OBJ_GET_INFO_BY_FD")
    return buf.raw[:min(length, struct.unpack_from("<I", info, 16)[0])]


def map_info(map_fd: FdLike) -> MapInfo:
    info = ctypes.create_string_buffer(INFO_SIZE)
    _get_info(map_fd, info)
    mtype, mid, key_size, value_size, max_entries, map_flags, name = struct.unpack_from("<6I16s", info, 0)
    btf_id, btf_key, btf_value = struct.unpack_from("<3I", info, 64)
    return MapInfo(type=mtype, id=mid, key_size=key_size, value_size=value_size, max_entries=max_entries,
                   map_flags=map_flags, name=_cstr(name), btf_id=btf_id, btf_key_type_id=btf_key,
                   btf_value_type_id=btf_value)


def _get_fd_by_id(cmd: int, obj_id: int, open_flags: int) -> Fd:
    attr = _attr()
    struct.pack_into("<III", attr, 0, obj_id, 0, open_flags)
    return Fd(_sys_bpf(cmd, attr))


def prog_get_fd_by_id(prog_id: int) -> Fd:
    return _get_fd_by_id(BPF_PROG_GET_FD_BY_ID, prog_id, 0)


def map_get_fd_by_id(map_id: int, *, open_flags: int = 0) -> Fd:
    return _get_fd_by_id(BPF_MAP_GET_FD_BY_ID, map_id, open_flags)


# BTF.

def btf_load(data: bytes, *, log_level: int = 0, log_size: int = 1 << 16) -> Fd:
    """Load raw BTF; a failure carries the BTF verifier's log when log_level is set."""
    blob = ctypes.create_string_buffer(data, len(data))
    log_buf = ctypes.create_string_buffer(log_size) if log_level else None
    attr = _attr()
    struct.pack_into("<QQIII", attr, 0, _addr(blob), _addr(log_buf), len(data),
                     log_size if log_level else 0, log_level)
    ret = _syscall(SYS_BPF, BPF_BTF_LOAD, ctypes.addressof(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, "BPF_BTF_LOAD", log_buf.value.decode(errors="replace") if log_buf else "")
    return Fd(ret)


# Links.

def link_create(prog_fd: FdLike, target_fd: FdLike, attach_type: int, target_btf_id: int = 0) -> Fd:
    """BPF_LINK_CREATE. For an extension program: target_fd is the target program, target_btf_id the FUNC it
    replaces (0 reuses the target given at load) and attach_type BPF_TRACE_FREPLACE (0)."""
    attr = _attr()
    struct.pack_into("<IIIII", attr, 0, int(prog_fd), int(target_fd), attach_type, 0, target_btf_id)
    return Fd(_sys_bpf(BPF_LINK_CREATE, attr))
