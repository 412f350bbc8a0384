"""The lab's training loop: seeded, deterministic SGD on in-memory tensors, optionally data-parallel.

One function, :func:`train_classifier`, trains a classifier for a number of epochs with SGD +
momentum, a cosine (or constant) learning-rate schedule by step, and the Proxy Norm authors'
weight-decay rule (:func:`normkit.param_groups`: decay on conv/linear weights and PN's proxy
parameters, none on norm affines and biases). It returns the per-epoch history and the final
test error in eval mode and, for nets with batch statistics, with train-mode (batch) statistics.

Determinism: the model is built after :func:`set_seed`, batches come from a ``torch.Generator``
seeded with the run's seed, and nothing else is random, so the same seed gives the same numbers
on the same machine and thread count.

Data parallel: under ``torchrun`` every process draws the same global permutation and takes its
own ``batch_size`` slice of each global batch of ``batch_size * world_size`` samples
(``batch_size`` is per process, the Group Norm paper's "images per GPU"); the caller wraps the
model in ``DistributedDataParallel``, which averages the gradients.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .data import Dataset

__all__ = [
    "TrainConfig",
    "TrainResult",
    "epoch_batches",
    "evaluate",
    "evaluate_batch_stats",
    "has_batch_stats",
    "set_seed",
    "train_classifier",
]


@dataclass
class TrainConfig:
    """How to train one run.

    Attributes:
        epochs: passes over the training set.
        batch_size: samples per step per process.
        lr: peak learning rate (already scaled for the batch size).
        momentum: SGD momentum.
        weight_decay: L2 on conv/linear weights and Proxy Norm's proxy parameters.
        schedule: ``"cosine"`` (decay to 0 over the run, by step) or ``"constant"``.
        warmup_epochs: linear warm-up from ``lr / warmup_steps`` to ``lr`` over this many epochs
            (Goyal et al.'s companion to the linear scaling rule), then the schedule.
        max_steps: stop after this many optimizer steps (``None``: no cap); the schedule spans the capped
            run, its warm-up the same fraction of it.
        seed: batch order seed.
        eval_batch_stats: also measure the final test error with batch (train-mode) statistics,
            in test batches of ``batch_size``, for nets that have them (BN).
        diverge_factor: also stop as diverged when a batch's loss exceeds this many times the
            untrained loss (the larger of the first batch's loss and ln(classes)); ``None``: only a
            non-finite loss counts as diverged.
    """

    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    max_steps: int | None = None
    seed: int = 0
    eval_batch_stats: bool = True
    diverge_factor: float | None = None


@dataclass
class TrainResult:
    """What :func:`train_classifier` returns.

    Attributes:
        history: one dict per epoch (``epoch, step, lr, train_loss, train_err, test_loss, test_err``; errors
            in %).
        final: the last epoch's numbers plus ``test_err_batch_stats`` when measured.
        diverged: the loss became NaN or infinite (training stopped there).
        steps: optimizer steps taken.
        first_loss: the loss of the first batch (before any update).
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    diverged: bool = False
    steps: int = 0
    first_loss: float = float("nan")


def set_seed(seed: int, device: torch.device | str = "cpu") -> None:
    """Seed torch's global generator (model initialisation); on CUDA also pin cuDNN to deterministic kernels.

    CPU kernels of the ops the lab uses are deterministic already, so nothing global is changed there.
    """
    torch.manual_seed(seed)
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def epoch_batches(
    n: int, batch_size: int, generator: torch.Generator, world_size: int = 1, rank: int = 0
) -> list[Tensor]:
    """Index tensors of one epoch: a random permutation cut into global batches of ``batch_size *
    world_size``.

    The last incomplete global batch is dropped (BN needs at least 2 values per channel, and
    every process must take the same number of steps); process ``rank`` gets its own slice.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> [b.tolist() for b in epoch_batches(5, 2, g)]
        [[4, 0], [1, 3]]
    """
    glob = batch_size * world_size
    if n < glob:
        raise ValueError(
            f"batch size {batch_size} x {world_size} process(es) = {glob} exceeds the {n} training samples; "
            "use a smaller batch size or more samples (--limit-train)"
        )
    perm = torch.randperm(n, generator=generator)
    steps = n // glob
    return [perm[s * glob + rank * batch_size : s * glob + (rank + 1) * batch_size] for s in range(steps)]


def _any_process(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is set on any process of the default group (one small all_reduce)."""
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def has_batch_stats(model: nn.Module) -> bool:
    """Whether the model has layers whose train-mode output depends on the batch (BN with running stats).

    Example:
        >>> from normkit.lab.models import CNN4
        >>> has_batch_stats(CNN4("bn")), has_batch_stats(CNN4("gn:8")), has_batch_stats(CNN4("frozen_bn"))
        (True, False, False)
    """
    from ..nn.batch_norm_family import _FrozenBatchNorm
    from ..surgery.freeze import _EvalPinned

    for m in model.modules():
        rm = getattr(m, "running_mean", None)
        if not isinstance(rm, Tensor) or "Batch" not in type(m).__name__ or isinstance(m, _EvalPinned):
            continue
        if isinstance(m, _FrozenBatchNorm) and m.use_running_stats:
            continue  # (frozen: its running statistics in training too)
        return True
    return False


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and error (%) of ``model`` in eval mode (running statistics).

    Example:
        >>> from normkit.lab.models import CNN4
        >>> loss, err = evaluate(CNN4("gn:8"), torch.randn(6, 1, 8, 8), torch.arange(6))
        >>> 0.0 <= err <= 100.0
        True
    """
    was_training = model.training
    model.eval()
    loss, wrong = 0.0, 0
    for i in range(0, len(x), batch_size):
        out = model(x[i : i + batch_size])
        loss += float(nn.functional.cross_entropy(out, y[i : i + batch_size], reduction="sum"))
        wrong += int((out.argmax(1) != y[i : i + batch_size]).sum())
    model.train(was_training)
    return loss / len(x), 100.0 * wrong / len(x)


@torch.no_grad()
def evaluate_batch_stats(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> tuple[float, float]:
    """Loss and error (%) with train-mode (batch) statistics, in test batches of ``batch_size``.

    This is what a BN net computes during training. It runs on a copy, so the model's running
    statistics are untouched. A last batch of a single sample is merged into the previous one
    (BN needs two values per channel).
    """
    probe = copy.deepcopy(model).train()
    n = len(x)
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] < 2:
        starts.pop()
    bounds = [*starts[1:], n]
    loss, wrong = 0.0, 0
    for a, b in zip(starts, bounds):
        out = probe(x[a:b])
        loss += float(nn.functional.cross_entropy(out, y[a:b], reduction="sum"))
        wrong += int((out.argmax(1) != y[a:b]).sum())
    return loss / n, 100.0 * wrong / n


def _lr_factor(schedule: str, total: int, warmup: int = 0) -> Callable[[int], float]:
    """The learning-rate multiplier at optimizer step ``step`` (0-based)."""
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"unknown schedule {schedule!r}; expected 'cosine' or 'constant'")
    warmup = min(warmup, total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        t = (min(step, total) - warmup) / max(total - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * t))

    return factor


def _run_length(cfg: TrainConfig, steps_per_epoch: int) -> tuple[int, int]:
    """``(optimizer steps, warm-up steps)``: a run capped by ``max_steps`` keeps its schedule's shape, the
    warm-up the same fraction of the (shorter) run (it used to keep its full length: a capped run of
    fewer steps than one epoch was all warm-up, its LR never reaching ``lr``)."""
    full = cfg.epochs * steps_per_epoch
    total = full if cfg.max_steps is None else min(full, cfg.max_steps)
    warmup = cfg.warmup_epochs * steps_per_epoch
    if full and total < full:
        warmup *= total / full
    return total, round(warmup)


def train_classifier(
    model: nn.Module,
    data: Dataset,
    cfg: TrainConfig,
    *,
    device: torch.device | str = "cpu",
    world_size: int = 1,
    rank: int = 0,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train ``model`` (already seeded, on ``device``; DDP-wrapped when ``world_size > 1``) on ``data``.

    Args:
        model: the classifier.
        data: train/test tensors (moved to ``device`` here).
        cfg: optimiser and schedule.
        device: where to compute.
        world_size, rank: data-parallel layout (see the module docstring).
        on_epoch: called with each epoch's metrics dict (e.g. to log and advance a progress bar).
        on_step: called after every optimizer step with ``(step, loss)``.

    Returns:
        :class:`TrainResult`.

    Example:
        >>> from normkit.lab.data import load_synthetic
        >>> from normkit.lab.models import CNN4
        >>> set_seed(0)
        >>> res = train_classifier(CNN4("gn:8"), load_synthetic(32, 16), TrainConfig(epochs=1, batch_size=16))
        >>> res.steps, res.final["epoch"], res.diverged
        (2, 1, False)
    """
    from ..nn import param_groups

    device = torch.device(device)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    inner = getattr(model, "module", model)  # the bare model under DDP
    optimizer = torch.optim.SGD(param_groups(inner, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = len(x_train) // (cfg.batch_size * world_size)
    total, warmup = _run_length(cfg, steps_per_epoch)
    factor = _lr_factor(cfg.schedule, total, warmup)
    result = TrainResult()
    step = 0
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        batches = epoch_batches(len(x_train), cfg.batch_size, gen, world_size, rank)
        loss_sum, wrong, seen = 0.0, 0, 0
        for idx in batches:
            if step >= total:
                break
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * factor(step)
            idx = idx.to(device)
            xb, yb = x_train[idx], y_train[idx]
            out = model(xb)
            loss = nn.functional.cross_entropy(out, yb)
            loss_value = loss.detach().item()
            if step == 0:
                result.first_loss = loss_value
            bad = not math.isfinite(loss_value) or (
                cfg.diverge_factor is not None
                and loss_value > cfg.diverge_factor * max(result.first_loss, math.log(data.num_classes))
            )
            if world_size > 1:  # every process stops at the same step (one going on would wait forever)
                bad = _any_process(bad, device)
            if bad:
                result.diverged = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss_value * len(yb)
            wrong += int((out.detach().argmax(1) != yb).sum())
            seen += len(yb)
            if on_step is not None:
                on_step(step, loss_value)
        if seen == 0 and not result.diverged:
            break
        test_loss, test_err = evaluate(inner, x_test, y_test)
        row = {
            "epoch": epoch,
            "step": step,
            "lr": cfg.lr * factor(step),
            "train_loss": loss_sum / seen if seen else float("nan"),
            "train_err": 100.0 * wrong / seen if seen else float("nan"),
            "test_loss": test_loss,
            "test_err": test_err,
        }
        result.history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if result.diverged or step >= total:
            break
    result.steps = step
    result.final = dict(result.history[-1]) if result.history else {"epoch": 0, "step": 0, "lr": cfg.lr}
    if cfg.eval_batch_stats and has_batch_stats(inner) and not result.diverged:
        _, result.final["test_err_batch_stats"] = evaluate_batch_stats(inner, x_test, y_test, cfg.batch_size)
    result.final["diverged"] = result.diverged
    return result
