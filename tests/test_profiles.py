"""The profile registry (schema.profiles): every profile has its rows on both sides and no row is orphaned, the
modifier suffix round-trips, probed features choose the right name, and each profile (JIT off included) runs
on the simulator and agrees with the oracle on the upstream selftest layout."""

from __future__ import annotations

import ast
import errno
import itertools
from pathlib import Path

import pytest

from backends.kernel import probes
from backends.objload import LOADER_PROFILES
from backends.sim import kernel as sim_kernel
from backends.sim.observe import FAULT_ROWS, observe, probe_percpu_data, sim_rows
from corpus.selftest import selftest_model
from corpus.sets import SET_CORPUS
from generators.asm import MapShape, VerifierCase
from oracle import profiles as oracle_profiles
from oracle.predict import predict
from oracle.verifier import predict_case
from schema import messages
from schema import profiles as registry
from schema.result import compare
from suites.backends import SimBackend
from suites.sets import check_set_lowered_twin, compile_set, compile_set_lowered, differential_set, set_plan
from suites.support import compile_global, runs_of
from toolchain.insn import BPF_DW, call_helper, exit_insn, ld_map_value, ldx_mem, mov64_imm

ROOT = Path(__file__).resolve().parent.parent
JIT_REQUIRED = "program requires BPF JIT compiler but it is not available"
ALL_NAMES = [registry.join_modifiers(p, mods) for p in registry.PROFILES
             for n in range(len(registry.MODIFIERS) + 1)
             for mods in itertools.combinations(registry.MODIFIERS, n)]


def test_every_profile_has_an_oracle_row_and_a_sim_row():
    for row in registry.PROFILES.values():
        assert oracle_profiles.LIBBPF[row.libbpf_axis].name == row.libbpf_axis
        assert oracle_profiles.KERNEL[row.kernel_axis].name == row.kernel_axis
        assert LOADER_PROFILES[row.loader_row].name == row.loader_row
        assert sim_kernel.KERNEL_PROFILES[row.sim_kernel_row].name == row.sim_kernel_row
    assert set(oracle_profiles.PROFILES) == set(registry.PROFILES)


def test_no_orphan_rows_on_either_side():
    rows = registry.PROFILES.values()
    assert set(oracle_profiles.LIBBPF) == {r.libbpf_axis for r in rows}
    assert set(oracle_profiles.KERNEL) == {r.kernel_axis for r in rows}
    faults = FAULT_ROWS.values()
    assert set(LOADER_PROFILES) == {r.loader_row for r in rows} | {loader for loader, _ in faults}
    assert set(sim_kernel.KERNEL_PROFILES) == {r.sim_kernel_row for r in rows} | {k for _, k in faults}
    assert not set(FAULT_ROWS) & set(registry.PROFILES)


def test_every_modifier_has_its_behaviour_on_both_sides():
    assert set(oracle_profiles.KERNEL_MODIFIERS) == set(registry.MODIFIERS)
    assert set(sim_kernel.KERNEL_MODIFIERS) == set(registry.MODIFIERS)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_suffix_parser_round_trips(name):
    row, modifiers = registry.lookup(name)
    assert registry.join_modifiers(row.name, modifiers) == name
    assert registry.split_modifiers(name) == (row.name, modifiers)
    assert oracle_profiles.profile(name).name == name


@pytest.mark.parametrize("bad", ["bogus", "merged+bogus", "merged+noext+noext", "+noext", "raw"])
def test_unknown_names_list_the_known_profiles(bad):
    with pytest.raises(registry.UnknownProfile, match="known: merged, v1, .*\\+noext, \\+jitoff"):
        registry.lookup(bad)
    with pytest.raises(registry.UnknownProfile, match="known: merged, v1"):
        oracle_profiles.profile(bad)
    with pytest.raises(registry.UnknownProfile, match="known: merged, v1"):
        sim_rows(bad)


def test_v1_is_the_v1_kernel_on_both_sides():
    oracle_kernel = oracle_profiles.profile("v1").kernel
    _, sim_row = sim_rows("v1")
    assert oracle_kernel.name == sim_row.name == "patched-v1"
    assert oracle_kernel.percpu_check_order == sim_row.percpu_direct_value_checks == ("max_entries", "offset", "jit")
    assert sim_rows("v1+jitoff")[1].name == "patched-v1+jitoff"


