"""Command-line options, Hypothesis profiles and the fixtures every suite shares."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

from schema.cpulist import parse_cpulist

# every profile builds on this one (a parent settings object, so each keyword keeps its type)
_COMMON = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                         HealthCheck.large_base_example])
settings.register_profile("dev", _COMMON, max_examples=25)
# ci: fixed seed, no example database: the same examples on every machine and every run
settings.register_profile("ci", _COMMON, max_examples=40, derandomize=True, database=None, print_blob=True)
# bench: deterministic like ci, with enough examples per property that per-worker start-up is amortised
settings.register_profile("bench", _COMMON, max_examples=150, derandomize=True, database=None)
_NIGHTLY_DB = os.environ.get("PERCPU_HYPOTHESIS_DB")
# nightly: rounds of 300 examples a property with fresh seeds until the budget is spent (suites/nightly.py)
settings.register_profile("nightly", settings(_COMMON, database=DirectoryBasedExampleDatabase(_NIGHTLY_DB))
                          if _NIGHTLY_DB else _COMMON, max_examples=300, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("percpu-conformance")
    g.addoption("--backend", action="append", default=None, metavar="CONFIG",
                help="backend to observe with, repeatable: sim, kernel, vm, a column (kernel-raw, vm-libbpf-system) "
                     "or kind:key=value,... (vm:loader=libbpf,libbpf=PATH). Default: sim, kernel and vm, each "
                     "skipped with its reason when it cannot run here; a backend named here that cannot run "
                     f"fails the run (exit {EXIT_BACKEND_UNAVAILABLE})")
    g.addoption("--profile", default="merged",
                help="profile the prediction follows for the sim: merged (default), v1, unpatched, ...")
    g.addoption("--clang", default=None, help="clang binary (default: clang-19 or newer on PATH)")
    g.addoption("--possible-cpus", type=int, default=4, help="simulated possible CPUs (default 4)")
    g.addoption("--online-cpus", default=None, help="simulated online CPUs, cpulist (default: all possible)")
    g.addoption("--sim-profile", default=None,
                help="simulator row to run instead of --profile's, e.g. a broken one (merged-norewrite)")
    g.addoption("--libbpf", default=None,
                help="libbpf for the kernel and vm-libbpf columns: a libbpf.so path, system or stack "
                     "(default: the system's on the host, the stack's in the vm)")
    g.addoption("--loader", default=None, choices=("libbpf", "raw", "system"),
                help="only this loader's columns (default: every loader)")
    g.addoption("--stack", default=None, help="the provisioned stack the vm boots (default 7.3.4)")
    g.addoption("--kernel-image", default=None, help="vm: boot this bzImage instead of the stack's")
    g.addoption("--modules", default=None, help="vm: the kernel image's modules (a dir holding lib/modules/<rel>)")
    g.addoption("--bpftool", default=None, help="vm: this bpftool instead of the stack's")
    g.addoption("--vm-cpus", type=int, default=2, help="vm: online CPUs (default 2)")
    g.addoption("--vm-maxcpus", type=int, default=3, help="vm: possible CPUs, more than online (default 3)")
    g.addoption("--predict-profile", default=None,
                help="predict every probed column (kernel, vm) with this profile instead of the probed one: a "
                     "deliberately wrong prediction, to see each property fail on a real kernel")
    g.addoption("--vm-examples", type=int, default=10,
                help="examples per property on a vm column, where emulation costs 15-50x (default 10; 0: as many "
                     "as the Hypothesis profile says)")


EXIT_BACKEND_UNAVAILABLE = 6  # pytest's own codes are 0-5
DEFAULT_BACKENDS = ("sim", "kernel", "vm")


def _column_configs(config: pytest.Config) -> list[tuple[str, str]]:
    """(column name, configuration) of every column this run observes with."""
    from suites.backends import column_name, expand

    out = []
    for text in config.getoption("--backend") or DEFAULT_BACKENDS:
        for conf in expand(text, config.getoption("--loader")):
            out.append((column_name(conf), conf))
    return out


def pytest_configure(config: pytest.Config) -> None:
    """Bad options stop the run at once with pytest's usage error (exit 4) and one line."""
    from schema.profiles import UnknownProfile, lookup
    from suites.backends import ConfigError

    try:
        lookup(config.getoption("--profile"))
        if config.getoption("--predict-profile"):
            lookup(config.getoption("--predict-profile"))
        if config.getoption("--online-cpus"):
            parse_cpulist(config.getoption("--online-cpus"))
        _column_configs(config)
    except (UnknownProfile, ConfigError, ValueError) as e:
        raise pytest.UsageError(str(e)) from None
    possible = config.getoption("--possible-cpus")
    online = parse_cpulist(config.getoption("--online-cpus")) if config.getoption("--online-cpus") else [0]
    if possible < 1 or any(c >= possible for c in online):
        raise pytest.UsageError(f"--possible-cpus {possible} --online-cpus {config.getoption('--online-cpus')}: "
                                f"want at least one possible CPU and online CPUs among 0..{possible - 1}")
    if config.getoption("--vm-cpus") < 2 or config.getoption("--vm-maxcpus") < config.getoption("--vm-cpus"):
        raise pytest.UsageError("--vm-cpus must be at least 2 (per-CPU behaviour must be visible) and "
                                "--vm-maxcpus at least --vm-cpus")
    _stage_junit(config)


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
    return RunConfig(tuple(c for _, c in _column_configs(pytestconfig)), opt("--profile"), opt("--clang"),
                     possible, online, opt("--libbpf"), opt("--loader"))


