"""Run a function on every rank of a real gloo process group (spawned processes), with a hard timeout.

``run_world(worker, world_size, payload)`` starts ``world_size`` fresh Python processes
(``spawn``), joins them into a gloo group through a FileStore in a temporary folder, calls
``worker(rank, world_size, payload)`` in each and returns the per-rank results (anything
``torch.save`` can write). A worker that raises fails the call with its traceback; a world that
does not finish within ``timeout`` seconds is killed and fails the call: a hang fails the test,
it never blocks the run.

Workers must live in an importable module (``tests.distributed._workers``): spawned processes
import them by name.
"""

from __future__ import annotations

import io
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.multiprocessing as mp

__all__ = ["WorldError", "run_world"]


class WorldError(AssertionError):
    """A spawned world failed: a worker raised, died, or the world ran past its timeout."""


def _entry(
    rank: int,
    world_size: int,
    init_file: str,
    worker: Callable[[int, int, Any], Any],
    payload: Any,
    results: Any,
    collective_timeout: float,
) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=collective_timeout),
        )
        try:
            out = worker(rank, world_size, payload)
        finally:
            dist.destroy_process_group()
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # report everything, including a collective timeout
        results.put((rank, "error", traceback.format_exc()))


def run_world(
    worker: Callable[[int, int, Any], Any],
    world_size: int,
    payload: Any = None,
    *,
    timeout: float = 90.0,
) -> list[Any]:
    """``[worker(rank, world_size, payload) for rank in range(world_size)]``, each in its own process.

    Raises :class:`WorldError` if a worker raises or dies, or if the world takes longer than
    ``timeout`` seconds (its processes are then killed).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="normkit-world-") as tmp:
        init_file = os.path.join(tmp, "store")
        # Collectives give up well before the hard timeout, so a stuck rank reports where it stuck.
        collective_timeout = max(5.0, timeout / 3)
        procs = [
            ctx.Process(
                target=_entry,
                args=(rank, world_size, init_file, worker, payload, results, collective_timeout),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        out: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(out) + len(errors) < world_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WorldError(
                        f"world of {world_size} did not finish within {timeout:.0f} s (a hang?); finished "
                        f"ranks: {sorted(out)}, failed: {sorted(errors)}"
                        + "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
                    )
                try:
                    rank, status, data = results.get(timeout=min(left, 0.5))
                except queue.Empty:
                    dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in errors]
                    for i in dead:
                        errors[i] = f"process exited with code {procs[i].exitcode} without a result"
                    continue
                if status == "ok":
                    out[rank] = torch.load(io.BytesIO(data), weights_only=False)
                else:
                    errors[rank] = data
        finally:
            for p in procs:
                p.join(timeout=5)
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
            results.close()
        if errors:
            raise WorldError(
                f"{len(errors)} of {world_size} ranks failed"
                + "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            )
        return [out[r] for r in range(world_size)]
