"""LayerNorm (torch semantics) and LayerNorm2d (the two CNN senses, per-channel affine)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._errors import NormError
from ..functional._checks import check_eps, check_positive_int
from ..functional.layer_norm import _nested_layer_norm
from ..functional.layer_norm import layer_norm as _layer_norm
from ..functional.layer_norm import layer_norm_2d as _layer_norm_2d
from ..kernels import _direct, _fast
from ._base import check_channels, check_tensor, fx_leaf

__all__ = ["LayerNorm", "LayerNorm2d"]


def _ln_module_forward(
    x: Tensor,
    mask: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    normalized_shape: tuple[int, ...],
    eps: float,
) -> Tensor:
    """A LayerNorm layer's forward (one ``torch.fx`` call, see ``torch.fx.wrap`` below)."""
    return _layer_norm(x, normalized_shape, weight, bias, eps, mask=mask)


def _ln2d_module_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, num_channels: int, eps: float, over: str
) -> Tensor:
    """A LayerNorm2d layer's forward (one ``torch.fx`` call)."""
    check_tensor(x, "LayerNorm2d")
    if x.dim() < 2:
        raise NormError(
            f"LayerNorm2d: expected an (N, C, *spatial) or (N, C) input, got shape {tuple(x.shape)}"
        )
    check_channels(x, num_channels, "LayerNorm2d", "num_channels")
    return _layer_norm_2d(x, weight, bias, eps, over=over)  # type: ignore[arg-type]


torch.fx.wrap("_ln_module_forward")
torch.fx.wrap("_ln2d_module_forward")


class LayerNorm(nn.LayerNorm):
    r"""Layer normalization over the trailing ``normalized_shape`` dims; a subclass of ``torch.nn.LayerNorm``.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    The affine is element-wise, of shape ``normalized_shape`` (torch's meaning). For CNN feature
    maps with a per-channel affine use :class:`LayerNorm2d`.

    Args:
        normalized_shape: the trailing shape to normalize over: an int or a non-empty sequence of
            positive ints (``()`` is refused here; torch.nn builds it, then refuses every input).
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
        # as torch.nn.LayerNorm: an integer (int, numpy integer, 0-d integer tensor) or an iterable of them
        # (a list, tuple, torch.Size, 1-d array or tensor); stored as Python ints
        scalar = getattr(normalized_shape, "ndim", None) == 0 or not isinstance(normalized_shape, Iterable)
        if isinstance(normalized_shape, (str, bytes)):
            raise TypeError(
                f"LayerNorm: normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}"
            )
        entries = [normalized_shape] if scalar else list(normalized_shape)  # type: ignore[arg-type]
        name = "normalized_shape" if scalar else "each entry of normalized_shape"
        shape = tuple(check_positive_int(s, "LayerNorm", name) for s in entries)
        if not shape:
            # torch.nn.LayerNorm(()) builds, then refuses every input ("Expected normalized_shape to be at
            # least 1-dimensional"): a layer that can never run is refused here, once
            raise NormError(
                f"LayerNorm: normalized_shape must name at least one dim to normalize over, got "
                f"{normalized_shape!r}; pass the trailing size(s), e.g. LayerNorm(x.shape[-1])"
            )
        eps = check_eps(eps, "LayerNorm")
        super().__init__(torch.Size(shape), eps, bool(elementwise_affine), bias, device, dtype)

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize ``input``; ``mask`` (bool, broadcastable to it, True = valid) limits the statistics."""
        # TorchScript (deprecated in torch 2.13): ATen's layer_norm
        # torch.jit.is_scripting is public API that torch.jit.__all__ leaves out:
        if torch.jit.is_scripting():  # pyright: ignore[reportPrivateImportUsage]
            return torch.nn.functional.layer_norm(
                input, self.normalized_shape, self.weight, self.bias, self.eps
            )
        return self._forward(input, mask)

    @torch.jit.unused
    def _forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        if isinstance(x, Tensor) and x.is_nested:  # a jagged NestedTensor (rows of varying length)
            return _nested_layer_norm(x, mask, self.normalized_shape, self.weight, self.bias, self.eps)
        if mask is None:
            if _fast.eligible(x):  # plain eager on a CPU tensor: checks and the fused kernel in C++
                y = _fast.checked("layer_norm", x, self.normalized_shape, self.weight, self.bias, self.eps)
            else:  # on a GPU: torch's own kernel, one call
                y = _direct.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
            if y is not None:
                return y
        leaf = fx_leaf(self, x, mask, root_traceable=True)
        if leaf is not None:
            return leaf
        return _ln_module_forward(x, mask, self.weight, self.bias, self.normalized_shape, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
            f"bias={self.bias is not None}"
        )


