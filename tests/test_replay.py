"""A deliberately broken simulator (its `merged-norewrite` row: the per-CPU move is never inserted) yields a
failure bundle whose replay command reproduces the failure; the same bundle replayed on the correct simulator
does not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_broken_simulator_bundle_replays(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PERCPU_FAILURES": str(tmp_path / "failures"),
           "PERCPU_REPORTS": str(tmp_path / "reports")}
    run = subprocess.run([sys.executable, "-m", "pytest", "suites/test_runtime.py", "-q", "-x", "-k", "corpus",
                          "--backend", "sim", "--sim-profile", "merged-norewrite", "-p", "no:cacheprovider"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout[-2000:]
    (bundle,) = sorted((tmp_path / "failures").iterdir())
    command = (bundle / "replay.txt").read_text().split()
    assert command[:3] == ["python", "-m", "suites.replay"]
    replay = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert replay.returncode == 1, replay.stdout + replay.stderr
    assert "reproduced on sim" in replay.stdout and "blame runtime" in replay.stdout
    fixed = subprocess.run([sys.executable, "-m", "suites.replay", str(bundle), "--sim-profile", "merged"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "not reproduced" in fixed.stdout
