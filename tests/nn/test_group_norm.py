"""normkit.nn.GroupNorm against torch.nn.GroupNorm / InstanceNorm2d (same weights) and closed forms."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import normkit.nn as nkn
from tests.tolerances import Tol
from tests.torch_compat import assert_same_repr, torch_kwargs

F64 = torch.float64
TOL: Tol = {"atol": 1e-5, "rtol": 1e-5}
# Parameter grads are sums over N*prod(spatial) terms: a few fp32 ulps of |sum| apart.
PTOL: Tol = {"atol": 5e-5, "rtol": 1e-5}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(shape, seed=0, dtype=torch.float32, offset=3.0, scale=2.0):
    g = _gen(seed)
    C = shape[1]
    off = offset * torch.linspace(-1, 1, C, dtype=F64).view([1, C] + [1] * (len(shape) - 2))
    per_sample = torch.randn(shape[0], *([1] * (len(shape) - 1)), generator=g, dtype=F64)
    return (off + 2 * per_sample + scale * torch.randn(shape, generator=g, dtype=F64)).to(dtype)


def _randomize(module, seed=1):
    g = _gen(seed)
    with torch.no_grad():
        if getattr(module, "weight", None) is not None:
            module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=g))
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=g))
    return module


def _fwd_bwd(module, x, g):
    xx = x.detach().clone().requires_grad_(True)
    y = module(xx)
    y.backward(g)
    return y.detach(), xx.grad


def _compare(ours, ref, x, seed=0):
    g = torch.randn(x.shape, generator=_gen(seed + 100))
    ours.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    y, dx = _fwd_bwd(ours, x, g)
    y_ref, dx_ref = _fwd_bwd(ref, x, g)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(dx, dx_ref, **TOL)
    for name in ("weight", "bias"):
        p, p_ref = getattr(ours, name), getattr(ref, name)
        assert (p is None) == (p_ref is None)
        if p is not None:
            torch.testing.assert_close(p.grad, p_ref.grad, **PTOL)


def _closed_form(x, G, eps, weight=None, bias=None):
    N, C = x.shape[:2]
    xg = x.double().reshape(N, G, -1)
    mu = xg.mean(-1, keepdim=True)
    var = ((xg - mu) ** 2).mean(-1, keepdim=True)
    y = ((xg - mu) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = [1, C] + [1] * (x.dim() - 2)
    if weight is not None:
        y = y * weight.detach().double().view(shape)
    if bias is not None:
        y = y + bias.detach().double().view(shape)
    return y


@pytest.mark.parametrize(
    "G, C, shape, kw",
    [
        (2, 6, (4, 6, 5, 5), {}),
        (3, 12, (5, 12), {}),  # (N, C): 4 values per group (2 would be ill-conditioned for an fp32 oracle)
        (2, 6, (2, 6, 7), {}),
        (2, 4, (2, 4, 3, 3, 3), {}),
        (1, 6, (3, 6, 4, 4), {}),
        (6, 6, (3, 6, 4, 4), {}),
        (2, 6, (3, 6, 4, 4), {"affine": False}),
        (2, 6, (3, 6, 4, 4), {"bias": False}),
        (3, 6, (3, 6, 4, 4), {"eps": 1e-3}),
        (32, 64, (2, 64, 3, 3), {}),
    ],
)
def test_matches_torch_with_the_same_weights(G, C, shape, kw):
    ref = _randomize(nn.GroupNorm(G, C, **torch_kwargs(kw)))
    ours = nkn.GroupNorm(G, C, **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    for training in (True, False):  # no state: both modes give the same thing as torch
        ours.train(training)
        ref.train(training)
        for step in range(2):
            _compare(ours, ref, _x(shape, seed=step, offset=1.0 + step), step)


def test_float64_matches_closed_form():
    gn = _randomize(nkn.GroupNorm(3, 6, dtype=F64))
    x = _x((2, 6, 4, 4), seed=2, dtype=F64, offset=1e3)
    torch.testing.assert_close(gn(x), _closed_form(x, 3, gn.eps, gn.weight, gn.bias), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("shape", [(3, 5, 4, 4), (2, 5, 6)])
def test_groups_equal_channels_is_instance_norm(shape):
    C = shape[1]
    ref_cls = nn.InstanceNorm2d if len(shape) == 4 else nn.InstanceNorm1d
    ref = _randomize(ref_cls(C, affine=True))
    ours = nkn.GroupNorm(C, C)
    ours.load_state_dict(ref.state_dict(), strict=True)
    _compare(ours, ref, _x(shape, seed=4))


def test_one_group_is_layer_norm_over_chw_with_per_channel_affine():
    ours = _randomize(nkn.GroupNorm(1, 4))
    x = _x((3, 4, 5, 5), seed=5)
    ln = nn.functional.layer_norm(x.double(), x.shape[1:])
    expected = ln * ours.weight.detach().double().view(1, 4, 1, 1) + ours.bias.detach().double().view(
        1, 4, 1, 1
    )
    torch.testing.assert_close(ours(x).double(), expected, **TOL)


# ---------------------------------------------------------------------------------------------
# Construction checks (22)
# ---------------------------------------------------------------------------------------------


def test_channels_not_divisible_by_groups_suggests_valid_groups():
    with pytest.raises(ValueError) as info:
        nkn.GroupNorm(4, 30)
    msg = str(info.value)
    assert "30" in msg and "4" in msg
    assert "num_groups=3 or 5" in msg  # the nearest divisors of 30 around 4
    with pytest.raises(ValueError, match="num_groups=8 or 12"):
        nkn.GroupNorm(10, 24)


def test_more_groups_than_channels():
    with pytest.raises(ValueError, match=r"num_channels \(32\).*num_groups \(64\)"):
        nkn.GroupNorm(64, 32)


@pytest.mark.parametrize("bad", [0, -2, 2.0, 2.5, "2", True, None])
def test_groups_must_be_a_positive_int(bad):
    with pytest.raises((ValueError, TypeError), match="num_groups"):
        nkn.GroupNorm(bad, 8)


@pytest.mark.parametrize("kw, word", [({"eps": -1e-5}, "eps"), ({"eps": float("inf")}, "eps")])
def test_eps_checked(kw, word):
    with pytest.raises(ValueError, match=word):
        nkn.GroupNorm(2, 8, **kw)


@pytest.mark.parametrize("bad", [0, -4])
def test_num_channels_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="num_channels"):
        nkn.GroupNorm(1, bad)


def test_a_float_num_channels_is_a_type_error_as_in_torch():
    with pytest.raises(TypeError, match="num_channels must be an int.*got 4.0 of type float"):
        nkn.GroupNorm(1, 4.0)
    with pytest.raises(TypeError):
        torch.nn.GroupNorm(1, 4.0)


# ---------------------------------------------------------------------------------------------
# Bad input and edge cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{}, {"affine": False}])
@pytest.mark.parametrize("shape", [(2, 5, 3, 3), (3, 5)])
def test_wrong_channel_count_names_both_sizes(shape, kw):
    with pytest.raises(ValueError) as info:
        nkn.GroupNorm(2, 6, **kw)(torch.randn(shape))
    msg = str(info.value)
    assert re.search(r"\b6\b", msg) and re.search(r"\b5\b", msg), msg


@pytest.mark.parametrize("G, shape", [(4, (3, 4)), (4, (2, 4, 1, 1)), (2, (2, 2, 1))])
def test_one_value_per_group_is_a_value_error(G, shape):
    with pytest.raises(ValueError, match="more than 1 value per group"):
        nkn.GroupNorm(G, shape[1])(torch.randn(shape))


def test_integer_and_mismatched_dtype_inputs_are_type_errors():
    with pytest.raises(TypeError, match="floating"):
        nkn.GroupNorm(2, 4)(torch.ones(2, 4, 3, 3, dtype=torch.int32))
    with pytest.raises(TypeError) as info:
        nkn.GroupNorm(2, 4)(torch.randn(2, 4, 3, 3, dtype=F64))
    assert "float64" in str(info.value) and "float32" in str(info.value)
    # Without parameters there is nothing to mismatch: a float64 input just works.
    x = torch.randn(2, 4, 3, 3, dtype=F64)
    torch.testing.assert_close(nkn.GroupNorm(2, 4, affine=False)(x), _closed_form(x, 2, 1e-5))


@pytest.mark.parametrize("shape", [(0, 6, 3, 3), (0, 6)])
def test_empty_batch_forward_backward(shape):
    gn = _randomize(nkn.GroupNorm(3, 6))
    x = torch.randn(shape, requires_grad=True)
    y = gn(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(gn.weight.grad, torch.zeros(6))
    assert torch.equal(gn.bias.grad, torch.zeros(6))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_with_float32_params(dtype):
    ref = _randomize(nn.GroupNorm(2, 8))
    ours = nkn.GroupNorm(2, 8)
    ours.load_state_dict(ref.state_dict())
    x = _x((3, 8, 4, 4), seed=1, dtype=dtype)
    g = torch.randn(3, 8, 4, 4, generator=_gen(2)).to(dtype)
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


@pytest.mark.parametrize(
    "shape, fmt",
    [
        ((3, 8, 5, 4), torch.channels_last),
        ((2, 4, 1, 1), torch.channels_last),
        ((2, 4, 3, 2, 3), torch.channels_last_3d),
    ],
)
def test_channels_last_is_kept_and_matches_contiguous(shape, fmt):
    G = 2
    ref = _randomize(nn.GroupNorm(G, shape[1]))
    ours = nkn.GroupNorm(G, shape[1])
    ours.load_state_dict(ref.state_dict())
    x = _x(shape, seed=3)
    g = torch.randn(shape, generator=_gen(4))
    xc = x.clone(memory_format=fmt).requires_grad_(True)
    y = ours(xc)
    y.backward(g.contiguous(memory_format=fmt))
    assert y.is_contiguous(memory_format=fmt)
    assert xc.grad.is_contiguous(memory_format=fmt)
    y_ref, dx_ref = _fwd_bwd(ref, x, g)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(xc.grad, dx_ref, **TOL)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **PTOL)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, **PTOL)


def test_batch_independence():
    gn = _randomize(nkn.GroupNorm(2, 4))
    x = _x((5, 4, 3, 3), seed=0)
    other = x.clone()
    other[1:] = _x((4, 4, 3, 3), seed=8, offset=40.0, scale=9.0)
    y = gn(x)
    torch.testing.assert_close(gn(other)[0], y[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(gn(x[:2]), y[:2], atol=1e-6, rtol=0)
    torch.testing.assert_close(y.double(), _closed_form(x, 2, gn.eps, gn.weight, gn.bias), **TOL)


def test_reset_parameters():
    gn = _randomize(nkn.GroupNorm(2, 4))
    gn.reset_parameters()
    for k, v in nn.GroupNorm(2, 4).state_dict().items():
        assert torch.equal(gn.state_dict()[k], v), k


@pytest.mark.parametrize(
    "args, kw", [((32, 64), {}), ((4, 8), {"eps": 1e-3, "affine": False}), ((2, 8), {"bias": False})]
)
def test_repr_matches_torch(args, kw):
    assert_same_repr(nkn.GroupNorm(*args, **kw), nn.GroupNorm(*args, **torch_kwargs(kw)))
