"""Tests for the eBPF interpreter: hand-built programs per instruction family, then clang output run against
Python models of the same C functions."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.sim.interp import (
    MAX_TAIL_CALLS,
    POISON,
    STACK_BASE,
    STACK_SIZE,
    BpfFault,
    Machine,
    Memory,
    TailCall,
    run,
)
from toolchain.insn import (
    BPF_ADD,
    BPF_AND,
    BPF_ARSH,
    BPF_B,
    BPF_CMPXCHG,
    BPF_DIV,
    BPF_DW,
    BPF_FETCH,
    BPF_H,
    BPF_JEQ,
    BPF_JGE,
    BPF_JGT,
    BPF_JLE,
    BPF_JLT,
    BPF_JNE,
    BPF_JSET,
    BPF_JSGE,
    BPF_JSGT,
    BPF_JSLE,
    BPF_JSLT,
    BPF_LSH,
    BPF_MOD,
    BPF_MUL,
    BPF_NEG,
    BPF_OR,
    BPF_PSEUDO_MAP_VALUE,
    BPF_RSH,
    BPF_SUB,
    BPF_TO_BE,
    BPF_TO_LE,
    BPF_W,
    BPF_XCHG,
    BPF_XOR,
    Insn,
    alu32_imm,
    alu32_imm_off,
    alu32_reg,
    alu32_reg_off,
    alu64_imm,
    alu64_imm_off,
    alu64_reg,
    alu64_reg_off,
    atomic_op,
    bswap,
    call_helper,
    call_rel,
    decode,
    endian,
    exit_insn,
    ja,
    jmp32_a,
    jmp32_imm,
    jmp32_reg,
    jmp_imm,
    jmp_reg,
    ld_imm64,
    ldx_mem,
    ldx_memsx,
    mov32_imm,
    mov32_reg,
    mov64_imm,
    mov64_percpu_reg,
    mov64_reg,
    movsx32_reg,
    movsx64_reg,
    st_mem,
    stx_mem,
)

U64 = (1 << 64) - 1
U32 = (1 << 32) - 1
S64_MIN = 1 << 63
S32_MIN = 1 << 31
CTX = 0x1000_0000


def flat(*items):
    out: list[Insn] = []
    for item in items:
        out.extend(item if isinstance(item, tuple | list) else [item])
    return out


def load(dst, value):
    return ld_imm64(dst, 0, value & U32, value >> 32)


def execute(*items, memory=None, helpers=None, r1=0, cpu=0, percpu_offset=0, max_steps=10_000):
    memory = memory if memory is not None else Memory()
    return run(flat(*items), memory=memory, cpu=cpu, percpu_offset=percpu_offset, helpers=helpers or {},
               r1=r1, max_steps=max_steps)


def binop64(op, a, b, *, off=0):
    """r0 = a <op> b for the X and K forms (K only when b fits the sign-extended imm)."""
    x = execute(load(0, a), load(1, b), alu64_reg_off(op, 0, 1, off), exit_insn())
    if -(1 << 31) <= _s64(b) < (1 << 31):
        k = execute(load(0, a), alu64_imm_off(op, 0, _s64(b), off), exit_insn())
        assert k == x
    return x


def binop32(op, a, b, *, off=0):
    x = execute(load(0, a), load(1, b), alu32_reg_off(op, 0, 1, off), exit_insn())
    k = execute(load(0, a), alu32_imm_off(op, 0, b & U32, off), exit_insn())
    assert k == x
    return x


def _s64(v):
    v &= U64
    return v - (1 << 64) if v >> 63 else v


def _s32(v):
    v &= U32
    return v - (1 << 32) if v >> 31 else v


def _sx(v, bits):
    v &= (1 << bits) - 1
    return v - (1 << bits) if v >> (bits - 1) else v


# --- ALU ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("op", "a", "b", "want"), [
    (BPF_ADD, U64, 2, 1),
    (BPF_SUB, 0, 1, U64),
    (BPF_MUL, 1 << 40, 1 << 30, 0),
    (BPF_MUL, U64, U64, 1),
    (BPF_OR, 0xF0, 0x0F, 0xFF),
    (BPF_AND, 0xFF00, 0x0FF0, 0x0F00),
    (BPF_XOR, U64, 1, U64 - 1),
    (BPF_LSH, 1, 63, S64_MIN),
    (BPF_LSH, 1, 65, 2),
    (BPF_RSH, S64_MIN, 63, 1),
    (BPF_RSH, S64_MIN, 64 + 4, S64_MIN >> 4),
    (BPF_ARSH, S64_MIN, 60, U64 ^ 0x7),
    (BPF_ARSH, 0x7000, 4, 0x700),
    (BPF_DIV, U64, 2, U64 >> 1),
    (BPF_DIV, 7, 0, 0),
    (BPF_MOD, 7, 0, 7),
    (BPF_MOD, U64, 10, U64 % 10),
])
def test_alu64(op, a, b, want):
    assert binop64(op, a, b) == want


def test_alu64_imm_is_sign_extended():
    assert execute(mov64_imm(0, 5), alu64_imm(BPF_ADD, 0, -1), exit_insn()) == 4
    assert execute(mov64_imm(0, -1), exit_insn()) == U64
    # Unsigned division by a negative imm divides by the huge sign-extended value.
    assert execute(load(0, U64), alu64_imm(BPF_DIV, 0, -1), exit_insn()) == 1


@pytest.mark.parametrize(("op", "a", "b", "want"), [
    (BPF_ADD, U64, 1, 0),
    (BPF_SUB, 0x1_0000_0000, 1, U32),
    (BPF_MUL, 0x1_0001_0000, 0x10000, 0),
    (BPF_OR, 0xFFFF_0000_0000_0001, 2, 3),
    (BPF_LSH, 1, 33, 2),
    (BPF_LSH, 0xFFFF_FFFF, 4, 0xFFFF_FFF0),
    (BPF_RSH, 0xFFFF_FFFF_8000_0000, 31, 1),
    (BPF_ARSH, 0x8000_0000, 4, 0xF800_0000),
    (BPF_ARSH, 0x1_7000_0000, 36, 0x0700_0000),
    (BPF_DIV, 0x5_0000_0007, 2, 3),
    (BPF_DIV, 0x5_0000_0007, 0, 0),
    (BPF_MOD, 0x5_0000_0007, 0, 7),
    (BPF_MOD, 0x5_0000_0007, 4, 3),
])
def test_alu32_zero_extends(op, a, b, want):
    assert binop32(op, a, b) == want


def test_div_mod_by_zero_register_high_bits():
    # A 32-bit divisor register whose low half is zero divides by zero, whatever its high half holds.
    assert binop32(BPF_DIV, 9, 1 << 32) == 0
    assert binop32(BPF_MOD, 0xAB_0000_0009, 1 << 32) == 9
    assert binop64(BPF_MOD, 9, 1 << 32) == 9


def trunc_div(a, b):
    q = abs(a) // abs(b)
    return q if (a < 0) == (b < 0) else -q


@pytest.mark.parametrize(("a", "b"), [(-7, 2), (7, -2), (-7, -2), (7, 2), (-(1 << 63), -1), (-(1 << 63), 1),
                                      (5, 0), (-5, 0), (-(1 << 63), 3), ((1 << 63) - 1, -1)])
def test_signed_div_mod_64(a, b):
    q = binop64(BPF_DIV, a & U64, b & U64, off=1)
    m = binop64(BPF_MOD, a & U64, b & U64, off=1)
    if b == 0:
        assert (q, m) == (0, a & U64)
    elif a == -(1 << 63) and b == -1:
        assert (q, m) == (S64_MIN, 0)
    else:
        assert q == trunc_div(a, b) & U64
        assert m == (a - trunc_div(a, b) * b) & U64


@pytest.mark.parametrize(("a", "b"), [(-7, 2), (7, -2), (-(1 << 31), -1), (-5, 0), (-(1 << 31), 7)])
def test_signed_div_mod_32(a, b):
    high = 0xDEAD_0000_0000_0000  # ignored by the 32-bit forms
    q = binop32(BPF_DIV, high | (a & U32), b & U32, off=1)
    m = binop32(BPF_MOD, high | (a & U32), b & U32, off=1)
    if b == 0:
        assert (q, m) == (0, a & U32)
    elif a == -(1 << 31) and b == -1:
        assert (q, m) == (S32_MIN, 0)
    else:
        assert q == trunc_div(a, b) & U32
        assert m == (a - trunc_div(a, b) * b) & U32


def test_neg_and_mov():
    assert execute(mov64_imm(0, 1), alu64_imm(BPF_NEG, 0, 0), exit_insn()) == U64
    assert execute(load(0, 1 | 1 << 40), alu32_imm(BPF_NEG, 0, 0), exit_insn()) == U32
    assert execute(load(1, 0x1234_5678_9ABC_DEF0), mov32_reg(0, 1), exit_insn()) == 0x9ABC_DEF0
    assert execute(load(0, U64), mov32_imm(0, -1), exit_insn()) == U32
    assert execute(load(0, U64), alu32_reg(BPF_ADD, 0, 0), exit_insn()) == U32 - 1


@pytest.mark.parametrize("bits", [8, 16, 32])
@pytest.mark.parametrize("value", [0x80, 0x7F, 0xFFFF_8000, 0x1234_8000_7FFF_FF80, 0x8000_0000])
def test_movsx(bits, value):
    assert execute(load(1, value), movsx64_reg(0, 1, bits), exit_insn()) == _sx(value, bits) & U64
    if bits < 32:
        assert execute(load(1, value), movsx32_reg(0, 1, bits), exit_insn()) == _sx(value, bits) & U32


def test_mov_with_bad_off_faults():
    with pytest.raises(BpfFault, match="off 3"):
        execute(alu64_reg_off(0xB0, 0, 1, 3), exit_insn())


@pytest.mark.parametrize("bits", [16, 32, 64])
def test_byte_swaps(bits):
    value = 0x0102_0304_0506_0708
    low = value & ((1 << bits) - 1)
    swapped = int.from_bytes(low.to_bytes(bits // 8, "little"), "big")
    assert execute(load(0, value), bswap(0, bits), exit_insn()) == swapped
    assert execute(load(0, value), endian(BPF_TO_BE, 0, bits), exit_insn()) == swapped
    assert execute(load(0, value), endian(BPF_TO_LE, 0, bits), exit_insn()) == low


def test_percpu_mov_adds_running_cpu_offset():
    prog = (load(1, 0x10_0000), mov64_percpu_reg(0, 1), exit_insn())
    assert execute(*prog, percpu_offset=0x4000) == 0x10_4000
    assert execute(*prog, percpu_offset=-0x1000 & U64) == 0x0F_F000


# --- memory -------------------------------------------------------------------------------------------------

def ctx_memory(data=b"", size=64, writable=True):
    mem = Memory()
    buf = bytearray(size)
    buf[:len(data)] = data
    mem.map(CTX, buf, writable=writable, name="ctx")
    return mem, buf


def test_loads_are_little_endian_and_zero_extending():
    mem, _ = ctx_memory(bytes(range(0xF0, 0xF8)) + bytes(range(8)))
    for size, width in ((BPF_B, 1), (BPF_H, 2), (BPF_W, 4), (BPF_DW, 8)):
        raw = int.from_bytes(bytes(range(0xF0, 0xF0 + width)), "little")
        assert execute(ldx_mem(size, 0, 1, 0), exit_insn(), memory=mem, r1=CTX) == raw
        if width < 8:
            got = execute(ldx_memsx(size, 0, 1, 0), exit_insn(), memory=mem, r1=CTX)
            assert got == _sx(raw, width * 8) & U64
    assert execute(ldx_memsx(BPF_W, 0, 1, 8), exit_insn(), memory=mem, r1=CTX) == 0x0302_0100
    with pytest.raises(BpfFault, match="unsupported memory opcode"):
        execute(ldx_memsx(BPF_DW, 0, 1, 0), exit_insn(), memory=mem, r1=CTX)


def test_stores_and_negative_offsets():
    mem, buf = ctx_memory()
    execute(load(2, 0x1122_3344_5566_7788), mov64_reg(3, 1), alu64_imm(BPF_ADD, 3, 16),
            stx_mem(BPF_DW, 3, 2, -16), stx_mem(BPF_W, 1, 2, 8), stx_mem(BPF_H, 1, 2, 12),
            stx_mem(BPF_B, 1, 2, 14), st_mem(BPF_DW, 1, 16, -2), st_mem(BPF_H, 1, 24, 0x12345),
            mov64_imm(0, 0), exit_insn(), memory=mem, r1=CTX)
    assert struct.unpack_from("<QIHBxQH", buf) == (0x1122_3344_5566_7788, 0x5566_7788, 0x7788, 0x88,
                                                    U64 - 1, 0x2345)


def test_stack_is_per_frame_and_unmapped_after_run():
    mem = Memory()
    got = execute(st_mem(BPF_DW, 10, -8, 42), ldx_mem(BPF_DW, 0, 10, -8), alu64_reg(BPF_ADD, 0, 10),
                  exit_insn(), memory=mem)
    assert got == 42 + STACK_BASE + STACK_SIZE
    assert mem.regions() == []
    with pytest.raises(BpfFault):
        execute(ldx_mem(BPF_DW, 0, 10, 0), exit_insn(), memory=mem)  # just above the frame
    assert mem.regions() == []


def test_unmapped_read_names_address_and_nearest_region():
    mem, _ = ctx_memory()
    with pytest.raises(BpfFault, match=r"pc 2: read of 4 bytes at 0x10000100: .*'ctx'") as info:
        execute(load(1, CTX + 0x100), ldx_mem(BPF_W, 0, 1, 0), exit_insn(), memory=mem)
    assert info.value.pc == 2


def test_straddling_access_faults():
    mem, _ = ctx_memory()
    with pytest.raises(BpfFault, match="straddles"):
        execute(ldx_mem(BPF_DW, 0, 1, 60), exit_insn(), memory=mem, r1=CTX)


def test_write_to_read_only_region_faults():
    mem, buf = ctx_memory(b"\x07", writable=False)
    assert execute(ldx_mem(BPF_B, 0, 1, 0), exit_insn(), memory=mem, r1=CTX) == 7
    with pytest.raises(BpfFault, match="read-only"):
        execute(st_mem(BPF_B, 1, 0, 1), exit_insn(), memory=mem, r1=CTX)
    with pytest.raises(BpfFault, match="read-only"):
        execute(mov64_imm(2, 1), atomic_op(BPF_W, BPF_ADD, 1, 2, 0), exit_insn(), memory=mem, r1=CTX)
    assert buf[0] == 7


def test_memory_api():
    mem, _ = ctx_memory(b"abc\0def")
    assert mem.read_bytes(CTX, 4) == b"abc\0"
    mem.write(CTX + 8, 2, 0x1_4142)
    assert mem.read(CTX + 8, 2) == 0x4142
    with pytest.raises(ValueError, match="overlaps"):
        mem.map(CTX + 32, bytearray(64), name="other")
    mem.map(CTX + 64, bytearray(8), name="next")
    with pytest.raises(BpfFault, match="read of 16 bytes at 0x1000003c"):
        mem.read_bytes(CTX + 60, 16)  # spans two adjacent regions: still one access, still a fault
    mem.unmap(CTX)
    with pytest.raises(BpfFault, match="'next'"):
        mem.read(CTX, 1)


PERCPU_BASE = 0x2000_0000
PERCPU_STRIDE = 0x10_0000


def percpu_memory(ncpus=4):
    mem = Memory()
    for cpu in range(ncpus):
        mem.map(PERCPU_BASE + cpu * PERCPU_STRIDE, bytearray(struct.pack("<Q", 100 + cpu)), name=f"pcpu{cpu}")
    return mem


def test_percpu_pointer_conversion_reaches_the_running_cpu_copy():
    mem = percpu_memory()
    prog = (load(1, PERCPU_BASE), mov64_percpu_reg(1, 1), ldx_mem(BPF_DW, 0, 1, 0), exit_insn())
    for cpu in range(4):
        assert execute(*prog, memory=mem, cpu=cpu, percpu_offset=cpu * PERCPU_STRIDE) == 100 + cpu


def test_percpu_base_without_conversion_faults():
    mem = Memory()
    mem.map(PERCPU_BASE + PERCPU_STRIDE, bytearray(8), name="pcpu1")
    with pytest.raises(BpfFault, match="0x20000000"):
        execute(load(1, PERCPU_BASE), ldx_mem(BPF_DW, 0, 1, 0), exit_insn(), memory=mem, cpu=1,
                percpu_offset=PERCPU_STRIDE)


# --- atomics ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("op", "fn"), [(BPF_ADD, lambda a, b: a + b), (BPF_OR, lambda a, b: a | b),
                                        (BPF_AND, lambda a, b: a & b), (BPF_XOR, lambda a, b: a ^ b)])
@pytest.mark.parametrize("fetch", [False, True])
@pytest.mark.parametrize(("size", "width"), [(BPF_W, 4), (BPF_DW, 8)])
def test_atomic_rmw(op, fn, fetch, size, width):
    old, operand = 0xF0F0_F0F0_8000_00FF, 0xFFFF_FFFF_8000_0F01
    mem, buf = ctx_memory(struct.pack("<QQ", old, 0x5555_5555_5555_5555))
    mask = (1 << (8 * width)) - 1
    got = execute(load(2, operand), atomic_op(size, op | (BPF_FETCH if fetch else 0), 1, 2, 0),
                  mov64_reg(0, 2), exit_insn(), memory=mem, r1=CTX)
    assert got == (old & mask if fetch else operand)
    assert int.from_bytes(buf[:width], "little") == fn(old & mask, operand & mask) & mask
    assert buf[width:16] == struct.pack("<QQ", old, 0x5555_5555_5555_5555)[width:16]


@pytest.mark.parametrize(("size", "width"), [(BPF_W, 4), (BPF_DW, 8)])
def test_atomic_xchg(size, width):
    mem, buf = ctx_memory(struct.pack("<Q", 0x1111_2222_3333_4444))
    got = execute(load(2, 0xAAAA_BBBB_CCCC_DDDD), atomic_op(size, BPF_XCHG, 1, 2, 0), mov64_reg(0, 2),
                  exit_insn(), memory=mem, r1=CTX)
    mask = (1 << (8 * width)) - 1
    assert got == 0x1111_2222_3333_4444 & mask
    want = (0x1111_2222_3333_4444 & ~mask) | (0xAAAA_BBBB_CCCC_DDDD & mask)
    assert int.from_bytes(buf[:8], "little") == want


@pytest.mark.parametrize(("size", "expected", "swaps"), [
    (BPF_DW, 0x7, True), (BPF_DW, 0x8, False), (BPF_DW, 0xFFFF_FFFF_0000_0007, False),
    (BPF_W, 0x7, True), (BPF_W, 0xFFFF_FFFF_0000_0007, True),  # W compares only r0's low half
    (BPF_W, 0x8, False),
])
def test_atomic_cmpxchg(size, expected, swaps):
    mem, buf = ctx_memory(struct.pack("<Q", 7))
    got = execute(load(0, expected), mov64_imm(2, 99), atomic_op(size, BPF_CMPXCHG, 1, 2, 0), exit_insn(),
                  memory=mem, r1=CTX)
    assert got == 7  # r0 always receives the old value (zero-extended for W)
    assert struct.unpack_from("<Q", buf)[0] == (99 if swaps else 7)


# --- jumps --------------------------------------------------------------------------------------------------

CONDS = {
    BPF_JEQ: lambda a, b, w: a == b, BPF_JNE: lambda a, b, w: a != b, BPF_JSET: lambda a, b, w: bool(a & b),
    BPF_JGT: lambda a, b, w: a > b, BPF_JGE: lambda a, b, w: a >= b,
    BPF_JLT: lambda a, b, w: a < b, BPF_JLE: lambda a, b, w: a <= b,
    BPF_JSGT: lambda a, b, w: _sx(a, w) > _sx(b, w), BPF_JSGE: lambda a, b, w: _sx(a, w) >= _sx(b, w),
    BPF_JSLT: lambda a, b, w: _sx(a, w) < _sx(b, w), BPF_JSLE: lambda a, b, w: _sx(a, w) <= _sx(b, w),
}
JMP_VALUES = [0, 1, 5, U32, S32_MIN, S64_MIN, U64, 0x1_0000_0005, 0xFFFF_FFFF_0000_0001]


def taken(jmp):
    return execute(mov64_imm(0, 0), jmp, exit_insn(), mov64_imm(0, 1), exit_insn())  # jmp's off is 1


@pytest.mark.parametrize("cond", list(CONDS), ids=[hex(c) for c in CONDS])
def test_jump_conditions(cond):
    model = CONDS[cond]
    for a in JMP_VALUES:
        for b in JMP_VALUES:
            pre = flat(load(1, a), load(2, b))
            assert taken(pre + [jmp_reg(cond, 1, 2,1)]) == model(a, b, 64), (a, b)
            assert taken(pre + [jmp32_reg(cond, 1, 2,1)]) == model(a & U32, b & U32, 32), (a, b)
            if -(1 << 31) <= _s64(b) < (1 << 31):
                assert taken(pre + [jmp_imm(cond, 1, _s64(b),1)]) == model(a, b, 64), (a, b)
            assert taken(pre + [jmp32_imm(cond, 1, _s32(b),1)]) == model(a & U32, b & U32, 32), (a, b)


def test_ja_and_gotol():
    assert execute(mov64_imm(0, 1), ja(1), mov64_imm(0, 2), exit_insn()) == 1
    assert execute(mov64_imm(0, 1), jmp32_a(2), mov64_imm(0, 2), mov64_imm(0, 3), exit_insn()) == 1
    # Backwards: count down from 3.
    assert execute(mov64_imm(0, 0), mov64_imm(1, 3), alu64_imm(BPF_ADD, 0, 10), alu64_imm(BPF_SUB, 1, 1),
                   jmp_imm(BPF_JNE, 1, 0, -3), exit_insn()) == 30


def test_bad_control_flow_faults():
    with pytest.raises(BpfFault, match="outside the program"):
        execute(ja(5), exit_insn())
    with pytest.raises(BpfFault, match="fell off the end"):
        execute(mov64_imm(0, 0))
    with pytest.raises(BpfFault, match="second slot"):
        execute(ja(1), load(0, 5), exit_insn())
    with pytest.raises(BpfFault, match="r10 is read-only"):
        execute(mov64_imm(10, 0), exit_insn())
    with pytest.raises(BpfFault, match="unsupported opcode"):
        execute(Insn(0x20), exit_insn())  # LD_ABS


def test_unrelocated_ld_imm64_faults():
    assert execute(load(0, 0x1234_5678_9ABC_DEF0), exit_insn()) == 0x1234_5678_9ABC_DEF0
    with pytest.raises(BpfFault, match="not relocated"):
        execute(ld_imm64(0, BPF_PSEUDO_MAP_VALUE, 3, 0), exit_insn())


def test_unreached_bad_instructions_do_not_fault():
    assert execute(mov64_imm(0, 4), exit_insn(), ld_imm64(0, BPF_PSEUDO_MAP_VALUE, 3, 0), Insn(0xFF)) == 4


# --- calls --------------------------------------------------------------------------------------------------

def test_bpf_to_bpf_call_saves_callee_saved_registers():
    prog = flat(
        mov64_imm(6, 6), mov64_imm(7, 7), mov64_imm(8, 8), mov64_imm(9, 9),
        st_mem(BPF_DW, 10, -8, 1000), mov64_imm(1, 30), mov64_imm(2, 12),
        call_rel(7),
        ldx_mem(BPF_DW, 1, 10, -8),  # the caller's stack slot survives the callee's store
        alu64_reg(BPF_ADD, 0, 1),
        *(alu64_reg(BPF_ADD, 0, reg) for reg in (6, 7, 8, 9)),
        exit_insn(),
        # callee: r0 = r1 - r2, clobbering r6-r9 and its own stack
        mov64_reg(0, 1), alu64_reg(BPF_SUB, 0, 2),
        mov64_imm(6, -1), mov64_imm(7, -1), mov64_imm(8, -1), mov64_imm(9, -1),
        st_mem(BPF_DW, 10, -8, 5), exit_insn(),
    )
    assert run(prog, memory=Memory(), cpu=0, percpu_offset=0, helpers={}) == 18 + 1000 + 30


def test_call_depth_limit():
    # Each frame calls itself until the eighth frame would be pushed.
    depth_probe = flat(alu64_imm(BPF_ADD, 0, 1), call_rel(-2), exit_insn())
    mem = Memory()
    with pytest.raises(BpfFault, match="call depth"):
        execute(mov64_imm(0, 0), *depth_probe, memory=mem)
    assert mem.regions() == []  # every frame's stack was unmapped, including the lazily mapped ones
    seven = flat(mov64_imm(0, 0), alu64_imm(BPF_ADD, 0, 1), jmp_imm(BPF_JGE, 0, 8, 1), call_rel(-3),
                 exit_insn())
    assert execute(*seven) == 8  # frames 0..7 are allowed


def test_frames_cannot_reach_each_others_stack():
    # The callee reads just below its own 512 bytes: that is not the caller's frame, it is unmapped.
    with pytest.raises(BpfFault, match=r"pc 2: read of 8 bytes at .*'stack1'"):
        execute(call_rel(1), exit_insn(), ldx_mem(BPF_DW, 0, 10, -STACK_SIZE - 8), exit_insn())


def test_helper_call_passes_args_and_poisons_scratch_registers():
    seen = {}

    def helper(m: Machine) -> int:
        seen["args"] = m.regs[1:6]
        seen["pc"], seen["cpu"] = m.pc, m.cpu
        return -2

    got = execute(mov64_imm(1, 1), mov64_imm(2, 2), mov64_imm(3, 3), mov64_imm(4, 4), mov64_imm(5, 5),
                  call_helper(77), mov64_reg(6, 0), mov64_reg(0, 3), alu64_reg(BPF_XOR, 0, 6), exit_insn(),
                  helpers={77: helper}, cpu=3)
    assert seen == {"args": [1, 2, 3, 4, 5], "pc": 5, "cpu": 3}
    assert got == POISON ^ (-2 & U64)


def test_unknown_helper_faults():
    with pytest.raises(BpfFault, match="pc 0: unknown helper 5"):
        execute(call_helper(5), exit_insn())


def test_helper_fault_carries_pc():
    def bad(m: Machine) -> int:
        return m.memory.read(m.regs[1], 8)

    with pytest.raises(BpfFault, match="pc 1: read of 8 bytes at 0x0"):
        execute(mov64_imm(1, 0), call_helper(1), exit_insn(), helpers={1: bad})


TAIL_CALL = 12


def test_tail_call_restarts_with_ctx_and_fresh_stack():
    target = flat(ldx_mem(BPF_DW, 0, 10, -8), alu64_reg(BPF_ADD, 0, 1), alu64_reg(BPF_ADD, 0, 6), exit_insn())
    machines = []

    def tail(m: Machine) -> int | TailCall:
        machines.append(m.tail_calls)
        return TailCall(target)

    got = execute(mov64_imm(6, 50), st_mem(BPF_DW, 10, -8, 9), mov64_imm(1, 1000), call_helper(TAIL_CALL),
                  mov64_imm(0, -1), exit_insn(), helpers={TAIL_CALL: tail}, r1=1000)
    assert got == 1000
    assert machines == [0]


def test_tail_call_limit_is_left_to_the_helper():
    def tail(m: Machine) -> int | TailCall:
        return TailCall(chain) if m.tail_calls < MAX_TAIL_CALLS else 1

    chain = flat(alu64_imm(BPF_ADD, 1, 1), mov64_reg(6, 1), call_helper(TAIL_CALL), mov64_reg(0, 6),
                 exit_insn())
    # r1 counts the programs run: every tail call carries the incremented ctx register over.
    assert execute(*chain, helpers={TAIL_CALL: tail}) == MAX_TAIL_CALLS + 1

    with pytest.raises(BpfFault, match="limit"):
        execute(*chain, helpers={TAIL_CALL: lambda m: TailCall(chain)})


def test_tail_call_from_subprogram_faults():
    with pytest.raises(BpfFault, match="tail call from subprogram unsupported"):
        execute(call_rel(1), exit_insn(), call_helper(TAIL_CALL), exit_insn(),
                helpers={TAIL_CALL: lambda m: TailCall([exit_insn()])})


def test_step_budget():
    with pytest.raises(BpfFault, match="budget of 100"):
        execute(mov64_imm(0, 0), ja(-1), max_steps=100)
    assert execute(mov64_imm(0, 0), exit_insn(), max_steps=2) == 0
    with pytest.raises(BpfFault, match="budget"):
        execute(mov64_imm(0, 0), exit_insn(), max_steps=1)


# --- differential tests against clang -----------------------------------------------------------------------

C_SOURCE = r"""
typedef unsigned long long u64; typedef long long s64;
typedef unsigned int u32; typedef int s32;
typedef unsigned short u16; typedef short s16;
typedef unsigned char u8; typedef signed char s8;
#define SEC(name) __attribute__((section(name), used))
#define SUB(name) static __attribute__((noinline, section(name)))

