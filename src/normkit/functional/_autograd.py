"""The low-level entry every functional norm calls: normalize over a set of dims, return the batch statistics.

It is a thin layer over :func:`normkit.ops.norm` (the registered ``normkit::norm`` op, its
``autograd.Function`` and the exporters' composite); see :mod:`normkit.ops` for which path runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import core
from ..ops.library import exporting
from ..ops.library import norm as _norm_op

__all__ = ["norm", "norm_count", "norm_output"]


def norm_count(
    x: Tensor,
    dims: tuple[int, ...],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    mask: Tensor | None = None,
    view: tuple[int, ...] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, var, count)``: :func:`norm` plus the number of (valid) values behind each statistic."""
    if view is not None and (x.numel() == 0 or exporting()):  # (plain ops: the view is no obstacle)
        m = None if mask is None else mask.expand(x.shape).reshape(view)
        y, mean, var, count = norm_count(x.view(view), dims, weight, bias, eps, m)
        return y.view(x.shape), mean, var, count
    if x.numel() == 0:
        # An empty input: empty output, zero parameter grads, NaN statistics that callers never store.
        y = x * weight if weight is not None else x.clone()
        if bias is not None:
            y = y + bias
        shape = core.stat_shape(x, dims)
        nan = torch.full(shape, float("nan"), dtype=core.acc_dtype(x.dtype), device=x.device)
        return y.to(x.dtype), nan, nan.clone(), torch.zeros_like(nan)
    if exporting():
        return core.composite_norm(x, weight, bias, mask, dims, eps)
    y, stats = _norm_op(x, weight, bias, dims, eps, mask, view)
    mean, var = core.mean_var(stats)
    return y, mean, var, core.stats_count(stats)


def norm_output(
    x: Tensor,
    dims: tuple[int, ...],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    mask: Tensor | None = None,
) -> Tensor:
    """The normalized output alone (what GroupNorm and LayerNorm need): no statistics are unpacked."""
    if x.numel() == 0 or exporting():
        return norm_count(x, dims, weight, bias, eps, mask)[0]
    return _norm_op(x, weight, bias, dims, eps, mask)[0]


def norm(
    x: Tensor,
    dims: tuple[int, ...],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    mask: Tensor | None = None,
    view: tuple[int, ...] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalize ``x`` over ``dims`` with a broadcastable affine; returns ``(y, mean, var)``.

    ``mean`` and ``var`` (biased, keepdim, accumulation dtype) are non-differentiable: callers use
    them for running statistics. An input with no elements returns an empty output (and NaN
    statistics, which callers must not store); its parameter gradients are zero. A ``mask`` (bool,
    x's shape or broadcastable, True = valid) limits each set to its valid values. ``view`` (a shape):
    the sets, ``dims``, the affine and the statistics are those of ``x.view(view)``; ``y`` keeps
    ``x``'s shape (:func:`normkit.ops.library.norm`: what keeps a compiled graph free of the view).

    Example:
        >>> x = torch.randn(8, 3, 4, 4)
        >>> y, mean, var = norm(x, (0, 2, 3), None, None, 1e-5)           # BatchNorm's sets
        >>> torch.allclose(y, torch.nn.functional.batch_norm(x, None, None, training=True), atol=1e-5)
        True
    """
    y, mean, var, _ = norm_count(x, dims, weight, bias, eps, mask, view)
    return y, mean, var
