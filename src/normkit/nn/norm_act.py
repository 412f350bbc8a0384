"""Norm + affine + activation in one module, with the plain norm's state_dict keys."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..functional.activations import ActivationLike, get_activation
from ._base import fx_leaf
from .batch_norm import BatchNorm2d
from .group_norm import GroupNorm
from .layer_norm import LayerNorm2d
from .registry import _REGISTRY, _SPEC, create_norm_layer

__all__ = ["BatchNormAct2d", "GroupNormAct2d", "LayerNormAct2d", "create_norm_act_layer"]


def _act_repr(act: ActivationLike) -> str:
    return act if isinstance(act, str) else getattr(act, "__name__", type(act).__name__)


class _ActMixin:
    """Applies ``self.act`` after the parent norm's forward; keeps the parent's state_dict keys."""

    def _init_act(self, activation: ActivationLike) -> None:
        self.activation = activation
        fn = get_activation(activation)
        if isinstance(fn, nn.Module):
            self.act = fn  # a Module activation registers (and saves) its own state
        else:
            self._act_fn = fn

    def _apply_act(self, y: Tensor) -> Tensor:
        act = self.__dict__.get("_act_fn") or self._modules["act"]  # type: ignore[attr-defined]
        return act(y)


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

    def forward(self, input: Tensor) -> Tensor:
        x = input  # (torch.nn's argument name, so that layer(input=t) works as there)
        leaf = fx_leaf(self, x, root_traceable=True)
        if leaf is not None:
            return leaf
        return self._apply_act(super().forward(x))

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

    def forward(self, input: Tensor) -> Tensor:
        x = input  # (torch.nn's argument name, so that layer(input=t) works as there)
        leaf = fx_leaf(self, x, root_traceable=True)
        if leaf is not None:
            return leaf
        return self._apply_act(super().forward(x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={_act_repr(self.activation)}"


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


class _SequentialNormAct(nn.Sequential):
    """Fallback ``norm`` then ``act`` for registry entries without a fused norm+act class."""


def create_norm_act_layer(
    spec: str, num_features: int, activation: ActivationLike = "relu", **kwargs: Any
) -> nn.Module:
    """A norm followed by an activation, by name: what a CNN block needs after each conv.

    ``"bn"`` gives :class:`BatchNormAct2d`, ``"gn"``/``"gn:G"`` :class:`GroupNormAct2d`, ``"ln"`` /
    ``"ln2d"`` :class:`LayerNormAct2d`; specs that already contain their activation (Proxy
    Norm: ``"ln+pn"``, ``"gn:4+pn"``) take ``activation`` as their own argument; any other
    registered norm is followed by the activation in an ``nn.Sequential``.

    Example:
        >>> create_norm_act_layer("gn:4", 16, "relu")
        GroupNormAct2d(4, 16, eps=1e-05, affine=True, bias=True, activation=relu)
    """
    match = _SPEC.match(spec.strip().lower()) if isinstance(spec, str) else None
    key = match["base"] + match["suffix"] if match else None
    arg = int(match["arg"]) if match and match["arg"] is not None else None
    if key in ("bn", "bn2d") and arg is None:
        return BatchNormAct2d(num_features, activation=activation, **kwargs)
    if key == "gn":
        from .registry import default_groups

        return GroupNormAct2d(
            num_features, arg if arg is not None else default_groups(num_features), activation, **kwargs
        )
    if key in ("ln", "ln2d") and arg is None:
        return LayerNormAct2d(num_features, activation, over="chw" if key == "ln" else "c", **kwargs)
    if key is not None and key in _REGISTRY and getattr(_REGISTRY[key][0], "includes_activation", False):
        return create_norm_layer(spec, num_features, activation=activation, **kwargs)
    fn = get_activation(activation)
    act = fn if isinstance(fn, nn.Module) else _Lambda(fn)
    return _SequentialNormAct(create_norm_layer(spec, num_features, **kwargs), act)


class _Lambda(nn.Module):
    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        leaf = fx_leaf(self, x, root_traceable=True)
        if leaf is not None:
            return leaf
        return self.fn(x)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))
