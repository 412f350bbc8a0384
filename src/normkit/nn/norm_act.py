"""Norm + affine + activation in one module, with the plain norm's state_dict keys."""

from __future__ import annotations

import inspect
from typing import Any, cast

import torch
from torch import Tensor, nn

from .._errors import NormError
from ..functional.activations import ActivationLike, get_activation, inplace_activation
from ..ops.library import exporting
from . import batch_norm_family as _fam
from ._base import fx_leaf, not_scriptable
from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .group_norm import GroupNorm
from .instance_norm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .layer_norm import LayerNorm2d
from .registry import _REGISTRY, create_norm_layer, default_groups, is_builtin, spec_key, spec_or_keyword

__all__ = [
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchRenormAct1d",
    "BatchRenormAct2d",
    "BatchRenormAct3d",
    "GhostBatchNormAct1d",
    "GhostBatchNormAct2d",
    "GhostBatchNormAct3d",
    "GroupNormAct2d",
    "InstanceNormAct1d",
    "InstanceNormAct2d",
    "InstanceNormAct3d",
    "LayerNormAct2d",
    "create_norm_act_layer",
]


def _plain_eager() -> bool:
    # torch.jit.is_tracing is public API that torch.jit.__all__ leaves out:
    tracing = torch.jit.is_tracing()  # pyright: ignore[reportPrivateImportUsage]
    return not (torch.compiler.is_compiling() or exporting() or tracing)


def _act_repr(act: ActivationLike) -> str:
    if act is None:
        return "identity"
    return act if isinstance(act, str) else getattr(act, "__name__", type(act).__name__)


class _ActMixin:
    """Applies ``self.act`` after the parent norm's forward; keeps the parent's state_dict keys.

    A Module activation is registered once, as ``act`` (timm's name: its parameters, e.g. PReLU's,
    save as ``act.weight``); ``activation`` gives back what was passed, without registering it a
    second time. A named activation is resolved again after unpickling, so that the layer pickles
    whatever function the name resolves to.
    """

    __prepare_scriptable__ = not_scriptable  # (torch.jit.script: a clear error)

    def _init_act(self, activation: ActivationLike) -> None:
        fn = get_activation(activation)
        if isinstance(fn, nn.Module):
            self.act = fn  # a Module activation registers (and saves) its own state
        else:
            self.__dict__["_activation"] = activation
            self._act_fn = fn

    @property
    def activation(self) -> ActivationLike:
        act = self._modules.get("act")  # type: ignore[attr-defined]
        return act if act is not None else self.__dict__.get("_activation")

    def __setattr__(self, name: str, value: Any) -> None:
        if name != "activation":
            super().__setattr__(name, value)
            return
        # ``layer.activation = ...`` swaps the activation (nn.Module would register a Module value
        # as a second child, or refuse a string)
        self._modules.pop("act", None)  # type: ignore[attr-defined]
        self.__dict__.pop("_act_fn", None)
        self.__dict__.pop("_activation", None)
        self._init_act(value)

    def __getstate__(self) -> dict[str, Any]:
        state = cast("dict[str, Any]", super().__getstate__())  # type: ignore[misc]
        named = state.get("_activation")
        if "_act_fn" in state and (named is None or isinstance(named, str)):
            state = dict(state)
            del state["_act_fn"]  # (a named activation may be a lambda: resolved again on load)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        if "act" not in self._modules and "_act_fn" not in self.__dict__:  # type: ignore[attr-defined]
            self._act_fn = get_activation(self.__dict__.get("_activation"))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # checkpoints saved before a Module activation was registered once hold its state twice, as
        # ``activation.*`` beside ``act.*``: the copies are dropped, so they load with strict=True
        for key in [k for k in state_dict if k.startswith(prefix + "activation.")]:
            if "act" in self._modules and prefix + "act." + key[len(prefix + "activation.") :] in state_dict:  # type: ignore[attr-defined]
                del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[misc]

    def _apply_act(self, y: Tensor) -> Tensor:
        fn = self.__dict__.get("_act_fn")
        if fn is None:
            return self._modules["act"](y)  # type: ignore[attr-defined]  # (a Module: its hooks run)
        # Inference (nothing recorded), plain eager: the activation in place on the norm's fresh output,
        # as Sequential(norm, ReLU(inplace=True)) does (one full-size output alive, not two)
        # (type first: under torch.fx y is a Proxy, whose requires_grad cannot be tested)
        if type(y) is Tensor and not (y.requires_grad and torch.is_grad_enabled()) and _plain_eager():
            inplace = inplace_activation(fn)
            if inplace is not None:
                return inplace(y)
        return fn(y)


