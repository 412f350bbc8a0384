"""Masked normalization: statistics over the valid positions of each reduction set only.

For padded sequences and images. A boolean ``mask`` (broadcastable to ``x``; ``True`` = valid)
selects the values each set's statistics pool over (:mod:`normkit.ops.core` with 0/1 weights):

    n     = sum_S(mask)
    mean  = sum_S(mask * x) / n
    var   = sum_S(mask * (x - mean)^2) / n                 (biased)
    x_hat = mask * (x - mean) / sqrt(var + eps)
    y     = x_hat * weight + bias

So a padded position outputs the bias and receives no gradient, and a set with no valid
position at all (``n == 0``) outputs the bias everywhere; callers leave its running statistics
unchanged. The backward is the §0 formula restricted to the valid positions:

    dx = mask * rstd * (g - sum_S(mask * g) / n - x_hat * sum_S(g * x_hat) / n),   g = dy * weight

Masked and unmasked inputs share one core (:mod:`normkit.ops.core`): the mask only changes which
values each set's statistics pool over, so the numerics are the same (large offsets, |x| up to
the fp32 maximum). Masked-out values never enter an arithmetic op (``torch.where``), so NaN/Inf
padding is harmless.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._errors import NormError
from ..ops.core import moments
from ._autograd import norm_count
from ._checks import check_dims, check_eps, check_input
from ._running import update_running_stats_where

__all__ = ["check_mask", "masked_moments", "masked_norm", "update_running_stats_where"]


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
        raise NormError(
            f"{op}: mask of shape {tuple(mask.shape)} does not broadcast to the input shape "
            f"{tuple(x.shape)}{hint}"
        )
    if mask.device != x.device:
        raise NormError(f"{op}: mask is on {mask.device} but the input is on {x.device}; move them together")
    return mask


def _check_affine(p: object, x: Tensor, op: str, name: str) -> None:
    """A weight / bias view: None or a tensor that broadcasts to ``x``, of x's dtype (fp32 for fp16/bf16)."""
    if p is None:
        return
    if not isinstance(p, Tensor):
        raise TypeError(
            f"{op}: {name} must be a Tensor (a view that broadcasts to x) or None, got {type(p).__name__}"
        )
    try:
        ok = torch.broadcast_shapes(p.shape, x.shape) == x.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise NormError(
            f"{op}: {name} of shape {tuple(p.shape)} does not broadcast to the input shape {tuple(x.shape)}; "
            "pass a view such as weight.view(1, -1, 1) for a per-channel affine"
        )
    half = x.dtype in (torch.float16, torch.bfloat16) and p.dtype == torch.float32
    if p.dtype != x.dtype and not half:
        raise TypeError(
            f"{op}: {name} has dtype {p.dtype} but the input is {x.dtype}; convert one with .to(dtype)"
        )
    if p.device != x.device:
        raise NormError(f"{op}: {name} is on {p.device} but the input is on {x.device}; move them together")


def masked_moments(x: Tensor, mask: Tensor | None, dims: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, biased variance and valid count of ``x`` over ``dims``, valid positions only (keepdim).

    A set without valid positions has count 0, mean 0 and var 0.

    Example:
        >>> x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
        >>> mean, var, n = masked_moments(x, torch.tensor([[True, True, True, False]]), (1,))
        >>> mean.item(), round(var.item(), 4), n.item()
        (2.0, 0.6667, 3.0)
    """
    op = "masked_moments"
    check_input(x, op, min_dim=1)
    if mask is not None:
        check_mask(mask, x, op)
    m = moments(x, check_dims(dims, x, op), mask=mask)
    return m.mean, m.var, m.count


def masked_norm(
    x: Tensor,
    mask: Tensor | None,
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
    op = "masked_norm"
    check_input(x, op, min_dim=1)
    if mask is not None:  # (None: every position is valid, as in :func:`normkit.functional.norm`)
        check_mask(mask, x, op)
    dims = check_dims(dims, x, op)
    _check_affine(weight, x, op, "weight")
    _check_affine(bias, x, op, "bias")
    return norm_count(x, dims, weight, bias, check_eps(eps, op), mask)
