"""Instance normalization (Ulyanov, Vedaldi & Lempitsky, 2016), functional form."""

from __future__ import annotations

import torch
from torch import Tensor

from .._errors import NormError
from ..kernels import _direct, _fast, triton_ready
from ..ops.library import exporting
from ._autograd import norm_count
from ._checks import check_eps, check_input, check_momentum, check_param
from ._moments import acc_dtype, aten_eval_dtypes, normalize
from ._running import NormOutput, update_running_stats, update_running_stats_where
from ._views import channel_view, spatial_dims
from .masked import check_mask

__all__ = ["instance_norm"]


def instance_norm(
    x: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Tensor | None = None,
    *,
    mask: Tensor | None = None,
) -> NormOutput:
    r"""Instance normalization: each (sample, channel) over its spatial positions.

    .. math::
        y_{nc} = \frac{x_{nc} - \mathrm{E}_{hw}[x_{nc}]}{\sqrt{\mathrm{Var}_{hw}[x_{nc}] + \epsilon}}
                 \gamma_c + \beta_c

    Equivalent to ``group_norm(x, num_groups=C)``. With running statistics and
    ``use_input_stats=True``, the per-instance means and unbiased variances are averaged over
    the batch and folded into the running buffers with ``running = (1 - momentum) * running +
    momentum * batch`` (PyTorch's rule); with ``use_input_stats=False`` the running ones are used.

    Args:
        x: input ``(N, C, *spatial)`` with at least one spatial dim.
        running_mean, running_var: ``(C,)`` buffers or ``None``.
        weight, bias: per-channel affine ``(C,)`` or ``None``.
        use_input_stats: normalize with the instance statistics (and update the buffers).
        momentum: weight of the new batch, or ``None`` for a cumulative average.
        eps: added to the variance inside the square root.
        num_batches_tracked: step counter, returned incremented when the buffers are updated.
        mask: optional bool tensor broadcastable to ``x`` (True = valid): each instance's statistics
            pool over its valid positions only; padded positions output the bias. The running
            statistics average the instances with at least 2 valid positions; a channel without
            any keeps its running values.

    Returns:
        :class:`NormOutput` ``(output, running_mean, running_var, num_batches_tracked)``.

    Example:
        >>> x = torch.randn(2, 3, 5, 5)
        >>> y = instance_norm(x).output
        >>> torch.allclose(y, torch.nn.functional.instance_norm(x), atol=1e-5)
        True
        >>> from normkit.functional import group_norm
        >>> torch.allclose(y, group_norm(x, 3), atol=1e-6)
        True

    Reference: https://arxiv.org/abs/1607.08022
    """
    op = "instance_norm"
    check_input(x, op)
    if x.dim() < 3:
        raise NormError(
            f"{op}: expected an input with spatial dims (N, C, L...), got shape {tuple(x.shape)}; "
            "instance statistics of an (N, C) input have one value per set"
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
    if (running_mean is None) != (running_var is None):
        raise NormError(f"{op}: give both running_mean and running_var, or neither")
    if mask is not None:
        check_mask(mask, x, op)
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise NormError(f"{op}: use_input_stats=False needs running_mean and running_var")
        # (ATen's instance_norm cannot take an empty batch; the arithmetic below can)
        if mask is None and (
            exporting() or (aten_eval_dtypes(x, weight, bias, running_mean, running_var) and x.shape[0] > 0)
        ):
            y = torch.nn.functional.instance_norm(
                x, running_mean, running_var, weight, bias, use_input_stats=False, eps=eps
            )
            return NormOutput(y, running_mean, running_var, num_batches_tracked)
        dtype = acc_dtype(x.dtype)
        mean = channel_view(running_mean.to(dtype), x.dim())
        rstd = channel_view(torch.rsqrt(running_var.to(dtype) + eps), x.dim())
        assert mean is not None and rstd is not None
        w, b = channel_view(weight, x.dim()), channel_view(bias, x.dim())
        y = normalize(x, mean, rstd, w, b)
        if mask is not None:  # padded positions output the bias, as with input statistics
            y = torch.where(mask, y, torch.zeros((), dtype=y.dtype) if b is None else b.to(y.dtype))
        return NormOutput(y, running_mean, running_var, num_batches_tracked)
    dims = spatial_dims(x)
    m = 1
    for d in dims:
        m *= x.shape[d]
    if m == 1 and x.numel() and mask is None:
        raise NormError(
            f"{op}: expected more than 1 spatial value per channel, got input of shape {tuple(x.shape)}; "
            "instance statistics over a single position are degenerate"
        )
    if exporting() and mask is None and running_mean is None:
        # The standard op, so exporters record instance_norm itself.
        y = torch.nn.functional.instance_norm(x, None, None, weight, bias, use_input_stats=True, eps=eps)
        return NormOutput(y, running_mean, running_var, num_batches_tracked)
    if mask is None and running_mean is None:
        if _fast.eligible(x):
            fast = _fast.group_norm(x, C, weight, bias, eps)  # eager CPU: one fused call each way
        else:
            fast = _direct.instance_norm(x, weight, bias, eps)  # on a GPU: torch's own op
            if fast is None and not torch.compiler.is_compiling() and triton_ready(x):
                from ..kernels import triton as _triton

                fast = _triton.group_norm(x, C, weight, bias, eps)  # normkit's Triton kernels, one node
        if fast is not None:
            return NormOutput(fast, running_mean, running_var, num_batches_tracked)
    w, b = channel_view(weight, x.dim()), channel_view(bias, x.dim())
    y, mean, var, count = norm_count(x, dims, w, b, eps, mask)
    if running_mean is None or running_var is None or x.numel() == 0:
        return NormOutput(y, running_mean, running_var, num_batches_tracked)
    N = x.shape[0]
    if mask is None:
        # Average the per-instance statistics over the batch; the unbiased correction is per instance.
        bmean = mean.reshape(N, C).mean(0)
        bvar = (var.reshape(N, C) * (m / (m - 1))).mean(0)
        rm, rv, nbt = update_running_stats(
            running_mean, running_var, num_batches_tracked, bmean, bvar, m, momentum, False, op
        )
        return NormOutput(y, rm, rv, nbt)
    # Average the instances with >= 2 valid values; the unbiased correction is per instance.
    count, mean, var = count.reshape(N, C), mean.reshape(N, C), var.reshape(N, C)
    ok = count >= 2
    n_ok = ok.sum(0).clamp_min(1)
    zero = mean.new_zeros(())
    bmean = torch.where(ok, mean, zero).sum(0) / n_ok
    bvar = torch.where(ok, var * count / (count - 1).clamp_min(1), zero).sum(0) / n_ok
    rm, rv, nbt = update_running_stats_where(
        running_mean, running_var, num_batches_tracked, bmean, bvar, ok.any(0), momentum, op
    )
    return NormOutput(y, rm, rv, nbt)
