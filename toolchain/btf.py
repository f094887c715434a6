"""A reader and writer for BTF, the type information in a BPF object's `.BTF` section.

Layout per /usr/include/linux/btf.h: a little-endian header, then a type section of variable-length records
(type ids are positions, starting at 1; id 0 is void) and a string section of NUL-terminated names. Parsing
validates everything it touches, so malformed input raises `BtfError` and never an IndexError or struct.error.
`fixup_datasecs` repeats the DATASEC fix-up libbpf performs before load; `encode` writes the result back.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

BTF_MAGIC = 0xEB9F
BTF_VERSION = 1
_HDR = struct.Struct("<HBBIIIII")

KINDS = ("unkn", "int", "ptr", "array", "struct", "union", "enum", "fwd", "typedef", "volatile", "const",
         "restrict", "func", "func_proto", "var", "datasec", "float", "decl_tag", "type_tag", "enum64")
_KIND_NO = {k: i for i, k in enumerate(KINDS)}
# Kinds whose header word is a byte size; every other kind stores a type id there.
SIZED_KINDS = frozenset({"int", "enum", "struct", "union", "datasec", "float", "enum64"})
# Kinds that only qualify or rename another type.
MODIFIER_KINDS = frozenset({"typedef", "const", "volatile", "restrict", "type_tag"})

INT_SIGNED, INT_CHAR, INT_BOOL = 1, 2, 4
LINKAGE_STATIC, LINKAGE_GLOBAL, LINKAGE_EXTERN = 0, 1, 2
# Bounds recursion through chains of pointers/arrays/modifiers so that cyclic input fails cleanly.
_MAX_DEPTH = 256


class BtfError(ValueError):
    """Malformed or unusable BTF; the message is one line saying what is wrong and where."""


@dataclass(frozen=True)
class Member:
    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int = 0


@dataclass(frozen=True)
class EnumValue:
    name: str
    value: int


@dataclass(frozen=True)
class Param:
    name: str
    type_id: int


@dataclass(frozen=True)
class VarSecinfo:
    type_id: int
    offset: int
    size: int


@dataclass(frozen=True)
class BtfType:
    """One type record. Fields not used by `kind` keep their defaults.

    `type_id` is the referenced type of ptr/typedef/modifiers/func/var/decl_tag/type_tag, the return type of
    a func_proto and the element type of an array. `kflag` means: bitfield-encoded member offsets for
    struct/union, union for fwd, signed values for enum/enum64.
    """

    kind: str
    name: str = ""
    size: int = 0
    type_id: int = 0
    kflag: bool = False
    linkage: int = 0
    encoding: int = 0
    bits: int = 0
    bits_offset: int = 0
    index_type: int = 0
    nelems: int = 0
    component_idx: int = -1
    members: tuple[Member, ...] = ()
    enum_values: tuple[EnumValue, ...] = ()
    params: tuple[Param, ...] = ()
    var_secinfos: tuple[VarSecinfo, ...] = ()

    @property
    def vlen(self) -> int:
        if self.kind == "func":
            return self.linkage
        return len(self.members) + len(self.enum_values) + len(self.params) + len(self.var_secinfos)

    @property
    def elem_type(self) -> int:  # arrays keep their element type in type_id
        return self.type_id

    @property
    def is_signed(self) -> bool:
        return bool(self.encoding & INT_SIGNED) if self.kind == "int" else self.kflag


def _signed(value: int, bits: int) -> int:
    return value - (1 << bits) if value >> (bits - 1) else value


class _Reader:
    """Bounds-checked cursor over the type section, resolving names against the string section."""

    def __init__(self, types: bytes, strs: bytes) -> None:
        self.buf, self.strs, self.pos = types, strs, 0

    def u32s(self, count: int, where: str) -> tuple[int, ...]:
        end = self.pos + 4 * count
        if end > len(self.buf):
            raise BtfError(f"{where}: record truncated at type section offset {self.pos} "
                           f"(needs {4 * count} bytes, {len(self.buf) - self.pos} left)")
        values = struct.unpack_from(f"<{count}I", self.buf, self.pos)
        self.pos = end
        return values

    def rows(self, width: int, count: int, where: str) -> list[tuple[int, ...]]:
        """`count` consecutive records of `width` u32s each (members, enum values, params, secinfos)."""
        flat = iter(self.u32s(width * count, where))
        return list(zip(*[flat] * width, strict=True))

    def string(self, off: int, where: str) -> str:
        if off >= len(self.strs):
            raise BtfError(f"{where}: string offset {off} out of range "
                           f"(string section is {len(self.strs)} bytes)")
        end = self.strs.find(b"\0", off)
        if end < 0:
            raise BtfError(f"{where}: string at offset {off} is not NUL-terminated")
        return self.strs[off:end].decode("utf-8", "backslashreplace")


def _decode(r: _Reader, tid: int) -> BtfType:
    start = r.pos
    name_off, info, size_or_type = r.u32s(3, f"type [{tid}]")
    kind_no, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, bool(info >> 31)
    if not 0 < kind_no < len(KINDS):
        raise BtfError(f"type [{tid}] at type section offset {start}: unknown kind {kind_no}")
    kind = KINDS[kind_no]
    where = f"type [{tid}] {kind}"
    sized = kind in SIZED_KINDS
    t = BtfType(kind, r.string(name_off, where), kflag=kflag, size=size_or_type if sized else 0,
                type_id=0 if sized else size_or_type)
    if kind == "int":
        (v,) = r.u32s(1, where)
        return dataclasses.replace(t, encoding=(v >> 24) & 0xF, bits_offset=(v >> 16) & 0xFF, bits=v & 0xFF)
    if kind == "array":
        elem, index, nelems = r.u32s(3, where)
        return dataclasses.replace(t, type_id=elem, index_type=index, nelems=nelems)
    if kind in ("struct", "union"):
        return dataclasses.replace(t, members=tuple(
            Member(r.string(n, where), ty, *((off & 0xFFFFFF, off >> 24) if kflag else (off, 0)))
            for n, ty, off in r.rows(3, vlen, where)))
    if kind == "enum":
        return dataclasses.replace(t, enum_values=tuple(
            EnumValue(r.string(n, where), _signed(v, 32) if kflag else v) for n, v in r.rows(2, vlen, where)))
    if kind == "enum64":
        return dataclasses.replace(t, enum_values=tuple(
            EnumValue(r.string(n, where), _signed(lo | hi << 32, 64) if kflag else lo | hi << 32)
            for n, lo, hi in r.rows(3, vlen, where)))
    if kind == "func_proto":
        return dataclasses.replace(t, params=tuple(
            Param(r.string(n, where), ty) for n, ty in r.rows(2, vlen, where)))
    if kind == "func":
        return dataclasses.replace(t, linkage=vlen)
    if kind == "var":
        return dataclasses.replace(t, linkage=r.u32s(1, where)[0])
    if kind == "datasec":
        return dataclasses.replace(t, var_secinfos=tuple(VarSecinfo(*row) for row in r.rows(3, vlen, where)))
    if kind == "decl_tag":
        return dataclasses.replace(t, component_idx=_signed(r.u32s(1, where)[0], 32))
    return t


def _refs(t: BtfType) -> Iterator[int]:
    """Every type id `t` refers to."""
    if t.kind not in SIZED_KINDS and t.kind != "fwd":
        yield t.type_id
    if t.kind == "array":
        yield t.index_type
    yield from (m.type_id for m in t.members)
    yield from (p.type_id for p in t.params)
    yield from (v.type_id for v in t.var_secinfos)


def _section(body: bytes, off: int, length: int, what: str) -> bytes:
    if off + length > len(body):
        raise BtfError(f"BTF {what} section [{off}, {off + length}) extends past the end of the data "
                       f"({len(body)} bytes after the header)")
    return body[off:off + length]


@dataclass
class Btf:
    types: list[BtfType] = field(default_factory=lambda: [BtfType("void")])

    @classmethod
    def parse(cls, data: bytes) -> Btf:
        if len(data) < _HDR.size:
            raise BtfError(f"BTF header truncated: {len(data)} bytes, need {_HDR.size}")
        magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = _HDR.unpack_from(data)
        if magic != BTF_MAGIC:
            raise BtfError(f"bad BTF magic {magic:#06x} at offset 0 (expected {BTF_MAGIC:#06x})")
        if version != BTF_VERSION:
            raise BtfError(f"unsupported BTF version {version} at offset 2")
        if not _HDR.size <= hdr_len <= len(data):
            raise BtfError(f"BTF hdr_len {hdr_len} out of range (data is {len(data)} bytes)")
        body = data[hdr_len:]
        strs = _section(body, str_off, str_len, "string")
        if not strs or strs[0] != 0:
            raise BtfError(f"BTF string section at offset {str_off} does not start with an empty string")
        reader = _Reader(_section(body, type_off, type_len, "type"), strs)
        types = [BtfType("void")]
        while reader.pos < type_len:
            types.append(_decode(reader, len(types)))
        for tid, t in enumerate(types):
            for ref in _refs(t):
                if ref >= len(types):
                    raise BtfError(f"type [{tid}] {t.kind} '{t.name}' refers to type {ref}, "
                                   f"but the last type is {len(types) - 1}")
        return cls(types)

    def get(self, type_id: int) -> BtfType:
        if not 0 <= type_id < len(self.types):
            raise BtfError(f"type id {type_id} out of range (last type is {len(self.types) - 1})")
        return self.types[type_id]

    def resolve(self, type_id: int) -> int:
        """Strip typedefs and qualifiers: the id of the underlying type."""
        for _ in range(_MAX_DEPTH):
            t = self.get(type_id)
            if t.kind not in MODIFIER_KINDS:
                return type_id
            type_id = t.type_id
        raise BtfError(f"type chain through [{type_id}] too deep or cyclic")

    def size_of(self, type_id: int) -> int:
        """Byte size as the kernel computes it; BtfError for types without one (void, func, fwd)."""
        return self._size(type_id, 0)

    def _size(self, type_id: int, depth: int) -> int:
        if depth > _MAX_DEPTH:
            raise BtfError(f"type chain through [{type_id}] too deep or cyclic")
        t = self.get(self.resolve(type_id))
        if t.kind in SIZED_KINDS:
            return t.size
        if t.kind == "ptr":
            return 8
        if t.kind == "array":
            return t.nelems * self._size(t.type_id, depth + 1)
        if t.kind == "var":
            return self._size(t.type_id, depth + 1)
        raise BtfError(f"type [{type_id}] ({self.describe(type_id)}) has no size")

    def datasecs(self) -> dict[str, BtfType]:
        return {t.name: t for t in self.types if t.kind == "datasec"}

    def datasec_vars(self, section: str) -> list[tuple[str, int, int]]:
        """(var name, offset, size) of each variable in DATASEC `section`, in stored order."""
        sec = self.datasecs().get(section)
        if sec is None:
            raise BtfError(f"no DATASEC named '{section}'")
        return [(self.get(v.type_id).name, v.offset, v.size) for v in sec.var_secinfos]

    def find(self, kind: str, name: str) -> int | None:
        return next((i for i, t in enumerate(self.types) if t.kind == kind and t.name == name), None)

    def describe(self, type_id: int) -> str:
        """A C-like spelling of the type for messages: "struct s", "int[7]", "const volatile int"."""
        return self._describe(type_id, 0)

    def _describe(self, type_id: int, depth: int) -> str:
        if depth > _MAX_DEPTH:
            raise BtfError(f"type chain through [{type_id}] too deep or cyclic")
        t = self.get(type_id)
        name = t.name or "<anon>"
        if t.kind == "void":
            return "void"
        if t.kind in ("int", "float", "typedef"):
            return name
        if t.kind in ("struct", "union", "enum", "enum64", "fwd"):
            tag = ("union" if t.kflag else "struct") if t.kind == "fwd" else t.kind.removesuffix("64")
            return f"{tag} {name}"
        if t.kind == "array":
            dims = ""
            while t.kind == "array" and depth <= _MAX_DEPTH:
                dims, depth = dims + f"[{t.nelems}]", depth + 1
                type_id, t = t.type_id, self.get(t.type_id)
            return self._describe(type_id, depth) + dims
        if t.kind in ("func", "datasec", "decl_tag"):
            return f"{t.kind} {name}"
        inner = self._describe(t.type_id, depth + 1)
        if t.kind == "func_proto":
            args = ", ".join(self._describe(p.type_id, depth + 1) if p.type_id else "..." for p in t.params)
            return f"{inner} (*)({args or 'void'})"
        if t.kind in ("const", "volatile", "restrict"):
            # C puts a pointer's own qualifiers after the star.
            return f"{inner} {t.kind}" if self.get(t.type_id).kind == "ptr" else f"{t.kind} {inner}"
        return f"{inner} " + {"type_tag": f"__tag({name})", "ptr": "*", "var": name}[t.kind]


def fixup_datasecs(btf: Btf, section_sizes: Mapping[str, int],
                   var_offset: Callable[[str, str], int | None]) -> Btf:
    """Give DATASECs their section sizes and variables their symbol offsets, as libbpf does before load.

    `var_offset(section, var)` returns the variable's symbol value, or None when it has no symbol. Static
    variables keep the offset the compiler emitted when they have no symbol (libbpf never looks them up);
    extern variables are left alone. The secinfos end up sorted by offset, like libbpf's.
    """
    types = list(btf.types)
    for tid, sec in enumerate(types):
        if sec.kind != "datasec" or sec.name not in section_sizes:
            continue
        infos = []
        for vsi in sec.var_secinfos:
            var = btf.get(vsi.type_id)
            if var.kind != "var":
                raise BtfError(f"DATASEC '{sec.name}' [{tid}] lists type [{vsi.type_id}] of kind {var.kind}")
            offset = None if var.linkage == LINKAGE_EXTERN else var_offset(sec.name, var.name)
            if offset is None and var.linkage == LINKAGE_GLOBAL:
                raise BtfError(f"failed to find symbol for variable '{var.name}' in section '{sec.name}'")
            infos.append(vsi if offset is None else dataclasses.replace(vsi, offset=offset))
        infos.sort(key=lambda v: v.offset)
        types[tid] = dataclasses.replace(sec, size=section_sizes[sec.name], var_secinfos=tuple(infos))
    return Btf(types)


def encode(btf: Btf) -> bytes:
    """The wire format of `btf`: header, type section, then a freshly deduplicated string section."""
    strings: dict[str, int] = {"": 0}
    blob = bytearray(b"\0")

    def s(name: str) -> int:
        if name not in strings:
            strings[name] = len(blob)
            blob.extend(name.encode() + b"\0")
        return strings[name]

    out: list[int] = []
    for t in btf.types[1:]:
        if t.vlen > 0xFFFF:
            raise BtfError(f"type {t.kind} '{t.name}' has {t.vlen} entries, more than BTF can encode")
        info = _KIND_NO[t.kind] << 24 | t.vlen | (1 << 31 if t.kflag else 0)
        out += [s(t.name), info, t.size if t.kind in SIZED_KINDS else 0 if t.kind == "array" else t.type_id]
        if t.kind == "int":
            out.append(t.encoding << 24 | t.bits_offset << 16 | t.bits)
        elif t.kind == "array":
            out += [t.type_id, t.index_type, t.nelems]
        elif t.kind == "var":
            out.append(t.linkage)
        elif t.kind == "decl_tag":
            out.append(t.component_idx & 0xFFFFFFFF)
        for m in t.members:
            out += [s(m.name), m.type_id, m.bitfield_size << 24 | m.bit_offset if t.kflag else m.bit_offset]
        for e in t.enum_values:
            val = e.value & 0xFFFFFFFFFFFFFFFF
            out += [s(e.name), val & 0xFFFFFFFF] + ([val >> 32] if t.kind == "enum64" else [])
        for p in t.params:
            out += [s(p.name), p.type_id]
        for v in t.var_secinfos:
            out += [v.type_id, v.offset, v.size]
    try:
        types = struct.pack(f"<{len(out)}I", *out)
    except struct.error as exc:
        raise BtfError(f"a field does not fit in 32 bits: {exc}") from None
    header = _HDR.pack(BTF_MAGIC, BTF_VERSION, 0, _HDR.size, 0, len(types), len(types), len(blob))
    return header + types + bytes(blob)
