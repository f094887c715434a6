"""Observe a compiled object on the simulator: the result-schema document a real backend would produce.

The loader (backends.objload) plays libbpf and the simulated kernel plays the kernel; which revision of each is
a row of `SIM_PROFILES`. The sequence is libbpf's bpf_object__load: create the maps in order (writing each
internal map's image and freezing `.rodata*` right after its creation), then load the programs in order,
stopping at the first failure. A failed load leaves nothing loaded (libbpf tears the object down), so map
contents and runs are then null.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from backends.objload import (
    BPF_F_ALL_CPUS,
    BPF_MAP_TYPE_ARRAY,
    BPF_MAP_TYPE_PERCPU_ARRAY,
    LOADER_PROFILES,
    LoaderProfile,
    MapSpec,
    OpenFailure,
    PreparedObject,
    ProgSpec,
    prepare,
    programs_in_load_order,
    resolve,
)
from backends.sim.interp import BpfFault
from backends.sim.kernel import KERNEL_PROFILES, KernelProfile, SimError, SimKernel
from schema.result import MAP_TYPE_NAMES, map_entry, new_env, new_result, object_ref, program_entry
from toolchain.elf import ObjectFacts, read_object
from toolchain.insn import BPF_DW, exit_insn, ld_map_value, ldx_mem

# observation profile -> (loader profile, kernel profile)
SIM_PROFILES: dict[str, tuple[str, str]] = {
    "merged": ("merged", "patched"),
    "v1": ("v1", "patched"),
    "unpatched": ("old", "unpatched"),
    "raw": ("raw", "patched"),
    "raw-unpatched": ("raw", "unpatched"),
    "merged-unpatched-kernel": ("merged", "unpatched"),
    "merged-nojit": ("merged", "patched-nojit"),
    # fault injection: a kernel that accepts per-CPU direct access but skips the per-CPU move
    "merged-norewrite": ("merged", "broken-norewrite"),
}

# libbpf's program type from the section name; the simulator runs raw tracepoints only
_PROG_TYPE_PREFIXES = {"raw_tp": "raw_tp", "raw_tracepoint": "raw_tp", "raw_tp.w": "raw_tp",
                       "raw_tracepoint.w": "raw_tp"}
ZERO_KEY = bytes(4)


def prog_type_of(section: str) -> str | None:
    base = section.lstrip("?").split("/", 1)[0]
    return _PROG_TYPE_PREFIXES.get(base)


def probe_percpu_data(kernel: SimKernel) -> bool:
    """libbpf's FEAT_PERCPU_DATA probe: a 1-entry PERCPU_ARRAY and a socket filter reading it directly [S]."""
    try:
        fd = kernel.map_create(BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 1, 0, "libbpf_percpu")
        kernel.prog_load([*ld_map_value(1, fd, 0), ldx_mem(BPF_DW, 0, 1, 0), exit_insn()],
                         prog_type="socket_filter")
    except SimError:
        return False
    return True


def _slots(kernel: SimKernel, fd: int, spec: MapSpec) -> list[str] | None:
    if spec.type not in (BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY):
        return None  # prog arrays hold programs, not bytes
    raw = kernel.map_lookup(fd, ZERO_KEY)
    if spec.type != BPF_MAP_TYPE_PERCPU_ARRAY:
        return [raw.hex()]
    stride = len(raw) // kernel.possible_cpus
    return [raw[c * stride:c * stride + spec.value_size].hex() for c in range(kernel.possible_cpus)]


