r"""Pure statistics for diagnosing norm layers: tensors in, numbers out, float64 throughout.

* :func:`power_decomposition` / :func:`power_fractions`: the Proxy Norm paper's power plots
  (docs/EXPERIMENTS.md, E4). For activations ``y`` of shape ``(N, C, *spatial)``, with per-instance
  statistics ``mu_c(x) = mean_{hw} y[x, c]`` and ``sig_c(x) = std_{hw} y[x, c]`` (biased), the total
  power ``mean_c E_{x,hw} y^2`` splits *exactly* into four non-negative terms:

  .. math::
      \underbrace{\overline{(\mathrm{E}_x \mu_c)^2}}_{P_\text{mean}}
      + \underbrace{\overline{\mathrm{Var}_x \mu_c}}_{P_\text{varmean}}
      + \underbrace{\overline{\mathrm{Var}_x \sigma_c}}_{P_\text{varstd}}
      + \underbrace{\overline{(\mathrm{E}_x \sigma_c)^2}}_{P_\text{meanstd}}
      = \overline{\mathrm{E}_{x,hw}\, y^2}

  (the bar is the mean over channels), because ``E_hw y^2 = mu^2 + sig^2`` per instance and
  ``E_x a^2 = (E_x a)^2 + Var_x a``. A large ``P_mean`` fraction means channels are nearly
  constant functions of the input (LN's collapse with depth); Instance Norm forces ``P_varmean``
  and ``P_varstd`` to 0; BN forces ``P_mean`` to 0.
* :func:`batch_running_gap`: how far normalizing with a batch's statistics lands from
  normalizing with the running ones (BN's train/eval gap), in closed form.
* :func:`channel_moments`, :func:`dead_and_collapsed`, :func:`values_per_statistic`,
  :func:`ema_effective_batches`: the rest of what :class:`normkit.NormMonitor` reports.

:func:`channel_moments`, :func:`dead_and_collapsed`, :func:`power_decomposition` and
:func:`power_fractions` take a ``mask=`` as normkit's layers do (bool, broadcastable to the tensor,
True = valid): they then use the valid values only; masked-out values never enter the arithmetic, so
NaN / inf padding is harmless.

Example:
    >>> import torch
    >>> y = torch.randn(64, 8, 5, 5) + 3.0        # a channel-wise constant offset of 3
    >>> f = power_fractions(y)
    >>> round(f["P_mean"], 1)                       # 9 / (9 + 1)
    0.9
    >>> round(sum(f[k] for k in TERMS), 12)
    1.0
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .._errors import NormError

__all__ = [
    "TERMS",
    "PowerDecomposition",
    "batch_running_gap",
    "channel_moments",
    "dead_and_collapsed",
    "ema_effective_batches",
    "power_decomposition",
    "power_fractions",
    "values_per_statistic",
]

#: The four terms, in the order of :class:`PowerDecomposition`.
TERMS = ("P_mean", "P_varmean", "P_varstd", "P_meanstd")


class PowerDecomposition(NamedTuple):
    """The four power terms and their sum, as Python floats (float64 arithmetic)."""

    P_mean: float
    P_varmean: float
    P_varstd: float
    P_meanstd: float
    total: float

    def fractions(self) -> dict[str, float]:
        """Each term divided by the total power (all 0 when the total is 0, all NaN when it is not finite:
        a tensor with NaN or inf values has no meaningful split, and must not look clean)."""
        t = self.total
        if not math.isfinite(t):
            return {k: math.nan for k in TERMS}
        return {k: (getattr(self, k) / t if t > 0 else 0.0) for k in TERMS}


def _check_nc(y: object, op: str) -> Tensor:
    if not isinstance(y, Tensor) or y.dim() < 2:
        raise NormError(
            f"{op}: expected an (N, C, *spatial) or (N, C) tensor, got {getattr(y, 'shape', y)!r}"
        )
    if y.shape[0] < 1 or y.numel() == 0:
        raise NormError(f"{op}: need at least one sample and one value, got shape {tuple(y.shape)}")
    return y


def _expand_mask(mask: object, x: Tensor, op: str) -> Tensor:
    """``mask`` (bool, broadcastable to ``x``, True = valid) expanded to ``x``'s shape, on its device."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        what = f"a {mask.dtype} tensor" if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"{op}: mask must be a bool Tensor (True = valid) or None, got {what}")
    try:
        return mask.to(x.device).expand(x.shape)
    except RuntimeError:
        raise NormError(
            f"{op}: mask of shape {tuple(mask.shape)} does not broadcast to the input shape {tuple(x.shape)}"
        ) from None


