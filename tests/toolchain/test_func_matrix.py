"""Every layer under every torch.func transform, against an independent float64 oracle: a matrix.

A table of layers (eval-mode BN and its family, GN, IN, LN, LayerNorm2d, the norm-act layers, Proxy
Norm, Keras BN) crossed with a table of transforms (vmap with every ``in_dims`` / ``out_dims`` /
``chunk_size``, nested vmap, per-sample gradients, ``grad``, ``jacrev``, ``jacfwd``, ``hessian``,
``jvp``, ``vjp``, their compositions, ensembles through ``stack_module_state``) and input variants
(shapes, N=1, HW=1, strided and expanded views, channels-last, transposed strides). Each case runs
the normkit layer under the transform, and the oracle under the *same* transform in float64: torch's
own functional op (what the ``torch.nn`` layer calls) or a hand-written composite (Proxy Norm,
LayerNorm2d, Keras BN, ...), on the same parameters and buffers; where the transform has no oracle
counterpart (an ensemble's per-member buffers), a Python loop of eager float64 oracle calls. normkit
is never compared with itself.

Why a matrix: the transforms and layouts interact, and the crossings found four bugs the per-layer
tests missed, each caught here on the code before its fix: wrong values for strided views under
``grad`` / ``vjp`` / ``jvp`` / ``jacrev``; a crash of ``jacrev`` on a channels-last ``ProxyNormAct``
input; a crash of grad-of-grad (``grad`` of a gradient norm) through ``GroupNormProxyAct2d``; and
``InstanceNorm`` with tracked running statistics raising under ``grad``.

Training mode with batch statistics has its own tables: BN / IN in training (with and without
running statistics, and after ``torch.func.replace_all_batch_norm_modules_``), the BN family in
training without running statistics, and the functional ops with per-member parameters. Where
``torch.nn`` itself refuses (a vmapped training step on running statistics that are not vmapped),
normkit must raise a :class:`normkit.NormError` that names the way out; where torch refuses but
normkit works (a training step with tracked statistics under ``grad`` / ``jvp`` / ``jacrev``), its
result must equal the batch-statistics oracle and its running statistics take exactly one step.

Tolerances: the largest difference relative to ``max(1, max|oracle|)`` per result tensor, 2e-5 for
float32 and 1e-10 for float64 (5x for second derivatives). bfloat16 is not checked here: its rounding
differs between CPUs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad as fwAD
from torch.func import (
    functional_call,
    grad,
    hessian,
    jacfwd,
    jacrev,
    jvp,
    linearize,
    replace_all_batch_norm_modules_,
    stack_module_state,
    vjp,
    vmap,
)
from torch.utils._pytree import tree_leaves, tree_map

import normkit
import normkit.functional as NF
import normkit.nn as nk
from tests.reference import ref_batch_norm, ref_instance_norm

F64 = torch.float64
F32 = torch.float32
TOL = {F32: 2e-5, F64: 1e-10}
DT = {F32: "f32", F64: "f64"}
C = 6
Params = dict[str, Tensor]
Fn = Callable[[Params, Params, Tensor], Any]

# ----------------------------------------------------------------------------------------------
# oracles: float64, torch's functional ops or composites
# ----------------------------------------------------------------------------------------------


def _cview(p: Tensor, nd: int, dim: int = 1) -> Tensor:
    s = [1] * nd
    s[dim] = -1
    return p.reshape(s)


ACTS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "silu": F.silu,
    "gelu": F.gelu,
    "leaky_relu": lambda a: F.leaky_relu(a, 0.01),
}


def _points(n: int = 200) -> Tensor:
    """Proxy Norm's quantiles of N(0, 1), float64."""
    i = torch.arange(n, dtype=F64)
    return math.sqrt(2.0) * torch.erfinv(2.0 * (i + 0.5) / n - 1.0)


def proxy_oracle(y: Tensor, w: Tensor, b: Tensor, pb: Tensor, pw: Tensor, act: str, eps: float) -> Tensor:
    a = ACTS[act]
    u = _points().to(w.dtype)
    zp = a(w[:, None] * ((1.0 + pw)[:, None] * u[None, :] + pb[:, None]) + b[:, None])
    m = zp.mean(1)
    v = (zp - m[:, None]).square().mean(1)
    nd = y.dim()
    return (a(_cview(w, nd) * y + _cview(b, nd)) - _cview(m, nd)) * _cview(torch.rsqrt(v + eps), nd)


def or_bn_eval(P: Params, B: Params, x: Tensor) -> Tensor:
    return F.batch_norm(
        x, B["running_mean"], B["running_var"], P.get("weight"), P.get("bias"), False, 0.0, 1e-5
    )


def or_frozen(P: Params, B: Params, x: Tensor) -> Tensor:
    return F.batch_norm(
        x, B["running_mean"], B["running_var"], B.get("weight"), B.get("bias"), False, 0.0, 1e-5
    )


def or_bnact(P: Params, B: Params, x: Tensor) -> Tensor:
    return torch.relu(or_bn_eval(P, B, x))


def or_gn(groups: int, act: str | None = None) -> Fn:
    def f(P: Params, B: Params, x: Tensor) -> Tensor:
        y = F.group_norm(x, groups, P.get("weight"), P.get("bias"), 1e-5)
        return ACTS[act](y) if act else y

    return f


def or_in(nd: int) -> Fn:
    def f(P: Params, B: Params, x: Tensor) -> Tensor:
        unbatched = x.dim() == nd - 1
        x = x.unsqueeze(0) if unbatched else x
        y = F.instance_norm(x, weight=P.get("weight"), bias=P.get("bias"), use_input_stats=True, eps=1e-5)
        return y.squeeze(0) if unbatched else y

    return f


def or_in_running(P: Params, B: Params, x: Tensor) -> Tensor:
    unbatched = x.dim() == 3
    x = x.unsqueeze(0) if unbatched else x
    y = F.instance_norm(
        x,
        B["running_mean"],
        B["running_var"],
        P.get("weight"),
        P.get("bias"),
        use_input_stats=False,
        eps=1e-5,
    )
    return y.squeeze(0) if unbatched else y


def or_ln(shape: tuple[int, ...]) -> Fn:
    def f(P: Params, B: Params, x: Tensor) -> Tensor:
        return F.layer_norm(x, shape, P.get("weight"), P.get("bias"), 1e-5)

    return f


def or_ln2d_c(act: str | None = None) -> Fn:
    def f(P: Params, B: Params, x: Tensor) -> Tensor:
        y = F.layer_norm(x.movedim(1, -1), (x.shape[1],), P.get("weight"), P.get("bias"), 1e-5).movedim(-1, 1)
        return ACTS[act](y) if act else y

    return f


def or_ln2d_chw(P: Params, B: Params, x: Tensor) -> Tensor:
    return F.group_norm(x, 1, P.get("weight"), P.get("bias"), 1e-5)


def or_pn(act: str) -> Fn:
    def f(P: Params, B: Params, x: Tensor) -> Tensor:
        return proxy_oracle(x, P["weight"], P["bias"], P["proxy_bias"], P["proxy_weight"], act, 0.03)

    return f


def or_gnpn(groups: int, act: str) -> Fn:
    def f(P: Params, B: Params, x: Tensor) -> Tensor:
        y = F.group_norm(x, groups, None, None, 1e-3)
        return proxy_oracle(y, P["weight"], P["bias"], P["proxy_bias"], P["proxy_weight"], act, 0.03)

    return f


def or_meanonly(P: Params, B: Params, x: Tensor) -> Tensor:
    y = x - _cview(B["running_mean"], x.dim())
    return y + _cview(P["bias"], x.dim()) if "bias" in P else y


def or_keras(P: Params, B: Params, x: Tensor) -> Tensor:
    return (x - B["moving_mean"]) * torch.rsqrt(B["moving_variance"] + 1e-3) * P["gamma"] + P["beta"]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def R(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, k: float = 0.7, c: float = 0.3) -> Tensor:
    """A fixed, non-random tensor (tangents, cotangents, loss weights)."""
    return torch.sin(torch.arange(math.prod(shape), dtype=F64) * k + c).reshape(shape).to(dtype)


