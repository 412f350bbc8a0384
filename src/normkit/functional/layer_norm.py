"""Layer normalization (Ba, Kiros & Hinton, 2016): torch's last-dims form and the two CNN forms."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from .._errors import NormError
from ..kernels import _direct, _fast, triton_ready
from ..ops.library import exporting
from ._autograd import norm_output
from ._checks import check_eps, check_input, check_param
from ._views import channel_view
from .group_norm import group_norm
from .masked import check_mask

__all__ = ["layer_norm", "layer_norm_2d"]


def _nested_layer_norm(
    x: Tensor,
    mask: Tensor | None,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """LayerNorm of a NestedTensor: ``torch.nn.functional.layer_norm``, which normalizes a jagged tensor's
    trailing dense dims (normkit's kernels and composite take strided tensors only)."""
    if mask is not None:
        raise NormError(
            "layer_norm: a mask marks padding of a dense tensor; a NestedTensor has none, so pass mask=None"
        )
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    return torch.nn.functional.layer_norm(x, shape, weight, bias, eps)


def layer_norm(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    mask: Tensor | None = None,
) -> Tensor:
    r"""Layer normalization over the trailing ``normalized_shape`` dims (torch semantics).

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    The affine is per element, of shape ``normalized_shape``.

    Args:
        x: input ``(*, *normalized_shape)``.
        normalized_shape: the trailing shape to normalize over.
        weight, bias: element-wise affine of shape ``normalized_shape``, or ``None``.
        eps: added to the variance inside the square root.
        mask: optional bool tensor broadcastable to ``x`` (True = valid): statistics pool over the
            valid positions only; padded positions, and rows with no valid position, output the bias.

    Example:
        >>> x = torch.randn(4, 10, 16)
        >>> torch.allclose(layer_norm(x, 16), torch.nn.functional.layer_norm(x, (16,)), atol=1e-5)
        True

    Reference: https://arxiv.org/abs/1607.06450
    """
    eager = mask is None and _fast.eligible(x)  # plain eager CPU: the fused kernels may run
    if eager:
        y = _fast.checked("layer_norm", x, normalized_shape, weight, bias, eps)  # checks and kernel in C++
        if y is not None:
            return y
    if isinstance(x, Tensor) and x.is_nested:  # a jagged NestedTensor (rows of varying length): torch's op
        return _nested_layer_norm(x, mask, normalized_shape, weight, bias, eps)
    op = "layer_norm"
    check_input(x, op, min_dim=1)
    eps = check_eps(eps, op)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    k = len(shape)
    if k == 0:
        raise NormError(
            f"{op}: normalized_shape must name at least one trailing dim (e.g. the last: x.shape[-1:]), "
            f"got () for an input of shape {tuple(x.shape)}"
        )
    if k > x.dim() or tuple(x.shape[x.dim() - k :]) != shape:
        raise NormError(
            f"{op}: normalized_shape {shape} must match the trailing dims of the input, got input of shape "
            f"{tuple(x.shape)}"
        )
    check_param(weight, x, shape, op, "weight")
    check_param(bias, x, shape, op, "bias")
    if mask is None and exporting():
        return torch.nn.functional.layer_norm(x, shape, weight, bias, eps)  # the standard op for exporters
    if mask is None and not eager:
        y = _direct.layer_norm(x, shape, weight, bias, eps)  # on a GPU: torch's own kernel, one call
        if y is not None:
            return y
        if not torch.compiler.is_compiling() and triton_ready(x):  # normkit's Triton kernels, one node
            from ..kernels import triton as _triton

            y = _triton.layer_norm(x, shape, weight, bias, eps)
            if y is not None:
                return y
    if eager:
        fast = _fast.layer_norm_rows(x, k, weight, bias, eps)  # eager CPU: one fused call each way
        if fast is not None:
            return fast
    lead = (1,) * (x.dim() - k)
    w = weight.view(lead + shape) if weight is not None else None
    b = bias.view(lead + shape) if bias is not None else None
    dims = tuple(range(x.dim() - k, x.dim()))
    y = norm_output(x, dims, w, b, eps, None if mask is None else check_mask(mask, x, op))
    return y


def _static_channels(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> int:
    """The channel count as a constant for the legacy tracer: from a parameter's static shape if there is
    one, else ``x``'s (recorded as a constant: only the batch and spatial axes may be dynamic)."""
    for p in (weight, bias):
        if p is not None:
            return int(p.numel())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # pyright: ignore[reportPrivateImportUsage]
        return int(x.shape[1])


def layer_norm_2d(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    over: Literal["c", "chw"] = "c",
) -> Tensor:
    r"""Layer normalization for ``(N, C, *spatial)`` feature maps, with a per-channel affine.

    Two senses, both common:

    * ``over="c"``: each spatial position over its C channels (ConvNeXt / timm ``LayerNorm2d``);
      equals ``torch.nn.LayerNorm(C)`` on the channels-last permutation.
    * ``over="chw"``: each sample over all of (C, H, W), the LN of the Group Norm and Proxy Norm
      papers; equals ``group_norm(x, 1, weight, bias)``.

    Args:
        x: input ``(N, C, *spatial)``, NCHW or channels_last.
        weight, bias: per-channel affine ``(C,)`` or ``None``.
        eps: added to the variance inside the square root.
        over: ``"c"`` or ``"chw"``.

    Example:
        >>> x = torch.randn(2, 8, 5, 5)
        >>> ref = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (8,)).permute(0, 3, 1, 2)
        >>> torch.allclose(layer_norm_2d(x, over="c"), ref, atol=1e-5)
        True
    """
    eager = over == "c" and _fast.eligible(x)  # plain eager CPU: the fused kernels may run
    if eager:
        y = _fast.checked("layer_norm_2d", x, weight, bias, eps)  # eager CPU: checks and kernel in C++
        if y is not None:
            return y
    op = "layer_norm_2d"
    check_input(x, op, min_dim=2)
    if over == "chw":
        return group_norm(x, 1, weight, bias, eps)
    if over != "c":
        raise NormError(f"{op}: over must be 'c' or 'chw', got {over!r}")
    eps = check_eps(eps, op)
    C = x.shape[1]
    check_param(weight, x, (C,), op, "weight")
    check_param(bias, x, (C,), op, "bias")
    if exporting():
        # LayerNorm over the channels of the channels-last permutation: the standard op.
        # normalized_shape as a Python int: the legacy (TorchScript) exporter records ``x.shape[1]`` as a
        # traced size, and its LayerNorm needs a constant shape (it failed with dynamic_axes); the
        # channel count is fixed by the weight anyway, as torch.nn.LayerNorm's stored normalized_shape is.
        nd = x.dim()
        tracing = torch.jit.is_tracing()  # pyright: ignore[reportPrivateImportUsage]
        shape = (_static_channels(x, weight, bias),) if tracing else (C,)
        y = torch.nn.functional.layer_norm(x.permute(0, *range(2, nd), 1), shape, weight, bias, eps)
        return y.permute(0, nd - 1, *range(1, nd - 1))
    if not eager:
        y = _direct.layer_norm_c(x, weight, bias, eps)  # on a GPU: torch's LayerNorm, one call
        if y is not None:
            return y
        if not torch.compiler.is_compiling() and triton_ready(x):  # normkit's Triton kernels, one node
            from ..kernels import triton as _triton

            y = _triton.layer_norm_2d(x, weight, bias, eps)
            if y is not None:
                return y
    if eager:
        fast = _fast.layer_norm_c(x, weight, bias, eps)  # eager CPU: one fused call each way
        if fast is not None:
            return fast
    y = norm_output(x, (1,), channel_view(weight, x.dim()), channel_view(bias, x.dim()), eps)
    return y
