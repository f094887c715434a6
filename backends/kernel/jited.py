"""What the x86-64 JIT made of a per-CPU address: the destination register of each `gs`-relative ADD in a
program's jited image, and the BPF register each x86 register stands for.

The x86 JIT emits BPF_MOV64_PERCPU_REG (the verifier's rewrite after an ld_imm64 of a per-CPU map value, and
inside the inlined bpf_get_smp_processor_id) as `add <dst>, gs:[this_cpu_off]`: the `gs` prefix 0x65, REX.W
with REX.R for r8-r15, opcode 0x03 (ADD r64, r/m64), ModRM mod=00 with <dst> in its reg field, then the memory
form. Only that instruction is decoded, by its byte pattern: the image is not disassembled, so a pattern inside
another instruction's immediate would be counted too (the programs observed here carry no such immediate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from generators.asm import PERCPU_ADDR_VALUE_SIZE

# x86-64 general-purpose registers by their 4-bit encoding (REX bit : 3-bit field), 64-bit names
X86_REG_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
                 "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")

GS_PREFIX = 0x65
REX_W = 0x48  # 0100 W=1 R X B
REX_R, REX_X = 0x4, 0x2
OPCODE_ADD_R64_RM64 = 0x03
SIB_DISP32_NO_INDEX = 0x25  # scale 0, index 100 (none), base 101 with mod 00: disp32 absolute



@dataclass(frozen=True)
class GsAdd:
    """One `add <reg>, gs:[...]` at byte `at` of the image."""

    at: int
    reg: str  # the destination, an X86_REG_NAMES entry
    form: str  # "disp32" (SIB, no base or index, as the kernel JIT emits it) | "rip" (rip-relative disp32)
    disp: int  # signed 32-bit displacement
    length: int


def find_gs_adds(code: bytes) -> list[GsAdd]:
    """Each `gs`-prefixed ADD r64, m64 with an absolute or rip-relative disp32 operand, in image order."""
    out: list[GsAdd] = []
    i = 0
    while i + 8 <= len(code):
        rex, opcode, modrm = code[i + 1], code[i + 2], code[i + 3]
        if code[i] != GS_PREFIX or rex & 0xF8 != REX_W or opcode != OPCODE_ADD_R64_RM64 or modrm >> 6 != 0:
            i += 1
            continue
        reg = X86_REG_NAMES[(8 if rex & REX_R else 0) | (modrm >> 3) & 7]
        rm = modrm & 7
        if rm == 4 and i + 9 <= len(code) and code[i + 4] == SIB_DISP32_NO_INDEX and not rex & REX_X:
            # with REX.X the SIB index 100 names r12: a scaled register, not an absolute address
            out.append(GsAdd(i, reg, "disp32", int.from_bytes(code[i + 5:i + 9], "little", signed=True), 9))
            i += 9
        elif rm == 5:  # mod 00, rm 101: rip-relative, whatever REX.B says
            out.append(GsAdd(i, reg, "rip", int.from_bytes(code[i + 4:i + 8], "little", signed=True), 8))
            i += 8
        else:
            i += 1
    return out


def percpu_add_regs(code: bytes) -> list[str]:
    """The destination x86 register of each per-CPU offset add in a jited image, in order."""
    return [add.reg for add in find_gs_adds(code)]


def observe_percpu_addr_jit(register: int, offset: int = 0,
                            value_size: int = PERCPU_ADDR_VALUE_SIZE) -> dict[str, Any]:
    """Load `rN = map_value(percpu map, offset) ll; r0 = 0; exit` as a raw_tp program on this kernel, the map a
    1-entry PERCPU_ARRAY made here, and report whether it loaded and which x86 registers its jited image adds
    the per-CPU offset into ([] when the program is not jited)."""
    from backends.kernel import bpf
    from generators.asm import MapShape, VerifierCase, assemble
    from toolchain.insn import encode
    from toolchain.uapi import BPF_MAP_TYPE_PERCPU_ARRAY

    if not 0 <= register <= 9:
        raise ValueError(f"register r{register}: want r0..r9")
    case = VerifierCase(MapShape("percpu_array", value_size), register, offset)
    with bpf.map_create(BPF_MAP_TYPE_PERCPU_ARRAY, 4, value_size, 1, name="jited") as map_fd:
        try:
            prog, _ = bpf.prog_load(bpf.RAW_TRACEPOINT, encode(assemble(case, int(map_fd))), name="jited")
        except bpf.BpfError as e:
            return {"loaded": False, "errno": e.errno, "jited_percpu_add_regs": [], "message": e.reason or str(e)}
        with prog:
            return {"loaded": True, "errno": 0, "jited_percpu_add_regs": percpu_add_regs(bpf.prog_jited_insns(prog))}
