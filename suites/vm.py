"""`python -m suites.vm [--kernel-image PATH] [--modules DIR] [--vm-cpus N] [--vm-memory M] [--vm-timeout S]
[--examples N] [--clang PATH]`

The conformance properties against a user-supplied kernel, in one boot. Objects are compiled on the host (the
guest is emulated and slow); the corpus plus a fixed-seed sample of generated models, and the object-set corpus
plus a sample of sets (several objects, map reuse, freplace), is observed inside the guest through both loaders
(global rendering) and through libbpf (lowered rendering); back on the host each observation
is compared with the oracle's prediction for the profile the guest's probes select — never a flag. Shrinking needs
many boots, so this runs a fixed sample; a divergence leaves a bundle that `python -m suites.replay` re-runs on
the host's backends.

Exit: 0 conforms, 1 divergence, 2 bad input, 3 toolchain, 4 VM backend unavailable here, 5 guest failure.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from corpus import CORPUS
from corpus.sets import SET_CORPUS
from generators.render import lowered_value_size, section_ident
from oracle.objectset import predict_set
from oracle.predict import predict
from oracle.profiles import PROFILES, UnknownProfile
from oracle.profiles import profile as profile_named
from schema.profiles import lowered_profile
from schema.result import compare, compare_set
from suites.gate import sample_models
from suites.sets import (
    CompiledSet,
    compile_set,
    compile_set_lowered,
    lowered_set_initial,
    sample_sets,
    set_as_global,
    set_plan,
    write_set_bundle,
)
from suites.support import (
    Compiled,
    compile_global,
    compile_lowered,
    lowered_as_global,
    percpu_offsets,
    runs_of,
    write_bundle,
)


def _lowered_initial(compiled: Compiled) -> dict[str, str]:
    offsets = percpu_offsets(compiled)
    out = {}
    for s in compiled.model.sections():
        if s == ".percpu" or s.startswith(".percpu."):
            size = lowered_value_size(compiled.model, offsets, s)
            out[section_ident(s)] = compiled.facts.require_section(s).data.ljust(size, b"\0").hex()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m suites.vm")
    parser.add_argument("--kernel-image", type=Path)
    parser.add_argument("--modules", type=Path)
    parser.add_argument("--vm-cpus", type=int, default=2)
    parser.add_argument("--vm-memory", default="1G")
    parser.add_argument("--vm-timeout", type=float, default=300.0)
    parser.add_argument("--examples", type=int, default=20, help="generated models besides the corpus")
    parser.add_argument("--set-examples", type=int, default=5, help="generated object sets besides their corpus")
    parser.add_argument("--clang")
    args = parser.parse_args(argv)
    from backends.vm.runner import VmConfig, VmError, VmSession, VmUnavailable, default_kernel_image
    from toolchain.clang import Clang, CompileError, ToolchainError

    if args.vm_cpus < 2:
        print("vm: --vm-cpus must be at least 2 so per-CPU behaviour is visible", file=sys.stderr)
        return 2
    try:
        clang = Clang.find(args.clang)
        image = args.kernel_image or default_kernel_image()
        if not image.exists():
            raise VmUnavailable(f"no kernel image at {image}")
        cpus = tuple(range(args.vm_cpus))
        models = [(f"corpus:{n}", fn(cpus)) for n, fn in sorted(CORPUS.items())]
        models += [(f"sample:{i}", m) for i, m in enumerate(sample_models(args.examples, cpus))]
        plan = []
        requests: list[dict[str, Any]] = []  # the guest's JSON requests (runner.run_batch)
        for case, model in models:
            compiled = compile_global(clang, model)
            lowered = compile_lowered(clang, compiled)
            for kind, obj, loader, initial in (("libbpf", compiled, "libbpf", {}), ("raw", compiled, "raw", {}),
                                               ("lowered", lowered, "libbpf", _lowered_initial(compiled))):
                plan.append((case, kind, compiled, obj))
                requests.append({"object": str(obj.path.resolve()), "loader": loader, "runs": runs_of(model),
                                 "initial_values": initial})
        set_cases = [(f"sets:{n}", fn(cpus)) for n, fn in sorted(SET_CORPUS.items())]
        set_cases += [(f"set-sample:{i}", m) for i, m in enumerate(sample_sets(args.set_examples, cpus))]
        set_entries = []
        for case, set_model in set_cases:
            compiled_set = compile_set(clang, set_model)
            lowered_set = compile_set_lowered(clang, compiled_set)
            merged = predict_set(set_model, [c.facts for c in compiled_set.objects], PROFILES["merged"],
                                 possible_cpus=args.vm_cpus, online_cpus=list(cpus))
            for kind, objs, loader, set_initial in (
                    ("set-libbpf", compiled_set, "libbpf", ()), ("set-raw", compiled_set, "raw", ()),
                    ("set-lowered", lowered_set, "libbpf", lowered_set_initial(compiled_set, merged))):
                sp = set_plan(objs, set_initial)
                set_entries.append((len(requests), case, kind, compiled_set))
                requests.append({"objects": [str(p.resolve()) for p in sp.objects], "loader": loader,
                                 "reuse": list(sp.reuse), "attach": list(sp.attach), "runs": list(sp.runs),
                                 "initial_values": [{k: v.hex() for k, v in d.items()} for d in sp.initial_values]})
        start = time.perf_counter()
        session = VmSession(VmConfig(image, args.modules, args.vm_cpus, args.vm_memory, args.vm_timeout))
        observations = session.run_batch(requests)
    except (ToolchainError, CompileError) as e:
        print(f"vm: {e}", file=sys.stderr)
        return 3
    except VmUnavailable as e:
        print(f"vm: unavailable: {e}", file=sys.stderr)
        return 4
    except VmError as e:
        print(f"vm: {e}\n{getattr(e, 'console_tail', '')}", file=sys.stderr)
        return 5
    seconds = time.perf_counter() - start
    env = next((o["env"] for o in observations if "error" not in o), observations[0].get("env", {}))
    print(f"guest kernel {env.get('kernel_release')} ({env.get('vm_accel')}), libbpf {env.get('libbpf')}, "
          f"features {env.get('features')}, {len(requests)} observations in one boot of {seconds:.1f}s "
          f"({len(requests) / seconds:.2f}/s)")
    outcome: Counter = Counter()
    failed = 0
    for (case, kind, compiled, obj), observed in zip(plan, observations, strict=False):
        if "error" in observed:
            outcome[(kind, "error")] += 1
            failed += 1
            print(f"  {case} {kind}: the guest could not observe it: {observed['error']['message']}")
            continue
        profile = lowered_profile(observed["env"]["profile"]) if kind == "lowered" else observed["env"]["profile"]
        try:
            prof = profile_named(profile)
        except UnknownProfile:
            print(f"  {case} {kind}: the guest reports profile {profile!r}, which the oracle does not know")
            failed += 1
            continue
        expected = predict(compiled.model, compiled.facts, prof,
                           possible_cpus=observed["env"]["possible_cpus"], online_cpus=observed["env"]["online_cpus"])
        if kind == "lowered":
            cmp = compare(expected, lowered_as_global(observed, expected, compiled.model), layers=("runtime",))
        else:
            cmp = compare(expected, observed)
        rejected = not expected["open"]["ok"] or any(p["verdict"] != "accepted" for p in expected["programs"])
        outcome[(kind, "pass" if cmp.ok else "FAIL")] += 1
        outcome[(kind, "predicted-reject")] += int(rejected and cmp.ok)
        if not cmp.ok:
            failed += 1
            where = write_bundle(f"vm-{kind}", compiled, {"expected": expected, "observed": observed},
                                 cmp.report(), {"lowered.c": obj.source} if kind == "lowered" else None,
                                 {"check": "vm", "backend": f"vm-{kind}", "profile": profile})
            print(f"  {case} {kind}: {len(cmp.divergences)} divergence(s), blame {cmp.blame()}; bundle {where}")
    for index, case, kind, compiled_set in set_entries:
        failed += _check_set(case, kind, compiled_set, observations[index], outcome)
    print("| observation | pass | predicted-reject | FAIL | error |\n|---|---|---|---|---|")
    for kind in ("libbpf", "raw", "lowered", "set-libbpf", "set-raw", "set-lowered"):
        print(f"| vm-{kind} | {outcome[(kind, 'pass')]} | {outcome[(kind, 'predicted-reject')]} | "
              f"{outcome[(kind, 'FAIL')]} | {outcome[(kind, 'error')]} |")
    return 1 if failed else 0


def _check_set(case: str, kind: str, compiled: CompiledSet, observed: dict, outcome: Counter) -> int:
    """Compare one set observation from the guest with the oracle; 1 when it fails."""
    if "error" in observed:
        outcome[(kind, "error")] += 1
        print(f"  {case} {kind}: the guest could not observe it: {observed['error']['message']}")
        return 1
    env = observed["env"]
    profile = lowered_profile(env["profile"]) if kind == "set-lowered" else env["profile"]
    try:
        prof = profile_named(profile)
    except UnknownProfile:
        print(f"  {case} {kind}: the guest reports profile {profile!r}, which the oracle does not know")
        return 1
    expected = predict_set(compiled.model, [c.facts for c in compiled.objects], prof,
                           possible_cpus=env["possible_cpus"], online_cpus=env["online_cpus"])
    if kind == "set-lowered":
        cmp = compare_set(expected, set_as_global(observed, expected, compiled), layers=("runtime",))
    else:
        cmp = compare_set(expected, observed)
    rejected = any(not o["open"]["ok"] or any(p["verdict"] != "accepted" for p in o["programs"])
                   for o in expected["objects"])
    outcome[(kind, "pass" if cmp.ok else "FAIL")] += 1
    outcome[(kind, "predicted-reject")] += int(rejected and cmp.ok)
    if cmp.ok:
        return 0
    where = write_set_bundle(f"vm-{kind}", compiled, {"expected": expected, "observed": observed}, cmp.report(),
                             {"check": "vm", "backend": f"vm-{kind}", "profile": profile})
    print(f"  {case} {kind}: {len(cmp.divergences)} divergence(s), blame {cmp.blame()}; bundle {where}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