class _Load:
    """One bpf_object__load of a prepared object into a simulated kernel."""

    def __init__(self, prepared: PreparedObject, loader: LoaderProfile, kernel: SimKernel,
                 initial_values: Mapping[str, bytes]) -> None:
        self.prepared, self.loader, self.kernel = prepared, loader, kernel
        self.map_fds: list[int] = []
        self.created: list[bool] = []
        self.map_errors: dict[int, SimError] = {}
        self.prog_fds: dict[str, int] = {}
        self.verdicts: dict[str, dict[str, Any]] = {}
        self.ok = True
        self.images = self._images(initial_values)

    def _images(self, initial_values: Mapping[str, bytes]) -> dict[int, bytes]:
        images: dict[int, bytes] = {}
        for name, value in initial_values.items():
            try:
                spec = self.prepared.map_by_name(name)
            except KeyError:
                raise ValueError(f"initial value for unknown map {name!r}") from None
            # an internal map's image is replaced as by bpf_map__set_initial_value (exact size); a .maps map
            # gets a user-space write, zero-padded, since a lowered struct may be longer than its section
            exact = spec.internal or spec.type not in (BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY)
            if (len(value) != spec.value_size) if exact else (len(value) > spec.value_size):
                raise ValueError(f"initial value for {name!r} has {len(value)} bytes, value_size is "
                                 f"{spec.value_size}")
            images[self.prepared.maps.index(spec)] = bytes(value) + bytes(spec.value_size - len(value))
        return images

    def create_maps(self) -> None:
        autocreate_percpu = True
        if self.loader.probes_percpu_feature and any(m.percpu_data for m in self.prepared.maps):
            autocreate_percpu = probe_percpu_data(self.kernel)
        for i, spec in enumerate(self.prepared.maps):
            if not self.ok:
                self.map_fds.append(-1)
                self.created.append(False)
                continue
            if spec.percpu_data and not autocreate_percpu:
                # relocation still refers to the map: programs that use it reach the kernel with a placeholder
                self.map_fds.append(self.kernel.placeholder_fd())
                self.created.append(False)
                continue
            try:
                fd = self.kernel.map_create(spec.type, spec.key_size, spec.value_size, spec.max_entries,
                                            spec.flags, spec.kernel_name)
            except SimError as e:
                self.map_errors[i] = e
                self.map_fds.append(-1)
                self.created.append(False)
                self.ok = False
                continue
            self.map_fds.append(fd)
            self.created.append(True)
            try:
                self._populate(i, spec, fd)
            except SimError as e:  # libbpf: "failed to set initial contents" ends the load as well
                self.map_errors[i] = e
                self.ok = False

    def _populate(self, index: int, spec: MapSpec, fd: int) -> None:
        image = self.images.get(index, spec.initial)
        if image is not None:
            if spec.type != BPF_MAP_TYPE_PERCPU_ARRAY:
                self.kernel.map_update(fd, ZERO_KEY, image)
            elif self.kernel.profile.bpf_f_cpu:
                self.kernel.map_update(fd, ZERO_KEY, image, BPF_F_ALL_CPUS)  # one image for every CPU [S]
            else:
                stride = (spec.value_size + 7) // 8 * 8
                slot = image + bytes(stride - len(image))
                self.kernel.map_update(fd, ZERO_KEY, slot * self.kernel.possible_cpus)
        if spec.freeze:
            self.kernel.map_freeze(fd)

    def load_programs(self) -> None:
        for prog in self.prepared.programs:
            if not self.ok or not prog.autoload:
                self.verdicts[prog.name] = program_entry(prog.name, "not_loaded", errno=None)
                continue
            self.verdicts[prog.name] = self._load_one(prog)

    def _load_one(self, prog: ProgSpec) -> dict[str, Any]:
        missing = [self.prepared.maps[r.map_index] for r in prog.relos if not self.created[r.map_index]]
        if missing:
            # libbpf poisons an ld_imm64 of a map it did not create (poison_map_ldimm64: a call to the unknown
            # helper 2001000000 + map index); the kernel refuses it with EINVAL and libbpf rewrites the log [V]
            self.ok = False
            return program_entry(prog.name, "rejected", errno=errno.EINVAL, message_class="map_not_created",
                                 message=f"BPF map '{missing[0].name}' is referenced but wasn't created")
        prog_type = prog_type_of(prog.section)
        if prog_type is None:
            self.ok = False
            return program_entry(prog.name, "rejected", errno=None, message_class="sim_unsupported",
                                 message=f"unsupported by the simulator: program section '{prog.section}'")
        try:
            fd, xlated, _ = self.kernel.prog_load(resolve(prog, self.map_fds), prog.name[:15],
                                                  prog_type=prog_type)
        except SimError as e:
            self.ok = False
            cls = e.error_class or "verifier_other"
            return program_entry(prog.name, "rejected", errno=None if cls == "sim_unsupported" else e.errno,
                                 message_class=cls, message=e.message)
        self.prog_fds[prog.name] = fd
        return program_entry(prog.name, "accepted", xlated_insns=xlated)

    def init_prog_arrays(self) -> None:
        """libbpf's bpf_object__init_prog_arrays: once every program is loaded, each statically initialised
        prog array slot gets its program's fd; a failed update fails the load."""
        if not self.ok:
            return
        for i, spec in enumerate(self.prepared.maps):
            if not self.created[i]:
                continue
            for slot, name in sorted(spec.prog_values.items()):
                try:
                    fd = self.prog_fds.get(name)
                    if fd is None:
                        raise SimError(errno.EINVAL, f"program '{name}' is not loaded")
                    self.kernel.map_update(self.map_fds[i], slot.to_bytes(4, "little"), fd.to_bytes(4, "little"))
                except SimError as e:
                    self.map_errors[i] = SimError(e.errno, f"map '{spec.name}': failed to initialize slot [{slot}] "
                                                           f"to prog '{name}': {e.message}", e.error_class)
                    self.ok = False
                    return

    @property
    def maps_kept(self) -> bool:
        """A failed load tears the object down (libbpf's bpf_object_unload) unless the loader keeps maps."""
        return self.ok or self.loader.keeps_maps_on_failure

    def contents(self) -> list[list[str] | None]:
        return [_slots(self.kernel, fd, spec) if self.maps_kept and ok else None
                for fd, ok, spec in zip(self.map_fds, self.created, self.prepared.maps, strict=True)]


