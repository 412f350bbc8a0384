"""float64 oracles for the BatchNorm family and the masked norms (issue 6).

Written from the papers' formulas (ALGORITHMS.md §1.1, §1.5, §1.6; Ioffe 2017 for Batch Renorm;
the Keras BatchNormalization update rule), independently of normkit: nothing here imports
normkit or calls a torch.nn.functional norm. Loops over chunks / sets are deliberate: they are
the obviously-correct form that the vectorised code must agree with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

F64 = torch.float64


def _chan(p: Tensor | None, ndim: int, axis: int = 1) -> Tensor | None:
    if p is None:
        return None
    shape = [1] * ndim
    shape[axis] = -1
    return p.to(F64).reshape(shape)


def _affine(xhat: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
    y = xhat
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y


# --- masked -----------------------------------------------------------------------------------


def ref_masked_norm(
    x: Tensor, mask: Tensor, dims: Sequence[int], w: Tensor | None, b: Tensor | None, eps: float
) -> Tensor:
    """One set at a time: gather the valid values with boolean indexing, two-pass mean/var,
    normalize the valid positions, 0 elsewhere; then the affine (views broadcasting to x)."""
    x = x.to(F64)
    mask = mask.expand(x.shape)
    dims = [d % x.dim() for d in dims]
    keep = [d for d in range(x.dim()) if d not in dims]
    perm = keep + dims
    xs = x.permute(perm)
    ms = mask.permute(perm)
    lead = xs.shape[: len(keep)]
    xs = xs.reshape(-1, int(torch.tensor(xs.shape[len(keep) :]).prod()) if dims else 1)
    ms = ms.reshape(xs.shape)
    rows = []
    for i in range(xs.shape[0]):
        v = xs[i][ms[i]]
        if v.numel() == 0:
            rows.append(torch.zeros_like(xs[i]))
            continue
        mu = v.mean()
        var = ((v - mu) ** 2).mean()
        rows.append(torch.where(ms[i], (xs[i] - mu) / torch.sqrt(var + eps), torch.zeros_like(xs[i])))
    xhat = torch.stack(rows).reshape(*lead, *[x.shape[d] for d in dims])
    inv = [0] * x.dim()
    for i, p in enumerate(perm):
        inv[p] = i
    xhat = xhat.permute(inv)
    return _affine(xhat, None if w is None else w.to(F64), None if b is None else b.to(F64))


def ref_masked_channel_stats(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per channel (dim 1) over all valid positions: mean, biased var and count (float64)."""
    x = x.to(F64)
    mask = mask.expand(x.shape)
    means, vars_, counts = [], [], []
    for c in range(x.shape[1]):
        v = x[:, c][mask[:, c]]
        counts.append(float(v.numel()))
        if v.numel() == 0:
            means.append(float("nan"))
            vars_.append(float("nan"))
            continue
        mu = v.mean()
        means.append(mu.item())
        vars_.append(((v - mu) ** 2).mean().item())
    return torch.tensor(means, dtype=F64), torch.tensor(vars_, dtype=F64), torch.tensor(counts, dtype=F64)


# --- ghost batch norm ---------------------------------------------------------------------------


