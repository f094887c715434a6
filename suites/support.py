"""The pipeline every suite runs: render → compile → read → predict → observe → compare, and the bundle that
keeps a failing example on disk before it is reported (nothing is lost)."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from generators.ctype import Scalar, leaves
from generators.model import ProgramModel, dumps
from generators.render import render_global, render_lowered, section_ident
from schema.result import LAYERS, Comparison, Result, compare, validate
from suites import known
from toolchain.clang import Clang, compile_c
from toolchain.elf import ObjectFacts, read_object


@dataclass(frozen=True)
class Compiled:
    model: ProgramModel
    source: str
    path: Path
    facts: ObjectFacts


def compile_global(clang: Clang, model: ProgramModel) -> Compiled:
    source = render_global(model)
    path = compile_c(clang, source, name=model.name)
    return Compiled(model, source, path, read_object(path))


def percpu_offsets(compiled: Compiled) -> dict[str, int]:
    out = {}
    for v in compiled.model.variables:
        sym = compiled.facts.variable_symbol(v.section, v.name)
        if sym is not None:
            out[v.name] = sym.value
    return out


def compile_lowered(clang: Clang, compiled: Compiled) -> Compiled:
    source = render_lowered(compiled.model, percpu_offsets(compiled))
    path = compile_c(clang, source, name=compiled.model.name + "_lowered")
    return Compiled(compiled.model, source, path, read_object(path))


def failures_dir() -> Path:
    return Path(os.environ.get("PERCPU_FAILURES", "failures"))


def write_bundle(name: str, compiled: Compiled, documents: dict[str, Result], diff: str,
                 extra_sources: dict[str, str] | None = None, meta: dict | None = None) -> Path:
    """Everything needed to understand and replay a failure, written before the failure is raised."""
    root = failures_dir() / f"{name}-{compiled.facts.sha256[:12]}"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BundleError(f"cannot write the failure bundle to {root}: {e.strerror}") from None
    (root / "meta.json").write_text(json.dumps(meta or {}, indent=1))
    (root / "replay.txt").write_text(f"python -m suites.replay {root}\n")
    (root / "model.json").write_text(dumps(compiled.model))
    (root / "global.c").write_text(compiled.source)
    shutil.copy(compiled.path, root / compiled.path.name)
    for label, text in (extra_sources or {}).items():
        (root / label).write_text(text)
    for label, doc in documents.items():
        (root / f"{label}.json").write_text(json.dumps(doc, indent=1))
    (root / "diff.txt").write_text(diff + "\n")
    return root


def lowered_as_global(lowered: Result, global_result: Result, model: ProgramModel) -> Result:
    """The lowered observation re-keyed as the global rendering: each section's 1-entry PERCPU_ARRAY (named by
    `section_ident`) stands for that section's map, its value cut to the section size (the lowered struct may
    carry tail padding). Ordinary data maps, and `.maps` maps of the same name, are taken as they are."""
    out = json.loads(json.dumps(lowered))
    by_name = {m["name"]: m for m in lowered["maps"]}
    maps = []
    for m in global_result["maps"]:
        if m["type"] == "percpu_array":
            low = by_name.get(section_ident(m["section"]))
            if low is None:
                continue
            size = m["value_size"]
            cut = [[slot[: 2 * size] for slot in low[w]] if low[w] is not None else None
                   for w in ("before", "after")]
            # only the contents stand for the global map: names, flags and sizes are the lowered map's own
            maps.append({**{k: None for k in m}, "section": m["section"], "created": low["created"],
                         "before": cut[0], "after": cut[1]})
        elif m["section"] is None:  # a `.maps` map of both renderings (the tail calls' jmp_table)
            maps.extend(x for x in lowered["maps"] if x["section"] is None and x["name"] == m["name"])
        else:
            maps.extend(x for x in lowered["maps"] if x["section"] == m["section"])
    out["maps"] = maps
    out["variables"] = global_result["variables"]
    return out


class BundleError(OSError):
    """The failure could not be kept on disk: reported as its own outcome, never swallowed."""


def backend_meta(backend) -> dict:  # noqa: ANN001 - suites.backends.Backend
    """What a replay needs to build the same backend and to tell whether its environment is the recorded one."""
    env = getattr(backend, "env", None) or {}
    return {"backend": backend.name, "config": backend.config, "profile": backend.profile,
            "possible_cpus": backend.possible_cpus, "online_cpus": list(backend.online_cpus),
            "sim_profile": getattr(backend, "sim_profile", None),
            "environment": {k: env.get(k) for k in ("kernel_release", "libbpf", "libbpf_path", "stack")
                            if env.get(k) is not None}}


def malformed(*documents: Result) -> str | None:
    """Which document breaks result.schema.json, and where: every prediction and every observation, the vm's
    included (made in the guest, it reaches the host as JSON), keeps the one contract before it is compared."""
    for doc in documents:
        problems = validate(doc)
        if problems:
            return f"the {doc.get('source')} document breaks result.schema.json: " + "; ".join(problems[:5])
    return None


def assert_same(name: str, compiled: Compiled, expected: Result, observed: Result,
                extra_sources: dict[str, str] | None = None, layers: tuple[str, ...] = LAYERS,
                meta: dict | None = None) -> Comparison:
    if (problem := malformed(expected, observed)) is not None:
        where = write_bundle(name, compiled, {"expected": expected, "observed": observed}, problem, extra_sources,
                             {**(meta or {}), "check": name.split("-")[0], "layers": list(layers)})
        raise AssertionError(f"{problem}; bundle {where}")
    cmp = compare(expected, observed, layers=layers)
    triaged = known.triage(cmp, observed)
    known.record(triaged)
    if not cmp.ok and not triaged.all_known:
        meta = {**(meta or {}), "check": name.split("-")[0], "layers": list(layers)}
        where = write_bundle(name, compiled, {"expected": expected, "observed": observed}, cmp.report(),
                             extra_sources, meta)
        raise AssertionError(f"{expected['source']} vs {observed['source']}: {len(cmp.divergences)} divergence(s),"
                             f" blame {cmp.blame()}; bundle {where}\n{cmp.report()}{known.annotate(triaged)}")
    return cmp


def predict_for(backend, compiled: Compiled, clang: Clang) -> Result:  # noqa: ANN001 - suites.backends.Backend
    from oracle.predict import predict
    from oracle.profiles import profile

    return predict(compiled.model, compiled.facts, profile(backend.profile), possible_cpus=backend.possible_cpus,
                   online_cpus=list(backend.online_cpus), clang=clang.version)


def runs_of(model: ProgramModel) -> list[tuple[str, int, int]]:
    return [(r.program, r.cpu, r.count) for r in model.schedule]


def differential(name: str, backend, clang: Clang, model: ProgramModel,  # noqa: ANN001
                 layers: tuple[str, ...]) -> tuple[Result, Result]:
    """Predict and observe one model on one backend; fail (after writing the bundle) on any divergence in
    the fields `layers` own."""
    compiled = compile_global(clang, model)
    expected = predict_for(backend, compiled, clang)
    record_coverage(model, compiled, expected)
    observed = backend.observe(compiled, runs_of(model))
    assert_same(f"{name}-{backend.name}", compiled, expected, observed, layers=layers, meta=backend_meta(backend))
    return expected, observed


def predicted_reject(expected: Result) -> bool:
    return not expected["open"]["ok"] or any(p["verdict"] != "accepted" for p in expected["programs"])


# Layout-space coverage: what the generated programs reached, printed with the matrix at the end of a run.
COVERAGE: dict[str, Counter] = {}


def _bucket(size: int) -> str:
    for limit, name in ((8, "<=8"), (64, "<=64"), (1024, "<=1K"), (32 * 1024, "<=32K")):
        if size <= limit:
            return name
    return ">32K"


def record_coverage(model: ProgramModel, compiled: Compiled, expected: Result) -> None:
    """Count what this example reached and push generation toward the edges (32 KiB, 1-byte variables,
    many sections) with hypothesis.target; target's best examples are kept in the example database."""
    from hypothesis import target
    from hypothesis.control import currently_in_test_context

    from generators.ctype import Array, Enum, Scalar

    def kinds(t) -> list[str]:  # noqa: ANN001
        if isinstance(t, Scalar):
            return [t.kind]
        if isinstance(t, Enum):
            return ["enum"]
        if isinstance(t, Array):
            return ["array", *kinds(t.elem)]
        return [("packed " if t.packed else "") + t.kind, *(k for f in t.fields for k in kinds(f.type))]

    add = lambda family, key: COVERAGE.setdefault(family, Counter()).update([key])  # noqa: E731
    for v in model.variables:
        for k in kinds(v.type):
            add("types", k)
        add("alignments", str(v.type.align))
        add("sections", v.section)
    for m in expected["maps"]:
        if m["value_size"] is not None:
            add("value sizes", f"{m['type']} {_bucket(m['value_size'])}")
    add("section counts", str(len(model.sections())))
    for p in expected["programs"]:
        add("verdicts", f"{p['verdict']}/{p['message_class'] or '-'}")
    if not expected["open"]["ok"]:
        add("verdicts", f"open/{expected['open']['error_class']}")
    if not currently_in_test_context():
        return  # a fixed corpus case: nothing to steer
    percpu = [m["value_size"] for m in expected["maps"] if m["type"] == "percpu_array" and m["value_size"]]
    target(float(max(percpu, default=0)), label="largest per-CPU value (bytes)")
    target(float(len(model.sections())), label="sections")
    target(float(sum(1 for v in model.variables if v.type.size == 1)), label="1-byte variables")


def valid_for_types(model: ProgramModel, section: str, value: bytes, compiled: Compiled) -> bytes:
    """A `_Bool` holds 0 or 1 (any other byte is no value of the type, and clang may copy it as it is)."""
    out = bytearray(value)
    for v in model.variables:
        sym = compiled.facts.variable_symbol(section, v.name) if v.section == section else None
        if sym is None:
            continue
        for slot in leaves(v.type):
            if isinstance(slot.type, Scalar) and slot.type.kind == "bool":
                out[sym.value + slot.offset] &= 1
    return bytes(out)
