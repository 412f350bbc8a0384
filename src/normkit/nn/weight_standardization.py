"""Weight Standardization (Qiao et al., 2019) and its scaled NF-Net form (Brock et al., 2021).

Standardizing a conv weight is the generic norm core applied to the weight: each output channel's
fan-in (``in_channels / groups * prod(kernel)`` values) gets mean 0 and variance 1, so the same
``norm`` (with its analytic backward) serves every conv rank, grouped convs and ConvTranspose.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._errors import NormError
from ..functional._autograd import norm
from ..functional._checks import check_eps
from ._base import fx_leaf, not_scriptable
from ._parametrize import make_picklable

__all__ = [
    "ScaledStdConv1d",
    "ScaledStdConv2d",
    "ScaledStdConv3d",
    "StdConv1d",
    "StdConv2d",
    "StdConv3d",
    "WeightStandardization",
    "standardize_weight",
    "weight_standardization",
]


def standardize_weight(
    weight: Tensor,
    eps: float = 1e-6,
    *,
    groups: int = 1,
    transposed: bool = False,
    gain: Tensor | None = None,
) -> Tensor:
    r"""``(w - mean) / sqrt(var + eps) * gain`` over each output unit's fan-in (biased variance).

    For a conv / linear weight ``(out, in / groups, *k)`` the sets are the rows; for a
    ConvTranspose weight ``(in, out / groups, *k)`` output channel ``(j, o)`` of group ``j`` owns
    ``weight[j * in/groups:(j+1) * in/groups, o]``, so the weight is viewed as
    ``(groups, in / groups, out / groups, prod(k))`` and reduced over dims (1, 3). ``gain`` is an
    optional per-output multiplier of shape ``(out,)``.

    Example:
        >>> w = torch.randn(8, 3, 3, 3) * 5 + 2
        >>> ws = standardize_weight(w, eps=0.0)
        >>> torch.allclose(ws.mean((1, 2, 3)), torch.zeros(8), atol=1e-5)
        True
        >>> torch.allclose(ws.square().mean((1, 2, 3)), torch.ones(8), atol=1e-4)
        True
    """
    if not transposed:
        out = weight.shape[0]
        wv = weight.reshape(out, -1)  # (out, fan_in)
        g = None if gain is None else gain.reshape(out, 1)
        return norm(wv, (1,), g, None, eps)[0].reshape(weight.shape)
    cin, out_g = weight.shape[0], weight.shape[1]
    wv = weight.reshape(groups, cin // groups, out_g, -1)  # (G, in/G, out/G, prod(k))
    g = None if gain is None else gain.reshape(groups, 1, out_g, 1)
    return norm(wv, (1, 3), g, None, eps)[0].reshape(weight.shape)


class WeightStandardization(nn.Module):
    """The parametrization ``w -> standardize_weight(w, eps, groups=..., transposed=...)`` (not invertible:
    the stored weight is the raw one, and :func:`torch.nn.utils.parametrize.remove_parametrizations`
    with ``leave_parametrized=True`` bakes the standardized weight in)."""

    def __init__(self, eps: float = 1e-6, groups: int = 1, transposed: bool = False) -> None:
        super().__init__()
        self.eps, self.groups, self.transposed = check_eps(eps, "WeightStandardization"), groups, transposed

    def forward(self, weight: Tensor) -> Tensor:
        return standardize_weight(weight, self.eps, groups=self.groups, transposed=self.transposed)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, groups={self.groups}, transposed={self.transposed}"


def weight_standardization(module: nn.Module, name: str = "weight", eps: float = 1e-6) -> nn.Module:
    r"""Standardize ``module.<name>`` per output unit at every use (a parametrization); returns the module.

    .. math::
        \hat w_{o} = \frac{w_{o} - \mathrm{E}[w_{o}]}{\sqrt{\mathrm{Var}[w_{o}] + \epsilon}}

    Works with any ``Conv1d/2d/3d`` (grouped and depthwise included), ``ConvTranspose*d`` and
    ``Linear``. The state_dict keeps the raw weight (``parametrizations.weight.original``);
    the module survives deepcopy and pickle. Pairs with GroupNorm for batch-independent training
    (the WS paper), and is what :class:`StdConv2d` does internally.

    Args:
        module: a conv or linear module.
        name: the weight parameter.
        eps: added to the variance inside the square root.

    Example:
        >>> import torch, normkit
        >>> conv = normkit.nn.weight_standardization(torch.nn.Conv2d(8, 16, 3, groups=4))
        >>> w = conv.weight
        >>> torch.allclose(w.mean((1, 2, 3)), torch.zeros(16), atol=1e-5)
        True

    Reference: https://arxiv.org/abs/1903.10520
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"weight_standardization: expected an nn.Module, got {type(module).__name__}")
    if parametrize.is_parametrized(module, name) and any(
        isinstance(p, WeightStandardization)
        for p in module.parametrizations[name]  # type: ignore[index, union-attr]
    ):
        raise NormError(
            f"weight_standardization: {type(module).__bases__[0].__name__}.{name} is already standardized"
        )
    w = getattr(module, name, None)
    if not isinstance(w, Tensor) or w.dim() < 2:
        raise NormError(
            f"weight_standardization: {type(module).__name__}.{name} must be a weight of rank >= 2 "
            f"(out, fan_in, ...), got {type(w).__name__ if not isinstance(w, Tensor) else tuple(w.shape)}"
        )
    transposed = bool(getattr(module, "transposed", False))
    groups = int(getattr(module, "groups", 1))
    parametrize.register_parametrization(module, name, WeightStandardization(eps, groups, transposed))
    return make_picklable(module)


