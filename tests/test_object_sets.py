"""Object sets in the model, the generator and the oracle (docs/object-sets.md), and that the set properties
can fail: a wrong oracle (extensions never attached, reuse ignored) and broken simulator rows are caught."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings

from corpus.sets import SET_CORPUS
from generators.model import ObjectSet, dumps, from_jsonable, loads_set
from generators.render import render_global
from generators.strategies import object_sets
from oracle.objectset import reused_map_name
from schema.result import NOT_OPENED
from suites.backends import SimBackend
from suites.sets import compile_set, differential_set, predict_for, set_plan


class _Profile:
    profile, possible_cpus, online_cpus = "merged", 2, (0, 1)


def _predict(clang, model: ObjectSet, profile: str = "merged") -> dict:
    backend = _Profile()
    backend.profile = profile
    return predict_for(backend, compile_set(clang, model), clang)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(object_sets())
def test_generated_sets_round_trip_and_keep_their_invariants(model):
    assert loads_set(dumps(model)) == model
    programs = [p.name for m in model.objects for p in m.programs]
    assert len(programs) == len(set(programs)), "program names are unique across a set"
    for r in model.reuse:
        src, obj = model.object(r.source), model.object(r.object)
        same = [(v.name, v.type) for v in src.variables if v.section == r.section]
        assert same == [(v.name, v.type) for v in obj.variables if v.section == r.section]
    for m in model.objects:
        for ext in m.extensions:
            assert "freplace/" in render_global(m)
            assert model.owner(ext.replaces.program) is model.objects[0]


def test_a_reused_map_that_uses_its_real_name_keeps_it():
    """audit §A10: a per-CPU or custom-section map answers bpf_map__name with its section name after a reuse
    from another section, and the loader model agrees with the oracle."""
    from backends.objload import reused_map_name as loader_rule

    assert reused_map_name(".percpu.b", ".percpu.a", keeps_section_name=True) == ".percpu.b"
    assert loader_rule(".percpu.b", ".percpu.a", uses_real_name=True) == ".percpu.b"
    assert reused_map_name("obj.data", "src.data") == loader_rule("obj.data", "src.data") == "src.data"


def test_reused_map_name_follows_libbpf():
    assert reused_map_name(".percpu", ".percpu") == ".percpu"
    assert reused_map_name("second.data", "first.data") == "first.data"
    assert reused_map_name(".percpu.looooooooong", ".percpu.loooooo") == ".percpu.looooooooong"


def test_oracle_shares_one_map_only_when_reused(clang):
    own = _predict(clang, SET_CORPUS["two_objects_own_maps"]((0, 1)))
    reused = _predict(clang, SET_CORPUS["reused_map_keeps_first_image"]((0, 1)))
    first, second = (o["maps"][0] for o in own["objects"])
    assert first["before"] != second["before"] and first["after"] != second["after"]
    first, second = (o["maps"][0] for o in reused["objects"])
    assert first["before"] == second["before"] and first["after"] == second["after"]


def test_oracle_runs_the_extension_in_its_target_program_only(clang):
    doc = _predict(clang, SET_CORPUS["freplace_shared_variable"]((0, 1)))
    seen = doc["objects"][0]["maps"][0]["after"]
    assert bytes.fromhex(seen[1])[:8] == (0x101).to_bytes(8, "little")  # a_prog on CPU 1: the extension ran
    assert bytes.fromhex(seen[0])[:8] == (0xBAD).to_bytes(8, "little")  # a_other on CPU 0: its own a_sub


def test_an_object_after_a_failed_one_is_not_opened(clang):
    model = SET_CORPUS["freplace_static_target"]((0, 1))
    third = dataclasses.replace(model.objects[0], name="third", functions=tuple(
        dataclasses.replace(f, name="c_" + f.name, ops=()) for f in model.objects[0].programs))
    doc = _predict(clang, dataclasses.replace(model, objects=(*model.objects, third)))
    ext = doc["objects"][1]["programs"][0]
    assert (ext["verdict"], ext["message_class"], ext["attached"]) == ("rejected", "freplace_static_target", False)
    assert doc["objects"][2]["open"]["error_class"] == NOT_OPENED


def test_set_plan_names_lowered_maps_and_skips_reused_initial_values(clang):
    from suites.sets import compile_set_lowered

    compiled = compile_set(clang, SET_CORPUS["freplace_shared_variable"]((0, 1)))
    plan = set_plan(compile_set_lowered(clang, compiled), ({"percpu": b"a"}, {"percpu": b"b"}))
    assert plan.reuse == ((1, "percpu", 0),) and plan.attach == ((1, "b_ext", "a_prog", "a_sub"),)
    assert plan.initial_values == ({"percpu": b"a"}, {})


@pytest.mark.parametrize(("row", "case"), [("merged-noreuse", "reused_map_keeps_first_image"),
                                           ("merged-nofreplace", "freplace_shared_variable")])
def test_set_property_catches_a_broken_simulator(clang, row, case, tmp_path, monkeypatch):
    monkeypatch.setenv("PERCPU_FAILURES", str(tmp_path))
    backend = SimBackend("merged", 2, (0, 1), sim_profile=row)
    with pytest.raises(AssertionError, match="divergence"):
        differential_set("sets", backend, clang, SET_CORPUS[case]((0, 1)))
    bundle = next(tmp_path.iterdir())
    assert isinstance(from_jsonable(__import__("json").loads((bundle / "model.json").read_text())), ObjectSet)


def test_set_property_passes_on_the_faithful_simulator(clang):
    backend = SimBackend("merged", 2, (0, 1))
    for case in SET_CORPUS.values():
        differential_set("sets", backend, clang, case((0, 1)))


def _kernel_raw(clang):
    from suites.backends import KernelBackend, Unavailable

    try:
        return KernelBackend("raw", None, clang)
    except Unavailable as e:
        pytest.skip(str(e))


@pytest.mark.kernel
def test_set_lowered_twin_on_the_kernel_catches_an_oracle_that_ignores_reuse(clang, tmp_path, monkeypatch):
    import oracle.objectset
    from suites.sets import check_set_lowered_twin

    backend = _kernel_raw(clang)
    case = SET_CORPUS["reused_map_keeps_first_image"](backend.online_cpus)
    check_set_lowered_twin(clang, backend, case)  # the faithful oracle agrees with this kernel
    monkeypatch.setenv("PERCPU_FAILURES", str(tmp_path))
    monkeypatch.setattr(oracle.objectset, "_apply_reuse", lambda *args: True)  # every object keeps its own map
    with pytest.raises(AssertionError, match=r"\[runtime\]"):
        check_set_lowered_twin(clang, backend, case)


def test_set_property_catches_an_oracle_that_never_attaches(clang, tmp_path, monkeypatch):
    import oracle.objectset

    monkeypatch.setenv("PERCPU_FAILURES", str(tmp_path))
    monkeypatch.setattr(oracle.objectset, "_attach", lambda *args: None)
    with pytest.raises(AssertionError, match=r"\[runtime\]"):
        differential_set("sets", SimBackend("merged", 2, (0, 1)), clang,
                         SET_CORPUS["freplace_shared_variable"]((0, 1)))
