"""normkit.ops: the seam every norm goes through.

* :mod:`normkit.ops.core`: the pure-PyTorch reference (per-set moments, normalize, backward, jvp).
* :mod:`normkit.ops.library`: the ``torch.library`` ops ``normkit::norm`` / ``normkit::norm_backward``
  and ``normkit::proxy_norm_act`` / ``normkit::proxy_norm_act_backward``, and :func:`norm`, the one
  entry point that picks the registered op (``torch.compile``), plain standard ops (export) or the
  eager ``autograd.Function`` (``torch.func``, forward-mode AD).
* :mod:`normkit.ops._inductor`: what ``torch.compile``'s Inductor makes of those ops (its own fused
  loops from the ATen reference for small inputs, a call of normkit's kernels for large ones).

Example:
    >>> import torch, normkit
    >>> x = torch.randn(4, 6, 5, 5)
    >>> y, stats = normkit.ops.norm(x, None, None, dims=(0, 2, 3), eps=1e-5)   # BN's sets
    >>> torch.allclose(y, torch.nn.functional.batch_norm(x, None, None, training=True), atol=1e-5)
    True
"""

from .core import Moments, acc_dtype, moments
from .library import exporting, norm, norm_stats, proxy_act

__all__ = ["Moments", "acc_dtype", "exporting", "moments", "norm", "norm_stats", "proxy_act"]
