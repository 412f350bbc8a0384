"""``normkit compare``'s worker processes when a training fails inside one of them.

Found by measuring coverage in the spawned workers: the path where a worker reports a failed run
and the parent stops the whole run was never taken. Oracle: the documented behaviour (the parent
raises naming the run and the worker's error; no worker is left running).
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from torch import nn

import normkit
from normkit.lab.experiments.compare import CompareConfig, run_compare

TINY = {"limit_train": 32, "limit_test": 16, "quiet": True, "device": "cpu", "threads": 1}


def _fails_in_a_worker(c: int, arg: int | None, **kw) -> nn.Module:  # module level: picklable
    """GroupNorm in the parent process (which may build the layer to check the config), an error in a
    spawned worker."""
    if multiprocessing.parent_process() is not None:
        raise ValueError("this norm cannot be built here")
    return nn.GroupNorm(2, c, **kw)


def test_a_run_that_fails_in_a_worker_stops_the_run_and_names_it(tmp_path: Path) -> None:
    from normkit.nn import registry

    saved = dict(registry._REGISTRY)
    try:
        normkit.register_norm("failsinworker", "GroupNorm(2, C) that fails in a worker")(_fails_in_a_worker)
        cfg = CompareConfig(
            norms=["failsinworker"],
            batch_sizes=[8, 4],
            seeds=[0],
            epochs=1,
            max_steps=1,
            jobs=2,
            out=str(tmp_path / "run"),
            **TINY,
        )
        with pytest.raises(
            RuntimeError, match=r"failsinworker.* failed: ValueError: this norm cannot be built here"
        ):
            run_compare(cfg)
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved)
    assert multiprocessing.active_children() == []  # the workers were stopped
