"""Swap the norm layers of any model for a registry spec ("gn", "ln+pn", "frozen_bn", ...), keeping what
keeps its meaning."""

from __future__ import annotations

import fnmatch
import inspect
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Union

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._errors import NormError
from ..nn import batch_norm as nk_bn
from ..nn import batch_norm_family as fam
from ..nn._base import move_forward_hooks
from ..nn._inspect import (
    ACT_FUNCTIONS,
    ACT_METHODS,
    BN_KINDS,
    NormInfo,
    activation_name,
    describe_norm,
    elementwise_activation,
    is_activation_module,
    pn_activation,
)
from ..nn.group_norm import GroupNorm
from ..nn.instance_norm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from ..nn.layer_norm import LayerNorm2d
from ..nn.norm_act import BatchNormAct2d, GroupNormAct2d, LayerNormAct2d, _SequentialNormAct, with_activation
from ..nn.proxy_norm import GroupNormProxyAct2d
from ..nn.registry import _REGISTRY, _SPEC, create_norm_layer, default_groups
from ._graph import (
    call_counts,
    check_model,
    deepcopy_model,
    functional_norms,
    module_paths,
    parametrized_reason,
    replace_module,
    trace_or_reason,
    uncompiled,
)

__all__ = ["ConversionReport", "Converted", "ConvertedLayer", "convert_norms"]

#: ``where=``: a callable ``(name, module) -> bool``, a glob on the module path (``"layer1.*"``), a
#: compiled regular expression (searched in the path), or a list of globs.
Where = Union[Callable[[str, nn.Module], bool], str, "re.Pattern[str]", list, tuple, None]

_BN = {1: nk_bn.BatchNorm1d, 2: nk_bn.BatchNorm2d, 3: nk_bn.BatchNorm3d}
_FROZEN = {1: fam.FrozenBatchNorm1d, 2: fam.FrozenBatchNorm2d, 3: fam.FrozenBatchNorm3d}
_RENORM = {1: fam.BatchRenorm1d, 2: fam.BatchRenorm2d, 3: fam.BatchRenorm3d}
_GHOST = {1: fam.GhostBatchNorm1d, 2: fam.GhostBatchNorm2d, 3: fam.GhostBatchNorm3d}
_IN = {1: InstanceNorm1d, 2: InstanceNorm2d, 3: InstanceNorm3d}
_CONV_RANK = {
    nn.Conv1d: 1,
    nn.Conv2d: 2,
    nn.Conv3d: 3,
    nn.ConvTranspose1d: 1,
    nn.ConvTranspose2d: 2,
    nn.ConvTranspose3d: 3,
}


class ConvertedLayer(NamedTuple):
    """One replaced layer: its path, what it was, what it became, what was carried over, its activation."""

    name: str
    source: str
    target: str
    kept: tuple[str, ...]
    dropped: tuple[str, ...]
    activation: str


