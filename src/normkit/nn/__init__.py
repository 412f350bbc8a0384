"""normkit.nn: drop-in torch.nn normalization modules built on normkit.functional."""

from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .group_norm import GroupNorm
from .instance_norm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .layer_norm import LayerNorm, LayerNorm2d
from .norm_act import BatchNormAct2d, GroupNormAct2d, LayerNormAct2d, create_norm_act_layer
from .optim import param_groups
from .proxy_norm import GroupNormProxyAct2d, ProxyNormAct
from .registry import available_norms, create_norm_layer, default_groups, register_norm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct2d",
    "GroupNorm",
    "GroupNormAct2d",
    "GroupNormProxyAct2d",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "LayerNorm2d",
    "LayerNormAct2d",
    "ProxyNormAct",
    "available_norms",
    "create_norm_act_layer",
    "create_norm_layer",
    "default_groups",
    "param_groups",
    "register_norm",
]
