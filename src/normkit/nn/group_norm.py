"""GroupNorm: a drop-in replacement for torch.nn.GroupNorm."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .. import functional as F
from ..functional._checks import check_eps, check_groups, check_positive_int
from ._base import check_channels, make_affine, reset_affine

__all__ = ["GroupNorm"]


class GroupNorm(nn.Module):
    r"""Group normalization (Wu & He, 2018); a drop-in for ``torch.nn.GroupNorm``.

    .. math::
        y = \frac{x - \mathrm{E}_{g}[x]}{\sqrt{\mathrm{Var}_{g}[x] + \epsilon}} \gamma_c + \beta_c

    Each sample's C channels are split into ``num_groups`` contiguous groups; the statistics of
    a group pool over its channels and all spatial positions, so the output of one sample never
    depends on the rest of the batch, in training or eval. ``GroupNorm(1, C)`` is the LN of the
    GN and Proxy Norm papers; ``GroupNorm(C, C)`` is InstanceNorm. Torch's signature (groups
    first) is kept; :func:`normkit.create_norm_layer` offers ``"gn"`` / ``"gn:16"`` channel-first.

    Args:
        num_groups: G, which must divide ``num_channels``.
        num_channels: C.
        eps: added to the variance inside the square root.
        affine: learnable per-channel weight (init 1) and bias (init 0).
        bias: with ``affine``, whether to learn the bias (keyword-only).

    Shape:
        Input ``(N, C, *)``; output the same shape, dtype and layout (channels_last is kept).

    Example:
        >>> import torch, normkit
        >>> gn = normkit.nn.GroupNorm(2, 6)
        >>> x = torch.randn(3, 6, 4, 4)
        >>> torch.allclose(gn(x), torch.nn.GroupNorm(2, 6)(x), atol=1e-5)
        True

    Reference: https://arxiv.org/abs/1803.08494
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.num_channels = check_positive_int(num_channels, "GroupNorm", "num_channels")
        self.num_groups = check_groups(num_groups, num_channels, "GroupNorm")
        self.eps = check_eps(eps, "GroupNorm")
        self.affine = bool(affine)
        make_affine(self, (num_channels,), self.affine, self.affine and bias, {"device": device, "dtype": dtype})

    def reset_parameters(self) -> None:
        """Weight 1, bias 0."""
        reset_affine(self)

    def forward(self, x: Tensor, *, mask: Tensor | None = None) -> Tensor:
        """Normalize ``x``; ``mask`` (bool, broadcastable to x, True = valid) limits the statistics."""
        check_channels(x, self.num_channels, "GroupNorm")
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, mask=mask)

    def extra_repr(self) -> str:
        return (
            f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
            f"bias={self.bias is not None}"
        )
