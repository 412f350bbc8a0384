"""Whether a norm call lets other Python threads run while its kernel computes (as torch's own ops do).

A second thread appends timestamps in a loop; the longest gap between its stamps during one norm call is
how long the call kept it from running. A call that releases the GIL keeps it to about the interpreter's
switch interval (5 ms); one that holds it, for the whole kernel. One thread of intra-op work, so the
call is long. A measurement: compare the rows of one run.

    python benchmarks/gil_release.py
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

import normkit.functional as NF
import normkit.nn as nkn


def blocked_ms(fn: Callable[[], object]) -> tuple[float, float]:
    """(the call's time, the longest stretch the other thread waited), in ms."""
    stamps: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        while not stop.is_set():
            stamps.append(time.perf_counter())

    th = threading.Thread(target=tick)
    th.start()
    time.sleep(0.05)
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    stop.set()
    th.join()
    inside = [t0, *(s for s in stamps if t0 <= s <= t1), t1]
    return 1e3 * (t1 - t0), 1e3 * max(b - a for a, b in zip(inside, inside[1:]))


def main() -> None:
    torch.set_num_threads(1)
    x = torch.randn(32, 64, 64, 64)
    cases: dict[str, Callable[[], object]] = {
        "torch.nn.GroupNorm(8, 64)": lambda: torch.nn.GroupNorm(8, 64)(x),
        "normkit.nn.GroupNorm(8, 64)": lambda: nkn.GroupNorm(8, 64)(x),
        "normkit.functional.group_norm": lambda: NF.group_norm(x, 8),
        "torch.nn.LayerNorm(64)": lambda: torch.nn.LayerNorm(64)(x),
        "normkit.nn.LayerNorm(64)": lambda: nkn.LayerNorm(64)(x),
        "torch.nn.BatchNorm2d(64)": lambda: torch.nn.BatchNorm2d(64)(x),
        "normkit.nn.BatchNorm2d(64)": lambda: nkn.BatchNorm2d(64)(x),
    }
    with torch.no_grad():
        for fn in cases.values():
            fn()  # (warm: the first normkit call may build the kernels)
        for name, fn in cases.items():
            call, gap = blocked_ms(fn)
            print(f"{name:32s} call {call:7.1f} ms   other thread blocked up to {gap:6.1f} ms")


if __name__ == "__main__":
    main()
