"""normkit's layers back to the ``torch.nn`` classes they extend, for tools that look layers up by type."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..nn import batch_norm as nk_bn
from ..nn import group_norm as nk_gn
from ..nn import instance_norm as nk_in
from ..nn import layer_norm as nk_ln
from ._graph import check_model, deepcopy_model, parametrized_reason, uncompiled
from .convert import ConversionReport, Converted, ConvertedLayer, Where, _selector

__all__ = ["to_torch_nn"]

#: normkit's layer -> the torch.nn class it extends (same arguments, parameters and state_dict keys)
_TWINS: dict[type[nn.Module], type[nn.Module]] = {
    nk_bn.BatchNorm1d: nn.BatchNorm1d,
    nk_bn.BatchNorm2d: nn.BatchNorm2d,
    nk_bn.BatchNorm3d: nn.BatchNorm3d,
    nk_gn.GroupNorm: nn.GroupNorm,
    nk_ln.LayerNorm: nn.LayerNorm,
    nk_in.InstanceNorm1d: nn.InstanceNorm1d,
    nk_in.InstanceNorm2d: nn.InstanceNorm2d,
    nk_in.InstanceNorm3d: nn.InstanceNorm3d,
}


def _template(m: Any) -> nn.Module:
    """The torch.nn twin of ``m`` with its arguments, on the meta device (for its attribute names)."""
    twin = _TWINS[type(m)]
    meta: dict[str, Any] = {"device": "meta"}
    if twin is nn.GroupNorm:
        return twin(m.num_groups, m.num_channels, m.eps, m.affine, **meta)
    if twin is nn.LayerNorm:
        return twin(m.normalized_shape, m.eps, m.elementwise_affine, m.bias is not None, **meta)
    return twin(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, **meta)


def _why_not(m: nn.Module) -> str | None:
    """Why ``m`` (a normkit layer with a torch.nn twin) cannot become it, or None."""
    if parametrize.is_parametrized(m):
        return parametrized_reason(m, "converting")
    affine = getattr(m, "affine", getattr(m, "elementwise_affine", False))
    if type(m) is not nk_ln.LayerNorm and affine and getattr(m, "bias", None) is None:
        return "a weight without a bias (bias=False): torch.nn's layer has both or neither"
    return None


def _notes(m: nn.Module) -> tuple[str, ...]:
    """What changes in training (eval computes the same): normkit's own rules the torch.nn layer lacks."""
    notes = ["num_skipped_updates"] if "num_skipped_updates" in m._buffers else []
    if getattr(m, "unbiased_running_var", True) is False:
        notes.append("unbiased_running_var=False (torch.nn stores the unbiased variance)")
    if isinstance(m, nk_in._InstanceNorm) and m.track_running_stats and m.momentum is None:
        notes.append("momentum=None's cumulative average (torch.nn's InstanceNorm takes it as 0)")
    return tuple(notes)


@torch.no_grad()
def _twin_of(m: nn.Module) -> nn.Module:
    """The torch.nn twin holding ``m``'s parameters, buffers (those torch's layer has), hooks and flags."""
    tmpl = _template(m)
    new = type(tmpl).__new__(type(tmpl))
    state = {k: m.__dict__.get(k, v) for k, v in tmpl.__dict__.items()}
    # the same Parameter objects (an optimizer built on the model still holds them), torch's buffers
    state["_parameters"] = {k: m._parameters.get(k) for k in tmpl._parameters}
    state["_buffers"] = {k: m._buffers.get(k) for k in tmpl._buffers}
    state["_non_persistent_buffers_set"] = set(tmpl._non_persistent_buffers_set)
    new.__dict__.update(state)
    return new