SEC("t/arith") u64 arith(u64 *c)
{
    u64 a = c[0], b = c[1];
    u32 x = c[2], y = c[3];
    u64 r = a * 31 + (b ^ (a >> 7));
    r += (a << (b & 63)) | (a >> (x & 63));
    r ^= (u32)(x * y + (x >> (y & 31)) - (y << (x & 31)));
    r += (u64)((s64)a >> (x & 63));
    r ^= (u32)((s32)x >> (y & 31));
    if (b)
        r += a / b + a % b;
    if (y)
        r ^= (u64)(x / y) << 3 | (x % y);
    r += ~a & (b | 0xff00);
    return r;
}

#if __BPF_CPU_VERSION__ >= 4
SEC("t/signed") u64 signed_ops(u64 *c)
{
    s64 a = c[0], b = c[1];
    s32 x = c[2], y = c[3];
    u64 r = 0;
    if (b != 0 && !(a == (-0x7fffffffffffffffLL - 1) && b == -1))
        r += (u64)(a / b) * 3 + (u64)(a % b);
    if (y != 0 && !(x == (-0x7fffffff - 1) && y == -1))
        r ^= ((u64)(s64)(x / y) << 1) ^ (u64)(s64)(x % y);
    r += (u64)(s64)(s8)a + (u64)(s64)(s16)b + (u64)(s64)(s32)(a >> 3);
    r ^= (u32)(s32)(s8)x;
    return r;
}
#endif

