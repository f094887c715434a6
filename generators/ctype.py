"""The C type model: scalars, enums, arrays, structs and unions, with the layout the BPF target gives them.

Sizes, alignments and field offsets are computed here from the C rules (LP64, `char` signed on the BPF target),
never by asking clang: the compiler-conformance suite checks clang against this model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union


def round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


@dataclass(frozen=True)
class Scalar:
    kind: str  # "u8".."u64", "s8".."s64", "char", "bool"

    @property
    def size(self) -> int:
        return SCALAR_SIZES[self.kind]

    @property
    def align(self) -> int:
        return self.size

    @property
    def signed(self) -> bool:
        return self.kind.startswith("s") or self.kind == "char"

    @property
    def c_name(self) -> str:
        return SCALAR_C_NAMES[self.kind]

    def min_value(self) -> int:
        return -(1 << (8 * self.size - 1)) if self.signed else 0

    def max_value(self) -> int:
        if self.kind == "bool":
            return 1
        return (1 << (8 * self.size - 1)) - 1 if self.signed else (1 << (8 * self.size)) - 1


SCALAR_SIZES = {"u8": 1, "s8": 1, "char": 1, "bool": 1, "u16": 2, "s16": 2, "u32": 4, "s32": 4, "u64": 8, "s64": 8}
SCALAR_C_NAMES = {
    "u8": "__u8", "s8": "__s8", "char": "char", "bool": "_Bool", "u16": "__u16", "s16": "__s16",
    "u32": "__u32", "s32": "__s32", "u64": "__u64", "s64": "__s64",
}


@dataclass(frozen=True)
class Enum:
    tag: str
    values: tuple[tuple[str, int], ...]

    size = 4
    align = 4

    @property
    def signed(self) -> bool:
        # C23/GCC/clang rule for an enum whose values fit in int: unsigned int unless a value is negative.
        return any(v < 0 for _, v in self.values)

    @property
    def c_name(self) -> str:
        return f"enum {self.tag}"

    def min_value(self) -> int:
        return -(1 << 31) if self.signed else 0

    def max_value(self) -> int:
        return (1 << 31) - 1 if self.signed else (1 << 32) - 1


@dataclass(frozen=True)
class Array:
    elem: CType
    count: int

    @property
    def size(self) -> int:
        return self.elem.size * self.count

    @property
    def align(self) -> int:
        return self.elem.align


@dataclass(frozen=True)
class Field:
    name: str
    type: CType
    aligned: int | None = None  # __attribute__((aligned(N))) on the member


@dataclass(frozen=True)
class Record:
    tag: str
    kind: str  # "struct" | "union"
    fields: tuple[Field, ...]
    packed: bool = False
    aligned: int | None = None  # __attribute__((aligned(N))) on the type

    @property
    def c_name(self) -> str:
        return f"{self.kind} {self.tag}"

    def field_align(self, field: Field) -> int:
        # packed drops natural alignment; an explicit member attribute still applies.
        natural = 1 if self.packed else field.type.align
        return max(natural, field.aligned or 1)

    @property
    def align(self) -> int:
        inner = max((self.field_align(f) for f in self.fields), default=1)
        return max(inner, self.aligned or 1)

    def offsets(self) -> tuple[int, ...]:
        if self.kind == "union":
            return tuple(0 for _ in self.fields)
        out, off = [], 0
        for f in self.fields:
            off = round_up(off, self.field_align(f))
            out.append(off)
            off += f.type.size
        return tuple(out)

    @property
    def size(self) -> int:
        if self.kind == "union":
            end = max((f.type.size for f in self.fields), default=0)
        else:
            end = max((o + f.type.size for o, f in zip(self.offsets(), self.fields, strict=True)), default=0)
        return round_up(end, self.align)


CType = Union[Scalar, Enum, Array, Record]  # noqa: UP007  (a runtime alias used in isinstance-free code)
Leaf = Union[Scalar, Enum]  # noqa: UP007

Path = tuple[int | str, ...]


@dataclass(frozen=True)
class LeafSlot:
    """One scalar inside a variable: how to reach it in C, where it lives, what it is."""

    path: Path
    offset: int
    type: Leaf


def leaves(ctype: CType, base: int = 0, path: Path = ()) -> list[LeafSlot]:
    """Every scalar of a type in memory order (union members overlap: all are listed)."""
    if isinstance(ctype, Scalar | Enum):
        return [LeafSlot(path, base, ctype)]
    if isinstance(ctype, Array):
        out = []
        for i in range(ctype.count):
            out += leaves(ctype.elem, base + i * ctype.elem.size, (*path, i))
        return out
    out = []
    for off, f in zip(ctype.offsets(), ctype.fields, strict=True):
        out += leaves(f.type, base + off, (*path, f.name))
    return out


def init_slots(ctype: CType, base: int = 0, path: Path = ()) -> list[LeafSlot]:
    """The scalars an initialiser list names, in order: a union initialises its first member only."""
    if isinstance(ctype, Scalar | Enum):
        return [LeafSlot(path, base, ctype)]
    if isinstance(ctype, Array):
        out = []
        for i in range(ctype.count):
            out += init_slots(ctype.elem, base + i * ctype.elem.size, (*path, i))
        return out
    out = []
    for off, f in zip(ctype.offsets(), ctype.fields, strict=True):
        out += init_slots(f.type, base + off, (*path, f.name))
        if ctype.kind == "union":
            break
    return out


def leaf_count(ctype: CType) -> int:
    if isinstance(ctype, Scalar | Enum):
        return 1
    if isinstance(ctype, Array):
        return ctype.count * leaf_count(ctype.elem)
    return sum(leaf_count(f.type) for f in ctype.fields)


def resolve(ctype: CType, path: Path) -> LeafSlot:
    """The leaf a path names, without enumerating every leaf (arrays can be 4096 long)."""
    off, cur = 0, ctype
    for step in path:
        if isinstance(cur, Array):
            assert isinstance(step, int) and 0 <= step < cur.count, (step, cur)
            off += step * cur.elem.size
            cur = cur.elem
        elif isinstance(cur, Record):
            if not isinstance(step, str):
                raise ValueError(f"path {path} indexes a record with {step!r}")
            idx = [f.name for f in cur.fields].index(step)
            off += cur.offsets()[idx]
            cur = cur.fields[idx].type
        else:
            raise ValueError(f"path {path} goes past a scalar")
    if not isinstance(cur, Scalar | Enum):
        raise ValueError(f"path {path} ends at an aggregate")
    return LeafSlot(path, off, cur)


def named_types(ctype: CType) -> list[Enum | Record]:
    """Every enum and record a type mentions, dependencies first (declaration order for C)."""
    out: list[Enum | Record] = []

    def visit(t: CType) -> None:
        if isinstance(t, Array):
            visit(t.elem)
        elif isinstance(t, Record):
            for f in t.fields:
                visit(f.type)
            if t not in out:
                out.append(t)
        elif isinstance(t, Enum) and t not in out:
            out.append(t)

    visit(ctype)
    return out


def wrap(value: int, leaf: Leaf) -> int:
    """C conversion of an integer to a leaf type (modular; `_Bool` tests non-zero)."""
    if isinstance(leaf, Scalar) and leaf.kind == "bool":
        return int(value != 0)
    bits = 8 * leaf.size
    value &= (1 << bits) - 1
    if leaf.signed and value >> (bits - 1):
        value -= 1 << bits
    return value


def encode(value: int, leaf: Leaf) -> bytes:
    return (value & ((1 << (8 * leaf.size)) - 1)).to_bytes(leaf.size, "little")


def decode(data: bytes, leaf: Leaf) -> int:
    return wrap(int.from_bytes(data, "little"), leaf)