@pytest.fixture(scope="session")
def clang(config: RunConfig):
    from toolchain.clang import Clang, ToolchainError

    try:
        return Clang.find(config.clang)
    except ToolchainError as e:
        pytest.exit(f"toolchain: {e}", returncode=3)


# Backends: each test that takes `backend` runs once per column (a backend with one of its loaders).

def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        columns = _column_configs(metafunc.config)
        metafunc.parametrize("backend", [c for _, c in columns], ids=[n for n, _ in columns], indirect=True,
                             scope="session")


def _defaults(config: pytest.Config) -> dict[str, str]:
    """The command line's settings, which a configuration's own settings override."""
    opt = config.getoption
    names = {"profile": "--profile", "possible": "--possible-cpus", "online": "--online-cpus",
             "sim_profile": "--sim-profile", "libbpf": "--libbpf", "clang": "--clang", "stack": "--stack",
             "kernel_image": "--kernel-image", "modules": "--modules", "bpftool": "--bpftool",
             "vm_cpus": "--vm-cpus", "vm_maxcpus": "--vm-maxcpus"}
    out = {key: str(opt(flag)) for key, flag in names.items() if opt(flag) is not None}
    # a default vm column uses the stack as provisioned (make stack); a requested one provisions what is missing
    out["provision"] = "yes" if config.getoption("--backend") else "no"
    return out


_BACKENDS: dict[str, object] = {}


@pytest.fixture(scope="session")
def backend(request: pytest.FixtureRequest, config: RunConfig, clang):
    from suites.backends import Unavailable, from_config

    key = request.param
    if key not in _BACKENDS:
        try:
            _BACKENDS[key] = built = from_config(key, _defaults(request.config))
            wrong = request.config.getoption("--predict-profile")
            if wrong and not key.startswith("sim"):
                built.profile = wrong
        except Unavailable as e:
            _BACKENDS[key] = e
    found = _BACKENDS[key]
    if isinstance(found, Exception):
        if request.config.getoption("--backend"):  # asked for by name: a run without it would lie
            pytest.exit(f"backend {key}: {found}", returncode=EXIT_BACKEND_UNAVAILABLE)
        pytest.skip(str(found))
    return found


_ENV_SENT: set[str] = set()


def _column_env(backend) -> dict:  # noqa: ANN001 - suites.backends.Backend
    """What the matrix header says of a column: where its kernel and libbpf come from, and its profile."""
    env = dict(getattr(backend, "env", None) or {})
    keep = ("kernel_release", "libbpf", "libbpf_path", "bpftool", "stack", "accelerator", "jit_enabled",
            "possible_cpus", "online_cpus")
    return {"profile": backend.profile, "config": backend.config, **{k: env.get(k) for k in keep if k in env}}


