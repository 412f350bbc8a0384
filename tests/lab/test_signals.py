"""SIGTERM (``kill``, ``timeout``, a job scheduler) stops a run as Ctrl-C does: the run folder is marked
``interrupted``, the worker processes are stopped, nothing is leaked."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from normkit.lab.records import RunInterrupted, RunRecord, Terminated, read_manifest, sigterm_interrupts
from tests.interrupt import compare_command, interrupt_compare

needs_default_sigterm = pytest.mark.skipif(
    signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL,
    reason="this test process has its own SIGTERM handler (the conversion leaves it alone)",
)


@needs_default_sigterm
def test_sigterm_inside_a_guarded_run_marks_it_interrupted(tmp_path: Path) -> None:
    rec = RunRecord.create(tmp_path, "demo", {})
    with pytest.raises(RunInterrupted) as e, rec.guard():
        signal.raise_signal(signal.SIGTERM)  # (without the guard's handler: this process would end here)
        time.sleep(5)  # not reached: the handler raises first
    assert e.value.path == rec.path and e.value.signum == signal.SIGTERM
    manifest = read_manifest(rec.path)
    assert (manifest["status"], manifest["signal"]) == ("interrupted", "SIGTERM")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
    # Ctrl-C: as before, no "signal" entry
    cut = RunRecord.create(tmp_path, "demo", {})
    with pytest.raises(RunInterrupted) as e, cut.guard():
        raise KeyboardInterrupt
    assert e.value.signum == signal.SIGINT and "signal" not in read_manifest(cut.path)


def test_a_program_s_own_sigterm_handler_is_left_alone() -> None:
    def own(signum: int, frame: object) -> None:  # pragma: no cover - never called
        pass

    previous = signal.signal(signal.SIGTERM, own)
    try:
        with sigterm_interrupts():
            assert signal.getsignal(signal.SIGTERM) is own
        assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert issubclass(Terminated, KeyboardInterrupt) and Terminated.signum == signal.SIGTERM


def _terminated_compare(tmp_path: Path, jobs: int, signals: int) -> tuple[int, str, Path, int]:
    """Start the smallest ``normkit compare`` that keeps running (200 one-epoch trainings on 64 samples) as a
    shell would, send SIGTERM to its process (not its group, as ``kill PID`` does) ``signals`` times 0.2 s
    apart once its first training is on disk; return the exit status, stderr, the run folder and the
    process group."""
    out = tmp_path / "runs"
    cmd = compare_command(
        out,
        *(
            "--jobs",
            str(jobs),
            "--norms",
            "bn",
            "--batch-sizes",
            "8",
            "--seeds",
            ",".join(map(str, range(200))),
        ),
        *("--epochs", "1", "--limit-train", "64", "--limit-test", "32"),
    )
    proc, _, run, pgid = interrupt_compare(cmd, out, signal.SIGTERM, signals, 0.2, group=False)
    return proc.returncode, proc.stderr, run, pgid


@pytest.mark.parametrize(("jobs", "signals"), [(1, 1), (2, 2)], ids=["one-process", "workers-two-sigterms"])
def test_sigterm_stops_compare_and_marks_the_run_interrupted(tmp_path: Path, jobs: int, signals: int) -> None:
    # it used to die on the spot: manifest.json left at "running", and with worker processes the
    # resource tracker's "leaked semaphore objects" warning
    status, stderr, run, pgid = _terminated_compare(tmp_path, jobs, signals)
    assert status == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr and "leaked" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    reported = re.fullmatch(
        r"normkit compare: terminated \(SIGTERM\); (\d+) of 200 trainings finished, kept in "
        + re.escape(str(run))
        + r" \(marked interrupted\)",
        last,
    )
    assert reported is not None, stderr
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["signal"] == "SIGTERM"
    finals = [
        json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"final"' in line
    ]
    assert (
        manifest["done"] == len(finals) == int(reported.group(1))
        and 1 <= len(finals) < manifest["total"] == 200
    )
    deadline = time.monotonic() + 10
    while True:  # no worker outlives the run
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "a process of the run outlived it"
        time.sleep(0.1)
