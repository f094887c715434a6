"""A simulated kernel: maps, program loading through the simulated verifier, and per-CPU test runs.

The API follows the bpf() syscall (map_create, map_update, map_lookup, map_freeze, prog_load, test_run, and
link_create/link_destroy for freplace), with failures raised as `SimError(errno, message)`. What differs
between kernels is a row of `KERNEL_PROFILES`.

An extension program ("ext") is loaded against a target program and one of its global functions; once linked,
the target runs `link_program`'s image of itself, in which every call of that function goes to the extension.

Address space (one interp.Memory per kernel): map k owns [MAP_AREA + k*MAP_SPAN, +MAP_SPAN). An ARRAY value is
mapped there directly. A PERCPU_ARRAY value's address there is its *per-CPU base*, never mapped: CPU c's copy
lives at base + percpu_offset(c), so a per-CPU pointer dereferenced without the verifier's per-CPU move faults.
Map handles (what an ld_imm64 of a map fd yields) are unmapped addresses the helpers recognise.
"""

from __future__ import annotations

import dataclasses
import errno
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypedDict, TypeVar

from backends.objload import FuncSpec, round_up
from backends.sim import printf
from backends.sim import verifier as vf
from backends.sim.helpers import HELPER_PROTOS
from backends.sim.interp import MAX_TAIL_CALLS, BpfFault, Machine, Memory, TailCall, link_program, run
from schema.profiles import UnknownProfile, join_modifiers, split_modifiers
from toolchain.insn import Insn
from toolchain.uapi import (
    BPF_ANY,
    BPF_EXIST,
    BPF_F_ALL_CPUS,
    BPF_F_CPU,
    BPF_F_MMAPABLE,
    BPF_F_RDONLY,
    BPF_F_RDONLY_PROG,
    BPF_F_WRONLY,
    BPF_F_WRONLY_PROG,
    BPF_MAP_TYPE_ARRAY,
    BPF_MAP_TYPE_PERCPU_ARRAY,
    BPF_MAP_TYPE_PROG_ARRAY,
    BPF_NOEXIST,
)

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
PCPU_MIN_UNIT_SIZE = 32 * 1024  # the per-CPU allocator's limit for one value [V]
MAP_AREA = 1 << 40
MAP_SPAN = 1 << 32
MAX_MAPS = (1 << 40) // MAP_SPAN
_T = TypeVar("_T")

PERCPU_UNIT = 1 << 41
HANDLE_AREA = 1 << 39
CTX_ADDR = 0x7000_0000
MAX_SIM_MAP_BYTES = 64 << 20
from toolchain.uapi import (  # noqa: E402
    BPF_F_INNER_MAP,
    BPF_F_LOCK,
    BPF_F_NUMA_NODE,
    BPF_F_PRESERVE_ELEMS,
    BPF_F_TOKEN_FD,
)

ARRAY_CREATE_FLAG_MASK = (BPF_F_NUMA_NODE | BPF_F_MMAPABLE | BPF_F_RDONLY | BPF_F_WRONLY | BPF_F_RDONLY_PROG
                          | BPF_F_WRONLY_PROG | BPF_F_PRESERVE_ELEMS | BPF_F_INNER_MAP | BPF_F_TOKEN_FD)
RAW_TP_MAX_ARGS = 12
PROG_TYPES = ("raw_tp", "socket_filter", "ext")
_OBJ_NAME = re.compile(r"[A-Za-z0-9_.]{0,15}")

# Texts every kernel prints the same way.
BASE_MESSAGES: dict[str, str] = {
    "invalid_map_fd": "fd %d is not pointing to valid bpf_map",
    "no_direct_value": "no direct value access support for this map type",
    "bad_direct_value": "invalid access to map value pointer, value_size=%d off=%d",
    "map_value_oob": "invalid access to map value, value_size=%d off=%d size=%d",
    "write_forbidden": "write into map forbidden, value_size=%d off=%d size=%d",
    "read_forbidden": "read from map forbidden, value_size=%d off=%d size=%d",
}
MERGED_MESSAGES: dict[str, str] = {
    **BASE_MESSAGES,
    "const_str_percpu": "R%d points to percpu_array map which cannot be used as const string",  # [V]
}
# v1-v3 refused a per-CPU const string only after the read-only check, as "not an ARRAY", with EINVAL [V]
V1_MESSAGES: dict[str, str] = {
    **BASE_MESSAGES,
    "const_str_percpu_late": "only array map supports direct string value access",
}


