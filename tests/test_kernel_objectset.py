"""Object sets on the real kernel (docs/object-sets.md): several objects side by side, map reuse, freplace.

Per-CPU state lives in the lowered rendering's `.maps` PERCPU_ARRAY `percpu` (this kernel generation has no
global per-CPU data); every object declares the same per-CPU variables, so a reused map has one layout. Each
behaviour is checked through both loaders. Extension programs need a kernel that loads BPF_PROG_TYPE_EXT: where
`probes.probe_freplace` says it does not, the freplace tests skip with its reason and the refusal itself is
checked instead.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from backends.kernel import probes
from backends.kernel.objectset import observe_set_libbpf, observe_set_raw
from backends.kernel.observe import (
    BackendUnavailable,
    LibbpfSession,
    RawSession,
    kernel_features,
    open_libbpf,
    require_bpf,
)
from backends.objload import reused_map_name
from generators.ctype import Scalar
from generators.model import Access, Add, Call, Function, ProgramModel, Replace, StoreCpu, Variable
from generators.render import render_global, render_lowered
from schema.objectset import SetPlan
from schema.result import NOT_OPENED, REUSE_FAILED, SET_SCHEMA, validate
from toolchain.clang import Clang, ToolchainError, compile_c
from toolchain.elf import read_object

try:
    require_bpf()
except BackendUnavailable as _e:
    pytest.skip(f"kernel backend unavailable: {_e}", allow_module_level=True)

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parent.parent
FREPLACE, FREPLACE_REASON = probes.probe_freplace()
needs_freplace = pytest.mark.skipif(not FREPLACE, reason=f"kernel refuses extension programs: {FREPLACE_REASON}")
refuses_freplace = pytest.mark.skipif(FREPLACE, reason="the kernel loads extension programs")

SUB, EXT, OWN = 10, 1000, 100  # what a_sub0, b_ext and c_prog0 add to `val`


def _percpu() -> tuple[Variable, ...]:
    """The per-CPU variables every object declares alike: val at 0, cpu at 4."""
    return (Variable("val", Scalar("u32"), ".percpu", init=(1,)), Variable("cpu", Scalar("u32"), ".percpu"))


def _target(exported: bool) -> ProgramModel:
    """a_prog0 records its CPU and calls a_sub0, which adds SUB to val."""
    return ProgramModel("seta" if exported else "setas", _percpu(), (
        Function("a_sub0", (Add(Access("val"), SUB),), subprogram=True, exported=exported),
        Function("a_prog0", (StoreCpu(Access("cpu")), Call("a_sub0")))))


EXT_MODEL = ProgramModel("setb", _percpu(), (
    Function("b_ext", (Add(Access("val"), EXT),), replaces=Replace("a_prog0", "a_sub0")),))
OWN_MODEL = ProgramModel("setc", _percpu(), (Function("c_prog0", (Add(Access("val"), OWN), StoreCpu(Access("cpu")))),))
LAST_MODEL = ProgramModel("setd", _percpu(), (Function("d_prog0", (Add(Access("val"), 1),)),))


def _image(val: int, cpu: int) -> bytes:
    return struct.pack("<II", val, cpu)


A_IMAGE, C_IMAGE = _image(1, 0xFF), _image(2, 0xEE)


def _slots(m: dict, when: str) -> list[tuple[int, int]]:
    return [struct.unpack("<II", bytes.fromhex(s)) for s in m[when]]


@pytest.fixture(scope="module")
def lib():
    try:
        return open_libbpf()
    except BackendUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def objs() -> dict[str, Path]:
    """Lowered objects by model name, and `<name>_global` for the global rendering."""
    try:
        clang = Clang.find()
    except ToolchainError as e:
        pytest.skip(str(e))
    out = {}
    for model in (_target(True), _target(False), EXT_MODEL, OWN_MODEL, LAST_MODEL):
        glob = compile_c(clang, render_global(model), name=model.name + "_global")
        facts = read_object(glob)
        offsets = {v.name: facts.variable_symbol(v.section, v.name).value for v in model.variables}
        out[model.name + "_global"] = glob
        out[model.name] = compile_c(clang, render_lowered(model, offsets), name=model.name)
    return out


Observe = Callable[[SetPlan], dict]


def _observer(loader: str, lib) -> Observe:  # noqa: ANN001 - Libbpf
    if loader == "raw":
        return observe_set_raw
    return lambda plan: observe_set_libbpf(plan, libbpf=lib)


@pytest.fixture(params=["raw", "libbpf"])
def observe(request, lib) -> Observe:
    return _observer(request.param, lib)


def _check_doc(doc: dict, n: int) -> list[dict]:
    assert doc["schema"] == SET_SCHEMA and doc["source"] == "kernel" and len(doc["objects"]) == n
    for o in doc["objects"]:
        assert validate(o) == []
        assert o["env"] == doc["env"]
    return doc["objects"]


def _percpu_map(result: dict) -> dict:
    (m,) = [m for m in result["maps"] if m["name"] == "percpu"]
    return m


def _programs(result: dict) -> dict[str, dict]:
    return {p["name"]: p for p in result["programs"]}


# -- (a) side by side, (b) map reuse --------------------------------------------------------------------------


def test_two_objects_keep_their_own_maps(objs, observe):
    plan = SetPlan((objs["seta"], objs["setc"]), runs=(("a_prog0", 1, 1), ("a_prog0", 0, 2)),
                   initial_values=({"percpu": A_IMAGE}, {"percpu": C_IMAGE}))
    a, c = _check_doc(observe(plan), 2)
    assert a["load"]["ok"] and c["load"]["ok"]
    pa, pc = _percpu_map(a), _percpu_map(c)
    assert pa["created"] and pc["created"]
    assert _slots(pa, "before") == [(1, 0xFF)] * len(pa["before"])
    after = _slots(pa, "after")
    assert after[0] == (1 + 2 * SUB, 0) and after[1] == (1 + SUB, 1)
    # A's runs never reach C's map
    assert pc["before"] == pc["after"] == [C_IMAGE.hex()] * len(pc["before"])
    assert [r["retval"] for r in a["runs"]] == [[0], [0, 0]] and c["runs"] == []
    assert all("attached" not in p for o in (a, c) for p in o["programs"])


def test_reused_map_is_the_source_map(objs, observe):
    # c_prog0 on CPU 1, then a_prog0 there: both land in the one map, in CPU 1's slot only
    plan = SetPlan((objs["seta"], objs["setc"]), reuse=((1, "percpu", 0),),
                   runs=(("c_prog0", 1, 1), ("a_prog0", 1, 1)),
                   initial_values=({"percpu": A_IMAGE}, {"percpu": C_IMAGE}))
    a, c = _check_doc(observe(plan), 2)
    pa, pc = _percpu_map(a), _percpu_map(c)
    assert (pc["name"], pc["kernel_name"], pc["type"], pc["value_size"], pc["created"]) == (
        "percpu", "percpu", "percpu_array", 8, True)
    # C's own starting value is never written: the source's contents stay
    assert pc["before"] == pa["before"] == [A_IMAGE.hex()] * len(pa["before"])
    after = _slots(pa, "after")
    assert after[1] == (1 + OWN + SUB, 1)
    assert after[0] == (1, 0xFF)
    assert pc["after"] == pa["after"]
    assert [r["program"] for r in c["runs"]] == ["c_prog0"] and [r["program"] for r in a["runs"]] == ["a_prog0"]


def test_reused_map_name_rule():
    assert reused_map_name("percpu", "percpu") == "percpu"
    assert reused_map_name("setc.data", "seta.data") == "seta.data"
    # a full-length kernel name that is a prefix of the own name: the own name stays
    assert reused_map_name("percpu_counters_long", "percpu_counters") == "percpu_counters_long"
    assert reused_map_name("percpu", "percpu_counters") == "percpu_counters"


@pytest.mark.parametrize(("loader", "session"), [("raw", RawSession), ("libbpf", LibbpfSession)])
def test_reuse_of_a_map_that_was_not_created(objs, lib, loader, session, monkeypatch):
    # as when merged libbpf clears a map's autocreate: the source has the map but no fd
    monkeypatch.setattr(session, "map_fd", lambda self, key: None)
    plan = SetPlan((objs["seta"], objs["setc"], objs["setd"]), reuse=((1, "percpu", 0),),
                   runs=(("c_prog0", 0, 1), ("a_prog0", 0, 1), ("d_prog0", 0, 1)))
    a, c, d = _check_doc(_observer(loader, lib)(plan), 3)
    assert a["load"]["ok"] and a["runs"][0]["retval"] == [0]
    assert c["open"] == {"ok": False, "error_class": REUSE_FAILED,
                         "message": "map 'percpu': cannot reuse a map that was not created"}
    assert [(p["verdict"], p["errno"]) for p in c["programs"]] == [("not_loaded", None)]
    assert all(not m["created"] and m["before"] is None for m in c["maps"])
    assert c["runs"][0]["retval"] == [None]  # opened, so its runs are recorded, with nothing run
    assert d["open"]["error_class"] == NOT_OPENED and d["runs"] == [] and d["maps"] == []


def test_plan_errors_are_value_errors(objs, observe):
    for plan, match in (
            (SetPlan((objs["seta"], objs["setc"]), runs=(("nope", 0, 1),)), "unknown program"),
            (SetPlan((objs["seta"], objs["setb"]), attach=((0, "b_ext", "a_prog0", "a_sub0"),)), "no such program"),
            (SetPlan((objs["seta"], objs["setb"]), attach=((1, "b_ext", "nope", "a_sub0"),)), "no program 'nope'"),
            (SetPlan((objs["seta"], objs["setc"]), reuse=((1, "nomap", 0),)), "no such map")):
        with pytest.raises(ValueError, match=match):
            observe(plan)


# -- (c), (d) freplace -----------------------------------------------------------------------------------------


def _freplace_plan(objs: dict[str, Path], target: str = "seta", *, then: str | None = None) -> SetPlan:
    files = (objs[target], objs["setb"]) + ((objs[then],) if then else ())
    return SetPlan(files, reuse=((1, "percpu", 0),), attach=((1, "b_ext", "a_prog0", "a_sub0"),),
                   runs=(("a_prog0", 1, 1),) + ((("d_prog0", 0, 1),) if then else ()),
                   initial_values=({"percpu": A_IMAGE},))


@needs_freplace
def test_extension_replaces_the_subprogram(objs, observe):
    a, b = _check_doc(observe(_freplace_plan(objs)), 2)
    ext = _programs(b)["b_ext"]
    assert (ext["verdict"], ext["attached"]) == ("accepted", True)
    assert "attached" not in _programs(a)["a_prog0"]
    after = _slots(_percpu_map(a), "after")
    assert after[1] == (1 + EXT, 1)  # the extension's write, not a_sub0's
    assert after[0] == (1, 0xFF)
    assert _percpu_map(b)["after"] == _percpu_map(a)["after"]


@needs_freplace
def test_static_target_is_refused(objs, observe):
    a, b, d = _check_doc(observe(_freplace_plan(objs, "setas", then="setd")), 3)
    ext = _programs(b)["b_ext"]
    assert (ext["verdict"], ext["errno"], ext["message_class"], ext["attached"]) == (
        "rejected", errno.EINVAL, "freplace_static_target", False)
    # the kernel's wording depends on whether it found the static function's BTF reliable; for int (void) it is
    # the prototype check's (seen on 6.1)
    assert ext["message"] in ("a_sub0() is not a global function", "Cannot replace static functions")
    assert d["open"]["error_class"] == NOT_OPENED
    assert _slots(_percpu_map(a), "after")[1] == (1 + SUB, 1)


@refuses_freplace
def test_refused_extension_fails_its_object(objs, observe):
    """This kernel refuses every extension program: the object fails, later ones are never opened, and the
    target program runs its own subprogram."""
    a, b, d = _check_doc(observe(_freplace_plan(objs, then="setd")), 3)
    assert a["load"]["ok"]
    ext = _programs(b)["b_ext"]
    assert (ext["verdict"], ext["attached"]) == ("rejected", False)
    if "EPERM" in FREPLACE_REASON:
        assert ext["errno"] == errno.EPERM
    assert d["open"]["error_class"] == NOT_OPENED and d["runs"] == []
    assert [p["verdict"] for p in d["programs"]] == ["not_loaded"]
    assert _slots(_percpu_map(a), "after")[1] == (1 + SUB, 1)


def test_global_rendering_of_a_freplace_set(objs, lib):
    """Without the feature the first object (a `.percpu` global) already fails, so the rest is never opened."""
    plan = SetPlan((objs["seta_global"], objs["setb_global"]), attach=((1, "b_ext", "a_prog0", "a_sub0"),),
                   runs=(("a_prog0", 1, 1),))
    if lib.version_tuple() < (1, 8):
        a, b = _check_doc(observe_set_libbpf(plan, libbpf=lib), 2)
        assert (a["open"]["ok"], a["open"]["error_class"]) == (False, "bad_map_relo")
        assert a["runs"] == []
        assert b["open"]["error_class"] == NOT_OPENED and "attached" not in b["programs"][0]
    if not kernel_features()["percpu_data"]:
        a, b = _check_doc(observe_set_raw(plan), 2)
        prog = _programs(a)["a_prog0"]
        assert (prog["verdict"], prog["errno"], prog["message_class"], prog["message"]) == (
            "rejected", errno.EINVAL, "no_direct_value_access", "no direct value access support for this map type")
        assert a["runs"][0]["retval"] == [None]
        assert b["open"]["error_class"] == NOT_OPENED


# -- (f) resources, (g) the command line ----------------------------------------------------------------------


def _fd_list() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


def test_no_fd_leaks_over_set_observations(objs, lib):
    plans = [
        SetPlan((objs["seta"], objs["setc"]), runs=(("a_prog0", 0, 1),)),
        SetPlan((objs["seta"], objs["setc"]), reuse=((1, "percpu", 0),), runs=(("c_prog0", 1, 1),)),
        _freplace_plan(objs, then="setd"),
        _freplace_plan(objs, "setas", then="setd"),
    ]
    observers = (observe_set_raw, lambda plan: observe_set_libbpf(plan, libbpf=lib))
    for plan in plans:  # libbpf's one-time probing before counting
        for obs in observers:
            obs(plan)
    before = _fd_list()
    for i in range(200):
        observers[i % 2](plans[(i // 2) % len(plans)])
    assert _fd_list() == before


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "backends.kernel", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=60)


@pytest.mark.parametrize("loader", ["raw", "libbpf"])
def test_cli_run_set(objs, loader):
    p = _cli("run-set", str(objs["seta"]), str(objs["setc"]), "--loader", loader, "--reuse", "1:percpu=0",
             "--run", "c_prog0@1", "--run", "a_prog0@0:2")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    a, c = _check_doc(doc, 2)
    assert [r["count"] for r in a["runs"]] == [2] and [r["program"] for r in c["runs"]] == ["c_prog0"]
    assert _percpu_map(c)["after"] == _percpu_map(a)["after"]


@pytest.mark.parametrize("bad", [["--attach", "1:b_ext=a_prog0"], ["--attach", "0:b_ext=a_prog0:a_sub0"],
                                 ["--reuse", "0:percpu=1"], ["--run", "nope@0"]])
def test_cli_run_set_bad_input(objs, bad):
    p = _cli("run-set", str(objs["seta"]), str(objs["setb"]), *bad)
    assert p.returncode == 2 and p.stdout == ""
    assert len(p.stderr.splitlines()) == 1 and "Traceback" not in p.stderr
