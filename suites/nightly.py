"""`python -m suites.nightly --budget SECONDS [--database DIR] [pytest args]`

Fuzz the conformance properties for a time budget with the `nightly` Hypothesis profile, keeping Hypothesis's
example database in DIR across runs (failing examples found before are replayed first). Runs pytest in rounds
until the budget is spent; the round in progress is stopped at the budget. Pytest arguments pass through, e.g.
`--backend vm` for the real stack. While a round runs, a plain line every --progress-every seconds gives the
examples run, the properties covered of those collected, the tests failed and the time left (suites.progress
counts them inside pytest). Ends with a summary of the failure bundles that appeared during this run: each one's
check, column, first difference and replay command. Exit 0 nothing new, 1 new findings, 2 a bad budget, and
pytest's own code when it refuses the run (3 toolchain, 4 usage, 6 a requested backend that cannot run)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from suites.progress import PROGRESS_ENV, read_progress


def bundle_line(path: Path) -> str:
    """What a new bundle says at a glance: its check and column, how many differences and the first one."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        diff = (path / "diff.txt").read_text().splitlines()
    except (OSError, ValueError):
        return f"  {path}  (not a complete bundle)"
    replay = (path / "replay.txt").read_text().strip() if (path / "replay.txt").exists() else \
        f"python -m suites.replay {path}"
    first = diff[0] if diff else "-"
    return (f"  {path}: {meta.get('check', '?')} on {meta.get('backend', '?')}, {len(diff)} difference(s), first "
            f"{first}\n    replay: {replay}")


def _written(bundle: Path) -> int:
    """When the bundle was last written: its files are rewritten in place, which leaves the directory's time."""
    try:
        return (bundle / "meta.json").stat().st_mtime_ns
    except OSError:
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m suites.nightly")
    parser.add_argument("--budget", type=float, required=True, help="seconds")
    parser.add_argument("--database", type=Path, default=Path(".hypothesis-nightly"))
    parser.add_argument("--progress-every", type=float, default=30, help="seconds between progress lines")
    args, pytest_args = parser.parse_known_args(argv)
    if args.budget <= 0 or args.progress_every <= 0:
        print("nightly: --budget and --progress-every take a number of seconds above 0", file=sys.stderr)
        return 2
    args.database.mkdir(parents=True, exist_ok=True)
    failures = Path(os.environ.get("PERCPU_FAILURES", "failures"))
    seen = set(failures.iterdir()) if failures.exists() else set()
    progress_file = args.database.resolve() / "progress.json"  # beside the database: one nightly per database
    env = {**os.environ, "PERCPU_HYPOTHESIS_DB": str(args.database.resolve()), "HYPOTHESIS_PROFILE": "nightly",
           PROGRESS_ENV: str(progress_file)}
    deadline = time.monotonic() + args.budget
    rounds, worst, examples_before = 0, 0, 0
    covered: set[str] = set()
    properties: set[str] = set()

    def show(state: dict, final: bool = False) -> None:
        nonlocal examples_before
        properties.update(state["properties"])
        covered.update(state["covered"])
        found = len(set(failures.iterdir()) - seen) if failures.exists() else 0
        print(f"nightly: round {rounds}{' ended' if final else ''}: {examples_before + state['examples']} examples "
              f"({state['examples']} this round), properties covered {len(covered)}/{len(properties)}, "
              f"{state['failed']} test(s) failed this round, {found} new bundle(s), "
              f"{max(0.0, deadline - time.monotonic()):.0f}s left"
              + ("" if final or not state["running"] else
                 f"; running {', '.join(r.split('::')[-1] for r in state['running'])}"), flush=True)
        if final:
            examples_before += state["examples"]

    while deadline - time.monotonic() > 5:
        rounds += 1
        for old in progress_file.parent.glob(progress_file.name + "*"):
            old.unlink(missing_ok=True)
        # no --hypothesis-seed: a fixed seed switches the example database off; the nightly profile is random
        cmd = [sys.executable, "-m", "pytest", "suites", "-q", "-p", "no:randomly", "-p", "suites.progress",
               *pytest_args]
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        try:
            while True:
                try:
                    rc = proc.wait(timeout=min(args.progress_every, max(0.0, deadline - time.monotonic())))
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= deadline:
                        raise
                    show(read_progress(progress_file))
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
        show(read_progress(progress_file), final=True)
    for old in progress_file.parent.glob(progress_file.name + "*"):
        old.unlink(missing_ok=True)  # not a database entry
    new = sorted(set(failures.iterdir()) - seen) if failures.exists() else []
    entries = sum(1 for p in args.database.rglob("*") if p.is_file())
    print(f"nightly: {rounds} round(s) in {args.budget:g}s, {examples_before} examples, properties covered "
          f"{len(covered)}/{len(properties)}; database {args.database} holds {entries} entries; "
          f"{len(new)} new failure bundle(s)" + (":" if new else ""))
    # one failing property leaves a bundle per failing example Hypothesis tried while shrinking; the newest of a
    # check and column is its final replay of the minimal example, so it leads and the rest are only counted
    groups: dict[tuple[str, str], list[Path]] = {}
    for path in new:
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError):
            meta = {}
        groups.setdefault((str(meta.get("check")), str(meta.get("backend"))), []).append(path)
    for paths in groups.values():
        paths.sort(key=_written)
        print(bundle_line(paths[-1]))
        if len(paths) > 1:
            print(f"    and {len(paths) - 1} bundle(s) of larger examples met while shrinking: "
                  + " ".join(p.name for p in paths[:-1]))
    return 1 if new or worst == 1 else 0


if __name__ == "__main__":
    sys.exit(main())
