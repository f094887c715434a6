"""Verifier acceptance at the instruction level: every register r0-r9, offsets in and past the value, 1-entry
and 2-entry maps, values near 32 KiB, read-only frozen maps, const-string arguments, a conditional that only a
folded read could prune. Verdict, errno, message class and xlated length are predicted per kernel profile and
checked on the simulator and on this kernel; accepted cases are run on every online CPU and each register must
resolve to the running CPU's slot."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import event, given, settings

from generators.asm import VerifierCase, verifier_cases
from generators.model import to_jsonable
from schema.result import compare
from suites import verifier_backends as vb
from suites.support import failures_dir

pytestmark = pytest.mark.verifier


def _kernel_profiles(backend) -> tuple[str, str]:
    """(oracle kernel axis, simulator kernel row), modifiers included, of the backend's profile."""
    from schema import profiles as registry

    if backend.name == "kernel-libbpf":
        pytest.skip("verifier cases load through bpf() directly: they run under kernel-raw")
    row, modifiers = registry.lookup(backend.profile)
    return (registry.join_modifiers(row.kernel_axis, modifiers),
            registry.join_modifiers(row.sim_kernel_row, modifiers))


def check_case(backend, case: VerifierCase) -> None:
    oracle_kernel, sim_kernel = _kernel_profiles(backend)
    runs = [(cpu, 1) for cpu in backend.online_cpus]
    expected = vb.predict(case, oracle_kernel, backend.possible_cpus, backend.online_cpus, runs)
    try:
        observed = backend.observe_case(case, runs)
    except NotImplementedError as e:  # a libbpf column: the cases load through bpf() directly
        pytest.skip(str(e))
    event(f"verdict: {expected['programs'][0]['verdict']}/{expected['programs'][0]['message_class']}")
    cmp = compare(expected, observed)
    if not cmp.ok:
        text = json.dumps(to_jsonable(case), indent=1)
        root = failures_dir() / f"verifier-{backend.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
        root.mkdir(parents=True, exist_ok=True)
        (root / "case.json").write_text(text)
        for label, doc in (("expected", expected), ("observed", observed)):
            (root / f"{label}.json").write_text(json.dumps(doc, indent=1))
        (root / "diff.txt").write_text(cmp.report() + "\n")
        raise AssertionError(f"{len(cmp.divergences)} divergence(s), blame {cmp.blame()}; bundle {root}\n"
                             + cmp.report())


# cheap cases (a few ms each): ten times the profile's budget reaches every verdict class
@settings(max_examples=10 * settings().max_examples)
@given(verifier_cases())
def test_verifier_verdicts_and_per_cpu_resolution_match_the_prediction(backend, case):
    check_case(backend, case)
