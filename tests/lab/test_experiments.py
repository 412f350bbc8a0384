"""Two-step smoke runs of every experiment on a handful of samples, determinism, and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch import nn

import normkit
from normkit.lab.experiments.compare import CompareConfig, e1_criteria, e3_criteria, run_compare
from normkit.lab.experiments.landscape import LandscapeConfig, run_landscape
from normkit.lab.experiments.lr_sweep import LRSweepConfig, run_lr_sweep
from normkit.lab.experiments.power import PowerConfig, run_power
from normkit.lab.records import read_metrics
from normkit.lab.report import write_report

TINY = {"limit_train": 32, "limit_test": 16, "quiet": True, "device": "cpu", "threads": 1}


def _compare(out: Path, **kw) -> Path:
    """A tiny ``run_compare`` (two steps per run) into ``out``; ``kw`` overrides any setting."""
    base = dict(norms=["bn", "gn:8", "ln+pn"], batch_sizes=[8, 4], seeds=[0], epochs=2, max_steps=2, jobs=1)
    cfg = CompareConfig(**{**base, "out": str(out), **TINY, **kw})
    outcome = run_compare(cfg)
    assert outcome.path is not None
    return outcome.path


def test_compare_smoke_writes_a_complete_record(tmp_path: Path) -> None:
    path = _compare(tmp_path)
    for name in (
        "config.json",
        "env.json",
        "metrics.jsonl",
        "results.json",
        "summary.md",
        "timing.json",
        "error_vs_batch.png",
        "curves.png",
    ):
        assert (path / name).is_file(), name
    rows = read_metrics(path)
    finals = [r for r in rows if r["kind"] == "final"]
    assert len(finals) == 6 and all(r["steps"] == 2 for r in finals)
    assert all("test_err_batch_stats" in r for r in finals if r["norm"] == "bn")
    summary = (path / "summary.md").read_text()
    assert "| bn (batch stats) |" in summary and "E1 (i)" in summary and "B=8" in summary
    cfg = json.loads((path / "config.json").read_text())
    assert (
        cfg["experiment"] == "compare"
        and cfg["norms"] == ["bn", "gn:8", "ln+pn"]
        and cfg["warmup_epochs"] == 1.0
    )


def test_compare_same_seed_same_files(tmp_path: Path) -> None:
    a = _compare(tmp_path / "a")
    b = _compare(tmp_path / "b")
    for name in ("metrics.jsonl", "results.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_compare_worker_processes_give_the_same_numbers(tmp_path: Path) -> None:
    kw = {
        "norms": ["bn", "ln+pn"],
        "batch_sizes": [4],
        "seeds": [0, 1],
        "epochs": 1,
        "max_steps": 2,
        "out": None,
    }
    one = run_compare(CompareConfig(**{**kw, "out": str(tmp_path / "one"), "jobs": 1}, **TINY)).path
    two = run_compare(
        CompareConfig(**{**kw, "out": str(tmp_path / "two"), "jobs": 2}, **TINY)
    ).path  # 1 thread each
    assert one is not None and two is not None
    assert (one / "metrics.jsonl").read_bytes() == (two / "metrics.jsonl").read_bytes()


def test_compare_never_starts_more_workers_than_runs() -> None:
    """--jobs 500 for 3 runs starts 3 workers (each would import torch before finding no run to take:
    a few hundred of them exhaust the memory), and says so; without --jobs, one per usable core."""
    import os

    import torch

    from normkit.lab.experiments.compare import _parallelism

    cpu = torch.device("cpu")
    jobs, threads, why = _parallelism(CompareConfig(jobs=500), 1, cpu, 3)
    assert (jobs, threads) == (3, 1) and "capped at the 3 run(s)" in why
    assert _parallelism(CompareConfig(jobs=2), 1, cpu, 3)[:2] == (2, 1)
    assert _parallelism(CompareConfig(), 1, cpu, 1000)[0] == len(os.sched_getaffinity(0))


def test_compare_rejects_bad_configs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown norm 'xn'"):
        run_compare(CompareConfig(norms=["xn"], out=str(tmp_path)))
    with pytest.raises(ValueError, match="--models must be one of cnn4-head, cnn4, resnet, got .vgg."):
        run_compare(CompareConfig(models=["vgg"], out=str(tmp_path)))
    assert not list(tmp_path.iterdir())  # nothing written for a rejected config


def _row(norm: str, b: int, err: float) -> dict:
    """One aggregate row of model "m" (no spread over seeds)."""
    return {"model": "m", "norm": norm, "batch_size": b, "test_err_mean": err, "test_err_std": 0.0}


def test_e1_criteria_arithmetic() -> None:
    agg = [
        _row("bn", 32, 0.5),
        _row("bn", 2, 20.0),
        _row("gn:8", 32, 1.0),
        _row("gn:8", 2, 1.5),
        _row("ln+pn", 32, 1.0),
        _row("ln+pn", 2, 3.0),
    ]
    got = {(c["name"], c["text"].split()[0]): c["ok"] for c in e1_criteria(agg, "m")}
    assert got == {
        ("E1 (i)", "BN"): True,
        ("E1 (ii)", "gn:8"): True,
        ("E1 (ii)", "ln+pn"): False,
        ("E1 (iii)", "gn:8"): True,
    }


def test_bn2d_and_the_batch_dependent_norms_are_scored_as_bn() -> None:
    """``bn2d`` (the alias of ``bn``) gets BN's criteria, and no norm that depends on the batch (Ghost BN,
    Batch Renorm) is held to E1 (ii)'s batch independence (bn2d was scored as a batch-free norm)."""

    agg = [
        _row("bn2d", 32, 0.5),
        _row("bn2d", 2, 20.0),
        _row("gbn:4", 32, 0.6),
        _row("gbn:4", 2, 9.0),
        _row("brn", 32, 0.5),
        _row("brn", 2, 7.0),
        _row("gn:8", 32, 1.0),
        _row("gn:8", 2, 1.5),
        _row("ln+pn", 32, 1.2),
        _row("ln+pn", 2, 1.4),
    ]
    got = {(c["name"], c["text"].split()[0]): c["ok"] for c in e1_criteria(agg, "m")}
    assert got == {
        ("E1 (i)", "BN"): True,
        ("E1 (ii)", "gn:8"): True,
        ("E1 (ii)", "ln+pn"): True,
        ("E1 (iii)", "gn:8"): True,
    }
    e3 = [c["text"] for c in e3_criteria(agg, "m")]
    assert any(t.startswith("|LN+PN − BN| <= 1 pt") for t in e3), e3
    with pytest.raises(ValueError, match="batch size 1 cannot train BN"):
        CompareConfig(norms=["gbn:2"], batch_sizes=[1, 4]).validate()


