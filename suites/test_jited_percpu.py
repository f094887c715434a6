"""The JIT output per register (verifier_percpu_addr's __jited check): `rN = map_value(percpu map, off) ll;
r0 = 0; exit` is accepted, and its x86-64 jited image adds the per-CPU offset (`add <reg>, gs:[...]`) into the
x86 register of rN and nowhere else, for r0-r9 and any offset within the value. It needs the raw loader, the JIT
on and a kernel with direct value access on PERCPU_ARRAY; elsewhere it is skipped with the reason."""

from __future__ import annotations

import json

import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from generators.asm import PERCPU_ADDR_VALUE_SIZE
from oracle.jited import predict_percpu_addr_jit
from suites.support import failures_dir

pytestmark = pytest.mark.verifier


def _kernel_axis(backend):  # noqa: ANN001, ANN202 - a suites.backends.Backend; an oracle.profiles.KernelAxis
    """The backend's kernel axis, or a skip naming what it lacks."""
    from oracle.profiles import kernel_axis
    from schema import profiles as registry

    if not hasattr(backend, "observe_jited"):
        pytest.skip(f"{backend.name}: no JIT to read the output of")
    row, modifiers = registry.lookup(backend.profile)
    kernel = kernel_axis(registry.join_modifiers(row.kernel_axis, modifiers))
    if not kernel.percpu_direct_value:
        pytest.skip(f"{backend.name}: the kernel has no direct value access on PERCPU_ARRAY (profile "
                    f"{backend.profile})")
    if not (kernel.jit_enabled and kernel.percpu_insn_jit):
        pytest.skip(f"{backend.name}: needs the JIT on, with per-CPU instructions (profile {backend.profile})")
    return kernel


def _every_register(test):  # noqa: ANN001, ANN202 - a test function
    """Each of r0-r9 once, as the upstream selftest does, before Hypothesis's own draws (a vm column runs few)."""
    for register in range(10):
        test = example(register=register, offset=register * 7 % PERCPU_ADDR_VALUE_SIZE)(test)
    return test


def test_jited_percpu_add_goes_into_the_loaded_register(backend):
    # where it cannot run, skipped before Hypothesis starts (its explicit examples would dress up the reason)
    kernel = _kernel_axis(backend)
    if getattr(backend, "loader", "raw") != "raw":
        pytest.skip(f"{backend.name}: the case loads through bpf() directly: it runs on the raw columns")
    _gs_add_into_the_loaded_register(backend, kernel)


@given(register=st.integers(0, 9), offset=st.integers(0, PERCPU_ADDR_VALUE_SIZE - 1))
@_every_register
def _gs_add_into_the_loaded_register(backend, kernel, register, offset):
    expected = predict_percpu_addr_jit(register, offset, kernel)
    observed = backend.observe_jited(register, offset)
    event(f"r{register}")
    if {k: observed.get(k) for k in expected} != expected:
        root = failures_dir() / f"jited-{backend.name}-r{register}-off{offset}"
        root.mkdir(parents=True, exist_ok=True)
        for label, doc in (("expected", expected), ("observed", observed)):
            (root / f"{label}.json").write_text(json.dumps(doc, indent=1) + "\n")
        raise AssertionError(f"[verifier] r{register} off={offset}: expected {expected}, observed {observed}; "
                             f"bundle {root}")
