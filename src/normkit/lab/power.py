r"""The power decomposition of a layer's activations (Proxy Norm paper's diagnostic, ALGORITHMS.md §2.8).

For activations ``y`` of shape ``(N, C, *spatial)``, with per-instance statistics
``mu_c(x) = mean_{hw} y[x, c]`` and ``sig_c(x) = std_{hw} y[x, c]`` (biased), the total power
``mean_c E_{x,hw} y^2`` splits *exactly* into four non-negative terms:

.. math::
    \underbrace{\overline{(\mathrm{E}_x \mu_c)^2}}_{P_\text{mean}}
    + \underbrace{\overline{\mathrm{Var}_x \mu_c}}_{P_\text{varmean}}
    + \underbrace{\overline{\mathrm{Var}_x \sigma_c}}_{P_\text{varstd}}
    + \underbrace{\overline{(\mathrm{E}_x \sigma_c)^2}}_{P_\text{meanstd}}
    = \overline{\mathrm{E}_{x,hw}\, y^2}

(the bar is the mean over channels), because ``E_hw y^2 = mu^2 + sig^2`` per instance and
``E_x a^2 = (E_x a)^2 + Var_x a``. A large ``P_mean`` fraction means channels are nearly
constant functions of the input (LN's collapse with depth); Instance Norm forces ``P_varmean``
and ``P_varstd`` to 0 (no variability of instance statistics); BN forces ``P_mean`` to 0.

Everything is computed in float64; the functions are pure (tensors in, numbers out).

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

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["TERMS", "PowerDecomposition", "power_decomposition", "power_fractions"]

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
        """Each term divided by the total power (all 0 when the total is 0)."""
        t = self.total
        return {k: (getattr(self, k) / t if t > 0 else 0.0) for k in TERMS}


def _instance_stats(y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(sample, channel) mean and biased std over the spatial dims, float64 ``(N, C)`` each."""
    if not isinstance(y, Tensor) or y.dim() < 2:
        raise ValueError(f"power_decomposition: expected an (N, C, *spatial) or (N, C) tensor, got {getattr(y, 'shape', y)!r}")
    if y.shape[0] < 1 or y.numel() == 0:
        raise ValueError(f"power_decomposition: need at least one sample and one value, got shape {tuple(y.shape)}")
    y64 = y.detach().to(torch.float64).flatten(2) if y.dim() > 2 else y.detach().to(torch.float64)[:, :, None]
    mu = y64.mean(dim=2)  # (N, C)
    sig = (y64 - mu[:, :, None]).pow(2).mean(dim=2).sqrt()  # two-pass biased std
    return mu, sig


def power_decomposition(y: Tensor) -> PowerDecomposition:
    """The four power terms of ``y`` ``(N, C, *spatial)`` (an ``(N, C)`` input has no spatial spread: sig = 0).

    Variances over samples are biased (divide by N), so the identity is exact.

    Example:
        >>> import torch
        >>> d = power_decomposition(torch.randn(16, 4, 3, 3, dtype=torch.float64))
        >>> abs(d.P_mean + d.P_varmean + d.P_varstd + d.P_meanstd - d.total) < 1e-12
        True
    """
    mu, sig = _instance_stats(y)
    p_mean = mu.mean(dim=0).pow(2).mean()
    p_varmean = (mu - mu.mean(dim=0)).pow(2).mean(dim=0).mean()
    p_varstd = (sig - sig.mean(dim=0)).pow(2).mean(dim=0).mean()
    p_meanstd = sig.mean(dim=0).pow(2).mean()
    total = y.detach().to(torch.float64).pow(2).mean()
    return PowerDecomposition(float(p_mean), float(p_varmean), float(p_varstd), float(p_meanstd), float(total))


def power_fractions(y: Tensor) -> dict[str, float]:
    """The four terms as fractions of the total power, plus ``"total"`` (the power itself).

    Example:
        >>> import torch
        >>> x = torch.randn(32, 4, 6, 6)
        >>> inorm = torch.nn.functional.instance_norm(x)   # IN: instance statistics fixed to (0, 1)
        >>> f = power_fractions(inorm)
        >>> f["P_varmean"] < 1e-12 and f["P_varstd"] < 1e-6
        True
    """
    d = power_decomposition(y)
    return {**d.fractions(), "total": d.total}
