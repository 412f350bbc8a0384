"""The power decomposition of a layer's activations (Proxy Norm paper's diagnostic, docs/EXPERIMENTS.md, E4).

The maths and the functions live in :mod:`normkit.diagnostics.stats` (below the lab, so
:class:`normkit.NormMonitor` uses them too); they are re-exported here for the lab's experiments.

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
