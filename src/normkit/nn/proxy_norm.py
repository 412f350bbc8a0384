"""Proxy Norm modules: the proxy-normalized activation, and GN/LN + Proxy Norm blocks."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as F
from .._errors import NormError
from ..functional._checks import check_eps, check_groups, check_positive_int
from ..functional.activations import ActivationLike, check_elementwise, get_activation
from ..functional.proxy_norm import _gn_proxy_kernels
from ._base import check_channels, fx_leaf, loaded_device, not_scriptable
from .registry import default_groups as _default_groups
from .registry import register_norm, spec_or_keyword

__all__ = ["GroupNormProxyAct2d", "ProxyNormAct"]


def _act_name(act: ActivationLike) -> str:
    return act if isinstance(act, str) else getattr(act, "__name__", type(act).__name__)


class ProxyNormAct(nn.Module):
    r"""Proxy-normalized activation (Labatie et al., 2021):
    ``(act(weight*y + bias) - m_c) / sqrt(v_c + eps)``.

    ``m_c`` and ``v_c`` are the mean and variance of ``act(weight * Y~ + bias)`` for a Gaussian
    proxy ``Y~ ~ N(proxy_bias, (1 + proxy_weight)^2)``, discretized by 200 fixed mid-point
    quantiles; see :func:`normkit.functional.proxy_norm_act`. Put it after a norm *without*
    affine; no affine follows it. No running statistics: train and eval are the same function,
    and a sample's output never depends on the rest of the batch.

    Parameters (per channel): ``weight`` (init 1), ``bias`` (init 0), ``proxy_bias`` (init 0),
    ``proxy_weight`` (init 0). The authors put weight decay on ``proxy_bias`` and ``proxy_weight``
    only (it pulls the proxy back to N(0, 1)): :func:`normkit.param_groups` does that.

    Args:
        num_features: C.
        activation: ``"relu"`` (ResNets), ``"swish"``/``"silu"`` (EfficientNet), ``"gelu"``,
            ``"leaky_relu"``, or an elementwise callable.
        eps: added to the proxy variance (authors' default 0.03).
        num_points: quadrature points (authors' default 200).

    Shape:
        Input ``(N, C, *)`` or ``(N, C)``; output the same shape, dtype and layout.

    Example:
        >>> import torch, normkit
        >>> pn = normkit.nn.ProxyNormAct(8)
        >>> y = torch.nn.functional.group_norm(torch.randn(4, 8, 6, 6), 1)
        >>> pn(y).shape
        torch.Size([4, 8, 6, 6])

    Reference: https://arxiv.org/abs/2106.03743
    """

    __prepare_scriptable__ = not_scriptable  # (torch.jit.script: a clear error)

    includes_activation = True

    def __init__(
        self,
        num_features: int,
        activation: ActivationLike = "relu",
        eps: float = 0.03,
        num_points: int = 200,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.num_features = num_features = check_positive_int(num_features, name, "num_features")
        self.proxy_eps = check_eps(eps, name)
        self.num_points = check_positive_int(num_points, name, "num_points")
        get_activation(activation)  # validate now, not at the first forward
        check_elementwise(activation, name)
        self.activation = activation
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(num_features, **factory))
        self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        self.proxy_bias = nn.Parameter(torch.zeros(num_features, **factory))
        self.proxy_weight = nn.Parameter(torch.zeros(num_features, **factory))
        # Deterministic, so not saved in the state_dict: recomputed by _apply (moves, casts, to_empty)
        # and by an assign=True load_state_dict (onto a layer built on the meta device).
        self.register_buffer(
            "proxy_points", F.proxy_points(num_points, dtype=torch.float64, device=device), persistent=False
        )

    def _apply(self, fn: Any, recurse: bool = True) -> ProxyNormAct:
        # The quadrature points are derived constants: recompute them in float64 after any move or
        # cast (.half() would round them; to_empty() from the meta device leaves garbage).
        super()._apply(fn, recurse)
        device = self.proxy_points.device
        if device.type == "meta":
            self.proxy_points = torch.empty(self.num_points, dtype=torch.float64, device=device)
        else:
            self.proxy_points = F.proxy_points(self.num_points, dtype=torch.float64, device=device)
        return self

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        # The state_dict does not hold the quadrature points: load_state_dict(..., assign=True) onto a
        # layer built on the meta device leaves them there; recompute them where the parameters landed.
        device = loaded_device(self)
        if device is not None and self.proxy_points.device != device:
            self.proxy_points = F.proxy_points(self.num_points, dtype=torch.float64, device=device)

    def reset_parameters(self) -> None:
        """weight 1, bias 0, proxy_bias 0, proxy_weight 0."""
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.zero_()
            self.proxy_bias.zero_()
            self.proxy_weight.zero_()

    def proxy_stats(self) -> tuple[Tensor, Tensor]:
        """The current per-channel proxy mean and ``1/sqrt(var + eps)`` (differentiable)."""
        return F.proxy_stats(
            self.weight,
            self.bias,
            self.proxy_bias,
            self.proxy_weight,
            self.activation,
            self.proxy_eps,
            self.num_points,
            self.proxy_points,
        )

    @property
    def eps(self) -> float:
        """``proxy_eps`` under torch.nn's name: ``layer.eps = 0.01`` after construction is the same as
        building with ``eps=0.01`` (it was a new attribute the forward never read)."""
        return self.proxy_eps

    @eps.setter
    def eps(self, value: float) -> None:
        self.proxy_eps = value

    def _proxy_act(self, y: Tensor) -> Tensor:
        return F.proxy_norm_act(
            y,
            self.weight,
            self.bias,
            self.proxy_bias,
            self.proxy_weight,
            self.activation,
            self.proxy_eps,
            self.num_points,
            points=self.proxy_points,
        )

    def forward(self, input: Tensor) -> Tensor:
        leaf = fx_leaf(self, input)
        if leaf is not None:
            return leaf
        check_channels(input, self.num_features, type(self).__name__)
        return self._proxy_act(input)

    def extra_repr(self) -> str:
        return f"{self.num_features}, activation={_act_name(self.activation)}, eps={self.proxy_eps}"


class GroupNormProxyAct2d(ProxyNormAct):
    r"""GroupNorm without affine, then the proxy-normalized activation: a batch-independent BN substitute.

    ``num_groups=1`` is LN + PN (LN over (C, H, W) per sample; registry ``"ln+pn"``), the authors'
    main recommendation; ``num_groups=4`` is their GN + PN default (registry ``"gn+pn"`` or
    ``"gn:4+pn"``). Its state_dict holds ``weight``, ``bias``, ``proxy_bias``, ``proxy_weight``.

    Args:
        num_features: C.
        num_groups: G, a divisor of C.
        activation: see :class:`ProxyNormAct`.
        eps: the group norm's eps; the authors' EfficientNet code uses 1e-3.
        proxy_eps: the proxy variance eps (0.03).
        num_points: quadrature points (200).

    Example:
        >>> import torch, normkit
        >>> layer = normkit.create_norm_layer("ln+pn", 16)
        >>> x = torch.randn(4, 16, 8, 8)
        >>> alone = layer(x[:1])                       # the same sample, without its batch
        >>> torch.allclose(layer(x)[:1], alone, atol=1e-6)
        True

    Reference: https://arxiv.org/abs/2106.03743
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int = 1,
        activation: ActivationLike = "relu",
        eps: float = 1e-3,
        proxy_eps: float = 0.03,
        num_points: int = 200,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        name = type(self).__name__
        proxy_eps = check_eps(proxy_eps, name, "proxy_eps")  # (named proxy_eps, not the base class's eps)
        super().__init__(num_features, activation, proxy_eps, num_points, device, dtype)
        self.num_groups = check_groups(num_groups, num_features, name)
        self.eps = check_eps(eps, name)

    @property
    def eps(self) -> float:  # type: ignore[override]
        """The group norm's eps (the proxy's is ``proxy_eps``)."""
        return self.__dict__["_group_eps"]

    @eps.setter
    def eps(self, value: float) -> None:
        self.__dict__["_group_eps"] = value

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "eps" in state and "_group_eps" not in state:  # (a module pickled before eps was a property)
            state["_group_eps"] = state.pop("eps")
        super().__setstate__(state)

    def forward(self, input: Tensor) -> Tensor:
        leaf = fx_leaf(self, input)
        if leaf is not None:
            return leaf
        check_channels(input, self.num_features, type(self).__name__)
        # eager CPU, a GPU, torch.func on a CPU: GN and the step fused (F.group_norm_proxy_act's kernels)
        fused = _gn_proxy_kernels(input)
        if fused is not None:
            out = fused(
                input,
                self.num_groups,
                self.eps,
                self.weight,
                self.bias,
                self.proxy_bias,
                self.proxy_weight,
                self.proxy_points,
                self.activation,
                self.proxy_eps,
            )
            if out is not None:
                return out
        return self._proxy_act(F.group_norm(input, self.num_groups, None, None, self.eps))

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_groups={self.num_groups}, activation={_act_name(self.activation)}, "
            f"eps={self.eps}, proxy_eps={self.proxy_eps}"
        )


def _pn_factory(default_groups: int):
    def factory(c: int, arg: int | None, activation: ActivationLike = "relu", **kw: Any) -> nn.Module:
        if default_groups == 1 and arg is not None:
            raise NormError(f"create_norm_layer: 'ln+pn' takes no ':<int>' argument, got ln:{arg}+pn")
        if default_groups == 1 and "num_groups" in kw:
            raise NormError("create_norm_layer: 'ln+pn' is one group; use 'gn+pn' with num_groups=...")
        groups = spec_or_keyword("gn", arg, kw, "num_groups", lambda: _default_groups(c, default_groups))
        return GroupNormProxyAct2d(c, num_groups=groups, activation=activation, **kw)

    factory.includes_activation = True  # type: ignore[attr-defined]
    if default_groups == 1:
        factory.takes_arg = False  # type: ignore[attr-defined]  # (get_norm_layer refuses 'ln:<int>+pn' at once)
    return factory


register_norm("ln+pn", "LayerNorm over (C, H, W) without affine + Proxy Norm activation (relu by default)")(
    _pn_factory(1)
)
register_norm(
    "gn+pn",
    "GroupNorm without affine (4 groups, or fewer if C needs; 'gn:G+pn' for G) + Proxy Norm activation",
)(_pn_factory(4))
