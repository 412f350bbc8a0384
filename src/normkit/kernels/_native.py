"""The ``"native"`` backend: torch's own ATen norm kernels behind ``normkit::norm``, where they compute the
same thing.

Four patterns of (input view, reduced dims, affine shape) map onto ATen's fused norms:

* BatchNorm's statistics (every dim but 1, a per-channel affine): ``native_batch_norm`` in training
  mode without running statistics (normkit updates those itself);
* LayerNorm over the trailing dims (an element-wise affine over them, or none): ``native_layer_norm``;
* LayerNorm over one inner dim (LayerNorm2d over C): the same after ``movedim``;
* GroupNorm's ``(N, G, C // G, *S)`` view of a contiguous input: ``native_group_norm``;
* InstanceNorm of a contiguous input: ``native_batch_norm`` of its ``(1, N * C, S)`` view, as torch.nn's
  InstanceNorm runs (GroupNorm's backward with G = C works from raw sums of ``dy * x``, which cancel
  at a large mean).

The forward returns normkit's saved statistics (shift = mean, inverse scale 1, mean residual 0,
``rstd``, the variance, the count), so every other part of normkit (the running statistics, the jvp,
another backend's backward) reads them as usual; the backward uses ATen's matching backward ops.
Everything else, and any call ATen rejects (a dtype mix it does not take), runs on the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..ops import core

aten = torch.ops.aten

BN, LN, LN_INNER, GN, IN = range(5)


def _pattern(
    x: Tensor, dims: tuple[int, ...], weight: Tensor | None, bias: Tensor | None
) -> tuple[int, int] | None:
    """(pattern, extra): extra is the first reduced dim (LN), the inner dim (LN_INNER) or G (GN)."""
    nd = x.dim()
    shapes = [p.shape for p in (weight, bias) if p is not None]
    if nd >= 2 and dims == (0, *range(2, nd)):
        if all(s == (1, x.shape[1], *([1] * (nd - 2))) for s in shapes):
            return BN, 1
        return None
    # (the outputs must keep the input's layout: ATen's give theirs contiguous in the order they see)
    if dims and dims == tuple(range(dims[0], nd)) and dims[0] >= 1 and x.is_contiguous():
        d0 = dims[0]
        if all(s == (1,) * d0 + tuple(x.shape[d0:]) for s in shapes):
            return LN, d0
        if nd >= 4 and d0 == 2 and all(s == (1, x.shape[1], x.shape[2]) + (1,) * (nd - 3) for s in shapes):
            return GN, x.shape[1]  # GroupNorm's (N, G, C // G, *S) view
        if nd >= 3 and d0 == 2 and all(s == (1, x.shape[1]) + (1,) * (nd - 2) for s in shapes):
            # InstanceNorm: batch norm of the (1, N * C, S) view, as torch.nn's InstanceNorm runs (not
            # GroupNorm with G = C, whose backward works from raw sums of dy * x: 20-45x torch's gradient
            # error at a mean of 1e4)
            return IN, -1
        return None
    if len(dims) == 1 and 0 < dims[0] < nd - 1 and x.movedim(dims[0], -1).is_contiguous():
        d = dims[0]
        if all(s == tuple(x.shape[i] if i == d else 1 for i in range(nd)) for s in shapes):
            return LN_INNER, d
    return None


def _gn_sizes(x: Tensor, G: int) -> tuple[int, int, int, int]:
    """(N, G, C, S) of GroupNorm's (N, G, C // G, *S) view."""
    N, C = x.shape[0], G * x.shape[2]
    return N, G, C, x.numel() // (N * C)


def _vec(p: Tensor | None) -> Tensor | None:
    # (dense: ATen's CPU batch-norm backward misreads a strided weight where the spatial size is 1)
    return None if p is None else p.reshape(-1).contiguous()


