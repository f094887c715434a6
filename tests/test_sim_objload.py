"""The loader model (backends.objload): section classification per libbpf profile, names, images, relocations
and subprogram linking, on objects compiled from small C sources."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest

from backends.objload import (
    LIBBPF_ERRNO__RELOC,
    LOADER_PROFILES,
    OpenFailure,
    PreparedObject,
    ProgSpec,
    internal_map_name,
    object_name,
    prepare,
    resolve,
)
from toolchain.clang import Clang, ToolchainError, compile_c
from toolchain.elf import read_object
from toolchain.insn import BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_VALUE
from toolchain.uapi import BPF_F_MMAPABLE, BPF_F_RDONLY_PROG, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY

PRELUDE = """\
#define SEC(n) __attribute__((section(n), used))
#define __noinline __attribute__((noinline))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name
typedef unsigned int __u32; typedef unsigned long long __u64; typedef unsigned char __u8;
static __u32 (*bpf_get_smp_processor_id)(void) = (void *) 8;
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *) 1;
char _license[] SEC("license") = "GPL";
"""


@pytest.fixture(scope="module")
def clang() -> Clang:
    try:
        return Clang.find()
    except ToolchainError as e:
        pytest.skip(str(e))


def build(clang: Clang, name: str, body: str) -> Path:
    return compile_c(clang, PRELUDE + textwrap.dedent(body), name=name)


def prepared(clang: Clang, name: str, body: str, profile: str = "merged") -> PreparedObject:
    return prepare(read_object(build(clang, name, body)), LOADER_PROFILES[profile])


# Every kind of section; the program touches only ordinary data, so even old libbpf opens it.
SECTIONS = """
    int p0 SEC(".percpu") = 7;
    char p1[5] SEC(".percpu.data") = "abcd";
    int p2 SEC(".percpu.looooooooong");
    int p3 SEC(".percpuX") = 3;
    int d0 = 5;
    int d1 SEC(".data.tally") = 1;
    int d2 SEC(".data..percpu") = 2;
    int d3 SEC(".data.percpu") = 4;
    int b0;
    const volatile int r0 = 9;

    SEC("raw_tp") int touch(void *ctx)
    {
        d0 += d1 + d2 + d3 + r0;
        b0 = 1;
        return 0;
    }