@dataclass
class ConversionReport:
    """What :func:`convert_norms` changed and what it left, with the reasons.

    Attributes:
        to: the spec.
        converted: the replaced layers.
        skipped: ``(path, class, reason)`` for norm-like layers left as they were.
        excluded: paths of norm layers ``where=`` left out.
        fused: ``(norm path, activation)`` pairs that became one norm+activation block.
        unfused: ``(norm path, reason)`` for norms of a norm+activation spec with no activation to
            fuse (they became the spec's plain norm, e.g. ``"ln"`` for ``"ln+pn"``).
        method: how norm/activation pairs were found (``"torch.fx"``, or Sequential adjacency and why).
        graph_module: why the result is a ``torch.fx.GraphModule`` (activations that were functions or
            shared modules had to leave the graph), or ``""`` when the model kept its class.
        op: the tool that made the report (``"convert_norms"``, or ``"to_torch_nn"``).
    """

    to: str
    converted: list[ConvertedLayer] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    fused: list[tuple[str, str]] = field(default_factory=list)
    unfused: list[tuple[str, str]] = field(default_factory=list)
    method: str = "torch.fx"
    graph_module: str = ""
    op: str = "convert_norms"

    def table(self) -> str:
        """The report as a plain-text table (what ``str(report)`` gives)."""
        head = ("layer", "was", "now", "kept", "activation")
        rows = [
            (c.name or "<root>", c.source, c.target, ", ".join(c.kept) or "-", c.activation or "-")
            for c in self.converted
        ]
        widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(head)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        head_line = f"{self.op} to {self.to!r}: {len(self.converted)} converted, {len(self.skipped)} skipped"
        if self.op == "convert_norms":
            head_line += f", {len(self.fused)} norm+activation pairs fused ({self.method})"
        lines = [head_line]
        lines += [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r).rstrip() for r in rows]
        dropped: dict[str, list[str]] = {}
        for c in self.converted:
            for d in c.dropped:
                dropped.setdefault(d, []).append(c.name or "<root>")
        for what, names in dropped.items():
            lines.append(f"  dropped {what}: {', '.join(names)}")
        unfused: dict[str, list[str]] = {}
        for name, why in self.unfused:
            unfused.setdefault(why, []).append(name)
        for why, names in unfused.items():
            lines.append(f"  no activation fused ({why}): {', '.join(names)}")
        for name, cls, why in self.skipped:
            lines.append(f"  skipped {name} ({cls}): {why}")
        if self.excluded:
            lines.append(f"  excluded by where=: {', '.join(self.excluded)}")
        if self.graph_module:
            lines.append(f"  returned a torch.fx.GraphModule: {self.graph_module}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


class Converted(NamedTuple):
    """:func:`convert_norms`'s result: the new model and the report."""

    model: nn.Module
    report: ConversionReport


# --- the spec --------------------------------------------------------------------------------------


class _Spec(NamedTuple):
    text: str
    base: str
    arg: int | None
    with_act: bool  # a norm+activation spec (Proxy Norm): the activation goes inside the layer


def _parse(to: Any) -> _Spec:
    if not isinstance(to, str):
        raise TypeError(
            f"convert_norms: to must be a norm spec string such as 'gn' or 'ln+pn', got {type(to).__name__}"
        )
    text = to.strip().lower()
    match = _SPEC.match(text)
    key = match["base"] + match["suffix"] if match else None
    if match is None or key not in _REGISTRY:
        raise NormError(
            f"convert_norms: unknown norm spec {to!r}; expected one of {', '.join(sorted(_REGISTRY))} "
            "(optionally with ':<int>', e.g. 'gn:16')"
        )
    with_act = bool(getattr(_REGISTRY[key][0], "includes_activation", False))
    arg = int(match["arg"]) if match["arg"] is not None else None
    return _Spec(text, key, arg, with_act)


def _plain_base(spec: _Spec, num_channels: int) -> _Spec:
    """The plain norm of a norm+activation spec:
    ``ln+pn -> ln``, ``gn:4+pn -> gn:4``, ``gn+pn -> gn`` (4 groups)."""
    base = spec.base.split("+")[0]
    arg = spec.arg
    if spec.base == "gn+pn" and arg is None:
        arg = default_groups(num_channels, 4)
    return _Spec(base if arg is None else f"{base}:{arg}", base, arg, False)


# --- building the new layer --------------------------------------------------------------------------


class _Place(NamedTuple):
    """Where a norm sits: the spatial rank of its input (if known) and whether a Linear feeds it."""

    rank: int | None
    after_linear: bool


def _build(
    spec: _Spec, info: NormInfo, place: _Place, act: Any, transfer: bool, factory: dict[str, Any]
) -> tuple[nn.Module, list[str]]:
    """The new layer (with ``act`` inside or after it when not None) and notes on how it was chosen."""
    c, notes = info.num_channels, []
    base, arg = spec.base, spec.arg
    rank = place.rank
    explicit = {"bn1d": 1, "bn2d": 2, "bn3d": 3, "in1d": 1, "in3d": 3}.get(base)
    if explicit is not None:
        if rank is not None and rank != explicit and not (explicit == 1 and place.after_linear):
            raise NormError(f"the spec is for {explicit}d inputs but the layer normalizes {rank}d ones")
        rank = explicit
    if rank is None:
        rank = 2
        if base in ("bn", "frozen_bn", "brn", "gbn", "in"):
            notes.append("input rank unknown, assumed 2d")
    keep = transfer
    eps = {"eps": info.eps} if keep else {}
    same_family = info.kind in BN_KINDS
    # (momentum None is the cumulative average: carried over as it is)
    mom = {"momentum": info.momentum} if keep and same_family else {}
    unbiased = (
        {"unbiased_running_var": info.extra.get("unbiased_running_var", True)} if keep and same_family else {}
    )
    # (a layer without affine, or without bias, stays so, whatever the new norm: no learnable affine
    # appears that the user had switched off, and within a family its checkpoint still loads)
    aff = _affine_flags(info) if keep else {}
    # (batch statistics in eval too, track_running_stats=False, stay so between batch norms)
    track = (
        {"track_running_stats": bool(info.extra.get("track_running_stats", info.has_running_stats))}
        if keep and same_family
        else {}
    )
    no_tracking = track.get("track_running_stats") is False
    layer: nn.Module
    if spec.with_act and base not in ("ln+pn", "gn+pn"):  # a norm+activation the user registered
        return _registered(spec.text, c, aff, track, notes, factory, activation=act), notes
    if spec.with_act:
        groups = 1 if base == "ln+pn" else (arg if arg is not None else default_groups(c, 4))
        _check_groups(place, c, groups)
        pn_kw: dict[str, Any] = {}
        if keep and info.kind == "pn":
            pn_kw = {
                "eps": info.eps,
                "proxy_eps": info.extra["proxy_eps"],
                "num_points": info.extra["num_points"],
            }
        pn = GroupNormProxyAct2d(c, num_groups=groups, activation=act, **pn_kw, **factory)
        _fix_affine(pn, aff, notes)
        return pn, notes
    if base in ("bn", "bn1d", "bn2d", "bn3d"):
        kw = {**eps, **mom, **track, **unbiased, **aff, **factory}
        if act is not None and rank == 2:
            return BatchNormAct2d(c, activation=act, **kw), notes
        layer = _BN[rank](c, **kw)
    elif base == "frozen_bn":
        if keep and not info.has_running_stats:
            raise NormError(
                "frozen_bn normalizes with running statistics and this layer has none to give it "
                "(pass transfer=False for a frozen BN at running mean 0 and variance 1)"
            )
        layer = _FROZEN[rank](c, **eps, **mom, **unbiased, **aff, **factory)
    elif base == "brn":
        if no_tracking:
            raise NormError(
                "it has track_running_stats=False (batch statistics in eval too), and Batch Renorm corrects "
                "the batch statistics towards running ones, so it needs them; convert it to 'bn' or 'gbn' "
                "(which keep track_running_stats=False), or pass transfer=False for a fresh Batch Renorm"
            )
        layer = _RENORM[rank](c, **eps, **mom, **unbiased, **aff, **factory)
    elif base == "gbn":
        layer = _GHOST[rank](
            c,
            ghost_batch_size=arg if arg is not None else 32,
            **eps,
            **mom,
            **track,
            **unbiased,
            **aff,
            **factory,
        )
    elif base in ("in", "in1d", "in3d"):
        if place.after_linear:
            raise NormError(
                "it normalizes the (N, C) output of a Linear layer: "
                "instance norm would see one value per channel"
            )
        in_stats = (
            {"track_running_stats": True, "momentum": info.momentum}
            if keep and info.kind == "in" and info.has_running_stats
            else {}
        )
        layer = _IN[rank](c, **{"affine": True, **aff}, **eps, **in_stats, **factory)
    elif base == "gn":
        groups = arg if arg is not None else default_groups(c)
        _check_groups(place, c, groups)
        if act is not None:
            return GroupNormAct2d(c, groups, act, **eps, **aff, **factory), notes
        layer = GroupNorm(groups, c, **eps, **aff, **factory)
    elif base in ("ln", "ln2d"):
        if place.after_linear or (rank == 1 and base == "ln" and info.kind != "ln"):
            # (N, C) features, or a 1d layer that may see them: GroupNorm(1, C) is LN over all of C (and L).
            _check_groups(place, c, 1)
            notes.append("GroupNorm(1, C): LayerNorm over the features of an (N, C) or (N, C, L) input")
            layer = GroupNorm(1, c, **eps, **aff, **factory)
            if act is not None:
                return GroupNormAct2d(c, 1, act, **eps, **aff, **factory), notes
        else:
            over = "chw" if base == "ln" else "c"
            if act is not None:
                return LayerNormAct2d(c, act, over=over, **eps, **aff, **factory), notes
            layer = LayerNorm2d(c, **eps, over=over, **aff, **factory)
    elif base == "none":
        layer = nn.Identity()
    else:  # a norm registered by the user: built as the registry builds it
        layer = _registered(spec.text, c, aff, track, notes, factory)
    if act is not None:
        return with_activation(layer, act), notes
    return layer, notes


def _check_groups(place: _Place, c: int, groups: int) -> None:
    """Refuse a group norm that would see one value per group on the ``(N, C)`` output of a Linear layer
    (it fails at the first forward otherwise), as ``"in"`` does."""
    if not place.after_linear or c // groups > 1:
        return
    fix = (
        f"use 'gn:{default_groups(c, c // 2)}' (2 channels or more per group) or 'ln'"
        if c > 1
        else "with one feature there is nothing to normalize per sample"
    )
    raise NormError(
        f"it normalizes the (N, C) output of a Linear layer: a group norm of {groups} group(s) of "
        f"{c // groups} channel would see one value per group; {fix} (or leave the layer out with where=)"
    )


def _registered(
    spec: str,
    c: int,
    aff: dict[str, bool],
    track: dict[str, bool],
    notes: list[str],
    factory: dict[str, Any],
    **kw: Any,
) -> nn.Module:
    """A norm registered by the user (or ``"syncbn"``), built as the registry builds it, with the source's
    affine and track_running_stats flags where it takes them."""
    try:
        layer = create_norm_layer(spec, c, **aff, **track, **kw, **factory)
    except TypeError:
        layer = create_norm_layer(spec, c, **kw, **factory)
        norm = _norm_part(layer)
        if track.get("track_running_stats") is False and isinstance(
            getattr(norm, "running_mean", None), Tensor
        ):
            raise NormError(
                f"it has track_running_stats=False (batch statistics in eval too) and {type(norm).__name__} "
                "takes no track_running_stats argument, so it would normalize with running statistics in "
                "eval; pass transfer=False to accept that"
            ) from None
        _fix_affine(norm, aff, notes)
    return layer


@torch.no_grad()
def _fix_affine(layer: nn.Module, aff: dict[str, bool], notes: list[str]) -> None:
    """Give a layer that always has an affine the source's "no affine" (or "no bias"): weight 1 and bias 0,
    not trainable (``requires_grad=False``), said in the report."""
    if not aff or (aff["affine"] and aff["bias"]):
        return
    off = ("weight", "bias") if not aff["affine"] else ("bias",)
    fixed = [k for k in off if isinstance(getattr(layer, k, None), nn.Parameter)]
    for key in fixed:
        t = getattr(layer, key)
        t.fill_(1.0 if key == "weight" else 0.0)
        t.requires_grad_(False)
    if fixed:
        what = "affine" if not aff["affine"] else "bias"
        values = " and ".join(f"{k} at {1 if k == 'weight' else 0}" for k in fixed)
        notes.append(
            f"{what} ({what}=False: {values}, requires_grad=False; {type(layer).__name__} always has them)"
        )


def _affine_flags(info: NormInfo) -> dict[str, bool]:
    """``affine`` / ``bias`` as the source layer has them."""
    if info.weight is None and info.bias is None:
        return {"affine": False}
    return {"affine": True, "bias": info.bias is not None}


def _norm_part(layer: nn.Module) -> nn.Module:
    return layer[0] if isinstance(layer, _SequentialNormAct) else layer


@torch.no_grad()
def _transfer(src: nn.Module, info: NormInfo, new: nn.Module, transfer: bool) -> tuple[list[str], list[str]]:
    """Copy what keeps its meaning from ``info`` into ``new``; return (kept, dropped) descriptions."""
    tgt = _norm_part(new)
    kept: list[str] = []
    dropped: list[str] = []
    tgt_info = describe_norm(tgt)
    tgt_kind = tgt_info.kind if isinstance(tgt_info, NormInfo) else None
    for key in ("weight", "bias"):
        s = getattr(info, key)
        t = getattr(tgt, key, None)
        if s is None:
            continue
        if isinstance(t, Tensor) and t.numel() == s.numel():
            if transfer:
                t.copy_(s.detach().reshape(t.shape))
                kept.append(key)
            if isinstance(s, nn.Parameter) and isinstance(t, nn.Parameter):
                t.requires_grad_(s.requires_grad)
        elif transfer:
            dropped.append(f"{key} ({type(tgt).__name__} has no per-channel {key})")
    if info.kind == "pn" and isinstance(tgt, GroupNormProxyAct2d):
        for key in ("proxy_bias", "proxy_weight"):
            s, t = info.extra[key], getattr(tgt, key)
            if transfer:
                t.copy_(s.detach())
                kept.append(key)
            t.requires_grad_(s.requires_grad)
    elif info.kind == "pn" and transfer:
        dropped.append(f"proxy_bias, proxy_weight ({type(tgt).__name__} has no proxy)")
    stats = info.has_running_stats
    tgt_stats = isinstance(getattr(tgt, "running_mean", None), Tensor)
    if stats and transfer:
        if info.kind in BN_KINDS and tgt_kind in BN_KINDS and tgt_stats:
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                s, t = getattr(info, key), getattr(tgt, key, None)
                if isinstance(s, Tensor) and isinstance(t, Tensor):
                    t.copy_(s.detach())
                    kept.append(key)
            if hasattr(
                tgt, "momentum"
            ):  # (a registered layer, built without it; None: the cumulative average)
                setattr(tgt, "momentum", info.momentum)  # noqa: B010 (nn.Module's __setattr__ typing)
        elif info.kind == "in" and tgt_kind == "in" and tgt_stats:
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                getattr(tgt, key).copy_(getattr(info, key).detach())
                kept.append(key)
        elif tgt_stats:
            dropped.append(
                f"running statistics (a {info.kind} layer's do not mean what a {tgt_kind} layer's do)"
            )
        else:
            dropped.append(f"running statistics ({type(tgt).__name__} has none)")
    if transfer and tgt_kind is not None and hasattr(tgt, "eps") and info.kind != "pn" and tgt_kind != "pn":
        setattr(tgt, "eps", info.eps)  # noqa: B010 (a registered layer is built without it)
        kept.append("eps")
    return kept, dropped


# --- finding the activation after a norm ---------------------------------------------------------------


class _Pair(NamedTuple):
    act: Any  # what goes into the new layer (name or callable)
    label: str  # for the report
    module_path: str | None  # an activation module to become Identity, or None
    node: torch.fx.Node | None  # a graph node to remove, or None


def _pair_in_graph(
    path: str, graph: torch.fx.Graph, modules: dict[str, nn.Module], counts: dict[str, int]
) -> _Pair | str:
    """The activation applied to this norm's output (and only to it), or why there is none."""
    if counts.get(path, 0) == 0:
        return "it is never called in the traced forward"
    if counts[path] > 1:
        return f"it is called {counts[path]} times"
    node = next(n for n in graph.nodes if n.op == "call_module" and str(n.target) == path)
    users = list(node.users)
    if len(users) != 1:
        return f"its output feeds {len(users)} nodes, so the pre-activation value is needed elsewhere"
    user = users[0]
    extra = user.args[1:]
    if (
        not user.args
        or user.args[0] is not node
        or any(isinstance(a, torch.fx.Node) for a in extra)
        or any(isinstance(v, torch.fx.Node) for v in user.kwargs.values())
    ):
        return f"it is followed by {_what(user)} that takes more than its output"
    if user.op == "call_module" and is_activation_module(modules.get(str(user.target))):
        mod = modules[str(user.target)]
        return _Pair(
            elementwise_activation(mod), f"{activation_name(mod)} ({user.target})", str(user.target), user
        )
    if user.op == "call_function" and user.target in ACT_FUNCTIONS:
        act = elementwise_activation(user.target, tuple(extra), dict(user.kwargs))
        return _Pair(act, f"{activation_name(act)} (function)", None, user)
    if user.op == "call_method" and user.target in ACT_METHODS and not extra:
        act = elementwise_activation(str(user.target))
        return _Pair(act, f"{activation_name(act)} (method)", None, user)
    return f"it is followed by {_what(user)}, not by an elementwise activation"


def _what(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target}"
    if node.op == "output":
        return "the model's output"
    return f"{node.op} {getattr(node.target, '__name__', node.target)}"


def _pair_in_sequential(path: str, model: nn.Module, paths: dict[int, list[str]], why: str) -> _Pair | str:
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not path or not isinstance(parent, nn.Sequential) or type(parent).forward is not nn.Sequential.forward:
        return f"not inside an nn.Sequential, and torch.fx could not trace the model ({why})"
    names = [n for n, _ in parent.named_children()]
    i = names.index(child)
    if i + 1 >= len(names):
        return "it is the last layer of its nn.Sequential"
    nxt = parent[i + 1]
    nxt_path = f"{parent_name}.{names[i + 1]}" if parent_name else names[i + 1]
    if not is_activation_module(nxt):
        return f"it is followed by {type(nxt).__name__} in its nn.Sequential"
    if len(paths[id(nxt)]) > 1:
        return (
            f"its activation {nxt_path} is shared with other places "
            f"(torch.fx could not trace the model: {why})"
        )
    return _Pair(elementwise_activation(nxt), f"{activation_name(nxt)} ({nxt_path})", nxt_path, None)


def _place(path: str, info: NormInfo, graph: torch.fx.Graph | None, modules: dict[str, nn.Module]) -> _Place:
    """The input rank (from the class, else from the conv before it in the graph) and whether a Linear feeds
    it."""
    rank, after_linear = info.rank, False
    if graph is not None:
        node = next((n for n in graph.nodes if n.op == "call_module" and str(n.target) == path), None)
        src = node.args[0] if node is not None and node.args else None
        while (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(modules.get(str(src.target)), (nn.Dropout, nn.Identity))
        ):
            src = src.args[0]
        prev = (
            modules.get(str(src.target))
            if isinstance(src, torch.fx.Node) and src.op == "call_module"
            else None
        )
        if prev is not None:
            for cls, r in _CONV_RANK.items():
                if isinstance(prev, cls):
                    rank = rank or r
            after_linear = isinstance(prev, nn.Linear)
            if after_linear:
                rank = rank or 1
    return _Place(rank, after_linear)


def _factory(info: NormInfo, fallback: Tensor | None) -> dict[str, Any]:
    ref = next((t for t in (info.weight, info.running_mean, info.bias) if isinstance(t, Tensor)), fallback)
    if ref is None:
        return {}
    return {"device": ref.device, "dtype": ref.dtype if ref.is_floating_point() else None}


def _selector(where: Where) -> Callable[[str, nn.Module], bool]:
    if where is None:
        return lambda name, m: True
    if isinstance(where, str):
        return lambda name, m: fnmatch.fnmatchcase(name, where)
    if isinstance(where, re.Pattern):
        return lambda name, m: where.search(name) is not None
    if isinstance(where, (list, tuple)) and all(isinstance(w, str) for w in where):
        return lambda name, m: any(fnmatch.fnmatchcase(name, w) for w in where)
    if callable(where):
        return lambda name, m: bool(where(name, m))
    raise TypeError(
        "convert_norms: where must be None, a callable (name, module) -> bool, a glob string, a compiled "
        f"regular expression or a list of globs, got {type(where).__name__}"
    )


def _refuses_its_calls(layer: nn.Module, path: str, graph: torch.fx.Graph | None) -> str:
    """The extra arguments (``mask=``) the model passes the layer at ``path`` that ``layer``'s forward
    cannot take, described; "" when it takes every call (or the model did not trace)."""
    if graph is None:
        return ""
    sig = inspect.signature(layer.forward)
    for node in graph.nodes:
        if node.op != "call_module" or node.target != path or (len(node.args) <= 1 and not node.kwargs):
            continue
        try:
            sig.bind(*node.args, **node.kwargs)
        except TypeError:
            extra = [f"{k}=" for k in node.kwargs] or [f"{len(node.args) - 1} more positional argument(s)"]
            return ", ".join(extra)
    return ""


def _short(m: nn.Module) -> str:
    rep = m.extra_repr()
    return f"{type(m).__name__}({rep})" if len(rep) <= 40 else type(m).__name__


def convert_norms(model: nn.Module, to: str, *, where: Where = None, transfer: bool = True) -> Converted:
    """Replace the norm layers of ``model`` by the registry spec ``to``; returns ``(new_model, report)``.

    Every norm layer is found, whatever its library: torch.nn's BatchNorm / SyncBatchNorm /
    InstanceNorm / GroupNorm, normkit's (BN family, GroupNorm, LayerNorm2d, InstanceNorm, the
    norm+activation layers, Proxy Norm blocks), and timm's / torchvision's norm and norm+activation
    layers (recognized by name and attributes; neither library is needed). It becomes ``to``
    (``"bn"``, ``"gn"``, ``"gn:8"``, ``"ln"``, ``"ln2d"``, ``"in"``, ``"frozen_bn"``, ``"gbn:16"``,
    ``"brn"``, ``"ln+pn"``, ``"gn:4+pn"``, ``"none"`` or any registered name) with the same channel
    count, input rank (a ``BatchNorm1d`` becomes ``BatchNorm1d`` for ``"bn"``), device, dtype,
    ``requires_grad`` and train/eval flag. With ``transfer`` the per-channel affine and eps always
    carry over, and the running statistics (and momentum) between batch norms (BN, frozen BN,
    Ghost BN, Batch Renorm), where they mean the same thing; the report lists what was dropped.
    So do the flags: a layer without affine (or without bias) gets none, whatever the new norm
    (Proxy Norm blocks, which always have one, get weight 1 and bias 0 with
    ``requires_grad=False``, said in the report), and ``track_running_stats=False`` (batch
    statistics in eval too) stays so between batch norms (``"brn"``, which needs running
    statistics, refuses such a layer).

    A norm+activation spec (Proxy Norm: ``"ln+pn"``, ``"gn:4+pn"``) takes the activation that
    follows the norm into the new block and removes it from the model: found with torch.fx where
    the model traces (``bn1`` then ``relu`` in a ResNet block, ``F.relu(bn(x))``), else by
    ``nn.Sequential`` adjacency; norm+activation layers bring their own. An activation module used
    only after fused norms becomes ``nn.Identity``; a function, or a module also used elsewhere (the
    ``relu`` a torchvision BasicBlock calls twice), is removed from the traced graph and the
    result is a ``torch.fx.GraphModule`` (said in the report). A norm with no activation after it
    becomes the spec's plain norm (``"ln"`` for ``"ln+pn"``, as the Proxy Norm authors do).

    The input model is never modified (the work is done on a deep copy).

    Args:
        model: any ``nn.Module`` (or a single norm layer).
        to: the registry spec of the new norms.
        where: which norm layers to convert: a callable ``(path, module) -> bool``, a glob on the
            path (``"layer1.*"``), a compiled regular expression (searched in the path), or a list
            of globs. Default: all.
        transfer: carry over affine parameters, eps and running statistics (False: fresh layers).

    Returns:
        ``Converted(model, report)`` (a named tuple); ``print(report)`` shows a table.

    Raises:
        NormError: an unknown spec, or a spec that does not fit a layer (``"gn:3"`` on 64
            channels; ``"in"``, or a group norm with one channel per group, on the ``(N, C)``
            output of a Linear layer, where it would see one value per group), naming the layer.

    Example:
        >>> import torch, normkit
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        ...                           torch.nn.Conv2d(8, 8, 3), torch.nn.BatchNorm2d(8))
        >>> new, report = normkit.convert_norms(net, "ln+pn")
        >>> [type(m).__name__ for m in new]
        ['Conv2d', 'GroupNormProxyAct2d', 'Identity', 'Conv2d', 'LayerNorm2d']
        >>> report.fused
        [('1', 'relu (2)')]
        >>> gn, _ = normkit.convert_norms(net, "gn:4")
        >>> gn[1], torch.equal(gn[1].weight, net[1].weight)
        (GroupNorm(4, 8, eps=1e-05, affine=True, bias=True), True)
    """
    op = "convert_norms"
    check_model(model, op)  # (an nn.Module, not TorchScript, no uninitialized lazy layer)
    model = uncompiled(model, op)
    spec = _parse(to)
    if not isinstance(transfer, bool):
        raise TypeError(f"{op}: transfer must be a bool, got {type(transfer).__name__}")
    selected = _selector(where)
    new = deepcopy_model(model, op)
    report = ConversionReport(to=spec.text)
    fallback = next((t for t in [*new.parameters(), *new.buffers()] if t.is_floating_point()), None)

    candidates: dict[str, NormInfo] = {}
    inside: list[str] = []
    for name, m in new.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        info = describe_norm(m)
        if info is None:
            continue
        inside.append(name)
        if not selected(name, m):
            report.excluded.append(name)
        elif isinstance(info, str):
            report.skipped.append((name or "<root>", type(m).__name__, info))
        elif parametrize.is_parametrized(m):
            report.skipped.append((name or "<root>", type(m).__name__, parametrized_reason(m, "converting")))
        else:
            candidates[name] = info

    graph, why = (
        trace_or_reason(new) if candidates and new is not None and "" not in candidates else (None, "")
    )
    if graph is None and why:
        report.method = f"nn.Sequential adjacency (torch.fx could not trace the model: {why})"
    for node, fn in functional_norms(graph) if graph is not None else ():
        report.skipped.append(
            (node, fn, "a function the forward calls, not a module: make it a norm module to convert it")
        )
    modules = dict(new.named_modules())
    counts = call_counts(graph) if graph is not None else {}
    paths = module_paths(new)

    pairs: dict[str, _Pair] = {}
    if spec.with_act:
        for name, info in candidates.items():
            if info.activation is not None:
                continue  # a norm+activation layer: its own activation goes in
            found = (
                _pair_in_graph(name, graph, modules, counts)
                if graph is not None
                else _pair_in_sequential(name, new, paths, why)
            )
            if isinstance(found, str):
                report.unfused.append((name, found))
            else:
                pairs[name] = found
        if graph is None and pairs:
            warnings.warn(
                f"convert_norms: torch.fx could not trace the model ({why}), so the activations fused "
                f"into {', '.join(p or '<root>' for p in pairs)} were found by nn.Sequential adjacency, "
                "which holds only where each nn.Sequential's own forward runs its children in order "
                "(not where the model calls them one by one or reuses them): compare the converted "
                "model's output with the original's on an input",
                stacklevel=2,
            )

    results: dict[str, nn.Module] = {}
    for name, info in candidates.items():
        src = modules[name]
        label = name or "<root>"
        pair = pairs.get(name)
        if spec.with_act and info.activation is not None:
            layer_spec, act = spec, pn_activation(info)
        elif spec.with_act and pair is not None:
            layer_spec, act = spec, pair.act
        elif spec.with_act:
            layer_spec, act = _plain_base(spec, info.num_channels), None
        else:
            layer_spec, act = spec, (pn_activation(info) if info.activation is not None else None)
        try:
            built, notes = _build(
                layer_spec, info, _place(name, info, graph, modules), act, transfer, _factory(info, fallback)
            )
        except NormError as exc:
            raise NormError(
                f"{op}: cannot convert '{label}' ({type(src).__name__}, {info.num_channels} channels) to "
                f"{spec.text!r}: {exc}"
            ) from None
        refused = _refuses_its_calls(built, name, graph)
        if refused:
            raise NormError(
                f"{op}: cannot convert '{label}' ({type(src).__name__}) to {spec.text!r}: the model calls "
                f"it with {refused}, which {type(built).__name__} does not take; convert it to a spec whose "
                "layer takes them ('bn', 'gn', 'in'), or leave it out with where="
            )
        if type(built) is type(src) and built.extra_repr() == src.extra_repr():
            report.skipped.append((label, type(src).__name__, f"already {_short(src)}"))
            continue
        kept, dropped = _transfer(src, info, built, transfer)
        built.train(src.training)
        hooks = move_forward_hooks(src, built)
        if hooks:
            notes = [*notes, f"its {hooks} forward hook(s) moved to the new layer"]
        if info.activation is not None:
            act_label = f"{activation_name(info.activation)} (in the layer)"
        elif pair is not None:
            act_label = pair.label
        else:
            act_label = ""
        if spec.with_act and act_label:
            report.fused.append((label, act_label))
        report.converted.append(
            ConvertedLayer(
                label,
                f"{type(src).__name__} ({info.describe()})",
                _short(built),
                tuple(kept),
                tuple(dropped + notes),
                act_label,
            )
        )
        results[name] = built

    if "" in results:  # the model itself was a norm layer
        return Converted(results[""], report)
    for name, built in results.items():
        for path in paths[id(modules[name])]:
            replace_module(new, path, built)

    # Activations fused into a new block leave the model: a module used only there becomes
    # Identity; functions and shared modules leave the traced graph (GraphModule).
    fused_calls: dict[str, int] = {}
    for name, pair in pairs.items():
        if name in results and pair.module_path is not None:
            fused_calls[pair.module_path] = fused_calls.get(pair.module_path, 0) + 1
    drop_nodes: list[torch.fx.Node] = []
    reasons: list[str] = []
    for name, pair in pairs.items():
        if name not in results:
            continue
        mp = pair.module_path
        if mp is not None and fused_calls[mp] == counts.get(mp, 1) and len(paths[id(modules[mp])]) == 1:
            replace_module(new, mp, nn.Identity())
        else:
            assert graph is not None and pair.node is not None
            drop_nodes.append(pair.node)
            reasons.append(
                f"{name}'s {pair.label}" + (" is also used elsewhere" if mp is not None else " is a function")
            )
    if drop_nodes:
        assert graph is not None
        for node in drop_nodes:
            node.replace_all_uses_with(node.args[0])  # type: ignore[arg-type]
            graph.erase_node(node)
        graph.lint()
        training = new.training
        new = torch.fx.GraphModule(new, graph, class_name=type(new).__name__)
        new.training = training
        report.graph_module = "; ".join(reasons)
    return Converted(new, report)