class _StdConvMixin:
    """``conv(x, standardize(weight))``; same constructor and state_dict as the torch conv it extends."""

    __prepare_scriptable__ = not_scriptable  # (torch.jit.script: a clear error)

    eps: float
    weight: Tensor
    bias: Tensor | None
    groups: int

    def standardized_weight(self) -> Tensor:
        """The kernel the conv actually uses."""
        return standardize_weight(self.weight, self.eps)

    def forward(self, input: Tensor) -> Tensor:
        x = input  # (torch.nn's argument name, so that layer(input=t) works as there)
        # (torch.fx: one call_module node, as torch.nn's Conv)
        leaf = fx_leaf(self, x)  # type: ignore[arg-type]  # (a mixin of Modules)
        if leaf is not None:
            return leaf
        return self._conv_forward(x, self.standardized_weight(), self.bias)  # type: ignore[attr-defined]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"  # type: ignore[misc]


class _ScaledStdConvMixin(_StdConvMixin):
    gain: nn.Parameter
    gamma: float

    def _init_gain(self, gamma: float, gain_init: float, eps: float) -> None:
        self.eps = check_eps(eps, type(self).__name__)
        self.gamma = float(gamma)
        self.gain_init = float(gain_init)
        # (out, 1, ..., 1), the weight's rank: timm's ScaledStdConv2d stores it so, and loads here as is
        shape = (self.weight.shape[0],) + (1,) * (self.weight.dim() - 1)
        self.gain = nn.Parameter(
            torch.full(shape, float(gain_init), device=self.weight.device, dtype=self.weight.dtype)
        )
        self.fan_in = self.weight[0].numel()

    def reset_parameters(self) -> None:
        """The conv's own initialisation (kernel, bias), and ``gain`` back to ``gain_init`` (after
        ``to_empty`` from the meta device it held whatever the memory held)."""
        super().reset_parameters()  # type: ignore[misc]  # (the torch conv's, next in the MRO)
        gain = getattr(self, "gain", None)  # (the conv's __init__ calls this before the gain exists)
        if gain is not None:
            with torch.no_grad():
                gain.fill_(self.gain_init)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # earlier normkit checkpoints stored the gain flat, (out,): reshaped to (out, 1, ..., 1)
        gain = state_dict.get(prefix + "gain")
        if isinstance(gain, Tensor) and gain.dim() == 1 and gain.shape[0] == self.gain.shape[0]:
            state_dict[prefix + "gain"] = gain.reshape(self.gain.shape)
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[misc]

    def standardized_weight(self) -> Tensor:
        scale = self.gamma / math.sqrt(self.fan_in)
        return standardize_weight(self.weight, self.eps, gain=self.gain * scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}"


