"""The result schema (schema/result.schema.json): every prediction and observation of generated models keeps it,
its TypedDict view and FIELD_LAYERS name exactly its fields, and `compare` / `blame` hold their properties over
documents drawn from the schema itself (hypothesis-jsonschema)."""

from __future__ import annotations

import copy
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.internal.conjecture import utils as _cu
from hypothesis_jsonschema import _from_schema, from_schema

from backends.kernel.objectset import observe_set_raw
from backends.kernel.observe import BackendUnavailable, observe_libbpf, observe_raw, open_libbpf, require_bpf
from backends.sim.observe import observe, observe_set
from generators.strategies import object_sets, program_models
from oracle.predict import predict
from oracle.profiles import profile
from schema import result as R
from schema.result import FIELD_LAYERS, LAYERS, compare, compare_set, schema_errors, schema_fields, validate
from suites.sets import compile_set, set_plan
from suites.sets import predict_for as predict_set_for
from suites.support import compile_global, runs_of

POSSIBLE, ONLINE = 2, [0, 1]  # the host has two CPUs: kernel runs stay on them
PROFILES = ("merged", "v1", "unpatched", "merged-unpatched-kernel", "raw-unpatched", "merged-nojit")
SIM_PROFILES = ("merged", "v1", "unpatched")
_REAL = settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
_DOCS = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))


def _kernel_usable() -> bool:
    try:
        require_bpf()
    except BackendUnavailable:
        return False
    return True


KERNEL = _kernel_usable()


def _kernel(observe_kernel: Callable[[], dict]) -> list[dict]:
    """The kernel backend's document, or none where bpf() (or libbpf) is not usable here."""
    try:
        return [observe_kernel()] if KERNEL else []
    except BackendUnavailable:
        return []


def _problems(docs: list[dict]) -> list[tuple[str, list[str]]]:
    return [(d["source"], p) for d in docs if (p := validate(d))]


# -- real documents ---------------------------------------------------------------------------------------------


@_REAL
@given(program_models(cpus=tuple(ONLINE)))
def test_every_prediction_and_observation_of_a_generated_model_keeps_the_schema(clang, model):
    compiled = compile_global(clang, model)
    runs = runs_of(model)
    docs = [predict(model, compiled.facts, profile(p), possible_cpus=POSSIBLE, online_cpus=ONLINE,
                    clang=clang.version) for p in PROFILES]
    docs += [observe(compiled.path, profile=p, possible_cpus=POSSIBLE, online_cpus=ONLINE, runs=runs)
             for p in SIM_PROFILES]
    docs += _kernel(lambda: observe_raw(compiled.path, runs=runs))
    docs += _kernel(lambda: observe_libbpf(compiled.path, libbpf=open_libbpf(), runs=runs))
    assert {d["source"] for d in docs} >= {"oracle", "sim", *(["kernel"] if KERNEL else [])}
    assert not _problems(docs)


class _Column:
    profile, possible_cpus, online_cpus = "merged", POSSIBLE, tuple(ONLINE)


@settings(_REAL, max_examples=5)
@given(object_sets(cpus=tuple(ONLINE)))
def test_object_set_documents_keep_the_schema(clang, model):
    compiled = compile_set(clang, model)
    plan = set_plan(compiled)
    docs = [predict_set_for(_Column(), compiled, clang),
            observe_set(plan, profile="merged", possible_cpus=POSSIBLE, online_cpus=ONLINE)]
    docs += _kernel(lambda: observe_set_raw(plan))
    assert all(d["schema"] == R.SET_SCHEMA for d in docs)
    assert not _problems(docs)


@pytest.mark.invalid_documents
def test_a_document_off_the_schema_is_named_by_its_field():
    doc = R.new_result("sim", R.new_env("merged"), None)
    doc["maps"].append(R.map_entry(name="m", kernel_name=None, section=".percpu", type="percpu_array",
                                   key_size=4, value_size=2, max_entries=1, flags=0, internal=True, created=True,
                                   before=["0000", "00"]))
    doc["programs"].append({**R.program_entry("p", "accepted"), "verdict": "maybe"})
    assert validate(doc) == ["programs[0].verdict: 'maybe' is not one of ['accepted', 'rejected', 'not_loaded']"]
    doc["programs"].clear()
    assert validate(doc) == ["map m: before slot of 1 bytes != value_size"]
    doc["maps"][0]["colour"] = "red"
    assert schema_errors(doc) == ["maps[0]: Additional properties are not allowed ('colour' was unexpected)"]
    with pytest.raises(ValueError, match="colour"):
        R.checked(doc)


# -- one set of facts -------------------------------------------------------------------------------------------

PARTS: dict[str, type] = {"result": R.ResultDoc, "object_set": R.ObjectSetDoc, "env": R.Env,
                          "object_ref": R.ObjectRef, "open": R.OpenStatus, "load": R.LoadStatus,
                          "variable": R.VariableEntry, "map": R.MapEntry, "program": R.ProgramEntry,
                          "run": R.RunEntry, "reuse": R.ReuseEntry}


