"""The backends a suite can observe with, behind one small interface, the profile each one is predicted by, and
the one registry that builds them from a configuration string (`from_config("kernel:loader=raw")`).

A backend that cannot run here raises `Unavailable` with a one-line reason: a default column becomes a visible
skip, a requested one fails the run. The kernel and vm backends choose their profile by probing the kernel and the
libbpf in use, never by flag. Adding a backend is one module and one `BackendKind` line in `KINDS`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from schema import profiles as registry
from schema.objectset import SetPlan
from schema.result import Result
from suites.support import Compiled

if TYPE_CHECKING:
    from toolchain.clang import Clang

Runs = Sequence[tuple[str, int, int]]
CaseRuns = Sequence[tuple[int, int]]  # (cpu, count) of an instruction-level verifier case

# The behavioural probe of a libbpf: does it open an object whose program references a .percpu variable?
LIBBPF_PROBE_SOURCE = ('int x __attribute__((section(".percpu"), used)) = 1;\n'
                       '__attribute__((section("raw_tp"), used)) int probe(void *ctx) { x = 2; return 0; }\n'
                       'char LICENSE[] __attribute__((section("license"), used)) = "GPL";\n')


class Unavailable(RuntimeError):
    """This backend cannot run on this machine; the message says why, in one line."""


class Backend(Protocol):
    name: str
    profile: str  # the oracle profile its observations are predicted by
    possible_cpus: int
    online_cpus: tuple[int, ...]

    @property
    def config(self) -> str:
        """The configuration string that builds it again (from_config), paths included."""
        ...

    @property
    def modifiers(self) -> str:
        """Probed kernel facts beside the feature, as profile suffixes ("+noext")."""
        ...

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

    @property
    def env(self) -> dict:
        row = registry.lookup(self.profile)[0]  # a broken simulator row (sim_profile) is the simulator's own
        kernel, loader = (self.sim_profile, self.sim_profile) if self.sim_profile else (row.sim_kernel_row,
                                                                                       row.loader_row)
        return {"kernel_release": f"simulated ({kernel})", "libbpf": f"simulated ({loader})",
                "libbpf_path": "backends/objload.py", "bpftool": None, "accelerator": "none (simulated)",
                "possible_cpus": self.possible_cpus, "online_cpus": list(self.online_cpus)}

    @property
    def config(self) -> str:
        """The configuration that builds this backend again (`from_config`)."""
        from schema.cpulist import format_cpulist

        extra = f",sim_profile={self.sim_profile}" if self.sim_profile else ""
        return (f"sim:profile={self.profile},possible={self.possible_cpus},"
                f"online={format_cpulist(list(self.online_cpus))}{extra}")

    def observe(self, compiled: Compiled, runs: Runs, initial_values: Mapping[str, bytes] | None = None) -> Result:
        from backends.sim.observe import observe

        return observe(compiled.path, profile=self.sim_profile or self.profile, possible_cpus=self.possible_cpus,
                       online_cpus=list(self.online_cpus), runs=runs, initial_values=initial_values)

    def observe_set(self, plan: SetPlan) -> dict:
        from backends.sim.observe import observe_set

        return observe_set(plan, profile=self.sim_profile or self.profile, possible_cpus=self.possible_cpus,
                           online_cpus=list(self.online_cpus))

    def observe_case(self, case: object, runs: CaseRuns) -> Result:
        from suites.verifier_backends import observe_sim

        row, modifiers = registry.lookup(self.sim_profile or self.profile)
        sim_kernel = registry.join_modifiers(row.sim_kernel_row, modifiers)
        return observe_sim(case, sim_kernel, self.possible_cpus, self.online_cpus, runs)  # type: ignore[arg-type]


@dataclass
class KernelBackend:
    loader: registry.Loader
    libbpf_path: str | None
    clang: Clang
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
        from backends.kernel.observe import bpftool_version

        lib = self.libbpf if self.loader == "libbpf" else None
        self.env = {"kernel_release": facts["kernel_release"], "libbpf": lib.version if lib else None,
                    "libbpf_path": lib.path if lib else None, "bpftool": bpftool_version(),
                    "features": facts["features"], "jit_enabled": facts.get("jit_enabled"),
                    "possible_cpus": self.possible_cpus, "online_cpus": list(self.online_cpus),
                    "accelerator": "none (this machine's kernel)"}

    @property
    def config(self) -> str:
        """The configuration that builds this backend again (`from_config`), with the libbpf it really loaded."""
        if self.loader == "raw":
            return "kernel:loader=raw"
        return f"kernel:loader=libbpf,libbpf={self.libbpf.path}"

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

        obj = compile_c(self.clang, LIBBPF_PROBE_SOURCE, name="libbpf_percpu_probe")
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

    def observe_case(self, case: object, runs: CaseRuns) -> Result:
        if self.loader != "raw":
            raise NotImplementedError("verifier cases load through bpf() directly: they run under the raw loader")
        from suites.verifier_backends import observe_kernel

        return observe_kernel(case, runs)  # type: ignore[arg-type]

    def run_reference(self, build: Any, test: str) -> dict[str, Any]:  # noqa: ANN401 - UpstreamBuild
        """Upstream's own test_progs -t TEST on this machine's kernel."""
        from backends.stack.upstream import run_reference

        run = run_reference(build, test)
        return {"exit": run.exit_code, "verdicts": run.verdicts, "output": run.output}

    def observe_jited(self, register: int, offset: int) -> dict:
        """The x86 registers the JIT adds the per-CPU offset into after `rN = map_value(off) ll`."""
        if self.loader != "raw":
            raise NotImplementedError("the JIT case loads through bpf() directly: it runs under the raw loader")
        from backends.kernel.jited import observe_percpu_addr_jit

        return observe_percpu_addr_jit(register, offset)


# -- the registry --------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A backend configuration string that names no backend or an unknown setting."""


