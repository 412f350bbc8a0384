"""The autograd Function behind every batch-statistics norm, with the analytic backward of ALGORITHMS.md §0.

``NormFunction`` works on a *view* of the input in which the reduction sets are a set of dims
(``(0, 2, 3)`` for BN on NCHW, ``(2, 3, 4)`` for GN on ``x.view(N, G, C // G, H, W)``, ...), and on a
weight/bias already viewed to broadcast against it. It saves the input (not ``x_hat``: for
float16 inputs that halves the saved memory) and the per-set statistics, and recomputes
``x_hat`` in the backward, bit-identically with the forward.

Double backward (``gradgradcheck``) works: when the backward runs under ``create_graph=True``
it recomputes the statistics differentiably from the saved input, and the same §0 formula,
written in differentiable torch ops, is then differentiated by autograd.

This is the reference path; fused CPU / Triton kernels will plug in here per device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._moments import _centered, acc_dtype, centered_stats

__all__ = ["NormFunction", "norm"]


def _param_dims(x: Tensor, p: Tensor) -> tuple[int, ...]:
    """Dims a parameter gradient sums over: those where the broadcast parameter view has size 1."""
    return tuple(i for i in range(x.dim()) if p.shape[i] == 1 and x.shape[i] != 1)


def _sum_to(t: Tensor, p: Tensor) -> Tensor:
    dims = _param_dims(t, p)
    out = t.sum(dims, keepdim=True) if dims else t
    return out.to(p.dtype)


def _backward_formula(
    dy: Tensor,
    x_hat: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    dims: tuple[int, ...],
    need_dx: bool,
) -> Tensor | None:
    """dx = rstd * (g - mean_S(g) - x_hat * mean_S(g * x_hat)), with g = dy * weight (§0)."""
    if not need_dx:
        return None
    g = dy if weight is None else dy * weight.to(dy.dtype)
    mean_g = g.mean(dims, keepdim=True)
    mean_gx = (g * x_hat).mean(dims, keepdim=True)
    return (g - mean_g - x_hat * mean_gx) * rstd


def _fast_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    shift: Tensor,
    centered_mean: Tensor,
    rstd: Tensor,
    dims: tuple[int, ...],
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The §0 backward with two full-size temporaries and five full-size passes over the data.

    With ``e = (x - shift) * rstd`` (the shift makes it exact, as in the forward) and
    ``x_hat = e - cm * rstd``, every reduction is first taken at the finest shape shared by the
    statistics and the weight (per channel for BN, per (sample, channel) for GN), then summed
    up per set:

        dx = dy * (w * rstd) + e * (-rstd * mean_S(g x_hat)) + (-rstd * mean_S(g) + cm * rstd^2 * mean_S(g x_hat))

    Writing ``dx`` in terms of ``e`` keeps every factor representable: ``rstd^2`` alone would
    underflow for |x| ~ 1e30 and overflow for tiny variances with ``eps = 0``.
    """
    dtype = rstd.dtype
    dy = dy.to(dtype)
    e = _centered(x, shift, dtype).mul_(rstd)
    cm_r = centered_mean * rstd
    # Reduce first over the set dims along which neither weight nor bias varies.
    fine = tuple(i for i in dims if all(p is None or p.shape[i] == 1 for p in (weight, bias)))
    s_dy = dy.sum(fine, keepdim=True) if fine else dy
    prod = dy * e
    s_dye = prod.sum(fine, keepdim=True) if fine else prod
    s_dyxh = s_dye - cm_r * s_dy  # sum of dy * x_hat at the fine shape
    dweight = _sum_to(s_dyxh, weight) if (need_w and weight is not None) else None
    dbias = _sum_to(s_dy, bias) if (need_b and bias is not None) else None
    if not need_x:
        return None, dweight, dbias
    if all(x.shape[i] == 1 for i in dims):
        # One value per set: x_hat is identically 0, so is dx (avoid rounding noise * 1/sqrt(eps)).
        return torch.zeros_like(x, dtype=dtype), dweight, dbias
    w = weight.to(dtype) if weight is not None else None
    rest = tuple(i for i in dims if i not in fine)
    count = 1
    for i in dims:
        count *= x.shape[i]
    g_sum = s_dy if w is None else w * s_dy
    gx_sum = s_dyxh if w is None else w * s_dyxh
    if rest:
        g_sum = g_sum.sum(rest, keepdim=True)
        gx_sum = gx_sum.sum(rest, keepdim=True)
    a = rstd if w is None else w * rstd
    b = -rstd * (gx_sum / count)
    c = -rstd * (g_sum / count) - cm_r * b
    dx = torch.addcmul(c, e, b, out=prod) if prod.shape == torch.broadcast_shapes(c.shape, e.shape) else e * b + c
    return dx.addcmul_(dy, a), dweight, dbias