SEC("t/bswap") u64 bswaps(u64 *c)
{
    return __builtin_bswap64(c[0]) ^ ((u64)__builtin_bswap32((u32)c[1]) << 5)
        ^ __builtin_bswap16((u16)c[2]) ^ (c[3] >> 7);
}

SEC("t/loads") u64 loads(u64 *c)
{
    u8 *p = (u8 *)c;
    u32 i = c[7] & 31;
    s64 v = (s64)*(s8 *)(p + i) + *(s16 *)(p + 32 + 2 * (i & 15)) + *(s32 *)(p + 4 * (i & 7));
    u64 w = (u64)*(u8 *)(p + i + 1) + *(u16 *)(p + 2 * (i & 15)) + *(u32 *)(p + 32 + 4 * (i & 7));
    return (u64)v ^ (w << 1);
}

SEC("t/stack") u64 stack(u64 *c)
{
    u32 buf[32];
    u64 seed = c[0], n = (c[1] & 31) + 1, acc = c[2];
    for (int i = 0; i < 32; i++) {
        seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
        buf[i] = seed >> 33;
    }
    for (u64 i = 0; i < n; i++)
        acc = (acc ^ buf[(i * 7 + c[3]) & 31]) * 31 + i;
    return acc;
}

SEC("t/atomics") u64 atomics(u64 *c)
{
    u64 v = c[4];
    u32 *w = (u32 *)&c[6];
    u64 r = __sync_fetch_and_add(&c[0], v);
    r ^= __sync_fetch_and_or(&c[1], v) << 1;
    r ^= __sync_fetch_and_and(&c[2], v) << 2;
    r ^= __sync_fetch_and_xor(&c[3], v) << 3;
    __sync_fetch_and_add(&c[5], 3);
    __sync_fetch_and_xor(&w[1], (u32)v);
    r += __sync_fetch_and_add(&w[0], (u32)v);
    r += __sync_val_compare_and_swap(&c[7], v, r);
    r += __sync_val_compare_and_swap(&w[1], (u32)v, (u32)r);
    r += __sync_lock_test_and_set(&w[0], (u32)r);
    return r;
}

