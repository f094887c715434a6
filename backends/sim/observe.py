"""Observe a compiled object on the simulator: the result-schema document a real backend would produce.

The loader (backends.objload) plays libbpf and the simulated kernel plays the kernel; which revision of each is
named by the profile registry (schema.profiles), or a fault row of `FAULT_ROWS`. The sequence is libbpf's
bpf_object__load: create the maps in order (writing each internal map's image and freezing `.rodata*` right
after its creation), then load the programs in order, stopping at the first failure. A failed load leaves
nothing loaded (libbpf tears the object down), so map contents and runs are then null.

`observe_set` does the same for an object set (docs/object-sets.md): every object into one kernel, in order,
with maps reused by fd (bpf_map__reuse_fd) and extension programs attached to their targets (freplace).
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from backends.objload import (
    LOADER_PROFILES,
    LoaderProfile,
    MapSpec,
    OpenFailure,
    PreparedObject,
    ProgSpec,
    map_uses_real_name,
    object_name,
    prepare,
    programs_in_load_order,
    resolve,
    reused_map_name,
)
from backends.sim.interp import BpfFault
from backends.sim.kernel import KernelProfile, SimError, SimKernel, kernel_row
from schema import profiles as registry
from schema.objectset import SetPlan
from schema.result import (
    MAP_TYPE_NAMES,
    REUSE_FAILED,
    Result,
    map_entry,
    new_env,
    new_result,
    new_set_result,
    not_opened,
    object_ref,
    program_entry,
)
from toolchain.elf import ObjectFacts, read_object
from toolchain.insn import BPF_DW, exit_insn, ld_map_value, ldx_mem
from toolchain.uapi import BPF_F_ALL_CPUS, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY

# Deliberately broken rows, run with `--sim-profile` to see the suite catch them: name -> (loader row, kernel row).
# They are predicted by the registry profile `merged`.
FAULT_ROWS: dict[str, tuple[str, str]] = {
    # a kernel that accepts per-CPU direct access but skips the per-CPU move
    "merged-norewrite": ("merged", "broken-norewrite"),
    # object sets: a libbpf that ignores bpf_map__reuse_fd, so every object creates and fills its own map
    "merged-noreuse": ("broken-noreuse", "patched"),
    # object sets: a kernel whose freplace link succeeds but leaves the target calling its own function
    "merged-nofreplace": ("merged", "broken-nofreplace"),
}


def sim_rows(profile: str) -> tuple[LoaderProfile, KernelProfile]:
    """The loader and kernel rows a profile name (modifiers included) or a fault row stands for."""
    base, modifiers = registry.split_modifiers(profile)
    if base in FAULT_ROWS:
        loader_name, kernel_name = FAULT_ROWS[base]
    else:
        try:
            row, _ = registry.lookup(profile)
        except registry.UnknownProfile as e:
            raise registry.UnknownProfile(f"{e}; or a fault row: {', '.join(FAULT_ROWS)}") from None
        loader_name, kernel_name = row.loader_row, row.sim_kernel_row
    return LOADER_PROFILES[loader_name], kernel_row(registry.join_modifiers(kernel_name, modifiers))


# libbpf's program type from the section name; the simulator runs raw tracepoints, and extensions of them
_PROG_TYPE_PREFIXES = {"raw_tp": "raw_tp", "raw_tracepoint": "raw_tp", "raw_tp.w": "raw_tp",
                       "raw_tracepoint.w": "raw_tp", "freplace": "ext"}
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
                 initial_values: Mapping[str, bytes], features: dict[str, bool] | None = None) -> None:
        self.prepared, self.loader, self.kernel = prepared, loader, kernel
        self.map_fds: list[int] = []
        self.created: list[bool] = []
        self.map_errors: dict[int, SimError] = {}
        self.prog_fds: dict[str, int] = {}
        self.verdicts: dict[str, dict[str, Any]] = {}
        self.ok = True
        self.images = self._images(initial_values)
        self.reused: dict[int, int] = {}  # map index -> the fd it took over (bpf_map__reuse_fd)
        # extension program -> (target program fd, or None when that program is not loaded; function name)
        self.attach_targets: dict[str, tuple[int | None, str]] = {}
        # libbpf probes a kernel feature once per process: one cache for every object of a set
        self.features = features if features is not None else {}
        self.reuse_problem: str | None = None  # why a map could not be reused (the object then never loads)

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

    def reuse(self, index: int, fd: int, source: MapSpec) -> None:
        """bpf_map__reuse_fd before load: the map becomes `source`'s (its definition and kernel name), and the
        load neither creates it nor writes its image."""
        own = self.prepared.maps[index]
        self.prepared.maps[index] = dataclasses.replace(
            own, name=reused_map_name(own.name, source.kernel_name, uses_real_name=map_uses_real_name(own)),
            kernel_name=source.kernel_name,
            type=source.type, key_size=source.key_size, value_size=source.value_size,
            max_entries=source.max_entries, flags=source.flags)
        self.reused[index] = fd

    def fail_open(self) -> None:
        """The object never reaches bpf_object__load: no map created, no program offered."""
        self.ok = False
        self.map_fds = [-1] * len(self.prepared.maps)
        self.created = [False] * len(self.prepared.maps)
        self.verdicts = {p.name: program_entry(p.name, "not_loaded", errno=None) for p in self.prepared.programs}

    def _autocreate_percpu(self) -> bool:
        if not (self.loader.probes_percpu_feature and any(m.percpu_data for m in self.prepared.maps)):
            return True
        if "percpu_data" not in self.features:
            self.features["percpu_data"] = probe_percpu_data(self.kernel)
        return self.features["percpu_data"]

    def create_maps(self) -> None:
        autocreate_percpu = self._autocreate_percpu()
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
            if i in self.reused:  # libbpf: "skipping creation (preset fd)", and no populate_internal_map
                self.map_fds.append(self.reused[i])
                self.created.append(True)
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
        prog_type = prog_type_of(prog.section)
        missing = [self.prepared.maps[r.map_index] for r in prog.relos if not self.created[r.map_index]]
        try:
            attach = self._attach_target(prog, check=bool(missing)) if prog_type == "ext" else {}
        except SimError as e:
            self.ok = False
            return program_entry(prog.name, "rejected", errno=e.errno, message_class=e.error_class,
                                 message=e.message)
        if missing:
            # libbpf poisons an ld_imm64 of a map it did not create (poison_map_ldimm64: a call to the unknown
            # helper 2001000000 + map index); the kernel refuses it with EINVAL and libbpf rewrites the log [V]
            self.ok = False
            return program_entry(prog.name, "rejected", errno=errno.EINVAL, message_class="map_not_created",
                                 message=f"BPF map '{missing[0].name}' is referenced but wasn't created")
        if prog_type is None:
            self.ok = False
            return program_entry(prog.name, "rejected", errno=None, message_class="sim_unsupported",
                                 message=f"unsupported by the simulator: program section '{prog.section}'")
        try:
            fd, xlated, _ = self.kernel.prog_load(resolve(prog, self.map_fds), prog.name[:15],
                                                  prog_type=prog_type, func_info=prog.funcs, **attach)
        except SimError as e:
            self.ok = False
            cls = e.error_class or "verifier_other"
            return program_entry(prog.name, "rejected", errno=None if cls == "sim_unsupported" else e.errno,
                                 message_class=cls, message=e.message)
        self.prog_fds[prog.name] = fd
        return program_entry(prog.name, "accepted", xlated_insns=xlated)

    def _attach_target(self, prog: ProgSpec, *, check: bool) -> dict[str, Any]:
        """An extension's prog_load arguments; libbpf refuses one without a target before the kernel sees it.
        `check`: the kernel's target check now, for a program that the kernel will refuse later for a poisoned
        map reference (check_attach_btf_id comes first)."""
        target = self.attach_targets.get(prog.name)
        if target is None:
            raise SimError(errno.EINVAL, f"prog '{prog.name}': attach program FD is not set", "other")
        fd, func = target
        if fd is None:  # bpf_program__set_attach_target refuses a negative fd
            raise SimError(errno.EINVAL, f"prog '{prog.name}': target program of {func} is not loaded", "other")
        if check:
            self.kernel.check_attach_target(fd, func)
        return {"attach_prog_fd": fd, "attach_func": func}

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


class _Sim:
    """One simulated kernel and the loader that loads into it, per `sim_rows`."""

    def __init__(self, profile: str, possible_cpus: int, online_cpus: list[int] | None) -> None:
        self.loader, kprofile = sim_rows(profile)
        self.kernel = SimKernel(kprofile, possible_cpus=possible_cpus, online=online_cpus)
        self.env = new_env(profile, possible_cpus=possible_cpus, online_cpus=list(self.kernel.online),
                           features=kprofile.features, loader_profile=self.loader.name,
                           kernel_profile=kprofile.name)
        self.features: dict[str, bool] = {}

    def open(self, facts: ObjectFacts, result: Result) -> PreparedObject | None:
        """bpf_object__open: the prepared object, or None with the failure written into `result`."""
        try:
            prepared = prepare(facts, self.loader)
        except OpenFailure as e:
            result["open"] = {"ok": False, "error_class": e.error_class, "message": e.message, "errno": e.errno}
            result["programs"] = [program_entry(f.name, "not_loaded", errno=None)
                                  for f in programs_in_load_order(facts)]
            result["runs"] = []  # no object: nothing to run (as the oracle and the kernel backend report it)
            return None
        result["variables"] = [{"name": n, "section": s, "offset": o, "size": z}
                               for n, s, o, z in prepared.variables]
        return prepared

    def new_load(self, prepared: PreparedObject, initial_values: Mapping[str, bytes]) -> _Load:
        return _Load(prepared, self.loader, self.kernel, initial_values, self.features)


def _load(load: _Load) -> None:
    load.create_maps()
    load.load_programs()
    load.init_prog_arrays()


def observe(obj_path: str | Path, *, profile: str = "merged", possible_cpus: int = 4,
            online_cpus: list[int] | None = None, runs: Sequence[tuple[str, int, int]] = (),
            initial_values: Mapping[str, bytes] | None = None) -> dict[str, Any]:
    """The Observation of `obj_path` on the simulator, per shared/spec/result-schema.md.

    `initial_values` maps a map's name (or an internal map's section) to its starting value, the same bytes
    on every possible CPU: an internal map's image is replaced (exactly value_size bytes), a `.maps` map is
    written after creation (at most value_size bytes, zero-padded).
    """
    sim = _Sim(profile, possible_cpus, online_cpus)
    result = new_result("sim", sim.env, object_ref(obj_path))
    prepared = sim.open(read_object(obj_path), result)
    if prepared is None:
        return result
    load = sim.new_load(prepared, initial_values or {})
    _load(load)
    before = load.contents()
    result["programs"] = [load.verdicts[p.name] for p in prepared.programs]
    result["runs"] = [_run(sim.kernel, load, name, cpu, count) for name, cpu, count in runs]
    after = load.contents()
    result["maps"] = _map_entries(prepared, load, before, after)
    return result


# -- object sets (docs/object-sets.md) ---------------------------------------------------------------------


class _SetLoad:
    """Loading an object set: each object's Result and load, in order, into one kernel."""

    def __init__(self, sim: _Sim, plan: SetPlan) -> None:
        self.sim, self.plan = sim, plan
        self.facts = [read_object(path) for path in plan.objects]
        # program name -> object index (names are unique in a set)
        self.owner = {f.name: k for k, facts in enumerate(self.facts) for f in programs_in_load_order(facts)}
        self.results: list[Result] = []
        self.loads: list[_Load | None] = []  # None: the object was never opened, or its open failed
        self.failed: str | None = None  # the first object that failed: every later one is not opened
        self.links: list[int] = []

    def add(self, k: int) -> None:
        facts, path = self.facts[k], Path(self.plan.objects[k])
        result = new_result("sim", self.sim.env, object_ref(path))
        self.results.append(result)
        if self.failed is not None:
            not_opened(result, self.failed, [f.name for f in programs_in_load_order(facts)])
            self.loads.append(None)
            return
        prepared = self.sim.open(facts, result)
        load = self.sim.new_load(prepared, self.plan.initial_values_of(k)) if prepared is not None else None
        self.loads.append(load)
        if load is not None:
            self._load(k, load)
            result["programs"] = [load.verdicts[p.name] for p in load.prepared.programs]
            if load.reuse_problem is not None:
                result["open"] = {"ok": False, "error_class": REUSE_FAILED, "message": load.reuse_problem}
        _mark_extensions(result, facts)
        if load is None or not load.ok:
            self.failed = object_name(path)

    def _load(self, k: int, load: _Load) -> None:
        if self.sim.loader.reuses_fd:
            load.reuse_problem = self._reuse(k, load)
            if load.reuse_problem is not None:
                load.fail_open()
                return
        for ext, target, func in self.plan.attach_of(k):
            if not any(p.name == ext for p in load.prepared.programs):
                raise ValueError(f"attach of {ext!r}: object {k} has no such program")
            load.attach_targets[ext] = (self._prog_fd(target, ext, k), func)
        _load(load)

    def _reuse(self, k: int, load: _Load) -> str | None:
        """Each reuse of object k, before its load; a reason when a source map was never created."""
        for key, src in self.plan.reuses_of(k):
            source = self.loads[src]
            assert source is not None and source.ok, "objects after a failed one are not opened"
            own, theirs = _map_index(load, key, k), _map_index(source, key, src)
            if not (source.created[theirs] and source.maps_kept):
                return f"map '{key}': cannot reuse a map that was not created"
            load.reuse(own, source.map_fds[theirs], source.prepared.maps[theirs])
        return None

    def _prog_fd(self, name: str, ext: str, k: int) -> int | None:
        """A target program's fd; None when it is not loaded (or, in object k or later, not yet)."""
        owner = self.owner.get(name)
        if owner is None:
            raise ValueError(f"attach of {ext!r}: no program {name!r} in the set")
        load = self.loads[owner] if owner < k else None
        return load.prog_fds.get(name) if load is not None else None

    def attach_all(self) -> None:
        """Rule 4: once every object is loaded, each extension of each loaded object is linked to its target."""
        for k, load in enumerate(self.loads):
            if load is None or not load.ok:
                continue
            for entry in self.results[k]["programs"]:
                if "attached" in entry:
                    entry["attached"] = self._attach(load, entry["name"])

    def _attach(self, load: _Load, ext: str) -> bool:
        fd = load.prog_fds.get(ext)
        target = load.attach_targets.get(ext)
        if fd is None or target is None or target[0] is None:
            return False
        try:
            self.links.append(self.sim.kernel.link_create(fd, target[0], target[1]))
        except SimError:
            return False
        return True

    def live(self) -> list[tuple[int, _Load]]:
        return [(k, load) for k, load in enumerate(self.loads) if load is not None]

    def run(self, name: str, cpu: int, count: int) -> None:
        k = self.owner.get(name)
        if k is None:
            raise ValueError(f"run of unknown program {name!r}")
        load = self.loads[k]
        if load is not None:  # an object never opened has no runs
            self.results[k]["runs"].append(_run(self.sim.kernel, load, name, cpu, count))

    def tear_down(self) -> None:
        """Rule 7: links destroyed, the last one first (maps and programs of the simulator need no closing)."""
        for fd in reversed(self.links):
            self.sim.kernel.link_destroy(fd)
        self.links.clear()