def to_torch_nn(model: nn.Module, *, where: Where = None) -> Converted:
    """Replace normkit's layers that extend a ``torch.nn`` class by that class; returns ``(model, report)``.

    For the tools that look layers up by exact ``type()``, not ``isinstance``: ``torch.ao.quantization``
    (``fuse_modules``, ``prepare`` / ``convert`` and FX graph mode ``prepare_fx`` / ``prepare_qat_fx``
    fuse and swap only ``torch.nn.BatchNorm2d`` itself; with normkit's, a convolution and its BN stay
    unfused, and eager quantization hands normkit's BN a quantized tensor), ``torch.fx``'s
    ``experimental.optimization.fuse`` and other converters keyed on the class. Converted:
    ``BatchNorm1d/2d/3d``, ``GroupNorm``, ``LayerNorm`` and ``InstanceNorm1d/2d/3d``; each new layer
    holds the old one's parameters (the same tensors), running statistics, forward hooks, flags
    and train/eval mode, so ``state_dict`` keys and eval outputs are unchanged. In training it then
    computes as torch.nn does: normkit's additions are gone (non-finite batches skipped and counted in
    ``num_skipped_updates``, ``mask=``, the biased running variance, InstanceNorm's cumulative
    average); the report lists them per layer.

    Left as they are, with the reason in the report: layers torch.nn has no class for (Batch Renorm,
    Ghost BN, LayerNorm2d, Proxy Norm, the norm + activation layers, frozen BN, normkit's
    ``SyncBatchNorm``: :func:`normkit.revert_sync_batchnorm` first), a weight without a bias
    (``bias=False``), and parametrized layers. The input model is never modified (the work is done on
    a deep copy); a ``torch.compile``'d model is unwrapped, with a warning.

    Args:
        model: any ``nn.Module`` (or a single norm layer).
        where: which layers to convert: a callable ``(path, module) -> bool``, a glob on the path, a
            compiled regular expression, or a list of globs. Default: all.

    Returns:
        ``Converted(model, report)`` (a named tuple); ``print(report)`` shows a table.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or is a TorchScript module.

    Example:
        >>> import torch, normkit
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), normkit.nn.BatchNorm2d(8), torch.nn.ReLU())
        >>> plain, report = normkit.surgery.to_torch_nn(net.eval())
        >>> type(plain[1]) is torch.nn.BatchNorm2d, plain[1].weight is not net[1].weight
        (True, True)
        >>> x = torch.randn(2, 3, 8, 8)
        >>> torch.equal(plain(x), net(x))
        True
        >>> fused = torch.ao.quantization.fuse_modules(plain, [["0", "1", "2"]])  # by exact type
        >>> type(fused[0]).__name__
        'ConvReLU2d'
    """
    op = "to_torch_nn"
    model = uncompiled(check_model(model, op, lazy="norms"), op)
    select = _selector(where)
    model = deepcopy_model(model, op)
    report = ConversionReport(to="torch.nn", op=op)
    made: dict[int, nn.Module] = {}

    def visit(path: str, m: nn.Module) -> nn.Module:
        if id(m) in made:
            return made[id(m)]
        if type(m) in _TWINS:
            if not select(path, m):
                report.excluded.append(path or "<root>")
                return m
            why = _why_not(m)
            if why is not None:
                report.skipped.append((path or "<root>", type(m).__name__, why))
                return m
            new = _twin_of(m)
            made[id(m)] = new
            report.converted.append(
                ConvertedLayer(path, f"normkit.nn.{type(m).__name__}", f"torch.nn.{type(new).__name__}",
                               ("parameters", "buffers", "hooks"), _notes(m), "")
            )  # fmt: skip
            return new
        ours = type(m).__module__.startswith("normkit.")
        if ours and _is_norm(m):
            report.skipped.append((path or "<root>", type(m).__name__, _no_twin(m)))
        elif not ours and isinstance(m, tuple(_TWINS)):  # a user's subclass of a normkit layer: kept
            base = next(c for c in type(m).__mro__ if c in _TWINS)
            why = (
                parametrized_reason(m, "converting")
                if parametrize.is_parametrized(m)  # (torch's generated Parametrized<Layer> class)
                else f"a subclass of normkit.nn.{base.__name__} (from {type(m).__module__}): its own "
                "class and code are kept; convert it yourself, or make it subclass the torch.nn layer"
            )
            report.skipped.append((path or "<root>", type(m).__name__, why))
        for child_name, child in list(m._modules.items()):
            if child is not None:
                new_child = visit(f"{path}.{child_name}" if path else child_name, child)
                if new_child is not child:
                    setattr(m, child_name, new_child)
        return m

    model = visit("", model)
    return Converted(model, report)


def _is_norm(m: nn.Module) -> bool:
    from ..nn._inspect import describe_norm

    return describe_norm(m) is not None


def _no_twin(m: nn.Module) -> str:
    name = type(m).__name__
    if "Sync" in name:
        return (
            "normkit's SyncBatchNorm has no single torch.nn twin; normkit.revert_sync_batchnorm(model) first"
        )
    if "Act" in name:
        return "a norm + activation layer: torch.nn has no such class"
    return "torch.nn has no such layer"
