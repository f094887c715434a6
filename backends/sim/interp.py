"""An eBPF interpreter with the kernel's instruction semantics, over a flat, region-mapped address space.

Each instruction is predecoded into a small closure that performs it and returns the next pc, so the run
loop is a single indexed call per step. Control transfers that leave the loop (the final exit, a tail call)
are signalled with private exceptions, which cost nothing on the normal path.

What the interpreter deliberately does not do: relocate ld_imm64 pseudo sources (a loader must have turned
them into plain constants), verify programs, or implement kfuncs, LD_ABS/LD_IND, may_goto and the
load-acquire/store-release atomics. Anything it cannot execute faults when (and only when) it is reached.
"""

from __future__ import annotations

import operator
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from toolchain import insn as isa
from toolchain.insn import Insn

U64 = (1 << 64) - 1
U32 = (1 << 32) - 1
STACK_SIZE = 512
STACK_BASE = 0xFFFF_C000_0000_0000
STACK_STRIDE = 0x1000
MAX_CALL_FRAMES = 8
MAX_TAIL_CALLS = 33
# Written to r1-r5 after a helper call: the verifier forbids reading them, so a program that does is wrong,
# and this value makes it go wrong the same way every time (it is also an unmapped address).
POISON = 0xBAD0_BAD1_BAD2_BAD3

_SIZE_MASK = {1: 0xFF, 2: 0xFFFF, 4: U32, 8: U64}


class BpfFault(Exception):
    """The program did something the kernel would not allow at run time (or that this model cannot do)."""

    def __init__(self, message: str, pc: int | None = None) -> None:
        super().__init__(message if pc is None else f"pc {pc}: {message}")
        self.message = message
        self.pc = pc


@dataclass
class TailCall:
    """Returned by a helper to replace the running program (bpf_tail_call succeeded)."""

    program: Sequence[Insn]


class _Region:
    __slots__ = ("base", "end", "size", "buf", "writable", "name")

    def __init__(self, base: int, buf: bytearray, writable: bool, name: str) -> None:
        self.base, self.size, self.end = base, len(buf), base + len(buf)
        self.buf, self.writable, self.name = buf, writable, name


# Matches no address, so the lookup cache needs no None check.
_NO_REGION = _Region(-1, bytearray(), False, "<none>")


class Memory:
    """A 64-bit address space of non-overlapping regions, each backed by a bytearray (never resized)."""

    def __init__(self) -> None:
        self._regions: list[_Region] = []
        self._bases: list[int] = []
        self._last = _NO_REGION

    def map(self, base: int, buf: bytearray, *, writable: bool = True, name: str) -> None:
        if not buf or base < 0 or base + len(buf) > U64 + 1:
            raise ValueError(f"cannot map {len(buf)} bytes at {base:#x} ({name})")
        i = bisect_right(self._bases, base)
        for r in self._regions[max(i - 1, 0):i + 1]:
            if r.base < base + len(buf) and base < r.end:
                raise ValueError(f"region {name!r} at {base:#x} overlaps {r.name!r} at {r.base:#x}")
        self._regions.insert(i, _Region(base, buf, writable, name))
        self._bases.insert(i, base)

    def unmap(self, base: int) -> None:
        i = bisect_right(self._bases, base) - 1
        if i < 0 or self._bases[i] != base:
            raise ValueError(f"no region mapped at {base:#x}")
        del self._regions[i], self._bases[i]
        self._last = _NO_REGION

    def regions(self) -> list[tuple[int, int, str]]:
        return [(r.base, r.size, r.name) for r in self._regions]

    def _find(self, addr: int, size: int, what: str) -> _Region:
        i = bisect_right(self._bases, addr) - 1
        if i >= 0:
            r = self._regions[i]
            if addr + size <= r.end:
                self._last = r
                return r
        raise BpfFault(f"{what} of {size} bytes at {addr:#x}: {self._describe(addr, size)}")

    def _describe(self, addr: int, size: int) -> str:
        if not self._regions:
            return "nothing is mapped"
        near = min(self._regions, key=lambda r: max(r.base - addr, addr - r.end + 1, 0))
        where = f"region {near.name!r} [{near.base:#x}, {near.end:#x})"
        if near.base <= addr < near.end:
            return f"straddles the end of {where}"
        return f"unmapped address (nearest is {where})"

    def read(self, addr: int, size: int) -> int:
        r = self._last
        off = addr - r.base
        if off < 0 or off + size > r.size:
            r = self._find(addr, size, "read")
            off = addr - r.base
        return int.from_bytes(r.buf[off:off + size], "little")

    def write(self, addr: int, size: int, value: int) -> None:
        r = self._last
        off = addr - r.base
        if off < 0 or off + size > r.size:
            r = self._find(addr, size, "write")
            off = addr - r.base
        if not r.writable:
            raise BpfFault(f"write of {size} bytes at {addr:#x}: region {r.name!r} is read-only")
        r.buf[off:off + size] = (value & _SIZE_MASK[size]).to_bytes(size, "little")

    def read_bytes(self, addr: int, n: int) -> bytes:
        if n <= 0:
            return b""
        r = self._find(addr, n, "read")
        off = addr - r.base
        return bytes(r.buf[off:off + n])


