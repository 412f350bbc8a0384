"""Synchronised batch normalization over torch.distributed, functional form.

BN whose statistics pool over the batches of every process in a group, so that N processes with
per-process batches of B normalize exactly as one process with the concatenated batch of N*B
(the SyncBN of Peng et al. 2018 and ``torch.nn.SyncBatchNorm``). It is normkit's two halves with
one collective between each (ARCHITECTURE.md §3):

* forward: each process computes its own per-channel ``(count, mean, M2)`` with the shifted
  two-pass core; one ``all_gather`` exchanges them; every process merges them with Chan et al.'s
  parallel formula in float64 (:mod:`normkit.functional._collective`), so all hold the same
  global statistics; then it normalizes its own values with them;
* backward: each process forms the two per-channel sums ``sum dy`` and ``sum dy * x_hat`` over
  its values; one ``all_reduce`` adds them over the group; then ``dx`` (:mod:`normkit.ops.core`) with the
  global count. ``dweight`` and ``dbias`` stay per process (sums over its own values), as in
  torch: DistributedDataParallel averages them like every other parameter gradient.

Uneven per-process batches (including empty ones) are exact: each process's summary is weighted
by its count. Collectives run only in training, when torch.distributed is initialised and the
group has more than one process; otherwise this is :func:`normkit.functional.batch_norm`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._errors import NormError
from ..ops import core
from ._checks import check_eps, check_input, check_momentum, check_param
from ._collective import F64, all_gather_moments, all_gather_sizes, comm_device, group_size
from ._running import NormOutput, update_running_stats_where
from ._views import channel_view
from .batch_norm import batch_norm
from .masked import check_mask

__all__ = ["sync_batch_norm"]


def sync_batch_norm(
    x: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Tensor | None = None,
    *,
    process_group: Any = None,
    unbiased_running_var: bool = True,
    mask: Tensor | None = None,
) -> NormOutput:
    r"""Batch normalization with statistics over every process of ``process_group``; returns NormOutput.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    with ``E`` and ``Var`` (biased) per channel over ``(N, *spatial)`` of the *concatenation* of
    all processes' inputs. The running statistics follow PyTorch's convention ``running = (1 -
    momentum) * running + momentum * batch`` with the unbiased global variance (``M2 / (N_total -
    1)``), identical on every process; they are returned, never written in place.

    In training, with torch.distributed initialised and more than one process in the group, every
    process must call this (same channel count, same ``training``): two ``all_gather`` in the
    forward (the channel counts, then the statistics), one ``all_reduce`` in the backward. A bad
    input on one process, or channel counts that differ between processes, make *every* process
    raise (the others name the failing rank) instead of leaving them waiting or aborting; so does
    a global count of one value per channel. Otherwise (eval mode, one process, no process group) it is
    :func:`normkit.functional.batch_norm` and issues no collective.

    Args:
        x: input ``(N, C, *spatial)`` of this process; ``N`` may differ between processes, and be 0.
        running_mean, running_var, weight, bias: as :func:`normkit.functional.batch_norm`.
        training, momentum, eps, num_batches_tracked, unbiased_running_var, mask: likewise.
        process_group: the group to synchronise over (``None``: the default, whole world).

    Returns:
        :class:`NormOutput` ``(output, running_mean, running_var, num_batches_tracked)``.

    Example:
        >>> x = torch.randn(8, 3, 4, 4)           # no process group here: plain batch norm
        >>> out = sync_batch_norm(x, torch.zeros(3), torch.ones(3), training=True)
        >>> ref = torch.nn.functional.batch_norm(x, torch.zeros(3), torch.ones(3), training=True)
        >>> torch.allclose(out.output, ref, atol=1e-5)
        True

    Reference: https://arxiv.org/abs/1711.07240 (MegDet: cross-GPU batch normalization)
    """
    op = "sync_batch_norm"
    if training and group_size(process_group) > 1:
        num_features, eps, momentum = _agree_eagerly(
            x, (weight, bias, running_mean, running_var), eps, momentum, process_group, op
        )
        return sync_batch_norm_train(
            x,
            running_mean,
            running_var,
            weight,
            bias,
            momentum,
            eps,
            num_batches_tracked,
            process_group,
            unbiased_running_var,
            mask,
            num_features,
            op,
        )
    eps = check_eps(eps, op)
    momentum = check_momentum(momentum, op)
    return batch_norm(
        x,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        num_batches_tracked,
        unbiased_running_var=unbiased_running_var,
        mask=mask,
    )


def _channels(x: object, params: tuple[Tensor | None, ...], op: str) -> int:
    """The channel count every process agrees on: from the parameters when given, else from ``x``."""
    for p in params:
        if isinstance(p, Tensor) and p.dim() == 1:
            return p.numel()
    if isinstance(x, Tensor) and x.dim() >= 2:
        return x.shape[1]
    raise NormError(
        f"{op}: cannot tell the channel count: expected an (N, C, ...) input or a (C,) weight / running "
        f"statistic, got {type(x).__name__}"
        + (f" of shape {tuple(x.shape)}" if isinstance(x, Tensor) else "")
    )


def _agree_on_channels(
    x: object,
    params: tuple[Tensor | None, ...],
    eps: float,
    momentum: float | None,
    group: Any,
    op: str,
) -> tuple[int, float, float | None]:
    """The channel count, the same on every process of ``group`` (one small all_gather), eps, momentum.

    Each process of the functional form works the count out for itself (from its parameters, or
    its input when it has none), and the statistics exchange has ``3 * C`` values: with different
    counts gloo would abort every process, and a process that cannot tell its count (or got a bad
    ``eps`` / ``momentum``) would leave the others waiting. So the counts are exchanged first and,
    where they differ or one is missing, every process raises.
    """
    error: NormError | TypeError | None = None
    C = -1
    try:
        eps = check_eps(eps, op)
        momentum = check_momentum(momentum, op)
        C = _channels(x, params, op)
    except (NormError, TypeError) as e:
        error = e
    device = x.device if isinstance(x, Tensor) else None
    sizes = all_gather_sizes(C, group, device)
    if error is not None:
        raise error
    failed = [r for r, n in enumerate(sizes) if n < 0]
    if failed:
        raise NormError(
            f"{op}: process(es) {failed} of the {len(sizes)}-process group got invalid arguments (their own "
            "error says which); every process of the group stops here instead of waiting for them"
        )
    if len(set(sizes)) > 1:
        raise NormError(
            f"{op}: expected the same channel count on every process of the group, got {sizes} (process 0 "
            f"to {len(sizes) - 1}; from each process's weight, bias or running statistics, else dim 1 of its "
            "input); give every process the same parameters and inputs of the same channel count"
        )
    return C, eps, momentum


_AGREE_EAGER: Any = None


def _agree_eagerly(*args: Any) -> tuple[int, float, float | None]:
    """:func:`_agree_on_channels` outside Dynamo (a collective and a host read: a graph break)."""
    global _AGREE_EAGER
    if _AGREE_EAGER is None:
        _AGREE_EAGER = torch.compiler.disable(_agree_on_channels)
    return _AGREE_EAGER(*args)


def _local_moments(
    x: Tensor, mask: Tensor | None, dims: tuple[int, ...], eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """This process's per-channel ``(count, mean, M2)`` in float64, from the shifted two-pass core."""
    C = x.shape[1]
    if x.numel() == 0:
        zero = torch.zeros(C, dtype=F64, device=x.device)
        return zero, zero.clone(), zero.clone()
    _, stats = core.norm_forward(x.detach(), None, None, mask, dims, eps)
    # The saved statistics keep the shift and the power-of-two scale apart: in float64 the true
    # mean and variance are exact for every finite fp32 input (no overflow of the variance).
    mean, var = core.mean_var(stats.to(F64))
    count = core.stats_count(stats).to(F64)
    return count.reshape(C), mean.reshape(C), (var * count).reshape(C)


