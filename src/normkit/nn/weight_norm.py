"""Weight normalization (Salimans & Kingma, 2016) as a reversible parametrization."""

from __future__ import annotations

import functools
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._errors import NormError
from ..functional._moments import moments
from ._parametrize import make_picklable

__all__ = ["WeightNorm", "remove_weight_norm", "weight_norm"]

_HANDLES = "_normkit_weight_norm_hooks"


class WeightNorm(nn.Module):
    r"""The parametrization ``w = g * v / ||v||``, the norm over every dim of ``v`` except ``dim``.

    ``forward(g, v)`` builds the weight; ``right_inverse(w)`` returns ``(||w||, w)`` so that
    registering it leaves the weight unchanged. ``g`` has ``v``'s rank with size 1 outside
    ``dim`` (a 0-dim tensor for ``dim=None`` or ``dim=-1``, torch's convention: one norm over the
    whole tensor; the last dim is ``dim=v.dim() - 1``), the shapes of
    ``torch.nn.utils.parametrizations.weight_norm``, whose checkpoints therefore load as they are.
    A row with ``||v|| = 0`` gives a zero weight row and finite gradients (the norm is clamped at
    ``1e-12``) instead of NaN.

    Example:
        >>> wn = WeightNorm(dim=0)
        >>> g, v = wn.right_inverse(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
        >>> g.flatten().tolist()
        [5.0, 2.0]
        >>> wn(2 * g, v)
        tensor([[6., 8.],
                [0., 4.]])
    """

    def __init__(self, dim: int | None = 0) -> None:
        super().__init__()
        # dim=-1 is one norm over the whole tensor, as in torch (its weight_norm maps None to -1), so
        # that a checkpoint saved with torch's dim=-1 loads (g of shape ())
        self.dim = None if dim == -1 else dim

    def _norm(self, v: Tensor) -> Tensor:
        if self.dim is None:
            return torch.linalg.vector_norm(v)
        d = self.dim % v.dim()
        dims = tuple(i for i in range(v.dim()) if i != d)
        return torch.linalg.vector_norm(v, 2, dim=dims, keepdim=True) if dims else v.abs()

    def forward(self, g: Tensor, v: Tensor) -> Tensor:
        return v * (g / self._norm(v).clamp_min(1e-12))

    def right_inverse(self, w: Tensor) -> tuple[Tensor, Tensor]:
        return self._norm(w).detach().clone(), w.detach().clone()

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def _plist(module: nn.Module, name: str) -> parametrize.ParametrizationList:
    """``module.parametrizations[name]``, for a ``name`` that ``parametrize.is_parametrized``."""
    return cast(parametrize.ParametrizationList, cast(nn.ModuleDict, module.parametrizations)[name])


def _find(module: nn.Module, name: str) -> WeightNorm | None:
    if not parametrize.is_parametrized(module, name):
        return None
    plist = _plist(module, name)
    first = plist[0]
    return first if len(plist) == 1 and isinstance(first, WeightNorm) else None


def _load_hook(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
    *,
    name: str,
) -> None:
    """Accept the plain ``weight`` layout and the legacy ``weight_g``/``weight_v`` one besides (g, v)."""
    wn = _find(module, name)
    if wn is None:
        return
    g_key, v_key = f"{prefix}parametrizations.{name}.original0", f"{prefix}parametrizations.{name}.original1"
    if g_key in state_dict and v_key in state_dict:
        return
    if f"{prefix}{name}_g" in state_dict and f"{prefix}{name}_v" in state_dict:  # torch's old hook-based WN
        state_dict[g_key] = state_dict.pop(f"{prefix}{name}_g")
        state_dict[v_key] = state_dict.pop(f"{prefix}{name}_v")
    elif prefix + name in state_dict:  # a plain (un-normalized) checkpoint
        g, v = wn.right_inverse(state_dict.pop(prefix + name))
        state_dict[g_key], state_dict[v_key] = g, v


def _cls_name(module: nn.Module) -> str:
    """The user's class name, not torch's on-the-fly ``Parametrized<Name>``."""
    cls = type(module)
    return cls.__bases__[0].__name__ if parametrize.is_parametrized(module) else cls.__name__


