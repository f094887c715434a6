"""Predict what a loader and kernel of a profile do with the global rendering of a program model.

Inputs: the model (what the C means) and the compiled facts (where clang put each symbol, section sizes and which
instructions reference which section). The initial images and the per-CPU contents after the run schedule are
computed from the model's initialisers and operations, not read from the object, so a wrong section image or a
wrong runtime both show up as differences.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from generators.ctype import init_slots, round_up
from generators.model import JMP_TABLE, Function, ProgramModel, Run, TailCall, Variable, walk_ops
from oracle.profiles import (
    BPF_F_MMAPABLE,
    BPF_F_RDONLY_PROG,
    E2BIG,
    EINVAL,
    EPERM,
    LIBBPF_ERRNO__RELOC,
    PERCPU_VALUE_LIMIT,
    LibbpfAxis,
    Profile,
)
from oracle.runtime import Machine
from schema.result import Result, map_entry, new_env, new_result, program_entry
from toolchain.elf import ObjectFacts

KIND_DATA, KIND_RODATA, KIND_BSS, KIND_PERCPU = "data", "rodata", "bss", "percpu"


class OracleError(RuntimeError):
    """The compiled object does not match the model (a compiler-layer finding, not an oracle guess)."""


def section_kind(section: str, libbpf: LibbpfAxis) -> str | None:
    """libbpf's classification: .data/.rodata rules first, then the per-CPU rule of the profile."""
    for kind, base in ((KIND_DATA, ".data"), (KIND_RODATA, ".rodata"), (KIND_BSS, ".bss")):
        if section == base or section.startswith(base + "."):
            return kind
    if section in libbpf.percpu_exact or any(section.startswith(p) for p in libbpf.percpu_prefixes):
        return KIND_PERCPU
    return None


def object_name(file_name: str) -> str:
    return file_name.split("/")[-1].split(".")[0]


