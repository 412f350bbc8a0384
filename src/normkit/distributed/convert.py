"""Swap a model's batch-norm layers for :class:`~normkit.nn.SyncBatchNorm` and back, losing nothing.

``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` converts every ``_BatchNorm`` subclass to
torch's SyncBatchNorm, which refuses CPU tensors (and DDP refuses it on CPU modules), and it
silently drops a subclass's own forward (Ghost BN's chunking, Batch Renorm's correction,
an activation). These functions convert only the layers whose behaviour SyncBatchNorm keeps,
refuse the others by name, and share the original Parameter and buffer objects, so nothing is
copied or lost: values, ``requires_grad``, ``num_batches_tracked``, device and dtype.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from .._errors import NormError
from ..nn import batch_norm as nk_bn
from ..nn import batch_norm_family as fam
from ..nn._base import build_norm, move_forward_hooks
from ..nn.norm_act import BatchNormAct2d
from ..nn.sync_batch_norm import SyncBatchNorm, SyncBatchNormAct, _BatchNormXd

__all__ = ["convert_sync_batchnorm", "revert_sync_batchnorm"]

# Layers whose forward is BN's own: SyncBatchNorm reproduces it exactly (with one process).
_PLAIN: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nk_bn.BatchNorm1d,
    nk_bn.BatchNorm2d,
    nk_bn.BatchNorm3d,
    _BatchNormXd,
)
_TORCH_TO_NORMKIT: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: nk_bn.BatchNorm1d,
    nn.BatchNorm2d: nk_bn.BatchNorm2d,
    nn.BatchNorm3d: nk_bn.BatchNorm3d,
}


# Searched along a layer's MRO: the first one found must supply its forward unchanged.
_KNOWN: tuple[type[nn.Module], ...] = (*_PLAIN, BatchNormAct2d, nk_bn._BatchNorm, _TorchBatchNorm)


def _known_base(m: nn.Module) -> type[nn.Module] | None:
    """The known BN class whose forward ``m`` runs unchanged, else ``None`` (a forward of its own)."""
    cls = type(m)
    for base in cls.__mro__:
        if base in _KNOWN:
            same_forward = cls.forward is base.forward
            same_core = getattr(cls, "_forward", None) is getattr(base, "_forward", None)
            return base if same_forward and same_core else None
    return None


def _refusal(m: nn.Module, path: str) -> str:
    where = f"layer {path!r}" if path else "the model"
    name = type(m).__name__
    keep = "or keep it per process with convert_sync_batchnorm(..., unsupported='keep')"
    if isinstance(m, fam.BatchNormalization):
        why = (
            f"a BatchNormalization keeps Keras's conventions (statistics along axis={m.axis}, Keras's "
            "momentum, the biased variance), which no SyncBatchNorm has"
        )
        fix = (
            "convert it with normkit.convert.from_keras_bn (a BatchNorm on the channels-first view) first "
            f"if you want synchronised statistics, {keep}"
        )
    elif isinstance(m, fam._GhostBatchNorm):
        why = (
            f"a {name} normalizes each chunk of ghost_batch_size={m.ghost_batch_size} samples of a "
            "process's batch on its own, and a SyncBatchNorm would replace that with statistics over "
            "every process's whole batch (silently dropping the Ghost BN forward)"
        )
        fix = f"replace it with BatchNorm{name[-2:]} first if you want synchronised statistics, {keep}"
    elif isinstance(m, fam._BatchRenorm):
        why = (
            f"a {name} corrects the batch statistics towards its running ones (r, d), which a "
            "SyncBatchNorm does not do (its Batch Renorm forward would be silently dropped)"
        )
        fix = f"replace it with BatchNorm{name[-2:]} first if you want synchronised statistics, {keep}"
    elif isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():  # type: ignore[attr-defined]
        why = f"a {name} has no shape yet"
        fix = f"run one forward pass first, so that it becomes a BatchNorm, {keep}"
    else:
        why = (
            f"{name} overrides BatchNorm's forward, which a SyncBatchNorm would silently drop; only "
            "torch.nn.BatchNorm1d/2d/3d, torch.nn.SyncBatchNorm, normkit's BatchNorm1d/2d/3d, "
            "BatchNormAct2d and subclasses that keep their forward convert"
        )
        fix = f"convert it yourself, {keep}"
    return f"convert_sync_batchnorm: {where} is not converted: {why}; {fix}"


def _placement(m: nn.Module) -> dict[str, Any]:
    for t in (getattr(m, "weight", None), getattr(m, "running_mean", None), getattr(m, "bias", None)):
        if isinstance(t, torch.Tensor):
            return {"device": t.device, "dtype": t.dtype}
    return {}


def _share_state(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` the very Parameter and buffer objects of ``src`` (values, requires_grad, device kept)."""
    for name in ("weight", "bias"):
        p = getattr(src, name, None)
        if p is not None:
            setattr(dst, name, p)
    for name in ("running_mean", "running_var", "num_batches_tracked", "num_skipped_updates"):
        b = src._buffers.get(name)
        if b is not None and name in dst._buffers:
            dst._buffers[name] = b
    dst.track_running_stats = src.track_running_stats
    dst.training = src.training
    if hasattr(src, "qconfig"):
        dst.qconfig = src.qconfig  # type: ignore[assignment]


