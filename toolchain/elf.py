"""Read a BPF object file into plain facts: sections, symbols, relocations, functions, raw BTF.

pyelftools does the ELF parsing; this module only selects what loaders and the oracle need. A corrupt or
non-BPF file raises `ObjectError` with a one-line reason.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import SymbolTableSection

from toolchain.btf import Btf
from toolchain.insn import Insn, decode

EM_BPF = 247
R_BPF_64_64 = 1  # ld_imm64 against a symbol: map or global variable reference
R_BPF_64_32 = 10  # call against a function symbol


class ObjectError(ValueError):
    """The file is not a readable BPF object."""


@dataclass(frozen=True)
class Section:
    index: int
    name: str
    type: str  # "SHT_PROGBITS", "SHT_NOBITS", ...
    flags: int
    size: int
    data: bytes  # zeros for SHT_NOBITS, as a loader sees them

    @property
    def executable(self) -> bool:
        return bool(self.flags & SH_FLAGS.SHF_EXECINSTR)

    @property
    def writable(self) -> bool:
        return bool(self.flags & SH_FLAGS.SHF_WRITE)

    @property
    def alloc(self) -> bool:
        return bool(self.flags & SH_FLAGS.SHF_ALLOC)


@dataclass(frozen=True)
class Symbol:
    index: int
    name: str
    section_index: int  # 0 when undefined; >= 0xff00 for special indices
    value: int
    size: int
    bind: str  # "STB_GLOBAL", "STB_LOCAL", "STB_WEAK"
    type: str  # "STT_OBJECT", "STT_FUNC", "STT_SECTION", "STT_NOTYPE"
    visibility: str


@dataclass(frozen=True)
class Reloc:
    offset: int  # byte offset inside the target section
    symbol: Symbol
    type: int

    @property
    def insn_index(self) -> int:
        return self.offset // 8


@dataclass(frozen=True)
class Function:
    name: str
    section: str
    start: int  # instruction index inside the section
    insns: tuple[Insn, ...]
    bind: str

    @property
    def is_program(self) -> bool:
        # libbpf: functions in .text are subprograms, functions anywhere else are entry programs
        return self.section != ".text"


@dataclass
class ObjectFacts:
    path: Path
    sha256: str
    sections: list[Section]
    symbols: list[Symbol]
    relocs: dict[str, list[Reloc]] = field(default_factory=dict)  # keyed by the section they patch
    btf_data: bytes | None = None

    @cached_property
    def btf(self) -> Btf | None:
        """The parsed `.BTF`, once per object (read-only: fix-ups build new types); BtfError when malformed."""
        return Btf.parse(self.btf_data) if self.btf_data is not None else None

    def section(self, name: str) -> Section | None:
        return next((s for s in self.sections if s.name == name), None)

    def require_section(self, name: str) -> Section:
        """The section a compiled model declares: its absence is a KeyError naming the object."""
        sec = self.section(name)
        if sec is None:
            raise KeyError(f"{self.path}: no section {name}")
        return sec

    def section_by_index(self, index: int) -> Section | None:
        return next((s for s in self.sections if s.index == index), None)

    @cached_property
    def functions(self) -> list[Function]:
        out = []
        for sym in self.symbols:
            sec = self.section_by_index(sym.section_index)
            if sym.type != "STT_FUNC" or sec is None or not sec.executable:
                continue
            start = sym.value // 8
            insns = decode(sec.data[sym.value:sym.value + sym.size])
            out.append(Function(sym.name, sec.name, start, tuple(insns), sym.bind))
        return out

    def function(self, name: str) -> Function:
        for f in self.functions:
            if f.name == name:
                return f
        raise KeyError(name)

    def variable_symbol(self, section: str, name: str) -> Symbol | None:
        sec = self.section(section)
        if sec is None:
            return None
        return next((s for s in self.symbols if s.name == name and s.section_index == sec.index
                     and s.type in ("STT_OBJECT", "STT_NOTYPE")), None)

    def variables_in(self, section: str) -> list[Symbol]:
        sec = self.section(section)
        if sec is None:
            return []
        return [s for s in self.symbols if s.section_index == sec.index and s.type == "STT_OBJECT"]

    def data_sections(self) -> list[Section]:
        """Allocated, non-executable sections with contents: candidates for global-data maps."""
        return [s for s in self.sections if s.alloc and not s.executable and s.type in ("SHT_PROGBITS",
                                                                                        "SHT_NOBITS")]


_CACHE: dict[tuple[str, int, int, int], ObjectFacts] = {}
_CACHE_LIMIT = 256


def read_object(path: str | os.PathLike[str]) -> ObjectFacts:
    """Facts of one object; memoised by (path, inode, size, mtime) since every stage reads the same file."""
    path = Path(path)
    try:
        st = path.stat()
        key = _key(path, st)
        if key in _CACHE:
            return _CACHE[key]
        raw = path.read_bytes()
    except OSError as e:
        raise ObjectError(f"{path}: cannot read: {e.strerror}") from None
    facts = _read(path, raw)
    if len(_CACHE) >= _CACHE_LIMIT:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = facts
    return facts


def remember(path: str | Path, facts: ObjectFacts) -> None:
    """Take `facts`, read elsewhere from the same bytes (by the VM's host), as this file's: parsing is the
    costliest step of an observation under emulation. Refused when the file's bytes are another object's."""
    path = Path(path)
    st = path.stat()
    if hashlib.sha256(path.read_bytes()).hexdigest() != facts.sha256:
        raise ObjectError(f"{path}: the facts handed over are of another object")
    mine = replace(facts, path=path)
    if "btf" in facts.__dict__:  # a parse the host already made travels with the facts
        mine.__dict__["btf"] = facts.__dict__["btf"]
    _CACHE[_key(path, st)] = mine


def _key(path: Path, st: os.stat_result) -> tuple[str, int, int, int]:
    # abspath, not resolve: resolving costs an lstat per path component, and over the vm's 9p each is
    # milliseconds; the inode, size and mtime already tell a changed or another file apart
    return (os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns)


def _read(path: Path, raw: bytes) -> ObjectFacts:
    try:
        return _parse(path, raw)
    except (ELFError, ValueError, KeyError, IndexError, AttributeError) as e:
        if isinstance(e, ObjectError):
            raise
        raise ObjectError(f"{path}: corrupt object: {type(e).__name__}: {e}".strip()) from None


def _parse(path: Path, raw: bytes) -> ObjectFacts:
    import io

    elf = ELFFile(io.BytesIO(raw))
    if elf["e_machine"] not in ("EM_BPF", EM_BPF):
        raise ObjectError(f"{path}: not a BPF object (machine {elf['e_machine']})")
    sections: list[Section] = []
    by_index = {}
    elf_sections = list(elf.iter_sections())
    for i, sec in enumerate(elf_sections):
        if i == 0:
            continue
        data = bytes(sec["sh_size"]) if sec["sh_type"] == "SHT_NOBITS" else sec.data()
        s = Section(i, sec.name, sec["sh_type"], sec["sh_flags"], sec["sh_size"], data)
        sections.append(s)
        by_index[i] = s
    symtab = next((sec for sec in elf_sections if sec.name == ".symtab"), None)
    if not isinstance(symtab, SymbolTableSection):
        raise ObjectError(f"{path}: no symbol table")
    symbols = []
    for i, sym in enumerate(symtab.iter_symbols()):
        shndx = sym["st_shndx"]
        shndx = shndx if isinstance(shndx, int) else 0
        name = sym.name
        if sym["st_info"]["type"] == "STT_SECTION" and shndx in by_index:
            name = by_index[shndx].name
        symbols.append(Symbol(i, name, shndx, sym["st_value"], sym["st_size"], sym["st_info"]["bind"],
                              sym["st_info"]["type"], sym["st_other"]["visibility"]))
    relocs: dict[str, list[Reloc]] = {}
    for sec in elf_sections:
        if not isinstance(sec, RelocationSection):
            continue
        target = by_index.get(sec["sh_info"])
        # only code and .maps relocations matter to a loader; debug sections carry thousands of them
        if target is None or not (target.executable or target.name == ".maps"):
            continue
        relocs[target.name] = [Reloc(r["r_offset"], symbols[r["r_info_sym"]], r["r_info_type"])
                               for r in sec.iter_relocations()]
    btf = next((sec for sec in elf_sections if sec.name == ".BTF"), None)
    return ObjectFacts(path, hashlib.sha256(raw).hexdigest(), sections, symbols, relocs,
                       btf.data() if btf is not None else None)