def _instance_stats(y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(sample, channel) mean and biased std over the spatial dims, float64 ``(N, C)`` each."""
    _check_nc(y, "power_decomposition")
    y64 = y.detach().to(torch.float64).flatten(2) if y.dim() > 2 else y.detach().to(torch.float64)[:, :, None]
    mu = y64.mean(dim=2)  # (N, C)
    sig = (y64 - mu[:, :, None]).pow(2).mean(dim=2).sqrt()  # two-pass biased std
    return mu, sig


def _masked_power(y: Tensor, mask: Tensor) -> PowerDecomposition:
    """:func:`power_decomposition` over the valid values: per instance over its valid positions, then per
    channel over the instances weighted by their valid counts (the identity stays exact), the channels
    without a valid value left out of the mean over channels."""
    op = "power_decomposition"
    _check_nc(y, op)
    m = _expand_mask(mask, y, op)
    y64 = y.detach().to(torch.float64).reshape(y.shape[0], y.shape[1], -1)  # (N, C, S)
    m = m.reshape(y64.shape)
    n = m.sum(dim=2).to(torch.float64)  # (N, C) valid values per instance
    nc = n.sum(dim=0)  # (C,)
    keep = nc > 0
    if not bool(keep.any()):
        raise NormError(f"{op}: the mask leaves no valid value (input shape {tuple(y.shape)})")
    yv = torch.where(m, y64, torch.zeros((), dtype=torch.float64))
    mu = torch.where(n > 0, yv.sum(dim=2) / n.clamp_min(1), 0.0)
    dev = torch.where(m, y64 - mu[:, :, None], torch.zeros((), dtype=torch.float64))
    sig = torch.where(n > 0, (dev.pow(2).sum(dim=2) / n.clamp_min(1)).sqrt(), 0.0)
    w = n / nc.clamp_min(1)  # each instance's share of its channel's valid values
    e_mu, e_sig = (w * mu).sum(dim=0), (w * sig).sum(dim=0)
    terms = (
        e_mu.pow(2),
        (w * (mu - e_mu).pow(2)).sum(dim=0),
        (w * (sig - e_sig).pow(2)).sum(dim=0),
        e_sig.pow(2),
        yv.pow(2).sum(dim=(0, 2)) / nc.clamp_min(1),
    )
    return PowerDecomposition(*(float(t[keep].mean()) for t in terms))


def power_decomposition(y: Tensor, *, mask: Tensor | None = None) -> PowerDecomposition:
    """The four power terms of ``y`` ``(N, C, *spatial)``.

    An ``(N, C)`` input has no spatial spread: sig = 0.

    Variances over samples are biased (divide by N), so the identity is exact.

    With a ``mask`` (bool, broadcastable to ``y``, True = valid) only the valid values count: each
    (sample, channel)'s mean and std are over its valid positions, the moments over samples are
    weighted by each sample's number of valid values in the channel (so ``total`` is each channel's
    mean of ``y^2`` over its valid values, and the identity stays exact), and channels without a
    valid value are left out of the mean over channels.

    Example:
        >>> import torch
        >>> d = power_decomposition(torch.randn(16, 4, 3, 3, dtype=torch.float64))
        >>> abs(d.P_mean + d.P_varmean + d.P_varstd + d.P_meanstd - d.total) < 1e-12
        True
        >>> y = torch.tensor([[[1.0, 3.0, 99.0]], [[2.0, 2.0, 2.0]]])    # (2, 1, 3), 99 is padding
        >>> mask = torch.tensor([[[True, True, False]], [[True, True, True]]])
        >>> power_decomposition(y, mask=mask).total                     # (1 + 9 + 3 * 4) / 5
        4.4
    """
    if mask is not None:
        return _masked_power(y, mask)
    mu, sig = _instance_stats(y)
    p_mean = mu.mean(dim=0).pow(2).mean()
    p_varmean = (mu - mu.mean(dim=0)).pow(2).mean(dim=0).mean()
    p_varstd = (sig - sig.mean(dim=0)).pow(2).mean(dim=0).mean()
    p_meanstd = sig.mean(dim=0).pow(2).mean()
    total = y.detach().to(torch.float64).pow(2).mean()
    return PowerDecomposition(
        float(p_mean), float(p_varmean), float(p_varstd), float(p_meanstd), float(total)
    )


def power_fractions(y: Tensor, *, mask: Tensor | None = None) -> dict[str, float]:
    """The four terms as fractions of the total power, plus ``"total"`` (the power itself); ``mask`` as in
    :func:`power_decomposition`.

    Example:
        >>> import torch
        >>> x = torch.randn(32, 4, 6, 6)
        >>> inorm = torch.nn.functional.instance_norm(x)   # IN: instance statistics fixed to (0, 1)
        >>> f = power_fractions(inorm)
        >>> f["P_varmean"] < 1e-12 and f["P_varstd"] < 1e-6
        True
    """
    d = power_decomposition(y, mask=mask)
    return {**d.fractions(), "total": d.total}


def _channel_stats(
    x: Tensor, channel_dim: int = 1, mask: Tensor | None = None, op: str = "channel_moments"
) -> tuple[Tensor, Tensor, Tensor]:
    """Per channel: the number of (valid) values, float64 ``(C,)``, and their mean and biased variance
    (NaN for a channel with no valid value)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: expected a Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise NormError(f"{op}: expected an (N, C, *spatial) tensor, got shape {tuple(x.shape)}")
    C = x.shape[channel_dim]
    x64 = x.detach().to(torch.float64).movedim(channel_dim, 0).reshape(C, -1)  # (C, N*S)
    if mask is None:
        count = torch.full((C,), float(x64.shape[1]), dtype=torch.float64, device=x64.device)
        mean = x64.mean(dim=1)
        var = (x64 - mean[:, None]).pow(2).mean(dim=1)
        return count, mean, var
    m = _expand_mask(mask, x, op).movedim(channel_dim, 0).reshape(C, -1)
    zero = torch.zeros((), dtype=torch.float64, device=x64.device)
    count = m.sum(dim=1).to(torch.float64)
    mean = torch.where(m, x64, zero).sum(dim=1) / count  # (0 / 0: NaN for a channel with no valid value)
    var = torch.where(m, x64 - mean[:, None], zero).pow(2).sum(dim=1) / count
    return count, mean, var


