"""A progress display for runs and epochs (rich), or nothing with ``quiet``:
:class:`normkit._progress.Progress`.

Progress goes to stderr so that stdout carries only the results table.

Example:
    >>> with Progress(quiet=True) as p:
    ...     runs = p.add("runs", total=2)
    ...     p.advance(runs)
"""

from __future__ import annotations

from .._progress import Progress

__all__ = ["Progress"]
