"""The simulated kernel and verifier on hand-built programs: every rejection class with its errno, the per-CPU
rewrite, map syscall semantics per kernel profile, and what a missing rewrite does at run time."""

from __future__ import annotations

import errno

import pytest

from backends.sim.interp import BpfFault
from backends.sim.kernel import KERNEL_PROFILES, SimError, SimKernel
from toolchain.insn import (
    BPF_ADD,
    BPF_B,
    BPF_DW,
    BPF_JGT,
    BPF_JNE,
    BPF_PSEUDO_KFUNC_CALL,
    BPF_W,
    Insn,
    alu64_imm,
    alu64_reg,
    call_helper,
    call_rel,
    exit_insn,
    ja,
    jmp_imm,
    ld_imm64,
    ld_map_fd,
    ld_map_value,
    ldx_mem,
    mov64_imm,
    mov64_reg,
    st_mem,
    stx_mem,
)
from toolchain.uapi import (
    BPF_F_ALL_CPUS,
    BPF_F_CPU,
    BPF_F_MMAPABLE,
    BPF_F_RDONLY_PROG,
    BPF_MAP_TYPE_ARRAY,
    BPF_MAP_TYPE_PERCPU_ARRAY,
    BPF_MAP_TYPE_PROG_ARRAY,
)

PCPU, ARRAY = BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_ARRAY
KEY0 = bytes(4)
RET0 = [mov64_imm(0, 0), exit_insn()]


def kernel(profile: str = "patched", possible: int = 4, online: list[int] | None = None) -> SimKernel:
    return SimKernel(profile, possible_cpus=possible, online=online)


def rejected(k: SimKernel, insns: list[Insn], **kw) -> SimError:
    with pytest.raises(SimError) as ei:
        k.prog_load(insns, "t", **kw)
    return ei.value


def percpu_u32(k: SimKernel, fd: int, off: int = 0) -> list[int]:
    raw = k.map_lookup(fd, KEY0)
    stride = len(raw) // k.possible_cpus
    return [int.from_bytes(raw[c * stride + off:c * stride + off + 4], "little") for c in range(k.possible_cpus)]


# -- map_create -----------------------------------------------------------------------------------------


def test_percpu_value_size_limit_is_32k():
    k = kernel()
    assert k.map_create(PCPU, 4, 32768, 1, 0, "ok") > 0
    e = pytest.raises(SimError, k.map_create, PCPU, 4, 32769, 1, 0, "big").value
    assert (e.errno, e.error_class) == (errno.E2BIG, "e2big")
    # ARRAY values have no per-CPU limit
    assert k.map_create(ARRAY, 4, 32769, 1, 0, "arr") > 0


@pytest.mark.parametrize(("args", "err"), [
    ((PCPU, 4, 8, 1, BPF_F_MMAPABLE, "m"), errno.EINVAL),  # MMAPABLE only for ARRAY
    ((ARRAY, 8, 8, 1, 0, "m"), errno.EINVAL),  # array keys are 4 bytes
    ((ARRAY, 4, 0, 1, 0, "m"), errno.EINVAL),
    ((ARRAY, 4, 8, 0, 0, "m"), errno.EINVAL),
    ((ARRAY, 4, 8, 1, 0, "sixteen_chars_xx"), errno.EINVAL),
    ((ARRAY, 4, 8, 1, 0, "bad-name"), errno.EINVAL),
    ((BPF_MAP_TYPE_PROG_ARRAY, 4, 8, 1, 0, "pa"), errno.EINVAL),
])
def test_map_create_rejections(args, err):
    with pytest.raises(SimError) as ei:
        kernel().map_create(*args)
    assert ei.value.errno == err
    assert kernel().map_create(ARRAY, 4, 8, 1, BPF_F_MMAPABLE, "ok") > 0


# -- map update/lookup ------------------------------------------------------------------------------------


def test_full_percpu_buffer_is_one_padded_slot_per_possible_cpu():
    k = kernel(possible=3, online=[0])
    fd = k.map_create(PCPU, 4, 5, 1, 0, "p")
    assert k.map_lookup(fd, KEY0) == bytes(3 * 8)
    slots = b"".join(bytes([c + 1] * 5) + bytes(3) for c in range(3))
    k.map_update(fd, KEY0, slots)
    assert k.map_lookup(fd, KEY0) == slots
    with pytest.raises(SimError) as ei:
        k.map_update(fd, KEY0, bytes(5))  # one value is not the full buffer
    assert ei.value.errno == errno.EINVAL


