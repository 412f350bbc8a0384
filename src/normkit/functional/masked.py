"""Masked normalization: statistics over the valid positions of each reduction set only.

For padded sequences and images. A boolean ``mask`` (broadcastable to ``x``; ``True`` = valid)
selects the values each set's statistics pool over (ALGORITHMS.md §0 with 0/1 weights):

    n     = sum_S(mask)
    mean  = sum_S(mask * x) / n
    var   = sum_S(mask * (x - mean)^2) / n                 (biased)
    x_hat = mask * (x - mean) / sqrt(var + eps)
    y     = x_hat * weight + bias

So a padded position outputs the bias and receives no gradient, and a set with no valid
position at all (``n == 0``) outputs the bias everywhere; callers leave its running statistics
unchanged. The backward is the §0 formula restricted to the valid positions:

    dx = mask * rstd * (g - sum_S(mask * g) / n - x_hat * sum_S(g * x_hat) / n),   g = dy * weight

Numerics: statistics in fp32 (fp64 for fp64 inputs); the variance is two-pass with a correction
pass (the mean of the centred values is subtracted once more), which keeps large-offset inputs
exact without needing a valid element to shift by. Masked-out values never enter an arithmetic
op (``torch.where``), so NaN/Inf padding is harmless.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._autograd import _sum_to
from ._moments import acc_dtype
from ._running import update_running_stats

__all__ = ["MaskedNormFunction", "check_mask", "masked_moments", "masked_norm", "update_running_stats_where"]


def check_mask(mask: object, x: Tensor, op: str) -> Tensor:
    """A boolean mask broadcastable to ``x`` on the same device; typed errors that name what came."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{op}: mask must be a bool Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{op}: mask must have dtype torch.bool (True = valid), got {mask.dtype}; use mask.bool()"
        )
    try:
        shape = torch.broadcast_shapes(mask.shape, x.shape)
    except RuntimeError:
        shape = None
    if shape != x.shape:
        hint = ""
        if mask.dim() == 2 and x.dim() >= 3 and tuple(mask.shape) == (x.shape[0], x.shape[-1]):
            hint = "; for an (N, L) padding mask of an (N, C, L) input use mask[:, None, :]"
        raise ValueError(
            f"{op}: mask of shape {tuple(mask.shape)} does not broadcast to the input shape "
            f"{tuple(x.shape)}{hint}"
        )
    if mask.device != x.device:
        raise ValueError(f"{op}: mask is on {mask.device} but the input is on {x.device}; move them together")
    return mask


def _stats(x: Tensor, mask: Tensor, dims: tuple[int, ...], eps: float) -> tuple[Tensor, ...]:
    """Masked (count, mean, rstd, var, x_hat) in the accumulation dtype; plain differentiable ops."""
    dtype = acc_dtype(x.dtype)
    xa = x.to(dtype)
    zero = xa.new_zeros(())
    count = mask.expand(x.shape).sum(dims, keepdim=True, dtype=dtype)
    safe = count.clamp_min(1)
    mean0 = torch.where(mask, xa, zero).sum(dims, keepdim=True) / safe
    d = torch.where(mask, xa - mean0, zero)
    correction = d.sum(dims, keepdim=True) / safe  # the rounding error of mean0; ~0
    d = torch.where(mask, d - correction, zero)
    var = (d * d).sum(dims, keepdim=True) / safe
    # A set with no valid position gets rstd 0 (not 1/sqrt(eps), which is inf for eps=0), so
    # x_hat is exactly 0 there; where() keeps padding at 0 even when rstd is inf.
    rstd = torch.where(count > 0, torch.rsqrt(var + eps), zero)
    return count, mean0 + correction, rstd, var, torch.where(mask, d * rstd, zero)


