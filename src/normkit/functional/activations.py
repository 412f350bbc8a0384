"""Elementwise activations by name, shared by the norm+activation layers and Proxy Norm."""

from __future__ import annotations

import functools
from typing import Callable, Union

import torch
from torch import Tensor
from .._errors import NormError

__all__ = ["ActivationLike", "get_activation", "activation_names"]

ActivationLike = Union[str, Callable[[Tensor], Tensor], None]

_ACTS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "silu": torch.nn.functional.silu,
    "swish": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": functools.partial(torch.nn.functional.gelu, approximate="tanh"),
    "leaky_relu": torch.nn.functional.leaky_relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "identity": lambda t: t,
}


def activation_names() -> list[str]:
    """Names :func:`get_activation` accepts.

    Example:
        >>> "relu" in activation_names() and "swish" in activation_names()
        True
    """
    return sorted(_ACTS)


def get_activation(act: ActivationLike) -> Callable[[Tensor], Tensor]:
    """Resolve an activation: a name (``"relu"``, ``"silu"``/``"swish"``, ``"gelu"``, ``"leaky_relu"``,
    ``"leaky_relu:0.2"``, ``"sigmoid"``, ``"tanh"``, ``"identity"``), ``None`` (identity), an
    ``nn.Module`` or any elementwise callable.

    Example:
        >>> get_activation("leaky_relu:0.2")(torch.tensor([-1.0, 1.0]))
        tensor([-0.2000,  1.0000])
    """
    if act is None:
        return _ACTS["identity"]
    if callable(act):
        return act
    if isinstance(act, str):
        name, _, arg = act.lower().partition(":")
        if name == "leaky_relu" and arg:
            return functools.partial(torch.nn.functional.leaky_relu, negative_slope=float(arg))
        if name in _ACTS and not arg:
            return _ACTS[name]
    raise NormError(f"unknown activation {act!r}; expected a callable or one of {', '.join(activation_names())}")
