"""The suite's model of libbpf's object preparation: ELF sections to maps, relocations, subprogram linking.

Shared by the simulator and the raw real-kernel loader. Each libbpf behaviour that differs between releases or
patch revisions is a field of a `LoaderProfile` (a row of `LOADER_PROFILES`), never a branch on a version.
Facts are marked as in the spec: [S] read in the series' source, [D] deduced from libbpf's source, not run,
[I] inferred.

What `prepare` mirrors, in libbpf's order: section classification (`bpf_object__elf_collect`), BTF DATASEC
fix-up, maps (BTF-defined `.maps` maps first, then one internal map per global-data section in section order:
`bpf_object__init_maps`), a prog array's static slots from `.rel.maps` (`bpf_object__collect_map_relos`),
relocation records checked in ELF order of the relocation sections (`bpf_object__collect_relos`, where the first
bad one fails the open), then per entry program the code of every subprogram it calls appended once
(`bpf_object__reloc_code`).
"""

from __future__ import annotations

import errno
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from toolchain.btf import LINKAGE_STATIC, Btf, BtfError, BtfType, fixup_datasecs
from toolchain.elf import Function, ObjectFacts, Section
from toolchain.insn import BPF_CALL, BPF_JMP, BPF_PSEUDO_CALL, BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_VALUE, Insn
from toolchain.uapi import (
    BPF_F_MMAPABLE,
    BPF_F_RDONLY_PROG,
    BPF_MAP_TYPE_ARRAY,
    BPF_MAP_TYPE_ARRAY_OF_MAPS,
    BPF_MAP_TYPE_HASH_OF_MAPS,
    BPF_MAP_TYPE_PERCPU_ARRAY,
    BPF_MAP_TYPE_PROG_ARRAY,
    BPF_OBJ_NAME_LEN,
)

LIBBPF_ERRNO__RELOC = 4005
SHN_LORESERVE = 0xFF00

DATA_SEC, RODATA_SEC, BSS_SEC, MAPS_SEC, TEXT_SEC = ".data", ".rodata", ".bss", ".maps", ".text"
# Sections libbpf consumes by name before classifying data sections.
_CONSUMED_SECTIONS = frozenset({"license", "version", MAPS_SEC, ".BTF", ".BTF.ext"})
_STRUCT_OPS_SECTIONS = frozenset({".struct_ops", ".struct_ops.link"})


@dataclass(frozen=True)
class LoaderProfile:
    """One libbpf behaviour towards `.percpu*` sections, as data."""

    name: str
    knows_percpu: bool
    percpu_exact: tuple[str, ...]
    percpu_prefixes: tuple[str, ...]
    percpu_value_size_align: int  # 1: value_size is the section size; 8: rounded up (v2/v3) [S]
    # "section": bpf_map__name is the bare section name (merged) [V];
    # "internal": libbpf's map_uses_real_name rule, `<obj8>.percpu` for the plain section (v1) [S]
    percpu_map_name: str
    # "section15": the section name cut to 15 characters and sanitised (merged) [S];
    # "internal": internal_map_name() like every other global-data map (v1) [S]
    percpu_kernel_name: str
    # merged libbpf probes FEAT_PERCPU_DATA and clears autocreate of .percpu maps without it [S]
    probes_percpu_feature: bool
    # libbpf tears every map down when the object fails to load; the suite's raw loader keeps them readable
    keeps_maps_on_failure: bool = False
    # bpf_map__reuse_fd takes effect; False only in the fault-injection row that ignores it
    reuses_fd: bool = True

    def is_percpu_section(self, name: str) -> bool:
        return self.knows_percpu and (name in self.percpu_exact
                                      or any(name.startswith(p) for p in self.percpu_prefixes))


