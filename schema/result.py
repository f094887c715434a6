"""The one JSON shape for a Prediction and an Observation (`shared/spec/result-schema.md`), and its comparison.

Results are plain dicts so they serialise as they are; `new_result` builds the skeleton, `validate` checks the
contract, `compare` walks two results field by field and names the layer to blame for each difference.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any

SCHEMA = "percpu-conformance/result/1"
SOURCES = ("oracle", "sim", "kernel", "vm")
VERDICTS = ("accepted", "rejected", "not_loaded")
LAYERS = ("compiler", "loader", "verifier", "runtime")

Result = dict[str, Any]

MAP_TYPE_NAMES = {1: "hash", 2: "array", 3: "prog_array", 6: "percpu_array"}


def new_env(profile: str, **facts: Any) -> dict[str, Any]:  # noqa: ANN401
    env: dict[str, Any] = {"profile": profile, "kernel_release": None, "libbpf": None, "bpftool": None,
                           "clang": None, "possible_cpus": None, "online_cpus": None,
                           "features": {"percpu_data": None, "bpf_f_cpu": None, "percpu_insn_jit": None}}
    for key, value in facts.items():
        if key == "features":
            env["features"].update(value)
        else:
            env[key] = value
    return env


def object_ref(path: str | Path) -> dict[str, str]:
    data = Path(path).read_bytes()
    return {"path": str(path), "sha256": hashlib.sha256(data).hexdigest()}


def new_result(source: str, env: dict[str, Any], obj: dict[str, str] | None) -> Result:
    assert source in SOURCES, source
    return {"schema": SCHEMA, "source": source, "env": env, "object": obj,
            "open": {"ok": True, "error_class": None, "message": None},
            "variables": [], "maps": [], "programs": [], "runs": []}


def map_entry(*, name: str | None, kernel_name: str | None, section: str | None, type: str,  # noqa: A002
              key_size: int | None, value_size: int | None, max_entries: int | None, flags: int | None,
              internal: bool | None, created: bool, before: list[str] | None = None,
              after: list[str] | None = None) -> dict:
    return {"name": name, "kernel_name": kernel_name, "section": section, "type": type, "key_size": key_size,
            "value_size": value_size, "max_entries": max_entries, "flags": flags, "internal": internal,
            "created": created, "before": before, "after": after}


def program_entry(name: str, verdict: str, *, errno: int | None = 0, message_class: str | None = None,
                  message: str | None = None, xlated_insns: int | None = None) -> dict:
    assert verdict in VERDICTS, verdict
    return {"name": name, "loaded": verdict == "accepted", "verdict": verdict, "errno": errno,
            "message_class": message_class, "message": message, "xlated_insns": xlated_insns}


def validate(result: Result) -> list[str]:
    """Contract violations, as readable lines (empty when the document is well-formed)."""
    problems = []
    for key in ("schema", "source", "env", "object", "open", "variables", "maps", "programs", "runs"):
        if key not in result:
            problems.append(f"missing {key}")
    if problems:
        return problems
    if result["schema"] != SCHEMA:
        problems.append(f"schema {result['schema']!r} != {SCHEMA!r}")
    for m in result["maps"]:
        for when in ("before", "after"):
            slots = m.get(when)
            if slots is None:
                continue
            if not m["created"]:
                problems.append(f"map {m['name']}: {when} given for a map that was not created")
            for s in slots:
                if m["value_size"] is not None and len(s) != 2 * m["value_size"]:
                    problems.append(f"map {m['name']}: {when} slot of {len(s) // 2} bytes != value_size")
    for p in result["programs"]:
        if p["verdict"] not in VERDICTS:
            problems.append(f"program {p['name']}: verdict {p['verdict']!r}")
    return problems


@dataclass
class Divergence:
    field: str
    expected: Any
    observed: Any
    layer: str

    def __str__(self) -> str:
        return f"[{self.layer}] {self.field}: expected {_short(self.expected)}, observed {_short(self.observed)}"


@dataclass
class Comparison:
    divergences: list[Divergence] = field(default_factory=list)
    compared: int = 0
    not_compared: int = 0  # a null on either side

    @property
    def ok(self) -> bool:
        return not self.divergences

    def blame(self) -> str | None:
        """The earliest layer that diverges: later layers usually diverge because of it."""
        layers = {d.layer for d in self.divergences}
        return next((layer for layer in LAYERS if layer in layers), None)

    def report(self) -> str:
        return "\n".join(str(d) for d in self.divergences)


def _short(value: Any) -> str:  # noqa: ANN401
    text = repr(value)
    return text if len(text) <= 160 else text[:150] + f"…({len(text)} chars)"


# Which layer a field belongs to: the first layer whose mistake would show there.
FIELD_LAYERS = {
    "variables": "compiler",
    "open": "loader",
    "maps": "loader",
    "maps.before": "loader",
    "maps.after": "runtime",
    "programs": "verifier",
    "runs": "runtime",
}
MAP_FIELDS = ("name", "kernel_name", "type", "key_size", "value_size", "max_entries", "flags", "internal",
              "created", "before", "after")
PROGRAM_FIELDS = ("verdict", "errno", "message_class", "xlated_insns", "attached")


class _Walker:
    def __init__(self) -> None:
        self.out = Comparison()

    def leaf(self, path: str, expected: Any, observed: Any, layer: str) -> None:  # noqa: ANN401
        if expected is None or observed is None:
            self.out.not_compared += 1
            return
        self.out.compared += 1
        if expected != observed:
            self.out.divergences.append(Divergence(path, expected, observed, layer))

    def keyed(self, path: str, expected: list[dict], observed: list[dict], key: str | Callable[[dict], Any],
              fields: tuple[str, ...], layer_of: dict[str, str], layer: str, presence_layer: str | None = None) -> None:
        key_of = key if callable(key) else itemgetter(key)
        exp = {key_of(e): e for e in expected}
        obs = {key_of(o): o for o in observed}
        presence = presence_layer or layer
        for k in exp.keys() - obs.keys():
            self.out.divergences.append(Divergence(f"{path}[{k}]", "present", "absent", presence))
        for k in obs.keys() - exp.keys():
            self.out.divergences.append(Divergence(f"{path}[{k}]", "absent", "present", presence))
        for k in sorted(exp.keys() & obs.keys(), key=str):
            for f in fields:
                where = f"{path}[{k}].{f}"
                e, o = exp[k].get(f), obs[k].get(f)
                if f in ("before", "after") and isinstance(e, list) and isinstance(o, list):
                    self.slots(where, e, o, layer_of.get(f, layer))
                else:
                    self.leaf(where, e, o, layer_of.get(f, layer))

    def slots(self, path: str, expected: list[str], observed: list[str], layer: str) -> None:
        if len(expected) != len(observed):
            self.out.divergences.append(Divergence(f"{path} (slots)", len(expected), len(observed), layer))
            return
        for cpu, (e, o) in enumerate(zip(expected, observed, strict=True)):
            self.leaf(f"{path}[cpu{cpu}]", e, o, layer)


def compare(expected: Result, observed: Result, *, sections: bool = True,
            layers: tuple[str, ...] = LAYERS) -> Comparison:
    """Field-by-field comparison; maps are matched by section (`.maps` maps, and all maps when not `sections`,
    by name), programs by name, runs by order.
    `layers` restricts the comparison to the fields those layers own."""
    full = _compare(expected, observed, sections)
    if layers == LAYERS:
        return full
    return Comparison([d for d in full.divergences if d.layer in layers], full.compared, full.not_compared)


def _map_key(entry: dict, *, sections: bool) -> str | None:
    """A global-data map is known by its section; a `.maps` map (section null) only by its name."""
    return entry["section"] if sections and entry["section"] is not None else entry["name"]


def _compare(expected: Result, observed: Result, sections: bool) -> Comparison:
    w = _Walker()
    for f in ("ok", "error_class"):
        w.leaf(f"open.{f}", expected["open"].get(f), observed["open"].get(f), "loader")
    # a variable's place is clang's doing; whether it is reported at all is the loader's (a skipped section)
    w.keyed("variables", expected["variables"], observed["variables"], "name", ("section", "offset", "size"),
            {}, "compiler", presence_layer="loader")
    w.keyed("maps", expected["maps"], observed["maps"], functools.partial(_map_key, sections=sections), MAP_FIELDS,
            {"before": "loader", "after": "runtime"}, "loader")
    w.keyed("programs", expected["programs"], observed["programs"], "name", PROGRAM_FIELDS, {}, "verifier")
    if len(expected["runs"]) != len(observed["runs"]):
        w.out.divergences.append(Divergence("runs (count)", len(expected["runs"]), len(observed["runs"]),
                                            "runtime"))
    else:
        for i, (e, o) in enumerate(zip(expected["runs"], observed["runs"], strict=True)):
            w.leaf(f"runs[{i}].retval", e.get("retval"), o.get("retval"), "runtime")
            if o.get("fault") and not e.get("fault"):  # a run that faulted has no retval to compare
                w.out.divergences.append(Divergence(f"runs[{i}].fault", None, o["fault"], "runtime"))
    return w.out


# Several objects loaded side by side: one document holding one Result per object, in load order.
SET_SCHEMA = "percpu-conformance/object-set/1"
NOT_OPENED = "earlier_object_failed"  # open.error_class of an object after one that failed to open or load
REUSE_FAILED = "reuse_failed"  # open.error_class when a map to reuse was never created


def new_set_result(source: str, env: dict[str, Any], objects: list[Result]) -> dict[str, Any]:
    assert source in SOURCES, source
    return {"schema": SET_SCHEMA, "source": source, "env": env, "objects": objects}


def not_opened(result: Result, failed: str, programs: list[str]) -> Result:
    """An object the set never opened because `failed`, loaded before it, failed."""
    result["open"] = {"ok": False, "error_class": NOT_OPENED, "message": f"not opened: object {failed} failed"}
    result["programs"] = [program_entry(p, "not_loaded", errno=None) for p in programs]
    result["maps"], result["variables"], result["runs"] = [], [], []
    return result


def compare_set(expected: dict[str, Any], observed: dict[str, Any], *,
                layers: tuple[str, ...] = LAYERS) -> Comparison:
    """Each object's Result compared as `compare` does, objects matched by position; fields are prefixed with
    the object's file name."""
    out = Comparison()
    exp, obs = expected["objects"], observed["objects"]
    if len(exp) != len(obs):
        out.divergences.append(Divergence("objects (count)", len(exp), len(obs), "loader"))
        return out
    for e, o in zip(exp, obs, strict=True):
        cmp = compare(e, o, layers=layers)
        label = Path(e["object"]["path"]).name if e.get("object") else "?"
        out.divergences += [Divergence(f"{label}: {d.field}", d.expected, d.observed, d.layer)
                            for d in cmp.divergences]
        out.compared += cmp.compared
        out.not_compared += cmp.not_compared
    return out
