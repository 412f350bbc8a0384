"""E1 / E3: train small CNNs with each norm across batch sizes and seeds; test error, mean ± std over seeds.

The lab's main job (``normkit compare``). For each model, batch size, norm and seed it trains
from scratch (SGD momentum 0.9, peak LR ``lr * B_global / 32`` -- Goyal et al.'s linear scaling
-- with a linear warm-up and a cosine decay, weight decay 5e-4) and measures the test error in
eval mode (BN uses its running statistics) and, for BN, with batch statistics in test batches of
the training batch size. It then checks ALGORITHMS.md §4's pass criteria:

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

import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..data import load_dataset
from ..models import MODEL_NAMES, build_model, check_norm_spec, is_instance_norm
from ..progress import Progress
from ..train import TrainConfig, set_seed, train_classifier
from ._common import distributed_env, fmt, markdown_table, mean_std, resolve_device, set_threads, start_record, verdict

__all__ = ["CompareConfig", "CompareOutcome", "NotAvailableError", "e1_criteria", "e3_criteria", "run_compare"]


class NotAvailableError(RuntimeError):
    """A requested feature is not available here (e.g. torch.distributed missing from the torch build)."""


@dataclass
class CompareConfig:
    """Configuration of ``normkit compare`` (defaults: the main job, < 10 min on 2 CPU cores).

    Attributes:
        data: data spec (``"digits"``, ``"cifar10:PATH"``, ...).
        models: ``"cnn4-head"`` (CNN-4 + Linear(64->64)-norm-ReLU head, where BN pools over B values),
            ``"cnn4"``, ``"resnet"`` (small pre-activation ResNet).
        norms: registry specs.
        batch_sizes: samples per step per process.
        seeds: one training run per seed.
        epochs: passes over the training set per run.
        lr: peak learning rate at a global batch of 32 (scaled linearly with the global batch).
        warmup_epochs: linear warm-up length, epochs.
        momentum: SGD momentum.
        weight_decay: L2 on conv/linear weights (and Proxy Norm's proxy parameters).
        schedule: ``"cosine"`` or ``"constant"``.
        max_steps: cap on optimizer steps per run (quick runs), ``None`` for none.
        limit_train, limit_test: use only the first samples (quick runs).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``.
        threads: torch intra-op threads in all (each of ``jobs`` workers, or of torchrun's processes on
            this node, gets ``threads // jobs``, at least 1).
        jobs: runs trained in parallel worker processes (CPU only; 1 under torchrun or on GPU). On
            2 cores, 2 single-threaded workers beat 1 two-threaded process: these nets are too
            small for intra-op threads (measured: docs/RESULTS.md).
        sync_bn: synchronise BN statistics across processes: BN layers become
            :class:`normkit.nn.SyncBatchNorm` (with one process that is plain BN).
        out: runs root folder.
        quiet: no progress bars.
    """

    data: str = "digits"
    models: list[str] = field(default_factory=lambda: ["cnn4-head"])
    norms: list[str] = field(default_factory=lambda: ["bn", "gn:8", "ln+pn"])
    batch_sizes: list[int] = field(default_factory=lambda: [32, 8, 2])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    epochs: int = 8
    lr: float = 0.05
    warmup_epochs: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    max_steps: int | None = None
    limit_train: int | None = None
    limit_test: int | None = None
    device: str = "auto"
    threads: int = 2
    jobs: int = 2
    sync_bn: bool = False
    out: str = "runs"
    quiet: bool = False

    def validate(self) -> None:
        """Normalise the norm specs and check every field; raises ValueError with the fix."""
        self.norms = [check_norm_spec(n) for n in self.norms]
        for m in self.models:
            if m not in MODEL_NAMES:
                raise ValueError(f"unknown model {m!r}; expected one of {', '.join(MODEL_NAMES)}")
        for name in ("models", "norms", "batch_sizes", "seeds"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        if any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        if any(b < 2 for b in self.batch_sizes) and any(n.startswith("bn") for n in self.norms):
            raise ValueError("batch size 1 cannot train BN (one value per channel); use batch sizes >= 2")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.jobs < 1 or self.threads < 1:
            raise ValueError(f"jobs and threads must be >= 1, got jobs={self.jobs}, threads={self.threads}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")


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
            "model": model, "norm": norm, "batch_size": b, "lr": rs[0]["lr_peak"], "seeds": len(rs),
            "test_err_mean": m, "test_err_std": s,
            "train_loss_mean": mean_std([r["train_loss"] for r in rs])[0],
            "diverged": sum(bool(r["diverged"]) for r in rs),
        }
        bs = [r["test_err_batch_stats"] for r in rs if r.get("test_err_batch_stats") is not None]
        if bs:
            row["test_err_batch_stats_mean"], row["test_err_batch_stats_std"] = mean_std(bs)
        out.append(row)
    return out


def _lookup(agg: list[dict[str, Any]], model: str, norm: str, b: int) -> float | None:
    for r in agg:
        if r["model"] == model and r["norm"] == norm and r["batch_size"] == b:
            return r["test_err_mean"]
    return None


def _family(norm: str) -> str:
    return norm.split(":")[0].split("+")[0] + ("+pn" if norm.endswith("+pn") else "")


def e1_criteria(agg: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    """E1's pass criteria (ALGORITHMS.md §4) for one model, on the largest and smallest batch size.

    Returns one dict per criterion: ``name, text, ok (True/False/None when not measurable), detail``.
    """
    rows = [r for r in agg if r["model"] == model]
    sizes = sorted({r["batch_size"] for r in rows})
    out: list[dict[str, Any]] = []
    if len(sizes) < 2:
        return out
    lo, hi = sizes[0], sizes[-1]
    norms = list(dict.fromkeys(r["norm"] for r in rows))
    bn = next((n for n in norms if _family(n) == "bn"), None)
    gn = next((n for n in norms if _family(n) == "gn"), None)
    if bn is not None:
        a, b = _lookup(agg, model, bn, hi), _lookup(agg, model, bn, lo)
        ok = None if a is None or b is None else b >= a + 3.0
        out.append({"name": "E1 (i)", "text": f"BN error at B={lo} >= BN at B={hi} + 3 pt", "ok": ok,
                    "detail": f"{fmt(b)} vs {fmt(a)} (+{fmt(None if ok is None else b - a)} pt)"})
    for n in norms:
        if _family(n) in ("bn",):
            continue
        a, b = _lookup(agg, model, n, hi), _lookup(agg, model, n, lo)
        ok = None if a is None or b is None else abs(b - a) <= 1.5
        out.append({"name": "E1 (ii)", "text": f"{n} at B={lo} within ±1.5 pt of B={hi}", "ok": ok,
                    "detail": f"{fmt(b)} vs {fmt(a)} (diff {fmt(None if ok is None else b - a)} pt)"})
    if bn is not None and gn is not None:
        d_hi = (_lookup(agg, model, gn, hi) or 0.0) - (_lookup(agg, model, bn, hi) or 0.0)
        d_lo = (_lookup(agg, model, gn, lo) or 0.0) - (_lookup(agg, model, bn, lo) or 0.0)
        ok = d_hi >= -0.5 and d_lo <= -1.0
        out.append({"name": "E1 (iii)", "text": f"{gn} − BN >= −0.5 pt at B={hi} and <= −1 pt at B={lo}", "ok": ok,
                    "detail": f"{fmt(d_hi)} pt at B={hi}, {fmt(d_lo)} pt at B={lo}"})
    return out


def e3_criteria(agg: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    """E3's (soft) pass criteria at the largest batch size, for the norms that were run."""
    rows = [r for r in agg if r["model"] == model]
    if not rows:
        return []
    hi = max(r["batch_size"] for r in rows)
    err = {r["norm"]: r["test_err_mean"] for r in rows if r["batch_size"] == hi}
    out: list[dict[str, Any]] = []

    def add(text: str, ok: bool, detail: str) -> None:
        out.append({"name": "E3", "text": f"{text} (B={hi})", "ok": ok, "detail": detail})

    if "ln+pn" in err and "ln" in err:
        add("LN+PN <= LN", err["ln+pn"] <= err["ln"], f"{fmt(err['ln+pn'])} vs {fmt(err['ln'])}")
    gnpn = next((n for n in err if n in ("gn:4+pn", "gn+pn")), None)
    if gnpn and "gn:8" in err:
        add(f"{gnpn} <= gn:8", err[gnpn] <= err["gn:8"], f"{fmt(err[gnpn])} vs {fmt(err['gn:8'])}")
    if "ln+pn" in err and "bn" in err:
        add("|LN+PN − BN| <= 1 pt", abs(err["ln+pn"] - err["bn"]) <= 1.0, f"{fmt(err['ln+pn'])} vs {fmt(err['bn'])}")
    inn = next((n for n in err if is_instance_norm(n)), None)
    if inn and len(err) > 2:
        worst = max(err.values())
        add("IN is the worst or within 0.5 pt of it", err[inn] >= worst - 0.5, f"{fmt(err[inn])} vs worst {fmt(worst)}")
    return out


def _summary(cfg: CompareConfig, agg: list[dict[str, Any]], data_desc: dict[str, Any], world: int) -> str:
    lines = [
        f"# compare: test error (%) on {data_desc['name']}",
        "",
        f"{data_desc['train']} train / {data_desc['test']} test samples; {cfg.epochs} epochs; "
        f"SGD momentum {cfg.momentum}, peak LR {cfg.lr} x B_global/32, {cfg.warmup_epochs} warm-up epoch(s), "
        f"{cfg.schedule} decay, weight decay {cfg.weight_decay}; seeds {cfg.seeds}"
        + (f"; {world} processes (BN statistics {'synchronised over all processes: SyncBatchNorm' if cfg.sync_bn else 'per process'})"
           if world > 1 else ("; --sync-bn with one process: SyncBatchNorm is plain BN" if cfg.sync_bn else ""))
        + ". Mean ± std over seeds; eval mode (BN: running statistics); 'batch stats' = BN in train mode "
        "on test batches of the training batch size.",
    ]
    sizes = sorted(cfg.batch_sizes, reverse=True)
    for model in cfg.models:
        rows = []
        for norm in cfg.norms:
            cells = [fmt(*_pair(agg, model, norm, b, "test_err")) for b in sizes]
            rows.append([norm, *cells])
            if any(_pair(agg, model, norm, b, "test_err_batch_stats")[0] is not None for b in sizes):
                rows.append([f"{norm} (batch stats)", *[fmt(*_pair(agg, model, norm, b, "test_err_batch_stats")) for b in sizes]])
        lines += ["", f"## {model}", "", markdown_table(["norm", *[f"B={b}" for b in sizes]], rows)]
        crit = e1_criteria(agg, model) + e3_criteria(agg, model)
        if crit:
            lines += ["", "Pass criteria (ALGORITHMS.md §4):", ""]
            lines += [f"- {c['name']}: {c['text']}: **{verdict(c['ok'])}** ({c['detail']})" for c in crit]
    return "\n".join(lines) + "\n"


def _pair(agg: list[dict[str, Any]], model: str, norm: str, b: int, key: str) -> tuple[float | None, float | None]:
    for r in agg:
        if r["model"] == model and r["norm"] == norm and r["batch_size"] == b:
            return r.get(f"{key}_mean"), r.get(f"{key}_std")
    return None, None


def _init_distributed(world: int, device: torch.device) -> None:
    import torch.distributed as dist

    if not dist.is_available():
        raise NotAvailableError("torch.distributed is not available in this torch build")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


_DATA_CACHE: dict[tuple[str, int | None, int | None], Any] = {}


def _data(cfg: CompareConfig) -> Any:
    key = (cfg.data, cfg.limit_train, cfg.limit_test)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load_dataset(cfg.data, limit_train=cfg.limit_train, limit_test=cfg.limit_test)
    return _DATA_CACHE[key]


def _train_one(
    cfg: CompareConfig, run: tuple[int, str, int, str], device: torch.device, world: int, rank: int,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train one (seed, model, batch size, norm) run; returns its keys, per-epoch history, final numbers and seconds."""
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
        epochs=cfg.epochs, batch_size=b, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
        schedule=cfg.schedule, warmup_epochs=cfg.warmup_epochs, max_steps=cfg.max_steps, seed=seed,
    )
    t0 = time.perf_counter()
    res = train_classifier(model, data, tcfg, device=device, world_size=world, rank=rank, on_epoch=on_epoch)
    keys = {"model": model_name, "norm": norm, "batch_size": b, "seed": seed}
    final = {**keys, "lr_peak": lr, "steps": res.steps, **{k: v for k, v in res.final.items() if k != "epoch"}}
    if sync_layers is not None:
        final["sync_bn_layers"] = sync_layers
    return {"keys": keys, "history": res.history, "final": final, "seconds": time.perf_counter() - t0}


_EVENTS: Any = None


def _worker_init(events: Any, threads: int) -> None:
    global _EVENTS
    _EVENTS = events
    torch.set_num_threads(threads)


def _worker_run(cfg: CompareConfig, index: int, run: tuple[int, str, int, str]) -> dict[str, Any]:
    def on_epoch(row: dict[str, Any]) -> None:
        if _EVENTS is not None:
            _EVENTS.put((index, row["test_err"]))

    return _train_one(cfg, run, torch.device("cpu"), 1, 0, on_epoch)


def _label(run: tuple[int, str, int, str]) -> str:
    seed, model_name, b, norm = run
    return f"{model_name} {norm} B={b} seed={seed}"


def _cost(run: tuple[int, str, int, str]) -> float:
    """Rough relative cost of a run (steps x per-step cost), to start the longest runs first."""
    _, model_name, b, norm = run
    return (1.0 / b) * (1.6 if norm.endswith("+pn") else 1.0) * (1.2 if model_name == "resnet" else 1.0)


def run_compare(cfg: CompareConfig) -> CompareOutcome:
    """Run E1/E3 as configured; write the run folder (rank 0) and return the aggregate and summary.

    With ``jobs > 1`` (CPU, not under torchrun) the runs are spread over that many worker
    processes with ``threads // jobs`` threads each; every run is still seeded on its own, so
    the numbers equal those of ``jobs=1`` with the same threads per run.

    Raises:
        ValueError: a bad configuration (unknown norm or model, empty lists, ...).
        normkit.lab.data.DataError: the data cannot be loaded.
        NotAvailableError: torch.distributed is missing from the torch build (under torchrun).
    """
    cfg.validate()
    world, rank, local_rank = distributed_env()
    device = resolve_device(cfg.device, local_rank if world > 1 else None)
    jobs = cfg.jobs if (world == 1 and device.type == "cpu") else 1
    # the thread budget is shared by the worker processes, or by torchrun's processes on this node
    sharers = jobs if world == 1 else int(os.environ.get("LOCAL_WORLD_SIZE", world))
    threads = max(1, cfg.threads // sharers)
    set_threads(threads)
    if world > 1:
        _init_distributed(world, device)
    data = _data(cfg)
    record = start_record(cfg.out, "compare", cfg, device, world) if rank == 0 else None
    if record is not None:
        record.write_json("env.json", {**json.loads((record.path / "env.json").read_text()), "jobs": jobs,
                                       "threads_per_job": threads})
    runs = [(s, m, b, n) for s in cfg.seeds for m in cfg.models for b in sorted(cfg.batch_sizes, reverse=True) for n in cfg.norms]
    results: list[dict[str, Any] | None] = [None] * len(runs)
    written = 0

    def flush() -> None:  # write finished runs to metrics.jsonl in the fixed run order
        nonlocal written
        while written < len(runs):
            r = results[written]
            if r is None:
                break
            if record is not None:
                for row in r["history"]:
                    record.log(kind="epoch", **r["keys"], **row)
                record.log(kind="final", **r["final"])
            written += 1

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

                results[i] = _train_one(cfg, run, device, world, rank, on_epoch)
                flush()
                progress.advance(run_bar, info=f"{_label(run)}: {results[i]['final'].get('test_err', float('nan')):.2f}%")
        else:
            _run_pool(cfg, runs, results, jobs, threads, progress, run_bar, flush)
    finals = [r["final"] for r in results if r is not None]
    agg = _aggregate(finals)
    summary = _summary(cfg, agg, data.describe(), world)
    if record is not None:
        crit = {m: e1_criteria(agg, m) + e3_criteria(agg, m) for m in cfg.models}
        record.write_json("results.json", {"data": data.describe(), "aggregate": agg, "criteria": crit, "runs": finals})
        record.write_text("summary.md", summary + "\n![test error vs batch size](error_vs_batch.png)\n\n"
                          "![test error per epoch](curves.png)\n")
        from ..plots import plot_compare, plot_curves

        plot_compare(agg, record.path / "error_vs_batch.png", title=data.describe()["name"])
        plot_curves({_label(run): r["history"] for run, r in zip(runs, results) if r is not None and run[0] == cfg.seeds[0]},
                    record.path / "curves.png")
        record.finish(**{f"run {_label(run)}": r["seconds"] for run, r in zip(runs, results) if r is not None})
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return CompareOutcome(record.path if record is not None else None, agg, summary)


def _run_pool(
    cfg: CompareConfig, runs: list[tuple[int, str, int, str]], results: list[dict[str, Any] | None], jobs: int,
    threads: int, progress: Progress, run_bar: int, flush: Callable[[], None],
) -> None:
    """Spread the runs over ``jobs`` spawned worker processes; longest runs first; epoch events through a queue."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    bars: dict[int, int] = {}
    order = sorted(range(len(runs)), key=lambda i: -_cost(runs[i]))
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init, initargs=(events, threads)) as pool:
        pending = {pool.submit(_worker_run, cfg, i, runs[i]): i for i in order}
        try:
            _drain(pending, events, runs, results, cfg, progress, run_bar, bars, flush)
        except BaseException:  # Ctrl-C or a failed run: drop the queued runs, do not wait for them
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _drain(pending: dict[Any, int], events: Any, runs: list[tuple[int, str, int, str]],
           results: list[dict[str, Any] | None], cfg: CompareConfig, progress: Progress, run_bar: int,
           bars: dict[int, int], flush: Callable[[], None]) -> None:
    """Collect finished runs and epoch events until every run is done."""
    import queue as queue_lib
    from concurrent.futures import FIRST_COMPLETED, wait

    while pending:
        done, _ = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
        while True:
            try:
                i, err = events.get_nowait()
            except queue_lib.Empty:
                break
            if i not in bars:
                bars[i] = progress.add(_label(runs[i]), total=cfg.epochs)
            progress.advance(bars[i], info=f"test err {err:.2f}%")
        for fut in done:
            i = pending.pop(fut)
            results[i] = fut.result()
            if i in bars:
                progress.remove(bars.pop(i))
            progress.advance(run_bar, info=f"{_label(runs[i])}: {results[i]['final'].get('test_err', float('nan')):.2f}%")
        flush()