def _unit_axes(module: nn.Module) -> tuple[int, int]:
    """(dim of the weight that indexes output units, dim of the output that does), or raise."""
    if isinstance(module, nn.Linear):
        return 0, -1
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        if module.groups != 1:
            raise NormError(
                f"weight_norm: init_batch needs output units on one weight dim; a ConvTranspose with "
                f"groups={module.groups} spreads them over two"
            )
        return 1, 1
    if isinstance(module, nn.modules.conv._ConvNd):
        return 0, 1
    raise TypeError(
        f"weight_norm: the data-dependent init (init_batch) supports Linear, Conv*d and ConvTranspose*d, "
        f"got {_cls_name(module)}; initialise it yourself or pass init_batch=None"
    )


@torch.no_grad()
def _data_init(module: nn.Module, name: str, dim: int | None, x: Tensor) -> None:
    w_dim, out_axis = _unit_axes(module)
    weight_rank = module.parametrizations[name].original1.dim()  # type: ignore[index]
    if dim is None or dim % weight_rank != w_dim:
        raise NormError(
            f"weight_norm: init_batch standardizes each output unit, so dim must index the output units "
            f"(dim={w_dim} for {_cls_name(module)}), got dim={dim}"
        )
    g = module.parametrizations[name].original0  # type: ignore[index]
    bias = getattr(module, "bias", None)
    saved = [(t, t.clone()) for t in (g, bias) if isinstance(t, Tensor)]
    g.fill_(1.0)  # w = v / ||v||: t = v.x / ||v||, as in the paper
    if isinstance(bias, Tensor):
        bias.zero_()
    try:
        inv_std, mean = _unit_stats(module(x), out_axis)
    except BaseException:
        for t, old in saved:  # a refused batch leaves the layer as it was
            t.copy_(old)
        raise
    g.copy_(inv_std.reshape(g.shape).to(g.dtype))
    if isinstance(bias, Tensor):
        bias.copy_((-mean * inv_std).to(bias.dtype))


def _unit_stats(t: Tensor, out_axis: int) -> tuple[Tensor, Tensor]:
    """``(1 / std, mean)`` of each output unit's pre-activations ``t``, flat; refuses a unit with fewer than
    2 values or zero variance (its ``g`` would be infinite)."""
    axis = out_axis % t.dim()
    count = t.numel() // max(t.shape[axis], 1)
    if count < 2:
        raise NormError(
            f"weight_norm: init_batch must give each output unit at least 2 values to standardize, got "
            f"{count} (output shape {tuple(t.shape)}); pass a larger batch"
        )
    stats = moments(t, tuple(i for i in range(t.dim()) if i != axis))
    flat = stats.var.flatten()
    zero = (flat == 0).nonzero().flatten().tolist()
    if zero:
        raise NormError(
            f"weight_norm: init_batch gives output unit(s) {zero[:8]}{' ...' if len(zero) > 8 else ''} "
            "zero variance, so g = 1/std(t) would be infinite; pass a batch whose inputs vary"
        )
    return torch.rsqrt(stats.var).flatten(), stats.mean.flatten()


