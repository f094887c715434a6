"""Predict the skeleton life cycle of one object (schema.skeleton): what upstream's `global_data_init` asserts,
for this object's layout and this plan.

The rules, each from the merged source as the audit (§A9, §B9, §B11, §C) reads it:
- bpftool's struct for a section holds its non-static variables at their offsets and no `__aligned(8)`, so its
  `sizeof` is the end of the last one rounded up to the members' alignment; `bpf_map__set_initial_value` wants
  exactly `value_size`.
- The skeleton pointer is the map's image: `bpf_map__initial_value` returns it, with `value_size`. After load the
  image is read-only.
- `bpf_map__set_value_size` keeps and zero-extends the image; the BTF value type survives only when the last
  variable by offset is an array whose element size divides the rest of the new size.
- libbpf refuses `BPF_F_CPU | BPF_F_ALL_CPUS` and a buffer that is not `value_size`; the kernel refuses a CPU
  beyond `nr_cpu_ids` (ERANGE) and either flag on a map that is not per-CPU.
"""

from __future__ import annotations

from typing import Any

from generators.ctype import Array, CType, Record, round_up
from generators.model import ProgramModel, Run
from oracle.predict import _image, predict_load, run_entry, section_kind
from oracle.profiles import BPF_F_MMAPABLE, EINVAL, Profile
from schema.skeleton import CONST_STRING_PROGRAMS, SkeletonPlan
from toolchain.elf import ObjectFacts

ERANGE = 34


def btf_align(t: CType) -> int:
    """The alignment a C compiler gives the type as BTF describes it (libbpf's btf__align_of): natural, since
    BTF keeps no `aligned` attribute; a record whose offsets or size break that is packed (1)."""
    if isinstance(t, Array):
        return btf_align(t.elem)
    if isinstance(t, Record):
        aligns = [btf_align(f.type) for f in t.fields]
        if any(off % a for off, a in zip(t.offsets(), aligns, strict=True)):
            return 1
        most = max(aligns, default=1)
        return 1 if t.size % most else most
    return min(8, t.size)


def exposed(model: ProgramModel, facts: ObjectFacts, section: str) -> list[tuple[str, int, int, int]]:
    """(name, offset, size, alignment) of each variable the skeleton struct exposes: the non-static ones. The
    alignment is BTF's: the skeleton's types come from the object's BTF, as a user's vmlinux.h-style header."""
    out = []
    for v in model.variables:
        sym = facts.variable_symbol(section, v.name) if v.section == section else None
        if sym is not None and not v.static:
            out.append((v.name, sym.value, v.type.size, btf_align(v.type)))
    return sorted(out, key=lambda m: m[1])


def struct_size(model: ProgramModel, facts: ObjectFacts, section: str) -> int:
    members = exposed(model, facts, section)
    if not members:
        return 0  # an empty struct (GNU C)
    return round_up(max(off + size for _, off, size, _ in members), max(a for *_, a in members))


def btf_survives_resize(model: ProgramModel, facts: ObjectFacts, section: str, size: int) -> bool:
    """map_btf_datasec_resize: the last variable by offset (static ones too) must be an array whose element
    size divides (size - its offset), in u32 arithmetic."""
    placed = []
    for v in model.variables:
        sym = facts.variable_symbol(section, v.name) if v.section == section else None
        if sym is not None:
            placed.append((sym.value, v))
    if not placed:
        return False
    offset, last = max(placed, key=lambda p: p[0])
    if not isinstance(last.type, Array) or last.type.elem.size <= 0:
        return False
    return ((size - offset) & 0xFFFFFFFF) % last.type.elem.size == 0


def _written(base: bytes, model: ProgramModel, facts: ObjectFacts, section: str, writes: bytes | None) -> bytes:
    out = bytearray(base)
    if writes is not None:
        for _, off, size, _ in exposed(model, facts, section):
            if off + size <= len(writes) and off + size <= len(out):
                out[off:off + size] = writes[off:off + size]
    return bytes(out)


