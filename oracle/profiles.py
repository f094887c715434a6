"""Profiles as data: one row per libbpf behaviour and per kernel behaviour (spec §1-§3).

The oracle reads these tables; it never branches on a profile's name. A profile a user names on the command line
is a (libbpf, kernel) pair. Confidence marks follow the spec: [V] primary source, [S] author's tree,
[D] deduced from source, [I] inferred.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from schema import profiles as registry
from schema.profiles import UnknownProfile
from toolchain.uapi import BPF_F_MMAPABLE, BPF_F_RDONLY_PROG  # noqa: E402, F401  (re-exported to the oracle)

PERCPU_VALUE_LIMIT = 32 * 1024  # pcpu allocator unit: round_up(value_size, 8) above this is E2BIG [V]
LIBBPF_ERRNO__RELOC = 4005
EPERM, EINVAL, E2BIG, EOPNOTSUPP, EACCES = 1, 22, 7, 95, 13
ENOTSUPP = 524  # kernel-internal "not supported": array_map_direct_value_addr leaks it to user space [measured]


@dataclass(frozen=True)
class LibbpfAxis:
    name: str
    version: str | None
    # Which section names become a per-CPU map; () for a libbpf that does not know the feature.
    percpu_exact: tuple[str, ...]
    percpu_prefixes: tuple[str, ...]
    # value_size of a per-CPU map: the section size rounded up to this (1 = exact).
    percpu_value_align: int
    # bpf_map__name and kernel name of a per-CPU map: "section" (bare), "section15" (cut to 15), "internal"
    # (libbpf's internal_map_name: up to 8 chars of the object name + section).
    percpu_name: str
    percpu_kernel_name: str
    # Clears autocreate on kernels without the feature (the FEAT_PERCPU_DATA probe) [S].
    probes_feature: bool
    # map_is_mmapable: a data map whose variables are all static gets no BPF_F_MMAPABLE (no skeleton access)
    # [V, measured with 1.1.2: a .bss holding only static variables has flags 0]
    static_only_not_mmapable: bool = True
    # A failed object load closes every map it created (libbpf); the suite's raw loader keeps them for reading.
    keeps_maps_on_failure: bool = False
    # What an unknown .percpu section does to a program that references it.
    unknown_section_message: str = "libbpf: prog '{prog}': bad map relo against '{symbol}' in section '{section}'"


@dataclass(frozen=True)
class KernelAxis:
    name: str
    percpu_direct_value: bool  # direct value access on a 1-entry PERCPU_ARRAY
    percpu_insn_jit: bool  # the JIT emits per-CPU instructions (x86-64, arm64)
    bpf_f_cpu: bool
    no_direct_value_message: str = "no direct value access support for this map type"
    # percpu_array_map_direct_value_addr's checks, in order (merged: JIT first; v1-v3: max_entries first) [V]
    percpu_check_order: tuple[str, ...] = ("jit", "max_entries", "offset")
    # errno of map_direct_value_addr refusing a map shape: ARRAY with max_entries != 1 returns ENOTSUPP (524)
    # [measured on 6.18]; the per-CPU version EOPNOTSUPP [V: patch text, not run]
    array_unsupported_errno: int = ENOTSUPP
    percpu_unsupported_errno: int = EOPNOTSUPP
    # check_mem_access never folds a read-only per-CPU value into a constant [S]
    no_percpu_folding: bool = True
    # const-string argument pointing into a per-CPU map: merged rejects it before the read-only check [V]
    const_str_percpu_first: bool = True
    const_str_percpu_message: str = "R{reg} points to percpu_array map which cannot be used as const string"
    # BPF_PROG_TYPE_EXT loads: some kernels refuse every one with EPERM and an empty log, before verification
    # [measured: 6.18.44-fc refuses EXT, fentry/fexit and LSM programs alike; a 6.1 guest loads them]
    ext_programs: bool = True
    # bpf_jit_enable != 0 (jit_requested). Off, the ld_imm64 rewrite still marks the program jit_required and
    # bpf_fixup_call_args refuses it after verification; helpers and lookups are not inlined [V: 7.3.4]
    jit_enabled: bool = True
    jit_required_message: str = "program requires BPF JIT compiler but it is not available"
    # a tail call in a program with bpf-to-bpf calls needs jit_requested (bpf_allow_tail_call_in_subprogs,
    # checked at the bpf_tail_call site) [V: 7.3.4 verifier.c; measured in a 7.3.4 guest with the JIT off]
    tail_calls_with_subprogs: bool = True
    tail_call_subprogs_message: str = "mixing of tail_calls and bpf-to-bpf calls is not supported"
    # extension programs get jit_requested, which bpf_check_attach_target demands [V]
    ext_jit: bool = True
    ext_jit_message: str = "Extension programs should be JITed"

    @property
    def percpu_data_probe(self) -> bool:
        """libbpf's FEAT_PERCPU_DATA probe (a socket filter reading a 1-entry PERCPU_ARRAY directly) loads."""
        return self.percpu_direct_value and self.percpu_insn_jit and self.jit_enabled


