"""Optimizer parameter groups that follow the Proxy Norm authors' weight-decay rule."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

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


def _param_uses(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Parameter]]:
    """Every ``(owner, name, parameter)`` use, a shared parameter once per owner.

    A parametrized tensor (``torch.nn.utils.parametrize``: weight_norm, orthogonal, ...) keeps its
    learnable originals in a ``ParametrizationList``; they are reported under the module that uses
    them and the tensor's name (``weight``), so that a norm layer's parametrized weight is still a
    norm weight.
    """
    for module in model.modules():
        if isinstance(module, parametrize.ParametrizationList):
            continue  # (its originals are reported with their owner, below)
        for name, p in module.named_parameters(recurse=False):
            yield module, name, p
        if parametrize.is_parametrized(module):
            plists = cast(nn.ModuleDict, module.parametrizations)
            for tensor_name, plist in plists.items():
                for p in plist.parameters(recurse=False):
                    yield module, tensor_name, p


def param_groups(model: nn.Module, weight_decay: float, **group_options: Any) -> list[dict[str, Any]]:
    """Split a model's parameters into a weight-decay group and a no-decay group.

    Decay goes on convolution and linear weights, on Proxy Norm's ``proxy_bias`` and
    ``proxy_weight`` (which it pulls back toward the N(0, 1) proxy), and on any other parameter
    with two or more dims. No decay on norm parameters (BN/GN/LN/IN/RMSNorm weight and bias), on Proxy
    Norm's ``weight`` and ``bias``, or on biases: the rule of the Proxy Norm authors' code
    (Labatie et al. 2021). Frozen parameters (``requires_grad=False``) are left out. Each parameter
    appears once: a parameter shared by several modules is decayed only if every use of it is, and a
    parametrized tensor (``torch.nn.utils.parametrize``) is judged by the module that uses it.

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
    if "params" in group_options:
        raise TypeError(
            "param_groups: group_options must not contain 'params' (the groups' parameters come from the "
            "model); pass options such as lr=... only"
        )
    # A parameter shared by several modules (tied weights) goes in one group, whatever the module
    # order: decayed only if every use of it is decayed (a norm's parameter is never decayed).
    order: dict[int, nn.Parameter] = {}
    decays: dict[int, bool] = {}
    for module, name, p in _param_uses(model):
        if not p.requires_grad:
            continue
        if isinstance(module, ProxyNormAct):
            use_decay = name in ("proxy_bias", "proxy_weight")
        else:
            use_decay = not (_is_norm(module) or name == "bias" or p.dim() < 2)
        order.setdefault(id(p), p)
        decays[id(p)] = decays.get(id(p), True) and use_decay
    decay = [p for k, p in order.items() if decays[k]]
    no_decay = [p for k, p in order.items() if not decays[k]]
    groups = [
        {"params": decay, "weight_decay": float(weight_decay), **group_options},
        {"params": no_decay, "weight_decay": 0.0, **group_options},
    ]
    return [g for g in groups if g["params"]]