class Machine:
    """What a helper callable sees: it reads r1-r5 from `regs` and memory, and returns r0."""

    __slots__ = ("regs", "memory", "cpu", "percpu_offset", "pc", "tail_calls", "frames", "stacks")

    def __init__(self, memory: Memory, cpu: int, percpu_offset: int) -> None:
        self.regs = [0] * 11
        self.memory, self.cpu, self.percpu_offset = memory, cpu, percpu_offset
        self.pc = 0
        self.tail_calls = 0
        # One (return pc, r6, r7, r8, r9, r10) per active bpf-to-bpf call.
        self.frames: list[tuple[int, ...]] = []
        # Stack buffers of the frames mapped so far; deeper ones are mapped on the first call that needs them.
        self.stacks: list[bytearray] = []

    def _push_stack(self) -> None:
        buf = bytearray(STACK_SIZE)
        frame = len(self.stacks)
        self.memory.map(STACK_BASE + frame * STACK_STRIDE, buf, name=f"stack{frame}")
        self.stacks.append(buf)

    @property
    def depth(self) -> int:
        return len(self.frames)


class _Halt(Exception):
    pass


class _Restart(Exception):
    def __init__(self, program: Sequence[Insn]) -> None:
        self.program = program


Op = Callable[[], int]


def _fault(message: str) -> Op:
    def op() -> int:
        raise BpfFault(message)
    return op


def _sx(value: int, bits: int) -> int:
    sign = 1 << (bits - 1)
    return ((value & ((sign << 1) - 1)) ^ sign) - sign


def _bswap(value: int, nbytes: int) -> int:
    return int.from_bytes((value & _SIZE_MASK[nbytes]).to_bytes(nbytes, "little"), "big")


def _sdiv(bits: int) -> Callable[[int, int], int]:
    def fn(a: int, b: int) -> int:
        sa, sb = _sx(a, bits), _sx(b, bits)
        if sb == 0:
            return 0
        q = abs(sa) // abs(sb)  # C truncates toward zero; INT_MIN / -1 wraps back to INT_MIN via the mask
        return q if (sa < 0) == (sb < 0) else -q
    return fn


def _smod(bits: int) -> Callable[[int, int], int]:
    def fn(a: int, b: int) -> int:
        sa, sb = _sx(a, bits), _sx(b, bits)
        if sb == 0:
            return a
        m = abs(sa) % abs(sb)  # the remainder takes the dividend's sign
        return -m if sa < 0 else m
    return fn


