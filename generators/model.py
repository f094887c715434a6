"""The program model: what Hypothesis draws and shrinks, what the renderer turns into C.

Plain frozen dataclasses with no behaviour beyond lookup and JSON round-tripping; the drawing lives in
`strategies.py`, the C text in `render.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Union

from generators.ctype import Array, CType, Enum, Field, Leaf, LeafSlot, Path, Record, Scalar, resolve

PERCPU_SECTIONS = (".percpu",)  # plus ".percpu.<name>"
WRITABLE_SECTIONS = (".data", ".bss")
JMP_TABLE = "jmp_table"  # the PROG_ARRAY every TailCall goes through


def is_percpu_section(section: str) -> bool:
    """The model's own notion (what the program means), not any loader's classification."""
    return section == ".percpu" or section.startswith(".percpu.")


@dataclass(frozen=True)
class Variable:
    name: str
    type: CType
    section: str  # ".percpu", ".percpu.<x>", ".data", ".data.<x>", ".bss", ".rodata"
    static: bool = False
    # Leaf values in memory order; None means no initialiser, () an explicit `= {}`/`= 0`,
    # a shorter tuple a partial initialiser (the rest zero).
    init: tuple[int, ...] | None = None

    @property
    def read_only(self) -> bool:
        return self.section == ".rodata" or self.section.startswith(".rodata.")

    @property
    def percpu(self) -> bool:
        return is_percpu_section(self.section)


@dataclass(frozen=True)
class Access:
    """A scalar inside a variable: `var.path...`."""

    var: str
    path: Path = ()


@dataclass(frozen=True)
class Store:
    dst: Access
    value: int


@dataclass(frozen=True)
class Add:
    """Read-modify-write: `dst += value` with wrap-around at dst's width."""

    dst: Access
    value: int


@dataclass(frozen=True)
class Copy:
    dst: Access
    src: Access


@dataclass(frozen=True)
class StoreCpu:
    """`dst = bpf_get_smp_processor_id()`."""

    dst: Access


@dataclass(frozen=True)
class Branch:
    """`if (cond > threshold) { then } else { orelse }`."""

    cond: Access
    threshold: int
    then: tuple[Op, ...]
    orelse: tuple[Op, ...] = ()


@dataclass(frozen=True)
class Call:
    """Call a static noinline subprogram of the same object."""

    function: str


@dataclass(frozen=True)
class TailCall:
    """`bpf_tail_call(ctx, &jmp_table, INDEX)`: continue in another program on the same CPU and never return.

    INDEX is the target's slot in the PROG_ARRAY `jmp_table` (its position among the model's programs). Only
    programs tail-call: the ctx is the program's own argument, which subprograms do not have.
    """

    program: str


Op = Union[Store, Add, Copy, StoreCpu, Branch, Call, TailCall]  # noqa: UP007


@dataclass(frozen=True)
class Replace:
    """What an extension program replaces: the global subprogram `function` as linked into `program`, a program
    of an object loaded earlier in the set (each program carries its own copy of a subprogram)."""

    program: str
    function: str


@dataclass(frozen=True)
class Function:
    name: str
    ops: tuple[Op, ...]
    subprogram: bool = False  # False: a SEC("raw_tp") program; True: a noinline subprogram
    # a subprogram with global linkage: the verifier checks it on its own, and only such a one can be replaced
    exported: bool = False
    # an extension program, SEC("freplace/<function>"): never run itself, it runs in place of its target
    replaces: Replace | None = None


@dataclass(frozen=True)
class Run:
    program: str
    cpu: int
    count: int = 1


