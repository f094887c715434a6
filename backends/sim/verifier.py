"""The simulated verifier: the checks the generated programs meet, with the kernel's texts, and its rewrites.

Phases, in the kernel's order: structure (ld_imm64 pairs, jump ranges), ld_imm64 resolution
(resolve_pseudo_ldimm64: map fds, direct value access), the static CFG (unreachable code; loops are not
modelled), path-sensitive abstract interpretation (do_check), then the privileged-load rewrites that change the
instruction count: dead branches hard-wired, dead code and `ja +0` removed, and the per-CPU `mov` inserted after
each `.percpu` map-value load (do_misc_fixups). Helper inlining by the x86-64 JIT changes the count reported as
xlated without changing behaviour, so it is counted from the helper table's inline lengths, not emitted.

A helper call is checked against its entry in backends.sim.helpers (argument kinds, return range, the special
checks), the table the kernel model also runs helpers from; maps and profiles are read through the VerifierMap
and VerifierProfile protocols, so this module does not import the kernel model.

The abstract state is deliberately small (its values and their rules are backends.sim.bounds): per register "not
initialised", a scalar with unsigned and signed 64-bit bounds, or a pointer (context, stack slot, map value at a
constant offset, maybe-null map value, map). Values loaded from memory are unknown scalars bounded by their width,
except loads from a frozen read-only ARRAY map at a constant offset, which the kernel folds into constants (a
`.percpu` value never is [S]). Anything outside this model (loops, variable pointer offsets, unknown helpers,
kfuncs, context accesses) is refused with class `sim_unsupported` rather than guessed. Facts marked [D] were read
from kernel source and not run here; [V, measured] ones were measured on this machine's 6.18 kernel.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Generic, Protocol, TypeVar, Union

from backends.sim import printf
from backends.sim.bounds import (  # the abstract values, and their rules
    CTX,
    FLIPPED,
    MAP_PTR,
    MAP_VALUE,
    MAP_VALUE_OR_NULL,
    NEGATED,
    STACK,
    U32,
    U64,
    UNKNOWN,
    UNKNOWN32,
    Ptr,
    Scalar,
    Value,
    as_signed,
    branch_taken,
    const,
    low32,
    refine,
    scalar_alu,
    srange,
    type_name,
    unknown_of_size,
    urange,
)
from backends.sim.helpers import BUFFER_ARGS, HELPER_PROTOS, HelperProto, Inline
from backends.sim.helpers import (  # re-exported: the fault catalogue replaces that helper by its id
    BPF_FUNC_get_smp_processor_id as BPF_FUNC_get_smp_processor_id,
)
from toolchain import insn as isa
from toolchain.insn import Insn
from toolchain.uapi import (
    BPF_F_RDONLY_PROG,
    BPF_F_WRONLY_PROG,
    BPF_MAP_TYPE_ARRAY,
    BPF_MAP_TYPE_PERCPU_ARRAY,
    BPF_MAP_TYPE_PROG_ARRAY,
)

MAX_BPF_STACK = 512
MAX_CALL_FRAMES = 8
BPF_MAX_VAR_OFF = 1 << 29
# Exploration budget: the generated programs need a few thousand states; more means a shape the model
# does not prune well, which is refused rather than waited on.
MAX_STATES = 200_000

NOP = Insn(isa.BPF_JMP | isa.BPF_JA)


ENOTSUPP = 524


class VerifierMap(Protocol):
    """What the verifier reads of a map (the kernel model's maps have it; this module does not import them)."""

    @property
    def fd(self) -> int: ...
    @property
    def type(self) -> int: ...
    @property
    def key_size(self) -> int: ...
    @property
    def value_size(self) -> int: ...
    @property
    def max_entries(self) -> int: ...
    @property
    def flags(self) -> int: ...
    @property
    def frozen(self) -> bool: ...
    def read_bytes(self, off: int, n: int) -> bytes: ...
    def read_value(self, off: int, size: int) -> int: ...


class VerifierProfile(Protocol):
    """What the verifier reads of a kernel profile row."""

    @property
    def messages(self) -> Mapping[str, str]: ...
    @property
    def percpu_direct_value(self) -> bool: ...
    @property
    def percpu_direct_value_checks(self) -> tuple[str, ...]: ...
    @property
    def percpu_insn_jit(self) -> bool: ...
    @property
    def percpu_rewrite(self) -> bool: ...
    @property
    def jit_enabled(self) -> bool: ...
    @property
    def tail_calls_with_subprogs(self) -> bool: ...


MapT = TypeVar("MapT", bound=VerifierMap)


class VerifierError(Exception):
    """A rejected load: errno, the verifier's last message, its normalised class and the whole log."""

    def __init__(self, err: int, message: str, message_class: str, log: str = "") -> None:
        super().__init__(message)
        self.errno = err
        self.message = message
        self.message_class = message_class
        self.log = log or message


def _unsupported(what: str) -> VerifierError:
    return VerifierError(errno.EOPNOTSUPP, f"unsupported by the simulator: {what}", "sim_unsupported")


# -- states -------------------------------------------------------------------------------------------------

SPILL, MISC = "spill", "misc"
Slot = Union[tuple[str, Value], None]  # noqa: UP007 - (SPILL, value) | (MISC, None) | None (never written)


@dataclass(frozen=True, slots=True)
class Frame:
    regs: tuple[Value, ...]  # r0..r10
    stack: tuple[Slot, ...]  # 64 slots of 8 bytes, slot 0 at fp-512
    ret_pc: int  # where the caller resumes (main frame: -1)


EMPTY_STACK: tuple[Slot, ...] = (None,) * (MAX_BPF_STACK // 8)


@dataclass
class VerifiedProgram:
    insns: list[Insn]  # what runs: constants resolved, dead code removed, per-CPU moves inserted
    xlated_insns: int | None  # the kernel's xlated_prog_len / 8; None where its rewrite is not modelled
    log: str
    percpu_loads: int  # map-value loads of PERCPU_ARRAY maps that got the per-CPU move
    # each submitted instruction's index in `insns` (a removed one: the next survivor's), and len(insns) last:
    # where a function of the submitted program starts in the one that runs
    positions: list[int] = field(default_factory=list)


@dataclass
class MapRef(Generic[MapT]):
    """What a resolved ld_imm64 refers to: a map ("map") or a byte of its value ("value")."""

    kind: str
    map: MapT
    off: int


# -- helpers ------------------------------------------------------------------------------------------------


def _jump_target(insn: Insn, pc: int) -> int | None:
    """Where a jump or pseudo call at pc goes; None for instructions without a target."""
    cls, op = insn.cls, insn.code & 0xF0
    if insn.is_pseudo_call:
        return pc + 1 + insn.imm
    if cls == isa.BPF_JMP and op not in (isa.BPF_CALL, isa.BPF_EXIT):
        return pc + 1 + insn.off
    if cls == isa.BPF_JMP32 and op not in (isa.BPF_CALL, isa.BPF_EXIT):
        return pc + 1 + (insn.imm if op == isa.BPF_JA else insn.off)
    return None


def _is_cond_jump(insn: Insn) -> bool:
    op = insn.code & 0xF0
    return insn.cls in (isa.BPF_JMP, isa.BPF_JMP32) and op not in (isa.BPF_JA, isa.BPF_CALL, isa.BPF_EXIT)


def _retarget(insn: Insn, new_pc: int, new_target: int) -> Insn:
    delta = new_target - new_pc - 1
    if insn.is_pseudo_call or (insn.cls == isa.BPF_JMP32 and insn.code & 0xF0 == isa.BPF_JA):
        return replace(insn, imm=delta)
    return replace(insn, off=delta)


def rebuild(insns: Sequence[Insn], removed: Collection[int] = (),
            insert_after: Mapping[int, Insn] | None = None) -> tuple[list[Insn], list[int]]:
    """Drop `removed`, insert `insert_after[i]` after old slot i, and keep every jump and call landing where it
    did (a removed target becomes the next surviving instruction, as the kernel's branch adjustment does).
    Returns the new program and each old index's new position."""
    insert_after = insert_after or {}
    removed = set(removed)
    n = len(insns)
    new_pos = [0] * (n + 1)
    out_index: list[int | None] = []
    for i in range(n):
        new_pos[i] = len(out_index)
        if i not in removed:
            out_index.append(i)
            if i in insert_after:
                out_index.append(None)
    new_pos[n] = len(out_index)
    out: list[Insn] = []
    pending = iter([insert_after[i] for i in range(n) if i not in removed and i in insert_after])
    for pos, old in enumerate(out_index):
        if old is None:
            out.append(next(pending))
            continue
        insn = insns[old]
        target = _jump_target(insn, old)
        if target is not None:
            insn = _retarget(insn, pos, new_pos[min(max(target, 0), n)])
        out.append(insn)
    return out, new_pos


class _Liveness:
    """Registers each instruction may still read (per function body), so pruning compares only those."""

    def __init__(self, insns: Sequence[Insn], starts: Sequence[int]) -> None:
        n = len(insns)
        self.live = [0x7FF] * n
        bounds = sorted(set(starts)) + [n]
        for a, b in zip(bounds, bounds[1:], strict=False):
            self._function(insns, a, b)

    @staticmethod
    def _uses_defs(insn: Insn) -> tuple[int, int]:
        cls, op = insn.cls, insn.code & 0xF0
        d, s = 1 << insn.dst, 1 << insn.src
        if insn.is_ld_imm64:
            return 0, d
        if cls in (isa.BPF_ALU, isa.BPF_ALU64):
            use = (s if insn.code & isa.BPF_X else 0) | (0 if op == isa.BPF_MOV else d)
            return use, d
        if cls == isa.BPF_LDX:
            return s, d
        if cls == isa.BPF_ST:
            return d, 0
        if cls == isa.BPF_STX:
            if insn.code & 0xE0 == isa.BPF_ATOMIC:
                fetch = s if insn.imm & isa.BPF_FETCH else 0
                cmpx = 1 if insn.imm == isa.BPF_CMPXCHG else 0
                return d | s | cmpx, fetch | cmpx
            return d | s, 0
        if cls in (isa.BPF_JMP, isa.BPF_JMP32):
            if op == isa.BPF_CALL:
                return 0b111110, 0b111111
            if op == isa.BPF_EXIT:
                return 1, 0
            if op == isa.BPF_JA:
                return 0, 0
            return d | (s if insn.code & isa.BPF_X else 0), 0
        return 0x7FF, 0

    def _function(self, insns: Sequence[Insn], a: int, b: int) -> None:
        live_in = [0] * (b - a + 1)
        changed = True
        while changed:
            changed = False
            for pc in range(b - 1, a - 1, -1):
                insn = insns[pc]
                if pc > a and insns[pc - 1].is_ld_imm64:
                    continue
                succ: list[int] = []
                op = insn.code & 0xF0
                target = _jump_target(insn, pc)
                if insn.cls in (isa.BPF_JMP, isa.BPF_JMP32) and op == isa.BPF_EXIT:
                    pass
                elif target is not None and not insn.is_pseudo_call:
                    succ.append(target)
                    if op != isa.BPF_JA:
                        succ.append(pc + 1)
                else:
                    succ.append(pc + (2 if insn.is_ld_imm64 else 1))
                out = 0
                for t in succ:
                    if a <= t < b:
                        out |= live_in[t - a]
                use, define = self._uses_defs(insn)
                new = (out & ~define) | use
                if new != live_in[pc - a]:
                    live_in[pc - a] = new
                    changed = True
        for pc in range(a, b):
            self.live[pc] = live_in[pc - a]


# -- the verifier -------------------------------------------------------------------------------------------


class Verifier(Generic[MapT]):
    def __init__(self, insns: Sequence[Insn], *, profile: VerifierProfile,
                 map_by_fd: Callable[[int], MapT | str | None], nr_cpu_ids: int,
                 fd_array: Sequence[int] | None = None, prog_type: str = "raw_tp") -> None:
        self.insns = list(insns)
        self.profile = profile
        self.map_by_fd = map_by_fd
        self.nr_cpu_ids = nr_cpu_ids
        self.fd_array = fd_array
        self.prog_type = prog_type
        self.log: list[str] = []
        self.ldimm: dict[int, MapRef[MapT]] = {}
        self.maps: dict[int, MapT] = {}  # fd -> map, every map the program references
        self.seen: set[int] = set()
        self.lookup_sites: dict[int, set[int]] = {}  # helper call pc -> fds of the maps it looked up
        self.helper_sites: dict[int, int] = {}  # call pc -> helper id
        self.xlated_known = True
        self.subprog_count = 1  # the main program and its bpf-to-bpf callees, set by the CFG check
        self.positions: list[int] = list(range(len(self.insns) + 1))  # filled in by rewrite

    def fail(self, err: int, message: str, message_class: str) -> VerifierError:
        self.log.append(message)
        return VerifierError(err, message, message_class, "\n".join(self.log))

    def msg(self, key: str, *args: object) -> str:
        return self.profile.messages[key] % args

    # -- phase 1: structure ---------------------------------------------------------------------------------

    def check_structure(self) -> None:
        insns, n = self.insns, len(self.insns)
        if n == 0:
            raise self.fail(errno.EINVAL, "program has no instructions", "verifier_other")
        for pc, insn in enumerate(insns):
            if insn.is_ld_imm64 and (pc + 1 >= n or insn.off or insns[pc + 1] != Insn(0, imm=insns[pc + 1].imm)):
                raise self.fail(errno.EINVAL, "invalid bpf_ld_imm64 insn", "verifier_other")
            target = _jump_target(insn, pc)
            if target is not None and not (pc and insns[pc - 1].is_ld_imm64):
                if not 0 <= target < n:
                    raise self.fail(errno.EINVAL, f"jump out of range from insn {pc} to {target}",
                                    "verifier_other")
                if target and insns[target - 1].is_ld_imm64 and insns[target].code == 0:
                    raise self.fail(errno.EINVAL, f"jump into the middle of ldimm64 insn {target - 1}",
                                    "verifier_other")
        if insns[-1].code not in (isa.BPF_JMP | isa.BPF_EXIT, isa.BPF_JMP | isa.BPF_JA, isa.BPF_JMP32 | isa.BPF_JA):
            raise self.fail(errno.EINVAL, "last insn is not an exit or jmp", "verifier_other")

    # -- phase 2: ld_imm64 resolution -----------------------------------------------------------------------

    def resolve_ldimm64(self) -> None:
        for pc, insn in enumerate(self.insns):
            if not insn.is_ld_imm64 or (pc and self.insns[pc - 1].is_ld_imm64 and insn.code == 0):
                continue
            src = insn.src
            if src == 0:
                continue
            if src not in (isa.BPF_PSEUDO_MAP_FD, isa.BPF_PSEUDO_MAP_VALUE, isa.BPF_PSEUDO_MAP_IDX,
                           isa.BPF_PSEUDO_MAP_IDX_VALUE):
                raise _unsupported(f"ld_imm64 with src {src} at insn {pc}")
            second = self.insns[pc + 1]
            if src in (isa.BPF_PSEUDO_MAP_FD, isa.BPF_PSEUDO_MAP_IDX) and second.imm != 0:
                raise self.fail(errno.EINVAL, "unrecognized bpf_ld_imm64 insn", "verifier_other")
            fd = insn.imm
            if src in (isa.BPF_PSEUDO_MAP_IDX, isa.BPF_PSEUDO_MAP_IDX_VALUE):
                if self.fd_array is None:
                    raise self.fail(errno.EPROTO, "fd_idx without fd_array is invalid", "invalid_map_fd")
                if not 0 <= insn.imm < len(self.fd_array):
                    raise self.fail(errno.EFAULT, f"fd_array index {insn.imm} out of range",
                                    "invalid_map_fd")
                fd = self.fd_array[insn.imm]
            found = self.map_by_fd(fd)
            if found is None or isinstance(found, str):
                # a closed fd is EBADF; an open fd that is not a map (libbpf's placeholder) is EINVAL
                err = errno.EBADF if found is None else errno.EINVAL
                raise self.fail(err, self.msg("invalid_map_fd", fd), "invalid_map_fd")
            m = found
            self.maps[fd] = m
            if src in (isa.BPF_PSEUDO_MAP_FD, isa.BPF_PSEUDO_MAP_IDX):
                self.ldimm[pc] = MapRef("map", m, 0)
                continue
            off = second.imm & U32
            if off >= BPF_MAX_VAR_OFF:
                raise self.fail(errno.EINVAL, f"direct value offset of {off} is not allowed",
                                "offset_out_of_range")
            self.direct_value_addr(m, off)
            self.ldimm[pc] = MapRef("value", m, off)

    def direct_value_addr(self, m: MapT, off: int) -> None:
        """The map type's map_direct_value_addr(): who allows `&value[off]` as a constant."""
        bad_ptr = self.msg("bad_direct_value", m.value_size, off)
        if m.type == BPF_MAP_TYPE_ARRAY:
            checks: Sequence[str] = ("max_entries", "offset")
        elif m.type == BPF_MAP_TYPE_PERCPU_ARRAY and self.profile.percpu_direct_value:
            checks = self.profile.percpu_direct_value_checks
        else:
            raise self.fail(errno.EINVAL, self.msg("no_direct_value"), "no_direct_value_access")
        # ARRAY refuses a shape with the kernel-internal ENOTSUPP, which reaches user space [measured on 6.18];
        # the per-CPU version is written with EOPNOTSUPP [V]
        unsupported = ENOTSUPP if m.type == BPF_MAP_TYPE_ARRAY else errno.EOPNOTSUPP
        for check in checks:
            if check == "max_entries" and m.max_entries != 1:
                raise self.fail(unsupported, bad_ptr, "direct_value_unsupported")
            if check == "jit" and not self.profile.percpu_insn_jit:
                raise self.fail(errno.EOPNOTSUPP, bad_ptr, "direct_value_unsupported")
            if check == "offset" and off >= m.value_size:
                raise self.fail(errno.EINVAL, bad_ptr, "offset_out_of_range")

    # -- phase 3: static CFG ----------------------------------------------------------------------------------

    def check_cfg(self) -> list[int]:
        """Every instruction reachable, no cycles (clang's backward jumps into shared tails are fine);
        returns the subprogram starts."""
        insns, n = self.insns, len(self.insns)
        starts = {0}
        for pc, insn in enumerate(insns):
            if insn.is_pseudo_call:
                starts.add(pc + 1 + insn.imm)
            elif insn.code == isa.BPF_JMP | isa.BPF_CALL and insn.src == isa.BPF_PSEUDO_KFUNC_CALL:
                raise _unsupported(f"kfunc call at insn {pc}")

        def successors(pc: int) -> list[int]:
            insn = insns[pc]
            op = insn.code & 0xF0
            if insn.cls in (isa.BPF_JMP, isa.BPF_JMP32) and op == isa.BPF_EXIT:
                return []
            target = _jump_target(insn, pc)
            if target is not None and not insn.is_pseudo_call:
                return [target] if op == isa.BPF_JA else [target, pc + 1]
            return [pc + (2 if insn.is_ld_imm64 else 1)]

        state = [0] * n  # 0 new, 1 on the DFS path, 2 finished
        for root in sorted(starts):
            if state[root]:
                continue
            state[root] = 1
            path = [(root, iter(successors(root)))]
            while path:
                pc, it = path[-1]
                t = next(it, None)
                if t is None:
                    state[pc] = 2
                    path.pop()
                    continue
                if t >= n:
                    raise self.fail(errno.EINVAL, f"jump out of range from insn {pc} to {t}", "verifier_other")
                if state[t] == 1:
                    raise _unsupported(f"loop (back-edge from insn {pc} to {t})")
                if state[t] == 0:
                    state[t] = 1
                    path.append((t, iter(successors(t))))
        for pc in range(n):
            if not state[pc] and not (pc and insns[pc - 1].is_ld_imm64 and state[pc - 1]):
                raise self.fail(errno.EINVAL, f"unreachable insn {pc}", "verifier_other")
        return sorted(starts)

    # -- phase 4: abstract interpretation ---------------------------------------------------------------------

    def do_check(self, starts: Sequence[int]) -> None:
        self.liveness = _Liveness(self.insns, starts)
        regs: list[Value] = [None] * 11
        regs[1] = Ptr(CTX)
        regs[10] = Ptr(STACK, 0, frame=0)
        init: tuple[int, tuple[Frame, ...]] = (0, (Frame(tuple(regs), EMPTY_STACK, -1),))
        visited: set[tuple] = set()
        work = [init]
        states = 0
        while work:
            pc, frames = work.pop()
            while True:
                key = self.prune_key(pc, frames)
                if key in visited:
                    break
                visited.add(key)
                states += 1
                if states > MAX_STATES:
                    raise _unsupported(f"more than {MAX_STATES} verifier states")
                self.seen.add(pc)
                succ = self.step(pc, frames)
                if not succ:
                    break
                if len(succ) > 1:
                    work.append(succ[1])  # the kernel pushes the jump target and goes on with the fall-through
                pc, frames = succ[0]

    def prune_key(self, pc: int, frames: tuple[Frame, ...]) -> tuple:
        live = self.liveness.live[pc]
        cur = frames[-1]
        regs = tuple(v if live >> r & 1 else None for r, v in enumerate(cur.regs))
        callers = tuple((f.regs[6:10], f.stack, f.ret_pc) for f in frames[:-1])
        return pc, regs, cur.stack, cur.ret_pc, callers

    # state helpers

    def read_reg(self, frames: tuple[Frame, ...], r: int) -> Value:
        v = frames[-1].regs[r]
        if v is None:
            raise self.fail(errno.EACCES, f"R{r} !read_ok", "verifier_other")
        return v

    @staticmethod
    def with_regs(frames: tuple[Frame, ...], updates: Mapping[int, Value]) -> tuple[Frame, ...]:
        regs = list(frames[-1].regs)
        for r, v in updates.items():
            regs[r] = v
        return (*frames[:-1], replace(frames[-1], regs=tuple(regs)))

    @staticmethod
    def with_stack(frames: tuple[Frame, ...], frame: int, stack: tuple[Slot, ...]) -> tuple[Frame, ...]:
        out = list(frames)
        out[frame] = replace(frames[frame], stack=stack)
        return tuple(out)

    def step(self, pc: int, frames: tuple[Frame, ...]) -> list[tuple[int, tuple[Frame, ...]]]:
        insn = self.insns[pc]
        cls = insn.cls
        if insn.dst > 10 or insn.src > 10:
            raise self.fail(errno.EINVAL, f"R{max(insn.dst, insn.src)} is invalid", "verifier_other")
        if cls in (isa.BPF_ALU, isa.BPF_ALU64):
            if insn.dst == 10:
                raise self.fail(errno.EACCES, "frame pointer is read only", "verifier_other")
            value = self.alu(pc, insn, frames, cls == isa.BPF_ALU64)
            return [(pc + 1, self.with_regs(frames, {insn.dst: value}))]
        if insn.is_ld_imm64:
            if insn.dst == 10:
                raise self.fail(errno.EACCES, "frame pointer is read only", "verifier_other")
            return [(pc + 2, self.with_regs(frames, {insn.dst: self.ld_imm64_value(pc)}))]
        if cls in (isa.BPF_LDX, isa.BPF_ST, isa.BPF_STX):
            return [(pc + 1, self.mem(pc, insn, frames))]
        if cls in (isa.BPF_JMP, isa.BPF_JMP32):
            return self.jmp(pc, insn, frames, cls == isa.BPF_JMP32)
        raise _unsupported(f"opcode {insn.code:#04x} at insn {pc}")

    def ld_imm64_value(self, pc: int) -> Value:
        info = self.ldimm.get(pc)
        if info is None:
            second = self.insns[pc + 1]
            return const((self.insns[pc].imm & U32) | (second.imm & U32) << 32)
        if info.kind == "map":
            return Ptr(MAP_PTR, 0, map_fd=info.map.fd)
        return Ptr(MAP_VALUE, info.off, map_fd=info.map.fd)

    # ALU

    def alu(self, pc: int, insn: Insn, frames: tuple[Frame, ...], is64: bool) -> Value:
        op = insn.code & 0xF0
        use_x = bool(insn.code & isa.BPF_X)
        bits = 64 if is64 else 32
        if op == isa.BPF_MOV:
            if not use_x:
                if insn.off:
                    raise self.fail(errno.EINVAL, "BPF_MOV uses reserved fields", "verifier_other")
                return const(insn.imm if is64 else insn.imm & U32)
            src = self.read_reg(frames, insn.src)
            if insn.off == 0:
                if is64:
                    return src
                return low32(src) if isinstance(src, Scalar) else UNKNOWN32  # a pointer's low half is a scalar
            if insn.off in (8, 16, 32) and not (insn.off == 32 and not is64):
                if not isinstance(src, Scalar):
                    raise _unsupported(f"sign-extending move of a pointer at insn {pc}")
                if src.is_const:
                    v = src.value & ((1 << insn.off) - 1)
                    v = v - (1 << insn.off) if v >> (insn.off - 1) else v
                    return const(v if is64 else v & U32)
                half = 1 << (insn.off - 1)
                if src.umax < half:
                    return src
                return srange(-half, half - 1) if is64 else UNKNOWN32
            raise self.fail(errno.EINVAL, "BPF_MOV uses reserved fields", "verifier_other")
        dst = self.read_reg(frames, insn.dst)
        if op in (isa.BPF_NEG, isa.BPF_END):
            if not isinstance(dst, Scalar):
                raise _unsupported(f"{'neg' if op == isa.BPF_NEG else 'byte swap'} of a pointer at insn {pc}")
            if dst.is_const:
                if op == isa.BPF_NEG:
                    return const(-dst.value & (U64 if is64 else U32))
                width = insn.imm // 8
                low = dst.value & ((1 << insn.imm) - 1)
                if not is64 and not insn.code & isa.BPF_TO_BE:
                    return const(low)
                return const(int.from_bytes(low.to_bytes(width, "little"), "big"))
            if op == isa.BPF_END and not is64 and not insn.code & isa.BPF_TO_BE and insn.imm < 64:
                return urange(0, min(dst.umax, (1 << insn.imm) - 1))
            return UNKNOWN if is64 else UNKNOWN32
        if use_x:
            src = self.read_reg(frames, insn.src)
        else:
            src = const(insn.imm if is64 else insn.imm & U32)
        if isinstance(dst, Scalar) and isinstance(src, Scalar):
            if op not in (isa.BPF_ADD, isa.BPF_SUB, isa.BPF_MUL, isa.BPF_DIV, isa.BPF_OR, isa.BPF_AND,
                          isa.BPF_LSH, isa.BPF_RSH, isa.BPF_MOD, isa.BPF_XOR, isa.BPF_ARSH):
                raise _unsupported(f"ALU opcode {insn.code:#04x} at insn {pc}")
            if insn.off not in (0, 1) or (insn.off == 1 and op not in (isa.BPF_DIV, isa.BPF_MOD)):
                raise self.fail(errno.EINVAL, "BPF_ALU uses reserved fields", "verifier_other")
            if op in (isa.BPF_DIV, isa.BPF_MOD) and use_x:
                self.xlated_known = False  # the kernel guards division by a register: count not modelled
            return scalar_alu(op, dst, src, bits, insn.off)
        # pointer arithmetic
        ptr, other = (dst, src) if isinstance(dst, Ptr) else (src, dst)
        assert isinstance(ptr, Ptr)
        if not is64:
            raise self.fail(errno.EACCES, f"R{insn.dst} 32-bit pointer arithmetic prohibited", "verifier_other")
        if ptr.kind == MAP_VALUE_OR_NULL:
            raise self.fail(errno.EACCES, f"R{insn.dst} pointer arithmetic on map_value_or_null prohibited, "
                                          "null-check it first", "verifier_other")
        if ptr.kind == MAP_PTR:
            raise self.fail(errno.EACCES, f"R{insn.dst} pointer arithmetic on map_ptr prohibited",
                            "verifier_other")
        if isinstance(other, Ptr):
            if op == isa.BPF_SUB and isinstance(dst, Ptr):
                return UNKNOWN  # privileged pointer difference: an unknown scalar
            raise _unsupported(f"ALU on two pointers at insn {pc}")
        if other is None or not other.is_const:
            raise _unsupported(f"pointer arithmetic with a variable offset at insn {pc}")
        if ptr.kind not in (STACK, MAP_VALUE):
            raise _unsupported(f"arithmetic on a {ptr.kind} pointer at insn {pc}")
        k = as_signed(other.value)
        if op == isa.BPF_ADD:
            return replace(ptr, off=ptr.off + k)
        if op == isa.BPF_SUB and isinstance(dst, Ptr):
            return replace(ptr, off=ptr.off - k)
        raise _unsupported(f"ALU opcode {insn.code:#04x} on a pointer at insn {pc}")

    # memory

    def mem(self, pc: int, insn: Insn, frames: tuple[Frame, ...]) -> tuple[Frame, ...]:
        cls, mode = insn.cls, insn.code & 0xE0
        size = isa.SIZE_BYTES[insn.code & 0x18]
        if cls == isa.BPF_LDX:
            if mode not in (isa.BPF_MEM, isa.BPF_MEMSX) or (mode == isa.BPF_MEMSX and size == 8):
                raise _unsupported(f"load mode {insn.code:#04x} at insn {pc}")
            if insn.dst == 10:
                raise self.fail(errno.EACCES, "frame pointer is read only", "verifier_other")
            base = self.read_reg(frames, insn.src)
            value, frames = self.access(pc, frames, insn.src, base, insn.off, size, write=False,
                                        signed=mode == isa.BPF_MEMSX)
            return self.with_regs(frames, {insn.dst: value})
        if cls == isa.BPF_ST:
            if mode != isa.BPF_MEM:
                raise _unsupported(f"store mode {insn.code:#04x} at insn {pc}")
            base = self.read_reg(frames, insn.dst)
            _, frames = self.access(pc, frames, insn.dst, base, insn.off, size, write=True,
                                    stored=const(insn.imm))
            return frames
        if mode == isa.BPF_MEM:
            stored = self.read_reg(frames, insn.src)
            base = self.read_reg(frames, insn.dst)
            _, frames = self.access(pc, frames, insn.dst, base, insn.off, size, write=True, stored=stored)
            return frames
        if mode == isa.BPF_ATOMIC and size in (4, 8):
            aop = insn.imm
            if aop not in (isa.BPF_ADD, isa.BPF_OR, isa.BPF_AND, isa.BPF_XOR, isa.BPF_XCHG, isa.BPF_CMPXCHG) \
                    and aop & ~isa.BPF_FETCH not in (isa.BPF_ADD, isa.BPF_OR, isa.BPF_AND, isa.BPF_XOR):
                raise _unsupported(f"atomic operation {aop:#x} at insn {pc}")
            src = self.read_reg(frames, insn.src)
            if not isinstance(src, Scalar):
                raise _unsupported(f"atomic operation with a pointer operand at insn {pc}")
            if aop == isa.BPF_CMPXCHG:
                self.read_reg(frames, 0)
            base = self.read_reg(frames, insn.dst)
            _, frames = self.access(pc, frames, insn.dst, base, insn.off, size, write=False)
            _, frames = self.access(pc, frames, insn.dst, base, insn.off, size, write=True, stored=UNKNOWN)
            if aop == isa.BPF_CMPXCHG:
                return self.with_regs(frames, {0: unknown_of_size(size)})
            if aop & isa.BPF_FETCH:
                return self.with_regs(frames, {insn.src: unknown_of_size(size)})
            return frames
        raise _unsupported(f"store mode {insn.code:#04x} at insn {pc}")

    def access(self, pc: int, frames: tuple[Frame, ...], regno: int, base: Value, off: int, size: int, *,
               write: bool, stored: Value = None, signed: bool = False) -> tuple[Value, tuple[Frame, ...]]:
        """One load or store through `base`; returns the loaded value and the new state."""
        if isinstance(base, Scalar):
            raise self.fail(errno.EACCES, f"R{regno} invalid mem access 'scalar'", "verifier_other")
        assert isinstance(base, Ptr)
        if base.kind == MAP_VALUE:
            return self.map_access(pc, regno, base, off, size, write=write, signed=signed), frames
        if base.kind == STACK:
            return self.stack_access(frames, regno, base, off, size, write=write, stored=stored, signed=signed)
        if base.kind == MAP_VALUE_OR_NULL:
            raise self.fail(errno.EACCES, f"R{regno} invalid mem access 'map_value_or_null'",
                            "verifier_other")
        if base.kind == CTX:
            raise _unsupported(f"context access at insn {pc}")
        raise _unsupported(f"access through a {base.kind} pointer at insn {pc}")

    def map_access(self, pc: int, regno: int, ptr: Ptr, off: int, size: int, *, write: bool,
                   signed: bool = False) -> Value:
        m = self.maps[ptr.map_fd]
        total = ptr.off + off
        if write and m.flags & BPF_F_RDONLY_PROG:
            raise self.fail(errno.EACCES, self.msg("write_forbidden", m.value_size, total, size),
                            "write_into_rdonly")
        if not write and m.flags & BPF_F_WRONLY_PROG:
            raise self.fail(errno.EACCES, self.msg("read_forbidden", m.value_size, total, size),
                            "verifier_other")
        if total < 0 or total + size > m.value_size:
            raise self.fail(errno.EACCES, self.msg("map_value_oob", m.value_size, total, size), "map_value_oob")
        if write:
            return None
        # bpf_map_direct_read: a frozen read-only ARRAY map's contents are constants to the verifier;
        # per-CPU values are excluded from this folding [S]
        if m.type == BPF_MAP_TYPE_ARRAY and m.flags & BPF_F_RDONLY_PROG and m.frozen:
            raw = m.read_value(total, size)
            if signed:
                raw = raw - (1 << (8 * size)) if raw >> (8 * size - 1) else raw
            return const(raw)
        if signed:
            half = 1 << (8 * size - 1)
            return srange(-half, half - 1)
        return unknown_of_size(size)

    def stack_access(self, frames: tuple[Frame, ...], regno: int, ptr: Ptr, off: int, size: int, *,
                     write: bool, stored: Value, signed: bool) -> tuple[Value, tuple[Frame, ...]]:
        total = ptr.off + off
        if total < -MAX_BPF_STACK or total + size > 0:
            what = "write to" if write else "read from"
            raise self.fail(errno.EACCES, f"invalid {what} stack R{regno} off={total} size={size}",
                            "verifier_other")
        frame = frames[ptr.frame]
        first, last = (total + MAX_BPF_STACK) // 8, (total + MAX_BPF_STACK + size - 1) // 8
        if write:
            stack = list(frame.stack)
            if size == 8 and total % 8 == 0:
                stack[first] = (SPILL, stored)
            else:
                for slot in range(first, last + 1):
                    stack[slot] = (MISC, None)
            return None, self.with_stack(frames, ptr.frame, tuple(stack))
        spilled = frame.stack[first]
        if size == 8 and total % 8 == 0 and spilled is not None and spilled[0] == SPILL:
            return spilled[1], frames
        if signed:
            half = 1 << (8 * size - 1)
            return srange(-half, half - 1), frames
        return unknown_of_size(size), frames

    def check_mem_arg(self, frames: tuple[Frame, ...], regno: int, size: int, *, write: bool,
                      pc: int) -> None:
        """A helper argument that points to `size` bytes of memory."""
        ptr = self.read_reg(frames, regno)
        if not isinstance(ptr, Ptr) or ptr.kind not in (STACK, MAP_VALUE):
            raise self.fail(errno.EACCES, f"R{regno} type={type_name(ptr)} expected=fp, map_value",
                            "verifier_other")
        if size == 0:
            return
        if ptr.kind == MAP_VALUE:
            self.map_access(pc, regno, ptr, 0, size, write=write)
        else:
            total = ptr.off
            if total < -MAX_BPF_STACK or total + size > 0:
                raise self.fail(errno.EACCES, f"invalid indirect access to stack R{regno} off={total} "
                                              f"size={size}", "verifier_other")

    # jumps, calls, exit

    def jmp(self, pc: int, insn: Insn, frames: tuple[Frame, ...], is32: bool
            ) -> list[tuple[int, tuple[Frame, ...]]]:
        op = insn.code & 0xF0
        if op == isa.BPF_JA:
            return [(pc + 1 + (insn.imm if is32 else insn.off), frames)]
        if op == isa.BPF_EXIT and not is32:
            return self.exit(pc, frames)
        if op == isa.BPF_CALL and not is32:
            if insn.src == isa.BPF_PSEUDO_CALL:
                if len(frames) >= MAX_CALL_FRAMES:
                    raise self.fail(errno.E2BIG, f"the call stack of {len(frames) + 1} frames is too deep !",
                                    "verifier_other")
                regs: list[Value] = [None] * 11
                for r in range(1, 6):
                    regs[r] = frames[-1].regs[r]
                regs[10] = Ptr(STACK, 0, frame=len(frames))
                callee = Frame(tuple(regs), EMPTY_STACK, pc + 1)
                return [(pc + 1 + insn.imm, (*frames, callee))]
            if insn.src != 0:
                raise _unsupported(f"call with src {insn.src} at insn {pc}")
            return [(pc + 1, self.helper(pc, insn.imm, frames))]
        if op not in NEGATED and op != isa.BPF_JSET:
            raise _unsupported(f"jump opcode {insn.code:#04x} at insn {pc}")
        target = pc + 1 + insn.off
        a = self.read_reg(frames, insn.dst)
        b = self.read_reg(frames, insn.src) if insn.code & isa.BPF_X else const(
            insn.imm if not is32 else insn.imm & U32)
        taken, fall = self.split(pc, op, insn, frames, a, b, is32)
        out = []
        if fall is not None:
            out.append((pc + 1, fall))
        if taken is not None:
            out.append((target, taken))
        return out

    def split(self, pc: int, op: int, insn: Insn, frames: tuple[Frame, ...], a: Value, b: Value, is32: bool
              ) -> tuple[tuple[Frame, ...] | None, tuple[Frame, ...] | None]:
        """(state where the jump is taken, state where it falls through); None for an impossible side."""
        if isinstance(a, Scalar) and isinstance(b, Scalar):
            decided = branch_taken(op, a, b, is32)
            if decided == 1:
                return frames, None
            if decided == 0:
                return None, frames
            return self.refined(frames, insn, op, a, b, is32, True), \
                self.refined(frames, insn, op, a, b, is32, False)
        ptr, other = (a, b) if isinstance(a, Ptr) else (b, a)
        assert isinstance(ptr, Ptr)
        zero = isinstance(other, Scalar) and other.is_const and other.value == 0
        if zero and op in (isa.BPF_JEQ, isa.BPF_JNE) and not is32:
            if ptr.kind == MAP_VALUE:  # a valid map value pointer is never NULL
                return (None, frames) if op == isa.BPF_JEQ else (frames, None)
            if ptr.kind == MAP_VALUE_OR_NULL:
                null = self.mark_null(frames, ptr.id, is_null=True)
                nonnull = self.mark_null(frames, ptr.id, is_null=False)
                return (null, nonnull) if op == isa.BPF_JEQ else (nonnull, null)
        if ptr.kind == MAP_VALUE_OR_NULL:
            raise _unsupported(f"comparison of an unchecked map value pointer at insn {pc}")
        return frames, frames

    def refined(self, frames: tuple[Frame, ...], insn: Insn, op: int, a: Scalar, b: Scalar, is32: bool,
                taken: bool) -> tuple[Frame, ...] | None:
        cond = op if taken else NEGATED.get(op)
        if cond is None:  # JSET: nothing to narrow
            return frames
        updates: dict[int, Value] = {}
        if b.is_const:
            new = refine(cond, a, b.value, is32)
            if new is None:
                return None
            updates[insn.dst] = new
        elif a.is_const and insn.code & isa.BPF_X:
            new = refine(FLIPPED[cond], b, a.value, is32)
            if new is None:
                return None
            updates[insn.src] = new
        return self.with_regs(frames, updates) if updates else frames

    @staticmethod
    def mark_null(frames: tuple[Frame, ...], ptr_id: int, *, is_null: bool) -> tuple[Frame, ...]:
        def convert(v: Value) -> Value:
            if isinstance(v, Ptr) and v.kind == MAP_VALUE_OR_NULL and v.id == ptr_id:
                return const(0) if is_null else Ptr(MAP_VALUE, v.off, map_fd=v.map_fd)
            return v

        out = []
        for f in frames:
            stack = tuple((SPILL, convert(s[1])) if s is not None and s[0] == SPILL else s for s in f.stack)
            out.append(replace(f, regs=tuple(convert(v) for v in f.regs), stack=stack))
        return tuple(out)

    def exit(self, pc: int, frames: tuple[Frame, ...]) -> list[tuple[int, tuple[Frame, ...]]]:
        if len(frames) == 1:
            self.read_reg(frames, 0)
            return []  # a raw_tp program's return value is not range-checked; root may return a pointer
        # a subprogram may leave R0 unset (clang does when no caller uses the result); only a read fails
        r0 = frames[-1].regs[0]
        if isinstance(r0, Ptr) and r0.kind == STACK:
            raise self.fail(errno.EINVAL, "cannot return stack pointer to the caller", "verifier_other")
        callee, caller = frames[-1], frames[-2]
        regs = list(caller.regs)
        regs[0] = r0
        for r in range(1, 6):
            regs[r] = None
        return [(callee.ret_pc, (*frames[:-2], replace(caller, regs=tuple(regs))))]

    # helpers

    def map_arg(self, frames: tuple[Frame, ...], regno: int, proto: HelperProto, kind: str) -> MapT:
        v = self.read_reg(frames, regno)
        if not isinstance(v, Ptr) or v.kind != MAP_PTR:
            raise self.fail(errno.EACCES, f"R{regno} type={type_name(v)} expected=map_ptr", "verifier_other")
        m = self.maps[v.map_fd]
        if (m.type == BPF_MAP_TYPE_PROG_ARRAY) != (kind == "prog_array"):
            raise self.fail(errno.EINVAL, f"cannot pass map_type {m.type} into func {proto.name}#{proto.func_id}",
                            "verifier_other")
        return m

    def helper(self, pc: int, func: int, frames: tuple[Frame, ...]) -> tuple[Frame, ...]:
        """check_helper_call: the arguments against the helper's entry, then R0 its return value, R1-R5 gone."""
        proto = HELPER_PROTOS.get(func)
        if proto is None or self.prog_type not in proto.prog_types:
            raise _unsupported(f"helper {func} in a {self.prog_type} program")
        self.helper_sites[pc] = func
        if proto.subprogs_need_jit and self.subprog_count > 1 and not self.profile.tail_calls_with_subprogs:
            # bpf_allow_tail_call_in_subprogs wants jit_requested: the interpreter cannot mix them
            raise self.fail(errno.EINVAL, "mixing of tail_calls and bpf-to-bpf calls is not supported",
                            "tail_call_with_subprogs")
        m: MapT | None = None
        sizes: dict[int, int] = {}
        strings: dict[int, bytes] = {}
        for regno, kind in enumerate(proto.args, start=1):
            if kind in ("map_ptr", "prog_array"):
                m = self.map_arg(frames, regno, proto, kind)
                if proto.writes_map and m.flags & BPF_F_RDONLY_PROG:
                    raise _unsupported(f"{proto.name} on a read-only map at insn {pc}")
            elif kind in ("map_key", "map_value"):
                assert m is not None, f"{proto.name}: {kind} before its map"
                size = m.key_size if kind == "map_key" else m.value_size
                self.check_mem_arg(frames, regno, size, write=False, pc=pc)
            elif kind == "ctx":
                ctx = self.read_reg(frames, regno)
                if not isinstance(ctx, Ptr) or ctx.kind != CTX or ctx.off:
                    raise self.fail(errno.EACCES, f"R{regno} type={type_name(ctx)} expected=ctx", "verifier_other")
            elif kind == "scalar":
                self.scalar_arg(frames, regno, pc)
            elif kind in BUFFER_ARGS:
                size = sizes[regno + 1] = self.size_arg(frames, regno + 1, pc)
                buf = self.read_reg(frames, regno)
                if size == 0 and isinstance(buf, Scalar) and (kind == "mem_or_null" or buf.is_const and buf.value == 0):
                    continue
                self.check_mem_arg(frames, regno, size, write=kind == "out_mem_or_null", pc=pc)
            elif kind == "const_str":
                strings[regno] = self.const_str_arg(frames, regno, pc)
            # const_size: checked with the buffer before it
        if proto.printf_format is not None:
            fmt_reg, len_reg = proto.printf_format
            data_len = sizes[len_reg]
            if data_len % 8 or not printf.check(strings[fmt_reg], data_len // 8):
                raise self.fail(errno.EINVAL, "Invalid format string", "verifier_other")
        ret: Value
        if proto.ret == "map_value_or_null":
            assert m is not None
            self.lookup_sites.setdefault(pc, set()).add(m.fd)
            ret = Ptr(MAP_VALUE_OR_NULL, 0, map_fd=m.fd, id=pc + 1)
        elif proto.ret == "cpu_id":
            ret = urange(0, self.nr_cpu_ids - 1)  # do_refine_retval_range [D]
        else:
            ret = srange(*proto.ret_range)
        regs: dict[int, Value] = {0: ret, 1: None, 2: None, 3: None, 4: None, 5: None}
        return self.with_regs(frames, regs)

    def scalar_arg(self, frames: tuple[Frame, ...], regno: int, pc: int) -> Scalar:
        v = self.read_reg(frames, regno)
        if not isinstance(v, Scalar):
            raise self.fail(errno.EACCES, f"R{regno} type={type_name(v)} expected=scalar", "verifier_other")
        return v

    def size_arg(self, frames: tuple[Frame, ...], regno: int, pc: int) -> int:
        v = self.scalar_arg(frames, regno, pc)
        if v.umax > 1 << 29:
            raise self.fail(errno.EACCES, f"R{regno} unbounded memory access, use 'var &= const' or "
                                          "'if (var < const)'", "verifier_other")
        return v.umax

    def const_str_arg(self, frames: tuple[Frame, ...], regno: int, pc: int) -> bytes:
        """check_reg_const_str: a NUL-terminated string in a frozen read-only map, at a constant offset."""
        v = self.read_reg(frames, regno)
        if not isinstance(v, Ptr) or v.kind != MAP_VALUE:
            raise self.fail(errno.EACCES, f"R{regno} type={type_name(v)} expected=map_value", "verifier_other")
        m = self.maps[v.map_fd]
        if m.type == BPF_MAP_TYPE_PERCPU_ARRAY and "const_str_percpu" in self.profile.messages:
            # the patched kernel refuses it before the read-only check [V/S]
            raise self.fail(errno.EACCES, self.msg("const_str_percpu", regno), "const_str_percpu")
        if not (m.flags & BPF_F_RDONLY_PROG and m.frozen):
            raise self.fail(errno.EACCES, f"R{regno} does not point to a readonly map'", "const_str_not_rdonly")
        if m.type == BPF_MAP_TYPE_PERCPU_ARRAY and "const_str_percpu_late" in self.profile.messages:
            raise self.fail(errno.EINVAL, self.msg("const_str_percpu_late"), "const_str_percpu")
        if m.type != BPF_MAP_TYPE_ARRAY:
            raise self.fail(errno.EACCES, self.msg("no_direct_value"), "no_direct_value_access")
        self.map_access(pc, regno, v, 0, 1, write=False)
        raw = m.read_bytes(v.off, m.value_size - v.off)
        end = raw.find(b"\0")
        if end < 0:
            raise self.fail(errno.EINVAL, "string is not zero-terminated", "verifier_other")
        return raw[:end]

    # -- phase 5: rewrites --------------------------------------------------------------------------------------

    def rewrite(self, addr_of: Callable[[MapRef[MapT]], int]) -> tuple[list[Insn], int, int]:
        """(runnable program, xlated instruction count, per-CPU moves inserted)."""
        insns = list(self.insns)
        n = len(insns)
        seen = set(self.seen)
        seen |= {pc + 1 for pc in self.seen if insns[pc].is_ld_imm64}
        # opt_hard_wire_dead_code_branches
        for pc in sorted(self.seen):
            insn = insns[pc]
            if not _is_cond_jump(insn):
                continue
            if pc + 1 not in seen:
                insns[pc] = Insn(isa.BPF_JMP | isa.BPF_JA, off=insn.off)
            elif pc + 1 + insn.off not in seen:
                insns[pc] = NOP
        # constants for the runnable program (positions still old)
        aux: dict[int, MapRef[MapT]] = dict(self.ldimm)
        for pc, info in aux.items():
            value = addr_of(info)
            insns[pc] = Insn(isa.LD_IMM64, insns[pc].dst, 0, 0, _s32(value & U32))
            insns[pc + 1] = Insn(0, 0, 0, 0, _s32(value >> 32))
        # opt_remove_dead_code, then opt_remove_nops
        insns, pos = rebuild(insns, set(range(n)) - seen)
        self.positions = pos
        aux = {pos[pc]: info for pc, info in aux.items() if pc in seen}
        helpers = {pos[pc]: f for pc, f in self.helper_sites.items()}
        lookups = {pos[pc]: fds for pc, fds in self.lookup_sites.items()}
        nops = {i for i, insn in enumerate(insns) if insn == NOP}
        if nops:
            insns, pos = rebuild(insns, nops)
            self.positions = [pos[p] for p in self.positions]
            aux = {pos[pc]: info for pc, info in aux.items()}
            helpers = {pos[pc]: f for pc, f in helpers.items()}
            lookups = {pos[pc]: fds for pc, fds in lookups.items()}
        # do_misc_fixups: the per-CPU move after each per-CPU map-value load, and the JIT's inlined helpers
        moves = {pc + 1: isa.mov64_percpu_reg(insns[pc].dst, insns[pc].dst)
                 for pc, info in aux.items()
                 if info.kind == "value" and info.map.type == BPF_MAP_TYPE_PERCPU_ARRAY}
        if moves and not self.profile.jit_enabled:
            # the rewrite marks the program jit_required; bpf_fixup_call_args then refuses it [V: 7.3.4]
            raise self.fail(errno.EINVAL, "program requires BPF JIT compiler but it is not available",
                            "jit_required")
        if self.profile.percpu_rewrite and moves:
            insns, pos = rebuild(insns, insert_after=moves)
            self.positions = [pos[p] for p in self.positions]
        extra = 0
        # helpers and map lookups are inlined only for a program the JIT will compile (jit_requested)
        for pc, func in helpers.items() if self.profile.jit_enabled else ():
            proto = HELPER_PROTOS[func]
            if proto.inline_by_map_type:
                fds = lookups.get(pc, set())
                if len(fds) == 1:  # one map on every path: the kernel inlines its lookup
                    (fd,) = fds
                    extra += self.inlined_length(proto.inline_by_map_type.get(self.maps[fd].type)) - 1
            else:
                extra += self.inlined_length(proto.inline) - 1
        return insns, len(insns) + extra, len(moves) if self.profile.percpu_rewrite else 0

    def inlined_length(self, inline: Inline | None) -> int:
        """A helper call's length in the xlated program of a JITed load."""
        if inline is None or (inline.percpu_insn and not self.profile.percpu_insn_jit):
            return 1
        return inline.insns


def _s32(value: int) -> int:
    value &= U32
    return value - (1 << 32) if value & 0x80000000 else value


def verify(insns: Sequence[Insn], *, profile: VerifierProfile, map_by_fd: Callable[[int], MapT | str | None],
           addr_of: Callable[[MapRef[MapT]], int], nr_cpu_ids: int, fd_array: Sequence[int] | None = None,
           prog_type: str = "raw_tp", attach_check: Callable[[], None] | None = None) -> VerifiedProgram:
    """Check `insns` as the kernel profile's verifier would; raise VerifierError with its message.

    `attach_check` is the kernel's check_attach_btf_id (an extension's target): it runs after the CFG check,
    before the paths are explored, and raises VerifierError to refuse."""
    v: Verifier[MapT] = Verifier(insns, profile=profile, map_by_fd=map_by_fd, nr_cpu_ids=nr_cpu_ids, fd_array=fd_array,
                 prog_type=prog_type)
    v.check_structure()
    v.resolve_ldimm64()
    starts = v.check_cfg()
    v.subprog_count = len(starts)
    if attach_check is not None:
        try:
            attach_check()
        except VerifierError as e:
            raise v.fail(e.errno, e.message, e.message_class) from None
    v.do_check(starts)
    program, xlated, moves = v.rewrite(addr_of)
    v.log.append(f"processed {len(v.seen)} insns; xlated {xlated}")
    return VerifiedProgram(program, xlated if v.xlated_known else None, "\n".join(v.log), moves, v.positions)