def _sanitise(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", name)


def internal_name(obj_name: str, section: str) -> str:
    """libbpf's internal_map_name: a dotted suffix (".data.x") stands alone, else an object prefix of up to
    8 characters (the suffix counted as at least 7 long, and as at most 15: a longer one leaves no room for any
    prefix); the kernel keeps 15 characters [V, measured; libbpf 1.8.0 source].

    A deliberate second implementation of backends.objload.internal_map_name: the oracle does not import the
    loader model; tests/test_map_names.py checks the two agree."""
    if "." in section[1:]:
        return _sanitise(section)[:15]
    room = 15 - min(max(7, len(section)), 15)
    return _sanitise(obj_name[:room] + section)[:15]


def _map_names(kind: str, section: str, obj_name: str, libbpf: LibbpfAxis) -> tuple[str, str]:
    """(bpf_map__name, kernel name). A custom dot section (".data.x", ".percpu.x") keeps its real name for
    bpf_map__name (map_uses_real_name) while the kernel gets 15 characters [V]."""
    kernel = internal_name(obj_name, section)
    custom = "." in section[1:]
    if kind != KIND_PERCPU:
        return (section if custom else kernel), kernel
    rules = {"section": section, "section15": _sanitise(section)[:15], "internal": kernel}
    name = section if custom else rules[libbpf.percpu_name]
    return name, rules[libbpf.percpu_kernel_name]


def _image(variables: list[Variable], facts: ObjectFacts, section: str, size: int) -> bytearray:
    image = bytearray(size)
    for var in variables:
        if not var.init:
            continue
        base = _offset(facts, var)
        for value, slot in zip(var.init, init_slots(var.type), strict=False):
            image[base + slot.offset: base + slot.offset + slot.type.size] = _bytes(value, slot.type.size)
    return image


def _bytes(value: int, size: int) -> bytes:
    return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


def _offset(facts: ObjectFacts, var: Variable) -> int:
    sym = facts.variable_symbol(var.section, var.name)
    if sym is None:
        raise OracleError(f"compiler: variable {var.name} is not in section {var.section} of the object")
    return sym.value


def referencing_relocations(facts: ObjectFacts, section: str) -> list[tuple[str, str]]:
    """(function, symbol) for every instruction relocation against `section`, in libbpf's processing order."""
    sec = facts.section(section)
    if sec is None:
        return []
    out = []
    for target, relocs in facts.relocs.items():
        tsec = facts.section(target)
        if tsec is None or not tsec.executable:
            continue
        for r in relocs:
            if r.symbol.section_index != sec.index:
                continue
            fn = next((f for f in facts.functions if f.section == target
                       and f.start <= r.insn_index < f.start + len(f.insns)), None)
            out.append((fn.name if fn else target, r.symbol.name))
    return out


@dataclass
class Loaded:
    """One object as predicted right after its load: the result so far and the machine holding its images."""

    result: Result
    machine: Machine | None  # None when the open failed
    loaded: bool  # every program accepted: the object is loaded
    readable: bool  # its created maps can be read (loaded, or a loader that keeps maps on failure)
    verdicts: dict[str, str]


def predict(model: ProgramModel, facts: ObjectFacts, profile: Profile, *, possible_cpus: int,
            online_cpus: list[int], clang: str | None = None,
            initial_images: Mapping[str, bytes] | None = None) -> Result:
    """`initial_images`: section → the value set with bpf_map__set_initial_value before load (it replaces
    the image on every CPU [V])."""
    state = predict_load(model, facts, profile, possible_cpus=possible_cpus, online_cpus=online_cpus,
                         clang=clang, initial_images=initial_images)
    if state.machine is None:
        return state.result
    snapshot(state, "before")
    for run in model.schedule:
        state.result["runs"].append(run_entry(state, run))
    snapshot(state, "after")
    return state.result


def snapshot(state: Loaded, when: str) -> None:
    machine = state.machine
    assert machine is not None
    for m in state.result["maps"]:
        if m["created"] and state.readable and m["section"] in machine.images:
            m[when] = machine.snapshot(m["section"], m["value_size"])


def run_entry(state: Loaded, run: Run) -> dict:
    """Run one schedule entry on the object's machine; a program that did not load returns nothing."""
    ok = state.loaded and state.verdicts.get(run.program) == "accepted"
    retvals = []
    for _ in range(run.count):
        if ok:
            assert state.machine is not None
            state.machine.run(run.program, run.cpu)
        retvals.append(0 if ok else None)
    return {"program": run.program, "cpu": run.cpu, "count": run.count, "retval": retvals}


def predict_load(model: ProgramModel, facts: ObjectFacts, profile: Profile, *, possible_cpus: int,
                 online_cpus: list[int], clang: str | None = None,
                 initial_images: Mapping[str, bytes] | None = None,
                 static_targets: frozenset[str] = frozenset()) -> Loaded:
    """Open and load, without runs. `static_targets`: extension programs whose target function has static
    linkage (the kernel refuses them at load)."""
    libbpf, kernel = profile.libbpf, profile.kernel
    env = new_env(profile.name, clang=clang, possible_cpus=possible_cpus, online_cpus=list(online_cpus),
                  libbpf=libbpf.version,
                  features={"percpu_data": kernel.percpu_data_probe, "bpf_f_cpu": kernel.bpf_f_cpu,
                            "percpu_insn_jit": kernel.percpu_insn_jit,
                            "percpu_direct_value": kernel.percpu_direct_value, "jit": kernel.jit_enabled})
    result = new_result("oracle", env, {"path": str(facts.path), "sha256": facts.sha256})
    obj_name = object_name(facts.path.name)

    def placed(s: str) -> int:
        sec = facts.section(s)
        return sec.index if sec is not None else 1 << 30

    sections = sorted(model.sections(), key=placed)
    kinds = {s: section_kind(s, libbpf) for s in sections}

    # Old libbpf: an unknown section referenced by an instruction fails the open [V, measured].
    for section in sections:
        if kinds[section] is None:
            refs = referencing_relocations(facts, section)
            if refs:
                prog, symbol = refs[0]
                result["open"] = {"ok": False, "error_class": "bad_map_relo",
                                  "message": libbpf.unknown_section_message.format(
                                      prog=prog, symbol=symbol, section=section)}
                result["programs"] = [program_entry(f.name, "not_loaded", errno=LIBBPF_ERRNO__RELOC)
                                      for f in model.programs]
                return Loaded(result, None, False, False, {})

    machine = Machine(model, facts, possible_cpus)
    load_error: tuple[int, str] | None = None
    if model.has_tail_calls:
        # the tail calls' PROG_ARRAY: any libbpf makes it as for every `.maps` map; the oracle has no opinion
        # on its sizes or contents (null: not compared), only that it exists and shares the object's fate
        result["maps"].append(map_entry(
            name=JMP_TABLE, kernel_name=None, section=None, type="prog_array", key_size=None,
            value_size=None, max_entries=None, flags=None, internal=None, created=True))
    for section in sections:
        kind = kinds[section]
        if kind is None:
            continue
        members = [v for v in model.variables if v.section == section]
        sec = facts.section(section)
        size = sec.size if sec is not None else 0
        for v in members:
            result["variables"].append({"name": v.name, "section": section, "offset": _offset(facts, v),
                                        "size": v.type.size})
        image = bytearray(initial_images[section]) if initial_images and section in initial_images else \
            _image(members, facts, section, size)
        machine.add_section(section, image, percpu=kind == KIND_PERCPU)
        name, kernel_name = _map_names(kind, section, obj_name, libbpf)
        percpu = kind == KIND_PERCPU
        value_size = round_up(size, libbpf.percpu_value_align) if percpu else size
        created = True
        if percpu and not kernel.percpu_data_probe and libbpf.probes_feature:
            created = False  # autocreate cleared by the feature probe (which the JIT being off fails too) [S]
        if percpu and created and round_up(value_size, 8) > PERCPU_VALUE_LIMIT:
            created = False
            load_error = load_error or (E2BIG, "e2big")
        mmapable = not (libbpf.static_only_not_mmapable and all(v.static for v in members))
        flags = 0 if percpu else (BPF_F_MMAPABLE if mmapable else 0) | (BPF_F_RDONLY_PROG if kind == KIND_RODATA else 0)
        result["maps"].append(map_entry(
            name=name, kernel_name=kernel_name, section=section,
            type="percpu_array" if percpu else "array", key_size=4, value_size=value_size, max_entries=1,
            flags=flags, internal=True, created=created))

    percpu_sections = {s for s in sections if kinds[s] == KIND_PERCPU}
    uncreated = {m["section"] for m in result["maps"] if not m["created"]}
    verdicts: dict[str, tuple[str, int | None, str | None, str | None]] = {}
    failed = load_error is not None
    if load_error:
        # a map that cannot be created fails the whole load before any program is offered [V]
        for m in result["maps"]:
            m["created"] = False
        for f in model.programs:
            verdicts[f.name] = ("not_loaded", None, None, None)
    for f in model.programs:
        if f.name in verdicts:
            continue
        if failed:
            verdicts[f.name] = ("not_loaded", None, None, None)
            continue
        touched = _sections_referenced(facts, f.name, model) & percpu_sections
        if f.replaces is not None and not kernel.ext_programs:
            # refused at BPF_PROG_LOAD before the verifier sees an instruction, with an empty log [measured]
            verdicts[f.name] = ("rejected", EPERM, "prog_type_refused", "")
            failed = True
        elif touched and not (touched & uncreated) and not kernel.percpu_direct_value:
            # resolve_pseudo_ldimm64 runs before the attach target is checked
            verdicts[f.name] = ("rejected", EINVAL, "no_direct_value_access", kernel.no_direct_value_message)
            failed = True
        elif f.replaces is not None and not kernel.ext_jit:
            # bpf_check_attach_target asks for jit_requested before the prototype check [V]
            verdicts[f.name] = ("rejected", EINVAL, "jit_required", kernel.ext_jit_message)
            failed = True
        elif f.name in static_targets:
            # btf_check_func_type_match names the function [measured on a 6.1 guest]
            verdicts[f.name] = ("rejected", EINVAL, "freplace_static_target",
                                f"{f.replaces.function}() is not a global function" if f.replaces else "")
            failed = True
        elif touched and (touched & uncreated):
            # merged libbpf on a kernel without the feature: autocreate cleared, the ld_imm64 poisoned; libbpf
            # rewrites the verifier's "invalid func unknown#2001000NNN" into this message [V/D]
            missing = next(m["name"] for m in result["maps"] if m["section"] in touched & uncreated)
            verdicts[f.name] = ("rejected", EINVAL, "map_not_created",
                                f"BPF map '{missing}' is referenced but wasn't created")
            failed = True
        elif not kernel.tail_calls_with_subprogs and _mixes_tail_calls_and_subprogs(facts, model, f):
            # refused while verifying, at the bpf_tail_call site: before the fixups that need the JIT
            verdicts[f.name] = ("rejected", EINVAL, "tail_call_with_subprogs", kernel.tail_call_subprogs_message)
            failed = True
        elif touched and not kernel.jit_enabled:
            # verified, then refused by bpf_fixup_call_args: the per-CPU rewrite made it jit_required [V: 7.3.4]
            verdicts[f.name] = ("rejected", EINVAL, "jit_required", kernel.jit_required_message)
            failed = True
        else:
            verdicts[f.name] = ("accepted", 0, None, None)
    result["programs"] = [program_entry(name, v, errno=e, message_class=c, message=m)
                          for name, (v, e, c, m) in verdicts.items()]

    loaded = not failed
    if failed and not libbpf.keeps_maps_on_failure:
        for m in result["maps"]:
            m["created"] = False
    return Loaded(result, machine, loaded, loaded or libbpf.keeps_maps_on_failure,
                  {name: v[0] for name, v in verdicts.items()})


def _sections_referenced(facts: ObjectFacts, program: str, model: ProgramModel) -> set[str]:
    """Sections whose symbols the program's code (with the subprograms it calls) references."""
    names = {program} | _callees(model, program)
    out = set()
    for section in model.sections():
        if any(fn in names for fn, _ in referencing_relocations(facts, section)):
            out.add(section)
    return out


def _mixes_tail_calls_and_subprogs(facts: ObjectFacts, model: ProgramModel, program: Function) -> bool:
    """The program tail-calls and, as clang emitted it, calls a subprogram (so the verifier sees more than one
    subprogram). Calls clang dropped or inlined do not count: the object decides, not the model."""
    if not any(isinstance(op, TailCall) for op in walk_ops(program.ops)):
        return False
    return any(insn.is_pseudo_call for insn in facts.function(program.name).insns)


def _callees(model: ProgramModel, name: str) -> set[str]:
    from generators.model import Branch, Call

    seen: set[str] = set()

    def walk(ops: tuple) -> None:
        for op in ops:
            if isinstance(op, Call) and op.function not in seen:
                seen.add(op.function)
                walk(model.function(op.function).ops)
            elif isinstance(op, Branch):
                walk(op.then)
                walk(op.orelse)

    walk(model.function(name).ops)
    return seen
