"""Plumbing shared by the experiments: device and threads, seeds, statistics, Markdown tables, run folders."""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..records import RunRecord, environment

__all__ = [
    "config_dict",
    "fmt",
    "markdown_table",
    "mean_std",
    "resolve_device",
    "set_threads",
    "start_record",
    "verdict",
]


def resolve_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Under ``torchrun`` a bare ``"cuda"`` becomes ``cuda:<LOCAL_RANK>``.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    name = name.strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available here; use --device cpu")
        if name == "cuda" and local_rank is not None:
            name = f"cuda:{local_rank}"
    elif name != "cpu":
        raise ValueError(f"unknown device {name!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return torch.device(name)


def set_threads(threads: int) -> None:
    """``torch.set_num_threads`` (the lab's default is 2, the machine these numbers come from)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``nan`` with fewer than 2 values).

    Example:
        >>> mean_std([1.0, 3.0])
        (2.0, 1.4142135623730951)
        >>> mean_std([5.0])
        (5.0, nan)
    """
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else float("nan"))


def fmt(mean: float | None, std: float | None = None, digits: int = 2) -> str:
    """``"1.25 ± 0.10"``; ``"1.25"`` without a spread; ``"–"`` for a missing value.

    Example:
        >>> fmt(1.25, 0.1), fmt(1.25, float("nan")), fmt(None)
        ('1.25 ± 0.10', '1.25', '–')
    """
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    s = f"{mean:.{digits}f}"
    if std is not None and math.isfinite(std):
        s += f" ± {std:.{digits}f}"
    return s


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table.

    Example:
        >>> print(markdown_table(["a", "b"], [[1, "x"]]))
        | a | b |
        |---|---|
        | 1 | x |
    """
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def verdict(ok: bool | None) -> str:
    """``"MET"`` / ``"NOT MET"`` / ``"n/a"``."""
    return "n/a" if ok is None else ("MET" if ok else "NOT MET")


def config_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as a plain dict (tuples become lists)."""
    if not is_dataclass(cfg):
        raise TypeError(f"expected a dataclass config, got {type(cfg).__name__}")
    out = asdict(cfg)
    for f in fields(cfg):
        if isinstance(out[f.name], tuple):
            out[f.name] = list(out[f.name])
    return out


def start_record(out: str | Path, experiment: str, cfg: Any, device: torch.device, world_size: int = 1) -> RunRecord:
    """Create the run folder with the resolved config and the environment."""
    return RunRecord.create(out, experiment, config_dict(cfg), environment(device, world_size))


def distributed_env() -> tuple[int, int, int]:
    """``(world_size, rank, local_rank)`` from torchrun's environment variables (``(1, 0, 0)`` outside torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local