class BatchNormAct2d(_ActMixin, BatchNorm2d):
    """``act(BatchNorm2d(x))``; loads a ``BatchNorm2d`` state_dict as is.

    Args:
        num_features: C.
        activation: name or callable (see :func:`normkit.functional.activations.get_activation`).
        **kwargs: the arguments of :class:`BatchNorm2d`.

    Example:
        >>> import torch, normkit
        >>> layer = normkit.nn.BatchNormAct2d(4, activation="relu")
        >>> bool((layer(torch.randn(2, 4, 3, 3)) >= 0).all())
        True
    """

    def __init__(self, num_features: int, activation: ActivationLike = "relu", **kwargs: Any) -> None:
        super().__init__(num_features, **kwargs)
        self._init_act(activation)

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """``act(norm(input))``; ``mask`` (bool, True = valid) limits the statistics as in the plain norm."""
        x = input  # (torch.nn's argument name, so that layer(input=t) works as there)
        leaf = fx_leaf(self, x, mask, root_traceable=True)
        if leaf is not None:
            return leaf
        return self._apply_act(super().forward(x) if mask is None else super().forward(x, mask))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={_act_repr(self.activation)}"


class GroupNormAct2d(_ActMixin, GroupNorm):
    """``act(GroupNorm(x))`` with the channel count first; loads a ``GroupNorm`` state_dict as is.

    Example:
        >>> import torch, normkit
        >>> normkit.nn.GroupNormAct2d(8, num_groups=2, activation="silu")(torch.randn(2, 8, 3, 3)).shape
        torch.Size([2, 8, 3, 3])
    """

    def __init__(
        self, num_channels: int, num_groups: int = 32, activation: ActivationLike = "relu", **kwargs: Any
    ) -> None:
        super().__init__(num_groups, num_channels, **kwargs)
        self._init_act(activation)

    def extra_repr(self) -> str:  # (this constructor's order: the channel count first)
        return (
            f"{self.num_channels}, num_groups={self.num_groups}, eps={self.eps}, affine={self.affine}, "
            f"bias={self.bias is not None}, activation={_act_repr(self.activation)}"
        )

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """``act(norm(input))``; ``mask`` (bool, True = valid) limits the statistics as in the plain norm."""
        x = input  # (torch.nn's argument name, so that layer(input=t) works as there)
        leaf = fx_leaf(self, x, mask, root_traceable=True)
        if leaf is not None:
            return leaf
        return self._apply_act(super().forward(x) if mask is None else super().forward(x, mask))


