"""A progress display (rich), or nothing with ``quiet``: the lab's runs and epochs, ``recalibrate_bn``'s
batches.

Progress goes to stderr so that stdout carries only results. rich is imported only when a bar is
shown (``import normkit`` stays light); :mod:`normkit.lab.progress` re-exports this class.

Example:
    >>> with Progress(quiet=True) as p:
    ...     runs = p.add("runs", total=2)
    ...     p.advance(runs)
"""

from __future__ import annotations

from typing import Any

__all__ = ["Progress"]


class Progress:
    """Named progress bars (``rich.progress``), a no-op when ``quiet`` or when rich is missing.

    Args:
        quiet: show nothing.
    """

    def __init__(self, quiet: bool = False) -> None:
        self._p: Any = None
        if not quiet:
            try:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
                from rich.progress import Progress as _RichProgress
            except ImportError:  # pragma: no cover - rich comes with the lab extra
                return
            self._p = _RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=False,
            )

    def __enter__(self) -> Progress:
        if self._p is not None:
            self._p.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._p is not None:
            self._p.stop()

    def add(self, description: str, total: int | None) -> int:
        """Add a bar (``total=None``: length unknown); returns its id (``-1`` when quiet)."""
        return self._p.add_task(description, total=total, info="") if self._p is not None else -1

    def advance(self, task: int, n: int = 1, info: str | None = None) -> None:
        """Advance a bar by ``n``; ``info`` replaces its short status text."""
        if self._p is not None:
            kw = {"info": info} if info is not None else {}
            self._p.update(task, advance=n, **kw)

    def reset(self, task: int, total: int, description: str | None = None) -> None:
        """Restart a bar at 0 with a new total (e.g. the epoch bar at each run)."""
        if self._p is not None:
            kw = {"description": description} if description is not None else {}
            self._p.reset(task, total=total, info="", **kw)

    def remove(self, task: int) -> None:
        """Remove a finished bar (e.g. a worker's run)."""
        if self._p is not None:
            self._p.remove_task(task)

    def log(self, message: str) -> None:
        """Print a line above the bars (stderr); nothing when quiet."""
        if self._p is not None:
            self._p.console.print(message)
