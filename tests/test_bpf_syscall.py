"""The bpf(2) wrappers and the environment probes, against the running kernel."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import struct

import pytest

from backends.kernel import bpf, probes
from toolchain import insn as I
from toolchain.btf import encode as btf_encode

_USABLE, _REASON = probes.bpf_usable()
pytestmark = pytest.mark.skipif(not _USABLE, reason=_REASON or "bpf() unusable")

ZERO_KEY = struct.pack("<I", 0)


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _bad_prog() -> bytes:
    # r2 is never written before it is read.
    return I.encode([I.mov64_reg(0, 2), I.exit_insn()])


def _ret_prog(value: int) -> bytes:
    return I.encode([I.mov64_imm(0, value), I.exit_insn()])


def _store_cpu_id_prog(map_fd: int) -> bytes:
    """raw_tp: *(u64 *)bpf_map_lookup_elem(map, &0) = bpf_get_smp_processor_id(); return 0."""
    return I.encode([
        I.call_helper(probes.BPF_FUNC_get_smp_processor_id),
        I.mov64_reg(6, 0),
        I.st_mem(I.BPF_W, 10, -4, 0),
        I.mov64_reg(2, 10),
        I.alu64_imm(I.BPF_ADD, 2, -4),
        *I.ld_map_fd(1, map_fd),
        I.call_helper(probes.BPF_FUNC_map_lookup_elem),
        I.jmp_imm(I.BPF_JEQ, 0, 0, 1),
        I.stx_mem(I.BPF_DW, 0, 6, 0),
        I.mov64_imm(0, 0),
        I.exit_insn(),
    ])


# cpulist parsing: no kernel needed.

@pytest.mark.parametrize(("text", "cpus"), [
    ("", []),
    ("\n", []),
    ("0", [0]),
    ("0\n", [0]),
    ("0-3", [0, 1, 2, 3]),
    ("0,2-3", [0, 2, 3]),
    ("2-3,0", [0, 2, 3]),
    ("0-1,1-2", [0, 1, 2]),
    ("5-5", [5]),
    (" 0 , 4-5 \n", [0, 4, 5]),
    ("0-7:2/4", [0, 1, 4, 5]),
    ("127", [127]),
])
def test_parse_cpulist(text, cpus):
    assert probes.parse_cpulist(text) == cpus


@pytest.mark.parametrize("text", ["a", "3-1", "0-", "-1", "0--2", "1,,x", "0-7:5/4", "0-7:1/0"])
def test_parse_cpulist_rejects(text):
    with pytest.raises(ValueError):
        probes.parse_cpulist(text)


@pytest.mark.parametrize(("cpus", "text"), [
    ([], ""), ([0], "0"), ([0, 1, 2, 3], "0-3"), ([3, 0, 2], "0,2-3"), ([0, 1, 1, 5, 6, 9], "0-1,5-6,9"),
])
def test_format_cpulist(cpus, text):
    assert probes.format_cpulist(cpus) == text
    assert probes.parse_cpulist(text) == sorted(set(cpus))


def test_format_cpulist_rejects_negative():
    with pytest.raises(ValueError):
        probes.format_cpulist([-1, 0])


def test_cpu_sets_are_consistent():
    possible, online = probes.possible_cpus(), probes.online_cpus()
    assert possible and online
    assert set(online) <= set(possible)
    assert isinstance(probes.kernel_release(), str) and probes.kernel_release()


def test_bpf_usable_reports_non_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert probes.bpf_usable() == (False, "not root (euid 1000)")


def test_bpf_error_formatting():
    log = "0: R1=ctx() R10=fp0\n0: (bf) r0 = r2\nR2 !read_ok\nprocessed 1 insns (limit 1000000) x\n"
    e = bpf.BpfError(errno.EACCES, "BPF_PROG_LOAD", log)
    assert isinstance(e, OSError)
    assert e.errno == errno.EACCES and e.op == "BPF_PROG_LOAD" and e.log == log
    assert str(e) == "BPF_PROG_LOAD: Permission denied (EACCES): R2 !read_ok"
    assert str(bpf.BpfError(errno.EPERM, "BPF_MAP_UPDATE_ELEM")) == \
        "BPF_MAP_UPDATE_ELEM: Operation not permitted (EPERM)"
    again = pickle.loads(pickle.dumps(e))
    assert (again.errno, again.op, again.log) == (e.errno, e.op, e.log)


def test_fd_ownership():
    r, w = os.pipe()
    os.close(w)
    fd = bpf.Fd(r)
    assert int(fd) == fd.fileno() == r
    with fd:
        pass
    assert fd.closed
    fd.close()  # idempotent
    with pytest.raises(ValueError):
        fd.fileno()
    with pytest.raises(OSError):
        os.fstat(r)


# Maps.

def test_array_create_update_lookup():
    with bpf.map_create(bpf.ARRAY, 4, 12, 4, name="arr") as m:
        assert bpf.map_lookup_elem(m, struct.pack("<I", 2), 12) == bytes(12)
        bpf.map_update_elem(m, struct.pack("<I", 2), b"hello world!")
        assert bpf.map_lookup_elem(m, struct.pack("<I", 2), 12) == b"hello world!"
        with pytest.raises(bpf.BpfError) as ei:
            bpf.map_update_elem(m, struct.pack("<I", 4), bytes(12))
        assert ei.value.errno == errno.E2BIG
        info = bpf.map_info(m)
        assert (info.type, info.key_size, info.value_size, info.max_entries, info.name) == \
            (bpf.ARRAY, 4, 12, 4, "arr")
        with bpf.map_get_fd_by_id(info.id) as again:
            assert bpf.map_lookup_elem(again, struct.pack("<I", 2), 12) == b"hello world!"


@pytest.mark.parametrize("value_size", [4, 8, 12])
def test_percpu_array_slots(value_size):
    ncpus = len(probes.possible_cpus())
    slot = bpf.round_up(value_size, 8)
    size = bpf.percpu_value_size(value_size, ncpus)
    assert size == ncpus * slot
    with bpf.map_create(bpf.PERCPU_ARRAY, 4, value_size, 1) as m:
        assert bpf.map_lookup_elem(m, ZERO_KEY, size) == bytes(size)
        values = [bytes([0x10 + cpu]) * value_size for cpu in range(ncpus)]
        image = b"".join(v.ljust(slot, b"\0") for v in values)
        bpf.map_update_elem(m, ZERO_KEY, image)
        back = bpf.map_lookup_elem(m, ZERO_KEY, size)
        assert [back[c * slot:c * slot + value_size] for c in range(ncpus)] == values
        assert bpf.map_info(m).type == bpf.PERCPU_ARRAY


def test_frozen_map_rejects_update():
    with bpf.map_create(bpf.ARRAY, 4, 8, 1) as m:
        bpf.map_update_elem(m, ZERO_KEY, struct.pack("<Q", 7))
        bpf.map_freeze(m)
        with pytest.raises(bpf.BpfError) as ei:
            bpf.map_update_elem(m, ZERO_KEY, struct.pack("<Q", 8))
        assert ei.value.errno == errno.EPERM and ei.value.op == "BPF_MAP_UPDATE_ELEM"
        assert bpf.map_lookup_elem(m, ZERO_KEY, 8) == struct.pack("<Q", 7)


def test_btf_load_and_map_with_btf():
    strings = b"\0int\0"
    # One BTF_KIND_INT: name "int", 4 bytes, signed, 32 bits.
    types = struct.pack("<III", 1, 1 << 24, 4) + struct.pack("<I", (1 << 24) | 32)
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    with bpf.btf_load(header + types + strings) as btf, \
            bpf.map_create(bpf.ARRAY, 4, 4, 1, btf_fd=btf.fileno(), btf_key_type_id=1,
                           btf_value_type_id=1) as m:
        info = bpf.map_info(m)
        assert info.btf_id and (info.btf_key_type_id, info.btf_value_type_id) == (1, 1)
    with pytest.raises(bpf.BpfError) as ei:
        bpf.btf_load(header[:4] + bytes(20), log_level=1)
    assert ei.value.errno == errno.EINVAL and ei.value.op == "BPF_BTF_LOAD"


# Programs.

def test_raw_tp_records_cpu_per_slot():
    ncpus = len(probes.possible_cpus())
    with bpf.map_create(bpf.PERCPU_ARRAY, 4, 8, 1) as m:
        fd, log = bpf.prog_load(bpf.RAW_TRACEPOINT, _store_cpu_id_prog(m.fileno()), name="cpu_id")
        with fd:
            assert "processed" in log
            # Seed every slot with a value no CPU id can take.
            bpf.map_update_elem(m, ZERO_KEY, struct.pack("<Q", 0xDEAD) * ncpus)
            online = probes.online_cpus()
            for cpu in online:
                assert bpf.prog_test_run(fd, cpu=cpu).retval == 0
            slots = struct.unpack(f"<{ncpus}Q", bpf.map_lookup_elem(m, ZERO_KEY, 8 * ncpus))
            for cpu in range(ncpus):
                assert slots[cpu] == (cpu if cpu in online else 0xDEAD)
            info = bpf.prog_info(fd)
            assert info.type == bpf.RAW_TRACEPOINT and info.name == "cpu_id"
            assert info.map_ids == [bpf.map_info(m).id]


def test_test_run_on_offline_or_bogus_cpu_fails():
    with bpf.prog_load(bpf.RAW_TRACEPOINT, _ret_prog(0))[0] as fd, pytest.raises(bpf.BpfError) as ei:
        bpf.prog_test_run(fd, cpu=1 << 20)
    assert ei.value.errno == errno.ENXIO and ei.value.op == "BPF_PROG_TEST_RUN"


@pytest.mark.parametrize("value", [0, 1, 42, 0x7FFFFFFF, 0xFFFFFFFF])
def test_test_run_retval(value):
    with bpf.prog_load(bpf.RAW_TRACEPOINT, _ret_prog(value))[0] as fd:
        assert bpf.prog_test_run(fd).retval == value


def test_socket_filter_test_run_with_data():
    with bpf.prog_load(bpf.SOCKET_FILTER, _ret_prog(3))[0] as fd:
        run = bpf.prog_test_run(fd, data_in=bytes(64), repeat=10)
        assert run.retval == 3 and run.duration_ns >= 0


def test_prog_info_and_xlated():
    prog = _ret_prog(5)
    fd, _ = bpf.prog_load(bpf.SOCKET_FILTER, prog, name="five")
    with fd:
        info = bpf.prog_info(fd)
        assert info.type == bpf.SOCKET_FILTER and info.name == "five" and info.id > 0
        assert info.xlated_prog_len == len(prog)
        assert info.nr_map_ids == 0 and info.map_ids == []
        xlated = bpf.prog_xlated(fd)
        assert len(xlated) == info.xlated_prog_len
        assert I.decode(xlated) == I.decode(prog)
        with bpf.prog_get_fd_by_id(info.id) as again:
            assert bpf.prog_info(again).id == info.id


def test_verifier_rejection_carries_errno_and_log():
    with pytest.raises(bpf.BpfError) as ei:
        bpf.prog_load(bpf.SOCKET_FILTER, _bad_prog())
    e = ei.value
    assert e.errno == errno.EACCES and e.op == "BPF_PROG_LOAD"
    assert "R2 !read_ok" in e.log
    assert str(e) == "BPF_PROG_LOAD: Permission denied (EACCES): R2 !read_ok"


def test_log_overflow_reports_true_verdict():
    # A log far larger than 128 bytes: the kernel's ENOSPC must not hide the verdict.
    filler = [I.mov64_imm(3, i) for i in range(64)]
    with pytest.raises(bpf.BpfError) as ei:
        bpf.prog_load(bpf.SOCKET_FILTER, I.encode([*filler, I.mov64_reg(0, 2), I.exit_insn()]),
                      log_level=2, log_size=128)
    assert ei.value.errno == errno.EACCES
    fd, log = bpf.prog_load(bpf.SOCKET_FILTER, I.encode([*filler, I.mov64_imm(0, 0), I.exit_insn()]),
                            log_level=2, log_size=128)
    fd.close()
    assert 0 < len(log) < 128


def test_percpu_map_value_ld_imm64_rejected():
    if probes.probe_percpu_data():
        pytest.skip("this kernel supports direct value access to PERCPU_ARRAY (global per-CPU data)")
    with bpf.map_create(bpf.PERCPU_ARRAY, 4, 8, 1) as m:
        prog = I.encode([*I.ld_map_value(1, m.fileno(), 0), I.ldx_mem(I.BPF_DW, 0, 1, 0), I.exit_insn()])
        with pytest.raises(bpf.BpfError) as ei:
            bpf.prog_load(bpf.SOCKET_FILTER, prog)
    assert ei.value.errno == errno.EINVAL
    assert "no direct value access support for this map type" in ei.value.log
    assert str(ei.value).endswith("no direct value access support for this map type")


def test_array_map_value_ld_imm64_loads():
    # The same shape on a plain ARRAY is ordinary global data and must load.
    with bpf.map_create(bpf.ARRAY, 4, 8, 1) as m:
        bpf.map_update_elem(m, ZERO_KEY, struct.pack("<Q", 99))
        prog = I.encode([*I.ld_map_value(1, m.fileno(), 0), I.ldx_mem(I.BPF_DW, 0, 1, 0), I.exit_insn()])
        with bpf.prog_load(bpf.RAW_TRACEPOINT, prog)[0] as fd:
            assert bpf.prog_test_run(fd).retval == 99


# Probes.

def test_probes_return_types():
    assert isinstance(probes.probe_percpu_data(), bool)
    assert isinstance(probes.probe_bpf_f_cpu(), bool)
    assert probes.probe_percpu_insn_jit() in (True, False, None)
    assert probes.jit_enabled() in (True, False, None)
    facts = probes.probe_all()
    assert facts["kernel_release"] == os.uname().release
    assert facts["possible_cpus"] == len(probes.possible_cpus())
    assert facts["online_cpus"] == probes.online_cpus()
    assert set(facts["features"]) == {"percpu_data", "percpu_direct_value", "bpf_f_cpu", "percpu_insn_jit",
                                      "freplace", "jit"}
    assert facts["features"]["jit"] is facts["jit_enabled"]
    assert facts["jit_always_on"] in (True, False, None)
    assert all(v is None or isinstance(v, bool) for v in facts["features"].values())


def test_probe_all_without_bpf_gives_none(monkeypatch):
    monkeypatch.setattr(probes, "bpf_usable", lambda: (False, "not root (euid 1000)"))
    facts = probes.probe_all()
    # the sysctl needs no bpf(): the JIT's state is still reported
    assert facts["features"] == {"percpu_data": None, "percpu_direct_value": None, "bpf_f_cpu": None,
                                 "percpu_insn_jit": None, "freplace": None, "jit": probes.jit_enabled()}
    assert facts["bpf_unusable_reason"] == "not root (euid 1000)"


def test_bpf_f_cpu_probe_matches_lookup():
    with bpf.map_create(bpf.PERCPU_ARRAY, 4, 8, 1) as m:
        try:
            bpf.map_lookup_elem(m, ZERO_KEY, 8, bpf.BPF_F_CPU)
            accepted = True
        except bpf.BpfError as e:
            assert e.errno == errno.EINVAL
            accepted = False
    assert probes.probe_bpf_f_cpu() is accepted


def test_probes_do_not_leak_fds():
    before = _fd_count()
    for _ in range(5):
        probes.probe_all()
    assert _fd_count() == before


def test_no_fd_leak_over_many_cycles():
    before = _fd_count()
    for i in range(200):
        with bpf.map_create(bpf.PERCPU_ARRAY if i % 2 else bpf.ARRAY, 4, 8, 1) as m:
            fd, _ = bpf.prog_load(bpf.SOCKET_FILTER, _ret_prog(i), log_level=i % 2)
            fd.close()
            with pytest.raises(bpf.BpfError):
                bpf.prog_load(bpf.SOCKET_FILTER, _bad_prog())
            with pytest.raises(bpf.BpfError):
                bpf.prog_load(bpf.SOCKET_FILTER, _bad_prog(), log_level=2, log_size=128)
            value_prog = I.encode([*I.ld_map_value(1, m.fileno(), 0), I.ldx_mem(I.BPF_DW, 0, 1, 0),
                                   I.exit_insn()])
            # Fails on PERCPU_ARRAY unless the kernel has global per-CPU data; either way nothing may leak.
            with contextlib.suppress(bpf.BpfError):
                bpf.prog_load(bpf.SOCKET_FILTER, value_prog)[0].close()
            with pytest.raises(bpf.BpfError):
                bpf.map_update_elem(m, struct.pack("<I", 1), bytes(8))
    assert _fd_count() == before


# func_info, extension programs and links.

def _global_call_prog() -> bytes:
    """probe_main calls f (a global subprogram at insn 2), which returns 1."""
    return I.encode([I.call_rel(1), I.exit_insn(), I.mov64_imm(0, 1), I.exit_insn()])


def test_func_info_pairs_mark_a_global_subprogram():
    with bpf.btf_load(btf_encode(probes._FREPLACE_BTF)) as btf:
        fd, log = bpf.prog_load(bpf.RAW_TRACEPOINT, _global_call_prog(), name="probe_main", prog_btf_fd=btf,
                                func_info=[(0, 6), (2, probes._FREPLACE_TARGET_FUNC)], log_level=2)
        with fd:
            assert bpf.prog_test_run(fd, cpu=0).retval == 1
        assert "Func#1 ('f') is global" in log
        with pytest.raises(bpf.BpfError) as e:
            bpf.prog_load(bpf.RAW_TRACEPOINT, _global_call_prog(), prog_btf_fd=btf, func_info=[(0, 6), (1, 3)])
        assert e.value.errno == errno.EINVAL and "doesn't match subprog layout" in str(e.value)


def test_link_create_refusal_leaks_nothing():
    # a socket filter has no freplace attachment: refused before any target is looked at
    before = _fd_count()
    with bpf.prog_load(bpf.SOCKET_FILTER, _ret_prog(0))[0] as fd:
        with pytest.raises(bpf.BpfError) as e:
            bpf.link_create(fd, fd, bpf.BPF_TRACE_FREPLACE)
        assert e.value.op == "BPF_LINK_CREATE" and e.value.errno == errno.EINVAL
    assert _fd_count() == before


def test_freplace_probe():
    before = _fd_count()
    usable, reason = probes.probe_freplace()
    assert isinstance(usable, bool) and (reason == "") == usable
    assert _fd_count() == before
