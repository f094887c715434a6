"""Each bad input a user can give gets one clear line and its own exit code: never a traceback, never a pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ('#define SEC(n) __attribute__((section(n), used))\nint x SEC(".percpu") = 1;\n'
          'SEC("raw_tp") int touch(void *ctx) { x += 1; return 0; }\nchar _license[] SEC("license") = "GPL";\n')


def _run(*argv: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PERCPU_FAILURES": str(tmp_path / "failures"),
           "PERCPU_REPORTS": str(tmp_path / "reports")}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("run", "says"), [
    ("nosuch@0", "no program 'nosuch'"),
    ("touch@99", "CPU 99 is not online"),
    ("touch@0:10000000", "1 <= COUNT <= 100000"),
])
def test_kernel_run_refuses_a_run_it_cannot_do(tmp_path, run, says):
    src = tmp_path / "t.c"
    src.write_text(SOURCE)
    done = _run("-m", "backends.kernel", "run", str(src), "--loader", "raw", "--run", run, tmp_path=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in done.stderr


@pytest.mark.parametrize(("args", "code", "says"), [
    (["--backend", "sim:profle=v1"], 4, "unknown setting 'profle=v1'"),
    (["--backend", "bogus"], 4, "unknown backend 'bogus'"),
    (["--possible-cpus", "0"], 4, "--possible-cpus 0"),
    (["--profile", "bogus"], 4, "unknown profile 'bogus'"),
    (["--backend", "kernel-libbpf", "--libbpf", "/nonexistent"], 6, "no libbpf at /nonexistent"),
])
def test_pytest_refuses_bad_options_before_any_test(tmp_path, args, code, says):
    done = _run("-m", "pytest", "suites/test_maps.py", "-q", "-p", "no:randomly", "-k", "corpus", *args,
                tmp_path=tmp_path)
    assert done.returncode == code, done.stdout[-2000:] + done.stderr[-2000:]
    assert says in done.stdout + done.stderr
    assert " passed" not in done.stdout


def test_replay_of_a_bad_profile_is_one_line(tmp_path):
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "meta.json").write_text('{"backend": "sim", "config": "sim", "check": "maps", "layers": [], '
                                      '"profile": "merged", "possible_cpus": 2, "online_cpus": [0, 1]}')
    from corpus import CORPUS
    from generators.model import dumps

    (bundle / "model.json").write_text(dumps(CORPUS[sorted(CORPUS)[0]]((0, 1))))
    done = _run("-m", "suites.replay", str(bundle), "--profile", "bogus", tmp_path=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "unknown profile 'bogus'" in done.stderr


def test_oracle_predict_of_a_run_on_a_cpu_that_is_not_online(tmp_path):
    import dataclasses

    from corpus import CORPUS
    from generators.model import Run, dumps

    model = CORPUS["selftest"]((0, 1))
    model = dataclasses.replace(model, schedule=(Run(model.schedule[0].program, 9, 1),))
    (tmp_path / "m.json").write_text(dumps(model))
    done = _run("-m", "oracle", "predict", str(tmp_path / "m.json"), tmp_path=tmp_path)
    assert done.returncode == 2 and "CPU 9, which is not online" in done.stderr and "Traceback" not in done.stderr


def test_nightly_with_a_bad_profile_stops_with_pytest_usage_code(tmp_path):
    done = _run("-m", "suites.nightly", "--budget", "60", "--database", str(tmp_path / "db"), "--profile", "bogus",
                tmp_path=tmp_path)
    assert done.returncode == 4, done.stdout[-1000:] + done.stderr[-1000:]
    assert "pytest refused the run (exit 4)" in done.stderr