def predict_skeleton(model: ProgramModel, facts: ObjectFacts, profile: Profile, plan: SkeletonPlan, *,
                     possible_cpus: int, online_cpus: list[int]) -> dict[str, Any]:
    libbpf, kernel = profile.libbpf, profile.kernel
    sections = [s.name for s in facts.data_sections()]
    percpu = [s for s in sections if section_kind(s, libbpf) == "percpu"]
    plain_state = predict_load(model, facts, profile, possible_cpus=possible_cpus, online_cpus=online_cpus)
    entries = {m["section"]: m for m in plain_state.result["maps"] if m["section"] is not None}
    if not plain_state.result["open"]["ok"]:
        return {"harness": "compiles", "open": False}

    maps: dict[str, dict[str, Any]] = {}
    images: dict[str, bytes] = {}
    sizes: dict[str, int] = {}
    for s in percpu:
        value_size = entries[s]["value_size"]
        ssize = struct_size(model, facts, s)
        members = [v for v in model.variables if v.section == s]
        base = bytes(_image(members, facts, s, facts.require_section(s).size)).ljust(value_size, b"\0")
        image = _written(base, model, facts, s, plan.writes.get(s))
        doc: dict[str, Any] = {"skel_open": True, "initial_value_is_skel": True, "initial_value_size": value_size,
                               "value_size": value_size, "struct_size": ssize, "btf_value_type": True,
                               "set_initial_value_sizeof": 0 if ssize == value_size else -EINVAL}
        if s in plan.resize:
            new = plan.resize[s]
            image = image[:new].ljust(new, b"\0")  # bpf_map_mmap_resize copies min(old, new) page-rounded bytes
            doc["resize"] = {"rc": 0, "value_size": new, "btf_value_type": btf_survives_resize(model, facts, s, new),
                             "initial_value_size": new, "image": image.hex()}
            value_size = new
        maps[s] = doc
        images[s], sizes[s] = image, value_size
    out: dict[str, Any] = {"harness": "compiles", "open": True, "maps": maps}
    if not plan.load:
        return out

    state = predict_load(model, facts, profile, possible_cpus=possible_cpus, online_cpus=online_cpus,
                         initial_images=images)
    for m in state.result["maps"]:
        if m["section"] in sizes:
            m["value_size"] = sizes[m["section"]]
    if not state.loaded:
        failed = next((p for p in state.result["programs"] if p["verdict"] != "accepted"), None)
        out["load"] = -(failed["errno"] or EINVAL) if failed and failed.get("errno") else None
        return out
    out["load"] = 0
    machine = state.machine
    assert machine is not None
    for s in percpu:
        maps[s].update({"skel_loaded": True, "initial_value_is_skel_loaded": True, "image_writable_loaded": False,
                        "cpus_loaded": machine.snapshot(s, sizes[s])})
    if plan.light_object is not None:
        # the light skeleton of the same layout on a fresh machine state: its loader writes the same images
        light_state = predict_load(model, facts, profile, possible_cpus=possible_cpus, online_cpus=online_cpus,
                                   initial_images=images)
        light_machine = light_state.machine
        assert light_machine is not None
        light: dict[str, Any] = {"open": True, "load": 0, "maps": {}}
        for s in percpu:
            light["maps"][s] = {"cpus_loaded": light_machine.snapshot(s, sizes[s])}
        light["runs"] = [{"program": e["program"], "cpu": e["cpu"], "retval": e["retval"]}
                         for e in (run_entry(light_state, Run(p, c, n)) for p, c, n in plan.runs)]
        for s in percpu:
            light["maps"][s]["cpus_after_runs"] = light_machine.snapshot(s, sizes[s])
        out["light"] = light
    out["runs"] = [{"program": e["program"], "cpu": e["cpu"], "retval": e["retval"]}
                   for e in (run_entry(state, Run(p, c, n)) for p, c, n in plan.runs)]
    for s in percpu:
        vs = sizes[s]
        per_cpu = machine.snapshot(s, vs)
        doc = maps[s]
        doc["cpus_after_runs"] = list(per_cpu)
        doc["both_flags"] = -EINVAL  # libbpf's validate_map_op: the two are mutually exclusive
        doc["short_buffer"] = -EINVAL  # libbpf's validate_map_op: either flag wants exactly value_size
        doc["both_flags_kernel"] = -EINVAL  # bpf_map_check_op_flags (and ALL_CPUS is no lookup flag)
        doc["cpu_out_of_range"] = -ERANGE if kernel.bpf_f_cpu else -EINVAL
        if s == plan.iterate_section:
            # bpf_map_elem over a per-CPU array: one element, its buffer every possible CPU's value at stride
            # round_up(value_size, 8) (the padding never written)
            doc["iterator"] = {"attached": True, "elems": 1,
                               "sum": sum(bytes.fromhex(v)[plan.iterate_offset] for v in per_cpu)}
        if s in plan.all_cpus:
            value = plan.all_cpus[s][:vs].ljust(vs, b"\0")
            doc["all_cpus_update"] = 0 if kernel.bpf_f_cpu else -EINVAL
            if kernel.bpf_f_cpu:
                per_cpu = [value.hex()] * possible_cpus
            doc["cpus_after_all_cpus"] = list(per_cpu)
        if s in plan.one_cpu:
            cpu, value = plan.one_cpu[s]
            ok = kernel.bpf_f_cpu and cpu < possible_cpus
            doc["cpu_update"] = 0 if ok else (-ERANGE if kernel.bpf_f_cpu else -EINVAL)
            if ok:
                per_cpu = [value[:vs].ljust(vs, b"\0").hex() if c == cpu else v for c, v in enumerate(per_cpu)]
            doc["cpus_after_cpu_update"] = list(per_cpu)
        # a plain lookup: every possible CPU at stride round_up(value_size, 8); the padding was never written
        doc["full_lookup"] = "".join(v + "00" * (round_up(vs, 8) - vs) for v in per_cpu)
    if plan.rdonly is not None:
        out.update(_rdonly(plan.rdonly, kernel.bpf_f_cpu, kernel.percpu_direct_value, possible_cpus))
    if plan.const_strings is not None:
        # check_reg_const_str: a per-CPU map value is no const string, whatever the helper (R3 in both)
        refused = -EACCES if kernel.const_str_percpu_first else -EINVAL
        out["const_strings"] = {p: {"open": True, "load": refused, "message_class": "const_str_percpu"}
                                for p in CONST_STRING_PROGRAMS}
    plain = next((s for s in sections if s in (".data", ".bss") and s in entries
                  and entries[s]["flags"] & BPF_F_MMAPABLE), None)
    if plain is not None:
        out["plain_map_cpu_flag"] = -EINVAL  # bpf_map_check_op_flags: BPF_F_CPU on a map that is not per-CPU
    return out


EACCES, EPERM = 13, 1


def _rdonly(value: bytes, bpf_f_cpu: bool, direct_value: bool, possible_cpus: int) -> dict[str, Any]:
    """A BPF_F_RDONLY_PROG percpu array filled by one BPF_F_ALL_CPUS update and frozen: user space can no longer
    write it (EPERM); a program may read its value directly, but a write is refused in check_map_access_type
    ("write into map forbidden", EACCES) before any bounds check."""
    cpus: list[Any] = [value.hex()] * possible_cpus if bpf_f_cpu else [-EINVAL] * possible_cpus
    return {"rdonly": {"create": 0, "all_cpus_update": 0 if bpf_f_cpu else -EINVAL, "freeze": 0, "cpus": cpus,
                       "update_frozen": -EPERM},
            "read_prog": {"loaded": direct_value, "errno": 0 if direct_value else EINVAL, "write_forbidden": False},
            "write_prog": {"loaded": False, "errno": EACCES if direct_value else EINVAL,
                           "write_forbidden": direct_value}}