# ALU ops whose low `width` result bits depend only on the operands' low bits: computed unmasked, then masked.
_PLAIN_ALU = {
    isa.BPF_ADD: operator.add, isa.BPF_SUB: operator.sub, isa.BPF_MUL: operator.mul,
    isa.BPF_OR: operator.or_, isa.BPF_AND: operator.and_, isa.BPF_XOR: operator.xor,
}
_JMP_OPS = {
    isa.BPF_JEQ: operator.eq, isa.BPF_JNE: operator.ne, isa.BPF_JSET: operator.and_,
    isa.BPF_JGT: operator.gt, isa.BPF_JGE: operator.ge, isa.BPF_JLT: operator.lt, isa.BPF_JLE: operator.le,
    isa.BPF_JSGT: operator.gt, isa.BPF_JSGE: operator.ge,
    isa.BPF_JSLT: operator.lt, isa.BPF_JSLE: operator.le,
}
_SIGNED_JMPS = {isa.BPF_JSGT, isa.BPF_JSGE, isa.BPF_JSLT, isa.BPF_JSLE}
_ATOMIC_OPS = {isa.BPF_ADD: operator.add, isa.BPF_OR: operator.or_, isa.BPF_AND: operator.and_,
               isa.BPF_XOR: operator.xor}


class _Compiler:
    """Turns a program into closures over one run's registers, memory and machine state."""

    def __init__(self, machine: Machine, helpers: Mapping[int, Callable[[Machine], int | TailCall]]) -> None:
        self.m = machine
        self.helpers = helpers

    def compile(self, program: Sequence[Insn]) -> list[Op]:
        n = len(program)
        ops = [self._insn(program, pc, n) for pc in range(n)]
        ops.append(_fault("fell off the end of the program"))
        return ops

    def _insn(self, program: Sequence[Insn], pc: int, n: int) -> Op:
        insn = program[pc]
        if insn.dst > 10 or insn.src > 10:
            return _fault(f"invalid register in {insn}")
        cls = insn.code & 7
        if cls in (isa.BPF_ALU64, isa.BPF_ALU):
            if insn.dst == 10:
                return _fault("r10 is read-only")
            return self._alu(insn, cls == isa.BPF_ALU64, pc + 1)
        if cls in (isa.BPF_JMP, isa.BPF_JMP32):
            return self._jmp(insn, cls == isa.BPF_JMP32, pc, n)
        if cls in (isa.BPF_LDX, isa.BPF_ST, isa.BPF_STX):
            return self._mem(insn, pc + 1)
        if insn.code == isa.LD_IMM64:
            if pc + 1 >= n or program[pc + 1].code != 0:
                return _fault("truncated ld_imm64")
            if insn.src != 0:
                return _fault(f"ld_imm64 with pseudo source {insn.src} (imm {insn.imm}) was not relocated")
            if insn.dst == 10:
                return _fault("r10 is read-only")
            return self._const(insn.dst, (insn.imm & U32) | (program[pc + 1].imm & U32) << 32, pc + 2)
        if insn.code == 0 and pc > 0 and program[pc - 1].code == isa.LD_IMM64:
            return _fault("jump into the second slot of an ld_imm64")
        return _fault(f"unsupported opcode {insn.code:#04x}")

    def _const(self, d: int, value: int, nxt: int) -> Op:
        r = self.m.regs

        def op() -> int:
            r[d] = value
            return nxt
        return op

    def _alu(self, insn: Insn, is64: bool, nxt: int) -> Op:
        r = self.m.regs
        d, s, off = insn.dst, insn.src, insn.off
        code = insn.code & 0xF0
        use_x = bool(insn.code & isa.BPF_X)
        bits = 64 if is64 else 32
        mask = U64 if is64 else U32
        k = insn.imm & mask  # ALU64 sign-extends imm to 64 bits; ALU uses its low 32

        if code == isa.BPF_MOV:
            if not use_x:
                return self._const(d, k, nxt) if off == 0 else _fault(f"MOV K with off {off}")
            if off == isa.BPF_ADDR_PERCPU and is64:
                pcpu = self.m.percpu_offset

                def mov_percpu() -> int:
                    r[d] = (r[s] + pcpu) & U64
                    return nxt
                return mov_percpu
            if off in (8, 16, 32):
                sign = 1 << (off - 1)
                low = (sign << 1) - 1

                def movsx() -> int:
                    r[d] = (((r[s] & low) ^ sign) - sign) & mask
                    return nxt
                return movsx
            if off != 0:
                return _fault(f"MOV X with off {off}")

            def mov() -> int:
                r[d] = r[s] & mask
                return nxt
            return mov
        if code == isa.BPF_END:
            return self._end(insn, is64, nxt)
        if code == isa.BPF_NEG:
            def neg() -> int:
                r[d] = -r[d] & mask
                return nxt
            return neg

        fn: Callable[[int, int], int]
        plain = _PLAIN_ALU.get(code)
        if plain is not None and off == 0:
            fn = plain
            if use_x:
                def alu_x() -> int:
                    r[d] = fn(r[d], r[s]) & mask
                    return nxt
                return alu_x

            def alu_k() -> int:
                r[d] = fn(r[d], k) & mask
                return nxt
            return alu_k
        sh = bits - 1
        if code == isa.BPF_LSH and off == 0:
            fn = lambda a, b: a << (b & sh)  # noqa: E731
        elif code == isa.BPF_RSH and off == 0:
            fn = lambda a, b: a >> (b & sh)  # noqa: E731
        elif code == isa.BPF_ARSH and off == 0:
            fn = lambda a, b: _sx(a, bits) >> (b & sh)  # noqa: E731
        elif code == isa.BPF_DIV and off in (0, 1):
            fn = _sdiv(bits) if off else (lambda a, b: a // b if b else 0)
        elif code == isa.BPF_MOD and off in (0, 1):
            fn = _smod(bits) if off else (lambda a, b: a % b if b else a)
        else:
            return _fault(f"unsupported ALU opcode {insn.code:#04x} with off {off}")
        if use_x:
            def binop_x() -> int:
                r[d] = fn(r[d] & mask, r[s] & mask) & mask
                return nxt
            return binop_x

        def binop_k() -> int:
            r[d] = fn(r[d] & mask, k) & mask
            return nxt
        return binop_k

    def _end(self, insn: Insn, is64: bool, nxt: int) -> Op:
        r = self.m.regs
        d, width = insn.dst, insn.imm
        if width not in (16, 32, 64):
            return _fault(f"byte swap of {width} bits")
        nbytes, low = width // 8, (1 << width) - 1
        # ALU64 END is an unconditional swap; ALU TO_BE swaps on this little-endian model, TO_LE truncates.
        if is64 or insn.code & isa.BPF_TO_BE:
            def swap() -> int:
                r[d] = _bswap(r[d], nbytes)
                return nxt
            return swap

        def to_le() -> int:
            r[d] &= low
            return nxt
        return to_le

    def _mem(self, insn: Insn, nxt: int) -> Op:
        r, mem = self.m.regs, self.m.memory
        read, write = mem.read, mem.write
        d, s, off = insn.dst, insn.src, insn.off
        cls, mode = insn.code & 7, insn.code & 0xE0
        size = isa.SIZE_BYTES[insn.code & 0x18]
        if cls == isa.BPF_LDX:
            if d == 10:
                return _fault("r10 is read-only")
            if mode == isa.BPF_MEM:
                def ldx() -> int:
                    r[d] = read((r[s] + off) & U64, size)
                    return nxt
                return ldx
            if mode == isa.BPF_MEMSX and size != 8:
                sign = 1 << (size * 8 - 1)

                def ldxsx() -> int:
                    r[d] = ((read((r[s] + off) & U64, size) ^ sign) - sign) & U64
                    return nxt
                return ldxsx
        elif cls == isa.BPF_ST and mode == isa.BPF_MEM:
            k = insn.imm & U64

            def st() -> int:
                write((r[d] + off) & U64, size, k)
                return nxt
            return st
        elif cls == isa.BPF_STX and mode == isa.BPF_MEM:
            def stx() -> int:
                write((r[d] + off) & U64, size, r[s])
                return nxt
            return stx
        elif cls == isa.BPF_STX and mode == isa.BPF_ATOMIC and insn.code & 0x18 in (isa.BPF_W, isa.BPF_DW):
            return self._atomic(insn, size, nxt)
        return _fault(f"unsupported memory opcode {insn.code:#04x}")

    def _atomic(self, insn: Insn, size: int, nxt: int) -> Op:
        r, mem = self.m.regs, self.m.memory
        read, write = mem.read, mem.write
        d, s, off, aop = insn.dst, insn.src, insn.off, insn.imm
        mask = _SIZE_MASK[size]
        if aop == isa.BPF_CMPXCHG:
            def cmpxchg() -> int:
                addr = (r[d] + off) & U64
                old = read(addr, size)
                if old == r[0] & mask:
                    write(addr, size, r[s])
                r[0] = old
                return nxt
            return cmpxchg
        if aop != isa.BPF_XCHG and (aop & ~isa.BPF_FETCH) not in _ATOMIC_OPS:
            return _fault(f"unsupported atomic operation {aop:#x}")
        if aop & isa.BPF_FETCH and s == 10:
            return _fault("r10 is read-only")
        fn = _ATOMIC_OPS.get(aop & ~isa.BPF_FETCH, lambda _old, new: new)
        fetch = bool(aop & isa.BPF_FETCH)

        def atomic() -> int:
            addr = (r[d] + off) & U64
            old = read(addr, size)
            write(addr, size, fn(old, r[s]))
            if fetch:
                r[s] = old
            return nxt
        return atomic

    def _jmp(self, insn: Insn, is32: bool, pc: int, n: int) -> Op:
        code = insn.code & 0xF0
        if code == isa.BPF_CALL and not is32:
            return self._call(insn, pc, n)
        if code == isa.BPF_EXIT and not is32:
            return self._exit()
        cmp = _JMP_OPS.get(code)
        if cmp is None and code != isa.BPF_JA:
            return _fault(f"unsupported jump opcode {insn.code:#04x}")
        target = pc + 1 + (insn.imm if is32 and code == isa.BPF_JA else insn.off)
        if not 0 <= target < n:
            return _fault(f"jump target {target} outside the program (0..{n - 1})")
        if cmp is None:
            return lambda: target
        r, d, s, nxt = self.m.regs, insn.dst, insn.src, pc + 1
        mask = U32 if is32 else U64
        # Flipping the sign bit maps signed order onto unsigned order, so one comparison serves both.
        flip = (1 << (31 if is32 else 63)) if code in _SIGNED_JMPS else 0
        if insn.code & isa.BPF_X:
            def jmp_x() -> int:
                return target if cmp((r[d] & mask) ^ flip, (r[s] & mask) ^ flip) else nxt
            return jmp_x
        k = (insn.imm & mask) ^ flip

        def jmp_k() -> int:
            return target if cmp((r[d] & mask) ^ flip, k) else nxt
        return jmp_k

    def _call(self, insn: Insn, pc: int, n: int) -> Op:
        m, r, nxt = self.m, self.m.regs, pc + 1
        frames, stacks = m.frames, m.stacks
        if insn.src == isa.BPF_PSEUDO_CALL:
            target = pc + 1 + insn.imm
            if not 0 <= target < n:
                return _fault(f"call target {target} outside the program (0..{n - 1})")

            def call() -> int:
                depth = len(frames) + 1
                if depth >= MAX_CALL_FRAMES:
                    raise BpfFault(f"call depth exceeds {MAX_CALL_FRAMES} frames")
                if depth == len(stacks):
                    m._push_stack()
                frames.append((nxt, r[6], r[7], r[8], r[9], r[10]))
                r[10] = _stack_top(depth)
                return target
            return call
        if insn.src == isa.BPF_PSEUDO_KFUNC_CALL:
            return _fault(f"kfunc call (btf id {insn.imm}) unsupported")
        if insn.src != 0:
            return _fault(f"call with src {insn.src}")
        helper = self.helpers.get(insn.imm)
        if helper is None:
            return _fault(f"unknown helper {insn.imm}")
        helper_id = insn.imm

        def call_helper() -> int:
            m.pc = pc
            ctx = r[1]
            ret = helper(m)
            if isinstance(ret, TailCall):
                if frames:
                    raise BpfFault("tail call from subprogram unsupported")
                if m.tail_calls >= MAX_TAIL_CALLS:
                    raise BpfFault(f"helper {helper_id} tail-called past the limit of {MAX_TAIL_CALLS}")
                m.tail_calls += 1
                r[1] = ctx
                raise _Restart(ret.program)
            if not isinstance(ret, int):
                raise BpfFault(f"helper {helper_id} returned {type(ret).__name__}, not an int")
            r[0] = ret & U64
            r[1] = r[2] = r[3] = r[4] = r[5] = POISON
            return nxt
        return call_helper

    def _exit(self) -> Op:
        r, frames = self.m.regs, self.m.frames

        def exit_() -> int:
            if not frames:
                raise _Halt
            ret, r[6], r[7], r[8], r[9], r[10] = frames.pop()
            return ret
        return exit_


def link_program(program: Sequence[Insn], replacements: Mapping[int, Sequence[Insn]]) -> list[Insn]:
    """`program` with freplace links applied: every bpf-to-bpf call to the start of a replaced function goes to
    its replacement instead, appended whole after the program.

    A replacement is a complete program (its own subprograms, its map addresses resolved), so it runs like any
    callee: a frame and stack of its own, r1-r5 as the caller left them, r0 back to the caller. Done once per
    link rather than per call, so the interpreter's normal path is untouched. Replacing the entry function
    (start 0) puts a `call; exit` in front, which shifts nothing the program's relative jumps see.
    """
    if not replacements:
        return list(program)
    head = [Insn(isa.BPF_JMP | isa.BPF_CALL, src=isa.BPF_PSEUDO_CALL), isa.exit_insn()] if 0 in replacements else []
    shift = len(head)
    out = [*head, *program]
    starts: dict[int, int] = {}
    for start, code in sorted(replacements.items()):
        starts[start] = len(out)
        out += code
    for pc in range(len(program)):
        insn = program[pc]
        target = pc + 1 + insn.imm
        if insn.is_pseudo_call and target in starts:
            out[shift + pc] = replace(insn, imm=starts[target] - (shift + pc) - 1)
    if head:
        out[0] = replace(head[0], imm=starts[0] - 1)
    return out


def _stack_top(frame: int) -> int:
    return STACK_BASE + frame * STACK_STRIDE + STACK_SIZE


def run(program: Sequence[Insn], *, memory: Memory, cpu: int, percpu_offset: int,
        helpers: Mapping[int, Callable[[Machine], int | TailCall]], r1: int = 0,
        max_steps: int = 1_000_000) -> int:
    """Run `program` from insn 0 with r1 = `r1` on CPU `cpu`; return r0 as an unsigned 64-bit value.

    Registers other than r1 and r10 start at 0. A tail call restarts the same way, keeping r1.
    """
    m = Machine(memory, cpu, percpu_offset)
    r = m.regs
    compiler = _Compiler(m, helpers)
    code = compiler.compile(program)
    m._push_stack()
    r[1], r[10] = r1 & U64, _stack_top(0)
    remaining, pc = max_steps, 0
    try:
        while True:
            step = -1
            try:
                for step in range(remaining):  # noqa: B007 - the handlers read it
                    pc = code[pc]()
            except _Halt:
                return r[0]
            except _Restart as restart:
                remaining -= step + 1
                code = compiler.compile(restart.program)
                ctx = r[1]
                r[:] = [0] * 11
                r[1], r[10] = ctx, _stack_top(0)
                m.stacks[0][:] = bytes(STACK_SIZE)
                pc = 0
                continue
            raise BpfFault(f"step budget of {max_steps} instructions exhausted")
    except BpfFault as fault:
        if fault.pc is None:
            raise BpfFault(fault.message, pc) from fault
        raise
    finally:
        for i in range(len(m.stacks)):
            memory.unmap(STACK_BASE + i * STACK_STRIDE)
