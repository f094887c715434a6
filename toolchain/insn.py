"""eBPF instructions: the 8-byte encoding, the constants that name its fields, and small constructors.

Shared by the object reader, the loaders and the simulator; it only describes instructions and runs nothing.
An `ld_imm64` is two slots, as in the kernel: the first carries the low 32 bits of the constant, the second
(code 0) the high 32 bits. Keeping both slots keeps instruction indices equal to the kernel's.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Instruction classes (low 3 bits of the opcode).
BPF_LD, BPF_LDX, BPF_ST, BPF_STX, BPF_ALU, BPF_JMP, BPF_JMP32, BPF_ALU64 = range(8)

# Sizes (LD/LDX/ST/STX).
BPF_W, BPF_H, BPF_B, BPF_DW = 0x00, 0x08, 0x10, 0x18
SIZE_BYTES = {BPF_W: 4, BPF_H: 2, BPF_B: 1, BPF_DW: 8}
# Modes.
BPF_IMM, BPF_ABS, BPF_IND, BPF_MEM, BPF_MEMSX, BPF_ATOMIC = 0x00, 0x20, 0x40, 0x60, 0x80, 0xC0

# Source operand (ALU/JMP).
BPF_K, BPF_X = 0x00, 0x08
# ALU operations.
BPF_ADD, BPF_SUB, BPF_MUL, BPF_DIV, BPF_OR, BPF_AND, BPF_LSH, BPF_RSH = (
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70)
BPF_NEG, BPF_MOD, BPF_XOR, BPF_MOV, BPF_ARSH, BPF_END = 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0
BPF_TO_LE, BPF_TO_BE = 0x00, 0x08
# Jump operations.
BPF_JA, BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET, BPF_JNE, BPF_JSGT, BPF_JSGE = (
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70)
BPF_CALL, BPF_EXIT, BPF_JLT, BPF_JLE, BPF_JSLT, BPF_JSLE = 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0
# Atomic operations (imm of a BPF_ATOMIC store).
BPF_FETCH, BPF_XCHG, BPF_CMPXCHG = 0x01, 0xE0 | 0x01, 0xF0 | 0x01

# src_reg of an ld_imm64: what the constant refers to.
BPF_PSEUDO_MAP_FD = 1
BPF_PSEUDO_MAP_VALUE = 2
BPF_PSEUDO_BTF_ID = 3
BPF_PSEUDO_FUNC = 4
BPF_PSEUDO_MAP_IDX = 5
BPF_PSEUDO_MAP_IDX_VALUE = 6
# src_reg of a call.
BPF_PSEUDO_CALL = 1
BPF_PSEUDO_KFUNC_CALL = 2
# off of an ALU64 MOV X: the verifier's per-CPU address conversion (kernel-internal, BPF_MOV64_PERCPU_REG);
# off 1 on the same opcode is the arena address-space cast, a different instruction.
BPF_ADDR_PERCPU = -1

LD_IMM64 = BPF_LD | BPF_DW | BPF_IMM

_FORMAT = struct.Struct("<BBhi")


@dataclass(frozen=True, slots=True)
class Insn:
    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0

    @property
    def cls(self) -> int:
        return self.code & 0x07

    @property
    def is_ld_imm64(self) -> bool:
        return self.code == LD_IMM64

    @property
    def is_map_value_load(self) -> bool:
        """An ld_imm64 that yields a pointer into a map value (a global variable reference)."""
        return self.is_ld_imm64 and self.src in (BPF_PSEUDO_MAP_VALUE, BPF_PSEUDO_MAP_IDX_VALUE)

    @property
    def is_percpu_mov(self) -> bool:
        return self.code == BPF_ALU64 | BPF_MOV | BPF_X and self.off == BPF_ADDR_PERCPU

    @property
    def is_pseudo_call(self) -> bool:
        return self.code == BPF_JMP | BPF_CALL and self.src == BPF_PSEUDO_CALL

    @property
    def is_helper_call(self) -> bool:
        return self.code == BPF_JMP | BPF_CALL and self.src == 0


def decode(data: bytes) -> list[Insn]:
    if len(data) % 8:
        raise ValueError(f"instruction stream of {len(data)} bytes is not a multiple of 8")
    out = []
    for code, regs, off, imm in _FORMAT.iter_unpack(data):
        out.append(Insn(code, regs & 0x0F, regs >> 4, off, imm))
    return out


def encode(insns: Iterable[Insn]) -> bytes:
    return b"".join(_FORMAT.pack(i.code, (i.src << 4) | i.dst, i.off, _s32(i.imm)) for i in insns)


def _s32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


# Constructors, named after the kernel's filter.h macros.

def ld_imm64(dst: int, src: int, imm: int, imm2: int = 0) -> tuple[Insn, Insn]:
    return Insn(LD_IMM64, dst, src, 0, _s32(imm)), Insn(0, 0, 0, 0, _s32(imm2))


def ld_map_value(dst: int, map_ref: int, offset: int, *, by_index: bool = False) -> tuple[Insn, Insn]:
    """`dst = &map_value[offset]`: map_ref is a map fd, or an fd_array index when by_index."""
    return ld_imm64(dst, BPF_PSEUDO_MAP_IDX_VALUE if by_index else BPF_PSEUDO_MAP_VALUE, map_ref, offset)


def ld_map_fd(dst: int, map_fd: int) -> tuple[Insn, Insn]:
    return ld_imm64(dst, BPF_PSEUDO_MAP_FD, map_fd)


def mov64_reg(dst: int, src: int) -> Insn:
    return Insn(BPF_ALU64 | BPF_MOV | BPF_X, dst, src)


def mov64_imm(dst: int, imm: int) -> Insn:
    return Insn(BPF_ALU64 | BPF_MOV | BPF_K, dst, 0, 0, _s32(imm))


def mov32_imm(dst: int, imm: int) -> Insn:
    return Insn(BPF_ALU | BPF_MOV | BPF_K, dst, 0, 0, _s32(imm))


def mov64_percpu_reg(dst: int, src: int) -> Insn:
    return Insn(BPF_ALU64 | BPF_MOV | BPF_X, dst, src, BPF_ADDR_PERCPU)


def alu64_imm(op: int, dst: int, imm: int) -> Insn:
    return Insn(BPF_ALU64 | op | BPF_K, dst, 0, 0, _s32(imm))


def alu64_reg(op: int, dst: int, src: int) -> Insn:
    return Insn(BPF_ALU64 | op | BPF_X, dst, src)


def ldx_mem(size: int, dst: int, src: int, off: int) -> Insn:
    return Insn(BPF_LDX | BPF_MEM | size, dst, src, off)


def stx_mem(size: int, dst: int, src: int, off: int) -> Insn:
    return Insn(BPF_STX | BPF_MEM | size, dst, src, off)


def st_mem(size: int, dst: int, off: int, imm: int) -> Insn:
    return Insn(BPF_ST | BPF_MEM | size, dst, 0, off, _s32(imm))


def jmp_imm(op: int, dst: int, imm: int, off: int) -> Insn:
    return Insn(BPF_JMP | op | BPF_K, dst, 0, off, _s32(imm))


def jmp_reg(op: int, dst: int, src: int, off: int) -> Insn:
    return Insn(BPF_JMP | op | BPF_X, dst, src, off)


def ja(off: int) -> Insn:
    return Insn(BPF_JMP | BPF_JA, 0, 0, off)


def call_helper(helper_id: int) -> Insn:
    return Insn(BPF_JMP | BPF_CALL, 0, 0, 0, helper_id)


def exit_insn() -> Insn:
    return Insn(BPF_JMP | BPF_EXIT)


def count_map_value_loads(insns: Sequence[Insn]) -> int:
    return sum(1 for i in insns if i.is_map_value_load)


# Constructors for the ALU/JMP32/v4 forms the simulator's tests and generators need.

def alu32_imm(op: int, dst: int, imm: int) -> Insn:
    return Insn(BPF_ALU | op | BPF_K, dst, 0, 0, _s32(imm))


def alu32_reg(op: int, dst: int, src: int) -> Insn:
    return Insn(BPF_ALU | op | BPF_X, dst, src)


def alu64_imm_off(op: int, dst: int, imm: int, off: int) -> Insn:
    """off 1 on DIV/MOD selects the signed (v4) variant."""
    return Insn(BPF_ALU64 | op | BPF_K, dst, 0, off, _s32(imm))


def alu64_reg_off(op: int, dst: int, src: int, off: int) -> Insn:
    return Insn(BPF_ALU64 | op | BPF_X, dst, src, off)


def alu32_imm_off(op: int, dst: int, imm: int, off: int) -> Insn:
    return Insn(BPF_ALU | op | BPF_K, dst, 0, off, _s32(imm))


def alu32_reg_off(op: int, dst: int, src: int, off: int) -> Insn:
    return Insn(BPF_ALU | op | BPF_X, dst, src, off)


def mov32_reg(dst: int, src: int) -> Insn:
    return Insn(BPF_ALU | BPF_MOV | BPF_X, dst, src)


def movsx64_reg(dst: int, src: int, bits: int) -> Insn:
    """`dst = (s<bits>) src`, sign-extended to 64 bits (bits is 8, 16 or 32)."""
    return Insn(BPF_ALU64 | BPF_MOV | BPF_X, dst, src, bits)


def movsx32_reg(dst: int, src: int, bits: int) -> Insn:
    """`dst = (u32)(s<bits>) src` (bits is 8 or 16)."""
    return Insn(BPF_ALU | BPF_MOV | BPF_X, dst, src, bits)


def endian(kind: int, dst: int, bits: int) -> Insn:
    """Host/endian conversion (kind BPF_TO_LE or BPF_TO_BE) of the low `bits` bits."""
    return Insn(BPF_ALU | BPF_END | kind, dst, 0, 0, bits)


def bswap(dst: int, bits: int) -> Insn:
    """Unconditional byte swap of the low `bits` bits (v4)."""
    return Insn(BPF_ALU64 | BPF_END, dst, 0, 0, bits)


def ldx_memsx(size: int, dst: int, src: int, off: int) -> Insn:
    return Insn(BPF_LDX | BPF_MEMSX | size, dst, src, off)


def atomic_op(size: int, op: int, dst: int, src: int, off: int) -> Insn:
    """`op` is the atomic operation carried in imm: BPF_ADD, BPF_AND | BPF_FETCH, BPF_XCHG, BPF_CMPXCHG..."""
    return Insn(BPF_STX | BPF_ATOMIC | size, dst, src, off, op)


def jmp32_imm(op: int, dst: int, imm: int, off: int) -> Insn:
    return Insn(BPF_JMP32 | op | BPF_K, dst, 0, off, _s32(imm))


def jmp32_reg(op: int, dst: int, src: int, off: int) -> Insn:
    return Insn(BPF_JMP32 | op | BPF_X, dst, src, off)


def jmp32_a(imm: int) -> Insn:
    """`gotol`: an unconditional jump whose 32-bit offset is in imm (v4)."""
    return Insn(BPF_JMP32 | BPF_JA, 0, 0, 0, _s32(imm))


def call_rel(imm: int) -> Insn:
    """bpf-to-bpf call of the subprogram at pc + imm + 1."""
    return Insn(BPF_JMP | BPF_CALL, 0, BPF_PSEUDO_CALL, 0, _s32(imm))