class LayerNormAct2d(_ActMixin, LayerNorm2d):
    """``act(LayerNorm2d(x))`` (``over="chw"`` or ``"c"``); loads a ``LayerNorm2d`` state_dict as is.

    Example:
        >>> import torch, normkit
        >>> normkit.nn.LayerNormAct2d(8, over="chw")(torch.randn(2, 8, 3, 3)).shape
        torch.Size([2, 8, 3, 3])
    """

    def __init__(self, num_channels: int, activation: ActivationLike = "relu", **kwargs: Any) -> None:
        super().__init__(num_channels, **kwargs)
        self._init_act(activation)

    def forward(self, input: Tensor) -> Tensor:
        x = input  # (torch.nn's argument name, so that layer(input=t) works as there)
        leaf = fx_leaf(self, x, root_traceable=True)
        if leaf is not None:
            return leaf
        return self._apply_act(super().forward(x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={_act_repr(self.activation)}"


def _norm_act(norm_cls: type[nn.Module], name: str, root_traceable: bool = True) -> type[nn.Module]:
    """``act(norm_cls(x))`` as a class of its own, with ``norm_cls``'s state_dict keys and arguments
    (``root_traceable``: whether ``torch.fx`` traces ``norm_cls``'s body as the root, see ``fx_leaf``)."""
    base = norm_cls.__name__

    def __init__(self: Any, num_features: int, activation: ActivationLike = "relu", **kwargs: Any) -> None:
        norm_cls.__init__(self, num_features, **kwargs)
        self._init_act(activation)

    # (the norm's own arguments, not *args: torch.fx gives a root's *args one Proxy, which it cannot unpack)
    def forward_masked(self: Any, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """``act(norm(input))``; ``mask`` (bool, True = valid) limits the statistics as in the plain norm."""
        x = input  # (torch.nn's argument name, so that layer(input=t) works as there)
        leaf = fx_leaf(self, x, mask, root_traceable=root_traceable)
        if leaf is not None:
            return leaf
        y = norm_cls.forward(self, x) if mask is None else norm_cls.forward(self, x, mask)
        return self._apply_act(y)

    def forward_plain(self: Any, input: Tensor) -> Tensor:
        """``act(norm(input))``."""
        x = input
        leaf = fx_leaf(self, x, root_traceable=root_traceable)
        if leaf is not None:
            return leaf
        return self._apply_act(norm_cls.forward(self, x))

    masked = "mask" in inspect.signature(norm_cls.forward).parameters
    forward = forward_masked if masked else forward_plain
    forward.__name__ = forward.__qualname__ = "forward"

    def extra_repr(self: Any) -> str:
        return f"{norm_cls.extra_repr(self)}, activation={_act_repr(self.activation)}"

    doc = f"""``act({base}(x))``; loads a ``{base}`` state_dict as is (same keys).

    Args:
        num_features: C.
        activation: name or callable (see :func:`normkit.functional.activations.get_activation`).
        **kwargs: the arguments of :class:`{base}`.

    Example:
        >>> import normkit
        >>> layer = normkit.nn.{name}(4, activation="silu")
        >>> list(layer.state_dict()) == list(normkit.nn.{base}(4).state_dict())
        True
    """
    body = {"__init__": __init__, "forward": forward, "extra_repr": extra_repr, "__doc__": doc}
    cls = type(name, (_ActMixin, norm_cls), body)
    cls.__module__ = __name__
    cls.__qualname__ = name
    return cls


# The other BN-family and instance norms with an activation: what create_norm_act_layer gives for
# their specs (keys as the plain norm's, so a checkpoint moves between "bn" and "brn" / "gbn" / "in").
BatchNormAct1d = _norm_act(BatchNorm1d, "BatchNormAct1d")
BatchNormAct3d = _norm_act(BatchNorm3d, "BatchNormAct3d")
InstanceNormAct1d = _norm_act(InstanceNorm1d, "InstanceNormAct1d")
InstanceNormAct2d = _norm_act(InstanceNorm2d, "InstanceNormAct2d")
InstanceNormAct3d = _norm_act(InstanceNorm3d, "InstanceNormAct3d")
BatchRenormAct1d = _norm_act(_fam.BatchRenorm1d, "BatchRenormAct1d", root_traceable=False)
BatchRenormAct2d = _norm_act(_fam.BatchRenorm2d, "BatchRenormAct2d", root_traceable=False)
BatchRenormAct3d = _norm_act(_fam.BatchRenorm3d, "BatchRenormAct3d", root_traceable=False)
GhostBatchNormAct1d = _norm_act(_fam.GhostBatchNorm1d, "GhostBatchNormAct1d", root_traceable=False)
GhostBatchNormAct2d = _norm_act(_fam.GhostBatchNorm2d, "GhostBatchNormAct2d", root_traceable=False)
GhostBatchNormAct3d = _norm_act(_fam.GhostBatchNorm3d, "GhostBatchNormAct3d", root_traceable=False)
_NORM_ACT: dict[type[nn.Module], type[nn.Module]] = {
    BatchNorm1d: BatchNormAct1d,
    BatchNorm2d: BatchNormAct2d,
    BatchNorm3d: BatchNormAct3d,
    InstanceNorm1d: InstanceNormAct1d,
    InstanceNorm2d: InstanceNormAct2d,
    InstanceNorm3d: InstanceNormAct3d,
    _fam.BatchRenorm1d: BatchRenormAct1d,
    _fam.BatchRenorm2d: BatchRenormAct2d,
    _fam.BatchRenorm3d: BatchRenormAct3d,
    _fam.GhostBatchNorm1d: GhostBatchNormAct1d,
    _fam.GhostBatchNorm2d: GhostBatchNormAct2d,
    _fam.GhostBatchNorm3d: GhostBatchNormAct3d,
}


class _SequentialNormAct(nn.Sequential):
    """Fallback ``norm`` then ``act`` for registry entries without a norm+act class (keys ``0.*``)."""


def create_norm_act_layer(
    spec: str, num_features: int, activation: ActivationLike = "relu", **kwargs: Any
) -> nn.Module:
    """A norm followed by an activation, by name: what a CNN block needs after each conv.

    ``"bn"`` gives :class:`BatchNormAct2d`, ``"gn"``/``"gn:G"`` :class:`GroupNormAct2d`, ``"ln"`` /
    ``"ln2d"`` :class:`LayerNormAct2d`; specs that already contain their activation (Proxy
    Norm: ``"ln+pn"``, ``"gn:4+pn"``) take ``activation`` as their own argument; the other BN-family
    and instance norms (``"bn1d"``, ``"brn"``, ``"gbn"``, ``"in"``, ``"syncbn"``, ...) give their
    norm+activation class (:class:`BatchRenormAct2d`, :class:`SyncBatchNormAct`, ...), with the plain
    norm's state_dict keys; any other registered norm (``"frozen_bn"``, ``"none"``, your own) is
    followed by the activation in an ``nn.Sequential`` (keys ``0.*``).

    Example:
        >>> create_norm_act_layer("gn:4", 16, "relu")
        GroupNormAct2d(16, num_groups=4, eps=1e-05, affine=True, bias=True, activation=relu)
    """
    key, arg = spec_key(spec)
    # (a spec the user registered again is built by their factory, below)
    own = key is not None and is_builtin(key)
    if own and key in ("bn", "bn2d") and arg is None:
        return BatchNormAct2d(num_features, activation=activation, **kwargs)
    if own and key == "gn":
        # the group count from the spec or num_groups=, as create_norm_layer("gn", ...) takes it
        groups = spec_or_keyword("gn", arg, kwargs, "num_groups", lambda: default_groups(num_features))
        return GroupNormAct2d(num_features, groups, activation, **kwargs)
    if own and key in ("ln", "ln2d") and arg is None:
        over = "chw" if key == "ln" else "c"
        if kwargs.get("over", over) != over:
            raise NormError(
                f"create_norm_act_layer: spec {spec!r} normalizes over={over!r} but the keyword says "
                f"over={kwargs['over']!r}; use 'ln' for over='chw' or 'ln2d' for over='c'"
            )
        kwargs.pop("over", None)
        return LayerNormAct2d(num_features, activation, over=over, **kwargs)
    if key is not None and key in _REGISTRY and getattr(_REGISTRY[key][0], "includes_activation", False):
        return create_norm_layer(spec, num_features, activation=activation, **kwargs)
    return with_activation(create_norm_layer(spec, num_features, **kwargs), activation)


def with_activation(norm: nn.Module, activation: ActivationLike) -> nn.Module:
    """``norm`` followed by ``activation``: the norm's norm+activation class (the same state, the same
    state_dict keys) where it has one, else an ``nn.Sequential`` of the two (keys ``0.*``).

    Example:
        >>> from normkit.nn import BatchRenorm2d
        >>> layer = with_activation(BatchRenorm2d(4), "silu")
        >>> type(layer).__name__, list(layer.state_dict()) == list(BatchRenorm2d(4).state_dict())
        ('BatchRenormAct2d', True)
    """
    cls = _NORM_ACT.get(type(norm))
    if cls is None:
        from .sync_batch_norm import SyncBatchNorm, SyncBatchNormAct  # (it imports this module)

        cls = SyncBatchNormAct if type(norm) is SyncBatchNorm else None
    if cls is not None:
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.__dict__.update(norm.__dict__)
        layer._init_act(activation)  # type: ignore[attr-defined]
        return layer
    fn = get_activation(activation)
    act = fn if isinstance(fn, nn.Module) else _Lambda(activation)
    return _SequentialNormAct(norm, act)


class _Lambda(_ActMixin, nn.Module):
    """A function activation as a module (named: pickles by name, resolved again on load)."""

    def __init__(self, activation: ActivationLike) -> None:
        super().__init__()
        self._init_act(activation)

    @property
    def fn(self) -> Any:
        return self._act_fn

    def forward(self, x: Tensor) -> Tensor:
        leaf = fx_leaf(self, x, root_traceable=True)
        if leaf is not None:
            return leaf
        return self._act_fn(x)

    def extra_repr(self) -> str:
        return _act_repr(self.activation)
