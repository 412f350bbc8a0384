"""Plumbing shared by the experiments: configs and their command-line options, device and threads,
statistics, Markdown tables, run folders.

Every experiment's configuration is a dataclass deriving from :class:`LabConfig`, and it is the
single source of its options: each field carries its help text and its checks (:func:`opt`),
``normkit <experiment>``'s options are generated from the fields (:func:`add_config_arguments`),
and :meth:`LabConfig.validate` checks every field, before any data is loaded or any folder made,
with one line per problem naming the option. Checks that need the data (batch sizes against the
number of samples, norm specs against the model's channel counts) are in ``check_data``, which runs
after loading and still before the run folder is created.

Example:
    >>> import argparse
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Demo(LabConfig):
    ...     epochs: int = opt(3, "epochs per run", min=1)
    ...     lrs: list[float] = opt([0.1, 0.1, 0.2], "LR grid", min=0, min_open=True)
    >>> p = argparse.ArgumentParser(prog="demo")
    >>> add_config_arguments(p, Demo)
    >>> cfg = config_from_args(Demo, p.parse_args(["--epochs", "2", "--out", "/tmp"]))
    >>> cfg.epochs, cfg.lrs
    (2, [0.1, 0.1, 0.2])
    >>> cfg.validate().lrs                            # duplicates dropped
    [0.1, 0.2]
    >>> Demo(epochs=0).validate()
    Traceback (most recent call last):
    ...
    normkit.lab.experiments._common.ConfigError: --epochs must be >= 1, got 0
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch

from ... import kernels
from ..records import RunInterrupted, RunRecord, check_writable, environment

__all__ = [
    "DIVERGE_FACTOR",
    "ConfigError",
    "LabConfig",
    "RunInterrupted",
    "check_norm_fits",
    "add_config_arguments",
    "config_from_args",
    "free_cores",
    "opt",
    "parse_auto_int",
    "resolve_threads",
    "config_dict",
    "fmt",
    "markdown_table",
    "mean_std",
    "resolve_device",
    "set_threads",
    "start_record",
    "verdict",
]


#: A training whose loss exceeds this many times the untrained loss (max of its first batch's and
#: ln(classes)) counts as diverged, like one whose loss is not finite: ``compare`` does not report its
#: error rate and ``landscape``'s criteria on it read n/a.
DIVERGE_FACTOR = 100.0


class ConfigError(ValueError):
    """A setting is out of range or inconsistent; the message names the option, what was expected and what
    came."""


def _norm_specs(norms: list[str], at_least: int = 1, what: str = "") -> list[str]:
    """Normalise and de-duplicate norm specs (the one place they are parsed); ConfigError for an unknown
    one."""
    from ..models import check_norm_spec

    try:
        out = list(dict.fromkeys(check_norm_spec(n) for n in norms))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--norms: {e}") from None
    if len(out) < at_least:
        raise ConfigError(f"--norms {','.join(out)}: {what}")
    return out


def check_norm_fits(norm: str, build: Callable[[], Any], what: str) -> None:
    """Build a model with ``norm`` (cheap: small nets) so a spec that does not fit its channel counts fails up
    front.

    Example:
        >>> from normkit.lab.models import CNN4
        >>> check_norm_fits("gn:3", lambda: CNN4("gn:3"), "CNN-4")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        normkit.lab.experiments._common.ConfigError: --norms 'gn:3' does not fit CNN-4: ...
    """
    try:
        build()
    except Exception as e:  # any construction failure is a bad setting here
        raise ConfigError(f"--norms {norm!r} does not fit {what}: {e}") from None


def opt(
    default: Any,
    help: str,
    *,
    min: float | None = None,
    max: float | None = None,
    min_open: bool = False,
    max_open: bool = False,
    choices: Sequence[Any] | None = None,
    metavar: str | None = None,
    parse: Callable[[str], Any] | None = None,
    unique: bool = True,
    nonempty: bool = True,
) -> Any:
    """A config field with its command-line help and its checks.

    Args:
        default: the default (lists are copied per instance).
        help: the option's help text; ``(default: ...)`` is appended.
        min, max: bounds of the value (of every element, for a list); ``min_open`` / ``max_open``: strict
            bounds.
        choices: allowed values (of every element, for a list).
        metavar: the option's metavar.
        parse: parser of one command-line value (or one list element); default from the field's type.
        unique: lists: drop repeated elements (keeping the first).
        nonempty: lists: at least one element.
    """
    meta = {
        "help": help,
        "min": min,
        "max": max,
        "min_open": min_open,
        "max_open": max_open,
        "choices": choices,
        "metavar": metavar,
        "parse": parse,
        "unique": unique,
        "nonempty": nonempty,
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_auto_int(text: str) -> int | None:
    """A command-line count that may be ``auto`` (``None``: let the experiment choose).

    Example:
        >>> parse_auto_int("auto"), parse_auto_int("3")
        (None, 3)
    """
    if text.strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        # (argparse prints this message; a bare ValueError would name this function instead)
        raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', got {text!r}") from None


def _fmt_default(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    if value is None:
        return "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass
class LabConfig:
    """The settings every experiment shares (the ``common`` options of ``normkit <experiment>``).

    Attributes:
        data: data set spec (:func:`normkit.lab.data.load_dataset`).
        limit_train, limit_test: use only the first N samples (quick runs).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        threads: torch intra-op threads; ``None`` (``auto``): the cores free when the run starts, so
            that a busy process already running costs the run no more than its core
            (:func:`resolve_threads`); the choice is recorded in ``env.json``.
        out: runs root; each run writes ``out/<experiment>-<timestamp>/``.
        quiet: no progress bars.
    """

    data: str = opt(
        "digits",
        "data set: 'digits' (scikit-learn, no download), 'digitsN' (upsampled to NxN, 8..64), "
        "'cifar10:PATH' (CIFAR-10 python batches), 'synthetic'",
    )
    limit_train: int | None = opt(None, "use only the first N training samples", min=1, metavar="N")
    limit_test: int | None = opt(None, "use only the first N test samples", min=1, metavar="N")
    device: str = opt("auto", "auto (CUDA if available), cpu, cuda, cuda:N")
    threads: int | None = opt(
        None,
        "torch intra-op threads, or 'auto': the cores free at the start",
        min=1,
        parse=parse_auto_int,
        metavar="N|auto",
    )
    out: str = opt("runs", "runs root; each run writes DIR/<experiment>-<timestamp>/", metavar="DIR")
    quiet: bool = opt(False, "no progress bars")

    def validate(self) -> LabConfig:
        """Check every field against its :func:`opt` bounds and choices, drop repeated list elements, check
        the
        data spec and that ``out`` is writable; then the experiment's own checks (:meth:`_check`). Returns
        ``self``.

        Raises:
            ConfigError: the first problem, one line naming the option.
        """
        from ..data import check_data_spec

        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            meta = f.metadata
            if not meta:
                continue
            value = getattr(self, f.name)
            flag = _flag(f.name)
            kind = hints.get(f.name)
            if value is None:
                if type(None) not in typing.get_args(kind):
                    raise ConfigError(f"{flag} must be set, got None")
                continue
            if isinstance(value, (list, tuple)):
                if meta.get("nonempty") and not value:
                    raise ConfigError(f"{flag} must list at least one value")
                items = list(value)
                if meta.get("unique"):
                    items = list(dict.fromkeys(items))
                setattr(self, f.name, items)
            else:
                items = [value]
            for v in items:
                _check_value(flag, v, meta)
        check_data_spec(self.data)
        resolve_device(self.device)
        try:  # a bad NORMKIT_BACKEND: refused here, not at the first norm of a started run
            kernels.current()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        check_writable(self.out)
        self._check()
        return self

    def _check(self) -> None:
        """The experiment's own checks (override); raise :class:`ConfigError`."""

    def check_data(self, data: Any) -> None:
        """Checks against the loaded data (override): batch sizes, channel counts; raise
        :class:`ConfigError`."""


