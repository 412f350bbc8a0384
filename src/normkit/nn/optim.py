"""Optimizer parameter groups that follow the Proxy Norm authors' weight-decay rule."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .._errors import NormError

__all__ = ["param_groups"]

# Norm layers (torch's and ours) whose parameters never get weight decay.
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


def _is_norm(module: nn.Module) -> bool:
    from ._base import _NormBase
    from .group_norm import GroupNorm
    from .layer_norm import LayerNorm, LayerNorm2d

    return isinstance(module, (*_NORM_TYPES, _NormBase, GroupNorm, LayerNorm, LayerNorm2d))


def _named_params(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Parameter]]:
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                yield module, name, p


def param_groups(model: nn.Module, weight_decay: float, **group_options: Any) -> list[dict[str, Any]]:
    """Split a model's parameters into a weight-decay group and a no-decay group.

    Decay goes on convolution and linear weights, on Proxy Norm's ``proxy_bias`` and
    ``proxy_weight`` (which it pulls back toward the N(0, 1) proxy), and on any other parameter
    with two or more dims. No decay on norm parameters (BN/GN/LN/IN/RMSNorm weight and bias), on Proxy
    Norm's ``weight`` and ``bias``, or on biases: the rule of the Proxy Norm authors' code
    (Labatie et al. 2021). Frozen parameters (``requires_grad=False``) are left out.

    Args:
        model: the model.
        weight_decay: the decay for the first group.
        **group_options: extra keys copied into both groups (e.g. ``lr``).

    Returns:
        ``[{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]``
        (empty groups are dropped), ready for any ``torch.optim`` optimizer.

    Example:
        >>> import torch, normkit
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), normkit.create_norm_layer("ln+pn", 8))
        >>> groups = normkit.param_groups(model, 5e-4)
        >>> # the groups: conv.weight, proxy_bias, proxy_weight | conv.bias, weight, bias
        >>> [len(g["params"]) for g in groups]
        [3, 3]
        >>> opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    """
    from .proxy_norm import ProxyNormAct

    if isinstance(model, torch.jit.ScriptModule) or not isinstance(model, nn.Module):
        got = "a scripted module" if isinstance(model, nn.Module) else type(model).__name__
        raise TypeError(f"param_groups: expected an eager nn.Module, got {got}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)):
        raise TypeError(
            f"param_groups: weight_decay must be a float >= 0, got {type(weight_decay).__name__} "
            f"{weight_decay!r}"
        )
    if not math.isfinite(weight_decay) or weight_decay < 0:
        raise NormError(f"param_groups: weight_decay must be a finite float >= 0, got {weight_decay!r}")
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for module, name, p in _named_params(model):
        if not p.requires_grad:
            continue
        if isinstance(module, ProxyNormAct):
            (decay if name in ("proxy_bias", "proxy_weight") else no_decay).append(p)
        elif _is_norm(module) or name == "bias" or p.dim() < 2:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": float(weight_decay), **group_options},
        {"params": no_decay, "weight_decay": 0.0, **group_options},
    ]
    return [g for g in groups if g["params"]]
