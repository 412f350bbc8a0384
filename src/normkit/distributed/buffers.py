"""Make every process's normalization buffers (running statistics) agree."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._errors import NormError
from ..functional._collective import F64, all_gather_sizes, comm_device, group_size

__all__ = ["sync_bn_buffers"]

# (mean, variance) buffer pairs: PyTorch's names, then Keras's (normkit.nn.BatchNormalization).
_PAIRS = (("running_mean", "running_var"), ("moving_mean", "moving_variance"))
_COUNTER = "num_batches_tracked"


def _stat_buffers(model: nn.Module) -> list[tuple[Tensor, Tensor | None, Tensor | None]]:
    """Every ``(mean, var or None, num_batches_tracked or None)`` buffer group of the model's layers."""
    out: list[tuple[Tensor, Tensor | None, Tensor | None]] = []
    for m in model.modules():
        bufs = m._buffers
        for mean_key, var_key in _PAIRS:
            mean = bufs.get(mean_key)
            if isinstance(mean, Tensor) and mean.is_floating_point():
                var = bufs.get(var_key)
                nbt = bufs.get(_COUNTER)
                var = var if isinstance(var, Tensor) else None
                out.append((mean, var, nbt if isinstance(nbt, Tensor) else None))
    return out


def sync_bn_buffers(
    model: nn.Module,
    mode: Literal["average", "broadcast"] = "average",
    src: int = 0,
    *,
    process_group: Any = None,
) -> nn.Module:
    """Make every process's running statistics equal (one exchange for the whole model); returns the model.

    Every layer with running statistics is covered: BN (torch's and normkit's, SyncBatchNorm, Ghost
    BN, Batch Renorm), FrozenBatchNorm, InstanceNorm with ``track_running_stats``, mean-only BN and
    the Keras-style layer (``moving_mean`` / ``moving_variance``).

    * ``mode="broadcast"``: every process takes process ``src``'s buffers (as DDP's
      ``broadcast_buffers`` does at each forward).
    * ``mode="average"``: each process's statistics describe the data it saw; the result describes
      their mixture, with equal weights: ``mean = mean_r(mean_r)`` and ``var = mean_r(var_r) +
      mean_r((mean_r - mean)^2)`` (within plus between processes; a plain average of the variances
      would understate it when processes see different data). ``num_batches_tracked`` becomes the
      largest. A process whose statistics in a channel are not finite is left out of that
      channel's average (no NaN is ever spread); if none is finite the channel is kept.

    With one process, or without an initialised process group, nothing happens. Every process of
    the group must call this, with the same model structure (buffers that differ in number or
    size between processes raise a :class:`~normkit.NormError` on every process). Two
    collectives: the buffer sizes are compared first.

    Args:
        model: the model (or a DDP wrapper).
        mode: ``"average"`` or ``"broadcast"``.
        src: the process (rank within ``process_group``) whose buffers ``"broadcast"`` sends.
        process_group: the group (``None``: the whole world).

    Example:
        >>> import torch, normkit
        >>> net = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
        >>> normkit.sync_bn_buffers(net) is net                 # one process: nothing to do
        True
    """
    op = "sync_bn_buffers"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: expected an nn.Module, got {type(model).__name__}")
    if mode not in ("average", "broadcast"):
        raise NormError(f"{op}: mode must be 'average' or 'broadcast', got {mode!r}")
    if isinstance(src, bool) or not isinstance(src, int) or src < 0:
        raise NormError(f"{op}: src must be a rank (an int >= 0), got {src!r}")
    world = group_size(process_group)
    if world > 1 and src >= world:
        raise NormError(f"{op}: src={src} is not a rank of the {world}-process group; use 0 to {world - 1}")
    groups = _stat_buffers(model)
    if world == 1:
        return model
    import torch.distributed as dist

    tensors: list[Tensor] = []
    for mean, var, nbt in groups:
        tensors += [t for t in (mean, var, nbt) if t is not None]
    device = comm_device(process_group, tensors[0].device if tensors else torch.device("cpu"))
    parts = [t.detach().reshape(-1).to(device, F64) for t in tensors]
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=F64, device=device)
    # gloo aborts every process when one collective's sizes differ: compare them first
    # (a process without buffers joins too, so that none waits for it)
    sizes = all_gather_sizes(flat.numel(), process_group, device)
    if not any(sizes):
        return model
    if len(set(sizes)) > 1:
        raise NormError(
            f"{op}: expected the same normalization buffers on every process (the same model), got "
            f"{sizes} buffer values on processes 0 to {len(sizes) - 1} (this one: {len(groups)} layer(s) "
            "with running statistics); call it on the same model on every process"
        )
    with torch.no_grad():
        if mode == "broadcast":
            dist.broadcast(flat, group=process_group, group_src=src)
            new = flat
        else:
            parts = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(parts, flat, group=process_group)
            new = _average(torch.stack(parts), groups, dist.get_rank(process_group))
        start = 0
        for t in tensors:
            n = t.numel()
            t.copy_(new[start : start + n].reshape(t.shape).to(t.device, t.dtype))
            start += n
    return model


def _average(table: Tensor, groups: list[tuple[Tensor, Tensor | None, Tensor | None]], me: int) -> Tensor:
    """Per group, the equal-weight mixture of the processes' statistics (``table``: one row per process).

    Where no process has finite statistics, this process (row ``me``) keeps its own.
    """
    local = table[me]
    rank_row = table  # (world, L)
    out = []
    start = 0
    for mean, var, nbt in groups:
        C = mean.numel()
        mu = rank_row[:, start : start + C]
        mine = local[start : start + C]
        start += C
        ok = torch.isfinite(mu)
        if var is not None:
            v = rank_row[:, start : start + C]
            start += C
            ok = ok & torch.isfinite(v)
        k = ok.sum(0).to(F64)
        safe = k.clamp_min(1.0)
        zero = torch.zeros((), dtype=F64, device=table.device)
        m = torch.where(ok, mu, zero).sum(0) / safe
        out.append(torch.where(k > 0, m, mine))
        if var is not None:
            dev = torch.where(ok, mu - m, zero)
            within = torch.where(ok, v, zero).sum(0) / safe
            mix = within + (dev * dev).sum(0) / safe
            out.append(torch.where(k > 0, mix, local[start - C : start]))
        if nbt is not None:
            out.append(rank_row[:, start : start + 1].amax(0))
            start += 1
    return torch.cat(out)
