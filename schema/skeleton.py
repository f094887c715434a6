"""What a skeleton check asks of one object (the upstream `global_data_init` life cycle), and the report's shape.

A skeleton check opens the object through `bpftool gen skeleton`'s header and libbpf, writes every exposed
per-CPU variable through the skeleton struct, optionally resizes a map with `bpf_map__set_value_size`, loads,
runs, and then reads and writes each per-CPU map through libbpf's `BPF_F_CPU`/`BPF_F_ALL_CPUS` operations. The
oracle predicts the report (`oracle.skeleton`); a backend observes it (`backends.kernel.skeleton_run`). Both see
this plan and the object, never each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from schema.result import Comparison, Divergence

CPU_OUT_OF_RANGE = 1 << 20  # a CPU number no kernel has (>= nr_cpu_ids): ERANGE from bpf_map_check_op_flags
# upstream's verifier_log subtest: a `.percpu.fmt` string handed to bpf_snprintf and to bpf_strncmp, each in a
# `?kprobe` program (not loaded unless asked); corpus/const_strings.py holds the object's source
CONST_STRING_PROGRAMS = ("fmt_snprintf", "fmt_strncmp")


@dataclass(frozen=True)
class SkeletonPlan:
    # section -> a full image: each variable the skeleton exposes is written from its own bytes, through the
    # struct member, before load
    writes: Mapping[str, bytes] = field(default_factory=dict)
    resize: Mapping[str, int] = field(default_factory=dict)  # section -> bpf_map__set_value_size, before load
    load: bool = True
    runs: tuple[tuple[str, int, int], ...] = ()  # (program, cpu, count) after load
    all_cpus: Mapping[str, bytes] = field(default_factory=dict)  # section -> BPF_F_ALL_CPUS update, after runs
    one_cpu: Mapping[str, tuple[int, bytes]] = field(default_factory=dict)  # section -> (cpu, BPF_F_CPU update)
    # a hand-made BPF_F_RDONLY_PROG percpu array (upstream's rdonly_direct_read/_write): filled with this value
    # by one BPF_F_ALL_CPUS update, frozen, then read and written by two direct-access programs
    rdonly: bytes | None = None
    # upstream's iter subtest: a bpf_map_elem iterator over this section's map, after the runs, summing the byte
    # at this offset of every possible CPU's value
    iterate_section: str | None = None
    iterate_offset: int = 0
    # upstream's lskel subtest: the same program with its raw_tp sections named (bpftool -L needs a tracepoint
    # name), opened and loaded through `bpftool gen skeleton -L`; the writes above go through its struct
    light_object: str | None = None
    const_strings: str | None = None  # the compiled corpus.const_strings object, each program loaded on purpose

    def to_json(self) -> dict[str, Any]:
        return {"writes": {k: v.hex() for k, v in self.writes.items()}, "resize": dict(self.resize),
                "load": self.load, "runs": [list(r) for r in self.runs],
                "all_cpus": {k: v.hex() for k, v in self.all_cpus.items()},
                "one_cpu": {k: [c, v.hex()] for k, (c, v) in self.one_cpu.items()},
                "rdonly": self.rdonly.hex() if self.rdonly is not None else None,
                "iterate": [self.iterate_section, self.iterate_offset] if self.iterate_section else None,
                "light_object": self.light_object, "const_strings": self.const_strings}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> SkeletonPlan:
        iterate = doc.get("iterate") or (None, 0)
        return cls(writes={k: bytes.fromhex(v) for k, v in doc.get("writes", {}).items()},
                   resize=dict(doc.get("resize", {})), load=bool(doc.get("load", True)),
                   runs=tuple((str(p), int(c), int(n)) for p, c, n in doc.get("runs", ())),
                   all_cpus={k: bytes.fromhex(v) for k, v in doc.get("all_cpus", {}).items()},
                   one_cpu={k: (int(c), bytes.fromhex(v)) for k, (c, v) in doc.get("one_cpu", {}).items()},
                   rdonly=bytes.fromhex(doc["rdonly"]) if doc.get("rdonly") is not None else None,
                   iterate_section=iterate[0], iterate_offset=int(iterate[1]),
                   light_object=doc.get("light_object"), const_strings=doc.get("const_strings"))


# Each reported field, and the layer whose mistake would show there first (schema.result.LAYERS): libbpf's and
# bpftool's facts are the loader's, the load the verifier's, the per-CPU contents and map operations the runtime's.
SKELETON_FIELD_LAYERS: dict[str, str] = {
    "harness": "loader",  # bpftool's header (with the object's BTF dumped as C) compiles, its size asserts hold
    "open": "loader",
    "skel_open": "loader",
    "initial_value_is_skel": "loader",
    "initial_value_size": "loader",
    "value_size": "loader",
    "struct_size": "loader",
    "btf_value_type": "loader",
    "set_initial_value_sizeof": "loader",
    "resize": "loader",
    "load": "verifier",
    "skel_loaded": "loader",
    "initial_value_is_skel_loaded": "loader",
    "image_writable_loaded": "loader",
    "cpus_loaded": "runtime",
    "runs": "runtime",
    "cpus_after_runs": "runtime",
    "both_flags": "loader",
    "short_buffer": "loader",
    "both_flags_kernel": "runtime",
    "cpu_out_of_range": "runtime",
    "all_cpus_update": "runtime",
    "cpus_after_all_cpus": "runtime",
    "cpu_update": "runtime",
    "cpus_after_cpu_update": "runtime",
    "full_lookup": "runtime",
    "plain_map_cpu_flag": "runtime",
    "iterator": "runtime",  # the kernel's bpf_map_elem buffer for a per-CPU map
    "light": "loader",  # the light skeleton: gen_loader's blob, run by the kernel as a syscall program
    "const_strings": "verifier",
    "rdonly": "runtime",  # the kernel's map operations on it
    "read_prog": "verifier",
    "write_prog": "verifier",
}


def compare_skeleton(expected: Mapping[str, Any], observed: Mapping[str, Any]) -> Comparison:
    """Field by field; a None expectation is not compared. Divergences carry SKELETON_FIELD_LAYERS' layer."""
    out = Comparison()

    def walk(want: Mapping[str, Any], got: Any, path: str) -> None:  # noqa: ANN401 - a JSON value
        for key, w in want.items():
            where = f"{path}.{key}" if path else key
            g = got.get(key) if isinstance(got, Mapping) else None
            if w is None:
                out.not_compared += 1
            elif isinstance(w, Mapping) and isinstance(g, Mapping):
                walk(w, g, where)
            else:
                out.compared += 1
                if w != g:
                    leaf = next((p for p in reversed(where.split(".")) if p in SKELETON_FIELD_LAYERS), "open")
                    out.divergences.append(Divergence(where, w, g, SKELETON_FIELD_LAYERS[leaf]))

    if observed.get("harness") != "compiles":  # nothing past the header was observed: only that is compared
        expected = {"harness": expected.get("harness")}
    walk(expected, observed, "")
    return out
