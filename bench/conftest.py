"""Benchmarks share one results dict, written to reports/bench.json when the session ends."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from toolchain.clang import Clang

RESULTS: dict = {}


@pytest.fixture(scope="session")
def clang():
    return Clang.find()


@pytest.fixture(scope="session")
def models():
    from bench.test_bench import N_MODELS, fixed_models

    return fixed_models(N_MODELS)


@pytest.fixture
def cold_cache(monkeypatch, tmp_path):
    """Every round compiles for real: the cache would otherwise make the pipeline faster than clang."""
    def fresh():
        monkeypatch.setenv("PERCPU_CACHE", tempfile.mkdtemp(dir=tmp_path))
    return fresh


@pytest.fixture(scope="session")
def bench_results():
    yield RESULTS
    out = Path(os.environ.get("PERCPU_REPORTS", "reports"))
    out.mkdir(parents=True, exist_ok=True)
    faults = out / "faults.json"
    if faults.exists():
        RESULTS["faults"] = json.loads(faults.read_text())
    (out / "bench.json").write_text(json.dumps(RESULTS, indent=1) + "\n")
    print("\nbench:", json.dumps({k: v for k, v in RESULTS.items() if k != "faults"}, indent=1))
