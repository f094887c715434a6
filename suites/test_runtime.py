"""Per-CPU runtime: after the run schedule, a write on CPU i shows only in CPU i's slot, CPUs that did not run
(offline ones included) keep the image, shared sections see every run — all byte for byte as predicted."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corpus import CORPUS
from generators.strategies import program_models
from suites.support import differential


@given(st.data())
def test_per_cpu_contents_after_runs_match_the_prediction(clang, backend, data):
    model = data.draw(program_models(cpus=backend.online_cpus), label="model")
    differential("runtime", backend, clang, model, ("runtime",))


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_runtime(clang, backend, name):
    differential(f"runtime-{name}", backend, clang, CORPUS[name](backend.online_cpus), ("runtime",))