class LayerNorm2d(nn.LayerNorm):
    r"""Layer normalization for ``(N, C, *spatial)`` feature maps, with a per-channel affine.

    ``over="c"`` (default): each position over its C channels, the ConvNeXt / timm
    ``LayerNorm2d``; equals ``torch.nn.LayerNorm(C)`` applied to the channels-last permutation.
    ``over="chw"``: each sample over (C, H, W), the LN of the Group Norm and Proxy Norm papers;
    equals ``GroupNorm(1, C)`` (registry name ``"ln"``). Works on NCHW and channels_last, and on
    1d/3d spatial inputs. On ``(N, C)`` features both are LayerNorm over C, Ba et al.'s LN of a
    fully connected layer (as ``GroupNorm(1, C)`` takes them), so ``"ln"`` serves an MLP too.

    A subclass of ``torch.nn.LayerNorm`` (normalized_shape ``(C,)``, per-channel weight and bias),
    as timm's ``LayerNorm2d`` is, so its state_dict loads from either.

    Args:
        num_channels: C.
        eps: added to the variance inside the square root. The default 1e-5 is torch.nn.LayerNorm's;
            timm's ``LayerNorm2d`` and ConvNeXt use 1e-6: pass ``eps=1e-6`` (or
            ``normkit.get_norm_layer("ln2d", eps=1e-6)``) to match a timm checkpoint exactly.
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
        if over not in ("c", "chw"):
            raise NormError(f"LayerNorm2d: over must be 'c' or 'chw', got {over!r}")
        num_channels = check_positive_int(num_channels, "LayerNorm2d", "num_channels")
        eps = check_eps(eps, "LayerNorm2d")
        super().__init__(num_channels, eps, bool(affine), bool(affine) and bias, device, dtype)
        self.num_channels = num_channels
        self.affine = bool(affine)
        self.over = over

    def forward(self, input: Tensor) -> Tensor:
        # TorchScript (deprecated in torch 2.13): ATen's layer/group norm
        # torch.jit.is_scripting is public API that torch.jit.__all__ leaves out:
        if torch.jit.is_scripting():  # pyright: ignore[reportPrivateImportUsage]
            if self.over == "chw":
                return torch.nn.functional.group_norm(input, 1, self.weight, self.bias, self.eps)
            y = torch.nn.functional.layer_norm(
                torch.movedim(input, 1, -1), [self.num_channels], self.weight, self.bias, self.eps
            )
            return torch.movedim(y, -1, 1)
        return self._forward(input)

    @torch.jit.unused
    def _forward(self, x: Tensor) -> Tensor:
        # a fast path, with the same interface: the fused CPU kernels (plain eager on a CPU tensor, one
        # call each way) or torch's own op (on a GPU)
        fast = _fast if _fast.eligible(x) else _direct if _direct.route(x) else None
        if fast is not None and x.dim() == 2 and x.shape[1] == self.num_channels:  # (N, C): rows of C
            if fast is _fast:  # (the LayerNorm layer's one C++ call: checks, kernel, autograd node)
                y = _fast.checked("layer_norm", x, self.normalized_shape, self.weight, self.bias, self.eps)
            else:
                y = _direct.layer_norm(x, (self.num_channels,), self.weight, self.bias, self.eps)
            if y is not None:
                return y
        if fast is not None and x.dim() >= 3 and x.shape[1] == self.num_channels:
            if self.over == "chw":
                y = fast.group_norm(x, 1, self.weight, self.bias, self.eps)
            else:
                y = fast.layer_norm_c(x, self.weight, self.bias, self.eps)
            if y is not None:
                return y
        leaf = fx_leaf(self, x, root_traceable=True)
        if leaf is not None:
            return leaf
        return _ln2d_module_forward(x, self.weight, self.bias, self.num_channels, self.eps, self.over)

    def extra_repr(self) -> str:
        return (
            f"{self.num_channels}, eps={self.eps}, affine={self.affine}, bias={self.bias is not None}, "
            f"over={self.over!r}"
        )
