"""The gate exits 1 on a real behaviour change and names it; 0 for a configuration against itself."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from backends import libbpf_source
from backends.libbpf_source import LibbpfSourceError, resolve_libbpf
from backends.stack import provision
from suites.gate import main


def test_gate_lists_the_v1_naming_difference(tmp_path, capsys):
    assert main(["--baseline", "sim:profile=v1", "--candidate", "sim:profile=merged", "--examples", "3",
                 "--shrink-examples", "0", "--out", str(tmp_path)]) == 1
    summary = (tmp_path / "summary.md").read_text()
    assert "`maps[.percpu].name`" in summary and "`maps[.percpu].kernel_name`" in summary
    assert "| class | cases |" in summary and "| loader |" in summary  # by class before by field
    rows = list(csv.DictReader((tmp_path / "facts.csv").read_text().splitlines()))
    assert {r["config"] for r in rows} == {"sim:profile=v1", "sim:profile=merged"}


def test_gate_passes_a_configuration_against_itself(tmp_path):
    assert main(["--baseline", "sim:profile=merged", "--candidate", "sim:profile=merged", "--examples", "3",
                 "--out", str(tmp_path)]) == 0


def test_gate_refuses_an_unknown_configuration(tmp_path, capsys):
    assert main(["--baseline", "bogus", "--candidate", "sim", "--out", str(tmp_path)]) == 2
    assert "unknown backend 'bogus'" in capsys.readouterr().err


def test_gate_refuses_a_misspelt_setting_in_one_line(tmp_path, capsys):
    assert main(["--baseline", "sim:profle=v1", "--candidate", "sim", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown setting 'profle=v1'" in err


@pytest.mark.parametrize("counts", [("0", "0"), ("0", "1"), ("1", "0")])
def test_gate_runs_with_no_generated_examples(tmp_path, counts):
    assert main(["--baseline", "sim", "--candidate", "sim", "--examples", counts[0], "--set-examples", counts[1],
                 "--out", str(tmp_path)]) == 0
    assert (tmp_path / "summary.md").read_text().count("corpus") == 0  # the summary counts, it names no case
    assert len((tmp_path / "facts.csv").read_text().splitlines()) > 1


def test_gate_refuses_a_negative_count(tmp_path, capsys):
    assert main(["--baseline", "sim", "--candidate", "sim", "--examples", "-1", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("gate: --examples")


def test_gate_writes_the_smallest_differing_case_when_not_shrinking(tmp_path):
    assert main(["--baseline", "sim:profile=v1", "--candidate", "sim:profile=merged", "--examples", "3",
                 "--set-examples", "0", "--shrink-examples", "0", "--out", str(tmp_path)]) == 1
    source = (tmp_path / "reproducer.c").read_text()
    assert ".percpu" in source and "Smallest differing case" in (tmp_path / "summary.md").read_text()


# -- the shrunk reproducer -----------------------------------------------------------------------------------------

class CutPercpuNames:
    """A candidate with the seeded regression of corpus/gate/percpu-map-name-regression.patch: a per-CPU map's
    bpf_map__name is its kernel-visible name (15 characters), so only long section names differ."""

    def __init__(self, inner, config: str) -> None:  # noqa: ANN001 - a suites.backends.Backend
        self.inner, self.config = inner, config

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.inner, name)

    def observe(self, compiled, runs, initial_values=None):  # noqa: ANN001, ANN201
        doc = self.inner.observe(compiled, runs, initial_values)
        for m in doc["maps"]:
            if m["type"] == "percpu_array" and m["name"]:
                m["name"] = m["name"][:15]
        return doc


@pytest.fixture
def cut_names(monkeypatch, tmp_path) -> str:
    """The candidate configuration `sim:cut=1` builds a simulator with the regression; failure bundles in tmp."""
    import suites.backends

    real = suites.backends.from_config

    def from_config(text: str, defaults=None):  # noqa: ANN001, ANN202
        if text == "sim:cut=1":
            return CutPercpuNames(real("sim", defaults), text)
        return real(text, defaults)

    monkeypatch.setattr(suites.backends, "from_config", from_config)
    monkeypatch.setenv("PERCPU_FAILURES", str(tmp_path / "failures"))
    return "sim:cut=1"


def test_gate_shrinks_a_difference_to_a_smaller_reproducer_that_replays(cut_names, tmp_path, capsys):
    out = tmp_path / "out"
    # the first 13 sample models hold at least one with a long per-CPU section name (which ones depends on the
    # modules loaded before: Hypothesis mixes constants of loaded local modules into its draws)
    assert main(["--baseline", "sim", "--candidate", cut_names, "--examples", "13", "--set-examples", "0",
                 "--shrink-examples", "30", "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    summary = (out / "summary.md").read_text()
    assert "Shrunk reproducer (from " in summary and "```c" in printed
    shrunk = (out / "reproducer.c").read_text()
    smallest = int(summary.split(" in the smallest differing case")[0].rsplit("against ", 1)[1])
    assert len(shrunk.splitlines()) <= smallest
    assert shrunk.count("SEC(\".percpu.looooooooong\")") == 1  # what the difference needs
    assert " SEC(\".data" not in shrunk and " SEC(\".bss" not in shrunk and "prog1" not in shrunk
    bundle = Path(printed.split("Replay: python -m suites.gate --replay ")[1].split()[0])
    assert {"model.json", "global.c", "expected.json", "observed.json", "diff.txt", "meta.json"} <= {
        p.name for p in bundle.iterdir()}
    assert (bundle / "global.c").read_text() == shrunk
    assert (bundle / "replay.txt").read_text().startswith("python -m suites.gate --replay ")
    assert main(["--replay", str(bundle)]) == 1
    assert "reproduced: " in capsys.readouterr().out
    # the same bundle against a candidate without the regression: nothing to reproduce
    meta = json.loads((bundle / "meta.json").read_text())
    meta["gate"]["candidate"] = "sim"
    (bundle / "meta.json").write_text(json.dumps(meta))
    assert main(["--replay", str(bundle)]) == 0


def test_gate_shrinking_is_bounded_and_can_be_off(cut_names, tmp_path):
    out = tmp_path / "out"
    args = ["--baseline", "sim", "--candidate", cut_names, "--examples", "13", "--set-examples", "0", "--out",
            str(out)]
    assert main([*args, "--shrink-examples", "0"]) == 1
    assert "Shrunk" not in (out / "summary.md").read_text()
    assert main([*args, "--shrink-examples", "3"]) == 1
    assert "; 3 model(s) observed in " in (out / "summary.md").read_text()


def test_gate_replay_refuses_a_bundle_in_one_line(tmp_path, capsys):
    (tmp_path / "meta.json").write_text('{"check": "maps"}')
    assert main(["--replay", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a readable gate bundle" in err


# -- libbpf built from a tree, with stand-in Makefiles (no real build) --------------------------------------------

STANDIN_MAKEFILE = """\
all:
\tprintf 'int libbpf_major_version(void) { return 1; }\\nint v = VALUE;\\n' > $(OUTPUT)v.c
\tgcc -shared -fPIC -o $(OUTPUT)libbpf.so.1.8.0 $(OUTPUT)v.c
"""
PATCH = """\
--- a/Makefile
+++ b/Makefile
@@ -1,2 +1,2 @@
 all:
