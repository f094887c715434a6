"""The skeleton life cycle, as upstream's global_data_init drives it, over random layouts: bpftool's header and
the libbpf under test, compiled into a program that runs beside the kernel (schema.skeleton).

Each per-CPU map: the struct pointer after open and load, `bpf_map__initial_value` against it, `sizeof` against
`value_size`, writes through each member reaching every possible CPU, `bpf_map__set_value_size` (PAGE_SIZE and
random sizes), the read-only image after load, and libbpf's BPF_F_CPU/BPF_F_ALL_CPUS operations with their
error cases.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import assume, event, given
from hypothesis import strategies as st

from generators.strategies import program_models
from oracle.profiles import profile
from oracle.skeleton import predict_skeleton
from schema.skeleton import SkeletonPlan, compare_skeleton
from suites import known
from suites.skeleton_plans import PAGE_SIZE, const_strings_object, light_object, percpu_sections
from suites.support import backend_meta, compile_global, runs_of, valid_for_types, write_bundle


def resize_to(old: int) -> st.SearchStrategy[int]:
    """upstream's PAGE_SIZE, and random sizes: smaller, larger, not a multiple of 8"""
    return st.one_of(st.just(PAGE_SIZE), st.integers(1, max(1, old - 1)), st.integers(old + 1, 2 * PAGE_SIZE),
                     st.integers(1, 2 * PAGE_SIZE).filter(lambda n: n % 8))


@given(st.data())
def test_skeleton_life_cycle_matches_the_oracle(clang, backend, data):
    if not hasattr(backend, "observe_skeleton") or backend.loader != "libbpf":
        pytest.skip(f"{backend.name}: the skeleton harness runs on the vm's columns of the stack's libbpf")
    prof = profile(backend.profile)
    if not (prof.kernel.percpu_data_probe and prof.libbpf.probes_feature):
        pytest.skip(f"{backend.name}: profile {backend.profile}: the skeleton life cycle is predicted where "
                    "libbpf creates the per-CPU maps")
    model = data.draw(program_models(cpus=backend.online_cpus), label="model")
    compiled = compile_global(clang, model)
    percpu = percpu_sections(compiled, prof)
    assume(percpu)
    plain = predict_skeleton(model, compiled.facts, prof, SkeletonPlan(load=False),
                             possible_cpus=backend.possible_cpus, online_cpus=list(backend.online_cpus))
    sizes = {s: plain["maps"][s]["value_size"] for s in percpu} if plain.get("maps") else {}
    writes = {s: valid_for_types(model, s, data.draw(st.binary(min_size=n, max_size=n), label=f"write {s}"),
                                 compiled) for s, n in sizes.items()}
    resize = {}
    if sizes and data.draw(st.booleans(), label="resize?"):
        target = data.draw(st.sampled_from(sorted(sizes)), label="resized map")
        resize[target] = data.draw(resize_to(sizes[target]), label="new value_size")
        sizes[target] = resize[target]
    load = all(resize[s] >= plain["maps"][s]["value_size"] for s in resize)  # a shrunk map may cut a variable
    cpu = data.draw(st.integers(0, backend.possible_cpus - 1), label="BPF_F_CPU update on")
    iterated = data.draw(st.sampled_from(sorted(sizes)), label="iterated map") if sizes else None
    summed = data.draw(st.integers(0, sizes[iterated] - 1), label="summed byte") if iterated else 0
    # upstream's lskel subtest, where a light skeleton can take the object: no resize (it has no
    # set_value_size), and no extension or tail-call programs
    light = None if resize else light_object(clang, model, compiled)
    const_strings = const_strings_object(clang)
    plan = SkeletonPlan(writes=writes, resize=resize, load=load, runs=tuple(runs_of(model)), light_object=light,
                        const_strings=const_strings,
                        all_cpus={s: data.draw(st.binary(min_size=n, max_size=n), label=f"all cpus {s}")
                                  for s, n in sizes.items()},
                        one_cpu={s: (cpu, data.draw(st.binary(min_size=n, max_size=n), label=f"cpu {cpu} {s}"))
                                 for s, n in sizes.items()},
                        # upstream's percpu_ro_map holds one 8-byte value; its programs read 8 bytes at offset 0
                        rdonly=data.draw(st.binary(min_size=8, max_size=64), label="read-only array value"),
                        iterate_section=iterated, iterate_offset=summed)
    expected = predict_skeleton(model, compiled.facts, prof, plan, possible_cpus=backend.possible_cpus,
                                online_cpus=list(backend.online_cpus))
    observed = backend.observe_skeleton(compiled, plan)
    event(f"harness {observed.get('harness')}")
    event(f"load {observed.get('load')}")
    for what, asked in (("resize", resize), ("light skeleton", light), ("iterator", iterated)):
        if asked:
            event(what)
    cmp = compare_skeleton(expected, observed)
    triaged = known.triage(cmp, {**observed, "env": backend.env | {"profile": backend.profile}})
    known.record(triaged)
    if not cmp.ok and not triaged.all_known:
        sources = {"plan.json": json.dumps(plan.to_json(), indent=1)}
        for name in ("harness.c", "types.h"):  # what the harness compiled, when it did not build
            path = Path(observed.get("harness_dir", "/nonexistent"), name)
            if path.exists():
                sources[name] = path.read_text()
        root = write_bundle(f"skeleton-{backend.name}", compiled, {"expected": expected, "observed": observed},
                            cmp.report(), sources, {**backend_meta(backend), "check": "skeleton"})
        pytest.fail(f"{backend.name}: the skeleton life cycle diverges, layer {cmp.blame()} (bundle {root})\n"
                    f"{cmp.report()}{known.annotate(triaged)}", pytrace=False)