"""


def by_section(p: PreparedObject) -> dict[str | None, tuple]:
    return {m.section: (m.name, m.kernel_name, m.type, m.value_size, m.flags, m.freeze) for m in p.maps}


# -- names ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("obj", "section", "expected"), [
    ("plain_data", ".data", "plain_da.data"),
    ("plain_data", ".bss", "plain_da.bss"),
    ("plain_data", ".rodata", "plain_da.rodata"),
    ("plain_data", ".data.tally", ".data.tally"),
    ("my_object", ".percpu", "my_objec.percpu"),
    ("x", ".percpu", "x.percpu"),
    ("gen", ".percpu.looooooooong", ".percpu.loooooo"),
    ("a-b", ".data", "a_b.data"),
    ("obj", ".data.a-b", ".data.a_b"),
    # libbpf caps a suffix at 15 characters before it sizes the prefix: no room is left for the object name
    ("obj", ".percpuxxxxxxxxxxxx", ".percpuxxxxxxxx"),
])
def test_internal_map_name(obj, section, expected):
    assert internal_map_name(obj, section) == expected
    assert len(internal_map_name(obj, section)) <= 15


def test_object_name_is_base_name_cut_at_first_dot():
    assert object_name("/some/dir/plain_data.bpf.o") == "plain_data"
    assert object_name("x.o") == "x"


# -- classification per profile ---------------------------------------------------------------------------


def test_merged_classification(clang):
    p = prepared(clang, "sections", SECTIONS, "merged")
    maps = by_section(p)
    pcpu = BPF_MAP_TYPE_PERCPU_ARRAY
    assert maps[".percpu"] == (".percpu", ".percpu", pcpu, 4, 0, False)
    assert maps[".percpu.data"] == (".percpu.data", ".percpu.data", pcpu, 5, 0, False)
    assert maps[".percpu.looooooooong"] == (".percpu.looooooooong", ".percpu.loooooo", pcpu, 4, 0, False)
    assert ".percpuX" not in maps and p.skipped_sections == [".percpuX"]
    assert any(re.fullmatch(r"libbpf: elf: skipping unrecognized data section\(\d+\) \.percpuX", line)
               for line in p.log)
    assert maps[".data"] == ("sections.data", "sections.data", BPF_MAP_TYPE_ARRAY, 4, BPF_F_MMAPABLE, False)
    assert maps[".bss"] == ("sections.bss", "sections.bss", BPF_MAP_TYPE_ARRAY, 4, BPF_F_MMAPABLE, False)
    assert maps[".rodata"] == ("sections.rodata", "sections.rodata", BPF_MAP_TYPE_ARRAY, 4,
                               BPF_F_MMAPABLE | BPF_F_RDONLY_PROG, True)
    # `.data..percpu` (an early revision's name) and `.data.percpu` stay ordinary data
    for sec in (".data.tally", ".data..percpu", ".data.percpu"):
        assert maps[sec] == (sec, sec, BPF_MAP_TYPE_ARRAY, 4, BPF_F_MMAPABLE, False)
    pm = p.map_by_name(".percpu")
    assert (pm.key_size, pm.max_entries, pm.internal, pm.percpu_data) == (4, 1, True, True)


def test_maps_follow_section_order(clang):
    facts = read_object(build(clang, "sections", SECTIONS))
    order = [s.name for s in facts.sections]
    p = prepare(facts, LOADER_PROFILES["merged"])
    assert [m.section for m in p.maps] == sorted((m.section for m in p.maps), key=order.index)


def test_v1_classification(clang):
    maps = by_section(prepared(clang, "sections", SECTIONS, "v1"))
    pcpu = BPF_MAP_TYPE_PERCPU_ARRAY
    assert maps[".percpu"] == ("sections.percpu", "sections.percpu", pcpu, 4, 0, False)
    assert maps[".percpu.looooooooong"] == (".percpu.looooooooong", ".percpu.loooooo", pcpu, 4, 0, False)
    # a prefix match; its 8-character suffix leaves room for 7 characters of the object name
    assert maps[".percpuX"] == (".percpuX", "section.percpuX", pcpu, 4, 0, False)
    assert maps[".data..percpu"][2] == BPF_MAP_TYPE_ARRAY


def test_old_and_raw_classification(clang):
    old = prepared(clang, "sections", SECTIONS, "old")
    assert not [m for m in old.maps if m.type == BPF_MAP_TYPE_PERCPU_ARRAY]
    assert sorted(old.skipped_sections) == sorted([".percpu", ".percpu.data", ".percpu.looooooooong",
                                                   ".percpuX"])
    raw = prepared(clang, "sections", SECTIONS, "raw")
    merged = prepared(clang, "sections", SECTIONS, "merged")
    assert by_section(raw) == by_section(merged)
    assert not LOADER_PROFILES["raw"].probes_percpu_feature and LOADER_PROFILES["merged"].probes_percpu_feature


def test_images_and_variables(clang):
    p = prepared(clang, "sections", SECTIONS)
    assert p.map_by_name(".percpu").initial == (7).to_bytes(4, "little")
    assert p.map_by_name(".percpu.data").initial == b"abcd\0"
    assert p.map_by_name(".percpu.looooooooong").initial == bytes(4)
    assert p.map_by_name(".bss").initial == bytes(4)  # NOBITS: zeros
    assert p.map_by_name(".rodata").initial == (9).to_bytes(4, "little")
    variables = {v[0]: v[1:] for v in p.variables}
    assert variables["p1"] == (".percpu.data", 0, 5)
    assert variables["d2"] == (".data..percpu", 0, 4)
    assert "p3" not in variables  # .percpuX is no map under merged


def test_value_size_rounding_is_a_profile_fact(clang):
    rounded = dataclasses.replace(LOADER_PROFILES["merged"], name="v3", percpu_value_size_align=8)
    p = prepare(read_object(build(clang, "sections", SECTIONS)), rounded)
    m = p.map_by_name(".percpu.data")
    assert m.value_size == 8 and m.initial == b"abcd\0\0\0\0"
    assert next(v[1:3] for v in p.variables if v[0] == "p1") == (".percpu.data", 0)


# -- relocations --------------------------------------------------------------------------------------------

GLOBAL_PERCPU = """
    int pad SEC(".percpu") = 9;  /* clang puts uninitialised variables last: x lands at offset 4 */
    int x SEC(".percpu");

    SEC("raw_tp") int bump(void *ctx)
    {
        x += 1;
        return 0;
    }