def test_bpf_f_cpu_and_all_cpus_on_a_patched_kernel():
    k = kernel("patched", possible=4, online=[0, 1])
    fd = k.map_create(PCPU, 4, 4, 1, 0, "p")
    k.map_update(fd, KEY0, b"\xaa" * 4, BPF_F_ALL_CPUS)
    assert percpu_u32(k, fd) == [0xAAAAAAAA] * 4  # offline-but-possible CPUs too
    k.map_update(fd, KEY0, (7).to_bytes(4, "little"), BPF_F_CPU | 3 << 32)
    assert percpu_u32(k, fd) == [0xAAAAAAAA] * 3 + [7]
    assert k.map_lookup(fd, KEY0, BPF_F_CPU | 3 << 32) == (7).to_bytes(4, "little")
    for flags, err in [(BPF_F_CPU | BPF_F_ALL_CPUS, errno.EINVAL), (BPF_F_CPU | 4 << 32, errno.ERANGE),
                       (1 << 32, errno.EINVAL)]:
        with pytest.raises(SimError) as ei:
            k.map_update(fd, KEY0, bytes(4), flags)
        assert ei.value.errno == err, flags
    arr = k.map_create(ARRAY, 4, 4, 1, 0, "a")
    with pytest.raises(SimError) as ei:
        k.map_update(arr, KEY0, bytes(4), BPF_F_ALL_CPUS)
    assert ei.value.errno == errno.EINVAL


def test_bpf_f_cpu_absent_on_an_unpatched_kernel():
    k = kernel("unpatched")
    fd = k.map_create(PCPU, 4, 4, 1, 0, "p")
    for flags in (BPF_F_ALL_CPUS, BPF_F_CPU):
        with pytest.raises(SimError) as ei:
            k.map_update(fd, KEY0, bytes(4), flags)
        assert ei.value.errno == errno.EINVAL
    with pytest.raises(SimError):
        k.map_lookup(fd, KEY0, BPF_F_CPU)


def test_frozen_map_is_read_only_from_user_space():
    k = kernel()
    fd = k.map_create(ARRAY, 4, 4, 1, BPF_F_MMAPABLE | BPF_F_RDONLY_PROG, "ro")
    k.map_update(fd, KEY0, b"abcd")
    k.map_freeze(fd)
    with pytest.raises(SimError) as ei:
        k.map_update(fd, KEY0, b"wxyz")
    assert ei.value.errno == errno.EPERM
    assert k.map_lookup(fd, KEY0) == b"abcd"
    assert pytest.raises(SimError, k.map_freeze, fd).value.errno == errno.EBUSY


# -- verifier rejections ------------------------------------------------------------------------------------


def test_invalid_map_fd_is_ebadf_and_a_non_map_fd_is_einval():
    k = kernel()
    e = rejected(k, [*ld_map_value(1, 99, 0), *RET0])
    assert (e.errno, e.error_class, e.message) == (errno.EBADF, "invalid_map_fd",
                                                   "fd 99 is not pointing to valid bpf_map")
    ph = k.placeholder_fd()
    e = rejected(k, [*ld_map_value(1, ph, 0), *RET0])
    assert (e.errno, e.error_class, e.message) == (errno.EINVAL, "invalid_map_fd",
                                                   f"fd {ph} is not pointing to valid bpf_map")


def test_unpatched_kernel_has_no_direct_percpu_value_access():
    k = kernel("unpatched")
    fd = k.map_create(PCPU, 4, 8, 1, 0, "p")
    e = rejected(k, [*ld_map_value(1, fd, 0), *RET0])
    assert (e.errno, e.error_class, e.message) == (
        errno.EINVAL, "no_direct_value_access", "no direct value access support for this map type")


