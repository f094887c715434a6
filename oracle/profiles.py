"""Profiles as data: one row per libbpf behaviour and per kernel behaviour (spec §1-§3).

The oracle reads these tables; it never branches on a profile's name. A profile a user names on the command line
is a (libbpf, kernel) pair. Confidence marks follow the spec: [V] primary source, [S] author's tree,
[D] deduced from source, [I] inferred.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

BPF_F_MMAPABLE = 0x400
BPF_F_RDONLY_PROG = 0x80
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
}


@dataclass(frozen=True)
class Profile:
    name: str
    libbpf: LibbpfAxis
    kernel: KernelAxis


PROFILES = {
    "merged": Profile("merged", LIBBPF["merged"], KERNEL["patched"]),
    "v1": Profile("v1", LIBBPF["v1"], KERNEL["patched-v1"]),
    "unpatched": Profile("unpatched", LIBBPF["old"], KERNEL["unpatched"]),
    "old-patched-kernel": Profile("old-patched-kernel", LIBBPF["old"], KERNEL["patched"]),
    "merged-unpatched-kernel": Profile("merged-unpatched-kernel", LIBBPF["merged"], KERNEL["unpatched"]),
    "raw-unpatched": Profile("raw-unpatched", LIBBPF["raw"], KERNEL["unpatched"]),
    "raw-patched": Profile("raw-patched", LIBBPF["raw"], KERNEL["patched"]),
}


# Kernel facts orthogonal to the feature, probed and appended to a profile's name: "unpatched+noext".
KERNEL_MODIFIERS: dict[str, dict[str, bool]] = {
    "noext": {"ext_programs": False},
}


class UnknownProfile(ValueError):
    pass


def profile(name: str) -> Profile:
    base, *modifiers = name.split("+")
    try:
        found = PROFILES[base]
        changes = {k: v for m in modifiers for k, v in KERNEL_MODIFIERS[m].items()}
    except KeyError:
        raise UnknownProfile(f"unknown profile {name!r} (known: {', '.join(PROFILES)}, each optionally with "
                             f"{', '.join('+' + m for m in KERNEL_MODIFIERS)})") from None
    if not changes:
        return found
    return Profile(name, found.libbpf, replace(found.kernel, name=f"{found.kernel.name}+{'+'.join(modifiers)}",
                                               **changes))
