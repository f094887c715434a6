"""The known-divergence register (`suites/known_divergences.toml`): divergences between the prediction and a real
stack that are understood, reported upstream and deliberately not "fixed" in the oracle (it predicts the
documented intent). A comparison whose divergences are all matched by entries is *known*, not a failure; one
unmatched divergence fails as usual.

An entry matches only what it names: properties (globs), an environment (profile globs, libbpf and kernel version
ranges) and, per divergence, the compared field (glob), the expected and the observed value. Globs know only
`*` (any run of characters); field paths are full of `[` and `]`, which must stay literal.

Hits and the entries that applied reach the conformance matrix through `record`/`drain` (conftest copies them
into each test's user_properties, which pytest-xdist carries to the controller).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schema.result import Comparison, Divergence

REGISTER = Path(__file__).with_name("known_divergences.toml")

_RANGE_TERM = re.compile(r"^(>=|<=|==|>|<)\s*(\d+(?:\.\d+)*)$")


class RegisterError(ValueError):
    """The register file is unreadable or an entry is malformed; the message is one line."""


def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile("^" + ".*".join(re.escape(part) for part in pattern.split("*")) + "$")


def version_tuple(text: str) -> tuple[int, ...]:
    """The leading dotted number of a release string: "6.18.44-fc-v1147" -> (6, 18, 44)."""
    m = re.match(r"v?(\d+(?:\.\d+)*)", text)
    return tuple(int(p) for p in m.group(1).split(".")) if m else ()


def _parse_range(text: str, where: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    terms = []
    for raw in text.split(","):
        m = _RANGE_TERM.match(raw.strip())
        if not m:
            raise RegisterError(f"{where}: bad version range {text!r} (want e.g. '>=1.8,<1.9')")
        terms.append((m.group(1), tuple(int(p) for p in m.group(2).split("."))))
    return tuple(terms)


def _in_range(version: tuple[int, ...], terms: tuple[tuple[str, tuple[int, ...]], ...]) -> bool:
    def cmp(a: tuple[int, ...], b: tuple[int, ...]) -> int:
        n = max(len(a), len(b))
        a, b = a + (0,) * (n - len(a)), b + (0,) * (n - len(b))
        return (a > b) - (a < b)

    ok = {">=": lambda c: c >= 0, "<=": lambda c: c <= 0, "==": lambda c: c == 0, ">": lambda c: c > 0,
          "<": lambda c: c < 0}
    return bool(version) and all(ok[op](cmp(version, bound)) for op, bound in terms)


_ANY = object()  # a match's side given as `<side>_any = true`: any value (only with an entry's `requires`)


@dataclass(frozen=True)
class Match:
    """One divergence an entry explains: the field (glob), and exactly the expected and observed values."""

    field: str
    expected: Any
    observed: Any
    layer: str | None = None

    def covers(self, d: Divergence) -> bool:
        return (_glob(self.field).match(d.field) is not None and _same(self.expected, d.expected)
                and _same(self.observed, d.observed) and (self.layer is None or d.layer == self.layer))


def _same(wanted: Any, value: Any) -> bool:  # noqa: ANN401
    """Equal and of one type: a register's `false` must not explain a 0, nor `1` a True."""
    return wanted is _ANY or (type(wanted) is type(value) and wanted == value)


def _has_fact(doc: Any, fact: dict[str, Any]) -> bool:  # noqa: ANN401 - a JSON document
    """Some object inside `doc` holds every key of `fact` with its value."""
    if isinstance(doc, dict):
        if all(k in doc and doc[k] == v for k, v in fact.items()):
            return True
        return any(_has_fact(v, fact) for v in doc.values())
    if isinstance(doc, list):
        return any(_has_fact(v, fact) for v in doc)
    return False


@dataclass(frozen=True)
class KnownDivergence:
    id: str
    properties: tuple[str, ...]  # globs over "suites/test_x.py::test_name"
    matches: tuple[Match, ...]
    profiles: tuple[str, ...]  # globs over the observation's env.profile, any of which may match
    libbpf: str | None  # version range of env.libbpf; None: any (a null libbpf included)
    kernel_release: str | None  # version range of env.kernel_release; None: any
    reason: str
    upstream: str
    found: str
    # an observed fact (key/values of one object in the observation) without which no divergence is explained:
    # what pins a cascade of divergences to its cause
    requires: dict[str, Any] = field(default_factory=dict)

    def applies(self, prop: str, env: dict[str, Any], observed: dict[str, Any] | None = None) -> bool:
        """The entry's property, environment and required-fact filters hold: it could explain divergences here.
        (An entry that needs a fact applies only where the fact was observed: whether a generated example
        reaches it is chance, and must not read as "did not reproduce".)"""
        if self.requires and not _has_fact(observed, self.requires):
            return False
        if not any(_glob(p).match(prop) for p in self.properties):
            return False
        if not any(_glob(p).match(str(env.get("profile") or "")) for p in self.profiles):
            return False
        for key, wanted in (("libbpf", self.libbpf), ("kernel_release", self.kernel_release)):
            if wanted is not None:
                value = env.get(key)
                if not value or not _in_range(version_tuple(str(value)), _parse_range(wanted, self.id)):
                    return False
        return True

    def covers(self, d: Divergence) -> bool:
        return any(m.covers(d) for m in self.matches)