Settings = Mapping[str, str]


@dataclass(frozen=True)
class BackendKind:
    """One backend: the settings its configuration takes, the loaders it expands to when none is named, how a
    configuration is named as a matrix column, and how it is built. `defaults` are the run's command-line settings,
    which a configuration's own settings override."""

    name: str
    settings: tuple[str, ...]
    build: Callable[[Settings, Settings], Backend]
    loaders: tuple[str, ...] = ()
    column: Callable[[Settings], str] = lambda s: ""


def _build_sim(s: Settings, d: Settings) -> Backend:
    from schema.cpulist import parse_cpulist

    possible = int(s.get("possible", d.get("possible", "4")))
    online_text = s.get("online", d.get("online"))
    online = tuple(parse_cpulist(online_text)) if online_text else tuple(range(possible))
    if possible < 1 or not online or any(c >= possible for c in online):
        raise ConfigError(f"online CPUs {list(online)} must be a non-empty subset of 0..{possible - 1}")
    profile = s.get("profile", d.get("profile", "merged"))
    registry.lookup(profile)
    sim_profile = s.get("sim_profile", d.get("sim_profile"))
    return SimBackend(profile, possible, online, sim_profile=sim_profile or None)


def _build_kernel(s: Settings, d: Settings) -> Backend:
    from toolchain.clang import Clang

    loader = s["loader"]
    libbpf = s.get("libbpf", d.get("libbpf"))
    if loader == "libbpf" and (libbpf is not None or "patch" in s):
        from backends.libbpf_source import resolve_libbpf

        libbpf = resolve_libbpf(libbpf or "stack", s.get("patch"))
    return KernelBackend(loader, libbpf, Clang.find(d.get("clang")))  # type: ignore[arg-type]


def _build_vm(s: Settings, d: Settings) -> Backend:
    from pathlib import Path

    from suites.vm_backend import VmBackend, resolve_target

    def path(key: str) -> Path | None:
        value = s.get(key, d.get(key))
        return Path(value) if value else None

    loader = s["loader"]
    jit = s.get("jit", "on")
    if jit not in ("on", "off"):
        raise ConfigError(f"jit={jit!r}: want on or off")
    libbpf = s.get("libbpf", d.get("libbpf")) if loader == "libbpf" else None
    if libbpf is not None or "patch" in s:
        from backends.libbpf_source import resolve_libbpf

        libbpf = resolve_libbpf(libbpf or "stack", s.get("patch"))
    target = resolve_target(stack=s.get("stack", d.get("stack")), kernel_image=path("kernel_image"),
                            modules=path("modules"), libbpf=None, bpftool=path("bpftool"),
                            cpus=int(s.get("cpus", d.get("vm_cpus", "2"))),
                            maxcpus=int(s.get("maxcpus", d.get("vm_maxcpus", "3"))),
                            provision=s.get("provision", d.get("provision", "yes")) != "no")
    from toolchain.clang import Clang

    return VmBackend(loader, target, jit=jit == "on", libbpf_path=libbpf,  # type: ignore[arg-type]
                     clang=Clang.find(d.get("clang")))


