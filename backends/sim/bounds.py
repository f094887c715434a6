"""The simulated verifier's abstract values: a scalar's unsigned and signed 64-bit bounds, a pointer's kind and
constant offset, and the rules that move them: ALU operations on bounds, whether a branch is decided, and what
a taken branch tells about its register. Pure functions of values, with no state of a program or of a map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from toolchain import insn as isa

U64 = (1 << 64) - 1
U32 = (1 << 32) - 1
S64_MIN, S64_MAX = -(1 << 63), (1 << 63) - 1


# -- abstract values --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scalar:
    umin: int
    umax: int
    smin: int
    smax: int

    @property
    def is_const(self) -> bool:
        return self.umin == self.umax

    @property
    def value(self) -> int:
        return self.umin

    def __str__(self) -> str:
        if self.is_const:
            return f"scalar({self.umin:#x})"
        return f"scalar(u[{self.umin:#x},{self.umax:#x}] s[{self.smin},{self.smax}])"


def as_signed(v: int) -> int:
    return v - (1 << 64) if v >> 63 else v


def const(v: int) -> Scalar:
    v &= U64
    return Scalar(v, v, as_signed(v), as_signed(v))


def _make(umin: int, umax: int, smin: int, smax: int) -> Scalar | None:
    """Bounds tightened against each other, or None when they are contradictory (an impossible branch)."""
    if smin >= 0:
        umin, umax = max(umin, smin), min(umax, smax)
    elif smax < 0:
        umin, umax = max(umin, smin + (1 << 64)), min(umax, smax + (1 << 64))
    if umax <= S64_MAX:
        smin, smax = max(smin, umin), min(smax, umax)
    elif umin > S64_MAX:
        smin, smax = max(smin, umin - (1 << 64)), min(smax, umax - (1 << 64))
    if umin > umax or smin > smax:
        return None
    return Scalar(umin, umax, smin, smax)


def urange(lo: int, hi: int) -> Scalar:
    s = _make(lo, hi, S64_MIN, S64_MAX)
    assert s is not None
    return s


def srange(lo: int, hi: int) -> Scalar:
    s = _make(0, U64, lo, hi)
    assert s is not None
    return s


UNKNOWN = Scalar(0, U64, S64_MIN, S64_MAX)
UNKNOWN32 = urange(0, U32)


def unknown_of_size(size: int) -> Scalar:
    return UNKNOWN if size == 8 else urange(0, (1 << (8 * size)) - 1)


CTX, STACK, MAP_VALUE, MAP_VALUE_OR_NULL, MAP_PTR = "ctx", "fp", "map_value", "map_value_or_null", "map_ptr"


@dataclass(frozen=True, slots=True)
class Ptr:
    kind: str
    off: int = 0
    map_fd: int = -1
    frame: int = 0  # the frame whose stack a STACK pointer points into
    id: int = 0  # ties copies of one maybe-null pointer together for the null check

    def __str__(self) -> str:
        return f"{self.kind}(off={self.off})"


Value = Union[Scalar, Ptr, None]  # noqa: UP007 - None is "not initialised"


def type_name(v: Value) -> str:
    if v is None:
        return "?"
    return "scalar" if isinstance(v, Scalar) else v.kind


# -- scalar arithmetic ------------------------------------------------------------------------------------


def low32(a: Scalar) -> Scalar:
    """The value's low 32 bits, zero-extended."""
    if a.umin >> 32 == a.umax >> 32:
        return urange(a.umin & U32, a.umax & U32)
    return UNKNOWN32


def _s32_bounds(a: Scalar) -> tuple[int, int]:
    lo, hi = a.umin & U32, a.umax & U32
    if a.umin >> 32 != a.umax >> 32:
        lo, hi = 0, U32
    if hi < 1 << 31:
        bounds = (lo, hi)
    elif lo >= 1 << 31:
        bounds = (lo - (1 << 32), hi - (1 << 32))
    else:
        bounds = (-(1 << 31), (1 << 31) - 1)
    if a.smin >= -(1 << 31) and a.smax < 1 << 31:  # a sign-extended 32-bit value: its low half is itself
        bounds = (max(bounds[0], a.smin), min(bounds[1], a.smax))
    return bounds


