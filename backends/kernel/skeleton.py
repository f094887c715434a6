"""bpftool skeletons: the struct a skeleton gives user space for each global-data section, measured by the C
compiler, so its layout can be checked against the object's DATASECs (spec §5).

`bpftool gen skeleton` writes the header; a tiny harness that includes it prints `sizeof` and `offsetof` of
every member of every section struct. An old bpftool that cannot open the object (e.g. a `.percpu` section)
is a finding, not an error: the report carries its message.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from backends.kernel.observe import BackendUnavailable
from toolchain.elf import ObjectFacts

__all__ = ["SectionStruct", "SkeletonReport", "check_skeleton", "layout_mismatches", "section_ident"]

TIMEOUT = 60.0


@dataclass(frozen=True)
class SectionStruct:
    ident: str  # the skeleton's member name: "data", "rodata", "data_tally", "percpu_x"
    struct: str  # "<obj>__<ident>"
    section: str | None  # the object section it mirrors, when one matches the ident
    size: int
    members: dict[str, int]  # member -> offsetof, in declaration order


@dataclass(frozen=True)
class SkeletonReport:
    ok: bool
    name: str
    message: str | None = None  # bpftool's (or the harness compiler's) failure text when not ok
    structs: dict[str, SectionStruct] = field(default_factory=dict)  # by ident
    header: str = ""

    def by_section(self) -> dict[str, SectionStruct]:
        return {s.section: s for s in self.structs.values() if s.section is not None}


def section_ident(section: str) -> str:
    """The identifier a skeleton derives from a data section name: no leading dot, other characters '_'."""
    return re.sub(r"[^A-Za-z0-9_]", "_", section.lstrip("."))


def _object_name(obj_path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", obj_path.name.split(".")[0]) or "obj"


def _struct_bodies(header: str, name: str) -> dict[str, str]:
    """ident -> the text between the braces of `struct <name>__<ident> { ... }`."""
    out = {}
    for m in re.finditer(rf"struct {re.escape(name)}__(\w+)\s*\{{", header):
        depth, start = 1, m.end()
        pos = start
        while depth and pos < len(header):
            depth += {"{": 1, "}": -1}.get(header[pos], 0)
            pos += 1
        out[m.group(1)] = header[start:pos - 1]
    return out


def _member_names(body: str) -> list[str]:
    """Names of the top-level members of a struct body (nested struct/union bodies are skipped)."""
    names: list[str] = []
    decl: list[str] = []  # the characters of the member being read
    depth = 0
    for ch in body:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == ";" and depth == 0:
            text = re.sub(r"__attribute__\s*\(\(.*?\)\)", "", "".join(decl)).strip()
            m = re.search(r"(\w+)\s*(?:\[[^\]]*\]\s*)*$", text)
            if m:
                names.append(m.group(1))
            decl = []
            continue
        if depth == 0:
            decl.append(ch)
    return names


def _harness(name: str, structs: dict[str, list[str]]) -> str:
    lines = ["#include <stddef.h>", "#include <stdio.h>", f'#include "{name}.skel.h"', "", "int main(void)", "{"]
    for ident, members in structs.items():
        st = f"struct {name}__{ident}"
        lines.append(f'\tprintf("S %s %zu\\n", "{ident}", sizeof({st}));')
        lines += [f'\tprintf("M %s %s %zu\\n", "{ident}", "{m}", offsetof({st}, {m}));' for m in members]
    return "\n".join([*lines, "\treturn 0;", "}", ""])


def _run(argv: list[str], what: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)
    except FileNotFoundError:
        raise BackendUnavailable(f"{what} not found: {argv[0]}") from None
    except subprocess.TimeoutExpired:
        raise BackendUnavailable(f"{what} timed out after {TIMEOUT:g}s") from None


def check_skeleton(obj_path: str | os.PathLike[str], *, bpftool: str = "bpftool", cc: str = "gcc",
                   sections: list[str] | None = None) -> SkeletonReport:
    """Generate the skeleton of `obj_path` and measure its section structs.

    `sections` names the object's data sections so each struct can be tied to one (the default reads them
    from the object). Raises BackendUnavailable when bpftool, the C compiler or libbpf's headers are missing.
    """
    obj = Path(obj_path)
    name = _object_name(obj)
    if sections is None:
        from toolchain.elf import read_object

        sections = [s.name for s in read_object(obj).data_sections()]
    gen = _run([bpftool, "gen", "skeleton", str(obj), "name", name], "bpftool")
    if gen.returncode != 0:
        return SkeletonReport(False, name, gen.stderr.strip() or f"bpftool exited {gen.returncode}")
    header = gen.stdout
    members = {ident: _member_names(body) for ident, body in _struct_bodies(header, name).items()}
    if not members:
        return SkeletonReport(True, name, None, {}, header)
    if shutil.which(cc) is None:
        raise BackendUnavailable(f"C compiler not found: {cc}")
    with tempfile.TemporaryDirectory(prefix="percpu-skel-") as tmp:
        Path(tmp, f"{name}.skel.h").write_text(header)
        Path(tmp, "harness.c").write_text(_harness(name, members))
        exe = str(Path(tmp, "harness"))
        # -O1 drops the skeleton's unused static functions, so nothing needs libbpf at link time
        comp = _run([cc, "-O1", "-w", "-I", tmp, "-o", exe, str(Path(tmp, "harness.c"))], "C compiler")
        if comp.returncode != 0:
            missing = re.search(r"fatal error: (bpf/\S+): No such file", comp.stderr)
            if missing:
                raise BackendUnavailable(f"libbpf headers missing ({missing.group(1)}); install libbpf-dev")
            first = next((ln for ln in comp.stderr.splitlines() if "error" in ln), comp.stderr.strip())
            return SkeletonReport(False, name, f"skeleton header does not compile: {first}", {}, header)
        out = _run([exe], "skeleton harness")
    if out.returncode != 0:
        return SkeletonReport(False, name, f"skeleton harness exited {out.returncode}", {}, header)
    by_ident = {section_ident(s): s for s in sections}
    sizes: dict[str, int] = {}
    offsets: dict[str, dict[str, int]] = {ident: {} for ident in members}
    for line in out.stdout.splitlines():
        parts = line.split()
        if parts[0] == "S":
            sizes[parts[1]] = int(parts[2])
        elif parts[0] == "M":
            offsets[parts[1]][parts[2]] = int(parts[3])
    structs = {ident: SectionStruct(ident, f"{name}__{ident}", by_ident.get(ident), sizes[ident], offsets[ident])
               for ident in members}
    return SkeletonReport(True, name, None, structs, header)


def layout_mismatches(report: SkeletonReport, facts: ObjectFacts) -> list[str]:
    """Where the skeleton's structs disagree with the object: a variable's offset. Not the size: bpftool's
    struct ends with its last non-static member, rounded up to the members' alignment, so `sizeof` may be above
    or below the section size (audit §C; oracle.skeleton.struct_size predicts it and test_skeleton.py checks)."""
    problems = []
    for section, st in report.by_section().items():
        if facts.section(section) is None:
            continue
        for sym in facts.variables_in(section):
            if sym.name not in st.members:
                problems.append(f"{section}: variable {sym.name} missing from struct {st.struct}")
            elif st.members[sym.name] != sym.value:
                problems.append(f"{section}: offsetof({st.struct}, {sym.name}) = {st.members[sym.name]}, "
                                f"symbol offset {sym.value}")
    return problems
