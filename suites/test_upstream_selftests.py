"""Upstream's own tests, the reference column: test_progs built from the stack's source with only
`global_percpu_data` (prog_tests/global_data_init.c) and `verifier_percpu_addr` (progs/verifier_percpu_addr.c,
its __jited checks included), run on the column's kernel (backends.stack.upstream).

Its verdicts stand beside the suite's own checks of the same assertions (README: "Upstream's assertions"). The
intent predicted: every test passes where the kernel has global percpu data and the JIT is on, and skips where
it cannot run (a kernel without the feature, or the JIT off, which the feature's programs need).
"""

from __future__ import annotations

import re

import pytest

from oracle.profiles import profile
from schema.result import Comparison, Divergence
from suites import known
from suites.support import failures_dir

# the first layer a failure of each test points at: the skeleton and libbpf's side, or the verifier's
REFERENCE_LAYER = {"global_percpu_data": "loader", "verifier_percpu_addr": "verifier"}
# in test_progs' JIT dump: a per-CPU address loaded by a sign-extended 32-bit mov, then the gs add into the
# same register (the x86 JIT's emit_mov_imm64 picks that form whenever the address fits in s32)
_SIGN_EXTENDED_MOV = re.compile(r"\tmovq\t\$-?0x[0-9a-f]+, %(\w+)\n[^\n]*\taddq\t%gs:[^,]+, %\1\n")


@pytest.fixture(scope="module")
def upstream_build():
    from backends.stack import DEFAULT_STACK
    from backends.stack.upstream import UpstreamUnavailable, build_upstream

    try:
        return build_upstream(DEFAULT_STACK, log=lambda line: None)
    except UpstreamUnavailable as e:
        pytest.skip(f"upstream test_progs: {e} (make upstream builds it)")


def test_upstream_global_percpu_data(backend, upstream_build):
    """global_data_init.c: the init, lskel, rdonly_direct_read/_write, verifier_log and iter subtests."""
    _reference_verdict(backend, upstream_build, "global_percpu_data")


def test_upstream_verifier_percpu_addr(backend, upstream_build):
    """verifier_percpu_addr.c: r0-r9 each loaded with a per-CPU address, and the JIT's gs add into each."""
    _reference_verdict(backend, upstream_build, "verifier_percpu_addr")


def _reference_verdict(backend, upstream_build, test: str) -> None:
    run_reference = getattr(backend, "run_reference", None)
    if run_reference is None:
        pytest.skip(f"{backend.name}: upstream's test_progs runs on a real kernel")
    if getattr(backend, "loader", "raw") != "raw":
        pytest.skip(f"{backend.name}: the reference runs once per kernel and JIT state, on the raw columns")
    kernel = profile(backend.profile).kernel
    expected = "OK" if kernel.percpu_data_probe and kernel.jit_enabled else "SKIP"
    run = run_reference(upstream_build, test)
    observed = run["verdicts"].get(test, f"no verdict (exit {run['exit']})")
    cmp = Comparison([] if observed == expected else
                     [Divergence(f"reference.{test}", expected, observed, REFERENCE_LAYER[test])], compared=1)
    facts = {"sign_extended_address_mov": bool(_SIGN_EXTENDED_MOV.search(run["output"]))}
    triaged = known.triage(cmp, {"env": backend.env | {"profile": backend.profile}, **facts})
    known.record(triaged)
    if not cmp.ok and not triaged.all_known:
        out = failures_dir() / f"upstream-{backend.name}-{test}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(run["output"])
        pytest.fail(f"{backend.name}: upstream test_progs -t {test}: expected {expected}, observed {observed} "
                    f"(output {out}){known.annotate(triaged)}", pytrace=False)
