"""``normkit compare --sync-bn``: one process, and 2 processes under torchrun on gloo (only rank 0 writes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from normkit.lab.experiments.compare import CompareConfig, run_compare

TINY = ["--limit-train", "32", "--limit-test", "16", "--quiet", "--threads", "1", "--device", "cpu"]


def _finals(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == "final"]


def test_compare_sync_bn_in_one_process_is_plain_bn(tmp_path: Path) -> None:
    kw = dict(
        norms=["bn", "gn:8"],
        batch_sizes=[4],
        seeds=[0],
        epochs=1,
        max_steps=2,
        limit_train=32,
        limit_test=16,
        quiet=True,
        threads=1,
        device="cpu",
        jobs=1,
    )
    sync = run_compare(CompareConfig(**kw, sync_bn=True, out=str(tmp_path / "sync")))
    plain = run_compare(CompareConfig(**kw, out=str(tmp_path / "plain")))
    assert sync.path is not None and plain.path is not None
    assert "SyncBatchNorm is plain BN" in sync.summary
    got = {r["norm"]: r for r in _finals(sync.path)}
    want = {r["norm"]: r for r in _finals(plain.path)}
    assert (  # cnn4-head: 4 + 1 BN layers
        got["bn"]["sync_bn_layers"] == 5 and got["gn:8"]["sync_bn_layers"] == 0
    )
    for norm in want:  # the same numbers: with one process SyncBatchNorm is BN
        assert abs(got[norm]["test_err"] - want[norm]["test_err"]) < 1e-9
        assert abs(got[norm]["train_loss"] - want[norm]["train_loss"]) < 1e-6


def test_torchrun_two_processes_gloo_sync_bn(tmp_path: Path) -> None:
    """The README command, shrunk (about 15 s):
    ``torchrun --nproc-per-node 2 -m normkit.cli compare --sync-bn``."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "normkit.cli",
        "compare",
        "--sync-bn",
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
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = tmp_path.iterdir()  # only rank 0 writes
    assert proc.stdout.count("run folder:") == 1  # only rank 0 prints
    assert "BN statistics synchronised over all processes: SyncBatchNorm" in proc.stdout
    assert json.loads((run / "env.json").read_text())["world_size"] == 2
    finals = {r["norm"]: r for r in _finals(run)}
    assert finals["bn"]["sync_bn_layers"] == 5 and finals["gn:8"]["sync_bn_layers"] == 0
    assert all(r["steps"] == 2 for r in finals.values())


def test_a_run_that_diverges_on_one_process_stops_on_every_process(world2) -> None:
    """Only rank 1's loss turns NaN (its third step): both processes stop there as diverged (rank 0 went
    on alone; under DDP it then waited in the next collective for torch's 30-minute timeout)."""
    r0, r1 = (r["diverge"] for r in world2)
    assert r0 == r1 == {"diverged": True, "steps": 2}
