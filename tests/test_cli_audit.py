"""An audit of the ``normkit`` command as a new user meets it: every subcommand with small settings,
bad arguments, output files, pipes, Ctrl-C and ``python -m normkit``.

The first group pins the defects the audit found (fixed since): each asserts the behaviour the
command should have. The others pin behaviour the audit checked and found right that the rest of
the suite does not cover. The whole file runs in well under a minute
on 2 CPU cores.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from normkit.cli import main
from tests.interrupt import start_in_own_group

TINY = ["--limit-train", "32", "--limit-test", "16", "--quiet", "--threads", "1", "--device", "cpu"]
# the smallest per-op benchmark that still measures something: one op, one shape, one provider
BENCH_TINY = [
    "bench",
    "--no-e2e",
    "--ops",
    "batch_norm",
    "--shapes",
    "2x4x2x2",
    "--dtypes",
    "fp32",
    "--layouts",
    "nchw",
    "--passes",
    "fwd",
    "--backends",
    "reference",
    "--repeats",
    "1",
    "--min-time",
    "0.01",
    "--threads",
    "1",
    "--quiet",
]
ANSI = re.compile(r"\x1b\[")


def _python_m(args: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **kw.pop("env", {})}
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=120, env=env, **kw
    )


def _exit(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int | str | None, str, str]:
    """``main(args)``'s exit status (returned or raised), stdout and stderr."""
    try:
        code: int | str | None = main(args)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _fake_run(root: Path, name: str = "x-1") -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text('{"experiment": "x"}')
    (run / "summary.md").write_text("# x\n\n| a |\n|---|\n| 1 |\n")
    return run


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny ``normkit compare`` in this process, progress bars on (not --quiet), stdout and stderr
    captured as a pipe or a file would take them (not a terminal)."""
    out = tmp_path_factory.mktemp("compare") / "runs"
    args = ["compare", "--norms", "bn,gn:8", "--batch-sizes", "8,4", "--seeds", "0", "--epochs", "1"]
    args += [
        "--max-steps",
        "1",
        "--jobs",
        "1",
        "--out",
        str(out),
        "--limit-train",
        "32",
        "--limit-test",
        "16",
    ]
    args += ["--threads", "1", "--device", "cpu"]
    saved = {
        k: os.environ.pop(k) for k in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE") if k in os.environ
    }
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(args)
    finally:
        os.environ.update(saved)
    (run,) = out.iterdir()
    return {"code": code, "out": stdout.getvalue(), "err": stderr.getvalue(), "run": run}


# ---- defects -------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--json", "--md"])
@pytest.mark.parametrize("where", ["missing-folder", "a-folder"])
def test_bench_output_path_that_cannot_be_written_is_a_one_line_error_before_measuring(
    flag: str, where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "no" / "such" / "out.json" if where == "missing-folder" else tmp_path
    code, out, err = _exit([*BENCH_TINY, flag, str(path)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("normkit bench: error: ") and flag in err, err
    assert "| batch_norm train |" not in out  # refused before measuring, not after


def test_bench_with_no_case_left_to_run_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["bench", "--no-e2e", "--ops", "group", "--shapes", "2x8x4x4", "--dtypes", "fp32"]
    args += ["--layouts", "nchw", "--passes", "fwd", "--quiet", "--json", str(tmp_path / "b.json")]
    code, _, err = _exit(args, capsys)
    # as for --no-ops --no-e2e ("nothing to run"), or --ops that matches no op
    assert code == 2 and err.startswith("normkit bench: error: "), err
    assert not (tmp_path / "b.json").exists()


def test_bench_quick_keeps_explicit_repeats_and_min_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "b.json"
    args = [*BENCH_TINY, "--quick", "--repeats", "2", "--min-time", "0.02", "--json", str(path)]
    code, _, err = _exit(args, capsys)
    if code == 2:  # refusing the combination is as good as honouring it
        assert "--repeats" in err or "--min-time" in err, err
        return
    data = json.loads(path.read_text())
    assert data["repeats"] == 2 and data["config"]["min_time"] == 0.02


@pytest.mark.parametrize("case", ["missing", "empty", "not-a-run"])
def test_report_error_line_has_one_prefix(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    args = {
        "missing": ["report", "--runs-root", str(tmp_path / "nope")],
        "empty": ["report", "--runs-root", str(tmp_path / "empty")],
        "not-a-run": ["report", str(tmp_path / "empty")],
    }[case]
    code, _, err = _exit(args, capsys)
    assert code == 2 and err.startswith("normkit report: error: ") and err.count("\n") == 1, err
    assert "error: report:" not in err


def test_report_lists_a_run_given_twice_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _fake_run(tmp_path / "runs")
    assert main(["report", str(run), str(run), "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert text.count("## x: x-1") == 1, text


@pytest.mark.parametrize("name", ["config.json", "manifest.json"])
def test_report_survives_a_run_file_that_is_not_a_json_object(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_run(tmp_path / "runs", "good-1")
    bad = _fake_run(tmp_path / "runs", "bad-1")
    (bad / name).write_text("[1]\n")
    try:
        code: int | str | None = main(["report", "--runs-root", str(tmp_path / "runs")])
    except SystemExit as e:  # a one-line refusal naming the folder is fine too
        code = e.code
        err = capsys.readouterr().err
        assert code == 2 and "bad-1" in err and err.count("\n") == 1, err
        return
    assert code == 0 and "good-1" in (tmp_path / "runs" / "report.md").read_text()


def test_a_closed_stdout_is_not_a_traceback(tmp_path: Path) -> None:
    _fake_run(tmp_path / "runs")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "normkit", "report", "--runs-root", str(tmp_path / "runs")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # the reader went away (head -1 after its line), before the command printed
    _, err = proc.communicate(timeout=120)
    assert (tmp_path / "runs" / "report.md").is_file()  # the work itself is done either way
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_reproduce_unwritable_results_names_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("not a folder")
    results = tmp_path / "file" / "RESULTS.md"
    args = ["reproduce", "--quick", "--results", str(results), "--out", str(tmp_path / "runs"), *TINY]
    code, _, err = _exit(args, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "--results" in err and "--out" not in err and "runs folder" not in err, err
    assert not (tmp_path / "runs").exists()


def test_reproduce_quick_passes_the_users_limits_to_every_step() -> None:
    from normkit.lab.reproduce import ReproduceConfig, plan

    steps = plan(ReproduceConfig(quick=True, seeds=2, limit_train=40, limit_test=20))
    assert [(s.config.limit_train, s.config.limit_test) for s in steps] == [(40, 20)] * len(steps)
    assert all("--limit-train 40" in s.command for s in steps)


def test_lr_sweep_verdict_never_prints_python_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["lr-sweep", "--lrs", "10", "--epochs", "1", "--batch-size", "8", "--max-steps", "2"]
    args += ["--mlp-steps", "0", "--out", str(tmp_path), *TINY]
    code, out, _ = _exit(args, capsys)
    assert code == 0
    line = next(ln for ln in out.splitlines() if ln.startswith("- E2 (i)"))
    assert "n/a" in line and "None" not in line, line


def test_compare_a_one_sample_test_set_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runs"
    args = ["compare", "--norms", "bn", "--batch-sizes", "2", "--seeds", "0", "--epochs", "1"]
    args += ["--max-steps", "1", "--jobs", "1", "--out", str(out), "--limit-train", "4", "--limit-test", "1"]
    args += ["--quiet", "--threads", "1", "--device", "cpu"]
    code, _, err = _exit(args, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert not out.exists() or not any(out.iterdir())  # no run folder: refused up front, as documented


def test_compare_summary_names_the_max_steps_cap(compare_run: dict[str, Any]) -> None:
    header = compare_run["out"].split("\n## ")[0]
    assert re.search(r"max.steps|at most 1 (optimizer )?step|1 step", header), header


def test_a_bad_normkit_backend_leaves_no_run_folder(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    args = ["normkit", "power", "--norms", "bn", "--depth", "1", "--width", "8", "--samples", "8"]
    proc = _python_m([*args, "--out", str(out), *TINY], env={"NORMKIT_BACKEND": "bogus"})
    assert proc.returncode == 2 and "NORMKIT_BACKEND" in proc.stderr, proc.stderr
    assert not out.exists() or not any(out.iterdir()), [p.name for p in out.iterdir()]


# ---- verified behaviour ----------------------------------------------------------------------------


def test_compare_stdout_summary_matches_its_files(compare_run: dict[str, Any]) -> None:
    """What is printed is what is written: stdout's summary opens summary.md, its numbers are results.json's,
    and the run is marked finished with every documented file."""
    assert compare_run["code"] == 0
    run: Path = compare_run["run"]
    out: str = compare_run["out"]
    printed, _, folder = out.rpartition("\nrun folder: ")
    assert folder.strip() == str(run)
    assert (run / "summary.md").read_text().startswith(printed.rstrip("\n"))
    for name in ("config.json", "env.json", "manifest.json", "results.json", "timing.json", "summary.md"):
        assert (run / name).is_file(), name
    assert json.loads((run / "manifest.json").read_text())["status"] == "finished"
    agg = json.loads((run / "results.json").read_text())["aggregate"]
    for row in agg:  # each cell of the table is the aggregate's mean, to 2 decimals
        norm, b, err = row["norm"], row["batch_size"], row["test_err_mean"]
        line = next(ln for ln in out.splitlines() if ln.startswith(f"| {norm} |"))
        col = [c.strip() for c in line.strip("|").split("|")][1:][[8, 4].index(b)]
        assert col == f"{err:.2f}", (norm, b, line)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert sum('"final"' in ln for ln in lines) == 4 and all(json.loads(ln) for ln in lines)


def test_progress_on_a_pipe_is_plain_text_on_stderr(compare_run: dict[str, Any]) -> None:
    """Not a terminal: the bars go to stderr once, without colours or cursor movement; stdout has none."""
    err, out = compare_run["err"], compare_run["out"]
    assert "runs" in err and "4/4" in err
    assert not ANSI.search(err) and not ANSI.search(out)
    assert "━" not in out


def test_report_of_one_run_into_another_folder_links_and_embeds_every_plot(
    compare_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "elsewhere" / "report"
    assert main(["report", str(compare_run["run"]), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    pngs = sorted(p.name for p in compare_run["run"].glob("*.png"))
    assert sorted(Path(link).name for link in links) == pngs and pngs
    assert all((out / link).is_file() for link in links)  # relative to the report, across folders
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(pngs) and "<table>" in html
    assert "\x1b" not in html and "<script" not in html


def test_ctrl_c_stops_landscape_and_marks_its_folder(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) mid-landscape: status 130, one line
    naming the folder, the folder marked interrupted, no summary, every metrics line whole."""
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "normkit", "landscape", "--steps", "5000", "--every", "1", "--etas", "2"]
    cmd += ["--width", "4", "--batch-size", "8", "--out", str(out), *TINY]
    proc = start_in_own_group(cmd)  # (SIGINT at its default action in the child)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = list(out.glob("landscape-*/metrics.jsonl"))
            if metrics and metrics[0].read_text().count("\n") >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "landscape ended before it could be interrupted"
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    (run,) = out.iterdir()
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == [f"normkit landscape: interrupted; kept in {run} (marked interrupted)"]
    assert json.loads((run / "manifest.json").read_text())["status"] == "interrupted"
    assert not (run / "summary.md").exists() and not (run / "results.json").exists()
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["norm"] == "none" for r in rows)


