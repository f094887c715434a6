"""A catalogue of simulator faults: each one a small, named regression of the simulated libbpf or kernel that
mirrors a bug raised in review of the series (or a plausible regression), applied through a
`pytest.MonkeyPatch` so the simulator's default behaviour is never edited.

A fault's record says which property is expected to catch it first and which layer that property blames; the
test in `test_catalogue.py` holds every fault to that. Patch points are the narrowest that reproduce the bug:
a loader-profile or kernel-profile row where the behaviour is already data, otherwise one wrapped function.
Names imported by value into another module (`prepare` in `backends.sim.observe`) are patched where they are
looked up. The simulator's sources are not edited: every fault here reaches its behaviour by patching.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

import pytest

import backends.objload as objload
import backends.sim.kernel as sim_kernel
import backends.sim.observe as sim_observe
import backends.sim.verifier as sim_verifier
from backends.objload import LOADER_PROFILES, LoaderProfile, PreparedObject
from backends.sim.kernel import BASE_MESSAGES, KERNEL_PROFILES, SimKernel
from generators.asm import VerifierCase
from generators.model import Access, Call, ProgramModel, StoreCpu
from generators.strategies import PERCPU_SECTIONS
from toolchain.elf import ObjectFacts
from toolchain.uapi import (
    BPF_ANY,
    BPF_F_ALL_CPUS,
    BPF_F_CPU,
    BPF_F_MMAPABLE,
    BPF_F_RDONLY_PROG,
    BPF_MAP_TYPE_PERCPU_ARRAY,
)

ROOT = Path(__file__).resolve().parents[2]

# The properties, in the order the catalogue test tries them: loader facts before verdicts before runs, then the
# instruction-level verifier cases (rules C programs do not reach), then set_initial_value (it compares every
# layer, so it would otherwise take the blame for faults the focused properties name more precisely).
PROPERTIES = ("maps", "verdicts", "runtime", "lowered_twin", "verifier", "initial_value", "sets")


@dataclass(frozen=True)
class Fault:
    """One regression: `apply` installs it on a MonkeyPatch; `profile` and the CPU sets build the SimBackend."""

    name: str
    doc: str
    apply: Callable[[pytest.MonkeyPatch], None]
    profile: str = "merged"
    _: KW_ONLY
    caught_by: str  # the first property in PROPERTIES order that must fail
    # the layer that property's failure blames; a tuple where the shrunk example decides (shrinking is time-capped)
    layer: str | tuple[str, ...]
    possible_cpus: int = 4
    online_cpus: tuple[int, ...] = (0, 1, 2, 3)
    # A filter on the `caught_by` property's examples, for a fault whose trigger the ci budget reaches only by
    # luck; `steer_note` says why. Every other property runs unsteered.
    steer: Callable[[ProgramModel | VerifierCase], bool] | None = None
    steer_note: str = ""


# -- loader (backends.objload) -------------------------------------------------------------------------------


def _replace_loader(mp: pytest.MonkeyPatch, **changes: object) -> None:
    """The merged loader profile with some fields changed: behaviour that is already data stays data."""
    mp.setitem(LOADER_PROFILES, "merged", dataclasses.replace(LOADER_PROFILES["merged"], **changes))


def _wrap_prepare(mp: pytest.MonkeyPatch, edit: Callable[[PreparedObject], None]) -> None:
    """Edit what the simulated libbpf prepared before any map is created."""
    prepare = objload.prepare

    def faulty(facts: ObjectFacts, profile: LoaderProfile) -> PreparedObject:
        prepared = prepare(facts, profile)
        edit(prepared)
        return prepared

    mp.setattr(sim_observe, "prepare", faulty)


def _wrap_classify(mp: pytest.MonkeyPatch, reclassify: Callable[[str, str | None], str | None]) -> None:
    classify = objload._classify

    def faulty(sec: objload.Section, profile: LoaderProfile) -> str | None:
        return reclassify(sec.name, classify(sec, profile))

    mp.setattr(objload, "_classify", faulty)


def image_only_cpu0(mp: pytest.MonkeyPatch) -> None:
    # the BPF_F_ALL_CPUS image push degraded to a BPF_F_CPU write of CPU 0: the others keep the zeroed value
    update = SimKernel.map_update

    def map_update(self: SimKernel, fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        if flags & BPF_F_ALL_CPUS:
            flags = (flags & ~BPF_F_ALL_CPUS) | BPF_F_CPU  # CPU 0 in the upper 32 bits
        update(self, fd, key, value, flags)

    mp.setattr(SimKernel, "map_update", map_update)


def image_only_online(mp: pytest.MonkeyPatch) -> None:
    # for_each_online_cpu where for_each_possible_cpu was meant: a CPU that comes online later starts zeroed
    update = SimKernel.map_update

    def map_update(self: SimKernel, fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        if not flags & BPF_F_ALL_CPUS:
            update(self, fd, key, value, flags)
            return
        for cpu in self.online:
            update(self, fd, key, value, (flags & ~BPF_F_ALL_CPUS) | BPF_F_CPU | cpu << 32)

    mp.setattr(SimKernel, "map_update", map_update)


def stride_not_rounded(mp: pytest.MonkeyPatch) -> None:
    # bpf_percpu_array_copy/update stepping through the user buffer by value_size: the buffer keeps its
    # round_up(value_size, 8) per CPU size, but CPU c's bytes sit at c * value_size
    lookup, update = SimKernel.map_lookup, SimKernel.map_update

    def packed(self: SimKernel, fd: int, flags: int) -> tuple[int, int] | None:
        m = self._map(fd)
        if m.type != BPF_MAP_TYPE_PERCPU_ARRAY or flags & (BPF_F_CPU | BPF_F_ALL_CPUS):
            return None
        return m.value_size, m.stride

    def map_lookup(self: SimKernel, fd: int, key: bytes, flags: int = 0) -> bytes:
        raw = lookup(self, fd, key, flags)
        sizes = packed(self, fd, flags)
        if sizes is None:
            return raw
        size, stride = sizes
        out = b"".join(raw[c * stride:c * stride + size] for c in range(self.possible_cpus))
        return out.ljust(len(raw), b"\0")

    def map_update(self: SimKernel, fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        sizes = packed(self, fd, flags)
        if sizes is not None:
            size, stride = sizes
            value = b"".join(value[c * size:(c + 1) * size].ljust(stride, b"\0")
                             for c in range(self.possible_cpus))
        update(self, fd, key, value, flags)

    mp.setattr(SimKernel, "map_lookup", map_lookup)
    mp.setattr(SimKernel, "map_update", map_update)


def kernel_name_truncated_wrong(mp: pytest.MonkeyPatch) -> None:
    # an off-by-one against BPF_OBJ_NAME_LEN: 14 characters kept where the kernel allows 15
    names = objload._internal_names

    def faulty(kind: str, section: str, obj_name: str, profile: LoaderProfile) -> tuple[str, str]:
        name, kernel = names(kind, section, obj_name, profile)
        return name, kernel[:14] if kind == objload._PERCPU else kernel

    mp.setattr(objload, "_internal_names", faulty)


def kernel_name_obj_prefix(mp: pytest.MonkeyPatch) -> None:
    # the pre-merge naming: a per-CPU map named by internal_map_name (`gen.percpu`) like the other data maps
    _replace_loader(mp, percpu_kernel_name="internal")


def data_dot_dot_percpu_is_percpu(mp: pytest.MonkeyPatch) -> None:
    # `.data..percpu` (the RFC's section name) taken for a per-CPU section instead of ordinary `.data.*`
    _wrap_classify(mp, lambda name, kind: objload._PERCPU if name == ".data..percpu" and kind else kind)


def percpu_is_data(mp: pytest.MonkeyPatch) -> None:
    # `.percpu` falling into the `.data` rule: one shared mmapable ARRAY instead of a per-CPU map
    _wrap_classify(mp, lambda name, kind: objload._DATA if name == ".percpu" and kind == objload._PERCPU
                   else kind)


def value_size_rounded(mp: pytest.MonkeyPatch) -> None:
    # v2/v3 behaviour: value_size rounded up to 8, so the map (and its DATASEC) is bigger than the section
    _replace_loader(mp, percpu_value_size_align=8)


def percpu_prefix_unrecognised(mp: pytest.MonkeyPatch) -> None:
    # only the exact `.percpu` matched: a `.percpu.<name>` section is skipped as unrecognised data
    _replace_loader(mp, percpu_prefixes=())


def padding_not_zeroed(mp: pytest.MonkeyPatch) -> None:
    # the image built in an uncleared buffer: bytes between and after the variables are not zero
    def edit(prepared: PreparedObject) -> None:
        for m in prepared.maps:
            if not m.percpu_data or m.initial is None:
                continue
            image = bytearray(b"\xaa" * len(m.initial))
            for _, section, off, size in prepared.variables:
                if section == m.section:
                    image[off:off + size] = m.initial[off:off + size]
            m.initial = bytes(image)

    _wrap_prepare(mp, edit)


def bss_not_zeroed(mp: pytest.MonkeyPatch) -> None:
    # a NOBITS section's image taken from uninitialised memory instead of zeros
    def edit(prepared: PreparedObject) -> None:
        for m in prepared.maps:
            if m.section is not None and objload._is_named(m.section, objload.BSS_SEC) and m.initial is not None:
                m.initial = b"\xa5" * len(m.initial)

    _wrap_prepare(mp, edit)


def percpu_mmapable(mp: pytest.MonkeyPatch) -> None:
    # map_is_mmapable() not taught about per-CPU maps: BPF_F_MMAPABLE on a PERCPU_ARRAY, which the kernel refuses
    def edit(prepared: PreparedObject) -> None:
        for m in prepared.maps:
            if m.percpu_data:
                m.flags |= BPF_F_MMAPABLE

    _wrap_prepare(mp, edit)


def set_initial_value_ignored(mp: pytest.MonkeyPatch) -> None:
    # bpf_map__set_initial_value accepted but the load still pushes the section's own bytes; writes to a
    # `.maps` map after creation (what the lowered twin uses) are a different path and keep working
    images = sim_observe._Load._images

    def faulty(self: sim_observe._Load, initial_values: dict[str, bytes]) -> dict[int, bytes]:
        def internal(name: str) -> bool:
            try:
                return self.prepared.map_by_name(name).internal
            except KeyError:
                return False  # unknown names keep their error

        return images(self, {k: v for k, v in initial_values.items() if not internal(k)})

    mp.setattr(sim_observe._Load, "_images", faulty)


# -- kernel (backends.sim.kernel, backends.sim.verifier) --------------------------------------------------------


def _replace_kernel(mp: pytest.MonkeyPatch, **changes: object) -> None:
    """The patched kernel profile with some fields changed."""
    mp.setitem(KERNEL_PROFILES, "patched", dataclasses.replace(KERNEL_PROFILES["patched"], **changes))


def percpu_folded(mp: pytest.MonkeyPatch) -> None:
    # bpf_map_direct_read allowed on a per-CPU value: the verifier treats CPU 0's bytes as constants and
    # prunes a branch another CPU could take
    access = sim_verifier.Verifier.map_access

    def faulty(self: sim_verifier.Verifier, pc: int, regno: int, ptr: sim_verifier.Ptr, off: int, size: int, *,
               write: bool, signed: bool = False) -> sim_verifier.Value:
        value = access(self, pc, regno, ptr, off, size, write=write, signed=signed)
        m = self.maps[ptr.map_fd]
        if write or m.percpu is None or not (m.flags & BPF_F_RDONLY_PROG and m.frozen):
            return value
        total = ptr.off + off
        raw = int.from_bytes(m.percpu[0][total:total + size], "little")
        if signed and raw >> (8 * size - 1):
            raw -= 1 << (8 * size)
        return sim_verifier.const(raw)

    mp.setattr(sim_verifier.Verifier, "map_access", faulty)


def rewrite_missing_r6_r9(mp: pytest.MonkeyPatch) -> None:
    # the per-CPU move not emitted for a callee-saved destination (the x86 JIT's extended registers)
    rebuild = sim_verifier.rebuild

    def faulty(insns: list, removed: object = (), insert_after: dict | None = None) -> tuple[list, list[int]]:
        if insert_after:
            insert_after = {pc: i for pc, i in insert_after.items() if not (i.is_percpu_mov and 6 <= i.dst <= 9)}
        return rebuild(insns, removed, insert_after)

    mp.setattr(sim_verifier, "rebuild", faulty)


def rewrite_missing(mp: pytest.MonkeyPatch) -> None:
    # direct per-CPU access accepted but no per-CPU move at all: the program dereferences the per-CPU base
    _replace_kernel(mp, percpu_rewrite=False)


def percpu_max_entries_unchecked(mp: pytest.MonkeyPatch) -> None:
    # map_direct_value_addr without the max_entries == 1 check: only key 0's slot is reachable, silently
    _replace_kernel(mp, percpu_direct_value_checks=("offset", "jit"))


def const_str_percpu_unchecked(mp: pytest.MonkeyPatch) -> None:
    # check_reg_const_str without the per-CPU refusal: a later check (read-only, map type) rejects instead;
    # the simulated verifier makes that refusal only for a profile whose message table has its text
    _replace_kernel(mp, messages=dict(BASE_MESSAGES))


def percpu_limit_inclusive(mp: pytest.MonkeyPatch) -> None:
    # `>=` for `>` against PCPU_MIN_UNIT_SIZE: a per-CPU value of exactly 32 KiB refused with E2BIG
    mp.setattr(sim_kernel, "PCPU_MIN_UNIT_SIZE", sim_kernel.PCPU_MIN_UNIT_SIZE - 8)


def cpu_id_zero(mp: pytest.MonkeyPatch) -> None:
    # bpf_get_smp_processor_id reading a CPU number that is never set
    init = SimKernel.__init__

    def faulty(self: SimKernel, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)
        self.helpers[sim_verifier.BPF_FUNC_get_smp_processor_id] = lambda m: 0

    mp.setattr(SimKernel, "__init__", faulty)


def lookup_ignores_cpu(mp: pytest.MonkeyPatch) -> None:
    # the PERCPU_ARRAY lookup returning per_cpu_ptr(pptr, 0) instead of this_cpu_ptr(pptr)
    lookup = SimKernel._helper_lookup

    def faulty(self: SimKernel, m: sim_kernel.Machine) -> int:
        addr = lookup(self, m)
        if addr and self._helper_map(m, 1).percpu is not None:
            addr += self.percpu_offset(0) - self.percpu_offset(m.cpu)
        return addr

    mp.setattr(SimKernel, "_helper_lookup", faulty)


def percpu_move_uses_cpu0(mp: pytest.MonkeyPatch) -> None:
    # the JIT's per-CPU move adding CPU 0's offset: direct access shares one copy, lookups stay correct
    run = sim_kernel.run
    cpu0 = SimKernel(possible_cpus=1).percpu_offset(0)  # the same in every kernel

    def faulty(program: list, **kwargs: object) -> int:
        return run(program, **{**kwargs, "percpu_offset": cpu0})

    mp.setattr(sim_kernel, "run", faulty)


# -- steering predicates ---------------------------------------------------------------------------------------


def uses_section(section: str) -> Callable[[ProgramModel], bool]:
    def steer(model: ProgramModel) -> bool:
        return any(v.section == section for v in model.variables)

    return steer


def may_pad_a_percpu_section(model: ProgramModel) -> bool:
    """Two variables share a per-CPU section and one of them ends off the others' alignment (where it is placed
    first, the next variable starts after padding)."""
    by_section: dict[str, list] = {}
    for v in model.variables:
        if v.section in PERCPU_SECTIONS:
            by_section.setdefault(v.section, []).append(v.type)
    for types in by_section.values():
        align = max(t.align for t in types)
        if len(types) > 1 and any(t.size % align for t in types):
            return True
    return False


def percpu_live_across_a_call(model: ProgramModel) -> bool:
    """Some function touches a per-CPU variable and then calls (a helper or a subprogram): clang keeps such an
    address in a callee-saved register, r6-r9."""
    percpu = {v.name for v in model.variables if v.section in PERCPU_SECTIONS}
    for f in model.functions:
        touched = False
        for op in f.ops:
            if touched and isinstance(op, StoreCpu | Call):
                return True
            accesses = (getattr(op, "dst", None), getattr(op, "src", None))  # Branch and Call have neither
            touched = touched or any(isinstance(a, Access) and a.var in percpu for a in accesses)
    return False


def folds_a_percpu_read(case: VerifierCase) -> bool:
    return case.branch_oob and case.map.rdonly and case.map.type == "percpu_array"


def percpu_const_str(case: VerifierCase) -> bool:
    return case.const_str is not None and case.map.type == "percpu_array"


# -- the catalogue ---------------------------------------------------------------------------------------------

_FAULTS = [
    Fault("image_only_cpu0", "The per-CPU initial image is written to CPU 0 only; every other CPU starts zeroed.",
          image_only_cpu0, caught_by="maps", layer="loader"),
    Fault("image_only_online", "The image reaches online CPUs only; possible-but-offline CPUs stay zero. Needs "
          "possible > online to show.", image_only_online, caught_by="maps", layer="loader",
          online_cpus=(0, 1)),
    Fault("stride_not_rounded", "User-space per-CPU lookup/update lays CPU slots out at value_size instead of "
          "round_up(value_size, 8).", stride_not_rounded, caught_by="maps", layer="loader"),
    Fault("kernel_name_truncated_wrong", "The kernel-visible name of a `.percpu.*` map is cut to 14 characters "
          "instead of 15.", kernel_name_truncated_wrong, caught_by="maps", layer="loader",
          steer=uses_section(".percpu.looooooooong"),
          steer_note="only `.percpu.looooooooong` among the generated sections is longer than 14 characters; "
          "a derandomized run of 40 models can miss it"),
    Fault("kernel_name_obj_prefix", "A `.percpu` map's kernel name carries the object prefix (`gen.percpu`), as "
          "before the merge.", kernel_name_obj_prefix, caught_by="maps", layer="loader"),
    Fault("data_dot_dot_percpu_is_percpu", "`.data..percpu` is classified as a per-CPU section instead of "
          "ordinary data.", data_dot_dot_percpu_is_percpu, caught_by="maps", layer="loader",
          steer=uses_section(".data..percpu"),
          steer_note="one generated section in ten; the 40 derandomized models can all miss it (the lowered "
          "twin then catches it, blaming the runtime)"),
    Fault("percpu_is_data", "`.percpu` is classified as an ordinary `.data` map (shared ARRAY, mmapable).",
          percpu_is_data, caught_by="maps", layer="loader"),
    Fault("percpu_folded", "The verifier constant-folds reads of a read-only frozen PERCPU_ARRAY (CPU 0's "
          "bytes), pruning a branch with an out-of-bounds load.", percpu_folded, caught_by="verifier",
          layer="verifier", steer=folds_a_percpu_read,
          steer_note="only a read-only per-CPU map with the branch_oob shape shows folding, about one case in "
          "eight, and most of those are refused earlier; 400 cases miss it for some seeds"),
    # The two rewrite faults: the oracle predicts no xlated count for C programs, so the verdicts property cannot
    # see the missing instruction; a run through the unmapped per-CPU base can.
    Fault("rewrite_missing_r6_r9", "The BPF_MOV64_PERCPU_REG rewrite is skipped when the ld_imm64 destination "
          "is r6-r9.", rewrite_missing_r6_r9, caught_by="runtime", layer="runtime",
          steer=percpu_live_across_a_call,
          steer_note="clang uses r6-r9 for a per-CPU address only when it stays live across a call"),
    Fault("rewrite_missing", "No per-CPU move at all: direct per-CPU access is accepted but dereferences the "
          "unmapped per-CPU base.", rewrite_missing, caught_by="runtime", layer="runtime"),
    Fault("percpu_max_entries_unchecked", "Direct value access accepted on a PERCPU_ARRAY with max_entries 2 "
          "(the rewrite applied to max_entries > 1).", percpu_max_entries_unchecked, caught_by="verifier",
          layer="verifier"),
    Fault("const_str_percpu_unchecked", "The const-string refusal for per-CPU maps is missing; a later check "
          "rejects with another message class.", const_str_percpu_unchecked, caught_by="verifier",
          layer="verifier", steer=percpu_const_str,
          steer_note="most drawn cases are refused before the helper call (offset, shape, access checks); only "
          "a few per 400 reach the const-string check on a per-CPU map"),
    Fault("padding_not_zeroed", "Initial-image bytes not covered by any variable are 0xAA instead of zero.",
          padding_not_zeroed, caught_by="maps", layer="loader", steer=may_pad_a_percpu_section,
          steer_note="padding sits between variables of one section, of different alignments; most models "
          "have at most one per-CPU variable per section"),
    Fault("value_size_rounded", "Merged libbpf rounds the per-CPU value_size up to 8 (a pre-merge behaviour).",
          value_size_rounded, caught_by="maps", layer="loader"),
    Fault("percpu_prefix_unrecognised", "Only the exact `.percpu` is per-CPU; `.percpu.<name>` is skipped as "
          "an unrecognised section.", percpu_prefix_unrecognised, caught_by="maps",
          # the section's variables go unreported: their absence is the loader's, not clang's
          layer="loader"),
    Fault("percpu_mmapable", "BPF_F_MMAPABLE set on the per-CPU map, which map creation refuses.",
          percpu_mmapable, caught_by="maps", layer="loader"),
    Fault("percpu_limit_inclusive", "A per-CPU value of exactly 32 KiB is refused (>= for > against the "
          "allocator's unit).", percpu_limit_inclusive, caught_by="verifier", layer="loader"),
    Fault("cpu_id_zero", "bpf_get_smp_processor_id returns 0 on every CPU.", cpu_id_zero, caught_by="runtime",
          layer="runtime"),
    Fault("lookup_ignores_cpu", "bpf_map_lookup_elem on a PERCPU_ARRAY returns CPU 0's copy whatever CPU runs.",
          lookup_ignores_cpu, caught_by="lowered_twin", layer="runtime"),
    Fault("percpu_move_uses_cpu0", "The per-CPU move resolves to CPU 0's copy on every CPU (lookups stay "
          "right).", percpu_move_uses_cpu0, caught_by="runtime", layer="runtime"),
    Fault("bss_not_zeroed", "A `.bss` map starts with non-zero bytes.", bss_not_zeroed, caught_by="maps",
          layer="loader"),
]


def reuse_ignored(mp: pytest.MonkeyPatch) -> None:
    # bpf_map__reuse_fd accepted but forgotten at load: the object creates and fills a map of its own
    _replace_loader(mp, reuses_fd=False)


def freplace_not_linked(mp: pytest.MonkeyPatch) -> None:
    # the freplace link is made but the target's call is never redirected: the original subprogram still runs
    mp.setitem(KERNEL_PROFILES, "patched", dataclasses.replace(KERNEL_PROFILES["patched"], freplace=False))


_FAULTS += [
    # the second object's own image shows the fault after load (loader) unless shrinking reached images that
    # are equal anyway (zeros), where only the runs tell (runtime)
    Fault("reuse_ignored", "A reused map fd is ignored: the second object gets its own per-CPU map.",
          reuse_ignored, caught_by="sets", layer=("loader", "runtime")),
    Fault("freplace_not_linked", "An attached extension program never runs: its target keeps calling the "
          "original subprogram.", freplace_not_linked, caught_by="sets", layer="runtime"),
]

# the property this fault needs arrived with suites/test_initial_value.py; without it the fault is not listed
if (ROOT / "suites" / "test_initial_value.py").exists():
    _FAULTS.append(Fault("set_initial_value_ignored", "bpf_map__set_initial_value on an internal map is accepted "
                         "but the load pushes the section's own bytes.", set_initial_value_ignored,
                         caught_by="initial_value", layer="loader"))

FAULTS: dict[str, Fault] = {f.name: f for f in _FAULTS}