def _eval(op: int, a: int, b: int, bits: int, off: int) -> int:
    """Exact value of a constant ALU operation (the interpreter's semantics)."""
    mask = U64 if bits == 64 else U32
    a, b = a & mask, b & mask
    sh = bits - 1

    def sx(v: int) -> int:
        return v - (1 << bits) if v >> (bits - 1) else v

    if op == isa.BPF_ADD:
        r = a + b
    elif op == isa.BPF_SUB:
        r = a - b
    elif op == isa.BPF_MUL:
        r = a * b
    elif op == isa.BPF_OR:
        r = a | b
    elif op == isa.BPF_AND:
        r = a & b
    elif op == isa.BPF_XOR:
        r = a ^ b
    elif op == isa.BPF_LSH:
        r = a << (b & sh)
    elif op == isa.BPF_RSH:
        r = a >> (b & sh)
    elif op == isa.BPF_ARSH:
        r = sx(a) >> (b & sh)
    elif op == isa.BPF_DIV and off == 0:
        r = a // b if b else 0
    elif op == isa.BPF_MOD and off == 0:
        r = a % b if b else a
    elif op == isa.BPF_DIV:
        sa, sb = sx(a), sx(b)
        r = 0 if sb == 0 else (abs(sa) // abs(sb)) * (1 if (sa < 0) == (sb < 0) else -1)
    elif op == isa.BPF_MOD:
        sa, sb = sx(a), sx(b)
        r = a if sb == 0 else (abs(sa) % abs(sb)) * (-1 if sa < 0 else 1)
    else:
        raise AssertionError(op)
    return r & mask


def scalar_alu(op: int, a: Scalar, b: Scalar, bits: int, off: int = 0) -> Scalar:
    mask = U64 if bits == 64 else U32
    full = UNKNOWN if bits == 64 else UNKNOWN32
    if bits == 32:
        a, b = low32(a), low32(b)
    if a.is_const and b.is_const:
        return const(_eval(op, a.value, b.value, bits, off))
    if off:  # signed division: bounds not modelled
        return full
    if op == isa.BPF_ADD:
        hi = a.umax + b.umax
        return urange(a.umin + b.umin, hi) if hi <= mask else full
    if op == isa.BPF_SUB:
        lo = a.umin - b.umax
        return urange(lo, a.umax - b.umin) if lo >= 0 else full
    if op == isa.BPF_MUL:
        hi = a.umax * b.umax
        return urange(a.umin * b.umin, hi) if hi <= mask else full
    if op == isa.BPF_AND:
        return urange(0, min(a.umax, b.umax))
    if op in (isa.BPF_OR, isa.BPF_XOR):
        hi = (1 << max(a.umax, b.umax).bit_length()) - 1
        return urange(max(a.umin, b.umin) if op == isa.BPF_OR else 0, hi)
    if op == isa.BPF_DIV:
        if b.is_const and b.value:
            return urange(a.umin // b.value, a.umax // b.value)
        return urange(0, a.umax)
    if op == isa.BPF_MOD:
        if b.is_const and b.value:
            return urange(0, min(a.umax, b.value - 1))
        return urange(0, a.umax)
    if b.is_const and b.value < bits:
        k = b.value
        if op == isa.BPF_LSH:
            hi = a.umax << k
            return urange(a.umin << k, hi) if hi <= mask else full
        if op == isa.BPF_RSH:
            return urange(a.umin >> k, a.umax >> k)
        if op == isa.BPF_ARSH:
            if bits == 64:
                return srange(a.smin >> k, a.smax >> k)
            lo, hi = _s32_bounds(a)
            lo, hi = lo >> k, hi >> k
            return urange(lo, hi) if lo >= 0 else (urange(lo & U32, hi & U32) if hi < 0 else full)
    return full


# -- branch decisions ---------------------------------------------------------------------------------------

FLIPPED = {isa.BPF_JEQ: isa.BPF_JEQ, isa.BPF_JNE: isa.BPF_JNE, isa.BPF_JSET: isa.BPF_JSET,
         isa.BPF_JGT: isa.BPF_JLT, isa.BPF_JLT: isa.BPF_JGT, isa.BPF_JGE: isa.BPF_JLE, isa.BPF_JLE: isa.BPF_JGE,
         isa.BPF_JSGT: isa.BPF_JSLT, isa.BPF_JSLT: isa.BPF_JSGT, isa.BPF_JSGE: isa.BPF_JSLE,
         isa.BPF_JSLE: isa.BPF_JSGE}
NEGATED = {isa.BPF_JEQ: isa.BPF_JNE, isa.BPF_JNE: isa.BPF_JEQ, isa.BPF_JGT: isa.BPF_JLE,
           isa.BPF_JLE: isa.BPF_JGT, isa.BPF_JGE: isa.BPF_JLT, isa.BPF_JLT: isa.BPF_JGE,
           isa.BPF_JSGT: isa.BPF_JSLE, isa.BPF_JSLE: isa.BPF_JSGT, isa.BPF_JSGE: isa.BPF_JSLT,
           isa.BPF_JSLT: isa.BPF_JSGE}
_SIGNED = {isa.BPF_JSGT, isa.BPF_JSGE, isa.BPF_JSLT, isa.BPF_JSLE}


def _view(a: Scalar, is32: bool) -> tuple[int, int, int, int]:
    if not is32:
        return a.umin, a.umax, a.smin, a.smax
    low = low32(a)
    return (low.umin, low.umax, *_s32_bounds(a))


def branch_taken(op: int, a: Scalar, b: Scalar, is32: bool) -> int:
    """1 when `a op b` always holds, 0 when it never does, -1 when both are possible."""
    aumin, aumax, asmin, asmax = _view(a, is32)
    bumin, bumax, bsmin, bsmax = _view(b, is32)
    if op == isa.BPF_JSET:
        if aumin == aumax and bumin == bumax:
            return int(bool(aumin & bumin))
        return -1
    if op in (isa.BPF_JEQ, isa.BPF_JNE):
        if aumin == aumax == bumin == bumax:
            eq = 1
        elif aumax < bumin or bumax < aumin or asmax < bsmin or bsmax < asmin:
            eq = 0
        else:
            return -1
        return eq if op == isa.BPF_JEQ else 1 - eq
    lo_a, hi_a, lo_b, hi_b = (asmin, asmax, bsmin, bsmax) if op in _SIGNED else (aumin, aumax, bumin, bumax)
    if op in (isa.BPF_JGT, isa.BPF_JSGT):
        return 1 if lo_a > hi_b else 0 if hi_a <= lo_b else -1
    if op in (isa.BPF_JGE, isa.BPF_JSGE):
        return 1 if lo_a >= hi_b else 0 if hi_a < lo_b else -1
    if op in (isa.BPF_JLT, isa.BPF_JSLT):
        return 1 if hi_a < lo_b else 0 if lo_a >= hi_b else -1
    if op in (isa.BPF_JLE, isa.BPF_JSLE):
        return 1 if hi_a <= lo_b else 0 if lo_a > hi_b else -1
    return -1


def refine(op: int, a: Scalar, k: int, is32: bool) -> Scalar | None:
    """`a` narrowed by knowing `a op k` holds (k a constant); None when it cannot hold."""
    if is32:
        # Only where the 64-bit value equals its low half seen the same way does the narrowing carry over.
        if op in _SIGNED:
            if not (a.smin >= -(1 << 31) and a.smax < 1 << 31):
                return a
            k = k - (1 << 32) if k & (1 << 31) else k
        elif a.umax > U32:
            return a
    umin, umax, smin, smax = a.umin, a.umax, a.smin, a.smax
    sk = as_signed(k) if not is32 else k
    if op == isa.BPF_JEQ:
        return _make(max(umin, k & U64), min(umax, k & U64), max(smin, as_signed(k & U64)),
                     min(smax, as_signed(k & U64)))
    if op == isa.BPF_JNE:
        k &= U64
        if umin == k:
            umin += 1
        if umax == k:
            umax -= 1
        return _make(umin, umax, smin, smax)
    if op == isa.BPF_JGT:
        return _make(max(umin, k + 1), umax, smin, smax)
    if op == isa.BPF_JGE:
        return _make(max(umin, k), umax, smin, smax)
    if op == isa.BPF_JLT:
        return _make(umin, min(umax, k - 1), smin, smax)
    if op == isa.BPF_JLE:
        return _make(umin, min(umax, k), smin, smax)
    if op == isa.BPF_JSGT:
        return _make(umin, umax, max(smin, sk + 1), smax)
    if op == isa.BPF_JSGE:
        return _make(umin, umax, max(smin, sk), smax)
    if op == isa.BPF_JSLT:
        return _make(umin, umax, smin, min(smax, sk - 1))
    if op == isa.BPF_JSLE:
        return _make(umin, umax, smin, min(smax, sk))
    return a
