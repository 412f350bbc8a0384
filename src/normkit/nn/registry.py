"""Norm layers by name: ``create_norm_layer("gn:16", 64)``. Every factory takes the channel count first."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

from torch import nn

from .._errors import NormError
from ..functional._checks import check_positive_int

__all__ = ["available_norms", "create_norm_layer", "default_groups", "get_norm_layer", "register_norm"]

Factory = Callable[..., nn.Module]
_REGISTRY: dict[str, tuple[Factory, str]] = {}
_SPEC = re.compile(r"^(?P<base>[a-z][a-z0-9_]*)(?::(?P<arg>[0-9]+))?(?P<suffix>(?:\+[a-z][a-z0-9_]*)*)$")
_NAME = re.compile(r"^[a-z][a-z0-9_]*(?:\+[a-z][a-z0-9_]*)*$")
_CORE_DONE = False  # set once the built-in specs are registered


def register_norm(name: str, help: str = "") -> Callable[[Factory], Factory]:
    """Register ``factory(num_features, arg, **kwargs)`` under ``name`` (e.g. ``"gn"`` or ``"gn+pn"``).

    ``arg`` is the optional integer after a colon in the spec (``"gn:16"`` -> 16), else ``None``.

    Example:
        >>> import torch
        >>> @register_norm("mynorm", "an example norm")
        ... def _mynorm(num_features, arg, **kw):
        ...     return torch.nn.Identity()
        >>> type(create_norm_layer("mynorm", 8)).__name__
        'Identity'
    """

    if not isinstance(name, str):
        raise TypeError(f"register_norm: name must be a string such as 'mynorm', got {type(name).__name__}")
    if _NAME.match(name) is None:
        # Specs are matched lower-cased against this form: any other name could never be created.
        raise NormError(
            f"register_norm: name {name!r} is not a valid spec name; expected lower-case letters, digits "
            "and '_' starting with a letter, optionally with '+suffix' parts (e.g. 'mynorm' or 'gn+pn'), "
            "and no ':<int>' (the factory receives that as its arg)"
        )

    def deco(factory: Factory) -> Factory:
        _REGISTRY[name] = (factory, help)
        if _CORE_DONE:
            # get_norm_layer must build what create_norm_layer builds: a re-registered class spec
            # is no longer the class.
            _CLASS_SPECS.pop(name, None)
        return factory

    return deco


def available_norms() -> dict[str, str]:
    """The registered names with a one-line description each.

    Example:
        >>> "gn" in available_norms()
        True
    """
    return {k: h for k, (_, h) in sorted(_REGISTRY.items())}


def default_groups(num_channels: int, preferred: int = 32) -> int:
    """The largest divisor of ``num_channels`` that is at most ``preferred`` (32 by default).

    Example:
        >>> default_groups(64), default_groups(16), default_groups(48)
        (32, 16, 24)
    """
    num_channels = check_positive_int(num_channels, "default_groups", "num_channels")
    preferred = check_positive_int(preferred, "default_groups", "preferred")
    return max(g for g in range(1, min(preferred, num_channels) + 1) if num_channels % g == 0)


def create_norm_layer(spec: str, num_features: int, **kwargs: Any) -> nn.Module:
    """Build a norm layer from a short spec; the channel count always comes first.

    Specs: ``"bn"`` (= ``"bn2d"``), ``"bn1d"``, ``"bn3d"``, ``"gn"`` (32 groups, or the largest
    divisor of C below 32), ``"gn:16"``, ``"ln"`` (over C, H, W per sample: the GN / Proxy Norm
    papers' LN, = ``GroupNorm(1, C)``), ``"ln2d"`` (over C at each position, ConvNeXt / timm),
    ``"in"`` (InstanceNorm2d with a learnable affine), ``"none"``; with Proxy Norm and the
    norm+activation layers more names are available (see :func:`available_norms`). Extra keyword
    arguments go to the layer's constructor.

    Example:
        >>> create_norm_layer("gn:4", 64)
        GroupNorm(4, 64, eps=1e-05, affine=True, bias=True)
        >>> create_norm_layer("bn", 64, momentum=0.01)
        BatchNorm2d(64, eps=1e-05, momentum=0.01, affine=True, bias=True, track_running_stats=True)
    """
    if not isinstance(spec, str):
        raise TypeError(
            f"create_norm_layer: spec must be a string such as 'bn' or 'gn:16', got {type(spec).__name__}"
        )
    factory, arg = _parse(spec, "create_norm_layer")
    return factory(num_features, arg, **kwargs)


def spec_key(spec: object) -> tuple[str | None, int | None]:
    """``(registry key, :<int> argument)`` of a spec; ``(None, None)`` when it is not of a spec's form.

    Example:
        >>> spec_key("GN:4+pn"), spec_key("bn"), spec_key("4gn")
        (('gn+pn', 4), ('bn', None), (None, None))
    """
    match = _SPEC.match(spec.strip().lower()) if isinstance(spec, str) else None
    if match is None:
        return None, None
    return match["base"] + match["suffix"], int(match["arg"]) if match["arg"] is not None else None


def _parse(spec: str, op: str) -> tuple[Factory, int | None]:
    """The factory and the ``:<int>`` argument of a spec, or a ``NormError`` naming it and the valid forms."""
    key, arg = spec_key(spec)
    if key is None or key not in _REGISTRY:
        raise NormError(
            f"{op}: unknown norm spec {spec!r}; expected one of {', '.join(sorted(_REGISTRY))}, "
            "optionally with ':<int>' after the norm's name (e.g. 'gn:16', 'gn:4+pn')"
        )
    factory, _ = _REGISTRY[key]
    if arg is not None and getattr(factory, "takes_arg", True) is False:
        raise NormError(f"{op}: {key!r} takes no ':<int>' argument, got {spec!r}; use {key!r}")
    return factory, arg


def norm_from_spec(num_features: int, *, spec: str, **kwargs: Any) -> nn.Module:
    """``create_norm_layer(spec, num_features, **kwargs)`` with the channel count first (for partials)."""
    return create_norm_layer(spec, num_features, **kwargs)


# Specs that are one class with keyword defaults: get_norm_layer returns the class, or a partial of it.
_CLASS_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "bn": ("BatchNorm2d", {}),
    "bn2d": ("BatchNorm2d", {}),
    "bn1d": ("BatchNorm1d", {}),
    "bn3d": ("BatchNorm3d", {}),
    "ln2d": ("LayerNorm2d", {}),
    "ln": ("LayerNorm2d", {"over": "chw"}),
    "in": ("InstanceNorm2d", {"affine": True}),
    "frozen_bn": ("FrozenBatchNorm2d", {}),
    "brn": ("BatchRenorm2d", {}),
    "syncbn": ("SyncBatchNorm", {}),
}


def get_norm_layer(spec: str, **kwargs: Any) -> Callable[..., nn.Module]:
    """A layer *class* (or a keyword-only ``functools.partial``) for a spec, for APIs that take
    ``norm_layer=``.

    torchvision calls ``norm_layer(num_channels)``; timm keeps a partial's keywords and drops its
    positional arguments. So this returns a class where the spec is one (``"bn"`` ->
    ``BatchNorm2d``, ``"ln2d"`` -> ``LayerNorm2d``), else a partial whose arguments are all keywords
    (``"gn:8"`` -> ``partial(norm_from_spec, spec="gn:8")``). ``kwargs`` (e.g. ``eps=1e-6``, timm's
    LayerNorm2d default; normkit keeps torch's 1e-5) are bound as keywords too.

    Example:
        >>> import torch
        >>> get_norm_layer("bn").__name__
        'BatchNorm2d'
        >>> layer = get_norm_layer("gn:8")(64)              # how torchvision / timm call it
        >>> layer.num_groups, layer.num_channels
        (8, 64)
        >>> get_norm_layer("ln2d", eps=1e-6)(32).eps
        1e-06
    """
    if not isinstance(spec, str):
        raise TypeError(
            f"get_norm_layer: spec must be a string such as 'bn' or 'gn:16', got {type(spec).__name__}"
        )
    key = spec.strip().lower()
    if key in _CLASS_SPECS:
        import importlib

        name, defaults = _CLASS_SPECS[key]
        cls = getattr(importlib.import_module("normkit.nn"), name)
        both = {**defaults, **kwargs}
        return functools.partial(cls, **both) if both else cls
    _parse(spec, "get_norm_layer")  # a bad spec fails here, not when the model is built
    return functools.partial(norm_from_spec, spec=spec, **kwargs)


def spec_or_keyword(name: str, arg: int | None, kw: dict[str, Any], key: str, default: Any) -> Any:
    """The value of ``key`` for a spec ``name[:arg]``: from the spec's ``:<int>``, else from the keyword
    (popped from ``kw``), else ``default``; given both ways, a ``NormError`` naming the conflict.

    Example:
        >>> kw = {"num_groups": 4, "eps": 1e-3}
        >>> spec_or_keyword("gn", None, kw, "num_groups", lambda: 32), kw
        (4, {'eps': 0.001})
        >>> spec_or_keyword("gn", 8, {}, "num_groups", lambda: 32)
        8
    """
    if key in kw:
        value = kw.pop(key)
        if arg is not None:
            raise NormError(
                f"create_norm_layer: {key} is given twice: {arg} by the spec '{name}:{arg}' and {value!r} by "
                f"the keyword {key}={value!r}; give it one way ('{name}:<int>' or {key}=...)"
            )
        return value
    return arg if arg is not None else default()


def _no_arg(name: str, arg: int | None) -> None:
    if arg is not None:
        raise NormError(f"create_norm_layer: {name!r} takes no ':<int>' argument, got {name}:{arg}")


def _register_core() -> None:
    from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d
    from .group_norm import GroupNorm
    from .instance_norm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
    from .layer_norm import LayerNorm2d

    def simple(name: str, cls: type[nn.Module], help: str, **defaults: Any) -> None:
        def factory(c: int, arg: int | None, **kw: Any) -> nn.Module:
            _no_arg(name, arg)
            return cls(c, **{**defaults, **kw})

        factory.takes_arg = False  # type: ignore[attr-defined]
        register_norm(name, help)(factory)

    simple("bn", BatchNorm2d, "BatchNorm2d")
    simple("bn2d", BatchNorm2d, "BatchNorm2d")
    simple("bn1d", BatchNorm1d, "BatchNorm1d, for (N, C) or (N, C, L)")
    simple("bn3d", BatchNorm3d, "BatchNorm3d")
    simple("in", InstanceNorm2d, "InstanceNorm2d with a learnable affine", affine=True)
    simple("in1d", InstanceNorm1d, "InstanceNorm1d with a learnable affine", affine=True)
    simple("in3d", InstanceNorm3d, "InstanceNorm3d with a learnable affine", affine=True)
    simple("ln", LayerNorm2d, "LayerNorm over (C, H, W) per sample, = GroupNorm(1, C)", over="chw")
    simple("ln2d", LayerNorm2d, "LayerNorm over C at each position (ConvNeXt / timm)", over="c")

    @register_norm("gn", "GroupNorm; 'gn' = 32 groups (or the largest divisor of C below), 'gn:G' = G groups")
    def _gn(c: int, arg: int | None, **kw: Any) -> nn.Module:
        return GroupNorm(spec_or_keyword("gn", arg, kw, "num_groups", lambda: default_groups(c)), c, **kw)

    from .batch_norm_family import BatchRenorm2d, FrozenBatchNorm2d, GhostBatchNorm2d

    simple("brn", BatchRenorm2d, "BatchRenorm2d (Ioffe 2017), r_max=3, d_max=5")

    @register_norm("syncbn", "SyncBatchNorm: BN statistics over all processes (torch.distributed)")
    def _syncbn(c: int, arg: int | None, **kw: Any) -> nn.Module:
        _no_arg("syncbn", arg)
        from .sync_batch_norm import SyncBatchNorm  # here: it imports norm_act, which imports this module

        return SyncBatchNorm(c, **kw)

    _syncbn.takes_arg = False  # type: ignore[attr-defined]

    simple("frozen_bn", FrozenBatchNorm2d, "FrozenBatchNorm2d: running statistics and affine frozen")

    @register_norm(
        "gbn", "GhostBatchNorm2d; 'gbn' = ghost batches of 32, 'gbn:B' = ghost batches of B samples"
    )
    def _gbn(c: int, arg: int | None, **kw: Any) -> nn.Module:
        size = spec_or_keyword("gbn", arg, kw, "ghost_batch_size", lambda: 32)
        return GhostBatchNorm2d(c, ghost_batch_size=size, **kw)

    @register_norm("none", "no normalization (Identity)")
    def _none(c: int, arg: int | None, **kw: Any) -> nn.Module:
        _no_arg("none", arg)
        return nn.Identity()

    _none.takes_arg = False  # type: ignore[attr-defined]


_register_core()
_CORE_DONE = True
# The built-in factories (normkit.nn's own registrations, taken once its import is done: see
# _snapshot_builtins), to tell a spec the user registered, or registered again.
_BUILTIN: dict[str, Factory] = {}


def _snapshot_builtins() -> None:
    _BUILTIN.update({k: f for k, (f, _) in _REGISTRY.items() if k not in _BUILTIN})


def is_builtin(key: str) -> bool:
    """Whether ``key`` names normkit's own factory (not one the user registered, or registered over it).

    Example:
        >>> is_builtin("gn"), is_builtin("nosuchnorm")
        (True, False)
    """
    entry = _REGISTRY.get(key)
    return entry is not None and _BUILTIN.get(key) is entry[0]


def user_registered(specs: list[str]) -> dict[str, tuple[Factory, str]]:
    """The registry entries behind ``specs`` that the user registered (for worker processes, which
    start with normkit's own registry only).

    Example:
        >>> user_registered(["bn", "gn:8", "ln+pn"])  # normkit's own specs only
        {}
    """
    out: dict[str, tuple[Factory, str]] = {}
    for spec in specs:
        key, _ = spec_key(spec)
        if key is not None and key in _REGISTRY and not is_builtin(key):
            out[key] = _REGISTRY[key]
    return out
