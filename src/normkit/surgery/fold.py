"""Folding normalization layers into the layer that follows them (inference)."""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
import torch.fx
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from .. import functional as F
from .._errors import NormError
from ..functional.activations import ActivationLike, get_activation
from ..nn.proxy_norm import GroupNormProxyAct2d, ProxyNormAct
from ._graph import (
    NormTracer,
    check_model,
    deepcopy_model,
    is_singleton_view,
    max_abs_diff,
    node_shape,
    propagate_shapes,
)
from .fold_bn import _foldable_layer

__all__ = ["FoldedProxyAct", "fold_proxy_norm"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVS_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
TF = torch.nn.functional


class FoldedProxyAct(nn.Module):
    """What is left of a Proxy Norm layer once its scale (and shift) live in the next layer:
    ``act(weight*y + bias) - shift``.

    With ``num_groups`` set, a GroupNorm without affine runs first (the GN/LN + PN block).
    ``shift`` is the proxy mean ``m_c`` when the next layer could take the scale but not the shift
    (a zero-padding conv: its padded zeros must stay zeros), else None.

    Example:
        >>> import torch
        >>> layer = FoldedProxyAct(torch.ones(3), torch.zeros(3), "relu")
        >>> layer(torch.tensor([[-1.0, 0.5, 2.0]])).tolist()
        [[0.0, 0.5, 2.0]]
        >>> shifted = FoldedProxyAct(torch.ones(3), torch.zeros(3), "relu", shift=torch.ones(3))
        >>> shifted(torch.tensor([[-1.0, 0.5, 2.0]])).tolist()
        [[-1.0, -0.5, 1.0]]
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor,
        activation: ActivationLike,
        num_groups: int | None = None,
        eps: float = 1e-3,
        shift: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone())
        self.shift = None if shift is None else nn.Parameter(shift.detach().clone().to(weight.dtype))
        self.activation = activation
        self.num_groups = num_groups
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if self.num_groups is not None:
            x = F.group_norm(x, self.num_groups, None, None, self.eps)
        shape = [1] * x.dim()
        shape[1] = -1
        y = get_activation(self.activation)(torch.addcmul(self.bias.view(shape), x, self.weight.view(shape)))
        if self.shift is not None:
            y = y - self.shift.view(shape)
        return y

    def extra_repr(self) -> str:
        act = (
            self.activation
            if isinstance(self.activation, str)
            else getattr(self.activation, "__name__", type(self.activation).__name__)
        )
        return f"{self.weight.numel()}, activation={act}, num_groups={self.num_groups}" + (
            ", shift kept" if self.shift is not None else ""
        )


def _pads(conv: Any) -> bool:
    padding = conv.padding
    if isinstance(padding, str):
        return padding == "same" and any(k > 1 for k in conv.kernel_size)
    return any(p > 0 for p in padding)


_POOLS_AFFINE = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
)
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_FN_AFFINE = {
    TF.max_pool1d,
    TF.max_pool2d,
    TF.max_pool3d,
    TF.adaptive_max_pool1d,
    TF.adaptive_max_pool2d,
    TF.adaptive_max_pool3d,
    TF.adaptive_avg_pool1d,
    TF.adaptive_avg_pool2d,
    TF.adaptive_avg_pool3d,
}


def _mean_dims_ok(node: torch.fx.Node) -> bool:
    """``x.mean(dims)`` / ``torch.mean(x, dims)`` over spatial dims only (not N, not C)."""
    dims: Any = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        return False
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    src: Any = node.args[0] if node.args else None
    shape = node_shape(src) if isinstance(src, torch.fx.Node) else None
    if shape is None:
        return False
    return all(isinstance(d, int) and (d % len(shape)) >= 2 for d in dims)


def _commutes(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """``"affine"`` when a per-channel ``a * v + b`` passes through ``node`` unchanged (per channel),
    ``"scale"`` when only a positive per-channel scale does (zero padding), else None."""
    if node.op == "call_module":
        m: Any = modules.get(str(node.target))
        if type(m) in _POOLS_AFFINE:
            return "affine"
        if type(m) in _AVG_POOLS:
            if getattr(m, "divisor_override", None):  # sum / d: a shift b comes out as b * window / d
                return None
            pad = m.padding if isinstance(m.padding, tuple) else (m.padding,)  # type: ignore[union-attr]
            return "scale" if any(p > 0 for p in pad) and m.count_include_pad else "affine"  # type: ignore[union-attr]
    if node.op == "call_function" and node.target in _FN_AFFINE:
        return "affine"
    if (node.op == "call_method" and node.target == "mean") or (
        node.op == "call_function" and node.target is torch.mean
    ):
        return "affine" if _mean_dims_ok(node) else None
    if is_singleton_view(node, modules):
        return "affine"
    return None


class _Plan(NamedTuple):
    terminals: list[str]  # conv / linear module paths that take the scale
    shift: bool  # whether the shift folds too


def _plan(pn_node: torch.fx.Node, modules: dict[str, nn.Module], calls: dict[str, int]) -> _Plan | str:
    """Where this PN layer's scale and shift can go (every path from it must end in a conv / linear), or why
    not."""
    if calls[str(pn_node.target)] > 1:
        return "the layer is called more than once in the model"
    channels = modules[str(pn_node.target)].num_features  # type: ignore[union-attr]
    terminals: list[str] = []
    shift = True
    frontier = [pn_node]
    while frontier:
        value = frontier.pop()
        if not value.users:
            return "its output is not used by a conv/linear layer"
        for user in value.users:
            only_input = (
                len(user.args) >= 1
                and user.args[0] is value
                and not any(isinstance(a, torch.fx.Node) for a in user.args[1:])
                and not any(isinstance(v, torch.fx.Node) for v in user.kwargs.values())
            )
            nxt = modules.get(str(user.target)) if user.op == "call_module" else None
            if isinstance(nxt, (*_CONVS, *_CONVS_T, nn.Linear)):
                if not only_input or len(user.args) != 1 or user.kwargs:
                    return f"{user.target} takes more than this layer's output"
                why = _foldable_layer(nxt)
                if why is not None:
                    return f"it is followed by {user.target}: {why}"
                if calls[str(user.target)] > 1:
                    return f"{user.target}, which it feeds, is called more than once"
                shape = node_shape(value)
                if isinstance(nxt, nn.Linear) and (shape is None or len(shape) != 2):
                    return "a Linear layer after a feature map acts on the last dim, not on the channels"
                if shape is None or len(shape) < 2 or shape[1] != channels:
                    return f"the value reaching {user.target} does not keep the {channels} channels in dim 1"
                if isinstance(nxt, _CONVS_T) or (
                    isinstance(nxt, _CONVS) and _pads(nxt) and nxt.padding_mode == "zeros"
                ):
                    shift = False  # padded zeros (or a transposed conv's uneven overlap) must not move
                terminals.append(str(user.target))
                continue
            how = _commutes(user, modules) if only_input else None
            if how is None:
                return (
                    f"its output reaches {_what(user, modules)}, which is not a conv/linear layer "
                    "(nor a pooling or view it passes through)"
                )
            shift = shift and how == "affine"
            frontier.append(user)
    return _Plan(sorted(set(terminals)), shift)


def _what(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"module {type(modules.get(str(node.target))).__name__} ({node.target})"
    if node.op == "output":
        return "the model's output"
    return f"{node.op} {getattr(node.target, '__name__', node.target)}"


@torch.no_grad()
def _fold_into(m: Tensor, rstd: Tensor, nxt: Any, shift: bool) -> None:
    """``nxt(rstd * (v - m))`` as ``nxt'(v)`` (``shift``) or ``nxt'(v - m)`` (scale only), in place on
    ``nxt``."""
    w = nxt.weight
    if isinstance(nxt, _CONVS_T):  # weight (C_in, C_out / groups, *k): the input channel is dim 0
        w.mul_(rstd.to(w.dtype).view(-1, *([1] * (w.dim() - 1))))
        return
    groups = getattr(nxt, "groups", 1)
    out_ch, in_per_group = w.shape[0], w.shape[1]
    # Input channel of weight[o, j] is (o // (out_ch // groups)) * in_per_group + j.
    g_of_o = torch.arange(out_ch, device=w.device) // (out_ch // groups)
    idx = g_of_o[:, None] * in_per_group + torch.arange(in_per_group, device=w.device)[None, :]  # (O, Cin/g)
    shape = (out_ch, in_per_group) + (1,) * (w.dim() - 2)
    w.mul_(rstd.to(w.dtype)[idx].view(shape))
    if not shift:
        return
    correction = (w * m.to(w.dtype)[idx].view(shape)).flatten(1).sum(1)
    if nxt.bias is None:
        nxt.bias = nn.Parameter(-correction, requires_grad=w.requires_grad)
    else:
        nxt.bias.sub_(correction)


def fold_proxy_norm(
    model: nn.Module,
    example_input: Tensor | tuple[Any, ...],
    *,
    strict: bool = False,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> nn.Module:
    """Fold every Proxy Norm layer's per-channel scale and shift into the conv/linear layers after it.

    PN computes ``rstd_c * (act(...) - m_c)``; once training is over ``m`` and ``rstd`` are
    constants, so ``W' = W * rstd[in]`` and ``b' = b - sum(W' * m[in])`` give the same outputs
    while the layer keeps only ``act(weight * y + bias)`` (:class:`FoldedProxyAct`). The output
    may pass through max / average poolings (not one with ``divisor_override``), spatial means and
    size-1 views first (they commute with a per-channel scale and shift), and may feed several
    layers, as long as every path ends in a Conv1d/2d/3d, ConvTranspose or Linear (on ``(N, C)``
    features) that takes only this value. When one of them zero-pads (a 3x3 conv with
    ``padding=1``), is a ConvTranspose, or an average pooling counts padded zeros, only the scale
    moves: the layer keeps ``- m_c`` (``FoldedProxyAct.shift``), which keeps the padded zeros
    exact. Other places (an addition, a concatenation, the model's output) are refused with the
    reason (a warning, or ``NormError`` with ``strict=True``) and keep their PN layer. Other norms
    in the model (BN, GN ...) are left alone: fold BN with :func:`normkit.fold_bn`. The result is
    checked against the original on ``example_input`` (``RuntimeError`` if they differ beyond
    ``atol``/``rtol``); both run in eval.

    Args:
        model: the model (left untouched; a folded deep copy is returned).
        example_input: a batch, or a tuple of positional inputs, to trace shapes and verify the folded
            model with.
        strict: raise instead of warn when a PN layer cannot be folded.
        atol, rtol: verification tolerances.

    Returns:
        The folded copy, in eval mode.

    Example:
        >>> import torch, normkit
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), normkit.create_norm_layer("ln+pn", 8),
        ...                           torch.nn.Conv2d(8, 4, 3, padding=1, padding_mode="circular"))
        >>> folded = normkit.fold_proxy_norm(net, torch.randn(2, 3, 9, 9))
        >>> type(folded[1]).__name__
        'FoldedProxyAct'
        >>> from normkit.lab.models import CNN4
        >>> cnn = CNN4("ln+pn", head=True, head_norm="bn").eval()   # zero-padded convs, max-pool, BN head
        >>> folded = normkit.fold_proxy_norm(cnn, torch.randn(4, 1, 8, 8))
        >>> sum(type(m).__name__ == "FoldedProxyAct" for m in folded.modules())
        4
    """
    check_model(model, "fold_proxy_norm")
    op = "fold_proxy_norm"
    folded = deepcopy_model(model, op).eval()
    reference = deepcopy_model(model, op).eval()
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    try:
        graph = NormTracer().trace(folded)
    except Exception as exc:  # torch.fx raises many kinds on data-dependent control flow
        raise NormError(
            f"fold_proxy_norm: could not trace the model with torch.fx ({type(exc).__name__}: {exc}); "
            "fold a traceable sub-module instead"
        ) from exc
    gm = torch.fx.GraphModule(folded, graph)
    shape = tuple(getattr(args[0], "shape", ())) if args else ()
    propagate_shapes(gm, args, op, f"example input of shape {shape}")
    modules = dict(folded.named_modules())
    calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    pn_nodes = [
        n
        for n in graph.nodes
        if n.op == "call_module" and isinstance(modules.get(str(n.target)), ProxyNormAct)
    ]
    refused: list[str] = []
    plans: list[tuple[str, _Plan]] = []
    for node in pn_nodes:
        plan = _plan(node, modules, calls)
        if isinstance(plan, str):
            refused.append(f"{node.target}: {plan}")
        else:
            plans.append((str(node.target), plan))
    claimed = [t for _, plan in plans for t in plan.terminals]
    for name, plan in plans:
        if any(claimed.count(t) > 1 for t in plan.terminals):
            refused.append(f"{name}: a layer it feeds is also fed by another Proxy Norm layer")
            continue
        pn = modules[name]
        assert isinstance(pn, ProxyNormAct)
        with torch.no_grad():
            m, rstd = pn.proxy_stats()
        for t in plan.terminals:
            _fold_into(m, rstd, modules[t], plan.shift)
        groups = pn.num_groups if isinstance(pn, GroupNormProxyAct2d) else None
        eps = pn.eps if isinstance(pn, GroupNormProxyAct2d) else 1e-3
        parent_name, _, child = name.rpartition(".")
        parent = folded.get_submodule(parent_name) if parent_name else folded
        setattr(
            parent,
            child,
            FoldedProxyAct(pn.weight, pn.bias, pn.activation, groups, eps, shift=None if plan.shift else m),
        )
    if refused:
        msg = "fold_proxy_norm: left these Proxy Norm layers unfolded:\n  " + "\n  ".join(refused)
        if strict:
            raise NormError(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
    with torch.no_grad():
        want, got = reference(*args), folded(*args)
    pairs = list(zip(tree_leaves(want), tree_leaves(got)))
    if not all(torch.allclose(w, g, atol=atol, rtol=rtol) for w, g in pairs if isinstance(w, Tensor)):
        err = max_abs_diff(want, got)
        raise RuntimeError(
            f"fold_proxy_norm: the folded model differs from the original by {err:.3g} (atol={atol})"
        )
    return folded
