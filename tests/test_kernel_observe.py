"""The kernel backend's observations (libbpf and raw loaders), its skeleton check and its command line.

Expectations marked for libbpf 1.1 / an unpatched kernel are what this generation of the stack does with
global data and `.percpu`; they are skipped elsewhere rather than guessed.
"""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from backends.kernel import probes
from backends.kernel.observe import (
    BackendUnavailable,
    kernel_features,
    observe_libbpf,
    observe_raw,
    open_libbpf,
    require_bpf,
)
from generators.ctype import Scalar
from generators.model import Access, Add, Function, ProgramModel, StoreCpu, Variable
from generators.render import render_global, render_lowered
from schema.result import validate
from tests.objects import PRELUDE
from toolchain.clang import Clang, ToolchainError, compile_c
from toolchain.elf import read_object

try:
    require_bpf()
except BackendUnavailable as _e:
    pytest.skip(f"kernel backend unavailable: {_e}", allow_module_level=True)

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parent.parent
MMAPABLE, RDONLY_PROG = 0x400, 0x80


SOURCES = {
    "plain_data": """
        int d = 5;
        int b;
        const volatile int r = 7;
        int t SEC(".data.tally") = 1;

        SEC("raw_tp") int touch(void *ctx)
        {
            __u32 cpu = bpf_get_smp_processor_id();
            d += 1;
            b |= 1u << cpu;
            t += r;
            return cpu;
        }
    """,
    # `first` is fine everywhere; `bump` needs direct value access on a PERCPU_ARRAY.
    "percpu_data": """
        int x SEC(".percpu") = 1;
        int d = 3;

        SEC("raw_tp") int first(void *ctx) { d += 1; return 0; }
        SEC("raw_tp") int bump(void *ctx) { x += 1; return 0; }
    """,
    "oob_read": """
        int d = 5;

        SEC("raw_tp") int ok1(void *ctx) { d += 1; return 0; }
        SEC("raw_tp") int oob(void *ctx) { return *(volatile int *)((char *)&d + 8); }
        SEC("raw_tp") int ok2(void *ctx) { d += 2; return 0; }
    """,
}

# One .percpu section (hits at 0, cpu_id at 8 in the lowered struct) and one shared counter.
LOWERED_MODEL = ProgramModel(
    "lowered",
    (Variable("hits", Scalar("u64"), ".percpu", init=(7,)), Variable("cpu_id", Scalar("u32"), ".percpu"),
     Variable("total", Scalar("u32"), ".data", init=(1,))),
    (Function("tick", (StoreCpu(Access("cpu_id")), Add(Access("hits"), 1), Add(Access("total"), 1))),),
)


def _raw(path: Path, **kw):
    try:
        return observe_raw(path, **kw)
    except BackendUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def lib():
    try:
        return open_libbpf()
    except BackendUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def objs() -> dict[str, Path]:
    try:
        clang = Clang.find()
    except ToolchainError as e:
        pytest.skip(str(e))
    import textwrap

    out = {name: compile_c(clang, PRELUDE + textwrap.dedent(body), name=name) for name, body in SOURCES.items()}
    glob = compile_c(clang, render_global(LOWERED_MODEL), name="lowered_global")
    facts = read_object(glob)
    offsets = {v.name: facts.variable_symbol(v.section, v.name).value for v in LOWERED_MODEL.variables}
    out["lowered"] = compile_c(clang, render_lowered(LOWERED_MODEL, offsets), name="lowered")
    return out


def u32(hexstr: str) -> int:
    return struct.unpack("<I", bytes.fromhex(hexstr)[:4])[0]


def by_section(result: dict) -> dict[str, dict]:
    return {m["section"] or m["name"]: m for m in result["maps"]}


# -- ordinary global data -------------------------------------------------------------------------------


PLAIN = {  # section -> (bpf_map__name as libbpf 1.1 reports it for plain_data.bpf.o, flags, initial value)
    ".data": ("plain_da.data", MMAPABLE, 5),
    ".bss": ("plain_da.bss", MMAPABLE, 0),
    ".rodata": ("plain_da.rodata", MMAPABLE | RDONLY_PROG, 7),
    ".data.tally": (".data.tally", MMAPABLE, 1),
}


