"""Predict the x86-64 JIT's output for a per-CPU address load (verifier_percpu_addr's __jited check): an accepted
`rN = map_value(percpu map, off) ll` is rewritten with BPF_MOV64_PERCPU_REG(rN, rN), which the JIT emits as one
`add <x86 register of rN>, gs:[this_cpu_off]` into the same register, and the program holds no other one."""

from __future__ import annotations

from typing import Any

from generators.asm import PERCPU_ADDR_VALUE_SIZE, MapShape, VerifierCase
from oracle.profiles import KernelAxis
from oracle.verifier import predict_case

# The x86-64 JIT's register assignment for BPF r0-r9 (arch/x86/net/bpf_jit_comp.c, reg2hex): the oracle's own
# knowledge of where the JIT puts each register; the decoder reports x86 names only.
X86_REG_OF_BPF = ("rax", "rdi", "rsi", "rdx", "rcx", "r8", "rbx", "r13", "r14", "r15")


def predict_percpu_addr_jit(register: int, offset: int, kernel: KernelAxis,
                            value_size: int = PERCPU_ADDR_VALUE_SIZE) -> dict[str, Any]:
    """{"loaded", "errno", "jited_percpu_add_regs"} for the case backends.kernel.jited.observe_percpu_addr_jit
    loads; the verdict is the verifier oracle's."""
    v = predict_case(VerifierCase(MapShape("percpu_array", value_size), register, offset), kernel)
    if v.verdict != "accepted":
        return {"loaded": False, "errno": v.errno, "jited_percpu_add_regs": []}
    # accepted with the rewrite means the JIT ran (jit_required); without per-CPU JIT support nothing is added
    rewritten = kernel.percpu_insn_jit and kernel.jit_enabled
    return {"loaded": True, "errno": 0, "jited_percpu_add_regs": [X86_REG_OF_BPF[register]] if rewritten else []}