def _map_index(load: _Load, key: str, k: int) -> int:
    """A map key of a reuse: an internal map's section or a `.maps` map's name."""
    try:
        return load.prepared.maps.index(load.prepared.map_by_name(key))
    except KeyError:
        raise ValueError(f"reuse of {key!r}: object {k} has no such map") from None


def _mark_extensions(result: Result, facts: ObjectFacts) -> None:
    """Extension programs of an opened object get `attached` (false until attach_all links them)."""
    ext = {f.name for f in programs_in_load_order(facts) if prog_type_of(f.section) == "ext"}
    for entry in result["programs"]:
        if entry["name"] in ext:
            entry["attached"] = False


def observe_set(plan: SetPlan, *, profile: str = "merged", possible_cpus: int = 4,
                online_cpus: list[int] | None = None) -> dict[str, Any]:
    """The simulator's document for an object set (docs/object-sets.md): one Result per object, in load order,
    every object loaded into one kernel; reuses before each load, extensions attached after all of them."""
    sim = _Sim(profile, possible_cpus, online_cpus)
    state = _SetLoad(sim, plan)
    for k in range(len(plan.objects)):
        state.add(k)
    state.attach_all()
    before = {k: load.contents() for k, load in state.live()}
    for name, cpu, count in plan.runs:
        state.run(name, cpu, count)
    for k, load in state.live():
        state.results[k]["maps"] = _map_entries(load.prepared, load, before[k], load.contents())
    state.tear_down()
    return new_set_result("sim", sim.env, state.results)


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