def _check_plain(result: dict, cpus: list[int]) -> None:
    assert validate(result) == []
    assert result["source"] == "kernel" and result["open"]["ok"] and result["load"]["ok"]
    maps = by_section(result)
    assert sorted(maps) == sorted(PLAIN)
    for section, (name, flags, init) in PLAIN.items():
        m = maps[section]
        assert (m["name"], m["kernel_name"], m["type"], m["flags"]) == (name, name, "array", flags)
        assert (m["key_size"], m["value_size"], m["max_entries"], m["internal"], m["created"]) == (4, 4, 1, True,
                                                                                                   True)
        assert [u32(s) for s in m["before"]] == [init]
    n = len(cpus)
    assert u32(maps[".data"]["after"][0]) == 5 + n
    assert u32(maps[".bss"]["after"][0]) == sum(1 << c for c in cpus)
    assert u32(maps[".data.tally"]["after"][0]) == 1 + 7 * n
    assert maps[".rodata"]["after"] == maps[".rodata"]["before"]
    (prog,) = result["programs"]
    assert (prog["name"], prog["verdict"], prog["errno"]) == ("touch", "accepted", 0)
    assert prog["xlated_insns"] > 0
    assert [r["retval"] for r in result["runs"][:n]] == [[c] for c in cpus]
    assert {v["name"]: (v["section"], v["offset"], v["size"]) for v in result["variables"]} == {
        "d": (".data", 0, 4), "b": (".bss", 0, 4), "r": (".rodata", 0, 4), "t": (".data.tally", 0, 4)}


def test_plain_data_both_loaders(objs, lib):
    cpus = probes.online_cpus()
    runs = [("touch", c, 1) for c in cpus] + [("touch", max(probes.possible_cpus()) + 1, 1), ("nope", cpus[0], 2)]
    lb = observe_libbpf(objs["plain_data"], libbpf=lib, runs=runs)
    assert (lb["loader"], lb["env"]["libbpf"]) == ("libbpf", lib.version)
    _check_plain(lb, cpus)
    raw = _raw(objs["plain_data"], runs=runs)
    assert raw["loader"] == "raw" and raw["env"]["profile"].startswith("raw-")
    _check_plain(raw, cpus)
    for r in (lb, raw):
        offline, unknown = r["runs"][len(cpus):]
        assert offline["retval"] == [None] and "not online" in offline["error"]
        assert unknown["retval"] == [None, None] and "not loaded" in unknown["error"]


def test_environment_is_probed(objs, lib):
    env = observe_libbpf(objs["plain_data"], libbpf=lib)["env"]
    assert env["possible_cpus"] == len(probes.possible_cpus())
    assert env["online_cpus"] == probes.online_cpus()
    assert env["features"] == kernel_features()
    patched = bool(env["features"]["percpu_data"])
    noext = "+noext" if env["features"]["freplace"] is False else ""
    if lib.version_tuple() < (1, 8):
        assert env["profile"] == ("old-patched-kernel" if patched else "unpatched") + noext


def test_initial_values_for_shared_maps(objs, lib):
    init = {"plain_da.data": struct.pack("<i", 41)}
    lb = observe_libbpf(objs["plain_data"], libbpf=lib, runs=[("touch", 0, 1)], initial_values=init)
    raw = _raw(objs["plain_data"], runs=[("touch", 0, 1)], initial_values=init)
    for r in (lb, raw):
        data = by_section(r)[".data"]
        assert (u32(data["before"][0]), u32(data["after"][0])) == (41, 42)
    with pytest.raises(ValueError, match="value_size"):
        observe_libbpf(objs["plain_data"], libbpf=lib, initial_values={"plain_da.data": b"\0" * 3})


def test_libbpf_rejection_names_the_program(objs, lib):
    r = observe_libbpf(objs["oob_read"], libbpf=lib, runs=[("ok1", 0, 1)])
    assert validate(r) == []
    verdicts = {p["name"]: p for p in r["programs"]}
    assert [verdicts[n]["verdict"] for n in ("ok1", "oob", "ok2")] == ["accepted", "rejected", "not_loaded"]
    assert (verdicts["oob"]["errno"], verdicts["oob"]["message_class"]) == (errno.EACCES, "map_value_oob")
    assert r["load"]["ok"] is False
    # libbpf tears every map down when the object fails to load
    assert all(not m["created"] and m["before"] is None for m in r["maps"])
    assert r["runs"][0]["retval"] == [None]


# -- .percpu on this stack ----------------------------------------------------------------------------------


def test_percpu_libbpf_without_the_feature_fails_open(objs, lib):
    if lib.version_tuple() >= (1, 8):
        pytest.skip(f"libbpf {lib.version} may know .percpu")
    r = observe_libbpf(objs["percpu_data"], libbpf=lib, runs=[("bump", 0, 1)])
    assert validate(r) == []
    assert r["open"] == {"ok": False, "error_class": "bad_map_relo",
                         "message": "libbpf: prog 'bump': bad map relo against 'x' in section '.percpu'"}
    assert [(p["name"], p["verdict"]) for p in r["programs"]] == [("first", "not_loaded"), ("bump", "not_loaded")]
    assert r["maps"] == [] and r["runs"] == []