def test_power_smoke(tmp_path: Path) -> None:
    path, summary = run_power(
        PowerConfig(
            depth=3,
            width=8,
            samples=16,
            trained=True,
            epochs=1,
            max_steps=2,
            batch_size=8,
            out=str(tmp_path),
            **TINY,
        )
    )
    rows = read_metrics(path)
    rand = [r for r in rows if r["net"] == "randnet"]
    assert len(rand) == 5 * 3 * 3  # norms x layers x sites
    for r in rand:
        assert sum(r[k] for k in ("P_mean", "P_varmean", "P_varstd", "P_meanstd")) == pytest.approx(
            1.0, abs=1e-9
        )
    assert {r["net"] for r in rows} == {"randnet", "cnn4-init", "cnn4-trained"}
    assert "IN: P_varmean = P_varstd = 0" in summary and (path / "power_post_norm.png").is_file()
    assert (path / "power_trained.png").is_file()


def test_lr_sweep_smoke(tmp_path: Path) -> None:
    path, summary = run_lr_sweep(
        LRSweepConfig(
            lrs=[0.01, 1e4],
            epochs=1,
            max_steps=2,
            eval_every=1,
            batch_size=8,
            mlp_steps=4,
            percentile_every=2,
            mlp_batch_size=8,
            out=str(tmp_path),
            **TINY,
        )
    )
    res = json.loads((path / "results.json").read_text())
    by = {(r["norm"], r["lr"]): r for r in res["cnn"]}
    assert by[("none", 1e4)]["diverged"]
    if not by[("none", 0.01)]["diverged"]:
        assert ("bn", 0.05) in by  # 5x the baseline's best LR was added to BN's grid
    assert len(res["mlp"]["bn"]["steps"]) == 3  # steps 0, 2, 4
    assert (
        "E2 (i)" in summary and (path / "mlp_percentiles.png").is_file() and (path / "lr_sweep.png").is_file()
    )