LOADER_PROFILES: dict[str, LoaderProfile] = {
    p.name: p for p in (
        LoaderProfile("merged", True, (".percpu",), (".percpu.",), 1, "section", "section15", True),
        # the seed revision matched any name starting with ".percpu", `.percpuX` included [V]
        LoaderProfile("v1", True, (".percpu",), (".percpu",), 1, "internal", "internal", False),
        # libbpf <= 1.7 (Debian ships 1.1.2): no notion of .percpu [V, measured]
        LoaderProfile("old", False, (), (), 1, "internal", "internal", False),
        # the suite's own raw loader: merged semantics, creates every map without probing
        LoaderProfile("raw", True, (".percpu",), (".percpu.",), 1, "section", "section15", False,
                      keeps_maps_on_failure=True),
        # fault injection: merged libbpf that ignores bpf_map__reuse_fd (every object creates and fills its own)
        LoaderProfile("broken-noreuse", True, (".percpu",), (".percpu.",), 1, "section", "section15", True,
                      reuses_fd=False),
    )
}


class OpenFailure(Exception):
    """bpf_object__open failed: the loader never offers anything to the kernel."""

    def __init__(self, error_class: str, message: str, err: int = LIBBPF_ERRNO__RELOC) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.message = message
        self.errno = err


@dataclass
class MapSpec:
    name: str  # what bpf_map__name() returns
    kernel_name: str  # the name given to BPF_MAP_CREATE
    section: str | None  # the ELF section of an internal map; None for a .maps map
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    internal: bool
    initial: bytes | None  # value_size bytes: section contents (zeros for NOBITS); None for .maps maps
    freeze: bool  # .rodata*: frozen after the initial write
    percpu_data: bool  # an internal map made from a .percpu* section
    section_offset: int = 0  # offset of a .maps map's variable in .maps (what map relocations match)
    # a PROG_ARRAY's static initialisation (`.values = { [i] = &prog }`): slot -> entry program name, written
    # into the map once every program is loaded (libbpf's bpf_object__init_prog_arrays)
    prog_values: dict[int, str] = field(default_factory=dict)


@dataclass
class Relo:
    insn_index: int  # the first slot of an ld_imm64 in ProgSpec.insns
    map_index: int  # index into PreparedObject.maps
    offset: int  # byte offset into the map value (map_value only)
    kind: str  # "map_value" | "map_fd"


@dataclass(frozen=True)
class FuncSpec:
    """One function of a linked program: where it starts, and its BTF FUNC (what func_info carries)."""

    name: str
    insn_off: int  # in ProgSpec.insns
    btf_id: int | None  # the FUNC's type id in the object's BTF; None without BTF
    exported: bool  # BTF_FUNC_GLOBAL linkage: verified on its own, replaceable by an extension


def freplace_target(section: str) -> str | None:
    """The function an extension program replaces, from its section `freplace/<func>` (libbpf's SEC name)."""
    base, _, func = section.lstrip("?").partition("/")
    return func if base == "freplace" and func else None


@dataclass
class ProgSpec:
    name: str
    section: str
    insns: list[Insn]  # the entry function with every subprogram it calls appended, calls re-targeted
    relos: list[Relo] = field(default_factory=list)
    funcs: list[FuncSpec] = field(default_factory=list)  # the entry first, then subprograms by position

    @property
    def autoload(self) -> bool:
        return not self.section.startswith("?")  # libbpf: a "?" section is not loaded by default

    @property
    def attach_func(self) -> str | None:
        """An extension program's target function, from its section `freplace/<func>`."""
        return freplace_target(self.section)

    def func(self, name: str) -> FuncSpec | None:
        return next((f for f in self.funcs if f.name == name), None)


@dataclass
class PreparedObject:
    obj_name: str
    maps: list[MapSpec]
    programs: list[ProgSpec]
    variables: list[tuple[str, str, int, int]]  # (name, section, offset, size) of every map section's VAR
    skipped_sections: list[str]
    log: list[str]

    def map_by_name(self, name: str) -> MapSpec:
        """By bpf_map__name, or by section name for an internal map (libbpf accepts both)."""
        for m in self.maps:
            if name in (m.name, m.section):
                return m
        raise KeyError(name)


def object_name(path: str | Path) -> str:
    """libbpf's object name: the file's base name cut at its first '.'."""
    return Path(path).name.split(".", 1)[0]


_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.]")


def sanitize_map_name(name: str) -> str:
    return _UNSAFE_NAME_CHARS.sub("_", name)


