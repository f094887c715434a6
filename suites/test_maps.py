"""Map creation and initial contents: every map the loader creates (type, names, sizes, flags), and the bytes of
every possible CPU right after load, as the oracle predicts them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corpus import CORPUS
from generators.strategies import program_models
from suites.support import differential, predicted_reject


@given(st.data())
def test_maps_and_initial_images_match_the_prediction(clang, backend, request, data):
    model = data.draw(program_models(cpus=backend.online_cpus), label="model")
    expected, _ = differential("maps", backend, clang, model, ("compiler", "loader"))
    request.node.user_properties.append(("predicted_reject", int(predicted_reject(expected))))


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_maps(clang, backend, name):
    differential(f"maps-{name}", backend, clang, CORPUS[name](backend.online_cpus), ("compiler", "loader"))