def channel_moments(
    x: Tensor, channel_dim: int = 1, *, mask: Tensor | None = None
) -> tuple[int, Tensor, Tensor]:
    """``(count, mean, biased var)`` per channel over every other dim, in float64 (two passes).

    With a ``mask`` (bool, broadcastable to ``x``, True = valid) each channel's moments are over its
    valid values only; ``count`` is then the smallest number of valid values of a channel that has
    any, and a channel with none has NaN mean and variance.

    Example:
        >>> import torch
        >>> n, mean, var = channel_moments(torch.tensor([[1.0, 10.0], [3.0, 10.0]]))
        >>> n, mean.tolist(), var.tolist()
        (2, [2.0, 10.0], [1.0, 0.0])
        >>> x = torch.tensor([[1.0, 10.0], [3.0, 10.0], [50.0, 50.0]])     # the last row is padding
        >>> n, mean, var = channel_moments(x, mask=torch.tensor([[True], [True], [False]]))
        >>> n, mean.tolist(), var.tolist()
        (2, [2.0, 10.0], [1.0, 0.0])
    """
    count, mean, var = _channel_stats(x, channel_dim, mask)
    valid = count[count > 0]
    return int(valid.min()) if valid.numel() else 0, mean, var


def batch_running_gap(
    batch_mean: Tensor, batch_var: Tensor, running_mean: Tensor, running_var: Tensor, eps: float
) -> dict[str, float]:
    r"""How different BN's output is with a batch's statistics and with the running ones, on that batch.

    Per channel, with ``a = (var_B + eps)^-1/2`` and ``b = (var_R + eps)^-1/2``, the normalized
    values ``x_hat_B = (x - mean_B) a`` and ``x_hat_R = (x - mean_R) b`` differ by
    ``(x - mean_B)(a - b) + (mean_R - mean_B) b``, whose mean square over the batch is exactly

    .. math::
        \mathrm{E}(\hat x_B - \hat x_R)^2 = \mathrm{var}_B (a - b)^2 + (\mu_B - \mu_R)^2 b^2

    (``var_B`` biased, as BN normalizes with it). Returns, as root mean squares over channels:
    ``gap`` (that difference, in units of the normalized output: 0 means train and eval agree, 1
    means the difference is as large as the signal), ``mean_shift`` (``(mu_B - mu_R) b``) and
    ``log_std_ratio`` (``log(std_B / std_R)`` with eps).

    Example:
        >>> import torch
        >>> gap = batch_running_gap(torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(3), 1e-5)
        >>> gap["gap"], gap["mean_shift"]
        (0.0, 0.0)
        >>> one, zero = torch.ones(1), torch.zeros(1)
        >>> round(batch_running_gap(one, one, zero, one, 0.0)["gap"], 6)
        1.0
    """
    mb, vb, mr, vr = (
        t.detach().to(torch.float64) for t in (batch_mean, batch_var, running_mean, running_var)
    )
    a = (vb + eps).rsqrt()
    b = (vr + eps).rsqrt()
    sq = vb * (a - b).pow(2) + ((mb - mr) * b).pow(2)
    shift = (mb - mr) * b
    log_ratio = 0.5 * ((vb + eps).log() - (vr + eps).log())
    return {
        "gap": float(sq.mean().sqrt()),
        "mean_shift": float(shift.pow(2).mean().sqrt()),
        "log_std_ratio": float(log_ratio.pow(2).mean().sqrt()),
    }


