"""Object sets on the real kernel (docs/object-sets.md): several objects loaded side by side through libbpf or the
suite's raw loader, map fds reused, extension programs attached to their target programs (BPF_LINK_CREATE, never a
live hook), runs on chosen CPUs, everything closed in reverse order.

Each object goes through the same per-object phases as a single observation (`observe.LibbpfSession`,
`observe.RawSession`); this module only orders them across objects.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from backends import objload
from backends.kernel.libbpf import Libbpf, LibbpfMissing
from backends.kernel.observe import (
    BackendUnavailable,
    LibbpfSession,
    RawSession,
    base_result,
    environment,
    kernel_features,
    libbpf_profile_name,
    object_facts,
    program_names,
    raw_profile_name,
    require_bpf,
)
from schema.objectset import SetPlan
from schema.result import Result, new_set_result, not_opened
from toolchain.elf import ObjectFacts

_AnySession = LibbpfSession | RawSession


def observe_set_raw(plan: SetPlan) -> dict[str, Any]:
    """An object set through the suite's own loader: one Result per object, in load order (docs/object-sets.md).

    Raises BackendUnavailable, toolchain.elf.ObjectError for a file that is not a BPF object, and ValueError for
    a plan naming a program or map that is not there."""
    require_bpf()
    env = environment(None, raw_profile_name(kernel_features()))
    return _observe_set(plan, env, "raw", lambda k: RawSession(plan.objects[k], env=env,
                                                               initial_values=plan.initial_values_of(k)))


def observe_set_libbpf(plan: SetPlan, *, libbpf: Libbpf) -> dict[str, Any]:
    """An object set through a shipped libbpf (bpf_map__reuse_fd, bpf_program__set_attach_target,
    bpf_program__attach_freplace); raises as observe_set_raw, and BackendUnavailable for a libbpf without them."""
    require_bpf()
    try:
        if plan.reuse:
            libbpf.require("bpf_map__reuse_fd")
        if plan.attach:
            libbpf.require("bpf_program__set_attach_target", "bpf_program__attach_freplace", "bpf_link__destroy")
    except LibbpfMissing as e:
        raise BackendUnavailable(str(e)) from None
    env = environment(libbpf, libbpf_profile_name(libbpf, kernel_features()))
    return _observe_set(plan, env, "libbpf", lambda k: LibbpfSession(plan.objects[k], libbpf=libbpf, env=env,
                                                                     initial_values=plan.initial_values_of(k)))


def _set_owners(plan: SetPlan, facts: Sequence[ObjectFacts]) -> dict[str, int]:
    """Program name -> index of the object that holds it; ValueError for a plan naming a program that is not
    where it says (checked before anything reaches the kernel)."""
    owner = {name: k for k, f in enumerate(facts) for name in program_names(f)}
    for k, ext, prog, _ in plan.attach:
        if owner.get(ext) != k:
            raise ValueError(f"attach of {ext!r}: object {k} has no such program")
        if prog not in owner:
            raise ValueError(f"attach of {ext!r}: no program {prog!r} in the set")
    for prog, _, _ in plan.runs:
        if prog not in owner:
            raise ValueError(f"run of unknown program {prog!r}")
    return owner


def _observe_set(plan: SetPlan, env: dict[str, Any], loader: str,
                 make: Callable[[int], _AnySession]) -> dict[str, Any]:
    facts = [object_facts(path) for path in plan.objects]
    owner = _set_owners(plan, facts)
    # closed last in, first out: the links (pushed after every object), then the objects in reverse order
    with contextlib.ExitStack() as stack:
        sessions, results = _load_set(plan, env, loader, make, facts, owner, stack)
        _attach_set(plan, sessions, stack)
        live = [s for s in sessions if s is not None]
        for s in live:
            s.snapshot("before")
        for prog, cpu, count in plan.runs:
            session = sessions[owner[prog]]
            if session is not None and session.opened:  # an object never opened has no runs
                session.result["runs"].append(session.run((prog, cpu, count)))
        for s in live:
            s.snapshot("after")
    return new_set_result("kernel", env, results)


def _load_set(plan: SetPlan, env: dict[str, Any], loader: str, make: Callable[[int], _AnySession],
              facts: Sequence[ObjectFacts], owner: Mapping[str, int], stack: contextlib.ExitStack,
              ) -> tuple[list[_AnySession | None], list[Result]]:
    """Rule 1: every object in order, each closed by `stack`; after one fails, the rest are never opened."""
    sessions: list[_AnySession | None] = []
    results: list[Result] = []
    failed: str | None = None
    for k, path in enumerate(plan.objects):
        if failed is not None:
            results.append(not_opened(base_result(path, facts[k], env, loader), failed, program_names(facts[k])))
            sessions.append(None)
            continue
        session = make(k)
        stack.callback(session.close)
        sessions.append(session)
        results.append(session.result)
        if not _set_load(plan, k, session, sessions, owner):
            failed = objload.object_name(path)
    return sessions, results


def _attach_set(plan: SetPlan, sessions: Sequence[_AnySession | None], stack: contextlib.ExitStack) -> None:
    """Rule 4: once every object is loaded, each extension of each loaded object is linked to its target."""
    for k, session in enumerate(sessions):
        if session is None or not session.loaded:
            continue
        for ext, _, _ in plan.attach_of(k):
            link = session.attach(ext)
            if link is not None:
                stack.callback(link.close)


def _set_load(plan: SetPlan, k: int, session: _AnySession, sessions: Sequence[_AnySession | None],
              owner: Mapping[str, int]) -> bool:
    """Rules 1-3 for object k: open, reuse each map from its source, set each extension's target, load."""
    ok = session.open() and _set_reuse(plan, k, session, sessions)
    if ok:
        for ext, prog, func in plan.attach_of(k):
            j = owner[prog]
            session.set_attach_target(ext, sessions[j] if j < k else None, prog, func)  # type: ignore[arg-type]
        ok = session.load()
    session.mark_extensions()
    return ok


def _set_reuse(plan: SetPlan, k: int, session: _AnySession, sessions: Sequence[_AnySession | None]) -> bool:
    for key, src in plan.reuses_of(k):
        session.require_map(key)
        source = sessions[src]
        fd = source.map_fd(key) if source is not None else None
        if fd is None and source is not None:
            # what bpf_map__fd gives a user for a map libbpf never created: its placeholder memfd, which
            # bpf_map__reuse_fd then accepts; observed as it happens (the result's `reuse` names the fd's kind)
            fd = source.placeholder_fd(key)
        problem = "cannot reuse a map that was not created" if fd is None else session.reuse(key, fd)
        if problem is not None:
            session.fail_reuse(f"map '{key}': {problem}")
            return False
    return True
