"""Profile identity: each profile's name, the rows each side builds it from, and the probe result that selects it.

A profile is a (libbpf, kernel) pair. The oracle (oracle/profiles.py) and the simulator (backends/objload.py,
backends/sim/kernel.py) each keep their own behaviour rows; this module only names which row of each side a
profile stands for, so the two stay independent in behaviour and agree in names. A probed machine fact beside
the feature is a modifier appended to a profile's name (`unpatched+noext`); `split_modifiers` is its one parser.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Loader = Literal["libbpf", "raw"]
# the oracle's libbpf axis == the simulator's loader row, for every real profile
LibbpfMode = Literal["merged", "v1", "old", "raw"]
KernelMode = Literal["patched", "patched-v1", "unpatched", "patched-nojit"]


class UnknownProfile(ValueError):
    """A profile or modifier name no table knows; the message lists the known ones."""


@dataclass(frozen=True, kw_only=True)
class ProbeSignature:
    """What probing a machine must find for a profile to be chosen."""

    loader: Loader
    libbpf_knows_percpu: bool  # the libbpf in use opens an object referencing a `.percpu` variable
    kernel_has_percpu_data: bool  # PERCPU_ARRAY has map_direct_value_addr (the feature's kernel half)


@dataclass(frozen=True, kw_only=True)
class ProfileRow:
    name: str
    libbpf_axis: LibbpfMode  # oracle.profiles.LIBBPF key
    kernel_axis: KernelMode  # oracle.profiles.KERNEL key
    loader_row: LibbpfMode  # backends.objload.LOADER_PROFILES key
    sim_kernel_row: KernelMode  # backends.sim.kernel.KERNEL_PROFILES key
    probe: ProbeSignature | None  # None: chosen by name only (a revision or an arch a probe cannot tell)
    summary: str


@dataclass(frozen=True, kw_only=True)
class Modifier:
    """A kernel fact orthogonal to the feature, probed and appended to a profile's name as `+<name>`."""

    name: str
    feature: str | None  # the probed feature (env.features key) that selects it; None: never probed
    selected_when: bool  # the feature's value that selects it (None, not probed, never does)
    # the modifier that stands for it in a lowered rendering's prediction (the feature's semantics on this
    # machine), None for none
    lowered: str | None
    summary: str
    # another modifier whose selection explains the same probe result, so this one is not selected with it
    unless: str | None = None


PROFILES: Mapping[str, ProfileRow] = {r.name: r for r in (
    ProfileRow(name="merged", libbpf_axis="merged", kernel_axis="patched", loader_row="merged",
               sim_kernel_row="patched",
               probe=ProbeSignature(loader="libbpf", libbpf_knows_percpu=True, kernel_has_percpu_data=True),
               summary="merged libbpf (1.8) on a merged kernel (7.3)"),
    ProfileRow(name="v1", libbpf_axis="v1", kernel_axis="patched-v1", loader_row="v1", sim_kernel_row="patched-v1",
               probe=None, summary="the series' first revision, libbpf and kernel"),
    ProfileRow(name="unpatched", libbpf_axis="old", kernel_axis="unpatched", loader_row="old",
               sim_kernel_row="unpatched",
               probe=ProbeSignature(loader="libbpf", libbpf_knows_percpu=False, kernel_has_percpu_data=False),
               summary="released libbpf (<= 1.7) on a kernel without the feature (<= 7.2)"),
    ProfileRow(name="old-patched-kernel", libbpf_axis="old", kernel_axis="patched", loader_row="old",
               sim_kernel_row="patched",
               probe=ProbeSignature(loader="libbpf", libbpf_knows_percpu=False, kernel_has_percpu_data=True),
               summary="released libbpf on a merged kernel"),
    ProfileRow(name="merged-unpatched-kernel", libbpf_axis="merged", kernel_axis="unpatched", loader_row="merged",
               sim_kernel_row="unpatched",
               probe=ProbeSignature(loader="libbpf", libbpf_knows_percpu=True, kernel_has_percpu_data=False),
               summary="merged libbpf on a kernel without the feature"),
    ProfileRow(name="raw-unpatched", libbpf_axis="raw", kernel_axis="unpatched", loader_row="raw",
               sim_kernel_row="unpatched",
               probe=ProbeSignature(loader="raw", libbpf_knows_percpu=True, kernel_has_percpu_data=False),
               summary="the suite's raw loader on a kernel without the feature"),
    ProfileRow(name="raw-patched", libbpf_axis="raw", kernel_axis="patched", loader_row="raw",
               sim_kernel_row="patched",
               probe=ProbeSignature(loader="raw", libbpf_knows_percpu=True, kernel_has_percpu_data=True),
               summary="the suite's raw loader on a merged kernel"),
    # never probed: the kernel backend runs on x86-64 only, whose JIT has the per-CPU instruction
    ProfileRow(name="merged-nojit", libbpf_axis="merged", kernel_axis="patched-nojit", loader_row="merged",
               sim_kernel_row="patched-nojit", probe=None,
               summary="merged libbpf on a merged kernel whose JIT has no per-CPU instruction (an arch)"),
)}