def test_landscape_smoke(tmp_path: Path) -> None:
    path, summary = run_landscape(
        LandscapeConfig(steps=2, every=1, etas=2, width=4, batch_size=8, out=str(tmp_path), **TINY)
    )
    rows = [r for r in read_metrics(path) if "kind" not in r]
    assert len(rows) == 4 and all(r["beta"] > 0 and r["loss_max"] >= r["loss_min"] for r in rows)
    assert "fixed-distance" in summary and (path / "landscape.png").is_file()


def test_landscape_marks_a_blown_up_net_diverged_and_its_criteria_na(tmp_path: Path) -> None:
    """At LR 100 both nets blow up within a few steps (the batch loss passes 100x its untrained value or
    becomes non-finite): results.json records where, the table says 'diverged at step k', the summary
    warns, and no criterion reads MET or NOT MET on a blown-up net's landscape."""
    path, summary = run_landscape(
        LandscapeConfig(lr=100.0, steps=12, every=4, etas=2, width=4, batch_size=8, out=str(tmp_path), **TINY)
    )
    final = json.loads((path / "results.json").read_text())["final"]
    for norm in ("none", "bn"):
        assert final[norm]["diverged"] and 0 <= final[norm]["diverged_at_step"] < 12
        assert f"diverged at step {final[norm]['diverged_at_step']}" in summary
    crit = json.loads((path / "results.json").read_text())["criteria"]
    assert [c["ok"] for c in crit] == [None, None]
    assert "**Warning**" in summary and "MET" not in summary


def test_landscape_at_a_sane_lr_marks_nothing_diverged(tmp_path: Path) -> None:
    path, summary = run_landscape(
        LandscapeConfig(lr=0.05, steps=4, every=2, etas=2, width=4, batch_size=8, out=str(tmp_path), **TINY)
    )
    res = json.loads((path / "results.json").read_text())
    assert not any(f["diverged"] for f in res["final"].values())
    assert all(c["ok"] in (True, False) for c in res["criteria"]) and "Warning" not in summary


def test_report_gathers_runs(tmp_path: Path) -> None:
    _compare(tmp_path)
    run_landscape(LandscapeConfig(steps=1, every=1, etas=1, width=4, batch_size=8, out=str(tmp_path), **TINY))
    md, html = write_report([], runs_root=tmp_path)
    text = md.read_text()
    assert "## compare: compare-" in text and "## landscape: landscape-" in text
    assert "](compare-" in text  # image links relative to the report
    page = html.read_text()
    assert page.count("data:image/png;base64,") >= 4 and "<table>" in page
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no runs"):
        write_report([], runs_root=tmp_path / "empty")


