"""Freeze and unfreeze the batch-norm layers of a model (swap BN <-> FrozenBatchNorm)."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm
from torch.nn.utils import parametrize

from .._errors import NormError
from ..functional._collective import group_size
from ..nn import batch_norm as nk_bn
from ..nn import batch_norm_family as fam
from ..nn import norm_act as nk_act
from ..nn import sync_batch_norm as nk_sync
from ..nn._base import build_norm, move_forward_hooks
from ..nn.norm_act import BatchNormAct2d
from ._graph import check_model, parametrized_reason

__all__ = [
    "FrozenBatchNormAct1d",
    "FrozenBatchNormAct2d",
    "FrozenBatchNormAct3d",
    "FrozenBatchNormXd",
    "FrozenSyncBatchNormAct",
    "freeze_bn",
    "unfreeze_bn",
]


class FrozenBatchNormXd(fam._FrozenBatchNorm):
    """:class:`~normkit.nn.FrozenBatchNorm2d` for any input rank, ``(N, C)`` to ``(N, C, D, H, W)``: what
    :func:`freeze_bn` makes of a ``SyncBatchNorm`` (torch's or normkit's), whose input rank is not known.

    Frozen, it issues no collective: the running statistics it normalizes with are the same on
    every process (``update_running_stats=True`` or ``use_running_stats=False`` work on each
    process's own batch).

    Example:
        >>> import torch, normkit
        >>> net = normkit.surgery.freeze_bn(torch.nn.Sequential(torch.nn.SyncBatchNorm(3))).train()
        >>> type(net[0]).__name__, net[0](torch.randn(2, 3, 4)).shape
        ('FrozenBatchNormXd', torch.Size([2, 3, 4]))
    """

    _dims = (2, 3, 4, 5)


class _EvalPinned:
    """A frozen norm+activation layer: ``train()`` / ``eval()`` leave it in eval mode (running statistics,
    no update), as a FrozenBatchNorm ignores them."""

    def train(self, mode: bool = True) -> Any:
        """Frozen layers ignore train/eval: a parent's ``.train()`` leaves this one in eval."""
        return self


class FrozenBatchNormAct2d(_EvalPinned, BatchNormAct2d):
    """A :class:`~normkit.nn.BatchNormAct2d` frozen by :func:`freeze_bn`: always in eval mode (running
    statistics, never updated), ``weight``/``bias`` buffers (same state_dict keys), activation kept
    (a Module activation's own parameters, PReLU's, stay trainable: it is not a norm).

    Example:
        >>> import torch, normkit
        >>> net = normkit.surgery.freeze_bn(torch.nn.Sequential(normkit.nn.BatchNormAct2d(3))).train()
        >>> type(net[0]).__name__, net[0].training, len(list(net.parameters()))
        ('FrozenBatchNormAct2d', False, 0)
    """


class FrozenBatchNormAct1d(_EvalPinned, nk_act.BatchNormAct1d):  # type: ignore[misc, valid-type]
    """:class:`FrozenBatchNormAct2d` for ``(N, C)`` / ``(N, C, L)`` inputs: what :func:`freeze_bn` makes of
    a ``BatchNormAct1d`` (and of ``BatchRenormAct1d`` / ``GhostBatchNormAct1d``, which in eval
    normalize as BatchNorm does).

    Example:
        >>> import torch, normkit
        >>> net = normkit.surgery.freeze_bn(torch.nn.Sequential(normkit.nn.BatchNormAct1d(3))).train()
        >>> type(net[0]).__name__, net[0].training, net[0](torch.randn(2, 3)).shape
        ('FrozenBatchNormAct1d', False, torch.Size([2, 3]))
    """


class FrozenBatchNormAct3d(_EvalPinned, nk_act.BatchNormAct3d):  # type: ignore[misc, valid-type]
    """:class:`FrozenBatchNormAct2d` for ``(N, C, D, H, W)`` inputs (from ``BatchNormAct3d``,
    ``BatchRenormAct3d``, ``GhostBatchNormAct3d``).

    Example:
        >>> import torch, normkit
        >>> net = normkit.surgery.freeze_bn(torch.nn.Sequential(normkit.nn.BatchNormAct3d(3))).train()
        >>> type(net[0]).__name__, net[0].training, net[0](torch.randn(2, 3, 2, 2, 2)).shape
        ('FrozenBatchNormAct3d', False, torch.Size([2, 3, 2, 2, 2]))
    """


class FrozenSyncBatchNormAct(_EvalPinned, nk_sync.SyncBatchNormAct):
    """A :class:`~normkit.nn.SyncBatchNormAct` frozen by :func:`freeze_bn`, as
    :class:`FrozenBatchNormAct2d` (in eval it issues no collective).

    Example:
        >>> import torch, normkit
        >>> net = normkit.surgery.freeze_bn(torch.nn.Sequential(normkit.nn.SyncBatchNormAct(3))).train()
        >>> type(net[0]).__name__, net[0].training, net[0](torch.randn(2, 3, 4, 4)).shape
        ('FrozenSyncBatchNormAct', False, torch.Size([2, 3, 4, 4]))
    """


# Swapped for a FrozenBatchNorm{1,2,3}d. Exact types only: a subclass with its own forward would lose
# behaviour.
_RANK = {
    nn.BatchNorm1d: 1,
    nn.BatchNorm2d: 2,
    nn.BatchNorm3d: 3,
    nk_bn.BatchNorm1d: 1,
    nk_bn.BatchNorm2d: 2,
    nk_bn.BatchNorm3d: 3,
    fam.GhostBatchNorm1d: 1,
    fam.GhostBatchNorm2d: 2,
    fam.GhostBatchNorm3d: 3,
    fam.BatchRenorm1d: 1,
    fam.BatchRenorm2d: 2,
    fam.BatchRenorm3d: 3,
}
# Any input rank: swapped for a FrozenBatchNormXd.
_ANY_RANK = (nn.SyncBatchNorm, nk_sync.SyncBatchNorm, nk_sync._BatchNormXd)
# Norm+activation layers (no FrozenBatchNorm holds an activation): the same layer held in eval mode.
_PINNED: dict[type[nn.Module], type[nn.Module]] = {
    nk_act.BatchNormAct1d: FrozenBatchNormAct1d,
    BatchNormAct2d: FrozenBatchNormAct2d,
    nk_act.BatchNormAct3d: FrozenBatchNormAct3d,
    nk_sync.SyncBatchNormAct: FrozenSyncBatchNormAct,
}
_UNPINNED = {v: k for k, v in _PINNED.items()}
# Batch Renorm and Ghost BN in eval normalize as BatchNorm does: frozen, they are the BN+act layer
# held in eval (unfreeze_bn gives back their own class, recorded on the frozen layer).
_PINNED.update(
    {
        nk_act.BatchRenormAct1d: FrozenBatchNormAct1d,
        nk_act.BatchRenormAct2d: FrozenBatchNormAct2d,
        nk_act.BatchRenormAct3d: FrozenBatchNormAct3d,
        nk_act.GhostBatchNormAct1d: FrozenBatchNormAct1d,
        nk_act.GhostBatchNormAct2d: FrozenBatchNormAct2d,
        nk_act.GhostBatchNormAct3d: FrozenBatchNormAct3d,
    }
)
_FROZEN = {1: fam.FrozenBatchNorm1d, 2: fam.FrozenBatchNorm2d, 3: fam.FrozenBatchNorm3d}
_RANK_OF_FROZEN: dict[type[nn.Module], int | None] = {
    fam.FrozenBatchNorm1d: 1,
    fam.FrozenBatchNorm2d: 2,
    fam.FrozenBatchNorm3d: 3,
    FrozenBatchNormXd: None,
}
# What freeze_bn records on a frozen layer (plain attributes: not in the state_dict) for unfreeze_bn.
_RECORD = (
    "_unfrozen_cls",
    "_unfrozen_kwargs",
    "_unfrozen_requires_grad",
    "_unfrozen_training",
    "_unfrozen_follows_model",
)


@torch.no_grad()
def _frozen_from(bn: Any, use_running_stats: bool, update_running_stats: bool) -> fam._FrozenBatchNorm:
    rm = bn.running_mean
    cls = _FROZEN[_RANK[type(bn)]] if type(bn) in _RANK else FrozenBatchNormXd
    frozen = cls(
        bn.num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        device=rm.device,
        dtype=rm.dtype,
        bias=bn.bias is not None,
        use_running_stats=use_running_stats,
        update_running_stats=update_running_stats,
        unbiased_running_var=getattr(bn, "unbiased_running_var", True),
    )
    for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        src = getattr(bn, key)
        if src is not None:
            getattr(frozen, key).copy_(src)
    move_forward_hooks(bn, frozen)  # (a feature or output hook on the layer keeps running)
    # What unfreeze_bn needs to rebuild the original exactly.
    _record(
        frozen,
        _unfrozen_cls=type(bn),
        _unfrozen_kwargs=_extra_kwargs(bn),
        _unfrozen_requires_grad=tuple(p.requires_grad for p in (bn.weight, bn.bias) if p is not None),
    )
    return frozen


def _record(module: nn.Module, **values: Any) -> None:
    """What unfreeze_bn needs, as plain attributes of the frozen layer (not in its state_dict)."""
    module.__dict__.update(values)


def _extra_kwargs(bn: nn.Module) -> dict[str, Any]:
    """Constructor arguments beyond torch BN's that a normkit BN-family layer needs to be rebuilt."""
    kw: dict[str, Any] = {}
    if isinstance(bn, nk_bn._BatchNorm):
        kw.update(bias=bn.bias is not None or not bn.affine, unbiased_running_var=bn.unbiased_running_var)
    if isinstance(bn, fam._GhostBatchNorm):
        kw.update(ghost_batch_size=bn.ghost_batch_size, momentum_mode=bn.momentum_mode)
    if isinstance(bn, fam._BatchRenorm):
        kw.update(r_max=bn.r_max, d_max=bn.d_max, warmup_steps=bn.warmup_steps)
    if isinstance(bn, (nn.SyncBatchNorm, nk_sync.SyncBatchNorm)):
        kw.update(process_group=bn.process_group)
    return kw


def _recast(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A new ``cls`` instance with ``module``'s attributes (its own dicts of parameters, buffers, children,
    hooks; the tensors and children themselves shared until replaced)."""
    new = cls.__new__(cls)
    for key, value in module.__dict__.items():
        new.__dict__[key] = copy.copy(value) if isinstance(value, (dict, set, list)) else value
    return new


@torch.no_grad()
def _pinned_from(bn: Any) -> nn.Module:
    """The frozen norm+activation layer: the same layer, held in eval, its affine as buffers."""
    new = _recast(bn, _PINNED[type(bn)])
    params = new._parameters
    affine = {k: None if (p := params.get(k)) is None else p.detach().clone() for k in ("weight", "bias")}
    stats = {k: None if v is None else v.clone() for k, v in new._buffers.items()}
    new.__dict__["_parameters"] = {k: v for k, v in params.items() if k not in affine}
    new.__dict__["_buffers"] = {**affine, **stats}  # (state_dict order as the original: weight, bias, ...)
    new.__dict__["training"] = False
    _record(
        new,
        _unfrozen_cls=type(bn),
        _unfrozen_requires_grad=tuple(p.requires_grad for p in (bn.weight, bn.bias) if p is not None),
    )
    return new


def _leaves_alone(m: nn.Module) -> str | None:
    """Why ``freeze_bn`` leaves a batch-norm layer as it is, or None when it freezes it (or is frozen)."""
    if not isinstance(m, _TorchBatchNorm) or type(m) in _UNPINNED:
        return None
    if getattr(m, "running_mean", None) is None and m.weight is None and m.bias is None:
        return None  # batch statistics and no affine: nothing that training changes, nothing to freeze
    if type(m) in _RANK or type(m) in _ANY_RANK or type(m) in _PINNED:
        if getattr(m, "running_mean", None) is None:
            return "no running statistics to freeze (track_running_stats=False)"
        return None
    if parametrize.is_parametrized(m):
        return parametrized_reason(m, "freezing")
    base = next(c for c in type(m).__mro__[1:] if c.__module__.startswith(("torch.nn", "normkit.")))
    return f"a subclass of {base.__name__}, which freeze_bn cannot rebuild (it may have its own forward)"


def freeze_bn(
    model: nn.Module,
    *,
    use_running_stats: bool = True,
    update_running_stats: bool = False,
    inplace: bool = True,
) -> nn.Module:
    """Swap every BN layer of ``model`` for a :class:`~normkit.nn.FrozenBatchNorm2d` (1d/3d); returns the
    model.

    Frozen layers normalize with their running statistics and fixed affine, ignore
    ``model.train()``, and their ``weight``/``bias`` become buffers, so no optimizer built
    afterwards updates them: after ``freeze_bn(model); model.train()`` a training step leaves
    every frozen layer's buffers bit-identical. state_dict keys do not change. Swapped: exact
    ``torch.nn.BatchNorm1d/2d/3d`` and normkit's BatchNorm, GhostBatchNorm and BatchRenorm
    layers (to ``FrozenBatchNorm1d/2d/3d``), torch's and normkit's ``SyncBatchNorm`` (to
    :class:`FrozenBatchNormXd`, any input rank), and normkit's ``BatchNormAct1d/2d/3d`` (also
    ``BatchRenormAct*`` / ``GhostBatchNormAct*``, which in eval normalize as BatchNorm) /
    ``SyncBatchNormAct`` (to :class:`FrozenBatchNormAct1d` / :class:`FrozenBatchNormAct2d` /
    :class:`FrozenBatchNormAct3d` / :class:`FrozenSyncBatchNormAct`: the same layer held in eval,
    its affine as buffers, its activation kept). A BN reachable under
    several names (``self.head_norm = self.bn``) becomes one frozen layer shared by all of them.
    Keras's :class:`~normkit.nn.BatchNormalization` is frozen in place as Keras freezes it,
    ``trainable=False`` (inference mode, ``gamma``/``beta`` without gradients).
    :func:`unfreeze_bn` restores the original classes (one shared module again), train/eval
    flags and ``trainable``. A batch-norm layer that cannot be frozen (no running statistics, or a
    subclass with its own forward such as timm's ``BatchNormAct2d``) is left as it is, with a
    ``UserWarning`` naming it.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or is a TorchScript module.
        NormError: a lazy BN layer (``torch.nn.LazyBatchNorm2d``) not initialized yet; or
            ``use_running_stats=False`` / ``update_running_stats=True`` for a model with a
            norm+activation layer (its frozen form only normalizes with the running statistics).

    Args:
        model: the model (changed in place unless ``inplace=False``), or a single BN layer.
        use_running_stats: the frozen layers' switch (see :class:`~normkit.nn.FrozenBatchNorm2d`).
        update_running_stats: the frozen layers' switch.
        inplace: ``False`` works on a deep copy and leaves ``model`` untouched.

    Returns:
        The model (or the copy) with frozen BN layers.

    Example:
        >>> import torch, normkit
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
        >>> net = normkit.surgery.freeze_bn(net).train()
        >>> type(net[1]).__name__, net[1].training
        ('FrozenBatchNorm2d', False)
        >>> _ = net(torch.randn(2, 3, 8, 8))
        >>> net[1].num_batches_tracked.item()                # nothing was updated
        0
    """
    op = "freeze_bn"
    check_model(model, op, lazy="norms")
    pinned = [
        (n or "<root>", m)
        for n, m in model.named_modules()
        if (type(m) in _PINNED and m.running_mean is not None) or isinstance(m, fam.BatchNormalization)
    ]
    if pinned and (not use_running_stats or update_running_stats):
        raise NormError(
            f"{op}: use_running_stats={use_running_stats}, update_running_stats={update_running_stats} needs "
            "a FrozenBatchNorm, and none holds an activation or Keras's conventions: "
            + ", ".join(f"'{n}' ({type(m).__name__})" for n, m in pinned)
            + " can only be frozen with the defaults (use_running_stats=True, update_running_stats=False)"
        )
    if not inplace:
        model = copy.deepcopy(model)
    root_training = model.training
    per_process: list[str] = []  # synchronised layers that will use their own process's batch

    def make(bn: nn.Module) -> nn.Module:
        if type(bn) in _PINNED:
            frozen = _pinned_from(bn)
        else:
            batch = not use_running_stats or update_running_stats
            if batch and group_size(getattr(bn, "process_group", None)) > 1:
                per_process.append(type(bn).__name__)
            frozen = _frozen_from(bn, use_running_stats, update_running_stats)
        # A layer the user had set apart (a BN kept in eval inside a training model) gets its mode back.
        _record(frozen, _unfrozen_training=bn.training, _unfrozen_follows_model=bn.training == root_training)
        return frozen

    if _freezable(model):
        model = make(model)
    else:
        _swap(model, make, _freezable)
    for layer in model.modules():  # Keras's layer freezes itself, as in Keras: trainable=False
        if isinstance(layer, fam.BatchNormalization) and layer.trainable:
            layer.trainable = False
            _record(layer, _unfrozen_trainable=True)
    if per_process:
        warnings.warn(
            f"{op}: a frozen layer issues no collective, so with use_running_stats={use_running_stats}, "
            f"update_running_stats={update_running_stats} each of the {len(per_process)} frozen "
            f"{', '.join(sorted(set(per_process)))} layer(s) uses the statistics of its own process's batch, "
            "not the group's",
            UserWarning,
            stacklevel=2,
        )
    left = [
        (n or "<root>", type(m).__name__, why) for n, m in model.named_modules() if (why := _leaves_alone(m))
    ]
    if left:
        warnings.warn(
            f"{op}: {len(left)} batch-norm layer(s) left unfrozen (they follow model.train() and keep "
            "their affine trainable): "
            + "; ".join(f"'{n}' ({cls}): {why}" for n, cls, why in left)
            + "; freeze such a layer by hand (layer.requires_grad_(False), and layer.eval() after every "
            "model.train())",
            UserWarning,
            stacklevel=2,
        )
    return model


def _swap(module: nn.Module, make: Any, match: Any) -> None:
    """Replace every matching submodule under every name it has (``named_children`` lists a module once,
    so an alias such as ``self.final_norm = self.bn`` would be missed); a module reachable by several
    paths gets one replacement, shared by all of them."""
    made: dict[int, tuple[nn.Module, nn.Module]] = {}  # id(old) -> (old, new); old kept alive
    visited: set[int] = set()

    def walk(parent: nn.Module) -> None:
        if id(parent) in visited:
            return
        visited.add(id(parent))
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) in made:
                setattr(parent, name, made[id(child)][1])
            elif match(child):
                made[id(child)] = (child, make(child))
                setattr(parent, name, made[id(child)][1])
            else:
                walk(child)

    walk(module)


def _freezable(m: nn.Module) -> bool:
    kind = type(m)
    return (kind in _RANK or kind in _ANY_RANK or kind in _PINNED) and getattr(
        m, "running_mean", None
    ) is not None


def _mode(frozen: nn.Module, model_training: bool) -> bool:
    """The train/eval flag a layer gets back: the model's, unless the user had set the layer apart."""
    recorded = frozen.__dict__.get("_unfrozen_training")
    if recorded is None or frozen.__dict__.get("_unfrozen_follows_model", True):
        return model_training
    return bool(recorded)


@torch.no_grad()
def _unfrozen_from(frozen: fam._FrozenBatchNorm, training: bool) -> nn.Module:
    rank = _RANK_OF_FROZEN[type(frozen)]
    default = nk_bn.__dict__[f"BatchNorm{rank}d"] if rank is not None else nk_sync._BatchNormXd
    cls = getattr(frozen, "_unfrozen_cls", None) or default
    kwargs = dict(getattr(frozen, "_unfrozen_kwargs", None) or {})
    bias = kwargs.pop("bias", frozen.bias is not None or not frozen.affine)
    if issubclass(cls, nk_bn._BatchNorm):
        kwargs.setdefault("unbiased_running_var", frozen.unbiased_running_var)
    rm = frozen.running_mean
    bn = build_norm(  # (torch's BN too: an affine without bias stays so)
        cls,
        frozen.num_features,
        bias=bias,
        eps=frozen.eps,
        momentum=frozen.momentum,
        affine=frozen.affine,
        device=rm.device,
        dtype=rm.dtype,
        **kwargs,
    )
    for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        src = getattr(frozen, key)
        dst = getattr(bn, key)
        if src is not None and dst is not None:
            dst.copy_(src)
    _set_requires_grad(bn, getattr(frozen, "_unfrozen_requires_grad", None))
    move_forward_hooks(frozen, bn)
    return bn.train(training)


def _set_requires_grad(bn: nn.Module, flags: tuple[bool, ...] | None) -> None:
    params = [p for p in (bn.weight, bn.bias) if p is not None]
    if flags is not None and len(flags) == len(params):
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


@torch.no_grad()
def _unpinned_from(frozen: nn.Module, training: bool) -> nn.Module:
    bn = _recast(frozen, frozen.__dict__.get("_unfrozen_cls") or _UNPINNED[type(frozen)])
    buffers = dict(bn._buffers)
    affine = {k: buffers.pop(k, None) for k in ("weight", "bias")}
    bn.__dict__["_buffers"] = buffers
    bn.__dict__["_parameters"] = {
        **{k: None if t is None else nn.Parameter(t.clone()) for k, t in affine.items()},
        **bn._parameters,
    }
    for key in _RECORD:
        bn.__dict__.pop(key, None)
    _set_requires_grad(bn, frozen.__dict__.get("_unfrozen_requires_grad"))
    return bn.train(training)


def unfreeze_bn(model: nn.Module, *, inplace: bool = True) -> nn.Module:
    """Undo :func:`freeze_bn`: every frozen layer becomes the BN class it came from (normkit's
    ``BatchNorm*d`` when built directly), with trainable ``weight``/``bias`` Parameters (their
    ``requires_grad`` as before freezing) and the same values; returns the model.

    Each layer gets the train/eval mode of ``model``, except a layer that had another mode than
    the model when it was frozen (a BN deliberately kept in eval inside a training model): it gets
    that mode back. A single frozen layer gets the mode it had.

    Args:
        model: the model (changed in place unless ``inplace=False``), or a single frozen layer.
        inplace: ``False`` works on a deep copy and leaves ``model`` untouched.

    Example:
        >>> import torch, normkit
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.BatchNorm1d(4))
        >>> _ = net[2].eval()                                # kept in eval on purpose
        >>> net = normkit.surgery.unfreeze_bn(normkit.surgery.freeze_bn(net))
        >>> type(net[1]), net[1].weight.requires_grad
        (<class 'torch.nn.modules.batchnorm.BatchNorm1d'>, True)
        >>> net[1].training, net[2].training
        (True, False)
    """
    check_model(model, "unfreeze_bn", lazy="norms")
    if not inplace:
        model = copy.deepcopy(model)

    def make(frozen: nn.Module, training: bool) -> nn.Module:
        if type(frozen) in _UNPINNED:
            return _unpinned_from(frozen, training)
        return _unfrozen_from(frozen, training)  # type: ignore[arg-type]

    def match(m: nn.Module) -> bool:
        return type(m) in _RANK_OF_FROZEN or type(m) in _UNPINNED

    for layer in model.modules():  # Keras's layers freeze_bn set to trainable=False
        if isinstance(layer, fam.BatchNormalization) and layer.__dict__.pop("_unfrozen_trainable", False):
            layer.trainable = True
    if match(model):  # a single layer: the mode it had when frozen
        recorded = model.__dict__.get("_unfrozen_training")
        return make(model, model.training if recorded is None else bool(recorded))
    training = model.training
    _swap(model, lambda frozen: make(frozen, _mode(frozen, training)), match)
    return model
