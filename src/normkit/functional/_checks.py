"""Input validation shared by every functional op: typed errors that say what was expected and what came."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from .._errors import NormError

_HALF = (torch.float16, torch.bfloat16)


def _layout_message(x: Tensor, op: str) -> str:
    what = "a NestedTensor" if x.is_nested else f"a {x.layout} tensor"
    fix = "x.to_padded_tensor(0.0) with a mask" if x.is_nested else "x.to_dense()"
    return f"{op}: expected a dense (torch.strided) input, got {what}; convert it with {fix}"


def check_input(x: object, op: str, *, min_dim: int = 2, ndim: int | None = None) -> Tensor:
    """Raise ``TypeError`` for a non-tensor or non-floating input, ``ValueError`` for a wrong rank."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: expected a torch.Tensor input, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(_layout_message(x, op))
    if not x.is_floating_point():
        if x.is_quantized:  # (torch.ao's quantization swaps layers by exact type: this one was left float)
            raise TypeError(
                f"{op}: expected a floating-point input, got a quantized {x.dtype} tensor: "
                "torch.ao.quantization left this normkit layer in float (it swaps and fuses torch.nn's own "
                "classes only); normkit.surgery.to_torch_nn(model) before quantizing gives it torch.nn's "
                "layers, or "
                "dequantize the input (x.dequantize())"
            )
        raise TypeError(
            f"{op}: expected a floating-point input (float16, bfloat16, float32 or float64), got {x.dtype}; "
            "convert it with x.float()"
        )
    if ndim is not None and x.dim() != ndim:
        raise NormError(f"{op}: expected a {ndim}D input, got a {x.dim()}D input of shape {tuple(x.shape)}")
    if x.dim() < min_dim:
        raise NormError(
            f"{op}: expected an input with at least {min_dim} dims (N, C, ...), got shape {tuple(x.shape)}"
        )
    return x