def _vm_column(s: Settings) -> str:
    loader = {"system": "libbpf-system"}.get(s["loader"], s["loader"])
    return f"vm-{loader}{'-nojit' if s.get('jit') == 'off' else ''}"


KINDS: dict[str, BackendKind] = {k.name: k for k in (
    BackendKind(name="sim", settings=("profile", "possible", "online", "sim_profile"), build=_build_sim,
                column=lambda s: "sim"),
    BackendKind(name="kernel", settings=("loader", "libbpf", "patch"), build=_build_kernel, loaders=("libbpf", "raw"),
                column=lambda s: f"kernel-{s['loader']}"),
    BackendKind(name="vm", settings=("loader", "libbpf", "patch", "stack", "kernel_image", "modules", "bpftool", "cpus",
                                     "maxcpus", "jit", "provision"),
                build=_build_vm, loaders=("libbpf", "raw", "system", "libbpf+jit=off", "raw+jit=off"),
                column=_vm_column),
)}
_COLUMN_ALIASES = {"vm-libbpf-system": "vm:loader=system", "vm-libbpf-nojit": "vm:loader=libbpf,jit=off",
                   "vm-raw-nojit": "vm:loader=raw,jit=off"}


def parse_config(text: str) -> tuple[BackendKind, dict[str, str]]:
    """`kind[:key=value,...]`, or a column name (`kernel-raw`, `vm-libbpf-system`)."""
    text = _COLUMN_ALIASES.get(text, text)
    head, _, rest = text.partition(":")
    kind_name, dash, loader = head.partition("-")
    kind = KINDS.get(kind_name)
    if kind is None:
        raise ConfigError(f"unknown backend {kind_name!r} in {text!r} (known: {', '.join(KINDS)})")
    settings: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in kind.settings:
            raise ConfigError(f"{kind.name}: unknown setting {item!r} in {text!r} "
                              f"(known: {', '.join(kind.settings) or 'none'})")
        settings[key] = value
    if dash:
        settings["loader"] = loader
    if kind.loaders and settings.get("loader") is not None:
        known_loaders = {entry.split("+")[0] for entry in kind.loaders}
        if settings["loader"] not in known_loaders:
            raise ConfigError(f"{kind.name}: unknown loader {settings['loader']!r} (known: "
                              f"{', '.join(sorted(known_loaders))})")
    return kind, settings


def expand(text: str, loader: str | None = None) -> list[str]:
    """The column configurations one `--backend` value stands for: every loader of a kind when none is named."""
    kind, settings = parse_config(text)
    if not kind.loaders or "loader" in settings:
        return [format_config(kind, settings)]
    entries = [e for e in kind.loaders if loader is None or e.split("+")[0] == loader]
    out = []
    for entry in entries:
        name, *extra = entry.split("+")
        out.append(format_config(kind, {**settings, "loader": name, **dict(x.split("=") for x in extra)}))
    return out


def format_config(kind: BackendKind, settings: Settings) -> str:
    return kind.name + (":" + ",".join(f"{k}={v}" for k, v in settings.items()) if settings else "")


def column_name(text: str) -> str:
    kind, settings = parse_config(text)
    return kind.column(settings)


def from_config(text: str, defaults: Settings | None = None) -> Backend:
    """Build the backend a configuration names; ConfigError for a bad string, Unavailable when it cannot run."""
    kind, settings = parse_config(text)
    if kind.loaders and "loader" not in settings:
        settings["loader"] = kind.loaders[0].split("+")[0]
    from backends.libbpf_source import LibbpfSourceError

    try:
        return kind.build(settings, defaults or {})
    except registry.UnknownProfile as e:
        raise ConfigError(str(e)) from None
    except LibbpfSourceError as e:
        raise Unavailable(f"{kind.column(settings) or kind.name}: {e}") from e  # the cause keeps e.kind