def test_percpu_raw_on_unpatched_kernel(objs):
    if kernel_features()["percpu_data"]:
        pytest.skip("the kernel supports direct value access on PERCPU_ARRAY")
    r = _raw(objs["percpu_data"], runs=[("bump", 0, 1)])
    assert validate(r) == []
    pc = by_section(r)[".percpu"]
    assert (pc["type"], pc["created"], pc["value_size"], pc["max_entries"]) == ("percpu_array", True, 4, 1)
    # the initial image reaches every possible CPU
    assert pc["before"] == ["01000000"] * len(probes.possible_cpus())
    first, bump = r["programs"]
    assert (first["name"], first["verdict"]) == ("first", "accepted")
    assert (bump["verdict"], bump["errno"], bump["message_class"], bump["message"]) == (
        "rejected", errno.EINVAL, "no_direct_value_access", "no direct value access support for this map type")
    assert r["runs"][0]["retval"] == [None]


def test_lowered_percpu_map_keeps_each_cpus_writes(objs, lib):
    cpus = probes.online_cpus()
    ncpu = len(probes.possible_cpus())
    image = struct.pack("<QI4x", 100, 0xFFFF)  # hits, cpu_id, tail padding
    runs = [("tick", c, c + 1) for c in cpus]
    for observe in (lambda: observe_libbpf(objs["lowered"], libbpf=lib, runs=runs, initial_values={"percpu": image}),
                    lambda: _raw(objs["lowered"], runs=runs, initial_values={"percpu": image})):
        r = observe()
        assert validate(r) == []
        maps = {m["name"]: m for m in r["maps"]}
        pc = maps["percpu"]
        assert (pc["type"], pc["internal"], pc["section"], pc["value_size"]) == ("percpu_array", False, None, 16)
        assert pc["before"] == [image.hex()] * ncpu
        after = [struct.unpack("<QI", bytes.fromhex(s)[:12]) for s in pc["after"]]
        for c in range(ncpu):
            assert after[c] == ((100 + c + 1, c) if c in cpus else (100, 0xFFFF))
        total = by_section(r)[".data"]
        assert u32(total["after"][0]) == 1 + sum(c + 1 for c in cpus)


# -- skeleton -------------------------------------------------------------------------------------------------


def test_skeleton_matches_datasec_layout(objs):
    from backends.kernel.skeleton import check_skeleton, layout_mismatches

    try:
        rep = check_skeleton(objs["plain_data"])
    except BackendUnavailable as e:
        pytest.skip(str(e))
    assert rep.ok, rep.message
    assert sorted(rep.by_section()) == sorted(PLAIN)
    assert layout_mismatches(rep, read_object(objs["plain_data"])) == []
    old = check_skeleton(objs["percpu_data"])
    if not old.ok:  # a bpftool without the feature fails like old libbpf
        assert "bad map relo" in old.message


# -- resources and the command line -------------------------------------------------------------------------


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_fd_leaks(objs, lib):
    names = ("plain_data", "percpu_data", "oob_read", "lowered")
    for name in names:  # libbpf's one-time probing before counting
        observe_libbpf(objs[name], libbpf=lib, runs=[("touch", 0, 1)])
        _raw(objs[name], runs=[("touch", 0, 1)])
    before = _fd_count()
    for i in range(150):
        name = names[i % len(names)]
        observe_libbpf(objs[name], libbpf=lib, runs=[("touch", 0, 1), ("tick", 0, 1)])
        observe_raw(objs[name], runs=[("touch", 0, 1), ("tick", 0, 1)])
    assert _fd_count() == before


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "backends.kernel", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=60)


def test_cli_missing_file(tmp_path):
    p = _cli("run", str(tmp_path / "absent.o"))
    assert p.returncode == 2 and p.stdout == ""
    assert len(p.stderr.splitlines()) == 1 and "no such file" in p.stderr


def test_cli_corrupt_object(tmp_path):
    junk = tmp_path / "junk.o"
    junk.write_bytes(os.urandom(4096))
    p = _cli("run", str(junk), "--loader", "raw")
    assert p.returncode == 2 and p.stdout == ""
    assert len(p.stderr.splitlines()) == 1 and "Traceback" not in p.stderr


def test_cli_bad_run_spec(objs):
    p = _cli("run", str(objs["plain_data"]), "--run", "touch@x")
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1
