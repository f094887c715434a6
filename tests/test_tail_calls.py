"""Tail calls sharing per-CPU data (spec §7), layer by layer: the model and its strategy, both renderings, the
oracle, the simulator's loader and run, the raw kernel loader, and the comparison of `.maps` maps."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, find, given, settings

from backends.objload import LOADER_PROFILES, prepare
from backends.sim.observe import observe
from corpus.edges import tail_call_shared_variable
from generators.ctype import Scalar
from generators.model import (
    JMP_TABLE,
    Access,
    Add,
    Branch,
    Call,
    Function,
    ProgramModel,
    Run,
    Store,
    TailCall,
    Variable,
    dumps,
    loads,
    walk_ops,
)
from generators.render import lowered_value_size, render_global
from generators.strategies import program_models
from oracle.predict import predict
from oracle.profiles import profile
from oracle.runtime import MAX_TAIL_CALLS
from schema.result import compare, map_entry, new_env, new_result, validate
from suites.support import compile_global, compile_lowered, lowered_as_global, percpu_offsets, runs_of
from toolchain.uapi import BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_PROG_ARRAY

U32, U64 = Scalar("u32"), Scalar("u64")
POSSIBLE, ONLINE = 4, (1, 3)


def slots(result: dict, section: str, size: int, off: int = 0) -> list[int]:
    m = next(m for m in result["maps"] if m["section"] == section)
    return [int.from_bytes(bytes.fromhex(s)[off:off + size], "little") for s in m["after"]]


def jmp_table_entry(result: dict) -> dict:
    return next(m for m in result["maps"] if m["name"] == JMP_TABLE)


@pytest.fixture(scope="module")
def shared(clang):
    return compile_global(clang, tail_call_shared_variable(ONLINE))


def self_loop(section: str) -> ProgramModel:
    """prog0 tail-calls itself: the generator never draws a cycle, but the kernel's limit is well defined."""
    counter = Variable("n", U64, section, init=(5,))
    prog = Function("prog0", (Add(Access("n"), 1), TailCall("prog0"), Add(Access("n"), 1000)))
    return ProgramModel("loop", (counter,), (prog,), (Run("prog0", ONLINE[0]),))


# -- model and strategy --------------------------------------------------------------------------------------


def test_tail_call_round_trips_through_json():
    model = tail_call_shared_variable()
    assert loads(dumps(model)) == model
    assert model.has_tail_calls and model.prog_slot("prog1") == 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program_models())
def test_generated_tail_calls_come_from_programs_and_go_forward(model):
    order = [f.name for f in model.programs]
    for fn in model.functions:
        for op in walk_ops(fn.ops):
            if isinstance(op, TailCall):
                assert not fn.subprogram
                assert order.index(op.program) > order.index(fn.name)


def test_the_strategy_draws_tail_calls():
    model = find(program_models(), lambda m: m.has_tail_calls)
    assert len(model.programs) == 2 and TailCall("prog1") in walk_ops(model.programs[0].ops)


# -- rendering -----------------------------------------------------------------------------------------------


def test_both_renderings_compile_with_the_prog_array(clang, shared):
    assert "__array(values, int (void *));" in shared.source
    assert "bpf_tail_call(ctx, &jmp_table, 1);" in shared.source
    facts = shared.facts
    assert facts.section(".maps") is not None
    relocs = facts.relocs[".maps"]
    assert [(r.offset, r.symbol.name) for r in relocs] == [(24, "prog0"), (32, "prog1")]
    # every program is named in the table in model order, so clang keeps that order in the object
    assert [f.name for f in facts.functions if f.is_program] == ["prog0", "prog1"]
    lowered = compile_lowered(clang, shared)
    assert lowered.facts.relocs[".maps"] and "jmp_table SEC(\".maps\")" in lowered.source


def test_a_tail_call_from_a_subprogram_is_refused():
    v = Variable("v", U32, ".data")
    model = ProgramModel("bad", (v,), (Function("prog0", (Call("sub0"),)),
                                       Function("sub0", (TailCall("prog0"),), subprogram=True)))
    with pytest.raises(ValueError, match="only programs have a ctx"):
        render_global(model)


# -- oracle --------------------------------------------------------------------------------------------------


