"""The known-divergence register: an entry explains exactly the divergences it names and nothing broader, an
entry that applied but never explained anything is reported, the matrix shows known cells; and the kernel
backend's detection of libbpf's placeholder memfd (the finding behind the register's first entries)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from schema.result import Comparison, Divergence
from suites import known

ENV = {"profile": "merged-unpatched-kernel+noext", "libbpf": "1.8.0", "kernel_release": "6.18.44-fc-v1147"}
PROP = "suites/test_verdicts.py::test_verdicts_match_the_prediction"
ENTRY = {
    "id": "class-swap", "property": ["suites/test_verdicts.py::*"], "profile": "merged-unpatched-kernel*",
    "libbpf": ">=1.8,<1.9", "kernel_release": "<7.3", "reason": "r", "upstream": "u", "found": "2026-12-03",
    "match": [{"field": "*programs[*].message_class", "expected": "map_not_created", "observed": "invalid_map_fd",
               "layer": "verifier"}],
}
SWAP = Divergence("programs[prog1].message_class", "map_not_created", "invalid_map_fd", "verifier")


def _entries(**changes: object) -> tuple[known.KnownDivergence, ...]:
    return known.parse({"divergence": [{**ENTRY, **changes}]})


def _triage(*divergences: Divergence, env: dict | None = None, prop: str = PROP, **changes: object) -> known.Triage:
    return known.triage(Comparison(list(divergences)), {"env": env or ENV}, prop, _entries(**changes))


def test_an_entry_explains_the_divergence_it_names():
    t = _triage(SWAP)
    assert t.all_known and t.hits == ["class-swap"] and t.applied == ["class-swap"]
    # a set's fields carry the object's file name in front
    assert _triage(Divergence("a.bpf.o: programs[p].message_class", "map_not_created", "invalid_map_fd",
                              "verifier")).all_known


def test_an_entry_with_several_profiles_applies_under_each_and_no_other():
    profiles = ["merged-unpatched-kernel*", "*+jitoff"]
    assert _triage(SWAP, profile=profiles).all_known
    assert _triage(SWAP, env={**ENV, "profile": "merged+jitoff"}, profile=profiles).all_known
    assert _triage(SWAP, env={**ENV, "profile": "merged"}, profile=profiles).applied == []


@pytest.mark.parametrize("other", [
    Divergence("programs[prog1].errno", 22, 1, "verifier"),  # another field of the same program
    Divergence("programs[prog1].message_class", "map_not_created", "other", "verifier"),  # another class
    Divergence("programs[prog1].message_class", "no_direct_value_access", "invalid_map_fd", "verifier"),
    Divergence("programs[prog1].verdict", "rejected", "accepted", "verifier"),
    Divergence("maps[.percpu].created", False, True, "loader"),
])
def test_an_entry_hides_nothing_else_under_the_same_property(other):
    t = _triage(SWAP, other)
    assert not t.all_known and t.unmatched == [other] and t.hits == ["class-swap"]
    assert not _triage(other).all_known


@pytest.mark.parametrize(("env", "prop"), [
    ({**ENV, "profile": "merged"}, PROP),
    ({**ENV, "libbpf": "1.9.0"}, PROP),
    ({**ENV, "libbpf": "1.7.0"}, PROP),
    ({**ENV, "libbpf": None}, PROP),
    ({**ENV, "kernel_release": "7.3.4"}, PROP),
    (ENV, "suites/test_maps.py::test_corpus_maps"),
    (ENV, ""),  # outside pytest
])
def test_an_entry_applies_only_where_its_filters_hold(env, prop):
    t = _triage(SWAP, env=env, prop=prop)
    assert t.applied == [] and not t.all_known and t.unmatched == [SWAP]


def test_values_compare_by_type_and_layer():
    entry = {"field": "*open.ok", "expected": False, "observed": True}
    assert _triage(Divergence("open.ok", False, True, "loader"), match=[entry]).all_known
    assert not _triage(Divergence("open.ok", 0, 1, "loader"), match=[entry]).all_known
    assert not _triage(Divergence("programs[p].message_class", "map_not_created", "invalid_map_fd", "loader")
                       ).all_known  # the entry names the verifier layer
    # brackets in a field glob are literal, not a character class
    assert not _triage(Divergence("programsX.message_class", "map_not_created", "invalid_map_fd", "verifier")
                       ).all_known


def test_requires_pins_an_entry_to_an_observed_fact():
    changes = {"requires": {"source_fd": "placeholder", "rc": 0},
               "match": [{"field": "*maps[.percpu*].value_size", "expected_any": True, "observed": 0}]}
    d = Divergence("b.bpf.o: maps[.percpu].value_size", 8, 0, "loader")
    fact = {"env": ENV, "objects": [{"reuse": [{"map": ".percpu", "source_fd": "placeholder", "rc": 0}]}]}
    assert known.triage(Comparison([d]), fact, PROP, _entries(**changes)).all_known
    refused = {"env": ENV, "objects": [{"reuse": [{"map": ".percpu", "source_fd": "placeholder", "rc": -22}]}]}
    for observed in (refused, {"env": ENV}):
        t = known.triage(Comparison([d]), observed, PROP, _entries(**changes))
        # without the fact the entry does not even apply: no "did not reproduce" for an unreached example
        assert not t.all_known and t.applied == []


@pytest.mark.parametrize(("changes", "message"), [
    ({"profile": None}, "missing profile"),
    ({"libbpf": "1.8"}, "bad version range"),
    ({"match": [{"field": "x", "expected": 1}]}, "needs field, expected and observed"),
    ({"match": [{"field": "x", "expected_any": True, "observed": 1}]}, "only with `requires`"),
])
def test_a_malformed_entry_is_one_line(changes, message):
    raw = {k: v for k, v in {**ENTRY, **changes}.items() if v is not None}
    with pytest.raises(known.RegisterError, match=message) as e:
        known.parse({"divergence": [raw]})
    assert "\n" not in str(e.value)


def test_the_register_names_the_placeholder_fd_divergence():
    entries = {e.id: e for e in known.register()}
    assert {"libbpf-placeholder-fd", "libbpf-placeholder-fd-reuse"} <= entries.keys()
    for e in entries.values():
        # each names where in the real source, and the finding written up for the list
        assert e.reason and re.search(r"\.c(:\d+)?", e.upstream) and "docs/findings.md#" in e.upstream
        assert e.found == "2026-12-03"
    t = known.triage(Comparison([SWAP]), {"env": ENV}, PROP)
    assert t.all_known and t.hits == ["libbpf-placeholder-fd"]
    # the system libbpf 1.1.2 column: nothing applies, so nothing is hidden
    assert known.triage(Comparison([SWAP]), {"env": {**ENV, "profile": "unpatched", "libbpf": "1.1.2"}},
                        PROP).applied == []


def _verdict_docs() -> tuple[dict, dict]:
    from schema.result import new_env, new_result, program_entry

    expected = new_result("oracle", new_env(ENV["profile"]), None)
    expected["programs"] = [program_entry("p", "rejected", errno=22, message_class="map_not_created")]
    observed = new_result("kernel", new_env(ENV["profile"], libbpf="1.8.0", kernel_release=ENV["kernel_release"]),
                          None)
    observed["programs"] = [program_entry("p", "rejected", errno=22, message_class="invalid_map_fd")]
    return expected, observed


def test_a_known_comparison_does_not_fail_assert_same(monkeypatch):
    from suites.support import assert_same

    expected, observed = _verdict_docs()
    monkeypatch.setenv("PYTEST_CURRENT_TEST", f"{PROP}[kernel-libbpf] (call)")
    known.drain()
    cmp = assert_same("verdicts-kernel-libbpf", None, expected, observed)  # type: ignore[arg-type]
    assert [d.field for d in cmp.divergences] == ["programs[p].message_class"]
    assert ("known", "libbpf-placeholder-fd") in known.drain()


@pytest.mark.invalid_documents
def test_a_document_that_breaks_the_schema_fails_before_any_comparison(monkeypatch, tmp_path):
    """An observation that arrived as JSON (the vm's) and lost a field is not a divergence to triage, known or not."""
    from suites import support

    monkeypatch.setattr(support, "write_bundle", lambda *a, **k: str(tmp_path / "bundle"))
    expected, observed = _verdict_docs()
    del observed["programs"][0]["loaded"]
    with pytest.raises(AssertionError, match=r"the kernel document breaks result.schema.json: programs\[0\]"):
        support.assert_same("verdicts-kernel-libbpf", None, expected, observed)  # type: ignore[arg-type]


# -- the matrix ---------------------------------------------------------------------------------------------


def _report(column: str, outcome: str, props: list[tuple[str, str]]) -> SimpleNamespace:
    return SimpleNamespace(nodeid=f"suites/test_x.py::test_p[{column}]", when="call", outcome=outcome,
                           skipped=False, longrepr=None, user_properties=[("column", column), *props])


def test_matrix_shows_known_cells_and_entries_that_did_not_reproduce(monkeypatch, tmp_path):
    import json

    import conftest

    monkeypatch.setattr(conftest, "_MATRIX", {})
    monkeypatch.setenv("PERCPU_REPORTS", str(tmp_path))
    conftest.pytest_runtest_logreport(_report("kernel-libbpf", "passed", [
        ("known-applies", "a"), ("known-applies", "b"), ("known", "a")]))
    conftest.pytest_runtest_logreport(_report("kernel-raw", "passed", []))
    cells = {c: conftest._cell_text(v) for (_, c), v in conftest._MATRIX.items()}
    assert cells == {"kernel-libbpf": "known: a", "kernel-raw": "pass"}
    assert conftest._known_not_reproduced() == [("kernel-libbpf", "b")]
    lines: list[str] = []
    reporter = SimpleNamespace(section=lambda *a, **k: None, write_line=lines.append)
    conftest.pytest_terminal_summary(reporter)
    assert "known divergence b did not reproduce (kernel-libbpf)" in lines
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["known_not_reproduced"] == [{"column": "kernel-libbpf", "id": "b"}]
    assert results["matrix"]["suites/test_x.py::test_p|kernel-libbpf"]["known"] == {"a": 1}
    # a failure stays a failure, whatever else was known
    conftest.pytest_runtest_logreport(_report("kernel-libbpf", "failed", []))
    assert conftest._cell_text(conftest._MATRIX["suites/test_x.py::test_p", "kernel-libbpf"]) == "FAIL"


# -- libbpf's placeholder memfd in the kernel backend ---------------------------------------------------------


@pytest.fixture
def placeholder():
    fd = os.memfd_create("libbpf-placeholder-fd", os.MFD_CLOEXEC)
    yield fd
    os.close(fd)


@pytest.fixture
def real_map():
    from backends.kernel import bpf
    from backends.kernel.observe import BackendUnavailable, require_bpf

    try:
        require_bpf()
    except BackendUnavailable as e:
        pytest.skip(str(e))
    with bpf.map_create(bpf.PERCPU_ARRAY, 4, 8, 1) as m:
        yield m.fileno()


def test_fd_kind_tells_a_placeholder_from_a_map(placeholder, real_map, tmp_path):
    from backends.kernel.libbpf import fd_kind

    assert fd_kind(real_map) == "map"
    assert fd_kind(placeholder) == "placeholder"
    assert fd_kind(-1) == "none"
    with open(tmp_path / "f", "w") as f:
        assert fd_kind(f.fileno()) == "other"


class _FakeObject:
    """What libbpf 1.8 answers after loading an object whose per-CPU map it skipped: bpf_map__fd is the memfd."""

    def __init__(self, fd: int) -> None:
        from backends.kernel.libbpf import MapView, fd_kind

        self.view = MapView(".percpu", 6, 4, 8, 1, 0, None, True, False, fd, fd_kind(fd))
        self.fd = fd
        self.reused: list[int] = []

    def load(self) -> None: ...
    def maps(self) -> list:
        return [self.view]
    def programs(self) -> list:
        return []
    def map_index(self, key: str) -> int:
        return 0
    def map_fd(self, key: str) -> int:
        return self.fd
    def reuse_fd(self, key: str, fd: int) -> int:
        self.reused.append(fd)
        return 0  # libbpf's fdinfo fallback accepts the memfd


@pytest.fixture
def session_of(tmp_path):
    from backends.kernel.observe import LibbpfSession
    from toolchain.clang import Clang, ToolchainError, compile_c

    try:
        clang = Clang.find()
    except ToolchainError as e:
        pytest.skip(str(e))
    src = ('int x __attribute__((section(".percpu"), used)) = 1;\n'
           'char LICENSE[] __attribute__((section("license"), used)) = "GPL";\n')
    obj = compile_c(clang, src, name="placeholder_only")

    def make(fd: int) -> LibbpfSession:
        s = LibbpfSession(obj, libbpf=None, env={})  # type: ignore[arg-type]
        s.obj = _FakeObject(fd)  # type: ignore[assignment]
        s.views, s.sections = s.obj.maps(), [".percpu"]
        return s

    return make


@pytest.mark.invalid_documents  # a bare session: its env is not probed
def test_a_placeholder_fd_is_no_created_map(session_of, placeholder):
    s = session_of(placeholder)
    assert s.load()  # bpf.map_info on the memfd would raise EINVAL
    [m] = s.result["maps"]
    assert m["created"] is False and m["kernel_name"] is None and m["placeholder_fd"] is True
    s.snapshot("before")
    assert m["before"] is None
    assert s.map_fd(".percpu") is None and s.placeholder_fd(".percpu") == placeholder


@pytest.mark.invalid_documents  # a bare session: its env is not probed
def test_a_real_map_fd_is_a_created_map(session_of, real_map):
    s = session_of(real_map)
    assert s.load()
    [m] = s.result["maps"]
    assert m["created"] is True and "placeholder_fd" not in m
    assert s.map_fd(".percpu") == real_map and s.placeholder_fd(".percpu") is None


@pytest.mark.invalid_documents  # bare sessions: their env is not probed
def test_reuse_of_a_placeholder_is_observed_as_libbpf_answers(session_of, placeholder):
    from backends.kernel.objectset import _set_reuse
    from schema.objectset import SetPlan

    a, b = session_of(placeholder), session_of(placeholder)
    plan = SetPlan((Path(a.path), Path(b.path)), reuse=((1, ".percpu", 0),))
    assert _set_reuse(plan, 1, b, [a, b])
    assert b.obj.reused == [placeholder]
    assert b.result["reuse"] == [{"map": ".percpu", "source_fd": "placeholder", "rc": 0}]
    assert b.result["open"]["ok"]
