"""E1 / E3: train small CNNs with each norm across batch sizes and seeds; test error, mean ± std over seeds.

The lab's main job (``normkit compare``). For each model, batch size, norm and seed it trains
from scratch (SGD momentum 0.9, peak LR ``lr * B_global / 32`` -- Goyal et al.'s linear scaling
-- with a linear warm-up and a cosine decay, weight decay 5e-4) and measures the test error in
eval mode (BN uses its running statistics) and, for BN, with batch statistics in test batches of
the training batch size. It then checks the pass criteria of docs/EXPERIMENTS.md, E1 and E3:

* E1 (i) BN's error at the smallest batch >= its error at the largest + 3 pt;
  (ii) each batch-independent norm within ±1.5 pt between the largest and smallest batch;
  (iii) GN − BN >= −0.5 pt at the largest batch ("positive or ≈ 0") and <= −1 pt at the smallest
  ("clearly negative").
* E3 (at the largest batch, where present): LN+PN <= LN, GN(4)+PN <= GN(8), |LN+PN − BN| <= 1 pt,
  IN within 0.5 pt of the worst.

Under ``torchrun --nproc-per-node N`` it runs data-parallel (gloo on CPU, nccl on GPU) with
DistributedDataParallel; ``batch_size`` is per process and BN statistics are per process, or,
with ``sync_bn`` (``--sync-bn``), over the global batch of all processes: every BN layer becomes a
:class:`normkit.nn.SyncBatchNorm` (:func:`normkit.convert_sync_batchnorm`; models without BN are
unchanged).
"""

from __future__ import annotations

import datetime
import math
import os
import pickle
import queue as queue_lib
import signal
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...nn.registry import register_norm, user_registered
from ..data import load_dataset
from ..models import MODEL_NAMES, build_model, is_instance_norm, is_post, split_post
from ..progress import Progress
from ..records import _interrupts_ignored, _sigterm_deferred
from ..train import TrainConfig, has_batch_stats, set_seed, train_classifier
from ._common import (
    DIVERGE_FACTOR,
    ConfigError,
    LabConfig,
    RunInterrupted,
    _norm_specs,
    check_norm_fits,
    distributed_env,
    epochs_text,
    fmt,
    markdown_table,
    mean_std,
    opt,
    parse_auto_int,
    resolve_device,
    set_threads,
    start_record,
    verdict,
)

__all__ = [
    "CompareConfig",
    "CompareOutcome",
    "NotAvailableError",
    "e1_criteria",
    "e3_criteria",
    "run_compare",
]


class NotAvailableError(RuntimeError):
    """A requested feature is not available here (e.g. torch.distributed missing from the torch build)."""


