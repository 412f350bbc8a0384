r"""Fold eval-mode batch norms into the conv / linear layer before them, model-wide (deployment).

In eval a BN layer is the per-channel affine map ``y = s * (z - mean) + beta`` with
``s = gamma / sqrt(running_var + eps)``; when ``z`` is a conv's or a linear layer's output the map
moves into that layer's weights exactly:

.. math::
    W' = s_{out} \cdot W, \qquad b' = s \cdot (b - \mu) + \beta

A ConvTranspose layer stores its weight as ``(C_in, C_out / groups, *k)``: the output channel of
``weight[i, j]`` is ``(i // (C_in / groups)) * (C_out / groups) + j``, so its scale is indexed that
way (the silent bug of pytorch PR #184076 and ultralytics PR #25364).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.fx
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from .._errors import NormError
from ..functional.activations import get_activation
from ..nn._base import forward_hook_count
from ..nn._inspect import BN_KINDS, NormInfo, describe_norm
from ..nn.batch_norm_family import BatchNormalization, _FrozenBatchNorm
from ._graph import (
    call_counts,
    check_model,
    deepcopy_model,
    functional_norms,
    is_singleton_view,
    max_abs_diff,
    module_paths,
    node_shape,
    possible_ranks,
    probe_input,
    propagate_shapes,
    replace_module,
    run_failure,
    trace_or_reason,
    uncompiled,
)

__all__ = ["FoldReport", "Folded", "fold_bn", "fold_bn_weights"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@torch.no_grad()
def fold_bn_weights(
    weight: Tensor,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    gamma: Tensor | None = None,
    beta: Tensor | None = None,
    *,
    transpose: bool = False,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    r"""The weight and bias of ``bn(layer(x))`` as one conv / linear layer (BN in eval mode).

    ``W' = s W`` along the output channels and ``b' = s (b - running_mean) + beta`` with
    ``s = gamma / sqrt(running_var + eps)``. Computed in float64 and rounded once to
    ``weight.dtype``; the folded weight keeps ``weight``'s memory format (channels_last stays).

    Args:
        weight: ``(C_out, C_in / groups, *k)`` for Linear / Conv, ``(C_in, C_out / groups, *k)``
            for ConvTranspose (``transpose=True``).
        bias: the layer's bias, or None (treated as 0).
        running_mean, running_var: the BN's running statistics, ``(C_out,)``.
        eps: the BN's eps.
        gamma, beta: the BN's affine, or None (1 and 0).
        transpose: the weight is a ConvTranspose weight.
        groups: the ConvTranspose's groups (a plain conv's weight needs none).

    Returns:
        ``(weight, bias)``, new tensors (the inputs are not modified).

    Example:
        >>> import torch
        >>> conv, bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4).eval()
        >>> _ = bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        >>> w, b = fold_bn_weights(
        ...     conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        ... )
        >>> x = torch.randn(2, 3, 8, 8)
        >>> torch.allclose(torch.nn.functional.conv2d(x, w, b), bn(conv(x)), atol=1e-5)
        True
    """
    for label, t in (("weight", weight), ("running_mean", running_mean), ("running_var", running_var)):
        if not isinstance(t, Tensor):
            raise TypeError(f"fold_bn_weights: {label} must be a Tensor, got {type(t).__name__}")
    if weight.dim() < 2:
        raise NormError(
            "fold_bn_weights: weight must have at least 2 dims (out, in, ...), got shape "
            f"{tuple(weight.shape)}"
        )
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise NormError(f"fold_bn_weights: groups must be a positive int, got {groups!r}")
    if transpose:
        if weight.shape[0] % groups:
            raise NormError(
                f"fold_bn_weights: a ConvTranspose weight's dim 0 ({weight.shape[0]}) must be divisible by "
                f"groups ({groups})"
            )
        out_channels = weight.shape[1] * groups
    else:
        out_channels = weight.shape[0]
    for label, t in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("gamma", gamma),
        ("beta", beta),
        ("bias", bias),
    ):
        if t is not None and t.numel() != out_channels:
            raise NormError(
                f"fold_bn_weights: {label} has {t.numel()} values but the layer has {out_channels} output "
                f"channels (weight shape {tuple(weight.shape)}, transpose={transpose}, groups={groups})"
            )
    acc = torch.float64 if weight.device.type != "mps" else torch.float32
    scale = (running_var.to(acc) + eps).rsqrt()
    if gamma is not None:
        scale = scale * gamma.to(acc)
    shift = -running_mean.to(acc) * scale
    if bias is not None:
        shift = shift + bias.to(acc) * scale
    if beta is not None:
        shift = shift + beta.to(acc)
    w = weight.to(acc)
    if transpose:
        # weight[i, j] feeds output channel (i // (C_in / groups)) * (C_out / groups) + j.
        c_in, per_group = weight.shape[0], weight.shape[1]
        grp = torch.arange(c_in, device=weight.device) // (c_in // groups)  # (C_in,)
        idx = (  # (C_in, C_out/g)
            grp[:, None] * per_group + torch.arange(per_group, device=weight.device)[None, :]
        )
        s = scale[idx].view(c_in, per_group, *([1] * (weight.dim() - 2)))
    else:
        s = scale.view(out_channels, *([1] * (weight.dim() - 1)))
    new_weight = torch.empty_like(weight).copy_(w * s)  # empty_like keeps channels_last
    new_bias = shift.to(dtype=weight.dtype)
    return new_weight, new_bias


class FoldedLayer(NamedTuple):
    """One fold: the BN's path, the layer it went into, and what replaced the BN."""

    norm: str
    into: str
    replaced_by: str


