"""BatchNorm1d/2d/3d: drop-in replacements for torch.nn's, on normkit's functional core."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .._errors import NormError
from .. import functional as F
from ._base import _NormBase, check_channels

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class _BatchNorm(_NormBase):
    _dims: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        unbiased_running_var: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.unbiased_running_var = bool(unbiased_running_var)

    def _check_input_dim(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() not in self._dims:
            got = f"{x.dim()}D input" if isinstance(x, Tensor) else type(x).__name__
            want = " or ".join(f"{d}D" for d in self._dims)
            raise NormError(f"{type(self).__name__}: expected {want} input (N, C, ...), got {got}")
        check_channels(x, self.num_features, type(self).__name__)

    def forward(self, x: Tensor, *, mask: Tensor | None = None) -> Tensor:
        """Normalize ``x``; ``mask`` (bool, broadcastable to x, True = valid) limits the statistics."""
        self._check_input_dim(x)
        tracking = self._tracking
        out = F.batch_norm(
            x,
            self.running_mean if tracking else None,
            self.running_var if tracking else None,
            self.weight,
            self.bias,
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
            num_batches_tracked=self.num_batches_tracked if tracking else None,
            unbiased_running_var=self.unbiased_running_var,
            mask=mask,
        )
        return self._store(out)


class BatchNorm1d(_BatchNorm):
    r"""Batch normalization over a 2D ``(N, C)`` or 3D ``(N, C, L)`` input; a drop-in for ``torch.nn.BatchNorm1d``.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    Statistics per channel over ``N`` (and ``L``). In training the batch statistics (biased
    variance) are used and the running ones updated as ``running = (1 - momentum) * running +
    momentum * batch`` with the unbiased variance (``momentum=None``: cumulative average). In
    eval the running statistics are used. With ``track_running_stats=False`` (at construction or
    set later) batch statistics are used in both modes and the buffers are never touched.

    Args:
        num_features: C.
        eps: added to the variance inside the square root.
        momentum: weight of the new batch (PyTorch convention; Keras's 0.99 is 0.01 here), or ``None``.
        affine: learnable per-channel weight and bias.
        track_running_stats: keep running statistics for eval mode.
        bias: with ``affine``, whether to learn the bias (keyword-only; normkit extension).
        unbiased_running_var: store the unbiased batch variance (PyTorch) or the biased one (Keras 3).

    Shape:
        Input ``(N, C)`` or ``(N, C, L)``; output the same shape, dtype and layout.

    Example:
        >>> import torch, normkit
        >>> bn = normkit.nn.BatchNorm1d(16)
        >>> y = bn(torch.randn(8, 16))
        >>> bn.num_batches_tracked.item()
        1

    Reference: https://arxiv.org/abs/1502.03167
    """

    _dims = (2, 3)


class BatchNorm2d(_BatchNorm):
    r"""Batch normalization over a 4D ``(N, C, H, W)`` input; a drop-in for ``torch.nn.BatchNorm2d``.

    Each channel's statistics pool over N, H and W (``m = N*H*W``). Same arguments, defaults,
    state_dict keys and running-statistics rule as :class:`BatchNorm1d` and ``torch.nn``;
    channels_last inputs give channels_last outputs and input gradients.

    Example:
        >>> import torch, normkit
        >>> ours, ref = normkit.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)
        >>> _ = ours.load_state_dict(ref.state_dict())
        >>> x = torch.randn(8, 4, 5, 5)
        >>> torch.allclose(ours(x), ref(x), atol=1e-5)
        True
        >>> torch.allclose(ours.running_var, ref.running_var)
        True

    Reference: https://arxiv.org/abs/1502.03167
    """

    _dims = (4,)


class BatchNorm3d(_BatchNorm):
    r"""Batch normalization over a 5D ``(N, C, D, H, W)`` input; a drop-in for ``torch.nn.BatchNorm3d``.

    See :class:`BatchNorm1d` for the maths and the running statistics.

    Example:
        >>> import torch, normkit
        >>> normkit.nn.BatchNorm3d(2)(torch.randn(2, 2, 3, 3, 3)).shape
        torch.Size([2, 2, 3, 3, 3])
    """

    _dims = (5,)
