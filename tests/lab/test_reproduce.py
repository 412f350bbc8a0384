"""``normkit reproduce`` in its quick form: every step runs, RESULTS.md is written from the runs, notes are
kept."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from normkit.cli import main
from normkit.lab.records import read_manifest
from normkit.lab.reproduce import KEEP_MARKER, ReproduceConfig, plan, seed_noise_note


def test_reproduce_quick_writes_results_from_its_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "docs" / "RESULTS.md"
    results.parent.mkdir()
    results.write_text(f"# old\n\nold numbers\n\n{KEEP_MARKER}\n\nA hand-written note on SyncBN.\n")
    runs = tmp_path / "runs"
    assert (
        main(
            [
                "reproduce",
                "--quick",
                "--seeds",
                "2",
                "--out",
                str(runs),
                "--results",
                str(results),
                "--quiet",
                "--device",
                "cpu",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    text = results.read_text()
    assert "old numbers" not in text and text.rstrip().endswith("A hand-written note on SyncBN.")
    assert text.count(KEEP_MARKER) == 1 and "Quick smoke run" in text
    # the header's seed-noise numbers are this run's, the reference ones named as such
    assert "(sigma = 7.7 pt)" not in text and "reference values from full runs, not measured here" in text
    folders = sorted(p for p in runs.iterdir() if p.is_dir())
    assert len(folders) == 6 and all(read_manifest(p)["status"] == "finished" for p in folders)
    for p in folders:  # every run is in the file, with its verdicts as its results.json has them
        assert f"Run folder `{p.name}`" in text
        res = json.loads((p / "results.json").read_text())
        crit = res["criteria"]
        crit = [c for cs in crit.values() for c in cs] if isinstance(crit, dict) else crit
        section = text.split(f"Run folder `{p.name}`")[1].split("\n## ")[0]
        verdicts = re.findall(r"\*\*(MET|NOT MET|n/a)\*\*", section)
        expected = ["n/a" if c["ok"] is None else ("MET" if c["ok"] else "NOT MET") for c in crit]
        assert verdicts == expected, p.name
    env = json.loads((folders[0] / "env.json").read_text())
    assert f"CPU {env['cpu_model']}, {env['cpu_count']} cores" in text and f"torch {env['torch']}" in text
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and "model name" in cpuinfo.read_text():
        model = next(
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        )
        assert f"CPU {model}," in text
    links = re.findall(r"\]\((figures/[^)]+\.png)\)", text)
    assert "figures/e1_head_error_vs_batch.png" in links and "figures/e4_power_post_norm.png" in links
    assert all((results.parent / link).is_file() for link in links)
    for step in plan(ReproduceConfig(seeds=2, quick=True)):
        assert f"\n{step.command}\n" in text


def test_reproduce_checks_every_step_before_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main(
            [
                "reproduce",
                "--seeds",
                "1",
                "--out",
                str(tmp_path / "runs"),
                "--results",
                str(tmp_path / "R.md"),
            ]
        )
    assert e.value.code == 2 and "--seeds must be >= 2, got 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(
            [
                "reproduce",
                "--limit-train",
                "40",
                "--out",
                str(tmp_path / "runs"),
                "--results",
                str(tmp_path / "R.md"),
            ]
        )
    # compare (B=32) fits 40 samples; the 4th step, power (256 samples), does not: refused before the first
    # step runs
    assert e.value.code == 2 and "--samples 256 exceeds the 40 samples of digits16" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "R.md").exists()


def test_seed_noise_note_reads_the_runs_numbers_not_hard_coded_ones() -> None:
    def row(b: int, std: float) -> dict[str, object]:
        return {"model": "cnn4", "norm": "bn", "batch_size": b, "test_err_std": std, "diverged": 0}

    crit = {"cnn4": [{"name": "E1 (i)", "margin": 1.0}, {"name": "E1 (ii)", "margin": 0.1}]}
    note = seed_noise_note(2, [{"aggregate": [row(32, 0.2), row(2, 1.5)], "criteria": crit}])
    assert "in this run the widest spread at B=2 was sigma = 1.5 pt (cnn4 bn): 2 SE is 3.0 pt" in note
    assert "smallest margin of E1 (i) and (iii) here, 1.0 pt: this spread can decide them" in note
    assert "not measured here" in note
    one_seed = seed_noise_note(2, [{"aggregate": [row(2, float("nan"))], "criteria": {}}])
    assert "no spread over seeds was measured at B=2 in this run" in one_seed and "sigma =" not in one_seed
