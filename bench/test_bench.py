"""Speed and resource use of the suite itself, measured (never asserted): examples/s per backend against the
clang-only floor over the same generated sources, the xdist speed-up, and peak memory and fd count."""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from generators.model import ProgramModel
from generators.render import render_global
from schema.result import compare, compare_set
from suites.backends import KernelBackend, SimBackend, Unavailable
from suites.gate import sample_models
from suites.sets import compile_set, sample_sets, set_plan
from suites.sets import predict_for as predict_set_for
from suites.support import compile_global, predict_for, runs_of
from toolchain.clang import compile_c

N_MODELS = int(os.environ.get("PERCPU_BENCH_MODELS", "40"))
N_LEAK = int(os.environ.get("PERCPU_BENCH_LEAK_EXAMPLES", "5000"))


def fixed_models(n: int, cpus: tuple[int, ...] = (0, 1)) -> list[ProgramModel]:
    return sample_models(n, cpus)


def _clang_floor(clang, models) -> float:
    for m in models:
        compile_c(clang, render_global(m), name=m.name)
    return len(models)


def _end_to_end(clang, backend, models) -> float:
    for m in models:
        compiled = compile_global(clang, m)
        compare(predict_for(backend, compiled, clang), backend.observe(compiled, runs_of(m)))
    return len(models)


def _observe_only(backend, compiled) -> float:
    """Observations alone, of objects compiled beforehand: the backend's own cost, without clang's."""
    for c in compiled:
        backend.observe(c, runs_of(c.model))
    return len(compiled)


def _rate(benchmark, fn, cold_cache, *args) -> float:
    benchmark.pedantic(fn, args=args, setup=cold_cache, rounds=3, iterations=1)
    return len(args[-1]) / benchmark.stats.stats.mean


def test_clang_floor(benchmark, clang, models, cold_cache, bench_results):
    bench_results["clang_examples_per_s"] = _rate(benchmark, _clang_floor, cold_cache, clang, models)


def test_sim_end_to_end(benchmark, clang, models, cold_cache, bench_results):
    backend = SimBackend("merged", 4, (0, 1))
    rate = _rate(benchmark, _end_to_end, cold_cache, clang, backend, models)
    bench_results["sim_examples_per_s"] = rate
    if "clang_examples_per_s" in bench_results:
        bench_results["sim_ratio"] = rate / bench_results["clang_examples_per_s"]


@pytest.mark.parametrize("loader", ["raw", "libbpf"])
def test_kernel_end_to_end(benchmark, clang, models, cold_cache, bench_results, loader):
    try:
        backend = KernelBackend(loader, None, clang)
    except Unavailable as e:
        pytest.skip(str(e))
    rate = _rate(benchmark, _end_to_end, cold_cache, clang, backend, models)
    bench_results[f"kernel_{loader}_examples_per_s"] = rate
    if "clang_examples_per_s" in bench_results:
        bench_results[f"kernel_{loader}_ratio"] = rate / bench_results["clang_examples_per_s"]
        if loader == "raw":
            bench_results["kernel_ratio"] = bench_results["kernel_raw_ratio"]


@pytest.mark.parametrize("loader", ["raw", "libbpf"])
def test_kernel_observe_only(benchmark, clang, models, bench_results, loader):
    try:
        backend = KernelBackend(loader, None, clang)
    except Unavailable as e:
        pytest.skip(str(e))
    compiled = [compile_global(clang, m) for m in models]
    rate = _rate(benchmark, _observe_only, lambda: None, backend, compiled)
    bench_results[f"kernel_{loader}_observe_per_s"] = rate


def test_xdist_speedup(tmp_path, bench_results):
    """The same deterministic conformance run (the `bench` profile: 150 examples a property), serial and with two
    workers, each on a cold compile cache."""
    root = Path(__file__).resolve().parent.parent
    times = {}
    for workers in ("0", "2"):
        env = {**os.environ, "PERCPU_CACHE": str(tmp_path / f"cache{workers}"),
               "PERCPU_FAILURES": str(tmp_path / "failures"), "PERCPU_REPORTS": str(tmp_path / "reports")}
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pytest", "suites", "-q", "-n", workers, "-p", "no:cacheprovider",
                        "--hypothesis-profile=bench", "--backend", "sim"], cwd=root, env=env, check=True,
                       capture_output=True)
        times[workers] = time.perf_counter() - start
    bench_results["xdist_serial_s"] = times["0"]
    bench_results["xdist_2_workers_s"] = times["2"]
    bench_results["xdist_speedup"] = times["0"] / times["2"]


