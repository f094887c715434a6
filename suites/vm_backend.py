"""The vm backend: the kernel backend's loaders inside a persistent guest booted from the provisioned stack.

Columns: `vm-libbpf` (the stack's libbpf), `vm-raw` (the suite's raw loader), `vm-libbpf-system` (this machine's
own libbpf: an old libbpf on a patched kernel is a real user's situation), each optionally with the JIT off
(`-nojit`). All the columns of one process share one guest (`shared_machine`); each xdist worker boots its own.
Objects are compiled on the host and staged into the guest. The prediction's profile comes from the guest's own
probes, through the same rule as the host kernel backend (`schema.profiles.profile_for_probe`).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import pickle
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from schema import profiles as registry
from schema.objectset import SetPlan
from schema.result import Result
from suites.backends import LIBBPF_PROBE_SOURCE, Runs, Unavailable
from suites.support import Compiled, backend_meta, write_bundle

VmLoader = Literal["libbpf", "raw", "system"]
LOADERS: tuple[VmLoader, ...] = ("libbpf", "raw", "system")


@dataclass(frozen=True)
class VmTarget:
    """What one guest boots: the kernel and its modules, the CPUs, and where its libbpf and bpftool come from."""

    kernel_image: Path
    modules: Path | None
    libbpf: Path | None  # the stack's libbpf, for vm-libbpf
    bpftool: Path | None
    release: str | None
    stack: str | None  # the provisioned stack's name; None for a user's own kernel
    bpftool_version: str | None = None
    cpus: int = 2
    maxcpus: int = 3
    source: Path | None = None  # the stack's unpacked kernel tree (its UAPI headers, for the skeleton harness)


def resolve_target(*, stack: str | None, kernel_image: Path | None, modules: Path | None, libbpf: Path | None,
                   bpftool: Path | None, cpus: int, maxcpus: int, provision: bool = True) -> VmTarget:
    """The provisioned stack, with any piece the user overrode; Unavailable with the step's reason."""
    from backends.stack import DEFAULT_STACK, StackUnavailable, stack_paths

    try:
        paths = stack_paths(stack or DEFAULT_STACK, kernel_image=kernel_image, modules=modules, libbpf=libbpf,
                            bpftool=bpftool, provision=provision)
    except StackUnavailable as e:
        raise Unavailable(f"vm backend: stack {stack or DEFAULT_STACK}: {e}") from None
    return VmTarget(paths.kernel_image, paths.modules, paths.libbpf, paths.bpftool, paths.release,
                    stack or DEFAULT_STACK, paths.bpftool_version, cpus, maxcpus, paths.source)


_MACHINES: dict[VmTarget, Any] = {}


def shared_machine(target: VmTarget) -> Any:  # noqa: ANN401 - backends.vm.machine.VmMachine
    """One guest per target and process, booted at its first request, shut down when the process ends."""
    from backends.vm.machine import VmMachine
    from backends.vm.runner import VmConfig, VmUnavailable

    if target not in _MACHINES:
        try:
            _MACHINES[target] = VmMachine(VmConfig(kernel_image=target.kernel_image, modules=target.modules,
                                                   cpus=target.cpus), maxcpus=target.maxcpus)
        except VmUnavailable as e:
            raise Unavailable(f"vm backend: {e}") from None
        if len(_MACHINES) == 1:
            atexit.register(close_machines)
    return _MACHINES[target]


def close_machines() -> None:
    for machine in _MACHINES.values():
        machine.close()
    _MACHINES.clear()


