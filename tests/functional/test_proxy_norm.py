"""Proxy Norm, functional: the authors' test vectors, closed forms, gradients, memory."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm as scipy_norm

from normkit.functional import group_norm, proxy_norm_act, proxy_points, proxy_stats

ACTS = ["relu", "silu", "gelu", "leaky_relu", "tanh_callable"]


def _act(name):
    return (lambda t: torch.tanh(t)) if name == "tanh_callable" else name


def _params(C, dtype=torch.float64, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    w = 1.0 + 0.3 * torch.randn(C, generator=g, dtype=dtype)
    b = 0.3 * torch.randn(C, generator=g, dtype=dtype)
    pb = 0.2 * torch.randn(C, generator=g, dtype=dtype)
    pw = 0.2 * torch.randn(C, generator=g, dtype=dtype)
    return [p.requires_grad_(grad) for p in (w, b, pb, pw)]


def _oracle(y, w, b, pb, pw, act, eps=0.03, n=200):
    """Independent float64 oracle: scipy's Gaussian quantiles, plain composite."""
    u = torch.tensor(scipy_norm.ppf((torch.arange(n, dtype=torch.float64).numpy() + 0.5) / n))
    f = {"relu": torch.relu, "silu": torch.nn.functional.silu}[act]
    w, b, pb, pw = (p.detach().double() for p in (w, b, pb, pw))
    zp = f(w[:, None] * ((1 + pw)[:, None] * u + pb[:, None]) + b[:, None])
    m = zp.mean(1)
    v = ((zp - m[:, None]) ** 2).mean(1)
    shape = [1, -1] + [1] * (y.dim() - 2)
    z = f(w.view(shape) * y.double() + b.view(shape))
    return (z - m.view(shape)) / torch.sqrt(v.view(shape) + eps)


@pytest.mark.parametrize(
    "act, w, b, pb, pw, m_want, v_want",
    [
        ("relu", 1.0, 0.0, 0.0, 0.0, 0.398451, 0.338035),
        ("silu", 1.0, 0.0, 0.0, 0.0, 0.206048, 0.310004),
        ("relu", 1.5, 0.3, 0.1, -0.2, 0.736411, 0.714690),
    ],
)
def test_algorithms_test_vectors(act, w, b, pb, pw, m_want, v_want):
    def t(v):
        return torch.tensor([v])

    m, rstd = proxy_stats(t(w), t(b), t(pb), t(pw), act, eps=0.03, num_points=200)
    v = 1.0 / rstd.double() ** 2 - 0.03
    assert abs(m.item() - m_want) < 1e-5
    assert abs(v.item() - v_want) < 1e-5


def test_default_rstd_vectors():
    one, zero = torch.ones(1), torch.zeros(1)
    assert abs(proxy_stats(one, zero, zero, zero, "relu")[1].item() - 1.648373) < 1e-5
    assert abs(proxy_stats(one, zero, zero, zero, "swish")[1].item() - 1.714977) < 1e-5


def test_proxy_points_are_scipy_midpoint_quantiles():
    u = proxy_points(200, dtype=torch.float64)
    want = scipy_norm.ppf((torch.arange(200, dtype=torch.float64).numpy() + 0.5) / 200)
    torch.testing.assert_close(u, torch.tensor(want), atol=1e-12, rtol=0)
    assert abs(u.var(unbiased=False).item() - 0.993596) < 1e-6
    assert abs(u.max().item() - 2.807) < 1e-3


def test_many_points_converge_to_relu_closed_form():
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    m, rstd = proxy_stats(one, zero, zero, zero, "relu", eps=0.0, num_points=200_000)
    assert abs(m.item() - 1 / math.sqrt(2 * math.pi)) < 1e-4
    assert abs(1 / rstd.item() ** 2 - (0.5 - 1 / (2 * math.pi))) < 1e-4


