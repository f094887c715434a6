"""toolchain.btf against clang-19 output, bpftool's reading of the same objects, and the ELF symbol table."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolchain.btf import (
    INT_BOOL,
    INT_SIGNED,
    LINKAGE_GLOBAL,
    LINKAGE_STATIC,
    Btf,
    BtfError,
    BtfType,
    VarSecinfo,
    encode,
    fixup_datasecs,
)

CLANG = shutil.which("clang-19")
BPFTOOL = shutil.which("bpftool")
needs_clang = pytest.mark.skipif(CLANG is None, reason="clang-19 is not installed")
needs_bpftool = pytest.mark.skipif(BPFTOOL is None, reason="bpftool is not installed")

TYPICAL_C = """
#define SEC(n) __attribute__((section(n), used))
struct inner { char c; long long x; } ;
int data SEC(".percpu") = -1; int nums[7] SEC(".percpu"); struct inner st SEC(".percpu.foo");
static int hidden SEC(".percpu") __attribute__((used)) = 3;
int counter; const volatile int ro = 4; int tally SEC(".data.tally") = 1;
SEC("raw_tp") int prog(void *ctx) { data = 1; nums[2] += hidden; counter++; st.x = ro; tally = 2; return 0; }
char LICENSE[] SEC("license") = "GPL";
"""

# (C type, BTF name, size, signed); one global of each type is emitted.
INTS = [
    ("char", "char", 1, True), ("signed char", "signed char", 1, True),
    ("unsigned char", "unsigned char", 1, False), ("short", "short", 2, True),
    ("unsigned short", "unsigned short", 2, False), ("int", "int", 4, True),
    ("unsigned int", "unsigned int", 4, False), ("long", "long", 8, True),
    ("unsigned long", "unsigned long", 8, False), ("long long", "long long", 8, True),
    ("unsigned long long", "unsigned long long", 8, False), ("_Bool", "_Bool", 1, False),
]

# sizeof of each type, checked by the compiler through _Static_assert and by the test through size_of.
SIZES = {
    "struct inner": 16, "union un": 16, "struct packed_s": 7, "struct aligned_s": 32, "struct nested": 64,
    "struct bits": 16, "struct mix": 48, "enum color": 4, "enum neg": 4, "enum big": 8,
}

TYPES_C = """
#define SEC(n) __attribute__((section(n), used))
#define USED __attribute__((used))
typedef unsigned int u32_t;
typedef const volatile u32_t cv_u32;
struct inner { char c; long long x; };
union un { long long l; char c[9]; struct inner in; };
struct __attribute__((packed)) packed_s { char c; int i; short s; };
struct aligned_s { char c; int x __attribute__((aligned(16))); };
struct nested {
    struct inner in; union { int i; char b[5]; } u; struct { short s; } anon_s; struct inner arr[2];
};
struct bits { int a : 3; unsigned b : 5; long long c; };
struct mix { char a; struct packed_s p; struct aligned_s al; };
enum color { RED, GREEN = 5, BLUE };
enum neg { MINUS = -3, PLUS = 7 };
enum big { HUGE = 0x123456789ULL };

int g_data = 1;
static int s_data USED = 2;
int g_bss;
static int s_bss USED;
const volatile int g_ro = 3;
static const volatile int s_ro USED = 4;
const int *g_cptr;
int pc_a SEC(".percpu") = -1;
static long long pc_s SEC(".percpu") = 5;
struct nested pc_nested SEC(".percpu");
int pc_grid[3][4][5] SEC(".percpu");
struct aligned_s foo_al SEC(".percpu.foo");
static struct packed_s foo_pk SEC(".percpu.foo");
struct mix foo_mix SEC(".percpu.foo");
union un bar_un SEC(".data.bar");
static enum neg bar_en SEC(".data.bar") = MINUS;
enum color bar_color SEC(".data.bar") = BLUE;
enum big bar_big SEC(".data.bar");
struct bits bar_bits SEC(".data.bar");
cv_u32 bar_cv = 9;

