"""Batch normalization (Ioffe & Szegedy, 2015), functional form."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._errors import NormError
from ..kernels import _direct, _fast, triton_ready
from ..ops.library import exporting
from ._autograd import norm_count
from ._checks import check_eps, check_input, check_momentum, check_param
from ._moments import acc_dtype, aten_batch_norm, aten_eval_dtypes, normalize
from ._running import NormOutput, update_running_stats, update_running_stats_where
from ._views import channel_view, spatial_dims
from .masked import check_mask

__all__ = ["batch_norm"]


def _aten_eval_grad_hazard(x: Tensor) -> bool:
    """Whether ATen's eval batch_norm would return a wrong input gradient for this ``x``.

    torch 2.13's CPU ``native_batch_norm_backward`` mis-reads an input whose memory is channels-last
    but whose size-1 dim carries a non-canonical stride against a contiguous grad_output: a spatial
    one (``randn(N, W, C, 1).permute(0, 2, 3, 1)``, strides ``(C*W, 1, 1, C)``) or the batch (one
    HWC image made NCHW, ``img.permute(2, 0, 1).unsqueeze(0)``, strides ``(3, 1, 6, 3)``: the input
    gradient of a saliency map was off by up to 2.4). Such inputs take normkit's own elementwise path
    instead (same values, correct gradient).
    """
    return (
        x.requires_grad
        and torch.is_grad_enabled()
        and x.dim() > 2
        and not x.is_contiguous()
        and any(s == 1 for s in x.shape)
        and not _canonical_channels_last(x)  # (what .contiguous(memory_format=...) gives: read right)
    )


def _input_grad_only(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether only the input needs a gradient (a frozen BatchNorm, BN parameters with
    ``requires_grad=False``): ATen's node would keep the whole input for gradients nobody asked for, where
    ``x * scale + shift`` keeps the per-channel scale alone."""
    return (
        x.requires_grad
        and torch.is_grad_enabled()
        and not (weight is not None and weight.requires_grad)
        and not (bias is not None and bias.requires_grad)
    )