def test_report_on_an_empty_runs_root_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "runs").mkdir()
    code, _, err = _exit(["report", "--runs-root", str(tmp_path / "runs")], capsys)
    assert code == 2 and err.count("\n") == 1 and "no runs under" in err and "normkit compare" in err
    assert not (tmp_path / "runs" / "report.md").exists()


def test_python_dash_m_and_the_console_script_agree(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("normkit")
    if not script.is_file():
        pytest.skip("no normkit console script next to this interpreter")
    env = {**os.environ, "COLUMNS": "100"}
    a = subprocess.run(
        [str(script), "compare", "--help"], capture_output=True, text=True, timeout=120, env=env
    )
    b = _python_m(["normkit", "compare", "--help"], env={"COLUMNS": "100"})
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout and a.stdout.startswith("usage: normkit compare")
    bad = _python_m(["normkit", "compare", "--norms", "batchnorm", "--out", str(tmp_path / "runs"), *TINY])
    assert bad.returncode == 2 and "unknown norm 'batchnorm'" in bad.stderr and "Traceback" not in bad.stderr
    assert bad.stderr.count("\n") == 1 and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["kernels", "rebuild"], "invalid choice: 'rebuild'"),
        (["bench", "--shapes", "0x64x8x8"], "a shape is N x C x H x W"),
        (["bench", "--threads", "0"], "must be > 0, got 0"),
        (["bench", "--backends", "auto"], "unknown backend 'auto'"),
        (["landscape", "--norms", "bn"], "landscape compares a baseline with at least one norm"),
        (["reproduce", "--results", "RESULTS.txt"], "--results must name a Markdown file (.md)"),
    ],
)
def test_more_bad_arguments_exit_2_without_a_traceback(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = ["--out", str(tmp_path / "runs"), *TINY] if args[0] in ("landscape", "reproduce") else []
    code, _, err = _exit([*args, *extra], capsys)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()


def test_report_refuses_run_folders_with_all(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--all means every run under --runs-root: with explicit folders it was silently ignored."""
    run = _fake_run(tmp_path / "runs")
    code, _, err = _exit(["report", str(run), "--all"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--all" in err, err
    assert not (tmp_path / "runs" / "report.md").exists()