def test_oracle_runs_the_callee_on_the_callers_cpu_and_skips_the_rest(shared):
    r = predict(shared.model, shared.facts, profile("merged"), possible_cpus=POSSIBLE, online_cpus=list(ONLINE))
    assert validate(r) == []
    cpu_id = next(v for v in r["variables"] if v["name"] == "cpu_id")["offset"]
    hits = next(v for v in r["variables"] if v["name"] == "hits")["offset"]
    # prog0 stores 1, prog1 adds 1 on the same CPU; prog0's 0xDEAD after the tail call never happens
    assert slots(r, ".percpu", 8, hits) == [100, 2, 100, 2]
    assert slots(r, ".percpu", 4, cpu_id) == [0, 1, 0, 3]
    assert [run["retval"] for run in r["runs"]] == [[0], [0]]
    table = jmp_table_entry(r)
    assert (table["type"], table["created"], table["section"]) == ("prog_array", True, None)
    assert all(table[k] is None for k in ("kernel_name", "key_size", "value_size", "max_entries", "flags",
                                           "before", "after"))


def test_oracle_prog_array_shares_the_objects_fate(shared):
    def table(name: str) -> dict | None:
        r = predict(shared.model, shared.facts, profile(name), possible_cpus=POSSIBLE, online_cpus=list(ONLINE))
        return next((m for m in r["maps"] if m["name"] == JMP_TABLE), None)

    assert table("unpatched") is None  # old libbpf fails the open: no map at all
    assert table("merged-unpatched-kernel")["created"] is False  # the failed load tears every map down
    assert table("raw-unpatched")["created"] is True  # the raw loader keeps its maps


def test_tail_call_inside_a_branch_ends_the_caller(clang):
    a = Variable("a", U32, ".percpu", init=(1,))
    model = ProgramModel("branchy", (a,), (
        Function("prog0", (Branch(Access("a"), 0, (TailCall("prog1"),)), Store(Access("a"), 7))),
        Function("prog1", (Add(Access("a"), 10),)),
    ), (Run("prog0", 1),))
    c = compile_global(clang, model)
    r = predict(model, c.facts, profile("merged"), possible_cpus=2, online_cpus=[0, 1])
    assert slots(r, ".percpu", 4) == [1, 11]


def test_oracle_and_simulator_stop_at_the_kernels_tail_call_limit(clang):
    c = compile_global(clang, self_loop(".percpu"))
    r = predict(c.model, c.facts, profile("merged"), possible_cpus=POSSIBLE, online_cpus=list(ONLINE))
    # the first run plus 33 tail calls each add 1; the 34th bpf_tail_call fails and the caller adds 1000
    expected = 5 + (MAX_TAIL_CALLS + 1) + 1000
    assert slots(r, ".percpu", 8)[ONLINE[0]] == expected
    sim = observe(c.path, profile="merged", possible_cpus=POSSIBLE, online_cpus=list(ONLINE), runs=runs_of(c.model))
    assert slots(sim, ".percpu", 8)[ONLINE[0]] == expected
    assert compare(r, sim).ok


# -- simulator -----------------------------------------------------------------------------------------------


def test_objload_reads_the_static_prog_array(clang, shared):
    prepared = prepare(shared.facts, LOADER_PROFILES["merged"])
    table = prepared.maps[0]
    assert (table.name, table.section, table.type) == (JMP_TABLE, None, BPF_MAP_TYPE_PROG_ARRAY)
    assert (table.key_size, table.value_size, table.max_entries) == (4, 4, 2)
    assert table.prog_values == {0: "prog0", 1: "prog1"}
    assert all(not m.prog_values for m in prepared.maps[1:])
    lowered = prepare(compile_lowered(clang, shared).facts, LOADER_PROFILES["merged"])
    values = {m.name: (m.type, m.prog_values) for m in lowered.maps if not m.internal}
    assert values == {JMP_TABLE: (BPF_MAP_TYPE_PROG_ARRAY, {0: "prog0", 1: "prog1"}),
                      "percpu": (BPF_MAP_TYPE_PERCPU_ARRAY, {})}


def test_simulated_tail_call_writes_the_callers_cpu_slot(shared):
    r = observe(shared.path, profile="merged", possible_cpus=POSSIBLE, online_cpus=list(ONLINE),
                runs=runs_of(shared.model))
    assert validate(r) == []
    hits = next(v for v in r["variables"] if v["name"] == "hits")["offset"]
    cpu_id = next(v for v in r["variables"] if v["name"] == "cpu_id")["offset"]
    assert slots(r, ".percpu", 8, hits) == [100, 2, 100, 2]
    assert slots(r, ".percpu", 4, cpu_id) == [0, 1, 0, 3]
    table = jmp_table_entry(r)
    assert (table["type"], table["created"], table["before"]) == ("prog_array", True, None)
    expected = predict(shared.model, shared.facts, profile("merged"), possible_cpus=POSSIBLE,
                       online_cpus=list(ONLINE))
    assert compare(expected, r).ok


