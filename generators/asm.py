"""Instruction-level verifier cases: the rules C programs rarely reach (a given register, an offset past the
value, max_entries 2, a read-only per-CPU map, a const-string argument), as data plus an assembler.

A `VerifierCase` is the model Hypothesis draws and shrinks; `assemble` turns it into instructions for a map
reference (an fd, or index 0 of fd_array for BPF_PSEUDO_MAP_IDX_VALUE).
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

from generators.model import register_json_classes
from toolchain import insn as I

BPF_FUNC_get_smp_processor_id = 8
BPF_FUNC_snprintf = 165
BPF_FUNC_strncmp = 182
SIZES = {1: I.BPF_B, 2: I.BPF_H, 4: I.BPF_W, 8: I.BPF_DW}
# The per-CPU address case of the JIT check: one 1-entry PERCPU_ARRAY of this many bytes, whose value's address
# is loaded into a register (backends.kernel.jited observes it, oracle.jited predicts it)
PERCPU_ADDR_VALUE_SIZE = 64


@dataclass(frozen=True)
class MapShape:
    type: str  # "percpu_array" | "array"
    value_size: int
    max_entries: int = 1
    rdonly: bool = False  # BPF_F_RDONLY_PROG, frozen once its (zero) image is in place


@dataclass(frozen=True)
class MemOp:
    """A load or store through the map-value register, `off` relative to it."""

    off: int
    size: int
    write: bool


@dataclass(frozen=True)
class VerifierCase:
    map: MapShape
    reg: int  # r0..r9: the register the map-value ld_imm64 loads
    offset: int  # the ld_imm64's value offset (its second imm)
    by_index: bool = False  # BPF_PSEUDO_MAP_IDX_VALUE through fd_array instead of BPF_PSEUDO_MAP_VALUE
    accesses: tuple[MemOp, ...] = ()
    store_cpu: int | None = None  # offset (relative) where the running CPU's id is stored as a u32
    branch_oob: bool = False  # a read that is out of bounds unless the verifier folds the loaded value
    const_str: str | None = None  # "strncmp" | "snprintf": the pointer is the const-string argument (R3)


S16_MAX = 32767  # an instruction's offset field


def branch_load_offset(case: VerifierCase) -> int:
    """The offset of the load a folded read would prune: one past the value's end, where the field can say it."""
    return min(case.map.value_size - case.offset, S16_MAX)


def _scratch(case: VerifierCase, n: int) -> list[int]:
    return [r for r in (6, 7, 8, 9, 1, 2) if r != case.reg][:n]


def assemble(case: VerifierCase, map_ref: int) -> list[I.Insn]:
    cpu_reg, tmp = _scratch(case, 2)
    out: list[I.Insn] = []
    if case.store_cpu is not None:
        out += [I.call_helper(BPF_FUNC_get_smp_processor_id), I.mov64_reg(cpu_reg, 0)]
    out += I.ld_map_value(case.reg, map_ref, case.offset, by_index=case.by_index)
    for acc in case.accesses:
        if acc.write:
            out.append(I.st_mem(SIZES[acc.size], case.reg, acc.off, 0x5A))
        else:
            out.append(I.ldx_mem(SIZES[acc.size], tmp, case.reg, acc.off))
    if case.store_cpu is not None:
        out.append(I.stx_mem(I.BPF_W, case.reg, cpu_reg, case.store_cpu))
    if case.branch_oob:
        # the image is zero: a folded read takes the jump over the out-of-bounds load
        out += [I.ldx_mem(I.BPF_B, tmp, case.reg, 0), I.jmp_imm(I.BPF_JEQ, tmp, 0, 1),
                I.ldx_mem(I.BPF_B, tmp, case.reg, branch_load_offset(case))]
    if case.const_str == "strncmp":
        out += [I.mov64_reg(3, case.reg), I.st_mem(I.BPF_DW, 10, -8, 0), I.mov64_reg(1, 10),
                I.alu64_imm(I.BPF_ADD, 1, -8), I.mov64_imm(2, 8), I.call_helper(BPF_FUNC_strncmp)]
    elif case.const_str == "snprintf":
        out += [I.mov64_reg(3, case.reg), I.mov64_reg(1, 10), I.alu64_imm(I.BPF_ADD, 1, -16), I.mov64_imm(2, 8),
                I.mov64_imm(4, 0), I.mov64_imm(5, 0), I.call_helper(BPF_FUNC_snprintf)]
    return [*out, I.mov64_imm(0, 0), I.exit_insn()]


register_json_classes(MapShape, MemOp, VerifierCase)

SMALL_VALUE_SIZES = st.sampled_from((8, 4, 1, 13, 64))
# one draw in five sits at the per-CPU allocator's edge
VALUE_SIZES = st.one_of(SMALL_VALUE_SIZES, SMALL_VALUE_SIZES, SMALL_VALUE_SIZES, SMALL_VALUE_SIZES,
                        st.sampled_from((32760, 32768, 32769)))


def _mostly(inside: st.SearchStrategy[int], outside: st.SearchStrategy[int]) -> st.SearchStrategy[int]:
    return st.one_of(inside, inside, inside, outside)


@st.composite
def verifier_cases(draw: st.DrawFn) -> VerifierCase:
    shape = MapShape(draw(st.sampled_from(("percpu_array", "array"))), draw(VALUE_SIZES),
                     draw(st.sampled_from((1, 1, 1, 2))), draw(st.booleans()))
    size = shape.value_size
    offset = draw(_mostly(st.integers(0, size - 1), st.sampled_from((size, size + 8))))
    room = size - offset  # bytes from the pointer to the end of the value
    near = min(room, S16_MAX - 8)
    access_off = _mostly(st.integers(0, max(0, near - 1)), st.sampled_from((-4, -1, near, near + 4)))
    accesses = draw(st.lists(st.builds(MemOp, access_off, st.sampled_from((1, 2, 4, 8)),
                                       st.booleans()), max_size=2))
    store_cpu = draw(st.none() | st.integers(0, max(0, min(room - 4, S16_MAX))))
    return VerifierCase(shape, draw(st.integers(0, 9)), offset, draw(st.booleans()), tuple(accesses), store_cpu,
                        draw(st.booleans()), draw(st.sampled_from((None, None, "strncmp", "snprintf"))))
