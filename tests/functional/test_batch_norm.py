"""batch_norm: train/eval semantics, running statistics, edge cases and errors.

Oracles: the float64 reference (``tests/reference.py``), ``torch.nn.functional.batch_norm``, and
closed forms (the running-average formulas of TESTING.md items 14-15).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

from normkit.functional import batch_norm
from tests.functional.helpers import F32, F64, TOL, affine_params, randn, running_stats
from tests.reference import ref_batch_norm, ref_moments

SHAPES = [(6, 3), (4, 3, 7), (3, 3, 4, 5), (2, 3, 3, 4, 2)]


def _nbt(v: int = 0) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.long)


def _unbiased_batch_stats(x):
    """Closed form: per-channel mean and unbiased variance, float64, via torch.var (not normkit)."""
    xc = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    return xc.mean(1), xc.var(1, unbiased=True)


# --- 1. forward, train and eval, vs the oracle and vs torch ----------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kind", ["wb", "w", "b", "none"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_forward_matches_reference_and_torch(shape, training, kind, dtype):
    x = randn(shape, dtype, seed=1, offset=0.3, scale=2.0)
    w, b = affine_params((3,), dtype, kind=kind)
    rm, rv = running_stats(3, dtype)
    out = batch_norm(x, rm, rv, w, b, training=training, momentum=0.1, eps=1e-5)
    ref = ref_batch_norm(x, rm, rv, w, b, training=training, momentum=0.1, eps=1e-5)
    torch.testing.assert_close(out.output.double(), ref.output, **TOL[dtype])
    t_rm, t_rv = rm.clone(), rv.clone()
    y_t = TF.batch_norm(x, t_rm, t_rv, w, b, training=training, momentum=0.1, eps=1e-5)
    torch.testing.assert_close(out.output, y_t, **TOL[dtype])
    torch.testing.assert_close(out.running_mean, t_rm, **TOL[dtype])
    torch.testing.assert_close(out.running_var, t_rv, **TOL[dtype])


def test_train_and_eval_outputs_differ_and_eval_reads_the_buffers():
    x = randn((8, 3, 4), seed=2, offset=2.0)
    rm, rv = running_stats(3)
    y_train = batch_norm(x, rm, rv, training=True).output
    y_eval = batch_norm(x, rm, rv, training=False).output
    assert not torch.allclose(y_train, y_eval)
    torch.testing.assert_close(y_eval.double(), ref_batch_norm(x, rm, rv, training=False).output, **TOL[F32])


def test_no_running_stats_uses_batch_stats_in_eval_too():
    x = randn((5, 3, 4), seed=3, offset=-1.0)
    out = batch_norm(x, None, None, training=False)
    assert out.running_mean is None and out.running_var is None and out.num_batches_tracked is None
    torch.testing.assert_close(out.output.double(), ref_batch_norm(x, training=True).output, **TOL[F32])


# --- 7. eval == the affine map from the running stats ---------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_eval_is_the_affine_map_from_running_stats(shape):
    x = randn(shape, F64, seed=4)
    w, b = affine_params((3,), F64)
    rm, rv = running_stats(3, F64)
    eps = 1e-3
    a = w / torch.sqrt(rv + eps)
    c = b - a * rm
    view = [1, 3] + [1] * (len(shape) - 2)
    y = batch_norm(x, rm, rv, w, b, training=False, eps=eps).output
    torch.testing.assert_close(y, x * a.view(view) + c.view(view), **TOL[F64])


# --- 8. nothing is written in place ---------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_buffers_and_params_are_never_written(training):
    x = randn((4, 3, 5), seed=5)
    w, b = affine_params((3,))
    rm, rv = running_stats(3)
    nbt = _nbt(7)
    tensors = (x, w, b, rm, rv, nbt)
    snap = [(t.clone(), t._version) for t in tensors]
    out = batch_norm(x, rm, rv, w, b, training=training, num_batches_tracked=nbt)
    for t, (t0, v) in zip(tensors, snap):
        assert t._version == v and torch.equal(t, t0)
    if training:  # the updates come back as new tensors
        for new, old in ((out.running_mean, rm), (out.running_var, rv), (out.num_batches_tracked, nbt)):
            assert new.data_ptr() != old.data_ptr()


# --- 14. one train step: the running-average formula -----------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("momentum", [0.1, 0.0, 1.0, 0.37])
def test_running_update_formula(shape, momentum):
    x = randn(shape, F64, seed=6, offset=1.5, scale=0.8)
    rm, rv = running_stats(3, F64)
    out = batch_norm(x, rm, rv, training=True, momentum=momentum, num_batches_tracked=_nbt(3))
    mu, var_u = _unbiased_batch_stats(x)
    n = x.numel() // 3  # N * prod(spatial)
    torch.testing.assert_close(out.running_mean, (1 - momentum) * rm + momentum * mu, **TOL[F64])
    torch.testing.assert_close(out.running_var, (1 - momentum) * rv + momentum * var_u, **TOL[F64])
    # the unbiased factor is n / (n - 1) with n = N * prod(spatial), not N
    _, var_b = ref_moments(x, (0, *range(2, x.dim())))
    torch.testing.assert_close(var_u, var_b.reshape(-1) * n / (n - 1), **TOL[F64])
    assert out.num_batches_tracked.dtype == torch.long and int(out.num_batches_tracked) == 4


def test_running_update_biased_option():
    x = randn((4, 3, 5), F64, seed=7)
    rm, rv = running_stats(3, F64)
    out = batch_norm(x, rm, rv, training=True, momentum=0.2, unbiased_running_var=False)
    _, var_b = ref_moments(x, (0, 2))
    torch.testing.assert_close(out.running_var, 0.8 * rv + 0.2 * var_b.reshape(-1), **TOL[F64])


def test_running_update_fp32_buffers_match_reference():
    x = randn((16, 3, 8, 8), F32, seed=8, offset=3.0)
    rm, rv = running_stats(3)
    out = batch_norm(x, rm, rv, training=True, momentum=0.1, num_batches_tracked=_nbt(0))
    ref = ref_batch_norm(x, rm, rv, training=True, momentum=0.1, num_batches_tracked=_nbt(0))
    assert out.running_mean.dtype == F32 and out.running_var.dtype == F32
    torch.testing.assert_close(out.running_mean, ref.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.running_var, ref.running_var, rtol=1e-6, atol=1e-6)
    assert torch.equal(out.num_batches_tracked, ref.num_batches_tracked)


def test_eval_returns_buffers_unchanged():
    x = randn((4, 3, 5), seed=9)
    rm, rv = running_stats(3)
    nbt = _nbt(2)
    out = batch_norm(x, rm, rv, training=False, num_batches_tracked=nbt)
    assert torch.equal(out.running_mean, rm) and torch.equal(out.running_var, rv)
    assert torch.equal(out.num_batches_tracked, nbt)


def test_running_stats_never_require_grad():
    x = randn((4, 3, 5), seed=10).requires_grad_()
    w, b = (t.requires_grad_() for t in affine_params((3,)))
    rm, rv = running_stats(3)
    out = batch_norm(x, rm, rv, w, b, training=True, num_batches_tracked=_nbt())
    assert out.output.requires_grad
    assert not out.running_mean.requires_grad and not out.running_var.requires_grad


# --- 15. momentum=None: cumulative average ----------------------------------------------------


def test_momentum_none_is_the_mean_of_the_batches():
    batches = [randn((5 + k, 3, 4), F64, seed=20 + k, offset=k, scale=1 + k) for k in range(4)]
    rm, rv, nbt = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64), _nbt(0)
    for xb in batches:
        out = batch_norm(xb, rm, rv, training=True, momentum=None, num_batches_tracked=nbt)
        rm, rv, nbt = out.running_mean, out.running_var, out.num_batches_tracked
    stats = [_unbiased_batch_stats(xb) for xb in batches]
    torch.testing.assert_close(rm, torch.stack([s[0] for s in stats]).mean(0), **TOL[F64])
    torch.testing.assert_close(rv, torch.stack([s[1] for s in stats]).mean(0), **TOL[F64])
    assert int(nbt) == 4


def test_momentum_none_needs_the_step_counter():
    x = randn((4, 3), seed=11)
    rm, rv = running_stats(3)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        batch_norm(x, rm, rv, training=True, momentum=None)


@pytest.mark.parametrize("shape", [(4, 3), (3, 3, 4, 5)])
def test_momentum_none_takes_an_int_step_counter(shape):
    """An int counter works as the long tensor would (oracle: the closed form
    ``running = running + (batch - running) / (n + 1)`` with torch.var), and comes back as a tensor."""
    x = randn(shape, F64, seed=12, offset=1.0)
    rm, rv = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    mean, var = _unbiased_batch_stats(x)
    for n in (0, 3):
        out = batch_norm(x, rm, rv, training=True, momentum=None, num_batches_tracked=n)
        torch.testing.assert_close(out.running_mean, rm + (mean - rm) / (n + 1), **TOL[F64])
        torch.testing.assert_close(out.running_var, rv + (var - rv) / (n + 1), **TOL[F64])
        assert torch.equal(out.num_batches_tracked, _nbt(n + 1))
    for bad in (1.0, "0", True):
        with pytest.raises(TypeError, match="num_batches_tracked must be None, an int or a Tensor"):
            batch_norm(x, rm, rv, training=True, momentum=None, num_batches_tracked=bad)


# --- non-finite batches never reach the buffers --------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_non_finite_batch_leaves_running_stats_unchanged(bad, momentum):
    x = randn((4, 3, 5), seed=12)
    x[1, 0, 2] = bad
    rm, rv = running_stats(3)
    nbt = _nbt(5)
    out = batch_norm(x, rm, rv, training=True, momentum=momentum, num_batches_tracked=nbt)
    assert torch.equal(out.running_mean, rm) and torch.equal(out.running_var, rv)
    assert int(out.num_batches_tracked) == 5
    # the bad channel propagates (never a silent "clean" output); the others are exact
    assert not bool(torch.isfinite(out.output[:, 0]).any())
    ref = ref_batch_norm(x[:, 1:], training=True).output
    torch.testing.assert_close(out.output[:, 1:].double(), ref, **TOL[F32])


def test_overflowing_variance_is_not_written_as_inf():
    x = randn((4, 3, 5), seed=13, scale=1e30)
    rm, rv = running_stats(3)
    out = batch_norm(x, rm, rv, training=True, num_batches_tracked=_nbt(0))
    assert bool(torch.isfinite(out.running_mean).all()) and bool(torch.isfinite(out.running_var).all())
    assert bool(torch.isfinite(out.output).all())


# --- 19. one value per channel --------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1), (1, 3, 1, 1, 1)])
def test_single_value_per_channel_in_training_raises(shape):
    x = randn(shape, seed=14)
    rm, rv = running_stats(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm(x, rm, rv, training=True)


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1, 1)])
def test_single_value_per_channel_works_in_eval_with_running_stats(shape):
    x = randn(shape, seed=15)
    w, b = affine_params((3,))
    rm, rv = running_stats(3)
    y = batch_norm(x, rm, rv, w, b, training=False).output
    torch.testing.assert_close(y.double(), ref_batch_norm(x, rm, rv, w, b, training=False).output, **TOL[F32])


def test_single_value_per_channel_without_running_stats_error_mentions_eval():
    x = randn((1, 3), seed=16)
    with pytest.raises(ValueError) as info:
        batch_norm(x, None, None, training=False)
    msg = str(info.value)
    assert "eval" in msg and "(1, 3)" in msg


def test_single_sample_with_spatial_dims_is_fine():
    x = randn((1, 3, 2, 2), seed=17)
    torch.testing.assert_close(
        batch_norm(x, training=True).output.double(), ref_batch_norm(x, training=True).output, **TOL[F32]
    )


# --- 20. empty batch ------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4, 4), (2, 3, 0)])
def test_empty_batch_leaves_stats_unchanged(training, shape):
    x = torch.zeros(shape, requires_grad=True)
    w, b = (t.requires_grad_() for t in affine_params((3,)))
    rm, rv = running_stats(3)
    out = batch_norm(x, rm, rv, w, b, training=training, num_batches_tracked=_nbt(4))
    assert out.output.shape == shape
    assert torch.equal(out.running_mean, rm) and torch.equal(out.running_var, rv)
    assert int(out.num_batches_tracked) == 4
    dx, dw, db = torch.autograd.grad(out.output.sum(), (x, w, b))
    assert dx.shape == shape
    assert torch.equal(dw, torch.zeros(3)) and torch.equal(db, torch.zeros(3))


# --- 21. sizes ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_wrong_parameter_size_names_both_sizes(name):
    x = randn((4, 3, 5), seed=18)
    kw = {
        "weight": torch.ones(3),
        "bias": torch.zeros(3),
        "running_mean": torch.zeros(3),
        "running_var": torch.ones(3),
    }
    kw[name] = torch.ones(4)
    with pytest.raises(ValueError) as info:
        batch_norm(x, kw["running_mean"], kw["running_var"], kw["weight"], kw["bias"], training=True)
    msg = str(info.value)
    assert name in msg and "(4,)" in msg and "(3,)" in msg


def test_only_one_running_buffer_is_an_error():
    x = randn((4, 3), seed=19)
    with pytest.raises(ValueError):
        batch_norm(x, torch.zeros(3), None, training=True)


# --- 22/23. hyper-parameters and dtypes ------------------------------------------------------


@pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan")])
def test_momentum_outside_unit_interval(momentum):
    rm, rv = running_stats(3)
    with pytest.raises(ValueError, match="momentum"):
        batch_norm(randn((4, 3)), rm, rv, training=True, momentum=momentum)


@pytest.mark.parametrize("eps", [-1e-5, float("nan"), float("inf")])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        batch_norm(randn((4, 3)), training=True, eps=eps)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_input_is_a_type_error(dtype):
    x = torch.ones((4, 3), dtype=dtype)
    with pytest.raises(TypeError) as info:
        batch_norm(x, training=True)
    assert str(dtype) in str(info.value)


@pytest.mark.parametrize(
    "xdtype,pdtype",
    [(F64, F32), (F32, F64), (F32, torch.float16), (torch.float16, torch.bfloat16), (torch.bfloat16, F64)],
)
@pytest.mark.parametrize("name", ["weight", "running_mean"])
def test_param_dtype_mismatch_is_a_readable_type_error(xdtype, pdtype, name):
    x = randn((4, 3), xdtype)
    ok = F32 if xdtype in (torch.float16, torch.bfloat16) else xdtype
    kw = {"weight": torch.ones(3, dtype=ok), "running_mean": torch.zeros(3, dtype=ok)}
    kw[name] = kw[name].to(pdtype)
    with pytest.raises(TypeError) as info:
        batch_norm(x, kw["running_mean"], torch.ones(3, dtype=ok), kw["weight"], training=True)
    msg = str(info.value)
    assert str(xdtype) in msg and str(pdtype) in msg


def test_non_tensor_input_is_a_type_error():
    with pytest.raises(TypeError):
        batch_norm([[1.0, 2.0], [3.0, 4.0]], training=True)  # type: ignore[arg-type]


def test_one_dim_input_is_a_value_error():
    with pytest.raises(ValueError, match="shape"):
        batch_norm(torch.ones(5), training=True)


# --- 24. half precision: fp32 statistics and buffers -----------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_keeps_fp32_buffers_with_fp32_accuracy(dtype):
    x = randn((16, 3, 6, 6), dtype, seed=21, offset=1000.0, scale=3.0)
    rm, rv = running_stats(3)
    out = batch_norm(x, rm, rv, torch.ones(3), torch.zeros(3), training=True, num_batches_tracked=_nbt())
    assert out.output.dtype == dtype
    assert out.running_mean.dtype == F32 and out.running_var.dtype == F32
    ref = ref_batch_norm(x, rm, rv, training=True, num_batches_tracked=_nbt())  # from the same half values
    # fp32 accumulation: ~1e-6 relative; half accumulation would be off by ~ulp(1000) = 0.5 / 4
    torch.testing.assert_close(out.running_mean, ref.running_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.running_var, ref.running_var, rtol=1e-4, atol=1e-5)


# --- 38. batch semantics --------------------------------------------------------------------


def test_train_mode_is_permutation_equivariant_over_the_batch():
    x = randn((7, 3, 4, 2), F64, seed=22)
    w, b = affine_params((3,), F64)
    rm, rv = running_stats(3, F64)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    a = batch_norm(x, rm, rv, w, b, training=True)
    p = batch_norm(x[perm], rm, rv, w, b, training=True)
    torch.testing.assert_close(p.output, a.output[perm], **TOL[F64])
    torch.testing.assert_close(p.running_mean, a.running_mean, **TOL[F64])
    torch.testing.assert_close(p.running_var, a.running_var, **TOL[F64])


def test_eval_mode_is_batch_independent():
    x = randn((6, 3, 4), seed=23)
    rm, rv = running_stats(3)
    y = batch_norm(x, rm, rv, training=False).output
    other = x.clone()
    other[1:] = randn((5, 3, 4), seed=24, scale=100.0)
    torch.testing.assert_close(batch_norm(other, rm, rv, training=False).output[0], y[0], rtol=0, atol=0)
    torch.testing.assert_close(batch_norm(x[2:3], rm, rv, training=False).output[0], y[2], rtol=0, atol=0)


def test_constant_channel_next_to_normal_ones():
    x = randn((5, 4, 3), seed=25)
    x[:, 2] = 1e7 + 1.0
    w, b = affine_params((4,))
    y = batch_norm(x, None, None, w, b, training=True).output
    assert torch.equal(y[:, 2], b[2].expand(5, 3))
    torch.testing.assert_close(
        y.double(), ref_batch_norm(x, None, None, w, b, training=True).output, **TOL[F32]
    )