@pytest.mark.parametrize(("mtype", "max_entries", "off", "err", "cls"), [
    (PCPU, 2, 0, errno.EOPNOTSUPP, "direct_value_unsupported"),
    (PCPU, 1, 8, errno.EINVAL, "offset_out_of_range"),
    (ARRAY, 2, 0, 524, "direct_value_unsupported"),  # ENOTSUPP, as 6.18 returns it
    (ARRAY, 1, 8, errno.EINVAL, "offset_out_of_range"),
])
def test_direct_value_address_checks(mtype, max_entries, off, err, cls):
    k = kernel("patched")
    fd = k.map_create(mtype, 4, 8, max_entries, 0, "m")
    e = rejected(k, [*ld_map_value(1, fd, off), *RET0])
    assert (e.errno, e.error_class) == (err, cls)
    assert e.message == f"invalid access to map value pointer, value_size=8 off={off}"


def test_no_percpu_jit_refuses_direct_access():
    k = kernel("patched-nojit")
    fd = k.map_create(PCPU, 4, 8, 1, 0, "p")
    e = rejected(k, [*ld_map_value(1, fd, 0), *RET0])
    assert (e.errno, e.error_class) == (errno.EOPNOTSUPP, "direct_value_unsupported")


@pytest.mark.parametrize("mtype", [PCPU, ARRAY])
def test_access_past_the_value_is_eacces(mtype):
    k = kernel()
    fd = k.map_create(mtype, 4, 8, 1, 0, "m")
    e = rejected(k, [*ld_map_value(1, fd, 4), ldx_mem(BPF_DW, 0, 1, 0), exit_insn()])
    assert (e.errno, e.error_class, e.message) == (
        errno.EACCES, "map_value_oob", "invalid access to map value, value_size=8 off=4 size=8")
    e = rejected(k, [*ld_map_value(1, fd, 0), st_mem(BPF_W, 1, -4, 1), *RET0])
    assert e.message == "invalid access to map value, value_size=8 off=-4 size=4"


def test_write_into_read_only_map_is_eacces():
    k = kernel()
    fd = k.map_create(ARRAY, 4, 8, 1, BPF_F_MMAPABLE | BPF_F_RDONLY_PROG, "ro")
    e = rejected(k, [*ld_map_value(1, fd, 4), st_mem(BPF_W, 1, 0, 1), *RET0])
    assert (e.errno, e.error_class, e.message) == (
        errno.EACCES, "write_into_rdonly", "write into map forbidden, value_size=8 off=4 size=4")
    k.prog_load([*ld_map_value(1, fd, 4), ldx_mem(BPF_W, 0, 1, 0), exit_insn()], "rd")  # reading is fine


def const_str_program(str_fd: int, helper: int) -> list[Insn]:
    """bpf_strncmp(stack, 4, str) or bpf_snprintf(stack, 8, fmt, NULL, 0)."""
    out = [st_mem(BPF_DW, 10, -8, 0), mov64_reg(1, 10), alu64_imm(BPF_ADD, 1, -8)]
    out += [mov64_imm(2, 4 if helper == 182 else 8), *ld_map_value(3, str_fd, 0)]
    if helper == 165:
        out += [mov64_imm(4, 0), mov64_imm(5, 0)]
    return [*out, call_helper(helper), exit_insn()]


@pytest.mark.parametrize("helper", [182, 165])
def test_percpu_value_is_no_const_string(helper):
    k = kernel("patched")
    fd = k.map_create(PCPU, 4, 8, 1, 0, "fmt")
    e = rejected(k, const_str_program(fd, helper))
    assert (e.errno, e.error_class, e.message) == (
        errno.EACCES, "const_str_percpu", "R3 points to percpu_array map which cannot be used as const string")


def test_read_only_array_const_string_is_accepted_and_compared():
    k = kernel("patched")
    fd = k.map_create(ARRAY, 4, 8, 1, BPF_F_MMAPABLE | BPF_F_RDONLY_PROG, "str")
    k.map_update(fd, KEY0, b"abc\0\0\0\0\0")
    e = rejected(k, const_str_program(fd, 182))  # not frozen yet: not a read-only map
    assert e.message == "R3 does not point to a readonly map'"
    k.map_freeze(fd)
    pfd, _, _ = k.prog_load(const_str_program(fd, 182), "cmp")
    assert k.test_run(pfd, 0) == (-1) & 0xFFFFFFFF  # "" < "abc"