def test_report_never_lets_an_unfinished_run_replace_a_finished_one(tmp_path: Path) -> None:
    import os
    import time

    from normkit.lab.records import RunRecord

    done = _compare(tmp_path)
    stubs = []
    for status in ("interrupted", "failed", "running"):
        rec = RunRecord.create(tmp_path, "compare", {"norms": ["bn"]})
        if status != "running":
            rec.set_status(
                status,
                **({"done": 2, "total": 18} if status == "interrupted" else {"error": "ValueError: x"}),
            )
        later = time.time() + 10 + len(stubs)
        os.utime(rec.path / "config.json", (later, later))  # newer than the finished run
        stubs.append(rec.path)
    md, _ = write_report([], runs_root=tmp_path)
    text = md.read_text()
    assert f"## compare: {done.name}" in text and "E1 (i)" in text
    assert all(s.name not in text for s in stubs) and "did not finish" not in text
    md, _ = write_report([], runs_root=tmp_path, latest_only=False)
    text = md.read_text()
    assert f"## compare: {stubs[0].name} (interrupted)" in text and "2 of 18 trainings finished" in text
    assert f"## compare: {stubs[1].name} (failed)" in text and "ValueError: x" in text
    assert f"## compare: {stubs[2].name} (running)" in text
    env = json.loads((done / "env.json").read_text())
    assert f"CPU {env['cpu_model']}, {env['cpu_count']} cores" in text and f"numpy {env['numpy']}" in text


def test_configs_check_and_deduplicate() -> None:
    from normkit.lab.experiments._common import ConfigError

    cfg = CompareConfig(
        norms=["BN", "bn", "gn:8"], batch_sizes=[8, 8, 2], seeds=[1, 1], out="/tmp"
    ).validate()
    assert (cfg.norms, cfg.batch_sizes, cfg.seeds) == (["bn", "gn:8"], [8, 2], [1])
    with pytest.raises(ConfigError, match="batch size 1 cannot train BN"):
        CompareConfig(batch_sizes=[1], out="/tmp").validate()
    with pytest.raises(ConfigError, match="--etas must be >= 1, got 0"):
        LandscapeConfig(etas=0, out="/tmp").validate()
    with pytest.raises(ConfigError, match="--lrs must be > 0, got 0"):
        LRSweepConfig(lrs=[0.1, 0.0], out="/tmp").validate()
    with pytest.raises(ConfigError, match="--norms must list at least one value"):
        PowerConfig(norms=[], out="/tmp").validate()


def test_auto_threads_leave_busy_cores_alone_and_are_recorded(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys
    import time

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not 2 <= usable <= 8:
        pytest.skip(f"needs 2..8 usable cores to keep all but one busy, this machine has {usable}")
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(usable - 1)]
    try:
        time.sleep(1.0)
        path, _ = run_power(
            PowerConfig(depth=2, width=8, samples=16, out=str(tmp_path), **{**TINY, "threads": None})
        )
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    env = json.loads((path / "env.json").read_text())
    assert env["threads"] == 1 and env["parallelism"].startswith("auto: 1 free of")
    assert (
        json.loads((path / "config.json").read_text())["threads"] is None
    )  # the setting; env.json has the choice
    path, _ = run_power(
        PowerConfig(depth=2, width=8, samples=16, out=str(tmp_path), **{**TINY, "threads": 2})
    )
    env = json.loads((path / "env.json").read_text())
    assert env["threads"] == 2 and env["parallelism"] == "--threads 2"


def test_e1_criteria_with_one_batch_size_are_listed_as_not_measurable(tmp_path: Path) -> None:
    cfg = CompareConfig(
        norms=["bn", "gn:8", "ln+pn"],
        batch_sizes=[8],
        seeds=[0],
        epochs=1,
        max_steps=1,
        jobs=1,
        out=str(tmp_path),
        **TINY,
    )
    path = run_compare(cfg).path
    assert path is not None
    crit = json.loads((path / "results.json").read_text())["criteria"]["cnn4-head"]
    e1 = [c for c in crit if c["name"].startswith("E1")]
    assert [c["name"] for c in e1] == ["E1 (i)", "E1 (ii)", "E1 (ii)", "E1 (iii)"]
    assert all(c["ok"] is None and "needs two batch sizes, only B=8 was run" in c["detail"] for c in e1)
    summary = (path / "summary.md").read_text()
    assert "Pass criteria" in summary
    assert (
        "- E1 (i): BN error at the smallest B >= BN at the largest B + 3 pt: **n/a** (not measurable: "
        in summary
    )


