"""The lowered twin: the same model rendered the legacy way (one 1-entry PERCPU_ARRAY per section, reached with
bpf_map_lookup_elem) runs on any kernel. After the same schedule its per-CPU contents must equal the oracle's
prediction for the *global* rendering under the feature — on the real kernel this is the runtime ground truth."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corpus import CORPUS
from generators.model import ProgramModel
from generators.render import lowered_value_size, section_ident
from generators.strategies import program_models
from oracle.predict import predict
from oracle.profiles import profile
from schema.profiles import lowered_profile
from suites.support import (
    assert_same,
    backend_meta,
    compile_global,
    compile_lowered,
    lowered_as_global,
    percpu_offsets,
    runs_of,
)


def check_lowered_twin(clang, backend, model: ProgramModel) -> None:
    compiled = compile_global(clang, model)
    # the feature's semantics, with the kernel facts that hold for a rendering without per-CPU data too
    expected = predict(model, compiled.facts, profile(lowered_profile(backend.profile)),
                       possible_cpus=backend.possible_cpus, online_cpus=list(backend.online_cpus), clang=clang.version)
    lowered = compile_lowered(clang, compiled)
    offsets = percpu_offsets(compiled)
    initial = {}
    for m in expected["maps"]:
        if m["type"] == "percpu_array":
            size = lowered_value_size(model, offsets, m["section"])
            initial[section_ident(m["section"])] = compiled.facts.require_section(m["section"]).data.ljust(size, b"\0")
    observed = backend.observe(lowered, runs_of(model), initial_values=initial)
    assert_same(f"lowered-{backend.name}", compiled, expected, lowered_as_global(observed, expected, model),
                extra_sources={"lowered.c": lowered.source}, layers=("runtime",), meta=backend_meta(backend))


@given(st.data())
def test_lowered_twin_leaves_the_predicted_per_cpu_contents(clang, backend, data):
    check_lowered_twin(clang, backend, data.draw(program_models(cpus=backend.online_cpus), label="model"))


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_lowered_twin(clang, backend, name):
    check_lowered_twin(clang, backend, CORPUS[name](backend.online_cpus))
