"""normkit.functional: pure tensor ops (no modules, no globals, no in-place writes to arguments).

Every op runs on one core in two halves, :func:`moments` (statistics) and normalize-from-
statistics with its analytic backward, registered as the ``torch.library`` op ``normkit::norm``
(:mod:`normkit.ops`); the ops differ only in the dims they reduce over.
"""

from ._autograd import norm
from ._moments import Moments, acc_dtype, moments, normalize
from ._running import NormOutput
from .activations import get_activation
from .batch_norm import batch_norm
from .batch_renorm import batch_renorm, mean_only_batch_norm
from .ghost_batch_norm import ghost_batch_norm
from .group_norm import group_norm
from .instance_norm import instance_norm
from .layer_norm import layer_norm, layer_norm_2d
from .masked import masked_moments, masked_norm
from .proxy_norm import group_norm_proxy_act, proxy_norm_act, proxy_points, proxy_stats
from .sync_batch_norm import sync_batch_norm

__all__ = [
    "Moments",
    "NormOutput",
    "acc_dtype",
    "batch_norm",
    "batch_renorm",
    "ghost_batch_norm",
    "get_activation",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "layer_norm_2d",
    "masked_moments",
    "masked_norm",
    "mean_only_batch_norm",
    "moments",
    "norm",
    "normalize",
    "group_norm_proxy_act",
    "proxy_norm_act",
    "proxy_points",
    "proxy_stats",
    "sync_batch_norm",
]
