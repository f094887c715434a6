"""A pytest plugin (`-p suites.progress`) that keeps a round's progress in a small JSON file for suites.nightly:
Hypothesis examples run, the properties (Hypothesis tests, one per function whatever its columns) collected and
those that ran an example, the one running, and the tests failed. Inert unless PERCPU_PROGRESS_FILE names the
file; under pytest-xdist each worker writes its own (`<file>.<worker>`), and the reader adds them up."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

PROGRESS_ENV = "PERCPU_PROGRESS_FILE"
WRITE_EVERY = 1.0  # seconds between writes while examples run: the file is cheap, but not free per example


class Progress:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.examples = 0
        self.properties: set[str] = set()
        self.covered: set[str] = set()
        self.running: str | None = None
        self.failed = 0
        self.written = 0.0

    def write(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.written < WRITE_EVERY:
            return
        self.written = now
        doc = {"examples": self.examples, "properties": sorted(self.properties), "covered": sorted(self.covered),
               "running": self.running, "failed": self.failed}
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(doc))
            tmp.replace(self.path)  # a reader never sees half a file
        except OSError:
            pass  # progress is a display: a full disk must not fail the run

    def counting(self, test: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - the test's own arguments and result
            try:
                return test(*args, **kwargs)
            finally:
                self.examples += 1
                if self.running is not None:
                    self.covered.add(self.running)
                self.write()

        counted._percpu_counted = True  # type: ignore[attr-defined]
        return counted


_PROGRESS: Progress | None = None


def property_of(nodeid: str) -> str:
    """`suites/test_maps.py::test_x[sim]` → `suites/test_maps.py::test_x`."""
    return nodeid.split("[")[0]


def pytest_configure(config: pytest.Config) -> None:
    global _PROGRESS
    path = os.environ.get(PROGRESS_ENV)
    if path:
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        _PROGRESS = Progress(Path(f"{path}.{worker}" if worker else path))


def pytest_collection_finish(session: pytest.Session) -> None:
    if _PROGRESS is None:
        return
    for item in session.items:  # what is left after -k, -m and the like deselected theirs
        handle = getattr(getattr(item, "obj", None), "hypothesis", None)
        if handle is None:
            continue  # a fixed corpus case: no examples, not a property of its own
        _PROGRESS.properties.add(property_of(item.nodeid))
        # Hypothesis calls inner_test once per example (reassignable for wrappers like this one); the
        # parametrised items of one function share it, so it is wrapped once
        if not getattr(handle.inner_test, "_percpu_counted", False):
            handle.inner_test = _PROGRESS.counting(handle.inner_test)
    _PROGRESS.write(force=True)


def pytest_runtest_logstart(nodeid: str) -> None:
    if _PROGRESS is not None:
        prop = property_of(nodeid)
        _PROGRESS.running = prop if prop in _PROGRESS.properties else None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # an xdist controller collects nothing and hears its workers' reports, which they count themselves
    if _PROGRESS is None or report.when != "call" or not _PROGRESS.properties:
        return
    _PROGRESS.failed += int(report.failed)
    _PROGRESS.write(force=True)


def read_progress(path: Path) -> dict[str, Any]:
    """The round's progress so far, every worker's file added up; zeros before any is written."""
    out: dict[str, Any] = {"examples": 0, "properties": set(), "covered": set(), "running": [], "failed": 0}
    for part in sorted(path.parent.glob(path.name + "*")):
        if part.name.endswith(".tmp"):
            continue
        try:
            doc = json.loads(part.read_text())
        except (OSError, ValueError):
            continue  # replaced while being read: the next reading has it
        out["examples"] += int(doc.get("examples", 0))
        out["failed"] += int(doc.get("failed", 0))
        out["properties"].update(doc.get("properties", ()))
        out["covered"].update(doc.get("covered", ()))
        if doc.get("running"):
            out["running"].append(doc["running"])
    return out
