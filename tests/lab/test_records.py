"""Run folders: layout, unique names, JSON lines, and the environment record."""

from __future__ import annotations

import json
from pathlib import Path

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