def internal_map_name(obj_name: str, section: str, *, percpu: bool = False) -> str:
    """libbpf's internal_map_name(): the kernel-visible name of a global-data map [V: libbpf 1.8.0 libbpf.c].

    The suffix (the section name) counts as at least 7 characters and is capped at 15 before anything else, so a
    long suffix leaves no room for the object name. The object name's first characters go in front unless the
    section name has a '.' after its first character (`.data.tally`) or, as libbpf 1.8 does for a
    LIBBPF_MAP_PERCPU map, `percpu` is set. Unsafe characters become '_'. (libbpf counts bytes; names here are
    ASCII.)

    A deliberate second implementation: oracle.predict.internal_name is the oracle's own, written apart so that
    the loader model and the prediction do not share a mistake; tests/test_map_names.py checks they agree.
    """
    sfx_len = min(max(7, len(section)), BPF_OBJ_NAME_LEN - 1)
    pfx_len = 0 if percpu or "." in section[1:] else min(BPF_OBJ_NAME_LEN - 1 - sfx_len, len(obj_name))
    return sanitize_map_name(obj_name[:pfx_len] + section[:sfx_len])


def map_uses_real_name(spec: MapSpec) -> bool:
    """libbpf's map_uses_real_name: bpf_map__name is the section name for a custom `.data.*`/`.rodata.*` map and,
    in merged libbpf, a per-CPU one, whatever bpf_map__reuse_fd later does to the map's other name. Read from
    the profile's own naming: such a map is named after its section."""
    return spec.internal and spec.section is not None and spec.name == spec.section


def reused_map_name(own: str, source_kernel_name: str, *, uses_real_name: bool = False) -> str:
    """bpf_map__name after bpf_map__reuse_fd (docs/object-sets.md rule 2): the kernel's name for the map, unless
    that is a full-length (15-character) prefix of the map's own name, which then stays [V: libbpf "Fix the name
    of a reused map", in 1.1.2 as in later releases]; a map that uses its real name keeps it (audit §A10)."""
    if uses_real_name:
        return own
    if len(source_kernel_name) == BPF_OBJ_NAME_LEN - 1 and own.startswith(source_kernel_name):
        return own
    return source_kernel_name


def round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


# -- section classification -----------------------------------------------------------------------------

_DATA, _RODATA, _BSS, _PERCPU = "data", "rodata", "bss", "percpu"


def _is_named(name: str, base: str) -> bool:
    return name == base or name.startswith(base + ".")


def _is_dwarf(name: str) -> bool:
    return name.startswith(".debug_")


def _classify(sec: Section, profile: LoaderProfile) -> str | None:
    """The global-data kind of a section, None for sections that make no map. Raises for unmodelled kinds."""
    if sec.executable or sec.name in _CONSUMED_SECTIONS or _is_dwarf(sec.name):
        return None
    if sec.type == "SHT_PROGBITS" and sec.size > 0:
        # libbpf checks .data and .rodata before .percpu: `.data.percpu`/`.data..percpu` are ordinary data
        if _is_named(sec.name, DATA_SEC):
            return _DATA
        if _is_named(sec.name, RODATA_SEC):
            return _RODATA
        if profile.is_percpu_section(sec.name):
            return _PERCPU
        if sec.name in _STRUCT_OPS_SECTIONS:
            raise OpenFailure("sim_unsupported", f"unsupported by the simulator: struct_ops section "
                                                 f"'{sec.name}'", errno.EOPNOTSUPP)
        return "unrecognized"
    if sec.type == "SHT_NOBITS" and _is_named(sec.name, BSS_SEC) and sec.size > 0:
        return _BSS
    return None


# -- BTF-defined maps -------------------------------------------------------------------------------------

_BTF_MAP_UINT_FIELDS = ("type", "max_entries", "key_size", "value_size", "map_flags", "numa_node")


