"""Each catalogued fault is caught by the conformance properties on the `ci` budget, by the property and with the
blamed layer its record expects; without a fault every property passes on the same budget (so catching means
something). Each run is deterministic (derandomized, no example database) and tries the properties in
`PROPERTIES` order, stopping at the first that fails. The outcome of every fault is written to
`reports/faults.json` (or `$PERCPU_REPORTS/faults.json`) at the end of the module: the property that caught it,
the layer its failure blames, `seconds_to_detect` (from the start of the fault's run, earlier properties
included, to the first failing example), `seconds_to_shrink` (from there to the reported failure),
`reproducer_vars` (variables in the shrunk model; 1 for an instruction-level verifier case) and `shrink_cut`
(shrinking stopped at SHRINK_SECONDS with the smallest failure found so far). A fault whose trigger the ci budget
reaches only by luck carries a `steer`, a filter on the examples of the property expected to catch it; the
steered examples must pass without the fault.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import HypothesisException

from generators.asm import VerifierCase, verifier_cases
from generators.model import ObjectSet, ProgramModel
from generators.strategies import object_sets, program_models
from suites.backends import SimBackend
from suites.sets import differential_set
from suites.support import differential
from suites.test_lowered_twin import check_lowered_twin
from suites.test_verifier import check_case
from tests.faults.catalogue import FAULTS, PROPERTIES, ROOT, Fault

CI = settings.get_profile("ci")
# test_verifier runs ten times the profile's budget: its cases are cheap (a few ms)
VERIFIER_FACTOR = 10
# Shrinking re-compiles every candidate; a large first failure can take most of a minute to shrink. After this
# long only examples already seen failing are checked again, so Hypothesis settles on the smallest so far.
SHRINK_SECONDS = 15
# the explain phase only adds commentary to the report; skipping it keeps shrinking the last phase
PHASES = tuple(p for p in Phase if p is not Phase.explain)


def _initial_value_check() -> Callable[..., None] | None:
    """The initial-value property's body, when that suite exists (it has no separate check function)."""
    if not (ROOT / "suites" / "test_initial_value.py").exists():
        return None
    suite = importlib.import_module("suites.test_initial_value")
    return suite.test_set_initial_value_replaces_the_image_on_every_cpu.hypothesis.inner_test


INITIAL_VALUE = _initial_value_check()


class _Skip(Exception):
    """The shrinking budget is spent and this example was never seen failing: treat it as passing."""


class _Recording:
    """`st.data()` as the property sees it, keeping the last model or case drawn (the reproducer); `gate` may
    refuse to check a drawn example by raising _Skip."""

    def __init__(self, data: st.DataObject, gate: Callable[[ProgramModel | ObjectSet | VerifierCase], None]) -> None:
        self.data = data
        self.gate = gate
        self.drawn: ProgramModel | ObjectSet | VerifierCase | None = None

    def draw(self, strategy: st.SearchStrategy, label: str | None = None) -> Any:
        value = self.data.draw(strategy, label=label)
        if isinstance(value, ProgramModel | ObjectSet | VerifierCase):
            self.drawn = value
            self.gate(value)
        return value


def _check(prop: str, clang, backend: SimBackend, steer: Callable[[Any], bool] | None = None
           ) -> Callable[[_Recording], None]:
    """One example of `prop`, with the layers its suite compares; `steer` filters the examples drawn."""
    def steered(strategy: st.SearchStrategy) -> st.SearchStrategy:
        return strategy.filter(steer) if steer is not None else strategy

    def models(data: _Recording) -> ProgramModel:
        return data.draw(steered(program_models(cpus=backend.online_cpus)), label="model")

    if prop == "maps":
        return lambda data: differential("maps", backend, clang, models(data), ("compiler", "loader"))
    if prop == "verdicts":
        return lambda data: differential("verdicts", backend, clang, models(data), ("loader", "verifier"))
    if prop == "runtime":
        return lambda data: differential("runtime", backend, clang, models(data), ("runtime",))
    if prop == "lowered_twin":
        return lambda data: check_lowered_twin(clang, backend, models(data))
    if prop == "sets":
        return lambda data: differential_set("sets", backend, clang, data.draw(
            steered(object_sets(cpus=backend.online_cpus)), label="object set"))
    if prop == "initial_value":
        assert INITIAL_VALUE is not None and steer is None  # the suite's own body draws its model
        return lambda data: INITIAL_VALUE(clang, backend, data)
    assert prop == "verifier"
    return lambda data: check_case(backend, data.draw(steered(verifier_cases()), label="case"))