def test_memory_and_fds_over_many_examples(clang, bench_results):
    """N_LEAK observations on the simulator and the kernel (both loaders) over a cycle of compiled models:
    the fd count must come back to where it started and peak RSS is recorded."""
    models = fixed_models(100)
    compiled = [compile_global(clang, m) for m in models]
    backends = [SimBackend("merged", 4, (0, 1))]
    for loader in ("raw", "libbpf"):
        with contextlib.suppress(Unavailable):  # the leak check then covers the simulator alone
            backends.append(KernelBackend(loader, None, clang))
    fds_before = len(os.listdir("/proc/self/fd"))
    start = time.perf_counter()
    for i in range(N_LEAK):
        c = compiled[i % len(compiled)]
        backends[i % len(backends)].observe(c, runs_of(c.model))
    bench_results["leak_examples"] = N_LEAK
    bench_results["leak_seconds"] = time.perf_counter() - start
    bench_results["fds_before"] = fds_before
    bench_results["fds_after"] = len(os.listdir("/proc/self/fd"))
    bench_results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


N_SETS = int(os.environ.get("PERCPU_BENCH_SETS", "20"))
N_SET_LEAK = int(os.environ.get("PERCPU_BENCH_SET_LEAK", "1000"))


def _sets_end_to_end(clang, backend, sets) -> float:
    for s in sets:
        compiled = compile_set(clang, s)
        compare_set(predict_set_for(backend, compiled, clang), backend.observe_set(set_plan(compiled)))
    return len(sets)


def _sets_clang_floor(clang, sets) -> float:
    for s in sets:
        for m in s.objects:
            compile_c(clang, render_global(m), name=m.name)
    return len(sets)


@pytest.mark.parametrize("backend_name", ["clang", "sim", "kernel-raw", "kernel-libbpf"])
def test_object_sets_end_to_end(benchmark, clang, cold_cache, bench_results, backend_name):
    """Object sets (2-3 objects each) per second, against compiling their objects alone."""
    sets = sample_sets(N_SETS, (0, 1))
    if backend_name == "clang":
        bench_results["sets_clang_per_s"] = _rate(benchmark, _sets_clang_floor, cold_cache, clang, sets)
        return
    try:
        backend = (SimBackend("merged", 4, (0, 1)) if backend_name == "sim"
                   else KernelBackend(backend_name.removeprefix("kernel-"), None, clang))
    except Unavailable as e:
        pytest.skip(str(e))
    rate = _rate(benchmark, _sets_end_to_end, cold_cache, clang, backend, sets)
    key = backend_name.replace("-", "_")
    bench_results[f"sets_{key}_per_s"] = rate
    if "sets_clang_per_s" in bench_results:
        bench_results[f"sets_{key}_ratio"] = rate / bench_results["sets_clang_per_s"]


def test_fds_over_many_set_observations(clang, bench_results):
    """N_SET_LEAK set observations on the kernel (both loaders; links, reused fds, extension programs): the fd
    count must come back to where it started."""
    compiled = [compile_set(clang, s) for s in sample_sets(50, (0, 1))]
    backends = [SimBackend("merged", 4, (0, 1))]
    for loader in ("raw", "libbpf"):
        with contextlib.suppress(Unavailable):
            backends.append(KernelBackend(loader, None, clang))
    fds_before = len(os.listdir("/proc/self/fd"))
    start = time.perf_counter()
    for i in range(N_SET_LEAK):
        backends[i % len(backends)].observe_set(set_plan(compiled[i % len(compiled)]))
    bench_results["set_leak_observations"] = N_SET_LEAK
    bench_results["set_leak_seconds"] = time.perf_counter() - start
    bench_results["set_fds_before"] = fds_before
    bench_results["set_fds_after"] = len(os.listdir("/proc/self/fd"))
