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

When generated models differ, a Hypothesis search whose property is "baseline and candidate agree" starts from them
and shrinks to a minimal differing model (at most --shrink-examples new models observed, within --shrink-seconds);
its C source is printed and kept as a failure bundle, which `python -m suites.gate --replay BUNDLE` re-runs on both
configurations (exit 1 the difference reproduces, 0 it does not, 2 a bad bundle).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hypothesis import strategies as st

from corpus.selftest import selftest_model
from corpus.sets import SET_CORPUS
from generators.model import ProgramModel
from generators.strategies import fixed_sample, program_models
from schema.result import LAYERS, Comparison, Result, compare, compare_set
from suites.support import Compiled

if TYPE_CHECKING:
    from hypothesis.database import ExampleDatabase

    from suites.backends import Backend
    from toolchain.clang import Clang

# exit codes beside 0 (no difference) and 1 (differences): a libbpf that cannot be had, by what failed
EXIT_USAGE = 2
EXIT_LIBBPF = {"usage": EXIT_USAGE, "download": 6, "build": 8}

Choices = tuple[object, ...]  # the choices Hypothesis made while drawing one model


@st.composite
def _with_choices(draw: st.DrawFn, strategy: st.SearchStrategy[ProgramModel]) -> tuple[ProgramModel, Choices]:
    """The drawn model and the choices that produced it: saved in an example database they make a later search
    over the same strategy start at this very model. The wrapper draws nothing itself, so the models are those
    of the bare strategy."""
    from hypothesis.control import current_build_context

    model = draw(strategy)
    return model, tuple(current_build_context().data.choices)


def sample_with_choices(n: int, cpus: tuple[int, ...]) -> list[tuple[ProgramModel, Choices]]:
    return fixed_sample(_with_choices(program_models(cpus=cpus)), n)


def sample_models(n: int, cpus: tuple[int, ...]) -> list[ProgramModel]:
    """A fixed-seed sample: the same models on every run and machine."""
    return [model for model, _ in sample_with_choices(n, cpus)]


@dataclass(frozen=True)
class Pair:
    """One model observed on both configurations."""

    compiled: Compiled
    docs: tuple[Result, Result]
    cmp: Comparison


def observe_pair(clang: Clang, base: Backend, cand: Backend, model: ProgramModel) -> Pair:
    from suites.support import compile_global, runs_of

    compiled = compile_global(clang, model)
    docs = (base.observe(compiled, runs_of(model)), cand.observe(compiled, runs_of(model)))
    return Pair(compiled, docs, compare(docs[0], docs[1]))


@dataclass
class Shrunk:
    pair: Pair
    observed: int  # models observed by the search (the seeds' known observations not counted)
    seconds: float
    errors: int  # candidates whose observation raised: not a reproducer of this difference


class _Found(Exception):
    def __init__(self, model: ProgramModel) -> None:
        super().__init__("baseline and candidate differ")
        self.model = model


def _seed_database(entries: list[bytes]) -> ExampleDatabase:
    """An example database that serves `entries` as the secondary corpus of whichever test asks (Hypothesis
    shrinks what it replays from there, unlike its primary corpus of already-minimal cases) and keeps nothing."""
    from hypothesis.database import ExampleDatabase

    class SeedDatabase(ExampleDatabase):
        def fetch(self, key: bytes) -> Iterable[bytes]:
            return iter(entries if key.endswith(b".secondary") else ())

        def save(self, key: bytes, value: bytes) -> None:
            pass

        def delete(self, key: bytes, value: bytes) -> None:
            pass

    return SeedDatabase()


