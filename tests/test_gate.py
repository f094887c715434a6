"""The gate exits 1 on a real behaviour change and names it; 0 for a configuration against itself."""

from __future__ import annotations

import csv

from suites.gate import main


def test_gate_lists_the_v1_naming_difference(tmp_path, capsys):
    assert main(["--baseline", "sim:profile=v1", "--candidate", "sim:profile=merged", "--examples", "3",
                 "--out", str(tmp_path)]) == 1
    summary = (tmp_path / "summary.md").read_text()
    assert "`maps[.percpu].name`" in summary and "`maps[.percpu].kernel_name`" in summary
    rows = list(csv.DictReader((tmp_path / "facts.csv").read_text().splitlines()))
    assert {r["config"] for r in rows} == {"sim:profile=v1", "sim:profile=merged"}


def test_gate_passes_a_configuration_against_itself(tmp_path):
    assert main(["--baseline", "sim:profile=merged", "--candidate", "sim:profile=merged", "--examples", "3",
                 "--out", str(tmp_path)]) == 0


def test_gate_refuses_an_unknown_configuration(tmp_path, capsys):
    assert main(["--baseline", "bogus", "--candidate", "sim", "--out", str(tmp_path)]) == 2
    assert "unknown configuration 'bogus'" in capsys.readouterr().err
