"""The simulator's helper table: one declarative entry per helper, as the kernel's `bpf_func_proto` tables are.

The verifier checks a call against its entry (argument kinds, return range, special checks) and counts what the
JIT inlines; the kernel model runs it through the method its entry names. This module imports neither of them,
so neither imports the other for helper facts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from toolchain.uapi import BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY

BPF_FUNC_map_lookup_elem = 1
BPF_FUNC_map_update_elem = 2
BPF_FUNC_get_smp_processor_id = 8
BPF_FUNC_tail_call = 12
BPF_FUNC_snprintf = 165
BPF_FUNC_strncmp = 182

# What an argument register must hold, checked in register order except that a buffer's size ("const_size",
# the next register) is checked before the buffer itself:
#   map_ptr     a map that is not a PROG_ARRAY      prog_array  a PROG_ARRAY map
#   map_key     key_size readable bytes of the map  map_value   value_size readable bytes of the map
#   ctx         the context pointer, unmoved        scalar      any scalar
#   mem         readable bytes, as many as the next register says
#   out_mem_or_null  writable bytes, or NULL (constant 0) when the size is 0
#   mem_or_null readable bytes, or any scalar when the size is 0 (the kernel wants NULL there: not modelled)
#   const_size  the size of the buffer before it, bounded     const_str  a string in a frozen read-only map
ArgKind = Literal["map_ptr", "prog_array", "map_key", "map_value", "ctx", "scalar", "mem", "out_mem_or_null",
                  "mem_or_null", "const_size", "const_str"]
BUFFER_ARGS: frozenset[ArgKind] = frozenset({"mem", "out_mem_or_null", "mem_or_null"})
# R0 after the call: a scalar in ret_range, a maybe-null pointer into the map argument's value, or a CPU number
# below nr_cpu_ids (do_refine_retval_range [D])
RetKind = Literal["scalar", "map_value_or_null", "cpu_id"]

S64_MIN, S64_MAX = -(1 << 63), (1 << 63) - 1
S32_MIN, S32_MAX = -(1 << 31), (1 << 31) - 1
MAX_ERRNO = 4095


@dataclass(frozen=True, kw_only=True)
class Inline:
    """What the x86-64 JIT's fixups make of a call in the xlated program, in instructions; `percpu_insn`: only
    when the JIT has the per-CPU instruction (bpf_jit_supports_percpu_insn) [V, measured on 6.18; audit B12]."""

    insns: int
    percpu_insn: bool = False


@dataclass(frozen=True, kw_only=True)
class HelperProto:
    func_id: int
    name: str
    args: tuple[ArgKind, ...]  # R1, R2, ...
    ret: RetKind = "scalar"
    ret_range: tuple[int, int] = (S64_MIN, S64_MAX)  # signed bounds of a scalar R0
    runtime: str  # the kernel model's method that performs the call
    inline: Inline | None = None  # None: the call stays one instruction
    inline_by_map_type: Mapping[int, Inline] = field(default_factory=dict)  # inlined per map (one map per site)
    prog_types: tuple[str, ...] = ("raw_tp", "socket_filter")
    writes_map: bool = False  # refused on a BPF_F_RDONLY_PROG map (checked right after the map argument)
    # bpf_tail_call: a program of several subprograms needs jit_requested (bpf_allow_tail_call_in_subprogs)
    subprogs_need_jit: bool = False
    # bpf_snprintf's check_bpf_snprintf_call: (format string register, data length register)
    printf_format: tuple[int, int] | None = None


HELPER_PROTOS: dict[int, HelperProto] = {p.func_id: p for p in (
    HelperProto(func_id=BPF_FUNC_map_lookup_elem, name="bpf_map_lookup_elem", args=("map_ptr", "map_key"),
                ret="map_value_or_null", runtime="_helper_lookup",
                inline_by_map_type={BPF_MAP_TYPE_ARRAY: Inline(insns=7),
                                    BPF_MAP_TYPE_PERCPU_ARRAY: Inline(insns=9, percpu_insn=True)}),
    HelperProto(func_id=BPF_FUNC_map_update_elem, name="bpf_map_update_elem",
                args=("map_ptr", "map_key", "map_value", "scalar"), ret_range=(-MAX_ERRNO, 0),
                runtime="_helper_update", writes_map=True),
    # mov imm, per-CPU mov, 32-bit load
    HelperProto(func_id=BPF_FUNC_get_smp_processor_id, name="bpf_get_smp_processor_id", args=(), ret="cpu_id",
                runtime="_helper_smp_processor_id", inline=Inline(insns=3, percpu_insn=True)),
    HelperProto(func_id=BPF_FUNC_tail_call, name="bpf_tail_call", args=("ctx", "prog_array", "scalar"),
                runtime="_helper_tail_call", subprogs_need_jit=True),
    HelperProto(func_id=BPF_FUNC_snprintf, name="bpf_snprintf",
                args=("out_mem_or_null", "const_size", "const_str", "mem_or_null", "const_size"),
                ret_range=(-MAX_ERRNO, S32_MAX), runtime="_helper_snprintf", printf_format=(3, 5)),
    HelperProto(func_id=BPF_FUNC_strncmp, name="bpf_strncmp", args=("mem", "const_size", "const_str"),
                ret_range=(S32_MIN, S32_MAX), runtime="_helper_strncmp"),
)}
