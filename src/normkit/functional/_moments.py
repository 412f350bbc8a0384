"""The two halves of the core, as public functions: :func:`moments` (statistics) and :func:`normalize`.

The numerics live in :mod:`normkit.ops.core` (shifted, scaled two-pass moments in fp32, fp64 for
fp64; branch-free, so compile and export see no data-dependent control flow).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import kernels
from ..kernels import _fast
from ..ops import core
from ..ops.core import Moments, acc_dtype
from ..ops.library import _dense
from ._checks import check_dims

__all__ = ["Moments", "acc_dtype", "moments", "normalize"]


def moments(x: Tensor, dims: Sequence[int], mask: Tensor | None = None) -> Moments:
    """``(count, mean, var)`` of ``x`` over ``dims`` (biased variance, keepdim, fp32 / fp64 for fp64).

    :func:`normkit.ops.core.moments`; a plain eager CPU call with nothing to differentiate runs the
    fused kernel's statistics pass (about a tenth of the reference ops' time on a DRAM-sized input),
    with the same numerics. A ``mask`` limits each set to its valid values (reference ops).

    Example:
        >>> x = torch.tensor([[1.0, 2.0, 3.0], [1e4, 1e4 + 1.0, 1e4 + 2.0]])
        >>> m = moments(x, dims=(1,))
        >>> m.mean.squeeze(1), m.var.squeeze(1)
        (tensor([2.0000e+00, 1.0001e+04]), tensor([0.6667, 0.6667]))
    """
    if isinstance(x, Tensor):  # (dims as masked_moments takes them: ints, none twice, not empty)
        dims = check_dims(dims, x, "moments")
    if mask is None and x.numel() and _fast.eligible(x) and not (torch.is_grad_enabled() and x.requires_grad):
        _, stats = kernels.norm_forward(_dense(x), None, None, None, dims, 0.0)  # (the kernels take dense x)
        mean, var = core.mean_var(stats)
        return Moments(core.stats_count(stats), mean, var)
    return core.moments(x, dims, mask)


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
    # (x as it is: addcmul promotes it, and its backward keeps the half input, not a float32 copy)
    y = torch.addcmul(shift, x, scale)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def aten_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    """ATen's ``batch_norm`` (torch.nn's op: what exporters record and graph tools match), with dense
    affines: ATen's CPU backward misreads a strided weight (a parametrization's view) where the spatial
    size is 1, an input gradient off by 0.4. In training it updates the running statistics in place.

    Example:
        >>> x, rm, rv = torch.randn(4, 3, 2), torch.zeros(3), torch.ones(3)
        >>> y = aten_batch_norm(x, None, None, rm, rv, True, 0.1, 1e-5)
        >>> torch.allclose(rm, 0.1 * x.mean((0, 2)))
        True
    """
    w, b = (None if p is None else p.contiguous() for p in (weight, bias))
    cudnn = torch.backends.cudnn.enabled
    return torch.batch_norm(x, w, b, running_mean, running_var, training, momentum, eps, cudnn)


def aten_eval_dtypes(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
) -> bool:
    """Whether ATen's eval ``batch_norm`` takes these dtypes as they are: the running statistics in
    ``x``'s dtype, or, for a float16 / bfloat16 ``x``, float32 statistics and affine (ATen's mixed-dtype
    path: float32 arithmetic, the half input kept for the backward, no float32 copy of it).

    Example:
        >>> x, f32 = torch.randn(2, 3, 4).bfloat16(), torch.ones(3)
        >>> aten_eval_dtypes(x, f32, f32, f32, f32), aten_eval_dtypes(x, f32.bfloat16(), None, f32, f32)
        (True, False)
    """
    if all(p is None or p.dtype == x.dtype for p in (running_mean, running_var)):
        return True
    if x.dtype not in (torch.float16, torch.bfloat16):
        return False
    return all(p is None or p.dtype == torch.float32 for p in (weight, bias, running_mean, running_var))
