"""Model surgery on whole models. ``convert_norms``, ``fold_bn``, ``fold_proxy_norm`` and ``to_torch_nn``
return a new model and leave the caller's untouched; ``freeze_bn`` / ``unfreeze_bn`` change it in place unless
``inplace=False``."""

from .convert import ConversionReport, Converted, ConvertedLayer, convert_norms
from .fold import FoldedProxyAct, fold_proxy_norm
from .fold_bn import Folded, FoldReport, fold_bn, fold_bn_weights
from .freeze import (
    FrozenBatchNormAct1d,
    FrozenBatchNormAct2d,
    FrozenBatchNormAct3d,
    FrozenBatchNormXd,
    FrozenSyncBatchNormAct,
    freeze_bn,
    unfreeze_bn,
)
from .to_torch import to_torch_nn

__all__ = [
    "ConversionReport",
    "Converted",
    "ConvertedLayer",
    "FoldReport",
    "Folded",
    "FoldedProxyAct",
    "FrozenBatchNormAct1d",
    "FrozenBatchNormAct2d",
    "FrozenBatchNormAct3d",
    "FrozenBatchNormXd",
    "FrozenSyncBatchNormAct",
    "convert_norms",
    "fold_bn",
    "fold_bn_weights",
    "fold_proxy_norm",
    "freeze_bn",
    "to_torch_nn",
    "unfreeze_bn",
]
