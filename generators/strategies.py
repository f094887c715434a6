"""Hypothesis strategies for program models.

Small composable pieces: types, initialisers, accesses, operations, functions, schedules. Every choice lists its
simplest option first so shrinking goes toward fewer variables, smaller types and zero values; the rare
large arrays exist to reach the per-CPU allocator limit (32 KiB) and stay rare.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TypeVar

from hypothesis import strategies as st

from generators.ctype import Array, CType, Enum, Field, Leaf, Path, Record, Scalar
from generators.model import (
    Access,
    Add,
    Branch,
    Call,
    Copy,
    Function,
    MapReuse,
    ObjectSet,
    Op,
    ProgramModel,
    Replace,
    Run,
    Store,
    StoreCpu,
    TailCall,
    Variable,
)
from generators.render import init_leaves

_V = TypeVar("_V")

SCALAR_KINDS = ("u8", "s32", "u32", "s8", "char", "bool", "u16", "s16", "u64", "s64")
# Sections a variable may be placed in; `.data.percpu` and `.data..percpu` are ordinary data (spec §1).
SECTIONS = (".percpu", ".data", ".bss", ".rodata", ".percpu.data", ".data.tally", ".percpu.looooooooong",
            ".data.percpu", ".data..percpu", ".percpu.b")
PERCPU_SECTIONS = tuple(s for s in SECTIONS if s == ".percpu" or s.startswith(".percpu."))
OBJECT_NAMES = ("gen", "my_object", "percpu_conformance_gen")
# Array lengths: mostly small; the large ones put a u64 array at and just past 32 KiB.
SMALL_COUNTS = st.integers(1, 8)
LARGE_COUNTS = st.sampled_from((64, 1024, 4095, 4096, 4097))
MAX_INIT_LEAVES = 32


def scalars() -> st.SearchStrategy[Scalar]:
    return st.sampled_from(SCALAR_KINDS).map(Scalar)


def leaf_values(leaf: Leaf) -> st.SearchStrategy[int]:
    if isinstance(leaf, Enum):
        return st.sampled_from([v for _, v in leaf.values]) | st.integers(leaf.min_value(), leaf.max_value())
    return st.integers(leaf.min_value(), leaf.max_value())


@st.composite
def enums(draw: st.DrawFn, tag: str) -> Enum:
    n = draw(st.integers(1, 4))
    values = draw(st.lists(st.integers(-3, 300), min_size=n, max_size=n, unique=True))
    return Enum(tag, tuple((f"{tag.upper()}_{i}", v) for i, v in enumerate(values)))


class _Tags:
    """Fresh struct/enum tags within one model."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"t{self.n}"


@st.composite
def ctypes(draw: st.DrawFn, tags: _Tags, depth: int = 2, large: bool = False) -> CType:
    choices = ["scalar"] + (["array", "record", "enum"] if depth > 0 else [])
    what = draw(st.sampled_from(choices))
    if what == "scalar":
        return draw(scalars())
    if what == "enum":
        return draw(enums(tags()))
    if what == "array":
        elem = draw(ctypes(tags, depth - 1))
        counts = SMALL_COUNTS | LARGE_COUNTS if large and isinstance(elem, Scalar) else SMALL_COUNTS
        count = draw(counts)
        if draw(st.booleans()) and depth > 1 and count <= 8:  # multi-dimensional
            return Array(Array(elem, draw(SMALL_COUNTS)), count)
        return Array(elem, count)
    kind = draw(st.sampled_from(("struct", "union")))
    packed = draw(st.booleans())
    nfields = draw(st.integers(1, 4))
    fields = []
    for i in range(nfields):
        ftype = draw(ctypes(tags, depth - 1))
        if kind == "union" and _has_bool(ftype):
            # a _Bool sharing bytes with another member can read as neither 0 nor 1: undefined behaviour,
            # which clang is free to compile any way (found by the nightly run)
            ftype = Scalar("u8")
        # member alignment attributes only outside packed records, where their effect is unambiguous
        aligned = None if packed else draw(st.sampled_from((None, None, None, 8, 16)))
        fields.append(Field(f"f{i}", ftype, aligned))
    rec_aligned = draw(st.sampled_from((None, None, None, 8, 16)))
    return Record(tags(), kind, tuple(fields), packed, rec_aligned)


