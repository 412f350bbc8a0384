"""One spawned gloo world per world size (2 and 3), shared by every test in this folder.

Spawning a world costs a few seconds (each process imports torch and normkit), so each size runs
once per session: the ``world2`` / ``world3`` fixtures run every task of the payload below in one
world and hand the per-rank results to the tests, which compare them with oracles computed here
in the parent process (single-process BN on the concatenated batch, float64 direct computations).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.distributed._spawn import run_world
from tests.distributed._workers import suite

F64, F32 = torch.float64, torch.float32


def random_splits(world: int, count: int, seed: int) -> list[list[int]]:
    """Random per-rank batch sizes from {0, 1, 2, 3, 5}; each split has an empty or a size-1 rank and >= 2 in
    all."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([0, 1, 2, 3, 5])
    out: list[list[int]] = []
    while len(out) < count:
        s = sizes[torch.randint(len(sizes), (world,), generator=g)].tolist()
        if sum(s) >= 2 and (0 in s or 1 in s):
            out.append(s)
    return out


def sync_cases(world: int) -> dict[str, dict[str, Any]]:
    """The SyncBN training-step cases of a world: shapes, splits, dtypes, layouts, options."""
    if world == 2:
        cases = {
            "even-4d": dict(tail=(3, 4, 5), splits=[4, 4]),
            "uneven-4d-channels-last": dict(tail=(3, 4, 5), splits=[5, 2], channels_last=True),
            "empty-rank-4d": dict(tail=(3, 4, 4), splits=[0, 3]),
            "size1-rank-2d": dict(tail=(4,), splits=[1, 3]),
            "size1-each-2d": dict(tail=(4,), splits=[1, 1]),
            "3d-mask": dict(tail=(3, 7), splits=[3, 2], mask=True),
            "5d": dict(tail=(2, 2, 3, 3), splits=[1, 2]),
            "momentum-none-biased": dict(tail=(2, 3, 3), splits=[2, 3], momentum=None, unbiased=False, nbt=4),
            "no-affine-no-tracking": dict(tail=(3, 2, 2), splits=[3, 1], affine=False, track=False),
            "fp32-large-offset": dict(tail=(3, 6, 6), splits=[3, 5], dtype=F32, offset=1e4, scale=1e-2),
            "bf16": dict(tail=(3, 4, 4), splits=[3, 3], dtype=torch.bfloat16),
            # outputs and gradients exact; the variance (~1e60) does not fit the fp32 buffers: no update
            "fp32-huge-values": dict(
                tail=(2, 3, 3), splits=[2, 3], dtype=F32, offset=0.0, scale=1e30, skips_update=True
            ),
        }
    else:
        cases = {
            "uneven-4d": dict(tail=(3, 3, 4), splits=[2, 0, 5]),
            "3d-channels": dict(tail=(5, 6), splits=[1, 4, 2]),
            "5d-channels-last": dict(tail=(2, 2, 2, 3), splits=[2, 1, 1], channels_last=True),
        }
    for i, s in enumerate(random_splits(world, 4 if world == 2 else 5, seed=world)):
        tail = [(3,), (3, 5), (2, 3, 3), (2, 2, 2, 2)][i % 4]
        cases[f"random-{i}-{s}"] = dict(tail=tail, splits=s)
    for i, c in enumerate(cases.values()):
        c.setdefault("seed", 10 * world + i)
    return cases


def error_cases(world: int) -> dict[str, dict[str, Any]]:
    if world == 2:
        return {
            "count1-2d": dict(tail=(3,), splits=[1, 0], seed=7),
            "count1-4d": dict(tail=(3, 1, 1), splits=[0, 1], seed=8),
            "bad-channels-on-1": dict(tail=(3, 4), splits=[2, 2], bad_rank=1, bad="channels", seed=9),
            "integer-on-0": dict(tail=(3, 4), splits=[2, 2], bad_rank=0, bad="integer", seed=10),
        }
    return {
        "count1-3d": dict(tail=(2, 1), splits=[0, 1, 0], seed=11),
        "rank1-input-on-2": dict(tail=(3,), splits=[2, 2, 2], bad_rank=2, bad="rank1", seed=12),
    }


TRAIN = {2: dict(tail=(2, 5, 5), splits=[3, 5], seed=21), 3: dict(tail=(2, 4, 4), splits=[2, 0, 4], seed=22)}
RECAL = {2: dict(seed=31, batch_sizes=[4, 3, 5, 2, 6, 3])}
RECAL_EXTRA = {2: dict(seed=31, batch_sizes=[4, 3, 5, 2, 6, 3], extra_rank=1)}
SUBGROUP = dict(tail=(3, 3, 3), splits=[2, 3, 4], members=[0, 2], seed=41)
EVAL = dict(tail=(3, 4, 4), splits=[3, 2], seed=51)


def payload(world: int) -> list[tuple[str, str, dict[str, Any]]]:
    tasks: list[tuple[str, str, dict[str, Any]]] = []
    tasks += [(f"sync/{k}", "sync_bn", c) for k, c in sync_cases(world).items()]
    tasks += [(f"error/{k}", "error", c) for k, c in error_cases(world).items()]
    tasks += [("train_steps", "train_steps", TRAIN[world])]
    tasks += [("buffers", "buffers", {"src": world - 1})]
    if world == 2:
        tasks += [("functional", "functional", sync_cases(2)["uneven-4d-channels-last"])]
        tasks += [
            ("eval", "eval", EVAL),
            ("recalibrate", "recalibrate", RECAL[2]),
            ("recalibrate_extra", "recalibrate", RECAL_EXTRA[2]),
        ]
        tasks += [("diverge", "diverge", {})]
        tasks += [("mismatch", "mismatch", {})]  # last: a regression aborts the processes
    else:
        tasks += [("subgroup", "subgroup", SUBGROUP)]
    return tasks


def _world(world: int) -> list[dict[str, Any]]:
    return run_world(suite, world, payload(world), timeout=150)


@pytest.fixture(scope="session")
def world2() -> list[dict[str, Any]]:
    """Per-rank results of every world-2 task (keys as in :func:`payload`)."""
    return _world(2)


@pytest.fixture(scope="session")
def world3() -> list[dict[str, Any]]:
    """Per-rank results of every world-3 task."""
    return _world(3)