def shrink(seeds: list[tuple[ProgramModel, Choices]], known: dict[ProgramModel, Pair], cpus: tuple[int, ...],
           observe: Callable[[ProgramModel], Pair], fields: set[str], max_examples: int,
           seconds: float) -> Shrunk | None:
    """Search for a minimal model on which the two configurations differ in one of `fields`: Hypothesis replays
    the seeds' choices and shrinks the smallest that still differs; with no seed it generates. A fixed seed keeps
    the result the same from run to run. Past the budget every new candidate counts as agreeing, which ends the
    shrink; results are memoised, so the final replay of the minimal case observes nothing again. None when no
    differing model was found."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, seed, settings
    from hypothesis.database import choices_to_bytes

    memo = dict(known)
    errors: dict[ProgramModel, Exception] = {}
    observed = 0
    start = time.monotonic()

    def differs(model: ProgramModel) -> bool:
        nonlocal observed
        if model not in memo and model not in errors:
            if observed >= max_examples or time.monotonic() - start > seconds:
                return False
            observed += 1
            try:
                memo[model] = observe(model)
            except Exception as e:  # noqa: BLE001 - another failure than this difference: not a reproducer
                errors[model] = e
        pair = memo.get(model)
        return pair is not None and any(_generic(d.field) in fields for d in pair.cmp.divergences)

    def agree(model: ProgramModel) -> None:
        if differs(model):
            raise _Found(model)

    database = _seed_database([choices_to_bytes(c) for _, c in seeds])  # type: ignore[arg-type]
    phases = [Phase.reuse, Phase.shrink] if seeds else [Phase.generate, Phase.shrink]
    # the settings go on after seed(), which would otherwise switch the example database off
    search = settings(database=database, phases=phases, max_examples=max(2, len(seeds), max_examples),
                      deadline=None, report_multiple_bugs=False, verbosity=Verbosity.quiet,
                      suppress_health_check=list(HealthCheck))(seed(0)(given(program_models(cpus=cpus))(agree)))
    try:
        search()
    except _Found as found:
        return Shrunk(memo[found.model], observed, time.monotonic() - start, len(errors))
    return None


def write_gate_bundle(pair: Pair, base: Backend, cand: Backend, labels: tuple[str, str]) -> Path:
    """A failure bundle of the suite's format (the baseline's document as `expected.json`, the candidate's as
    `observed.json`), whose meta names both configurations for `--replay`."""
    from suites.support import backend_meta, write_bundle

    meta = {**backend_meta(cand), "check": "gate", "layers": list(LAYERS),
            "gate": {"baseline": base.config, "candidate": cand.config, "labels": list(labels)}}
    root = write_bundle(f"gate-{cand.name}", pair.compiled, {"expected": pair.docs[0], "observed": pair.docs[1]},
                        pair.cmp.report(), meta=meta)
    (root / "replay.txt").write_text(f"python -m suites.gate --replay {root}\n")
    return root


def replay(bundle: Path, clang_path: str | None) -> int:
    """Re-run a gate bundle's model on its two configurations: 1 when they still differ, 0 when not."""
    from generators.model import from_jsonable
    from suites.backends import Unavailable, from_config
    from toolchain.clang import Clang, ToolchainError

    try:
        meta = json.loads((bundle / "meta.json").read_text())
        configs = meta["gate"]["baseline"], meta["gate"]["candidate"]
        model = from_jsonable(json.loads((bundle / "model.json").read_text()))
        if not isinstance(model, ProgramModel):
            raise TypeError("model.json holds no ProgramModel")
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"gate: {bundle} is not a readable gate bundle: {e}", file=sys.stderr)
        return EXIT_USAGE
    defaults = {"clang": clang_path} if clang_path else {}
    try:
        clang = Clang.find(clang_path)
        base, cand = (from_config(c, defaults) for c in configs)
    except (ToolchainError, Unavailable, ValueError) as e:
        print(f"gate: {e}", file=sys.stderr)
        return EXIT_USAGE
    pair = observe_pair(clang, base, cand, model)
    if pair.cmp.ok:
        print(f"not reproduced: `{configs[0]}` and `{configs[1]}` agree on {bundle}")
        return 0
    print(f"reproduced: `{configs[0]}` → `{configs[1]}`, {len(pair.cmp.divergences)} difference(s)\n"
          f"{pair.cmp.report()}")
    return 1


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
    parser.add_argument("--baseline")
    parser.add_argument("--candidate")
    parser.add_argument("--examples", type=int, default=30, help="generated models besides the corpus")
    parser.add_argument("--set-examples", type=int, default=10,
                        help="generated object sets (map reuse, freplace) besides their corpus")
    parser.add_argument("--shrink-examples", type=int, default=40,
                        help="new models the shrinking search may observe on both configurations (0: no search)")
    parser.add_argument("--shrink-seconds", type=float, default=180,
                        help="wall-clock bound of the shrinking search")
    parser.add_argument("--skeleton-examples", type=int, default=3,
                        help="sample models whose skeleton life cycle is compared too (libbpf configurations)")
    parser.add_argument("--out", type=Path, default=Path("reports/gate"))
    parser.add_argument("--clang")
    parser.add_argument("--replay", type=Path, metavar="BUNDLE", help="re-run a gate bundle on its configurations")
    args = parser.parse_args(argv)
    if args.replay is not None:
        return replay(args.replay, args.clang)
    if not (args.baseline and args.candidate):
        print("gate: --baseline and --candidate are both required (or --replay BUNDLE)", file=sys.stderr)
        return EXIT_USAGE

    from backends.libbpf_source import LibbpfSourceError
    from suites.backends import Unavailable, from_config
    from suites.sets import compile_set, sample_sets, set_plan
    from toolchain.clang import Clang, ToolchainError

    if min(args.examples, args.set_examples, args.shrink_examples, args.shrink_seconds, args.skeleton_examples) < 0:
        print("gate: --examples, --set-examples, --skeleton-examples, --shrink-examples and --shrink-seconds take "
              "0 or more",
              file=sys.stderr)
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
    sample = sample_with_choices(args.examples, cpus)
    cases = [("corpus:selftest", selftest_model(cpus[:2]))]
    cases += [(f"sample:{i}", m) for i, (m, _) in enumerate(sample)]

    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    differing: list[tuple[str, Comparison]] = []
    fields: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    smallest: Compiled | None = None  # of the differing cases, the one with the shortest source
    pairs: dict[ProgramModel, Pair] = {}
    for case, model in cases:
        pair = pairs[model] = observe_pair(clang, base, cand, model)
        rows += [facts_row(case, label, doc) for label, doc in zip((args.baseline, args.candidate), pair.docs,
                                                                    strict=True)]
        if not pair.cmp.ok:
            differing.append((case, pair.cmp))
            fields.update(_generic(d.field) for d in pair.cmp.divergences)
            layers.update({d.layer for d in pair.cmp.divergences})
            if smallest is None or len(pair.compiled.source) < len(smallest.source):
                smallest, smallest_case = pair.compiled, case
    set_cases = [(f"sets:{name}", fn(cpus[:2])) for name, fn in sorted(SET_CORPUS.items())]
    set_cases += [(f"set-sample:{i}", m) for i, m in enumerate(sample_sets(args.set_examples, cpus))]
    for case, object_set in set_cases:
        plan = set_plan(compile_set(clang, object_set))
        set_docs = [backend.observe_set(plan) for backend in (base, cand)]
        for label, doc in zip((args.baseline, args.candidate), set_docs, strict=True):
            rows += [facts_row(f"{case}/{Path(o['object']['path']).name}", label, o) for o in doc["objects"]]
        cmp = compare_set(set_docs[0], set_docs[1])
        if not cmp.ok:
            differing.append((case, cmp))
            fields.update(_generic(d.field) for d in cmp.divergences)
            layers.update({d.layer for d in cmp.divergences})
    skeleton_cases = 0
    if all(getattr(b, "loader", None) == "libbpf" and hasattr(b, "observe_skeleton") for b in (base, cand)):
        for case, model, resize in _skeleton_cases(cases, args.skeleton_examples):
            skel = _skeleton_pair(clang, base, cand, model, resize)
            if skel is None:
                continue
            skeleton_cases += 1
            if not skel.ok:
                differing.append((case, skel))
                fields.update(_generic(d.field) for d in skel.divergences)
                layers.update({d.layer for d in skel.divergences})
    ncases = len(cases) + len(set_cases) + skeleton_cases
    with open(args.out / "facts.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = [f"# gate: `{args.baseline}` → `{args.candidate}`", "",
               f"{ncases} cases, {len(differing)} with differences.", ""]
    if fields:
        summary += ["| class | cases |", "|---|---|"] + [f"| {c} | {n} |" for c, n in layers.most_common()] + [""]
        summary += ["| field | cases |", "|---|---|"] + [f"| `{f}` | {n} |" for f, n in fields.most_common()]
        summary += ["", "First differing cases:", ""]
        for case, cmp in differing[:5]:
            summary += [f"- {case}:"] + [f"  - {d}" for d in cmp.divergences[:6]]
    shrunk = None
    if differing and args.shrink_examples > 0:
        seeds = [(m, c) for m, c in sample if not pairs[m].cmp.ok]
        # the seeds' kinds of difference (all kinds when only fixed cases differ): a shrink that slipped to another
        # difference would reproduce something else
        wanted = {_generic(d.field) for m, _ in seeds for d in pairs[m].cmp.divergences} or set(fields)
        shrunk = shrink(seeds, pairs, cpus, lambda m: observe_pair(clang, base, cand, m), wanted,
                        args.shrink_examples, args.shrink_seconds)
    if shrunk is not None:
        reproducer = shrunk.pair.compiled
        bundle = write_gate_bundle(shrunk.pair, base, cand, (args.baseline, args.candidate))
        (args.out / "reproducer.c").write_text(reproducer.source)
        (args.out / "reproducer.model.txt").write_text(f"shrunk\n{reproducer.model!r}\n")
        origin = f"from {len(seeds)} differing sample model(s)" if seeds else "generated"
        summary += ["", f"Shrunk reproducer ({origin}; {shrunk.observed} model(s) observed in {shrunk.seconds:.1f}s"
                    + (f", {shrunk.errors} raised" if shrunk.errors else "")
                    + f"): {len(reproducer.source.splitlines())} lines of C"
                    + (f", against {len(smallest.source.splitlines())} in the smallest differing case "
                       f"({smallest_case})" if smallest is not None else "") + "; written to "
                    f"{args.out}/reproducer.c and reproducer.model.txt.", ""]
        summary += [f"- {d}" for d in shrunk.pair.cmp.divergences[:6]]
        summary += ["", "```c", reproducer.source.rstrip("\n"), "```", "", f"Bundle: {bundle}",
                    f"Replay: python -m suites.gate --replay {bundle}"]
    elif differing and args.shrink_examples > 0:
        summary += ["", f"Shrinking found no differing generated model within {args.shrink_examples} model(s) or "
                    f"{args.shrink_seconds:g}s."]
    if shrunk is None and smallest is not None:
        (args.out / "reproducer.c").write_text(smallest.source)
        (args.out / "reproducer.model.txt").write_text(f"{smallest_case}\n{smallest.model!r}\n")
        summary += ["", f"Smallest differing case: {smallest_case} ({len(smallest.source.splitlines())} lines of C), "
                    f"written to {args.out}/reproducer.c and reproducer.model.txt."]
    (args.out / "summary.md").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    return 1 if differing else 0


