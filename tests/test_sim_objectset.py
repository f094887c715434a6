"""Object sets on the simulator (docs/object-sets.md): one kernel for every object, map reuse by fd, extension
programs replacing a global subprogram of a loaded program, the broken rows that lose each, and the command
line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backends.objload import FuncSpec, reused_map_name
from backends.sim.__main__ import main as cli_main
from backends.sim.interp import link_program
from backends.sim.kernel import SimError, SimKernel
from backends.sim.observe import observe, observe_set
from generators.ctype import Scalar
from generators.model import Access, Add, Call, Function, ProgramModel, Replace, Store, Variable
from generators.render import render_global
from schema.objectset import SetPlan
from schema.result import NOT_OPENED, REUSE_FAILED, SET_SCHEMA, validate
from toolchain.clang import compile_c
from toolchain.insn import BPF_PSEUDO_CALL, call_rel, exit_insn, mov64_imm

U32 = Scalar("u32")
X, Y = 0, 4  # offsets of x and y in every object's .percpu (two u32, in declaration order)


def percpu(name: str, x: int, y: int = 0) -> tuple[Variable, ...]:
    """`x` and `y` in .percpu with their initialisers (each object declares the section alike)."""
    return (Variable(f"{name}x", U32, ".percpu", init=(x,)), Variable(f"{name}y", U32, ".percpu", init=(y,)))


def obj_a(*, exported: bool = True) -> ProgramModel:
    """a_prog calls a_sub (x = 5), then counts in y; a_other does only the counting."""
    return ProgramModel("aobj", percpu("", 3), (
        Function("a_sub", (Store(Access("x"), 5),), subprogram=True, exported=exported),
        Function("a_prog", (Call("a_sub"), Add(Access("y"), 1))),
        Function("a_other", (Add(Access("y"), 1),)),
    ))


def obj_b(*, ext: bool = False) -> ProgramModel:
    """b_prog writes x = 11; with `ext`, b_ext replaces a_sub of a_prog and writes x = 7 instead."""
    functions = [Function("b_prog", (Store(Access("x"), 11),))]
    if ext:
        functions.append(Function("b_ext", (Store(Access("x"), 7),), replaces=Replace("a_prog", "a_sub")))
    return ProgramModel("bobj", percpu("", 9), tuple(functions))


def obj_c() -> ProgramModel:
    return ProgramModel("cobj", percpu("", 1), (Function("c_prog", (Add(Access("x"), 1),)),))


def obj_data_only() -> ProgramModel:
    """A .percpu section no program touches: merged libbpf on an unpatched kernel skips its map and loads."""
    return ProgramModel("dobj", (*percpu("", 3), Variable("n", U32, ".data")),
                        (Function("d_prog", (Add(Access("n"), 1),)),))


@pytest.fixture(scope="module")
def build(clang):
    cache: dict[str, Path] = {}

    def make(model: ProgramModel) -> Path:
        source = render_global(model)
        if source not in cache:
            cache[source] = compile_c(clang, source, name=model.name)
        return cache[source]
    return make


def u32(slot: str, off: int) -> int:
    return int.from_bytes(bytes.fromhex(slot)[off:off + 4], "little")


def percpu_map(result: dict) -> dict:
    return next(m for m in result["maps"] if m["section"] == ".percpu")


def xs(result: dict, when: str = "after") -> list[int]:
    return [u32(slot, X) for slot in percpu_map(result)[when]]


def program(result: dict, name: str) -> dict:
    return next(p for p in result["programs"] if p["name"] == name)


def set_doc(objects: list[Path], *, reuse=(), attach=(), runs=(), profile: str = "merged") -> list[dict]:
    doc = observe_set(SetPlan(tuple(objects), tuple(reuse), tuple(attach), tuple(runs)), profile=profile,
                      possible_cpus=4)
    assert doc["schema"] == SET_SCHEMA and doc["source"] == "sim"
    for r in doc["objects"]:
        assert validate(r) == [], r
    return doc["objects"]


REUSE = ((1, ".percpu", 0),)
ATTACH = ((1, "b_ext", "a_prog", "a_sub"),)


# -- several objects, each its own map ----------------------------------------------------------------------


def test_two_objects_have_two_maps_and_runs_stay_in_their_own(build):
    a, b = set_doc([build(obj_a()), build(obj_b())], runs=[("a_prog", 1, 1), ("a_other", 2, 1)])
    assert a["open"]["ok"] and b["open"]["ok"]
    assert percpu_map(a)["created"] and percpu_map(b)["created"]
    assert xs(a, "before") == [3] * 4 and xs(b, "before") == [9] * 4
    assert xs(a) == [3, 5, 3, 3]
    assert [u32(s, Y) for s in percpu_map(a)["after"]] == [0, 1, 1, 0]
    assert percpu_map(b)["after"] == percpu_map(b)["before"]  # a's runs never touch b's map
    assert [r["program"] for r in a["runs"]] == ["a_prog", "a_other"] and b["runs"] == []


# -- map reuse ------------------------------------------------------------------------------------------------


def test_a_reused_map_is_the_source_map(build):
    a, b = set_doc([build(obj_a()), build(obj_b())], reuse=REUSE, runs=[("b_prog", 2, 1)])
    own, theirs = percpu_map(b), percpu_map(a)
    assert own["created"] and (own["name"], own["kernel_name"]) == (".percpu", ".percpu")
    assert own["before"] == theirs["before"] and xs(b, "before") == [3] * 4  # b's image (9) never written
    assert xs(a) == [3, 3, 11, 3]  # b_prog's write, in a's map, on CPU 2 only
    assert own["after"] == theirs["after"]


def test_reuse_takes_the_source_name_and_definition(build):
    """v1 names a .percpu map after its object: the reusing map takes the source's kernel name."""
    a, b = set_doc([build(obj_a()), build(obj_b())], reuse=REUSE, profile="v1")
    src, own = percpu_map(a), percpu_map(b)
    assert src["kernel_name"] == "aobj.percpu"
    assert (own["name"], own["kernel_name"]) == ("aobj.percpu", "aobj.percpu")
    fields = ("type", "key_size", "value_size", "max_entries", "flags")
    assert [own[f] for f in fields] == [src[f] for f in fields]