def loss(y: Tensor) -> Tensor:
    """A fixed non-linear scalar (``sum(y)`` alone has a zero gradient through a norm)."""
    return (y * R(y.shape, y.dtype)).sum() + 0.1 * (y * y * R(y.shape, y.dtype, 1.3, 0.1)).sum()


def rand_input(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) * 1.5 + 0.4).to(dtype)


def randomize(m: nn.Module, seed: int = 1) -> nn.Module:
    """Every floating parameter and buffer (but Proxy Norm's fixed points) set from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if not t.is_floating_point() or name.endswith("proxy_points"):
                continue
            leaf = name.split(".")[-1]
            r = torch.randn(t.shape, generator=g, dtype=F64)
            if leaf in ("weight", "gamma"):
                t.copy_(1.0 + 0.3 * r)
            elif leaf in ("running_var", "moving_variance"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g, dtype=F64))
            elif leaf in ("proxy_bias", "proxy_weight"):
                t.copy_(0.2 * r)
            else:
                t.copy_(0.3 * r)
    return m


def state(m: nn.Module) -> tuple[Params, Params]:
    return (
        {k: v.detach().clone() for k, v in m.named_parameters()},
        {k: v.detach().clone() for k, v in m.named_buffers()},
    )


def to64(tree: Any) -> Any:
    return tree_map(lambda t: t.to(F64) if isinstance(t, Tensor) and t.is_floating_point() else t, tree)


def stack(outs: list[Any]) -> Any:
    return tree_map(lambda *ts: torch.stack(ts), *outs)


def assert_matches(got: Any, want: Any, tol: float) -> None:
    """Same structure and shapes; per tensor, max |got - want| <= tol * max(1, max |want|); NaN only
    where the oracle has NaN."""
    lg, lw = tree_leaves(got), tree_leaves(want)
    assert len(lg) == len(lw), f"structure: {len(lg)} leaves vs the oracle's {len(lw)}"
    for i, (a, b) in enumerate(zip(lg, lw)):
        if not isinstance(b, Tensor):
            continue
        assert isinstance(a, Tensor), f"leaf {i}: {type(a).__name__}, the oracle's is a tensor"
        assert a.shape == b.shape, f"leaf {i}: shape {tuple(a.shape)} vs the oracle's {tuple(b.shape)}"
        if not b.numel():
            continue
        a64, b64 = a.detach().to(F64), b.detach().to(F64)
        nan_a, nan_b = a64.isnan(), b64.isnan()
        assert not (nan_a & ~nan_b).any(), f"leaf {i}: NaN where the oracle has none"
        d = torch.where(nan_a & nan_b, 0.0, (a64 - b64).abs())
        scale = max(1.0, float(b64.abs().nan_to_num().max()))
        worst = float(d.max()) / scale
        assert worst <= tol, f"leaf {i}: max diff {worst:.3g} relative to scale {scale:.3g} > {tol:g}"


# ----------------------------------------------------------------------------------------------
# the layers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    name: str
    make: Callable[[], nn.Module]
    oracle: Fn
    shapes: dict[str, tuple[int, ...]]  # label -> input shape (N, ...); float64 runs the first only
    tiny: tuple[int, ...]  # the input shape for jacobians and hessians
    unbatched: bool = False  # the layer also takes an input without the batch dim


S2 = (3, C, 4, 5)  # N, C, H, W (H != W catches transposes)
T2 = (2, C, 2, 3)
SH_BN1 = {"2d(N,C)": (4, C), "3d(N,C,L)": (3, C, 5), "N=1": (1, C, 5)}
SH_2D = {"4d": S2, "N=1": (1, C, 4, 5), "HW=1": (3, C, 1, 1)}
SH_3D = {"5d": (2, C, 2, 3, 4), "N=1": (1, C, 2, 3, 2)}
SH_GN = {
    "4d": S2,
    "3d": (3, C, 5),
    "5d": (2, C, 2, 3, 4),
    "2d(N,C)": (4, C),
    "N=1": (1, C, 4, 5),
    "HW=1": (3, C, 1, 1),
}


def _eval(m: nn.Module) -> nn.Module:
    return m.eval()


LAYERS = [
    Layer("BatchNorm1d.eval", lambda: _eval(nk.BatchNorm1d(C)), or_bn_eval, SH_BN1, (2, C, 3)),
    Layer("BatchNorm2d.eval", lambda: _eval(nk.BatchNorm2d(C)), or_bn_eval, SH_2D, T2),
    Layer("BatchNorm3d.eval", lambda: _eval(nk.BatchNorm3d(C)), or_bn_eval, SH_3D, (1, C, 2, 2, 2)),
    Layer("GroupNorm(3,6)", lambda: nk.GroupNorm(3, C), or_gn(3), SH_GN, T2),
    Layer(
        "GroupNorm(1,6)",
        lambda: nk.GroupNorm(1, C),
        or_gn(1),
        {"4d": S2, "3d": (3, C, 5), "HW=1": (3, C, 1, 1)},
        T2,
    ),
    Layer("GroupNorm(6,6)", lambda: nk.GroupNorm(C, C), or_gn(C), {"4d": S2, "5d": (2, C, 2, 3, 4)}, T2),
    Layer(
        "GroupNorm(3,6,affine=False)",
        lambda: nk.GroupNorm(3, C, affine=False),
        or_gn(3),
        {"4d": S2, "3d": (3, C, 5)},
        T2,
    ),
    Layer(
        "InstanceNorm1d(affine)",
        lambda: nk.InstanceNorm1d(C, affine=True),
        or_in(3),
        {"3d": (3, C, 5), "N=1": (1, C, 5)},
        (2, C, 4),
        unbatched=True,
    ),
    Layer(
        "InstanceNorm2d(affine)",
        lambda: nk.InstanceNorm2d(C, affine=True),
        or_in(4),
        {"4d": S2, "N=1": (1, C, 4, 5)},
        T2,
        unbatched=True,
    ),
    Layer(
        "InstanceNorm3d(affine)",
        lambda: nk.InstanceNorm3d(C, affine=True),
        or_in(5),
        SH_3D,
        (1, C, 2, 2, 2),
        unbatched=True,
    ),
    Layer("InstanceNorm2d()", lambda: nk.InstanceNorm2d(C), or_in(4), {"4d": S2}, T2, unbatched=True),
    Layer(
        "InstanceNorm2d(track).eval",
        lambda: _eval(nk.InstanceNorm2d(C, affine=True, track_running_stats=True)),
        or_in_running,
        {"4d": S2, "HW=1": (3, C, 1, 1)},
        T2,
        unbatched=True,
    ),
    Layer(
        "LayerNorm(8)",
        lambda: nk.LayerNorm(8),
        or_ln((8,)),
        {"3d(N,L,8)": (3, 4, 8), "2d(N,8)": (4, 8), "N=1": (1, 4, 8)},
        (2, 3, 8),
        unbatched=True,
    ),
    Layer(
        "LayerNorm(8,bias=False)",
        lambda: nk.LayerNorm(8, bias=False),
        or_ln((8,)),
        {"3d(N,L,8)": (3, 4, 8)},
        (2, 3, 8),
        unbatched=True,
    ),
    Layer(
        "LayerNorm((4,5))",
        lambda: nk.LayerNorm((4, 5)),
        or_ln((4, 5)),
        {"4d": S2},
        (2, 2, 4, 5),
        unbatched=True,
    ),
    Layer(
        "LayerNorm2d(c)",
        lambda: nk.LayerNorm2d(C),
        or_ln2d_c(),
        {"4d": S2, "3d": (3, C, 5), "5d": (2, C, 2, 3, 4), "HW=1": (3, C, 1, 1)},
        T2,
    ),
    Layer(
        "LayerNorm2d(chw)",
        lambda: nk.LayerNorm2d(C, over="chw"),
        or_ln2d_chw,
        {"4d": S2, "3d": (3, C, 5), "HW=1": (3, C, 1, 1)},
        T2,
    ),
    Layer(
        "GroupNormAct2d(3)", lambda: nk.GroupNormAct2d(C, num_groups=3), or_gn(3, act="relu"), {"4d": S2}, T2
    ),
    Layer("LayerNormAct2d(c)", lambda: nk.LayerNormAct2d(C), or_ln2d_c(act="relu"), {"4d": S2}, T2),
    Layer("BatchNormAct2d.eval", lambda: _eval(nk.BatchNormAct2d(C)), or_bnact, {"4d": S2}, T2),
    Layer(
        "ProxyNormAct(relu)",
        lambda: nk.ProxyNormAct(C),
        or_pn("relu"),
        {"4d": S2, "2d(N,C)": (4, C), "5d": (2, C, 2, 3, 4), "HW=1": (3, C, 1, 1)},
        T2,
    ),
    Layer(
        "ProxyNormAct(silu)",
        lambda: nk.ProxyNormAct(C, activation="silu"),
        or_pn("silu"),
        {"4d": S2, "2d(N,C)": (4, C)},
        T2,
    ),
    Layer("ProxyNormAct(gelu)", lambda: nk.ProxyNormAct(C, activation="gelu"), or_pn("gelu"), {"4d": S2}, T2),
    Layer(
        "GroupNormProxyAct2d(G=1,relu)",
        lambda: nk.GroupNormProxyAct2d(C),
        or_gnpn(1, "relu"),
        {"4d": S2, "3d": (3, C, 5), "5d": (2, C, 2, 3, 4), "N=1": (1, C, 4, 5), "HW=1": (3, C, 1, 1)},
        T2,
    ),
    Layer(
        "GroupNormProxyAct2d(G=3,leaky)",
        lambda: nk.GroupNormProxyAct2d(C, num_groups=3, activation="leaky_relu"),
        or_gnpn(3, "leaky_relu"),
        {"4d": S2, "HW=1": (3, C, 1, 1)},
        T2,
    ),
    Layer(
        "GroupNormProxyAct2d(G=2,silu)",
        lambda: nk.GroupNormProxyAct2d(C, num_groups=2, activation="silu"),
        or_gnpn(2, "silu"),
        {"4d": S2},
        T2,
    ),
    Layer(
        "FrozenBatchNorm2d", lambda: nk.FrozenBatchNorm2d(C), or_frozen, {"4d": S2, "HW=1": (3, C, 1, 1)}, T2
    ),
    Layer(
        "MeanOnlyBatchNorm.eval",
        lambda: _eval(nk.MeanOnlyBatchNorm(C)),
        or_meanonly,
        {"4d": S2, "2d(N,C)": (4, C)},
        T2,
    ),
    Layer("BatchRenorm2d.eval", lambda: _eval(nk.BatchRenorm2d(C)), or_bn_eval, {"4d": S2}, T2),
    Layer(
        "GhostBatchNorm2d.eval",
        lambda: _eval(nk.GhostBatchNorm2d(C, ghost_batch_size=2)),
        or_bn_eval,
        {"4d": S2},
        T2,
    ),
    Layer(
        "BatchNormalization(keras).eval",
        lambda: _eval(nk.BatchNormalization(C)),
        or_keras,
        {"4d(NHWC)": (3, 4, 5, C)},
        (2, 2, 3, C),
    ),
]
LAYER = {layer.name: layer for layer in LAYERS}


@dataclass(frozen=True)
class LayerState:
    module: nn.Module
    P: Params
    B: Params
    P64: Params
    B64: Params
    fn: Fn  # normkit: functional_call on (P, B)
    ofn: Fn  # the oracle, float64


@cache
def layer_state(name: str, dtype: torch.dtype) -> LayerState:
    layer = LAYER[name]
    m = randomize(layer.make()).to(dtype)
    P, B = state(m)

    def fn(P: Params, B: Params, x: Tensor) -> Any:
        return functional_call(m, (P, B), (x,))

    def ofn(P: Params, B: Params, x: Tensor) -> Any:
        return layer.oracle(P, B, x.contiguous())  # (a layout never changes the values)

    return LayerState(m, P, B, to64(P), to64(B), fn, ofn)


@cache
def inputs(name: str, dtype: torch.dtype, si: int) -> dict[str, Tensor]:
    """The input variants for the layer's ``si``-th shape: ``x`` (N, ...), ``X`` (3 members of N, ...)
    and views of them."""
    shape = list(LAYER[name].shapes.values())[si]
    x = rand_input(shape, dtype, 10 + si)
    X = torch.stack([rand_input(shape, dtype, 20 + si + j) for j in range(3)])
    xs = torch.cat([x, x.flip(-1)], dim=-1)[..., ::2]  # a strided (non-dense) view of x's shape
    d = {
        "x": x,
        "X": X,
        "xs": xs,
        "xs[:1]": xs[:1],
        "Xs": torch.cat([X, X.flip(-1)], dim=-1)[..., ::2],
        "xe": x[:1].expand(x.shape),  # stride 0 along N
        "Xt": X.transpose(-1, -2).contiguous().transpose(-1, -2),  # same values, transposed strides
    }
    if x.dim() in (4, 5):
        fmt = _cl(x)
        d["xc"] = x.contiguous(memory_format=fmt)
        d["Xc"] = X.movedim(2, -1).contiguous().movedim(-1, 2)  # every member channels_last
        d["xc[:1]"] = x[:1].contiguous(memory_format=fmt)
        d["xt[:1]"] = x.transpose(-1, -2).contiguous().transpose(-1, -2)[:1]
    return d


# ----------------------------------------------------------------------------------------------
# the transforms: T(f, P, B, x) runs f (normkit's or the oracle's) under the transform
# ----------------------------------------------------------------------------------------------


def _u(f: Fn, P: Params, B: Params) -> Callable[[Tensor], Tensor]:
    """A one-sample function: f on xi[None], squeezed."""
    return lambda xi: f(P, B, xi.unsqueeze(0)).squeeze(0)


def _cl(x: Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def _ptan(P: Params) -> Params:
    return tree_map(lambda t: R(t.shape, t.dtype, 1.1, 0.5), P)


@dataclass(frozen=True)
class Transform:
    name: str
    run: Callable[[Fn, Params, Params, Tensor], Any]
    input: str = "x"
    params: bool = False  # needs parameters to differentiate
    tol: float = 1.0  # times the dtype's tolerance
    when: Callable[[Layer, int], bool] = lambda layer, nd: True  # (layer, input ndim)


T = Transform
_CL = {"when": lambda layer, nd: nd in (4, 5) and not layer.name.startswith("BatchNormalization")}

# every shape of every layer
EVERY_SHAPE = [
    T("forward", lambda f, P, B, x: f(P, B, x)),
    T("vmap(members=1-sample)", lambda f, P, B, x: vmap(_u(f, P, B))(x)),
    T("vmap(members-of-N)", lambda f, P, B, X: vmap(lambda xi: f(P, B, xi))(X), "X"),
    T("vmap(in_dims=1)", lambda f, P, B, X: vmap(lambda xi: f(P, B, xi), in_dims=1)(X.movedim(0, 1)), "X"),
    T("vmap(in_dims=-1)", lambda f, P, B, X: vmap(lambda xi: f(P, B, xi), in_dims=-1)(X.movedim(0, -1)), "X"),
    T("grad-x", lambda f, P, B, x: grad(lambda z: loss(f(P, B, z)))(x)),
    T("grad-params", lambda f, P, B, x: grad(lambda p: loss(f(p, B, x)))(P), params=True),
    T(
        "vmap(grad)-per-sample-params",
        lambda f, P, B, x: vmap(grad(lambda p, xi: loss(f(p, B, xi.unsqueeze(0)))), in_dims=(None, 0))(P, x),
        params=True,
    ),
    T("vmap(grad)-per-sample-x", lambda f, P, B, x: vmap(grad(lambda xi: loss(f(P, B, xi.unsqueeze(0)))))(x)),
    T(
        "jvp(x,params)",
        lambda f, P, B, x: jvp(lambda z, p: f(p, B, z), (x, P), (R(x.shape, x.dtype, 0.9, 0.2), _ptan(P))),
    ),
    T(
        "vjp(x,params)",
        lambda f, P, B, x: vjp(lambda z, p: f(p, B, z), x, P)[1](R(x.shape, x.dtype, 0.37, 0.9)),
    ),
    T("vmap(vmap)", lambda f, P, B, X: vmap(vmap(_u(f, P, B)))(X), "X"),
    T("vmap(vmap(grad-x))", lambda f, P, B, X: vmap(vmap(grad(lambda xi: loss(_u(f, P, B)(xi)))))(X), "X"),
    T("vmap(chunk_size=2)", lambda f, P, B, X: vmap(lambda xi: f(P, B, xi), chunk_size=2)(X), "X"),
]

# the first shape of every layer: layouts, views, compositions
FIRST_SHAPE = [
    T("vmap-strided-slice", lambda f, P, B, X: vmap(lambda xi: f(P, B, xi))(X), "Xs"),
    T(
        "vmap(vmap)-strided-slice",
        lambda f, P, B, X: vmap(vmap(lambda xi: f(P, B, xi.unsqueeze(0))))(X),
        "Xs",
    ),
    T(
        "grad(vmap)-strided-slice",
        lambda f, P, B, X: grad(lambda Z: loss(vmap(lambda xi: f(P, B, xi))(Z)))(X),
        "Xs",
    ),
    T("vmap(grad)-strided-slice", lambda f, P, B, X: vmap(grad(lambda xi: loss(f(P, B, xi))))(X), "Xs"),
    T(
        "vmap(grad-params)-strided-slice",
        lambda f, P, B, X: vmap(grad(lambda p, xi: loss(f(p, B, xi))), in_dims=(None, 0))(P, X),
        "Xs",
        params=True,
    ),
    T("forward-strided-view", lambda f, P, B, x: f(P, B, x), "xs"),
    T("grad-x-strided-view", lambda f, P, B, x: grad(lambda z: loss(f(P, B, z)))(x), "xs"),
    T("grad-params-strided-view", lambda f, P, B, x: grad(lambda p: loss(f(p, B, x)))(P), "xs", params=True),
    T("vjp-primal-strided-view", lambda f, P, B, x: vjp(lambda z: f(P, B, z), x)[0], "xs"),
    T(
        "jvp-strided-view",
        lambda f, P, B, x: jvp(lambda z: f(P, B, z), (x,), (R(x.shape, x.dtype, 0.9, 0.2),)),
        "xs",
    ),
    T("jacfwd-x-strided-view-tiny", lambda f, P, B, x: jacfwd(lambda z: f(P, B, z))(x), "xs[:1]"),
    T("jacrev-x-strided-view-tiny", lambda f, P, B, x: jacrev(lambda z: f(P, B, z))(x), "xs[:1]"),
    # (jvp with an expanded primal fails inside torch.func itself, even for torch.relu: not checked)
    T("forward-expanded-input", lambda f, P, B, x: f(P, B, x), "xe"),
    T("grad-x-expanded-input", lambda f, P, B, x: grad(lambda z: loss(f(P, B, z)))(x), "xe"),
    T("vmap-expanded-members", lambda f, P, B, X: vmap(lambda xi: f(P, B, xi))(X[:1].expand(X.shape)), "X"),
    T("vmap-B=1", lambda f, P, B, X: vmap(lambda xi: f(P, B, xi))(X[:1]), "X"),
    T(
        "vmap(in_dims=2)",
        lambda f, P, B, X: vmap(lambda xi: f(P, B, xi), in_dims=2)(X.movedim(0, 2)),
        "X",
        when=lambda layer, nd: nd >= 3,
    ),
    T("vmap(out_dims=1)", lambda f, P, B, X: vmap(lambda xi: f(P, B, xi), out_dims=1)(X), "X"),
    T(
        "grad(x,params)-argnums=(0,1)",
        lambda f, P, B, x: grad(lambda z, p: loss(f(p, B, z)), argnums=(0, 1))(x, P),
    ),
    T("vmap-transposed-strides", lambda f, P, B, X: vmap(lambda xi: f(P, B, xi))(X), "Xt"),
    T("grad-x-transposed-strides", lambda f, P, B, X: grad(lambda z: loss(f(P, B, z)))(X[0]), "Xt"),
    T("channels_last-forward", lambda f, P, B, x: f(P, B, x), "xc", **_CL),
    T("channels_last-grad-x", lambda f, P, B, x: grad(lambda z: loss(f(P, B, z)))(x), "xc", **_CL),
    T("channels_last-vmap(members=1)", lambda f, P, B, x: vmap(_u(f, P, B))(x), "xc", **_CL),
    T("channels_last-vmap(members-of-N)", lambda f, P, B, X: vmap(lambda xi: f(P, B, xi))(X), "Xc", **_CL),
    T("channels_last-jacrev-x-tiny", lambda f, P, B, x: jacrev(lambda z: f(P, B, z))(x), "xc[:1]", **_CL),
    T("channels_last-jacfwd-x-tiny", lambda f, P, B, x: jacfwd(lambda z: f(P, B, z))(x), "xc[:1]", **_CL),
    T(
        "channels_last-hessian-x-tiny",
        lambda f, P, B, x: hessian(lambda z: loss(f(P, B, z)))(x),
        "xc[:1]",
        tol=5.0,
        **_CL,
    ),
    T(
        "channels_last-vmap(vjp)-batched-cotangents",
        lambda f, P, B, x: vmap(vjp(lambda z: f(P, B, z), x)[1])(
            torch.stack([R(x.shape, x.dtype, 0.3 + k, 0.1) for k in range(3)])
        ),
        "xc",
        **_CL,
    ),
    T(
        "channels_last-jvp",
        lambda f, P, B, x: jvp(
            lambda z: f(P, B, z), (x,), (R(x.shape, x.dtype, 0.9, 0.2).contiguous(memory_format=_cl(x)),)
        ),
        "xc",
        **_CL,
    ),
    T(
        "channels_last-vmap(grad)-per-sample-params",
        lambda f, P, B, x: vmap(grad(lambda p, xi: loss(f(p, B, xi.unsqueeze(0)))), in_dims=(None, 0))(P, x),
        "xc",
        params=True,
        **_CL,
    ),
    T(
        "transposed-strides-jacrev-x-tiny",
        lambda f, P, B, x: jacrev(lambda z: f(P, B, z))(x),
        "xt[:1]",
        **_CL,
    ),
    T(
        "vmap(vmap)-over-1d-rows",
        lambda f, P, B, x: vmap(vmap(lambda r: f(P, B, r)))(x),
        when=lambda layer, nd: layer.name.startswith("LayerNorm(8"),
    ),
    T(
        "vmap(vmap(grad))-over-1d-rows",
        lambda f, P, B, x: vmap(vmap(grad(lambda r: loss(f(P, B, r)))))(x),
        when=lambda layer, nd: layer.name.startswith("LayerNorm(8"),
    ),
    T(
        "vmap(vmap(grad-params))-over-1d-rows",
        lambda f, P, B, x: vmap(
            vmap(grad(lambda p, r: loss(f(p, B, r))), in_dims=(None, 0)), in_dims=(None, 0)
        )(P, x),
        when=lambda layer, nd: layer.name.startswith("LayerNorm(8"),
    ),
    T(
        "vmap-unbatched-members",
        lambda f, P, B, x: vmap(lambda xi: f(P, B, xi))(x),
        when=lambda layer, nd: layer.unbatched,
    ),
    T(
        "vmap(grad)-unbatched-members",
        lambda f, P, B, x: vmap(grad(lambda xi: loss(f(P, B, xi))))(x),
        when=lambda layer, nd: layer.unbatched,
    ),
    T(
        "vmap(jvp)",
        lambda f, P, B, X: vmap(
            lambda xi: jvp(lambda z: f(P, B, z), (xi,), (R(xi.shape, xi.dtype, 0.9, 0.2),))[1]
        )(X),
        "X",
    ),
    T(
        "jvp(grad)-hvp",
        lambda f, P, B, x: jvp(grad(lambda z: loss(f(P, B, z))), (x,), (R(x.shape, x.dtype, 0.9, 0.2),))[1],
    ),
    T(
        "grad(grad-norm)",
        lambda f, P, B, x: grad(lambda z: grad(lambda w: loss(f(P, B, w)))(z).square().sum())(x),
    ),
    T(
        "jvp(grad-params)",
        lambda f, P, B, x: jvp(lambda p: grad(lambda q: loss(f(q, B, x)))(p), (P,), (_ptan(P),))[1],
        params=True,
    ),
]


def _per_sample(t: Callable[..., Any]) -> Callable[[Fn, Params, Params, Tensor], Any]:
    """vmap(t(per-sample loss or output)) over the samples, parameters shared."""
    return lambda f, P, B, x: vmap(t(lambda p, xi: f(p, B, xi.unsqueeze(0))), in_dims=(None, 0))(P, x)


# the tiny shape of every layer: jacobians and hessians
TINY = [
    T("jacrev-x", lambda f, P, B, x: jacrev(lambda z: f(P, B, z))(x)),
    T("jacfwd-x", lambda f, P, B, x: jacfwd(lambda z: f(P, B, z))(x)),
    T("hessian-x", lambda f, P, B, x: hessian(lambda z: loss(f(P, B, z)))(x), tol=5.0),
    T("jacrev(jacrev)-x", lambda f, P, B, x: jacrev(jacrev(lambda z: loss(f(P, B, z))))(x), tol=5.0),
    T("jacrev-params", lambda f, P, B, x: jacrev(lambda p: f(p, B, x))(P), params=True),
    T("jacfwd-params", lambda f, P, B, x: jacfwd(lambda p: f(p, B, x))(P), params=True),
    T("hessian-params", lambda f, P, B, x: hessian(lambda p: loss(f(p, B, x)))(P), params=True, tol=5.0),
    T(
        "vmap(hessian-params)-per-sample",
        lambda f, P, B, x: vmap(hessian(lambda p, xi: loss(f(p, B, xi.unsqueeze(0)))), in_dims=(None, 0))(
            P, x
        ),
        params=True,
        tol=5.0,
    ),
    T("vmap(jacfwd-params)-per-sample", _per_sample(jacfwd), params=True),
    T("vmap(jacrev-params)-per-sample", _per_sample(jacrev), params=True),
    T(
        "vmap(grad-params)-in_dims=1",
        lambda f, P, B, x: vmap(grad(lambda p, xi: loss(f(p, B, xi.unsqueeze(0)))), in_dims=(None, 1))(
            P, x.movedim(0, 1)
        ),
        params=True,
    ),
]


@dataclass(frozen=True)
class Case:
    layer: str
    dtype: torch.dtype
    si: int  # the shape's index; -1: the tiny shape
    transform: Transform


def _matrix() -> list[Any]:
    cases = []
    for layer in LAYERS:
        has_params = bool(list(layer.make().parameters()))
        for dtype in (F32, F64):
            shapes = list(layer.shapes.items())[: None if dtype == F32 else 1]
            groups = [
                (si, label, shape, EVERY_SHAPE + (FIRST_SHAPE if si == 0 else []))
                for si, (label, shape) in enumerate(shapes)
            ]
            groups.append((-1, "tiny", layer.tiny, TINY))
            for si, label, shape, transforms in groups:
                for t in transforms:
                    if (t.params and not has_params) or not t.when(layer, len(shape)):
                        continue
                    case = Case(layer.name, dtype, si, t)
                    cases.append(pytest.param(case, id=f"{layer.name}-{DT[dtype]}-{label}-{t.name}"))
    return cases


MATRIX = _matrix()


@pytest.mark.parametrize("case", MATRIX)
def test_layer_under_transform_matches_the_float64_oracle(case: Case) -> None:
    s = layer_state(case.layer, case.dtype)
    if case.si >= 0:
        x = inputs(case.layer, case.dtype, case.si)[case.transform.input]
    else:
        x = rand_input(LAYER[case.layer].tiny, case.dtype, 99)
    got = case.transform.run(s.fn, s.P, s.B, x)
    want = case.transform.run(s.ofn, s.P64, s.B64, x.to(F64))
    assert_matches(got, want, TOL[case.dtype] * case.transform.tol)


# ----------------------------------------------------------------------------------------------
# ensembles: stack_module_state, vmap over the members; the oracle: a loop over the members
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ensemble:
    Ps: Params
    Bs: Params
    Ps64: Params
    Bs64: Params
    fn: Fn
    ofn: Fn
    x: Tensor
    X: Tensor


@cache
def ensemble(name: str, dtype: torch.dtype) -> Ensemble:
    layer, s = LAYER[name], layer_state(name, dtype)
    models = [randomize(copy.deepcopy(s.module), seed=k).to(dtype) for k in (5, 6, 7)]
    Ps, Bs = stack_module_state(models)
    Ps = {k: v.detach() for k, v in Ps.items()}
    Bs = {k: v.detach() for k, v in Bs.items()}
    skel = copy.deepcopy(models[0])
    shape = list(layer.shapes.values())[0]
    x = rand_input(shape, dtype, 40)
    X = torch.stack([rand_input(shape, dtype, 41 + j) for j in range(3)])

    def fn(P: Params, B: Params, x: Tensor) -> Any:
        return functional_call(skel, (P, B), (x,))

    return Ensemble(Ps, Bs, to64(Ps), to64(Bs), fn, s.ofn, x, X)


def _member(tree: Params, i: int) -> Params:
    return {k: v[i] for k, v in tree.items()}


def loop(t: Callable[[Params, Params, Tensor], Any], Ps: Params, Bs: Params, x: Tensor, shared: bool) -> Any:
    """The oracle's ensemble: t on each member's parameters and buffers, stacked."""
    return stack([t(_member(Ps, i), _member(Bs, i), x if shared else x[i]) for i in range(3)])


@dataclass(frozen=True)
class EnsembleTransform:
    name: str
    nk: Callable[[Fn, Params, Params, Tensor], Any]  # (normkit's skeleton fn, stacked P, stacked B, input)
    oracle: Callable[[Fn, Params, Params, Tensor], Any]  # (the oracle fn, float64 stacked P, B, input)
    input: str = "x"  # "x": one input for all members, "X": one per member
    params: bool = False


E = EnsembleTransform
ENSEMBLE = [
    E(
        "vmap(shared-x)",
        lambda f, P, B, x: vmap(f, in_dims=(0, 0, None))(P, B, x),
        lambda f, P, B, x: loop(f, P, B, x, True),
    ),
    E(
        "vmap(x-per-member)",
        lambda f, P, B, X: vmap(f, in_dims=(0, 0, 0))(P, B, X),
        lambda f, P, B, X: loop(f, P, B, X, False),
        "X",
    ),
    E(
        "vmap(params-stacked,buffers-shared)",
        lambda f, P, B, x: vmap(f, in_dims=(0, None, None))(P, _member(B, 0), x),
        lambda f, P, B, x: stack([f(_member(P, i), _member(B, 0), x) for i in range(3)]),
        params=True,
    ),
    E(
        "vmap(grad-params)-per-member",
        lambda f, P, B, x: vmap(grad(lambda p, b, xx: loss(f(p, b, xx))), in_dims=(0, 0, None))(P, B, x),
        lambda f, P, B, x: loop(lambda p, b, xx: grad(lambda q: loss(f(q, b, xx)))(p), P, B, x, True),
        params=True,
    ),
    E(
        "vmap(vmap(grad))-per-member-per-sample",
        lambda f, P, B, x: vmap(
            vmap(grad(lambda p, b, xi: loss(f(p, b, xi.unsqueeze(0)))), in_dims=(None, None, 0)),
            in_dims=(0, 0, None),
        )(P, B, x),
        lambda f, P, B, x: loop(
            lambda p, b, xx: vmap(grad(lambda q, xi: loss(f(q, b, xi.unsqueeze(0)))), in_dims=(None, 0))(
                p, xx
            ),
            P,
            B,
            x,
            True,
        ),
        params=True,
    ),
    E(
        "vmap(grad-x)-shared-x",
        lambda f, P, B, x: vmap(grad(lambda p, b, xx: loss(f(p, b, xx)), argnums=2), in_dims=(0, 0, None))(
            P, B, x
        ),
        lambda f, P, B, x: loop(lambda p, b, xx: grad(lambda z: loss(f(p, b, z)))(xx), P, B, x, True),
        params=True,
    ),
    E(
        "vmap(jacrev-params)-tiny",
        lambda f, P, B, x: vmap(jacrev(lambda p, b, xx: f(p, b, xx)), in_dims=(0, 0, None))(P, B, x[:1]),
        lambda f, P, B, x: loop(lambda p, b, xx: jacrev(lambda q: f(q, b, xx))(p), P, B, x[:1], True),
        params=True,
    ),
    E(
        "vmap(jvp-params)",
        lambda f, P, B, x: vmap(
            lambda p, b: jvp(lambda q: f(q, b, x), (p,), (tree_map(lambda t: torch.full_like(t, 0.3), p),))[1]
        )(P, B),
        lambda f, P, B, x: loop(
            lambda p, b, xx: jvp(
                lambda q: f(q, b, xx), (p,), (tree_map(lambda t: torch.full_like(t, 0.3), p),)
            )[1],
            P,
            B,
            x,
            True,
        ),
        params=True,
    ),
]


def _ensemble_cases() -> list[Any]:
    cases = []
    for layer in LAYERS:
        m = layer.make()
        has_params = bool(list(m.parameters()))
        if not has_params and not any(b.is_floating_point() for b in m.buffers()):
            continue
        for dtype in (F32, F64):
            for t in ENSEMBLE:
                if t.params and not has_params:
                    continue
                cases.append(
                    pytest.param(layer.name, dtype, t, id=f"{layer.name}-{DT[dtype]}-ensemble-{t.name}")
                )
    return cases


@pytest.mark.parametrize("name, dtype, t", _ensemble_cases())
def test_ensemble_under_transform_matches_a_loop_of_the_oracle(
    name: str, dtype: torch.dtype, t: EnsembleTransform
) -> None:
    e = ensemble(name, dtype)
    x = e.x if t.input == "x" else e.X
    got = t.nk(e.fn, e.Ps, e.Bs, x)
    want = t.oracle(e.ofn, e.Ps64, e.Bs64, x.to(F64))
    assert_matches(got, want, TOL[dtype])


@pytest.mark.parametrize(
    "name, dtype",
    [
        pytest.param(layer.name, dtype, id=f"{layer.name}-{DT[dtype]}")
        for layer in LAYERS
        for dtype in (F32, F64)
    ],
)
def test_transforms_leave_the_buffers_of_an_eval_layer_untouched(name: str, dtype: torch.dtype) -> None:
    """The buffers handed to functional_call are never written (no running-statistics step in eval)."""
    s = layer_state(name, dtype)
    B = {k: v.clone() for k, v in s.B.items()}
    before = {k: v.clone() for k, v in B.items()}
    x, X = inputs(name, dtype, 0)["x"], inputs(name, dtype, 0)["X"]
    vmap(lambda xi: s.fn(s.P, B, xi))(X)
    grad(lambda z: loss(s.fn(s.P, B, z)))(x)
    jvp(lambda z: s.fn(s.P, B, z), (x,), (R(x.shape, x.dtype),))
    jacrev(lambda z: s.fn(s.P, B, z))(x[:1])
    for k, v in B.items():
        assert torch.equal(v, before[k]), f"{k} changed"


# ----------------------------------------------------------------------------------------------
# BN / IN in training mode: batch statistics, with and without running statistics
# ----------------------------------------------------------------------------------------------

TRAIN_LAYERS: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...]]] = {
    "BatchNorm2d": (lambda **kw: nk.BatchNorm2d(C, **kw), (3, C, 4, 5)),
    "BatchNorm1d": (lambda **kw: nk.BatchNorm1d(C, **kw), (4, C)),
    "InstanceNorm2d": (lambda **kw: nk.InstanceNorm2d(C, affine=True, **kw), (3, C, 4, 5)),
}
TrainFn = Callable[[Params, Tensor], Any]


def or_train(name: str) -> TrainFn:
    """Batch statistics, no running statistics (what the layer computes in training)."""
    if name.startswith("InstanceNorm"):
        return lambda P, x: F.instance_norm(x, None, None, P["weight"], P["bias"], True, 0.0, 1e-5)
    return lambda P, x: F.batch_norm(x, None, None, P["weight"], P["bias"], True, 0.0, 1e-5)


def _tiny(x: Tensor) -> Tensor:
    """A strided slice of x for the jacobians."""
    return x[:2, :, :2] if x.dim() > 2 else x[::2]


@dataclass(frozen=True)
class TrainTransform:
    name: str
    run: Callable[[TrainFn, Params, Tensor, Tensor], Any]  # (f(P, x), P, x, X)
    vmapped: bool  # vmaps the training step (one set of running statistics: torch.nn refuses)
    step_input: Callable[[Tensor], Tensor] = lambda x: x  # the input of the one forward (not vmapped)


TT = TrainTransform
TRAIN_TRANSFORMS = [
    TT("vmap(members-of-N)", lambda f, P, x, X: vmap(lambda xi: f(P, xi))(X), True),
    TT("vmap(in_dims=1)", lambda f, P, x, X: vmap(lambda xi: f(P, xi), in_dims=1)(X.movedim(0, 1)), True),
    TT("vmap(grad-x)-members-of-N", lambda f, P, x, X: vmap(grad(lambda z: loss(f(P, z))))(X), True),
    TT(
        "vmap(grad-params)-members-of-N",
        lambda f, P, x, X: vmap(grad(lambda p, xi: loss(f(p, xi))), in_dims=(None, 0))(P, X),
        True,
    ),
    TT("grad-x", lambda f, P, x, X: grad(lambda z: loss(f(P, z)))(x), False),
    TT("grad-params", lambda f, P, x, X: grad(lambda p: loss(f(p, x)))(P), False),
    TT("jvp-x", lambda f, P, x, X: jvp(lambda z: f(P, z), (x,), (R(x.shape, x.dtype, 0.9, 0.2),)), False),
    TT(
        "jacrev-x-tiny",
        lambda f, P, x, X: jacrev(lambda z: f(P, z))(_tiny(x).contiguous()),
        False,
        lambda x: _tiny(x).contiguous(),
    ),
    TT("jacrev-x-tiny-strided-slice", lambda f, P, x, X: jacrev(lambda z: f(P, z))(_tiny(x)), False, _tiny),
]
VARIANTS = {"track": True, "no-track": False, "replace_all_bn": True}


def train_module(name: str, variant: str, seed: int = 1) -> nn.Module:
    m = randomize(TRAIN_LAYERS[name][0](track_running_stats=VARIANTS[variant]), seed).train()
    if variant == "replace_all_bn":
        replace_all_batch_norm_modules_(m)
    return m


def train_inputs(name: str) -> tuple[Tensor, Tensor]:
    shape = TRAIN_LAYERS[name][1]
    X = torch.stack([rand_input(shape, F32, 60 + j) for j in range(3)])
    return X[0], X


def expected_step(name: str, m0: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """The running statistics after one training step on x, float64 reference (tests.reference)."""
    B = {k: v.detach() for k, v in m0.named_buffers()}
    rm, rv, nbt = to64(B["running_mean"]), to64(B["running_var"]), B["num_batches_tracked"]
    ref = ref_instance_norm if name.startswith("InstanceNorm") else ref_batch_norm
    out = ref(x, rm, rv, None, None, True, momentum=0.1, eps=1e-5, num_batches_tracked=nbt)
    return {
        "running_mean": out.running_mean,
        "running_var": out.running_var,
        "num_batches_tracked": out.num_batches_tracked,
    }


def _train_cases() -> list[Any]:
    return [
        pytest.param(name, variant, t, id=f"{name}-train-{variant}-{t.name}")
        for name in TRAIN_LAYERS
        for variant in VARIANTS
        if not (name.startswith("InstanceNorm") and variant == "replace_all_bn")
        for t in TRAIN_TRANSFORMS
    ]


@pytest.mark.parametrize("name, variant, t", _train_cases())
def test_training_step_under_transform(name: str, variant: str, t: TrainTransform) -> None:
    """Batch statistics in training. With running statistics that are not vmapped, a vmapped step is a
    NormError naming the way out (torch.nn raises too); an un-vmapped one (grad, jvp, jacrev: torch.nn
    raises for BN) computes the batch-statistics result and takes one running-statistics step."""
    m = train_module(name, variant)
    m0 = copy.deepcopy(m)
    x, X = train_inputs(name)
    P = {k: v.detach() for k, v in m.named_parameters()}
    P64 = to64(P)

    def f(p: Params, xi: Tensor) -> Any:
        return functional_call(m, p, (xi,))

    tracking = getattr(m, "running_mean", None) is not None
    if tracking and t.vmapped:
        with pytest.raises(normkit.NormError, match="track_running_stats=False"):
            t.run(f, P, x, X)
        return
    got = t.run(f, P, x, X)
    assert_matches(got, t.run(or_train(name), P64, x.to(F64), X.to(F64)), TOL[F32])
    if tracking:
        want = expected_step(name, m0, t.step_input(x))
        assert_matches({k: getattr(m, k) for k in want}, want, TOL[F32])


@pytest.mark.parametrize(
    "name, variant",
    [
        pytest.param(n, v, id=f"{n}-train-{v}-ensemble-vmap(x-per-member)")
        for n in TRAIN_LAYERS
        for v in VARIANTS
        if not (n.startswith("InstanceNorm") and v == "replace_all_bn")
    ],
)
def test_training_ensemble_with_per_member_running_statistics(name: str, variant: str) -> None:
    """stack_module_state vmaps the buffers too: each member takes its own step (oracle: a loop of
    tests.reference calls, float64)."""
    members = [train_module(name, variant, seed) for seed in (5, 6, 7)]
    Ps, Bs = stack_module_state(members)
    Ps = {k: v.detach() for k, v in Ps.items()}
    _, X = train_inputs(name)
    out = vmap(lambda p, b, xi: functional_call(members[0], (p, b), (xi,)))(Ps, Bs, X)
    keys = ("running_mean", "running_var", "num_batches_tracked")
    got = (out, {k: Bs[k] for k in keys if k in Bs})
    ref = ref_instance_norm if name.startswith("InstanceNorm") else ref_batch_norm
    outs = []
    for i, mi in enumerate(members):
        b = {k: v.detach() for k, v in mi.named_buffers()}
        r = ref(
            X[i],
            to64(b.get("running_mean")),
            to64(b.get("running_var")),
            mi.weight,
            mi.bias,
            True,
            momentum=0.1,
            eps=1e-5,
            num_batches_tracked=b.get("num_batches_tracked"),
        )
        outs.append((r.output, {k: getattr(r, k) for k in keys if k in Bs}))
    assert_matches(got, stack(outs), TOL[F32])


# ----------------------------------------------------------------------------------------------
# the BN family in training without running statistics: vmap over the members of N
# ----------------------------------------------------------------------------------------------


def or_batch_stats(P: Params, B: Params, x: Tensor) -> Tensor:
    return F.batch_norm(
        x, None, None, P.get("weight", B.get("weight")), P.get("bias", B.get("bias")), True, 0.0, 1e-5
    )


def or_ghost(P: Params, B: Params, x: Tensor) -> Tensor:
    return torch.cat([or_batch_stats(P, B, c) for c in x.split(2)])  # ghost batches of 2 samples


def or_meanonly_train(P: Params, B: Params, x: Tensor) -> Tensor:
    dims = [0, *range(2, x.dim())]
    return x - x.mean(dims, keepdim=True) + _cview(P["bias"], x.dim())


def _renorm_untracked() -> nn.Module:
    m = randomize(nk.BatchRenorm2d(C)).train()
    m.track_running_stats = False
    return m


FAMILY: dict[str, tuple[Callable[[], nn.Module], Fn, bool]] = {  # make, oracle, 5-D input
    "GhostBatchNorm2d(ghost=2)-replace_all": (
        lambda: replace_all_batch_norm_modules_(
            randomize(nk.GhostBatchNorm2d(C, ghost_batch_size=2)).train()
        ),
        or_ghost,
        False,
    ),
    "BatchRenorm2d-track-off": (_renorm_untracked, or_batch_stats, False),
    "FrozenBatchNorm2d(use_running_stats=False)": (
        lambda: randomize(nk.FrozenBatchNorm2d(C, use_running_stats=False)),
        or_batch_stats,
        False,
    ),
    "MeanOnlyBatchNorm(track=False).train": (
        lambda: randomize(nk.MeanOnlyBatchNorm(C, track_running_stats=False)).train(),
        or_meanonly_train,
        False,
    ),
    "BatchNormAct2d(track=False).train": (
        lambda: randomize(nk.BatchNormAct2d(C, track_running_stats=False)).train(),
        lambda P, B, x: torch.relu(or_batch_stats(P, B, x)),
        False,
    ),
    "BatchNorm3d(track=False).train": (
        lambda: randomize(nk.BatchNorm3d(C, track_running_stats=False)).train(),
        or_batch_stats,
        True,
    ),
}
FAMILY_TRANSFORMS = [
    T("vmap(members-of-N)", lambda f, P, B, X: vmap(lambda xi: f(P, B, xi))(X)),
    T("vmap(grad-x)-members-of-N", lambda f, P, B, X: vmap(grad(lambda xi: loss(f(P, B, xi))))(X)),
    T(
        "vmap(grad-params)-members-of-N",
        lambda f, P, B, X: vmap(grad(lambda p, xi: loss(f(p, B, xi))), in_dims=(None, 0))(P, X),
        params=True,
    ),
    T("jacrev-x-tiny", lambda f, P, B, X: jacrev(lambda z: f(P, B, z))(X[0, :2, :, :2].contiguous())),
    T("jacrev-x-tiny-strided-slice", lambda f, P, B, X: jacrev(lambda z: f(P, B, z))(X[0, :2, :, :2])),
]


def _family_cases() -> list[Any]:
    return [
        pytest.param(name, t, id=f"{name}-{t.name}")
        for name, (make, _, _) in FAMILY.items()
        for t in FAMILY_TRANSFORMS
        if not t.params or list(make().parameters())
    ]


@pytest.mark.parametrize("name, t", _family_cases())
def test_family_in_training_without_running_statistics(name: str, t: Transform) -> None:
    make, oracle, five_d = FAMILY[name]
    m = make()
    X = torch.stack([rand_input((4, C, 3, 3), F32, 80 + j) for j in range(3)])
    if five_d:
        X = X.unsqueeze(-1).expand(*X.shape, 2).contiguous()
    P, B = state(m)

    def fn(P: Params, B: Params, x: Tensor) -> Any:
        return functional_call(m, (P, B), (x,))

    got = t.run(fn, P, B, X)
    want = t.run(oracle, to64(P), to64(B), X.to(F64))
    assert_matches(got, want, TOL[F32])


# ----------------------------------------------------------------------------------------------
# the functional ops with per-member parameters; forward-mode AD on dual tensors; linearize
# ----------------------------------------------------------------------------------------------


@cache
def fdata() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "x": rand_input((3, C, 4, 5), F32, 70),
        "X": torch.stack([rand_input((3, C, 4, 5), F32, 71 + j) for j in range(3)]),
        "W": 1 + 0.3 * torch.randn(3, C, generator=g),
        "B": 0.3 * torch.randn(3, C, generator=g),
        "L": torch.randn(3, 2, 4, 8, generator=g),  # layer_norm over (8,)
        "LW": 1 + 0.3 * torch.randn(3, 8, generator=g),
        "LB": 0.3 * torch.randn(3, 8, generator=g),
    }


def _d(key: str, i: int | None = None) -> Tensor:
    t = fdata()[key]
    return (t if i is None else t[i]).to(F64)


def _bn_step(i: int) -> tuple[Tensor, Tensor, Tensor]:
    rm, rv = torch.zeros(C, dtype=F64), torch.ones(C, dtype=F64)
    y = F.batch_norm(_d("X", i), rm, rv, None, None, True, 0.1, 1e-5)  # updates rm, rv
    return y, rm, rv


FUNCTIONAL: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {  # normkit, oracle (float64)
    "group_norm-vmap(weight-batched,bias-shared)": (
        lambda: vmap(lambda w: NF.group_norm(fdata()["x"], 3, w, fdata()["B"][0]))(fdata()["W"]),
        lambda: torch.stack([F.group_norm(_d("x"), 3, _d("W", i), _d("B", 0)) for i in range(3)]),
    ),
    "group_norm-vmap(x,weight-batched,bias-None)": (
        lambda: vmap(lambda xi, w: NF.group_norm(xi, 3, w, None))(fdata()["X"], fdata()["W"]),
        lambda: torch.stack([F.group_norm(_d("X", i), 3, _d("W", i), None) for i in range(3)]),
    ),
    "layer_norm_2d(c)-vmap(x,w,b)": (
        lambda: vmap(NF.layer_norm_2d)(fdata()["X"], fdata()["W"], fdata()["B"]),
        lambda: torch.stack(
            [or_ln2d_c()({"weight": _d("W", i), "bias": _d("B", i)}, {}, _d("X", i)) for i in range(3)]
        ),
    ),
    "instance_norm-vmap(x,w)": (
        lambda: vmap(lambda xi, w: NF.instance_norm(xi, weight=w, bias=None).output)(
            fdata()["X"], fdata()["W"]
        ),
        lambda: torch.stack([F.instance_norm(_d("X", i), weight=_d("W", i)) for i in range(3)]),
    ),
    "batch_norm(training)-vmap-members-of-N-no-running-stats": (
        lambda: vmap(
            lambda xi: NF.batch_norm(xi, None, None, fdata()["W"][0], fdata()["B"][0], training=True).output
        )(fdata()["X"]),
        lambda: torch.stack(
            [F.batch_norm(_d("X", i), None, None, _d("W", 0), _d("B", 0), True) for i in range(3)]
        ),
    ),
    "batch_norm(training)-vmap(grad-x)-members-of-N": (
        lambda: vmap(
            grad(
                lambda xi: loss(
                    NF.batch_norm(xi, None, None, fdata()["W"][0], fdata()["B"][0], training=True).output
                )
            )
        )(fdata()["X"]),
        lambda: torch.stack(
            [
                grad(lambda xi: loss(F.batch_norm(xi, None, None, _d("W", 0), _d("B", 0), True)))(_d("X", i))
                for i in range(3)
            ]
        ),
    ),
    "batch_norm(training)-vmap-per-member-running-stats": (
        lambda: vmap(lambda xi, rm, rv: tuple(NF.batch_norm(xi, rm, rv, None, None, training=True)[:3]))(
            fdata()["X"], torch.zeros(3, C), torch.ones(3, C)
        ),
        lambda: tuple(stack([_bn_step(i) for i in range(3)])),
    ),
    "layer_norm-vmap(x,w,b)-over-(8,)": (
        lambda: vmap(lambda xi, w, b: NF.layer_norm(xi, 8, w, b))(fdata()["L"], fdata()["LW"], fdata()["LB"]),
        lambda: torch.stack([F.layer_norm(_d("L", i), (8,), _d("LW", i), _d("LB", i)) for i in range(3)]),
    ),
    "proxy_norm_act-vmap(y,params-per-member)": (
        lambda: vmap(lambda yi, w, b: NF.proxy_norm_act(yi, w, b, 0.1 * b, 0.1 * w - 0.1, "relu"))(
            fdata()["X"], fdata()["W"], fdata()["B"]
        ),
        lambda: torch.stack(
            [
                proxy_oracle(
                    _d("X", i), _d("W", i), _d("B", i), 0.1 * _d("B", i), 0.1 * _d("W", i) - 0.1, "relu", 0.03
                )
                for i in range(3)
            ]
        ),
    ),
    "group_norm_proxy_act-vmap(x,params-per-member)": (
        lambda: vmap(lambda xi, w, b: NF.group_norm_proxy_act(xi, 3, w, b, 0.1 * b, 0.1 * w - 0.1, "relu"))(
            fdata()["X"], fdata()["W"], fdata()["B"]
        ),
        lambda: torch.stack(
            [
                proxy_oracle(
                    F.group_norm(_d("X", i), 3, eps=1e-3),
                    _d("W", i),
                    _d("B", i),
                    0.1 * _d("B", i),
                    0.1 * _d("W", i) - 0.1,
                    "relu",
                    0.03,
                )
                for i in range(3)
            ]
        ),
    ),
}


@pytest.mark.parametrize("name", list(FUNCTIONAL))
def test_functional_op_under_vmap_matches_the_float64_oracle(name: str) -> None:
    nk_fn, oracle = FUNCTIONAL[name]
    assert_matches(nk_fn(), oracle(), TOL[F32])


DUAL_LAYERS: dict[str, tuple[Callable[[], nn.Module], Fn]] = {
    "GroupNorm(3,6)": (lambda: nk.GroupNorm(3, C), or_gn(3)),
    "LayerNorm2d(c)": (lambda: nk.LayerNorm2d(C), or_ln2d_c()),
    "ProxyNormAct": (lambda: nk.ProxyNormAct(C), or_pn("relu")),
    "GroupNormProxyAct2d": (lambda: nk.GroupNormProxyAct2d(C), or_gnpn(1, "relu")),
    "BatchNorm2d.eval": (lambda: _eval(nk.BatchNorm2d(C)), or_bn_eval),
}


def _oracle_jvp(oracle: Fn, m: nn.Module, x: Tensor, t: Tensor) -> Tensor:
    P, B = to64(state(m))
    return jvp(lambda z: oracle(P, B, z), (x.to(F64),), (t.to(F64),))[1]


@pytest.mark.parametrize("name", [n for n in DUAL_LAYERS if n != "BatchNorm2d.eval"])
def test_forward_ad_dual_tensors_match_the_oracles_jvp(name: str) -> None:
    make, oracle = DUAL_LAYERS[name]
    m = randomize(make())
    x = fdata()["x"]
    t = R(x.shape, x.dtype, 0.9, 0.2)
    with fwAD.dual_level():
        got = fwAD.unpack_dual(m(fwAD.make_dual(x, t))).tangent
    assert_matches(got, _oracle_jvp(oracle, m, x, t), TOL[F32])


# torch.func.linearize traces with make_fx, whose constant folding warns about its own graph
@pytest.mark.filterwarnings("ignore:Attempted to insert a get_attr Node:UserWarning")
@pytest.mark.parametrize("name", [n for n in DUAL_LAYERS if n != "LayerNorm2d(c)"])
def test_linearize_matches_the_oracles_jvp(name: str) -> None:
    make, oracle = DUAL_LAYERS[name]
    m = randomize(make())
    x = fdata()["x"]
    t = R(x.shape, x.dtype, 0.9, 0.2)
    got = linearize(lambda z: m(z), x)[1](t)
    assert_matches(got, _oracle_jvp(oracle, m, x, t), TOL[F32])