@pytest.mark.parametrize("act", ["relu", "silu"])
@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 7), (2, 3, 5, 4), (2, 3, 2, 3, 4)])
def test_forward_matches_float64_oracle(act, shape):
    y = torch.randn(shape, dtype=torch.float64)
    ps = _params(shape[1], grad=False)
    for me in (True, False):
        out = proxy_norm_act(y, *ps, activation=act, memory_efficient=me)
        torch.testing.assert_close(out, _oracle(y, *ps, act), atol=1e-10, rtol=1e-10)
    y32 = y.float()
    out32 = proxy_norm_act(y32, *(p.float() for p in ps), activation=act)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), _oracle(y32, *ps, act), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_and_gradgradcheck(act):
    y = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    ps = _params(2)

    def f(y, *p):
        return proxy_norm_act(y, *p, activation=_act(act))

    assert torch.autograd.gradcheck(f, (y, *ps))
    assert torch.autograd.gradgradcheck(f, (y, *ps))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "nc", "3d"])
def test_recompute_function_equals_composite(act, layout):
    shape = {"nc": (6, 5), "3d": (2, 5, 3, 4, 3)}.get(layout, (4, 5, 6, 6))
    x = torch.randn(shape)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    ps = _params(5, dtype=torch.float32)
    dout = torch.randn(shape)
    results = []
    for me in (True, False):
        y = x.clone().requires_grad_(True)
        qs = [p.detach().clone().requires_grad_(True) for p in ps]
        out = proxy_norm_act(y, *qs, activation=_act(act), memory_efficient=me)
        out.backward(dout)
        results.append((out.detach(), y.grad, *[q.grad for q in qs]))
    for a, b in zip(*results):
        # two float32 evaluation orders: parameter gradients are sums over the batch, so the
        # tolerance follows their scale (seen: 2.3e-5 apart on a gradient of 61 over 300 seeds)
        torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=1e-5)
    if layout == "channels_last":
        assert results[0][0].is_contiguous(memory_format=torch.channels_last)
        assert results[0][1].is_contiguous(memory_format=torch.channels_last)


def test_all_four_parameters_get_nonzero_gradients():
    y = torch.randn(8, 4, 5, 5)
    ps = _params(4, dtype=torch.float32)
    proxy_norm_act(y, *ps).square().mean().backward()
    for name, p in zip(("weight", "bias", "proxy_bias", "proxy_weight"), ps):
        assert p.grad is not None and p.grad.abs().min() > 0, name


def test_output_independent_of_the_rest_of_the_batch():
    torch.manual_seed(0)
    x = torch.randn(6, 8, 5, 5)
    ps = [p.float() for p in _params(8, grad=False)]

    def f(t):
        return proxy_norm_act(group_norm(t, 1), *ps)

    full = f(x)
    torch.testing.assert_close(f(x[2:3]), full[2:3], atol=1e-6, rtol=1e-6)
    other = torch.cat([x[2:3], 100 * torch.randn(3, 8, 5, 5)])
    torch.testing.assert_close(f(other)[:1], full[2:3], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.cat([f(x[:3]), f(x[3:])]), full, atol=1e-6, rtol=1e-6)


def test_init_output_is_centred_with_variance_v_over_v_plus_eps():
    torch.manual_seed(0)
    C = 4
    y = torch.randn(4096, C, 8, 8)
    one, zero = torch.ones(C), torch.zeros(C)
    out = proxy_norm_act(y, one, zero, zero, zero, "relu")
    mean = out.mean((0, 2, 3))
    var = out.var((0, 2, 3), unbiased=False)  # ok: test oracle, not a hot path
    v = 0.338035
    assert mean.abs().max() < 0.01
    # The quadrature under-estimates the true ReLU variance by ~1% (ALGORITHMS.md §2.7).
    assert (var - v / (v + 0.03)).abs().max() < 0.015