def _backward(
    dy: Tensor,
    x_hat: Tensor,
    rstd: Tensor,
    count: Tensor,
    mask: Tensor,
    weight: Tensor | None,
    dims: tuple[int, ...],
) -> Tensor:
    g = dy if weight is None else dy * weight.to(dy.dtype)
    g = torch.where(mask, g, g.new_zeros(()))
    safe = count.clamp_min(1)
    mean_g = g.sum(dims, keepdim=True) / safe
    mean_gx = (g * x_hat).sum(dims, keepdim=True) / safe
    dx = (g - mean_g - x_hat * mean_gx) * rstd
    return torch.where(mask, dx, dx.new_zeros(()))


class MaskedNormFunction(torch.autograd.Function):
    """``y = mask * (x - mean_S) * rstd_S * weight + bias`` with masked statistics; see the module docstring.

    Returns ``(y, mean, var, count)``; the last three are keepdim, non-differentiable, in the
    accumulation dtype (``count`` as a float).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        mask: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        dims: tuple[int, ...],
        eps: float,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        count, mean, _, var, x_hat = _stats(x, mask, dims, eps)
        y = x_hat if weight is None else x_hat * weight.to(x_hat.dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)
        ctx.save_for_backward(x, mask, weight, bias)
        ctx.dims, ctx.eps = dims, eps
        ctx.mark_non_differentiable(mean, var, count)
        return y.to(x.dtype), mean, var, count

    @staticmethod
    def backward(ctx: Any, dy: Tensor, *_: Any):  # type: ignore[override]
        x, mask, weight, bias = ctx.saved_tensors
        dims: tuple[int, ...] = ctx.dims
        need_x, _, need_w, need_b = ctx.needs_input_grad[:4]
        # Recompute the statistics from the saved input (one extra pass, no full-size tensor
        # saved). Under create_graph this recomputation is differentiable, so the same
        # formula gives the double backward.
        count, _, rstd, _, x_hat = _stats(x, mask, dims, ctx.eps)
        dy = dy.to(x_hat.dtype)
        dx = _backward(dy, x_hat, rstd, count, mask, weight, dims).to(x.dtype) if need_x else None
        dweight = _sum_to(dy * x_hat, weight) if (need_w and weight is not None) else None
        dbias = _sum_to(dy.expand(x.shape), bias) if (need_b and bias is not None) else None
        return dx, None, dweight, dbias, None, None


def masked_moments(x: Tensor, mask: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, biased variance and valid count of ``x`` over ``dims``, valid positions only (keepdim).

    A set without valid positions has count 0, mean 0 and var 0.

    Example:
        >>> x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
        >>> mean, var, n = masked_moments(x, torch.tensor([[True, True, True, False]]), (1,))
        >>> mean.item(), round(var.item(), 4), n.item()
        (2.0, 0.6667, 3.0)
    """
    count, mean, _, var, _ = _stats(x, mask, tuple(d % x.dim() for d in dims), 0.0)
    return mean, var, count


def masked_norm(
    x: Tensor,
    mask: Tensor,
    dims: tuple[int, ...],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normalize ``x`` over ``dims`` using only the positions where ``mask`` is True.

    The masked counterpart of :func:`normkit.functional.norm`: ``weight`` and ``bias`` are views
    that broadcast against ``x``; returns ``(y, mean, var, count)`` with keepdim statistics.
    Padded positions (and whole sets without a valid position) output the bias.

    Example:
        >>> x = torch.tensor([[1.0, 3.0, 50.0], [2.0, 2.0, 2.0]])
        >>> mask = torch.tensor([[True, True, False], [False, False, False]])
        >>> y, mean, var, n = masked_norm(x, mask, (1,), None, torch.tensor([[0.5]]), eps=0.0)
        >>> y
        tensor([[-0.5000,  1.5000,  0.5000],
                [ 0.5000,  0.5000,  0.5000]])
        >>> n.flatten().tolist()
        [2.0, 0.0]
    """
    dims = tuple(int(d) % x.dim() for d in dims)
    return MaskedNormFunction.apply(x, mask, weight, bias, dims, eps)  # type: ignore[no-any-return]


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
