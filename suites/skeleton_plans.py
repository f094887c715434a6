"""Skeleton plans shared by the property and the gate: which per-CPU maps a model's object has, the light
skeleton's twin object, and a fixed plan (the gate compares two configurations on the same plan, not drawn)."""

from __future__ import annotations

from corpus.const_strings import SOURCE as CONST_STRINGS_SOURCE
from generators.model import ProgramModel
from oracle.predict import section_kind
from oracle.profiles import Profile
from schema.skeleton import SkeletonPlan
from suites.support import Compiled, runs_of, valid_for_types
from toolchain.clang import Clang, compile_c

PAGE_SIZE = 4096


def percpu_sections(compiled: Compiled, prof: Profile) -> list[str]:
    return [s.name for s in compiled.facts.data_sections() if section_kind(s.name, prof.libbpf) == "percpu"]


def light_object(clang: Clang, model: ProgramModel, compiled: Compiled) -> str | None:
    """The same program with its raw_tp sections named (bpftool -L crashes on a bare raw_tp: docs/findings.md),
    where a light skeleton can take it: no extension or tail-call programs."""
    if model.has_tail_calls or any(f.replaces for f in model.functions):
        return None
    return str(compile_c(clang, compiled.source.replace('SEC("raw_tp")', 'SEC("raw_tp/sys_enter")'),
                         name=f"{model.name}_light"))


def const_strings_object(clang: Clang) -> str:
    return str(compile_c(clang, CONST_STRINGS_SOURCE, name="const_strings"))


def _pattern(n: int, seed: int) -> bytes:
    return bytes((seed + 37 * i) & 0xFF for i in range(n))


def fixed_plan(clang: Clang, model: ProgramModel, compiled: Compiled, sizes: dict[str, int],
               resize: bool) -> SkeletonPlan:
    """Every part of the life cycle with fixed bytes; with `resize`, upstream's PAGE_SIZE on the first map
    (then no light skeleton: it has no set_value_size)."""
    first = sorted(sizes)[0] if sizes else None
    resized = {first: PAGE_SIZE} if resize and first is not None else {}
    final = {s: resized.get(s, n) for s, n in sizes.items()}
    return SkeletonPlan(
        writes={s: valid_for_types(model, s, _pattern(n, 1), compiled) for s, n in sizes.items()},
        resize=resized, runs=tuple(runs_of(model)),
        all_cpus={s: _pattern(n, 2) for s, n in final.items()},
        one_cpu={s: (0, _pattern(n, 3)) for s, n in final.items()},
        rdonly=_pattern(16, 4), iterate_section=first, iterate_offset=0,
        light_object=None if resized else light_object(clang, model, compiled),
        const_strings=const_strings_object(clang))
