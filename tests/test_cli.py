"""The ``normkit`` command: help for every subcommand, exit codes and messages, the console script, torchrun."""

from __future__ import annotations

import json
import os
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
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, env=env, **kw)


@pytest.mark.parametrize("sub", [None, *SUBCOMMANDS])
def test_help(sub: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([*([sub] if sub else []), "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: normkit")
    if sub in ("compare", "power", "lr-sweep", "landscape"):
        assert "--out DIR" in out and "--quiet" in out and "--data" in out


def test_compare_prints_the_table_and_writes_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["compare", "--norms", "bn,ln+pn", "--batch-sizes", "8,4", "--seeds", "0", "--epochs", "1",
                 "--max-steps", "2", "--jobs", "1", "--out", str(tmp_path), *TINY])
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
def test_errors_exit_2_with_a_clear_message(args: list[str], message: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    extra = [] if args[0] == "report" else ["--out", str(tmp_path), *TINY]
    with pytest.raises(SystemExit) as e:
        main([*args, *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"normkit {args[0]}: error: ") and message in err


def test_corrupt_cifar_exits_nonzero_in_a_real_process(tmp_path: Path) -> None:
    write_cifar10_batches(tmp_path / "c", n_train=4, n_test=2, num_batches=1)
    (tmp_path / "c" / "test_batch").write_bytes(b"garbage")
    proc = _run(["normkit.cli", "compare", "--data", f"cifar10:{tmp_path / 'c'}", "--out", str(tmp_path / "runs"), *TINY])
    assert proc.returncode == 2
    assert "is not a CIFAR-10 python batch" in proc.stderr and "Traceback" not in proc.stderr


def test_compare_on_cifar_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_cifar10_batches(tmp_path / "c", n_train=24, n_test=8, num_batches=2)
    main(["compare", "--data", f"cifar10:{tmp_path / 'c'}", "--models", "cnn4,resnet", "--norms", "gn:4+pn,in",
          "--batch-sizes", "4", "--seeds", "0", "--epochs", "1", "--max-steps", "2", "--out", str(tmp_path / "runs"),
          "--jobs", "1", "--quiet", "--threads", "1", "--device", "cpu"])
    assert "## resnet" in capsys.readouterr().out


def test_torchrun_two_process_gloo_smoke(tmp_path: Path) -> None:
    """Data-parallel compare under torchrun: 2 processes on gloo (about 15 s here)."""
    proc = _run(["torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "normkit.cli", "compare",
                 "--norms", "bn,gn:8", "--batch-sizes", "4", "--seeds", "0", "--epochs", "1", "--max-steps", "2",
                 "--out", str(tmp_path), *TINY], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = tmp_path.iterdir()  # only rank 0 writes
    env = json.loads((run / "env.json").read_text())
    assert env["world_size"] == 2
    finals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"final"' in line]
    assert len(finals) == 2 and all(r["steps"] == 2 for r in finals)
    assert proc.stdout.count("run folder:") == 1