_STD_DOC = r"""``Conv{d}d`` with Weight Standardization: the kernel standardized per output channel per call.

    .. math::
        \hat W_o = \frac{{W_o - \mathrm{{E}}[W_o]}}{{\sqrt{{\mathrm{{Var}}[W_o] + \epsilon}}}}

    over each output channel's fan-in (``in_channels / groups * prod(kernel_size)`` values, biased
    variance; timm's form). Takes ``torch.nn.Conv{d}d``'s arguments plus keyword ``eps``
    (default 1e-6), has its state_dict keys, and so loads its checkpoints. Grouped and depthwise
    convs work unchanged.

    Example:
        >>> import torch, normkit
        >>> conv = normkit.nn.StdConv{d}d(4, 6, 3, groups=2)
        >>> _ = conv.load_state_dict(torch.nn.Conv{d}d(4, 6, 3, groups=2).state_dict())  # same keys
        >>> w = conv.standardized_weight().flatten(1)
        >>> torch.allclose(w.mean(1), torch.zeros(6), atol=1e-5)
        True
        >>> conv(torch.randn({example})).shape[1]
        6

    Reference: https://arxiv.org/abs/1903.10520
    """

_SCALED_DOC = r"""``Conv{d}d`` with the scaled Weight Standardization of NF-Nets and a learnable gain.

    .. math::
        \hat W_o = \mathrm{{gain}}_o \frac{{\gamma}}{{\sqrt{{\mathrm{{fan\_in}}}}}}
                   \frac{{W_o - \mathrm{{E}}[W_o]}}{{\sqrt{{\mathrm{{Var}}[W_o] + \epsilon}}}}

    ``gamma`` is the activation's fixed gain (e.g. 1.7139 for ReLU in the paper), ``gain`` a
    per-output-channel Parameter (init ``gain_init``); the ``1/sqrt(fan_in)`` makes the layer
    variance-preserving at init (timm's ``ScaledStdConv2d`` form). Takes ``torch.nn.Conv{d}d``'s
    arguments plus keywords ``gamma``, ``gain_init``, ``eps``.

    Example:
        >>> import torch, normkit
        >>> conv = normkit.nn.ScaledStdConv{d}d(4, 6, 3, bias=False)
        >>> w = conv.standardized_weight()
        >>> torch.allclose(w.square().flatten(1).sum(1), torch.ones(6), atol=1e-3)  # unit rows, up to eps
        True

    Reference: https://arxiv.org/abs/2102.06171
    """


def _std_init(self: Any, base: type, args: Any, eps: float, kwargs: Any) -> None:
    base.__init__(self, *args, **kwargs)
    self.eps = check_eps(eps, type(self).__name__)


class StdConv1d(_StdConvMixin, nn.Conv1d):
    __doc__ = _STD_DOC.format(d=1, example="2, 4, 9")

    def __init__(self, *args: Any, eps: float = 1e-6, **kwargs: Any) -> None:
        _std_init(self, nn.Conv1d, args, eps, kwargs)


class StdConv2d(_StdConvMixin, nn.Conv2d):
    __doc__ = _STD_DOC.format(d=2, example="2, 4, 9, 9")

    def __init__(self, *args: Any, eps: float = 1e-6, **kwargs: Any) -> None:
        _std_init(self, nn.Conv2d, args, eps, kwargs)


class StdConv3d(_StdConvMixin, nn.Conv3d):
    __doc__ = _STD_DOC.format(d=3, example="2, 4, 5, 5, 5")

    def __init__(self, *args: Any, eps: float = 1e-6, **kwargs: Any) -> None:
        _std_init(self, nn.Conv3d, args, eps, kwargs)


class ScaledStdConv1d(_ScaledStdConvMixin, nn.Conv1d):
    __doc__ = _SCALED_DOC.format(d=1)

    def __init__(
        self, *args: Any, gamma: float = 1.0, gain_init: float = 1.0, eps: float = 1e-6, **kwargs: Any
    ) -> None:
        nn.Conv1d.__init__(self, *args, **kwargs)
        self._init_gain(gamma, gain_init, eps)


class ScaledStdConv2d(_ScaledStdConvMixin, nn.Conv2d):
    __doc__ = _SCALED_DOC.format(d=2)

    def __init__(
        self, *args: Any, gamma: float = 1.0, gain_init: float = 1.0, eps: float = 1e-6, **kwargs: Any
    ) -> None:
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._init_gain(gamma, gain_init, eps)


class ScaledStdConv3d(_ScaledStdConvMixin, nn.Conv3d):
    __doc__ = _SCALED_DOC.format(d=3)

    def __init__(
        self, *args: Any, gamma: float = 1.0, gain_init: float = 1.0, eps: float = 1e-6, **kwargs: Any
    ) -> None:
        nn.Conv3d.__init__(self, *args, **kwargs)
        self._init_gain(gamma, gain_init, eps)
