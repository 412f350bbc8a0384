"""Group normalization (Wu & He, 2018), functional form."""

from __future__ import annotations

import torch
from torch import Tensor

from .._errors import NormError
from ..kernels import _direct, _fast, triton_ready
from ..ops.library import exporting
from ..ops.library import norm as _norm
from ._autograd import norm_output
from ._checks import check_eps, check_groups, check_input, check_param
from .masked import check_mask

__all__ = ["group_norm"]


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    mask: Tensor | None = None,
) -> Tensor:
    r"""Group normalization: each sample's channels split into ``num_groups`` contiguous groups.

    .. math::
        y = \frac{x - \mathrm{E}_{g}[x]}{\sqrt{\mathrm{Var}_{g}[x] + \epsilon}} \gamma_c + \beta_c

    The statistics of (sample n, group g) pool over the ``C / G`` channels of the group and all
    spatial positions; the affine is per channel. ``num_groups=1`` is LayerNorm over (C, H, W)
    with a per-channel affine (the LN of the GN and Proxy Norm papers); ``num_groups=C`` is
    InstanceNorm. Works on any layout (channels_last is kept) and on ``(N, C)`` inputs.

    Args:
        x: input ``(N, C, *spatial)`` or ``(N, C)``.
        num_groups: G, a divisor of C.
        weight, bias: per-channel affine ``(C,)`` or ``None``.
        eps: added to the variance inside the square root.
        mask: optional bool tensor broadcastable to ``x`` (True = valid): each group's statistics
            pool over its valid positions only; padded positions, and groups with no valid
            position, output the bias (and no one-value-per-group check is made).

    Example:
        >>> x = torch.randn(2, 6, 4, 4)
        >>> torch.allclose(group_norm(x, 3), torch.nn.functional.group_norm(x, 3), atol=1e-5)
        True
        >>> ln = torch.nn.functional.layer_norm(x, x.shape[1:])      # GN(1) is LN over (C, H, W)
        >>> torch.allclose(group_norm(x, 1), ln, atol=1e-5)
        True

    Reference: https://arxiv.org/abs/1803.08494
    """
    eager = mask is None and _fast.eligible(x)  # plain eager CPU: the fused kernels may run
    if eager:  # checks and kernel in one C++ call
        y = _fast.checked("group_norm", x, num_groups, weight, bias, eps)
        if y is not None:
            return y
    op = "group_norm"
    check_input(x, op)
    eps = check_eps(eps, op)
    N, C = x.shape[0], x.shape[1]
    G = check_groups(num_groups, C, op)
    check_param(weight, x, (C,), op, "weight")
    check_param(bias, x, (C,), op, "bias")
    spatial = tuple(x.shape[2:])
    m = C // G
    for s in spatial:
        m *= s
    if m == 1 and x.numel() and mask is None:
        raise NormError(
            f"{op}: expected more than 1 value per group, got input of shape {tuple(x.shape)} with "
            f"num_groups={G}; use fewer groups"
        )
    if mask is None and exporting():
        return torch.nn.functional.group_norm(x, G, weight, bias, eps)  # the standard op for exporters
    if mask is None and not eager:
        y = _direct.group_norm(x, G, weight, bias, eps)  # on a GPU: torch's own kernel, one call
        if y is not None:
            return y
        if not torch.compiler.is_compiling() and triton_ready(x):  # normkit's Triton kernels, one node
            from ..kernels import triton as _triton

            y = _triton.group_norm(x, G, weight, bias, eps)
            if y is not None:
                return y
    if eager and x.dim() >= 3:
        y = _fast.group_norm(x, G, weight, bias, eps)  # eager CPU: one fused call each way
        if y is not None:
            return y
    k = len(spatial)
    perm = None
    if G == 1:
        # one group: the statistics pool over (C, *S) of x itself (no view splitting the channels,
        # which Inductor cannot lay out channels-last once the spatial sizes are symbolic)
        xv = x
        pshape = (1, C) + (1,) * k
        dims = tuple(range(1, 2 + k))
    elif (
        k
        and x.stride(1) == 1
        and not x.is_contiguous()
        and x.permute(0, *range(2, 2 + k), 1).is_contiguous()
        and not torch.compiler.is_compiling()
    ):
        # channels_last (dense: an input expanded along a spatial dim, stride 0, is not, and came out
        # channels-innermost, neither torch's layout nor its own): work on the (N, *S, G, C // G) view
        # of the memory as it lies, where every elementwise pass is one flat loop and the statistics
        # reduce in two fast stages. (Not under torch.compile, where the op below takes x itself,
        # whatever its layout, and Inductor lays out the loops.)
        perm = (0, *range(2, 2 + k), 1)
        xv = x.permute(perm).reshape(N, *spatial, G, C // G)
        pshape = (1,) * (1 + k) + (G, C // G)
        dims = (*range(1, 1 + k), 2 + k)
    else:
        # (N, C, *S) -> (N, G, C // G, *S): splitting one dim is a view for any strides.
        xv = x.view(N, G, C // G, *spatial)
        pshape = (1, G, C // G) + (1,) * k
        dims = tuple(range(2, xv.dim()))
    w = weight.view(pshape) if weight is not None else None
    b = bias.view(pshape) if bias is not None else None
    if perm is None and xv is not x and torch.compiler.is_compiling() and not exporting() and x.numel():
        # one op on x itself, whose sets are those of the grouped view: no view of x in the graph
        # (ops.library.norm says why)
        me = None if mask is None else check_mask(mask, x, op).expand(x.shape)
        return _norm(x, w, b, dims, eps, me, view=xv.shape)[0]
    mv = None
    if mask is not None:
        # The mask, expanded to x, laid out the same way (a copy only when the broadcast needs one).
        me = check_mask(mask, x, op).expand(x.shape)
        mv = me if xv is x else (me if perm is None else me.permute(perm)).reshape(xv.shape)
    y = norm_output(xv, dims, w, b, eps, mv)
    if xv is x:
        return y
    if perm is None:
        return y.view(x.shape)
    # (N, *S, G, C // G) -> (N, *S, C) -> (N, C, *S): a view, channels_last again.
    inverse = (0, 1 + k, *range(1, 1 + k))
    return y.reshape(N, *spatial, C).permute(inverse)
