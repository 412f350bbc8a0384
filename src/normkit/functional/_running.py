"""Running-statistics updates, returned as new tensors (functional ops never write their arguments)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .._errors import NormError
from ..ops.core import acc_dtype


class NormOutput(NamedTuple):
    """What an op with running statistics returns: the output and the *updated* statistics.

    ``running_mean``, ``running_var`` and ``num_batches_tracked`` are new tensors (or the ones
    passed in, unchanged, when nothing was updated, or ``None`` when none were given); a module
    copies them into its buffers.

    Example:
        >>> rm, rv = torch.zeros(3), torch.ones(3)
        >>> out = normkit.functional.batch_norm(torch.randn(8, 3) + 5, rm, rv, training=True)
        >>> out.output.shape, out.running_mean is rm, bool((out.running_mean > 0.3).all()), rm.sum().item()
        (torch.Size([8, 3]), False, True, 0.0)
    """

    output: Tensor
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None


def live_count(counter: Tensor) -> Tensor:
    """``counter`` (a one-element buffer such as ``num_batches_tracked``) read through a reduction.

    AOTInductor (torch 2.13) folds pointwise arithmetic on a one-element buffer alone into its value at
    compile time, although the graph writes that buffer: a package computed every later step from the
    counter's compile-time value (Batch Renorm's warm-up stuck at step 0, the cumulative average
    restarting at every step). A reduction is not folded, and costs one tiny op in eager.

    Example:
        >>> live_count(torch.tensor(7))
        tensor(7)
    """
    return counter.sum()


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
    The update is computed in float32 (float64 for float64 buffers) and rounded once to the buffers'
    dtype, as torch does: a float16 model's batch variance above 65504 still updates its buffers (it
    was rounded to inf first, and the step skipped). A step whose result is not finite in the
    buffers' dtype (a NaN or an infinity in the batch, or a value the dtype cannot hold) leaves every
    buffer unchanged (no NaN/Inf is ever written), branch-free so that it costs no device sync.
    """
    acc = acc_dtype(running_mean.dtype)
    mean = batch_mean.reshape(running_mean.shape).to(acc)
    var = batch_var.reshape(running_var.shape).to(acc)
    if unbiased:
        var = var * (count / (count - 1))
    if momentum is None:
        if num_batches_tracked is None:
            raise NormError(f"{op}: momentum=None (cumulative average) needs num_batches_tracked")
        # (this step's weight if it counts; a step that does not changes nothing)
        factor: Tensor | float = 1.0 / (live_count(num_batches_tracked) + 1).clamp(min=1).to(acc)
    else:
        factor = momentum
    new_mean = torch.lerp(running_mean.to(acc), mean, factor).to(running_mean.dtype)
    new_var = torch.lerp(running_var.to(acc), var, factor).to(running_var.dtype)
    finite = torch.isfinite(new_mean).all() & torch.isfinite(new_var).all()
    new_nbt = None
    if num_batches_tracked is not None:
        new_nbt = num_batches_tracked + finite.to(num_batches_tracked.dtype)
    return (
        torch.where(finite, new_mean, running_mean),
        torch.where(finite, new_var, running_var),
        new_nbt,
    )


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
    # (in the update's dtype: a float16 buffer would round a large batch variance to inf here)
    acc = acc_dtype(running_mean.dtype)
    bm = torch.where(valid, batch_mean.reshape(running_mean.shape).to(acc), running_mean.to(acc))
    bv = torch.where(valid, batch_var.reshape(running_var.shape).to(acc), running_var.to(acc))
    rm, rv, nbt = update_running_stats(
        running_mean, running_var, num_batches_tracked, bm, bv, 2, momentum, False, op
    )
    if nbt is not None and num_batches_tracked is not None:
        nbt = torch.where(valid.any(), nbt, num_batches_tracked)
    return rm, rv, nbt