def test_e2_i_is_not_decided_by_a_largest_stable_lr_that_is_only_a_lower_bound() -> None:
    from normkit.lab.experiments.lr_sweep import _cnn_criteria

    def runs(norm: str, diverged_from: float | None, top: float = 1.0) -> list[dict[str, object]]:
        return [
            {"norm": norm, "lr": lr, "diverged": diverged_from is not None and lr >= diverged_from}
            for lr in [0.01, 0.1, 1.0, 5.0]
            if lr <= top
        ]

    # none stable everywhere: its 1.0 is a lower bound, so bn's 5.0 >= 5 x 1.0 decides nothing
    (c,) = _cnn_criteria(runs("none", None) + runs("bn", None, 5.0), "none", ["bn"], None)
    assert c["ok"] is None and "none was stable at every learning rate tried; extend --lrs" in c["detail"]
    # none diverged at 1.0: its largest stable LR (0.1) is known, and bn's lower bound 5.0 passes 5 x 0.1
    (c,) = _cnn_criteria(runs("none", 1.0) + runs("bn", None, 5.0), "none", ["bn"], None)
    assert c["ok"] is True
    # none's 1.0 known (diverged at 5.0), bn stable everywhere up to 1.0: bn's bound decides nothing either
    (c,) = _cnn_criteria(runs("none", 5.0, 5.0) + runs("bn", None), "none", ["bn"], None)
    assert c["ok"] is None and "bn was stable at every learning rate tried" in c["detail"]
    # both known: a real NOT MET
    (c,) = _cnn_criteria(runs("none", 5.0, 5.0) + runs("bn", 5.0, 5.0), "none", ["bn"], None)
    assert c["ok"] is False


def _scaled_gn(c: int, arg: int | None, **kw) -> nn.Module:  # a user's norm (module level: picklable)
    return nn.GroupNorm(2, c, **kw)


def test_a_norm_the_user_registered_trains_in_the_worker_processes(tmp_path: Path) -> None:
    """A norm registered with register_norm is sent to the spawned workers (they start with normkit's own
    registry: it failed there with "unknown norm"), and gives the numbers it gives in-process; a factory
    that cannot be sent is refused before anything runs. Oracle: the same runs with jobs=1."""
    from normkit.lab.experiments._common import ConfigError
    from normkit.nn import registry

    saved = dict(registry._REGISTRY)
    try:
        normkit.register_norm("usergn", "GroupNorm(2, C), a user's norm")(_scaled_gn)

        def run(name: str, norms: list[str], jobs: int) -> Path:
            cfg = CompareConfig(
                norms=norms,
                batch_sizes=[8],
                seeds=[0],
                epochs=1,
                max_steps=2,
                jobs=jobs,
                out=str(tmp_path / name),
                **TINY,
            )
            path = run_compare(cfg).path
            assert path is not None
            return path

        finals = []
        for jobs in (1, 2):
            path = run(f"j{jobs}", ["bn", "usergn"], jobs)
            finals.append(
                sorted((r["norm"], r["test_err"]) for r in read_metrics(path) if r["kind"] == "final")
            )
        assert finals[0] == finals[1] and [n for n, _ in finals[0]] == ["bn", "usergn"]
        normkit.register_norm("userlocal")(lambda c, arg, **kw: nn.GroupNorm(2, c))
        with pytest.raises(ConfigError, match="userlocal registered in this process .* --jobs 1"):
            run("local", ["bn", "userlocal"], 2)  # (two runs: two workers)
        assert not (tmp_path / "local").exists()
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved)
