"""Proxy Normalization (Labatie, Masters, Eaton-Rosen & Luschi, NeurIPS 2021), as its authors built it.

After a batch-independent norm without affine (LN over (C, H, W) = GN(1), or GN with few
groups), Proxy Norm replaces "affine + activation" by a *proxy-normalized* activation: the
post-activation of each channel is normalized with the mean and variance it would have if the
pre-activation were an ideal Gaussian proxy ``N(proxy_bias, (1 + proxy_weight)^2)``. The proxy
is a fixed quadrature of 200 Gaussian mid-point quantiles (not random samples), so the output
of a sample never depends on the rest of the batch, and train and eval are the same function.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._errors import NormError
from ..kernels import _fast, triton_ready
from ..ops.library import exporting
from ..ops.proxy import proxy_act, proxy_act_composite
from ._checks import check_eps, check_groups, check_input, check_param, check_positive_int
from ._moments import acc_dtype
from .activations import ActivationLike, activation_spec, check_elementwise, get_activation

__all__ = ["proxy_norm_act", "proxy_points", "proxy_stats"]


def proxy_points(num_points: int = 200, *, dtype: torch.dtype = torch.float32, device: Any = None) -> Tensor:
    """The ``n`` deterministic Gaussian mid-point quantiles ``sqrt(2) * erfinv(2 (i + 0.5) / n - 1)``.

    Computed in float64 and cast. They are *not* renormalized: for n = 200 their variance is
    0.993596 (slightly under 1), as in the authors' code.

    Example:
        >>> u = proxy_points(200, dtype=torch.float64)
        >>> round(u.mean().item(), 12), round(u.var(unbiased=False).item(), 6)  # ok: doctest
        (0.0, 0.993596)
    """
    check_positive_int(num_points, "proxy_points", "num_points")
    i = torch.arange(num_points, dtype=torch.float64)
    u = math.sqrt(2.0) * torch.erfinv(2.0 * (i + 0.5) / num_points - 1.0)
    return u.to(dtype=dtype, device=device)


_POINTS: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}


def _points(num_points: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """:func:`proxy_points`, computed once per (count, dtype, device) for the ops' internal use (never
    handed to a caller): on a GPU each fresh set is a host computation and a host-to-device copy."""
    key = (check_positive_int(num_points, "proxy_points", "num_points"), dtype, device)
    u = _POINTS.get(key)
    if u is None:
        if len(_POINTS) > 32:
            _POINTS.clear()
        with torch.inference_mode(False):  # (a normal tensor even if first made in inference mode)
            u = _POINTS[key] = proxy_points(num_points, dtype=dtype, device=device)
    return u


def proxy_stats(
    weight: Tensor,
    bias: Tensor,
    proxy_bias: Tensor,
    proxy_weight: Tensor,
    activation: ActivationLike = "relu",
    eps: float = 0.03,
    num_points: int = 200,
    points: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-channel proxy mean ``m`` and ``rstd = 1/sqrt(v + eps)`` (differentiable in all four params).

    ``Y~ = (1 + proxy_weight) * u + proxy_bias``, ``zp = act(weight * Y~ + bias)``, ``m = mean(zp)``,
    ``v = mean((zp - m)^2)`` (biased), over the ``num_points`` quadrature points, in float32 (or
    float64 for float64 parameters).

    Example:
        >>> C = 1
        >>> m, rstd = proxy_stats(torch.ones(C), torch.zeros(C), torch.zeros(C), torch.zeros(C), "relu")
        >>> round(m.item(), 6), round(rstd.item(), 6)
        (0.398451, 1.648373)
    """
    dtype = acc_dtype(weight.dtype)
    u = points if points is not None else _points(num_points, dtype, weight.device)
    if weight.device.type == "cpu":  # eager CPU: one fused C++ call each way (None where it does not apply)
        fast = _fast.proxy_stats(weight, bias, proxy_bias, proxy_weight, u, activation, eps)
        if fast is not None:
            return fast
    if triton_ready(weight):  # a GPU: one Triton kernel each way instead of ~15 small ops
        from ..kernels import triton as _triton

        fast = _triton.proxy_stats(weight, bias, proxy_bias, proxy_weight, u, activation, eps)
        if fast is not None:
            return fast
    return _proxy_stats_composite(weight, bias, proxy_bias, proxy_weight, u, activation, eps)