def _half_params(x: Tensor, w: Tensor | None, b: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """For a float16 / bfloat16 ``x``: float32 weight and bias (ones and zeros where absent), which put
    ATen's batch norm on its mixed-dtype path (float32 statistics)."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        return w, b
    C = x.shape[1]
    w = torch.ones(C, device=x.device) if w is None else w.float()
    b = torch.zeros(C, device=x.device) if b is None else b.float()
    return w, b


def _stats(
    x: Tensor, dims: tuple[int, ...], mean: Tensor, rstd: Tensor, eps: float, var: Tensor | None = None
) -> Tensor:
    acc = core.acc_dtype(x.dtype)
    shape = core.stat_shape(x, dims)
    mean = mean.to(acc).reshape(shape)
    rstd = rstd.to(acc).reshape(shape)
    count = 1
    for d in dims:
        count *= x.shape[d]
    if var is None:
        var = (rstd.square().reciprocal() - eps).clamp_min(0.0)
    else:
        var = var.to(acc).reshape(shape)
    return torch.stack(
        [mean, torch.ones_like(mean), torch.zeros_like(mean), rstd, var, torch.full_like(mean, count)]
    )


def forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, dims: Sequence[int], eps: float
) -> tuple[Tensor, Tensor] | None:
    """``(y, stats)`` by ATen's kernel for this pattern, or ``None`` (then the reference runs)."""
    dims = tuple(dims)
    pat = _pattern(x, dims, weight, bias)
    if pat is None or x.numel() == 0:
        return None
    if eps == 0:
        return None  # (the variance is rebuilt from rstd below, infinite for a constant set)
    kind, extra = pat
    w = weight.detach() if weight is not None else None
    b = bias.detach() if bias is not None else None
    if kind != BN and eps > 1e-3:
        # the variance, rebuilt from rstd below (InstanceNorm's running statistics read it), would lose
        # about eps / var * 1e-7 of itself (all of it at eps 10 for a variance of 1e-6)
        return None
    var = None
    try:
        if kind == BN:
            # Scratch running statistics, momentum 1: ATen hands over the batch's mean and unbiased
            # variance in them (the variance rebuilt from rstd lost its digits where eps dwarfs it), in
            # float32 for a half x, with float32 parameters: ATen's mixed-dtype path, whose statistics
            # are float32 (without a weight a half x ran in half: gradients 7-40% off)
            acc = core.acc_dtype(x.dtype)
            C = x.shape[1]
            count = x.numel() // C
            rm, rv = torch.zeros(C, dtype=acc, device=x.device), torch.ones(C, dtype=acc, device=x.device)
            w, b = _half_params(x, w, b)
            y, mean, rstd = aten.native_batch_norm(x, _vec(w), _vec(b), rm, rv, True, 1.0, eps)
            if count > 1:
                var = rv * ((count - 1) / count)
        elif kind == IN:
            acc = core.acc_dtype(x.dtype)
            N, C = x.shape[0], x.shape[1]
            xv = x.reshape(1, N * C, -1)
            count = xv.shape[2]
            rm, rv = (
                torch.zeros(N * C, dtype=acc, device=x.device),
                torch.ones(N * C, dtype=acc, device=x.device),
            )
            w, b = _half_params(x, w, b)
            w, b = (None if p is None else p.reshape(-1).repeat(N) for p in (w, b))
            y, mean, rstd = aten.native_batch_norm(xv, w, b, rm, rv, True, 1.0, eps)
            y = y.view(x.shape)
            if count > 1:
                var = rv * ((count - 1) / count)
        elif kind == LN:
            shape = list(x.shape[extra:])
            y, mean, rstd = aten.native_layer_norm(
                x,
                shape,
                None if w is None else w.reshape(shape),
                None if b is None else b.reshape(shape),
                eps,
            )
        elif kind == LN_INNER:
            xm = x.movedim(extra, -1)
            y, mean, rstd = aten.native_layer_norm(xm, [x.shape[extra]], _vec(w), _vec(b), eps)
            y, mean, rstd = y.movedim(-1, extra), mean.movedim(-1, extra), rstd.movedim(-1, extra)
        else:
            N, G, C, S = _gn_sizes(x, extra)
            y, mean, rstd = aten.native_group_norm(x.reshape(N, C, S), _vec(w), _vec(b), N, C, S, G, eps)
            y = y.view(x.shape)
    except RuntimeError:  # e.g. a dtype mix this ATen kernel does not take
        return None
    return y, _stats(x, dims, mean, rstd, eps, var)


def backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    stats: Tensor,
    dims: Sequence[int],
    needs: Sequence[bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None] | None:
    """``(dx, dweight, dbias)`` by ATen's backward for this pattern, or ``None`` (then the reference runs)."""
    dims = tuple(dims)
    pat = _pattern(x, dims, weight, bias)
    if pat is None or x.numel() == 0:
        return None
    if not bool((stats[1] == 1).all()) or not bool((stats[2] == 0).all()):
        return None  # statistics of the reference's scaled path: its backward keeps them representable
    kind, extra = pat
    mean, rstd = stats[0], stats[3]
    mask = [bool(needs[0]), bool(needs[1]) and weight is not None, bool(needs[2]) and bias is not None]
    w = weight.detach() if weight is not None else None
    dy = dy if dy.dtype == x.dtype else dy.to(x.dtype)
    try:
        if kind == BN:
            C = x.shape[1]
            w32 = _half_params(x, w, None)[0] if x.dtype in (torch.float16, torch.bfloat16) else w
            dx, dw, db = aten.native_batch_norm_backward(
                dy, x, _vec(w32), None, None, mean.reshape(C), rstd.reshape(C), True, 0.0, mask
            )
        elif kind == IN:
            N, C = x.shape[0], x.shape[1]
            w32 = _half_params(x, w, None)[0] if x.dtype in (torch.float16, torch.bfloat16) else w
            dx, dw, db = aten.native_batch_norm_backward(
                dy.reshape(1, N * C, -1),
                x.reshape(1, N * C, -1),
                None if w32 is None else w32.reshape(-1).repeat(N),
                None,
                None,
                mean.reshape(N * C),
                rstd.reshape(N * C),
                True,
                0.0,
                mask,
            )
            dx = dx.view(x.shape) if dx is not None else None
            dw = dw.view(N, C).sum(0) if dw is not None else None  # (each sample's copy of the affine)
            db = db.view(N, C).sum(0) if db is not None else None
        elif kind == LN:
            shape = list(x.shape[extra:])
            dx, dw, db = aten.native_layer_norm_backward(
                dy,
                x,
                shape,
                mean,
                rstd,
                None if w is None else w.reshape(shape),
                None if bias is None else bias.detach().reshape(shape),
                mask,
            )
        elif kind == LN_INNER:
            C = x.shape[extra]
            dx, dw, db = aten.native_layer_norm_backward(
                dy.movedim(extra, -1),
                x.movedim(extra, -1),
                [C],
                mean.movedim(extra, -1),
                rstd.movedim(extra, -1),
                _vec(w),
                None if bias is None else _vec(bias.detach()),
                mask,
            )
            dx = dx.movedim(-1, extra) if dx is not None else None
        else:
            N, G, C, S = _gn_sizes(x, extra)
            dx, dw, db = aten.native_group_norm_backward(
                dy.reshape(N, C, S),
                x.reshape(N, C, S),
                mean.reshape(N, G),
                rstd.reshape(N, G),
                _vec(w),
                N,
                C,
                S,
                G,
                mask,
            )
            dx = dx.view(x.shape) if dx is not None else None
    except RuntimeError:
        return None
    return (
        dx if mask[0] else None,
        dw.reshape(weight.shape).to(weight.dtype) if mask[1] else None,  # type: ignore[union-attr]
        db.reshape(bias.shape).to(bias.dtype) if mask[2] else None,  # type: ignore[union-attr]
    )
