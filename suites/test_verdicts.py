"""Program verdicts: which programs load, and for each rejection its errno and message class, as predicted for
the backend's profile (old libbpf's open failure and an unpatched kernel's refusal included, never skipped)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corpus import CORPUS
from generators.strategies import program_models
from suites.support import differential, predicted_reject


@given(st.data())
def test_verdicts_match_the_prediction(clang, backend, request, data):
    model = data.draw(program_models(cpus=backend.online_cpus), label="model")
    expected, _ = differential("verdicts", backend, clang, model, ("loader", "verifier"))
    request.node.user_properties.append(("predicted_reject", int(predicted_reject(expected))))


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_verdicts(clang, backend, name):
    differential(f"verdicts-{name}", backend, clang, CORPUS[name](backend.online_cpus), ("loader", "verifier"))
