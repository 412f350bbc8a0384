"""Batch Renormalization (Ioffe, 2017) and mean-only batch norm (Salimans & Kingma, 2016), functional form."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._errors import NormError
from ._autograd import norm
from ._checks import check_eps, check_input, check_momentum, check_param
from ._moments import acc_dtype, aten_batch_norm, aten_eval_dtypes, moments
from ._running import NormOutput, update_running_stats
from ._views import channel_view, spatial_dims
from .batch_norm import batch_norm

__all__ = ["batch_renorm", "mean_only_batch_norm"]


def _check_limit(value: float | Tensor, lowest: float, op: str, name: str) -> None:
    if isinstance(value, Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise NormError(
                f"{op}: {name} must be a float or a 0-dim floating tensor, got a tensor of shape "
                f"{tuple(value.shape)} and dtype {value.dtype}"
            )
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < lowest
    ):
        raise NormError(f"{op}: {name} must be a finite number >= {lowest}, got {value!r}")


def batch_renorm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Tensor | None = None,
    *,
    r_max: float | Tensor = 3.0,
    d_max: float | Tensor = 5.0,
    unbiased_running_var: bool = True,
) -> NormOutput:
    r"""Batch Renormalization: BN whose training output is corrected towards the running statistics.

    .. math::
        r = \mathrm{clip}_{[1/r_{max},\, r_{max}]}\Big(\frac{\sigma_B}{\sigma}\Big), \quad
        d = \mathrm{clip}_{[-d_{max},\, d_{max}]}\Big(\frac{\mu_B - \mu}{\sigma}\Big), \quad
        y = \gamma \Big(\frac{x - \mu_B}{\sigma_B} r + d\Big) + \beta

    with ``sigma_B = sqrt(var_B + eps)`` (biased batch variance, per channel over ``(N, *S)``) and
    ``sigma = sqrt(running_var + eps)``. ``r`` and ``d`` are constants for the backward (no
    gradient flows through them), so the backward is BN's with the weight ``gamma * r``. With
    ``r_max=1, d_max=0`` this is exactly BN. Eval uses the running statistics, like BN. The
    running statistics update like BN's (PyTorch convention, unbiased variance).

    Args:
        x: input ``(N, C)`` or ``(N, C, *spatial)``.
        running_mean, running_var: ``(C,)`` buffers (required: ``r`` and ``d`` need them).
        weight, bias: per-channel affine ``(C,)``, or ``None``.
        training: use batch statistics with the correction, and update the running ones.
        momentum: weight of the new batch, or ``None`` for a cumulative average.
        eps: added to the variances inside the square roots.
        num_batches_tracked: step counter.
        r_max, d_max: clipping limits (floats, or 0-dim tensors for a schedule without host syncs).
        unbiased_running_var: store the unbiased batch variance (PyTorch) or the biased one.

    Example:
        >>> x = torch.randn(16, 3, 4, 4)
        >>> rm, rv = torch.zeros(3), torch.ones(3)
        >>> y = batch_renorm(x, rm, rv, training=True, r_max=1.0, d_max=0.0).output
        >>> torch.allclose(y, torch.nn.functional.batch_norm(x, None, None, training=True), atol=1e-5)
        True

    Reference: https://arxiv.org/abs/1702.03275
    """
    op = "batch_renorm"
    check_input(x, op)
    if not isinstance(running_mean, Tensor) or not isinstance(running_var, Tensor):
        raise NormError(
            f"{op}: running_mean and running_var are required (r and d are measured against them)"
        )
    _check_limit(r_max, 1.0, op, "r_max")
    _check_limit(d_max, 0.0, op, "d_max")
    if not training:
        return batch_norm(
            x,
            running_mean,
            running_var,
            weight,
            bias,
            False,
            momentum,
            eps,
            num_batches_tracked,
            unbiased_running_var=unbiased_running_var,
        )
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
    dims = (0, *spatial_dims(x))
    m = x.numel() // C if C else 0
    if m == 1:
        raise NormError(
            f"{op}: expected more than 1 value per channel in training, got input of shape {tuple(x.shape)}; "
            "use a batch of at least 2"
        )
    nd = x.dim()
    if x.numel() == 0:
        y, _, _ = norm(x, dims, channel_view(weight, nd), channel_view(bias, nd), eps)
        return NormOutput(y, running_mean, running_var, num_batches_tracked)
    dtype = acc_dtype(x.dtype)
    with torch.no_grad():
        # r and d: constants for the backward (the paper's stop_gradient).
        # detach(): no_grad stops the backward but not forward-mode AD (jvp), so r and d would
        # otherwise carry tangents while the backward holds them constant.
        stats = moments(x.detach(), dims)  # (plain eager CPU: the fused kernel's statistics pass)
        mean_b, var_b = stats.mean, stats.var
        rstd_run = torch.rsqrt(running_var.detach().to(dtype) + eps)
        r_hi = torch.as_tensor(r_max, dtype=dtype, device=x.device)
        d_hi = torch.as_tensor(d_max, dtype=dtype, device=x.device)
        r = (rstd_run / torch.rsqrt(var_b.reshape(C) + eps)).clamp(1.0 / r_hi, r_hi)  # sigma_B / sigma
        d = ((mean_b.reshape(C) - running_mean.detach().to(dtype)) * rstd_run).clamp(-d_hi, d_hi)
    # y = gamma * (x_hat_B * r + d) + beta  ==  x_hat_B * (gamma r) + (gamma d + beta): BN's core
    # with a modified affine, so gamma and beta get their gradients through these two products.
    w = r if weight is None else weight.to(dtype) * r
    b = d if weight is None else weight.to(dtype) * d
    if bias is not None:
        b = b + bias.to(dtype)
    # BatchNorm's training step with that affine (its fused kernels and autograd node on the CPU), which
    # also updates the running statistics as BN does
    return batch_norm(
        x,
        running_mean,
        running_var,
        w,
        b,
        True,
        momentum,
        eps,
        num_batches_tracked,
        unbiased_running_var=unbiased_running_var,
    )


def mean_only_batch_norm(
    x: Tensor,
    running_mean: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    num_batches_tracked: Tensor | None = None,
) -> NormOutput:
    r"""Mean-only batch normalization: subtract the per-channel batch mean, add a bias; no scaling.

    .. math::
        y = x - \mathrm{E}_{(N, *S)}[x] + \beta

    The companion of weight normalization (Salimans & Kingma 2016, §2.2): WN fixes the scale, this
    centres. The mean pools over ``(N, *spatial)`` per channel; in eval the running mean is used,
    updated in training as ``running = (1 - momentum) * running + momentum * batch_mean``. The
    returned :class:`NormOutput` has ``running_var=None``.

    Args:
        x: input ``(N, C)`` or ``(N, C, *spatial)``.
        running_mean: ``(C,)`` buffer or ``None`` (batch mean always).
        bias: ``(C,)`` or ``None``.
        training: use and update the batch mean.
        momentum: weight of the new batch, or ``None`` for a cumulative average.
        num_batches_tracked: step counter.

    Example:
        >>> x = torch.randn(8, 3, 5) + 4.0
        >>> y = mean_only_batch_norm(x, training=True).output
        >>> torch.allclose(y.mean((0, 2)), torch.zeros(3), atol=1e-5)
        True
        >>> torch.allclose(y - x, (y - x)[:1, :, :1].expand_as(x))  # a pure per-channel shift
        True

    Reference: https://arxiv.org/abs/1602.07868
    """
    op = "mean_only_batch_norm"
    check_input(x, op)
    momentum = check_momentum(momentum, op)
    C = x.shape[1]
    check_param(bias, x, (C,), op, "bias")
    check_param(running_mean, x, (C,), op, "running_mean")
    nd = x.dim()
    dtype = acc_dtype(x.dtype)
    use_batch = training or running_mean is None
    if use_batch and x.numel() == 0:
        y = x.clone() if bias is None else (x + channel_view(bias, nd)).to(x.dtype)
        return NormOutput(y, running_mean, None, num_batches_tracked)
    if (
        not use_batch
        and aten_eval_dtypes(x, None, bias, running_mean, running_mean)
        and x.shape[0] > 0
        and not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))
    ):
        # Inference: ATen's eval batch norm with a unit variance and eps 0 is x - mean + bias, in float32
        # for a half x and rounded once, with no full-size float32 temporary (the sum below holds one).
        # (Where autograd records, the sum: ATen's node would keep x, which a shift's gradient never reads.)
        assert running_mean is not None
        y = aten_batch_norm(x, None, bias, running_mean, torch.ones_like(running_mean), False, 0.0, 0.0)
        return NormOutput(y, running_mean, None, num_batches_tracked)
    if use_batch:
        mean = x.mean((0, *spatial_dims(x)), keepdim=True, dtype=dtype)  # (accumulated in dtype, no copy)
    else:
        assert running_mean is not None
        mean = channel_view(running_mean.to(dtype), nd)
    shift = -mean if bias is None else channel_view(bias.to(dtype), nd) - mean
    y = (x + shift).to(x.dtype)  # (x as it is: the sum promotes it)
    if training and running_mean is not None:
        # The mean-only EMA is the first half of BN's: pass the mean as the "variance" too and drop it.
        batch_mean = mean.detach().reshape(C)
        rm, _, nbt = update_running_stats(
            running_mean, running_mean, num_batches_tracked, batch_mean, batch_mean, 2, momentum, False, op
        )
        return NormOutput(y, rm, None, nbt)
    return NormOutput(y, running_mean, None, num_batches_tracked)