"""
STATIC_PERCPU = """
    static int pad SEC(".percpu") __attribute__((used)) = 9;
    static int y SEC(".percpu") __attribute__((used));

    SEC("raw_tp") int bump(void *ctx)
    {
        y += 1;
        return 0;
    }
"""


def test_old_libbpf_bad_map_relo_global(clang):
    with pytest.raises(OpenFailure) as ei:
        prepared(clang, "percpu_global", GLOBAL_PERCPU, "old")
    e = ei.value
    assert (e.error_class, e.errno) == ("bad_map_relo", LIBBPF_ERRNO__RELOC)
    assert e.message == "libbpf: prog 'bump': bad map relo against 'x' in section '.percpu'"


def test_old_libbpf_bad_map_relo_static(clang):
    with pytest.raises(OpenFailure) as ei:
        prepared(clang, "percpu_static", STATIC_PERCPU, "old")
    # a static variable is relocated against the section symbol, which libbpf names after the section
    assert ei.value.message == "libbpf: prog 'bump': bad map relo against '.percpu' in section '.percpu'"


def test_merged_percpuX_reference_is_bad_map_relo(clang):
    src = """
        int z SEC(".percpuX");
        SEC("raw_tp") int bump(void *ctx) { z = 1; return 0; }
    """
    with pytest.raises(OpenFailure, match=r"bad map relo against 'z' in section '\.percpuX'"):
        prepared(clang, "percpux", src, "merged")
    assert prepared(clang, "percpux", src, "v1").programs[0].relos[0].kind == "map_value"


@pytest.mark.parametrize("source", [GLOBAL_PERCPU, STATIC_PERCPU])
def test_relocation_offset_is_the_variable_offset(clang, source):
    p = prepared(clang, "offsets", source)
    (prog,) = p.programs
    (relo,) = prog.relos
    target = next(v for v in p.variables if v[0] in ("x", "y"))
    assert relo.kind == "map_value" and relo.offset == target[2] != 0
    assert p.maps[relo.map_index].section == ".percpu"
    insns = resolve(prog, [40 + i for i in range(len(p.maps))])
    first, second = insns[relo.insn_index], insns[relo.insn_index + 1]
    assert (first.src, first.imm, second.imm) == (BPF_PSEUDO_MAP_VALUE, 40 + relo.map_index, relo.offset)
    assert prog.insns[relo.insn_index].src == 0  # prepare leaves the ELF instruction alone


SUBPROGRAMS = """
    int a SEC(".percpu");
    static int b SEC(".percpu") __attribute__((used));

    static __noinline int leaf(void) { b += 3; return b; }
    static __noinline int mid(void) { a += 1; return leaf() + 1; }

    SEC("raw_tp") int first(void *ctx) { return mid() + leaf(); }
    SEC("raw_tp") int second(void *ctx) { return leaf(); }
