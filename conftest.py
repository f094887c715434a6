"""Command-line options, Hypothesis profiles and the fixtures every suite shares."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings

from schema.cpulist import parse_cpulist

BACKENDS = ("sim", "kernel", "vm")

_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                                        HealthCheck.large_base_example]}
settings.register_profile("dev", max_examples=25, **_COMMON)
# ci: fixed seed, no example database: the same examples on every machine and every run
settings.register_profile("ci", max_examples=40, derandomize=True, database=None, print_blob=True, **_COMMON)
settings.register_profile("nightly", max_examples=5000, print_blob=True, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("percpu-conformance")
    g.addoption("--backend", action="append", choices=BACKENDS, default=None,
                help="backend to observe with; repeatable (default: sim)")
    g.addoption("--profile", default="merged",
                help="profile the prediction follows for the sim: merged (default), v1, unpatched, ...")
    g.addoption("--clang", default=None, help="clang binary (default: clang-19 or newer on PATH)")
    g.addoption("--possible-cpus", type=int, default=4, help="simulated possible CPUs (default 4)")
    g.addoption("--online-cpus", default=None, help="simulated online CPUs, cpulist (default: all possible)")
    g.addoption("--libbpf", default=None, help="libbpf.so for the kernel backend (default: the system's)")
    g.addoption("--loader", default=None, choices=("libbpf", "raw"),
                help="kernel backend loader (default: both)")


@dataclass(frozen=True)
class RunConfig:
    backends: tuple[str, ...]
    profile: str
    clang: str | None
    possible_cpus: int
    online_cpus: tuple[int, ...]
    libbpf: str | None
    loader: str | None


@pytest.fixture(scope="session")
def config(pytestconfig: pytest.Config) -> RunConfig:
    opt = pytestconfig.getoption
    possible = opt("--possible-cpus")
    online = tuple(parse_cpulist(opt("--online-cpus"))) if opt("--online-cpus") else tuple(range(possible))
    if possible < 1 or not online or any(c >= possible for c in online):
        raise pytest.UsageError(f"--online-cpus {online} must be a non-empty subset of 0..{possible - 1}")
    from oracle.profiles import UnknownProfile, profile

    try:
        profile(opt("--profile"))
    except UnknownProfile as e:
        raise pytest.UsageError(str(e)) from None
    return RunConfig(tuple(opt("--backend") or ("sim",)), opt("--profile"), opt("--clang"), possible, online,
                     opt("--libbpf"), opt("--loader"))


@pytest.fixture(scope="session")
def clang(config: RunConfig):
    from toolchain.clang import Clang, ToolchainError

    try:
        return Clang.find(config.clang)
    except ToolchainError as e:
        pytest.exit(f"toolchain: {e}", returncode=3)
