"""The vm backend's speed beside the host kernel's, on the same fixed sample (bench/test_bench.py measures the host
columns in the same run): examples/s per vm loader and their ratio to the host kernel's, and the time from boot
to the first observation. Measured, never asserted."""

from __future__ import annotations

import time

import pytest

from bench.test_bench import _end_to_end, _observe_only, _rate
from suites.backends import Unavailable, from_config
from suites.support import compile_global, runs_of


def _vm(loader: str):
    try:
        return from_config(f"vm:loader={loader}", {"provision": "no"})
    except Unavailable as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("loader", ["raw", "libbpf"])
def test_vm_end_to_end(benchmark, clang, models, cold_cache, bench_results, loader):
    backend = _vm(loader)
    rate = _rate(benchmark, _end_to_end, cold_cache, clang, backend, models)
    bench_results[f"vm_{loader}_examples_per_s"] = rate
    host = bench_results.get(f"kernel_{loader}_examples_per_s")
    if host:
        bench_results[f"vm_{loader}_vs_kernel_{loader}"] = rate / host


@pytest.mark.parametrize("loader", ["raw", "libbpf"])
def test_vm_observe_only(benchmark, clang, models, bench_results, loader):
    """The observations alone (objects compiled beforehand), beside the host kernel's: what the guest costs."""
    backend = _vm(loader)
    compiled = [compile_global(clang, m) for m in models]
    rate = _rate(benchmark, _observe_only, lambda: None, backend, compiled)
    bench_results[f"vm_{loader}_observe_per_s"] = rate
    host = bench_results.get(f"kernel_{loader}_observe_per_s")
    if host:
        bench_results[f"vm_{loader}_observe_vs_kernel_{loader}"] = rate / host


def test_vm_boot_to_first_observation(clang, models, bench_results):
    """A guest booted afresh: from starting QEMU to the first observation's answer."""
    from suites.vm_backend import close_machines

    close_machines()
    compiled = compile_global(clang, models[0])
    start = time.perf_counter()
    backend = _vm("raw")
    backend.observe(compiled, runs_of(models[0]))
    bench_results["vm_boot_to_first_observation_s"] = time.perf_counter() - start
    bench_results["vm_boot_s"] = backend.machine.boot_seconds
    bench_results["vm_accelerator"] = backend.machine.accel
    close_machines()
