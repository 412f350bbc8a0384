"""instance_norm: forward, running statistics averaged over the batch, edge cases, errors.

Oracles: the float64 reference, ``torch.nn.functional.instance_norm``, closed forms.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

from normkit.functional import instance_norm
from tests.functional.helpers import F32, F64, TOL, affine_params, randn, running_stats
from tests.reference import ref_instance_norm

SHAPES = [(4, 3, 7), (3, 3, 4, 5), (2, 3, 3, 4, 2), (1, 3, 2, 2)]


def _nbt(v: int = 0) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.long)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["wb", "w", "b", "none"])
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("tracked", [False, True])
def test_forward_matches_reference_and_torch(shape, kind, dtype, tracked):
    x = randn(shape, dtype, seed=1, offset=0.2, scale=1.5)
    w, b = affine_params((3,), dtype, kind=kind)
    rm, rv = running_stats(3, dtype) if tracked else (None, None)
    out = instance_norm(x, rm, rv, w, b, use_input_stats=True, momentum=0.1, eps=1e-5)
    ref = ref_instance_norm(x, rm, rv, w, b, use_input_stats=True, momentum=0.1, eps=1e-5)
    torch.testing.assert_close(out.output.double(), ref.output, **TOL[dtype])
    t_rm = None if rm is None else rm.clone()
    t_rv = None if rv is None else rv.clone()
    y_t = TF.instance_norm(x, t_rm, t_rv, w, b, use_input_stats=True, momentum=0.1, eps=1e-5)
    torch.testing.assert_close(out.output, y_t, **TOL[dtype])
    if tracked:
        torch.testing.assert_close(out.running_mean, ref.running_mean, **TOL[dtype])
        torch.testing.assert_close(out.running_var, ref.running_var, **TOL[dtype])
        torch.testing.assert_close(out.running_mean, t_rm, **TOL[dtype])
        torch.testing.assert_close(out.running_var, t_rv, **TOL[dtype])


@pytest.mark.parametrize("shape", SHAPES)
def test_eval_uses_running_stats(shape):
    x = randn(shape, F64, seed=2)
    w, b = affine_params((3,), F64)
    rm, rv = running_stats(3, F64)
    out = instance_norm(x, rm, rv, w, b, use_input_stats=False, eps=1e-3)
    view = [1, 3] + [1] * (len(shape) - 2)
    a = w / torch.sqrt(rv + 1e-3)
    torch.testing.assert_close(out.output, x * a.view(view) + (b - a * rm).view(view), **TOL[F64])
    assert torch.equal(out.running_mean, rm) and torch.equal(out.running_var, rv)


# --- 14/15. running stats: batch average of the per-instance unbiased statistics ------------


@pytest.mark.parametrize("momentum", [0.1, 0.0, 1.0])
def test_running_update_formula(momentum):
    x = randn((4, 3, 5, 2), F64, seed=3, offset=2.0)
    rm, rv = running_stats(3, F64)
    out = instance_norm(x, rm, rv, momentum=momentum, num_batches_tracked=_nbt(1))
    flat = x.reshape(4, 3, -1)
    mu = flat.mean(2).mean(0)
    var_u = flat.var(2, unbiased=True).mean(0)  # unbiased per instance (m = 10), then averaged
    torch.testing.assert_close(out.running_mean, (1 - momentum) * rm + momentum * mu, **TOL[F64])
    torch.testing.assert_close(out.running_var, (1 - momentum) * rv + momentum * var_u, **TOL[F64])
    assert int(out.num_batches_tracked) == 2


def test_momentum_none_is_the_mean_of_the_batches():
    batches = [randn((2 + k, 3, 6), F64, seed=10 + k, offset=-k, scale=1 + k) for k in range(3)]
    rm, rv, nbt = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64), _nbt(0)
    for xb in batches:
        out = instance_norm(xb, rm, rv, momentum=None, num_batches_tracked=nbt)
        rm, rv, nbt = out.running_mean, out.running_var, out.num_batches_tracked
    means = torch.stack([xb.mean(2).mean(0) for xb in batches]).mean(0)
    vars_ = torch.stack([xb.var(2, unbiased=True).mean(0) for xb in batches]).mean(0)
    torch.testing.assert_close(rm, means, **TOL[F64])
    torch.testing.assert_close(rv, vars_, **TOL[F64])
    assert int(nbt) == 3


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_batch_leaves_running_stats_unchanged(bad):
    x = randn((3, 3, 4), seed=4)
    x[0, 1, 1] = bad
    rm, rv = running_stats(3)
    out = instance_norm(x, rm, rv, num_batches_tracked=_nbt(2))
    assert torch.equal(out.running_mean, rm) and torch.equal(out.running_var, rv)
    assert int(out.num_batches_tracked) == 2
    assert not bool(torch.isfinite(out.output[0, 1]).any())
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[0, 1] = False
    ref = ref_instance_norm(x).output
    torch.testing.assert_close(out.output[mask].double(), ref[mask], **TOL[F32])


def test_never_writes_arguments():
    x = randn((3, 3, 4), seed=5)
    rm, rv = running_stats(3)
    nbt = _nbt(1)
    snap = [(t.clone(), t._version) for t in (x, rm, rv, nbt)]
    instance_norm(x, rm, rv, num_batches_tracked=nbt)
    for t, (t0, v) in zip((x, rm, rv, nbt), snap):
        assert t._version == v and torch.equal(t, t0)


# --- 19. one spatial value ------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 3, 1), (4, 3, 1, 1), (2, 3, 1, 1, 1)])
def test_single_spatial_value_raises_with_input_stats(shape):
    with pytest.raises(ValueError) as info:
        instance_norm(randn(shape), use_input_stats=True)
    assert str(tuple(shape)) in str(info.value)


@pytest.mark.parametrize("shape", [(4, 3, 1), (4, 3, 1, 1)])
def test_single_spatial_value_works_with_running_stats(shape):
    x = randn(shape, seed=6)
    rm, rv = running_stats(3)
    y = instance_norm(x, rm, rv, use_input_stats=False).output
    torch.testing.assert_close(
        y.double(), ref_instance_norm(x, rm, rv, use_input_stats=False).output, **TOL[F32]
    )


def test_nc_input_is_a_value_error():
    with pytest.raises(ValueError) as info:
        instance_norm(randn((4, 3)))
    assert "(4, 3)" in str(info.value)


def test_eval_without_running_stats_is_a_value_error():
    with pytest.raises(ValueError, match="running"):
        instance_norm(randn((4, 3, 5)), use_input_stats=False)


# --- 20. empty ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 3, 0, 4)])
def test_empty_batch_leaves_stats_unchanged(shape):
    x = torch.zeros(shape, requires_grad=True)
    w, b = (t.requires_grad_() for t in affine_params((3,)))
    rm, rv = running_stats(3)
    out = instance_norm(x, rm, rv, w, b, num_batches_tracked=_nbt(3))
    assert out.output.shape == shape
    assert torch.equal(out.running_mean, rm) and torch.equal(out.running_var, rv)
    assert int(out.num_batches_tracked) == 3
    dx, dw, db = torch.autograd.grad(out.output.sum(), (x, w, b))
    assert torch.equal(dw, torch.zeros(3)) and torch.equal(db, torch.zeros(3)) and dx.shape == shape


# --- 21-23. errors --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_wrong_sizes_name_both(name):
    kw = {
        "weight": torch.ones(3),
        "bias": torch.zeros(3),
        "running_mean": torch.zeros(3),
        "running_var": torch.ones(3),
    }
    kw[name] = torch.ones(2)
    with pytest.raises(ValueError) as info:
        instance_norm(randn((2, 3, 4)), kw["running_mean"], kw["running_var"], kw["weight"], kw["bias"])
    msg = str(info.value)
    assert name in msg and "(2,)" in msg and "(3,)" in msg


def test_hyper_parameter_and_dtype_errors():
    x = randn((2, 3, 4))
    rm, rv = running_stats(3)
    with pytest.raises(ValueError, match="momentum"):
        instance_norm(x, rm, rv, momentum=2.0)
    with pytest.raises(ValueError, match="eps"):
        instance_norm(x, eps=-1.0)
    with pytest.raises(TypeError):
        instance_norm(torch.ones((2, 3, 4), dtype=torch.int64))
    with pytest.raises(TypeError) as info:
        instance_norm(randn((2, 3, 4), F64), None, None, torch.ones(3))
    assert "float64" in str(info.value) and "float32" in str(info.value)


# --- 24. half precision keeps fp32 buffers --------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_fp32_buffers(dtype):
    x = randn((4, 3, 8, 8), dtype, seed=7, offset=500.0, scale=2.0)
    rm, rv = running_stats(3)
    out = instance_norm(x, rm, rv, num_batches_tracked=_nbt())
    assert out.output.dtype == dtype and out.running_mean.dtype == F32 and out.running_var.dtype == F32
    ref = ref_instance_norm(x, rm, rv, num_batches_tracked=_nbt())
    torch.testing.assert_close(out.running_mean, ref.running_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.running_var, ref.running_var, rtol=1e-4, atol=1e-5)


# --- 38. batch independence (the output; the running update is a batch average) -------------


def test_batch_independence():
    x = randn((5, 3, 4, 3), seed=8)
    w, b = affine_params((3,))
    y = instance_norm(x, None, None, w, b).output
    other = x.clone()
    other[1:] = randn((4, 3, 4, 3), seed=9, offset=3.0, scale=9.0)
    torch.testing.assert_close(instance_norm(other, None, None, w, b).output[0], y[0], rtol=0, atol=0)
    torch.testing.assert_close(instance_norm(x[1:2], None, None, w, b).output[0], y[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(0, 3, 4), (0, 3, 4, 4)])
def test_running_statistics_take_an_empty_batch(shape):
    """``use_input_stats=False`` on N=0: the empty output (ATen's instance_norm raises IndexError there);
    on a non-empty batch the same call equals torch's (the oracle)."""
    g = torch.Generator().manual_seed(0)
    rm, rv = torch.rand(3, generator=g), torch.rand(3, generator=g) + 0.5
    w, b = torch.rand(3, generator=g), torch.rand(3, generator=g)
    y = instance_norm(torch.randn(shape), rm, rv, w, b, use_input_stats=False).output
    assert y.shape == shape
    x = torch.randn((2, *shape[1:]), generator=g)
    want = TF.instance_norm(x, rm, rv, w, b, use_input_stats=False)
    torch.testing.assert_close(instance_norm(x, rm, rv, w, b, use_input_stats=False).output, want)