MODIFIERS: Mapping[str, Modifier] = {m.name: m for m in (
    # With the JIT off the extension probe fails for want of the JIT ("Extension programs should be JITed",
    # EINVAL), which +jitoff predicts; +noext is the program type itself refused (EPERM) [found on 7.3.4]
    Modifier(name="noext", feature="freplace", selected_when=False, lowered="noext", unless="jitoff",
             summary="BPF_PROG_TYPE_EXT refused at load (EPERM, empty log)"),
    # bpf_jit_enable=0 on a kernel without CONFIG_BPF_JIT_ALWAYS_ON: a program using per-CPU data is refused
    # after verification, and libbpf's FEAT_PERCPU_DATA probe with it; extension programs are refused too
    Modifier(name="jitoff", feature="jit", selected_when=False, lowered="noextjit",
             summary="the JIT disabled (net.core.bpf_jit_enable=0): only the interpreter runs programs"),
    # what the JIT being off means to a rendering without per-CPU data (the lowered one): its map lookups need
    # no JIT, its extension programs and its tail calls beside bpf-to-bpf calls do
    Modifier(name="noextjit", feature=None, selected_when=False, lowered="noextjit",
             summary="extensions and tail calls beside subprograms refused for want of the JIT; per-CPU data fine"),
)}


def _known() -> str:
    return (f"known: {', '.join(PROFILES)}, each optionally with "
            f"{', '.join('+' + m for m in MODIFIERS)}")


def split_modifiers(name: str) -> tuple[str, tuple[str, ...]]:
    """`base+m1+m2` -> (base, (m1, m2)); each modifier known and given once. The base is not checked."""
    base, *modifiers = name.split("+")
    unknown = [m for m in modifiers if m not in MODIFIERS]
    if unknown or len(set(modifiers)) != len(modifiers) or not base:
        raise UnknownProfile(f"unknown profile {name!r} ({_known()})")
    return base, tuple(modifiers)


def join_modifiers(base: str, modifiers: tuple[str, ...]) -> str:
    return "".join((base, *("+" + m for m in modifiers)))


def lookup(name: str) -> tuple[ProfileRow, tuple[str, ...]]:
    """A profile name with its modifiers -> its row and the modifiers, or UnknownProfile naming the known ones."""
    base, modifiers = split_modifiers(name)
    if base not in PROFILES:
        raise UnknownProfile(f"unknown profile {name!r} ({_known()})")
    return PROFILES[base], modifiers


def lowered_profile(name: str) -> str:
    """The profile a lowered rendering's run on a machine of profile `name` is predicted by: the feature's
    semantics (merged) with the modifiers that hold for it too."""
    _, modifiers = lookup(name)
    lowered = (MODIFIERS[m].lowered for m in modifiers)
    return join_modifiers("merged", tuple(dict.fromkeys(m for m in lowered if m is not None)))


def modifiers_for(features: Mapping[str, bool | None]) -> tuple[str, ...]:
    """The modifiers a machine's probed features select, in MODIFIERS order."""
    selected = {m.name for m in MODIFIERS.values()
                if m.feature is not None and features.get(m.feature) is m.selected_when}
    return tuple(m for m in MODIFIERS if m in selected and MODIFIERS[m].unless not in selected)


def kernel_has_percpu_data(features: Mapping[str, bool | None]) -> bool:
    """The feature's kernel half from the probes. `percpu_direct_value` tells it apart from a refusal for
    another reason (the JIT off); documents from before that probe only carry `percpu_data`."""
    direct = features.get("percpu_direct_value")
    return bool(features.get("percpu_data") if direct is None else direct)


def profile_for_probe(loader: Loader, libbpf_knows_percpu: bool, features: Mapping[str, bool | None]) -> str:
    """The profile a probed machine is predicted by: the row whose probe signature matches, plus modifiers."""
    signature = ProbeSignature(loader=loader, libbpf_knows_percpu=libbpf_knows_percpu,
                               kernel_has_percpu_data=kernel_has_percpu_data(features))
    for row in PROFILES.values():
        if row.probe == signature:
            return join_modifiers(row.name, modifiers_for(features))
    raise UnknownProfile(f"no profile for loader {loader!r} with libbpf_knows_percpu={libbpf_knows_percpu}, "
                         f"kernel_has_percpu_data={signature.kernel_has_percpu_data} ({_known()})")