def ema_effective_batches(momentum: float | None, num_batches: int) -> float:
    r"""How many batches the running statistics effectively average (Kish's effective sample size).

    After ``t`` updates ``r <- (1 - m) r + m b`` the batch ``k`` steps back has weight
    ``m (1 - m)^k``; the effective number is ``(sum w)^2 / sum w^2``, which tends to
    ``(2 - m) / m`` (19 for torch's 0.1). ``momentum=None`` (cumulative average) gives ``t``.

    Example:
        >>> b = ema_effective_batches
        >>> round(b(0.1, 10_000), 6), b(None, 7), b(1.0, 5)
        (19.0, 7.0, 1.0)
    """
    t = int(num_batches)
    if t <= 0:
        return 0.0
    if momentum is None:
        return float(t)
    m = float(momentum)
    if m <= 0.0:
        return 0.0
    if m >= 1.0:
        return 1.0
    q = (1.0 - m) ** 2
    s1 = 1.0 - (1.0 - m) ** t  # sum of m (1 - m)^k, k < t
    s2 = m * m * (1.0 - q**t) / (1.0 - q)
    return s1 * s1 / s2


def values_per_statistic(
    kind: str, shape: tuple[int, ...], groups: int | None = None, ghost_batch_size: int | None = None
) -> int:
    """How many values each mean / variance a norm computes on an input of ``shape`` pools over.

    ``kind`` ``"bn"`` / ``"frozen_bn"``: ``N * prod(spatial)`` (Ghost BN, ``ghost_batch_size``: its ghost
    batch instead of N); ``"gn"`` / ``"pn"`` (``groups``, default 1): ``C/G * prod(spatial)``; ``"ln"``
    (over ``(C, *spatial)``): ``C * prod(spatial)``; ``"ln2d"`` (over C per position): ``C``; ``"in"``:
    ``prod(spatial)``.

    Raises:
        NormError: an unknown ``kind``, or a ``shape`` of fewer than 2 dims.

    Example:
        >>> values_per_statistic("bn", (2, 64, 1, 1)), values_per_statistic("gn", (2, 64, 4, 4), groups=8)
        (2, 128)
    """
    if len(shape) < 2:
        raise NormError(f"values_per_statistic: expected an (N, C, *spatial) shape, got {shape}")
    n, c = shape[0], shape[1]
    spatial = 1
    for s in shape[2:]:
        spatial *= s
    if kind in ("bn", "frozen_bn"):
        return (min(n, ghost_batch_size) if ghost_batch_size else n) * spatial
    if kind in ("gn", "pn"):
        return (c // (groups or 1)) * spatial
    if kind == "ln":
        return c * spatial
    if kind == "ln2d":
        return c
    if kind == "in":
        return spatial
    raise NormError(
        f"values_per_statistic: unknown kind {kind!r}; expected bn, frozen_bn, gn, pn, ln, ln2d or in"
    )


def dead_and_collapsed(
    y: Tensor, channel_dim: int = 1, rel_tol: float = 1e-3, *, mask: Tensor | None = None
) -> tuple[list[int], list[int]]:
    """Channels of a layer's output that carry no signal: ``dead`` (exactly 0 everywhere, e.g. ReLU'd
    out or gamma = beta = 0) and ``collapsed`` (not 0, but constant over the batch and positions:
    std below ``rel_tol`` times the channel's root mean square).

    With a ``mask`` (bool, broadcastable to ``y``, True = valid) only the valid values count; a
    channel with no valid value is neither.

    Example:
        >>> import torch
        >>> y = torch.randn(4, 3, 5)
        >>> y[:, 0] = 0.0; y[:, 2] = 2.5
        >>> dead_and_collapsed(y)
        ([0], [2])
    """
    _, mean, var = _channel_stats(y, channel_dim, mask, "dead_and_collapsed")
    rms = (var + mean.pow(2)).sqrt()  # (NaN for a channel with no valid value: neither dead nor collapsed)
    dead = rms == 0
    collapsed = ~dead & (var.sqrt() <= rel_tol * rms)
    return dead.nonzero().flatten().tolist(), collapsed.nonzero().flatten().tolist()