-\tprintf 'int libbpf_major_version(void) { return 1; }\\nint v = VALUE;\\n' > $(OUTPUT)v.c
+\tprintf 'int libbpf_major_version(void) { return 1; }\\nint v = VALUE + 1;\\n' > $(OUTPUT)v.c
"""


@pytest.fixture
def standin_tree(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(provision.CACHE_ENV, str(tmp_path / "cache"))
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "Makefile").write_text(STANDIN_MAKEFILE.replace("VALUE", "1"))
    return tree


def test_src_builds_a_patched_copy_once(standin_tree, tmp_path):
    patch = tmp_path / "fix.patch"
    patch.write_text(PATCH.replace("VALUE", "1"))
    plain = Path(resolve_libbpf(f"src:{standin_tree}"))
    patched = Path(resolve_libbpf(f"src:{standin_tree}", str(patch)))
    assert plain.name == patched.name == "libbpf.so.1.8.0" and plain != patched
    assert "v = 1 + 1" in (patched.parent / "v.c").read_text() and "v = 1;" in (plain.parent / "v.c").read_text()
    assert "+ 1" not in (standin_tree / "Makefile").read_text()  # the tree itself is left alone
    stamp = patched.stat().st_mtime_ns
    assert Path(resolve_libbpf(f"src:{standin_tree}", str(patch))) == patched  # cached: not built again
    assert patched.stat().st_mtime_ns == stamp


def test_src_builds_a_standalone_libbpf_in_src(standin_tree):
    standalone = standin_tree.parent / "libbpf-standalone"
    (standalone / "src").mkdir(parents=True)
    (standin_tree / "Makefile").rename(standalone / "src" / "Makefile")
    assert Path(resolve_libbpf(f"src:{standalone}")).name == "libbpf.so.1.8.0"


@pytest.mark.parametrize(("spec", "patch", "kind", "words"), [
    ("src:{tree}/missing", None, "usage", "no such directory"),
    ("src:{tmp}", None, "usage", "no Makefile"),
    ("src:{tree}", "{tmp}/none.patch", "usage", "no such file"),
    ("stack", "{tmp}/x.patch", "usage", "src:DIR build only"),
    ("debian:not a version", None, "usage", "want an upstream version"),
    ("src:{tree}", "{tmp}/bad.patch", "build", "does not apply"),
    ("src:{failing}", None, "build", "failed (exit 2)"),
])
def test_resolve_errors_are_one_line_with_a_kind(standin_tree, tmp_path, spec, patch, kind, words):
    (tmp_path / "bad.patch").write_text(PATCH.replace("VALUE", "7"))
    (tmp_path / "failing").mkdir()
    (tmp_path / "failing" / "Makefile").write_text("all:\n\t@echo 'libbpf.c:1: error: stand-in' >&2; false\n")
    fill = {"tree": standin_tree, "tmp": tmp_path / "empty", "failing": tmp_path / "failing"}
    (tmp_path / "empty").mkdir()
    with pytest.raises(LibbpfSourceError) as refused:
        resolve_libbpf(spec.format(**fill), patch.format(tmp=tmp_path) if patch else None)
    assert refused.value.kind == kind and words in str(refused.value) and "\n" not in str(refused.value)


def test_gate_exit_codes_by_what_failed(standin_tree, tmp_path, capsys):
    (tmp_path / "bad.patch").write_text(PATCH.replace("VALUE", "7"))
    args = ["--candidate", "sim", "--out", str(tmp_path / "out")]
    assert main(["--baseline", f"kernel:libbpf=src:{standin_tree},patch={tmp_path}/bad.patch", *args]) == 8
    assert main(["--baseline", "vm:libbpf=src:/nonexistent", *args]) == 2


def test_debian_download_failure_is_kind_download(standin_tree, monkeypatch):
    monkeypatch.setattr(provision, "system_debian_archive", lambda: None)
    with pytest.raises(LibbpfSourceError) as refused:
        libbpf_source.build_from_debian("1.7.0")
    assert refused.value.kind == "download"


# -- nightly's progress and summary (a short budget on the simulator) ------------------------------------------------

def test_nightly_shows_progress_and_ends_with_the_new_failures(tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "PERCPU_FAILURES": str(tmp_path / "failures"),
           "PERCPU_REPORTS": str(tmp_path / "reports")}
    # a simulator without the per-CPU rewrite: the runtime property fails on its first examples
    done = subprocess.run([sys.executable, "-m", "suites.nightly", "--budget", "20", "--progress-every", "4",
                           "--database", str(tmp_path / "db"), "--backend", "sim", "--sim-profile",
                           "merged-norewrite", "-k", "per_cpu_contents_after_runs", "-x"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stdout.splitlines() if line.startswith("nightly: ")]
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert any(" examples (" in line and "properties covered 1/1" in line and "s left" in line for line in lines)
    assert "round 1 ended: " in done.stdout
    summary = done.stdout.split("new failure bundle(s):")[1]
    assert "runtime on sim, " in summary and "replay: python -m suites.replay " in summary
    assert not list((tmp_path / "db").glob("progress.json*"))  # the progress file is not left in the database


def test_the_gate_compares_the_skeleton_life_cycle_of_both_configurations(tmp_path):
    """Both configurations run the same fixed plan; a differing fact is reported under skeleton.*, the
    harness's own paths and texts never are."""
    from types import SimpleNamespace

    from corpus.selftest import selftest_model
    from suites import gate
    from toolchain.clang import Clang

    def backend(writable: bool, where: str):
        def observe_skeleton(compiled, plan):
            assert plan.resize and plan.iterate_section in plan.writes  # the corpus case: upstream's resize
            return {"harness": "compiles", "harness_dir": where, "open": True,
                    "maps": {".percpu": {"image_writable_loaded": writable}}}
        return SimpleNamespace(loader="libbpf", observe_skeleton=observe_skeleton)

    clang = Clang.find(None)
    model = selftest_model()
    same = gate._skeleton_pair(clang, backend(False, "/a"), backend(False, "/b"), model, True)
    assert same is not None and same.ok
    cmp = gate._skeleton_pair(clang, backend(False, "/a"), backend(True, "/b"), model, True)
    assert cmp is not None and [d.field for d in cmp.divergences] == ["skeleton.maps..percpu.image_writable_loaded"]
    assert [c for c, _, resize in gate._skeleton_cases([("corpus:selftest", model), ("sample:0", model)], 1)
            if resize] == ["skeleton:corpus:selftest"]
