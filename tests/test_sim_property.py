"""Property: every generated program, rendered with global per-CPU variables, loads on the `merged` profile
(unless a per-CPU section exceeds the allocator's 32 KiB, which fails the map with E2BIG) and every
observation keeps the result schema."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from backends.sim.observe import observe
from generators.model import ProgramModel
from generators.render import render_global
from generators.strategies import program_models
from schema.result import validate
from toolchain.clang import Clang, ToolchainError, compile_c

POSSIBLE, ONLINE = 4, [0, 1, 3]

try:
    CLANG: Clang | None = Clang.find()
except ToolchainError:
    CLANG = None


@pytest.mark.skipif(CLANG is None, reason="clang not found")
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program_models(cpus=(0, 1, 2, 3)))
def test_generated_programs_load_on_merged(model: ProgramModel):
    assert CLANG is not None
    path = compile_c(CLANG, render_global(model), name=model.name)
    runs = [(r.program, r.cpu, r.count) for r in model.schedule]
    result = observe(path, profile="merged", possible_cpus=POSSIBLE, online_cpus=ONLINE, runs=runs)
    assert validate(result) == []
    assert result["open"]["ok"]
    failed = [m for m in result["maps"] if m.get("message_class")]
    if failed:
        # the first map that fails ends the load: later maps are never created, no program is offered
        (big,) = failed
        assert big["message_class"] == "e2big" and big["type"] == "percpu_array"
        assert (big["value_size"] + 7) // 8 * 8 > 32768 and not big["created"]
        assert not any(m["created"] for m in result["maps"][result["maps"].index(big):])
        assert {p["verdict"] for p in result["programs"]} == {"not_loaded"}
        return
    assert all(m["created"] for m in result["maps"])
    for p in result["programs"]:
        assert p["verdict"] == "accepted", p
        assert p["xlated_insns"] is not None
    for run in result["runs"]:
        assert (run["retval"] is None) == (run["cpu"] not in ONLINE), run
    for m in result["maps"]:
        if m["type"] == "prog_array":  # the tail calls' jmp_table holds programs, not bytes
            assert m["before"] is None and m["after"] is None
            continue
        slots = 4 if m["type"] == "percpu_array" else 1
        assert len(m["before"]) == len(m["after"]) == slots
        if m["type"] == "percpu_array":
            # a CPU that never ran anything keeps the one initial image
            idle = set(range(POSSIBLE)) - {r["cpu"] for r in result["runs"] if r["retval"] is not None}
            assert all(m["after"][c] == m["before"][0] for c in idle)
