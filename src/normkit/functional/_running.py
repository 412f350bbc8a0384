"""Running-statistics updates, returned as new tensors (functional ops never write their arguments)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .._errors import NormError


class NormOutput(NamedTuple):
    """What an op with running statistics returns: the output and the *updated* statistics.

    ``running_mean``, ``running_var`` and ``num_batches_tracked`` are new tensors (or the ones
    passed in, unchanged, when nothing was updated, or ``None`` when none were given); a module
    copies them into its buffers.
    """

    output: Tensor
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    batch_mean: Tensor,
    batch_var: Tensor,
    count: int,
    momentum: float | None,
    unbiased: bool,
    op: str,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``running <- (1 - momentum) * running + momentum * batch`` (PyTorch convention).

    ``batch_var`` is the biased variance over ``count`` values per set; the stored variance is
    the unbiased one, ``batch_var * count / (count - 1)``, when ``unbiased`` (PyTorch, and the BN
    paper's Algorithm 2). ``momentum=None`` gives the cumulative average ``1 / num_batches_tracked``.
    A batch whose statistics are not finite leaves every buffer unchanged (no NaN/Inf is ever
    written), branch-free so that it costs no device sync.
    """
    mean = batch_mean.reshape(running_mean.shape).to(running_mean.dtype)
    var = batch_var.reshape(running_var.shape)
    if unbiased:
        var = var * (count / (count - 1))
    var = var.to(running_var.dtype)
    finite = torch.isfinite(mean).all() & torch.isfinite(var).all()
    new_nbt = None
    if num_batches_tracked is not None:
        new_nbt = num_batches_tracked + finite.to(num_batches_tracked.dtype)
    if momentum is None:
        if new_nbt is None:
            raise NormError(f"{op}: momentum=None (cumulative average) needs num_batches_tracked")
        factor: Tensor | float = 1.0 / new_nbt.clamp(min=1).to(running_mean.dtype)
    else:
        factor = momentum
    # a non-finite batch's statistics become the running ones, so the update leaves them as they are
    # (one op fewer per buffer than masking the update: each op is a kernel launch on a GPU)
    new_mean = torch.lerp(running_mean, torch.where(finite, mean, running_mean), factor)
    new_var = torch.lerp(running_var, torch.where(finite, var, running_var), factor)
    return new_mean, new_var, new_nbt


def update_running_stats_where(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    batch_mean: Tensor,
    batch_var: Tensor,
    valid: Tensor,
    momentum: float | None,
    op: str,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`update_running_stats` for the channels where ``valid`` is True; the others keep their values.

    ``batch_var`` is already the variance to store (unbiased or not). The step counter advances
    only when at least one channel is valid, so a fully masked batch changes nothing.
    """
    valid = valid.reshape(running_mean.shape)
    # Invalid channels get the running value as their "batch" value: rm + f * (rm - rm) == rm exactly.
    bm = torch.where(valid, batch_mean.reshape(running_mean.shape).to(running_mean.dtype), running_mean)
    bv = torch.where(valid, batch_var.reshape(running_var.shape).to(running_var.dtype), running_var)
    rm, rv, nbt = update_running_stats(
        running_mean, running_var, num_batches_tracked, bm, bv, 2, momentum, False, op
    )
    if nbt is not None and num_batches_tracked is not None:
        nbt = torch.where(valid.any(), nbt, num_batches_tracked)
    return rm, rv, nbt