@pytest.fixture(autouse=True)
def _vm_examples(request: pytest.FixtureRequest):
    """A property runs fewer examples on a vm column than on the host's (--vm-examples): Hypothesis reads a
    test's settings when it is called, so they are swapped for the call and restored after it. The first test
    of each column also carries the column's environment to the matrix header."""
    callspec = getattr(request.node, "callspec", None)
    key = callspec.params.get("backend") if callspec is not None else None
    built = _BACKENDS.get(key) if key is not None else None
    if key is not None and built is not None and not isinstance(built, Exception) and key not in _ENV_SENT:
        import json

        _ENV_SENT.add(key)
        request.node.user_properties.append(("column_env", json.dumps(_column_env(built))))
    wanted = request.config.getoption("--vm-examples")
    test = request.function
    current = getattr(test, "_hypothesis_internal_use_settings", None)
    if (callspec is None or not str(callspec.params.get("backend", "")).startswith("vm") or not wanted
            or current is None or current.max_examples <= wanted):
        yield
        return
    test._hypothesis_internal_use_settings = settings(current, max_examples=wanted)
    try:
        yield
    finally:
        test._hypothesis_internal_use_settings = current


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Name each test's matrix column (its backend's): the report carries it to the matrix, skips included."""
    from suites.backends import column_name

    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "backend" in callspec.params:
            item.user_properties.append(("column", column_name(callspec.params["backend"])))


# The conformance matrix: rows are properties, columns backends; printed at the end of every run.

_MATRIX: dict[tuple[str, str], dict] = {}
_COLUMN_ENV: dict[str, dict] = {}  # column -> its kernel, libbpf, bpftool, profile, accelerator


def _redeliver_swallowed_interrupts() -> None:
    """A Ctrl-C that lands in a garbage-collector callback (Hypothesis keeps one, timing every collection) or
    in a finaliser is reported as unraisable and dropped by CPython: the run would go on as if never
    interrupted. Such an interrupt is delivered to the main thread again, where it stops the run."""
    import _thread
    import sys
    import threading

    previous = sys.unraisablehook  # pytest's, installed by its unraisableexception plugin at configure

    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            _SWALLOWED.append(True)  # and pytest_runtest_logfinish stops the run, should this one be lost too
            # a little later, from another thread: raised here, inside the hook, it would be dropped again
            again = threading.Timer(0.01, _thread.interrupt_main)
            again.daemon = True
            again.start()
            return
        previous(unraisable)

    sys.unraisablehook = hook


_SWALLOWED: list[bool] = []  # interrupts CPython dropped, delivered again


@pytest.hookimpl(trylast=True)
def pytest_runtest_logfinish(nodeid: str, location: tuple[str, int | None, str]) -> None:
    """The redelivered interrupt can land where the code under test turns it into something else (Hypothesis,
    interrupted before its runner exists, fails the test with an internal assertion): the run still stops,
    as interrupted, once that test is over."""
    if _SWALLOWED:
        raise KeyboardInterrupt("an interrupt dropped in a garbage-collector callback or a finaliser")


def pytest_sessionstart(session: pytest.Session) -> None:
    """A malformed known-divergence register stops the run with one line, before any test."""
    from suites.known import RegisterError, register

    _redeliver_swallowed_interrupts()

    try:
        register()
    except RegisterError as e:
        raise pytest.UsageError(f"known-divergence register: {e}") from None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # noqa: ANN201
    """The known-divergence hits and applicable entries of the test's comparisons ride on its user_properties
    (which pytest-xdist carries to the controller), so the matrix can show them."""
    if call.when == "call":
        from suites.known import drain

        item.user_properties.extend(drain())
    yield


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "call" and not (report.when == "setup" and report.outcome != "passed"):
        return
    name = report.nodeid.split("::")[-1]
    prop, _, param = name.partition("[")
    param = param.rstrip("]")
    # the backend fixture names the column; corpus names and other parameters fold into one cell
    column = next((str(v) for k, v in report.user_properties if k == "column"), "oracle")
    cell = _MATRIX.setdefault((report.nodeid.split("::")[0] + "::" + prop, column), {})
    outcome = "skipped" if report.skipped else report.outcome
    cell[outcome] = int(cell.get(outcome, 0)) + 1
    if report.skipped and isinstance(report.longrepr, tuple):
        cell["reason"] = str(report.longrepr[2]).removeprefix("Skipped: ")
    for key, value in report.user_properties:
        if key == "predicted_reject":
            cell["predicted-reject"] = int(cell.get("predicted-reject", 0)) + int(str(value))
        elif key == "column_env":
            import json

            _COLUMN_ENV[column] = json.loads(str(value))  # user_properties values are typed object
        elif key in ("known", "known-applies"):
            cell.setdefault(key, {})[value] = cell.get(key, {}).get(value, 0) + 1


def _cell_text(cell: dict) -> str:
    if cell.get("failed"):
        return "FAIL"
    if cell.get("known"):  # every divergence explained by the register: neither pass nor FAIL
        return "known: " + ", ".join(sorted(cell["known"]))
    if cell.get("passed"):
        rejects = cell.get("predicted-reject")
        return f"pass ({rejects} predicted-reject)" if rejects else "pass"
    if cell.get("skipped"):
        return f"skipped: {cell.get('reason', '')}"
    return "-"


def _matrix_rows() -> tuple[list[str], list[tuple[str, list[str]]]]:
    suite_rows = {k: v for k, v in _MATRIX.items() if k[0].startswith("suites/")}
    columns = sorted({c for _, c in suite_rows})
    props = sorted({p for p, _ in suite_rows})
    return columns, [(p.removeprefix("suites/"), [_cell_text(suite_rows.get((p, c), {})) for c in columns])
                     for p in props]


# reports/: the run's set (junit.xml, matrix.md, matrix.html, results.json) is built in a staging directory and
# moved into place only when all of it is written, so reports/ never mixes two runs. Interrupted runs, runs stopped
# with an exit code of their own (toolchain, unavailable backend) and xdist workers write nothing.
REPORT_FILES = ("junit.xml", "matrix.md", "matrix.html", "results.json")
_JUNIT: dict[str, Path | None] = {"staged": None, "user": None}
_EXIT_STATUS: list[int] = []  # the session's exit status, once it is known


def _reports_dir() -> Path:
    return Path(os.environ.get("PERCPU_REPORTS", "reports"))


def _stage_junit(config: pytest.Config) -> None:
    """Point pytest's junitxml plugin (which writes when the session finishes) at a private file, so
    reports/junit.xml is only ever replaced together with the matrix. A --junitxml elsewhere stays the user's
    and is copied into the set."""
    import shutil
    import tempfile

    if hasattr(config, "workerinput") or not hasattr(config.option, "xmlpath"):  # a worker, or -p no:junitxml
        return
    wanted = config.option.xmlpath
    if wanted and Path(wanted).resolve() != (_reports_dir() / "junit.xml").resolve():
        _JUNIT["user"], _JUNIT["staged"] = Path(wanted).resolve(), None
        return
    staging = Path(tempfile.mkdtemp(prefix="percpu-junit-"))
    config.add_cleanup(lambda: shutil.rmtree(staging, ignore_errors=True))
    _JUNIT["staged"] = config.option.xmlpath = staging / "junit.xml"
    _JUNIT["user"] = None


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Keep the exit status for the report writer; a worker hands its coverage counts to the controller."""
    _EXIT_STATUS[:] = [int(exitstatus)]
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        from suites.support import COVERAGE

        workeroutput["coverage"] = {family: dict(counts) for family, counts in COVERAGE.items()}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:  # noqa: ANN001 - xdist's WorkerController, its error text
    """Under xdist the examples run in the workers: their coverage counts are added up here."""
    from suites.support import COVERAGE

    for family, counts in getattr(node, "workeroutput", {}).get("coverage", {}).items():
        COVERAGE.setdefault(family, Counter()).update(counts)