def _proxy_stats_composite(
    weight: Tensor,
    bias: Tensor,
    proxy_bias: Tensor,
    proxy_weight: Tensor,
    u: Tensor,
    activation: ActivationLike,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """:func:`proxy_stats` as plain ops (what autograd, torch.compile and the exporters see)."""
    dtype = acc_dtype(weight.dtype)
    u = u.to(dtype)
    y_tilde = (1.0 + proxy_weight.to(dtype))[:, None] * u[None, :] + proxy_bias.to(dtype)[:, None]  # (C, n)
    zp = get_activation(activation)(weight.to(dtype)[:, None] * y_tilde + bias.to(dtype)[:, None])
    m = zp.mean(1)
    v = (zp - m[:, None]).square().mean(1)
    return m, torch.rsqrt(v + eps)


def proxy_norm_act(
    y: Tensor,
    weight: Tensor,
    bias: Tensor,
    proxy_bias: Tensor,
    proxy_weight: Tensor,
    activation: ActivationLike = "relu",
    eps: float = 0.03,
    num_points: int = 200,
    *,
    points: Tensor | None = None,
    memory_efficient: bool = True,
) -> Tensor:
    r"""Proxy-normalized activation: ``(act(weight * y + bias) - m) / sqrt(v + eps)``, per channel.

    .. math::
        \tilde Y_c = (1 + \tilde\gamma_c)\,u + \tilde\beta_c,\quad
        m_c, v_c = \mathrm{mean}, \mathrm{var}\big(\phi(\gamma_c \tilde Y_c + \beta_c)\big),\quad
        \mathrm{out} = \frac{\phi(\gamma_c y + \beta_c) - m_c}{\sqrt{v_c + \epsilon}}

    ``y`` is the output of a batch-independent norm *without* affine (LN over (C, H, W), i.e.
    ``group_norm(x, 1)``, or GN with few groups); ``u`` are the 200 fixed Gaussian mid-point
    quantiles (:func:`proxy_points`). The statistics are per channel and independent of the batch
    and of the spatial size; gradients flow through ``m`` and ``v`` into all four parameter vectors
    (the authors back-propagate through them too). No affine follows: the output goes straight
    into the next conv.

    Memory: with ``memory_efficient=True`` (default) and a named activation (or a torch.nn / torch
    function one, see :func:`~normkit.functional.activations.activation_spec`), the step runs as the
    registered op ``normkit::proxy_norm_act``, whose backward recomputes ``weight * y + bias`` and
    uses the activation's analytic derivative, so the layer keeps only ``y`` for the backward. Measured with
    ``torch.autograd.graph.saved_tensors_hooks`` on a (32, 64, 56, 56) fp32 ReLU layer (25.7 MB per
    full-size tensor): the composite saves 77.1 MB of full-size tensors (``y``, the ReLU output and
    ``z - m``), this Function 25.7 MB (``y`` only): 3.0x less (tests/functional/test_proxy_norm.py
    checks the ratio). On normkit's Triton kernels (CUDA) the statistics and the step are one
    autograd node, one kernel each way, keeping ``y`` too.

    Args:
        y: normalized input ``(N, C, *spatial)`` or ``(N, C)``, any layout and floating dtype.
        weight, bias: the affine moved into the activation, ``(C,)`` (init 1 and 0).
        proxy_bias, proxy_weight: the proxy's shift and scale offset, ``(C,)`` (init 0 and 0).
        activation: ``"relu"``, ``"silu"``/``"swish"``, ``"gelu"``, ``"leaky_relu"``, or any elementwise
            callable.
        eps: added to the proxy variance inside the square root (authors' default 0.03).
        num_points: number of quadrature points (authors' default 200).
        points: precomputed :func:`proxy_points` (a module keeps them as a buffer).
        memory_efficient: use the recomputing registered op (else the plain composite, which
            autograd differentiates; also what exporters record).

    Example:
        >>> C = 4
        >>> y = torch.nn.functional.group_norm(torch.randn(8, C, 5, 5), 1)   # LN over (C, H, W), no affine
        >>> ones, zeros = torch.ones(C), torch.zeros(C)
        >>> out = proxy_norm_act(y, ones, zeros, zeros, zeros, "relu")
        >>> out.shape
        torch.Size([8, 4, 5, 5])

    Reference: https://arxiv.org/abs/2106.03743
    """
    op = "proxy_norm_act"
    check_input(y, op)
    eps = check_eps(eps, op)
    C = y.shape[1]
    for name, p in (
        ("weight", weight),
        ("bias", bias),
        ("proxy_bias", proxy_bias),
        ("proxy_weight", proxy_weight),
    ):
        if p is None:
            raise TypeError(f"{op}: {name} is required (a (C,) tensor), got None")
        check_param(p, y, (C,), op, name)
    if weight.dtype in (torch.float16, torch.bfloat16):
        # float32 copies (differentiable) of half parameters: the step's and the proxy statistics'
        # gradients for each nearly cancel, and rounding each to half before autograd adds them made the
        # sum 5-40x less accurate than one rounding of the float32 result (the fused GN path does the same)
        weight, bias, proxy_bias, proxy_weight = (t.float() for t in (weight, bias, proxy_bias, proxy_weight))
    act = get_activation(activation)  # (checks it)
    check_elementwise(activation, op)
    spec = activation_spec(activation)
    if memory_efficient and spec is not None and not exporting():
        if triton_ready(y):  # a GPU (or Triton's interpreter): statistics + step, one node, a kernel each
            from ..kernels import triton as _triton

            u = points if points is not None else _points(num_points, acc_dtype(weight.dtype), y.device)
            out = _triton.proxy_norm_act(y, weight, bias, proxy_bias, proxy_weight, u, spec, eps)
            if out is not None:
                return out
    m, rstd = proxy_stats(weight, bias, proxy_bias, proxy_weight, activation, eps, num_points, points)
    if memory_efficient and spec is not None and not exporting():
        return proxy_act(y, weight, bias, m, rstd, spec[0], spec[1])
    return proxy_act_composite(y, weight, bias, m, rstd, act)


def _gn_proxy_kernels(x: Tensor) -> Callable[..., Tensor | None] | None:
    """The fused GroupNorm + Proxy Norm activation for a call on ``x`` (``gn_proxy_act(x, groups, eps,
    weight, bias, proxy_bias, proxy_weight, points, activation, proxy_eps)``, ``None`` where it does not
    take the case), or ``None``: eager CPU, the C++ kernels (one pass each way); a GPU, Triton's;
    a CPU tensor under ``torch.func`` transforms, the C++ kernels as one Function with torch.func's rules."""
    if _fast.eligible(x):
        return _fast.gn_proxy_act
    if triton_ready(x):
        from ..kernels import triton as _triton

        return _triton.gn_proxy_act  # type: ignore[no-any-return]
    if x.is_cpu and torch._C._are_functorch_transforms_active():
        from ..kernels import _func

        return _func.gn_proxy_act
    return None


def group_norm_proxy_act(
    x: Tensor,
    num_groups: int,
    weight: Tensor,
    bias: Tensor,
    proxy_bias: Tensor,
    proxy_weight: Tensor,
    activation: ActivationLike = "relu",
    eps: float = 1e-3,
    proxy_eps: float = 0.03,
    num_points: int = 200,
    *,
    points: Tensor | None = None,
) -> Tensor:
    r"""GroupNorm without affine, then :func:`proxy_norm_act`: :class:`~normkit.nn.GroupNormProxyAct2d`'s
    step.

    ``proxy_norm_act(group_norm(x, num_groups, eps=eps), weight, bias, proxy_bias, proxy_weight, ...)``.
    On a CPU tensor with a ``relu``, ``leaky_relu`` or identity activation, eager or under ``torch.func``
    transforms, the fused kernels run it in one pass each way (the normalized input is never stored;
    the backward recomputes it from ``x``); elsewhere (torch.compile, export, other devices or
    activations) the composition above runs. ``num_groups=1`` is LN over (C, H, W) + PN, the paper's
    recommendation.

    Args:
        x: ``(N, C, *spatial)`` input, any layout and floating dtype.
        num_groups: G, a divisor of C.
        weight, bias, proxy_bias, proxy_weight: ``(C,)``, as in :func:`proxy_norm_act`.
        activation: see :func:`proxy_norm_act`.
        eps: the group norm's eps (the authors' EfficientNet code uses 1e-3).
        proxy_eps: the proxy variance's eps (0.03).
        num_points, points: the quadrature, as in :func:`proxy_norm_act`.

    Example:
        >>> C = 8
        >>> x = torch.randn(4, C, 5, 5)
        >>> ones, zeros = torch.ones(C), torch.zeros(C)
        >>> out = group_norm_proxy_act(x, 2, ones, zeros, zeros, zeros)
        >>> y = torch.nn.functional.group_norm(x, 2, eps=1e-3)
        >>> torch.allclose(out, proxy_norm_act(y, ones, zeros, zeros, zeros), atol=1e-5)
        True

    Reference: https://arxiv.org/abs/2106.03743
    """
    op = "group_norm_proxy_act"
    check_input(x, op)
    if x.dim() < 2:
        raise NormError(f"{op}: expected an (N, C, *spatial) input, got shape {tuple(x.shape)}")
    C = x.shape[1]
    groups = check_groups(num_groups, C, op)
    eps = check_eps(eps, op)
    proxy_eps = check_eps(proxy_eps, op, "proxy_eps")
    for name, p in (
        ("weight", weight),
        ("bias", bias),
        ("proxy_bias", proxy_bias),
        ("proxy_weight", proxy_weight),
    ):
        if p is None:
            raise TypeError(f"{op}: {name} is required (a (C,) tensor), got None")
        check_param(p, x, (C,), op, name)
    if x.dim() >= 3:
        fused = _gn_proxy_kernels(x)
        if fused is not None:
            u = points if points is not None else _points(num_points, torch.float64, x.device)
            out = fused(x, groups, eps, weight, bias, proxy_bias, proxy_weight, u, activation, proxy_eps)
            if out is not None:
                return out
    from .group_norm import group_norm

    y = group_norm(x, groups, None, None, eps)
    return proxy_norm_act(
        y, weight, bias, proxy_bias, proxy_weight, activation, proxy_eps, num_points, points=points
    )
