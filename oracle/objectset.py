"""Predict an object set (docs/object-sets.md): objects loaded in order into one kernel, maps reused by fd,
extension programs running in place of their targets' functions.

Each object is predicted as on its own (`predict_load`); the set adds what only a set has: an object after a
failed one is never opened, a reused map is the source's map (its own image never written), and a run of a
target program executes the attached extension on the extension's own variables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from generators.model import ObjectSet
from oracle.predict import Loaded, object_name, predict_load, run_entry, snapshot
from oracle.profiles import Profile
from schema.result import REUSE_FAILED, new_result, new_set_result, not_opened
from toolchain.elf import ObjectFacts
from toolchain.uapi import BPF_OBJ_NAME_LEN  # noqa: E402


def reused_map_name(own: str, source_kernel_name: str, *, keeps_section_name: bool = False) -> str:
    """libbpf's bpf_map__reuse_fd: the map takes the kernel's name for it, unless that is a full-length
    (15-character) prefix of its own name, which it keeps [V: libbpf "Fix the name of a reused map"]. A per-CPU
    map, and a custom .data.*/.rodata.* one, answers bpf_map__name with its section name whatever the reuse
    did (audit §A10, libbpf's map_uses_real_name). A deliberate second implementation of objload's rule."""
    if keeps_section_name:
        return own
    if len(source_kernel_name) == BPF_OBJ_NAME_LEN - 1 and own.startswith(source_kernel_name):
        return own
    return source_kernel_name


def predict_set(model: ObjectSet, facts: Sequence[ObjectFacts], profile: Profile, *, possible_cpus: int,
                online_cpus: list[int], clang: str | None = None,
                initial_images: Sequence[Mapping[str, bytes]] = ()) -> dict:
    states: list[Loaded | None] = []
    results = []
    failed: str | None = None
    by_name: dict[str, int] = {m.name: k for k, m in enumerate(model.objects)}
    for k, (obj, f) in enumerate(zip(model.objects, facts, strict=True)):
        if failed is not None:
            empty = new_result("oracle", {}, {"path": str(f.path), "sha256": f.sha256})
            results.append(not_opened(empty, failed, [p.name for p in obj.programs]))
            states.append(None)
            continue
        static_targets = frozenset(e.name for e in obj.extensions if not _target_exported(model, e.replaces))
        state = predict_load(obj, f, profile, possible_cpus=possible_cpus, online_cpus=online_cpus, clang=clang,
                             initial_images=initial_images[k] if k < len(initial_images) else None,
                             static_targets=static_targets)
        if state.machine is not None and not _apply_reuse(model, obj.name, state, states, by_name):
            state.loaded = state.readable = False
        for p in state.result["programs"]:
            if any(e.name == p["name"] for e in obj.extensions):
                p["attached"] = state.loaded
        results.append(state.result)
        states.append(state)
        if not state.loaded:
            failed = object_name(f.path.name)
    _attach(model, states, by_name)
    live = [s for s in states if s is not None and s.machine is not None]
    for s in live:
        snapshot(s, "before")
    for run in model.schedule:
        k = by_name[model.owner(run.program).name]
        owner = states[k]
        if owner is not None and owner.machine is not None:
            owner.result["runs"].append(run_entry(owner, run))
    for s in live:
        snapshot(s, "after")
    env = results[0]["env"]
    for r in results:
        r["env"] = env
    return new_set_result("oracle", env, results)


def _target_exported(model: ObjectSet, target) -> bool:  # noqa: ANN001 - generators.model.Replace
    owner = model.owner(target.program)
    return owner.function(target.function).exported


def _apply_reuse(model: ObjectSet, obj: str, state: Loaded, states: list[Loaded | None],
                 by_name: dict[str, int]) -> bool:
    """Point each reused map at its source's; False (and the object's open marked failed) when a source map
    was never created."""
    assert state.machine is not None
    for reuse in (r for r in model.reuse if r.object == obj):
        source = states[by_name[reuse.source]]
        src_map = None
        if source is not None:
            src_map = next((m for m in source.result["maps"] if m["section"] == reuse.section), None)
        if source is None or source.machine is None or src_map is None or not src_map["created"]:
            state.result["open"] = {"ok": False, "error_class": REUSE_FAILED,
                                    "message": f"map '{reuse.section}': cannot reuse a map that was not created"}
            for p in state.result["programs"]:
                p.update(verdict="not_loaded", loaded=False, errno=None, message_class=None, message=None,
                         xlated_insns=None)
            state.result["maps"] = [dict(m, created=False) for m in state.result["maps"]]
            return False
        own = next(m for m in state.result["maps"] if m["section"] == reuse.section)
        # a map this libbpf names after its section uses its real name (custom data sections; merged per-CPU)
        keeps = own["section"] is not None and own["name"] == own["section"]
        own.update(name=reused_map_name(own["name"], src_map["kernel_name"], keeps_section_name=keeps),
                   kernel_name=src_map["kernel_name"],
                   type=src_map["type"], key_size=src_map["key_size"], value_size=src_map["value_size"],
                   max_entries=src_map["max_entries"], flags=src_map["flags"], created=state.readable)
        # the same kernel map: one set of per-CPU images, the reusing object's image never written
        state.machine.images[reuse.section] = source.machine.images[reuse.section]
        state.machine.percpu[reuse.section] = source.machine.percpu[reuse.section]
    return True


def _attach(model: ObjectSet, states: list[Loaded | None], by_name: dict[str, int]) -> None:
    for k, obj in enumerate(model.objects):
        state = states[k]
        if state is None or not state.loaded or state.machine is None:
            continue
        for ext in obj.extensions:
            assert ext.replaces is not None
            target = states[by_name[model.owner(ext.replaces.program).name]]
            assert target is not None and target.machine is not None
            target.machine.replacements[(ext.replaces.program, ext.replaces.function)] = (state.machine, ext.name)