@pytest.mark.parametrize(("insns", "what"), [
    ([mov64_imm(0, 0), jmp_imm(BPF_JGT, 0, 5, -2), exit_insn()], "loop"),
    ([call_helper(6), exit_insn()], "helper 6"),
    ([Insn(0x85, 0, BPF_PSEUDO_KFUNC_CALL, 0, 5), exit_insn()], "kfunc"),
    ([call_helper(8), mov64_reg(1, 10), alu64_reg(BPF_ADD, 1, 0), *RET0], "variable offset"),
    ([ldx_mem(BPF_DW, 0, 1, 0), exit_insn()], "context access"),
])
def test_what_the_model_cannot_follow_is_refused_not_guessed(insns, what):
    e = rejected(kernel(), insns)
    assert e.error_class == "sim_unsupported"
    assert e.message.startswith("unsupported by the simulator: ") and what in e.message


def test_uninitialised_register_read_is_refused():
    e = rejected(kernel(), [mov64_reg(0, 3), exit_insn()])
    assert (e.errno, e.message) == (errno.EACCES, "R3 !read_ok")


# -- the rewrite ------------------------------------------------------------------------------------------


def rewrite_program(fd: int, r_a: int = 6, r_b: int = 7) -> list[Insn]:
    return [
        *ld_map_value(r_a, fd, 0),        # 0
        ldx_mem(BPF_W, 0, r_a, 0),        # 2
        jmp_imm(BPF_JGT, 0, 5, 3),        # 3: -> 7, across the second load
        *ld_map_value(r_b, fd, 4),        # 4
        st_mem(BPF_W, r_b, 0, 0xC0DE),    # 6
        mov64_imm(0, 0),                  # 7
        exit_insn(),                      # 8
    ]


def test_percpu_move_follows_each_percpu_load_and_jumps_still_land():
    k = kernel("patched")
    fd = k.map_create(PCPU, 4, 8, 1, 0, "p")
    prog = rewrite_program(fd)
    pfd, xlated, _ = k.prog_load(prog, "rw")
    assert xlated == len(prog) + 2
    x = k.prog_xlated(pfd)
    assert len(x) == len(prog) + 2
    assert x[2] == Insn(0xBF, 6, 6, -1, 0) and x[2].is_percpu_mov  # MOV64 X dst,dst off=BPF_ADDR_PERCPU
    assert x[7] == Insn(0xBF, 7, 7, -1, 0)
    assert x[4].code == 0x25 and 4 + 1 + x[4].off == 9 and x[9] == mov64_imm(0, 0)
    assert sum(i.is_ld_imm64 for i in x) == 2 and all(i.src == 0 for i in x if i.is_ld_imm64)


@pytest.mark.parametrize("reg", range(10))
def test_every_register_gets_its_own_cpu_copy(reg):
    k = kernel("patched", possible=4, online=[0, 1, 3])
    fd = k.map_create(PCPU, 4, 8, 1, 0, "p")
    other = 9 if reg != 9 else 8
    prog = [
        *ld_map_value(reg, fd, 4),
        call_helper(8) if reg not in range(0, 6) else mov64_imm(other, 0),  # a helper clobbers r0-r5
        *([] if reg in range(0, 6) else [mov64_reg(other, 0)]),
        stx_mem(BPF_W, reg, other, 0),
        *RET0,
    ]
    pfd, _, _ = k.prog_load(prog, "reg")
    for cpu in (0, 1, 3):
        k.test_run(pfd, cpu)
    assert percpu_u32(k, fd, 4) == ([0, 1, 0, 3] if reg not in range(0, 6) else [0, 0, 0, 0])
    k.map_update(fd, KEY0, bytes(8) * 4)
    prog_set = [*ld_map_value(reg, fd, 4), st_mem(BPF_W, reg, 0, 0x11), *RET0]
    pfd, _, _ = k.prog_load(prog_set, "set")
    k.test_run(pfd, 3)
    assert percpu_u32(k, fd, 4) == [0, 0, 0, 0x11]


def test_missing_rewrite_faults_at_run_time():
    k = kernel("broken-norewrite")
    fd = k.map_create(PCPU, 4, 8, 1, 0, "p")
    prog = rewrite_program(fd)
    pfd, xlated, _ = k.prog_load(prog, "rw")
    assert xlated == len(prog)  # no per-CPU move: the register keeps the unmapped per-CPU base
    with pytest.raises(BpfFault, match="unmapped address"):
        k.test_run(pfd, 0)


