"""The ``normkit`` command: help for every subcommand, exit codes and messages, the console script,
torchrun."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from normkit.cli import main
from normkit.lab.data import write_cifar10_batches

SUBCOMMANDS = ["compare", "power", "lr-sweep", "landscape", "report"]
TINY = ["--limit-train", "32", "--limit-test", "16", "--quiet", "--threads", "1", "--device", "cpu"]


def _run(args: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, env=env, **kw
    )


@pytest.mark.parametrize("sub", [None, *SUBCOMMANDS])
def test_help(sub: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([*([sub] if sub else []), "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: normkit")
    if sub in ("compare", "power", "lr-sweep", "landscape"):
        assert "--out DIR" in out and "--quiet" in out and "--data" in out


def test_compare_prints_the_table_and_writes_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "compare",
            "--norms",
            "bn,ln+pn",
            "--batch-sizes",
            "8,4",
            "--seeds",
            "0",
            "--epochs",
            "1",
            "--max-steps",
            "2",
            "--jobs",
            "1",
            "--out",
            str(tmp_path),
            *TINY,
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "| norm | B=8 | B=4 |" in out and "run folder:" in out
    (run,) = tmp_path.iterdir()
    assert (run / "summary.md").is_file() and (run / "error_vs_batch.png").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compare", "--data", "cifar10:/no/such/folder"], "does not exist"),
        (["power", "--data", "cifar10:/no/such/folder"], "does not exist"),
        (["compare", "--norms", "bn,batchnorm"], "unknown norm 'batchnorm'; registered norms:"),
        (["report", "--runs-root", "/no/such/runs"], "is not a folder"),
    ],
)
def test_errors_exit_2_with_a_clear_message(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = [] if args[0] == "report" else ["--out", str(tmp_path), *TINY]
    with pytest.raises(SystemExit) as e:
        main([*args, *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"normkit {args[0]}: error: ") and message in err


def test_corrupt_cifar_exits_nonzero_in_a_real_process(tmp_path: Path) -> None:
    write_cifar10_batches(tmp_path / "c", n_train=4, n_test=2, num_batches=1)
    (tmp_path / "c" / "test_batch").write_bytes(b"garbage")
    proc = _run(
        [
            "normkit.cli",
            "compare",
            "--data",
            f"cifar10:{tmp_path / 'c'}",
            "--out",
            str(tmp_path / "runs"),
            *TINY,
        ]
    )
    assert proc.returncode == 2
    assert "is not a CIFAR-10 python batch" in proc.stderr and "Traceback" not in proc.stderr


def test_compare_on_cifar_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_cifar10_batches(tmp_path / "c", n_train=24, n_test=8, num_batches=2)
    main(
        [
            "compare",
            "--data",
            f"cifar10:{tmp_path / 'c'}",
            "--models",
            "cnn4,resnet",
            "--norms",
            "gn:4+pn,in",
            "--batch-sizes",
            "4",
            "--seeds",
            "0",
            "--epochs",
            "1",
            "--max-steps",
            "2",
            "--out",
            str(tmp_path / "runs"),
            "--jobs",
            "1",
            "--quiet",
            "--threads",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert "## resnet" in capsys.readouterr().out


def test_torchrun_two_process_gloo_smoke(tmp_path: Path) -> None:
    """Data-parallel compare under torchrun: 2 processes on gloo (about 15 s here)."""
    proc = _run(
        [
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "normkit.cli",
            "compare",
            "--norms",
            "bn,gn:8",
            "--batch-sizes",
            "4",
            "--seeds",
            "0",
            "--epochs",
            "1",
            "--max-steps",
            "2",
            "--out",
            str(tmp_path),
            *TINY,
        ],
        timeout=600,
    )  # a bound for a hung run, not a timing
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = tmp_path.iterdir()  # only rank 0 writes
    env = json.loads((run / "env.json").read_text())
    assert env["world_size"] == 2
    finals = [
        json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"final"' in line
    ]
    assert len(finals) == 2 and all(r["steps"] == 2 for r in finals)
    assert proc.stdout.count("run folder:") == 1


def _interrupted_compare(
    tmp_path: Path, presses: int
) -> tuple[subprocess.CompletedProcess[str], float, Path, int]:
    """Start ``compare --jobs 2`` as a terminal would (own process group, Ctrl-C's default action), press
    Ctrl-C once the first training is on disk, ``presses`` times 0.3 s apart; return the process, seconds
    from the first press to its exit, the run folder and the process group (for checking that no worker
    outlives it)."""
    import signal

    from tests.interrupt import compare_command, interrupt_compare

    out = tmp_path / "runs"
    cmd = compare_command(
        out,
        *(
            "--jobs",
            "2",
            "--norms",
            "bn,gn:8",
            "--batch-sizes",
            "8",
            "--seeds",
            ",".join(map(str, range(12))),
        ),
        *("--epochs", "3", "--limit-train", "256", "--limit-test", "64"),
    )
    return interrupt_compare(cmd, out, signal.SIGINT, presses, 0.3, group=True)


def _group_gone(pgid: int, within: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("presses", [1, 2], ids=["one-ctrl-c", "two-ctrl-c"])
def test_ctrl_c_stops_compare_workers_and_keeps_finished_trainings(tmp_path: Path, presses: int) -> None:
    proc, elapsed, run, pgid = _interrupted_compare(tmp_path, presses)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert elapsed < 10.0  # generous: it stops in well under a second here
    # (torch's own log lines aside: a CUDA build of torch on a machine without CUDA logs one per process
    # when its extension loader is imported, "No CUDA runtime is found")
    lines = [
        ln for ln in proc.stderr.strip().splitlines() if not re.match(r"[WIE]\d{4} [\d:.]+ +\d+ \S+\] ", ln)
    ]
    assert len(lines) == 1 and lines[0].startswith("normkit compare: interrupted") and str(run) in lines[0], (
        proc.stderr
    )
    assert "Traceback" not in proc.stderr
    assert _group_gone(pgid), "a worker process outlived the interrupted run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    finals = [r for r in rows if r["kind"] == "final"]
    # the one line counts the finished trainings: exactly those are on disk, each once, and not all 24 ran
    reported = re.search(r"interrupted; (\d+) of 24 trainings finished", lines[0])
    assert reported is not None, lines[0]
    assert len(finals) == int(reported.group(1)) < 24
    assert len({(f["norm"], f["seed"]) for f in finals}) == len(finals)
    for f in finals:  # every finished training is on disk whole: its 3 epochs, then its final line
        epochs = [
            r for r in rows if r["kind"] == "epoch" and (r["norm"], r["seed"]) == (f["norm"], f["seed"])
        ]
        assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert not (run / "summary.md").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["compare", "--norms", "bn,gn:3"],
            "--norms 'gn:3' does not fit cnn4-head: GroupNorm: num_channels (32) must be divisible by "
            "num_groups (3)",
        ),
        (
            ["compare", "--batch-sizes", "1000000"],
            "--batch-sizes 1000000: 1000000 exceeds the 32 training samples of digits",
        ),
        (["compare", "--weight-decay", "-1"], "--weight-decay must be >= 0, got -1"),
        (["compare", "--momentum", "5"], "--momentum must be < 1, got 5"),
        (["compare", "--warmup-epochs", "-1"], "--warmup-epochs must be >= 0, got -1"),
        (["compare", "--lr", "nan"], "--lr must be a finite number, got nan"),
        (["compare", "--lr", "1e6"], "--lr must be <= 100, got 1e+06"),
        (["compare", "--seeds", "-1"], "--seeds must be >= 0, got -1"),
        (["compare", "--models", "vgg"], "--models must be one of cnn4-head, cnn4, resnet, got 'vgg'"),
        (
            ["compare", "--data", "digits100000"],
            "--data 'digits100000': the image size must be 8..64, got 100000",
        ),
        (["compare", "--jobs", "0"], "--jobs must be >= 1, got 0"),
        (["lr-sweep", "--mlp-steps", "-1"], "--mlp-steps must be >= 0, got -1"),
        (["lr-sweep", "--unit", "100"], "--unit must be <= 99, got 100"),
        (["lr-sweep", "--norms", "none"], "lr-sweep compares a baseline with at least one norm"),
        (["lr-sweep", "--norms", "none,in"], "--norms 'in' does not fit MLP-3"),
        (["lr-sweep", "--skip-cnn", "--mlp-steps", "0"], "leaves nothing to run"),
        (
            ["lr-sweep", "--skip-cnn", "--mlp-batch-size", "64"],
            "--mlp-batch-size 64 exceeds the 32 training samples",
        ),
        (["power", "--norms", "gn:3"], "--norms 'gn:3' does not fit RandNet (width 64)"),
        (["power", "--samples", "100"], "--samples 100 exceeds the 32 samples of digits16"),
        (["power", "--depth", "0"], "--depth must be >= 1, got 0"),
        (["landscape", "--eta-min", "0.5", "--eta-max", "0.4"], "--eta-min 0.5 must be <= --eta-max 0.4"),
        (["landscape", "--norms", "none,gn:5"], "--norms 'gn:5' does not fit the VGG-ish net (width 32)"),
        (["landscape", "--batch-size", "64"], "--batch-size 64 exceeds the 32 training samples of digits"),
        (["landscape", "--threads", "0"], "--threads must be >= 1, got 0"),
    ],
)
def test_every_setting_is_checked_before_any_work(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        main([args[0], "--out", str(out), *TINY, *args[1:]])  # the case's options last: they override TINY's
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"normkit {args[0]}: error: ") and message in err, err
    assert not out.exists() or not any(out.iterdir())  # no stub run folder


@pytest.mark.parametrize("flag, value", [("--jobs", "abc"), ("--threads", "2.5")])
def test_a_count_that_is_not_a_number_says_what_it_expects(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """It said "invalid parse_auto_int value", naming an internal function."""
    with pytest.raises(SystemExit) as e:
        main(["compare", flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "parse_auto_int" not in err
    assert f"argument {flag}: expected a whole number or 'auto', got '{value}'" in err


@pytest.mark.parametrize("sub", ["compare", "power", "lr-sweep", "landscape", "report"])
def test_an_unwritable_out_is_one_line_before_any_work(sub: str, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "runs"
    args = (
        ["--runs-root", str(tmp_path), "--out", str(out)] if sub == "report" else ["--out", str(out), *TINY]
    )
    if sub == "report":
        (tmp_path / "x-1").mkdir()
        (tmp_path / "x-1" / "config.json").write_text("{}")
        (tmp_path / "x-1" / "summary.md").write_text("# x\n")
    proc = _run(["normkit.cli", sub, *args])
    assert proc.returncode == 2
    assert (
        proc.stderr.count("\n") == 1
        and "is a file, not a folder" in proc.stderr
        and "Traceback" not in proc.stderr
    )


def test_repeated_settings_run_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(
        [
            "compare",
            "--norms",
            "gn:8,GN:8",
            "--batch-sizes",
            "4,4",
            "--seeds",
            "0,0",
            "--epochs",
            "1",
            "--max-steps",
            "1",
            "--jobs",
            "1",
            "--out",
            str(tmp_path),
            *TINY,
        ]
    )
    (run,) = tmp_path.iterdir()
    finals = [
        json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"final"' in line
    ]
    assert [(r["norm"], r["batch_size"], r["seed"]) for r in finals] == [("gn:8", 4, 0)]


def test_a_diverging_training_reads_diverged_not_an_error_rate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(
        [
            "compare",
            "--norms",
            "gn:8",
            "--batch-sizes",
            "8,4",
            "--seeds",
            "0",
            "--epochs",
            "1",
            "--lr",
            "100",
            "--jobs",
            "1",
            "--out",
            str(tmp_path),
            *TINY,
        ]
    )
    out = capsys.readouterr().out
    (run,) = tmp_path.iterdir()
    finals = [
        json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"final"' in line
    ]
    assert len(finals) == 2 and all(r["diverged"] for r in finals)
    assert (
        "| gn:8 | diverged (1/1 seeds) | diverged (1/1 seeds) |" in out
        and "**Warning**: 2 training(s) diverged" in out
    )
    assert "E1 (ii): gn:8 at B=4 within ±1.5 pt of B=8: **n/a**" in out


def test_an_interrupted_call_leaves_ctrl_c_as_it_was(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # main() called in-process (a notebook, a test): after its "interrupted" line and exit status 130,
    # Ctrl-C's handler is the caller's again (an ignored SIGINT would also be inherited by child processes)
    import signal

    import normkit.cli as cli

    def interrupted(*args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run", interrupted)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as e:
        main(["power", "--out", str(tmp_path), "--quiet"])
    assert e.value.code == 130
    assert signal.getsignal(signal.SIGINT) is before


def _fake_run(root: Path, name: str = "x-1") -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text('{"experiment": "x"}')
    (run / "summary.md").write_text("# x\n")
    return run


def test_report_creates_its_out_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fake_run(tmp_path / "runs")
    out = tmp_path / "new" / "reports"
    assert main(["report", "--runs-root", str(tmp_path / "runs"), "--out", str(out)]) == 0
    assert (out / "report.md").is_file() and (out / "report.html").is_file()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc (a folder nothing can be made in)")
@pytest.mark.parametrize("sub", ["compare", "power", "lr-sweep", "landscape", "reproduce", "report"])
def test_an_out_that_cannot_be_created_is_one_line_before_any_work(
    sub: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = "/proc/normkit-no-such-folder/runs"
    if sub == "report":
        args = ["--runs-root", str(_fake_run(tmp_path).parent), "--out", out]
    else:
        args = ["--out", out, *TINY] + (["--results", str(tmp_path / "R.md")] if sub == "reproduce" else [])
    with pytest.raises(SystemExit) as e:
        main([sub, *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"normkit {sub}: error: --out '{out}': "), err
    what = "the report's folder" if sub == "report" else "the runs folder"
    assert f"cannot create {what} '{out}': no folder can be made in '/proc'" in err
    assert not (tmp_path / "R.md").exists()


def test_report_names_the_skipped_unfinished_run_and_its_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import normkit.lab.experiments.compare as compare

    train_one, calls = compare._train_one, []

    def ctrl_c_on_the_second(*args: object, **kw: object) -> object:  # Ctrl-C during the 2nd training
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return train_one(*args, **kw)

    monkeypatch.setattr(compare, "_train_one", ctrl_c_on_the_second)
    runs = tmp_path / "runs"
    args = ["--norms", "bn,gn:8", "--batch-sizes", "8", "--seeds", "0", "--epochs", "1", "--max-steps", "1"]
    with pytest.raises(SystemExit) as e:
        main(["compare", *args, "--jobs", "1", "--out", str(runs), *TINY])
    assert e.value.code == 130
    assert "interrupted; 1 of 2 trainings finished" in capsys.readouterr().err
    (run,) = runs.iterdir()
    manifest = json.loads((run / "manifest.json").read_text())
    assert (manifest["status"], manifest["done"], manifest["total"]) == ("interrupted", 1, 2)
    with pytest.raises(SystemExit) as e:
        main(["report", "--runs-root", str(runs)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 unfinished run(s) skipped" in err, err
    assert f"{run.name}: interrupted, 1 of 2 trainings finished" in err and "--all" in err
    assert str(run) in err  # how to report it: its folder
    assert main(["report", "--runs-root", str(runs), "--all"]) == 0
    assert "1 of 2 trainings finished" in (runs / "report.md").read_text()


def test_version_and_python_dash_m(capsys: pytest.CaptureFixture[str]) -> None:
    """``normkit --version`` and ``python -m normkit`` (neither existed: "the following arguments are
    required: COMMAND", "No module named normkit.__main__")."""
    import subprocess
    import sys

    import normkit

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"normkit {normkit.__version__}"
    out = subprocess.run(
        [sys.executable, "-m", "normkit", "--version"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == f"normkit {normkit.__version__}", out.stderr