@functools.cache
def _pickles() -> Path:
    path = Path(tempfile.mkdtemp(prefix="percpu-facts-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def _facts_pickle(obj: str | os.PathLike[str]) -> Path:
    from toolchain.elf import read_object

    facts = read_object(obj)
    out = _pickles() / f"{facts.sha256}.pickle"
    if not out.exists():
        with contextlib.suppress(ValueError):  # parsed here, the BTF travels too (a bad one is the guest's to see)
            _ = facts.btf
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(facts))
        os.replace(tmp, out)
    return out


class GuestFailed(AssertionError):
    """The guest panicked, hung or complained (WARN/BUG/KASAN/BPF:) during this example: a kernel-layer failure."""


@dataclass
class VmBackend:
    loader: VmLoader
    target: VmTarget
    jit: bool = True
    libbpf_path: str | None = None  # for loader "libbpf": a user's own libbpf instead of the stack's
    clang: Any = None
    name: str = ""
    profile: str = ""
    modifiers: str = ""
    possible_cpus: int = 0
    online_cpus: tuple[int, ...] = ()
    env: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.name = f"vm-{'libbpf-system' if self.loader == 'system' else self.loader}{'' if self.jit else '-nojit'}"
        if self.loader == "system":
            from backends.libbpf_source import LibbpfSourceError, system_libbpf

            try:
                self.libbpf_path = str(system_libbpf())
            except LibbpfSourceError as e:
                raise Unavailable(f"{self.name}: {e}") from None
        elif self.loader == "libbpf" and self.libbpf_path is None:
            if self.target.libbpf is None:
                raise Unavailable(f"{self.name}: the stack has no libbpf")
            self.libbpf_path = str(self.target.libbpf)
        self.machine = shared_machine(self.target)
        from backends.vm.machine import GuestFailure
        from backends.vm.runner import VmError

        try:
            facts = self._probe()
        except (GuestFailure, VmError) as e:
            raise Unavailable(f"{self.name}: the guest did not come up: {e}") from None
        probe = facts["probe"]
        self.possible_cpus = probe["possible_cpus"]
        self.online_cpus = tuple(probe["online_cpus"])
        knows = True if self.loader == "raw" else bool(facts.get("libbpf_knows_percpu"))
        features = {"jit": probe.get("jit_enabled"), **probe["features"]}
        self.profile = registry.profile_for_probe(self._loader(), knows, features)
        self.modifiers = registry.join_modifiers("", registry.split_modifiers(self.profile)[1])
        self.env = {"kernel_release": probe["kernel_release"], "libbpf": facts.get("libbpf"),
                    "libbpf_path": facts.get("libbpf_path"), "stack": self.target.stack,
                    "bpftool": self.target.bpftool_version,
                    "kernel_image": str(self.target.kernel_image), "accelerator": self.machine.accel,
                    "jit_enabled": probe.get("jit_enabled"), "features": probe["features"],
                    "possible_cpus": self.possible_cpus, "online_cpus": list(self.online_cpus),
                    "boot_seconds": self.machine.boot_seconds}

    @property
    def config(self) -> str:
        """The configuration that builds this backend again (`from_config`), every path included."""
        t = self.target
        parts = [f"loader={self.loader}", f"jit={'on' if self.jit else 'off'}", f"stack={t.stack}",
                 f"kernel_image={t.kernel_image}", f"cpus={t.cpus}", f"maxcpus={t.maxcpus}"]
        if t.modules is not None:
            parts.append(f"modules={t.modules}")
        if self.loader == "libbpf" and self.libbpf_path:
            parts.append(f"libbpf={self.libbpf_path}")
        return "vm:" + ",".join(parts)

    def _clang(self) -> Any:  # noqa: ANN401 - toolchain.clang.Clang
        from toolchain.clang import Clang

        if self.clang is None:
            self.clang = Clang.find(None)
        return self.clang

    def _loader(self) -> registry.Loader:
        return "raw" if self.loader == "raw" else "libbpf"

    def _base(self, kind: str) -> dict[str, Any]:
        return {"kind": kind, "loader": self._loader(), "libbpf": self.libbpf_path, "jit": self.jit}

    def _probe(self) -> dict[str, Any]:
        from toolchain.clang import Clang, compile_c

        req = self._base("probe")
        objects = {}
        if self._loader() == "libbpf":
            clang = self.clang or Clang.find(None)
            objects["object"] = compile_c(clang, LIBBPF_PROBE_SOURCE, name="libbpf_percpu_probe")
        answer = self.machine.request(req, objects=objects)
        if "error" in answer:
            raise Unavailable(f"{self.name}: guest probe failed: {answer['error']['type']}: "
                              f"{answer['error']['message']}")
        return dict(answer["probe"])

    def _ask(self, req: dict[str, Any], objects: Mapping[str, Any], what: Compiled | None) -> Result:
        paths = objects.get("objects") or ([objects["object"]] if "object" in objects else [])
        if paths:  # hand the host's reading of each object over: parsing under emulation costs most
            objects = {**objects, "facts": [_facts_pickle(p) for p in paths]}
        doc: Result = self._answered(req, what, objects=objects)["observation"]
        for part in [doc, *doc.get("objects", ())]:
            part["source"] = "vm"
            part["env"].update({k: v for k, v in self.env.items() if k not in part["env"] or k == "features"})
        return doc

    def _answered(self, req: dict[str, Any], what: Compiled | None, **kw: Any) -> dict[str, Any]:  # noqa: ANN401
        """One request; a guest that failed or complained during it fails this example (layer kernel), an agent
        error is raised as the guest's."""
        from backends.vm.machine import GuestFailure

        try:
            answer = self.machine.request(req, **kw)
        except GuestFailure as e:
            raise self._guest_failed(str(e), e.console_tail, what) from None
        if answer.get("kernel_log"):
            raise self._guest_failed("the kernel complained: " + " | ".join(answer["kernel_log"][:5]),
                                     "\n".join(answer["kernel_log"]), what)
        if "error" in answer:
            raise RuntimeError(f"{self.name}: the guest could not answer {req.get('kind')}: "
                               f"{answer['error']['type']}: {answer['error']['message']}")
        return answer

    def _guest_failed(self, message: str, console: str, what: Compiled | None) -> GuestFailed:
        where = ""
        if what is not None and what.model is not None:  # a CLI observation has no model to keep
            root = write_bundle(f"guest-{self.name}", what, {}, f"layer kernel: {message}",
                                {"console.txt": console + "\n"}, {**backend_meta(self), "check": "guest"})
            where = f"; bundle {root}"
        return GuestFailed(f"{self.name}: layer kernel: {message}{where}\n--- guest console ---\n{console}")

    def observe(self, compiled: Compiled, runs: Runs, initial_values: Mapping[str, bytes] | None = None) -> Result:
        req = {**self._base("observe"), "runs": [list(r) for r in runs],
               "initial_values": {k: v.hex() for k, v in (initial_values or {}).items()}}
        doc = self._ask(req, {"object": compiled.path}, compiled)
        doc["object"]["path"] = str(compiled.path)
        return doc

    def observe_set(self, plan: SetPlan) -> dict[str, Any]:
        req = {**self._base("observe_set"), "runs": [list(r) for r in plan.runs],
               "reuse": [list(r) for r in plan.reuse], "attach": [list(a) for a in plan.attach],
               "initial_values": [{k: v.hex() for k, v in plan.initial_values_of(i).items()}
                                  for i in range(len(plan.objects))]}
        doc = self._ask(req, {"objects": list(plan.objects)}, None)
        for part, path in zip(doc["objects"], plan.objects, strict=True):
            if part.get("object"):
                part["object"]["path"] = str(path)
        return doc

    def observe_skeleton(self, compiled: Compiled, plan: Any) -> dict[str, Any]:  # noqa: ANN401 - SkeletonPlan
        """The skeleton harness for this object and plan, built on the host against this column's libbpf and
        the stack's bpftool, run in the guest (backends.kernel.skeleton_run)."""
        from backends.kernel.skeleton_run import HarnessError, build_harness, parse_report

        if self.loader == "raw" or self.target.bpftool is None or self.libbpf_path is None:
            raise NotImplementedError(f"{self.name}: a skeleton needs libbpf and the stack's bpftool")
        include = Path(self.libbpf_path).parent / "include"
        if not include.is_dir() and self.target.libbpf is not None:
            # a libbpf built from a tree (src:) installs no headers: the stack's, of the same API, stand in
            include = self.target.libbpf.parent / "include"
        if not include.is_dir():
            raise NotImplementedError(f"{self.name}: no libbpf headers beside {self.libbpf_path}")
        work = Path(tempfile.mkdtemp(prefix="percpu-skel-", dir=_pickles()))
        try:
            harness = build_harness(compiled.path, compiled.facts, plan, work, bpftool=self.target.bpftool,
                                    include=include, libbpf=Path(self.libbpf_path), clang=self._clang().path,
                                    uapi=self.target.source / "tools" / "include" / "uapi"
                                    if self.target.source is not None else None)
        except HarnessError as e:  # an observation too: the header a user would compile does not build
            return {"harness": e.kind, "harness_message": str(e), "harness_dir": str(work),
                    "dumped_types_mismatch": bool(e.mismatched_types), "mismatched_types": e.mismatched_types}
        answer = self._answered({"kind": "exec", "jit": self.jit, "executable": str(harness.executable)}, compiled)
        run = answer["exec"]
        if run["returncode"] != 0:
            raise HarnessError(f"the skeleton harness exited {run['returncode']} in the guest: "
                               f"{run['stderr'].strip()[-300:]}")
        report = parse_report(run["stdout"])
        if harness.light is not None:
            report["light"] = self._run_light(harness.light, compiled)
        return report

    def _run_light(self, light: Path, compiled: Compiled) -> dict[str, Any]:
        from backends.kernel.skeleton_run import HarnessError, parse_light_report

        answer = self._answered({"kind": "exec", "jit": self.jit, "executable": str(light)}, compiled)
        run = answer.get("exec") or {}
        if run.get("returncode") != 0:
            raise HarnessError(f"the light-skeleton harness exited {run.get('returncode')} in the guest: "
                               f"{run.get('stderr', '').strip()[-300:]}")
        return parse_light_report(run["stdout"])

    def run_reference(self, build: Any, test: str) -> dict[str, Any]:  # noqa: ANN401 - stack.upstream.UpstreamBuild
        """Upstream's own test_progs -t TEST in the guest, with this column's JIT state: exit code, verdicts."""
        from backends.stack.upstream import reference_verdicts
        from backends.vm.machine import GuestFailure

        try:
            answer = self.machine.request({"kind": "exec", "jit": self.jit, "executable": str(build.test_progs),
                                           "args": ["-t", test], "cwd": str(build.directory), "timeout": 300},
                                          timeout=360)
        except GuestFailure as e:
            raise GuestFailed(f"{self.name}: layer kernel: {e}\n--- guest console ---\n{e.console_tail}") from None
        if "error" in answer:
            raise RuntimeError(f"{self.name}: the guest could not run test_progs: {answer['error']['message']}")
        run = answer["exec"]
        output = run["stdout"] + run["stderr"]
        return {"exit": run["returncode"], "verdicts": reference_verdicts(output), "output": output}

    def observe_case(self, case: Any, runs: Any) -> Result:  # noqa: ANN401 - generators.asm.VerifierCase
        if self.loader != "raw":
            raise NotImplementedError("verifier cases load through bpf() directly: they run under vm-raw")
        from generators.model import to_jsonable

        req = {**self._base("verifier_case"), "case": to_jsonable(case), "runs": [list(r) for r in runs]}
        return self._ask(req, {}, None)

    def observe_jited(self, register: int, offset: int) -> dict[str, Any]:
        """The kernel backend's observe_jited in the guest (agent request "jited")."""

        if self.loader != "raw":
            raise NotImplementedError("the JIT case loads through bpf() directly: it runs under vm-raw")
        answer = self._answered({**self._base("jited"), "register": register, "offset": offset}, None)
        return dict(answer["jited"])

