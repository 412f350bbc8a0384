"""Stopping a running ``normkit compare`` with a signal, as a terminal (Ctrl-C) or ``kill PID`` would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def compare_command(out: Path, *options: str) -> list[str]:
    """``normkit compare`` on the CPU, quiet, into ``out``, with ``options``."""
    return [
        sys.executable,
        "-m",
        "normkit.cli",
        "compare",
        *options,
        "--quiet",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]


def start_in_own_group(cmd: list[str], sig: int = signal.SIGINT) -> subprocess.Popen[str]:
    """Start ``cmd`` as a shell would, in its own process group, with ``sig`` at its default action.

    The child must start with sig at its default action, whatever this test process inherited (a CI
    runner's background job starts with SIGINT ignored, and an ignored signal stays ignored across
    exec). A handler, unlike SIG_IGN, is reset to the default by exec, so one is set around the start.
    Not preexec_fn: it runs Python between fork and exec, which can deadlock in a process with threads
    (torch's), and Popen then waits for the exec forever.
    """
    previous = signal.signal(sig, lambda signum, frame: None)
    try:
        return subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
    finally:
        signal.signal(sig, previous)


def interrupt_compare(
    cmd: list[str], out: Path, sig: int, times: int, gap: float, *, group: bool
) -> tuple[subprocess.CompletedProcess[str], float, Path, int]:
    """Start ``cmd`` (a ``normkit compare`` writing under ``out``) as from a shell, in its own process group
    with ``sig`` at its default action; once the first training is on disk send ``sig`` ``times`` times
    ``gap`` seconds apart, to the process group (``group``, a terminal's Ctrl-C) or the process alone
    (``kill PID``). Returns the finished process, the seconds from the first signal to its exit, the run
    folder and the process group (for checking that no worker outlives it)."""
    proc = start_in_own_group(cmd, sig)
    t0 = time.monotonic()
    try:
        deadline = time.monotonic() + 600  # a wait, not a timing: the shared machine can be slow to spawn
        run = None
        while time.monotonic() < deadline and proc.poll() is None:
            runs = list(out.glob("compare-*"))
            metrics = runs[0] / "metrics.jsonl" if runs else None
            # (the run folder appears before its metrics file: a poll may fall between the two)
            if metrics is not None and metrics.exists() and '"final"' in metrics.read_text():
                run = runs[0]
                break
            time.sleep(0.05)
        assert run is not None, f"no training finished within 600 s (exit status {proc.poll()})"
        t0 = time.monotonic()
        for k in range(times):
            if k:
                time.sleep(gap)
            if proc.poll() is None:
                (os.killpg if group else os.kill)(proc.pid, sig)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"compare did not exit within 30 s of {signal.Signals(sig).name}") from None
    finally:  # never leave the run behind, whatever failed above
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    elapsed = time.monotonic() - t0
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), elapsed, run, proc.pid