def _has_bool(ctype: CType) -> bool:
    if isinstance(ctype, Scalar):
        return ctype.kind == "bool"
    if isinstance(ctype, Array):
        return _has_bool(ctype.elem)
    if isinstance(ctype, Record):
        return any(_has_bool(f.type) for f in ctype.fields)
    return False


@st.composite
def initialisers(draw: st.DrawFn, ctype: CType, section: str) -> tuple[int, ...] | None:
    """None (no initialiser), () (explicit zero), or leaf values (complete or partial)."""
    if section == ".bss":
        return draw(st.sampled_from((None, ())))
    order = init_leaves(ctype) if _init_count(ctype) <= 4096 else []
    style = draw(st.sampled_from(("none", "zero", "partial", "full")))
    if style == "none" or not order:
        return None
    if style == "zero":
        return ()
    limit = min(len(order), MAX_INIT_LEAVES)
    n = limit if style == "full" and len(order) <= MAX_INIT_LEAVES else draw(st.integers(1, limit))
    return tuple(draw(leaf_values(leaf)) for leaf in order[:n])


def _init_count(ctype: CType) -> int:
    if isinstance(ctype, Array):
        return ctype.count * _init_count(ctype.elem)
    if isinstance(ctype, Record):
        return sum(_init_count(f.type) for f in ctype.fields)
    return 1


@st.composite
def variables(draw: st.DrawFn, tags: _Tags, name: str, sections: Sequence[str] = SECTIONS) -> Variable:
    section = draw(st.sampled_from(tuple(sections)))
    ctype = draw(ctypes(tags, large=section in PERCPU_SECTIONS))
    static = draw(st.booleans())
    return Variable(name, ctype, section, static, draw(initialisers(ctype, section)))


@st.composite
def paths(draw: st.DrawFn, ctype: CType) -> Path:
    """A path to one scalar; any union member may be chosen (they overlap in memory)."""
    path: list[int | str] = []
    while isinstance(ctype, Array | Record):
        if isinstance(ctype, Array):
            path.append(draw(st.integers(0, ctype.count - 1)))
            ctype = ctype.elem
        else:
            f = draw(st.sampled_from(ctype.fields))
            path.append(f.name)
            ctype = f.type
    return tuple(path)


def _leaf_at(ctype: CType, path: Path) -> Leaf:
    for step in path:
        if isinstance(ctype, Array):
            ctype = ctype.elem
        elif isinstance(ctype, Record):
            ctype = next(f.type for f in ctype.fields if f.name == step)
    assert isinstance(ctype, Scalar | Enum)
    return ctype


@st.composite
def accesses(draw: st.DrawFn, candidates: Sequence[Variable]) -> Access:
    var = draw(st.sampled_from(tuple(candidates)))
    return Access(var.name, draw(paths(var.type)))


@st.composite
def operations(draw: st.DrawFn, model_vars: Sequence[Variable], callees: Sequence[str],
               nested: bool = True, tail_targets: Sequence[str] = ()) -> Op:
    """One operation; `tail_targets` are the programs this one may tail-call (none in subprograms)."""
    writable = [v for v in model_vars if not v.read_only]
    kinds = ["store", "add", "copy", "cpu"] if writable else []
    kinds += ["branch"] if nested and model_vars else []
    kinds += ["call"] if callees else []
    kinds += ["tail"] if tail_targets else []  # last: shrinking moves away from it
    kind = draw(st.sampled_from(kinds))
    if kind == "tail":
        return TailCall(draw(st.sampled_from(tuple(tail_targets))))
    if kind == "call":
        return Call(draw(st.sampled_from(tuple(callees))))
    if kind == "branch":
        cond = draw(accesses(model_vars))
        leaf = _leaf_at(next(v.type for v in model_vars if v.name == cond.var), cond.path)
        inner = 2 if writable or callees or tail_targets else 0
        body = st.lists(operations(model_vars, callees, nested=False, tail_targets=tail_targets),
                        max_size=inner).map(tuple)
        return Branch(cond, draw(leaf_values(leaf)), draw(body), draw(body))
    dst = draw(accesses(writable))
    leaf = _leaf_at(next(v.type for v in writable if v.name == dst.var), dst.path)
    if kind == "store":
        return Store(dst, draw(leaf_values(leaf)))
    if kind == "add" and not (isinstance(leaf, Scalar) and leaf.kind == "bool"):
        return Add(dst, draw(leaf_values(leaf)))
    if kind == "copy":
        return Copy(dst, draw(accesses(model_vars)))
    return StoreCpu(dst)