def _bn_kwargs(m: Any) -> dict[str, Any]:
    return {
        "eps": m.eps,
        "momentum": m.momentum,
        "affine": m.affine,
        "track_running_stats": m.running_mean is not None,
        **_placement(m),
        "bias": m.bias is not None or not m.affine,
    }


@torch.no_grad()
def _to_sync(m: Any, base: type[nn.Module], group: Any) -> SyncBatchNorm:
    kw = {**_bn_kwargs(m), "unbiased_running_var": getattr(m, "unbiased_running_var", True)}
    if group is None and isinstance(m, nn.SyncBatchNorm):
        group = m.process_group  # torch's layer already had one: keep it
    if base is BatchNormAct2d:
        act: Any = m.activation
        sync: SyncBatchNorm = SyncBatchNormAct(m.num_features, activation=act, process_group=group, **kw)
    else:
        sync = SyncBatchNorm(m.num_features, process_group=group, **kw)
    _share_state(m, sync)
    # What revert_sync_batchnorm rebuilds (a plain attribute: not in the state_dict).
    # A base that is not a concrete BN class of a known rank reverts to normkit's BatchNorm for 2D-5D.
    concrete = base not in (nn.SyncBatchNorm, nk_bn._BatchNorm, _TorchBatchNorm)
    sync._bn_cls = base if concrete else None  # type: ignore[assignment]
    return sync


def _swap(module: nn.Module, make: Any, prefix: str = "") -> nn.Module:
    new = make(module, prefix)
    if new is not module:
        move_forward_hooks(module, new)  # (a feature or output hook on the layer keeps running)
        return new
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        swapped = _swap(child, make, f"{prefix}.{name}" if prefix else name)
        if swapped is not child:
            setattr(module, name, swapped)
    return module


