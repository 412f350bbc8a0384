"""Freeze and unfreeze the batch-norm layers of a model (swap BN <-> FrozenBatchNorm)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..nn import batch_norm as nk_bn
from ..nn import batch_norm_family as fam
from ..nn._base import build_norm
from ._graph import check_model

__all__ = ["freeze_bn", "unfreeze_bn"]

# Exact types only: a subclass with its own forward (e.g. BatchNormAct2d) would lose behaviour.
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
_FROZEN = {1: fam.FrozenBatchNorm1d, 2: fam.FrozenBatchNorm2d, 3: fam.FrozenBatchNorm3d}
_RANK_OF_FROZEN = {fam.FrozenBatchNorm1d: 1, fam.FrozenBatchNorm2d: 2, fam.FrozenBatchNorm3d: 3}


@torch.no_grad()
def _frozen_from(bn: nn.Module, use_running_stats: bool, update_running_stats: bool) -> fam._FrozenBatchNorm:
    rm = bn.running_mean
    frozen = _FROZEN[_RANK[type(bn)]](
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
    # What unfreeze_bn needs to rebuild the original exactly (plain attributes: not in state_dict).
    frozen._unfrozen_cls = type(bn)
    frozen._unfrozen_kwargs = _extra_kwargs(bn)
    frozen._unfrozen_requires_grad = tuple(p.requires_grad for p in (bn.weight, bn.bias) if p is not None)
    return frozen


def _extra_kwargs(bn: nn.Module) -> dict[str, Any]:
    """Constructor arguments beyond torch BN's that a normkit BN-family layer needs to be rebuilt."""
    kw: dict[str, Any] = {}
    if isinstance(bn, nk_bn._BatchNorm):
        kw.update(bias=bn.bias is not None or not bn.affine, unbiased_running_var=bn.unbiased_running_var)
    if isinstance(bn, fam._GhostBatchNorm):
        kw.update(ghost_batch_size=bn.ghost_batch_size, momentum_mode=bn.momentum_mode)
    if isinstance(bn, fam._BatchRenorm):
        kw.update(r_max=bn.r_max, d_max=bn.d_max, warmup_steps=bn.warmup_steps)
    return kw


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
    return type(m) in _RANK and getattr(m, "running_mean", None) is not None


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
    ``torch.nn.BatchNorm1d/2d/3d`` and normkit's BatchNorm, GhostBatchNorm and BatchRenorm layers
    with running statistics; others (no running statistics, or subclasses with their own forward
    such as ``BatchNormAct2d``) are left alone. A BN reachable under several names (``self.head_norm
    = self.bn``) becomes one FrozenBatchNorm shared by all of them. :func:`unfreeze_bn` restores the
    original classes (one shared module again).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or is a TorchScript module.
        NormError: a lazy BN layer (``torch.nn.LazyBatchNorm2d``) not initialized yet.

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
    check_model(model, "freeze_bn", lazy="norms")
    if not inplace:
        model = copy.deepcopy(model)

    def make(bn: nn.Module) -> nn.Module:
        return _frozen_from(bn, use_running_stats, update_running_stats)

    if _freezable(model):
        return make(model)
    _swap(model, make, _freezable)
    return model


@torch.no_grad()
def _unfrozen_from(frozen: fam._FrozenBatchNorm, training: bool) -> nn.Module:
    rank = _RANK_OF_FROZEN[type(frozen)]
    cls = getattr(frozen, "_unfrozen_cls", None) or nk_bn.__dict__[f"BatchNorm{rank}d"]
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
    flags = getattr(frozen, "_unfrozen_requires_grad", None)
    params = [p for p in (bn.weight, bn.bias) if p is not None]
    if flags is not None and len(flags) == len(params):
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return bn.train(training)


def unfreeze_bn(model: nn.Module, *, inplace: bool = True) -> nn.Module:
    """Undo :func:`freeze_bn`: every FrozenBatchNorm becomes the BN class it came from (normkit's
    ``BatchNorm*d`` when built directly), with trainable ``weight``/``bias`` Parameters, the same
    values, and the train/eval mode of ``model``; returns the model.

    Example:
        >>> import torch, normkit
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> net = normkit.surgery.unfreeze_bn(normkit.surgery.freeze_bn(net))
        >>> type(net[1]), net[1].weight.requires_grad
        (<class 'torch.nn.modules.batchnorm.BatchNorm1d'>, True)
    """
    check_model(model, "unfreeze_bn", lazy="norms")
    if not inplace:
        model = copy.deepcopy(model)
    training = model.training

    def make(frozen: nn.Module) -> nn.Module:
        return _unfrozen_from(frozen, training)  # type: ignore[arg-type]

    def match(m: nn.Module) -> bool:
        return type(m) in _RANK_OF_FROZEN

    if match(model):
        return make(model)
    _swap(model, make, match)
    return model