_REQUIRED = ("id", "property", "profile", "reason", "upstream", "found", "match")


def parse(data: dict[str, Any], where: str = "register") -> tuple[KnownDivergence, ...]:
    out, seen = [], set()
    for i, raw in enumerate(data.get("divergence", [])):
        label = f"{where}: divergence #{i + 1}"
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise RegisterError(f"{label} ({raw.get('id', '?')}): missing {', '.join(missing)}")
        if raw["id"] in seen:
            raise RegisterError(f"{label}: duplicate id {raw['id']!r}")
        seen.add(raw["id"])
        matches = []
        requires = dict(raw.get("requires", {}))
        for m in raw["match"]:
            sides = []
            for side in ("expected", "observed"):
                if m.get(f"{side}_any") is True and requires:
                    sides.append(_ANY)
                elif side in m:
                    sides.append(m[side])
                else:
                    raise RegisterError(f"{label} ({raw['id']}): a match needs field, expected and observed"
                                        " (`<side>_any = true` only with `requires`)")
            if "field" not in m:
                raise RegisterError(f"{label} ({raw['id']}): a match needs field, expected and observed")
            matches.append(Match(m["field"], sides[0], sides[1], m.get("layer")))
        props, profiles = (((v,) if isinstance(v, str) else tuple(v)) for v in (raw["property"], raw["profile"]))
        entry = KnownDivergence(raw["id"], props, tuple(matches), profiles, raw.get("libbpf"),
                                raw.get("kernel_release"), raw["reason"], raw["upstream"], str(raw["found"]),
                                requires)
        for wanted in (entry.libbpf, entry.kernel_release):
            if wanted is not None:
                _parse_range(wanted, entry.id)  # a bad range is a bad register, not a silent non-match
        out.append(entry)
    return tuple(out)


_LOADED: dict[Path, tuple[KnownDivergence, ...]] = {}


def register(path: Path = REGISTER) -> tuple[KnownDivergence, ...]:
    if path not in _LOADED:
        try:
            data = tomllib.loads(path.read_text())
        except OSError as e:
            raise RegisterError(f"cannot read {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise RegisterError(f"{path}: {e}") from None
        _LOADED[path] = parse(data, str(path))
    return _LOADED[path]


@dataclass
class Triage:
    applied: list[str] = field(default_factory=list)  # entries whose filters held
    hits: list[str] = field(default_factory=list)  # entries that explained a divergence, in order, once each
    unmatched: list[Divergence] = field(default_factory=list)

    @property
    def all_known(self) -> bool:
        """Divergences there were, and every one is explained."""
        return bool(self.hits) and not self.unmatched


def current_property() -> str:
    """The running pytest property ("suites/test_x.py::test_name", parameters dropped); "" outside pytest."""
    node = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    return node.split("[", 1)[0]


def triage(cmp: Comparison, observed: dict[str, Any], prop: str | None = None,
           entries: tuple[KnownDivergence, ...] | None = None) -> Triage:
    """Which of the comparison's divergences the register explains, for the observation `observed` (its env
    chooses the entries that apply)."""
    prop = current_property() if prop is None else prop
    env = observed.get("env") or {}
    applicable = [e for e in (register() if entries is None else entries) if e.applies(prop, env, observed)]
    out = Triage(applied=[e.id for e in applicable])
    for d in cmp.divergences:
        entry = next((e for e in applicable if e.covers(d)), None)
        if entry is None:
            out.unmatched.append(d)
        elif entry.id not in out.hits:
            out.hits.append(entry.id)
    return out


# (kind, id) pairs of the running test, kind "known" (a hit) or "known-applies"; drained by conftest.
_PENDING: list[tuple[str, str]] = []


def record(t: Triage) -> None:
    """Keep what this comparison applied and hit, for the running test's matrix cell (outside pytest: dropped)."""
    if not os.environ.get("PYTEST_CURRENT_TEST"):
        return
    _PENDING.extend(("known-applies", i) for i in t.applied)
    if t.all_known:
        _PENDING.extend(("known", i) for i in t.hits)


def drain() -> list[tuple[str, str]]:
    """The pending pairs, each once, and forget them."""
    out = list(dict.fromkeys(_PENDING))
    _PENDING.clear()
    return out


def annotate(t: Triage) -> str:
    """A failure's note on the register: what it explained, so only the rest needs reading."""
    return f"\nknown: {', '.join(t.hits)} (the other {len(t.unmatched)} divergence(s) are not)" if t.hits else ""