def _check_value(flag: str, v: Any, meta: Any) -> None:
    choices = meta.get("choices")
    if choices is not None and v not in choices:
        raise ConfigError(f"{flag} must be one of {', '.join(map(str, choices))}, got {v!r}")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return
    if not math.isfinite(v):
        raise ConfigError(f"{flag} must be a finite number, got {v}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None:
        if meta.get("min_open") and not v > lo:
            raise ConfigError(f"{flag} must be > {lo:g}, got {v:g}")
        if not meta.get("min_open") and not v >= lo:
            raise ConfigError(f"{flag} must be >= {lo:g}, got {v:g}")
    if hi is not None:
        if meta.get("max_open") and not v < hi:
            raise ConfigError(f"{flag} must be < {hi:g}, got {v:g}")
        if not meta.get("max_open") and not v <= hi:
            raise ConfigError(f"{flag} must be <= {hi:g}, got {v:g}")


def _csv(kind: Callable[[str], Any], name: str) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        try:
            return [kind(t) for t in items]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"bad list {text!r}: {e}") from e

    parse.__name__ = f"list of {name}"
    return parse


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """Add one ``--option`` per field of the config dataclass ``cls`` (its own first, then a ``common``
    group).

    Types come from the annotations (``int``, ``float``, ``str``, ``bool`` flags, ``X | None``, ``list[X]``
    as comma-separated values); help, metavar and choices from :func:`opt`. Range checks are left to
    :meth:`LabConfig.validate`, so the command line and the Python API check the same way.
    """
    hints = typing.get_type_hints(cls)
    common_names = {f.name for f in fields(LabConfig)}
    common = parser.add_argument_group("common")
    for f in sorted(fields(cls), key=lambda f: f.name in common_names):
        if f.name in skip or not f.metadata:
            continue
        meta = f.metadata
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:  # every option needs a default (the parser's default); calling MISSING failed the same way
            raise TypeError(f"{cls.__name__}.{f.name}: a lab option needs a default or a default_factory")
        kind = hints[f.name]
        args = [t for t in typing.get_args(kind) if t is not type(None)]
        base = args[0] if args and typing.get_origin(kind) is not list else kind
        target = common if f.name in common_names else parser
        help_text = meta["help"]
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        if base is bool:
            if default:
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["action"] = "store_true"
            target.add_argument(_flag(f.name), help=help_text, **kw)
            continue
        if typing.get_origin(base) is list:
            elem = typing.get_args(base)[0]
            kw["type"] = _csv(meta["parse"] or elem, elem.__name__)
        else:
            kw["type"] = meta["parse"] or base
        if meta["metavar"]:
            kw["metavar"] = meta["metavar"]
        if meta["choices"] is not None and typing.get_origin(base) is not list:
            kw["choices"] = list(meta["choices"])
        shown = "auto" if meta["parse"] is parse_auto_int and default is None else _fmt_default(default)
        target.add_argument(_flag(f.name), help=f"{help_text} (default: {shown})", **kw)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """The config ``cls`` with the options given on the command line; the dataclass's defaults for the
    rest."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def free_cores(sample_s: float = 0.25) -> tuple[int, float]:
    """``(free, busy)``: usable cores not busy with other processes now, measured over ``sample_s`` seconds.

    Reads ``/proc/stat`` twice (Linux); elsewhere it falls back to the 1-minute load average.
    ``free`` is at least 1.

    Example:
        >>> free, busy = free_cores(0.05)
        >>> 1 <= free <= (os.cpu_count() or 1) and busy >= 0
        True
    """
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        usable = os.cpu_count() or 1

    def snapshot() -> tuple[int, int]:
        vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
        return sum(vals[:8]), idle

    try:
        t0, i0 = snapshot()
        time.sleep(sample_s)
        t1, i1 = snapshot()
        ncpu = os.cpu_count() or usable
        busy = ncpu * (1.0 - (i1 - i0) / max(t1 - t0, 1))
    except (OSError, ValueError, IndexError):
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):  # pragma: no cover
            busy = 0.0
    busy = max(0.0, busy)
    return max(1, min(usable, usable - int(round(busy)))), busy


def resolve_threads(threads: int | None) -> tuple[int, str]:
    """The intra-op threads to use and why: ``threads`` if given, else the cores free now
    (:func:`free_cores`).

    A multi-threaded run slows down 10x and more when another process takes one of its cores
    (its OpenMP threads wait for each other), so by default a run takes only the cores that are free
    when it starts: a busy process already running then costs it nothing beyond its own core.

    Example:
        >>> resolve_threads(3)
        (3, '--threads 3')
    """
    if threads is not None:
        return threads, f"--threads {threads}"
    free, busy = free_cores()
    return free, f"auto: {free} free of {os.cpu_count()} cores (others' load {busy:.1f} cores at the start)"


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


def epochs_text(epochs: int, max_steps: int | None) -> str:
    """How long each training ran, for a summary: ``--max-steps`` named where it cut the epochs short.

    Example:
        >>> epochs_text(1, None), epochs_text(15, 2)
        ('1 epoch', '15 epochs capped at 2 optimizer step(s) (--max-steps)')
    """
    text = f"{epochs} epoch{'s' * (epochs != 1)}"
    return text + (f" capped at {max_steps} optimizer step(s) (--max-steps)" if max_steps else "")


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
    if not is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"expected a dataclass config instance, got {cfg!r}")
    out = asdict(cfg)
    for f in fields(cfg):
        if isinstance(out[f.name], tuple):
            out[f.name] = list(out[f.name])
    return out


def start_record(
    out: str | Path, experiment: str, cfg: Any, device: torch.device, world_size: int = 1, **env: Any
) -> RunRecord:
    """Create the run folder with the resolved config and the environment (plus ``env``: e.g. the parallelism
    chosen)."""
    return RunRecord.create(out, experiment, config_dict(cfg), environment(device, world_size, **env))


def distributed_env() -> tuple[int, int, int]:
    """``(world_size, rank, local_rank)`` from torchrun's environment variables (``(1, 0, 0)`` outside
    torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local
