"""GroupNorm: a drop-in replacement for torch.nn.GroupNorm."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..functional._checks import check_eps, check_groups, check_positive_int
from ..functional.group_norm import group_norm as _group_norm
from ..kernels import _direct, _fast
from ._base import check_channels, fx_leaf, torch_norm_init

__all__ = ["GroupNorm"]


def _gn_module_forward(
    x: Tensor,
    mask: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    num_groups: int,
    num_channels: int,
    eps: float,
) -> Tensor:
    """A GN layer's forward (one ``torch.fx`` call, see ``torch.fx.wrap`` below)."""
    check_channels(x, num_channels, "GroupNorm", "num_channels")
    return _group_norm(x, num_groups, weight, bias, eps, mask=mask)


torch.fx.wrap("_gn_module_forward")


class GroupNorm(nn.GroupNorm):
    r"""Group normalization (Wu & He, 2018); a subclass of ``torch.nn.GroupNorm`` and a drop-in for it.

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
        num_channels = check_positive_int(num_channels, "GroupNorm", "num_channels")
        num_groups = check_groups(num_groups, num_channels, "GroupNorm")
        eps = check_eps(eps, "GroupNorm")
        torch_norm_init(
            super().__init__, self, num_groups, num_channels, eps, bool(affine), device, dtype, bias=bias
        )

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize ``input``; ``mask`` (bool, broadcastable to it, True = valid) limits the statistics."""
        # TorchScript (deprecated in torch 2.13): ATen's group_norm
        # torch.jit.is_scripting is public API that torch.jit.__all__ leaves out:
        if torch.jit.is_scripting():  # pyright: ignore[reportPrivateImportUsage]
            return torch.nn.functional.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)
        return self._forward(input, mask)

    @torch.jit.unused
    def _forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        if mask is None and _fast.eligible(x) and x.dim() >= 3 and x.shape[1] == self.num_channels:
            # one C++ call: kernel and autograd node
            y = _fast.checked("group_norm", x, self.num_groups, self.weight, self.bias, self.eps)
            if y is None:
                y = _fast.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
            if y is not None:
                return y
        elif (
            mask is None and _direct.route(x) and x.dim() >= 2 and x.shape[1] == self.num_channels
        ):  # on a GPU: torch's own
            y = _direct.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
            if y is not None:
                return y
        leaf = fx_leaf(self, x, mask, root_traceable=True)
        if leaf is not None:
            return leaf
        return _gn_module_forward(
            x, mask, self.weight, self.bias, self.num_groups, self.num_channels, self.eps
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
            f"bias={self.bias is not None}"
        )
