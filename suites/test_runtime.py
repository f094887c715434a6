"""Per-CPU runtime: after the run schedule, a write on CPU i shows only in CPU i's slot, CPUs that did not run
(offline ones included) keep the image, shared sections see every run — all byte for byte as predicted."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from corpus.selftest import selftest_model
from generators.strategies import program_models
from suites.support import differential


@given(st.data())
def test_per_cpu_contents_after_runs_match_the_prediction(clang, backend, data):
    model = data.draw(program_models(cpus=backend.online_cpus), label="model")
    differential("runtime", backend, clang, model, ("runtime",))


def test_selftest_layout_runtime(clang, backend):
    differential("runtime-selftest", backend, clang, selftest_model(backend.online_cpus[:2]), ("runtime",))