def _write_reports(columns: list[str], rows: list[tuple[str, list[str]]], md: list[str],
                   coverage: dict[str, dict[str, int]]) -> str | None:
    """Write the run's report set into reports/ as a whole; the one line to print when it cannot be."""
    import html
    import json
    import shutil
    import tempfile

    out = _reports_dir()
    staging: Path | None = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out, prefix=".staging-"))  # same filesystem: renames are atomic
        (staging / "matrix.md").write_text("\n".join(md) + "\n")
        head = "".join(f"<th>{html.escape(c)}</th>" for c in ["property", *columns])
        body = "".join("<tr><td>" + html.escape(p) + "</td>" + "".join(
            f"<td class='{c.split()[0].rstrip(':').lower()}'>{html.escape(c)}</td>" for c in cells) + "</tr>"
            for p, cells in rows)
        (staging / "matrix.html").write_text(
            "<!doctype html><meta charset=utf-8><title>percpu-conformance matrix</title><style>"
            "td,th{border:1px solid #999;padding:4px}.pass{background:#cfc}.fail{background:#fcc}"
            ".skipped{background:#eee}.known{background:#ffd}</style>"
            f"<table><tr>{head}</tr>{body}</table>\n")
        cells = {f"{p}|{c}": v for (p, c), v in _MATRIX.items()}
        stale = [{"column": c, "id": i} for c, i in _known_not_reproduced()]
        (staging / "results.json").write_text(json.dumps({"matrix": cells, "columns": columns,
                                                          "columns_env": _COLUMN_ENV,
                                                          "known_not_reproduced": stale,
                                                          "coverage": coverage}, indent=1) + "\n")
        junit = _JUNIT["staged"] or _JUNIT["user"]
        if junit is not None and junit.exists():
            shutil.copyfile(junit, staging / "junit.xml")
        for name in REPORT_FILES:  # a file this run did not make must not stay beside the ones it did
            if (staging / name).exists():
                os.replace(staging / name, out / name)
            else:
                (out / name).unlink(missing_ok=True)
    except OSError as e:
        return f"reports: cannot write {out}: {e.strerror}"
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return None


