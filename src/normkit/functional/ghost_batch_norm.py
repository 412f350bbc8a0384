"""Ghost batch normalization (Hoffer, Hubara & Soudry, 2017), functional form, vectorised over chunks."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .._errors import NormError
from ..ops.core import acc_dtype
from ..ops.library import exporting
from ._autograd import norm
from ._checks import check_eps, check_input, check_momentum, check_param, check_positive_int
from ._running import NormOutput, live_count, update_running_stats
from ._views import channel_view, spatial_dims
from .batch_norm import batch_norm

__all__ = ["ghost_batch_norm"]

MomentumMode = Literal["per_chunk", "averaged"]


def _chunk_update(running: Tensor, stats: Tensor, start: Tensor | int, momentum: float | None) -> Tensor:
    """``running`` after the EMA was applied once per row of ``stats`` (K, C), in order, in closed form:

    ``r_K = (1 - m)^K r_0 + sum_j m (1 - m)^(K - 1 - j) s_j``, or for ``momentum=None`` (cumulative
    average after ``start`` earlier batches) ``r_K = (start * r_0 + sum_j s_j) / (start + K)``.
    """
    K = stats.shape[0]
    stats = stats.to(running.dtype)
    if momentum is None:
        if isinstance(start, Tensor):
            start = live_count(start)  # (a buffer: see live_count)
        t = torch.as_tensor(start, dtype=running.dtype, device=running.device)
        return (t * running + stats.sum(0)) / (t + K)
    decay = torch.full((K,), 1.0 - momentum, dtype=running.dtype, device=running.device)
    powers = decay.pow(
        torch.arange(K - 1, -1, -1, device=running.device, dtype=running.dtype)
    )  # (1-m)^(K-1-j)
    return (1.0 - momentum) ** K * running + momentum * (powers[:, None] * stats).sum(0)


def ghost_batch_norm(
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
    ghost_batch_size: int,
    momentum_mode: MomentumMode = "per_chunk",
    unbiased_running_var: bool = True,
) -> NormOutput:
    r"""Ghost BN: in training, BN applied to each contiguous chunk of ``ghost_batch_size`` samples.

    .. math::
        y_i = \frac{x_i - \mathrm{E}_{k(i)}[x]}{\sqrt{\mathrm{Var}_{k(i)}[x] + \epsilon}} \gamma + \beta

    where ``k(i)`` is the ghost chunk of sample ``i``: the batch ``(N, C, *S)`` is viewed as
    ``(K, B_g, C, *S)`` and each chunk's statistics pool over ``(B_g, *S)`` (one reshape, no loop;
    the backward is then BN's within each chunk). A ragged last chunk of ``N mod B_g`` samples is
    normalized on its own. ``ghost_batch_size >= N`` is plain BN. The split applies only in
    training: eval uses the running statistics for any batch size (or, without running
    statistics, the statistics of the whole batch).

    Running statistics, PyTorch convention (``momentum`` = weight of the new value):

    * ``"per_chunk"`` (default): one EMA update per chunk, in order, as a loop of ``batch_norm``
      calls would do; computed in closed form ``r <- (1-m)^K r + sum_j m (1-m)^(K-1-j) s_j``.
      ``num_batches_tracked`` advances by K.
    * ``"averaged"``: one update with the chunk means and (unbiased) chunk variances averaged,
      weighted by chunk size; ``num_batches_tracked`` advances by 1.

    Args:
        x: input ``(N, C)`` or ``(N, C, *spatial)``, any layout (channels_last is kept).
        running_mean, running_var: ``(C,)`` buffers, or ``None``.
        weight, bias: per-channel affine ``(C,)``, or ``None``.
        training: use (and update) ghost-batch statistics.
        momentum: weight of the new statistics, or ``None`` for a cumulative average.
        eps: added to the variance inside the square root.
        num_batches_tracked: step counter.
        ghost_batch_size: samples per ghost chunk (B_g).
        momentum_mode: ``"per_chunk"`` or ``"averaged"``.
        unbiased_running_var: store unbiased chunk variances (PyTorch) or biased ones.

    Example:
        >>> x = torch.randn(8, 3, 4, 4)
        >>> y = ghost_batch_norm(x, training=True, ghost_batch_size=4).output
        >>> ref = torch.nn.functional.batch_norm(x[4:], None, None, training=True)  # chunk 2 alone
        >>> torch.allclose(y[4:], ref, atol=1e-5)
        True

    Reference: https://arxiv.org/abs/1705.08741
    """
    op = "ghost_batch_norm"
    check_input(x, op)
    B = check_positive_int(ghost_batch_size, op, "ghost_batch_size")
    if momentum_mode not in ("per_chunk", "averaged"):
        raise NormError(f"{op}: momentum_mode must be 'per_chunk' or 'averaged', got {momentum_mode!r}")
    # (sizes as they come: int() would pin a symbolic batch size under torch.compile(dynamic=True), one
    # graph per batch size)
    N, C = x.shape[0], x.shape[1]
    if not training or N <= B or x.numel() == 0:
        # Eval, or a single chunk: exactly BN (which also handles the checks and empty input).
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
        )
    eps = check_eps(eps, op)
    momentum = check_momentum(momentum, op)
    for name, p in (
        ("weight", weight),
        ("bias", bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        check_param(p, x, (C,), op, name)
    if (running_mean is None) != (running_var is None):
        raise NormError(f"{op}: give both running_mean and running_var, or neither")
    spatial = tuple(x.shape[2:])
    per_sample = 1
    for s in spatial:
        per_sample *= s
    K, rem = N // B, N % B  # (not divmod: a SymInt under torch.compile(dynamic=True) has no divmod)
    if K and B * per_sample == 1:
        raise NormError(
            f"{op}: ghost batches of {B} sample with no spatial dims (input of shape {tuple(x.shape)}) have "
            "1 value per channel; use a ghost_batch_size of at least 2"
        )
    if rem and rem * per_sample == 1:
        raise NormError(
            f"{op}: the last ghost chunk has 1 sample and no spatial dims (N={N}, ghost_batch_size={B}), so "
            "1 value per channel; choose a ghost_batch_size that does not leave a single sample over, "
            "or drop the last sample"
        )
    nd = x.dim()
    # The sets are those of the (K, B_g, C, *S) view of the first K*B_g samples (splitting dim 0 is a
    # view for any strides, channels_last too). split (not slicing): its backward concatenates the
    # chunk grads, which keeps channels_last.
    main, rest = x.split([K * B, rem]) if rem else (x, None)
    pshape = (1, 1, C) + (1,) * len(spatial)
    wv = weight.view(pshape) if weight is not None else None
    bv = bias.view(pshape) if bias is not None else None
    if (
        per_sample > 1
        and x.is_cpu
        and x.is_contiguous()
        and not (torch.compiler.is_compiling() or exporting())
    ):
        # On NCHW the sets of the (K, B_g, C, S) view, with a per-channel affine, match no kernel pattern
        # (K R K* R); with the affine spread over the spatial dims they are the channels-last GroupNorm
        # pattern (K R K* R*), C groups of S values: the fused kernels instead of the reference's passes
        # (a C * S affine; autograd sums its gradient back over S)
        full = (1, 1, C, *spatial)
        wv, bv = (None if p is None else p.expand(full) for p in (wv, bv))
    # the op on main itself, its sets those of the view (no view of it in a compiled graph: the view
    # argument of normkit.ops.library.norm says why)
    y, mean, var = norm(main, (1, *range(3, nd + 1)), wv, bv, eps, view=(K, B, C, *spatial))
    means, vars_ = mean.reshape(K, C), var.reshape(K, C)
    sizes = torch.full((K,), B * per_sample, dtype=means.dtype, device=x.device)
    if rem:
        # The ragged last chunk: one more call on the remainder.
        assert rest is not None
        y_r, mean_r, var_r = norm(
            rest, (0, *spatial_dims(x)), channel_view(weight, nd), channel_view(bias, nd), eps
        )
        y = torch.cat([y, y_r])
        means = torch.cat([means, mean_r.reshape(1, C)])
        vars_ = torch.cat([vars_, var_r.reshape(1, C)])
        sizes = torch.cat([sizes, torch.full((1,), rem * per_sample, dtype=means.dtype, device=x.device)])
    if running_mean is None or running_var is None:
        return NormOutput(y, running_mean, running_var, num_batches_tracked)

    m = sizes[:, None]
    if unbiased_running_var:
        vars_ = vars_ * (m / (m - 1))
    if momentum_mode == "averaged":
        frac = m / m.sum()
        rm, rv, nbt = update_running_stats(
            running_mean,
            running_var,
            num_batches_tracked,
            (frac * means).sum(0),
            (frac * vars_).sum(0),
            2,
            momentum,
            False,
            op,
        )
        return NormOutput(y, rm, rv, nbt)
    if momentum is None and num_batches_tracked is None:
        raise NormError(f"{op}: momentum=None (cumulative average) needs num_batches_tracked")
    start = num_batches_tracked if num_batches_tracked is not None else 0
    # As in update_running_stats: computed in float32 (float64 for float64 buffers), rounded once to the
    # buffers' dtype, and a step whose result is not finite there (a non-finite chunk, or a value a
    # float16 buffer cannot hold) leaves every buffer unchanged.
    acc = acc_dtype(running_mean.dtype)
    rm = _chunk_update(running_mean.to(acc), means, start, momentum).to(running_mean.dtype)
    rv = _chunk_update(running_var.to(acc), vars_, start, momentum).to(running_var.dtype)
    finite = torch.isfinite(rm).all() & torch.isfinite(rv).all()
    rm = torch.where(finite, rm, running_mean)
    rv = torch.where(finite, rv, running_var)
    nbt = None
    if num_batches_tracked is not None:
        nbt = num_batches_tracked + finite.to(num_batches_tracked.dtype) * means.shape[0]
    return NormOutput(y, rm, rv, nbt)