def weight_norm(
    module: nn.Module, name: str = "weight", dim: int | None = 0, init_batch: Tensor | None = None
) -> nn.Module:
    r"""Reparameterize ``module.<name>`` as ``w = g * v / ||v||`` (Salimans & Kingma); returns the module.

    .. math::
        \mathbf{w} = g \frac{\mathbf{v}}{\|\mathbf{v}\|}

    A ``torch.nn.utils.parametrize`` parametrization: ``g`` and ``v`` live in
    ``module.parametrizations.<name>.original0`` / ``original1`` (torch's layout, so
    ``torch.nn.utils.parametrizations.weight_norm`` checkpoints load), ``module.<name>`` is
    computed from them at each access, and gradients reach ``g`` and ``v`` (the gradient of
    ``v`` is orthogonal to ``v``). ``load_state_dict`` also accepts a *plain* checkpoint (a
    ``weight`` key, converted with ``g = ||w||, v = w``) and the old ``weight_g`` / ``weight_v``
    layout. The module survives ``copy.deepcopy`` and ``pickle`` / ``torch.save``;
    :func:`remove_weight_norm` turns it back into a plain weight.

    With ``init_batch``, the paper's data-dependent initialisation runs once: with ``g = 1`` and
    zero bias the pre-activations ``t`` of each output unit on that batch are measured, then
    ``g = 1 / std(t)`` and ``bias = -mean(t) / std(t)``, so the initial pre-activations have mean 0
    and (biased) std 1 per unit. It needs ``dim`` to index the output units (0 for Linear/Conv,
    1 for an ungrouped ConvTranspose); a module without bias gets only ``g``. A batch that gives a
    unit fewer than 2 values or zero variance is refused (:class:`NormError`; ``g`` would be
    infinite), leaving ``g`` and the bias as they were.

    Args:
        module: the module holding the weight.
        name: the parameter to reparameterize.
        dim: the dim kept by the norm (one ``g`` per index), or ``None`` (or ``-1``, as in torch)
            for a single norm over the whole weight.
        init_batch: an input batch for the data-dependent initialisation, or ``None``.

    Example:
        >>> import torch, normkit
        >>> x = torch.randn(256, 10) * 3 + 1
        >>> layer = normkit.nn.weight_norm(torch.nn.Linear(10, 4), init_batch=x)
        >>> t = layer(x)
        >>> torch.allclose(t.mean(0), torch.zeros(4), atol=1e-5)
        True
        >>> torch.allclose(t.square().mean(0), torch.ones(4))
        True
        >>> sorted(k for k in layer.state_dict())
        ['bias', 'parametrizations.weight.original0', 'parametrizations.weight.original1']

    Reference: https://arxiv.org/abs/1602.07868
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"weight_norm: expected an nn.Module, got {type(module).__name__}")
    if _find(module, name) is not None:
        raise NormError(f"weight_norm: {_cls_name(module)}.{name} already has weight norm")
    if parametrize.is_parametrized(module, name):
        raise NormError(
            f"weight_norm: {_cls_name(module)}.{name} already has a parametrization "
            f"({type(_plist(module, name)[0]).__name__}); "
            "weight norm goes on a plain parameter"
        )
    w = getattr(module, name, None)
    if not isinstance(w, nn.Parameter):
        raise NormError(
            f"weight_norm: {type(module).__name__} has no parameter {name!r} (got {type(w).__name__}); "
            "pass name= the weight's attribute name"
        )
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int)):
        raise TypeError(
            f"weight_norm: dim must be None or an int in [{-w.dim()}, {w.dim() - 1}], got {dim!r} of type "
            f"{type(dim).__name__}"
        )
    if dim is not None and not -w.dim() <= dim < w.dim():
        raise NormError(
            f"weight_norm: dim must be None or an int in [{-w.dim()}, {w.dim() - 1}], got {dim!r}"
        )
    parametrize.register_parametrization(module, name, WeightNorm(dim))
    handle = module.register_load_state_dict_pre_hook(functools.partial(_load_hook, name=name))
    handles = module.__dict__.setdefault(_HANDLES, {})
    handles[name] = handle
    make_picklable(module)
    if init_batch is not None:
        _data_init(module, name, dim, init_batch)
    return module


def remove_weight_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Undo :func:`weight_norm`: ``module.<name>`` becomes a plain Parameter holding ``g * v / ||v||``.

    Example:
        >>> import torch, normkit
        >>> layer = normkit.nn.weight_norm(torch.nn.Conv1d(2, 3, 3))
        >>> w = layer.weight.detach().clone()
        >>> layer = normkit.nn.remove_weight_norm(layer)
        >>> type(layer).__name__, torch.allclose(layer.weight, w)
        ('Conv1d', True)
    """
    if _find(module, name) is None:
        raise NormError(
            f"remove_weight_norm: {_cls_name(module)}.{name} has no weight norm (of normkit.nn.weight_norm)"
        )
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    handle = module.__dict__.get(_HANDLES, {}).pop(name, None)
    if handle is not None:
        handle.remove()
    return module