def check_param(p: Tensor | None, x: Tensor, shape: Sequence[int], op: str, name: str) -> None:
    """Check a weight/bias/running buffer: right shape, compatible dtype, same device."""
    if p is None:
        return
    if not isinstance(p, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor or None, got {type(p).__name__}")
    if tuple(p.shape) != tuple(shape):
        raise NormError(
            f"{op}: {name} has shape {tuple(p.shape)} but the input (shape {tuple(x.shape)}) needs "
            f"{tuple(shape)}; check num_features / num_channels against the input's channel dim"
        )
    if p.dtype != x.dtype and not (x.dtype in _HALF and p.dtype == torch.float32):
        raise TypeError(
            f"{op}: {name} has dtype {p.dtype} but the input is {x.dtype}; parameters and buffers must match "
            "the input dtype (or be float32 for float16/bfloat16 inputs): convert one with .to(dtype)"
        )
    if p.device != x.device:
        raise NormError(f"{op}: {name} is on {p.device} but the input is on {x.device}; move them together")


def _describe(value: object) -> str:
    """``value`` for an error message: its repr, and its type where the repr does not show it."""
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 80 else f"a {type(value).__name__}"


def as_int(value: object, op: str, name: str) -> int:
    """``value`` as a Python int if it is an integer that ``operator.index`` accepts (an int, a numpy
    integer, an integer tensor of one element), as torch.nn takes sizes; a ``bool``, a float or
    anything else is a ``TypeError`` naming what was expected and what came."""
    if type(value) is int:
        return value
    if not isinstance(value, bool) and not (isinstance(value, Tensor) and value.dtype == torch.bool):
        try:
            return operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            pass
    raise TypeError(
        f"{op}: {name} must be an int (a Python int, a numpy integer or an integer tensor of one "
        f"element), got {_describe(value)} of type {type(value).__name__}"
    )


def as_real(value: object, op: str, name: str) -> float:
    """``value`` as a Python float if it is a real number (an int or float, a numpy scalar, a 0-d real
    tensor), as torch.nn's layers take ``eps`` and ``momentum``; a ``bool`` or anything else is a
    ``TypeError``."""
    if isinstance(value, Tensor):
        ok = value.dim() == 0 and value.dtype != torch.bool and not value.is_complex()
    else:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok:
        raise TypeError(
            f"{op}: {name} must be a real number (a Python or numpy int/float, or a 0-d tensor), got "
            f"{_describe(value)} of type {type(value).__name__}"
        )
    return float(value)  # type: ignore[arg-type]


def check_eps(eps: float, op: str, name: str = "eps") -> float:
    """``eps`` as a float, or a ``TypeError`` / :class:`NormError` naming the argument (``name``: e.g.
    ``"proxy_eps"``) and what came.

    Example:
        >>> check_eps(1e-5, "group_norm")
        1e-05
        >>> check_eps(-1.0, "group_norm_proxy_act", "proxy_eps")
        Traceback (most recent call last):
        ...
        normkit._errors.NormError: group_norm_proxy_act: proxy_eps must be a finite number >= 0, got -1.0
    """
    # (comparisons, not math.isfinite: under torch.compile(dynamic=True) eps may be a SymFloat)
    if type(eps) is not float and type(eps) is not int:
        eps = as_real(eps, op, name)
    if not 0 <= eps < math.inf:
        raise NormError(f"{op}: {name} must be a finite number >= 0, got {eps!r}")
    return float(eps)


def check_momentum(momentum: float | None, op: str) -> float | None:
    if momentum is None:
        return None
    if type(momentum) is not float and type(momentum) is not int:
        momentum = as_real(momentum, op, "momentum")
    if not 0.0 <= momentum <= 1.0:
        raise NormError(
            f"{op}: momentum must be a number in [0, 1] (PyTorch convention: the weight of the new batch) "
            f"or None for a cumulative average, got {momentum!r}; a Keras momentum k converts to 1 - k"
        )
    return float(momentum)


def check_keras_momentum(momentum: object, op: str) -> float:
    """A Keras momentum (the weight of the *old* value, 0.99 by default) as a float in [0, 1]; a
    numpy scalar or a 0-d tensor is taken, anything else is a ``TypeError``.

    Example:
        >>> check_keras_momentum(0.99, "BatchNormalization")
        0.99
    """
    value = as_real(momentum, op, "momentum")
    if not 0.0 <= value <= 1.0:
        raise NormError(
            f"{op}: momentum must be a number in [0, 1] (Keras convention: the weight of the old "
            f"value, 0.99 by default), got {momentum!r}"
        )
    return value


def check_positive_int(value: object, op: str, name: str) -> int:
    """``value`` as a Python int > 0 (:func:`as_int`: numpy integers and integer tensors of one element
    are taken, as torch.nn takes them); a non-integer is a ``TypeError``, ``<= 0`` a ``NormError``."""
    n = as_int(value, op, name)
    if n <= 0:
        raise NormError(f"{op}: {name} must be a positive int, got {n!r}")
    return n


def check_groups(num_groups: object, num_channels: int, op: str) -> int:
    """C must be divisible by G, with 0 < G <= C; the error suggests the nearest valid G."""
    g = check_positive_int(num_groups, op, "num_groups")
    if g > num_channels or num_channels % g:
        divisors = [d for d in range(1, num_channels + 1) if num_channels % d == 0]
        lower = max((d for d in divisors if d <= g), default=1)
        upper = min((d for d in divisors if d >= g), default=num_channels)
        hint = f"num_groups={lower}" if lower == upper else f"num_groups={lower} or {upper}"
        raise NormError(
            f"{op}: num_channels ({num_channels}) must be divisible by num_groups ({g}); try {hint}"
        )
    return g


def check_dims(dims: object, x: Tensor, op: str) -> tuple[int, ...]:
    """``dims`` as distinct non-negative ints within ``x``'s rank; typed errors that name what came.

    (An empty tuple would make ``sum(dim=())`` reduce over *every* dim, and ``d % x.dim()`` would
    quietly wrap an out-of-range dim onto another one: both are errors here.)
    """
    if isinstance(dims, (int, Tensor)) and not isinstance(dims, bool):
        dims = (dims,)
    if not isinstance(dims, (tuple, list)):
        raise TypeError(f"{op}: dims must be a tuple of ints, got {type(dims).__name__} {dims!r}")
    nd = x.dim()
    out: list[int] = []
    for d in dims:
        i = as_int(d, op, "dims")
        if not -nd <= i < nd:
            raise NormError(
                f"{op}: dim {i} is out of range for an input with {nd} dims (shape {tuple(x.shape)}); "
                f"expected dims in [{-nd}, {nd - 1}]"
            )
        out.append(i % nd)
    if not out:
        raise NormError(f"{op}: dims is empty; give the dims each set's statistics pool over, e.g. (1,)")
    if len(set(out)) != len(out):
        raise NormError(f"{op}: dims {tuple(dims)} name the same dim twice (input shape {tuple(x.shape)})")
    return tuple(out)