_EAGER: Any = None


def sync_batch_norm_train(*args: Any, **kwargs: Any) -> NormOutput:
    """The synchronised training step (every process of the group must call it); see :func:`sync_batch_norm`.

    Arguments as :func:`_sync_batch_norm_train`. Collectives run eagerly: under Dynamo this is a
    graph break, as torch's SyncBatchNorm. (``torch.compiler.disable`` is applied on the first
    call, not at import: it imports Dynamo, and ``import normkit`` stays light.)
    """
    global _EAGER
    if _EAGER is None:
        _EAGER = torch.compiler.disable(_sync_batch_norm_train)
    return _EAGER(*args, **kwargs)


def _sync_batch_norm_train(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None,
    process_group: Any,
    unbiased_running_var: bool,
    mask: Tensor | None,
    num_features: int,
    op: str,
    check: Callable[[Tensor], None] | None = None,
) -> NormOutput:
    """The synchronised training step.

    ``check`` is the caller's own input check (a module's rank and channel checks); any input
    error is reported to the other processes through the collective before it is raised here.
    """

    C = num_features
    error: BaseException | None = None
    try:
        check_input(x, op)
        if check is not None:
            check(x)
        if x.shape[1] != C:
            raise NormError(
                f"{op}: expected {C} channels (dim 1), got input of shape {tuple(x.shape)} with {x.shape[1]}"
            )
        params = (
            ("weight", weight),
            ("bias", bias),
            ("running_mean", running_mean),
            ("running_var", running_var),
        )
        for name, p in params:
            check_param(p, x, (C,), op, name)
        if (running_mean is None) != (running_var is None):
            raise NormError(f"{op}: give both running_mean and running_var, or neither")
        if mask is not None:
            check_mask(mask, x, op)
    except (NormError, TypeError) as e:
        error = e
    home = next((t.device for t in (x, weight, running_mean) if isinstance(t, Tensor)), torch.device("cpu"))
    if error is None:
        dims = (0, *range(2, x.dim()))
        count, mean, m2 = _local_moments(x, mask, dims, eps)
    else:
        count = torch.zeros(C, dtype=F64, device=home)
        mean, m2 = count.clone(), count.clone()
    g = all_gather_moments(count, mean, m2, process_group, failed=error is not None)
    world = len(g.counts)
    if g.failed:
        if error is not None:
            raise error
        raise NormError(
            f"{op}: process(es) {g.failed} of the {world}-process group got an invalid input (their own "
            "error says which); every process of the group stops here instead of waiting for them"
        )
    if mask is None and g.first_count == 1.0:
        per_process = [int(n) for n in g.counts[:, 0].tolist()]
        raise NormError(
            f"{op}: expected more than 1 value per channel in training across the {world} processes of "
            f"the group, got 1 in all (values per channel on each process: {per_process}); use larger "
            "batches, or eval mode with running statistics"
        )
    if mask is None and g.first_count == 0.0:
        # Every process got an empty batch: empty outputs, zero parameter grads, statistics unchanged.
        y = batch_norm(x, None, None, weight, bias, True, momentum, eps).output
        return NormOutput(y, running_mean, running_var, num_batches_tracked)

    n = g.count  # float64 (C,), the same on every process
    var = g.m2 / n.clamp_min(1.0)  # biased, float64
    acc = core.acc_dtype(x.dtype)
    # The mean as an exact sum shift + delta, shift representable in the accumulation dtype:
    # (x - shift) is exact for values near the mean (Sterbenz), so a large common offset costs
    # nothing in fp32 (the core's trick, :mod:`normkit.ops.core`).
    shift = g.mean.to(acc)
    delta = (g.mean - shift.to(F64)).to(acc)
    rstd = torch.rsqrt(var + eps).to(acc)
    y = _SyncBatchNormFunction.apply(x, weight, bias, shift, delta, rstd, n.to(acc), mask, process_group)
    if running_mean is None or running_var is None:
        return NormOutput(y, running_mean, running_var, num_batches_tracked)
    if unbiased_running_var:
        store = g.m2 / (n - 1.0).clamp_min(1.0)
        valid = n >= 2.0
    else:
        store, valid = var, n >= 1.0
    rm, rv, nbt = update_running_stats_where(
        running_mean, running_var, num_batches_tracked, g.mean, store, valid, momentum, op
    )
    return NormOutput(y, rm, rv, nbt)


