"""Run folders: layout, unique names, JSON lines, and the environment record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from normkit.lab.records import RunRecord, environment, read_metrics, to_jsonable


def test_run_folder_layout_and_unique_names(tmp_path: Path) -> None:
    a = RunRecord.create(tmp_path, "demo", {"x": 1})
    b = RunRecord.create(tmp_path, "demo", {"x": 2})
    assert a.path != b.path and a.path.name.startswith("demo-") and b.path.parent == tmp_path
    assert json.loads((a.path / "config.json").read_text()) == {"experiment": "demo", "x": 1}
    env = json.loads((a.path / "env.json").read_text())
    assert {"torch", "threads", "device", "git", "python"} <= set(env)
    a.log(epoch=1, loss=float("nan"), t=torch.tensor(2.0))
    a.log(epoch=2, loss=0.25)
    assert read_metrics(a.path) == [{"epoch": 1, "loss": "nan", "t": 2.0}, {"epoch": 2, "loss": 0.25}]
    assert a.finish() >= 0 and "wall_s" in json.loads((a.path / "timing.json").read_text())


def test_environment_and_jsonable() -> None:
    env = environment("cpu", world_size=2)
    assert env["torch"] == torch.__version__ and env["world_size"] == 2 and env["device"] == "cpu"
    assert to_jsonable({"p": Path("a/b"), "t": (1, float("inf"))}) == {"p": "a/b", "t": [1, "inf"]}


def test_env_records_what_explains_a_difference(tmp_path: Path) -> None:
    import os
    import subprocess

    import numpy

    import normkit

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        env = environment("cpu", parallelism="test")
    finally:
        torch.set_num_threads(before)  # (left at 1, every later test in the process ran on one thread)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.split(":")[0].strip() == "model name"
        ]
        if names:
            assert env["cpu_model"] == names[0]
    assert env["cpu_count"] == os.cpu_count() and env["threads"] == 1 and env["parallelism"] == "test"
    assert (
        env["numpy"] == numpy.__version__
        and env["normkit"] == normkit.__version__
        and env["torch"] == torch.__version__
    )
    show = torch.__config__.show()
    at = show.find("BLAS_INFO=")
    assert env["blas"] == (None if at < 0 else show[at + len("BLAS_INFO=") :].split(",")[0].split()[0])
    if torch.backends.mkl.is_available() and at >= 0:
        assert env["blas"] == "mkl"
    src = Path(normkit.__file__).parent
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True)
    if sha.returncode == 0:
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=src, capture_output=True, text=True
        )
        assert env["git"] == sha.stdout.strip() and env["git_dirty"] == bool(status.stdout.strip())
    else:
        assert env["git"] is None


def test_manifest_follows_the_run(tmp_path: Path) -> None:
    from normkit.lab.records import RunInterrupted, read_manifest

    ok = RunRecord.create(tmp_path, "demo", {})
    assert read_manifest(ok.path)["status"] == "running"
    with ok.guard():
        ok.log(x=1)
    ok.finish()
    assert read_manifest(ok.path)["status"] == "finished"
    bad = RunRecord.create(tmp_path, "demo", {})
    with pytest.raises(ZeroDivisionError), bad.guard():
        1 / 0  # noqa: B018 - evaluated for its ZeroDivisionError, whose message the manifest records
    m = read_manifest(bad.path)
    assert m["status"] == "failed" and m["error"] == "ZeroDivisionError: division by zero"
    cut = RunRecord.create(tmp_path, "demo", {})
    with pytest.raises(RunInterrupted) as e, cut.guard():
        raise KeyboardInterrupt
    assert e.value.path == cut.path and read_manifest(cut.path)["status"] == "interrupted"
    old = tmp_path / "demo-old"
    old.mkdir()
    assert read_manifest(old)["status"] == "failed"  # no manifest, no summary: never taken for a finished run
    (old / "summary.md").write_text("# old\n")
    assert read_manifest(old)["status"] == "finished"


def test_check_writable(tmp_path: Path) -> None:
    from normkit.lab.records import check_writable

    assert check_writable(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == []  # a check creates nothing
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_writable(tmp_path / "f" / "runs")