def _btf_maps(btf: Btf) -> list[MapSpec]:
    """The maps of the `.maps` DATASEC, in its order (libbpf's bpf_object__init_user_btf_maps)."""
    sec = btf.datasecs().get(MAPS_SEC)
    if sec is None:
        return []
    out = []
    for vsi in sec.var_secinfos:
        var = btf.get(vsi.type_id)
        st = btf.get(btf.resolve(var.type_id))
        if st.kind != "struct":
            raise OpenFailure("bad_btf_map", f"libbpf: map '{var.name}': unexpected def kind {st.kind}.",
                              errno.EINVAL)
        spec = {"key_size": 0, "value_size": 0, "max_entries": 0, "map_flags": 0, "type": 0}
        for m in st.members:
            mt = btf.get(btf.resolve(m.type_id))
            if m.name in _BTF_MAP_UINT_FIELDS:
                arr = btf.get(btf.resolve(mt.type_id)) if mt.kind == "ptr" else None
                if arr is None or arr.kind != "array":
                    raise OpenFailure("bad_btf_map", f"libbpf: map '{var.name}': attr '{m.name}': expected "
                                                     "PTR -> ARRAY.", errno.EINVAL)
                spec[m.name] = arr.nelems
            elif m.name in ("key", "value") and mt.kind == "ptr":
                spec[f"{m.name}_size"] = btf.size_of(mt.type_id)
            elif m.name == "values":
                spec["value_size"] = _values_value_size(btf, var.name, spec, mt)
            else:
                raise OpenFailure("sim_unsupported", f"unsupported by the simulator: map '{var.name}' "
                                                     f"field '{m.name}'", errno.EOPNOTSUPP)
        out.append(MapSpec(name=var.name, kernel_name=var.name[:BPF_OBJ_NAME_LEN - 1], section=None,
                           type=spec["type"], key_size=spec["key_size"], value_size=spec["value_size"],
                           max_entries=spec["max_entries"], flags=spec["map_flags"], internal=False,
                           initial=None, freeze=False, percpu_data=False, section_offset=vsi.offset))
    return out


def _values_value_size(btf: Btf, map_name: str, spec: dict[str, int], values: BtfType) -> int:
    """libbpf's parse_btf_map_def for `__array(values, ...)`: only a prog array (map-in-map is not modelled),
    of 4-byte values, declared as a zero-length array of pointers to a function prototype [D]."""
    if spec["type"] != BPF_MAP_TYPE_PROG_ARRAY:
        if spec["type"] in (BPF_MAP_TYPE_ARRAY_OF_MAPS, BPF_MAP_TYPE_HASH_OF_MAPS):
            raise OpenFailure("sim_unsupported", f"unsupported by the simulator: map '{map_name}': map-in-map",
                              errno.EOPNOTSUPP)
        raise OpenFailure("bad_btf_map", f"libbpf: map '{map_name}': should be map-in-map or prog-array.",
                          errno.ENOTSUP)
    if spec["value_size"] not in (0, 4):
        raise OpenFailure("bad_btf_map", f"libbpf: map '{map_name}': conflicting value size "
                                         f"{spec['value_size']} != 4.", errno.EINVAL)
    if values.kind != "array" or values.nelems:
        raise OpenFailure("bad_btf_map", f"libbpf: map '{map_name}': prog-array value type is not a zero-sized "
                                         "array.", errno.EINVAL)
    ptr = btf.get(btf.resolve(values.type_id))
    target = btf.get(btf.resolve(ptr.type_id)) if ptr.kind == "ptr" else None
    if target is None or target.kind != "func_proto":
        raise OpenFailure("bad_btf_map", f"libbpf: map '{map_name}': prog-array value def is of unexpected "
                                         "kind.", errno.EINVAL)
    return 4