def _same_layout(t: Tensor, like: Tensor) -> Tensor:
    """``t`` with ``like``'s strides where they differ (channels_last in, channels_last gradient out)."""
    if t.stride() == like.stride() or t.numel() == 0:
        return t
    out = torch.empty_like(like, dtype=t.dtype)
    return out.copy_(t) if out.shape == t.shape else t


class _SyncBatchNormFunction(torch.autograd.Function):
    """Normalize with given global statistics; the backward all-reduces the two per-channel sums."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        shift: Tensor,
        delta: Tensor,
        rstd: Tensor,
        count: Tensor,
        mask: Tensor | None,
        group: Any,
    ) -> Tensor:
        nd = x.dim()
        sv, dv, rv = (channel_view(t, nd) for t in (shift, delta, rstd))
        assert sv is not None and dv is not None and rv is not None
        d = torch.sub(x, sv)  # accumulation dtype by type promotion; x's layout
        d.sub_(dv)
        scale = rv if weight is None else rv * channel_view(weight, nd).to(rv.dtype)
        y = d.mul_(scale)
        b = None if bias is None else channel_view(bias, nd).to(rv.dtype)
        if b is not None:
            y = y.add_(b)
        if mask is not None:  # padded positions output the bias, as in normkit's masked BN
            y = torch.where(mask, y, torch.zeros((), dtype=y.dtype, device=y.device) if b is None else b)
        ctx.save_for_backward(x, weight, shift, delta, rstd, count, mask)
        ctx.group = group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        import torch.distributed as dist

        x, weight, shift, delta, rstd, count, mask = ctx.saved_tensors
        nd = x.dim()
        dims = (0, *range(2, nd))
        acc = rstd.dtype
        sv, dv, rv = (channel_view(t, nd) for t in (shift, delta, rstd))
        assert sv is not None and dv is not None and rv is not None
        zero = torch.zeros((), dtype=acc, device=x.device)
        x_hat = torch.sub(x, sv).sub_(dv).mul_(rv)
        g = dy.to(acc)
        if mask is not None:
            x_hat = torch.where(mask, x_hat, zero)
            g_valid = torch.where(mask, g, zero)
        else:
            g_valid = g
        s_dy = g_valid.sum(dims)
        s_dyxh = (g_valid * x_hat).sum(dims)
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dweight = s_dyxh.to(weight.dtype) if need_w and weight is not None else None
        dbias = None
        if need_b:
            dbias = (g.sum(dims) if mask is not None else s_dy).to(ctx.bias_dtype or acc)
        # Every process of the group runs this backward, so every process joins the all-reduce
        # (even one whose input needs no gradient): a skipped collective would hang the others.
        buf = torch.cat([s_dy, s_dyxh]).to(comm_device(ctx.group, x.device), F64)
        dist.all_reduce(buf, group=ctx.group)
        total_dy, total_dyxh = buf.to(x.device, acc).chunk(2)
        if not need_x:
            return None, dweight, dbias, None, None, None, None, None, None
        safe = count.clamp_min(1.0)
        a = rv if weight is None else rv * channel_view(weight, nd).to(acc)
        k1 = channel_view(total_dyxh / safe, nd)
        k2 = channel_view(total_dy / safe, nd)
        # dx = gamma * rstd * (dy - mean(dy) - x_hat * mean(dy * x_hat)), means over the whole group
        dx = x_hat.mul_(k1).add_(k2).neg_().add_(g_valid).mul_(a)
        if mask is not None:
            dx = torch.where(mask, dx, zero)
        dx = _same_layout(dx if dx.dtype == x.dtype else dx.to(x.dtype), x)
        return dx, dweight, dbias, None, None, None, None, None, None