def test_recompute_saves_a_third_of_the_composite_memory():
    y = torch.randn(8, 16, 32, 32, requires_grad=True)
    ps = [p.float().requires_grad_(True) for p in _params(16, grad=False)]

    def saved_full_size(me: bool) -> int:
        seen: dict[int, int] = {}

        def pack(t):
            if t.numel() == y.numel():
                seen[t.data_ptr()] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            proxy_norm_act(y, *ps, memory_efficient=me)
        return sum(seen.values())

    composite, recompute = saved_full_size(False), saved_full_size(True)
    assert recompute == y.numel() * 4  # only y
    assert composite == 3 * recompute


def test_half_precision_input_keeps_dtype_and_matches_fp32():
    y = torch.randn(4, 6, 5, 5)
    ps = [p.float() for p in _params(6, grad=False)]
    for dt in (torch.float16, torch.bfloat16):
        out = proxy_norm_act(y.to(dt), *ps)
        assert out.dtype == dt
        ref = _oracle(y.to(dt), *ps, "relu")
        tol = 1e-2 if dt == torch.float16 else 5e-2
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_input_is_not_mutated():
    y = torch.randn(2, 3, 4, 4)
    before, version = y.clone(), y._version
    proxy_norm_act(y, *(p.float() for p in _params(3, grad=False)))
    assert y._version == version and torch.equal(y, before)


def test_bad_inputs_raise_typed_errors():
    ps = [p.float() for p in _params(3, grad=False)]
    with pytest.raises(ValueError, match=r"proxy_bias has shape \(2,\).*\(3,\)"):
        proxy_norm_act(torch.randn(2, 3, 4, 4), ps[0], ps[1], ps[2][:2], ps[3])
    with pytest.raises(TypeError, match="floating-point"):
        proxy_norm_act(torch.ones(2, 3, 4, 4, dtype=torch.long), *ps)
    with pytest.raises(TypeError, match="weight is required"):
        proxy_norm_act(torch.randn(2, 3), None, *ps[1:])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown activation"):
        proxy_norm_act(torch.randn(2, 3), *ps, activation="relu6x")
    with pytest.raises(ValueError, match="eps"):
        proxy_norm_act(torch.randn(2, 3), *ps, eps=-1.0)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_cached_points_survive_a_first_call_in_inference_mode(backend):
    # the quadrature points are computed once per (count, dtype, device) and cached: a first call under
    # torch.inference_mode() must not leave an inference tensor that a later backward cannot save
    from normkit.functional import proxy_norm as pn

    pn._POINTS.clear()
    w = torch.ones(3, dtype=torch.float64)
    z = torch.zeros(3, dtype=torch.float64)
    from normkit import kernels

    with kernels.use(backend):
        with torch.inference_mode():
            proxy_stats(w, z, z, z, "relu")
        ws = w.clone().requires_grad_()
        m, rstd = proxy_stats(ws, z, z, z, "relu")
        (m.sum() + rstd.sum()).backward()
    assert ws.grad is not None and torch.isfinite(ws.grad).all()


@pytest.mark.parametrize("proxy_eps", [-1.0, float("nan")])
def test_group_norm_proxy_act_checks_proxy_eps(proxy_eps):
    # unchecked, the fused path returned NaN everywhere
    from normkit.functional.proxy_norm import group_norm_proxy_act

    C = 4
    one, zero = torch.ones(C), torch.zeros(C)
    with pytest.raises(ValueError, match="group_norm_proxy_act: proxy_eps"):
        group_norm_proxy_act(torch.randn(2, C, 3, 3), 2, one, zero, zero, zero, proxy_eps=proxy_eps)


def test_the_identity_activation_pickles():
    """What holds the resolved ``"identity"`` activation pickles (it was a lambda)."""
    import pickle

    from normkit.functional.activations import get_activation

    fn = pickle.loads(pickle.dumps(get_activation("identity")))
    x = torch.randn(3)
    assert torch.equal(fn(x), x)