@dataclass(frozen=True)
class ProgramModel:
    name: str  # object name: the file is <name>.bpf.o
    variables: tuple[Variable, ...]
    functions: tuple[Function, ...]
    schedule: tuple[Run, ...] = ()

    def variable(self, name: str) -> Variable:
        for v in self.variables:
            if v.name == name:
                return v
        raise KeyError(name)

    def function(self, name: str) -> Function:
        for f in self.functions:
            if f.name == name:
                return f
        raise KeyError(name)

    @property
    def programs(self) -> tuple[Function, ...]:
        """Every program, extension programs included (the loader offers them all to the kernel)."""
        return tuple(f for f in self.functions if not f.subprogram)

    @property
    def extensions(self) -> tuple[Function, ...]:
        return tuple(f for f in self.functions if f.replaces is not None)

    def prog_slot(self, program: str) -> int:
        """A program's index in `jmp_table`."""
        for i, f in enumerate(self.programs):
            if f.name == program:
                return i
        raise KeyError(program)

    @property
    def has_tail_calls(self) -> bool:
        """Whether the rendering declares `jmp_table` (any function holds a TailCall)."""
        return any(isinstance(op, TailCall) for f in self.functions for op in walk_ops(f.ops))

    def slot(self, access: Access) -> LeafSlot:
        return resolve(self.variable(access.var).type, access.path)

    def leaf(self, access: Access) -> Leaf:
        return self.slot(access).type

    def sections(self) -> list[str]:
        seen: list[str] = []
        for v in self.variables:
            if v.section not in seen:
                seen.append(v.section)
        return seen


def walk_ops(ops: tuple[Op, ...]) -> list[Op]:
    """Every operation, branch bodies included, in program order."""
    out: list[Op] = []
    for op in ops:
        out.append(op)
        if isinstance(op, Branch):
            out += walk_ops(op.then) + walk_ops(op.orelse)
    return out


@dataclass(frozen=True)
class MapReuse:
    """`object`'s map for `section` takes the fd of `source`'s map for the same section (bpf_map__reuse_fd
    before load). Both objects declare that section's variables alike, so the layouts agree."""

    object: str
    section: str
    source: str


@dataclass(frozen=True)
class ObjectSet:
    """Several objects loaded side by side into one kernel, in order. Each has its own maps unless a MapReuse
    says otherwise; program names are unique across the set, so the schedule names programs alone."""

    objects: tuple[ProgramModel, ...]
    reuse: tuple[MapReuse, ...] = ()
    schedule: tuple[Run, ...] = ()

    def object(self, name: str) -> ProgramModel:
        for m in self.objects:
            if m.name == name:
                return m
        raise KeyError(name)

    def owner(self, program: str) -> ProgramModel:
        """The object a program (or extension program) belongs to."""
        for m in self.objects:
            if any(f.name == program for f in m.programs):
                return m
        raise KeyError(program)

    def reused(self, obj: str, section: str) -> MapReuse | None:
        return next((r for r in self.reuse if r.object == obj and r.section == section), None)


# JSON: every dataclass becomes {"@type": ClassName, ...fields}; tuples become lists and come back as tuples.
_CLASSES: dict[str, type] = {c.__name__: c for c in (
    Scalar, Enum, Array, Field, Record, Variable, Access, Store, Add, Copy, StoreCpu, Branch, Call, TailCall, Replace,
    Function, Run, ProgramModel, MapReuse, ObjectSet)}


def register_json_classes(*classes: type) -> None:
    """Let other model families (the verifier cases) round-trip through the same JSON form."""
    _CLASSES.update({c.__name__: c for c in classes})


def to_jsonable(obj: Any) -> Any:  # noqa: ANN401 - a JSON value
    if is_dataclass(obj):
        out: dict[str, Any] = {"@type": type(obj).__name__}
        for f in fields(obj):
            out[f.name] = to_jsonable(getattr(obj, f.name))
        return out
    if isinstance(obj, tuple | list):
        return [to_jsonable(x) for x in obj]
    return obj


def from_jsonable(data: Any) -> Any:  # noqa: ANN401 - a JSON value
    if isinstance(data, dict):
        cls = _CLASSES[data["@type"]]
        return cls(**{k: from_jsonable(v) for k, v in data.items() if k != "@type"})
    if isinstance(data, list):
        return tuple(from_jsonable(x) for x in data)
    return data


def dumps(model: ProgramModel | ObjectSet) -> str:
    return json.dumps(to_jsonable(model), indent=1)


def loads(text: str) -> ProgramModel:
    model = from_jsonable(json.loads(text))
    if not isinstance(model, ProgramModel):
        raise ValueError("not a ProgramModel document")
    return model


def loads_set(text: str) -> ObjectSet:
    model = from_jsonable(json.loads(text))
    if not isinstance(model, ObjectSet):
        raise ValueError("not an ObjectSet document")
    return model
