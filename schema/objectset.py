"""What a backend is asked to do with an object set (docs/object-sets.md): files, reuses, attachments, runs.

Backends see object files and this plan, never the program model, so the simulator and the oracle stay
independent and a user can hand any objects to `python -m backends.<name> run-set`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class SetPlan:
    objects: tuple[Path, ...]  # loaded in this order
    reuse: tuple[tuple[int, str, int], ...] = ()  # (object index, map key, source object index)
    attach: tuple[tuple[int, str, str, str], ...] = ()  # (object index, extension, target program, function)
    runs: tuple[tuple[str, int, int], ...] = ()  # (program, cpu, count); program names are unique in the set
    # per object: map key -> starting value, as a single object's `initial_values`
    initial_values: tuple[Mapping[str, bytes], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        n = len(self.objects)
        for k, key, src in self.reuse:
            if not (0 <= src < k < n):
                raise ValueError(f"reuse of {key!r}: object {k} may only reuse a map of an earlier object, not {src}")
        for k, ext, _, _ in self.attach:
            if not 0 <= k < n:
                raise ValueError(f"attach of {ext!r}: no object {k}")

    def reuses_of(self, k: int) -> list[tuple[str, int]]:
        return [(key, src) for obj, key, src in self.reuse if obj == k]

    def attach_of(self, k: int) -> list[tuple[str, str, str]]:
        return [(ext, prog, fn) for obj, ext, prog, fn in self.attach if obj == k]

    def initial_values_of(self, k: int) -> Mapping[str, bytes]:
        return self.initial_values[k] if k < len(self.initial_values) else {}


def parse_reuse(text: str) -> tuple[int, str, int]:
    """CLI form `K:KEY=SRC`: object K's map KEY reuses object SRC's."""
    left, _, src = text.partition("=")
    k, _, key = left.partition(":")
    try:
        return int(k), key, int(src)
    except ValueError:
        raise ValueError(f"--reuse {text!r}: expected K:MAPKEY=SRC, e.g. 1:.percpu=0") from None


def parse_attach(text: str) -> tuple[int, str, str, str]:
    """CLI form `K:EXT=PROG:FUNC`: object K's extension EXT replaces FUNC in program PROG."""
    left, _, right = text.partition("=")
    k, _, ext = left.partition(":")
    prog, _, fn = right.partition(":")
    try:
        if not (ext and prog and fn):
            raise ValueError
        return int(k), ext, prog, fn
    except ValueError:
        raise ValueError(f"--attach {text!r}: expected K:EXT=PROG:FUNC, e.g. 1:b_ext=a_prog0:a_sub0") from None


def plan_files(paths: Sequence[str | Path]) -> tuple[Path, ...]:
    return tuple(Path(p) for p in paths)
