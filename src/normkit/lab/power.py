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

Everything is computed in float64; the functions are pure (tensors in, numbers out). They live in
:mod:`normkit.diagnostics.stats` (below the lab, so :class:`normkit.NormMonitor` uses them too) and
are re-exported here for the lab's experiments.

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

from ..diagnostics.stats import TERMS, PowerDecomposition, power_decomposition, power_fractions

__all__ = ["TERMS", "PowerDecomposition", "power_decomposition", "power_fractions"]