@dataclass
class CompareConfig(LabConfig):
    """Configuration of ``normkit compare`` (defaults: the main job, < 10 min on 2 CPU cores).

    Every field is also a command-line option (``--batch-sizes 32,8``); :meth:`validate` checks them all.

    Attributes:
        models: ``"cnn4-head"`` (CNN-4 + Linear(64->64)-norm-ReLU head, where BN pools over B values),
            ``"cnn4"``, ``"resnet"`` (small pre-activation ResNet).
        norms: registry specs; ``post:`` before one (``"post:bn"``) puts the norm after the activation
            (docs/EXPERIMENTS.md, "Norm before or after the activation"). E1/E3's criteria take the
            plain specs as BN, GN, LN, IN; a ``post:`` spec enters only E1 (ii), when batch-independent.
        batch_sizes: samples per step per process.
        seeds: one training run per seed.
        epochs: passes over the training set per run.
        lr: peak learning rate at a global batch of 32 (scaled linearly with the global batch).
        warmup_epochs: linear warm-up length, epochs.
        momentum: SGD momentum.
        weight_decay: L2 on conv/linear weights (and Proxy Norm's proxy parameters).
        schedule: ``"cosine"`` or ``"constant"``.
        max_steps: cap on optimizer steps per run (quick runs), ``None`` for none.
        jobs: runs trained in parallel one-thread worker processes (CPU only; 1 under torchrun or on
            GPU); ``None``: one per usable core. One-thread workers are what makes the run
            load-proof: another busy process costs it one core's share, where one two-thread process
            slows 10x and more (measured: docs/RESULTS.md).
        threads: torch intra-op threads per worker process; ``None``: 1 (under torchrun: the cores
            divided among the processes on this node).
        sync_bn: synchronise BN statistics across processes: BN layers become
            :class:`normkit.nn.SyncBatchNorm` (with one process that is plain BN).
        data, limit_train, limit_test, device, out, quiet: as in :class:`LabConfig`.
    """

    models: list[str] = opt(
        ["cnn4-head"],
        "cnn4-head (CNN-4 + Linear-norm-ReLU head), cnn4, resnet (pre-activation ResNet)",
        choices=MODEL_NAMES,
    )
    norms: list[str] = opt(
        ["bn", "gn:8", "ln+pn"],
        "registry specs, e.g. bn,gn:8,ln,in,ln+pn,gn:4+pn; post:SPEC puts the norm after the activation",
    )
    batch_sizes: list[int] = opt([32, 8, 2], "per-process batch sizes", min=1)
    seeds: list[int] = opt([0, 1], "seeds, one run each", min=0)
    epochs: int = opt(8, "epochs per run", min=1)
    lr: float = opt(0.05, "peak LR at a global batch of 32, scaled linearly", min=0, min_open=True, max=100)
    warmup_epochs: float = opt(1.0, "linear warm-up, epochs", min=0)
    momentum: float = opt(0.9, "SGD momentum", min=0, max=1, max_open=True)
    weight_decay: float = opt(5e-4, "weight decay", min=0)
    schedule: str = opt("cosine", "LR schedule", choices=("cosine", "constant"))
    max_steps: int | None = opt(
        None, "stop each run after N optimizer steps (quick runs)", min=1, metavar="N"
    )
    jobs: int | None = opt(
        None,
        "runs in parallel one-thread worker processes, CPU only, or 'auto': one per core",
        min=1,
        parse=parse_auto_int,
        metavar="N|auto",
    )
    threads: int | None = opt(
        None,
        "torch intra-op threads per worker process, or 'auto': 1 per worker (under "
        "torchrun: the cores divided among the local processes)",
        min=1,
        parse=parse_auto_int,
        metavar="N|auto",
    )
    sync_bn: bool = opt(
        False,
        "under torchrun: BN statistics over all processes' batches "
        "(BN layers become normkit.nn.SyncBatchNorm)",
    )

    def validate(self) -> CompareConfig:
        """Check every setting (see :class:`LabConfig`); norm specs are normalised here, once.

        Raises:
            ConfigError: one line naming the option.

        Example:
            >>> CompareConfig(norms=["BN", "bn", "gn:8"], batch_sizes=[8, 8, 2]).validate().norms
            ['bn', 'gn:8']
            >>> CompareConfig(momentum=5).validate()
            Traceback (most recent call last):
            ...
            normkit.lab.experiments._common.ConfigError: --momentum must be < 1, got 5
        """
        super().validate()
        return self

    def _check(self) -> None:
        self.norms = _norm_specs(self.norms)
        if any(b < 2 for b in self.batch_sizes) and any(_batch_dependent(n) for n in self.norms):
            raise ConfigError(
                f"--batch-sizes {_csv_text(self.batch_sizes)}: batch size 1 cannot train BN (one value per "
                "channel); use batch sizes >= 2"
            )
        for m in self.models:
            for n in self.norms:
                check_norm_fits(n, lambda m=m, n=n: build_model(m, n), m)

    def check_data(self, data: Any, world: int = 1) -> None:
        """Batch sizes (times the processes) against the training samples; norms against the data's
        channels."""
        n = len(data.x_train)
        too_big = [b for b in self.batch_sizes if b * world > n]
        if too_big:
            raise ConfigError(
                f"--batch-sizes {_csv_text(self.batch_sizes)}: {too_big[0]}"
                + (f" x {world} processes" if world > 1 else "")
                + f" exceeds the {n} training samples of {data.name}"
            )
        if len(data.x_test) < 2:  # BN's test error with batch statistics needs two values per channel
            batch = [
                norm
                for norm in self.norms
                if has_batch_stats(build_model(self.models[0], norm, data.in_channels, data.num_classes))
            ]
            if batch:
                raise ConfigError(
                    f"--limit-test {len(data.x_test)}: {batch[0]} is also evaluated with batch statistics, "
                    "which needs at least 2 test samples; use --limit-test 2 or more"
                )
        if data.in_channels != 1 or data.num_classes != 10:
            for m in self.models:
                for norm in self.norms:
                    check_norm_fits(
                        norm,
                        lambda m=m, norm=norm: build_model(m, norm, data.in_channels, data.num_classes),
                        m,
                    )


def _csv_text(values: list[Any]) -> str:
    return ",".join(map(str, values))


@dataclass
class CompareOutcome:
    """What :func:`run_compare` returns (on rank 0; other ranks get ``path=None``).

    Attributes:
        path: the run folder.
        aggregate: one row per (model, norm, batch size) with means and spreads over seeds.
        summary: the Markdown summary (also in ``summary.md``).
    """

    path: Path | None
    aggregate: list[dict[str, Any]]
    summary: str


