"""The fused Proxy Norm paths (``normkit.kernels._fast``) against an independent float64 oracle.

* :class:`normkit.nn.GroupNormProxyAct2d` in eager CPU runs GroupNorm and the proxy-normalized
  activation as one pass each way (``normkit_gn_act_forward`` / ``_backward``), and the proxy
  statistics as one C++ call each way (``normkit_proxy_stats``);
* :func:`normkit.functional.proxy_stats` takes the same C++ statistics.

The oracle is written here from the paper's definition in float64 (tests.reference's GroupNorm, the
Gaussian mid-point quantiles, the activation, the per-channel mean and variance) and differentiated by
autograd; it shares no code with the kernels.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import normkit
import normkit.functional as F
import normkit.nn as nkn
from normkit import kernels
from normkit.kernels import _build, _fast
from tests.reference import ref_group_norm

F64 = torch.float64
pytestmark = pytest.mark.skipif(
    not kernels.build(), reason="no C++ compiler here: the fused CPU kernels cannot be built"
)

ACTS = {
    "relu": torch.relu,
    "leaky_relu:0.2": lambda a: torch.nn.functional.leaky_relu(a, 0.2),
    "identity": lambda a: a,
}
# output / gradient tolerance relative to the oracle's scale, per input dtype
TOL = {torch.float32: 2e-5, F64: 1e-10, torch.bfloat16: 2e-2}
GTOL = {torch.float32: 1e-4, F64: 1e-9, torch.bfloat16: 5e-2}


def oracle_stats(w, b, pb, pw, act, eps=0.03, n=200):
    i = torch.arange(n, dtype=F64)
    u = math.sqrt(2.0) * torch.erfinv(2.0 * (i + 0.5) / n - 1.0)
    z = ACTS[act](w[:, None] * ((1 + pw)[:, None] * u + pb[:, None]) + b[:, None])
    m = z.mean(1)
    return m, ((z - m[:, None]) ** 2).mean(1).add(eps).rsqrt()


def oracle_layer(x, groups, w, b, pb, pw, act, eps):
    y = ref_group_norm(x, groups, None, None, eps)
    m, r = oracle_stats(w, b, pb, pw, act)
    view = (1, -1) + (1,) * (x.dim() - 2)
    return (ACTS[act](w.view(view) * y + b.view(view)) - m.view(view)) * r.view(view)


def _layer(C, groups, act, seed):
    layer = nkn.GroupNormProxyAct2d(C, num_groups=groups, activation=act, eps=1e-3)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(1 + 0.3 * torch.randn(C, generator=g))
        for p in (layer.bias, layer.proxy_bias, layer.proxy_weight):
            p.copy_(0.3 * torch.randn(C, generator=g))
    return layer


def _rel(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


class _Spy:
    def __init__(self, monkeypatch, name):
        self.calls = 0
        orig = getattr(_fast, name)

        def wrapped(*a, **k):
            self.calls += 1
            return orig(*a, **k)

        monkeypatch.setattr(_fast, name, wrapped)


def _use_path(monkeypatch, path):
    """``"node"``: the C++ autograd node (when it builds here); ``"python"``: the Python Function."""
    if path == "python":
        monkeypatch.setitem(_build._autograd, "module", None)
        monkeypatch.setitem(_build._autograd, "tried", True)
    elif _build.autograd_module() is None:
        pytest.skip(f"the C++ autograd node does not build here: {_build.autograd_error()}")


@pytest.mark.parametrize("path", ["node", "python"])
@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize(
    "shape, groups", [((4, 16, 7, 5), 4), ((3, 12, 6, 6), 1), ((2, 8, 5, 3), 8), ((1, 6, 9, 1), 2)]
)
def test_gn_proxy_layer_matches_the_float64_oracle(monkeypatch, path, dtype, layout, act, shape, groups):
    _check_layer(monkeypatch, path, dtype, layout, act, shape, groups)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_gn_proxy_layer_beyond_the_cache_takes_the_streamed_stores(monkeypatch, layout):
    # float32 outputs above 16 MB (out forward, dx backward) go through non-temporal stores; odd H * W and
    # C = 28 put the ends of the stores' blocks off the vector width in both layouts
    shape = (5, 28, 193, 193)
    assert math.prod(shape) * 4 > 16 << 20
    _check_layer(monkeypatch, "node", torch.float32, layout, "relu", shape, 4)


def _check_layer(monkeypatch, path, dtype, layout, act, shape, groups):
    _use_path(monkeypatch, path)
    spy = _Spy(monkeypatch, "_gn_act_forward")
    C = shape[1]
    layer = _layer(C, groups, act, seed=1)
    if dtype == F64:
        layer = layer.double()
    g = torch.Generator().manual_seed(2)
    x64 = 1.5 + 2 * torch.randn(shape, generator=g, dtype=F64)
    dy64 = torch.randn(shape, generator=g, dtype=F64)
    x, dy = x64.to(dtype), dy64.to(dtype)
    if layout == "cl":
        x, dy = (
            x.contiguous(memory_format=torch.channels_last),
            dy.contiguous(memory_format=torch.channels_last),
        )
    x.requires_grad_()
    with kernels.use("cpu"):
        out = layer(x)
        grads = torch.autograd.grad(out, [x, *layer.parameters()], dy)
    if path == "python":
        assert spy.calls == 1, "the fused GroupNorm + Proxy Norm pass must run"
    else:
        assert "normkit::GroupNormProxyActBackward" in out.grad_fn.name(), out.grad_fn.name()
    assert out.dtype == dtype and out.stride() == x.stride()

    xo = x.detach().double().requires_grad_()
    ps = [  # weight, bias, proxy_bias, proxy_weight
        p.detach().double().requires_grad_() for p in layer.parameters()
    ]
    want = oracle_layer(xo, groups, *ps, act, 1e-3)
    wgrads = torch.autograd.grad(want, [xo, *ps], dy.double())
    assert _rel(out, want) < TOL[dtype]
    for name, got, exp in zip(["x", "weight", "bias", "proxy_bias", "proxy_weight"], grads, wgrads):
        if exp.abs().max() < 1e-12:  # e.g. the bias under the identity, which the proxy mean cancels
            assert got.abs().max() < 1e-4, name
            continue
        assert _rel(got, exp) < GTOL[dtype], f"{name}: {_rel(got, exp):.2e}"


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_proxy_stats_match_the_oracle(monkeypatch, act, dtype):
    C = 11
    g = torch.Generator().manual_seed(3)
    params = [1 + 0.3 * torch.randn(C, generator=g, dtype=F64)] + [
        0.3 * torch.randn(C, generator=g, dtype=F64) for _ in range(3)
    ]
    gm, gr = torch.randn(C, generator=g, dtype=F64), torch.randn(C, generator=g, dtype=F64)
    calls = []
    monkeypatch.setattr(
        _fast, "_stats_forward", lambda *a, _o=_fast._stats_forward: calls.append(1) or _o(*a)
    )
    ps = [p.to(dtype).requires_grad_() for p in params]
    with kernels.use("cpu"):
        m, r = F.proxy_stats(*ps, activation=act)
        got = torch.autograd.grad((m, r), ps, (gm.to(dtype), gr.to(dtype)))
    assert calls, "the C++ proxy statistics must run"
    qs = [p.detach().requires_grad_() for p in params]
    wm, wr = oracle_stats(*qs, act)
    want = torch.autograd.grad((wm, wr), qs, (gm, gr))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert _rel(m, wm) < tol and _rel(r, wr) < tol
    for a, e in zip(got, want):
        if e.abs().max() < 1e-12:
            assert a.abs().max() < 1e-5
        else:
            assert _rel(a, e) < 10 * tol


@pytest.mark.parametrize("path", ["node", "python"])
def test_double_backward_and_gradcheck_through_the_fused_layer(monkeypatch, path):
    _use_path(monkeypatch, path)
    layer = _layer(6, 2, "leaky_relu:0.2", seed=4).double()
    x = torch.randn(2, 6, 3, 4, dtype=F64, requires_grad=True)
    params = list(layer.parameters())

    def f(x, *ps):
        return torch.func.functional_call(
            layer, dict(zip(["weight", "bias", "proxy_bias", "proxy_weight"], ps)), (x,)
        )

    with kernels.use("cpu"):
        assert torch.autograd.gradcheck(f, (x, *params))
        assert torch.autograd.gradgradcheck(f, (x, *params))


@pytest.mark.parametrize("path", ["node", "python"])
def test_non_finite_group_falls_back_and_stays_confined(monkeypatch, path):
    _use_path(monkeypatch, path)
    layer = _layer(8, 4, "relu", seed=5)
    x = torch.randn(2, 8, 4, 4)
    x[1, 0, 2, 2] = float("nan")
    with kernels.use("cpu"):
        got = layer(x)
    with kernels.use("reference"):
        want = layer(x)
    assert torch.isnan(got[1, :2]).all() and torch.isfinite(got[0]).all() and torch.isfinite(got[1, 2:]).all()
    torch.testing.assert_close(got, want, equal_nan=True)


def test_unfused_activation_and_compile_still_match():
    for act in ("silu", "gelu"):
        layer = _layer(8, 4, act, seed=6)
        x = torch.randn(2, 8, 5, 5)
        with kernels.use("cpu"):
            got = layer(x)
        with kernels.use("reference"):
            want = layer(x)
        torch.testing.assert_close(got, want)
    layer = _layer(8, 4, "relu", seed=7)
    x = torch.randn(2, 8, 5, 5)
    eager = layer(x)
    compiled = torch.compile(copy.deepcopy(layer), fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_functional_group_norm_proxy_act_is_the_layer(layout):
    layer = _layer(12, 3, "relu", seed=8)
    x = torch.randn(3, 12, 6, 5)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    xs = [x.clone().requires_grad_() for _ in range(3)]
    with kernels.use("cpu"):
        a = layer(xs[0])
        b = F.group_norm_proxy_act(xs[1], 3, *layer.parameters(), "relu", eps=1e-3)
    with kernels.use("reference"):
        c = F.proxy_norm_act(F.group_norm(xs[2], 3, eps=1e-3), *layer.parameters(), "relu")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-5)
    for t in (a, b, c):
        t.backward(torch.ones_like(t))
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=0, atol=0)
    torch.testing.assert_close(xs[1].grad, xs[2].grad, rtol=1e-4, atol=1e-5)


def test_functional_group_norm_proxy_act_errors_and_compile():
    C = 8
    ones, zeros = torch.ones(C), torch.zeros(C)
    x = torch.randn(2, C, 4, 4)
    with pytest.raises(normkit.NormError, match="divisible"):
        F.group_norm_proxy_act(x, 3, ones, zeros, zeros, zeros)
    with pytest.raises(normkit.NormError):
        F.group_norm_proxy_act(x, 2, torch.ones(C + 1), zeros, zeros, zeros)
    with pytest.raises(TypeError, match="proxy_bias"):
        F.group_norm_proxy_act(x, 2, ones, zeros, None, zeros)  # type: ignore[arg-type]
    eager = F.group_norm_proxy_act(x, 2, ones, zeros, zeros, zeros)
    compiled = torch.compile(
        lambda t: F.group_norm_proxy_act(t, 2, ones, zeros, zeros, zeros), fullgraph=True, backend="eager"
    )(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_cached_plans_and_points_follow_the_arguments():
    """The fast path caches per-shape plans and converted points: new activations and points count."""
    C = 8
    x = torch.randn(2, C, 4, 4)
    ones, zeros = torch.ones(C), torch.zeros(C)
    for slope in (0.1, 0.3):  # a fresh module each time (its id may be a freed one's)
        act = torch.nn.LeakyReLU(slope)
        with kernels.use("cpu"):
            got = F.group_norm_proxy_act(x, 2, ones, zeros, zeros, zeros, act)
        with kernels.use("reference"):
            want = F.group_norm_proxy_act(x, 2, ones, zeros, zeros, zeros, act)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        del act
    for scale in (1.0, 2.0):  # user points of the same size and dtype
        pts = F.proxy_points(200, dtype=F64) * scale
        with kernels.use("cpu"):
            got = F.group_norm_proxy_act(x, 2, ones, zeros, zeros, zeros, points=pts)
        with kernels.use("reference"):
            want = F.group_norm_proxy_act(x, 2, ones, zeros, zeros, zeros, points=pts)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        del pts
