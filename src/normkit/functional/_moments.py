"""The two halves of the core, as public functions: :func:`moments` (statistics) and :func:`normalize`.

The numerics live in :mod:`normkit.ops.core` (shifted, scaled two-pass moments in fp32, fp64 for
fp64; branch-free, so compile and export see no data-dependent control flow).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.core import Moments, acc_dtype, moments

__all__ = ["Moments", "acc_dtype", "moments", "normalize"]


def normalize(
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """Apply ``(x - mean) * rstd * weight + bias`` in one fused pass, output in ``x.dtype``.

    The normalize half of the core for *given* statistics (BN in eval, Frozen BN): ``mean`` and
    ``rstd`` broadcast against ``x`` (keepdim statistics); ``weight`` and ``bias`` must already be
    shaped to broadcast (e.g. ``(1, C, 1, 1)`` for a per-channel affine on NCHW). The per-set scale
    and shift are folded first, so the full-size tensor is touched once.

    Example:
        >>> x = torch.randn(2, 3, 4, 4)
        >>> m = moments(x, dims=(0, 2, 3))
        >>> y = normalize(x, m.mean, torch.rsqrt(m.var + 1e-5))
        >>> torch.allclose(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-6)
        True
    """
    scale = rstd if weight is None else rstd * weight.to(rstd.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(rstd.dtype)
    y = torch.addcmul(shift, x.to(scale.dtype), scale)
    return y if y.dtype == x.dtype else y.to(x.dtype)