def convert_sync_batchnorm(
    model: nn.Module,
    process_group: Any = None,
    *,
    unsupported: Literal["raise", "keep"] = "raise",
) -> nn.Module:
    """Replace every batch-norm layer of ``model`` by a :class:`~normkit.nn.SyncBatchNorm`; returns the model.

    Converted (in place, like torch's ``convert_sync_batchnorm``): ``torch.nn.BatchNorm1d/2d/3d``,
    ``torch.nn.SyncBatchNorm`` (which cannot run on CPU), normkit's ``BatchNorm1d/2d/3d``, and
    subclasses that keep BN's forward; :class:`~normkit.nn.BatchNormAct2d` becomes a
    :class:`~normkit.nn.SyncBatchNormAct` with the same activation. Each new layer takes over the
    original's Parameter and buffer *objects* (weight, bias, running statistics,
    ``num_batches_tracked``), so values, ``requires_grad``, device, dtype and any optimizer that
    holds the Parameters are unchanged; ``eps``, ``momentum``, ``affine``, ``track_running_stats``,
    ``unbiased_running_var`` and the train/eval flag are kept. :func:`revert_sync_batchnorm`
    rebuilds the original classes.

    Layers with a forward of their own that SyncBatchNorm would silently drop (Ghost BN, Batch
    Renorm, Keras's :class:`~normkit.nn.BatchNormalization`, other subclasses that override
    ``forward``) raise a :class:`~normkit.NormError` that
    names the layer and what to do (``unsupported="keep"`` leaves them as they are, per process).
    Layers that are not batch norm (GroupNorm, LayerNorm, FrozenBatchNorm ...) are never touched.
    Existing normkit SyncBatchNorm layers stay, with ``process_group`` set when one is given.

    Args:
        model: the model, or a single BN layer (a new layer is then returned).
        process_group: the group the layers synchronise over (``None``: the whole world).
        unsupported: ``"raise"`` (default) or ``"keep"`` for layers that cannot be converted.

    Returns:
        The model with SyncBatchNorm layers. Convert before wrapping it in DDP and before building
        the optimizer (the Parameters are the same objects, so an existing optimizer still works).

    Example:
        >>> import torch, normkit
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
        >>> weight = net[1].weight
        >>> net = normkit.convert_sync_batchnorm(net)
        >>> type(net[1]).__name__, net[1].weight is weight
        ('SyncBatchNorm', True)
        >>> type(normkit.revert_sync_batchnorm(net)[1]).__name__
        'BatchNorm2d'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_sync_batchnorm: expected an nn.Module, got {type(model).__name__}")
    if unsupported not in ("raise", "keep"):
        raise NormError(f"convert_sync_batchnorm: unsupported must be 'raise' or 'keep', got {unsupported!r}")

    def convertible(m: nn.Module) -> type[nn.Module] | None:
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():  # type: ignore[operator]
            return None
        return _known_base(m)

    if unsupported == "raise":  # check everything first: a refused model is left as it was
        refused = [
            (path, m)
            for path, m in model.named_modules()
            if isinstance(m, fam.BatchNormalization)
            or (isinstance(m, _TorchBatchNorm) and not isinstance(m, SyncBatchNorm) and not convertible(m))
        ]
        if refused:
            path, m = refused[0]
            more = f" ({len(refused) - 1} more layer(s) like it)" if len(refused) > 1 else ""
            raise NormError(_refusal(m, path) + more)

    def make(m: nn.Module, path: str) -> nn.Module:
        if isinstance(m, SyncBatchNorm):
            if process_group is not None:
                m.process_group = process_group
            return m
        if not isinstance(m, _TorchBatchNorm):
            return m
        base = convertible(m)
        if base is None:  # unsupported="keep"
            return m
        return _to_sync(m, base, process_group)

    return _swap(model, make)


@torch.no_grad()
def _from_sync(m: Any) -> nn.Module:
    unbiased = getattr(m, "unbiased_running_var", True)
    if isinstance(m, SyncBatchNorm):
        fallback = BatchNormAct2d if isinstance(m, SyncBatchNormAct) else _BatchNormXd
        cls = getattr(m, "_bn_cls", None) or fallback
    else:  # torch.nn.SyncBatchNorm: its input rank is unknown
        cls = _BatchNormXd
    if not unbiased:  # torch's classes always store the unbiased variance
        cls = _TORCH_TO_NORMKIT.get(cls, cls)
    kw = _bn_kwargs(m)
    if issubclass(cls, nk_bn._BatchNorm):
        kw["unbiased_running_var"] = unbiased
    if issubclass(cls, BatchNormAct2d):
        kw["activation"] = m.activation
    bn = build_norm(cls, m.num_features, **kw)  # (cls may be torch's, which takes bias from 2.12)
    _share_state(m, bn)
    return bn


def revert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every SyncBatchNorm of ``model`` (normkit's or torch's) by a plain BN layer; returns the model.

    A layer made by :func:`convert_sync_batchnorm` becomes the class it came from
    (``torch.nn.BatchNorm2d`` stays torch's, normkit's stays normkit's, a
    :class:`~normkit.nn.SyncBatchNormAct` becomes a :class:`~normkit.nn.BatchNormAct2d`); any other
    SyncBatchNorm, whose input rank is unknown, becomes normkit's BatchNorm for 2D to 5D inputs.
    Parameter and buffer objects are shared as in :func:`convert_sync_batchnorm`, so every value,
    ``requires_grad``, ``num_batches_tracked``, device, dtype and the train/eval flag are kept.
    Use it to evaluate or export a model trained with SyncBatchNorm in a single process.

    Example:
        >>> import torch, normkit
        >>> net = torch.nn.Sequential(normkit.nn.BatchNorm1d(4).double())
        >>> _ = net(torch.randn(8, 4, dtype=torch.float64))
        >>> back = normkit.revert_sync_batchnorm(normkit.convert_sync_batchnorm(net))
        >>> type(back[0]).__name__, back[0].num_batches_tracked.item(), back[0].running_mean.dtype
        ('BatchNorm1d', 1, torch.float64)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"revert_sync_batchnorm: expected an nn.Module, got {type(model).__name__}")

    def make(m: nn.Module, path: str) -> nn.Module:
        if isinstance(m, (SyncBatchNorm, nn.SyncBatchNorm)):
            return _from_sync(m)
        return m

    return _swap(model, make)
