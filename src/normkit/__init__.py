"""normkit: normalization layers for PyTorch, their tools, fast kernels, and a lab that shows why they work.

The public API:

* :mod:`normkit.functional` -- pure tensor ops on one generic core (``batch_norm``, ``group_norm``, ...).
* :mod:`normkit.nn` -- drop-in ``torch.nn`` modules (``BatchNorm2d``, ``GroupNorm``, ``LayerNorm2d``, ...).
* :mod:`normkit.kernels` -- the backends behind the ops (fused C++ CPU kernels, the reference) and ``use()``.
* :mod:`normkit.ops` -- the registered ``torch.library`` ops (``normkit::norm`` ...) every norm runs on.
* :mod:`normkit.distributed` -- BN across processes: :func:`convert_sync_batchnorm` (to
  :class:`normkit.nn.SyncBatchNorm`), :func:`revert_sync_batchnorm`, :func:`recalibrate_bn`
  (precise BN), :func:`sync_bn_buffers`.
* :class:`NormError` -- raised for bad values and shapes; a ``ValueError`` and a ``RuntimeError``.
* :func:`create_norm_layer` -- norm layers by name (``"bn"``, ``"gn:16"``, ``"ln"``, ``"ln2d"``, ``"in"``).

``import normkit`` stays light: the lab (matplotlib, scikit-learn, rich) loads only when used.

Example:
    >>> import torch, normkit
    >>> layer = normkit.create_norm_layer("gn:8", 64)
    >>> layer(torch.randn(2, 64, 8, 8)).shape
    torch.Size([2, 64, 8, 8])
"""

import warnings as _warnings

import torch as _torch

from . import convert, distributed, functional, kernels, nn, ops, surgery
from ._errors import NormError
from .distributed import convert_sync_batchnorm, recalibrate_bn, revert_sync_batchnorm, sync_bn_buffers
from .nn import (
    available_norms,
    create_norm_act_layer,
    create_norm_layer,
    get_norm_layer,
    param_groups,
    register_norm,
)
from .surgery import fold_proxy_norm, freeze_bn, unfreeze_bn

__version__ = "0.1.0"

__all__ = [
    "NormError",
    "__version__",
    "available_norms",
    "convert",
    "convert_sync_batchnorm",
    "create_norm_act_layer",
    "create_norm_layer",
    "distributed",
    "get_norm_layer",
    "fold_proxy_norm",
    "freeze_bn",
    "functional",
    "kernels",
    "nn",
    "ops",
    "param_groups",
    "recalibrate_bn",
    "register_norm",
    "revert_sync_batchnorm",
    "surgery",
    "sync_bn_buffers",
    "unfreeze_bn",
]

# Model surgery and diagnostics (issue #12): convert norms, fold BN, watch norms at work.
from . import diagnostics
from .diagnostics import NormMonitor, train_eval_gap
from .surgery import convert_norms, fold_bn, fold_bn_weights

__all__ += ["NormMonitor", "convert_norms", "diagnostics", "fold_bn", "fold_bn_weights", "train_eval_gap"]

# torch.jit.trace (and the legacy ONNX exporter, which traces) warns at every Python bool taken of a
# traced size; normkit's argument checks take a dozen per layer, on shapes a trace fixes anyway. Only
# the warnings raised from normkit's own modules are silenced; the model's own still show.
_warnings.filterwarnings(
    "ignore",
    category=_torch.jit.TracerWarning,  # pyright: ignore[reportPrivateImportUsage]
    module=r"normkit\.",
)
