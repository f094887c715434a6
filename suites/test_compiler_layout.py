"""Compiler conformance: clang places every generated variable as the C model says, and the BTF DATASEC, once
fixed up from the symbol table the way libbpf does it, describes exactly that placement."""

from __future__ import annotations

from hypothesis import example, given

from corpus.selftest import selftest_model
from generators.model import ProgramModel
from generators.strategies import program_models
from suites.support import compile_global
from toolchain.btf import Btf, fixup_datasecs
from toolchain.elf import ObjectFacts


def check_placement(model: ProgramModel, facts: ObjectFacts) -> None:
    by_section: dict[str, list[tuple[int, int, str]]] = {}
    for var in model.variables:
        sym = facts.variable_symbol(var.section, var.name)
        assert sym is not None, f"{var.name} is not in {var.section}"
        assert sym.size == var.type.size, f"{var.name}: clang size {sym.size} != model size {var.type.size}"
        assert sym.value % var.type.align == 0, f"{var.name}: offset {sym.value} not {var.type.align}-aligned"
        by_section.setdefault(var.section, []).append((sym.value, sym.value + sym.size, var.name))
    for section, spans in by_section.items():
        spans.sort()
        for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
            assert end <= start, f"{a} and {b} overlap in {section}"
        size = facts.require_section(section).size
        assert spans[-1][1] <= size, f"{section} ({size} bytes) does not cover {spans[-1][2]}"


def check_datasecs(model: ProgramModel, facts: ObjectFacts) -> None:
    assert facts.btf_data is not None, "no .BTF section"
    sizes = {s.name: s.size for s in facts.sections}

    def var_offset(section: str, name: str) -> int | None:
        sym = facts.variable_symbol(section, name)
        return sym.value if sym else None

    btf = fixup_datasecs(Btf.parse(facts.btf_data), sizes, var_offset)
    for section in model.sections():
        expected = {(v.name, var_offset(section, v.name), v.type.size)
                    for v in model.variables if v.section == section}
        assert set(btf.datasec_vars(section)) == expected, f"DATASEC {section} after fix-up"
        assert btf.datasecs()[section].size == sizes[section], f"DATASEC {section} size"


@given(program_models())
@example(selftest_model())
def test_clang_places_variables_as_the_c_model_says(clang, model):
    compiled = compile_global(clang, model)
    check_placement(model, compiled.facts)


@given(program_models())
@example(selftest_model())
def test_fixed_up_datasec_lists_exactly_the_section_variables(clang, model):
    compiled = compile_global(clang, model)
    check_datasecs(model, compiled.facts)