@dataclass(frozen=True, eq=False)
class KernelProfile:
    name: str
    percpu_direct_value: bool  # PERCPU_ARRAY has map_direct_value_addr (the feature's kernel half)
    # bpf_jit_supports_percpu_insn(): without it direct per-CPU access is EOPNOTSUPP, and the JIT inlines neither
    # bpf_get_smp_processor_id nor a PERCPU_ARRAY lookup (the helper table's per-CPU inline forms)
    percpu_insn_jit: bool
    bpf_f_cpu: bool  # BPF_F_CPU / BPF_F_ALL_CPUS for per-CPU map lookup and update
    messages: Mapping[str, str]
    # the order map_direct_value_addr checks a per-CPU access in: merged 7.3.4 asks the JIT first, v1-v3 last
    # [V]; only JIT-less arches tell them apart
    percpu_direct_value_checks: tuple[str, ...] = ("jit", "max_entries", "offset")
    # fault injection: a verifier that accepts per-CPU direct access but forgets the per-CPU move
    percpu_rewrite: bool = True
    # fault injection: BPF_LINK_CREATE of an extension succeeds but the target keeps calling its own function
    freplace: bool = True
    # some kernels refuse every extension program at BPF_PROG_LOAD, with EPERM and no log [measured: 6.18.44-fc]
    ext_programs: bool = True
    # bpf_jit_enable (jit_requested): off, nothing is inlined and a program the per-CPU rewrite made
    # jit_required is refused once verified [V: 7.3.4 fixups.c]
    jit_enabled: bool = True
    # extension programs get jit_requested, which bpf_check_attach_target demands [V]
    ext_jit: bool = True
    # bpf_tail_call in a program of several subprograms needs jit_requested [V: 7.3.4 verifier.c, measured]
    tail_calls_with_subprogs: bool = True

    @property
    def features(self) -> dict[str, bool]:
        return {"percpu_data": self.percpu_direct_value and self.percpu_insn_jit and self.jit_enabled,
                "bpf_f_cpu": self.bpf_f_cpu, "percpu_insn_jit": self.percpu_insn_jit,
                "percpu_direct_value": self.percpu_direct_value, "jit": self.jit_enabled,
                "freplace": self.ext_programs}


KERNEL_PROFILES: dict[str, KernelProfile] = {
    p.name: p for p in (
        KernelProfile(name="patched", percpu_direct_value=True, percpu_insn_jit=True, bpf_f_cpu=True,
                      messages=MERGED_MESSAGES),
        # the series' first revision: map_direct_value_addr checks max_entries and offset before the JIT [V]
        KernelProfile(name="patched-v1", percpu_direct_value=True, percpu_insn_jit=True, bpf_f_cpu=True,
                      messages=V1_MESSAGES, percpu_direct_value_checks=("max_entries", "offset", "jit")),
        # Linux <= 7.2, e.g. 6.18 here [V, measured]
        KernelProfile(name="unpatched", percpu_direct_value=False, percpu_insn_jit=True, bpf_f_cpu=False,
                      messages=BASE_MESSAGES),
        # the patched kernel on an arch whose JIT has no per-CPU instruction: direct access is refused [V]
        KernelProfile(name="patched-nojit", percpu_direct_value=True, percpu_insn_jit=False, bpf_f_cpu=True,
                      messages=MERGED_MESSAGES),
        KernelProfile(name="broken-norewrite", percpu_direct_value=True, percpu_insn_jit=True, bpf_f_cpu=True,
                      messages=MERGED_MESSAGES, percpu_rewrite=False),
        KernelProfile(name="broken-nofreplace", percpu_direct_value=True, percpu_insn_jit=True, bpf_f_cpu=True,
                      messages=MERGED_MESSAGES, freplace=False),
    )
}


class KernelModifier(TypedDict, total=False):
    """The KernelProfile fields a modifier may change."""

    ext_programs: bool
    jit_enabled: bool
    ext_jit: bool
    tail_calls_with_subprogs: bool


