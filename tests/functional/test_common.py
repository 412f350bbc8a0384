"""Properties every functional norm shares, checked for each op against the float64 oracle.

TESTING.md items: 1 (forward grid), 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 20, 24, 25, 27, 28, 37.
The op table (``OPS``) lives in ``helpers.py``; BN appears three times (train with running stats,
batch statistics without running stats, eval with running stats).
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from tests.functional.helpers import (
    BATCH_STAT_OPS,
    F32,
    F64,
    OPS,
    SHAPES,
    TOL,
    affine_params,
    grads,
    op_shapes,
    randn,
)

HALF = [torch.float16, torch.bfloat16]
AFFINE = ["wb", "w", "b", "none"]


def _x_w_b(op, shape, dtype=F32, seed=0, kind="wb", offset=0.0, scale=1.0, pdtype=None, grad=False):
    x = randn(shape, dtype, seed=seed, offset=offset, scale=scale)
    w, b = affine_params(op.pshape(shape), pdtype or dtype, seed=seed + 100, kind=kind)
    if grad:
        for t in (x, w, b):
            if t is not None:
                t.requires_grad_()
    return x, w, b


def _ref_grads(op, x, w, b, eps, dy):
    """Gradients by autograd through the float64 oracle."""
    x64 = x.detach().double().requires_grad_()
    w64 = None if w is None else w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    y = op.ref(x64, w64, b64, eps)
    return grads(y, [x64, w64, b64], dy.double())


# --- 1. forward vs the float64 reference ----------------------------------------------------


@pytest.mark.parametrize("op,shape", op_shapes())
@pytest.mark.parametrize("kind", AFFINE)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_forward_matches_reference(op, shape, kind, dtype):
    x, w, b = _x_w_b(op, shape, dtype, seed=1, kind=kind, offset=0.5, scale=3.0)
    y = op.fn(x, w, b, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), op.ref(x, w, b, 1e-5), **TOL[dtype])


@pytest.mark.parametrize("op", OPS, ids=str)
@pytest.mark.parametrize("eps", [0.0, 1e-12, 0.5])
def test_forward_matches_reference_for_eps(op, eps):
    x, w, b = _x_w_b(op, (3, 6, 4, 5), F32, seed=2)
    torch.testing.assert_close(op.fn(x, w, b, eps).double(), op.ref(x, w, b, eps), **TOL[F32])


# --- 2. normalized moments ------------------------------------------------------------------


@pytest.mark.parametrize("op,shape", op_shapes(BATCH_STAT_OPS))
@pytest.mark.parametrize("eps", [1e-5, 0.1])
def test_non_affine_output_has_zero_mean_and_shrunk_unit_variance(op, shape, eps):
    x = randn(shape, F64, seed=3, offset=-2.0, scale=0.7)
    y = op.fn(x, None, None, eps)
    ys = op.sets(y)
    xs = op.sets(x)
    v = ((xs - xs.mean(1, keepdim=True)) ** 2).mean(1)  # closed form: var(y) = v / (v + eps)
    torch.testing.assert_close(ys.mean(1), torch.zeros_like(v), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        ((ys - ys.mean(1, keepdim=True)) ** 2).mean(1), v / (v + eps), rtol=1e-10, atol=1e-12
    )


# --- 3. large mean, small spread ------------------------------------------------------------


@pytest.mark.parametrize("op", OPS, ids=str)
@pytest.mark.parametrize("offset", [1e4, 1e5, 1e6])
def test_large_mean_small_spread_fp32(op, offset):
    x, w, b = _x_w_b(op, (8, 6, 6, 5), F32, seed=4, offset=offset, scale=1e-2, grad=True)
    y = op.fn(x, w, b, 1e-5)
    ref = op.ref(x.detach(), w.detach(), b.detach(), 1e-5)  # float64 from the SAME float32 input
    assert bool(torch.isfinite(y).all())
    if not op.batch_stats:  # running stats (mean ~0): the output is huge but must still match
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=0.0)
        return
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    dy = randn(y.shape, F32, seed=5)
    got = grads(y, [x, w, b], dy)
    exp = _ref_grads(op, x, w, b, 1e-5, dy)
    for g, e in zip(got, exp):
        assert bool(torch.isfinite(g).all())  # item 13
        torch.testing.assert_close(g.double(), e, rtol=1e-3, atol=1e-3 * float(e.abs().max()))


# --- 4. constant sets -> output == bias exactly, finite grads -------------------------------


@pytest.mark.parametrize("op", BATCH_STAT_OPS, ids=str)
@pytest.mark.parametrize("value", [0.0, 3.7, -1234.5678, 1e7, 3e-30])
@pytest.mark.parametrize("dtype", [F32, F64, torch.float16])
def test_constant_input_gives_bias_exactly(op, value, dtype):
    shape = (4, 6, 3, 5)
    if dtype == torch.float16 and abs(value) > 6e4:
        value = 6e4  # near the fp16 max instead
    x = torch.full(shape, value, dtype=dtype)
    pd = F32 if dtype == torch.float16 else dtype
    w, b = affine_params(op.pshape(shape), pd, seed=7)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    y = op.fn(x, w, b, 1e-5)
    lead = [1] * (x.dim() - b.dim()) if op.name == "layer_norm" else None
    expected = (b.view(*lead, *b.shape) if lead is not None else b.view(1, -1, 1, 1)).expand(shape).to(dtype)
    assert torch.equal(y.detach(), expected)
    dy = randn(shape, dtype, seed=8)
    for g in grads(y, [x, w, b], dy):
        assert bool(torch.isfinite(g).all())


@pytest.mark.parametrize("op", BATCH_STAT_OPS, ids=str)
def test_constant_input_without_bias_gives_zeros(op):
    x = torch.full((3, 6, 4), 42.0)
    w, _ = affine_params(op.pshape(x.shape))
    assert torch.equal(op.fn(x, w, None, 1e-5), torch.zeros_like(x))


# --- 5. extreme magnitudes ------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS, ids=str)
def test_huge_values_1e30_fp32(op):
    x, w, b = _x_w_b(op, (4, 6, 3, 5), F32, seed=9, scale=1e30, grad=True)
    y = op.fn(x, w, b, 1e-5)
    assert bool(torch.isfinite(y).all())
    ref = op.ref(x.detach(), w.detach(), b.detach(), 1e-5)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    if op.batch_stats:
        dy = randn(y.shape, F32, seed=10)
        got = grads(y, [x, w, b], dy)
        exp = _ref_grads(op, x, w, b, 1e-5, dy)
        assert all(bool(torch.isfinite(g).all()) for g in got)
        torch.testing.assert_close((got[0] * 1e30).double(), exp[0] * 1e30, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[1].double(), exp[1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[2].double(), exp[2], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op", BATCH_STAT_OPS, ids=str)
def test_huge_and_ordinary_sets_side_by_side(op):
    x = randn((4, 6, 3, 5), F32, seed=11)
    x[:, :3] *= 1e30
    w, b = affine_params(op.pshape(x.shape), F32)
    y = op.fn(x, w, b, 1e-5)
    assert bool(torch.isfinite(y).all())
    torch.testing.assert_close(y.double(), op.ref(x, w, b, 1e-5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", OPS, ids=str)
def test_subnormal_values_fp32_default_eps(op):
    x, w, b = _x_w_b(op, (4, 6, 3, 5), F32, seed=12, scale=1e-40)
    assert bool((x[x != 0].abs() < torch.finfo(F32).tiny).all())  # really subnormal
    y = op.fn(x, w, b, 1e-5)
    assert bool(torch.isfinite(y).all())
    torch.testing.assert_close(y.double(), op.ref(x, w, b, 1e-5), **TOL[F32])


@pytest.mark.parametrize("op", BATCH_STAT_OPS, ids=str)
def test_subnormal_values_fp32_eps_zero(op):
    """eps=0 and a non-constant subnormal input (~1e-40): the normalized output is O(1) and
    finite in float64; the squares underflow in float32, which must not turn it into inf/NaN."""
    x = randn((4, 6, 3, 5), F32, seed=13, scale=1e-40)
    y = op.fn(x, None, None, 0.0)
    ref = op.ref(x, None, None, 0.0)
    assert bool(torch.isfinite(ref).all())
    assert bool(torch.isfinite(y).all())
    # the input itself is quantized at 1.4e-45, ~1e-5 of its spread: loose tolerance
    torch.testing.assert_close(y.double(), ref, rtol=1e-3, atol=1e-3)


# --- 6. a long reduction --------------------------------------------------------------------


@pytest.mark.parametrize(
    "op", [o for o in BATCH_STAT_OPS if o.name in ("batch_norm_train", "layer_norm_2d_chw")], ids=str
)
def test_long_reduction_1e7_elements(op):
    """One set of 10^7 elements (pytorch#54293), mean 5 and unit spread; float32 vs float64."""
    n = 10**7
    x = randn((n, 1) if op.name.startswith("batch") else (1, 1, n), F32, seed=14, offset=5.0)
    y = op.fn(x, None, None, 1e-5)
    ref = op.ref(x, None, None, 1e-5)
    err = (y.double() - ref).abs().max().item()
    assert err <= 1e-5, err


# --- 8. no mutation -------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS, ids=str)
def test_never_mutates_inputs(op):
    x, w, b = _x_w_b(op, (3, 6, 4, 5), F32, seed=15, grad=True)
    snap = [(t.detach().clone(), t._version) for t in (x, w, b)]
    y = op.fn(x, w, b, 1e-5)
    y.backward(randn(y.shape, seed=16))
    for t, (t0, v) in zip((x, w, b), snap):
        assert t._version == v
        assert torch.equal(t.detach(), t0)


# --- 9. gradcheck and gradgradcheck, jointly and one at a time ------------------------------


@pytest.mark.parametrize("op", OPS, ids=str)
@pytest.mark.parametrize("which", ["xwb", "x", "w", "b"])
def test_gradcheck_and_gradgradcheck(op, which):
    x, w, b = _x_w_b(op, (3, 4, 2, 3), F64, seed=17)
    for name, t in zip("xwb", (x, w, b)):
        t.requires_grad_(name in which)
    live = [t for t in (x, w, b) if t.requires_grad]

    def f(*args):
        it = iter(args)
        xx, ww, bb = (next(it) if t.requires_grad else t for t in (x, w, b))
        return op.fn(xx, ww, bb, 1e-3)

    assert gradcheck(f, live, eps=1e-6, atol=1e-6, rtol=1e-5)
    assert gradgradcheck(f, live, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("op", BATCH_STAT_OPS, ids=str)
def test_gradcheck_without_affine(op):
    x = randn((3, 4, 2, 3), F64, seed=18).requires_grad_()

    def f(xx):
        return op.fn(xx, None, None, 1e-3)

    assert gradcheck(f, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)
    assert gradgradcheck(f, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


# --- 10. analytic backward vs autograd through the reference (fp32, large shapes) -----------


@pytest.mark.parametrize("op", OPS, ids=str)
def test_backward_matches_autograd_through_reference_fp32_large(op):
    x, w, b = _x_w_b(op, (16, 32, 16, 16), F32, seed=19, offset=1.5, scale=2.0, grad=True)
    y = op.fn(x, w, b, 1e-5)
    dy = randn(y.shape, F32, seed=20)
    got = grads(y, [x, w, b], dy)
    exp = _ref_grads(op, x, w, b, 1e-5, dy)
    torch.testing.assert_close(got[0].double(), exp[0], rtol=1e-4, atol=1e-4)
    for g, e in zip(got[1:], exp[1:]):  # parameter grads are sums over up to 65536 terms
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-4 * max(1.0, float(e.abs().max())))


# --- 11. backward invariants in training mode -----------------------------------------------


@pytest.mark.parametrize("op,shape", op_shapes(BATCH_STAT_OPS, SHAPES[1:]))
def test_backward_invariants(op, shape):
    x, w, b = _x_w_b(op, shape, F64, seed=21, grad=True)
    y = op.fn(x, w, b, 0.0)
    dy = randn(shape, F64, seed=22)
    dx, dw, db = grads(y, [x, w, b], dy)
    xs = op.sets(x.detach())
    xhat_s = (xs - xs.mean(1, keepdim=True)) / xs.std(1, unbiased=False, keepdim=True)
    xhat = xhat_s.reshape(op.sets(torch.empty(shape)).shape)
    dxs = op.sets(dx)
    scale = float(dxs.abs().max()) * dxs.shape[1]
    torch.testing.assert_close(dxs.sum(1), torch.zeros(dxs.shape[0], dtype=F64), rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(
        (dxs * xhat).sum(1), torch.zeros(dxs.shape[0], dtype=F64), rtol=0, atol=1e-12 * scale
    )
    # dbeta = sum dy, dgamma = sum dy * x_hat, over everything but the parameter's own dims
    xhat_full = _unsets(op, xhat, shape)
    torch.testing.assert_close(db, op.param_sum(dy, shape).reshape(db.shape), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        dw, op.param_sum(dy * xhat_full, shape).reshape(dw.shape), rtol=1e-10, atol=1e-10
    )


def _unsets(op, t_sets, shape):
    """Inverse of ``op.sets`` for a contiguous tensor of the given shape."""
    idx = torch.arange(int(torch.tensor(shape).prod())).reshape(shape).to(F64)
    order = op.sets(idx).reshape(-1).long()
    out = torch.empty(order.numel(), dtype=t_sets.dtype)
    out[order] = t_sets.reshape(-1)
    return out.reshape(shape)


@pytest.mark.parametrize("op", [o for o in OPS if not o.batch_stats], ids=str)
def test_backward_with_constant_statistics_is_elementwise(op):
    """Eval-mode BN: dx = dy * gamma * rstd (closed form from the running stats)."""
    from tests.functional.helpers import running_stats

    x, w, b = _x_w_b(op, (3, 6, 4), F64, seed=23, grad=True)
    y = op.fn(x, w, b, 1e-5)
    dy = randn(y.shape, F64, seed=24)
    (dx,) = torch.autograd.grad(y, x, dy)
    _, rv = running_stats(6, F64)
    torch.testing.assert_close(dx, dy * (w.detach() / torch.sqrt(rv + 1e-5)).view(1, -1, 1), **TOL[F64])


# --- 12. weight=None / bias=None and partial requires_grad ----------------------------------


@pytest.mark.parametrize("op", OPS, ids=str)
@pytest.mark.parametrize("kind", AFFINE)
@pytest.mark.parametrize("which", ["x", "w", "b", "wb", "xw", "xb", "xwb"])
def test_partial_requires_grad(op, kind, which):
    x, w, b = _x_w_b(op, (3, 6, 4, 5), F32, seed=25, kind=kind)
    for name, t in zip("xwb", (x, w, b)):
        if t is not None and name in which:
            t.requires_grad_()
    y = op.fn(x, w, b, 1e-5)
    torch.testing.assert_close(
        y.detach().double(),
        op.ref(x.detach(), None if w is None else w.detach(), None if b is None else b.detach(), 1e-5),
        **TOL[F32],
    )
    live = [t for t in (x, w, b) if t is not None and t.requires_grad]
    if not live:
        assert not y.requires_grad
        return
    dy = randn(y.shape, F32, seed=26)
    got = grads(y, [x, w, b], dy)
    exp = _ref_grads(op, x, w, b, 1e-5, dy)
    for t, g, e in zip((x, w, b), got, exp):
        if t is not None and t.requires_grad:
            torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-4)


# --- 20. empty tensors ----------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS, ids=str)
@pytest.mark.parametrize("shape", [(0, 6, 4, 5), (0, 6), (3, 6, 0, 5), (0, 6, 3)])
def test_empty_input_forward_and_backward(op, shape):
    if len(shape) < op.min_dim:
        shape = shape + (4,)
    x, w, b = _x_w_b(op, shape, F32, seed=27, grad=True)
    y = op.fn(x, w, b, 1e-5)
    assert y.shape == x.shape and y.dtype == x.dtype and y.numel() == 0
    dx, dw, db = torch.autograd.grad(y.sum(), (x, w, b))
    assert dx.shape == x.shape
    torch.testing.assert_close(dw, torch.zeros_like(w), rtol=0, atol=0)
    torch.testing.assert_close(db, torch.zeros_like(b), rtol=0, atol=0)


# --- 24/25. half precision ------------------------------------------------------------------

_HALF_TOL = {torch.float16: {"rtol": 2e-3, "atol": 2e-3}, torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2}}


@pytest.mark.parametrize("op,shape", op_shapes())
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_half_input_output_dtype_and_accuracy(op, shape, dtype, offset):
    """Statistics must be accumulated in float32: with mean 100 and unit spread, half-precision
    statistics are off by ~ulp(100) = 0.06 (fp16) / 0.5 (bf16) and miss the tolerance."""
    x, w, b = _x_w_b(op, shape, dtype, seed=28, offset=offset, pdtype=F32)
    w0, b0 = w.clone(), b.clone()
    y = op.fn(x, w, b, 1e-5)
    assert y.dtype == dtype
    assert w.dtype == F32 and torch.equal(w, w0) and torch.equal(b, b0)
    ref = op.ref(x, w, b, 1e-5)  # float64 from the same half-precision values
    if not op.batch_stats:
        torch.testing.assert_close(
            y.double(), ref.to(dtype).double(), rtol=_HALF_TOL[dtype]["rtol"], atol=1e-6
        )
        return
    torch.testing.assert_close(y.double(), ref, **_HALF_TOL[dtype])


@pytest.mark.parametrize("op", BATCH_STAT_OPS, ids=str)
@pytest.mark.parametrize("dtype", HALF)
def test_half_backward_matches_reference(op, dtype):
    x, w, b = _x_w_b(op, (4, 6, 5, 3), dtype, seed=29, pdtype=F32, grad=True)
    y = op.fn(x, w, b, 1e-5)
    dy = randn(y.shape, dtype, seed=30)
    dx, dw, db = grads(y, [x, w, b], dy)
    assert dx.dtype == dtype and dw.dtype == F32 and db.dtype == F32
    ex, ew, eb = _ref_grads(op, x, w, b, 1e-5, dy)
    torch.testing.assert_close(dx.double(), ex, **_HALF_TOL[dtype])
    torch.testing.assert_close(dw.double(), ew, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(db.double(), eb, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op", BATCH_STAT_OPS, ids=str)
def test_fp16_all_zero_input_with_tiny_eps_is_not_nan(op):
    """eps=1e-12 underflows in fp16 (pytorch#41527): computed in fp32, rstd = 1e6 and y = 0."""
    x = torch.zeros((3, 6, 4, 5), dtype=torch.float16, requires_grad=True)
    w, b = affine_params(op.pshape(x.shape), F32)
    y = op.fn(x, w, b, 1e-12)
    lead = [1] * (x.dim() - b.dim()) if op.name == "layer_norm" else [1, -1, 1, 1]
    expected = (b.view(*lead, *b.shape) if op.name == "layer_norm" else b.view(lead)).expand(x.shape)
    assert torch.equal(y.detach(), expected.to(torch.float16))
    dy = randn(x.shape, torch.float16, seed=39)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert not bool(torch.isnan(dx).any())
    # dx = rstd * (g - mean_S g) with rstd = 1e6 may exceed the fp16 range: compare rounded
    (ex,) = _ref_grads(op, x, w, b, 1e-12, dy)[:1]
    torch.testing.assert_close(dx, ex.to(torch.float16), rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("op", OPS, ids=str)
@pytest.mark.parametrize("lo,hi", [(256.0, 1e3), (1e3, 1e4), (300.0, 6e4)])
def test_fp16_values_whose_squares_overflow(op, lo, hi):
    g = torch.Generator().manual_seed(31)
    x = (lo + (hi - lo) * torch.rand((4, 6, 5, 3), generator=g, dtype=F64)).to(torch.float16)
    x = torch.where(torch.rand(x.shape, generator=g) < 0.5, x, -x)  # both signs
    w, b = affine_params(op.pshape(x.shape), F32)
    y = op.fn(x, w, b, 1e-5)
    assert y.dtype == torch.float16
    ref = op.ref(x, w, b, 1e-5)
    if op.batch_stats:
        assert bool(torch.isfinite(y).all())
        torch.testing.assert_close(y.double(), ref, **_HALF_TOL[torch.float16])
    else:  # running stats: the output may legitimately exceed the fp16 range; match it rounded
        torch.testing.assert_close(y.double(), ref.to(torch.float16).double(), rtol=2e-3, atol=1e-6)


# --- 27. channels_last ----------------------------------------------------------------------

CL_SHAPES = [(3, 6, 4, 5), (2, 1, 3, 4), (4, 6, 1, 1), (2, 6, 2, 3, 4), (3, 1, 2, 1, 2), (5, 4, 1, 1, 1)]


def _fmt(shape):
    return torch.channels_last if len(shape) == 4 else torch.channels_last_3d


@pytest.mark.parametrize("op,shape", [(o, s) for o in OPS for s in CL_SHAPES if o.valid(s)])
def test_channels_last_same_values_and_layout_kept(op, shape):
    fmt = _fmt(shape)
    x0, w, b = _x_w_b(op, shape, F32, seed=32)
    dy0 = randn(shape, F32, seed=33)
    w.requires_grad_()
    b.requires_grad_()

    def run(x, dy):
        x = x.detach().clone().requires_grad_()  # clone keeps the memory format
        y = op.fn(x, w, b, 1e-5)
        return (y, *grads(y, [x, w, b], dy))

    xc = x0.contiguous(memory_format=fmt)
    assert xc.is_contiguous(memory_format=fmt)
    y, dx, dw, db = run(xc, dy0.contiguous(memory_format=fmt))
    y_ref, dx_ref, dw_ref, db_ref = run(x0, dy0)
    # against the float64 oracle ...
    ref = op.ref(x0, w.detach(), b.detach(), 1e-5)
    torch.testing.assert_close(y.double(), ref, **TOL[F32])
    exp = _ref_grads(op, x0, w, b, 1e-5, dy0)
    torch.testing.assert_close(dx.double(), exp[0], rtol=1e-4, atol=1e-4)
    # ... and the same numbers as the contiguous run
    for got, want in zip((y, dx), (y_ref, dx_ref)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for got, want in zip((dw, db), (dw_ref, db_ref)):  # sums: the layout changes the order
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if op.channel_layout:
        assert y.is_contiguous(memory_format=fmt), y.stride()
        assert dx.is_contiguous(memory_format=fmt), dx.stride()


# --- 28. non-contiguous, permuted and expanded inputs and grad_outputs ----------------------


def _layouts(shape, seed):
    """(name, x) with the logical ``shape`` but unusual strides."""
    N, C, H, W = shape
    base = randn((N, C, W, H), F32, seed=seed)
    yield "transposed", base.transpose(2, 3)
    wide = randn((N, C, H, 2 * W), F32, seed=seed + 1)
    yield "sliced_step2", wide[..., ::2]
    perm = randn((H, W, N, C), F32, seed=seed + 2)
    yield "permuted", perm.permute(2, 3, 0, 1)
    one = randn((1, C, H, W), F32, seed=seed + 3)
    yield "expanded_batch", one.expand(N, C, H, W)
    col = randn((N, C, H, 1), F32, seed=seed + 4)
    yield "expanded_width", col.expand(N, C, H, W)


@pytest.mark.parametrize("op", OPS, ids=str)
@pytest.mark.parametrize(
    "layout", ["transposed", "sliced_step2", "permuted", "expanded_batch", "expanded_width"]
)
@pytest.mark.parametrize("dy_kind", ["contiguous", "expanded", "permuted", "channels_last"])
def test_strided_inputs_and_grad_outputs(op, layout, dy_kind):
    shape = (4, 6, 3, 5)
    x = dict(_layouts(shape, 34))[layout]
    w, b = affine_params(op.pshape(shape), F32, seed=35)
    w.requires_grad_()
    b.requires_grad_()
    assert not x.is_contiguous()
    xg = x.detach().requires_grad_()  # keeps the unusual strides
    if dy_kind == "contiguous":
        dy = randn(shape, F32, seed=36)
    elif dy_kind == "expanded":
        dy = randn((1, 6, 1, 5), F32, seed=36).expand(shape)
    elif dy_kind == "permuted":
        dy = randn((5, 3, 6, 4), F32, seed=36).permute(3, 2, 1, 0)
    else:
        dy = randn(shape, F32, seed=36).contiguous(memory_format=torch.channels_last)
    y = op.fn(xg, w, b, 1e-5)
    ref = op.ref(x.detach(), w.detach(), b.detach(), 1e-5)
    torch.testing.assert_close(y.double(), ref, **TOL[F32])
    got = grads(y, [xg, w, b], dy)
    exp = _ref_grads(op, x.detach(), w, b, 1e-5, dy)
    for g, e in zip(got, exp):
        assert g.shape == e.shape
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-4)


# --- 37. determinism ------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS, ids=str)
def test_bitwise_deterministic_under_deterministic_algorithms(op):
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            x, w, b = _x_w_b(op, (8, 6, 7, 5), F32, seed=37, offset=3.0, grad=True)
            y = op.fn(x, w, b, 1e-5)
            dy = randn(y.shape, F32, seed=38)
            runs.append((y.detach(), *grads(y, [x, w, b], dy)))
    finally:
        torch.use_deterministic_algorithms(prev)
    for a, c in zip(*runs):
        assert torch.equal(a, c)
    x, w, b = _x_w_b(op, (8, 6, 7, 5), F32, seed=37, offset=3.0)
    torch.testing.assert_close(runs[0][0].double(), op.ref(x, w, b, 1e-5), **TOL[F32])
