"""Predict the verifier's verdict on an instruction-level case, per kernel profile, and what an accepted case
leaves in the map after runs. The checks run in the kernel's order: map creation, ld_imm64 resolution
(direct value access), then the instructions in program order (fall-through explored first)."""

from __future__ import annotations

from dataclasses import dataclass

from generators.asm import VerifierCase, assemble, branch_load_offset
from generators.ctype import round_up
from oracle.profiles import E2BIG, EACCES, EINVAL, PERCPU_VALUE_LIMIT, KernelAxis


@dataclass(frozen=True)
class Verdict:
    verdict: str  # "accepted" | "rejected" | "not_loaded"
    errno: int
    message_class: str | None = None
    message: str | None = None
    xlated_insns: int | None = None


def _reject(errno: int, cls: str, message: str | None) -> Verdict:
    return Verdict("rejected", errno, cls, message)


def predict_case(case: VerifierCase, kernel: KernelAxis) -> Verdict:
    shape = case.map
    size = shape.value_size
    percpu = shape.type == "percpu_array"
    if percpu and round_up(size, 8) > PERCPU_VALUE_LIMIT:
        return Verdict("not_loaded", E2BIG, "e2big", None)

    # ld_imm64 resolution: map_direct_value_addr of the map type
    pointer = f"invalid access to map value pointer, value_size={size} off={case.offset}"
    if percpu and not kernel.percpu_direct_value:
        return _reject(EINVAL, "no_direct_value_access", kernel.no_direct_value_message)
    checks = kernel.percpu_check_order if percpu else ("max_entries", "offset")
    unsupported = kernel.percpu_unsupported_errno if percpu else kernel.array_unsupported_errno
    for check in checks:
        if check == "jit" and not kernel.percpu_insn_jit:
            return _reject(unsupported, "direct_value_unsupported", pointer)
        if check == "max_entries" and shape.max_entries != 1:
            return _reject(unsupported, "direct_value_unsupported", pointer)
        if check == "offset" and case.offset >= size:
            return _reject(EINVAL, "offset_out_of_range", pointer)

    def access(off: int, n: int, write: bool) -> Verdict | None:
        at = case.offset + off
        where = f"value_size={size} off={at} size={n}"
        if write and shape.rdonly:
            return _reject(EACCES, "write_into_rdonly", f"write into map forbidden, {where}")
        if at < 0 or at + n > size:
            return _reject(EACCES, "map_value_oob", f"invalid access to map value, {where}")
        return None

    steps = [(a.off, a.size, a.write) for a in case.accesses]
    folded = False
    if case.store_cpu is not None:
        steps.append((case.store_cpu, 4, True))
    if case.branch_oob:
        steps.append((0, 1, False))
        # read-only, frozen maps are folded, except per-CPU ones [S]: then the fall-through load is explored
        folded = shape.rdonly and not (percpu and kernel.no_percpu_folding)
        if not folded:
            steps.append((branch_load_offset(case), 1, False))
    for off, n, write in steps:
        bad = access(off, n, write)
        if bad:
            return bad
    if case.const_str:
        if percpu and kernel.const_str_percpu_first:
            return _reject(EACCES, "const_str_percpu", kernel.const_str_percpu_message.format(reg=3))
        if not shape.rdonly:
            return _reject(EACCES, "const_str_not_rdonly", "R3 does not point to a readonly map'")
        if percpu:
            return _reject(EINVAL, "const_str_percpu", kernel.const_str_percpu_message.format(reg=3))
    if percpu and kernel.percpu_insn_jit and not kernel.jit_enabled:
        # the rewrite below marks the program jit_required; with the JIT off it is refused after verification
        return _reject(EINVAL, "jit_required", kernel.jit_required_message)
    insns = len(assemble(case, 0))
    if percpu and kernel.percpu_insn_jit:
        insns += 1  # BPF_MOV64_PERCPU_REG after the ld_imm64
    if folded:
        insns -= 2  # the jump, hard-wired by the folded read, and the dead load are removed [measured]
    if case.store_cpu is not None and kernel.percpu_insn_jit and kernel.jit_enabled:
        insns += 2  # bpf_get_smp_processor_id inlined as three per-CPU instructions, if jit_requested [measured]
    return Verdict("accepted", 0, None, None, insns)


def predict_contents(case: VerifierCase, verdict: Verdict, possible_cpus: int,
                     runs: list[tuple[int, int]]) -> tuple[list[str] | None, list[str] | None]:
    """(before, after) hex slots: zero images; each run on CPU c performs the case's stores (the constant 0x5a
    at each write access, then c at the store_cpu offset) in its own slot, or the one shared slot."""
    if verdict.verdict == "not_loaded":
        return None, None
    size = case.map.value_size
    percpu = case.map.type == "percpu_array"
    slots = [bytearray(size) for _ in range(possible_cpus if percpu else 1)]
    before = [s.hex() for s in slots]
    if verdict.verdict == "accepted":
        for cpu, count in runs:
            if not count:
                continue
            slot = slots[cpu if percpu else 0]
            for acc in case.accesses:
                if acc.write:
                    at = case.offset + acc.off
                    slot[at:at + acc.size] = (0x5A).to_bytes(acc.size, "little")
            if case.store_cpu is not None:
                at = case.offset + case.store_cpu
                slot[at:at + 4] = cpu.to_bytes(4, "little")
    return before, [s.hex() for s in slots]
