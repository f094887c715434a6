"""The ctypes libbpf binding, checked against the system libbpf on real objects.

Expectations marked `libbpf 1.1` record what that release does with global data and `.percpu`; they are
skipped on other releases rather than guessed.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import errno
import os
import re
import shutil
import struct
import subprocess
import textwrap
from pathlib import Path

import pytest

from backends.kernel.libbpf import (
    BPF_F_MMAPABLE,
    BPF_F_RDONLY_PROG,
    BPF_MAP_TYPE_ARRAY,
    LIBBPF_DEBUG,
    LIBBPF_INFO,
    Libbpf,
    LibbpfError,
    LibbpfMissing,
)
from tests.objects import PRELUDE

if os.geteuid() != 0:
    pytest.skip("loading BPF objects needs root", allow_module_level=True)
try:
    LIB = Libbpf()
except LibbpfMissing as _e:
    pytest.skip(f"system libbpf unusable: {_e}", allow_module_level=True)

CLANG = shutil.which("clang-19")
BPF_PROG_TYPE_RAW_TRACEPOINT = 17
LIBBPF_ERRNO__RELOC = 4005

libbpf_11 = pytest.mark.skipif(
    not LIB.version.startswith("1.1."), reason=f"expectations recorded on libbpf 1.1, found {LIB.version}"
)


SOURCES = {
    # One variable in each kind of global data section libbpf 1.1 maps.
    "plain_data": """
        int d = 5;
        int b;
        const volatile int r = 7;
        int t SEC(".data.tally") = 1;
        const volatile int g SEC(".rodata.tag") = 2;

        SEC("raw_tp") int touch(void *ctx)
        {
            __u32 cpu = bpf_get_smp_processor_id();
            d += 1;
            b |= 1u << cpu;
            t += r + g;
            return cpu;
        }
    """,
    "percpu_data": """
        int x SEC(".percpu") = 1;

        SEC("raw_tp") int bump(void *ctx)
        {
            x += 1;
            return 0;
        }
    """,
    # A .percpu variable no instruction refers to.
    "percpu_unref": """
        int x SEC(".percpu") = 1;
        int d = 3;

        SEC("raw_tp") int bump(void *ctx)
        {
            d += 1;
            return 0;
        }
    """,
    # Reads past the end of .data: the verifier must refuse it.
    "oob_read": """
        int d = 5;

        SEC("raw_tp") int oob(void *ctx)
        {
            return *(volatile int *)((char *)&d + 8);
        }
    """,
}


@pytest.fixture(scope="module")
def objs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    if CLANG is None:
        pytest.skip("clang-19 not installed")
    out = tmp_path_factory.mktemp("bpfobj")
    paths = {}
    for name, body in SOURCES.items():
        src = out / f"{name}.bpf.c"
        src.write_text(PRELUDE + textwrap.dedent(body))
        obj = out / f"{name}.bpf.o"
        subprocess.run([CLANG, "-target", "bpf", "-O2", "-g", "-c", str(src), "-o", str(obj)], check=True)
        paths[name] = str(obj)
    return paths


def online_cpus() -> list[int]:
    cpus: list[int] = []
    for part in Path("/sys/devices/system/cpu/online").read_text().strip().split(","):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def u32(raw: bytes) -> int:
    return struct.unpack("<I", raw[:4])[0]


ZERO_KEY = b"\0\0\0\0"


# -- the library itself ---------------------------------------------------------------------------------


def test_version_and_resolved_path():
    assert os.path.isabs(LIB.path) and os.path.isfile(LIB.path)
    assert os.path.realpath(LIB.path) == LIB.path
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?", LIB.version)
    m = re.search(r"libbpf\.so\.(\d+\.\d+\.\d+)$", LIB.path)
    if m:
        assert LIB.version == m.group(1)


def test_missing_path_is_libbpf_missing(tmp_path):
    missing = tmp_path / "nope" / "libbpf.so.1"
    with pytest.raises(LibbpfMissing, match=f"libbpf.so not found at {re.escape(str(missing))}"):
        Libbpf(str(missing))


def test_library_without_libbpf_symbols_is_libbpf_missing():
    libc = ctypes.util.find_library("c")
    assert libc
    with pytest.raises(LibbpfMissing, match="lacks symbol bpf_object__open_file"):
        Libbpf(libc)


def test_explicit_path_and_second_instance_share_capture(objs):
    other = Libbpf(LIB.path)
    assert other.path == LIB.path and other.version == LIB.version
    # The print hook is global per .so: both instances must still route lines to their own object.
    with other.open(objs["plain_data"]) as a, LIB.open(objs["percpu_unref"]) as b:
        assert any("plain_data.bpf.o" in line for line in a.log)
        assert not any("percpu_unref" in line for line in a.log)
        assert any("percpu_unref.bpf.o" in line for line in b.log)
        assert not any("plain_data" in line for line in b.log)


# -- plain global data ----------------------------------------------------------------------------------


# libbpf 1.1 names `.data`/`.bss`/`.rodata` maps "<object name, cut to 8 chars>.<section>" and maps of
# custom sections (".data.*", ".rodata.*") by the section name alone.
PLAIN_MAPS = {
    "plain_da.data": (BPF_F_MMAPABLE, struct.pack("<i", 5)),
    "plain_da.bss": (BPF_F_MMAPABLE, struct.pack("<i", 0)),
    "plain_da.rodata": (BPF_F_MMAPABLE | BPF_F_RDONLY_PROG, struct.pack("<i", 7)),
    ".data.tally": (BPF_F_MMAPABLE, struct.pack("<i", 1)),
    ".rodata.tag": (BPF_F_MMAPABLE | BPF_F_RDONLY_PROG, struct.pack("<i", 2)),
}


@libbpf_11
def test_plain_data_maps_after_open(objs):
    with LIB.open(objs["plain_data"]) as obj:
        views = {m.name: m for m in obj.maps()}
        assert sorted(views) == sorted(PLAIN_MAPS)
        assert [f"{v.map_flags:#x}" for v in views.values()].count("0x480") == 2
        for name, (flags, init) in PLAIN_MAPS.items():
            v = views[name]
            assert v.type == BPF_MAP_TYPE_ARRAY
            assert (v.key_size, v.value_size, v.max_entries) == (4, len(init), 1)
            assert v.map_flags == flags
            assert v.initial_value == init
            assert v.internal is True
            assert v.autocreate is True
            assert v.fd == -1


def test_programs_view(objs):
    with LIB.open(objs["plain_data"]) as obj:
        (p,) = obj.programs()
        assert (p.name, p.section, p.type, p.fd, p.autoload) == (
            "touch", "raw_tp", BPF_PROG_TYPE_RAW_TRACEPOINT, -1, True)
        assert obj.prog_fd("touch") == -1
        obj.load()
        (p,) = obj.programs()
        assert p.fd >= 0 and obj.prog_fd("touch") == p.fd
        assert all(m.fd >= 0 for m in obj.maps())


def test_log_captures_every_level_without_newlines(objs):
    with LIB.open(objs["plain_data"]) as obj:
        assert LIBBPF_DEBUG in {r.level for r in obj.records}
        assert obj.log[0] == f"libbpf: loading object from {objs['plain_data']}"
        assert all(not line.endswith("\n") for line in obj.log)
        opened = len(obj.log)
        obj.load()
        assert len(obj.log) > opened
        assert any("created successfully" in line for line in obj.log[opened:])


def test_run_on_each_cpu_writes_shared_maps(objs):
    cpus = online_cpus()
    with LIB.open(objs["plain_data"]) as obj:
        obj.load()
        for cpu in cpus:
            assert obj.test_run("touch", cpu=cpu) == cpu
        n = len(cpus)
        # One shared copy: every CPU's write lands in the same value.
        assert u32(obj.lookup(".data", ZERO_KEY, 4)) == 5 + n
        assert u32(obj.lookup(".bss", ZERO_KEY, 4)) == sum(1 << c for c in cpus)
        assert u32(obj.lookup(".data.tally", ZERO_KEY, 4)) == 1 + n * (7 + 2)
        assert u32(obj.lookup(".rodata", ZERO_KEY, 4)) == 7
        # The reported map name resolves to the same map as the section name.
        assert obj.map_fd("plain_da.data") == obj.map_fd(".data")
        obj.test_run("touch", cpu=None)
        assert u32(obj.lookup("plain_da.data", ZERO_KEY, 4)) == 6 + n


def test_set_initial_value_wrong_size_is_einval(objs):
    with LIB.open(objs["plain_data"]) as obj:
        assert obj.set_initial_value(".data", b"\1\2\3") == -errno.EINVAL
        assert obj.set_initial_value(".data", b"\0" * 8) == -errno.EINVAL
        assert obj.map(".data").initial_value == struct.pack("<i", 5)


def test_set_initial_value_before_load_reaches_kernel(objs):
    with LIB.open(objs["plain_data"]) as obj:
        assert obj.set_initial_value(".data", struct.pack("<i", 41)) == 0
        assert obj.set_initial_value(".rodata", struct.pack("<i", 100)) == 0
        assert obj.map(".data").initial_value == struct.pack("<i", 41)
        obj.load()
        assert u32(obj.lookup(".data", ZERO_KEY, 4)) == 41
        obj.test_run("touch", cpu=0)
        assert u32(obj.lookup(".data", ZERO_KEY, 4)) == 42
        # The program sees the replaced constant, not the one compiled in.
        assert u32(obj.lookup(".data.tally", ZERO_KEY, 4)) == 1 + 100 + 2


@libbpf_11
def test_mutations_after_load_are_refused(objs):
    with LIB.open(objs["plain_data"]) as obj:
        obj.load()
        # libbpf 1.1 refuses a new initial value once the map exists with -EINVAL, a resize with -EBUSY.
        assert obj.set_initial_value(".data", struct.pack("<i", 1)) == -errno.EINVAL
        assert obj.set_value_size(".bss", 8) == -errno.EBUSY


@libbpf_11
def test_set_value_size_before_load(objs):
    with LIB.open(objs["plain_data"]) as obj:
        assert obj.set_value_size(".bss", 8) == 0
        assert obj.map(".bss").value_size == 8
        obj.load()
        # The section's BTF still says 4 bytes, so libbpf 1.1 creates the map without BTF.
        assert any(
            "Error in bpf_create_map_xattr(plain_da.bss)" in line and "Retrying without BTF" in line
            for line in obj.log
        )
        assert obj.lookup(".bss", ZERO_KEY, 8) == b"\0" * 8


def test_unknown_names_raise_keyerror(objs):
    with LIB.open(objs["plain_data"]) as obj:
        with pytest.raises(KeyError):
            obj.map_fd("nosuchmap")
        with pytest.raises(KeyError):
            obj.prog_fd("nosuchprog")


def test_close_once_and_closed_use(objs):
    obj = LIB.open(objs["plain_data"])
    with obj:
        pass
    assert obj.closed
    obj.close()
    with pytest.raises(ValueError, match="closed"):
        obj.maps()


# -- failures -------------------------------------------------------------------------------------------


def test_open_missing_file(tmp_path):
    path = str(tmp_path / "absent.bpf.o")
    with pytest.raises(LibbpfError) as ei:
        LIB.open(path)
    e = ei.value
    assert (e.op, e.errno) == ("open", errno.ENOENT)
    assert e.log[0] == f"libbpf: loading object from {path}"
    assert str(e).startswith("open failed: ENOENT")


def test_load_failure_carries_verifier_log(objs):
    with LIB.open(objs["oob_read"]) as obj, pytest.raises(LibbpfError) as ei:
        obj.load()
    e = ei.value
    assert (e.op, e.errno) == ("load", errno.EACCES)
    assert any("-- BEGIN PROG LOAD LOG --" in line for line in e.log)
    assert any("invalid access to map value" in line for line in e.log)
    assert "\n" not in str(e)
    assert str(e).startswith("load failed: EACCES (13): ")


SKIPPED_PERCPU = re.compile(r"libbpf: elf: skipping unrecognized data section\(\d+\) \.percpu")


# libbpf 1.1.2 on percpu_data.bpf.o prints, among its DEBUG lines:
#   libbpf: elf: section(5) .percpu, size 4, link 0, flags 3, type=1
#   libbpf: elf: skipping unrecognized data section(5) .percpu
#   ...
#   libbpf: sec '.relraw_tp': relo #0: insn #0 against 'x'
#   libbpf: prog 'bump': bad map relo against 'x' in section '.percpu'
# and bpf_object__open_file fails with errno LIBBPF_ERRNO__RELOC (4005).
@libbpf_11
def test_percpu_object_fails_to_open(objs):
    with pytest.raises(LibbpfError) as ei:
        LIB.open(objs["percpu_data"])
    e = ei.value
    assert (e.op, e.errno) == ("open", LIBBPF_ERRNO__RELOC)
    assert any(SKIPPED_PERCPU.fullmatch(line) for line in e.log)
    assert "libbpf: prog 'bump': bad map relo against 'x' in section '.percpu'" in e.log
    assert str(e) == (
        "open failed: LIBBPF_ERRNO__RELOC (4005): "
        "libbpf: prog 'bump': bad map relo against 'x' in section '.percpu'"
    )


# Unreferenced, the section is only skipped (same INFO line); no map is made for it and the object loads.
@libbpf_11
def test_unreferenced_percpu_section_is_skipped(objs):
    with LIB.open(objs["percpu_unref"]) as obj:
        (skipped,) = [r for r in obj.records if SKIPPED_PERCPU.fullmatch(r.line)]
        # Printed at INFO, so a WARN-only print hook never shows it.
        assert skipped.level == LIBBPF_INFO
        assert [m.name for m in obj.maps()] == ["percpu_u.data"]
        obj.load()
        assert obj.test_run("bump", cpu=0) == 0
        assert u32(obj.lookup(".data", ZERO_KEY, 4)) == 4
        assert [m.name for m in obj.maps()] == ["percpu_u.data"]


# -- resources ------------------------------------------------------------------------------------------


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_fd_leaks(objs, tmp_path):
    absent = str(tmp_path / "absent.bpf.o")

    def cycle() -> None:
        with LIB.open(objs["plain_data"]) as obj:
            obj.load()
            obj.test_run("touch", cpu=0)
        with LIB.open(objs["oob_read"]) as obj, pytest.raises(LibbpfError):
            obj.load()
        for bad in (objs["percpu_data"], absent):
            with contextlib.suppress(LibbpfError):
                LIB.open(bad).close()

    cycle()  # let libbpf do its one-time feature probing before counting
    before = _fd_count()
    for _ in range(100):
        cycle()
    assert _fd_count() == before


def test_ctrl_c_inside_the_print_callback_is_not_lost(monkeypatch):
    # ctypes drops an exception raised in a C callback; the loader keeps a KeyboardInterrupt and raises it again
    from backends.kernel import libbpf as lb

    monkeypatch.setattr(lb, "_format", lambda fmt, ap: "line\n")  # no va_list outside a real callback
    class Interrupting(list):
        def append(self, item):  # noqa: ANN001, ANN201
            raise KeyboardInterrupt

    returned = []
    with pytest.raises(KeyboardInterrupt), lb._capture(Interrupting()):
        returned.append(lb._on_print(0, 1, None))  # back to C normally; raised when libbpf returns
    assert returned == [0] and lb._interrupted is False