SUB("t/calls") u64 outer(u64 a, u64 b);
SUB("t/calls") u64 mix(u64 a, u64 b, u64 c, u64 d, u64 e);

SEC("t/calls") u64 calls(u64 *c)
{
    u64 a = c[0], b = c[1], k = c[2], m = c[3];
    u64 r = outer(a, b);
    r ^= outer(k, m) + a + b + k + m;
    return r;
}

SUB("t/calls") u64 outer(u64 a, u64 b)
{
    u64 t = mix(a, b, a + b, a - b, b >> 3);
    return t + mix(t, a, b, 1, a);
}

SUB("t/calls") u64 mix(u64 a, u64 b, u64 c, u64 d, u64 e)
{
    volatile u64 buf[4] = {a, b, c, d};
    return buf[e & 3] * 7 + (a ^ e);
}

SEC("t/branches") u64 branches(u64 *c)
{
    u32 x = c[0];
    s32 sx = c[1];
    u64 a = c[2];
    s64 sa = c[3];
    u64 r = 0;
    if (x > 1000) r |= 1;
    if (sx < -5) r |= 2;
    if ((x & 0x80) != 0) r |= 4;
    if (sa >= 7) r |= 8;
    if (a <= 0xffffffffULL) r |= 16;
    if ((s32)x > sx) r |= 32;
    if (a < (u64)sa) r |= 64;
    if (sa < (s64)a) r |= 128;
    switch (x & 7) {
    case 0: r += 100; break;
    case 1: r *= 3; break;
    case 3: r ^= 0x55; break;
    case 6: r -= 1; break;
    default: r += x;
    }
    return r;
}
"""


def model_arith(c):
    a, b, x, y = c[0], c[1], c[2] & U32, c[3] & U32
    r = (a * 31 + (b ^ (a >> 7))) & U64
    r = (r + (((a << (b & 63)) & U64) | (a >> (x & 63)))) & U64
    r ^= (x * y + (x >> (y & 31)) - ((y << (x & 31)) & U32)) & U32
    r = (r + (_s64(a) >> (x & 63))) & U64
    r ^= (_s32(x) >> (y & 31)) & U32
    if b:
        r = (r + a // b + a % b) & U64
    if y:
        r ^= ((x // y) << 3) | (x % y)
    return (r + (~a & (b | 0xFF00))) & U64


def model_signed(c):
    a, b, x, y = _s64(c[0]), _s64(c[1]), _s32(c[2]), _s32(c[3])
    r = 0
    if b != 0 and not (a == -(1 << 63) and b == -1):
        q = trunc_div(a, b)
        r += q * 3 + (a - q * b)
    if y != 0 and not (x == -(1 << 31) and y == -1):
        q = trunc_div(x, y)
        r = (r & U64) ^ ((q << 1) & U64) ^ ((x - q * y) & U64)
    r += _sx(a, 8) + _sx(b, 16) + _s32(a >> 3)
    return (r & U64) ^ (_sx(x, 8) & U32)


def model_bswap(c):
    def swap(v, n):
        return int.from_bytes((v & ((1 << 8 * n) - 1)).to_bytes(n, "little"), "big")
    return swap(c[0], 8) ^ (swap(c[1], 4) << 5) ^ swap(c[2], 2) ^ (c[3] >> 7)


def model_loads(c):
    p = struct.pack("<8Q", *c)
    i = c[7] & 31

    def get(off, n, signed):
        return int.from_bytes(p[off:off + n], "little", signed=signed)
    v = get(i, 1, True) + get(32 + 2 * (i & 15), 2, True) + get(4 * (i & 7), 4, True)
    w = get(i + 1, 1, False) + get(2 * (i & 15), 2, False) + get(32 + 4 * (i & 7), 4, False)
    return (v & U64) ^ ((w << 1) & U64)


def model_stack(c):
    seed, n, acc = c[0], (c[1] & 31) + 1, c[2]
    buf = []
    for _ in range(32):
        seed = (seed * 6364136223846793005 + 1442695040888963407) & U64
        buf.append(seed >> 33)
    for i in range(n):
        acc = ((acc ^ buf[(i * 7 + c[3]) & 31]) * 31 + i) & U64
    return acc


def model_atomics(c):
    c = list(c)
    v = c[4]
    r = c[0]
    c[0] = (c[0] + v) & U64
    r ^= (c[1] << 1) & U64
    c[1] |= v
    r ^= (c[2] << 2) & U64
    c[2] &= v
    r ^= (c[3] << 3) & U64
    c[3] ^= v
    c[5] = (c[5] + 3) & U64
    w0, w1 = c[6] & U32, c[6] >> 32
    w1 ^= v & U32
    r = (r + w0) & U64
    w0 = (w0 + v) & U32
    old = c[7]
    if old == v:
        c[7] = r
    r = (r + old) & U64
    old = w1
    if old == v & U32:
        w1 = r & U32
    r = (r + old) & U64
    old, w0 = w0, r & U32
    r = (r + old) & U64
    c[6] = w0 | w1 << 32
    return r, c


def model_calls(c):
    def mix(a, b, cc, d, e):
        return ([a, b, cc, d][e & 3] * 7 + (a ^ e)) & U64

    def outer(a, b):
        t = mix(a, b, (a + b) & U64, (a - b) & U64, b >> 3)
        return (t + mix(t, a, b, 1, a)) & U64

    a, b, k, m = c[:4]
    return outer(a, b) ^ ((outer(k, m) + a + b + k + m) & U64)


def model_branches(c):
    x, sx, a, sa = c[0] & U32, _s32(c[1]), c[2], _s64(c[3])
    r = 0
    r |= 1 if x > 1000 else 0
    r |= 2 if sx < -5 else 0
    r |= 4 if x & 0x80 else 0
    r |= 8 if sa >= 7 else 0
    r |= 16 if a <= U32 else 0
    r |= 32 if _s32(x) > sx else 0
    r |= 64 if a < (sa & U64) else 0
    r |= 128 if sa < _s64(a) else 0
    case = x & 7
    r = {0: r + 100, 1: r * 3, 3: r ^ 0x55, 6: r - 1}.get(case, r + x)
    return r & U64


MODELS = {
    "arith": model_arith, "signed": model_signed, "bswap": model_bswap, "loads": model_loads,
    "stack": model_stack, "calls": model_calls, "branches": model_branches,
}
CPUS = ("v3", "v4")


def compile_sections(source: str, cpu: str, workdir: Path) -> dict[str, list[Insn]]:
    from elftools.elf.elffile import ELFFile

    src, obj = workdir / f"prog_{cpu}.c", workdir / f"prog_{cpu}.o"
    src.write_text(source)
    subprocess.run(["clang-19", "-target", "bpf", "-O2", f"-mcpu={cpu}", "-c", str(src), "-o", str(obj)],
                   check=True, capture_output=True)
    out = {}
    with obj.open("rb") as f:
        elf = ELFFile(f)
        entries = {sym.name: sym for sym in elf.get_section_by_name(".symtab").iter_symbols()}
        for sec in elf.iter_sections():
            if not sec.name.startswith("t/"):
                continue
            # Relocations would mean the program needs a loader, which these tests avoid on purpose.
            assert elf.get_section_by_name(".rel" + sec.name) is None, sec.name
            out[sec.name[2:]] = decode(sec.data())
        for name, func in (("signed", "signed_ops"), ("bswap", "bswaps"), ("calls", "calls")):
            if name in out:
                assert entries[func]["st_value"] == 0, f"{func} is not at the start of its section"
    return out


@pytest.fixture(scope="module")
def clang_programs(tmp_path_factory):
    if shutil.which("clang-19") is None:
        pytest.skip("clang-19 is not installed")
    workdir = tmp_path_factory.mktemp("clang")
    return {cpu: compile_sections(C_SOURCE, cpu, workdir) for cpu in CPUS}


SPECIAL = [0, 1, 2, 3, 7, 31, 32, 63, 64, 0x7F, 0x80, 0xFF, U32, S32_MIN, S32_MIN - 1, 1 << 32, S64_MIN,
           S64_MIN - 1, U64, U64 - 1, (-(1 << 31)) & U64, (-5) & U64]
u64s = st.one_of(st.integers(0, U64), st.sampled_from(SPECIAL), st.integers(0, 40))
ctx_values = st.lists(u64s, min_size=8, max_size=8)
DIFF_SETTINGS = settings(max_examples=150, deadline=None)


def run_on_ctx(program, values):
    mem, buf = ctx_memory(struct.pack("<8Q", *values))
    r0 = run(program, memory=mem, cpu=0, percpu_offset=0, helpers={}, r1=CTX)
    return r0, list(struct.unpack("<8Q", buf))


def test_clang_sections_compiled(clang_programs):
    assert set(clang_programs["v4"]) == set(MODELS) | {"atomics"}
    assert set(clang_programs["v3"]) == (set(MODELS) | {"atomics"}) - {"signed"}
    # The v4 build must actually exercise the v4 encodings this interpreter adds.
    v4 = [i for prog in clang_programs["v4"].values() for i in prog]
    assert any(i.code == 0xD7 for i in v4)                            # bswap
    assert any(i.code & 0xE7 == 0x81 for i in v4)                     # ldx memsx
    assert any(i.code in (0x3F, 0x9F, 0x3C, 0x9C) and i.off == 1 for i in v4)  # sdiv/smod
    assert any(i.code in (0xBF, 0xBC) and i.off in (8, 16, 32) for i in v4)    # movsx
    assert any(i.code == 0x85 and i.src == 1 for i in v4)             # bpf-to-bpf call


@pytest.mark.parametrize("cpu", CPUS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_clang_function_matches_model(clang_programs, cpu, name):
    programs = clang_programs[cpu]
    if name not in programs:
        pytest.skip(f"{name} needs a newer -mcpu than {cpu}")
    program, model = programs[name], MODELS[name]

    @DIFF_SETTINGS
    @given(ctx_values)
    def check(values):
        r0, after = run_on_ctx(program, values)
        assert r0 == model(values)
        assert after == values

    check()


@pytest.mark.parametrize("cpu", CPUS)
def test_clang_atomics_match_model(clang_programs, cpu):
    program = clang_programs[cpu]["atomics"]

    @DIFF_SETTINGS
    @given(ctx_values, st.booleans(), st.booleans())
    def check(values, hit64, hit32):
        values = list(values)
        if hit64:  # make the 64-bit cmpxchg's comparison succeed
            values[7] = values[4]
        if hit32:  # and the 32-bit one: its word is xor-ed with v first, so it must start at 0
            values[6] &= U32
        r0, after = run_on_ctx(program, values)
        want_r0, want_ctx = model_atomics(values)
        assert (r0, after) == (want_r0, want_ctx)

    check()
