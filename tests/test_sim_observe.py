"""End to end on the simulator: upstream's selftest layout (spec §6) per profile, the lowered rendering, and the
command line."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from backends.sim.__main__ import main as cli_main
from backends.sim.__main__ import parse_cpulist
from backends.sim.observe import observe, sim_rows
from generators.ctype import Array, Field, Record, Scalar
from generators.model import Access, Add, Function, ProgramModel, Store, StoreCpu, Variable
from generators.render import render_global, render_lowered, section_ident
from schema.result import validate
from toolchain.clang import Clang, ToolchainError, compile_c
from toolchain.elf import read_object

ROOT = Path(__file__).resolve().parent.parent

# The layout of upstream's test_global_percpu_data, written out in plain C.
SELFTEST = """\
#define SEC(n) __attribute__((section(n), used))
typedef unsigned int __u32;
typedef _Bool bool;
static __u32 (*bpf_get_smp_processor_id)(void) = (void *) 8;

int loong SEC(".percpu.looooooooong");
int data3 SEC(".data.percpu");
int data2 SEC(".percpu.data");
int run;
int cpu_id[1] SEC(".percpu");
int data SEC(".percpu") = -1;
int nums[7] SEC(".percpu");
bool set SEC(".percpu") = 0;
struct {
	char set;
	int i;
	int nums[7];
} st SEC(".percpu") = { .set = 0, .i = -1 };

SEC("raw_tp") int update_percpu_data(void *ctx)
{
	st.nums[6] = 0xc0de;
	st.set = 1;
	st.i = 1;
	nums[6] = 0xc0de;
	data = 1;
	run++;
	set = 1;
	cpu_id[0] = bpf_get_smp_processor_id();
	return 0;
}