@pytest.mark.parametrize("part", PARTS)
def test_each_typed_entry_has_exactly_the_schema_fields(part):
    node = R.json_schema()["$defs"][part]
    hints = typing.get_type_hints(PARTS[part], include_extras=True)
    optional = {k for k, h in hints.items() if typing.get_origin(h) is typing.NotRequired}
    assert set(hints) == set(node["properties"])
    assert set(hints) - optional == set(node["required"])


def test_field_layers_name_exactly_the_schema_fields():
    assert sorted(schema_fields()) == sorted(FIELD_LAYERS)
    assert set(FIELD_LAYERS.values()) <= {*LAYERS, None}
    # an entry missing on one side is blamed on its list's layer, as a changed key would be
    for key in ("variables.name", "maps.section", "maps.name", "programs.name"):
        assert FIELD_LAYERS[key] == FIELD_LAYERS[key.split(".")[0]], key


# -- compare and blame over documents drawn from the schema -----------------------------------------------------

class _LoopMany:
    """hypothesis-jsonschema 0.23.1 (the newest) drives Hypothesis' internal `many` with `while m.more():`, which
    Hypothesis 6.170 replaced by `with many(...) as m: for _ in m:`; this gives it the old loop over the new one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        self._many = _cu.many(*args, **kwargs)
        self._each: Iterator[None] | None = None

    def more(self) -> bool:
        if self._each is None:
            self._each = iter(self._many.__enter__())
        if next(self._each, StopIteration) is StopIteration:
            self._many.__exit__(None, None, None)
            return False
        return True

    def reject(self, why: str | None = None) -> None:
        self._many.reject(why)


if not hasattr(_cu.many, "more"):
    _from_schema.cu = SimpleNamespace(**{**vars(_cu), "many": _LoopMany})  # type: ignore[assignment]  # a stand-in module

_KEYED = ("variables", "maps", "programs")
_SMALL = 8  # longest generated string: a mutated name (longer) can never meet another one


def _bounded(node: Any) -> Any:  # noqa: ANN401
    """The schema with short lists and strings, and `env` closed, so documents are small to draw."""
    if isinstance(node, list):
        return [_bounded(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _bounded(v) for k, v in node.items()}
    types = out.get("type", ())
    if "array" in types:
        out["maxItems"] = 3
    if "string" in types and "pattern" not in out:
        out["maxLength"] = _SMALL
    return out


def _key(part: str, entry: dict) -> Any:  # noqa: ANN401
    if part == "maps" and entry["section"] is not None:
        return entry["section"]
    return entry["name"]


def _unique_keys(doc: Any) -> dict:  # noqa: ANN401 - a JSON value drawn from the result schema
    """Entries are matched by key: a document keys each entry once (the first entry of a key stays)."""
    for part in _KEYED:
        doc[part] = list({_key(part, e): e for e in reversed(doc[part])}.values())[::-1]
    return doc


def _documents() -> st.SearchStrategy[dict]:
    defs = _bounded(R.json_schema()["$defs"])
    defs["env"]["additionalProperties"] = False
    defs["env"]["properties"]["features"]["properties"] = {
        f: {"type": ["boolean", "null"]} for f in defs["env"]["properties"]["features"]["required"]}
    defs["env"]["properties"]["features"]["additionalProperties"] = False
    return from_schema({**defs["result"], "$defs": defs}).map(_unique_keys)


DOCUMENTS = _documents()


@dataclass(frozen=True)
class Site:
    """One place in a document: `field` as FIELD_LAYERS names it, `where` the keys leading to it; `where` ending
    in an entry's index (no key) stands for the entry itself, which the mutation removes."""

    field: str
    where: tuple[str | int, ...]


def _flip(hexstr: str) -> str:
    return ("1" if hexstr[0] == "0" else "0") + hexstr[1:]


_DEFS_OF = {"open": "open", "object": "object_ref", "load": "load", "variables": "variable", "maps": "map",
            "programs": "program", "runs": "run", "reuse": "reuse"}


def _enum(field: str) -> list[Any] | None:
    part, _, sub = field.partition(".")
    node = R.json_schema()["$defs"][_DEFS_OF[part]]["properties"][sub]
    return node.get("enum")


def _changed(field: str, value: Any) -> Any:  # noqa: ANN401
    """Another value of the same type, still in the schema."""
    if (choices := _enum(field)) is not None:
        return choices[(choices.index(value) + 1) % len(choices)]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if field in ("maps.before", "maps.after"):
        return [_flip(value[0]) if value[0] else "00", *value[1:]] if value else ["00"]
    if field == "runs.retval":
        return [*value, 0]
    if field == "object.sha256":
        return _flip(value)
    assert isinstance(value, str), field
    return value + "_mutated"


