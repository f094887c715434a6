"""Program verdicts: which programs load, and for each rejection its errno and message class, as predicted for
the backend's profile (old libbpf's open failure and an unpatched kernel's refusal included, never skipped)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from corpus.selftest import selftest_model
from generators.strategies import program_models
from suites.support import differential, predicted_reject


@given(st.data())
def test_verdicts_match_the_prediction(clang, backend, request, data):
    model = data.draw(program_models(cpus=backend.online_cpus), label="model")
    expected, _ = differential("verdicts", backend, clang, model, ("loader", "verifier"))
    request.node.user_properties.append(("predicted_reject", int(predicted_reject(expected))))


def test_selftest_layout_verdicts(clang, backend):
    differential("verdicts-selftest", backend, clang, selftest_model(backend.online_cpus[:2]),
                 ("loader", "verifier"))
