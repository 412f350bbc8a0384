"""The float64 two-pass oracle for every normalization op (TESTING.md, ARCHITECTURE.md §6).

Written from ALGORITHMS.md §0-§1 only, independently of ``normkit``: it imports nothing from
normkit and calls no ``torch.nn.functional`` norm. Every statistic is the textbook two-pass
computation in float64,

    mu  = mean_S(x)
    var = mean_S((x - mu)^2)                  (biased, forward pass)
    y   = (x - mu) / sqrt(var + eps) * gamma + beta

and the running statistics follow the PyTorch convention

    running <- (1 - momentum) * running + momentum * batch       (momentum=None: 1 / step)
    stored variance = unbiased = var * m / (m - 1)

with a batch whose statistics are not all finite (or an empty batch) leaving every buffer and the
step counter unchanged.

All functions are differentiable (plain torch ops on a float64 copy of the input), so
"autograd through the reference" is a gradient oracle too. Outputs are float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

F64 = torch.float64

__all__ = [
    "RefOut",
    "ref_batch_norm",
    "ref_group_norm",
    "ref_instance_norm",
    "ref_layer_norm",
    "ref_layer_norm_2d",
    "ref_moments",
    "ref_running_update",
]


class RefOut(NamedTuple):
    output: Tensor
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None


def _f64(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.to(F64)


def ref_moments(x: Tensor, dims: Sequence[int]) -> tuple[Tensor, Tensor]:
    """float64 mean and biased variance over ``dims`` (keepdim), two passes."""
    x = x.to(F64)
    dims = tuple(dims)
    mu = x.mean(dim=dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dim=dims, keepdim=True)
    return mu, var


def _per_channel(p: Tensor | None, ndim: int) -> Tensor | None:
    """(C,) -> (1, C, 1, ...), float64."""
    if p is None:
        return None
    return p.to(F64).reshape([1, -1] + [1] * (ndim - 2))


def _affine(xhat: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
    y = xhat
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y


def ref_running_update(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    batch_mean: Tensor,
    batch_var_unbiased: Tensor,
    momentum: float | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """PyTorch EMA (or cumulative average for momentum=None); skipped for a non-finite batch.

    Returns new tensors in the dtype of the buffers passed in.
    """
    bm = batch_mean.detach().to(F64)
    bv = batch_var_unbiased.detach().to(F64)
    if bm.numel() == 0 or not (torch.isfinite(bm).all() and torch.isfinite(bv).all()):
        nbt = None if num_batches_tracked is None else num_batches_tracked.clone()
        return running_mean.clone(), running_var.clone(), nbt
    nbt = None if num_batches_tracked is None else num_batches_tracked + 1
    if momentum is None:
        assert nbt is not None, "momentum=None needs num_batches_tracked"
        factor = 1.0 / float(nbt.item())
    else:
        factor = float(momentum)
    rm = running_mean.to(F64)
    rv = running_var.to(F64)
    new_rm = (1.0 - factor) * rm + factor * bm
    new_rv = (1.0 - factor) * rv + factor * bv
    return new_rm.to(running_mean.dtype), new_rv.to(running_var.dtype), nbt


def ref_batch_norm(
    x: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Tensor | None = None,
    unbiased_running_var: bool = True,
) -> RefOut:
    """BN per channel over (N, *spatial). Batch stats in training or when no running stats."""
    nd = x.dim()
    w, b = _per_channel(weight, nd), _per_channel(bias, nd)
    x64 = x.to(F64)
    if not training and running_mean is not None and running_var is not None:
        mu = _per_channel(running_mean, nd)
        var = _per_channel(running_var, nd)
        y = _affine((x64 - mu) / torch.sqrt(var + eps), w, b)
        return RefOut(y, running_mean, running_var, num_batches_tracked)
    dims = (0, *range(2, nd))
    mu, var = ref_moments(x64, dims)
    y = _affine((x64 - mu) / torch.sqrt(var + eps), w, b)
    if training and running_mean is not None and running_var is not None:
        m = x.numel() // x.shape[1] if x.shape[1] else 0
        bm = mu.reshape(-1)
        bv = var.reshape(-1)
        if unbiased_running_var and m > 1:
            bv = bv * (m / (m - 1))
        rm, rv, nbt = ref_running_update(running_mean, running_var, num_batches_tracked, bm, bv, momentum)
        return RefOut(y, rm, rv, nbt)
    return RefOut(y, running_mean, running_var, num_batches_tracked)


def ref_instance_norm(
    x: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Tensor | None = None,
) -> RefOut:
    """IN per (n, c) over the spatial dims; running stats = batch average of the per-instance
    mean and per-instance *unbiased* variance."""
    nd = x.dim()
    w, b = _per_channel(weight, nd), _per_channel(bias, nd)
    x64 = x.to(F64)
    if not use_input_stats:
        assert running_mean is not None and running_var is not None
        mu = _per_channel(running_mean, nd)
        var = _per_channel(running_var, nd)
        return RefOut(
            _affine((x64 - mu) / torch.sqrt(var + eps), w, b), running_mean, running_var, num_batches_tracked
        )
    dims = tuple(range(2, nd))
    mu, var = ref_moments(x64, dims)
    y = _affine((x64 - mu) / torch.sqrt(var + eps), w, b)
    if running_mean is not None and running_var is not None:
        m = 1
        for d in dims:
            m *= x.shape[d]
        N, C = x.shape[0], x.shape[1]
        if N == 0 or m == 0:
            return RefOut(
                y,
                running_mean.clone(),
                running_var.clone(),
                None if num_batches_tracked is None else num_batches_tracked.clone(),
            )
        bm = mu.reshape(N, C).mean(0)
        bv = (var.reshape(N, C) * (m / (m - 1))).mean(0)
        rm, rv, nbt = ref_running_update(running_mean, running_var, num_batches_tracked, bm, bv, momentum)
        return RefOut(y, rm, rv, nbt)
    return RefOut(y, running_mean, running_var, num_batches_tracked)


def ref_group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """GN: per (n, g) over the C/G contiguous channels of group g and all spatial dims."""
    N, C = x.shape[0], x.shape[1]
    spatial = tuple(x.shape[2:])
    G = num_groups
    xg = x.to(F64).reshape(N, G, C // G, *spatial)
    dims = tuple(range(2, xg.dim()))
    mu, var = ref_moments(xg, dims)
    xhat = ((xg - mu) / torch.sqrt(var + eps)).reshape(x.shape)
    nd = x.dim()
    return _affine(xhat, _per_channel(weight, nd), _per_channel(bias, nd))


def ref_layer_norm(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """torch-semantics LN: over the trailing dims, element-wise affine of that shape."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    k = len(shape)
    dims = tuple(range(x.dim() - k, x.dim()))
    mu, var = ref_moments(x, dims)
    xhat = (x.to(F64) - mu) / torch.sqrt(var + eps)
    return _affine(xhat, _f64(weight), _f64(bias))


def ref_layer_norm_2d(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    over: str = "c",
) -> Tensor:
    """LN for (N, C, *spatial) with a per-channel affine.

    ``over="c"``: each (n, position) over its C channels (ConvNeXt LayerNorm2d).
    ``over="chw"``: each sample over all of (C, *spatial) (GN/PN papers' LN).
    """
    nd = x.dim()
    if over == "c":
        dims: tuple[int, ...] = (1,)
    elif over == "chw":
        dims = tuple(range(1, nd))
    else:
        raise ValueError(over)
    mu, var = ref_moments(x, dims)
    xhat = (x.to(F64) - mu) / torch.sqrt(var + eps)
    return _affine(xhat, _per_channel(weight, nd), _per_channel(bias, nd))
