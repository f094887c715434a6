"""The one JSON shape for a Prediction and an Observation (`shared/spec/result-schema.md`), and its comparison.

The shape is `result.schema.json` (JSON Schema 2020-12); the TypedDicts below are its typed view. Results are
plain dicts so they serialise as they are and producers can fill them step by step; `new_result` builds the
skeleton, `validate` checks the contract, `compare` walks two results field by field and names the layer
`FIELD_LAYERS` gives each field.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict, cast

import jsonschema

SCHEMA = "percpu-conformance/result/1"
SOURCES = ("oracle", "sim", "kernel", "vm")
VERDICTS = ("accepted", "rejected", "not_loaded")
LAYERS = ("compiler", "loader", "verifier", "runtime")
SCHEMA_FILE = Path(__file__).with_name("result.schema.json")

Result = dict[str, Any]  # a ResultDoc being built or read; `checked` gives the typed view of a valid one

MAP_TYPE_NAMES = {1: "hash", 2: "array", 3: "prog_array", 6: "percpu_array"}


# -- the document's parts, as result.schema.json defines them (a test keeps the two in step) -------------------

Source = Literal["oracle", "sim", "kernel", "vm"]
Verdict = Literal["accepted", "rejected", "not_loaded"]


class Env(TypedDict):
    """Where the document was made; backends add facts of their own (open-ended, never compared)."""

    profile: str | None
    kernel_release: str | None
    libbpf: str | None
    bpftool: str | None
    clang: str | None
    possible_cpus: int | None
    online_cpus: list[int] | None
    features: dict[str, bool | None]


class ObjectRef(TypedDict):
    path: str
    sha256: str


class OpenStatus(TypedDict):
    ok: bool
    error_class: str | None
    message: str | None
    errno: NotRequired[int | None]


class LoadStatus(TypedDict):
    ok: bool
    errno: int | None
    message: str | None


class VariableEntry(TypedDict):
    name: str
    section: str
    offset: int
    size: int


class MapEntry(TypedDict):
    name: str | None
    kernel_name: str | None
    section: str | None  # null for a `.maps` map
    type: str | None
    key_size: int | None
    value_size: int | None
    max_entries: int | None
    flags: int | None
    internal: bool | None
    created: bool
    before: list[str] | None
    after: list[str] | None
    errno: NotRequired[int | None]
    message_class: NotRequired[str | None]
    message: NotRequired[str | None]
    placeholder_fd: NotRequired[bool]


class ProgramEntry(TypedDict):
    name: str
    loaded: bool
    verdict: Verdict
    errno: int | None
    message_class: str | None
    message: str | None
    xlated_insns: int | None
    attached: NotRequired[bool]
    attach_error: NotRequired[str]


class RunEntry(TypedDict):
    program: str
    cpu: int
    count: int
    retval: list[int | None] | None
    errno: NotRequired[int | None]
    error: NotRequired[str | None]
    fault: NotRequired[str]


class ReuseEntry(TypedDict):
    map: str
    source_fd: str
    rc: int


class ResultDoc(TypedDict):
    schema: str
    source: Source
    env: Env
    object: ObjectRef | None
    open: OpenStatus
    variables: list[VariableEntry]
    maps: list[MapEntry]
    programs: list[ProgramEntry]
    runs: list[RunEntry]
    loader: NotRequired[Literal["libbpf", "raw"]]
    load: NotRequired[LoadStatus]
    reuse: NotRequired[list[ReuseEntry]]


class ObjectSetDoc(TypedDict):
    schema: str
    source: Source
    env: Env
    objects: list[ResultDoc]


@functools.cache
def json_schema() -> dict[str, Any]:
    """result.schema.json, parsed once."""
    return cast(dict[str, Any], json.loads(SCHEMA_FILE.read_text()))


@functools.cache
def _validator() -> jsonschema.protocols.Validator:
    schema = json_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cast(jsonschema.protocols.Validator, cls(schema))


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


# Called with every document new_result and new_set_result make: producers fill a document step by step, so
# a watcher (the test session's, tests/conftest.py) checks it once it is complete. Empty outside tests.
DOCUMENT_WATCHERS: list[Callable[[dict[str, Any]], None]] = []


def _watched(doc: dict[str, Any]) -> dict[str, Any]:
    for watch in DOCUMENT_WATCHERS:
        watch(doc)
    return doc


def new_result(source: str, env: dict[str, Any], obj: dict[str, str] | None) -> Result:
    assert source in SOURCES, source
    return _watched({"schema": SCHEMA, "source": source, "env": env, "object": obj,
                     "open": {"ok": True, "error_class": None, "message": None},
                     "variables": [], "maps": [], "programs": [], "runs": []})


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


def schema_fields() -> list[str]:
    """The fields of a result document (and an object set's own), as FIELD_LAYERS names them: `open.ok`,
    `maps` (an entry's presence), `maps.before`; an open-ended object (`env`) is one field."""
    defs = json_schema()["$defs"]

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            node = defs[node["$ref"].removeprefix("#/$defs/")]
        return node

    def closed(node: dict[str, Any]) -> bool:
        return "properties" in node and node.get("additionalProperties") is False

    def walk(name: str, node: dict[str, Any]) -> Iterable[str]:
        node = resolve(node)
        if closed(node):
            for sub, child in node["properties"].items():
                yield from walk(f"{name}.{sub}" if name else sub, child)
        elif node.get("type") == "array" and closed(resolve(node.get("items", {}))):
            yield name
            if node["items"].get("$ref") != "#/$defs/result":  # an object set's objects: results, walked once
                yield from walk(name, node["items"])
        else:
            yield name

    out = list(walk("", defs["result"]))
    return out + [f for f in walk("", defs["object_set"]) if f not in out]


def validate(doc: Mapping[str, Any]) -> list[str]:
    """Contract violations of a result or object-set document, as readable lines (empty when it is well-formed):
    result.schema.json first, then what JSON Schema cannot say (slot lengths, `loaded` against `verdict`)."""
    problems = schema_errors(doc)
    if problems:
        return problems
    parts = doc["objects"] if doc["schema"] == SET_SCHEMA else [doc]
    for k, part in enumerate(parts):
        prefix = f"objects[{k}]: " if part is not doc else ""
        problems += [prefix + p for p in _semantic_problems(part)]
    return problems


def schema_errors(doc: Mapping[str, Any]) -> list[str]:
    """Where `doc` breaks result.schema.json, one line each (`maps[0].type: ...`)."""
    errors = sorted(_validator().iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{_where(e.absolute_path)}: {e.message}" for e in errors]


def _where(path: Iterable[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).removeprefix(".") or "(document)"


def _semantic_problems(result: Mapping[str, Any]) -> list[str]:
    problems = []
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
        if p["loaded"] != (p["verdict"] == "accepted"):
            problems.append(f"program {p['name']}: loaded {p['loaded']} with verdict {p['verdict']!r}")
    return problems


def checked(doc: Result) -> ResultDoc:
    """The typed view of a result document; ValueError with its problems when it is not one."""
    problems = validate(doc)
    if problems or doc["schema"] != SCHEMA:
        raise ValueError("not a result document: " + ("; ".join(problems) or f"schema {doc['schema']!r}"))
    return cast(ResultDoc, doc)


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


# Every field of result.schema.json (a list's own name stands for an entry's presence, or the list's length)
# and the layer a difference there is blamed on: the first layer whose mistake would show there. None: not
# compared (informative, an input both sides share, or a raw text whose class is compared instead). `compare`
# compares exactly the fields named here with a layer; a test keeps the keys equal to the schema's fields.
FIELD_LAYERS: dict[str, str | None] = {
    "schema": None, "source": None, "env": None, "object.path": None, "object.sha256": None,
    "open.ok": "loader", "open.error_class": "loader", "open.message": None, "open.errno": None,
    # a variable's place is clang's doing; whether it is reported at all is the loader's (a skipped section)
    "variables": "loader", "variables.name": "loader",
    "variables.section": "compiler", "variables.offset": "compiler", "variables.size": "compiler",
    # maps are known by their section (a `.maps` map, section null, by its name)
    "maps": "loader", "maps.section": "loader",
    "maps.name": "loader", "maps.kernel_name": "loader", "maps.type": "loader", "maps.key_size": "loader",
    "maps.value_size": "loader", "maps.max_entries": "loader", "maps.flags": "loader", "maps.internal": "loader",
    "maps.created": "loader", "maps.before": "loader", "maps.after": "runtime",
    "maps.errno": None, "maps.message_class": None, "maps.message": None, "maps.placeholder_fd": None,
    "programs": "verifier", "programs.name": "verifier",
    "programs.verdict": "verifier", "programs.errno": "verifier", "programs.message_class": "verifier",
    "programs.xlated_insns": "verifier", "programs.attached": "verifier",
    "programs.loaded": None, "programs.message": None, "programs.attach_error": None,
    # runs are matched by order; program, cpu and count are the schedule both sides were given
    "runs": "runtime", "runs.retval": "runtime", "runs.fault": "runtime",
    "runs.program": None, "runs.cpu": None, "runs.count": None, "runs.errno": None, "runs.error": None,
    "loader": None, "load.ok": None, "load.errno": None, "load.message": None,
    "reuse": None, "reuse.map": None, "reuse.source_fd": None, "reuse.rc": None,
    "objects": "loader",  # an object set: objects are matched by position
}


def _layer(name: str) -> str:
    layer = FIELD_LAYERS[name]
    assert layer is not None, f"{name} is not compared"
    return layer


def _compared(entries: str, key: str) -> tuple[str, ...]:
    """The compared fields of a list's entries, in FIELD_LAYERS' order, its key (which matches them) left out."""
    prefix = entries + "."
    return tuple(f[len(prefix):] for f, layer in FIELD_LAYERS.items()
                 if f.startswith(prefix) and layer is not None and f != prefix + key)


MAP_FIELDS = _compared("maps", "section")
PROGRAM_FIELDS = _compared("programs", "name")
VARIABLE_FIELDS = _compared("variables", "name")
SLOT_FIELDS = ("before", "after")


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
              fields: tuple[str, ...]) -> None:
        """Entries matched by `key`; an unmatched one is blamed on the list's layer, a field on its own."""
        key_of = key if callable(key) else itemgetter(key)
        exp = {key_of(e): e for e in expected}
        obs = {key_of(o): o for o in observed}
        presence = _layer(path)
        for k in exp.keys() - obs.keys():
            self.out.divergences.append(Divergence(f"{path}[{k}]", "present", "absent", presence))
        for k in obs.keys() - exp.keys():
            self.out.divergences.append(Divergence(f"{path}[{k}]", "absent", "present", presence))
        for k in sorted(exp.keys() & obs.keys(), key=str):
            for f in fields:
                where, layer = f"{path}[{k}].{f}", _layer(f"{path}.{f}")
                e, o = exp[k].get(f), obs[k].get(f)
                if f in SLOT_FIELDS and isinstance(e, list) and isinstance(o, list):
                    self.slots(where, e, o, layer)
                else:
                    self.leaf(where, e, o, layer)

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


def _map_key(entry: Mapping[str, Any], *, sections: bool) -> str | None:
    """A global-data map is known by its section; a `.maps` map (section null) only by its name."""
    return entry["section"] if sections and entry["section"] is not None else entry["name"]


def _compare(expected: Result, observed: Result, sections: bool) -> Comparison:
    w = _Walker()
    for f in ("ok", "error_class"):
        w.leaf(f"open.{f}", expected["open"].get(f), observed["open"].get(f), _layer(f"open.{f}"))
    w.keyed("variables", expected["variables"], observed["variables"], "name", VARIABLE_FIELDS)
    w.keyed("maps", expected["maps"], observed["maps"], functools.partial(_map_key, sections=sections), MAP_FIELDS)
    w.keyed("programs", expected["programs"], observed["programs"], "name", PROGRAM_FIELDS)
    if len(expected["runs"]) != len(observed["runs"]):
        w.out.divergences.append(Divergence("runs (count)", len(expected["runs"]), len(observed["runs"]),
                                            _layer("runs")))
    else:
        for i, (e, o) in enumerate(zip(expected["runs"], observed["runs"], strict=True)):
            w.leaf(f"runs[{i}].retval", e.get("retval"), o.get("retval"), _layer("runs.retval"))
            # a run that faulted has no retval to compare: whether it faulted is (the text is the backend's)
            if bool(e.get("fault")) != bool(o.get("fault")):
                w.out.divergences.append(Divergence(f"runs[{i}].fault", e.get("fault"), o.get("fault"),
                                                    _layer("runs.fault")))
    return w.out


# Several objects loaded side by side: one document holding one Result per object, in load order.
SET_SCHEMA = "percpu-conformance/object-set/1"
NOT_OPENED = "earlier_object_failed"  # open.error_class of an object after one that failed to open or load
REUSE_FAILED = "reuse_failed"  # open.error_class when a map to reuse was never created


def new_set_result(source: str, env: dict[str, Any], objects: list[Result]) -> dict[str, Any]:
    assert source in SOURCES, source
    return _watched({"schema": SET_SCHEMA, "source": source, "env": env, "objects": objects})


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
        out.divergences.append(Divergence("objects (count)", len(exp), len(obs), _layer("objects")))
        return out
    for e, o in zip(exp, obs, strict=True):
        cmp = compare(e, o, layers=layers)
        label = Path(e["object"]["path"]).name if e.get("object") else "?"
        out.divergences += [Divergence(f"{label}: {d.field}", d.expected, d.observed, d.layer)
                            for d in cmp.divergences]
        out.compared += cmp.compared
        out.not_compared += cmp.not_compared
    return out