def _properties() -> tuple[str, ...]:
    return tuple(p for p in PROPERTIES if p != "initial_value" or INITIAL_VALUE is not None)


def _budget(prop: str) -> int:
    return CI.max_examples * (VERIFIER_FACTOR if prop == "verifier" else 1)


@dataclass
class Outcome:
    prop: str
    error: Exception | None  # the shrunk failure Hypothesis reported; None when the property passed
    seconds_to_first_failure: float | None  # from the start of this property's run
    seconds: float  # the whole run: generation, shrinking and the final replay
    reproducer: ProgramModel | ObjectSet | VerifierCase | None
    shrink_cut: bool = False  # shrinking stopped at SHRINK_SECONDS

    @property
    def layer(self) -> str | None:
        found = re.search(r"\bblame (\w+)", str(self.error)) if self.error is not None else None
        return found.group(1) if found else None

    @property
    def reproducer_vars(self) -> int | None:
        if isinstance(self.reproducer, ProgramModel):
            return len(self.reproducer.variables)
        if isinstance(self.reproducer, ObjectSet):
            return sum(len(m.variables) for m in self.reproducer.objects)
        return 1 if isinstance(self.reproducer, VerifierCase) else None


def run_property(prop: str, clang, backend: SimBackend, max_examples: int, *,
                 steer: Callable[[Any], bool] | None = None, seed: int | None = None) -> Outcome:
    """A deterministic Hypothesis run of one property, timed, keeping the last failing example. Derandomized
    runs draw from a seed taken from this function's source; `seed` replaces it (to see how robust a catch is
    against other draws)."""
    check = _check(prop, clang, backend, steer)
    start = time.monotonic()
    first_failure: float | None = None
    last_failing: ProgramModel | ObjectSet | VerifierCase | None = None
    failing: set[ProgramModel | ObjectSet | VerifierCase] = set()
    shrink_cut = False

    def gate(drawn: ProgramModel | ObjectSet | VerifierCase) -> None:
        nonlocal shrink_cut
        spent = first_failure is not None and time.monotonic() - start - first_failure > SHRINK_SECONDS
        if spent and drawn not in failing:
            shrink_cut = True
            raise _Skip

    @settings(CI, max_examples=max_examples, derandomize=True, database=None, deadline=None, print_blob=False,
              report_multiple_bugs=False, phases=PHASES)
    @given(st.data())
    def run(data: st.DataObject) -> None:
        nonlocal first_failure, last_failing
        recording = _Recording(data, gate)
        try:
            check(recording)
        except HypothesisException:
            raise
        except _Skip:
            return
        except Exception:
            if first_failure is None:
                first_failure = time.monotonic() - start
            # the last failing call is Hypothesis's replay of the shrunk example
            last_failing = recording.drawn
            if last_failing is not None:
                failing.add(last_failing)
            raise

    if seed is not None:
        run = hypothesis.seed(seed)(run)
    try:
        run()
    except Exception as e:  # any failure is the fault being caught; its text says how
        return Outcome(prop, e, first_failure, time.monotonic() - start, last_failing, shrink_cut)
    return Outcome(prop, None, None, time.monotonic() - start, None)