def _canonical_channels_last(x: Tensor) -> bool:
    """Whether ``x`` has exactly the strides of ``x.contiguous(memory_format=channels_last(_3d))``,
    size-1 dims included (``is_contiguous`` ignores their strides)."""
    if x.dim() not in (4, 5):
        return False
    want = [0] * x.dim()
    want[1], step = 1, x.shape[1]
    for d in range(x.dim() - 1, 1, -1):
        want[d] = step
        step *= x.shape[d]
    want[0] = step
    return tuple(x.stride()) == tuple(want)


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Tensor | int | None = None,
    *,
    unbiased_running_var: bool = True,
    mask: Tensor | None = None,
) -> NormOutput:
    r"""Batch normalization over ``(N, *spatial)`` per channel; returns the output and updated statistics.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    The statistics of channel ``c`` pool over every sample and spatial position (the paper's
    "effective mini-batch" ``m = N*H*W``). In training (or with no running statistics) the batch
    statistics are used, with the *biased* variance; otherwise the running ones. The running
    statistics follow PyTorch: ``running = (1 - momentum) * running + momentum * batch``, the
    stored variance unbiased (``* m / (m - 1)``) unless ``unbiased_running_var=False`` (Keras,
    Keras 3); ``momentum=None`` is a cumulative average. They are *returned*, never written in place.

    Args:
        x: input ``(N, C)`` or ``(N, C, *spatial)``, any floating dtype, any layout.
        running_mean, running_var: ``(C,)`` buffers, or ``None`` to use batch statistics always.
        weight, bias: per-channel affine ``(C,)``, or ``None``.
        training: use (and update) batch statistics.
        momentum: weight of the new batch in the running average, or ``None`` for a cumulative average.
        eps: added to the variance inside the square root.
        num_batches_tracked: the step counter (needed for ``momentum=None``), a Tensor or an int; returned
            incremented (an int comes back as a long tensor).
        unbiased_running_var: store the unbiased batch variance (PyTorch, BN paper) or the biased one.
        mask: optional bool tensor broadcastable to ``x`` (True = valid, e.g. ``(N, 1, L)`` for padded
            sequences): statistics pool over the valid positions only, padded positions output the
            bias, and a channel with fewer than 2 valid values (1 with ``unbiased_running_var=False``)
            keeps its running statistics. See :mod:`normkit.functional.masked`.

    Returns:
        :class:`NormOutput` ``(output, running_mean, running_var, num_batches_tracked)``.

    Raises:
        ValueError: one value per channel while using batch statistics; shape mismatches.
        TypeError: integer input; parameter dtype mismatch.

    Example:
        >>> x = torch.randn(8, 3, 4, 4)
        >>> rm, rv = torch.zeros(3), torch.ones(3)
        >>> out = batch_norm(x, rm, rv, training=True, momentum=0.1)
        >>> ref = torch.nn.functional.batch_norm(x, rm.clone(), rv.clone(), training=True)
        >>> torch.allclose(out.output, ref, atol=1e-5)
        True
        >>> torch.allclose(out.running_mean, 0.1 * x.mean((0, 2, 3)))
        True

    Reference: https://arxiv.org/abs/1502.03167
    """
    if num_batches_tracked is not None and not isinstance(num_batches_tracked, Tensor):
        if isinstance(num_batches_tracked, bool) or not isinstance(num_batches_tracked, int):
            raise TypeError(
                "batch_norm: num_batches_tracked must be None, an int or a Tensor, got "
                f"{type(num_batches_tracked).__name__}"
            )  # an int (as a torch user may pass) counts like torch's long buffer
        device = x.device if isinstance(x, Tensor) else None
        num_batches_tracked = torch.tensor(num_batches_tracked, dtype=torch.long, device=device)
    eager = mask is None and _fast.eligible(x)  # plain eager CPU: the fused kernels may run
    if eager:  # with batch statistics: checks and kernel in C++
        fast = _fast.checked(
            "batch_norm",
            x,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            num_batches_tracked,
            unbiased_running_var,
        )
        if fast is not None:
            return NormOutput(*fast)
    op = "batch_norm"
    check_input(x, op)
    eps = check_eps(eps, op)
    momentum = check_momentum(momentum, op)
    C = x.shape[1]
    for name, p in (
        ("weight", weight),
        ("bias", bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        check_param(p, x, (C,), op, name)
    if (running_mean is None) != (running_var is None):
        raise NormError(f"{op}: give both running_mean and running_var, or neither")
    if mask is not None:
        check_mask(mask, x, op)
    use_batch_stats = training or running_mean is None
    if not use_batch_stats:
        assert running_mean is not None and running_var is not None
        if mask is None and (
            exporting()
            or (
                aten_eval_dtypes(x, weight, bias, running_mean, running_var)
                and not _aten_eval_grad_hazard(x)
                and not _input_grad_only(x, weight, bias)
            )
        ):
            # The affine map from the running statistics: ATen's batch_norm computes exactly it
            # (and exporters record the standard op). ATen's op itself: torch.nn.functional's
            # refuses eps=0 in eval too before torch 2.12, which normkit takes.
            y = aten_batch_norm(x, weight, bias, running_mean, running_var, False, 0.0, eps)
            return NormOutput(y, running_mean, running_var, num_batches_tracked)
        dtype = acc_dtype(x.dtype)
        mean = channel_view(running_mean.to(dtype), x.dim())
        rstd = channel_view(torch.rsqrt(running_var.to(dtype) + eps), x.dim())
        assert mean is not None and rstd is not None
        w, b = channel_view(weight, x.dim()), channel_view(bias, x.dim())
        y = normalize(x, mean, rstd, w, b)
        if mask is not None:  # padded positions output the bias, as in training
            y = torch.where(mask, y, torch.zeros((), dtype=y.dtype) if b is None else b.to(y.dtype))
        return NormOutput(y, running_mean, running_var, num_batches_tracked)

    m = x.numel() // C if C else 0
    if m == 1 and mask is None:
        why = "" if training else " (running statistics are off, so eval mode uses batch statistics too)"
        raise NormError(
            f"{op}: expected more than 1 value per channel when using batch statistics{why}, got input of "
            f"shape {tuple(x.shape)}; use a batch of at least 2, or eval mode with running statistics"
        )
    step = (
        train_step(x, eager)
        if mask is None and m > 1 and not (momentum is None and num_batches_tracked is None)
        else None  # (the general path says why not)
    )
    if step is not None:
        fast = _fast_batch_norm(
            x,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            num_batches_tracked,
            unbiased_running_var,
            step,
        )
        if fast is not None:
            return fast
    w = channel_view(weight, x.dim())
    b = channel_view(bias, x.dim())
    y, mean, var, count = norm_count(x, (0, *spatial_dims(x)), w, b, eps, mask)
    if not (training and running_mean is not None and running_var is not None) or x.numel() == 0:
        # An empty batch: empty output, zero parameter grads, statistics unchanged.
        return NormOutput(y, running_mean, running_var, num_batches_tracked)
    if mask is None:
        rm, rv, nbt = update_running_stats(
            running_mean, running_var, num_batches_tracked, mean, var, m, momentum, unbiased_running_var, op
        )
    else:
        count = count.reshape(C)
        bvar = var.reshape(C) * (count / (count - 1).clamp_min(1)) if unbiased_running_var else var
        valid = count >= (2 if unbiased_running_var else 1)
        rm, rv, nbt = update_running_stats_where(
            running_mean, running_var, num_batches_tracked, mean, bvar, valid, momentum, op
        )
    return NormOutput(y, rm, rv, nbt)


def train_step(x: Tensor, eager: bool) -> Callable[..., Tensor | None] | None:
    """BatchNorm's training step for ``x`` on a fast path (``eager``: :func:`_fast.eligible`), with
    the interface of :func:`normkit.kernels._direct.batch_norm_train`, or ``None``: the eager CPU
    kernels' one fused call each way; torch's own op on a GPU (``"auto"``); normkit's Triton kernels
    as one autograd node (``"triton"``)."""
    if eager:
        return _fast.batch_norm_train
    if _direct.route(x, under_autocast=True):
        return _direct.batch_norm_train
    if type(x) is Tensor and triton_ready(x):  # (not an fx Proxy, whose device is one too)
        from ..kernels import triton as _triton

        return _triton.batch_norm_train
    return None


def _fast_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None,
    unbiased: bool,
    train_step: Callable[..., Tensor | None],
) -> NormOutput | None:
    """A fast path (``train_step``: one of :func:`train_step`'s), or ``None`` for the general path.

    ``train_step`` updates running statistics in place; this function's contract returns new ones,
    so it updates copies (C values each).
    """
    if training and running_mean is not None and running_var is not None:
        rm, rv = running_mean.clone(), running_var.clone()
        nbt = None if num_batches_tracked is None else num_batches_tracked.clone()
        y = train_step(x, weight, bias, rm, rv, nbt, momentum, eps, unbiased)
        return None if y is None else NormOutput(y, rm, rv, nbt)
    y = train_step(x, weight, bias, None, None, None, momentum, eps, unbiased)
    return None if y is None else NormOutput(y, running_mean, running_var, num_batches_tracked)
