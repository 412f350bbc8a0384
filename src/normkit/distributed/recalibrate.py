"""Precise BN: recompute every batch-norm layer's running statistics as true population statistics.

The running statistics a BN layer ends training with are an exponential moving average of
per-batch estimates taken while the weights were still moving; eval-mode accuracy suffers when
they lag behind the final weights or come from small batches (Wu & Johnson 2021, "Rethinking
Batch in BatchNorm", §3: *precise BN*). :func:`recalibrate_bn` runs the model over data with the
weights fixed and replaces them by the statistics of everything each layer saw.

``torch.optim.swa_utils.update_bn`` does a related job but averages the per-batch *variances*
(with a cumulative momentum), which misses the variance of the batch means, and it ignores the
other processes. Here each layer's values are pooled exactly (Chan et al.'s parallel formula, in
float64): the stored mean is the mean of all values seen and the stored variance their variance
(within-batch variance plus the variance of the batch means, each batch weighted by its count),
also across processes when torch.distributed is initialised.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from .._errors import NormError
from ..functional._collective import F64, all_gather_moments, chan_merge, comm_device, group_size
from ..functional._moments import moments
from ..nn.batch_norm_family import BatchNormalization
from ..surgery._graph import check_model
from ..surgery.freeze import _EvalPinned

__all__ = ["recalibrate_bn"]


class _Layer:
    """One layer being recalibrated: where its statistics live and the running ``(count, mean, M2)``.

    Also counts, per channel, the calls whose statistics were not finite (left out of that channel's
    pooled statistics), and the calls with values and those with any such channel (float64 tensors,
    pooled across processes with the statistics).
    """

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module: Any = module
        self.keras = isinstance(module, BatchNormalization)
        keys = ("moving_mean", "moving_variance") if self.keras else ("running_mean", "running_var")
        self.mean_key, self.var_key = keys
        mean = getattr(module, self.mean_key)
        self.C = mean.numel()
        self.unbiased = False if self.keras else bool(getattr(module, "unbiased_running_var", True))
        zero = torch.zeros(self.C, dtype=F64, device=mean.device)
        self.stats = (zero, zero.clone(), zero.clone())
        self.dropped = zero.clone()  # per channel: calls left out for non-finite statistics
        self.calls = torch.zeros(2, dtype=F64, device=mean.device)  # (calls with values, calls with a drop)

    def dims(self, x: Tensor) -> tuple[int, ...] | None:
        """The reduced dims for this input, or ``None`` when the layer will reject it anyway."""
        if self.keras:
            ax = self.module.axis % x.dim() if -x.dim() <= self.module.axis < x.dim() else None
            if ax is None or x.shape[ax] != self.C:
                return None
            return tuple(d for d in range(x.dim()) if d != ax)
        if x.dim() < 2 or x.shape[1] != self.C:
            return None
        return (0, *range(2, x.dim()))

    def add(self, x: Any, mask: Any) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.numel() == 0:
            return
        dims = self.dims(x)
        if dims is None:
            return  # the layer's own forward raises its clear error next
        m = moments(x.detach(), dims, mask if isinstance(mask, Tensor) else None)
        dev = self.stats[0].device
        count = m.count.reshape(self.C).to(dev, F64)
        mean = m.mean.reshape(self.C).to(dev, F64)
        var = m.var.reshape(self.C).to(dev, F64)
        # A channel whose statistics for this call are not finite (a NaN or Inf value, or an overflow) is
        # left out for this call only: merged in, it would make the channel's pooled statistics NaN for
        # the whole pass. Branch-free (no host read per call); counted, and reported at the end.
        has = count > 0
        bad = has & ~(torch.isfinite(mean) & torch.isfinite(var))
        zero = torch.zeros((), dtype=F64, device=dev)
        count = torch.where(bad, zero, count)
        mean = torch.where(bad, zero, mean)
        m2 = torch.where(bad, zero, var * count)
        self.stats = chan_merge(self.stats, (count, mean, m2))
        self.dropped += bad.to(F64)
        self.calls += torch.stack([has.any(), bad.any()]).to(F64)

    def hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs.get("input", kwargs.get("x"))
        mask = args[1] if len(args) > 1 else kwargs.get("mask")
        self.add(x, mask)


def _targets(model: nn.Module) -> list[_Layer]:
    """The layers to recalibrate: BN with running statistics in use (not Frozen BN, not the frozen
    norm+activation layers of ``freeze_bn``, not frozen Keras BN)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, _EvalPinned):
            continue  # FrozenBatchNormAct2d / FrozenSyncBatchNormAct: frozen, as a FrozenBatchNorm is
        if isinstance(m, _TorchBatchNorm):
            if m.track_running_stats and m.running_mean is not None and m.running_var is not None:
                out.append(_Layer(name, m))
        elif isinstance(m, BatchNormalization) and m.trainable:
            out.append(_Layer(name, m))
    return out


