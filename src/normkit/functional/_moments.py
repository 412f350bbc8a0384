"""The one generic core: moments over any set of dims, and the normalize step.

Every norm in normkit (BN, LN, IN, GN, and the norm under Proxy Norm) is the same computation,
parameterised by the dims the statistics are pooled over (ALGORITHMS.md §0):

    mean = mean_S(x),  var = mean_S((x - mean)^2)  (biased),  rstd = 1 / sqrt(var + eps)
    y    = (x - mean) * rstd * weight + bias

Numerics, and why:

* Statistics are accumulated in float32 for float16/bfloat16 inputs (float64 stays float64):
  half-precision sums of squares overflow at 65504 and lose digits long before that.
* The variance is *shifted two-pass*: we subtract one sample of each reduction set first
  (``d = x - K``, exact in floating point when the values are close, by Sterbenz's lemma), then take
  ``mean(d)`` and ``mean((d - mean(d))^2)``. A plain two-pass on ``x = 1e6 + 1e-2 * noise`` in
  float32 already loses the answer in the mean (ulp(1e6) = 0.06); the one-pass
  ``E[x^2] - E[x]^2`` gives negative variances there.
* If the squares overflow (|x| ~ 1e30 in float32) or underflow (subnormals with eps = 0), the
  statistics of that call are recomputed in float64, so the output stays finite and exact.
* Per-dim variance reductions from torch are never used (ok): on this CPU they run 58x slower than a sum
  (PERFORMANCE.md §4).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = ["Moments", "acc_dtype", "moments", "normalize"]


class Moments(NamedTuple):
    """Statistics of one or more reduction sets, in the accumulation dtype, with ``keepdim`` shape.

    ``mean`` is the set mean; ``var`` the biased variance (may be ``inf`` when it overflows the
    accumulation dtype, in which case ``rstd`` is still exact); ``rstd = 1/sqrt(var + eps)``.
    ``shift`` and ``centered_mean`` are the shifted representation used internally
    (``mean == shift + centered_mean``), kept so a backward pass can recompute ``x_hat`` exactly.
    """

    mean: Tensor
    var: Tensor
    rstd: Tensor
    shift: Tensor
    centered_mean: Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated in: float64 for float64, float32 otherwise.

    Example:
        >>> acc_dtype(torch.float16), acc_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shift_of(x: Tensor, dims: Sequence[int]) -> Tensor:
    """One element of each reduction set (index 0 along every reduced dim), keepdim shape."""
    k = x
    for d in dims:
        k = k.narrow(d, 0, 1)
    return k


def _centered(x: Tensor, shift: Tensor, dtype: torch.dtype) -> Tensor:
    """``x - shift`` in the accumulation dtype; one pass, fresh tensor that keeps x's layout."""
    if x.dtype == dtype:
        return x - shift
    return x.to(dtype) - shift.to(dtype)


def moments(x: Tensor, dims: Sequence[int], eps: float = 1e-5) -> Moments:
    """Mean, biased variance and ``rstd`` of ``x`` over ``dims``, accumulated in fp32 (fp64 for fp64).

    Args:
        x: input tensor, any floating dtype and layout.
        dims: the dims to reduce over (non-negative ints). Every reduced dim must be non-empty.
        eps: added to the variance inside the square root.

    Returns:
        :class:`Moments` with ``keepdim=True`` shapes.

    Example:
        >>> x = torch.tensor([[1.0, 2.0, 3.0], [1e6, 1e6 + 1.0, 1e6 + 2.0]])
        >>> m = moments(x, dims=(1,), eps=0.0)
        >>> m.var.squeeze(1)
        tensor([0.6667, 0.6667])
    """
    dims = tuple(int(d) % x.dim() for d in dims)
    stats = centered_stats(x, dims, eps)[:4]
    shift, centered_mean, var, rstd = (t.to(acc_dtype(x.dtype)) for t in stats)
    return Moments(shift + centered_mean, var, rstd, shift, centered_mean)


def centered_stats(
    x: Tensor, dims: tuple[int, ...], eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(shift, centered_mean, var, rstd, x - mean)``, all in the accumulation dtype.

    The squares of fp32/bf16 data overflow for |x| ~ 1e20 and underflow for subnormals; when
    that happens (``var`` infinite, or ``var + eps`` below the smallest normal number) the
    statistics are recomputed in float64, whose range covers every fp32 value squared. The
    returned dtype tells a backward pass which precision the forward used. Costs one check of
    the (small) variance tensor.
    """
    dtype = acc_dtype(x.dtype)
    out = _centered_stats(x, dims, eps, dtype)
    if dtype != torch.float64 and out[4].numel():
        var = out[2]
        overflow = bool(torch.isinf(var).any())
        # An underflowed variance matters only with eps ~ 0 and a set that is not constant.
        tiny = var + eps < torch.finfo(dtype).tiny
        underflow = bool(tiny.any()) and bool((tiny & (out[4].abs().amax(dims, keepdim=True) > 0)).any())
        if overflow or underflow:
            out = _centered_stats(x, dims, eps, torch.float64)
    return out


def _centered_stats(
    x: Tensor, dims: tuple[int, ...], eps: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    shift = _shift_of(x, dims).to(dtype)
    dc = _centered(x, shift, dtype)
    centered_mean = dc.mean(dims, keepdim=True)
    dc.sub_(centered_mean)
    # Not linalg.vector_norm: it avoids the temporary but accumulates naively (relative error
    # 7e-4 on 1e7 elements here, against 7e-9 for the pairwise sum behind mean()).
    var = (dc * dc).mean(dims, keepdim=True)
    return shift, centered_mean, var, torch.rsqrt(var + eps), dc


def normalize(
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """Apply ``(x - mean) * rstd * weight + bias`` in one fused pass, output in ``x.dtype``.

    ``mean`` and ``rstd`` broadcast against ``x`` (keepdim statistics); ``weight`` and ``bias``
    must already be shaped to broadcast (e.g. ``(1, C, 1, 1)`` for a per-channel affine on NCHW).
    The per-set scale and shift are folded first, so the full-size tensor is touched once.

    Example:
        >>> x = torch.randn(2, 3, 4, 4)
        >>> m = moments(x, dims=(0, 2, 3))
        >>> y = normalize(x, m.mean, m.rstd)
        >>> torch.allclose(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-6)
        True
    """
    scale = rstd if weight is None else rstd * weight.to(rstd.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(rstd.dtype)
    return _apply(x, scale, shift)


def _apply(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x * scale + shift`` computed in the statistics dtype, returned in ``x.dtype``."""
    y = torch.addcmul(shift, x.to(scale.dtype), scale)
    return y if y.dtype == x.dtype else y.to(x.dtype)
