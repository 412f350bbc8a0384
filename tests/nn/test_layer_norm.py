"""normkit.nn.LayerNorm / LayerNorm2d against torch.nn.LayerNorm / GroupNorm (same weights)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import normkit
import normkit.nn as nkn
from tests.tolerances import Tol
from tests.torch_compat import assert_same_repr, torch_kwargs

F64 = torch.float64
TOL: Tol = {"atol": 1e-5, "rtol": 1e-5}
# Parameter grads are sums over the leading dims: a few fp32 ulps of |sum| apart.
PTOL: Tol = {"atol": 5e-5, "rtol": 1e-5}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(shape, seed=0, dtype=torch.float32, offset=2.0, scale=1.5):
    g = _gen(seed)
    base = offset * torch.randn(*shape[:-1], 1, generator=g, dtype=F64) if len(shape) > 1 else 0.0
    return (base + scale * torch.randn(shape, generator=g, dtype=F64) + 1.0).to(dtype)


def _randomize(module, seed=1):
    g = _gen(seed)
    with torch.no_grad():
        if getattr(module, "weight", None) is not None:
            module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=g))
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=g))
    return module


def _fwd_bwd(module, x, g, pre=None, post=None):
    xx = x.detach().clone().requires_grad_(True)
    y = module(pre(xx) if pre else xx)
    y = post(y) if post else y
    y.backward(g)
    return y.detach(), xx.grad


def _compare(ours, ref, x, seed=0, ref_pre=None, ref_post=None, g_fmt=None):
    g = torch.randn(x.shape, generator=_gen(seed + 100))
    ours.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    y, dx = _fwd_bwd(ours, x, g)
    y_ref, dx_ref = _fwd_bwd(ref, x, g, ref_pre, ref_post)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(dx, dx_ref, **TOL)
    for name in ("weight", "bias"):
        p, p_ref = getattr(ours, name), getattr(ref, name)
        assert (p is None) == (p_ref is None)
        if p is not None:
            torch.testing.assert_close(p.grad, p_ref.grad, **PTOL)


# ---------------------------------------------------------------------------------------------
# LayerNorm: torch semantics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "normalized_shape, shape, kw",
    [
        (16, (4, 7, 16), {}),
        ((16,), (16,), {}),
        ((4, 5), (3, 4, 5), {}),
        ((3, 4, 5), (2, 3, 4, 5), {}),
        ([3, 4, 5], (2, 3, 4, 5), {"bias": False}),
        ((4, 5), (3, 4, 5), {"elementwise_affine": False}),
        (8, (5, 8), {"bias": False}),
        (8, (5, 8), {"eps": 1e-2}),
        (torch.Size([6, 2]), (3, 6, 2), {}),
    ],
)
def test_matches_torch_with_the_same_weights(normalized_shape, shape, kw):
    ref = _randomize(nn.LayerNorm(normalized_shape, **kw))
    ours = nkn.LayerNorm(normalized_shape, **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert ours.state_dict()[k].shape == v.shape
    for training in (True, False):
        ours.train(training)
        ref.train(training)
        for step in range(2):
            _compare(ours, ref, _x(shape, seed=step), step)


@pytest.mark.parametrize(
    "normalized_shape, shape",
    [((4, 5), (3, 5, 4)), (5, (3, 4)), ((4, 5), (5,)), ((2, 3, 4), (3, 4))],
)
def test_normalized_shape_that_does_not_fit_is_a_value_error(normalized_shape, shape):
    ln = nkn.LayerNorm(normalized_shape)
    with pytest.raises(ValueError) as info:  # a ValueError, not an IndexError (Keras test comment)
        ln(torch.randn(shape))
    msg = str(info.value)
    assert str(tuple(shape)) in msg
    ns = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    assert str(ns) in msg, msg


@pytest.mark.parametrize("bad", [0, -1, (3, 0), 2.5])
def test_normalized_shape_checked_at_construction(bad):
    with pytest.raises((ValueError, TypeError), match="normalized_shape"):
        nkn.LayerNorm(bad)


@pytest.mark.parametrize("empty", [(), [], torch.Size([])], ids=["tuple", "list", "Size"])
def test_empty_normalized_shape_refused_at_construction(empty):
    """``normalized_shape=()`` names no dim: torch.nn.LayerNorm builds it, then refuses every input
    ("Expected normalized_shape to be at least 1-dimensional"); normkit refuses at construction,
    with a typed error torch code catches as well (a RuntimeError), naming what came."""
    with pytest.raises(RuntimeError, match="normalized_shape"):
        nn.LayerNorm(empty)(torch.randn(2, 3))  # the oracle: no input fits such a layer
    with pytest.raises(normkit.NormError, match="normalized_shape") as info:
        nkn.LayerNorm(empty)
    assert isinstance(info.value, RuntimeError) and repr(empty) in str(info.value)


def test_eps_checked_at_construction():
    with pytest.raises(ValueError, match="eps"):
        nkn.LayerNorm(4, eps=-1.0)
    with pytest.raises(ValueError, match="eps"):
        nkn.LayerNorm2d(4, eps=-1.0)


def test_integer_and_mismatched_dtype_inputs_are_type_errors():
    with pytest.raises(TypeError, match="floating"):
        nkn.LayerNorm(4)(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(TypeError) as info:
        nkn.LayerNorm(4)(torch.randn(3, 4, dtype=F64))
    assert "float64" in str(info.value) and "float32" in str(info.value)
    with pytest.raises(TypeError, match="floating"):
        nkn.LayerNorm2d(4)(torch.ones(2, 4, 3, 3, dtype=torch.int16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_with_float32_params(dtype):
    ref = _randomize(nn.LayerNorm((4, 8)))
    ours = nkn.LayerNorm((4, 8))
    ours.load_state_dict(ref.state_dict())
    x = _x((3, 4, 8), seed=1, dtype=dtype)
    g = torch.randn(3, 4, 8, generator=_gen(2)).to(dtype)
    xo = x.clone().requires_grad_(True)
    y = ours(xo)
    y.backward(g)
    xr = x.float().requires_grad_(True)
    y_ref = ref(xr)
    y_ref.backward(g.float())
    assert y.dtype == dtype and xo.grad.dtype == dtype
    assert ours.weight.dtype == ours.weight.grad.dtype == torch.float32
    tol = dict(atol=2e-3, rtol=1e-3) if dtype == torch.float16 else dict(atol=1.6e-2, rtol=1.6e-2)
    torch.testing.assert_close(y.float(), y_ref, **tol)
    torch.testing.assert_close(xo.grad.float(), xr.grad, **tol)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("shape", [(0, 6), (0, 3, 6)])
def test_empty_batch_forward_backward(shape):
    ln = _randomize(nkn.LayerNorm(6))
    x = torch.randn(shape, requires_grad=True)
    y = ln(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(ln.weight.grad, torch.zeros(6))
    assert torch.equal(ln.bias.grad, torch.zeros(6))


def test_batch_independence():
    ln = _randomize(nkn.LayerNorm((3, 4)))
    x = _x((5, 3, 4), seed=0)
    other = x.clone()
    other[1:] = _x((4, 3, 4), seed=8, offset=40.0, scale=9.0)
    y = ln(x)
    torch.testing.assert_close(ln(other)[0], y[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(ln(x[:2]), y[:2], atol=1e-6, rtol=0)


def test_reset_parameters():
    ln = _randomize(nkn.LayerNorm((3, 4)))
    ln.reset_parameters()
    for k, v in nn.LayerNorm((3, 4)).state_dict().items():
        assert torch.equal(ln.state_dict()[k], v), k


@pytest.mark.parametrize(
    "args, kw",
    [((32,), {}), (((3, 4),), {"eps": 1e-6}), ((8,), {"bias": False}), ((8,), {"elementwise_affine": False})],
)
def test_repr_matches_torch(args, kw):
    assert_same_repr(nkn.LayerNorm(*args, **kw), nn.LayerNorm(*args, **kw))


# ---------------------------------------------------------------------------------------------
# LayerNorm2d: over="c" (ConvNeXt) and over="chw" (GN / Proxy Norm papers)
# ---------------------------------------------------------------------------------------------


def _to_last(x):  # (N, C, *S) -> (N, *S, C)
    return x.movedim(1, -1)


def _to_first(x):  # (N, *S, C) -> (N, C, *S)
    return x.movedim(-1, 1)


@pytest.mark.parametrize("shape", [(3, 8, 5, 4), (2, 8, 7), (2, 8, 3, 2, 3)])
@pytest.mark.parametrize("kw", [{}, {"bias": False}, {"affine": False}, {"eps": 1e-3}])
def test_layer_norm_2d_over_c_is_torch_layer_norm_on_the_permuted_input(shape, kw):
    C = shape[1]
    torch_kw = {
        "eps": kw.get("eps", 1e-5),
        "elementwise_affine": kw.get("affine", True),
        "bias": kw.get("bias", True),
    }
    ref = _randomize(nn.LayerNorm(C, **torch_kw))
    ours = nkn.LayerNorm2d(C, over="c", **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    _compare(ours, ref, _x(shape, seed=1), ref_pre=_to_last, ref_post=_to_first)


@pytest.mark.parametrize("shape", [(3, 8, 5, 4), (2, 8, 7), (2, 8, 3, 2, 3)])
@pytest.mark.parametrize("kw", [{}, {"bias": False}, {"affine": False}, {"eps": 1e-3}])
def test_layer_norm_2d_over_chw_is_torch_group_norm_with_one_group(shape, kw):
    C = shape[1]
    ref = _randomize(nn.GroupNorm(1, C, **torch_kwargs(kw)))
    ours = nkn.LayerNorm2d(C, over="chw", **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    _compare(ours, ref, _x(shape, seed=2))


@pytest.mark.parametrize(
    "over, shape, fmt",
    [
        (over, shape, fmt)
        for over in ("c", "chw")
        for shape, fmt in [
            ((3, 8, 5, 4), torch.channels_last),
            ((2, 1, 4, 4), torch.channels_last),
            ((4, 6, 1, 1), torch.channels_last),
            ((2, 4, 3, 2, 3), torch.channels_last_3d),
        ]
        # over="c" with C=1 has one value per set: see test_layer_norm_2d_single_channel_sets.
        if not (over == "c" and shape[1] == 1)
    ],
)
def test_layer_norm_2d_channels_last_is_kept_and_matches_contiguous(over, shape, fmt):
    C = shape[1]
    ours = _randomize(nkn.LayerNorm2d(C, over=over))
    if over == "c":
        ref = nn.LayerNorm(C)
        pre, post = _to_last, _to_first
    else:
        ref = nn.GroupNorm(1, C)
        pre = post = None
    ref.load_state_dict(ours.state_dict())
    x = _x(shape, seed=3)
    g = torch.randn(shape, generator=_gen(4))
    xc = x.clone(memory_format=fmt).requires_grad_(True)
    y = ours(xc)
    y.backward(g.contiguous(memory_format=fmt))
    assert y.is_contiguous(memory_format=fmt)
    assert xc.grad.is_contiguous(memory_format=fmt)
    y_ref, dx_ref = _fwd_bwd(ref, x, g, pre, post)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(xc.grad, dx_ref, **TOL)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **PTOL)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, **PTOL)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_layer_norm_2d_single_channel_sets(fmt):
    # over="c" with C=1: every set is one value, so x_hat = 0, y = bias and dx = 0 exactly
    # (rstd = 1/sqrt(eps) ~ 316 must not amplify rounding into the gradient).
    ours = _randomize(nkn.LayerNorm2d(1, over="c"))
    ref = nn.LayerNorm(1)
    ref.load_state_dict(ours.state_dict())
    x = _x((2, 1, 4, 4), seed=0)
    g = torch.randn(2, 1, 4, 4, generator=_gen(1))
    xc = x.clone(memory_format=fmt).requires_grad_(True)
    y = ours(xc)
    y.backward(g.contiguous(memory_format=fmt))
    y_ref, dx_ref = _fwd_bwd(ref, x, g, _to_last, _to_first)
    torch.testing.assert_close(y, y_ref, **TOL)
    # the closed form is exactly 0; torch's fp32 backward leaves rounding noise of ~1e-4
    assert torch.equal(xc.grad, torch.zeros_like(xc.grad))
    torch.testing.assert_close(dx_ref, torch.zeros_like(dx_ref), atol=2e-4, rtol=0)


def test_layer_norm_2d_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="over"):
        nkn.LayerNorm2d(4, over="hw")
    with pytest.raises(ValueError, match="num_channels"):
        nkn.LayerNorm2d(0)
    with pytest.raises(ValueError, match=r"\(N, C, \*spatial\) or \(N, C\)"):
        nkn.LayerNorm2d(4)(torch.randn(4))
    with pytest.raises(ValueError, match="4"):  # (N, C) with the wrong C
        nkn.LayerNorm2d(4)(torch.randn(3, 5))
    for over in ("c", "chw"):
        for kw in ({}, {"affine": False}):
            with pytest.raises(ValueError) as info:
                nkn.LayerNorm2d(7, over=over, **kw)(torch.randn(2, 5, 3, 3))
            msg = str(info.value)
            assert re.search(r"\b7\b", msg) and re.search(r"\b5\b", msg), msg


@pytest.mark.parametrize("over", ["c", "chw"])
def test_layer_norm_2d_empty_batch_and_batch_independence(over):
    ln = _randomize(nkn.LayerNorm2d(4, over=over))
    x0 = torch.randn(0, 4, 3, 3, requires_grad=True)
    y0 = ln(x0)
    assert y0.shape == x0.shape
    y0.sum().backward()
    assert torch.equal(ln.weight.grad, torch.zeros(4))
    x = _x((5, 4, 3, 3), seed=0)
    other = x.clone()
    other[1:] = _x((4, 4, 3, 3), seed=8, offset=40.0, scale=9.0)
    y = ln(x)
    torch.testing.assert_close(ln(other)[0], y[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(ln(x[:2]), y[:2], atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("over", ["c", "chw"])
def test_layer_norm_2d_on_n_c_features_is_torch_layer_norm_over_c(over, dtype, backend):
    """On (N, C) features (an MLP's; the registry's "ln" in the lab's MLP-3) both ``over`` values are
    LayerNorm over C, as GroupNorm(1, C) takes them: output and every gradient equal torch.nn.LayerNorm's."""
    ours = _randomize(nkn.LayerNorm2d(7, over=over, dtype=dtype))
    ref = nn.LayerNorm(7, dtype=dtype)
    ref.load_state_dict(ours.state_dict())
    x = _x((9, 7), seed=3, dtype=dtype)
    g = torch.randn(9, 7, generator=_gen(4), dtype=dtype)
    tol = TOL if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-12}
    with normkit.kernels.use(backend):
        xa = x.clone().requires_grad_(True)
        y = ours(xa)
        y.backward(g)
    xb = x.clone().requires_grad_(True)
    y_ref = ref(xb)
    y_ref.backward(g)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(xa.grad, xb.grad, **tol)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **tol)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, **tol)
    gn = nn.GroupNorm(1, 7, dtype=dtype)
    gn.load_state_dict(ref.state_dict())
    torch.testing.assert_close(y.detach(), gn(x).detach(), **tol)
