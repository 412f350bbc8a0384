"""Folding normalization layers into the layer that follows them (inference)."""

from __future__ import annotations

import copy
import warnings


import torch
import torch.fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from .._errors import NormError
from .. import functional as F
from ..functional.activations import ActivationLike, get_activation
from ..nn.proxy_norm import GroupNormProxyAct2d, ProxyNormAct

__all__ = ["FoldedProxyAct", "fold_proxy_norm"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class FoldedProxyAct(nn.Module):
    """What is left of a Proxy Norm layer once its scale and shift live in the next conv: ``act(weight*y + bias)``.

    With ``num_groups`` set, a GroupNorm without affine runs first (the GN/LN + PN block).

    Example:
        >>> import torch
        >>> layer = FoldedProxyAct(torch.ones(3), torch.zeros(3), "relu")
        >>> layer(torch.tensor([[-1.0, 0.5, 2.0]])).tolist()
        [[0.0, 0.5, 2.0]]
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor,
        activation: ActivationLike,
        num_groups: int | None = None,
        eps: float = 1e-3,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone())
        self.activation = activation
        self.num_groups = num_groups
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if self.num_groups is not None:
            x = F.group_norm(x, self.num_groups, None, None, self.eps)
        shape = [1] * x.dim()
        shape[1] = -1
        y = torch.addcmul(self.bias.view(shape), x, self.weight.view(shape))
        return get_activation(self.activation)(y)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, activation={self.activation}, num_groups={self.num_groups}"


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ProxyNormAct) or super().is_leaf_module(m, qualname)


def _pads(conv: nn.Module) -> bool:
    padding = conv.padding
    if isinstance(padding, str):
        return padding == "same" and any(k > 1 for k in conv.kernel_size)
    return any(p > 0 for p in padding)


def _why_not(pn_node: torch.fx.Node, modules: dict[str, nn.Module], calls: dict[str, int]) -> str | None:
    """Why this PN layer's scale and shift cannot be folded exactly, or None when they can."""
    if calls[pn_node.target] > 1:  # type: ignore[index]
        return "the layer is called more than once in the model"
    users = list(pn_node.users)
    if len(users) != 1:
        return f"its output feeds {len(users)} consumers, not one conv/linear"
    user = users[0]
    nxt = modules.get(user.target) if user.op == "call_module" else None  # type: ignore[arg-type]
    if not isinstance(nxt, (*_CONVS, nn.Linear)):
        what = f"module {type(nxt).__name__}" if nxt is not None else f"{user.op} {user.target}"
        return f"it is followed by {what}, not by a Conv1d/2d/3d or Linear"
    if len(user.args) != 1 or user.args[0] is not pn_node or user.kwargs:
        return "the next layer takes more than this layer's output"
    meta = pn_node.meta.get("tensor_meta")
    if isinstance(nxt, nn.Linear) and (meta is None or len(meta.shape) != 2):
        return "a Linear layer after a feature map acts on the last dim, not on the channels"
    if isinstance(nxt, _CONVS) and _pads(nxt) and nxt.padding_mode == "zeros":
        return (
            f"the next conv zero-pads (padding={nxt.padding}): the padded zeros would become "
            "-shift after folding, so the shift cannot move into the conv exactly"
        )
    return None


@torch.no_grad()
def _fold_into(pn: ProxyNormAct, nxt: nn.Module) -> None:
    m, rstd = pn.proxy_stats()
    w = nxt.weight
    groups = getattr(nxt, "groups", 1)
    out_ch, in_per_group = w.shape[0], w.shape[1]
    # Input channel of weight[o, j] is (o // (out_ch // groups)) * in_per_group + j.
    g_of_o = torch.arange(out_ch, device=w.device) // (out_ch // groups)
    idx = g_of_o[:, None] * in_per_group + torch.arange(in_per_group, device=w.device)[None, :]  # (O, Cin/g)
    shape = (out_ch, in_per_group) + (1,) * (w.dim() - 2)
    scale = rstd.to(w.dtype)[idx].view(shape)
    shift = m.to(w.dtype)[idx].view(shape)
    w.mul_(scale)
    correction = (w * shift).flatten(1).sum(1)
    if nxt.bias is None:
        nxt.bias = nn.Parameter(-correction)
    else:
        nxt.bias.sub_(correction)


def fold_proxy_norm(
    model: nn.Module,
    example_input: Tensor,
    *,
    strict: bool = False,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> nn.Module:
    """Fold every Proxy Norm layer's per-channel scale and shift into the conv/linear layer after it.

    PN computes ``rstd_c * (act(...) - m_c)``; once training is over ``m`` and ``rstd`` are
    constants, so ``W' = W * rstd[in]`` and ``b' = b - sum(W' * m[in])`` give the same outputs
    while the layer keeps only ``act(weight * y + bias)`` (:class:`FoldedProxyAct`). That is exact
    when the next layer is a Conv/Linear that gets only this output and does not zero-pad; other
    places are refused with the reason (a warning, or ``ValueError`` with ``strict=True``) and
    keep their PN layer. The result is checked against the original on ``example_input``
    (``RuntimeError`` if they differ beyond ``atol``/``rtol``); both run in eval mode.

    Args:
        model: the model (left untouched; a folded deep copy is returned).
        example_input: a batch to trace shapes and verify the folded model with.
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
    """
    folded = copy.deepcopy(model).eval()
    reference = copy.deepcopy(model).eval()
    try:
        graph = _Tracer().trace(folded)
    except Exception as exc:  # torch.fx raises many kinds on data-dependent control flow
        raise NormError(
            f"fold_proxy_norm: could not trace the model with torch.fx ({type(exc).__name__}: {exc}); "
            "fold a traceable sub-module instead"
        ) from exc
    gm = torch.fx.GraphModule(folded, graph)
    ShapeProp(gm).propagate(example_input)
    modules = dict(folded.named_modules())
    pn_nodes = [n for n in graph.nodes if n.op == "call_module" and isinstance(modules.get(n.target), ProxyNormAct)]
    calls: dict[str, int] = {}
    for n in pn_nodes:
        calls[n.target] = calls.get(n.target, 0) + 1  # type: ignore[index]
    refused: list[str] = []
    for node in pn_nodes:
        name = str(node.target)
        reason = _why_not(node, modules, calls)
        if reason is not None:
            refused.append(f"{name}: {reason}")
            continue
        pn = modules[name]
        assert isinstance(pn, ProxyNormAct)
        _fold_into(pn, modules[str(next(iter(node.users)).target)])
        groups = pn.num_groups if isinstance(pn, GroupNormProxyAct2d) else None
        eps = pn.eps if isinstance(pn, GroupNormProxyAct2d) else 1e-3
        parent_name, _, child = name.rpartition(".")
        parent = folded.get_submodule(parent_name) if parent_name else folded
        setattr(parent, child, FoldedProxyAct(pn.weight, pn.bias, pn.activation, groups, eps))
    if refused:
        msg = "fold_proxy_norm: left these Proxy Norm layers unfolded:\n  " + "\n  ".join(refused)
        if strict:
            raise NormError(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
    with torch.no_grad():
        want, got = reference(example_input), folded(example_input)
    if not torch.allclose(want, got, atol=atol, rtol=rtol):
        err = (want - got).abs().max().item()
        raise RuntimeError(f"fold_proxy_norm: the folded model differs from the original by {err:.3g} (atol={atol})")
    return folded