LIBBPF = {
    # merged revision: `.percpu` exactly or `.percpu.` prefix, after the .data/.rodata rules; bare names [V]
    "merged": LibbpfAxis("merged", None, (".percpu",), (".percpu.",), 1, "section", "section15", True),
    # the seed revision: any name with the `.percpu` prefix (so `.percpuX` too), object-prefixed name for the
    # plain section, value_size exactly the section size [V]
    "v1": LibbpfAxis("v1", None, (), (".percpu",), 1, "internal", "internal", False),
    # released libbpf (<= 1.7; Debian ships 1.1.2): skips the section, then fails the relocation [V, measured]
    "old": LibbpfAxis("old", "1.1.2", (), (), 1, "internal", "internal", False),
    # the suite's own raw loader: merged semantics, no feature probe (creates the map whatever the kernel)
    "raw": LibbpfAxis("raw", None, (".percpu",), (".percpu.",), 1, "section", "section15", False,
                      keeps_maps_on_failure=True),
}

KERNEL = {
    "patched": KernelAxis("patched", True, True, True),
    # v1-v3: max_entries before JIT; the const-string check comes after the read-only one [V]
    "patched-v1": KernelAxis("patched-v1", True, True, True, percpu_check_order=("max_entries", "offset", "jit"),
                             const_str_percpu_first=False,
                             const_str_percpu_message="only array map supports direct string value access"),
    "unpatched": KernelAxis("unpatched", False, True, False),
    # merged kernel on an arch whose JIT has no per-CPU instruction: direct per-CPU access is EOPNOTSUPP [V]
    "patched-nojit": KernelAxis("patched-nojit", True, False, True),
}


@dataclass(frozen=True)
class Profile:
    name: str
    libbpf: LibbpfAxis
    kernel: KernelAxis


# one Profile per registry row: the names come from schema.profiles, the behaviour from the axes above
PROFILES = {row.name: Profile(row.name, LIBBPF[row.libbpf_axis], KERNEL[row.kernel_axis])
            for row in registry.PROFILES.values()}


# What each registry modifier changes in a kernel axis.
KERNEL_MODIFIERS: dict[str, dict[str, bool]] = {
    "noext": {"ext_programs": False},
    "jitoff": {"jit_enabled": False, "ext_jit": False, "tail_calls_with_subprogs": False},
    "noextjit": {"ext_jit": False, "tail_calls_with_subprogs": False},
}

__all__ = ["KERNEL", "KERNEL_MODIFIERS", "LIBBPF", "PROFILES", "KernelAxis", "LibbpfAxis", "Profile",
           "UnknownProfile", "kernel_axis", "profile"]


def _modified(kernel: KernelAxis, modifiers: tuple[str, ...]) -> KernelAxis:
    if not modifiers:
        return kernel
    # Any: each key is a different KernelAxis field, which replace() checks at run time
    changes: dict[str, Any] = {k: v for m in modifiers for k, v in KERNEL_MODIFIERS[m].items()}
    return replace(kernel, name=registry.join_modifiers(kernel.name, modifiers), **changes)


def kernel_axis(name: str) -> KernelAxis:
    """A kernel axis by name, modifiers included: "patched+jitoff"."""
    base, modifiers = registry.split_modifiers(name)
    if base not in KERNEL:
        raise UnknownProfile(f"unknown kernel axis {name!r} (known: {', '.join(KERNEL)})")
    return _modified(KERNEL[base], modifiers)


def profile(name: str) -> Profile:
    row, modifiers = registry.lookup(name)
    found = PROFILES[row.name]
    if not modifiers:
        return found
    return Profile(name, found.libbpf, _modified(found.kernel, modifiers))
