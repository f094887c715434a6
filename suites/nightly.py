"""`python -m suites.nightly --budget SECONDS [--database DIR] [pytest args]`

Fuzz the conformance properties for a time budget with the `nightly` Hypothesis profile, keeping Hypothesis's
example database in DIR across runs (failing examples found before are replayed first). Runs pytest in rounds
until the budget is spent; the round in progress is stopped at the budget. Pytest arguments pass through, e.g.
`--backend vm` for the real stack. Ends with a short summary of the failure bundles that appeared during this
run. Exit 0 nothing new, 1 new findings, and pytest's own code when it refuses the run (3 toolchain, 4 usage, 6 a
requested backend that cannot run)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m suites.nightly")
    parser.add_argument("--budget", type=float, required=True, help="seconds")
    parser.add_argument("--database", type=Path, default=Path(".hypothesis-nightly"))
    args, pytest_args = parser.parse_known_args(argv)
    args.database.mkdir(parents=True, exist_ok=True)
    failures = Path(os.environ.get("PERCPU_FAILURES", "failures"))
    seen = set(failures.iterdir()) if failures.exists() else set()
    env = {**os.environ, "PERCPU_HYPOTHESIS_DB": str(args.database.resolve()), "HYPOTHESIS_PROFILE": "nightly"}
    deadline = time.monotonic() + args.budget
    rounds, worst = 0, 0
    while (left := deadline - time.monotonic()) > 5:
        rounds += 1
        # no --hypothesis-seed: a fixed seed switches the example database off; the nightly profile is random
        cmd = [sys.executable, "-m", "pytest", "suites", "-q", "-p", "no:randomly", *pytest_args]
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)  # pytest stops cleanly and keeps what it found
            try:
                rc = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
            rc = 0 if rc in (2, -signal.SIGINT) else rc  # interrupted by the budget, not a failure
        if rc in (3, 4, 6):  # toolchain, usage, a requested backend that cannot run: another round won't help
            print(f"nightly: pytest refused the run (exit {rc}); see its line above", file=sys.stderr)
            return rc
        worst = max(worst, rc if rc not in (5,) else 0)
        found = len(set(failures.iterdir()) - seen) if failures.exists() else 0
        print(f"nightly: round {rounds} ended (exit {rc}); {max(0.0, deadline - time.monotonic()):.0f}s left; "
              f"{found} new finding(s) so far", flush=True)
    new = sorted(set(failures.iterdir()) - seen) if failures.exists() else []
    entries = sum(1 for p in args.database.rglob("*") if p.is_file())
    print(f"nightly: {rounds} round(s) in {args.budget:g}s; database {args.database} holds {entries} entries; "
          f"{len(new)} new finding(s)")
    for path in new:
        print(f"  {path}  (replay: python -m suites.replay {path})")
    return 1 if new or worst == 1 else 0


if __name__ == "__main__":
    sys.exit(main())
