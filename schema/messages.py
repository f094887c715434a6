"""The message taxonomy: every loader or verifier refusal is normalised to one class, so predictions and
observations compare by class and errno while the raw text stays in `message`.

Each class lists the texts that mean it, per profile where revisions word it differently; the errno decides
between classes that share a text (map_direct_value_addr prints one line for EOPNOTSUPP and EINVAL).
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterable

CLASSES: dict[str, str] = {
    "bad_map_relo": "old libbpf: a relocation against a section it skipped (open fails)",
    "map_not_created": "merged libbpf: the program references a map whose autocreate was cleared",
    "invalid_map_fd": "the ld_imm64 names something that is not a map",
    "no_direct_value_access": "kernel without the feature: no map_direct_value_addr for PERCPU_ARRAY",
    "direct_value_unsupported": "map_direct_value_addr: max_entries != 1 or no JIT per-CPU support (EOPNOTSUPP)",
    "offset_out_of_range": "map_direct_value_addr: the ld_imm64 offset is >= value_size (EINVAL)",
    "map_value_oob": "a load or store outside [0, value_size)",
    "write_into_rdonly": "a store into a BPF_F_RDONLY_PROG map",
    "const_str_percpu": "a per-CPU map value used as a const string / format",
    "const_str_not_rdonly": "a const string in a map that is not read-only and frozen",
    "freplace_static_target": "an extension program whose target function is not global (EINVAL)",
    "prog_type_refused": "the kernel refuses the program type itself, before verification (EPERM, empty log)",
    "jit_required": "the JIT is off and the program needs it: per-CPU data (after verification), an extension (EINVAL)",
    "tail_call_with_subprogs": "the JIT is off: a program with bpf-to-bpf calls may not tail-call (EINVAL, verifier)",
    "e2big": "map creation refused: round_up(value_size, 8) above the per-CPU allocator's 32 KiB",
    "sim_unsupported": "outside what the simulator models (never a guess)",
    "runtime_fault": "the simulator's interpreter faulted at run time",
    "verifier_other": "any other verifier refusal",
    "other": "a refusal the taxonomy does not name",
}

# (pattern, errno or None, class); searched from the end of a log, first hit wins, because the verifier prints
# the reason last with register dumps before it.
PATTERNS: tuple[tuple[re.Pattern[str], int | None, str], ...] = tuple((re.compile(p), e, c) for p, e, c in (
    (r"bad map relo against", None, "bad_map_relo"),
    (r"BPF map '[^']*' is referenced but wasn't created", None, "map_not_created"),
    (r"fd \d+ is not pointing to valid bpf_map", None, "invalid_map_fd"),
    (r"no direct value access support for this map type", None, "no_direct_value_access"),
    (r"invalid access to map value pointer", errno.EOPNOTSUPP, "direct_value_unsupported"),
    (r"invalid access to map value pointer", 524, "direct_value_unsupported"),  # ENOTSUPP, kernel-internal
    (r"invalid access to map value pointer", errno.EINVAL, "offset_out_of_range"),
    (r"invalid access to map value, value_size", None, "map_value_oob"),
    (r"write into map forbidden", None, "write_into_rdonly"),
    (r"points to percpu_array map which cannot be used as const string", None, "const_str_percpu"),
    (r"only array map supports (direct string value access|snprintf)", None, "const_str_percpu"),
    (r"does not point to a readonly map", None, "const_str_not_rdonly"),
    # a static target the verifier marked unreliable; any other static target fails the prototype check
    # (btf_check_func_type_match), which names the function [V: 6.1 guest]
    (r"Cannot replace static functions", None, "freplace_static_target"),
    (r"\(\) is not a global function", None, "freplace_static_target"),
    (r"program requires BPF JIT compiler but it is not available", None, "jit_required"),
    (r"Extension programs should be JITed", None, "jit_required"),
    (r"mixing of tail_calls and bpf-to-bpf calls is not supported", None, "tail_call_with_subprogs"),
))


def classify(lines: Iterable[str], err: int | None = None) -> str:
    lines = list(lines)
    for line in reversed(lines):
        for pattern, want, cls in PATTERNS:
            if (want is None or want == err) and pattern.search(line):
                return cls
    if err == errno.EPERM:  # as root, only a refused program type answers EPERM to BPF_PROG_LOAD
        return "prog_type_refused"
    return "other"