def test_modifiers_reach_the_rows():
    assert not oracle_profiles.profile("merged+jitoff").kernel.jit_enabled
    assert not sim_rows("merged+jitoff")[1].jit_enabled
    assert not oracle_profiles.profile("raw-patched+noext+jitoff").kernel.ext_programs
    assert not sim_rows("raw-patched+noext+jitoff")[1].ext_programs
    assert sim_rows("merged-norewrite+noext")[1].name == "broken-norewrite+noext"


# features as probes.probe_all reports them
HOST_618 = {"percpu_data": False, "percpu_direct_value": False, "jit": True, "freplace": False}
MERGED_JIT_OFF = {"percpu_data": False, "percpu_direct_value": True, "jit": False, "freplace": True}
MERGED = {"percpu_data": True, "percpu_direct_value": True, "jit": True, "freplace": True}


@pytest.mark.parametrize(("loader", "knows", "features", "name"), [
    ("libbpf", False, HOST_618, "unpatched+noext"),
    ("libbpf", True, HOST_618, "merged-unpatched-kernel+noext"),
    ("raw", True, HOST_618, "raw-unpatched+noext"),
    ("libbpf", True, MERGED, "merged"),
    ("libbpf", False, MERGED, "old-patched-kernel"),
    ("raw", True, MERGED, "raw-patched"),
    # the merged kernel with the JIT off: libbpf's probe fails, but the kernel has the feature
    ("libbpf", True, MERGED_JIT_OFF, "merged+jitoff"),
    ("libbpf", False, MERGED_JIT_OFF, "old-patched-kernel+jitoff"),
    ("raw", True, MERGED_JIT_OFF, "raw-patched+jitoff"),
    # a failed extension probe with the JIT off is the JIT's refusal (+jitoff), not the type's (+noext): the
    # probe's bool cannot tell the two apart, and on 7.3.4 it was the JIT's
    ("raw", True, {**HOST_618, "jit": False}, "raw-unpatched+jitoff"),
    ("libbpf", True, {**MERGED_JIT_OFF, "freplace": False}, "merged+jitoff"),
    # a document from before the direct-value probe: percpu_data alone decides; unprobed facts select nothing
    ("libbpf", True, {"percpu_data": True}, "merged"),
    ("raw", True, {"percpu_data": None, "jit": None, "freplace": None}, "raw-unpatched"),
])
def test_profile_for_probe(loader, knows, features, name):
    assert registry.profile_for_probe(loader, knows, features) == name


def test_profile_for_probe_refuses_a_raw_loader_that_does_not_know_percpu():
    with pytest.raises(registry.UnknownProfile, match="no profile for loader 'raw'"):
        registry.profile_for_probe("raw", False, MERGED)


def test_registry_and_rows_stay_independent():
    def imports(path: Path) -> set[str]:
        tree = ast.parse(path.read_text())
        out = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        return out | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}

    assert not {m for m in imports(ROOT / "schema/profiles.py") if m.startswith(("oracle", "backends"))}
    for path in (ROOT / "oracle").glob("*.py"):
        assert not {m for m in imports(path) if m.startswith("backends")}, path
    for path in (ROOT / "backends/sim").glob("*.py"):
        assert not {m for m in imports(path) if m.startswith("oracle")}, path


# -- the JIT off (net.core.bpf_jit_enable=0 on a kernel without CONFIG_BPF_JIT_ALWAYS_ON) ----------------------

PERCPU_READ = [*ld_map_value(1, 3, 0), ldx_mem(BPF_DW, 0, 1, 0), exit_insn()]


def test_sim_jit_off_refuses_per_cpu_data_after_verification():
    k = sim_kernel.SimKernel("patched+jitoff")
    fd = k.map_create(sim_kernel.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 1, 0, "p")
    with pytest.raises(sim_kernel.SimError) as e:
        k.prog_load([*ld_map_value(1, fd, 0), ldx_mem(BPF_DW, 0, 1, 0), exit_insn()], "p")
    assert (e.value.errno, e.value.error_class, e.value.message) == (errno.EINVAL, "jit_required", JIT_REQUIRED)
    # a verifier refusal still comes first: the JIT question is asked once the program is verified
    with pytest.raises(sim_kernel.SimError) as e:
        k.prog_load([*ld_map_value(1, fd, 8), ldx_mem(BPF_DW, 0, 1, 0), exit_insn()], "p")
    assert e.value.error_class == "offset_out_of_range"
    # nothing is inlined without jit_requested: the helper call stays
    _, xlated, _ = k.prog_load([call_helper(8), exit_insn()], "cpu")
    assert xlated == 2
    assert not probe_percpu_data(k)
    assert probe_percpu_data(sim_kernel.SimKernel("patched"))