@st.composite
def program_models(draw: st.DrawFn, cpus: Sequence[int] = (0, 1), *, max_vars: int = 6,
                   max_programs: int = 3, max_subprograms: int = 2, max_ops: int = 5,
                   sections: Sequence[str] = SECTIONS, max_runs: int = 4, tail_calls: bool = True,
                   fixed_vars: tuple[Variable, ...] | None = None) -> ProgramModel:
    """`fixed_vars`: use these variables instead of drawing them (an object set's later objects)."""
    tags = _Tags()
    if fixed_vars is None:
        nvars = draw(st.integers(1, max_vars))
        model_vars = tuple(draw(variables(tags, f"v{i}", sections)) for i in range(nvars))
    else:
        model_vars = fixed_vars
    nprogs = draw(st.integers(1, max_programs))
    nsubs = draw(st.integers(0, max_subprograms))
    subs = [f"sub{i}" for i in range(nsubs)]
    functions = []
    progs = [f"prog{i}" for i in range(nprogs)]
    for i in range(nprogs):
        # a program only tail-calls later ones (prog0 -> prog1 -> prog2): no chain can loop
        ops = draw(st.lists(operations(model_vars, subs, tail_targets=progs[i + 1:] if tail_calls else ()), min_size=1,
                            max_size=max_ops))
        functions.append(Function(f"prog{i}", tuple(ops)))
    for i, name in enumerate(subs):
        # a subprogram only calls later ones: no recursion, which the verifier would refuse
        ops = draw(st.lists(operations(model_vars, subs[i + 1:]), min_size=1, max_size=max_ops))
        functions.append(Function(name, tuple(ops), subprogram=True))
    runs = draw(st.lists(st.builds(Run, st.sampled_from(progs), st.sampled_from(tuple(cpus)), st.integers(1, 3)),
                         min_size=min(1, max_runs), max_size=max_runs))
    name = draw(st.sampled_from(OBJECT_NAMES))
    return ProgramModel(name, model_vars, tuple(functions), tuple(runs))


def _rename(model: ProgramModel, prefix: str) -> ProgramModel:
    """Prefix every function name (calls follow), so program names are unique across an object set."""
    def ops(items: tuple[Op, ...]) -> tuple[Op, ...]:
        out: list[Op] = []
        for op in items:
            if isinstance(op, Call):
                op = Call(prefix + op.function)
            elif isinstance(op, Branch):
                op = Branch(op.cond, op.threshold, ops(op.then), ops(op.orelse))
            out.append(op)
        return tuple(out)

    functions = tuple(replace(f, name=prefix + f.name, ops=ops(f.ops)) for f in model.functions)
    return replace(model, functions=functions, schedule=())