def test_reused_map_name_keeps_a_full_length_prefix():
    assert reused_map_name("second.percpu", "first.percpu") == "first.percpu"
    assert reused_map_name(".percpu.looooooooong", ".percpu.loooooo") == ".percpu.looooooooong"
    assert reused_map_name(".percpu.other", ".percpu.loooooo") == ".percpu.loooooo"


def test_reuse_of_a_map_that_was_not_created_fails_the_object(build):
    objs = [build(obj_data_only()), build(obj_b()), build(obj_c())]
    d, b, c = set_doc(objs, reuse=REUSE, runs=[("d_prog", 0, 1), ("b_prog", 0, 1), ("c_prog", 0, 1)],
                      profile="merged-unpatched-kernel")
    assert d["open"]["ok"] and not percpu_map(d)["created"] and program(d, "d_prog")["verdict"] == "accepted"
    assert (b["open"]["ok"], b["open"]["error_class"]) == (False, REUSE_FAILED)
    assert [(p["verdict"], p["errno"]) for p in b["programs"]] == [("not_loaded", None)]
    assert b["variables"] and all(not m["created"] and m["after"] is None for m in b["maps"])
    assert c["open"]["error_class"] == NOT_OPENED and c["maps"] == [] and c["runs"] == []


# -- freplace ----------------------------------------------------------------------------------------------


def test_an_extension_runs_in_place_of_the_target_function(build):
    a, b = set_doc([build(obj_a()), build(obj_b(ext=True))], reuse=REUSE, attach=ATTACH,
                   runs=[("a_prog", 1, 1), ("a_other", 2, 1)])
    assert program(b, "b_ext")["verdict"] == "accepted" and program(b, "b_ext")["attached"] is True
    assert "attached" not in program(a, "a_prog") and "attached" not in program(b, "b_prog")
    assert xs(a) == [3, 7, 3, 3]  # the extension's 7 on CPU 1 only; a_sub's 5 nowhere
    assert [u32(s, Y) for s in percpu_map(a)["after"]] == [0, 1, 1, 0]  # a_prog goes on after the call


def test_without_reuse_the_extension_writes_its_own_map(build):
    a, b = set_doc([build(obj_a()), build(obj_b(ext=True))], attach=ATTACH, runs=[("a_prog", 1, 1)])
    assert program(b, "b_ext")["attached"] is True
    assert xs(a) == [3, 3, 3, 3]  # neither a_sub's 5 nor the extension's 7 in a's map
    assert xs(b) == [9, 7, 9, 9]  # the extension's variable is b's own, on the CPU a_prog ran on


def test_the_extension_replaces_the_function_in_its_target_program_only(build):
    """a_other has its own copy of a_sub (every program carries its subprograms): untouched."""
    model = ProgramModel("aobj", percpu("", 3), (
        Function("a_sub", (Store(Access("x"), 5),), subprogram=True, exported=True),
        Function("a_prog", (Call("a_sub"),)),
        Function("a_other", (Call("a_sub"), Add(Access("y"), 1))),
    ))
    a, _ = set_doc([build(model), build(obj_b(ext=True))], reuse=REUSE, attach=ATTACH,
                   runs=[("a_prog", 1, 1), ("a_other", 2, 1)])
    assert xs(a) == [3, 7, 5, 3]


def test_a_static_target_is_refused_and_later_objects_are_not_opened(build):
    objs = [build(obj_a(exported=False)), build(obj_b(ext=True)), build(obj_c())]
    a, b, c = set_doc(objs, attach=ATTACH, runs=[("a_prog", 0, 1), ("c_prog", 0, 1)])
    ext = program(b, "b_ext")
    assert (ext["verdict"], ext["errno"], ext["message_class"]) == ("rejected", 22, "freplace_static_target")
    assert ext["message"] == "a_sub() is not a global function" and ext["attached"] is False
    assert not percpu_map(b)["created"]  # the failed load tears b down
    assert c["open"]["error_class"] == NOT_OPENED and c["runs"] == []
    assert [p["verdict"] for p in c["programs"]] == ["not_loaded"]
    assert xs(a) == [5, 3, 3, 3]  # a itself loaded and ran with its own a_sub