@dataclass
class FoldReport:
    """What :func:`fold_bn` did: the folds, the BN layers it left (with the reason), how it found them."""

    folded: list[FoldedLayer] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    max_abs_diff: float = 0.0
    method: str = "torch.fx"

    def __str__(self) -> str:
        lines = [
            (
                f"fold_bn ({self.method}): {len(self.folded)} folded, {len(self.skipped)} left; "
                f"max |folded - original| = {self.max_abs_diff:.3g}"
            )
        ]
        lines += [f"  folded  {f.norm} -> {f.into} (now {f.replaced_by})" for f in self.folded]
        lines += [f"  left    {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


class Folded(NamedTuple):
    """:func:`fold_bn`'s result: the folded model, the largest difference on the probe, the report."""

    model: nn.Module
    max_abs_diff: float
    report: FoldReport


class _Act(nn.Module):
    """The activation a folded norm+activation layer leaves behind, when it kept no module for it."""

    def __init__(self, activation: Any) -> None:
        super().__init__()
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        return get_activation(self.activation)(x)

    def extra_repr(self) -> str:
        a = self.activation
        return a if isinstance(a, str) else getattr(a, "__name__", type(a).__name__)


def _leftover(info: NormInfo, bn: nn.Module) -> nn.Module:
    """What stays where the BN was: Identity, or the norm+act layer's activation (and timm's drop)."""
    if info.activation is None:
        return nn.Identity()
    act = copy.deepcopy(info.act_module) if info.act_module is not None else _Act(info.activation)
    drop = getattr(bn, "drop", None)
    if isinstance(drop, nn.Dropout):
        return nn.Sequential(copy.deepcopy(drop), act)
    return act


def _foldable_layer(m: nn.Module | None) -> str | None:
    """Why a producer layer cannot take a BN, or None when it can."""
    if m is None:
        return "not a module"
    if not isinstance(m, (*_CONV, *_CONV_T, nn.Linear)):
        return f"{type(m).__name__} is not a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear"
    base = next(b for b in (*_CONV, *_CONV_T, nn.Linear) if isinstance(m, b))
    if type(m).forward is not base.forward or getattr(type(m), "_conv_forward", None) is not getattr(
        base, "_conv_forward", None
    ):
        return (
            f"{type(m).__name__} subclasses {base.__name__} with its own forward "
            "(e.g. weight standardization)"
        )
    if hasattr(m, "parametrizations") or m._forward_pre_hooks:
        return f"its weight is reparametrized (parametrization or pre-hook on {type(m).__name__})"
    if not isinstance(m.weight, nn.Parameter):
        return "its weight is not a Parameter"
    return None


def _check_bn(name: str, module: nn.Module, info: NormInfo, op: str) -> None:
    if info.kind == "bn" and module.training:
        raise NormError(
            f"{op}: '{name}' ({type(module).__name__}) is in training mode, where it normalizes with batch "
            "statistics; folding uses the running statistics of eval mode: call model.eval() first"
        )
    if not info.has_running_stats or (info.kind == "bn" and not getattr(module, "track_running_stats", True)):
        raise NormError(
            f"{op}: '{name}' ({type(module).__name__}) has no running statistics "
            "(track_running_stats=False), so it normalizes with batch statistics even in eval and cannot "
            "be folded into a fixed weight"
        )


def _find_pairs(
    model: nn.Module, graph: torch.fx.Graph, bn_paths: set[str], probed: bool = False
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``[(bn path, layer path)]`` that fold exactly, and ``[(bn path, why not)]`` for the rest.

    ``probed``: the shapes come from a generated probe, not from the user's input, so a Linear's
    output is taken as ``(N, C)`` only where the graph proves it (:func:`possible_ranks`).
    """
    modules = dict(model.named_modules())
    counts = call_counts(graph)
    ranks = possible_ranks(graph, modules) if probed else {}
    pairs: list[tuple[str, str]] = []
    left: list[tuple[str, str]] = []
    seen: set[str] = set()
    for node in graph.nodes:
        if node.op != "call_module" or str(node.target) not in bn_paths:
            continue
        name = str(node.target)
        if name in seen:
            continue
        seen.add(name)
        if counts[name] > 1:
            left.append((name, f"it is called {counts[name]} times"))
            continue
        if len(node.args) + len(node.kwargs) != 1:  # e.g. bn(x, mask): the Identity left could not take it
            left.append((name, "it is called with extra arguments"))
            continue
        if node.kwargs:
            left.append((name, f"it is called with a keyword argument ({next(iter(node.kwargs))}=...)"))
            continue
        src = node.args[0]
        while isinstance(src, torch.fx.Node) and is_singleton_view(src, modules) and len(src.users) == 1:
            src = src.args[0]  # (N, C) -> (N, C, 1, 1): CNN-4's head
        if not isinstance(src, torch.fx.Node) or src.op != "call_module":
            what = (
                f"{src.op} {getattr(src.target, '__name__', src.target)}"
                if isinstance(src, torch.fx.Node)
                else repr(src)
            )
            left.append((name, f"its input comes from {what}, not from a conv/linear layer"))
            continue
        layer_name = str(src.target)
        layer = modules.get(layer_name)
        why = _foldable_layer(layer)
        if why is None and counts[layer_name] > 1:
            why = f"'{layer_name}' is called {counts[layer_name]} times"
        if why is None and len(src.users) != 1:
            why = f"the output of '{layer_name}' also feeds {len(src.users) - 1} other node(s)"
        if why is None and (len(src.args) != 1 or src.kwargs):
            why = f"'{layer_name}' is called with extra arguments"
        if why is None and isinstance(layer, nn.Linear):
            shape = node_shape(src)
            if shape is None or len(shape) != 2:
                why = (
                    f"the Linear '{layer_name}' gives {shape if shape else 'an unknown shape'}: "
                    "its features are not dim 1"
                )
            elif probed and ranks.get(src) != frozenset({2}):
                # A Linear takes any rank: on an (N, L, F) input the BN after it normalizes dim 1 (L),
                # not the Linear's features, which a 2-D probe cannot show.
                why = (
                    f"the Linear '{layer_name}' may be given inputs of any rank (nothing before it fixes "
                    "its input to (N, features)), and on an (N, L, F) input the BN would normalize L, "
                    "not its features; the generated probe is 2-D and cannot tell: pass example_input "
                    "(a real batch) to fold it"
                )
        if why is None:
            bn = modules[name]
            info = describe_norm(bn)
            out_ch = layer.out_channels if hasattr(layer, "out_channels") else layer.out_features  # type: ignore[union-attr]
            if not isinstance(info, str) and info is not None and info.num_channels != out_ch:
                why = f"'{layer_name}' has {out_ch} outputs but the BN has {info.num_channels} channels"
        if why is not None:
            left.append((name, why))
        else:
            pairs.append((name, layer_name))
    return pairs, left


def _sequential_pairs(
    model: nn.Module, bn_paths: set[str], probed: bool = False
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Pairs from ``nn.Sequential`` adjacency, for models torch.fx cannot trace (a Linear only with the
    user's example input: without a graph nothing says what rank it is given)."""
    pairs: list[tuple[str, str]] = []
    linear: list[tuple[str, str]] = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Sequential) or type(m).forward is not nn.Sequential.forward:
            continue
        kids = list(m.named_children())
        for (a_name, a), (b_name, _) in itertools.pairwise(kids):
            full_b = f"{name}.{b_name}" if name else b_name
            if full_b in bn_paths and _foldable_layer(a) is None:
                a_path = f"{name}.{a_name}" if name else a_name
                (linear if probed and isinstance(a, nn.Linear) else pairs).append((full_b, a_path))
    found = {bn for bn, _ in pairs} | {bn for bn, _ in linear}
    left = [
        (p, "not directly after a conv/linear layer in an nn.Sequential") for p in sorted(bn_paths - found)
    ]
    left += [
        (
            bn,
            f"the Linear '{layer}' may be given inputs of any rank, and on an (N, L, F) input the BN would "
            "normalize L, not its features; torch.fx could not trace the model and the generated probe "
            "cannot tell: pass example_input (a real batch) to fold it",
        )
        for bn, layer in linear
    ]
    return pairs, left


@torch.no_grad()
def _fold_pair(model: nn.Module, bn_path: str, layer_path: str) -> str:
    bn = model.get_submodule(bn_path)
    layer: Any = model.get_submodule(layer_path)
    info = describe_norm(bn)
    assert isinstance(info, NormInfo) and info.running_mean is not None and info.running_var is not None
    transpose = isinstance(layer, _CONV_T)
    w, b = fold_bn_weights(
        layer.weight,
        layer.bias,
        info.running_mean,
        info.running_var,
        info.eps,
        info.weight,
        info.bias,
        transpose=transpose,
        groups=getattr(layer, "groups", 1) if transpose else 1,
    )
    grad = layer.weight.requires_grad
    layer.weight = nn.Parameter(w, requires_grad=grad)
    layer.bias = nn.Parameter(b, requires_grad=layer.bias.requires_grad if layer.bias is not None else grad)
    leftover = _leftover(info, bn)
    replace_module(model, bn_path, leftover)
    return type(leftover).__name__


@contextlib.contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    """Every module in eval for the block, each train/eval flag as it was afterwards."""
    flags = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def fold_bn(model: nn.Module, example_input: Any = None) -> Folded:
    """Fold every eval-mode BN layer of ``model`` into the Conv / ConvTranspose / Linear layer before it.

    torch.nn's BatchNorm1d/2d/3d and SyncBatchNorm, normkit's BN family (BatchNorm, GhostBatchNorm,
    BatchRenorm, FrozenBatchNorm, BatchNormAct2d) and timm's / torchvision's BN and frozen BN
    layers are folded when their input is the output of a Conv1d/2d/3d, ConvTranspose1d/2d/3d
    (any groups, depthwise included) or Linear that feeds nothing else: the layer's weight and
    bias absorb the BN (:func:`fold_bn_weights`) and the BN becomes ``nn.Identity`` (a
    norm+activation layer leaves its activation). A Linear is folded only on ``(N, C)`` features:
    on an ``(N, L, F)`` input the BN after it normalizes ``L``, not the Linear's outputs. So it
    must give 2-D outputs on ``example_input``, and without one the graph must prove it (a
    ``flatten(x, 1)``, ``x.view(n, -1)`` or global mean before it, see
    :func:`~normkit.surgery._graph.possible_ranks`): a Linear given the model's own input is left,
    with the reason. A BN elsewhere (after an addition, a pooling, a concatenation), or called
    with more than its input (``bn(x, mask)``), is left in place, with the reason in the report.
    The graph comes from ``torch.fx``; a model fx cannot trace is folded where a conv and a BN are
    neighbours in an ``nn.Sequential``.

    Both models are then run in eval mode (dropout off; every train/eval flag restored after) on
    ``example_input`` (or on a small random batch shaped for the model's first layer) and the
    largest absolute difference of their outputs is returned.

    Args:
        model: the model, in eval mode (left untouched; a folded deep copy is returned).
        example_input: a tensor, or a tuple of positional inputs, to compare the two models on.

    Returns:
        ``Folded(model, max_abs_diff, report)`` (a named tuple).

    Raises:
        NormError: a BN layer in training mode, or without running statistics; a lazy layer not
            initialized yet; a model that cannot be deep-copied; a model that fails on the input
            (the message names the layer and its error; for the generated probe, pass
            ``example_input``).
        TypeError: ``model`` is not an ``nn.Module``, or is a TorchScript module.

    Example:
        >>> import torch, normkit
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8),
        ...                           torch.nn.ReLU()).eval()
        >>> folded, diff, report = normkit.fold_bn(net)
        >>> type(folded[1]).__name__, diff < 1e-5, folded[0].bias is not None
        ('Identity', True, True)
        >>> normkit.fold_bn(net.train())
        Traceback (most recent call last):
        ...
        normkit._errors.NormError: fold_bn: '1' (BatchNorm2d) is in training mode, ...
    """
    op = "fold_bn"
    check_model(model, op)
    model = uncompiled(model, op)
    bn_paths: set[str] = set()
    unknown: list[tuple[str, str]] = []
    for name, m in model.named_modules():
        info = describe_norm(m)
        label = name or type(m).__name__
        if isinstance(info, NormInfo) and info.kind in BN_KINDS:
            _check_bn(label, m, info, op)
            bn_paths.add(name)
        elif isinstance(m, _FrozenBatchNorm) and not m.use_running_stats:
            raise NormError(
                f"{op}: '{label}' ({type(m).__name__}) has use_running_stats=False: it normalizes with batch "
                "statistics, so it cannot be folded into a fixed weight"
            )
        elif isinstance(info, str) and isinstance(m, (nn.modules.batchnorm._BatchNorm, BatchNormalization)):
            unknown.append((label, info))
    folded = deepcopy_model(model, op)
    report = FoldReport()
    graph, why = trace_or_reason(folded)
    probed = example_input is None
    if probed:
        example_input = probe_input(folded, op, graph)
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    what = f"{'probe' if probed else 'example'} input of shape {tuple(getattr(args[0], 'shape', ()))}"
    if graph is not None:
        gm = torch.fx.GraphModule(folded, graph)
        with _eval_mode(folded):
            propagate_shapes(gm, args, op, what, probed=probed)
        pairs, left = _find_pairs(folded, graph, bn_paths, probed)
        left += [
            (node, f"{fn}: a function the forward calls, not a module; make it a BN module to fold it")
            for node, fn in functional_norms(graph)
            if fn.endswith("batch_norm")
        ]
    else:
        report.method = f"nn.Sequential adjacency (torch.fx could not trace the model: {why})"
        pairs, left = _sequential_pairs(folded, bn_paths, probed)
    left += unknown
    paths = module_paths(folded)
    for bn_path, layer_path in pairs:
        if len(paths[id(folded.get_submodule(bn_path))]) > 1:
            left.append((bn_path, "the same BN module is reachable by several paths"))
            continue
        if forward_hook_count(folded.get_submodule(bn_path)):
            left.append((bn_path, "it has forward hooks, which folding it away would drop"))
            continue
        if folded.get_submodule(layer_path)._forward_hooks:
            left.append((bn_path, f"'{layer_path}' has forward hooks, which would see the folded output"))
            continue
        kept = _fold_pair(folded, bn_path, layer_path)
        report.folded.append(FoldedLayer(bn_path, layer_path, kept))
    report.skipped = left
    try:  # both in eval (dropout off), their train/eval flags restored after
        with torch.no_grad(), _eval_mode(model, folded):
            want, got = model(*args), folded(*args)
    except Exception as exc:
        raise run_failure(op, what, exc, probed=probed) from exc
    report.max_abs_diff = max_abs_diff(want, got)
    scale = max_abs_diff(want, tree_map(lambda t: t * 0 if isinstance(t, Tensor) else t, want))
    if report.folded and not report.max_abs_diff <= 1e-4 * (1.0 + scale):  # (NaN too)
        warnings.warn(
            f"{op}: the folded model differs from the original by {report.max_abs_diff:.3g} on the "
            f"{what} (outputs up to {scale:.3g}): a fold was not exact"
            + (
                " (torch.fx could not trace the model, so the folds were found by nn.Sequential adjacency, "
                "which holds only where each nn.Sequential's own forward runs its children in order)"
                if graph is None
                else ""
            ),
            stacklevel=2,
        )
    return Folded(folded, report.max_abs_diff, report)