# -- real kernel ---------------------------------------------------------------------------------------------


def _kernel():  # noqa: ANN202 - (the kernel observe module, possible CPUs, online CPUs)
    from backends.kernel import observe as kobserve
    from backends.kernel import probes

    try:
        kobserve.require_bpf()
    except kobserve.BackendUnavailable as e:
        pytest.skip(str(e))
    return kobserve, len(probes.possible_cpus()), probes.online_cpus()


@pytest.mark.kernel
def test_raw_loader_fills_the_prog_array(clang):
    """The lowered rendering runs on any kernel: the callee's writes land in the slot of the CPU prog0 ran on
    only if the raw loader filled jmp_table (otherwise the tail call falls through to the 0xDEAD store)."""
    kobserve, possible, online = _kernel()
    cpus = tuple(online[:2])
    c = compile_global(clang, tail_call_shared_variable(cpus))
    lowered = compile_lowered(clang, c)
    offsets = percpu_offsets(c)
    size = lowered_value_size(c.model, offsets, ".percpu")
    initial = {"percpu": c.facts.section(".percpu").data.ljust(size, b"\0")}
    observed = kobserve.observe_raw(lowered.path, runs=runs_of(c.model), initial_values=initial)
    assert observed["load"]["ok"], observed["load"]
    table = jmp_table_entry(observed)
    assert (table["type"], table["created"], table["max_entries"], table["after"]) == ("prog_array", True, 2, None)
    slots_after = next(m for m in observed["maps"] if m["name"] == "percpu")["after"]
    assert len(slots_after) == possible
    for cpu, slot in enumerate(slots_after):
        raw = bytes.fromhex(slot)
        hits = struct.unpack_from("<Q", raw, offsets["hits"])[0]
        cpu_id = struct.unpack_from("<I", raw, offsets["cpu_id"])[0]
        assert (hits, cpu_id) == ((2, cpu) if cpu in cpus else (100, 0))
    expected = predict(c.model, c.facts, profile("merged"), possible_cpus=possible, online_cpus=online)
    assert compare(expected, lowered_as_global(observed, expected, c.model), layers=("runtime",)).ok


@pytest.mark.kernel
def test_kernel_stops_at_the_predicted_tail_call_limit(clang):
    """Plain .data, so any kernel runs it: both loaders fill jmp_table and the kernel's limit is the oracle's."""
    kobserve, possible, online = _kernel()
    model = self_loop(".data")
    model = ProgramModel(model.name, model.variables, model.functions, (Run("prog0", online[0]),))
    c = compile_global(clang, model)
    raw = kobserve.observe_raw(c.path, runs=runs_of(model))
    expected = predict(model, c.facts, profile("raw-unpatched"), possible_cpus=possible,
                       online_cpus=online)
    assert slots(raw, ".data", 8) == slots(expected, ".data", 8) == [5 + MAX_TAIL_CALLS + 1 + 1000]
    assert compare(expected, raw, layers=("runtime",)).ok
    lib = kobserve.observe_libbpf(c.path, libbpf=kobserve.open_libbpf(), runs=runs_of(model))
    assert slots(lib, ".data", 8) == slots(raw, ".data", 8)


# -- comparison ----------------------------------------------------------------------------------------------


def test_maps_without_a_section_are_compared_by_name():
    def result(*maps: dict) -> dict:
        r = new_result("sim", new_env("merged"), None)
        r["maps"] = list(maps)
        return r

    def entry(name: str, map_type: str, value_size: int | None = 4) -> dict:
        return map_entry(name=name, kernel_name=name, section=None, type=map_type, key_size=4,
                         value_size=value_size, max_entries=1, flags=0, internal=False, created=True)

    expected = result(entry(JMP_TABLE, "prog_array", value_size=None), entry("percpu", "percpu_array"))
    same = result(entry("percpu", "percpu_array"), entry(JMP_TABLE, "prog_array"))
    assert compare(expected, same).ok  # order does not matter; a null in the prediction is no opinion
    other = result(entry(JMP_TABLE, "array"), entry("percpu", "percpu_array"))
    assert [d.field for d in compare(expected, other).divergences] == [f"maps[{JMP_TABLE}].type"]
    missing = result(entry("percpu", "percpu_array"))
    assert [d.field for d in compare(expected, missing).divergences] == [f"maps[{JMP_TABLE}]"]
