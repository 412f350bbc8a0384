"""What a norm layer is, whoever wrote it: torch.nn's, normkit's, or timm's / torchvision's (duck-typed).

The model tools (:func:`normkit.convert_norms`, :func:`normkit.fold_bn`, :class:`normkit.NormMonitor`)
need the same few facts about every norm layer of a model: which statistics it normalizes with
(batch, running, per group, per position ...), its channel count, its per-channel affine, its
running statistics, and the activation a norm+activation layer applies after it. :func:`describe_norm`
gives them as a :class:`NormInfo`, or a sentence saying why a norm-like layer is not understood
(a subclass with its own ``forward``, a channels-last ``LayerNorm``, ...).

timm and torchvision are optional and never imported: their layers are recognized by class name,
module and attributes (timm's ``BatchNormAct2d`` is a ``torch.nn.BatchNorm2d`` with ``.act`` and
``.drop``; torchvision's ``FrozenBatchNorm2d`` keeps ``weight``/``bias``/``running_*`` buffers).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..functional.activations import ActivationLike, activation_spec
from . import batch_norm as _nk_bn
from . import batch_norm_family as _fam
from .group_norm import GroupNorm
from .instance_norm import _InstanceNorm
from .layer_norm import LayerNorm, LayerNorm2d
from .norm_act import BatchNormAct2d, _ActMixin
from .proxy_norm import GroupNormProxyAct2d, ProxyNormAct

__all__ = [
    "BN_KINDS",
    "NormInfo",
    "activation_name",
    "describe_norm",
    "elementwise_activation",
    "is_activation_module",
    "pn_activation",
]

#: Kinds whose statistics are (or were, for the running ones) pooled over the batch.
BN_KINDS = ("bn", "frozen_bn")

_TORCH_BN = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3, nn.SyncBatchNorm: None}
_TORCH_IN = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}


@dataclass
class NormInfo:
    """The facts about one norm layer that conversion, folding and diagnostics need.

    Attributes:
        kind: ``"bn"`` (batch statistics in training, running ones in eval when tracked),
            ``"frozen_bn"`` (always the running statistics), ``"gn"`` (per sample and group of
            channels), ``"ln"`` (per sample over (C, *spatial)), ``"ln2d"`` (per sample and position
            over C), ``"in"`` (per sample and channel), ``"pn"`` (GroupNorm + Proxy Norm activation).
        num_channels: C.
        rank: spatial rank the class implies (1, 2, 3), ``None`` when any rank works.
        groups: G for ``"gn"`` and ``"pn"``.
        eps, momentum: as the layer has them (momentum ``None`` for layers without one).
        weight, bias: the per-channel affine (Parameters or, for frozen layers, buffers), or None.
        running_mean, running_var, num_batches_tracked: the running statistics, or None.
        activation: the activation a norm+activation layer applies after the norm (a name, a
            callable or an ``nn.Module``), ``None`` for a plain norm.
        act_module: the module that applies it when the layer holds one (timm's ``.act``), for
            tools that keep the activation and drop the norm.
        extra: the rest a same-kind conversion keeps (Proxy Norm's proxy parameters, Ghost BN's
            ghost batch size, ...).
    """

    kind: str
    num_channels: int
    rank: int | None = None
    groups: int | None = None
    eps: float = 1e-5
    momentum: float | None = None
    weight: Tensor | None = None
    bias: Tensor | None = None
    running_mean: Tensor | None = None
    running_var: Tensor | None = None
    num_batches_tracked: Tensor | None = None
    activation: Any = None
    act_module: nn.Module | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def has_running_stats(self) -> bool:
        """Running mean and variance are present."""
        return self.running_mean is not None and self.running_var is not None

    def describe(self) -> str:
        """A short phrase: ``"bn, 64 ch"``, ``"gn:8, 64 ch + relu"``."""
        kind = f"{self.kind}:{self.groups}" if self.kind in ("gn", "pn") and self.groups else self.kind
        act = f" + {activation_name(self.activation)}" if self.activation is not None else ""
        return f"{kind}, {self.num_channels} ch{act}"


def _own_forward(module: nn.Module, base: type) -> bool:
    """Whether ``type(module)`` replaces ``base.forward`` (so its behaviour is not ``base``'s)."""
    return getattr(type(module), "forward", None) is not getattr(base, "forward", None)


def _from(module: nn.Module, prefixes: tuple[str, ...]) -> bool:
    return type(module).__module__.startswith(prefixes)


def _bn_like(module: Any, kind: str, rank: int | None, **kw: Any) -> NormInfo:
    kw["extra"] = {
        "track_running_stats": bool(getattr(module, "track_running_stats", True)),
        **kw.get("extra", {}),
    }
    return NormInfo(
        kind=kind,
        num_channels=int(module.num_features),
        rank=rank,
        eps=float(module.eps),
        momentum=getattr(module, "momentum", None),
        weight=getattr(module, "weight", None),
        bias=getattr(module, "bias", None),
        running_mean=getattr(module, "running_mean", None),
        running_var=getattr(module, "running_var", None),
        num_batches_tracked=getattr(module, "num_batches_tracked", None),
        **kw,
    )


def _timm_act(module: nn.Module) -> tuple[Any, nn.Module | None] | str:
    """timm norm+act layers: ``(activation, act_module)`` from ``.act`` (Identity: no activation), or why
    not."""
    drop = getattr(module, "drop", None)
    if drop is not None and not isinstance(drop, (nn.Identity, nn.Dropout)):
        return f"its drop layer {type(drop).__name__} sits between the norm and the activation"
    act = getattr(module, "act", None)
    if act is None or isinstance(act, nn.Identity):
        return (None, None)
    if not is_activation_module(act):
        return f"its activation {type(act).__name__} is not an elementwise activation normkit knows"
    return (act, act)


def _rank_of_name(name: str) -> int | None:
    for r in (1, 2, 3):
        if name.endswith(f"{r}d"):
            return r
    return None


def _describe_duck(module: nn.Module) -> NormInfo | str | None:
    """timm / torchvision layers recognized by name and attributes (neither library is imported)."""
    name = type(module).__name__
    if not _from(module, ("timm.", "torchvision.")):
        return None
    if name in ("FrozenBatchNorm2d", "FrozenBatchNormAct2d"):
        w, b, rm, rv = (getattr(module, k, None) for k in ("weight", "bias", "running_mean", "running_var"))
        if not (
            isinstance(w, Tensor)
            and isinstance(b, Tensor)
            and isinstance(rm, Tensor)
            and isinstance(rv, Tensor)
        ):
            return f"{name} without weight/bias/running_mean/running_var tensors"
        c = int(rm.numel())
        act = _timm_act(module) if name.endswith("Act2d") else (None, None)
        if isinstance(act, str):
            return act
        return NormInfo(
            kind="frozen_bn",
            num_channels=c,
            rank=2,
            eps=float(getattr(module, "eps", 1e-5)),
            weight=w,
            bias=b,
            running_mean=rm,
            running_var=rv,
            activation=act[0],
            act_module=act[1],
        )
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and name in ("BatchNormAct2d", "SyncBatchNormAct"):
        act = _timm_act(module)
        if isinstance(act, str):
            return act
        return _bn_like(
            module, "bn", 2 if name == "BatchNormAct2d" else None, activation=act[0], act_module=act[1]
        )
    if isinstance(module, nn.GroupNorm) and name in (
        "GroupNorm",
        "GroupNorm1",
        "GroupNormAct",
        "GroupNorm1Act",
    ):
        act = _timm_act(module) if name.endswith("Act") else (None, None)
        if isinstance(act, str):
            return act
        return _gn_info(module, activation=act[0], act_module=act[1])
    if isinstance(module, nn.LayerNorm) and name in ("LayerNorm2d", "LayerNormAct2d"):
        if len(module.normalized_shape) != 1:
            return f"{name} with normalized_shape {tuple(module.normalized_shape)} (expected one channel dim)"
        act = _timm_act(module) if name.endswith("Act2d") else (None, None)
        if isinstance(act, str):
            return act
        return NormInfo(
            kind="ln2d",
            num_channels=int(module.normalized_shape[0]),
            eps=float(module.eps),
            weight=module.weight,
            bias=module.bias,
            activation=act[0],
            act_module=act[1],
        )
    if isinstance(module, nn.LayerNorm) and name in ("LayerNorm", "LayerNormAct"):
        return _channels_last(module)
    return None


def _gn_info(module: nn.GroupNorm, **kw: Any) -> NormInfo:
    return NormInfo(
        kind="gn",
        num_channels=int(module.num_channels),
        groups=int(module.num_groups),
        eps=float(module.eps),
        weight=module.weight,
        bias=module.bias,
        **kw,
    )


def _channels_last(module: nn.Module) -> str:
    return (
        f"{type(module).__name__} normalizes the trailing dims "
        f"{tuple(getattr(module, 'normalized_shape', ()))} "
        "(a channels-last layer); the registry's norms are channels-first (N, C, *spatial) layers"
    )


def describe_norm(module: nn.Module) -> NormInfo | str | None:
    """A :class:`NormInfo` for a norm layer, a reason string for a norm-like layer that is not understood,
    else None.

    Example:
        >>> import torch, normkit
        >>> describe_norm(torch.nn.BatchNorm2d(8)).describe()
        'bn, 8 ch'
        >>> describe_norm(normkit.nn.GroupNormAct2d(8, 2, activation="silu")).describe()
        'gn:2, 8 ch + silu'
        >>> describe_norm(torch.nn.Conv2d(3, 8, 3)) is None
        True
        >>> describe_norm(torch.nn.LayerNorm(8))[:40]
        'LayerNorm normalizes the trailing dims ('
    """
    duck = _describe_duck(module)
    if duck is not None:
        return duck
    cls = type(module)
    own = _normkit_base(cls)
    if own is not None and own is not cls and _own_forward(module, own):  # (a user's subclass)
        return _unknown_subclass(module, own)
    # normkit's own classes first (several subclass torch.nn's with their own forward).
    if isinstance(module, _fam._FrozenBatchNorm):
        if not module.use_running_stats:
            return f"{cls.__name__} with use_running_stats=False normalizes with batch statistics"
        return _bn_like(module, "frozen_bn", _rank_of_name(cls.__name__), extra=_frozen_extra(module))
    if isinstance(module, _nk_bn._BatchNorm):
        # Every BN+activation class (BatchNormAct2d, SyncBatchNormAct, their frozen forms from
        # freeze_bn) applies its activation after the norm: report it, or tools that replace the norm
        # (fold_bn) would drop it.
        act = _normkit_act(module)
        rank = 2 if isinstance(module, BatchNormAct2d) else _rank_of_name(cls.__name__)
        return _bn_like(module, "bn", rank, activation=act[0], act_module=act[1], extra=_bn_extra(module))
    if isinstance(module, GroupNormProxyAct2d):
        return NormInfo(
            kind="pn",
            num_channels=module.num_features,
            groups=module.num_groups,
            eps=module.eps,
            weight=module.weight,
            bias=module.bias,
            activation=module.activation,
            extra={
                "proxy_bias": module.proxy_bias,
                "proxy_weight": module.proxy_weight,
                "proxy_eps": module.proxy_eps,
                "num_points": module.num_points,
            },
        )
    if isinstance(module, ProxyNormAct):
        return f"{cls.__name__} is an activation that needs a norm before it (it normalizes nothing itself)"
    if isinstance(module, GroupNorm):
        act = _normkit_act(module)
        return _gn_info(module, activation=act[0], act_module=act[1])
    if isinstance(module, LayerNorm2d):
        act = _normkit_act(module)
        return NormInfo(
            kind="ln" if module.over == "chw" else "ln2d",
            num_channels=module.num_channels,
            eps=module.eps,
            weight=module.weight,
            bias=module.bias,
            activation=act[0],
            act_module=act[1],
        )
    if isinstance(module, LayerNorm):
        return _channels_last(module)
    if isinstance(module, _InstanceNorm):
        act = _normkit_act(module)  # (InstanceNormAct{1,2,3}d)
        return _bn_like(module, "in", _rank_of_name(cls.__name__), activation=act[0], act_module=act[1])
    if isinstance(module, _fam.MeanOnlyBatchNorm):
        return "MeanOnlyBatchNorm subtracts a mean and scales nothing; no other norm keeps its meaning"
    if isinstance(module, _fam.BatchNormalization):
        return (
            "BatchNormalization keeps Keras's conventions (channel axis, momentum, biased variance); "
            "convert it with normkit.convert.from_keras_bn first"
        )
    # torch.nn's classes, exact or subclasses that keep torch's forward.
    if isinstance(module, nn.modules.batchnorm._LazyNormBase) and module.has_uninitialized_params():  # type: ignore[operator]
        return f"{cls.__name__} is a lazy layer not yet initialized (run one batch through the model first)"
    for table, kind in ((_TORCH_BN, "bn"), (_TORCH_IN, "in")):
        for base, rank in table.items():
            if isinstance(module, base):
                if _own_forward(module, base):
                    return _unknown_subclass(module, base)
                return _bn_like(module, kind, rank)
    if isinstance(module, nn.GroupNorm):
        return (
            _unknown_subclass(module, nn.GroupNorm)
            if _own_forward(module, nn.GroupNorm)
            else _gn_info(module)
        )
    if isinstance(module, nn.LayerNorm) or type(module).__name__ == "RMSNorm":
        return _channels_last(module)
    return None


def _normkit_act(module: nn.Module) -> tuple[Any, nn.Module | None]:
    """``(activation, act_module)`` of a normkit norm+activation layer (any class with ``_ActMixin``),
    ``(None, None)`` for a plain norm."""
    if not isinstance(module, _ActMixin):
        return (None, None)
    act = module.activation
    return (act, module._modules.get("act") if act is not None else None)


def _unknown_subclass(module: nn.Module, base: type) -> str:
    where = "normkit.nn" if base.__module__.startswith("normkit.") else "torch.nn"
    return (
        f"{type(module).__name__} subclasses {where}.{base.__name__} with its own forward, so what it "
        "computes is unknown; exclude it with where= or convert it by hand"
    )


def _normkit_base(cls: type) -> type | None:
    """The first of normkit's own classes in ``cls``'s MRO (``cls`` itself when it is one), else None."""
    for base in cls.__mro__:
        if base.__module__.startswith("normkit."):
            return base
    return None


def _bn_extra(module: nn.Module) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "unbiased_running_var": getattr(module, "unbiased_running_var", True),
        "track_running_stats": getattr(module, "track_running_stats", True),
    }
    if isinstance(module, _fam._GhostBatchNorm):
        extra.update(ghost_batch_size=module.ghost_batch_size, momentum_mode=module.momentum_mode)
    if isinstance(module, _fam._BatchRenorm):
        extra.update(r_max=module.r_max, d_max=module.d_max, warmup_steps=module.warmup_steps)
    return extra


def _frozen_extra(module: _fam._FrozenBatchNorm) -> dict[str, Any]:
    return {"unbiased_running_var": module.unbiased_running_var}


# --- activations ---------------------------------------------------------------------------------

_F = torch.nn.functional
#: Elementwise activation modules (no parameters, no cross-element coupling).
ACT_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
)
#: Elementwise activation functions as they appear in a traced graph, and their out-of-place form.
ACT_FUNCTIONS: dict[Any, Callable[..., Tensor]] = {
    torch.relu: torch.relu,
    torch.relu_: torch.relu,
    _F.relu: _F.relu,
    _F.relu_: _F.relu,
    _F.relu6: _F.relu6,
    _F.silu: _F.silu,
    _F.gelu: _F.gelu,
    _F.leaky_relu: _F.leaky_relu,
    _F.elu: _F.elu,
    _F.hardswish: _F.hardswish,
    _F.hardsigmoid: _F.hardsigmoid,
    _F.mish: _F.mish,
    torch.sigmoid: torch.sigmoid,
    torch.tanh: torch.tanh,
    _F.sigmoid: torch.sigmoid,
    _F.tanh: torch.tanh,
    _F.softplus: _F.softplus,
}
#: Tensor methods that are elementwise activations.
ACT_METHODS: dict[str, Callable[..., Tensor]] = {
    "relu": torch.relu,
    "relu_": torch.relu,
    "sigmoid": torch.sigmoid,
    "sigmoid_": torch.sigmoid,
    "tanh": torch.tanh,
    "tanh_": torch.tanh,
}