# -- the report ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fault_rows():
    rows: dict[str, dict[str, Any]] = {}
    yield rows
    out = Path(os.environ.get("PERCPU_REPORTS", "reports"))
    ordered = [rows[name] for name in FAULTS if name in rows]
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "faults.json").write_text(json.dumps(ordered, indent=1) + "\n")
    except OSError as e:
        print(f"reports: cannot write {out}/faults.json: {e.strerror}")


@pytest.fixture
def failures(monkeypatch, tmp_path):
    """Failure bundles go to a temporary directory: the faults fail on purpose."""
    monkeypatch.setenv("PERCPU_FAILURES", str(tmp_path / "failures"))


# every backend configuration a fault is observed with
CONFIGS = sorted({(f.profile, f.possible_cpus, f.online_cpus) for f in FAULTS.values()})


# -- the tests ------------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("failures")
@pytest.mark.parametrize("sim", CONFIGS, ids=[f"{p}-{n}cpus-online{''.join(map(str, o))}" for p, n, o in CONFIGS])
@pytest.mark.parametrize("prop", _properties())
def test_without_a_fault_every_property_passes(clang, prop, sim):
    outcome = run_property(prop, clang, SimBackend(*sim), _budget(prop))
    assert outcome.error is None, f"{prop} fails without a fault:\n{outcome.error}"


STEERED = [f for f in FAULTS.values() if f.steer is not None]


@pytest.mark.usefixtures("failures")
@pytest.mark.parametrize("fault", STEERED, ids=[f.name for f in STEERED])
def test_steered_examples_pass_without_the_fault(clang, fault: Fault):
    # a steer must not select examples the unfaulted simulator already gets wrong
    assert fault.steer_note, f"{fault.name}: a steer needs its reason"
    backend = SimBackend(fault.profile, fault.possible_cpus, fault.online_cpus)
    outcome = run_property(fault.caught_by, clang, backend, _budget(fault.caught_by), steer=fault.steer)
    assert outcome.error is None, f"{fault.caught_by} steered for {fault.name} fails without it:\n{outcome.error}"


@pytest.mark.usefixtures("failures")
@pytest.mark.parametrize("fault", FAULTS.values(), ids=list(FAULTS))
def test_fault_is_caught(clang, fault_rows, record_property, fault: Fault):
    backend = SimBackend(fault.profile, fault.possible_cpus, fault.online_cpus)
    start = time.monotonic()
    caught: Outcome | None = None
    detect = 0.0
    with pytest.MonkeyPatch.context() as mp:
        fault.apply(mp)
        for prop in _properties():
            prop_start = time.monotonic() - start
            steer = fault.steer if prop == fault.caught_by else None
            outcome = run_property(prop, clang, backend, _budget(prop), steer=steer)
            if outcome.error is not None:
                caught = outcome
                detect = prop_start + (outcome.seconds_to_first_failure or 0.0)
                break
    total = time.monotonic() - start
    row = {"name": fault.name, "caught": caught is not None,
           "property": caught.prop if caught else None, "layer": caught.layer if caught else None,
           "seconds_to_detect": round(detect, 2) if caught else None,
           "seconds_to_shrink": round(total - detect, 2) if caught else None,
           "reproducer_vars": caught.reproducer_vars if caught else None,
           "shrink_cut": caught.shrink_cut if caught else None}
    fault_rows[fault.name] = row
    for key, value in row.items():
        record_property(key, value)

    assert caught is not None, f"{fault.name} was not caught by any property in {total:.1f}s"
    layers = fault.layer if isinstance(fault.layer, tuple) else (fault.layer,)
    assert caught.prop == fault.caught_by and caught.layer in layers, (
        f"{fault.name}: caught by {caught.prop} blaming {caught.layer}, expected {fault.caught_by} blaming "
        f"{fault.layer}:\n{caught.error}")
    assert caught.reproducer is not None, f"{fault.name}: no falsifying example was kept"
    # the time to catch is measured (seconds_to_detect, the bench's faults.json), never asserted: a loaded
    # machine would make a wall-clock bound flaky
