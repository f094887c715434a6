"""Fixed object sets (docs/object-sets.md): the series' motivating cases, replayed before random sets.

Each entry takes the CPUs a backend can run on and returns an ObjectSet."""

from __future__ import annotations

from collections.abc import Callable

from generators.ctype import Array, Scalar
from generators.model import (
    Access,
    Add,
    Call,
    Function,
    MapReuse,
    ObjectSet,
    ProgramModel,
    Replace,
    Run,
    Store,
    StoreCpu,
    Variable,
)

U32, U64 = Scalar("u32"), Scalar("u64")


def _runs(program: str, cpus: tuple[int, ...]) -> tuple[Run, ...]:
    return tuple(Run(program, cpu) for cpu in cpus[:2])


def _counter_objects(first_init: int, second_init: int) -> tuple[ProgramModel, ProgramModel]:
    hits = Variable("hits", U64, ".percpu", init=(first_init,))
    first = ProgramModel("first", (hits, Variable("cpu_id", U32, ".percpu")),
                         (Function("a_count", (Add(Access("hits"), 1), StoreCpu(Access("cpu_id")))),))
    second = ProgramModel("second", (Variable("hits", U64, ".percpu", init=(second_init,)),
                                     Variable("cpu_id", U32, ".percpu")),
                          (Function("b_count", (Add(Access("hits"), 1000),)),))
    return first, second


def two_objects_own_maps(cpus: tuple[int, ...] = (0, 1)) -> ObjectSet:
    """Same `.percpu` layout in two objects, no reuse: each its own map (spec §7); a run of one object's program
    never shows in the other's."""
    first, second = _counter_objects(5, 7)
    return ObjectSet((first, second), (), _runs("a_count", cpus) + (Run("b_count", cpus[-1], 2),))


def reused_map_keeps_first_image(cpus: tuple[int, ...] = (0, 1)) -> ObjectSet:
    """The second object reuses the first's `.percpu` map: its own image (7) is never written, and both
    objects' runs count in the same per-CPU slots."""
    first, second = _counter_objects(5, 7)
    return ObjectSet((first, second), (MapReuse("second", ".percpu", "first"),),
                     _runs("a_count", cpus) + (Run("b_count", cpus[-1], 2),))


def _target(exported: bool) -> ProgramModel:
    vs = (Variable("seen", Array(U64, 2), ".percpu", init=(1, 2)), Variable("calls", U64, ".bss"))
    return ProgramModel("target", vs, (
        Function("a_prog", (Add(Access("calls"), 1), Call("a_sub"), StoreCpu(Access("seen", (1,))))),
        Function("a_other", (Call("a_sub"),)),
        Function("a_sub", (Store(Access("seen", (0,)), 0xBAD),), subprogram=True, exported=exported)))


def _extension(reuse: bool) -> ProgramModel:
    vs = (Variable("seen", Array(U64, 2), ".percpu", init=(3, 4)),)
    return ProgramModel("extension", vs, (
        Function("b_ext", (Add(Access("seen", (0,)), 0x100),), replaces=Replace("a_prog", "a_sub")),))


def freplace_shared_variable(cpus: tuple[int, ...] = (0, 1)) -> ObjectSet:
    """An extension replaces a_sub in a_prog and reuses the target's `.percpu` map: a run of a_prog on CPU i adds
    to seen[0] in CPU i's slot (the original a_sub's store never happens); a_other keeps its own a_sub."""
    return ObjectSet((_target(True), _extension(True)), (MapReuse("extension", ".percpu", "target"),),
                     _runs("a_prog", cpus) + (Run("a_other", cpus[0]),))


def freplace_own_map(cpus: tuple[int, ...] = (0, 1)) -> ObjectSet:
    """The same extension without reuse writes its own object's map: the target's slot keeps the image."""
    return ObjectSet((_target(True), _extension(False)), (), _runs("a_prog", cpus))


def freplace_static_target(cpus: tuple[int, ...] = (0, 1)) -> ObjectSet:
    """A static subprogram cannot be replaced: the extension's object fails to load; the target still runs."""
    return ObjectSet((_target(False), _extension(True)), (MapReuse("extension", ".percpu", "target"),),
                     _runs("a_prog", cpus))


SET_CORPUS: dict[str, Callable[[tuple[int, ...]], ObjectSet]] = {
    "two_objects_own_maps": two_objects_own_maps,
    "reused_map_keeps_first_image": reused_map_keeps_first_image,
    "freplace_shared_variable": freplace_shared_variable,
    "freplace_own_map": freplace_own_map,
    "freplace_static_target": freplace_static_target,
}
