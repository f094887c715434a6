"""Objects side by side (docs/object-sets.md): each object has its own per-CPU map unless a map fd is reused;
a reused map keeps the first object's image; an extension program attached to a target program runs in place
of its global subprogram on the same CPU's slot. Predicted by the oracle, observed on every backend, compared
field by field; and the lowered rendering of the same set leaves the per-CPU contents predicted for the
global one under the feature."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corpus.sets import SET_CORPUS
from generators.strategies import object_sets
from suites.sets import check_set_lowered_twin, differential_set
from suites.support import predicted_reject


@given(st.data())
def test_object_sets_match_the_prediction(request, clang, backend, data):
    model = data.draw(object_sets(cpus=backend.online_cpus), label="object set")
    expected, _ = differential_set("sets", backend, clang, model)
    rejected = any(predicted_reject(o) for o in expected["objects"])
    request.node.user_properties.append(("predicted_reject", int(rejected)))


@given(st.data())
def test_object_set_lowered_twin_leaves_the_predicted_per_cpu_contents(clang, backend, data):
    check_set_lowered_twin(clang, backend, data.draw(object_sets(cpus=backend.online_cpus), label="object set"))


@pytest.mark.parametrize("name", sorted(SET_CORPUS))
def test_corpus_object_sets(clang, backend, name):
    differential_set(f"sets-{name}", backend, clang, SET_CORPUS[name](backend.online_cpus))


@pytest.mark.parametrize("name", sorted(SET_CORPUS))
def test_corpus_object_set_lowered_twin(clang, backend, name):
    check_set_lowered_twin(clang, backend, SET_CORPUS[name](backend.online_cpus))
