"""Load an instruction-level verifier case (one map of a given shape, one program) on the oracle, the simulator
or the real kernel, and describe the outcome in the result schema (map "case", program "case")."""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Any

from generators.asm import VerifierCase, assemble
from generators.ctype import round_up
from oracle.verifier import predict_case, predict_contents
from schema.result import Result, map_entry, new_env, new_result, program_entry
from toolchain.uapi import BPF_F_RDONLY_PROG, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY  # noqa: E402

MAP_TYPES = {"array": BPF_MAP_TYPE_ARRAY, "percpu_array": BPF_MAP_TYPE_PERCPU_ARRAY}

Runs = Sequence[tuple[int, int]]  # (cpu, count)


def _document(source: str, profile: str, case: VerifierCase, possible: int, online: Sequence[int]) -> Result:
    result = new_result(source, new_env(profile, possible_cpus=possible, online_cpus=list(online)), None)
    shape = case.map
    result["maps"].append(map_entry(
        name="case", kernel_name=None, section="case", type=shape.type, key_size=4, value_size=shape.value_size,
        max_entries=shape.max_entries, flags=BPF_F_RDONLY_PROG if shape.rdonly else 0, internal=False,
        created=False))
    return result


def _slots(raw: bytes, case: VerifierCase, possible: int) -> list[str]:
    size = case.map.value_size
    if case.map.type != "percpu_array":
        return [raw[:size].hex()]
    stride = round_up(size, 8)
    return [raw[c * stride: c * stride + size].hex() for c in range(possible)]


def predict(case: VerifierCase, kernel_profile: str, possible: int, online: Sequence[int], runs: Runs) -> Result:
    from oracle.profiles import kernel_axis

    result = _document("oracle", kernel_profile, case, possible, online)
    v = predict_case(case, kernel_axis(kernel_profile))
    before, after = predict_contents(case, v, possible, list(runs))
    result["maps"][0].update(created=before is not None, before=before, after=after)
    result["programs"].append(program_entry("case", v.verdict, errno=v.errno, message_class=v.message_class,
                                            message=v.message, xlated_insns=v.xlated_insns))
    accepted = v.verdict == "accepted"
    result["runs"] = [{"program": "case", "cpu": c, "count": n, "retval": [0 if accepted else None] * n}
                      for c, n in runs]
    return result


def observe_sim(case: VerifierCase, kernel_profile: str, possible: int, online: Sequence[int],
                runs: Runs) -> Result:
    from backends.sim.kernel import SimError, SimKernel

    k = SimKernel(kernel_profile, possible_cpus=possible, online=online)
    result = _document("sim", kernel_profile, case, possible, online)
    shape = case.map
    try:
        fd = k.map_create(MAP_TYPES[shape.type], 4, shape.value_size, shape.max_entries,
                          BPF_F_RDONLY_PROG if shape.rdonly else 0, "case")
    except SimError as e:
        result["programs"].append(program_entry("case", "not_loaded", errno=e.errno,
                                                message_class=e.error_class or "e2big", message=e.message))
        result["runs"] = [{"program": "case", "cpu": c, "count": n, "retval": [None] * n} for c, n in runs]
        return result
    if shape.rdonly:
        k.map_freeze(fd)
    key = (0).to_bytes(4, "little")
    m = result["maps"][0]
    m.update(created=True, before=_slots(k.map_lookup(fd, key), case, possible))
    try:
        prog, xlated, _ = k.prog_load(assemble(case, 0 if case.by_index else fd), "case",
                                      fd_array=[fd] if case.by_index else None)
        result["programs"].append(program_entry("case", "accepted", xlated_insns=xlated))
    except SimError as e:
        prog = None
        result["programs"].append(program_entry("case", "rejected", errno=e.errno, message_class=e.error_class,
                                                message=e.message))
    from backends.sim.interp import BpfFault

    for cpu, n in runs:
        entry: dict[str, Any] = {"program": "case", "cpu": cpu, "count": n, "retval": []}
        for _ in range(n):
            try:
                entry["retval"].append(k.test_run(prog, cpu) if prog else None)
            except BpfFault as e:  # e.g. a per-CPU address dereferenced without the rewrite
                entry["retval"].append(None)
                entry["fault"] = str(e)
        result["runs"].append(entry)
    m["after"] = _slots(k.map_lookup(fd, key), case, possible)
    return result


def observe_kernel(case: VerifierCase, runs: Runs) -> Result:
    from backends.kernel import bpf, probes
    from schema.messages import classify
    from toolchain.insn import encode

    possible = len(probes.possible_cpus())
    online = probes.online_cpus()
    profile = "patched" if probes.probe_percpu_data() else "unpatched"
    result = _document("kernel", profile, case, possible, online)
    shape = case.map
    try:
        map_fd = bpf.map_create(MAP_TYPES[shape.type], 4, shape.value_size, shape.max_entries,
                                flags=BPF_F_RDONLY_PROG if shape.rdonly else 0, name="case")
    except bpf.BpfError as e:
        cls = "e2big" if e.errno == errno.E2BIG else "other"
        result["programs"].append(program_entry("case", "not_loaded", errno=e.errno, message_class=cls,
                                                message=str(e)))
        result["runs"] = [{"program": "case", "cpu": c, "count": n, "retval": [None] * n} for c, n in runs]
        return result
    with map_fd:
        if shape.rdonly:
            bpf.map_freeze(map_fd)
        key = (0).to_bytes(4, "little")
        width = possible * round_up(shape.value_size, 8) if shape.type == "percpu_array" else shape.value_size
        m = result["maps"][0]
        m.update(created=True, before=_slots(bpf.map_lookup_elem(map_fd, key, width), case, possible))
        insns = encode(assemble(case, 0 if case.by_index else int(map_fd)))
        prog = None
        try:
            prog, _ = bpf.prog_load(bpf.RAW_TRACEPOINT, insns, name="case",
                                    fd_array=[int(map_fd)] if case.by_index else None)
            xlated = bpf.prog_info(prog).xlated_prog_len // 8
            result["programs"].append(program_entry("case", "accepted", xlated_insns=xlated))
        except bpf.BpfError as e:
            result["programs"].append(program_entry(
                "case", "rejected", errno=e.errno, message_class=classify(e.log.splitlines(), e.errno),
                message=e.reason or str(e)))
        try:
            for cpu, n in runs:
                result["runs"].append({"program": "case", "cpu": cpu, "count": n, "retval": [
                    bpf.prog_test_run(prog, cpu=cpu).retval if prog else None for _ in range(n)]})
        finally:
            if prog is not None:
                prog.close()
        m["after"] = _slots(bpf.map_lookup_elem(map_fd, key, width), case, possible)
    return result