def _aggregate(finals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in finals:
        groups[(r["model"], r["norm"], r["batch_size"])].append(r)
    out = []
    for (model, norm, b), rs in groups.items():
        m, s = mean_std([r["test_err"] for r in rs])
        row: dict[str, Any] = {
            "model": model,
            "norm": norm,
            "batch_size": b,
            "lr": rs[0]["lr_peak"],
            "seeds": len(rs),
            "test_err_mean": m,
            "test_err_std": s,
            "train_loss_mean": mean_std([r["train_loss"] for r in rs])[0],
            "diverged": sum(bool(r["diverged"]) for r in rs),
        }
        bs = [r["test_err_batch_stats"] for r in rs if r.get("test_err_batch_stats") is not None]
        if bs:
            row["test_err_batch_stats_mean"], row["test_err_batch_stats_std"] = mean_std(bs)
        out.append(row)
    return out


def _row(agg: list[dict[str, Any]], model: str, norm: str, b: int) -> dict[str, Any] | None:
    """The aggregate row, or ``None`` when missing or when a seed diverged (its error rate means nothing)."""
    for r in agg:
        if r["model"] == model and r["norm"] == norm and r["batch_size"] == b:
            return None if r.get("diverged") else r
    return None


def _lookup(agg: list[dict[str, Any]], model: str, norm: str, b: int) -> float | None:
    r = _row(agg, model, norm, b)
    return None if r is None else r["test_err_mean"]


def _se(*rows: dict[str, Any]) -> float | None:
    """Standard error of a sum or difference of the rows' means (seeds independent); ``None`` with one
    seed."""
    total = 0.0
    for r in rows:
        std, n = r.get("test_err_std"), r.get("seeds", 1)
        if std is None or not math.isfinite(std) or n < 2:
            return None
        total += std * std / n
    return math.sqrt(total)


def _criterion(
    name: str, text: str, margins: list[tuple[float, float | None]] | None, detail: str
) -> dict[str, Any]:
    """A criterion from its margins (distance to each threshold, > 0 on the passing side) and their standard
    errors.

    ``ok``: every margin >= 0. ``holds``: the verdict is outside the seed noise: the deciding margin (the
    failing one, or the smallest when met) is more than 2 standard errors away from 0; ``None`` with one seed.
    """
    if margins is None:
        return {
            "name": name,
            "text": text,
            "ok": None,
            "detail": detail,
            "margin": None,
            "se": None,
            "holds": None,
        }
    ok = all(m >= 0 for m, _ in margins)
    deciding = [x for x in margins if (x[0] < 0) != ok] if not ok else margins
    m, se = min(deciding, key=lambda x: abs(x[0]))
    holds = None if se is None else abs(m) > 2 * se
    return {"name": name, "text": text, "ok": ok, "detail": detail, "margin": m, "se": se, "holds": holds}


def _diverged(agg: list[dict[str, Any]], model: str, norm: str, b: int) -> str:
    """``"k/n seeds"`` when k of the n seeds of that cell diverged, else ``""``."""
    for r in agg:
        if r["model"] == model and r["norm"] == norm and r["batch_size"] == b and r.get("diverged"):
            return f"{r['diverged']}/{r['seeds']} seeds"
    return ""


def _not_measurable(agg: list[dict[str, Any]], model: str, cells: list[tuple[str, int]]) -> str:
    why = [
        f"{n} B={b} diverged in {_diverged(agg, model, n, b)}"
        for n, b in cells
        if _diverged(agg, model, n, b)
    ]
    return "not measurable: " + ("; ".join(why) if why else "a cell is missing")


# Norms whose training output depends on the batch: E1 (ii) (batch independence) does not apply to them.
_BATCH_DEPENDENT = ("bn", "gbn", "brn", "syncbn")


def _family(norm: str) -> str:
    """``"bn"``, ``"gn"``, ``"ln+pn"``, ...; ``"post:bn"`` for a ``post:`` spec, so that the criteria's
    look-ups of BN, GN and IN (the norm before the activation) never take it."""
    post, norm = split_post(norm)
    base = norm.split(":")[0].split("+")[0]
    base = "bn" if base == "bn2d" else base  # (the documented alias: scored as BN)
    return ("post:" if post else "") + base + ("+pn" if norm.endswith("+pn") else "")


def _batch_dependent(norm: str) -> bool:
    """Whether the norm's training output depends on the batch (BN, ``post:bn`` alike)."""
    return _family(split_post(norm)[1]) in _BATCH_DEPENDENT


def _registry_specs(norms: list[str]) -> list[str]:
    """The registry specs behind the lab's specs (``post:`` dropped)."""
    return [split_post(n)[1] for n in norms]


def e1_criteria(agg: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    """E1's pass criteria (docs/EXPERIMENTS.md, E1) for one model, on the largest and smallest batch size.

    Returns one dict per criterion: ``name, text, ok`` (``None`` when not measurable: a run
    diverged, or only one batch size was run), ``detail`` (for ``None``: why), ``margin`` (distance
    to the threshold, > 0 on the passing side), ``se``
    (its standard error over seeds) and ``holds`` (``|margin| > 2 se``: the seeds' spread does not
    decide the verdict).

    Example:
        >>> rows = [{"model": "m", "norm": n, "batch_size": b, "test_err_mean": e, "test_err_std": 0.5,
        ...          "seeds": 4, "diverged": 0} for n, b, e in [("bn", 32, 1.0), ("bn", 2, 9.0)]]
        >>> c = e1_criteria(rows, "m")[0]
        >>> c["ok"], c["margin"], round(c["se"], 3), c["holds"]
        (True, 5.0, 0.354, True)
    """
    rows = [r for r in agg if r["model"] == model]
    sizes = sorted({r["batch_size"] for r in rows})
    out: list[dict[str, Any]] = []
    norms = list(dict.fromkeys(r["norm"] for r in rows))
    bn = next((n for n in norms if _family(n) == "bn"), None)
    gn = next((n for n in norms if _family(n) == "gn"), None)
    if len(sizes) == 1:  # each criterion compares a small batch with a large one: n/a, and why
        why = f"not measurable: needs two batch sizes, only B={sizes[0]} was run (--batch-sizes)"
        if bn is not None:
            out.append(
                _criterion("E1 (i)", "BN error at the smallest B >= BN at the largest B + 3 pt", None, why)
            )
        out += [
            _criterion("E1 (ii)", f"{n} at the smallest B within ±1.5 pt of the largest B", None, why)
            for n in norms
            if not _batch_dependent(n)
        ]
        if bn is not None and gn is not None:
            text = f"{gn} − BN >= −0.5 pt at the largest B and <= −1 pt at the smallest B"
            out.append(_criterion("E1 (iii)", text, None, why))
        return out
    if not sizes:
        return out
    lo, hi = sizes[0], sizes[-1]
    if bn is not None:
        a, b = _row(agg, model, bn, hi), _row(agg, model, bn, lo)
        if a is None or b is None:
            out.append(
                _criterion(
                    "E1 (i)",
                    f"BN error at B={lo} >= BN at B={hi} + 3 pt",
                    None,
                    _not_measurable(agg, model, [(bn, lo), (bn, hi)]),
                )
            )
        else:
            d = b["test_err_mean"] - a["test_err_mean"]
            out.append(
                _criterion(
                    "E1 (i)",
                    f"BN error at B={lo} >= BN at B={hi} + 3 pt",
                    [(d - 3.0, _se(a, b))],
                    f"{fmt(b['test_err_mean'])} vs {fmt(a['test_err_mean'])} "
                    f"({'+' if d >= 0 else ''}{fmt(d)} pt)",
                )
            )
    for n in norms:
        if _batch_dependent(n):
            continue
        a, b = _row(agg, model, n, hi), _row(agg, model, n, lo)
        text = f"{n} at B={lo} within ±1.5 pt of B={hi}"
        if a is None or b is None:
            out.append(_criterion("E1 (ii)", text, None, _not_measurable(agg, model, [(n, lo), (n, hi)])))
            continue
        d = b["test_err_mean"] - a["test_err_mean"]
        out.append(
            _criterion(
                "E1 (ii)",
                text,
                [(1.5 - abs(d), _se(a, b))],
                f"{fmt(b['test_err_mean'])} vs {fmt(a['test_err_mean'])} (diff {fmt(d)} pt)",
            )
        )
    if bn is not None and gn is not None:
        text = f"{gn} − BN >= −0.5 pt at B={hi} and <= −1 pt at B={lo}"
        g_hi, b_hi, g_lo, b_lo = (
            _row(agg, model, gn, hi),
            _row(agg, model, bn, hi),
            _row(agg, model, gn, lo),
            _row(agg, model, bn, lo),
        )
        if g_hi is None or b_hi is None or g_lo is None or b_lo is None:
            out.append(
                _criterion(
                    "E1 (iii)",
                    text,
                    None,
                    _not_measurable(agg, model, [(gn, hi), (bn, hi), (gn, lo), (bn, lo)]),
                )
            )
        else:
            d_hi = g_hi["test_err_mean"] - b_hi["test_err_mean"]
            d_lo = g_lo["test_err_mean"] - b_lo["test_err_mean"]
            out.append(
                _criterion(
                    "E1 (iii)",
                    text,
                    [(d_hi + 0.5, _se(g_hi, b_hi)), (-1.0 - d_lo, _se(g_lo, b_lo))],
                    f"{fmt(d_hi)} pt at B={hi}, {fmt(d_lo)} pt at B={lo}",
                )
            )
    return out


def e3_criteria(agg: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    """E3's (soft) pass criteria (docs/EXPERIMENTS.md, E3) at the largest batch size, for the norms that were
    run."""
    rows = [r for r in agg if r["model"] == model]
    if not rows:
        return []
    hi = max(r["batch_size"] for r in rows)
    at = {r["norm"]: r for r in rows if r["batch_size"] == hi and not r.get("diverged")}
    err = {n: r["test_err_mean"] for n, r in at.items()}
    out: list[dict[str, Any]] = []

    def add(text: str, margin: float, se: float | None, detail: str) -> None:
        out.append(_criterion("E3", f"{text} (B={hi})", [(margin, se)], detail))

    if "ln+pn" in err and "ln" in err:
        add(
            "LN+PN <= LN",
            err["ln"] - err["ln+pn"],
            _se(at["ln"], at["ln+pn"]),
            f"{fmt(err['ln+pn'])} vs {fmt(err['ln'])}",
        )
    gnpn = next((n for n in err if n in ("gn:4+pn", "gn+pn")), None)
    if gnpn and "gn:8" in err:
        add(
            f"{gnpn} <= gn:8",
            err["gn:8"] - err[gnpn],
            _se(at["gn:8"], at[gnpn]),
            f"{fmt(err[gnpn])} vs {fmt(err['gn:8'])}",
        )
    bn = next((n for n in err if _family(n) == "bn"), None)
    if "ln+pn" in err and bn is not None:
        add(
            "|LN+PN − BN| <= 1 pt",
            1.0 - abs(err["ln+pn"] - err[bn]),
            _se(at["ln+pn"], at[bn]),
            f"{fmt(err['ln+pn'])} vs {fmt(err[bn])}",
        )
    pre = [n for n in err if not is_post(n)]  # (E3 ranks the norms before the activation)
    inn = next((n for n in pre if is_instance_norm(n)), None)
    if inn and len(pre) > 2:
        worst = max(pre, key=lambda n: err[n])
        add(
            "IN is the worst or within 0.5 pt of it",
            err[inn] - err[worst] + 0.5,
            _se(at[inn], at[worst]),
            f"{fmt(err[inn])} vs worst {fmt(err[worst])}",
        )
    return out


def criterion_line(c: dict[str, Any]) -> str:
    """One Markdown bullet: the verdict, its numbers, and whether the seeds' spread could flip it.

    Example:
        >>> criterion_line({"name": "E1 (i)", "text": "t", "ok": True, "detail": "d", "margin": 5.0,
        ...                 "se": 0.4, "holds": True})
        '- E1 (i): t: **MET** (d; margin 5.00 pt, 2 SE 0.80 pt: holds over the seeds)'
    """
    if c.get("margin") is None:
        note = ""
    elif c.get("se") is None:
        note = f"; margin {c['margin']:.2f} pt, spread unknown (one seed)"
    else:
        note = f"; margin {c['margin']:.2f} pt, 2 SE {2 * c['se']:.2f} pt: " + (
            "holds over the seeds" if c["holds"] else "within the seeds' noise, not decided"
        )
    return f"- {c['name']}: {c['text']}: **{verdict(c['ok'])}** ({c['detail']}{note})"


def _summary(cfg: CompareConfig, agg: list[dict[str, Any]], data_desc: dict[str, Any], world: int) -> str:
    lines = [
        f"# compare: test error (%) on {data_desc['name']}",
        "",
        f"{data_desc['train']} train / {data_desc['test']} test samples; "
        f"{epochs_text(cfg.epochs, cfg.max_steps)} per run; "
        f"SGD momentum {cfg.momentum}, peak LR {cfg.lr} x B_global/32, {cfg.warmup_epochs} warm-up epoch(s), "
        f"{cfg.schedule} decay, weight decay {cfg.weight_decay}; seeds {cfg.seeds}"
        + (
            f"; {world} processes (BN statistics "
            f"{'synchronised over all processes: SyncBatchNorm' if cfg.sync_bn else 'per process'})"
            if world > 1
            else ("; --sync-bn with one process: SyncBatchNorm is plain BN" if cfg.sync_bn else "")
        )
        + ". Mean ± std over seeds; eval mode (BN: running statistics); 'batch stats' = BN in train mode "
        "on test batches of the training batch size.",
    ]
    sizes = sorted(cfg.batch_sizes, reverse=True)
    for model in cfg.models:
        rows = []
        for norm in cfg.norms:
            cells = [fmt(*_pair(agg, model, norm, b, "test_err")) for b in sizes]
            cells = [
                f"diverged ({_diverged(agg, model, norm, b)})" if _diverged(agg, model, norm, b) else c
                for c, b in zip(cells, sizes)
            ]
            rows.append([norm, *cells])
            if any(_pair(agg, model, norm, b, "test_err_batch_stats")[0] is not None for b in sizes):
                rows.append(
                    [
                        f"{norm} (batch stats)",
                        *[fmt(*_pair(agg, model, norm, b, "test_err_batch_stats")) for b in sizes],
                    ]
                )
        lines += ["", f"## {model}", "", markdown_table(["norm", *[f"B={b}" for b in sizes]], rows)]
        crit = e1_criteria(agg, model) + e3_criteria(agg, model)
        if crit:
            lines += [
                "",
                "Pass criteria (docs/EXPERIMENTS.md, E1 and E3; margin: distance to the threshold, > 0 on "
                "the passing side; SE: its standard error over the seeds):",
                "",
            ]
            lines += [criterion_line(c) for c in crit]
    diverged = [r for r in agg if r.get("diverged")]
    if diverged:
        lines += [
            "",
            f"**Warning**: {sum(r['diverged'] for r in diverged)} training(s) diverged (non-finite loss, or "
            "a "
            f"loss above {DIVERGE_FACTOR:g}x the untrained loss): "
            + ", ".join(f"{r['model']} {r['norm']} B={r['batch_size']}" for r in diverged)
            + ". Their cells read 'diverged'; a lower --lr trains them.",
        ]
    return "\n".join(lines) + "\n"


def _pair(
    agg: list[dict[str, Any]], model: str, norm: str, b: int, key: str
) -> tuple[float | None, float | None]:
    for r in agg:
        if r["model"] == model and r["norm"] == norm and r["batch_size"] == b:
            return r.get(f"{key}_mean"), r.get(f"{key}_std")
    return None, None


def _init_distributed(world: int, device: torch.device) -> None:
    import torch.distributed as dist

    if not dist.is_available():
        raise NotAvailableError("torch.distributed is not available in this torch build")
    if not dist.is_initialized():
        # (a process left waiting on the others fails after 10 minutes, not torch's default 30)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=10)
        )


_DATA_CACHE: dict[tuple[str, int | None, int | None], Any] = {}


def _data(cfg: CompareConfig) -> Any:
    key = (cfg.data, cfg.limit_train, cfg.limit_test)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load_dataset(cfg.data, limit_train=cfg.limit_train, limit_test=cfg.limit_test)
    return _DATA_CACHE[key]


def _train_one(
    cfg: CompareConfig,
    run: tuple[int, str, int, str],
    device: torch.device,
    world: int,
    rank: int,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train one (seed, model, batch size, norm) run; returns its keys, per-epoch history, final numbers and
    seconds."""
    seed, model_name, b, norm = run
    data = _data(cfg)
    set_seed(seed, device)
    model = build_model(model_name, norm, data.in_channels, data.num_classes).to(device)
    sync_layers = None
    if cfg.sync_bn:  # before DDP and the optimizer; a model without BN is returned unchanged
        from ...distributed import convert_sync_batchnorm
        from ...nn import SyncBatchNorm

        model = convert_sync_batchnorm(model)
        sync_layers = sum(isinstance(m, SyncBatchNorm) for m in model.modules())
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    lr = cfg.lr * b * world / 32
    tcfg = TrainConfig(
        epochs=cfg.epochs,
        batch_size=b,
        lr=lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        schedule=cfg.schedule,
        warmup_epochs=cfg.warmup_epochs,
        max_steps=cfg.max_steps,
        seed=seed,
        diverge_factor=DIVERGE_FACTOR,
    )
    t0 = time.perf_counter()
    res = train_classifier(model, data, tcfg, device=device, world_size=world, rank=rank, on_epoch=on_epoch)
    keys = {"model": model_name, "norm": norm, "batch_size": b, "seed": seed}
    final = {
        **keys,
        "lr_peak": lr,
        "steps": res.steps,
        **{k: v for k, v in res.final.items() if k != "epoch"},
    }
    if sync_layers is not None:
        final["sync_bn_layers"] = sync_layers
    return {"keys": keys, "history": res.history, "final": final, "seconds": time.perf_counter() - t0}


def _label(run: tuple[int, str, int, str]) -> str:
    seed, model_name, b, norm = run
    return f"{model_name} {norm} B={b} seed={seed}"


def _cost(run: tuple[int, str, int, str]) -> float:
    """Rough relative cost of a run (steps x per-step cost), to start the longest runs first."""
    _, model_name, b, norm = run
    return (1.0 / b) * (1.6 if norm.endswith("+pn") else 1.0) * (1.2 if model_name == "resnet" else 1.0)


def _rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    """One finished training's lines of ``metrics.jsonl``: its epochs, then its final numbers."""
    return [*({"kind": "epoch", **r["keys"], **row} for row in r["history"]), {"kind": "final", **r["final"]}]


def _parallelism(cfg: CompareConfig, world: int, device: torch.device, n_runs: int) -> tuple[int, int, str]:
    """``(jobs, threads per process, why)``: one-thread workers, one per usable core, unless told
    otherwise."""
    if world > 1 or device.type != "cpu":
        sharers = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if world > 1 else 1
        threads = cfg.threads if cfg.threads is not None else max(1, (os.cpu_count() or 1) // sharers)
        return (
            1,
            threads,
            (f"{world} torchrun processes" if world > 1 else str(device)) + f", {threads} thread(s) each",
        )
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        usable = os.cpu_count() or 1
    # never more workers than runs: each one imports torch (about 100 MB) before it finds no run to take
    jobs = max(1, min(cfg.jobs if cfg.jobs is not None else usable, n_runs))
    threads = cfg.threads if cfg.threads is not None else 1
    if cfg.jobs is None:
        why = f"auto: one worker per usable core ({usable})"
    else:
        why = f"--jobs {cfg.jobs}" + (f" (capped at the {n_runs} run(s))" if cfg.jobs > n_runs else "")
    why += f", {threads} thread(s) per worker" + (" (--threads)" if cfg.threads is not None else "")
    return jobs, threads, why


def run_compare(cfg: CompareConfig) -> CompareOutcome:
    """Run E1/E3 as configured; write the run folder (rank 0) and return the aggregate and summary.

    Every setting is checked first (:meth:`CompareConfig.validate`, then against the data), before
    the run folder is created. Each training's lines are appended to ``metrics.jsonl`` the moment
    it finishes; at the end the file is rewritten in the fixed run order, so the same command gives
    the same file. On Ctrl-C, or SIGTERM (where it has its default action, see
    :func:`~normkit.lab.records.sigterm_interrupts`), the worker processes are stopped, the folder is
    marked ``interrupted`` (``manifest.json``) and :class:`RunInterrupted` is raised; on an error it
    is marked ``failed``.

    With ``jobs > 1`` (CPU, not under torchrun) the runs are spread over that many worker
    processes with ``threads`` threads each (1 by default); every run is still seeded on its own, so
    the numbers equal those of ``jobs=1`` with the same threads per run.

    Raises:
        ConfigError: a bad setting (unknown norm or model, a norm that does not fit, a batch larger than the
            data, ...).
        normkit.lab.data.DataError: the data cannot be loaded.
        NotAvailableError: torch.distributed is missing from the torch build (under torchrun).
        RunInterrupted: Ctrl-C or SIGTERM (its ``signum`` says which).
    """
    cfg.validate()
    world, rank, local_rank = distributed_env()
    device = resolve_device(cfg.device, local_rank if world > 1 else None)
    runs = [
        (s, m, b, n)
        for s in cfg.seeds
        for m in cfg.models
        for b in sorted(cfg.batch_sizes, reverse=True)
        for n in cfg.norms
    ]
    jobs, threads, why = _parallelism(cfg, world, device, len(runs))
    if jobs > 1:
        _check_sendable(user_registered(_registry_specs(cfg.norms)))
    data = _data(cfg)
    cfg.check_data(data, world)
    set_threads(threads)
    if world > 1:
        _init_distributed(world, device)
    record = (
        start_record(
            cfg.out, "compare", cfg, device, world, jobs=jobs, threads_per_job=threads, parallelism=why
        )
        if rank == 0
        else None
    )
    results: list[dict[str, Any] | None] = [None] * len(runs)

    def finished(i: int) -> None:  # on disk the moment it finishes
        if record is not None:
            result = results[i]
            assert result is not None
            record.log_many(_rows(result))
            record.set_status("running", done=sum(r is not None for r in results), total=len(runs))

    try:
        if record is not None:
            with record.guard():
                _train_all(cfg, runs, results, device, world, rank, jobs, threads, finished)
        else:
            _train_all(cfg, runs, results, device, world, rank, jobs, threads, finished)
    except KeyboardInterrupt as e:
        done = sum(r is not None for r in results)
        signum = int(getattr(e, "signum", signal.SIGINT))
        how = {"signal": signal.Signals(signum).name} if signum != signal.SIGINT else {}
        if record is not None:  # the counts the report reads (the guard kept the last "running" ones)
            with _interrupts_ignored():
                try:
                    record.set_status("interrupted", done=done, total=len(runs), **how)
                except OSError:  # pragma: no cover - the folder went away
                    pass
        raise RunInterrupted(record.path if record is not None else None, done, len(runs), signum) from None
    finals = [r["final"] for r in results if r is not None]
    agg = _aggregate(finals)
    summary = _summary(cfg, agg, data.describe(), world)
    if record is not None:
        with record.guard():
            record.rewrite_metrics([row for r in results if r is not None for row in _rows(r)])
            crit = {m: e1_criteria(agg, m) + e3_criteria(agg, m) for m in cfg.models}
            record.write_json(
                "results.json", {"data": data.describe(), "aggregate": agg, "criteria": crit, "runs": finals}
            )
            record.write_text(
                "summary.md",
                summary + "\n![test error vs batch size](error_vs_batch.png)\n\n"
                "![test error per epoch](curves.png)\n",
            )
            from ..plots import plot_compare, plot_curves

            plot_compare(agg, record.path / "error_vs_batch.png", title=data.describe()["name"])
            plot_curves(
                {
                    _label(run): r["history"]
                    for run, r in zip(runs, results)
                    if r is not None and run[0] == cfg.seeds[0]
                },
                record.path / "curves.png",
            )
            record.finish(
                **{f"run {_label(run)}": r["seconds"] for run, r in zip(runs, results) if r is not None}
            )
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return CompareOutcome(record.path if record is not None else None, agg, summary)


def _train_all(
    cfg: CompareConfig,
    runs: list[tuple[int, str, int, str]],
    results: list[dict[str, Any] | None],
    device: torch.device,
    world: int,
    rank: int,
    jobs: int,
    threads: int,
    finished: Callable[[int], None],
) -> None:
    if jobs > 1:  # compile the fused CPU kernels here, once: the worker processes then load the cached build
        from ...kernels import build as build_kernels

        build_kernels()
    with Progress(quiet=cfg.quiet or rank != 0) as progress:
        run_bar = progress.add("runs", total=len(runs))
        if jobs == 1:
            epoch_bar = progress.add("epochs", total=cfg.epochs)
            for i, run in enumerate(runs):
                progress.reset(epoch_bar, cfg.epochs, description=_label(run))

                def on_epoch(row: dict[str, Any]) -> None:
                    progress.advance(epoch_bar, info=f"test err {row['test_err']:.2f}%")

                result = results[i] = _train_one(cfg, run, device, world, rank, on_epoch)
                finished(i)
                progress.advance(
                    run_bar, info=f"{_label(run)}: {result['final'].get('test_err', float('nan')):.2f}%"
                )
        else:
            _run_pool(cfg, runs, results, jobs, threads, progress, run_bar, finished)


def _check_sendable(user: dict[str, Any]) -> None:
    """Norms the user registered reach the worker processes by pickle (a spawned process starts with
    normkit's own registry): a ConfigError up front for a factory that cannot be sent."""
    try:
        pickle.dumps(user)
    except Exception as e:
        raise ConfigError(
            f"--norms: {', '.join(user)} registered in this process with a factory the worker processes "
            f"cannot receive ({type(e).__name__}: {e}); define the factory as a function at module level "
            "(e.g. in your script, under if __name__ == '__main__': for the run), or run with --jobs 1"
        ) from None


def _worker_main(
    cfg: CompareConfig, tasks: Any, messages: Any, threads: int, parent: int, user: dict[str, Any]
) -> None:
    """A worker process: train the runs it takes from ``tasks``; report epochs and results on ``messages``.

    ``user``: the norms the parent's user registered, registered here too. Ctrl-C is the parent's to
    handle (it stops the workers), so SIGINT is ignored here; a worker whose parent has gone exits at
    the next epoch.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    for key, (factory, help) in user.items():
        register_norm(key, help)(factory)
    while True:
        if os.getppid() != parent:
            return
        item = tasks.get()
        if item is None:
            return
        i, run = item

        def on_epoch(row: dict[str, Any], i: int = i) -> None:
            if os.getppid() != parent:
                os._exit(1)
            messages.put(("epoch", i, row["test_err"]))

        try:
            messages.put(("done", i, _train_one(cfg, run, torch.device("cpu"), 1, 0, on_epoch)))
        except Exception as e:  # reported to the parent, which stops the run
            messages.put(("error", i, f"{type(e).__name__}: {e}", traceback.format_exc()))
            return


def _run_pool(
    cfg: CompareConfig,
    runs: list[tuple[int, str, int, str]],
    results: list[dict[str, Any] | None],
    jobs: int,
    threads: int,
    progress: Progress,
    run_bar: int,
    finished: Callable[[int], None],
) -> None:
    """Spread the runs over ``jobs`` spawned worker processes, longest runs first.

    The workers are plain processes fed from a queue, so that the parent can stop them at once: on
    Ctrl-C, SIGTERM or a failed run it terminates them (then kills what is left after 2 s) while
    ignoring a second signal, so stopping never waits on a training and never deadlocks. A SIGTERM
    while they start is held back until all have started (and then stops them).
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    tasks, messages = ctx.Queue(), ctx.Queue()
    for i in sorted(range(len(runs)), key=lambda i: -_cost(runs[i])):
        tasks.put((i, runs[i]))
    for _ in range(jobs):
        tasks.put(None)
    main_thread = threading.current_thread() is threading.main_thread()
    # the workers start with SIGINT ignored (the disposition survives exec), so a Ctrl-C while they
    # import torch cannot print tracebacks from them
    # (SIGTERM is held back instead: the workers must keep its default action, which terminate() uses)
    procs = [
        ctx.Process(
            target=_worker_main,
            args=(cfg, tasks, messages, threads, os.getpid(), user_registered(_registry_specs(cfg.norms))),
            daemon=True,
        )
        for _ in range(jobs)
    ]
    bars: dict[int, int] = {}
    clean = False
    try:
        with _sigterm_deferred():
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
            try:
                for proc in procs:
                    proc.start()
            finally:
                if main_thread:
                    signal.signal(signal.SIGINT, previous)
        remaining = len(runs)
        while remaining:
            try:
                msg = messages.get(timeout=0.2)
            except queue_lib.Empty:
                dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
                if dead or not any(p.is_alive() for p in procs):
                    raise RuntimeError(
                        f"a worker process died (exit code {dead[0].exitcode if dead else 0}) "
                        f"with {remaining} run(s) left"
                    ) from None
                continue
            kind, i = msg[0], msg[1]
            if kind == "epoch":
                if i not in bars:
                    bars[i] = progress.add(_label(runs[i]), total=cfg.epochs)
                progress.advance(bars[i], info=f"test err {msg[2]:.2f}%")
            elif kind == "done":
                result = results[i] = msg[2]
                remaining -= 1
                finished(i)
                if i in bars:
                    progress.remove(bars.pop(i))
                progress.advance(
                    run_bar, info=f"{_label(runs[i])}: {result['final'].get('test_err', float('nan')):.2f}%"
                )
            else:
                raise RuntimeError(f"run {_label(runs[i])} failed: {msg[2]}")
        clean = True
    finally:
        _stop_workers(procs, (tasks, messages), clean, main_thread)


def _stop_workers(procs: list[Any], queues: tuple[Any, ...], clean: bool, main_thread: bool) -> None:
    """Join the workers after a clean finish; otherwise terminate them (kill after 2 s), Ctrl-C (and a
    SIGTERM that would raise) ignored meanwhile. Workers never started are skipped."""
    with _interrupts_ignored(main_thread and not clean):
        started = [proc for proc in procs if proc.pid is not None]
        if not clean:
            for proc in started:
                if proc.is_alive():
                    proc.terminate()
        deadline = time.monotonic() + (10.0 if clean else 2.0)
        for proc in started:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in started:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=2.0)
        for q in queues:
            q.cancel_join_thread()  # never block the exit on a queue's feeder thread
            q.close()
