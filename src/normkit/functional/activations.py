"""Elementwise activations by name, shared by the norm+activation layers and Proxy Norm."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from .._errors import NormError

__all__ = ["ActivationLike", "activation_names", "activation_spec", "get_activation"]

ActivationLike = str | Callable[[Tensor], Tensor] | None


def _identity(t: Tensor) -> Tensor:
    """The identity activation (a module-level function, so that what holds it pickles)."""
    return t


_ACTS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "silu": torch.nn.functional.silu,
    "swish": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": functools.partial(torch.nn.functional.gelu, approximate="tanh"),
    "leaky_relu": torch.nn.functional.leaky_relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "identity": _identity,
}


def _silu_(t: Tensor) -> Tensor:
    return torch.nn.functional.silu(t, inplace=True)


#: in-place twins of the named activations' functions (gelu has none)
_INPLACE: dict[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]] = {
    torch.relu: torch.relu_,
    torch.nn.functional.relu: torch.relu_,
    torch.nn.functional.silu: _silu_,
    torch.sigmoid: torch.sigmoid_,
    torch.tanh: torch.tanh_,
    _identity: _identity,
}


def inplace_activation(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor] | None:
    """The in-place form of an activation function :func:`get_activation` returns, or ``None`` (a Module, a
    user's callable, gelu): what a norm + activation layer applies to its own fresh output where autograd
    records nothing (inference), so that the layer holds one output, not two.

    Example:
        >>> t = torch.tensor([-1.0, 2.0])
        >>> inplace_activation(get_activation("leaky_relu:0.5"))(t) is t, t
        (True, tensor([-0.5000,  2.0000]))
    """
    if isinstance(fn, functools.partial):
        if (
            fn.func is torch.nn.functional.leaky_relu
            and not fn.args
            and set(fn.keywords) == {"negative_slope"}
        ):
            return functools.partial(
                torch.nn.functional.leaky_relu_, negative_slope=fn.keywords["negative_slope"]
            )
        return None
    if fn is torch.nn.functional.leaky_relu:
        return torch.nn.functional.leaky_relu_
    try:
        return _INPLACE.get(fn)
    except TypeError:  # (an unhashable callable)
        return None


def _slope(act: str, arg: str) -> float:
    """The negative slope of ``"leaky_relu:<slope>"``, or a NormError naming the spec."""
    try:
        slope = float(arg)
    except ValueError:
        slope = math.nan
    if not math.isfinite(slope):
        raise NormError(
            f"unknown activation {act!r}: expected 'leaky_relu:<negative slope>' with a finite number, "
            f"e.g. 'leaky_relu:0.2', got slope {arg!r}"
        )
    return slope


def activation_names() -> list[str]:
    """Names :func:`get_activation` accepts.

    Example:
        >>> "relu" in activation_names() and "swish" in activation_names()
        True
    """
    return sorted(_ACTS)


def check_elementwise(act: ActivationLike, op: str) -> None:
    """Raise a :class:`NormError` for an activation that is not elementwise in a way Proxy Norm can use:
    its proxy statistics apply the activation to a ``(C, num_points)`` tensor, where a per-channel
    module (``nn.PReLU(C)``) would broadcast its ``C`` parameters along the points.

    Example:
        >>> check_elementwise(torch.nn.PReLU(4), "ProxyNormAct")
        Traceback (most recent call last):
        ...
        normkit._errors.NormError: ProxyNormAct: the activation must be elementwise ...
    """
    n = act.num_parameters if isinstance(act, torch.nn.PReLU) else 1
    if n != 1:
        raise NormError(
            f"{op}: the activation must be elementwise (Proxy Norm applies it to a (C, num_points) proxy "
            f"tensor as well as to the input), got a per-channel PReLU({n}); use nn.PReLU() (one slope), "
            "or a norm + act layer (e.g. GroupNormAct2d) for a per-channel activation"
        )


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
            return functools.partial(torch.nn.functional.leaky_relu, negative_slope=_slope(act, arg))
        if name in _ACTS and not arg:
            return _ACTS[name]
    raise NormError(
        f"unknown activation {act!r}; expected a callable or one of {', '.join(activation_names())}"
    )


def activation_spec(act: ActivationLike) -> tuple[str, float] | None:
    """``(name, negative_slope)`` for activations the registered Proxy Norm op knows, else ``None``.

    Names, torch functions (``torch.relu``, ``F.silu`` ...) and torch.nn activation modules
    (``nn.ReLU()``, ``nn.LeakyReLU(0.2)``, ``nn.GELU("tanh")`` ...) map to the op; any other
    callable runs as a plain composite that autograd differentiates.

    Example:
        >>> activation_spec("leaky_relu:0.2"), activation_spec(torch.nn.SiLU()), activation_spec(abs)
        (('leaky_relu', 0.2), ('silu', 0.01), None)
    """
    F = torch.nn.functional
    if act is None:
        return ("identity", 0.01)
    if isinstance(act, str):
        name, _, arg = act.lower().partition(":")
        if name == "leaky_relu":
            return ("leaky_relu", _slope(act, arg) if arg else 0.01)
        name = "silu" if name == "swish" else name
        if name in ("relu", "silu", "gelu", "gelu_tanh", "sigmoid", "tanh", "identity") and not arg:
            return (name, 0.01)
        return None
    functions = {
        torch.relu: "relu",
        F.relu: "relu",
        F.silu: "silu",
        F.gelu: "gelu",
        torch.sigmoid: "sigmoid",
        torch.tanh: "tanh",
        F.leaky_relu: "leaky_relu",
    }
    for fn, name in functions.items():  # (by identity: a user's callable need not be hashable)
        if act is fn:
            return (name, 0.01)
    nn = torch.nn
    # (exact types: a subclass may have its own forward, which runs as a composite)
    if type(act) is nn.LeakyReLU:
        return ("leaky_relu", float(act.negative_slope))
    if type(act) is nn.GELU:
        return ("gelu_tanh" if act.approximate == "tanh" else "gelu", 0.01)
    modules = {
        nn.ReLU: "relu",
        nn.SiLU: "silu",
        nn.Sigmoid: "sigmoid",
        nn.Tanh: "tanh",
        nn.Identity: "identity",
    }
    for cls, name in modules.items():
        if type(act) is cls:
            return (name, 0.01)
    return None
