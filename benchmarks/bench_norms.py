"""Providers side by side: a thin wrapper around ``normkit bench`` (:mod:`normkit.bench`).

Takes every ``normkit bench`` option (``normkit bench --help``), plus two of its own:

    --baseline DIR   also time an earlier normkit package directory (e.g. after
                     `git worktree add /tmp/old <commit>`: /tmp/old/src/normkit), loaded as a second
                     package in the same process, as the provider "baseline", so that a regression
                     check compares like with like (the baseline must not register the same
                     torch.library ops as the current one; ops it lacks show as "-")
    --only TEXT      the same as --ops TEXT

Usage:
    python benchmarks/bench_norms.py --no-e2e --dtypes fp32          # the norms, fp32, 3 interleaved repeats
    python benchmarks/bench_norms.py --quick                         # a smoke run
    python benchmarks/bench_norms.py --no-e2e --baseline /tmp/old/src/normkit --only group_norm

The allocator is pinned (glibc MALLOC_* settings, re-exec'd if absent; --no-pin turns it off) so
fresh large allocations do not pay page faults on every call.
"""

from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__" and "--no-pin" not in sys.argv:  # before importing torch: re-exec pinned
    _MALLOC = {
        "MALLOC_MMAP_THRESHOLD_": "17179869184",
        "MALLOC_TRIM_THRESHOLD_": "17179869184",
        "MALLOC_TOP_PAD_": "1073741824",
    }
    if any(os.environ.get(k) != v for k, v in _MALLOC.items()):
        os.environ.update(_MALLOC)
        os.execv(sys.executable, [sys.executable, *sys.argv])

from normkit.bench import load_baseline, main_from_args
from normkit.cli import build_parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``--baseline`` / ``--only``, hand the rest to ``normkit bench``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--baseline", metavar="DIR")
    own.add_argument("--only", metavar="TEXT")
    ns, rest = own.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        print(__doc__)
    if ns.only:
        rest += ["--ops", ns.only]
    args = build_parser().parse_args(["bench", *rest])  # exits 2 on a bad option (and 0 on --help)
    try:
        extra = {"baseline": load_baseline(ns.baseline)} if ns.baseline else None
        return main_from_args(args, extra)
    except ValueError as e:
        print(f"bench_norms.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