def _prog_values(facts: ObjectFacts, btf: Btf, maps: Sequence[MapSpec]) -> None:
    """Fill each prog array's `prog_values` from the `.rel.maps` relocations (libbpf's
    bpf_object__collect_map_relos): a relocation inside a map's variable names the entry program of slot
    (offset - offset of the `values` member) / 8 [D]."""
    relocs = facts.relocs.get(MAPS_SEC, [])
    sec = btf.datasecs().get(MAPS_SEC)
    if not relocs or sec is None:
        return
    entries = {f.name: f for f in facts.functions if f.is_program}
    for i, r in enumerate(relocs):
        name = r.symbol.name
        found = next(((m, v) for m in maps if not m.internal for v in sec.var_secinfos
                      if v.offset == m.section_offset and v.offset <= r.offset and r.offset + 8 <= v.offset + v.size),
                     None)
        if found is None:
            raise OpenFailure("bad_map_relo", f"libbpf: .maps relo #{i}: cannot find map '{name}' at rel->r_offset "
                                              f"{r.offset}", errno.EINVAL)
        spec, vsi = found
        if spec.type in (BPF_MAP_TYPE_ARRAY_OF_MAPS, BPF_MAP_TYPE_HASH_OF_MAPS):
            raise OpenFailure("sim_unsupported", f"unsupported by the simulator: map '{spec.name}': map-in-map",
                              errno.EOPNOTSUPP)
        if spec.type != BPF_MAP_TYPE_PROG_ARRAY:
            raise OpenFailure("bad_map_relo", f"libbpf: .maps relo #{i}: map '{spec.name}' has no values",
                              errno.EINVAL)
        prog = entries.get(name)
        if prog is None:
            raise OpenFailure("bad_map_relo", f"libbpf: .maps relo #{i}: '{name}' isn't a BPF program")
        sym_section = facts.section_by_index(r.symbol.section_index)
        if sym_section is None or sym_section.name != prog.section or r.symbol.value != prog.start * 8:
            raise OpenFailure("bad_map_relo", f"libbpf: .maps relo #{i}: '{name}' isn't an entry-point program")
        struct = btf.get(btf.resolve(btf.get(vsi.type_id).type_id))
        last = struct.members[-1] if struct.members else None
        if last is None or last.name != "values" or r.offset - vsi.offset < last.bit_offset // 8:
            raise OpenFailure("bad_map_relo", f"libbpf: .maps relo #{i}: not in map '{spec.name}' values",
                              errno.EINVAL)
        off = r.offset - vsi.offset - last.bit_offset // 8
        if off % 8:
            raise OpenFailure("bad_map_relo", f"libbpf: .maps relo #{i}: misaligned slot in map '{spec.name}'",
                              errno.EINVAL)
        spec.prog_values[off // 8] = name


# -- prepare ---------------------------------------------------------------------------------------------


def _internal_names(kind: str, section: str, obj_name: str, profile: LoaderProfile) -> tuple[str, str]:
    """(bpf_map__name, kernel name) of a global-data map."""
    kernel = internal_map_name(obj_name, section)
    if kind == _PERCPU:
        if profile.percpu_kernel_name == "section15":  # merged libbpf: no object prefix for LIBBPF_MAP_PERCPU
            kernel = internal_map_name(obj_name, section, percpu=True)
        if profile.percpu_map_name == "section" or section not in profile.percpu_exact:
            return section, kernel
        return kernel, kernel
    # map_uses_real_name(): custom .data.*/.rodata.* maps show their section name; .bss.* does not [D]
    if (kind == _DATA and section != DATA_SEC) or (kind == _RODATA and section != RODATA_SEC):
        return section, kernel
    return kernel, kernel


def _parse_btf(facts: ObjectFacts, log: list[str]) -> Btf | None:
    if facts.btf_data is None:
        return None
    try:
        return facts.btf
    except BtfError as e:
        log.append(f"libbpf: Error loading ELF section .BTF: {e}. Ignored and continue.")
        return None


def _fixed_btf(facts: ObjectFacts, btf: Btf, data_sections: dict[str, int]) -> Btf:
    """DATASEC sizes and variable offsets as libbpf fills them in before load."""
    sizes = {sec.name: sec.size for sec in facts.sections if sec.name in btf.datasecs()}
    sizes.update(data_sections)  # a percpu value_size rounded up by the profile shows in its DATASEC too

    def var_offset(section: str, var: str) -> int | None:
        sym = facts.variable_symbol(section, var)
        return sym.value if sym is not None else None

    try:
        return fixup_datasecs(btf, sizes, var_offset)
    except BtfError as e:
        raise OpenFailure("btf_fixup", f"libbpf: {e}", errno.ENOENT) from None


def programs_in_load_order(facts: ObjectFacts) -> list[Function]:
    index = {s.name: s.index for s in facts.sections}
    entries = [f for f in facts.functions if f.is_program]
    return sorted(entries, key=lambda f: index[f.section])  # stable: symbol order within a section


class _FunctionIndex:
    def __init__(self, facts: ObjectFacts) -> None:
        self.by_section: dict[str, list[Function]] = {}
        for f in facts.functions:
            self.by_section.setdefault(f.section, []).append(f)

    def containing(self, section: str, insn: int) -> Function | None:
        for f in self.by_section.get(section, ()):
            if f.start <= insn < f.start + len(f.insns):
                return f
        return None

    def starting(self, section: str, insn: int) -> Function | None:
        return next((f for f in self.by_section.get(section, ()) if f.start == insn), None)


def prepare(facts: ObjectFacts, profile: LoaderProfile) -> PreparedObject:
    """Open an object the way `profile`'s libbpf does; raises OpenFailure where its open fails."""
    obj_name = object_name(facts.path)
    log: list[str] = [f"libbpf: loading object '{obj_name}' from {facts.path}"]
    if facts.section("maps") is not None:
        raise OpenFailure("legacy_maps", "libbpf: elf: legacy map definitions in 'maps' section are not "
                                         "supported by libbpf v1.0+", errno.EOPNOTSUPP)
    btf = _parse_btf(facts, log)

    # Global-data sections in section order.
    data_kinds: dict[int, str] = {}
    skipped: list[str] = []
    for candidate in facts.sections:
        kind = _classify(candidate, profile)
        if kind == "unrecognized":
            log.append(f"libbpf: elf: skipping unrecognized data section({candidate.index}) {candidate.name}")
            skipped.append(candidate.name)
        elif kind is not None:
            data_kinds[candidate.index] = kind

    data_sizes = {}
    for idx, kind in data_kinds.items():
        sec = facts.section_by_index(idx)
        assert sec is not None
        align = profile.percpu_value_size_align if kind == _PERCPU else 1
        data_sizes[sec.name] = round_up(sec.size, align)
    fixed = _fixed_btf(facts, btf, data_sizes) if btf is not None else None

    maps: list[MapSpec] = []
    maps_sec = facts.section(MAPS_SEC)
    if maps_sec is not None:
        if fixed is None:
            raise OpenFailure("btf_missing", "libbpf: elf: .maps section needs BTF", errno.EINVAL)
        maps += _btf_maps(fixed)
        _prog_values(facts, fixed, maps)
    section_map: dict[int, int] = {}  # section index -> index in maps
    for idx, kind in data_kinds.items():
        sec = facts.section_by_index(idx)
        assert sec is not None
        name, kernel_name = _internal_names(kind, sec.name, obj_name, profile)
        size = data_sizes[sec.name]
        image = sec.data + bytes(size - len(sec.data))
        if kind == _PERCPU:
            mtype, flags = BPF_MAP_TYPE_PERCPU_ARRAY, 0  # never MMAPABLE/RDONLY_PROG, never frozen [S]
        else:
            mtype = BPF_MAP_TYPE_ARRAY
            flags = ((BPF_F_MMAPABLE if _mmapable(fixed, sec.name) else 0)
                     | (BPF_F_RDONLY_PROG if kind == _RODATA else 0))
        section_map[idx] = len(maps)
        maps.append(MapSpec(name=name, kernel_name=kernel_name, section=sec.name, type=mtype, key_size=4,
                            value_size=size, max_entries=1, flags=flags, internal=True, initial=image,
                            freeze=kind == _RODATA, percpu_data=kind == _PERCPU))
        log.append(f"libbpf: map '{name}' (global {'percpu ' if kind == _PERCPU else ''}data): at "
                   f"sec_idx {idx}, offset 0, flags {flags:x}.")

    variables = _variables(facts, fixed, [m for m in maps if m.internal])
    links = _collect_relos(facts, maps, section_map, maps_sec)
    programs = [_link(facts, fn, links, btf) for fn in programs_in_load_order(facts)]
    return PreparedObject(obj_name, maps, programs, variables, skipped, log)


def _mmapable(btf: Btf | None, section: str) -> bool:
    """libbpf's map_is_mmapable(): only a section whose DATASEC holds a non-static variable is mmap()ed
    (a section of static variables only, or one without BTF, is not) [V, measured on libbpf 1.1.2]."""
    if btf is None or section not in btf.datasecs():
        return False
    return any(btf.get(v.type_id).kind == "var" and btf.get(v.type_id).linkage != LINKAGE_STATIC
               for v in btf.datasecs()[section].var_secinfos)


def _variables(facts: ObjectFacts, fixed: Btf | None, data_maps: Sequence[MapSpec]
               ) -> list[tuple[str, str, int, int]]:
    out: list[tuple[str, str, int, int]] = []
    for m in data_maps:
        assert m.section is not None
        if fixed is None:  # an object without BTF: the symbol table still says where each object lives
            syms = sorted(facts.variables_in(m.section), key=lambda s: s.value)
            out += [(s.name, m.section, s.value, s.size) for s in syms]
        elif m.section in fixed.datasecs():  # (string-literal sections like .rodata.str1.1 have none)
            out += [(name, m.section, off, size) for name, off, size in fixed.datasec_vars(m.section)]
    return out


@dataclass
class _Links:
    calls: dict[tuple[str, int], int] = field(default_factory=dict)  # (section, insn) -> callee .text insn
    data: dict[tuple[str, int], tuple[str, int, int]] = field(default_factory=dict)  # -> (kind, map, off)


def _collect_relos(facts: ObjectFacts, maps: Sequence[MapSpec], section_map: dict[int, int],
                   maps_sec: Section | None) -> _Links:
    """Check and record every relocation of executable code, in ELF order; the first bad one fails."""
    funcs = _FunctionIndex(facts)
    text = facts.section(TEXT_SEC)
    links = _Links()
    for sec_name, relocs in facts.relocs.items():
        sec = facts.section(sec_name)
        if sec is None or not sec.executable:
            continue
        for r in relocs:
            idx = r.insn_index
            fn = funcs.containing(sec_name, idx)
            if fn is None:
                raise OpenFailure("bad_relo", f"libbpf: sec '{sec_name}': failed to find program symbol at "
                                              f"offset {r.offset}")
            insn = fn.insns[idx - fn.start]
            sym = r.symbol
            # libbpf names a relocation against a section symbol after the section: that is what a static
            # variable's relocation carries, so its message names the section, not the variable [I]
            is_call = insn.code == BPF_JMP | BPF_CALL
            if not is_call and not insn.is_ld_imm64:
                raise OpenFailure("bad_relo", f"libbpf: prog '{fn.name}': invalid relo against '{sym.name}' "
                                              f"for insns[{idx - fn.start}].code {insn.code:#x}")
            if sym.section_index == 0:
                raise OpenFailure("sim_unsupported", f"unsupported by the simulator: extern '{sym.name}'",
                                  errno.EOPNOTSUPP)
            if is_call:
                if insn.src != BPF_PSEUDO_CALL:
                    raise OpenFailure("bad_relo", f"libbpf: prog '{fn.name}': incorrect bpf_call opcode")
                if text is None or sym.section_index != text.index:
                    raise OpenFailure("sim_unsupported", "unsupported by the simulator: call of "
                                                         f"'{sym.name}' outside .text", errno.EOPNOTSUPP)
                links.calls[(sec_name, idx)] = sym.value // 8 + insn.imm + 1
                continue
            if sym.section_index >= SHN_LORESERVE:
                raise OpenFailure("bad_relo", f"libbpf: prog '{fn.name}': invalid relo against '{sym.name}' "
                                              f"in special section {sym.section_index:#x}; forgot to "
                                              "initialize global var?..")
            if text is not None and sym.section_index == text.index:
                raise OpenFailure("sim_unsupported", "unsupported by the simulator: address of subprogram "
                                                     f"'{sym.name}'", errno.EOPNOTSUPP)
            target = facts.section_by_index(sym.section_index)
            target_name = target.name if target is not None else f"#{sym.section_index}"
            if sym.section_index in section_map:
                # libbpf: insn[1].imm = insn[0].imm + st_value (st_value is 0 for a section symbol)
                links.data[(sec_name, idx)] = ("map_value", section_map[sym.section_index],
                                               insn.imm + sym.value)
            elif maps_sec is not None and sym.section_index == maps_sec.index:
                mi = next((i for i, m in enumerate(maps) if not m.internal and m.section_offset == sym.value),
                          None)
                if mi is None:
                    raise OpenFailure("bad_map_relo", f"libbpf: prog '{fn.name}': map relo failed to find "
                                                      f"map for section '{MAPS_SEC}', off {sym.value}")
                links.data[(sec_name, idx)] = ("map_fd", mi, 0)
            else:
                raise OpenFailure("bad_map_relo", f"libbpf: prog '{fn.name}': bad map relo against "
                                                  f"'{sym.name}' in section '{target_name}'")
    return links


def _func_spec(btf: Btf | None, name: str, insn_off: int, bind: str) -> FuncSpec:
    """Linkage is the BTF FUNC's (what the kernel reads from func_info); the ELF binding stands in without BTF."""
    tid = btf.find("func", name) if btf is not None else None
    if btf is None or tid is None:
        return FuncSpec(name, insn_off, None, bind == "STB_GLOBAL")
    return FuncSpec(name, insn_off, tid, btf.get(tid).linkage != LINKAGE_STATIC)


def _link(facts: ObjectFacts, entry: Function, links: _Links, btf: Btf | None = None) -> ProgSpec:
    """libbpf's bpf_object__reloc_code: append each called subprogram once, depth first, re-target calls."""
    funcs = _FunctionIndex(facts)
    insns: list[Insn] = list(entry.insns)
    relos: list[Relo] = []
    placed: dict[str, int] = {}  # subprogram name -> where its code starts in insns

    def add_data_relos(fn: Function, base: int) -> None:
        for i in range(len(fn.insns)):
            link = links.data.get((fn.section, fn.start + i))
            if link is not None:
                kind, map_index, offset = link
                relos.append(Relo(base + i, map_index, offset, kind))

    def reloc_code(fn: Function, base: int) -> None:
        for i in range(len(fn.insns)):
            insn = insns[base + i]
            if not insn.is_pseudo_call:
                continue
            target = links.calls.get((fn.section, fn.start + i))
            if target is None:
                # a call inside one section needs no relocation: imm is relative to the caller's position
                if fn.section != TEXT_SEC:
                    raise OpenFailure("sim_unsupported", "unsupported by the simulator: unrelocated call in "
                                                         f"'{fn.section}'", errno.EOPNOTSUPP)
                target = fn.start + i + fn.insns[i].imm + 1
            callee = funcs.starting(TEXT_SEC, target)
            if callee is None:
                raise OpenFailure("bad_relo", f"libbpf: prog '{fn.name}': no .text section found yet "
                                              "sub-program call exists")
            if callee.name not in placed:
                placed[callee.name] = len(insns)
                insns.extend(callee.insns)
                add_data_relos(callee, placed[callee.name])
                reloc_code(callee, placed[callee.name])
            insns[base + i] = replace(insns[base + i], imm=placed[callee.name] - (base + i) - 1)

    add_data_relos(entry, 0)
    reloc_code(entry, 0)
    relos.sort(key=lambda r: r.insn_index)
    func_specs = [_func_spec(btf, entry.name, 0, entry.bind)]
    for name, off in sorted(placed.items(), key=lambda kv: kv[1]):
        func_specs.append(_func_spec(btf, name, off, next(f.bind for f in facts.functions if f.name == name)))
    return ProgSpec(entry.name, entry.section, insns, relos, func_specs)


def resolve(prog: ProgSpec, map_fds: Sequence[int]) -> list[Insn]:
    """A copy of prog's code with each relocated ld_imm64 pointing at map_fds[map_index] (offset in imm2)."""
    out = list(prog.insns)
    for r in prog.relos:
        first, second = out[r.insn_index], out[r.insn_index + 1]
        if r.kind == "map_value":
            out[r.insn_index] = replace(first, src=BPF_PSEUDO_MAP_VALUE, imm=map_fds[r.map_index])
            out[r.insn_index + 1] = replace(second, imm=r.offset)
        else:
            out[r.insn_index] = replace(first, src=BPF_PSEUDO_MAP_FD, imm=map_fds[r.map_index])
            out[r.insn_index + 1] = replace(second, imm=0)
    return out
