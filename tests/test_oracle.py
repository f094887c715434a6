"""The oracle on the upstream selftest layout: each profile's prediction, written out as the spec states it."""

from __future__ import annotations

import dataclasses

import pytest

from corpus.selftest import selftest_model
from generators.ctype import Array, Scalar
from generators.model import Variable
from oracle.predict import internal_name, predict
from oracle.profiles import UnknownProfile, profile
from schema.result import compare, validate
from suites.support import compile_global
from suites.test_oracle_image import check_images

POSSIBLE = 4


@pytest.fixture(scope="module")
def compiled(clang):
    return compile_global(clang, selftest_model(cpus=(0, 2)))


def predicted(compiled, name, possible=POSSIBLE):
    return predict(compiled.model, compiled.facts, profile(name), possible_cpus=possible, online_cpus=[0, 2])


def by_section(result):
    return {m["section"]: m for m in result["maps"]}


def test_internal_map_name_follows_libbpf():
    assert internal_name("plain_data", ".data") == "plain_da.data"
    assert internal_name("plain_data", ".rodata") == "plain_da.rodata"
    assert internal_name("x", ".bss") == "x.bss"
    assert internal_name("obj", ".data.tally") == ".data.tally"
    assert internal_name("obj", ".percpu.looooooooong") == ".percpu.loooooo"
    assert internal_name("my-obj", ".data") == "my_obj.data"


def test_merged_names_types_and_sizes(compiled):
    result = predicted(compiled, "merged")
    assert not validate(result)
    maps = by_section(result)
    pc = maps[".percpu"]
    assert (pc["name"], pc["kernel_name"], pc["type"], pc["flags"]) == (".percpu", ".percpu", "percpu_array", 0)
    assert pc["value_size"] == compiled.facts.section(".percpu").size
    long = maps[".percpu.looooooooong"]
    assert (long["name"], long["kernel_name"]) == (".percpu.looooooooong", ".percpu.loooooo")
    ordinary = maps[".data.percpu"]
    assert (ordinary["type"], ordinary["flags"]) == ("array", 0x400)
    assert maps[".bss"]["name"] == "test_glo.bss"


def test_v1_prefixes_the_plain_percpu_map_with_the_object_name(compiled):
    maps = by_section(predicted(compiled, "v1"))
    assert maps[".percpu"]["name"] == "test_glo.percpu"
    assert maps[".percpu.data"]["name"] == ".percpu.data"


def test_runs_write_only_their_own_cpu_and_offline_cpus_keep_the_image(compiled):
    result = predicted(compiled, "merged")
    pc = by_section(result)[".percpu"]
    facts = compiled.facts
    cpu_id_off = facts.variable_symbol(".percpu", "cpu_id").value
    data_off = facts.variable_symbol(".percpu", "data").value
    for cpu in range(POSSIBLE):
        after = bytes.fromhex(pc["after"][cpu])
        ran = cpu in (0, 2)
        assert int.from_bytes(after[data_off:data_off + 4], "little", signed=True) == (1 if ran else -1)
        assert int.from_bytes(after[cpu_id_off:cpu_id_off + 4], "little") == (cpu if ran else 0)
        if not ran:
            assert pc["after"][cpu] == pc["before"][cpu]
    counter = bytes.fromhex(by_section(result)[".bss"]["after"][0])
    assert int.from_bytes(counter, "little") == 2  # shared: both runs add to one copy


def test_unpatched_open_fails_with_the_relocation_message(compiled):
    result = predicted(compiled, "unpatched")
    assert result["open"]["ok"] is False
    # the variable named is the first one clang's instructions reference, in libbpf's relocation order
    first = next(r.symbol.name for r in compiled.facts.relocs["raw_tp"] if r.symbol.name in
                 {v.name for v in compiled.model.variables if v.section == ".percpu"})
    assert result["open"]["message"] == (f"libbpf: prog 'update_percpu_data': bad map relo against '{first}' "
                                         "in section '.percpu'")
    assert [p["verdict"] for p in result["programs"]] == ["not_loaded"]
    assert result["maps"] == []


def test_raw_loader_on_unpatched_kernel_is_rejected_by_the_verifier(compiled):
    result = predicted(compiled, "raw-unpatched")
    (prog,) = result["programs"]
    assert (prog["verdict"], prog["errno"], prog["message_class"]) == ("rejected", 22, "no_direct_value_access")


def test_merged_libbpf_on_unpatched_kernel_skips_the_map_and_rejects_the_program(compiled):
    result = predicted(compiled, "merged-unpatched-kernel")
    assert by_section(result)[".percpu"]["created"] is False
    # the failed load tears the object down: no map is left, nothing ran
    assert by_section(result)[".data.percpu"]["created"] is False
    assert result["programs"][0]["message_class"] == "map_not_created"
    assert result["programs"][0]["message"] == "BPF map '.percpu' is referenced but wasn't created"


def test_a_section_over_32k_is_e2big_and_nothing_loads(clang):
    model = selftest_model()
    big = Variable("big", Array(Scalar("u64"), 4097), ".percpu.b")
    model = dataclasses.replace(model, variables=(*model.variables, big))
    compiled = compile_global(clang, model)
    result = predict(model, compiled.facts, profile("merged"), possible_cpus=2, online_cpus=[0, 1])
    assert all(not m["created"] for m in result["maps"])
    assert [p["verdict"] for p in result["programs"]] == ["not_loaded"]


def test_images_match_section_bytes_and_a_wrong_image_is_caught(compiled):
    result = predicted(compiled, "merged")
    check_images(result, compiled.facts, POSSIBLE)
    pc = by_section(result)[".percpu"]
    pc["before"][3] = "00" * pc["value_size"]  # image only on some CPUs: the property must see it
    with pytest.raises(AssertionError, match="cpu3"):
        check_images(result, compiled.facts, POSSIBLE)


def test_comparison_names_profile_differences(compiled):
    cmp = compare(predicted(compiled, "merged"), predicted(compiled, "v1"))
    fields = {d.field for d in cmp.divergences}
    assert fields == {"maps[.percpu].name", "maps[.percpu].kernel_name"}
    assert cmp.blame() == "loader"


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(UnknownProfile, match="unknown profile 'bogus'"):
        profile("bogus")