def _length(loader: Any, num_batches: int | None) -> int | None:
    try:
        n = len(loader)
    except TypeError:
        n = None
    if num_batches is None:
        return n
    return num_batches if n is None else min(n, num_batches)


def _to(x: Any, device: Any) -> Any:
    return x.to(device) if device is not None and isinstance(x, Tensor) else x


def _run(model: nn.Module, batch: Any, device: Any) -> None:
    if isinstance(batch, Tensor):
        model(_to(batch, device))
    elif isinstance(batch, Mapping):
        model(**{k: _to(v, device) for k, v in batch.items()})
    elif isinstance(batch, (list, tuple)) and batch:
        model(_to(batch[0], device))  # (input, target, ...): the input, as swa_utils.update_bn
    else:
        raise NormError(
            f"recalibrate_bn: expected batches that are a Tensor, a (input, ...) tuple/list or a mapping of "
            f"keyword arguments, got {type(batch).__name__}"
        )


def _all_have(have: bool, channels: int, group: Any, device: torch.device, op: str) -> bool:
    """Whether every process still has a batch (one tiny all-reduce): all stop together, none waits.

    The same all-reduce compares the processes' numbers of BN channels: the statistics exchanged
    at the end have that size, and gloo aborts every process when sizes differ.
    """
    import torch.distributed as dist

    flag = torch.tensor([1.0 if have else 0.0, channels, -channels], dtype=F64)
    flag = flag.to(comm_device(group, device))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    all_have, least, neg_most = flag.tolist()  # one host read
    most = -neg_most
    if least != most:
        raise NormError(
            f"{op}: expected the same BN layers on every process (the same model), got between "
            f"{int(least)} and {int(most)} BN channels with running statistics on the processes of the "
            f"group (this one: {channels}); call it on the same model on every process"
        )
    return all_have > 0.0


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    loader: Iterable[Any],
    num_batches: int | None = None,
    progress: bool = True,
    *,
    device: Any = None,
    process_group: Any = None,
) -> nn.Module:
    """Recompute every BN layer's running statistics over ``loader`` (precise BN); returns the model.

    The model runs in training mode (as in training: each BN normalizes with its batch's
    statistics, and SyncBatchNorm with the group's) with the weights fixed, and each BN layer's
    inputs are pooled exactly: ``running_mean`` becomes the mean of every value the layer saw and
    ``running_var`` their variance, within-batch variance plus the variance of the batch means,
    weighted by count (Chan et al.'s parallel formula in float64), stored unbiased (``* N / (N -
    1)``) or biased after the layer's own convention (``unbiased_running_var``; Keras-style
    :class:`~normkit.nn.BatchNormalization`: biased). With torch.distributed initialised, the
    statistics of all processes of the group are pooled (one ``all_gather`` at the end), so every
    process ends with the same population statistics.

    Recalibrated: every ``torch.nn`` / normkit batch-norm layer with running statistics in use
    (BatchNorm, SyncBatchNorm, Ghost BN, Batch Renorm, BatchNormAct2d, SyncBatchNormAct) and
    trainable Keras-style layers. Left alone: the frozen layers, FrozenBatchNorm and what
    :func:`~normkit.surgery.freeze_bn` makes of a norm+activation layer (``FrozenBatchNormAct2d``,
    ``FrozenSyncBatchNormAct``: they stay in eval and normalize their inputs with the statistics
    they keep; to recalibrate them, :func:`~normkit.surgery.unfreeze_bn` first and freeze again
    after), frozen Keras layers, layers with ``track_running_stats=False``,
    :class:`~normkit.nn.MeanOnlyBatchNorm` (its running mean follows its own EMA in training; it is
    not a ``_BatchNorm``, so ``torch.optim.swa_utils.update_bn`` leaves it too), and every other
    buffer of the model: the pass has no other side effect (each layer's ``num_batches_tracked``
    too is kept, as Batch Renorm's warm-up reads it; during the pass running statistics are held
    fixed, momentum 0). Masked inputs (``layer(x, mask)``) count their valid values only, and a
    layer called several times per forward, or on inputs of different sizes, pools all of its
    calls. A layer that saw no value keeps its statistics (with a warning); a channel that saw
    fewer than 2 values keeps its variance; nothing non-finite is ever stored. An input batch
    whose statistics are not finite for some channels (a NaN or Inf value, or an overflow) is
    left out of those channels' statistics only, the rest is pooled as usual, and a
    ``UserWarning`` names the layers, channels and number of such batches (they are added to the
    layer's ``num_skipped_updates``; pooled over the processes); a channel that saw no finite
    value keeps its statistics. Momentum and train/eval flags are restored.

    Args:
        model: the model (a DDP-wrapped one works too).
        loader: an iterable of batches: Tensors, ``(input, target, ...)`` tuples/lists (the input
            is used) or mappings of keyword arguments for ``model``.
        num_batches: use only the first ``num_batches`` batches (``None``: the whole loader).
        progress: show a progress bar (rich, on stderr; rank 0 only).
        device: move each input there first (``None``: as they come).
        process_group: the group whose statistics are pooled (``None``: the whole world).

    With several processes every process must call this, and all stop after the same number of
    batches (the fewest any process has; a one-value all-reduce per batch keeps them in step).

    Example:
        >>> import torch, normkit
        >>> net = torch.nn.Sequential(normkit.nn.BatchNorm1d(2))
        >>> data = [torch.randn(16, 2) * 3 + 1 for _ in range(4)]
        >>> _ = normkit.recalibrate_bn(net, data, progress=False)
        >>> everything = torch.cat(data)
        >>> torch.allclose(net[0].running_mean, everything.mean(0), atol=1e-5)
        True
        >>> torch.allclose(net[0].running_var, everything.var(0), atol=1e-4)   # unbiased, over all 64
        True

    Reference: https://arxiv.org/abs/2105.07576 (Wu & Johnson, Rethinking "Batch" in BatchNorm, §3)
    """
    op = "recalibrate_bn"
    check_model(model, op)
    bad_count = isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    if num_batches is not None and bad_count:
        raise NormError(f"{op}: num_batches must be None or an int >= 1, got {num_batches!r}")
    if isinstance(loader, (Tensor, str, bytes)) or not isinstance(loader, Iterable):
        raise TypeError(
            f"{op}: expected an iterable of batches (a DataLoader, a list of tensors ...), "
            f"got {type(loader).__name__}"
            + ("; wrap a single batch in a list" if isinstance(loader, Tensor) else "")
        )
    import torch.distributed as dist

    layers = _targets(model)
    world = group_size(process_group)
    rank = dist.get_rank(process_group) if world > 1 else 0  # in the group: its first process shows progress
    home = layers[0].stats[0].device if layers else torch.device("cpu")

    snapshot = [(b, b.detach().clone()) for b in model.buffers()]
    flags = [(m, m.training) for m in model.modules()]
    momenta = [(layer.module, layer.module.momentum) for layer in layers]
    handles = [layer.module.register_forward_pre_hook(layer.hook, with_kwargs=True) for layer in layers]
    seen = 0
    try:
        for layer in layers:  # hold the running statistics fixed during the pass (Batch Renorm reads them)
            layer.module.momentum = 1.0 if layer.keras else 0.0
        model.train()
        from .._progress import Progress

        with Progress(quiet=not progress or rank != 0) as bar:
            task = bar.add(op, _length(loader, num_batches))
            batches = iter(loader)
            while True:
                batch, have = None, num_batches is None or seen < num_batches
                if have:
                    try:
                        batch = next(batches)
                    except StopIteration:
                        have = False
                if world > 1:
                    have = _all_have(have, sum(layer.C for layer in layers), process_group, home, op)
                if not have:
                    break
                _run(model, batch, device)
                seen += 1
                bar.advance(task)
    finally:
        for h in handles:
            h.remove()
        for m, mom in momenta:
            m.momentum = mom
        for m, flag in flags:
            m.training = flag
        for b, saved in snapshot:
            b.copy_(saved)

    if not layers:
        return model
    count, mean, m2, dropped, calls = _pooled(layers, world, process_group)
    unused: list[str] = []
    partly: list[str] = []  # layers with calls left out for some channels
    start = 0
    for i, layer in enumerate(layers):
        n = count[start : start + layer.C]
        mu = mean[start : start + layer.C]
        M2 = m2[start : start + layer.C]
        lost = dropped[start : start + layer.C]
        start += layer.C
        label = layer.name or type(layer.module).__name__
        n_calls, n_dropped = (int(v) for v in calls[i].tolist())
        if n_dropped:
            partly.append(_dropped_line(label, layer.module, n_calls, n_dropped, lost, n))
            skipped = getattr(layer.module, "num_skipped_updates", None)
            if isinstance(skipped, Tensor):  # (after the buffers were restored: the pass's own count undone)
                skipped.add_(n_dropped)
        if not bool((n > 0).any()):
            if not n_dropped:
                unused.append(label)
            continue
        if layer.unbiased:
            var, var_ok = M2 / (n - 1.0).clamp_min(1.0), n >= 2.0
        else:
            var, var_ok = M2 / n.clamp_min(1.0), n >= 1.0
        rm = getattr(layer.module, layer.mean_key)
        rv = getattr(layer.module, layer.var_key)
        mean_ok = (n >= 1.0) & torch.isfinite(mu)
        var_ok = var_ok & torch.isfinite(var)
        rm.copy_(torch.where(mean_ok, mu.to(rm.device, rm.dtype), rm))
        rv.copy_(torch.where(var_ok, var.to(rv.device, rv.dtype), rv))
    if unused:
        warnings.warn(
            f"{op}: {len(unused)} BN layer(s) saw no values in {seen} batch(es) and keep their statistics: "
            f"{', '.join(unused)} (not reached by the forward, or every input empty or masked out)",
            UserWarning,
            stacklevel=2,
        )
    if partly:
        warnings.warn(
            f"{op}: non-finite statistics (a NaN or Inf value in the input, or an overflow) in {len(partly)} "
            "BN layer(s); each such input batch was left out of the statistics of the channels it made "
            "non-finite (the other channels and batches are pooled as usual; counted in num_skipped_updates "
            "where the layer has one, as normkit's do): " + "; ".join(partly) + "; check the data (or the "
            "model) for NaN/Inf",
            UserWarning,
            stacklevel=2,
        )
    return model