# What each registry modifier (schema.profiles.MODIFIERS) changes in a simulated kernel.
KERNEL_MODIFIERS: dict[str, KernelModifier] = {
    "noext": {"ext_programs": False},  # BPF_PROG_TYPE_EXT refused at load (EPERM)
    "jitoff": {"jit_enabled": False, "ext_jit": False, "tail_calls_with_subprogs": False},
    "noextjit": {"ext_jit": False, "tail_calls_with_subprogs": False},
}


def kernel_row(name: str) -> KernelProfile:
    """A kernel row by name, registry modifiers included: "patched+jitoff"."""
    base, modifiers = split_modifiers(name)
    if base not in KERNEL_PROFILES:
        raise UnknownProfile(f"unknown simulated kernel {name!r} (known: {', '.join(KERNEL_PROFILES)})")
    row = KERNEL_PROFILES[base]
    for m in modifiers:
        row = dataclasses.replace(row, name=join_modifiers(row.name, (m,)), **KERNEL_MODIFIERS[m])
    return row


class SimError(OSError):
    """A failed simulated syscall: errno, the message (the verifier's last line for prog_load) and a class."""

    errno: int  # always set: the constructor takes it

    def __init__(self, err: int, message: str, error_class: str | None = None, log: str = "") -> None:
        super().__init__(err, message)
        self.message = message
        self.error_class = error_class
        self.log = log or message


@dataclass(eq=False)
class SimMap:
    fd: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str
    base: int
    handle: int
    stride: int  # the kernel's elem_size: round_up(value_size, 8)
    shared: bytearray | None = None  # ARRAY: max_entries * stride bytes
    percpu: list[bytearray] | None = None  # PERCPU_ARRAY: one max_entries * stride buffer per possible CPU
    progs: list[SimProg | None] | None = None  # PROG_ARRAY
    frozen: bool = False

    def value_addr(self, off: int) -> int:
        """A map-value ld_imm64's constant: mapped for ARRAY, the unmapped per-CPU base for PERCPU_ARRAY."""
        return self.base + off

    def read_bytes(self, off: int, n: int) -> bytes:
        """Key 0's value bytes (what the verifier may read of a frozen read-only map)."""
        assert self.shared is not None
        return bytes(self.shared[off:off + n])

    def read_value(self, off: int, size: int) -> int:
        return int.from_bytes(self.read_bytes(off, size), "little")


@dataclass(frozen=True)
class SimFunc:
    """A function of a loaded program, from its func_info: where it starts in the program that runs."""

    name: str
    start: int | None  # None: dropped as dead code
    exported: bool  # BTF_FUNC_GLOBAL: only such a function can be replaced


@dataclass(eq=False)
class SimProg:
    fd: int
    name: str
    prog_type: str  # an extension's is "ext"; it is verified as its target's type
    insns: list[Insn]  # the verified, rewritten program
    xlated_insns: int | None
    log: str
    funcs: dict[str, SimFunc] = field(default_factory=dict)
    links: dict[int, SimProg] = field(default_factory=dict)  # start of a replaced function -> its extension
    image: list[Insn] = field(default_factory=list)  # what runs: insns with the links applied

    def __post_init__(self) -> None:
        self.image = self.image or self.insns


@dataclass(eq=False)
class SimLink:
    """A BPF_TRACE_FREPLACE link: `ext` runs wherever `target` calls the function starting at `start`."""

    fd: int
    ext: SimProg
    target: SimProg
    start: int | None


