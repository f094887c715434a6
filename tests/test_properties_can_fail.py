"""Every conformance property must be able to fail: each is run here against a deliberately wrong input."""

from __future__ import annotations

import dataclasses

import pytest

from corpus.selftest import selftest_model
from generators.ctype import Array, Scalar
from suites.support import compile_global
from suites.test_compiler_layout import check_datasecs, check_placement


@pytest.fixture(scope="module")
def compiled(clang):
    return compile_global(clang, selftest_model())


def test_placement_rejects_a_model_with_the_wrong_size(compiled):
    model = compiled.model
    wrong = dataclasses.replace(model, variables=tuple(
        dataclasses.replace(v, type=Array(Scalar("s32"), 8)) if v.name == "nums" else v for v in model.variables))
    with pytest.raises(AssertionError, match="nums: clang size 28 != model size 32"):
        check_placement(wrong, compiled.facts)


def test_placement_rejects_a_model_with_the_wrong_section(compiled):
    model = compiled.model
    wrong = dataclasses.replace(model, variables=tuple(
        dataclasses.replace(v, section=".data.percpu") if v.name == "data" else v for v in model.variables))
    with pytest.raises(AssertionError, match="data is not in .data.percpu"):
        check_placement(wrong, compiled.facts)


def test_datasec_check_rejects_a_variable_the_section_does_not_have(compiled):
    model = compiled.model
    extra = dataclasses.replace(model.variables[0], name="ghost")
    wrong = dataclasses.replace(model, variables=(*model.variables, extra))
    with pytest.raises(AssertionError, match="DATASEC .percpu after fix-up"):
        check_datasecs(wrong, compiled.facts)
