"""InstanceNorm1d/2d/3d: drop-in replacements for torch.nn's."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .._errors import NormError
from .. import functional as F
from ._base import _NormBase, check_channels

__all__ = ["InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]


class _InstanceNorm(_NormBase):
    _ndim = 0

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)

    def forward(self, x: Tensor, *, mask: Tensor | None = None) -> Tensor:
        """Normalize ``x``; ``mask`` (bool, broadcastable to x, True = valid) limits the statistics."""
        name = type(self).__name__
        if isinstance(x, Tensor) and x.dim() == self._ndim - 1:
            # Unbatched (C, *spatial), as torch.nn.InstanceNorm accepts.
            m = mask.unsqueeze(0) if isinstance(mask, Tensor) and mask.dim() == x.dim() else mask
            return self.forward(x.unsqueeze(0), mask=m).squeeze(0)
        if not isinstance(x, Tensor) or x.dim() != self._ndim:
            got = f"{x.dim()}D input" if isinstance(x, Tensor) else type(x).__name__
            raise NormError(
                f"{name}: expected {self._ndim}D (batched) or {self._ndim - 1}D (unbatched) input, got {got}"
            )
        check_channels(x, self.num_features, name)
        tracking = self._tracking
        out = F.instance_norm(
            x,
            self.running_mean if tracking else None,
            self.running_var if tracking else None,
            self.weight,
            self.bias,
            use_input_stats=self.training or not tracking,
            momentum=self.momentum,
            eps=self.eps,
            num_batches_tracked=self.num_batches_tracked if tracking else None,
            mask=mask,
        )
        return self._store(out)


class InstanceNorm1d(_InstanceNorm):
    r"""Instance normalization over a 3D ``(N, C, L)`` input; a drop-in for ``torch.nn.InstanceNorm1d``.

    .. math::
        y_{nc} = \frac{x_{nc} - \mathrm{E}_{L}[x_{nc}]}{\sqrt{\mathrm{Var}_{L}[x_{nc}] + \epsilon}} \gamma_c + \beta_c

    Defaults follow torch: ``affine=False``, ``track_running_stats=False``. With tracking, the
    batch-averaged instance statistics update the running buffers in training and are used in eval.
    Equivalent to ``GroupNorm(C, C)``.

    Example:
        >>> import torch, normkit
        >>> normkit.nn.InstanceNorm1d(3)(torch.randn(2, 3, 10)).shape
        torch.Size([2, 3, 10])

    Reference: https://arxiv.org/abs/1607.08022
    """

    _ndim = 3


class InstanceNorm2d(_InstanceNorm):
    r"""Instance normalization over a 4D ``(N, C, H, W)`` input; a drop-in for ``torch.nn.InstanceNorm2d``.

    See :class:`InstanceNorm1d`. Equivalent to ``GroupNorm(C, C)``.

    Example:
        >>> import torch, normkit
        >>> x = torch.randn(2, 3, 6, 6)
        >>> torch.allclose(normkit.nn.InstanceNorm2d(3)(x), torch.nn.InstanceNorm2d(3)(x), atol=1e-5)
        True
    """

    _ndim = 4


class InstanceNorm3d(_InstanceNorm):
    r"""Instance normalization over a 5D ``(N, C, D, H, W)`` input; a drop-in for ``torch.nn.InstanceNorm3d``.

    See :class:`InstanceNorm1d`.

    Example:
        >>> import torch, normkit
        >>> normkit.nn.InstanceNorm3d(2)(torch.randn(2, 2, 3, 3, 3)).shape
        torch.Size([2, 2, 3, 3, 3])
    """

    _ndim = 5
