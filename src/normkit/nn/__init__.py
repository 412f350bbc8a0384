"""normkit.nn: drop-in torch.nn normalization modules built on normkit.functional."""

from . import registry
from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .batch_norm_family import (
    BatchNormalization,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    MeanOnlyBatchNorm,
)
from .group_norm import GroupNorm
from .instance_norm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .layer_norm import LayerNorm, LayerNorm2d
from .norm_act import (
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    BatchRenormAct1d,
    BatchRenormAct2d,
    BatchRenormAct3d,
    GhostBatchNormAct1d,
    GhostBatchNormAct2d,
    GhostBatchNormAct3d,
    GroupNormAct2d,
    InstanceNormAct1d,
    InstanceNormAct2d,
    InstanceNormAct3d,
    LayerNormAct2d,
    create_norm_act_layer,
)
from .optim import param_groups
from .proxy_norm import GroupNormProxyAct2d, ProxyNormAct
from .registry import available_norms, create_norm_layer, default_groups, get_norm_layer, register_norm
from .sync_batch_norm import SyncBatchNorm, SyncBatchNormAct
from .weight_norm import remove_weight_norm, weight_norm
from .weight_standardization import (
    ScaledStdConv1d,
    ScaledStdConv2d,
    ScaledStdConv3d,
    StdConv1d,
    StdConv2d,
    StdConv3d,
    weight_standardization,
)

registry._snapshot_builtins()  # (every built-in spec is registered by now: proxy_norm adds its own)

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchNormalization",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "BatchRenormAct1d",
    "BatchRenormAct2d",
    "BatchRenormAct3d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "GhostBatchNormAct1d",
    "GhostBatchNormAct2d",
    "GhostBatchNormAct3d",
    "GroupNorm",
    "GroupNormAct2d",
    "GroupNormProxyAct2d",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "InstanceNormAct1d",
    "InstanceNormAct2d",
    "InstanceNormAct3d",
    "LayerNorm",
    "LayerNorm2d",
    "LayerNormAct2d",
    "MeanOnlyBatchNorm",
    "ProxyNormAct",
    "ScaledStdConv1d",
    "ScaledStdConv2d",
    "ScaledStdConv3d",
    "StdConv1d",
    "StdConv2d",
    "StdConv3d",
    "SyncBatchNorm",
    "SyncBatchNormAct",
    "available_norms",
    "create_norm_act_layer",
    "create_norm_layer",
    "get_norm_layer",
    "default_groups",
    "param_groups",
    "register_norm",
    "remove_weight_norm",
    "weight_norm",
    "weight_standardization",
]
