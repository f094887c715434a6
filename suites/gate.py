"""`python -m suites.gate --baseline CONFIG --candidate CONFIG [--examples N] [--out DIR]`

Gate a loader or kernel change: run the regression corpus plus a fixed-seed sample of generated models on two
configurations, write one CSV row of facts per case and configuration, and exit 1 on any case whose observations
differ (0 when none), with a markdown summary. A configuration is a backend plus settings:
`sim:profile=v1`, `sim:profile=merged,possible=4,online=0-1`, `kernel:loader=raw`, `kernel:libbpf=/path/to/libbpf.so`,
`vm` (the stack's kernel 7.3.4 and libbpf 1.8 in a guest), `vm:libbpf=src:DIR[,patch=FILE]` (a libbpf built from a
tools/lib/bpf or libbpf tree, patched), `vm:libbpf=debian:VERSION`, `vm:libbpf=system`; `kernel:` takes the same
libbpf settings (suites.backends owns the syntax). The smallest differing case's model and C source are
written to the out directory as `reproducer.*`. Exit 2: a bad configuration; 6: a libbpf that cannot be downloaded;
8: one that does not build.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import sys
from collections import Counter
from pathlib import Path

from corpus.selftest import selftest_model
from corpus.sets import SET_CORPUS
from generators.model import ProgramModel
from generators.strategies import fixed_sample, program_models
from schema.result import Result, compare, compare_set
from suites.support import Compiled

# exit codes beside 0 (no difference) and 1 (differences): a libbpf that cannot be had, by what failed
EXIT_USAGE = 2
EXIT_LIBBPF = {"usage": EXIT_USAGE, "download": 6, "build": 8}


def sample_models(n: int, cpus: tuple[int, ...]) -> list[ProgramModel]:
    """A fixed-seed sample: the same models on every run and machine."""
    return fixed_sample(program_models(cpus=cpus), n)


def facts_row(case: str, config: str, doc: Result) -> dict[str, str]:
    def digest(slots: list[str] | None) -> str:
        return hashlib.sha256("".join(slots).encode()).hexdigest()[:12] if slots else "-"

    return {
        "case": case, "config": config, "open": "ok" if doc["open"]["ok"] else str(doc["open"]["error_class"]),
        "maps": ";".join(f"{m['name']}:{m['type']}:{m['flags']}:{m['value_size']}:{int(m['created'])}"
                         for m in doc["maps"]),
        "verdicts": ";".join(f"{p['name']}={p['verdict']}/{p['message_class'] or ''}" for p in doc["programs"]),
        "before": ";".join(digest(m["before"]) for m in doc["maps"]),
        "after": ";".join(digest(m["after"]) for m in doc["maps"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m suites.gate")
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--candidate", required=True)
    parser.add_argument("--examples", type=int, default=30, help="generated models besides the corpus")
    parser.add_argument("--set-examples", type=int, default=10,
                        help="generated object sets (map reuse, freplace) besides their corpus")
    parser.add_argument("--out", type=Path, default=Path("reports/gate"))
    parser.add_argument("--clang")
    args = parser.parse_args(argv)

    from backends.libbpf_source import LibbpfSourceError
    from suites.backends import Unavailable, from_config
    from suites.sets import compile_set, sample_sets, set_plan
    from suites.support import compile_global, runs_of
    from toolchain.clang import Clang, ToolchainError

    if args.examples < 0 or args.set_examples < 0:
        print("gate: --examples and --set-examples take a count of 0 or more", file=sys.stderr)
        return EXIT_USAGE
    defaults = {"clang": args.clang} if args.clang else {}
    try:
        clang = Clang.find(args.clang)
        base, cand = from_config(args.baseline, defaults), from_config(args.candidate, defaults)
    except (ToolchainError, Unavailable, ValueError) as e:  # ConfigError is a ValueError
        print(f"gate: {e}", file=sys.stderr)
        cause = e.__cause__
        return EXIT_LIBBPF[cause.kind] if isinstance(cause, LibbpfSourceError) else EXIT_USAGE
    cpus = tuple(sorted(set(base.online_cpus) & set(cand.online_cpus)))
    if not cpus:
        print("gate: the two configurations share no online CPU", file=sys.stderr)
        return 2
    cases = [("corpus:selftest", selftest_model(cpus[:2]))]
    cases += [(f"sample:{i}", m) for i, m in enumerate(sample_models(args.examples, cpus))]

    args.out.mkdir(parents=True, exist_ok=True)
    rows, differing, fields, layers = [], [], Counter(), Counter()
    smallest: Compiled | None = None  # of the differing cases, the one with the shortest source
    for case, model in cases:
        compiled = compile_global(clang, model)
        docs = [backend.observe(compiled, runs_of(model)) for backend in (base, cand)]
        rows += [facts_row(case, label, doc) for label, doc in zip((args.baseline, args.candidate), docs,
                                                                    strict=True)]
        cmp = compare(docs[0], docs[1])
        if not cmp.ok:
            differing.append((case, cmp))
            fields.update(_generic(d.field) for d in cmp.divergences)
            layers.update({d.layer for d in cmp.divergences})
            if smallest is None or len(compiled.source) < len(smallest.source):
                smallest, smallest_case = compiled, case
    set_cases = [(f"sets:{name}", fn(cpus[:2])) for name, fn in sorted(SET_CORPUS.items())]
    set_cases += [(f"set-sample:{i}", m) for i, m in enumerate(sample_sets(args.set_examples, cpus))]
    for case, model in set_cases:
        plan = set_plan(compile_set(clang, model))
        docs = [backend.observe_set(plan) for backend in (base, cand)]
        for label, doc in zip((args.baseline, args.candidate), docs, strict=True):
            rows += [facts_row(f"{case}/{Path(o['object']['path']).name}", label, o) for o in doc["objects"]]
        cmp = compare_set(docs[0], docs[1])
        if not cmp.ok:
            differing.append((case, cmp))
            fields.update(_generic(d.field) for d in cmp.divergences)
            layers.update({d.layer for d in cmp.divergences})
    cases += set_cases
    with open(args.out / "facts.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = [f"# gate: `{args.baseline}` → `{args.candidate}`", "",
               f"{len(cases)} cases, {len(differing)} with differences.", ""]
    if fields:
        summary += ["| class | cases |", "|---|---|"] + [f"| {c} | {n} |" for c, n in layers.most_common()] + [""]
        summary += ["| field | cases |", "|---|---|"] + [f"| `{f}` | {n} |" for f, n in fields.most_common()]
        summary += ["", "First differing cases:", ""]
        for case, cmp in differing[:5]:
            summary += [f"- {case}:"] + [f"  - {d}" for d in cmp.divergences[:6]]
    if smallest is not None:
        (args.out / "reproducer.c").write_text(smallest.source)
        (args.out / "reproducer.model.txt").write_text(f"{smallest_case}\n{smallest.model!r}\n")
        summary += ["", f"Smallest differing case: {smallest_case} ({len(smallest.source.splitlines())} lines of C), "
                    f"written to {args.out}/reproducer.c and reproducer.model.txt."]
    (args.out / "summary.md").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    return 1 if differing else 0


def _generic(field: str) -> str:
    """`maps[.percpu].after[cpu3]` → `maps[.percpu].after`: one line per kind of difference."""
    return field.split("[cpu")[0]


if __name__ == "__main__":
    sys.exit(main())