def test_the_same_program_without_the_rewrite_reads_the_running_cpu():
    k = kernel("patched")
    fd = k.map_create(PCPU, 4, 8, 1, 0, "p")
    k.map_update(fd, KEY0, b"".join((10 * c).to_bytes(4, "little") + bytes(4) for c in range(4)))
    pfd, _, _ = k.prog_load(rewrite_program(fd), "rw")
    for cpu in range(4):
        k.test_run(pfd, cpu)
    # CPUs whose first word is > 5 skip the store
    assert percpu_u32(k, fd, 4) == [0xC0DE, 0, 0, 0]


def test_read_only_array_loads_fold_and_dead_code_goes():
    k = kernel("unpatched")
    ro = k.map_create(ARRAY, 4, 4, 1, BPF_F_MMAPABLE | BPF_F_RDONLY_PROG, "ro")
    k.map_update(ro, KEY0, (7).to_bytes(4, "little"))
    k.map_freeze(ro)
    prog = [
        *ld_map_value(1, ro, 0),
        ldx_mem(BPF_W, 2, 1, 0),
        mov64_imm(0, 1),
        jmp_imm(BPF_JGT, 2, 5, 1),  # always taken: 7 > 5
        mov64_imm(0, 2),            # dead
        exit_insn(),
    ]
    pfd, xlated, _ = k.prog_load(prog, "fold")
    assert xlated == len(prog) - 2  # the dead move goes, then the jump over nothing
    assert k.test_run(pfd, 0) == 1
    # a per-CPU value is never folded: both arms stay
    kp = kernel("patched")
    pc = kp.map_create(PCPU, 4, 4, 1, 0, "pc")
    prog[0:2] = ld_map_value(1, pc, 0)
    _, xlated, _ = kp.prog_load(prog, "nofold")
    assert xlated == len(prog) + 1


def test_helper_inlining_counts_in_xlated():
    k = kernel("patched")
    pfd, xlated, _ = k.prog_load([call_helper(8), exit_insn()], "cpu")
    assert xlated == 2 + 2  # bpf_get_smp_processor_id becomes three instructions on x86-64
    assert k.test_run(pfd, 2) == 2
    _, xlated, _ = kernel("patched-nojit").prog_load([call_helper(8), exit_insn()], "cpu")
    assert xlated == 2


def test_subprogram_call_across_the_insertion():
    k = kernel("patched")
    fd = k.map_create(PCPU, 4, 8, 1, 0, "p")
    prog = [
        *ld_map_value(6, fd, 0),      # 0
        call_rel(3),                  # 2: -> 6
        stx_mem(BPF_W, 6, 0, 0),      # 3
        mov64_imm(0, 0),              # 4
        exit_insn(),                  # 5
        *ld_map_value(1, fd, 4),      # 6: the subprogram
        ldx_mem(BPF_W, 0, 1, 0),      # 8
        alu64_imm(BPF_ADD, 0, 1),     # 9
        stx_mem(BPF_W, 1, 0, 0),      # 10
        exit_insn(),                  # 11
    ]
    pfd, xlated, _ = k.prog_load(prog, "sub")
    assert xlated == len(prog) + 2
    x = k.prog_xlated(pfd)
    assert x[3].is_pseudo_call and x[3 + 1 + x[3].imm].is_ld_imm64 and x[3 + 1 + x[3].imm].dst == 1
    for _ in range(3):
        k.test_run(pfd, 1)
    assert percpu_u32(k, fd, 0) == [0, 3, 0, 0] and percpu_u32(k, fd, 4) == [0, 3, 0, 0]


def test_test_run_needs_an_online_cpu():
    k = kernel(possible=4, online=[0, 2])
    pfd, _, _ = k.prog_load(RET0, "r")
    assert k.test_run(pfd, 2) == 0
    for cpu in (1, 4):
        with pytest.raises(SimError) as ei:
            k.test_run(pfd, cpu)
        assert ei.value.errno == errno.ENXIO


