"""The backends a suite can observe with, behind one small interface, and the profile each one is predicted by.

A backend that cannot run here raises `Unavailable` with a one-line reason; the fixture turns it into a visible
skip. The kernel backends choose their profile by probing the kernel and the libbpf in use, never by flag.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from schema import profiles as registry
from schema.objectset import SetPlan
from schema.result import Result
from suites.support import Compiled

Runs = Sequence[tuple[str, int, int]]


class Unavailable(RuntimeError):
    """This backend cannot run on this machine; the message says why, in one line."""


class Backend(Protocol):
    name: str
    profile: str  # the oracle profile its observations are predicted by
    possible_cpus: int
    online_cpus: tuple[int, ...]
    modifiers: str  # probed kernel facts beside the feature, as profile suffixes ("+noext")

    def observe(self, compiled: Compiled, runs: Runs, initial_values: Mapping[str, bytes] | None = None) -> Result:
        ...

    def observe_set(self, plan: SetPlan) -> dict:
        ...


@dataclass
class SimBackend:
    profile: str  # what the oracle predicts
    possible_cpus: int
    online_cpus: tuple[int, ...]
    name: str = "sim"
    # what the simulator runs, when it differs from `profile`: one of its deliberately broken rows
    # (e.g. "merged-norewrite") to see the suite catch it and replay it
    sim_profile: str | None = None

    @property
    def modifiers(self) -> str:
        """The kernel facts beside the feature this simulated kernel has, as profile suffixes ("+noext")."""
        return registry.join_modifiers("", registry.split_modifiers(self.profile)[1])

    def observe(self, compiled: Compiled, runs: Runs, initial_values: Mapping[str, bytes] | None = None) -> Result:
        from backends.sim.observe import observe

        return observe(compiled.path, profile=self.sim_profile or self.profile, possible_cpus=self.possible_cpus,
                       online_cpus=list(self.online_cpus), runs=runs, initial_values=initial_values)

    def observe_set(self, plan: SetPlan) -> dict:
        from backends.sim.observe import observe_set

        return observe_set(plan, profile=self.sim_profile or self.profile, possible_cpus=self.possible_cpus,
                           online_cpus=list(self.online_cpus))


@dataclass
class KernelBackend:
    loader: registry.Loader
    libbpf_path: str | None
    clang: object
    name: str = ""
    profile: str = ""
    modifiers: str = ""  # probed kernel facts as profile suffixes ("+noext")
    possible_cpus: int = 0
    online_cpus: tuple[int, ...] = ()
    env: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from backends.kernel import probes

        ok, reason = probes.bpf_usable()
        if not ok:
            raise Unavailable(f"kernel backend: {reason}")
        self.name = f"kernel-{self.loader}"
        facts = probes.probe_all()
        self.possible_cpus = facts["possible_cpus"]
        self.online_cpus = tuple(facts["online_cpus"])
        knows = True if self.loader == "raw" else self._libbpf_knows_percpu()
        # probed kernel facts beside the feature (extension programs refused, the JIT off) are modifiers the
        # oracle predicts with, not skips; the observation's env.profile comes from the same rule
        self.profile = registry.profile_for_probe(self.loader, knows, facts["features"])
        self.modifiers = registry.join_modifiers("", registry.split_modifiers(self.profile)[1])

    @functools.cached_property
    def libbpf(self):  # noqa: ANN201 - backends.kernel.libbpf.Libbpf, imported lazily
        from backends.kernel.libbpf import Libbpf, LibbpfMissing

        try:
            return Libbpf(self.libbpf_path)
        except LibbpfMissing as e:
            raise Unavailable(f"kernel backend: {e}") from None

    def _libbpf_knows_percpu(self) -> bool:
        """Behavioural probe: does this libbpf open an object whose program references a .percpu variable?"""
        from backends.kernel.libbpf import LibbpfError
        from toolchain.clang import compile_c

        source = ('int x __attribute__((section(".percpu"), used)) = 1;\n'
                  '__attribute__((section("raw_tp"), used)) int probe(void *ctx) { x = 2; return 0; }\n'
                  'char LICENSE[] __attribute__((section("license"), used)) = "GPL";\n')
        obj = compile_c(self.clang, source, name="libbpf_percpu_probe")
        try:
            with self.libbpf.open(str(obj)):
                return True
        except LibbpfError:
            return False

    def observe(self, compiled: Compiled, runs: Runs, initial_values: Mapping[str, bytes] | None = None) -> Result:
        from backends.kernel import observe

        if self.loader == "raw":
            return observe.observe_raw(compiled.path, runs=runs, initial_values=initial_values)
        return observe.observe_libbpf(compiled.path, libbpf=self.libbpf, runs=runs, initial_values=initial_values)

    def observe_set(self, plan: SetPlan) -> dict:
        from backends.kernel import objectset

        if self.loader == "raw":
            return objectset.observe_set_raw(plan)
        return objectset.observe_set_libbpf(plan, libbpf=self.libbpf)