class NormFunction(torch.autograd.Function):
    """``y = (x - mean_S(x)) / sqrt(var_S(x) + eps) * weight + bias`` over the reduction dims ``dims``.

    Returns ``(y, mean, var)``; ``mean`` and ``var`` (biased, keepdim, accumulation dtype) are
    non-differentiable outputs, used by callers to update running statistics.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        dims: tuple[int, ...],
        eps: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        shift, centered_mean, var, rstd, dc = centered_stats(x, dims, eps)
        dtype = rstd.dtype
        scale = rstd if weight is None else rstd * weight.to(dtype)
        if bias is None:
            y = dc.mul_(scale)
        else:
            y = torch.addcmul(bias.to(dtype), dc, scale)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        ctx.save_for_backward(x, weight, bias, shift, centered_mean, rstd)
        ctx.dims = dims
        ctx.eps = eps
        mean = shift + centered_mean
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx: Any, dy: Tensor, _dmean: Tensor | None, _dvar: Tensor | None):  # type: ignore[override]
        x, weight, bias, shift, centered_mean, rstd = ctx.saved_tensors
        dims: tuple[int, ...] = ctx.dims
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dtype = rstd.dtype  # the precision the forward used (float64 after an overflow fallback)
        if torch.is_grad_enabled():
            # create_graph=True: recompute the statistics differentiably so that autograd can
            # differentiate this backward (gradgradcheck). The shift is a constant: the result
            # does not depend on it mathematically.
            d = _centered(x, shift, dtype)
            dc = d - d.mean(dims, keepdim=True)
            rstd = torch.rsqrt((dc * dc).mean(dims, keepdim=True) + ctx.eps)
            x_hat = dc * rstd
            dy_acc = dy.to(dtype)
            dx = _backward_formula(dy_acc, x_hat, rstd, weight, dims, need_x)
            dweight = _sum_to(dy_acc * x_hat, weight) if (need_w and weight is not None) else None
            dbias = _sum_to(dy_acc, bias) if (need_b and bias is not None) else None
        else:
            dx, dweight, dbias = _fast_backward(
                dy, x, weight, bias, shift, centered_mean, rstd, dims, need_x, need_w, need_b
            )
        if dx is not None and dx.dtype != x.dtype:
            dx = dx.to(x.dtype)
        return dx, dweight, dbias, None, None


def norm(
    x: Tensor,
    dims: tuple[int, ...],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalize ``x`` over ``dims`` with a broadcastable affine; returns ``(y, mean, var)``.

    An input with no elements returns an empty output (and NaN statistics of the keepdim shape,
    which callers must not write into running buffers); its parameter gradients are zero.
    """
    if x.numel() == 0:
        y = x * weight if weight is not None else x.clone()
        if bias is not None:
            y = y + bias
        stat_shape = [1 if i in dims else s for i, s in enumerate(x.shape)]
        nan = torch.full(stat_shape, float("nan"), dtype=acc_dtype(x.dtype), device=x.device)
        return y.to(x.dtype), nan, nan.clone()
    return NormFunction.apply(x, weight, bias, dims, eps)  # type: ignore[no-any-return]
