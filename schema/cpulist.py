"""The kernel's cpulist format (/sys/devices/system/cpu/{possible,online}, --online-cpus)."""

from __future__ import annotations

import re
from collections.abc import Iterable

_RANGE = re.compile(r"^(\d+)(?:-(\d+)(?::(\d+)/(\d+))?)?$")


def parse_cpulist(text: str) -> list[int]:
    """Parse the kernel's cpulist format ("0-3", "0,2-3", "0-7:2/4"; "" -> []) into sorted CPU ids."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        m = _RANGE.match(part)
        if m is None:
            raise ValueError(f"bad cpulist element {part!r} in {text!r}")
        lo = int(m[1])
        hi = int(m[2]) if m[2] is not None else lo
        if hi < lo:
            raise ValueError(f"descending cpulist range {part!r}")
        if m[3] is None:
            cpus.update(range(lo, hi + 1))
            continue
        # "a-b:used/group": in each group of `group` CPUs starting at a, the first `used` ones.
        used, group = int(m[3]), int(m[4])
        if group == 0 or used > group:
            raise ValueError(f"bad cpulist stride {part!r}")
        cpus.update(c for c in range(lo, hi + 1) if (c - lo) % group < used)
    return sorted(cpus)


def format_cpulist(cpus: Iterable[int]) -> str:
    """The inverse of parse_cpulist, in the kernel's compact form: [0, 1, 2, 5] -> "0-2,5"."""
    ordered = sorted(set(cpus))
    if ordered and ordered[0] < 0:
        raise ValueError(f"negative CPU id {ordered[0]}")
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)