char _license[] SEC("license") = "GPL";
"""
PROG = "update_percpu_data"


@pytest.fixture(scope="module")
def clang() -> Clang:
    try:
        return Clang.find()
    except ToolchainError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def selftest(clang) -> Path:
    return compile_c(clang, SELFTEST, name="percpu_data")


def var(result: dict, name: str) -> tuple[int, int]:
    v = next(v for v in result["variables"] if v["name"] == name)
    return v["offset"], v["size"]


def s32(hexslot: str, off: int) -> int:
    return struct.unpack_from("<i", bytes.fromhex(hexslot), off)[0]


def the_map(result: dict, section: str) -> dict:
    return next(m for m in result["maps"] if m["section"] == section)


@pytest.mark.parametrize("online", [[0, 1, 2, 3], [0, 2]])
def test_selftest_layout_runs_per_cpu(selftest, online):
    runs = [(PROG, cpu, 1) for cpu in online]
    r = observe(selftest, profile="merged", possible_cpus=4, online_cpus=online, runs=runs)
    assert validate(r) == []
    assert r["open"]["ok"] and [p["verdict"] for p in r["programs"]] == ["accepted"]
    assert [x["retval"] for x in r["runs"]] == [[0]] * len(online)
    pc = the_map(r, ".percpu")
    assert (pc["name"], pc["kernel_name"], pc["type"], pc["flags"], pc["created"]) == (
        ".percpu", ".percpu", "percpu_array", 0, True)
    initial = pc["before"][0]
    assert pc["before"] == [initial] * 4  # one image, every possible CPU
    assert s32(initial, var(r, "data")[0]) == -1 and s32(initial, var(r, "st")[0] + 4) == -1
    st_off, nums_off, cpu_off = var(r, "st")[0], var(r, "nums")[0], var(r, "cpu_id")[0]
    for cpu in range(4):
        slot = pc["after"][cpu]
        if cpu not in online:
            assert slot == initial  # offline but possible: untouched
            continue
        assert s32(slot, var(r, "data")[0]) == 1
        assert s32(slot, nums_off + 24) == 0xC0DE
        assert bytes.fromhex(slot)[var(r, "set")[0]] == 1
        assert s32(slot, st_off + 4) == 1 and s32(slot, st_off + 4 + 4 + 24) == 0xC0DE
        assert s32(slot, cpu_off) == cpu
    bss = the_map(r, ".bss")
    assert (bss["type"], s32(bss["after"][0], 0)) == ("array", len(online))
    names = {m["section"]: (m["name"], m["kernel_name"], m["type"]) for m in r["maps"]}
    assert names[".percpu.looooooooong"] == (".percpu.looooooooong", ".percpu.loooooo", "percpu_array")
    assert names[".percpu.data"] == (".percpu.data", ".percpu.data", "percpu_array")
    assert names[".data.percpu"] == (".data.percpu", ".data.percpu", "array")
    assert names[".bss"] == ("percpu_d.bss", "percpu_d.bss", "array")
    assert r["env"]["features"]["percpu_data"] is True and r["source"] == "sim"


def test_xlated_counts_the_percpu_moves(selftest):
    r = observe(selftest, profile="merged")
    facts = read_object(selftest)
    n = len(facts.function(PROG).insns)
    loads = sum(1 for i in facts.function(PROG).insns if i.is_ld_imm64)
    bss_loads = 1
    # one per-CPU move per .percpu load, and bpf_get_smp_processor_id inlined to three instructions
    assert r["programs"][0]["xlated_insns"] == n + (loads - bss_loads) + 2


def test_unpatched_profile_fails_to_open(selftest):
    r = observe(selftest, profile="unpatched", runs=[(PROG, 0, 1)])
    assert validate(r) == []
    assert r["open"]["ok"] is False and r["open"]["error_class"] == "bad_map_relo"
    assert re.fullmatch(r"libbpf: prog 'update_percpu_data': bad map relo against '\w+' in section '\.percpu'",
                        r["open"]["message"])
    assert r["maps"] == [] and [p["verdict"] for p in r["programs"]] == ["not_loaded"]
    assert r["runs"] == []  # no object, nothing to run


def test_merged_libbpf_on_an_unpatched_kernel(selftest):
    r = observe(selftest, profile="merged-unpatched-kernel", runs=[(PROG, 0, 1)])
    assert validate(r) == []
    # the load fails, so libbpf tears every map down
    assert not the_map(r, ".percpu")["created"] and not the_map(r, ".bss")["created"]
    (p,) = r["programs"]
    assert (p["verdict"], p["errno"], p["message_class"], p["message"]) == (
        "rejected", 22, "map_not_created", "BPF map '.percpu' is referenced but wasn't created")
    assert r["runs"][0]["retval"] is None
    assert r["env"]["features"]["percpu_data"] is False


def test_raw_loader_on_an_unpatched_kernel(selftest):
    r = observe(selftest, profile="raw-unpatched")
    (p,) = r["programs"]
    assert (p["verdict"], p["errno"], p["message_class"], p["message"]) == (
        "rejected", 22, "no_direct_value_access", "no direct value access support for this map type")
    assert the_map(r, ".percpu")["created"]


def test_v1_names(selftest):
    r = observe(selftest, profile="v1", runs=[(PROG, 1, 2)])
    assert the_map(r, ".percpu")["name"] == "percpu_d.percpu"
    assert the_map(r, ".percpu.looooooooong")["name"] == ".percpu.looooooooong"
    assert r["runs"][0]["retval"] == [0, 0]


def test_initial_values_replace_the_image(selftest):
    r = observe(selftest, profile="merged")
    size = the_map(r, ".percpu")["value_size"]
    image = bytes(range(size))
    r = observe(selftest, profile="merged", initial_values={".percpu": image, "percpu_d.bss": b"\x05\0\0\0"},
                runs=[(PROG, 3, 1)])
    assert the_map(r, ".percpu")["before"] == [image.hex()] * 4
    assert s32(the_map(r, ".bss")["after"][0], 0) == 6
    with pytest.raises(ValueError, match="value_size"):
        observe(selftest, initial_values={".percpu": b"x"})


def test_runtime_fault_is_recorded(selftest):
    r = observe(selftest, profile="merged-norewrite", runs=[(PROG, 0, 1), (PROG, 5, 1)])
    assert r["programs"][0]["verdict"] == "accepted"
    first, offline = r["runs"]
    assert first["retval"] is None and "unmapped address" in first["fault"]
    assert offline["retval"] is None and offline["error"] == "ENXIO"


def test_percpu_section_over_32k_fails_the_load(clang):
    src = SELFTEST.replace("int loong SEC", "char big[32769] SEC(\".percpu.big\");\nint loong SEC")
    r = observe(compile_c(clang, src, name="big"), runs=[(PROG, 0, 1)])
    assert validate(r) == [] and r["open"]["ok"]
    big = the_map(r, ".percpu.big")
    assert (big["created"], big["errno"], big["message_class"]) == (False, 7, "e2big")
    assert [p["verdict"] for p in r["programs"]] == ["not_loaded"]
    assert r["runs"][0]["retval"] is None


# -- the lowered rendering gives the same per-CPU bytes ------------------------------------------------------

S32, CHAR, BOOL, U32 = Scalar("s32"), Scalar("char"), Scalar("bool"), Scalar("u32")
ST = Record("st_t", "struct", (Field("set", CHAR), Field("i", S32), Field("nums", Array(S32, 7))))
SELFTEST_MODEL = ProgramModel(
    "percpu_data",
    (
        Variable("loong", S32, ".percpu.looooooooong"),
        Variable("data3", S32, ".data.percpu"),
        Variable("data2", S32, ".percpu.data"),
        Variable("run", U32, ".bss"),
        Variable("cpu_id", Array(S32, 1), ".percpu"),
        Variable("data", S32, ".percpu", init=(-1,)),
        Variable("nums", Array(S32, 7), ".percpu"),
        Variable("set", BOOL, ".percpu", init=(0,)),
        Variable("st", ST, ".percpu", init=(0, -1)),
    ),
    (Function(PROG, (
        Store(Access("st", ("nums", 6)), 0xC0DE), Store(Access("st", ("set",)), 1), Store(Access("st", ("i",)), 1),
        Store(Access("nums", (6,)), 0xC0DE), Store(Access("data"), 1), Add(Access("run"), 1),
        Store(Access("set"), 1), StoreCpu(Access("cpu_id", (0,))), Add(Access("data2"), 3),
        Store(Access("loong"), 2), Store(Access("data3"), 4),
    )),),
)


def test_lowered_rendering_leaves_the_same_percpu_bytes(clang):
    model = SELFTEST_MODEL
    runs = [(PROG, 0, 2), (PROG, 2, 1), (PROG, 3, 3)]
    gpath = compile_c(clang, render_global(model), name=model.name)
    glob = observe(gpath, possible_cpus=4, online_cpus=[0, 2, 3], runs=runs)
    facts = read_object(gpath)
    offsets = {v.name: facts.variable_symbol(v.section, v.name).value for v in model.variables if v.percpu}
    lpath = compile_c(clang, render_lowered(model, offsets), name=model.name)
    percpu = [m for m in glob["maps"] if m["type"] == "percpu_array"]
    images = {section_ident(m["section"]): bytes.fromhex(m["before"][0]) for m in percpu}
    low = observe(lpath, possible_cpus=4, online_cpus=[0, 2, 3], runs=runs, initial_values=images)
    assert validate(low) == [] and [p["verdict"] for p in low["programs"]] == ["accepted"]
    lowered_maps = {m["name"]: m for m in low["maps"]}
    for m in percpu:
        lm = lowered_maps[section_ident(m["section"])]
        assert (lm["internal"], lm["type"]) == (False, "percpu_array")
        assert [slot[:2 * m["value_size"]] for slot in lm["after"]] == m["after"], m["section"]
    assert the_map(low, ".bss")["after"] == the_map(glob, ".bss")["after"] == ["06000000"]
    assert [x["retval"] for x in low["runs"]] == [x["retval"] for x in glob["runs"]]
    assert s32(lowered_maps["percpu_data"]["after"][3], 0) == 9 and s32(lowered_maps["percpu_data"]["after"][1], 0) == 0


# -- command line ------------------------------------------------------------------------------------------


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_compiles_c_and_prints_the_observation(tmp_path, capsys, clang):
    src = tmp_path / "percpu_data.bpf.c"
    src.write_text(SELFTEST)
    code, out, err = run_cli(capsys, "run", str(src), "--online-cpus", "0,2", "--run", f"{PROG}@2:2",
                             "--run", f"{PROG}@0")
    assert (code, err) == (0, "")
    r = json.loads(out)
    assert validate(r) == [] and r["env"]["online_cpus"] == [0, 2]
    assert r["object"]["path"].endswith("percpu_data.bpf.o")
    assert [x["retval"] for x in r["runs"]] == [[0, 0], [0]]
    assert the_map(r, ".bss")["name"] == "percpu_d.bss"


def test_cli_on_an_object(selftest, capsys):
    code, out, _ = run_cli(capsys, "run", str(selftest), "--profile", "unpatched", "--possible-cpus", "2")
    assert code == 0 and json.loads(out)["open"]["error_class"] == "bad_map_relo"


@pytest.mark.parametrize(("argv", "needle"), [
    (["run", "/nonexistent/x.o"], "no such file"),
    (["run", "{obj}", "--profile", "nope"], "unknown profile"),
    (["run", "{obj}", "--run", "prog"], "bad --run"),
    (["run", "{obj}", "--run", "prog@x"], "bad --run"),
    (["run", "{obj}", "--online-cpus", "0-5"], "online CPU 4 is not possible"),
    (["run", "{obj}", "--online-cpus", "a"], "bad CPU list"),
    (["run", "{corrupt}"], "corrupt"),
    (["run", "{c}", "--clang", "/nonexistent/clang"], "clang not found"),
    (["run", "{obj}", "--run", "nosuchprog@0"], "unknown program"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, needle, selftest, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.o"
    corrupt.write_bytes(b"\x7fELF" + bytes(60))
    csrc = tmp_path / "x.bpf.c"
    csrc.write_text("int x;")
    args = [a.format(obj=selftest, corrupt=corrupt, c=csrc) for a in argv]
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err


def test_cli_as_a_module_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "backends.sim", "run", str(tmp_path / "missing.o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_cpulist_parsing():
    assert parse_cpulist("0-3") == [0, 1, 2, 3]
    assert parse_cpulist("0,2") == [0, 2]
    assert parse_cpulist("0-1,4") == [0, 1, 4]


def test_profile_table_maps_to_loader_and_kernel():
    def names(profile: str) -> tuple[str, str]:
        loader, kernel = sim_rows(profile)
        return loader.name, kernel.name

    assert names("merged") == ("merged", "patched")
    assert names("v1") == ("v1", "patched-v1")
    assert names("unpatched") == ("old", "unpatched")
    assert names("raw-unpatched") == ("raw", "unpatched")
    assert names("merged-unpatched-kernel") == ("merged", "unpatched")
    assert names("merged-norewrite") == ("merged", "broken-norewrite")