class SimKernel:
    def __init__(self, profile: KernelProfile | str = "patched", *, possible_cpus: int = 4,
                 online: Sequence[int] | None = None) -> None:
        self.profile = kernel_row(profile) if isinstance(profile, str) else profile
        if possible_cpus < 1:
            raise ValueError(f"possible_cpus must be at least 1, not {possible_cpus}")
        self.possible_cpus = possible_cpus
        self.online = sorted(set(online)) if online is not None else list(range(possible_cpus))
        if not self.online or any(not 0 <= c < possible_cpus for c in self.online):
            raise ValueError(f"online CPUs {list(online or [])} must be a non-empty subset of "
                             f"0..{possible_cpus - 1}")
        self.memory = Memory()
        self.memory.map(CTX_ADDR, bytearray(8 * RAW_TP_MAX_ARGS), writable=False, name="ctx")
        self._objects: dict[int, SimMap | SimProg | SimLink | str] = {}
        self._next_fd = 3
        self._maps_created = 0
        self._by_handle: dict[int, SimMap] = {}
        # each helper's runtime is the method its table entry names
        self.helpers: dict[int, Callable[[Machine], int | TailCall]] = {
            func: getattr(self, proto.runtime) for func, proto in HELPER_PROTOS.items()}

    # -- descriptors --------------------------------------------------------------------------------------

    def _new_fd(self, obj: SimMap | SimProg | SimLink | str) -> int:
        fd = self._next_fd
        self._next_fd += 1
        self._objects[fd] = obj
        return fd

    def placeholder_fd(self) -> int:
        """An open descriptor that is not a BPF object (what libbpf puts in place of a map it did not create)."""
        return self._new_fd("placeholder")

    def _typed(self, fd: int, kind: type[_T], what: str) -> _T:
        """The object behind fd: EBADF when nothing is open there, EINVAL when it is something else."""
        obj = self._objects.get(fd)
        if obj is None:
            raise SimError(errno.EBADF, f"fd {fd} is not open")
        if not isinstance(obj, kind):
            raise SimError(errno.EINVAL, f"fd {fd} is not {what}")
        return obj

    def _map(self, fd: int) -> SimMap:
        return self._typed(fd, SimMap, "a map")

    def map_by_fd(self, fd: int) -> SimMap | str | None:
        """For the verifier: the map, a string naming what else the fd is, or None for a closed fd."""
        obj = self._objects.get(fd)
        if obj is None or isinstance(obj, SimMap):
            return obj
        return obj if isinstance(obj, str) else "prog" if isinstance(obj, SimProg) else "link"

    def prog(self, fd: int) -> SimProg:
        return self._typed(fd, SimProg, "a program")

    def percpu_offset(self, cpu: int) -> int:
        return (cpu + 1) * PERCPU_UNIT

    # -- maps ----------------------------------------------------------------------------------------------

    def map_create(self, map_type: int, key_size: int, value_size: int, max_entries: int, flags: int = 0,
                   name: str = "") -> int:
        if not _OBJ_NAME.fullmatch(name):
            raise SimError(errno.EINVAL, f"map name {name!r} is not 15 characters of [A-Za-z0-9_.]")
        if map_type not in (BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_PROG_ARRAY):
            raise SimError(errno.EOPNOTSUPP, f"unsupported by the simulator: map type {map_type}",
                           "sim_unsupported")
        percpu = map_type == BPF_MAP_TYPE_PERCPU_ARRAY
        # array_map_alloc_check, in its order
        if max_entries == 0 or key_size != 4 or value_size == 0:
            raise SimError(errno.EINVAL, "array maps need key_size 4, value_size > 0, max_entries > 0")
        if flags & ~ARRAY_CREATE_FLAG_MASK or (flags & BPF_F_RDONLY_PROG and flags & BPF_F_WRONLY_PROG) \
                or (flags & BPF_F_RDONLY and flags & BPF_F_WRONLY):
            raise SimError(errno.EINVAL, f"map_flags {flags:#x} not allowed")
        if map_type != BPF_MAP_TYPE_ARRAY and flags & (BPF_F_MMAPABLE | BPF_F_INNER_MAP):
            raise SimError(errno.EINVAL, "BPF_F_MMAPABLE is only for BPF_MAP_TYPE_ARRAY")
        if percpu and round_up(value_size, 8) > PCPU_MIN_UNIT_SIZE:
            raise SimError(errno.E2BIG, f"per-CPU value of {round_up(value_size, 8)} bytes exceeds the "
                                        f"allocator's unit of {PCPU_MIN_UNIT_SIZE} bytes", "e2big")
        if map_type == BPF_MAP_TYPE_PROG_ARRAY and (value_size != 4 or flags & (BPF_F_RDONLY_PROG |
                                                                                 BPF_F_WRONLY_PROG)):
            raise SimError(errno.EINVAL, "a prog array holds 4-byte program fds")
        stride = round_up(value_size, 8)
        if stride * max_entries > MAX_SIM_MAP_BYTES or self._maps_created >= MAX_MAPS:
            raise SimError(errno.ENOMEM, f"unsupported by the simulator: a map of {stride * max_entries} "
                                         "bytes", "sim_unsupported")
        base = MAP_AREA + self._maps_created * MAP_SPAN
        self._maps_created += 1
        fd = self._next_fd
        m = SimMap(fd, map_type, key_size, value_size, max_entries, flags, name, base,
                   HANDLE_AREA + fd * 0x1000, stride)
        if map_type == BPF_MAP_TYPE_ARRAY:
            m.shared = bytearray(stride * max_entries)
            self.memory.map(base, m.shared, writable=not flags & BPF_F_RDONLY_PROG, name=name or f"map{fd}")
        elif percpu:
            m.percpu = [bytearray(stride * max_entries) for _ in range(self.possible_cpus)]
            for cpu, buf in enumerate(m.percpu):
                self.memory.map(base + self.percpu_offset(cpu), buf, name=f"{name or f'map{fd}'}@cpu{cpu}")
        else:
            m.progs = [None] * max_entries
        self._by_handle[m.handle] = m
        assert self._new_fd(m) == fd
        return fd

    def _check_elem_flags(self, m: SimMap, flags: int) -> int | None:
        """The CPU selected by BPF_F_CPU, or None; raises for flags this kernel refuses."""
        low, cpu = flags & U32, flags >> 32
        if not self.profile.bpf_f_cpu:
            if (flags & ~BPF_F_LOCK) > BPF_EXIST:
                raise SimError(errno.EINVAL, f"flags {flags:#x} not supported by this kernel")
            low &= ~BPF_F_LOCK
        if low & BPF_F_LOCK:
            raise SimError(errno.EINVAL, "BPF_F_LOCK on a map without a spin lock")
        if low & ~(BPF_NOEXIST | BPF_EXIST | BPF_F_CPU | BPF_F_ALL_CPUS) or (low & 3) == 3:
            raise SimError(errno.EINVAL, f"flags {flags:#x} not allowed")
        if low & BPF_F_CPU and low & BPF_F_ALL_CPUS:
            raise SimError(errno.EINVAL, "BPF_F_CPU and BPF_F_ALL_CPUS together")
        if low & (BPF_F_CPU | BPF_F_ALL_CPUS) and m.type != BPF_MAP_TYPE_PERCPU_ARRAY:
            raise SimError(errno.EINVAL, "BPF_F_CPU/BPF_F_ALL_CPUS on a map that is not per-CPU")
        if cpu and not low & BPF_F_CPU:
            raise SimError(errno.EINVAL, "a CPU number without BPF_F_CPU")
        if low & BPF_F_CPU:
            if cpu >= self.possible_cpus:
                raise SimError(errno.ERANGE, f"cpu {cpu} is not possible")
            return cpu
        return None

    def _index(self, m: SimMap, key: bytes, missing: int) -> int:
        if len(key) != m.key_size:
            raise SimError(errno.EINVAL, f"key of {len(key)} bytes, map key_size is {m.key_size}")
        index = int.from_bytes(key, "little")
        if index >= m.max_entries:
            raise SimError(missing, f"index {index} >= max_entries {m.max_entries}")
        return index

    def map_update(self, fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        m = self._map(fd)
        if m.frozen or m.flags & BPF_F_RDONLY:
            raise SimError(errno.EPERM, "map is read-only from user space")
        cpu = self._check_elem_flags(m, flags)
        index = self._index(m, key, errno.E2BIG)
        if flags & BPF_NOEXIST:
            raise SimError(errno.EEXIST, "array elements always exist")
        if m.progs is not None:
            if len(value) != 4:
                raise SimError(errno.EINVAL, "a prog array value is a 4-byte program fd")
            m.progs[index] = self.prog(int.from_bytes(value, "little"))
            return
        off = index * m.stride
        if m.shared is not None:
            self._expect(value, m.value_size)
            m.shared[off:off + m.value_size] = value
            return
        assert m.percpu is not None
        if flags & BPF_F_ALL_CPUS or cpu is not None:
            self._expect(value, m.value_size)
            for c in range(self.possible_cpus) if cpu is None else (cpu,):
                m.percpu[c][off:off + m.value_size] = value
            return
        # the whole per-CPU buffer: round_up(value_size, 8) bytes per possible CPU, padding included [D]
        self._expect(value, m.stride * self.possible_cpus)
        for c in range(self.possible_cpus):
            m.percpu[c][off:off + m.stride] = value[c * m.stride:(c + 1) * m.stride]

    @staticmethod
    def _expect(value: bytes, size: int) -> None:
        if len(value) != size:
            raise SimError(errno.EINVAL, f"value of {len(value)} bytes, expected {size}")

    def map_lookup(self, fd: int, key: bytes, flags: int = 0) -> bytes:
        m = self._map(fd)
        if m.flags & BPF_F_WRONLY:
            raise SimError(errno.EPERM, "map is write-only from user space")
        if flags & (BPF_NOEXIST | BPF_EXIST | BPF_F_ALL_CPUS):
            raise SimError(errno.EINVAL, f"lookup flags {flags:#x} not allowed")
        cpu = self._check_elem_flags(m, flags)
        index = self._index(m, key, errno.ENOENT)
        if m.progs is not None:
            p = m.progs[index]
            if p is None:
                raise SimError(errno.ENOENT, "empty prog array slot")
            return p.fd.to_bytes(4, "little")
        off = index * m.stride
        if m.shared is not None:
            return bytes(m.shared[off:off + m.value_size])
        assert m.percpu is not None
        if cpu is not None:
            return bytes(m.percpu[cpu][off:off + m.value_size])
        return b"".join(bytes(buf[off:off + m.stride]) for buf in m.percpu)

    def map_freeze(self, fd: int) -> None:
        m = self._map(fd)
        if m.frozen:
            raise SimError(errno.EBUSY, "map already frozen")
        m.frozen = True

    # -- programs ------------------------------------------------------------------------------------------

    def prog_load(self, insns: Sequence[Insn], name: str = "", *, prog_type: str = "raw_tp",
                  fd_array: Sequence[int] | None = None, func_info: Sequence[FuncSpec] = (),
                  attach_prog_fd: int | None = None, attach_func: str | None = None) -> tuple[int, int | None, str]:
        """Verify and load; returns (fd, xlated instruction count or None where unmodelled, verifier log).

        `func_info` names the program's functions (what lets an extension replace one). An "ext" program needs
        its target: `attach_prog_fd` and the function `attach_func` of that program, checked as the kernel's
        bpf_check_attach_target does; it is verified as a program of the target's type."""
        if not _OBJ_NAME.fullmatch(name):
            raise SimError(errno.EINVAL, f"program name {name!r} is not 15 characters of [A-Za-z0-9_.]")
        if prog_type not in PROG_TYPES:
            raise SimError(errno.EOPNOTSUPP, f"unsupported by the simulator: program type {prog_type}",
                           "sim_unsupported")
        target = self._attach_target(prog_type, attach_prog_fd, attach_func)

        def addr_of(info: vf.MapRef[SimMap]) -> int:
            return info.map.handle if info.kind == "map" else info.map.value_addr(info.off)

        def attach_check() -> None:
            if target is not None:
                _check_replaceable(target, attach_func or "", jit_requested=self.profile.ext_jit)

        try:
            verified = vf.verify(insns, profile=self.profile, map_by_fd=self.map_by_fd, addr_of=addr_of,
                                 nr_cpu_ids=self.possible_cpus, fd_array=fd_array,
                                 prog_type=target.prog_type if target is not None else prog_type,
                                 attach_check=attach_check)
        except vf.VerifierError as e:
            raise SimError(e.errno, e.message, e.message_class, e.log) from None
        prog = SimProg(self._next_fd, name, prog_type, verified.insns, verified.xlated_insns, verified.log,
                       _funcs(func_info, verified))
        fd = self._new_fd(prog)
        return fd, verified.xlated_insns, verified.log

    def _attach_target(self, prog_type: str, attach_prog_fd: int | None, attach_func: str | None) -> SimProg | None:
        """bpf_prog_load's part of an extension's target: the program fd and a function name are required."""
        if prog_type != "ext":
            return None
        if not self.profile.ext_programs:
            raise SimError(errno.EPERM, "", "prog_type_refused")
        if attach_prog_fd is None or not attach_func:
            raise SimError(errno.EINVAL, "an extension program needs attach_prog_fd and attach_btf_id")
        return self.prog(attach_prog_fd)

    def check_attach_target(self, target_fd: int, func: str) -> None:
        """The load-time check of an extension's target (bpf_check_attach_target), on its own."""
        try:
            _check_replaceable(self.prog(target_fd), func)
        except vf.VerifierError as e:
            raise SimError(e.errno, e.message, e.message_class) from None

    # -- links ---------------------------------------------------------------------------------------------

    def link_create(self, ext_fd: int, target_fd: int, func: str) -> int:
        """BPF_LINK_CREATE(ext, target, BPF_TRACE_FREPLACE, func's btf id): from now on the target runs the
        extension wherever it calls `func`. A function takes one extension at a time (EBUSY)."""
        ext, target = self.prog(ext_fd), self.prog(target_fd)
        if ext.prog_type != "ext":
            raise SimError(errno.EINVAL, f"program {ext.name!r} is not an extension")
        try:
            start = _check_replaceable(target, func)
        except vf.VerifierError as e:
            raise SimError(e.errno, e.message, e.message_class) from None
        if start is not None and start in target.links:
            raise SimError(errno.EBUSY, f"{func} of {target.name!r} is already replaced")
        link = SimLink(self._next_fd, ext, target, start)
        fd = self._new_fd(link)
        if self.profile.freplace and start is not None:
            target.links[start] = ext
            _relink(target)
        return fd

    def link_destroy(self, link_fd: int) -> None:
        """Close a link: the target calls its own function again."""
        link = self._objects.get(link_fd)
        if not isinstance(link, SimLink):
            raise SimError(errno.EBADF if link is None else errno.EINVAL, f"fd {link_fd} is not a link")
        del self._objects[link_fd]
        if link.start is not None and link.target.links.get(link.start) is link.ext:
            del link.target.links[link.start]
            _relink(link.target)

    def prog_xlated(self, fd: int) -> list[Insn]:
        """The program as it runs: map references resolved to addresses (the kernel's dump shows map ids
        there instead) and helper calls not inlined (xlated_insns counts the inlining)."""
        return list(self.prog(fd).insns)

    def test_run(self, prog_fd: int, cpu: int | None = None) -> int:
        """BPF_PROG_TEST_RUN of a raw_tp program, on `cpu` (BPF_F_TEST_RUN_ON_CPU) or the first online CPU."""
        p = self.prog(prog_fd)
        if p.prog_type == "ext":  # bpf_extension_prog_ops has no test_run
            raise SimError(vf.ENOTSUPP, f"program {p.name!r} is an extension: it cannot be test-run")
        if p.prog_type != "raw_tp":
            raise SimError(errno.EOPNOTSUPP, f"unsupported by the simulator: test run of {p.prog_type}",
                           "sim_unsupported")
        if cpu is None:
            cpu = self.online[0]
        elif cpu not in self.online:
            raise SimError(errno.ENXIO, f"cpu {cpu} is not online")  # bpf_prog_test_run_raw_tp
        r0 = run(p.image, memory=self.memory, cpu=cpu, percpu_offset=self.percpu_offset(cpu),
                 helpers=self.helpers, r1=CTX_ADDR)
        return r0 & U32  # the attr's retval is 32 bits

    # -- helpers (what the verified programs call) ----------------------------------------------------------

    def _helper_map(self, m: Machine, reg: int) -> SimMap:
        found = self._by_handle.get(m.regs[reg])
        if found is None:
            raise BpfFault(f"R{reg} {m.regs[reg]:#x} is not a map")
        return found

    @staticmethod
    def _helper_smp_processor_id(m: Machine) -> int:
        return m.cpu

    def _helper_lookup(self, m: Machine) -> int:
        sm = self._helper_map(m, 1)
        index = m.memory.read(m.regs[2], 4)
        if index >= sm.max_entries:
            return 0
        off = index * sm.stride
        return sm.base + off + (self.percpu_offset(m.cpu) if sm.percpu is not None else 0)

    def _helper_update(self, m: Machine) -> int:
        sm = self._helper_map(m, 1)
        index = m.memory.read(m.regs[2], 4)
        flags = m.regs[4]
        if flags > BPF_EXIST:
            return -errno.EINVAL
        if index >= sm.max_entries:
            return -errno.E2BIG
        if flags == BPF_NOEXIST:
            return -errno.EEXIST
        value = m.memory.read_bytes(m.regs[3], sm.value_size)
        off = index * sm.stride
        buf = sm.percpu[m.cpu] if sm.percpu is not None else sm.shared
        assert buf is not None
        buf[off:off + sm.value_size] = value
        return 0

    def _helper_tail_call(self, m: Machine) -> int | TailCall:
        sm = self._helper_map(m, 2)
        index = m.regs[3] & U32
        target = sm.progs[index] if sm.progs is not None and index < sm.max_entries else None
        if target is None or m.tail_calls >= MAX_TAIL_CALLS:
            return m.regs[0]  # a failed tail call falls through and leaves r0 alone
        # the target runs in the same Machine: same CPU, same per-CPU offset, so the same per-CPU slots
        return TailCall(target.image)

    @staticmethod
    def _c_string(m: Machine, addr: int, limit: int = 4096) -> bytes:
        out = bytearray()
        while len(out) < limit:
            c = m.memory.read(addr + len(out), 1)
            if c == 0:
                break
            out.append(c)
        return bytes(out)

    def _helper_strncmp(self, m: Machine) -> int:
        n = m.regs[2] & U32
        s1 = m.memory.read_bytes(m.regs[1], n)
        s2 = self._c_string(m, m.regs[3], n)
        for i in range(n):
            c1 = s1[i]
            c2 = s2[i] if i < len(s2) else 0
            if c1 != c2:
                return -1 if c1 < c2 else 1
            if c1 == 0:
                break
        return 0

    def _helper_snprintf(self, m: Machine) -> int:
        out_addr, size, fmt_addr, data, data_len = m.regs[1:6]
        fmt = self._c_string(m, fmt_addr)
        args = [m.memory.read(data + 8 * i, 8) for i in range(data_len // 8)]
        try:
            text = printf.render(fmt, args, lambda a: self._c_string(m, a)).encode()
        except ValueError as e:  # the verifier admits only formats render accepts; a changed string is a fault
            raise BpfFault(str(e)) from None
        if size:
            chunk = text[:size - 1] + b"\0"
            for i, b in enumerate(chunk):
                m.memory.write(out_addr + i, 1, b)
        return len(text) + 1


def _funcs(func_info: Sequence[FuncSpec], verified: vf.VerifiedProgram) -> dict[str, SimFunc]:
    """Each function's start in the rewritten program; None for one the verifier dropped as dead code (still
    in func_info, so replaceable, but no call reaches it)."""
    pos = verified.positions

    def start(off: int) -> int | None:
        return pos[off] if off + 1 < len(pos) and pos[off] < pos[off + 1] else None

    return {f.name: SimFunc(f.name, start(f.insn_off), f.exported) for f in func_info}


def _check_replaceable(target: SimProg, func: str, *, jit_requested: bool = True) -> int | None:
    """bpf_check_attach_target for an extension: the function must be one of the target's, and global [D]."""
    if target.prog_type == "ext":
        raise vf.VerifierError(errno.EINVAL, "Cannot recursively attach", "verifier_other")
    found = target.funcs.get(func)
    if found is None:
        raise vf.VerifierError(errno.EINVAL, f"Subprog {func} doesn't exist", "verifier_other")
    if not jit_requested:
        # asked before the prototype check that refuses a static function [V: bpf_check_attach_target]
        raise vf.VerifierError(errno.EINVAL, "Extension programs should be JITed", "jit_required")
    if not found.exported:
        # "Cannot replace static functions" only for a function whose BTF the verifier found unreliable; any
        # other static function fails the prototype check, which names it [measured on a 6.1 guest]
        raise vf.VerifierError(errno.EINVAL, f"{func}() is not a global function", "freplace_static_target")
    return found.start


def _relink(target: SimProg) -> None:
    target.image = link_program(target.insns, {start: ext.insns for start, ext in target.links.items()})
