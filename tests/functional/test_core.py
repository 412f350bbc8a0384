"""The generic core: moments, normalize, norm (the normkit::norm op), against the float64 oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from torch.autograd import gradcheck, gradgradcheck

from normkit.functional import acc_dtype, moments, norm, normalize
from tests.functional.helpers import F32, F64, TOL, affine_params, randn
from tests.reference import (
    ref_batch_norm,
    ref_group_norm,
    ref_instance_norm,
    ref_layer_norm,
    ref_layer_norm_2d,
    ref_moments,
)

HALF = [torch.float16, torch.bfloat16]
DIMS = [
    ((4, 5), (0,)),
    ((4, 5), (1,)),
    ((3, 4, 5), (0, 2)),
    ((2, 3, 4, 5), (1, 2, 3)),
    ((2, 3, 4, 5), (0, 2, 3)),
]


# --- the oracle itself, checked once against torch's own kernels (float64) -------------------


def test_reference_agrees_with_torch_kernels():
    x = randn((4, 6, 5, 3), F64, seed=3)
    w, b = affine_params((6,), F64)
    rm, rv = torch.zeros(6, dtype=F64), torch.ones(6, dtype=F64)
    t_rm, t_rv = rm.clone(), rv.clone()
    y_t = TF.batch_norm(x, t_rm, t_rv, w, b, training=True, momentum=0.3, eps=1e-3)
    r = ref_batch_norm(x, rm, rv, w, b, training=True, momentum=0.3, eps=1e-3)
    torch.testing.assert_close(r.output, y_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.running_mean, t_rm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.running_var, t_rv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        ref_group_norm(x, 3, w, b, 1e-3), TF.group_norm(x, 3, w, b, 1e-3), rtol=1e-12, atol=1e-12
    )
    t_rm, t_rv = rm.clone(), rv.clone()
    y_t = TF.instance_norm(x, t_rm, t_rv, w, b, use_input_stats=True, momentum=0.3, eps=1e-3)
    r = ref_instance_norm(x, rm, rv, w, b, use_input_stats=True, momentum=0.3, eps=1e-3)
    torch.testing.assert_close(r.output, y_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.running_mean, t_rm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.running_var, t_rv, rtol=1e-12, atol=1e-12)
    wl, bl = affine_params((5, 3), F64)
    torch.testing.assert_close(
        ref_layer_norm(x, (5, 3), wl, bl, 1e-3),
        TF.layer_norm(x, (5, 3), wl, bl, 1e-3),
        rtol=1e-12,
        atol=1e-12,
    )
    ln_c = TF.layer_norm(x.permute(0, 2, 3, 1), (6,), w, b, 1e-3).permute(0, 3, 1, 2)
    torch.testing.assert_close(ref_layer_norm_2d(x, w, b, 1e-3, over="c"), ln_c, rtol=1e-12, atol=1e-12)


# --- acc_dtype -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,expected",
    [(torch.float16, F32), (torch.bfloat16, F32), (F32, F32), (F64, F64)],
)
def test_acc_dtype(dtype, expected):
    assert acc_dtype(dtype) == expected


# --- moments ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,dims", DIMS)
@pytest.mark.parametrize("dtype", [F32, F64, *HALF])
def test_moments_matches_reference(shape, dims, dtype):
    x = randn(shape, dtype, seed=5, offset=0.7, scale=2.0)
    m = moments(x, dims)
    mu, var = ref_moments(x, dims)  # float64 from the same (possibly half) input
    acc = F64 if dtype == F64 else F32
    for t in m:
        assert t.dtype == acc
        assert t.shape == mu.shape
    tol = TOL[F64] if dtype == F64 else TOL[F32]
    torch.testing.assert_close(m.mean, mu.to(acc), **tol)
    torch.testing.assert_close(m.var, var.to(acc), **tol)
    n = 1
    for d in dims:
        n *= x.shape[d]
    assert bool((m.count == n).all())


def test_moments_negative_dims_mean_the_same_sets():
    x = randn((3, 4, 5), seed=2)
    m = moments(x, (-1, -3))
    mu, var = ref_moments(x, (0, 2))
    torch.testing.assert_close(m.mean, mu.float(), **TOL[F32])
    torch.testing.assert_close(m.var, var.float(), **TOL[F32])


@pytest.mark.parametrize("offset", [1e4, 1e5, 1e6])
def test_moments_large_mean_small_spread(offset):
    x = randn((64, 257), F32, seed=11, offset=offset, scale=1e-2)
    m = moments(x, (1,))
    mu, var = ref_moments(x, (1,))  # float64 from the same float32 input
    assert bool((m.var >= 0).all())
    torch.testing.assert_close(m.mean, mu.float(), rtol=1e-7, atol=0.0)
    # the spread is tiny next to the mean: compare the variance relative to itself
    torch.testing.assert_close(m.var, var.float(), rtol=1e-4, atol=1e-9)


def test_moments_overflowing_squares_are_inf_only_where_the_truth_overflows():
    x = randn((3, 100), F32, seed=4, scale=1e30)
    x[1] = randn((100,), F32, seed=5)  # an ordinary row next to the huge ones
    m = moments(x, (1,))
    mu, var = ref_moments(x, (1,))
    torch.testing.assert_close(m.mean.double(), mu, rtol=1e-5, atol=1e-6)
    assert bool(torch.isinf(m.var[[0, 2]]).all())  # 1e60 does not fit in fp32
    torch.testing.assert_close(m.var[1].double(), var[1], rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("scale", [1e-40, 1e-20, 1.0, 1e20, 1e37])
def test_moments_scaled_sets_are_exact_across_the_fp32_range(scale):
    x = randn((4, 64), F64, seed=21).float() * scale
    m = moments(x, (1,))
    mu, var = ref_moments(x, (1,))
    # a subnormal mean is itself only a few digits: allow a few of its ulps (2^-149 each)
    torch.testing.assert_close(m.mean.double(), mu, rtol=1e-5, atol=8 * 2.0**-149)
    if 1e-18 < scale < 1e19:  # the variance itself fits in fp32
        torch.testing.assert_close(m.var.double(), var, rtol=1e-4, atol=0.0)


# --- normalize -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["wb", "w", "b", "none"])
@pytest.mark.parametrize("dtype", [F32, F64, *HALF])
def test_normalize_is_the_affine_map(kind, dtype):
    x = randn((2, 3, 4, 5), dtype, seed=6)
    acc = F64 if dtype == F64 else F32
    mean = randn((1, 3, 1, 1), acc, seed=7)
    rstd = randn((1, 3, 1, 1), acc, seed=8).abs() + 0.5
    w, b = affine_params((1, 3, 1, 1), F32 if dtype != F64 else F64, kind=kind)
    y = normalize(x, mean, rstd, w, b)
    assert y.dtype == dtype and y.shape == x.shape
    expected = (x.double() - mean.double()) * rstd.double()
    if w is not None:
        expected = expected * w.double()
    if b is not None:
        expected = expected + b.double()
    if dtype in HALF:
        torch.testing.assert_close(y.double(), expected.to(dtype).double(), rtol=2e-2, atol=2e-2)
    else:
        torch.testing.assert_close(y.double(), expected, **TOL[dtype])


def test_normalize_does_not_mutate_its_arguments():
    x = randn((2, 3, 4), seed=1)
    mean, rstd = randn((1, 3, 1), seed=2), randn((1, 3, 1), seed=3).abs() + 1
    w, b = affine_params((1, 3, 1))
    before = [t.clone() for t in (x, mean, rstd, w, b)]
    versions = [t._version for t in (x, mean, rstd, w, b)]
    normalize(x, mean, rstd, w, b)
    for t, t0, v in zip((x, mean, rstd, w, b), before, versions):
        assert t._version == v
        assert torch.equal(t, t0)


# --- norm (the normkit::norm op) -------------------------------------------------------------


@pytest.mark.parametrize("dims", [(0, 2, 3), (2, 3), (1, 2, 3), (1,)])
def test_norm_function_forward_and_stats(dims):
    x = randn((3, 4, 5, 2), F32, seed=9, offset=3.0, scale=2.0).requires_grad_()
    pshape = [1 if i in dims else s for i, s in enumerate(x.shape)]
    pshape[0] = 1
    w, b = affine_params(tuple(pshape))
    w.requires_grad_()
    y, mean, var = norm(x, dims, w, b, 1e-5)
    mu, v = ref_moments(x.detach(), dims)
    ref = (x.detach().double() - mu) / torch.sqrt(v + 1e-5) * w.detach().double() + b.double()
    torch.testing.assert_close(y.double(), ref, **TOL[F32])
    torch.testing.assert_close(mean.double(), mu, **TOL[F32])
    torch.testing.assert_close(var.double(), v, **TOL[F32])
    assert y.requires_grad and not mean.requires_grad and not var.requires_grad


@pytest.mark.parametrize("dims", [(0, 2), (1,), (1, 2)])
def test_norm_function_gradcheck_and_gradgradcheck(dims):
    x = randn((3, 4, 3), F64, seed=10).requires_grad_()
    pshape = tuple(1 if (i in dims or i == 0) else s for i, s in enumerate(x.shape))
    w, b = (t.requires_grad_() for t in affine_params(pshape, F64))

    def f(x, w, b):
        return norm(x, dims, w, b, 1e-3)[0]

    assert gradcheck(
        f, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-5, check_batched_grad=True, check_forward_ad=True
    )
    assert gradgradcheck(f, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_norm_on_empty_input_returns_empty_output_and_nan_stats():
    x = torch.zeros((0, 3, 4), requires_grad=True)
    w, b = (t.requires_grad_() for t in affine_params((1, 3, 1)))
    y, mean, var = norm(x, (0, 2), w, b, 1e-5)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert mean.shape == (1, 3, 1) and var.shape == (1, 3, 1)
    assert bool(torch.isnan(mean).all()) and bool(torch.isnan(var).all())
    dx, dw, db = torch.autograd.grad(y.sum(), (x, w, b))
    assert dx.shape == x.shape
    torch.testing.assert_close(dw, torch.zeros_like(w), rtol=0, atol=0)
    torch.testing.assert_close(db, torch.zeros_like(b), rtol=0, atol=0)


def test_first_order_grads_under_create_graph_match_reference_for_huge_inputs():
    """|x| ~ 1e30 in fp32: the grads from a create_graph=True backward (gradient penalties,
    double backward) must be the same as without it, and match the float64 oracle."""
    x = randn((4, 3, 5), F32, seed=12, scale=1e30).requires_grad_()
    w, b = (t.requires_grad_() for t in affine_params((1, 3, 1)))
    dy = randn((4, 3, 5), F32, seed=13)
    y, _, _ = norm(x, (0, 2), w, b, 1e-5)
    x64 = x.detach().double().requires_grad_()
    mu, v = ref_moments(x64, (0, 2))
    ref = (x64 - mu) / torch.sqrt(v + 1e-5) * w.detach().double() + b.detach().double()
    (dx_ref,) = torch.autograd.grad(ref, x64, dy.double())
    dx, dw, _db = torch.autograd.grad(y, (x, w, b), dy, create_graph=True)
    torch.testing.assert_close((dx * 1e30).double(), dx_ref * 1e30, rtol=1e-4, atol=1e-4)
    xhat = ((x64 - mu) / torch.sqrt(v + 1e-5)).detach()
    torch.testing.assert_close(
        dw.double(), (dy.double() * xhat).sum((0, 2), keepdim=True), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize(
    "view",
    [
        lambda t: t[:, :, ::2, ::2],  # strided: not dense
        lambda t: t.transpose(2, 3),
        lambda t: t.contiguous(memory_format=torch.channels_last),
        lambda t: t[:, ::2],
    ],
    ids=["strided", "transposed", "channels-last", "every-other-channel"],
)
def test_public_moments_on_any_layout_equal_the_float64_reference(view):
    """normkit.functional.moments takes the fused kernel's statistics pass in plain eager calls: on any
    layout (the kernel reads dense memory) it equals the float64 moments, and Batch Renorm, which
    uses it for r and d, gives the same step on the view and on a contiguous copy."""
    import normkit.functional as nf
    import normkit.nn as nkn

    x = view(torch.randn(4, 6, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 + 1)
    got = nf.moments(x, (0, 2, 3))
    xd = x.double()
    torch.testing.assert_close(got.mean.double(), xd.mean((0, 2, 3), keepdim=True), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        got.var.double(), xd.var((0, 2, 3), correction=0, keepdim=True), rtol=1e-6, atol=1e-6
    )
    a, b = nkn.BatchRenorm2d(x.shape[1]), nkn.BatchRenorm2d(x.shape[1])
    for m in (a, b):
        with torch.no_grad():
            m.running_var.fill_(0.5)
    torch.testing.assert_close(a(x), b(x.contiguous()))
    torch.testing.assert_close(a.running_mean, b.running_mean)


def test_moments_refuses_dims_out_of_range_and_takes_empty_inputs():
    """``moments`` named the wrong dim for one out of range (5 on a 4-D input reduced dim 1, as ``% 4``)
    and crashed on an empty input; torch's own reductions are the oracle for the valid calls."""
    import normkit.functional as NF
    from normkit._errors import NormError

    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    for dims in [(4,), (5,), (-5,), (1, -3)]:
        with pytest.raises(NormError, match="out of range|twice"):
            NF.moments(x, dims)
    m = NF.moments(x, (0, -2, -1))
    torch.testing.assert_close(m.mean, x.mean((0, 2, 3), keepdim=True))
    torch.testing.assert_close(m.var, x.var((0, 2, 3), unbiased=False, keepdim=True))
    empty = NF.moments(torch.randn(0, 8, 5), (0, 2))  # every set empty: count 0, mean 0, var 0
    assert empty.count.shape == (1, 8, 1) and not empty.count.any() and not empty.mean.any()
    assert NF.moments(torch.randn(0, 8, 5), (2,)).mean.shape == (0, 8, 1)  # no set at all