def is_activation_module(module: Any) -> bool:
    """Whether ``module`` is one of torch.nn's elementwise activation modules (exact class).

    Example:
        >>> is_activation_module(torch.nn.ReLU6()), is_activation_module(torch.nn.PReLU())
        (True, False)
    """
    return type(module) in ACT_MODULES


def elementwise_activation(
    fn: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
) -> ActivationLike:
    """The out-of-place activation a module, function (with its extra arguments) or method name applies.

    Returns a name Proxy Norm's op knows (``"relu"``, ``"leaky_relu:0.2"``) when there is one, else
    a callable (``inplace`` dropped).

    Example:
        >>> elementwise_activation(torch.nn.LeakyReLU(0.2, inplace=True))
        'leaky_relu:0.2'
        >>> elementwise_activation(torch.nn.functional.relu6)
        <function relu6 at ...>
    """
    kwargs = {k: v for k, v in (kwargs or {}).items() if k != "inplace"}
    if isinstance(fn, str):
        fn = ACT_METHODS[fn]
    if isinstance(fn, nn.Module):
        if type(fn) in (nn.ReLU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.LeakyReLU):
            return _named(activation_spec(fn))
        act = copy.deepcopy(fn)
        if hasattr(act, "inplace"):
            setattr(act, "inplace", False)  # noqa: B010 - any activation module with the flag
        return act
    fn = next((v for k, v in ACT_FUNCTIONS.items() if k is fn), fn)  # (by identity: fn need not hash)
    if fn is _F.leaky_relu:
        slope = args[0] if args else kwargs.get("negative_slope", 0.01)
        return _named(("leaky_relu", float(slope)))
    if fn is _F.gelu and not args:
        return "gelu_tanh" if kwargs.get("approximate", "none") == "tanh" else "gelu"
    if not args and not kwargs:
        spec = activation_spec(fn)
        if spec is not None:
            return _named(spec)
        return fn
    return functools.partial(fn, *args, **kwargs)


def _named(spec: tuple[str, float] | None) -> str:
    assert spec is not None
    name, slope = spec
    return f"leaky_relu:{slope:g}" if name == "leaky_relu" else name


def pn_activation(info: NormInfo) -> ActivationLike:
    """The activation of a norm+act layer in the form Proxy Norm takes (see
    :func:`elementwise_activation`)."""
    act = info.activation
    if isinstance(act, nn.Module):
        return elementwise_activation(act)
    return act


def activation_name(act: Any) -> str:
    """A short readable name for an activation (name, module, function or partial).

    Example:
        >>> activation_name(torch.nn.ReLU6()), activation_name("silu"), activation_name(torch.relu)
        ('relu6', 'silu', 'relu')
    """
    if isinstance(act, str):
        return act
    if isinstance(act, functools.partial):
        return activation_name(act.func)
    if isinstance(act, nn.Module):
        return type(act).__name__.lower()
    return getattr(act, "__name__", type(act).__name__)
