"""The pipeline for object sets (docs/object-sets.md): compile every object, plan the load for a backend,
predict, observe, compare; a failing set leaves a bundle with every object's sources and files."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass

from generators.model import ObjectSet, dumps
from generators.render import lowered_value_size, section_ident
from oracle.objectset import predict_set
from oracle.profiles import profile
from schema import profiles as registry
from schema.objectset import SetPlan
from schema.result import LAYERS, Comparison, compare_set
from suites import known
from suites.support import (
    BundleError,
    Compiled,
    backend_meta,
    compile_global,
    compile_lowered,
    failures_dir,
    lowered_as_global,
    malformed,
    percpu_offsets,
)
from toolchain.clang import Clang


@dataclass(frozen=True)
class CompiledSet:
    model: ObjectSet
    objects: tuple[Compiled, ...]
    lowered: bool = False

    @property
    def sha(self) -> str:
        return "".join(c.facts.sha256[:4] for c in self.objects)


def compile_set(clang: Clang, model: ObjectSet) -> CompiledSet:
    return CompiledSet(model, tuple(compile_global(clang, m) for m in model.objects))


def compile_set_lowered(clang: Clang, compiled: CompiledSet) -> CompiledSet:
    return CompiledSet(compiled.model, tuple(compile_lowered(clang, c) for c in compiled.objects), lowered=True)


def set_plan(compiled: CompiledSet, initial_values: tuple[dict[str, bytes], ...] = ()) -> SetPlan:
    """The backend's instructions: a reused section is named by its map key (the lowered map's name in the
    lowered rendering); a reused map gets no initial value (its image is never written)."""
    model = compiled.model
    index = {m.name: k for k, m in enumerate(model.objects)}
    key = section_ident if compiled.lowered else (lambda s: s)
    reuse = tuple((index[r.object], key(r.section), index[r.source]) for r in model.reuse)
    attach = tuple((k, f.name, f.replaces.program, f.replaces.function)
                   for k, m in enumerate(model.objects) for f in m.extensions if f.replaces is not None)
    values = tuple({name: v for name, v in (initial_values[k] if k < len(initial_values) else {}).items()
                    if (k, name) not in {(r[0], r[1]) for r in reuse}}
                   for k in range(len(model.objects)))
    return SetPlan(tuple(c.path for c in compiled.objects), reuse, attach,
                   tuple((r.program, r.cpu, r.count) for r in model.schedule), values)


def predict_for(backend, compiled: CompiledSet, clang: Clang, profile_name: str | None = None) -> dict:  # noqa: ANN001
    return predict_set(compiled.model, [c.facts for c in compiled.objects], profile(profile_name or backend.profile),
                       possible_cpus=backend.possible_cpus, online_cpus=list(backend.online_cpus),
                       clang=clang.version)


def write_set_bundle(name: str, compiled: CompiledSet, documents: dict[str, dict], diff: str, meta: dict,
                     lowered: CompiledSet | None = None) -> str:
    root = failures_dir() / f"{name}-{compiled.sha}"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BundleError(f"cannot write the failure bundle to {root}: {e.strerror}") from None
    (root / "meta.json").write_text(json.dumps({**meta, "set": True}, indent=1))
    (root / "replay.txt").write_text(f"python -m suites.replay {root}\n")
    (root / "model.json").write_text(dumps(compiled.model))
    for c in compiled.objects + (lowered.objects if lowered else ()):
        suffix = "lowered" if c.path.stem.endswith("_lowered") else "global"
        (root / f"{c.model.name}.{suffix}.c").write_text(c.source)
        shutil.copy(c.path, root / c.path.name)
    for label, doc in documents.items():
        (root / f"{label}.json").write_text(json.dumps(doc, indent=1))
    (root / "diff.txt").write_text(diff + "\n")
    return str(root)


def assert_same_set(name: str, compiled: CompiledSet, expected: dict, observed: dict, *,
                    layers: tuple[str, ...] = LAYERS, meta: dict | None = None,
                    lowered: CompiledSet | None = None) -> Comparison:
    if (problem := malformed(expected, observed)) is not None:
        where = write_set_bundle(name, compiled, {"expected": expected, "observed": observed}, problem,
                                 {**(meta or {}), "check": name.split("-")[0], "layers": list(layers)}, lowered)
        raise AssertionError(f"{problem}; bundle {where}")
    cmp = compare_set(expected, observed, layers=layers)
    triaged = known.triage(cmp, observed)
    known.record(triaged)
    if not cmp.ok and not triaged.all_known:
        meta = {**(meta or {}), "check": name.split("-")[0], "layers": list(layers)}
        where = write_set_bundle(name, compiled, {"expected": expected, "observed": observed}, cmp.report(), meta,
                                 lowered)
        raise AssertionError(f"{expected['source']} vs {observed['source']}: {len(cmp.divergences)} divergence(s),"
                             f" blame {cmp.blame()}; bundle {where}\n{cmp.report()}{known.annotate(triaged)}")
    return cmp


def differential_set(name: str, backend, clang: Clang, model: ObjectSet,  # noqa: ANN001
                     layers: tuple[str, ...] = LAYERS) -> tuple[dict, dict]:
    compiled = compile_set(clang, model)
    expected = predict_for(backend, compiled, clang)
    observed = backend.observe_set(set_plan(compiled))
    assert_same_set(f"{name}-{backend.name}", compiled, expected, observed, layers=layers,
                    meta=backend_meta(backend))
    return expected, observed


def lowered_set_initial(compiled: CompiledSet, expected: dict) -> tuple[dict[str, bytes], ...]:
    """Each object's per-CPU section images as its lowered maps' starting values (the global image)."""
    out = []
    for c, exp in zip(compiled.objects, expected["objects"], strict=True):
        offsets = percpu_offsets(c)
        out.append({section_ident(m["section"]): c.facts.require_section(m["section"]).data.ljust(
            lowered_value_size(c.model, offsets, m["section"]), b"\0")
            for m in exp["maps"] if m["type"] == "percpu_array"})
    return tuple(out)


def set_as_global(observed: dict, expected: dict, compiled: CompiledSet) -> dict:
    """The lowered set observation re-keyed object by object as the global rendering."""
    return dict(observed, objects=[
        lowered_as_global(o, e, c.model) if e["open"]["ok"] and o["open"]["ok"] else o
        for o, e, c in zip(observed["objects"], expected["objects"], compiled.objects, strict=True)])


def sample_sets(n: int, cpus: tuple[int, ...]) -> list[ObjectSet]:
    """A fixed-seed sample of object sets: the same sets on every run and machine."""
    from generators.strategies import fixed_sample, object_sets

    return fixed_sample(object_sets(cpus=cpus), n)


def check_set_lowered_twin(clang: Clang, backend, model: ObjectSet) -> None:  # noqa: ANN001
    """The set's lowered rendering on the backend leaves the per-CPU contents predicted for the global one
    under the feature (profile merged)."""
    compiled = compile_set(clang, model)
    # the feature's semantics, on this kernel's other facts (a kernel refusing extension programs refuses them)
    expected = predict_for(backend, compiled, clang, registry.lowered_profile(backend.profile))
    lowered = compile_set_lowered(clang, compiled)
    observed = backend.observe_set(set_plan(lowered, lowered_set_initial(compiled, expected)))
    assert_same_set(f"setlowered-{backend.name}", compiled, expected, set_as_global(observed, expected, compiled),
                    layers=("runtime",), meta=backend_meta(backend), lowered=lowered)
