"""Benchmarks share one results dict, written to reports/bench.json when the session ends."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

RESULTS: dict = {}


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