def _sites(doc: dict, compared: bool) -> list[Site]:
    """The places a one-field change can be made: those FIELD_LAYERS gives a layer (`compared`), or the rest.
    A null is not compared, so only non-null values are changed; `fault` is compared by presence."""
    out = []
    for part in ("open", "object", "load"):
        for f, v in (doc.get(part) or {}).items():
            if v is not None and (FIELD_LAYERS[f"{part}.{f}"] is not None) == compared:
                out.append(Site(f"{part}.{f}", (part, f)))
    for part in (*_KEYED, "runs", "reuse"):
        for i, entry in enumerate(doc.get(part, ())):
            if (FIELD_LAYERS[part] is not None) == compared:
                out.append(Site(part, (part, i)))
            for f, v in entry.items():
                if v is not None and f != "fault" and (FIELD_LAYERS[f"{part}.{f}"] is not None) == compared:
                    out.append(Site(f"{part}.{f}", (part, i, f)))
            if part == "runs" and compared:
                out.append(Site("runs.fault", (part, i, "fault")))
    if not compared:
        out.append(Site("env", ("env",)))
    return out


def _mutate(doc: dict, sites: list[Site]) -> dict:
    """A copy of `doc` with each site changed; entries are removed last, the highest index first."""
    out = copy.deepcopy(doc)
    removals = sorted((s.where for s in sites if isinstance(s.where[-1], int)), reverse=True)
    for s in sites:
        *path, last = s.where
        parent: Any = out
        for k in path:
            parent = parent[k]
        if s.field == "env":
            parent[last]["mutated"] = True  # env is open-ended: a fact of its own
        elif s.field == "runs.fault":
            if parent.pop(last, None) is None:  # a fault is a message: never empty
                parent[last] = "mutated"
        elif not isinstance(last, int):
            parent[last] = _changed(s.field, parent[last])
    for part, index in removals:
        del out[part][index]
    return out


def _fields(cmp: R.Comparison) -> dict[str, str]:
    return {d.field: d.layer for d in cmp.divergences}


@_DOCS
@given(DOCUMENTS)
def test_a_document_equals_itself(doc):
    assert compare(doc, copy.deepcopy(doc)).divergences == []


@_DOCS
@given(DOCUMENTS, st.data())
def test_a_one_field_change_is_blamed_on_the_layer_field_layers_names(doc, data):
    sites = _sites(doc, compared=True)
    assume(sites)
    site = data.draw(st.sampled_from(sites))
    changed = _mutate(doc, [site])
    assert schema_errors(changed) == []
    forward, backward = compare(doc, changed), compare(changed, doc)
    assert forward.divergences, site
    assert {d.layer for d in forward.divergences} == {FIELD_LAYERS[site.field]}, (site, forward.report())
    assert _fields(forward) == _fields(backward)


@_DOCS
@given(DOCUMENTS, st.data())
def test_a_field_field_layers_leaves_out_is_never_compared(doc, data):
    site = data.draw(st.sampled_from(_sites(doc, compared=False)))
    changed = _mutate(doc, [site])
    assert schema_errors(changed) == []
    assert compare(doc, changed).divergences == [], site


@_DOCS
@given(DOCUMENTS, st.data())
def test_blame_is_the_first_layer_in_order_among_the_changed_fields(doc, data):
    sites = _sites(doc, compared=True)
    assume(sites)
    # one change an entry (or open field): a later change to the same entry could hide an earlier one
    by_entry = {s.where[:2]: s for s in data.draw(st.lists(st.sampled_from(sites), min_size=1, max_size=4))}
    chosen = list(by_entry.values())
    cmp = compare(doc, _mutate(doc, chosen))
    layers = {layer for s in chosen if (layer := FIELD_LAYERS[s.field]) is not None}
    assert {d.layer for d in cmp.divergences} == layers
    assert cmp.blame() == next(layer for layer in LAYERS if layer in layers)
    only = data.draw(st.sampled_from(sorted(layers)))
    assert {d.layer for d in compare(doc, _mutate(doc, chosen), layers=(only,)).divergences} == {only}


@_DOCS
@given(DOCUMENTS, DOCUMENTS)
def test_compare_is_symmetric_in_which_fields_differ(a, b):
    assert _fields(compare(a, b)) == _fields(compare(b, a))


@pytest.mark.invalid_documents  # drawn documents keep the schema, not the slot lengths validate adds
@settings(_DOCS, max_examples=10)
@given(DOCUMENTS, st.data())
def test_an_object_set_compares_each_object_and_counts_them(doc, data):
    sites = _sites(doc, compared=True)
    assume(sites)
    site = data.draw(st.sampled_from(sites))
    env = R.new_env("merged")
    one, other = R.new_set_result("sim", env, [doc, doc]), R.new_set_result("sim", env, [doc, _mutate(doc, [site])])
    assert {d.layer for d in compare_set(one, other).divergences} == {FIELD_LAYERS[site.field]}
    fewer = compare_set(one, R.new_set_result("sim", env, [doc]))
    assert [(d.field, d.layer) for d in fewer.divergences] == [("objects (count)", FIELD_LAYERS["objects"])]