def test_an_extension_without_a_target_is_refused(build):
    r = observe(build(obj_b(ext=True)))
    ext = program(r, "b_ext")
    assert (ext["verdict"], ext["errno"], ext["message"]) == (
        "rejected", 22, "prog 'b_ext': attach program FD is not set")


# -- the broken rows ----------------------------------------------------------------------------------------


def test_merged_noreuse_loses_the_reuse(build):
    objs, runs = [build(obj_a()), build(obj_b())], [("b_prog", 2, 1)]
    good = set_doc(objs, reuse=REUSE, runs=runs)
    bad = set_doc(objs, reuse=REUSE, runs=runs, profile="merged-noreuse")
    assert xs(bad[1], "before") == [9] * 4 != xs(good[1], "before")  # b's own image written
    assert xs(bad[0]) == [3] * 4 != xs(good[0])  # b_prog's write never reaches a's map


def test_merged_nofreplace_loses_the_extension(build):
    objs, runs = [build(obj_a()), build(obj_b(ext=True))], [("a_prog", 1, 1)]
    good = set_doc(objs, reuse=REUSE, attach=ATTACH, runs=runs)
    bad = set_doc(objs, reuse=REUSE, attach=ATTACH, runs=runs, profile="merged-nofreplace")
    assert program(bad[1], "b_ext")["attached"] is True  # the link is made ...
    assert xs(bad[0]) == [3, 5, 3, 3] != xs(good[0])  # ... but a_sub still runs


# -- the simulated kernel and the interpreter -------------------------------------------------------------


def _target_and_ext(k: SimKernel) -> tuple[int, int]:
    """main returns what sub returns (1); the extension of sub returns 2."""
    main = [call_rel(1), exit_insn(), mov64_imm(0, 1), exit_insn()]
    funcs = [FuncSpec("main", 0, None, True), FuncSpec("sub", 2, None, True)]
    target, _, _ = k.prog_load(main, "main", func_info=funcs)
    ext, _, _ = k.prog_load([mov64_imm(0, 2), exit_insn()], "ext", prog_type="ext", attach_prog_fd=target,
                            attach_func="sub")
    return target, ext


def test_link_create_and_destroy_switch_the_call():
    k = SimKernel("patched", possible_cpus=2)
    target, ext = _target_and_ext(k)
    assert k.test_run(target, 0) == 1
    link = k.link_create(ext, target, "sub")
    assert k.test_run(target, 1) == 2
    with pytest.raises(SimError) as busy:
        k.link_create(ext, target, "sub")
    assert busy.value.errno == 16  # EBUSY: one extension per function
    with pytest.raises(SimError) as ext_run:
        k.test_run(ext, 0)
    assert ext_run.value.errno == 524  # ENOTSUPP: an extension has no test_run
    k.link_destroy(link)
    assert k.test_run(target, 0) == 1


def test_an_extension_needs_a_function_of_its_target():
    k = SimKernel("patched", possible_cpus=2)
    target, _ = _target_and_ext(k)
    with pytest.raises(SimError) as missing:
        k.prog_load([mov64_imm(0, 2), exit_insn()], "ext", prog_type="ext", attach_prog_fd=target,
                    attach_func="nope")
    assert (missing.value.errno, missing.value.message) == (22, "Subprog nope doesn't exist")


def test_link_program_retargets_calls_and_can_replace_the_entry():
    prog = [call_rel(1), exit_insn(), mov64_imm(0, 1), exit_insn()]
    ext = [mov64_imm(0, 2), exit_insn()]
    linked = link_program(prog, {2: ext})
    assert linked[:2] == [call_rel(3), exit_insn()] and linked[4:] == ext
    entry = link_program(prog, {0: ext})
    assert entry[0].src == BPF_PSEUDO_CALL and 1 + entry[0].imm == len(prog) + 2 and entry[2:6] == prog
    assert link_program(prog, {}) == prog


# -- command line ---------------------------------------------------------------------------------------------


def test_cli_run_set(build, capsys):
    a, b = build(obj_a()), build(obj_b(ext=True))
    code = cli_main(["run-set", str(a), str(b), "--reuse", "1:.percpu=0", "--attach", "1:b_ext=a_prog:a_sub",
                     "--run", "a_prog@1", "--possible-cpus", "2"])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert doc["schema"] == SET_SCHEMA and len(doc["objects"]) == 2
    assert xs(doc["objects"][0]) == [3, 7]


@pytest.mark.parametrize("bad", [["--reuse", "1-.percpu"], ["--reuse", "0:.percpu=1"],
                                 ["--attach", "1:b_ext=a_prog"], ["--run", "a_prog@x"]])
def test_cli_run_set_bad_input_is_one_line_and_exit_2(build, capsys, bad):
    code = cli_main(["run-set", str(build(obj_a())), str(build(obj_b(ext=True))), *bad])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1