def _map_entries(prepared: PreparedObject, load: _Load | None, before: Sequence[list[str] | None],
                 after: Sequence[list[str] | None]) -> list[dict[str, Any]]:
    out = []
    for i, spec in enumerate(prepared.maps):
        entry = map_entry(name=spec.name, kernel_name=spec.kernel_name, section=spec.section,
                          type=MAP_TYPE_NAMES.get(spec.type, f"type{spec.type}"), key_size=spec.key_size,
                          value_size=spec.value_size, max_entries=spec.max_entries, flags=spec.flags,
                          internal=spec.internal, created=bool(load and load.created[i] and load.maps_kept),
                          before=before[i], after=after[i])
        err = load.map_errors.get(i) if load else None
        if err is not None:
            entry.update(errno=err.errno, message_class=err.error_class, message=err.message)
        out.append(entry)
    return out


def observe(obj_path: str | Path, *, profile: str = "merged", possible_cpus: int = 4,
            online_cpus: list[int] | None = None, runs: Sequence[tuple[str, int, int]] = (),
            initial_values: Mapping[str, bytes] | None = None) -> dict[str, Any]:
    """The Observation of `obj_path` on the simulator, per shared/spec/result-schema.md.

    `initial_values` maps a map's name (or an internal map's section) to its starting value, the same bytes
    on every possible CPU: an internal map's image is replaced (exactly value_size bytes), a `.maps` map is
    written after creation (at most value_size bytes, zero-padded).
    """
    if profile not in SIM_PROFILES:
        raise ValueError(f"unknown profile {profile!r} (known: {', '.join(SIM_PROFILES)})")
    loader_name, kernel_name = SIM_PROFILES[profile]
    loader: LoaderProfile = LOADER_PROFILES[loader_name]
    kprofile: KernelProfile = KERNEL_PROFILES[kernel_name]
    kernel = SimKernel(kprofile, possible_cpus=possible_cpus, online=online_cpus)
    env = new_env(profile, possible_cpus=possible_cpus, online_cpus=list(kernel.online),
                  features=kprofile.features, loader_profile=loader.name, kernel_profile=kprofile.name)
    facts: ObjectFacts = read_object(obj_path)
    result = new_result("sim", env, object_ref(obj_path))
    try:
        prepared = prepare(facts, loader)
    except OpenFailure as e:
        result["open"] = {"ok": False, "error_class": e.error_class, "message": e.message, "errno": e.errno}
        result["programs"] = [program_entry(f.name, "not_loaded", errno=None)
                              for f in programs_in_load_order(facts)]
        result["runs"] = []  # no object: nothing to run (as the oracle and the kernel backend report it)
        return result
    result["variables"] = [{"name": n, "section": s, "offset": o, "size": z} for n, s, o, z in prepared.variables]
    load = _Load(prepared, loader, kernel, initial_values or {})
    load.create_maps()
    load.load_programs()
    load.init_prog_arrays()
    before = load.contents()
    result["programs"] = [load.verdicts[p.name] for p in prepared.programs]
    result["runs"] = [_run(kernel, load, name, cpu, count) for name, cpu, count in runs]
    after = load.contents()
    result["maps"] = _map_entries(prepared, load, before, after)
    return result


def _run(kernel: SimKernel, load: _Load, name: str, cpu: int, count: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"program": name, "cpu": cpu, "count": count, "retval": None}
    if name not in load.verdicts:
        raise ValueError(f"run of unknown program {name!r}")
    fd = load.prog_fds.get(name)
    if fd is None or not load.ok:
        return entry
    retvals = []
    try:
        for _ in range(count):
            retvals.append(kernel.test_run(fd, cpu))
    except SimError as e:
        entry["errno"] = e.errno
        entry["error"] = errno.errorcode.get(e.errno, str(e.errno))
        return entry
    except BpfFault as e:
        entry["fault"] = str(e)
        return entry
    entry["retval"] = retvals
    return entry