def test_tail_call_shares_the_cpu_slot():
    k = kernel()
    fd = k.map_create(PCPU, 4, 8, 1, 0, "p")
    target = [*ld_map_value(2, fd, 0), ldx_mem(BPF_W, 0, 2, 0), alu64_imm(BPF_ADD, 0, 100),
              stx_mem(BPF_W, 2, 0, 0), exit_insn()]
    tfd, _, _ = k.prog_load(target, "target")
    pa = k.map_create(BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 1, 0, "jmp")
    k.map_update(pa, KEY0, tfd.to_bytes(4, "little"))
    caller = [*ld_map_value(6, fd, 0), st_mem(BPF_W, 6, 0, 5), *ld_map_fd(2, pa), mov64_imm(3, 0),
              call_helper(12), mov64_imm(0, 1), exit_insn()]
    cfd, xlated, _ = k.prog_load(caller, "caller")
    assert xlated == len(caller) + 1
    assert k.test_run(cfd, 3) == 105
    assert percpu_u32(k, fd) == [0, 0, 0, 105]


def test_byte_sized_percpu_store_and_null_checked_lookup():
    k = kernel()
    fd = k.map_create(PCPU, 4, 1, 1, 0, "byte")
    prog = [
        st_mem(BPF_W, 10, -4, 0), mov64_reg(2, 10), alu64_imm(BPF_ADD, 2, -4), *ld_map_fd(1, fd),
        call_helper(1),
        jmp_imm(BPF_JNE, 0, 0, 1), exit_insn(),
        st_mem(BPF_B, 0, 0, 0x7F), *RET0,
    ]
    pfd, xlated, _ = k.prog_load(prog, "lookup")
    assert xlated == len(prog) + 8  # the PERCPU_ARRAY lookup is inlined as 9 instructions
    k.test_run(pfd, 1)
    assert k.map_lookup(fd, KEY0) == bytes(8) + b"\x7f" + bytes(7) + bytes(16)
    e = rejected(k, prog[:6] + [st_mem(BPF_B, 0, 0, 1), *RET0])  # no null check
    assert e.message == "R0 invalid mem access 'map_value_or_null'"


def test_profiles_are_data():
    assert {"patched", "unpatched"} <= set(KERNEL_PROFILES)
    p, u = KERNEL_PROFILES["patched"], KERNEL_PROFILES["unpatched"]
    assert (p.percpu_direct_value, p.percpu_insn_jit, p.bpf_f_cpu) == (True, True, True)
    assert (u.percpu_direct_value, u.bpf_f_cpu) == (False, False)
    assert "const_str_percpu" in p.messages and "const_str_percpu" not in u.messages


def test_plain_constants_and_jumps_survive():
    k = kernel()
    prog = [*ld_imm64(0, 0, 0x1234, 0x5678), ja(0), exit_insn()]
    pfd, xlated, _ = k.prog_load(prog, "k")
    assert xlated == 3  # `ja +0` is removed as a no-op
    assert k.test_run(pfd, 0) == 0x1234


def test_idx_value_loads_go_through_fd_array():
    k = kernel()
    fd = k.map_create(PCPU, 4, 8, 1, 0, "p")
    prog = [*ld_map_value(3, 0, 4, by_index=True), st_mem(BPF_W, 3, 0, 9), *RET0]
    e = rejected(k, prog)
    assert (e.errno, e.error_class) == (errno.EPROTO, "invalid_map_fd")
    pfd, xlated, _ = k.prog_load(prog, "idx", fd_array=[fd])
    assert xlated == len(prog) + 1
    k.test_run(pfd, 2)
    assert percpu_u32(k, fd, 4) == [0, 0, 9, 0]


def test_read_only_frozen_percpu_map_reads_but_never_folds_or_writes():
    k = kernel()
    fd = k.map_create(PCPU, 4, 4, 1, BPF_F_RDONLY_PROG, "ro")
    k.map_update(fd, KEY0, (7).to_bytes(4, "little"), BPF_F_ALL_CPUS)
    k.map_freeze(fd)
    read = [*ld_map_value(1, fd, 0), ldx_mem(BPF_W, 0, 1, 0), jmp_imm(BPF_JGT, 0, 5, 1), mov64_imm(0, 2),
            exit_insn()]
    pfd, xlated, _ = k.prog_load(read, "rd")
    assert xlated == len(read) + 1  # both arms kept: a per-CPU value is no constant
    assert k.test_run(pfd, 1) == 7
    e = rejected(k, [*ld_map_value(1, fd, 0), st_mem(BPF_W, 1, 0, 1), *RET0])
    assert (e.error_class, e.message) == ("write_into_rdonly", "write into map forbidden, value_size=4 off=0 size=4")
