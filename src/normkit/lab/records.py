"""Runs are records: every experiment writes ``<root>/<experiment>-<timestamp>/``.

A run folder holds:

* ``manifest.json``: the run's ``status``: ``"running"`` from the start, then ``"finished"``,
  ``"interrupted"`` (Ctrl-C, or SIGTERM: then also ``"signal": "SIGTERM"``) or ``"failed"`` (with the
  error); ``normkit report`` reads only finished runs unless asked for all (a manifest that is not a
  JSON object reads as ``"unreadable"``);
* ``config.json``: the resolved configuration (every default filled in);
* ``env.json``: the command line (``argv``) and what explains a difference between two machines:
  CPU model and cores, load at the start, torch / numpy / normkit / Python versions, threads, BLAS,
  git revision and whether the tree was dirty, device;
* ``metrics.jsonl``: one JSON object per line (per epoch, per layer, per step: whatever the
  experiment measures). No wall-clock times go in it, so the same seed gives the same file;
* ``results.json``: the aggregated numbers the summary is made of;
* ``timing.json``: wall-clock seconds (kept apart from the metrics on purpose);
* ``summary.md``: a Markdown table a person can read, with the pass criteria checked;
* ``*.png``: the plots.

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as root:
    ...     rec = RunRecord.create(root, "demo", {"seed": 0})
    ...     rec.log(epoch=1, loss=0.5)
    ...     rec.path.name.startswith("demo-"), (rec.path / "metrics.jsonl").read_text()
    (True, '{"epoch": 1, "loss": 0.5}\\n')
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "STATUSES",
    "RunInterrupted",
    "RunRecord",
    "Terminated",
    "check_writable",
    "cpu_model",
    "environment",
    "git_revision",
    "git_state",
    "read_manifest",
    "read_metrics",
    "sigterm_interrupts",
    "to_jsonable",
]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread inside :func:`sigterm_interrupts`: a run stops as on Ctrl-C.

    A ``KeyboardInterrupt``, so every ``except KeyboardInterrupt`` and ``finally`` that cleans up after
    Ctrl-C (worker processes, queues, the run's ``manifest.json``) does so for SIGTERM too.
    """

    signum = int(signal.SIGTERM)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped a run; ``path`` is its folder (marked ``interrupted``), ``done``/``total``
    what finished, ``signum`` the signal (``signal.SIGINT`` for Ctrl-C, ``signal.SIGTERM``)."""

    def __init__(
        self,
        path: Path | None,
        done: int | None = None,
        total: int | None = None,
        signum: int = int(signal.SIGINT),
    ) -> None:
        super().__init__(str(path))
        self.path, self.done, self.total, self.signum = path, done, total, int(signum)


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Inside the block SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``) instead of ending the
    process on the spot, so that a run stopped by ``kill``, ``timeout`` or a job scheduler cleans up and
    marks its folder ``interrupted`` as on Ctrl-C; the previous handler is restored on exit.

    Only in the main thread and only where SIGTERM has its default action: a program's own handler (or
    ``SIG_IGN``) is left alone, and nested blocks are no-ops.

    Example:
        >>> import signal
        >>> before = signal.getsignal(signal.SIGTERM)
        >>> with sigterm_interrupts():      # here SIGTERM raises Terminated (where it had its default action)
        ...     pass
        >>> signal.getsignal(signal.SIGTERM) is before, issubclass(Terminated, KeyboardInterrupt)
        (True, True)
    """
    if not _main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        if _converting_sigterm():  # (a handler the block itself set stays)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _converting_sigterm() -> bool:
    return signal.getsignal(signal.SIGTERM) is _raise_terminated


@contextmanager
def _sigterm_deferred() -> Iterator[None]:
    """While SIGTERM raises :class:`Terminated`, hold it back during the block and raise it after (for a step
    that must not be cut in two, such as starting worker processes). Elsewhere a no-op."""
    if not _main_thread() or not _converting_sigterm():
        yield
        return
    pending: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, _raise_terminated)
        if pending:
            raise Terminated()


#: The values of ``manifest.json``'s ``status``.
STATUSES = ("running", "finished", "interrupted", "failed")


def to_jsonable(obj: Any) -> Any:
    """Tensors, tuples, paths and non-finite floats made JSON-safe (NaN/inf become strings).

    Example:
        >>> to_jsonable({"a": torch.tensor(1.5), "b": (1, float("nan"))})
        {'a': 1.5, 'b': [1, 'nan']}
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.item() if obj.numel() == 1 else obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, Path):
        return str(obj)
    item = getattr(obj, "item", None)
    if callable(item):  # numpy scalars
        return to_jsonable(item())
    return obj


def git_state(cwd: str | Path | None = None) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the source tree (tracked files only), or ``(None, None)`` outside git.

    Example:
        >>> sha, dirty = git_state("/")
        >>> sha is None or len(sha) == 40
        True
    """
    where = Path(cwd) if cwd is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None, None
    return sha, bool(dirty)


