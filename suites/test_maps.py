"""Map creation and initial contents: every map the loader creates (type, names, sizes, flags), and the bytes of
every possible CPU right after load, as the oracle predicts them."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from corpus.selftest import selftest_model
from generators.strategies import program_models
from suites.support import differential, predicted_reject


@given(st.data())
def test_maps_and_initial_images_match_the_prediction(clang, backend, request, data):
    model = data.draw(program_models(cpus=backend.online_cpus), label="model")
    expected, _ = differential("maps", backend, clang, model, ("compiler", "loader"))
    request.node.user_properties.append(("predicted_reject", int(predicted_reject(expected))))


def test_selftest_layout_maps(clang, backend):
    differential("maps-selftest", backend, clang, selftest_model(backend.online_cpus[:2]), ("compiler", "loader"))