_Static_assert(__builtin_offsetof(struct aligned_s, x) == 16, "");
_Static_assert(__builtin_offsetof(struct packed_s, i) == 1, "");
"""

KINDS_C = """
#define SEC(n) __attribute__((section(n), used))
struct opaque; union uopaque;
struct tagged { int x __attribute__((btf_decl_tag("m"))); } __attribute__((btf_decl_tag("s")));
enum bneg { N1 = -5000000000LL, N2 = 1 };
struct opaque *po SEC(".data.p");
union uopaque *pu SEC(".data.p");
float fl SEC(".data.p"); double db SEC(".data.p");
struct tagged tg SEC(".data.p");
enum bneg eb SEC(".data.p");
int __attribute__((btf_type_tag("user"))) *ut SEC(".data.p");
extern int ksym_var __attribute__((section(".ksyms"), weak));
__attribute__((noinline)) int helper(int * restrict p, int n) __attribute__((btf_decl_tag("fn")))
{ return *p + n; }
SEC("raw_tp") int prog(void *ctx) { return helper((int *)ctx, 1) + ksym_var; }
char LICENSE[] SEC("license") = "GPL";
"""


def _types_source() -> str:
    lines = [TYPES_C]
    lines += [f"{ctype} v_{ctype.replace(' ', '_')};" for ctype, _, _, _ in INTS]
    lines += [f'_Static_assert(sizeof({ctype}) == {size}, "");' for ctype, _, size, _ in INTS]
    lines += [f'_Static_assert(sizeof({ctype}) == {size}, "");' for ctype, size in SIZES.items()]
    lines.append('SEC("raw_tp") int prog(void *ctx) { s_data++; s_bss++; pc_s++; return s_ro + bar_en + '
                 'foo_pk.i; }')
    lines.append('char LICENSE[] SEC("license") = "GPL";')
    return "\n".join(lines)


class Obj:
    """A compiled object: its raw .BTF and what the ELF says about sections and symbols."""

    def __init__(self, path: Path) -> None:
        self.path = path
        elf = ELFFile(io.BytesIO(path.read_bytes()))
        self.raw = elf.get_section_by_name(".BTF").data()
        self.btf = Btf.parse(self.raw)
        sections = list(elf.iter_sections())
        self.section_sizes = {s.name: s["sh_size"] for s in sections if s.name}
        self.symbols = {
            (sections[sym["st_shndx"]].name, sym.name): sym
            for sym in elf.get_section_by_name(".symtab").iter_symbols()
            if sym["st_info"]["type"] == "STT_OBJECT" and isinstance(sym["st_shndx"], int)
        }

    def var_offset(self, section: str, name: str) -> int | None:
        sym = self.symbols.get((section, name))
        return None if sym is None else sym["st_value"]

    def fixed(self) -> Btf:
        return fixup_datasecs(self.btf, self.section_sizes, self.var_offset)


@pytest.fixture(scope="module")
def objs(tmp_path_factory) -> dict[str, Obj]:
    if CLANG is None:
        pytest.skip("clang-19 is not installed")
    out = tmp_path_factory.mktemp("btf")
    result = {}
    for name, source in (("typical", TYPICAL_C), ("types", _types_source()), ("kinds", KINDS_C)):
        (out / f"{name}.c").write_text(source)
        done = subprocess.run([CLANG, "-target", "bpf", "-g", "-O2", "-c", f"{name}.c", "-o", f"{name}.o"],
                              cwd=out, capture_output=True, text=True)
        assert done.returncode == 0, f"{name}.c does not compile:\n{done.stderr}"
        result[name] = Obj(out / f"{name}.o")
    return result


def _bpftool_json(path: Path) -> list[dict]:
    out = subprocess.run([BPFTOOL, "-j", "btf", "dump", "file", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["types"]


_LINKAGE = {0: "static", 1: "global", 2: "extern"}
_INT_ENC = {0: "(none)", 1: "SIGNED", 2: "CHAR", 4: "BOOL"}


def _as_bpftool(tid: int, t: BtfType) -> dict:
    """How `bpftool -j btf dump` spells type `t`."""
    d: dict = {"id": tid, "kind": t.kind.upper(), "name": t.name or "(anon)"}
    if t.kind == "int":
        d.update(size=t.size, bits_offset=t.bits_offset, nr_bits=t.bits, encoding=_INT_ENC[t.encoding])
    elif t.kind in ("ptr", "typedef", "volatile", "const", "restrict", "type_tag"):
        d.update(type_id=t.type_id)
    elif t.kind == "array":
        d.update(type_id=t.elem_type, index_type_id=t.index_type, nr_elems=t.nelems)
    elif t.kind in ("struct", "union"):
        members = [{"name": m.name or "(anon)", "type_id": m.type_id, "bits_offset": m.bit_offset}
                   | ({"bitfield_size": m.bitfield_size} if m.bitfield_size else {}) for m in t.members]
        d.update(size=t.size, vlen=t.vlen, members=members)
    elif t.kind in ("enum", "enum64"):
        d.update(encoding="SIGNED" if t.is_signed else "UNSIGNED", size=t.size, vlen=t.vlen,
                 values=[{"name": e.name, "val": e.value} for e in t.enum_values])
    elif t.kind == "fwd":
        d.update(fwd_kind="union" if t.kflag else "struct")
    elif t.kind in ("func", "var"):
        d.update(type_id=t.type_id, linkage=_LINKAGE[t.linkage])
    elif t.kind == "func_proto":
        d.update(ret_type_id=t.type_id, vlen=t.vlen,
                 params=[{"name": p.name or "(anon)", "type_id": p.type_id} for p in t.params])
    elif t.kind == "datasec":
        d.update(size=t.size, vlen=t.vlen,
                 vars=[{"type_id": v.type_id, "offset": v.offset, "size": v.size} for v in t.var_secinfos])
    elif t.kind == "float":
        d.update(size=t.size)
    elif t.kind == "decl_tag":
        d.update(type_id=t.type_id, component_idx=t.component_idx)
    return d


OBJECTS = ["typical", "types", "kinds"]


# --- every type, against bpftool ---------------------------------------------------------------------------

@needs_bpftool
@pytest.mark.parametrize("name", OBJECTS)
def test_every_type_matches_bpftool(objs, name):
    obj = objs[name]
    expected = _bpftool_json(obj.path)
    assert [_as_bpftool(i, t) for i, t in enumerate(obj.btf.types)][1:] == expected


def test_all_kinds_are_covered(objs):
    seen = {t.kind for obj in objs.values() for t in obj.btf.types}
    assert seen >= {"int", "ptr", "array", "struct", "union", "enum", "fwd", "typedef", "volatile", "const",
                    "restrict", "func", "func_proto", "var", "datasec", "float", "decl_tag", "type_tag",
                    "enum64"}


@needs_bpftool
@pytest.mark.parametrize("name", OBJECTS)
def test_datasec_vars_match_bpftool(objs, name):
    btf = objs[name].btf
    dumped = _bpftool_json(objs[name].path)
    names = {t["id"]: t["name"] for t in dumped}
    for sec in (t for t in dumped if t["kind"] == "DATASEC"):
        expected = [(names[v["type_id"]], v["offset"], v["size"]) for v in sec["vars"]]
        assert btf.datasec_vars(sec["name"]) == expected


def test_expected_sections_present(objs):
    assert set(objs["types"].btf.datasecs()) == {
        ".data", ".bss", ".rodata", ".percpu", ".percpu.foo", ".data.bar", "license"}
    assert set(objs["typical"].btf.datasecs()) == {
        ".bss", ".rodata", ".percpu", ".percpu.foo", ".data.tally", "license"}


def test_require_section_names_the_object_missing_it(objs):
    from toolchain.elf import read_object

    facts = read_object(objs["typical"].path)
    assert facts.require_section(".percpu.foo") is facts.section(".percpu.foo")
    with pytest.raises(KeyError, match=r"typical\.o: no section \.percpu\.absent"):
        facts.require_section(".percpu.absent")


# --- fix-up, against the ELF symbol table ------------------------------------------------------------------

@pytest.mark.parametrize("name", OBJECTS)
def test_fixup_matches_symbol_table(objs, name):
    obj = objs[name]
    fixed = obj.fixed()
    checked = 0
    for sec_name, sec in fixed.datasecs().items():
        if sec_name not in obj.section_sizes:
            continue
        assert sec.size == obj.section_sizes[sec_name]
        offsets = [v.offset for v in sec.var_secinfos]
        assert offsets == sorted(offsets)
        for vsi in sec.var_secinfos:
            var = fixed.types[vsi.type_id]
            sym = obj.symbols[(sec_name, var.name)]
            assert vsi.offset == sym["st_value"], (sec_name, var.name)
            assert vsi.size == fixed.size_of(vsi.type_id) == sym["st_size"], (sec_name, var.name)
            checked += 1
    assert checked >= 6


def test_fixup_typical_percpu(objs):
    fixed = objs["typical"].fixed()
    assert fixed.datasec_vars(".percpu") == [("data", 0, 4), ("hidden", 4, 4), ("nums", 8, 28)]
    assert fixed.datasecs()[".percpu"].size == 36
    assert fixed.datasec_vars(".percpu.foo") == [("st", 0, 16)]


def test_fixup_leaves_input_unchanged(objs):
    obj = objs["types"]
    before = Btf.parse(obj.raw)
    fixed = obj.fixed()
    assert obj.btf == before
    assert fixed != before
    assert all(s.size == 0 for s in obj.btf.datasecs().values())


def test_fixup_missing_symbol_names_variable(objs):
    obj = objs["typical"]
    with pytest.raises(BtfError, match="failed to find symbol for variable 'nums'"):
        fixup_datasecs(obj.btf, obj.section_sizes,
                       lambda sec, var: None if var == "nums" else obj.var_offset(sec, var))


def test_fixup_absent_section_and_static_without_symbol(objs):
    obj = objs["typical"]
    sizes = {k: v for k, v in obj.section_sizes.items() if k != ".percpu.foo"}
    # Statics keep the compiler's offset when no symbol turns up, as libbpf never looks them up.
    fixed = fixup_datasecs(obj.btf, sizes,
                           lambda sec, var: None if var == "hidden" else obj.var_offset(sec, var))
    assert fixed.datasecs()[".percpu.foo"] == obj.btf.datasecs()[".percpu.foo"]
    hidden = fixed.types[fixed.find("var", "hidden")]
    assert hidden.linkage == LINKAGE_STATIC
    assert ("hidden", 4, 4) in fixed.datasec_vars(".percpu")


def test_fixup_skips_extern_vars(objs):
    obj = objs["kinds"]
    assert obj.btf.datasec_vars(".ksyms") == [("ksym_var", 0, 4)]
    fixed = fixup_datasecs(obj.btf, {**obj.section_sizes, ".ksyms": 4}, obj.var_offset)
    assert fixed.datasec_vars(".ksyms") == [("ksym_var", 0, 4)]


def test_fixup_sorts_by_offset():
    btf = Btf([BtfType("void"), BtfType("int", "int", size=4, encoding=INT_SIGNED, bits=32)]
              + [BtfType("var", n, type_id=1, linkage=LINKAGE_GLOBAL) for n in "abc"]
              + [BtfType("datasec", ".percpu", var_secinfos=tuple(VarSecinfo(i, 0, 4) for i in (2, 3, 4)))])
    offsets = {"a": 8, "b": 0, "c": 4}
    fixed = fixup_datasecs(btf, {".percpu": 12}, lambda sec, var: offsets[var])
    assert fixed.datasec_vars(".percpu") == [("b", 0, 4), ("c", 4, 4), ("a", 8, 4)]
    assert Btf.parse(encode(fixed)) == fixed


# --- types -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("ctype", "btf_name", "size", "signed"), INTS)
def test_int_types(objs, ctype, btf_name, size, signed):
    btf = objs["types"].btf
    var = btf.types[btf.find("var", "v_" + ctype.replace(" ", "_"))]
    t = btf.types[btf.resolve(var.type_id)]
    assert (t.kind, t.name, t.size, t.bits, t.bits_offset) == ("int", btf_name, size, size * 8, 0)
    assert t.is_signed == signed
    assert bool(t.encoding & INT_BOOL) == (ctype == "_Bool")
    assert btf.size_of(var.type_id) == size
    assert btf.describe(var.type_id) == btf_name


@pytest.mark.parametrize(("ctype", "size"), SIZES.items())
def test_size_of_matches_sizeof(objs, ctype, size):
    btf = objs["types"].btf
    kind, name = ctype.split()
    tid = btf.find(kind, name) if kind != "enum" or size == 4 else btf.find("enum64", name)
    assert tid is not None
    assert btf.size_of(tid) == size
    assert btf.describe(tid) == ctype


def test_member_offsets(objs):
    btf = objs["types"].btf
    aligned = btf.types[btf.find("struct", "aligned_s")]
    assert [(m.name, m.bit_offset) for m in aligned.members] == [("c", 0), ("x", 128)]
    packed = btf.types[btf.find("struct", "packed_s")]
    assert [(m.name, m.bit_offset) for m in packed.members] == [("c", 0), ("i", 8), ("s", 40)]
    bits = btf.types[btf.find("struct", "bits")]
    assert [(m.name, m.bit_offset, m.bitfield_size) for m in bits.members] == [
        ("a", 0, 3), ("b", 3, 5), ("c", 64, 0)]
    nested = btf.types[btf.find("struct", "nested")]
    assert [(m.name, m.bit_offset) for m in nested.members] == [
        ("in", 0), ("u", 128), ("anon_s", 192), ("arr", 256)]
    assert btf.describe(nested.members[1].type_id) == "union <anon>"
    assert btf.describe(nested.members[3].type_id) == "struct inner[2]"


def test_enums(objs):
    btf = objs["types"].btf
    neg = btf.types[btf.find("enum", "neg")]
    assert neg.is_signed and [(e.name, e.value) for e in neg.enum_values] == [("MINUS", -3), ("PLUS", 7)]
    color = btf.types[btf.find("enum", "color")]
    assert [(e.name, e.value) for e in color.enum_values] == [("RED", 0), ("GREEN", 5), ("BLUE", 6)]
    big = btf.types[btf.find("enum64", "big")]
    assert [(e.name, e.value) for e in big.enum_values] == [("HUGE", 0x123456789)]
    bneg = objs["kinds"].btf
    assert [e.value for e in bneg.types[bneg.find("enum64", "bneg")].enum_values] == [-5000000000, 1]


@pytest.mark.parametrize(("var", "spelling", "size"), [
    ("pc_grid", "int[3][4][5]", 240), ("pc_nested", "struct nested", 64), ("g_ro", "const volatile int", 4),
    ("bar_cv", "cv_u32", 4), ("g_cptr", "const int *", 8), ("foo_pk", "struct packed_s", 7),
    ("bar_un", "union un", 16), ("bar_en", "enum neg", 4),
])
def test_vars_describe_and_size(objs, var, spelling, size):
    btf = objs["types"].btf
    tid = btf.find("var", var)
    assert btf.describe(btf.types[tid].type_id) == spelling
    assert btf.describe(tid) == f"{spelling} {var}"
    assert btf.size_of(tid) == size


def test_resolve_strips_typedefs_and_qualifiers(objs):
    btf = objs["types"].btf
    cv = btf.types[btf.find("var", "bar_cv")].type_id
    assert [btf.types[t].kind for t in _chain(btf, cv)] == ["typedef", "const", "volatile", "typedef", "int"]
    assert btf.describe(btf.resolve(cv)) == "unsigned int"
    grid = btf.types[btf.find("var", "pc_grid")].type_id
    assert btf.resolve(grid) == grid


def _chain(btf: Btf, tid: int) -> list[int]:
    out = [tid]
    while btf.types[tid].kind in ("typedef", "const", "volatile"):
        tid = btf.types[tid].type_id
        out.append(tid)
    return out


def test_linkage_and_kinds(objs):
    btf = objs["types"].btf
    assert btf.types[btf.find("var", "s_data")].linkage == LINKAGE_STATIC
    assert btf.types[btf.find("var", "g_data")].linkage == LINKAGE_GLOBAL
    assert btf.find("var", "nope") is None
    kinds = objs["kinds"].btf
    assert kinds.describe(kinds.find("fwd", "uopaque")) == "union uopaque"
    with pytest.raises(BtfError, match="has no size"):
        kinds.size_of(kinds.find("fwd", "opaque"))
    with pytest.raises(BtfError, match="has no size"):
        kinds.size_of(0)
    helper = kinds.types[kinds.find("func", "helper")]
    assert kinds.describe(helper.type_id) == "int (*)(int * restrict, int)"
    assert kinds.size_of(kinds.find("var", "ut")) == 8
    with pytest.raises(BtfError, match="no DATASEC named '.nope'"):
        kinds.datasec_vars(".nope")


# --- encode ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", OBJECTS)
def test_encode_round_trip(objs, name):
    btf = objs[name].btf
    assert Btf.parse(encode(btf)) == btf
    fixed = objs[name].fixed()
    assert Btf.parse(encode(fixed)) == fixed


@needs_bpftool
@pytest.mark.parametrize("name", OBJECTS)
def test_encoded_btf_reads_the_same_in_bpftool(objs, name, tmp_path):
    obj = objs[name]
    raw = tmp_path / "raw.btf"
    raw.write_bytes(encode(obj.btf))
    assert _bpftool_json(raw) == _bpftool_json(obj.path)
    fixed = obj.fixed()
    raw.write_bytes(encode(fixed))
    assert _bpftool_json(raw) == [_as_bpftool(i, t) for i, t in enumerate(fixed.types)][1:]


# --- malformed input ---------------------------------------------------------------------------------------

HDR = struct.Struct("<HBBIIIII")


def _handmade(types: bytes, strings: bytes = b"\0int\0") -> bytes:
    return HDR.pack(0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings)) + types + strings


INT_T = struct.pack("<4I", 1, 1 << 24, 4, (1 << 24) | 32)


def _patch_header(raw: bytes, field: int, value: int) -> bytes:
    fields = list(HDR.unpack_from(raw))
    fields[field] = value
    return HDR.pack(*fields) + raw[HDR.size:]


@pytest.mark.parametrize(("data", "message"), [
    (b"\x9f\xeb\x01\x00", "header truncated"),
    (b"", "header truncated"),
    (struct.pack("<HBBIIIII", 0xBEEF, 1, 0, 24, 0, 0, 0, 1) + b"\0", "bad BTF magic 0xbeef"),
    (struct.pack("<HBBIIIII", 0xEB9F, 2, 0, 24, 0, 0, 0, 1) + b"\0", "unsupported BTF version 2"),
    (struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 99, 0, 0, 0, 1) + b"\0", "hdr_len 99"),
    (struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 1000, 16, 0, 1) + b"\0", "type section .* past the end"),
    (struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, 0, 0, 8) + b"\0", "string section .* past the end"),
    (_handmade(INT_T, b"x\0"), "does not start with an empty string"),
    (_handmade(INT_T, b"\0int"), "not NUL-terminated"),
    (_handmade(struct.pack("<4I", 99, 1 << 24, 4, 32)), r"type \[1\] int: string offset 99 out of range"),
    (_handmade(INT_T[:10]), r"type \[1\]: record truncated"),
    (_handmade(INT_T[:12]), r"type \[1\] int: record truncated"),
    (_handmade(struct.pack("<3I", 0, 25 << 24, 0)), "unknown kind 25"),
    (_handmade(struct.pack("<3I", 0, 2 << 24, 7)), "refers to type 7"),
    (_handmade(struct.pack("<3I", 0, (4 << 24) | 3, 4) + struct.pack("<3I", 1, 0, 0)), "record truncated"),
    (_handmade(INT_T + struct.pack("<3I", 1, (15 << 24) | 1, 0) + struct.pack("<3I", 9, 0, 4)),
     "refers to type 9"),
])
def test_malformed_input(data, message):
    with pytest.raises(BtfError, match=message) as info:
        Btf.parse(data)
    assert "\n" not in str(info.value)


def test_malformed_real_header(objs):
    raw = objs["typical"].raw
    with pytest.raises(BtfError, match="type section"):
        Btf.parse(_patch_header(raw, 4, len(raw)))
    with pytest.raises(BtfError, match="string section"):
        Btf.parse(_patch_header(raw, 7, len(raw)))
    with pytest.raises(BtfError, match="header truncated"):
        Btf.parse(raw[:23])
    with pytest.raises(BtfError):
        Btf.parse(raw[:-1])


def test_cyclic_types_fail_cleanly():
    data = _handmade(struct.pack("<3I", 0, 8 << 24, 2) + struct.pack("<3I", 0, 10 << 24, 1))
    btf = Btf.parse(data)
    for call in (btf.resolve, btf.size_of):
        with pytest.raises(BtfError, match="cyclic"):
            call(1)
    ptr_loop = Btf.parse(_handmade(struct.pack("<3I", 0, 2 << 24, 2) + struct.pack("<3I", 0, 10 << 24, 1)))
    assert ptr_loop.size_of(1) == 8
    with pytest.raises(BtfError, match="cyclic"):
        ptr_loop.describe(1)
    looped = Btf.parse(_handmade(struct.pack("<3I", 0, 3 << 24, 0) + struct.pack("<3I", 1, 1, 2)))
    with pytest.raises(BtfError, match="cyclic"):
        looped.size_of(1)
    with pytest.raises(BtfError, match="out of range"):
        btf.size_of(5)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_btf_raises_only_btf_error(objs, data):
    raw = bytearray(objs[data.draw(st.sampled_from(OBJECTS))].raw)
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        btf = Btf.parse(bytes(raw[:cut]))
    except BtfError as exc:
        assert "\n" not in str(exc)
        return
    for tid in range(len(btf.types)):
        for call in (btf.resolve, btf.size_of, btf.describe):
            with contextlib.suppress(BtfError):
                call(tid)
    with contextlib.suppress(BtfError):
        fixup_datasecs(btf, {name: 64 for name in btf.datasecs()}, lambda sec, var: 0)
    assert Btf.parse(encode(btf)) == btf
