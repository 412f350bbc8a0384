"""Runs are records: every experiment writes ``<root>/<experiment>-<timestamp>/`` (ARCHITECTURE.md §7).

A run folder holds:

* ``config.json``: the resolved configuration (every default filled in) and the command line;
* ``env.json``: torch and Python versions, threads, device, git revision, host;
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
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["RunRecord", "environment", "git_revision", "read_metrics", "to_jsonable"]


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
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return to_jsonable(obj.item())
    return obj


def git_revision(cwd: str | Path | None = None) -> str | None:
    """The git commit of the source tree (``"<sha>+dirty"`` with uncommitted changes), or ``None``."""
    where = Path(cwd) if cwd is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=where, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}+dirty" if dirty else sha


def environment(device: str | torch.device = "cpu", world_size: int = 1) -> dict[str, Any]:
    """What a run needs recorded to be reproduced: versions, threads, device, git revision.

    Example:
        >>> env = environment()
        >>> env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads()
        True
    """
    from .. import __version__

    dev = torch.device(device)
    env: dict[str, Any] = {
        "normkit": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(dev),
        "world_size": world_size,
        "git": git_revision(),
        "argv": sys.argv,
    }
    if dev.type == "cuda" and torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(dev)
    return env


@dataclass
class RunRecord:
    """A run folder and the writers for its files. Make one with :meth:`create`.

    Attributes:
        path: the run folder.
        started: ``time.perf_counter()`` at creation, for :meth:`finish`'s wall time.
    """

    path: Path
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def create(
        cls, root: str | Path, experiment: str, config: dict[str, Any], env: dict[str, Any] | None = None
    ) -> RunRecord:
        """Make ``<root>/<experiment>-<YYYYmmdd-HHMMSS>[-k]/`` and write ``config.json`` and ``env.json``.

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
        rec = cls(path)
        rec.write_json("config.json", {"experiment": experiment, **config})
        rec.write_json("env.json", env if env is not None else environment())
        (path / "metrics.jsonl").touch()
        return rec

    def log(self, **metrics: Any) -> None:
        """Append one JSON line to ``metrics.jsonl`` (keys in the order given)."""
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(to_jsonable(metrics)) + "\n")

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
        """Write ``timing.json`` (total wall seconds plus any named timings); return the total."""
        total = time.perf_counter() - self.started
        self.write_json("timing.json", {"wall_s": round(total, 3), **{k: round(v, 3) for k, v in timing.items()}})
        return total


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read a run's ``metrics.jsonl`` (or the file itself) into a list of dicts."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