def test_oracle_jit_off_verifier_cases():
    percpu = VerifierCase(map=MapShape(type="percpu_array", value_size=8, max_entries=1, rdonly=False), reg=1,
                          offset=0, accesses=(), store_cpu=0)
    kernel = oracle_profiles.kernel_axis("patched+jitoff")
    verdict = predict_case(percpu, kernel)
    assert (verdict.verdict, verdict.errno, verdict.message_class, verdict.message) == \
        ("rejected", errno.EINVAL, "jit_required", JIT_REQUIRED)
    array = VerifierCase(map=MapShape(type="array", value_size=8, max_entries=1, rdonly=False), reg=1, offset=0,
                         accesses=(), store_cpu=0)
    on, off = predict_case(array, oracle_profiles.KERNEL["patched"]), predict_case(array, kernel)
    assert on.xlated_insns == off.xlated_insns + 2  # bpf_get_smp_processor_id inlined only with the JIT on


def test_jit_required_message_class():
    assert messages.classify([f"{JIT_REQUIRED}"], errno.EINVAL) == "jit_required"
    assert "jit_required" in messages.CLASSES


def test_sim_per_cpu_checks_ask_the_jit_first():
    """map_direct_value_addr on a JIT without the per-CPU instruction: EOPNOTSUPP even for an offset past the
    value (7.3.4 checks the JIT before max_entries and the offset), as the oracle says."""
    k = sim_kernel.SimKernel("patched-nojit")
    fd = k.map_create(sim_kernel.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 1, 0, "p")
    with pytest.raises(sim_kernel.SimError) as e:
        k.prog_load([*ld_map_value(1, fd, 8), mov64_imm(0, 0), exit_insn()], "p")
    assert (e.value.errno, e.value.error_class) == (errno.EOPNOTSUPP, "direct_value_unsupported")
    case = VerifierCase(map=MapShape(type="percpu_array", value_size=8, max_entries=1, rdonly=False), reg=1,
                        offset=8, accesses=())
    assert predict_case(case, oracle_profiles.KERNEL["patched-nojit"]).errno == errno.EOPNOTSUPP


def test_kernel_probe_tells_the_jit_off_from_a_kernel_without_the_feature(monkeypatch):
    class FakeMap:
        def __enter__(self) -> FakeMap:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def fileno(self) -> int:
            return 3

    log = {"text": ""}

    def refuse(*args: object, **kwargs: object) -> None:
        raise probes.bpf.BpfError(errno.EINVAL, "BPF_PROG_LOAD", log["text"])

    monkeypatch.setattr(probes.bpf, "map_create", lambda *a, **k: FakeMap())
    monkeypatch.setattr(probes.bpf, "prog_load", refuse)
    log["text"] = "0: R1=ctx() R10=fp0\n; ...\n" + JIT_REQUIRED + "\nprocessed 3 insns\n"
    assert not probes.probe_percpu_data() and probes.probe_percpu_direct_value()
    log["text"] = "no direct value access support for this map type\n"
    assert not probes.probe_percpu_data() and not probes.probe_percpu_direct_value()


def test_jit_always_on_from_the_kernel_config(monkeypatch):
    monkeypatch.setattr(probes, "_kernel_config_lines", lambda: ["CONFIG_BPF_JIT=y", "CONFIG_BPF_JIT_ALWAYS_ON=y"])
    assert probes.jit_always_on() is True
    monkeypatch.setattr(probes, "_kernel_config_lines", lambda: ["# CONFIG_BPF_JIT_ALWAYS_ON is not set"])
    assert probes.jit_always_on() is False
    monkeypatch.setattr(probes, "_kernel_config_lines", lambda: None)
    assert probes.jit_always_on() is None


# -- every name `--profile` accepts runs on the simulator and agrees with the oracle ----------------------------

@pytest.fixture(scope="module")
def selftest(clang):
    return compile_global(clang, selftest_model(cpus=(0, 2)))


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_profile_runs_on_the_sim_as_the_oracle_predicts(selftest, name):
    runs = runs_of(selftest.model)
    expected = predict(selftest.model, selftest.facts, oracle_profiles.profile(name), possible_cpus=4,
                       online_cpus=[0, 1, 2, 3])
    observed = observe(selftest.path, profile=name, possible_cpus=4, online_cpus=[0, 1, 2, 3], runs=runs)
    assert observed["env"]["profile"] == name
    cmp = compare(expected, observed)
    assert cmp.ok, cmp.report()