def _known_not_reproduced() -> list[tuple[str, str]]:
    """(column, id) of register entries that applied in a column that ran but explained nothing there: an
    upstream fix (or a changed stack) to notice."""
    applied: dict[str, set[str]] = {}
    hit: dict[str, set[str]] = {}
    for (prop, column), cell in _MATRIX.items():
        if not prop.startswith("suites/"):
            continue
        applied.setdefault(column, set()).update(cell.get("known-applies", {}))
        hit.setdefault(column, set()).update(cell.get("known", {}))
    return [(c, i) for c in sorted(applied) for i in sorted(applied[c] - hit[c])]


def _header_lines(columns: list[str], rows: list[tuple[str, list[str]]]) -> list[str]:
    """One line a column: what it ran on, or why it was skipped."""
    out = []
    for i, column in enumerate(columns):
        env = _COLUMN_ENV.get(column)
        cells = [r[1][i] for r in rows if r[1][i] != "-"]
        if env is None:
            reasons = sorted({c for c in cells if c.startswith("skipped")})
            if column != "oracle" and reasons and all(c.startswith("skipped") for c in cells):
                out.append(f"{column}: {reasons[0]}")
            continue
        online = env.get("online_cpus")
        lib = f"libbpf {env['libbpf']} ({env.get('libbpf_path')})" if env.get("libbpf") else "no libbpf (raw loader)"
        out.append(f"{column}: profile {env['profile']}; kernel {env.get('kernel_release')}; {lib}; bpftool "
                   f"{env.get('bpftool')}; CPUs {env.get('possible_cpus')} possible, online {online}; "
                   f"accelerator {env.get('accelerator')}" + (f"; stack {env['stack']}" if env.get("stack") else ""))
    return out


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001
    from suites.support import COVERAGE

    columns, rows = _matrix_rows()
    if not rows:
        return
    md = [f"- {line}" for line in _header_lines(columns, rows)] + [""]
    md += ["| property | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    md += [f"| {p} | " + " | ".join(cells) + " |" for p, cells in rows]
    terminalreporter.section("conformance matrix")
    for line in md:
        terminalreporter.write_line(line)
    for column, entry in _known_not_reproduced():
        terminalreporter.write_line(f"known divergence {entry} did not reproduce ({column})")
    if COVERAGE:
        terminalreporter.section("layout-space coverage")
        for family, counts in sorted(COVERAGE.items()):
            top = ", ".join(f"{k}: {n}" for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
            terminalreporter.write_line(f"{family}: {top}")
    if hasattr(getattr(terminalreporter, "config", None), "workerinput"):
        return  # the controller writes the reports, from every worker's results
    if _EXIT_STATUS and _EXIT_STATUS[0] not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        terminalreporter.write_line(f"reports: not written (the run ended with exit {_EXIT_STATUS[0]}); "
                                    f"{_reports_dir()} keeps the last complete run's")
        return
    problem = _write_reports(columns, rows, md, {f: dict(c) for f, c in sorted(COVERAGE.items())})
    if problem:
        terminalreporter.write_line(problem)