@st.composite
def object_sets(draw: st.DrawFn, cpus: Sequence[int] = (0, 1), *, max_objects: int = 3,
                max_runs: int = 5) -> ObjectSet:
    """Objects loaded side by side. The first is drawn freely (no tail calls); each later one may declare some
    of the first object's per-CPU sections alike (same variables, its own initialisers) and reuse that map or
    not, holds variables of its own, and may carry an extension program replacing a subprogram of one of the
    first object's programs — exported (replaceable) as a rule, static now and then (the kernel refuses)."""
    names = draw(st.permutations(OBJECT_NAMES))
    n = draw(st.integers(2, max_objects))
    first = _rename(draw(program_models(cpus, max_vars=4, max_programs=2, max_runs=0, tail_calls=False)), "a_")
    subs = [f for f in first.functions if f.subprogram]
    target: tuple[str, str] | None = None
    if bool(subs) and draw(st.booleans()):
        sub = subs[0]  # the first subprogram: only programs call it, so it can be exported
        # the target program calls it unconditionally: a call under a branch clang proves dead is dropped,
        # and an extension of a function its target does not contain is refused ("Subprog ... doesn't exist")
        callers = [p.name for p in first.programs if Call(sub.name) in p.ops]
        if not callers:
            prog = draw(st.sampled_from(first.programs))
            first = replace(first, functions=tuple(
                replace(f, ops=(Call(sub.name), *f.ops)) if f is prog else f for f in first.functions))
            callers = [prog.name]
        exported = draw(st.sampled_from((True, True, True, False)))
        first = replace(first, functions=tuple(replace(f, exported=exported) if f is sub else f
                                               for f in first.functions))
        target = (draw(st.sampled_from(callers)), sub.name)
    first = replace(first, name=names[0])
    objects, reuse = [first], []
    shareable = [s for s in first.sections() if s in PERCPU_SECTIONS]
    for k in range(1, n):
        prefix = "bcd"[k - 1] + "_"
        shared = draw(st.lists(st.sampled_from(shareable), unique=True)) if shareable else []
        tags = _Tags()
        copied = tuple(replace(v, init=draw(_alike_initialisers(v)))
                       for v in first.variables if v.section in shared)
        own_sections = [s for s in SECTIONS if s not in shared]
        nvars = draw(st.integers(0 if copied else 1, 3))
        own = tuple(draw(variables(tags, f"{prefix}v{i}", own_sections)) for i in range(nvars))
        # named types of the copies keep their tags; the object's own types must not collide with them
        own = tuple(replace(v, type=_retag(v.type, prefix)) for v in own)
        model_vars = copied + own
        body = _rename(draw(program_models(cpus, max_vars=0, max_programs=2, max_runs=0, tail_calls=False,
                                           fixed_vars=model_vars)), prefix)
        functions = body.functions
        if target is not None and k == 1:
            ops = draw(st.lists(operations(model_vars, ()), min_size=1, max_size=4))
            functions += (Function(prefix + "ext", tuple(ops), replaces=Replace(*target)),)
        objects.append(ProgramModel(names[k], model_vars, functions))
        reuse += [MapReuse(names[k], s, names[0]) for s in shared if draw(st.booleans())]
    runnable = [p.name for m in objects for p in m.programs if p.replaces is None]
    runs = draw(st.lists(st.builds(Run, st.sampled_from(runnable), st.sampled_from(tuple(cpus)),
                                   st.integers(1, 3)), min_size=1, max_size=max_runs))
    return ObjectSet(tuple(objects), tuple(reuse), tuple(runs))


def _alike_initialisers(var: Variable) -> st.SearchStrategy[tuple[int, ...] | None]:
    """Another initialiser that keeps the variable's place: clang puts a variable without one (a tentative
    definition) after the initialised ones, so `= {}` in one object and nothing in the other would move it."""
    if var.init is None:
        return st.none()
    return initialisers(var.type, var.section).filter(lambda init: init is not None)


def _retag(ctype: CType, prefix: str) -> CType:
    if isinstance(ctype, Enum):
        return Enum(prefix + ctype.tag, tuple((prefix + n, v) for n, v in ctype.values))
    if isinstance(ctype, Array):
        return Array(_retag(ctype.elem, prefix), ctype.count)
    if isinstance(ctype, Record):
        return replace(ctype, tag=prefix + ctype.tag,
                       fields=tuple(replace(f, type=_retag(f.type, prefix)) for f in ctype.fields))
    return ctype


def fixed_sample(strategy: st.SearchStrategy[_V], n: int) -> list[_V]:
    """The first n examples of a derandomized draw: the same values on every run and machine (for the gate,
    the VM sample and the benchmarks, which compare runs and must not depend on the example database)."""
    from hypothesis import Phase, given, settings

    if n <= 0:  # Hypothesis refuses max_examples=0
        return []
    out: list[_V] = []

    @settings(max_examples=n, derandomize=True, database=None, phases=[Phase.generate], deadline=None)
    @given(strategy)
    def collect(value: _V) -> None:
        out.append(value)

    collect()
    return out[:n]