def test_jit_off_on_the_selftest(selftest):
    """merged libbpf: its probe fails, so the maps are not created (as on a kernel without the feature); the raw
    loader creates them and the kernel refuses the verified program for want of the JIT."""
    runs = runs_of(selftest.model)
    merged = observe(selftest.path, profile="merged+jitoff", runs=runs)
    assert not any(m["created"] for m in merged["maps"] if m["type"] == "percpu_array")
    raw = observe(selftest.path, profile="raw-patched+jitoff", runs=runs)
    refused = [p for p in raw["programs"] if p["verdict"] == "rejected"]
    assert refused and refused[0]["message_class"] == "jit_required" and refused[0]["errno"] == errno.EINVAL


@pytest.mark.parametrize("name", ["merged+jitoff", "raw-patched+jitoff", "unpatched+jitoff"])
@pytest.mark.parametrize("case", sorted(SET_CORPUS))
def test_object_sets_with_the_jit_off_agree(clang, name, case):
    """The oracle and the simulator agree on object sets with the JIT off, in the global rendering and in the
    lowered one, whose prediction keeps the feature but refuses extension programs (they need the JIT)."""
    backend = SimBackend(name, 2, (0, 1))
    differential_set(f"profiles-{case}", backend, clang, SET_CORPUS[case]((0, 1)))
    check_set_lowered_twin(clang, backend, SET_CORPUS[case]((0, 1)))


def test_lowered_profile_keeps_the_feature_and_refuses_extensions():
    assert registry.lowered_profile("raw-unpatched+noext") == "merged+noext"
    assert registry.lowered_profile("merged+noext+jitoff") == "merged+noext+noextjit"
    kernel = oracle_profiles.profile(registry.lowered_profile("raw-patched+jitoff")).kernel
    assert kernel.jit_enabled and not kernel.ext_jit


def test_sim_jit_off_refuses_extension_programs(clang):
    case = SET_CORPUS["freplace_shared_variable"]((0, 1))
    for name in ("merged+noextjit", "merged+jitoff"):
        lowered = compile_set_lowered(clang, compile_set(clang, case))
        observed = SimBackend(name, 2, (0, 1)).observe_set(set_plan(lowered))
        ext = [p for o in observed["objects"] for p in o["programs"] if p["name"] == "b_ext"]
        assert [(p["verdict"], p["errno"], p["message_class"], p["message"]) for p in ext] == \
            [("rejected", errno.EINVAL, "jit_required", "Extension programs should be JITed")]


def _tail_call_beside_a_subprogram():
    from generators.ctype import Scalar
    from generators.model import Access, Add, Call, Function, ProgramModel, Run, Store, TailCall, Variable

    vs = (Variable("hits", Scalar("u32"), ".bss"),)
    helper = Function("bump", (Add(Access("hits"), 1),), subprogram=True)
    caller = Function("prog0", (Call("bump"), TailCall("prog1"), Store(Access("hits"), 7)))
    callee = Function("prog1", (Add(Access("hits"), 1),))
    return ProgramModel("tailsub", vs, (helper, caller, callee), (Run("prog0", 0, 1),))


@pytest.mark.parametrize("name", ["raw-patched+jitoff", "merged+jitoff", "merged+noextjit", "raw-patched"])
def test_a_tail_call_beside_a_subprogram_needs_the_jit(clang, name):
    """The interpreter cannot mix tail calls and bpf-to-bpf calls: with the JIT off the verifier refuses the
    tail-calling program at the bpf_tail_call site (found against a 7.3.4 guest); both models agree."""
    model = _tail_call_beside_a_subprogram()
    compiled = compile_global(clang, model)
    expected = predict(model, compiled.facts, oracle_profiles.profile(name), possible_cpus=2, online_cpus=[0, 1])
    observed = observe(compiled.path, profile=name, possible_cpus=2, online_cpus=[0, 1], runs=runs_of(model))
    jit_off = name != "raw-patched"
    for doc in (expected, observed):
        prog0 = next(p for p in doc["programs"] if p["name"] == "prog0")
        assert (prog0["verdict"], prog0["message_class"]) == (
            ("rejected", "tail_call_with_subprogs") if jit_off else ("accepted", None)), doc["source"]
    assert compare(expected, observed).ok