def git_revision(cwd: str | Path | None = None) -> str | None:
    """The git commit of the source tree (``"<sha>+dirty"`` with uncommitted changes), or ``None``."""
    sha, dirty = git_state(cwd)
    return None if sha is None else (f"{sha}+dirty" if dirty else sha)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`), ``"unknown"`` if
    neither says.

    Example:
        >>> isinstance(cpu_model(), str) and cpu_model() != ""
        True
    """
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _blas() -> str | None:
    """The BLAS torch was built with (``BLAS_INFO`` of ``torch.__config__.show()``, e.g. ``"mkl"``)."""
    import re

    match = re.search(r"\bBLAS_INFO=([^,\s]+)", torch.__config__.show())
    return match.group(1) if match else None


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def environment(device: str | torch.device = "cpu", world_size: int = 1, **extra: Any) -> dict[str, Any]:
    """What explains a difference between two runs: hardware, load, versions, threads, BLAS, git state.

    ``extra`` (e.g. the parallelism an experiment chose) is added as is.

    Example:
        >>> env = environment(jobs=2)
        >>> env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads() and env["jobs"]
        2
        >>> {"cpu_model", "cpu_count", "numpy", "blas", "git", "git_dirty", "load_avg"} <= set(env)
        True
    """
    import numpy

    from .. import __version__

    dev = torch.device(device)
    sha, dirty = git_state()
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # pragma: no cover - not Unix
        load = None
    env: dict[str, Any] = {
        "normkit": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": _usable_cpus(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_avg": load,
        "threads": torch.get_num_threads(),
        "blas": _blas(),
        "device": str(dev),
        "world_size": world_size,
        "git": sha,
        "git_dirty": dirty,
        "argv": sys.argv,
    }
    if dev.type == "cuda" and torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(dev)
    env.update(extra)
    return env


def check_writable(root: str | Path, flag: str = "--out", what: str = "the runs folder") -> Path:
    """Make sure run folders can be written under ``root`` before any work starts; leaves nothing behind.

    ``root`` may not exist yet: then its nearest existing parent must be a folder in which a folder
    can be made (the run creates the rest). That is tried, not only read from the permissions: a
    probe folder is made there and removed at once (a read-only mount, or ``/proc``, refuses it).
    ``flag`` and ``what`` name the option and the folder in the message.

    Raises:
        ValueError: one line naming the folder and what is wrong (a file in the way, no permission, ...).

    Example:
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = pathlib.Path(d, "f").write_text("x")
        ...     check_writable(pathlib.Path(d, "f", "runs"))
        Traceback (most recent call last):
        ...
        ValueError: --out ...: cannot create the runs folder: ... is a file, not a folder
    """
    root = Path(root)
    existing = next(p for p in [root, *root.absolute().parents] if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        raise ValueError(
            f"{flag} {str(root)!r}: cannot create {what}: {str(existing)!r} is a file, not a folder"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"{flag} {str(root)!r}: cannot write {what} there: {str(existing)!r} is not writable"
        )
    import tempfile

    try:  # os.access says yes to root everywhere: try it
        probe = tempfile.mkdtemp(prefix=".normkit-check-", dir=existing)
    except OSError as e:
        raise ValueError(
            f"{flag} {str(root)!r}: cannot create {what} {str(root)!r}: no folder can be made in "
            f"{str(existing)!r} ({e.strerror or e})"
        ) from None
    try:
        os.rmdir(probe)
    except OSError:  # pragma: no cover - made a moment ago by this process
        pass
    return root


def read_manifest(run: str | Path) -> dict[str, Any]:
    """A run folder's ``manifest.json``; a folder from before manifests counts as finished if it has
    ``summary.md``, and a manifest that is not a JSON object has the status ``"unreadable"``.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as root:
        ...     rec = RunRecord.create(root, "demo", {})
        ...     before = read_manifest(rec.path)["status"]
        ...     _ = rec.finish()
        ...     before, read_manifest(rec.path)["status"]
        ('running', 'finished')
    """
    run = Path(run)
    path = run / "manifest.json"
    if not path.is_file():  # a run from before manifests
        return {"status": "finished" if (run / "summary.md").is_file() else "failed", "legacy": True}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = None
    if isinstance(data, dict):
        return data
    return {"status": "unreadable", "error": "manifest.json is not a JSON object"}


@contextmanager
def _interrupts_ignored(active: bool = True) -> Iterator[None]:
    """Ignore Ctrl-C inside the block, and SIGTERM too where it raises :class:`Terminated` (inside
    :func:`sigterm_interrupts`): a second signal must not cut a clean-up short. Main thread only;
    elsewhere a no-op."""
    if not active or not _main_thread():
        yield
        return
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN)}
    if _converting_sigterm():
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@dataclass
class RunRecord:
    """A run folder and the writers for its files. Make one with :meth:`create`.

    Attributes:
        path: the run folder.
        started: ``time.perf_counter()`` at creation, for :meth:`finish`'s wall time.
        experiment: the experiment's name (``manifest.json``).
    """

    path: Path
    started: float = field(default_factory=time.perf_counter)
    experiment: str = ""

    @classmethod
    def create(
        cls, root: str | Path, experiment: str, config: dict[str, Any], env: dict[str, Any] | None = None
    ) -> RunRecord:
        """Make ``<root>/<experiment>-<YYYYmmdd-HHMMSS>[-k]/``; write ``manifest.json`` (running),
        ``config.json``, ``env.json``.

        Two runs started in the same second get ``-2``, ``-3``, ... suffixes.
        """
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for k in range(1, 1000):
            path = root / (f"{experiment}-{stamp}" + (f"-{k}" if k > 1 else ""))
            try:
                path.mkdir()
                break
            except FileExistsError:
                continue
        else:  # pragma: no cover
            raise RuntimeError(f"could not create a run folder under {root}")
        rec = cls(path, experiment=experiment)
        rec.set_status("running")
        rec.write_json("config.json", {"experiment": experiment, **config})
        rec.write_json("env.json", env if env is not None else environment())
        (path / "metrics.jsonl").touch()
        return rec

    def set_status(self, status: str, **info: Any) -> None:
        """Write ``manifest.json``: ``{"experiment", "status", "updated", **info}`` (atomically: a rename)."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        manifest = {
            "experiment": self.experiment or self.path.name.rsplit("-", 2)[0],
            "status": status,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **info,
        }
        tmp = self.path / ".manifest.json.tmp"
        tmp.write_text(json.dumps(to_jsonable(manifest), indent=2) + "\n")
        os.replace(tmp, self.path / "manifest.json")

    @contextmanager
    def guard(self) -> Iterator[RunRecord]:
        """Mark the run ``interrupted`` (Ctrl-C or SIGTERM, re-raised as :class:`RunInterrupted`) or
        ``failed`` (any other exception, re-raised as is) if the block raises.

        Inside the block SIGTERM stops the run as Ctrl-C does (:func:`sigterm_interrupts`, where SIGTERM
        has its default action), and the manifest also says ``"signal": "SIGTERM"``.

        Example:
            >>> import tempfile
            >>> with tempfile.TemporaryDirectory() as root:
            ...     rec = RunRecord.create(root, "demo", {})
            ...     try:
            ...         with rec.guard():
            ...             raise KeyboardInterrupt
            ...     except KeyboardInterrupt:
            ...         pass
            ...     read_manifest(rec.path)["status"]
            'interrupted'
        """
        with sigterm_interrupts():
            try:
                yield self
            except BaseException as e:
                interrupted = isinstance(e, KeyboardInterrupt)
                signum = int(getattr(e, "signum", signal.SIGINT))
                info: dict[str, Any] = (
                    {}
                    if interrupted
                    else {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
                )
                if isinstance(e, RunInterrupted) and e.total is not None:
                    info.update(done=e.done, total=e.total)
                else:  # keep the progress the run recorded while running (done / total trainings)
                    before = read_manifest(self.path)
                    info.update({k: before[k] for k in ("done", "total") if k in before})
                if interrupted and signum != signal.SIGINT:
                    info["signal"] = signal.Signals(signum).name
                # a second Ctrl-C (or SIGTERM) must not leave the status at "running"
                with _interrupts_ignored(interrupted):
                    try:
                        self.set_status("interrupted" if interrupted else "failed", **info)
                    except (
                        OSError
                    ):  # pragma: no cover - the folder went away; the original error matters more
                        pass
                if interrupted and not isinstance(e, RunInterrupted):
                    raise RunInterrupted(self.path, signum=signum) from None
                raise

    def log(self, **metrics: Any) -> None:
        """Append one JSON line to ``metrics.jsonl`` (keys in the order given), flushed to disk at once."""
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(to_jsonable(metrics)) + "\n")

    def log_many(self, rows: list[dict[str, Any]]) -> None:
        """Append several JSON lines in one write (one finished training: all of it or none)."""
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write("".join(json.dumps(to_jsonable(r)) + "\n" for r in rows))

    def rewrite_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Replace ``metrics.jsonl`` atomically with ``rows`` (a finished run puts them in a fixed order)."""
        tmp = self.path / ".metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(to_jsonable(r)) + "\n" for r in rows))
        os.replace(tmp, self.path / "metrics.jsonl")

    def write_json(self, name: str, obj: Any) -> Path:
        """Write ``obj`` as indented JSON to ``name`` in the run folder."""
        p = self.path / name
        p.write_text(json.dumps(to_jsonable(obj), indent=2) + "\n")
        return p

    def write_text(self, name: str, text: str) -> Path:
        """Write a text file (e.g. ``summary.md``) in the run folder."""
        p = self.path / name
        p.write_text(text if text.endswith("\n") else text + "\n")
        return p

    def finish(self, **timing: float) -> float:
        """Write ``timing.json`` (total wall seconds plus any named timings), mark the run finished; return
        the total."""
        total = time.perf_counter() - self.started
        self.write_json(
            "timing.json", {"wall_s": round(total, 3), **{k: round(v, 3) for k, v in timing.items()}}
        )
        self.set_status("finished")
        return total


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read a run's ``metrics.jsonl`` (or the file itself) into a list of dicts."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