def _skeleton_cases(cases: list[tuple[str, ProgramModel]], n: int) -> list[tuple[str, ProgramModel, bool]]:
    """The skeleton life cycle on the corpus (with upstream's PAGE_SIZE resize) and the first n sample models."""
    return [(f"skeleton:{case}", model, case.startswith("corpus:")) for case, model in cases[:1 + n]]


# the harness's own paths and texts: not facts of either configuration
_SKELETON_LOCAL = ("harness_dir", "harness_message", "mismatched_types")


def _skeleton_pair(clang: Clang, base: Backend, cand: Backend, model: ProgramModel, resize: bool) -> Comparison | None:
    """One fixed plan on both configurations, compared field by field (schema.skeleton); None without a
    per-CPU section."""
    from schema.skeleton import compare_skeleton
    from suites.skeleton_plans import fixed_plan
    from suites.support import compile_global

    compiled = compile_global(clang, model)
    sizes = {s.name: s.size for s in compiled.facts.data_sections()
             if s.name == ".percpu" or s.name.startswith(".percpu.")}
    if not sizes:
        return None
    plan = fixed_plan(clang, model, compiled, sizes, resize)
    reports = [{k: v for k, v in b.observe_skeleton(compiled, plan).items()  # type: ignore[attr-defined]
                if k not in _SKELETON_LOCAL} for b in (base, cand)]
    cmp = compare_skeleton(reports[0], reports[1])
    for d in cmp.divergences:
        d.field = f"skeleton.{d.field}"
    return cmp


def _generic(field: str) -> str:
    """`maps[.percpu].after[cpu3]` → `maps[.percpu].after`: one line per kind of difference."""
    return field.split("[cpu")[0]


if __name__ == "__main__":
    sys.exit(main())