def ref_bn_train(x: Tensor, w: Tensor | None, b: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """BN training forward on one batch: output, batch mean, unbiased batch var (float64)."""
    x = x.to(F64)
    dims = (0, *range(2, x.dim()))
    mu = x.mean(dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dims, keepdim=True)
    m = x.numel() // x.shape[1]
    y = _affine((x - mu) / torch.sqrt(var + eps), _chan(w, x.dim()), _chan(b, x.dim()))
    return y, mu.flatten(), var.flatten() * m / (m - 1)


def ref_ghost_batch_norm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    w: Tensor | None,
    b: Tensor | None,
    ghost: int,
    momentum: float,
    eps: float,
    mode: str = "per_chunk",
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Ghost BN training step by a Python loop over chunks, with the EMA applied chunk after chunk
    ("per_chunk") or once with the size-weighted averaged chunk statistics ("averaged").
    Returns (output, running_mean, running_var, number of EMA updates)."""
    rm, rv = running_mean.to(F64).clone(), running_var.to(F64).clone()
    outs, means, vars_, sizes = [], [], [], []
    for start in range(0, x.shape[0], ghost):
        chunk = x[start : start + ghost]
        y, mu, var = ref_bn_train(chunk, w, b, eps)
        outs.append(y)
        means.append(mu)
        vars_.append(var)
        sizes.append(chunk.shape[0])
        if mode == "per_chunk":
            rm = (1 - momentum) * rm + momentum * mu
            rv = (1 - momentum) * rv + momentum * var
    if mode == "averaged":
        wts = torch.tensor(sizes, dtype=F64) / sum(sizes)
        mu = sum(wt * m for wt, m in zip(wts, means))
        var = sum(wt * v for wt, v in zip(wts, vars_))
        rm = (1 - momentum) * rm + momentum * mu
        rv = (1 - momentum) * rv + momentum * var
    return torch.cat(outs), rm, rv, (len(outs) if mode == "per_chunk" else 1)


# --- batch renorm --------------------------------------------------------------------------------


def ref_batch_renorm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    w: Tensor | None,
    b: Tensor | None,
    r_max: float,
    d_max: float,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Ioffe 2017, Algorithm 1, with sigma = sqrt(var + eps) and r, d held constant (detached).

    Returns (output, new running mean, new running var (unbiased batch var in the EMA), r, d)."""
    x = x.to(F64)
    nd = x.dim()
    dims = (0, *range(2, nd))
    mu = x.mean(dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dims, keepdim=True)
    sigma = torch.sqrt(var + eps)
    rmu = _chan(running_mean, nd)
    rsigma = torch.sqrt(_chan(running_var, nd) + eps)
    r = (sigma / rsigma).clamp(1 / r_max, r_max).detach()
    d = ((mu - rmu) / rsigma).clamp(-d_max, d_max).detach()
    xhat = (x - mu) / sigma * r + d
    y = _affine(xhat, _chan(w, nd), _chan(b, nd))
    m = x.numel() // x.shape[1]
    new_rm = running_mean.to(F64) + momentum * (mu.flatten().detach() - running_mean.to(F64))
    new_rv = running_var.to(F64) + momentum * (var.flatten().detach() * m / (m - 1) - running_var.to(F64))
    return y, new_rm, new_rv, r.flatten(), d.flatten()


# --- Keras BatchNormalization -----------------------------------------------------------------------


def ref_keras_bn(
    x: Tensor,
    axis: int,
    gamma: Tensor | None,
    beta: Tensor | None,
    moving_mean: Tensor,
    moving_variance: Tensor,
    momentum: float,
    epsilon: float,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """keras.layers.BatchNormalization.call, written from its documented formulas:

    training: y = gamma * (x - mean(x)) / sqrt(var(x) + epsilon) + beta  (var biased, ops.moments)
              moving_mean = moving_mean * momentum + mean(x) * (1 - momentum)
              moving_var  = moving_var  * momentum + var(x)  * (1 - momentum)
    inference: y = gamma * (x - moving_mean) / sqrt(moving_var + epsilon) + beta
    """
    x = x.to(F64)
    nd = x.dim()
    axis = axis % nd
    dims = tuple(d for d in range(nd) if d != axis)
    g, bt = _chan(gamma, nd, axis), _chan(beta, nd, axis)
    mm, mv = moving_mean.to(F64), moving_variance.to(F64)
    if training:
        mu = x.mean(dims, keepdim=True)
        var = ((x - mu) ** 2).mean(dims, keepdim=True)
        y = _affine((x - mu) / torch.sqrt(var + epsilon), g, bt)
        mm = mm * momentum + mu.flatten() * (1 - momentum)
        mv = mv * momentum + var.flatten() * (1 - momentum)
        return y, mm, mv
    y = _affine((x - _chan(mm, nd, axis)) / torch.sqrt(_chan(mv, nd, axis) + epsilon), g, bt)
    return y, mm, mv
