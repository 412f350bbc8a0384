"""LayerNorm (torch semantics) and LayerNorm2d (the two CNN senses, per-channel affine)."""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from torch import Tensor, nn

from .._errors import NormError
from .. import functional as F
from ..functional._checks import check_eps, check_positive_int
from ._base import check_channels, make_affine, reset_affine

__all__ = ["LayerNorm", "LayerNorm2d"]


class LayerNorm(nn.Module):
    r"""Layer normalization over the trailing ``normalized_shape`` dims; a drop-in for ``torch.nn.LayerNorm``.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    The affine is element-wise, of shape ``normalized_shape`` (torch's meaning). For CNN feature
    maps with a per-channel affine use :class:`LayerNorm2d`.

    Args:
        normalized_shape: the trailing shape to normalize over.
        eps: added to the variance inside the square root.
        elementwise_affine: learnable weight (init 1) and bias (init 0).
        bias: with ``elementwise_affine``, whether to learn the bias.

    Example:
        >>> import torch, normkit
        >>> x = torch.randn(4, 7, 32)
        >>> torch.allclose(normkit.nn.LayerNorm(32)(x), torch.nn.LayerNorm(32)(x), atol=1e-5)
        True

    Reference: https://arxiv.org/abs/1607.06450
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if isinstance(normalized_shape, int):
            shape: tuple[int, ...] = (normalized_shape,)
        elif isinstance(normalized_shape, (tuple, list, torch.Size)):
            shape = tuple(normalized_shape)
        else:
            raise TypeError(
                f"LayerNorm: normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}"
            )
        for s in shape:
            check_positive_int(s, "LayerNorm", "each entry of normalized_shape")
        self.normalized_shape = shape
        self.eps = check_eps(eps, "LayerNorm")
        self.elementwise_affine = bool(elementwise_affine)
        make_affine(
            self, shape, self.elementwise_affine, self.elementwise_affine and bias, {"device": device, "dtype": dtype}
        )

    def reset_parameters(self) -> None:
        """Weight 1, bias 0."""
        reset_affine(self)

    def forward(self, x: Tensor, *, mask: Tensor | None = None) -> Tensor:
        """Normalize ``x``; ``mask`` (bool, broadcastable to x, True = valid) limits the statistics."""
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, mask=mask)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
            f"bias={self.bias is not None}"
        )


class LayerNorm2d(nn.Module):
    r"""Layer normalization for ``(N, C, *spatial)`` feature maps, with a per-channel affine.

    ``over="c"`` (default): each position over its C channels, the ConvNeXt / timm
    ``LayerNorm2d``; equals ``torch.nn.LayerNorm(C)`` applied to the channels-last permutation.
    ``over="chw"``: each sample over (C, H, W), the LN of the Group Norm and Proxy Norm papers;
    equals ``GroupNorm(1, C)`` (registry name ``"ln"``). Works on NCHW and channels_last, and on
    1d/3d spatial inputs.

    Args:
        num_channels: C.
        eps: added to the variance inside the square root.
        affine: learnable per-channel weight (init 1) and bias (init 0).
        bias: with ``affine``, whether to learn the bias.
        over: ``"c"`` or ``"chw"``.

    Example:
        >>> import torch, normkit
        >>> x = torch.randn(2, 8, 5, 5)
        >>> ln_c = normkit.nn.LayerNorm2d(8)
        >>> ref = torch.nn.LayerNorm(8)(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        >>> torch.allclose(ln_c(x), ref, atol=1e-5)
        True
        >>> ln_chw = normkit.nn.LayerNorm2d(8, over="chw")
        >>> torch.allclose(ln_chw(x), torch.nn.GroupNorm(1, 8)(x), atol=1e-5)
        True
    """

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        over: Literal["c", "chw"] = "c",
    ) -> None:
        super().__init__()
        if over not in ("c", "chw"):
            raise NormError(f"LayerNorm2d: over must be 'c' or 'chw', got {over!r}")
        self.num_channels = check_positive_int(num_channels, "LayerNorm2d", "num_channels")
        self.eps = check_eps(eps, "LayerNorm2d")
        self.affine = bool(affine)
        self.over = over
        make_affine(self, (num_channels,), self.affine, self.affine and bias, {"device": device, "dtype": dtype})

    def reset_parameters(self) -> None:
        """Weight 1, bias 0."""
        reset_affine(self)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 3:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise NormError(f"LayerNorm2d: expected an (N, C, *spatial) input, got {got}")
        check_channels(x, self.num_channels, "LayerNorm2d")
        return F.layer_norm_2d(x, self.weight, self.bias, self.eps, over=self.over)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine={self.affine}, bias={self.bias is not None}, over={self.over!r}"
