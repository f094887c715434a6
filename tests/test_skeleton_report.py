"""The skeleton check's own parts: the plan's JSON form, the comparison and its layers, and the oracle's
layout rules (BTF alignment, sizeof, the resize's BTF rule)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from generators.ctype import Array, Field, Record, Scalar
from oracle.skeleton import btf_align
from schema.result import LAYERS
from schema.skeleton import SKELETON_FIELD_LAYERS, SkeletonPlan, compare_skeleton

images = st.dictionaries(st.sampled_from([".percpu", ".percpu.a", ".percpu.b"]), st.binary(max_size=16), max_size=2)


@given(images, st.dictionaries(st.sampled_from([".percpu", ".percpu.a"]), st.integers(1, 8192), max_size=1),
       st.booleans(), st.lists(st.tuples(st.sampled_from(["p0", "p1"]), st.integers(0, 3), st.integers(1, 3))),
       images, st.integers(0, 3))
def test_a_plan_survives_its_json_form(writes, resize, load, runs, values, cpu):
    plan = SkeletonPlan(writes, resize, load, tuple(runs), values, {k: (cpu, v) for k, v in values.items()})
    assert SkeletonPlan.from_json(plan.to_json()) == plan


REPORT = {"harness": "compiles", "open": True, "load": 0,
          "maps": {".percpu": {"struct_size": 8, "value_size": 8, "cpus_loaded": ["00" * 8] * 2,
                               "resize": {"rc": 0, "btf_value_type": True}, "cpu_out_of_range": -34}}}


def test_every_layer_is_a_result_layer():
    assert set(SKELETON_FIELD_LAYERS.values()) <= set(LAYERS)


def test_the_same_report_has_no_divergence():
    assert compare_skeleton(REPORT, REPORT).ok


@given(st.sampled_from(["open", "load", "maps.struct_size", "maps.cpus_loaded", "maps.resize.btf_value_type",
                        "maps.cpu_out_of_range"]))
def test_a_changed_field_is_blamed_on_its_layer(where):
    import copy

    observed = copy.deepcopy(REPORT)
    node = observed
    parts = ["maps", ".percpu", *where.split(".")[1:]] if where.startswith("maps.") else [where]
    for p in parts[:-1]:
        node = node[p]
    node[parts[-1]] = "changed"
    cmp = compare_skeleton(REPORT, observed)
    assert [d.field for d in cmp.divergences] == [".".join(parts)]
    assert cmp.divergences[0].layer == SKELETON_FIELD_LAYERS[parts[-1]]


def test_a_header_that_did_not_compile_is_the_only_divergence():
    cmp = compare_skeleton(REPORT, {"harness": "size_assert_failed"})
    assert [d.field for d in cmp.divergences] == ["harness"]


def test_a_null_expectation_is_not_compared():
    cmp = compare_skeleton({**REPORT, "load": None}, {**REPORT, "load": -22})
    assert cmp.ok and cmp.not_compared == 1


def test_btf_keeps_no_aligned_attribute():
    u8, u32 = Scalar("u8"), Scalar("u32")
    assert btf_align(Record("t", "struct", (Field("f0", u8, aligned=16),), aligned=16)) == 1
    assert btf_align(Record("t", "struct", (Field("f0", u8), Field("f1", u32)), packed=True)) == 1
    assert btf_align(Record("t", "struct", (Field("f0", u8), Field("f1", u32)))) == 4
    assert btf_align(Array(Scalar("u64"), 3)) == 8