def _pooled(layers: list[_Layer], world: int, group: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Every layer's ``(count, mean, M2)`` (concatenated, ``sum(C)`` each), dropped-call counts per channel
    and ``(calls, calls with a drop)`` per layer (``(L, 2)``): pooled over the group's processes when
    ``world > 1``, so every process reads the same numbers and warns alike."""
    count = torch.cat([layer.stats[0] for layer in layers])
    mean = torch.cat([layer.stats[1] for layer in layers])
    m2 = torch.cat([layer.stats[2] for layer in layers])
    dropped = torch.cat([layer.dropped for layer in layers])
    calls = torch.cat([layer.calls.to(count.device) for layer in layers])
    if world > 1:
        # The counters ride in the same all_gather, as extra entries with mean and M2 zero: merging
        # sums their counts across processes (exact integers in float64), and no collective is added.
        C, D = count.numel(), dropped.numel()
        extra = torch.cat([dropped.to(count.device), calls])
        zeros = torch.zeros_like(extra)
        g = all_gather_moments(
            torch.cat([count, extra]), torch.cat([mean, zeros]), torch.cat([m2, zeros]), group
        )
        count, mean, m2 = g.count[:C], g.mean[:C], g.m2[:C]
        dropped, calls = g.count[C : C + D], g.count[C + D :]
    return count, mean, m2, dropped, calls.reshape(len(layers), 2)


def _dropped_line(label: str, module: nn.Module, calls: int, dropped: int, lost: Tensor, n: Tensor) -> str:
    """``'name' (Class): 1 of 4 input batch(es) left out, for channel 0``, and the channels that saw no
    finite value (they keep their statistics)."""
    hit = torch.nonzero(lost > 0).flatten().tolist()
    kept = torch.nonzero((lost > 0) & (n <= 0)).flatten().tolist()
    C = lost.numel()
    line = f"'{label}' ({type(module).__name__}): {dropped} of {calls} input batch(es) left out, for "
    line += _channels(hit, C)
    if kept:
        keeps = "keeps its statistics" if len(kept) == 1 else "keep their statistics"
        line += f" ({_channels(kept, C)} saw no finite value and {keeps})"
    return line


def _channels(idx: list[int], C: int, most: int = 8) -> str:
    """``channel 3``, ``channels 0, 2, 5``, ``all 64 channels``, ``channels 0, 1, ... (20 of 64)``."""
    if len(idx) == C and C > 1:
        return f"all {C} channels"
    if len(idx) == 1:
        return f"channel {idx[0]}"
    shown = ", ".join(str(i) for i in idx[:most])
    return f"channels {shown}" + (f", ... ({len(idx)} of {C})" if len(idx) > most else "")