"""


def test_subprograms_are_appended_once_and_calls_retargeted(clang):
    facts = read_object(build(clang, "subs", SUBPROGRAMS))
    p = prepare(facts, LOADER_PROFILES["merged"])
    first, second = p.programs
    assert [first.name, second.name] == ["first", "second"]
    # libbpf's order: the entry function, then each callee the first time a call reaches it, depth first
    assert layout(first, facts) == ["first", "mid", "leaf"]
    assert layout(second, facts) == ["second", "leaf"]
    for prog in (first, second):
        starts = {name: at for name, at in zip(layout(prog, facts), code_starts(prog, facts), strict=True)}
        for i, insn in enumerate(prog.insns):
            if insn.is_pseudo_call:
                assert i + 1 + insn.imm in starts.values()
        # the static `b` inside leaf keeps its offset in every copy
        leaf_at = starts["leaf"]
        relo = next(r for r in prog.relos if leaf_at <= r.insn_index < leaf_at + len(facts.function("leaf").insns))
        assert relo.offset == next(v[2] for v in p.variables if v[0] == "b")


def code_starts(prog: ProgSpec, facts) -> list[int]:
    starts, at = [], 0
    for name in layout(prog, facts):
        starts.append(at)
        at += len(facts.function(name).insns)
    return starts


def layout(prog: ProgSpec, facts) -> list[str]:
    """Which function's code sits where in the linked program (matched by opcodes)."""
    names, at = [], 0
    candidates = [f for f in facts.functions if f.name == prog.name or not f.is_program]
    while at < len(prog.insns):
        fn = next(f for f in candidates if [i.code for i in f.insns] ==
                  [i.code for i in prog.insns[at:at + len(f.insns)]] and f.name not in names)
        names.append(fn.name)
        at += len(fn.insns)
    return names


def test_btf_defined_map_and_map_fd_relocation(clang):
    p = prepared(clang, "lowered", """
        struct v { int x; char c; };
        struct {
            __uint(type, 6);
            __uint(max_entries, 1);
            __type(key, __u32);
            __type(value, struct v);
        } pcpu SEC(".maps");
        int d = 1;

        SEC("raw_tp") int use(void *ctx)
        {
            __u32 zero = 0;
            struct v *p = bpf_map_lookup_elem(&pcpu, &zero);
            if (!p)
                return 0;
            p->x = d;
            return 0;
        }
    """)
    m = p.maps[0]  # BTF-defined maps come before global data, as in libbpf
    assert (m.name, m.kernel_name, m.section, m.type, m.key_size, m.value_size, m.max_entries, m.internal,
            m.initial) == ("pcpu", "pcpu", None, BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 1, False, None)
    kinds = {p.maps[r.map_index].name: r.kind for r in p.programs[0].relos}
    assert kinds == {"pcpu": "map_fd", "lowered.data": "map_value"}
    fd_relo = next(r for r in p.programs[0].relos if r.kind == "map_fd")
    insn = resolve(p.programs[0], [7, 8])[fd_relo.insn_index]
    assert (insn.src, insn.imm) == (BPF_PSEUDO_MAP_FD, 7)


def test_sections_of_static_variables_only_are_not_mmapable(clang):
    # libbpf 1.1.2 measured on this layout: st.data 0x0, .data.st 0x0, st.rodata 0x80, .data.mix 0x400, st.bss 0x0
    p = prepared(clang, "st", """
        static int s1 __attribute__((used)) = 3;
        static int s2 SEC(".data.st") __attribute__((used)) = 4;
        static const volatile int r1 __attribute__((used)) = 5;
        static int b1 __attribute__((used));
        int g SEC(".data.mix") = 1;
        static int s3 SEC(".data.mix") __attribute__((used)) = 2;

        SEC("raw_tp") int p(void *ctx) { s1++; s2++; b1++; s3 += r1; g++; return 0; }
    """, "old")
    assert {m.name: m.flags for m in p.maps} == {
        "st.data": 0, ".data.st": 0, "st.rodata": BPF_F_RDONLY_PROG, ".data.mix": BPF_F_MMAPABLE, "st.bss": 0}
