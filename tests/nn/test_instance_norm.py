"""normkit.nn.InstanceNorm1d/2d/3d against torch.nn (same weights) and float64 closed forms."""

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
# Parameter grads are sums over N*prod(spatial) terms (|sum| up to ~20): a few fp32 ulps apart.
PTOL: Tol = {"atol": 5e-5, "rtol": 1e-5}
STAT_TOL: Tol = {"atol": 1e-6, "rtol": 1e-6}

IN_CASES = [
    pytest.param(nkn.InstanceNorm1d, nn.InstanceNorm1d, (4, 6, 9), id="in1d"),
    pytest.param(nkn.InstanceNorm2d, nn.InstanceNorm2d, (3, 6, 5, 4), id="in2d"),
    pytest.param(nkn.InstanceNorm3d, nn.InstanceNorm3d, (2, 4, 3, 4, 3), id="in3d"),
]

KWARGS = [
    pytest.param({}, id="default"),
    pytest.param({"affine": True}, id="affine"),
    pytest.param({"affine": True, "bias": False}, id="affine-no-bias"),
    pytest.param({"track_running_stats": True}, id="tracking"),
    pytest.param(
        {"affine": True, "track_running_stats": True, "momentum": 0.4, "eps": 1e-3}, id="affine-tracking"
    ),
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(shape, seed=0, dtype=torch.float32, offset=3.0, scale=2.0):
    g = _gen(seed)
    C = shape[1]
    off = offset * torch.linspace(-1, 1, C, dtype=F64).view([1, C] + [1] * (len(shape) - 2))
    per_sample = torch.randn(shape[0], 1, *([1] * (len(shape) - 2)), generator=g, dtype=F64)
    return (off + per_sample + scale * torch.randn(shape, generator=g, dtype=F64)).to(dtype)


def _randomize(module, seed=1):
    g = _gen(seed)
    with torch.no_grad():
        if getattr(module, "weight", None) is not None:
            module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=g))
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=g))
    return module


def _pair(ours_cls, torch_cls, C, **kw):
    ref = _randomize(torch_cls(C, **torch_kwargs(kw)))
    ours = ours_cls(C, **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _instance_stats(x):
    """float64 per-(n, c) mean and biased variance over the spatial dims, and the set size."""
    xd = x.double()
    dims = tuple(range(2, x.dim()))
    mu = xd.mean(dims, keepdim=True)
    var = ((xd - mu) ** 2).mean(dims, keepdim=True)
    return mu, var, x.numel() // (x.shape[0] * x.shape[1])


def _closed_form(x, eps, weight=None, bias=None, mean=None, var=None):
    """IN in float64: instance statistics, or (C,) running ones when given."""
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    if mean is None:
        mean, var, _ = _instance_stats(x)
    else:
        mean, var = mean.double().view(shape), var.double().view(shape)
    y = (x.double() - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.detach().double().view(shape)
    if bias is not None:
        y = y + bias.detach().double().view(shape)
    return y


def _fwd_bwd(module, x, g):
    xx = x.detach().clone().requires_grad_(True)
    y = module(xx)
    y.backward(g)
    return y.detach(), xx.grad


def _compare_step(ours, ref, x, seed):
    g = torch.randn(x.shape, generator=_gen(seed + 1000))
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


@pytest.mark.parametrize("kw", KWARGS)
@pytest.mark.parametrize("ours_cls, torch_cls, shape", IN_CASES)
def test_matches_torch_train_and_eval_for_10_steps(ours_cls, torch_cls, shape, kw):
    ours, ref = _pair(ours_cls, torch_cls, shape[1], **kw)
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    for step in range(10):
        x = _x(shape, seed=step, offset=1.0 + step, scale=0.5 + 0.2 * step)
        _compare_step(ours, ref, x, step)
        for name in ("running_mean", "running_var"):
            b, b_ref = getattr(ours, name), getattr(ref, name)
            assert (b is None) == (b_ref is None)
            if b is not None:
                torch.testing.assert_close(b, b_ref, **TOL)
    if ours.track_running_stats:
        # torch's InstanceNorm never advances its counter; normkit counts the updates
        # (its documented contract, shared with BatchNorm), which is what momentum=None needs.
        assert ours.num_batches_tracked.item() == 10
    ours.eval()
    ref.eval()
    for step in range(2):
        _compare_step(ours, ref, _x(shape, seed=40 + step), 40 + step)


@pytest.mark.parametrize("ours_cls, torch_cls, shape", IN_CASES)
def test_unbatched_input_matches_torch(ours_cls, torch_cls, shape):
    ours, ref = _pair(ours_cls, torch_cls, shape[1], affine=True, track_running_stats=True)
    x = _x(shape, seed=3)[0]
    torch.testing.assert_close(ours(x), ref(x), **TOL)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, **TOL)
    torch.testing.assert_close(ours.running_var, ref.running_var, **TOL)
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(x), ref(x), **TOL)


# ---------------------------------------------------------------------------------------------
# Running statistics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, shape",
    [
        (nkn.InstanceNorm1d, (3, 4, 6)),
        (nkn.InstanceNorm2d, (2, 4, 3, 5)),
        (nkn.InstanceNorm3d, (2, 4, 2, 3, 2)),
    ],
)
def test_one_train_step_closed_form(cls, shape):
    m = 0.3
    layer = cls(4, momentum=m, track_running_stats=True)
    rm0 = torch.tensor([0.5, -1.0, 2.0, 0.0])
    rv0 = torch.tensor([1.5, 0.5, 3.0, 1.0])
    with torch.no_grad():
        layer.running_mean.copy_(rm0)
        layer.running_var.copy_(rv0)
    x = _x(shape, seed=3)
    y = layer(x)
    mu, var, n = _instance_stats(x)
    C = shape[1]
    # The batch average of the per-instance mean and unbiased variance (torch's rule).
    bmean = mu.reshape(shape[0], C).mean(0)
    bvar = (var.reshape(shape[0], C) * n / (n - 1)).mean(0)
    torch.testing.assert_close(layer.running_mean.double(), (1 - m) * rm0.double() + m * bmean, **STAT_TOL)
    torch.testing.assert_close(layer.running_var.double(), (1 - m) * rv0.double() + m * bvar, **STAT_TOL)
    assert layer.num_batches_tracked.item() == 1
    torch.testing.assert_close(y.double(), _closed_form(x, layer.eps), **TOL)


def test_momentum_none_is_the_cumulative_average():
    # torch maps momentum=None to 0 for InstanceNorm (no update); normkit documents a cumulative average.
    layer = nkn.InstanceNorm2d(3, momentum=None, track_running_stats=True)
    layer(_x((2, 3, 4, 4), seed=9, offset=20.0))
    layer.reset_running_stats()
    batches = [_x((n, 3, 3, 3), seed=k, offset=1.0 + k) for k, n in enumerate((2, 3, 1))]
    for b in batches:
        layer(b)
    means, vars_ = [], []
    for b in batches:
        mu, var, n = _instance_stats(b)
        means.append(mu.reshape(b.shape[0], 3).mean(0))
        vars_.append((var.reshape(b.shape[0], 3) * n / (n - 1)).mean(0))
    torch.testing.assert_close(layer.running_mean.double(), torch.stack(means).mean(0), **STAT_TOL)
    torch.testing.assert_close(layer.running_var.double(), torch.stack(vars_).mean(0), **STAT_TOL)
    assert layer.num_batches_tracked.item() == 3


def _set_buffers(layer, C):
    with torch.no_grad():
        layer.running_mean.copy_(torch.linspace(-1, 1, C))
        layer.running_var.copy_(torch.linspace(0.5, 2, C))
        layer.num_batches_tracked.fill_(4)


def test_eval_with_tracking_uses_the_buffers_and_never_writes_them():
    layer = _randomize(nkn.InstanceNorm2d(4, affine=True, track_running_stats=True))
    _set_buffers(layer, 4)
    before = {k: v.clone() for k, v in layer.named_buffers()}
    x = _x((3, 4, 5, 5), seed=2)
    layer.eval()
    y = layer(x)
    expected = _closed_form(x, layer.eps, layer.weight, layer.bias, layer.running_mean, layer.running_var)
    torch.testing.assert_close(y.double(), expected, **TOL)
    for k, v in layer.named_buffers():
        assert torch.equal(v, before[k]), k
    layer.train()
    y_train = layer(x)
    torch.testing.assert_close(y_train.double(), _closed_form(x, layer.eps, layer.weight, layer.bias), **TOL)
    assert (y_train - y).abs().max() > 0.1


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_track_running_stats_flipped_later_leaves_buffers_bit_identical(mode):
    layer = _randomize(nkn.InstanceNorm2d(4, affine=True, track_running_stats=True))
    layer(_x((2, 4, 3, 3), seed=5))
    before = {k: v.clone() for k, v in layer.named_buffers()}
    layer.track_running_stats = False
    layer.train(mode == "train")
    x = _x((2, 4, 3, 3), seed=6)
    torch.testing.assert_close(layer(x).double(), _closed_form(x, layer.eps, layer.weight, layer.bias), **TOL)
    for k, v in layer.named_buffers():
        assert torch.equal(v, before[k]), k


def test_no_tracking_uses_instance_stats_in_eval_and_has_no_buffers():
    layer = _randomize(nkn.InstanceNorm2d(4, affine=True))
    assert layer.running_mean is None and layer.num_batches_tracked is None
    assert sorted(layer.state_dict()) == ["bias", "weight"]
    x = _x((2, 4, 3, 3), seed=6)
    expected = _closed_form(x, layer.eps, layer.weight, layer.bias)
    torch.testing.assert_close(layer.train()(x).double(), expected, **TOL)
    torch.testing.assert_close(layer.eval()(x).double(), expected, **TOL)


def test_reset_running_stats_and_parameters():
    layer = _randomize(nkn.InstanceNorm1d(3, affine=True, track_running_stats=True))
    layer(_x((2, 3, 5), seed=1))
    layer.reset_running_stats()
    assert torch.equal(layer.running_mean, torch.zeros(3))
    assert torch.equal(layer.running_var, torch.ones(3))
    assert layer.num_batches_tracked.item() == 0
    assert not torch.equal(layer.weight.detach(), torch.ones(3))
    layer.reset_parameters()
    assert torch.equal(layer.weight.detach(), torch.ones(3))
    assert torch.equal(layer.bias.detach(), torch.zeros(3))


def test_non_finite_batch_is_not_written_into_the_buffers():
    layer = nkn.InstanceNorm2d(3, track_running_stats=True)
    _set_buffers(layer, 3)
    before = {k: v.clone() for k, v in layer.named_buffers() if k != "num_skipped_updates"}
    x = _x((2, 3, 3, 3), seed=1)
    x[0, 1, 1, 1] = float("nan")
    y = layer(x)
    torch.testing.assert_close(y, nn.InstanceNorm2d(3)(x), equal_nan=True, **TOL)
    for k, v in before.items():
        assert torch.equal(getattr(layer, k), v), k
    assert layer.num_skipped_updates.item() == 1


# ---------------------------------------------------------------------------------------------
# Edge cases and bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, shape",
    [
        (nkn.InstanceNorm1d, (3, 4, 1)),
        (nkn.InstanceNorm2d, (2, 4, 1, 1)),
        (nkn.InstanceNorm3d, (2, 4, 1, 1, 1)),
    ],
)
def test_one_spatial_position_raises_in_training_and_works_in_eval_with_tracking(cls, shape):
    x = _x(shape, seed=0)
    with pytest.raises(ValueError, match="more than 1"):
        cls(4)(x)
    with pytest.raises(ValueError, match="more than 1"):
        cls(4).eval()(x)  # no running statistics: eval uses instance statistics too
    layer = _randomize(cls(4, affine=True, track_running_stats=True))
    _set_buffers(layer, 4)
    with pytest.raises(ValueError, match="more than 1"):
        layer(x)
    layer.eval()
    expected = _closed_form(x, layer.eps, layer.weight, layer.bias, layer.running_mean, layer.running_var)
    torch.testing.assert_close(layer(x).double(), expected, **TOL)


@pytest.mark.parametrize("kw", [{}, {"affine": True, "track_running_stats": True}])
@pytest.mark.parametrize("shape", [(0, 4, 3), (0, 4, 3, 3)])
def test_empty_batch_forward_backward(shape, kw):
    cls = nkn.InstanceNorm1d if len(shape) == 3 else nkn.InstanceNorm2d
    layer = cls(4, **kw)
    if layer.track_running_stats:
        _set_buffers(layer, 4)
    before = {k: v.clone() for k, v in layer.named_buffers()}
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    if layer.affine:
        assert torch.equal(layer.weight.grad, torch.zeros(4))
        assert torch.equal(layer.bias.grad, torch.zeros(4))
    for k, v in layer.named_buffers():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("kw", [{"affine": True}, {"affine": True, "bias": False}, {}])
@pytest.mark.parametrize("ours_cls, torch_cls, shape", IN_CASES)
def test_eval_with_running_stats_takes_an_empty_batch(ours_cls, torch_cls, shape, kw):
    """Eval with running statistics on N=0: the empty output (as in training), zero parameter grads,
    the buffers untouched. torch.nn raises ``IndexError: select()`` on N=0 here (its instance_norm
    repeats the statistics N times), so its output on a non-empty batch is the oracle: ours equals it
    there, and the empty batch gives that output's first 0 rows."""
    kw = {**kw, "track_running_stats": True}
    ours, ref = _pair(ours_cls, torch_cls, shape[1], **kw)
    for layer in (ref, ours):
        _set_buffers(layer, shape[1])
        layer.eval()
    x = _x(shape, seed=3)
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(ours(x), want, **TOL)
    before = {k: v.clone() for k, v in ours.named_buffers()}
    empty = x[:0].clone().requires_grad_(True)
    y = ours(empty)
    assert (y.shape, y.dtype) == (want[:0].shape, want.dtype)
    y.sum().backward()
    assert empty.grad is not None and empty.grad.shape == empty.shape
    for name, p in ours.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name
    for k, v in ours.named_buffers():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("kw", [{"affine": True}, {"track_running_stats": True}])
def test_wrong_channel_count_names_both_sizes(kw):
    # Affine parameters or running statistics need the channel count: a clear error (as torch for affine).
    layer = nkn.InstanceNorm2d(7, **kw)
    with pytest.raises(RuntimeError) as info:  # NormError is a RuntimeError and a ValueError
        layer(torch.randn(2, 5, 4, 4))
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert re.search(r"\b7\b", msg) and re.search(r"\b5\b", msg), msg


def test_affine_free_layer_accepts_another_channel_count_with_torchs_warning():
    # torch.nn.InstanceNorm2d(affine=False) warns and runs: num_features is unused there.
    x = torch.randn(2, 5, 4, 4)
    with pytest.warns(UserWarning, match="does not match num_features"):
        ref = torch.nn.InstanceNorm2d(7)(x)
    with pytest.warns(UserWarning, match="does not match num_features"):
        y = nkn.InstanceNorm2d(7)(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "cls, shape",
    [(nkn.InstanceNorm2d, (2, 3, 4, 4, 4)), (nkn.InstanceNorm2d, (3, 4)), (nkn.InstanceNorm1d, (2, 3, 4, 4))],
)
def test_wrong_rank_is_a_value_error(cls, shape):
    with pytest.raises(ValueError, match="expected"):
        cls(3)(torch.randn(shape))


@pytest.mark.parametrize(
    "kw, word",
    [
        ({"momentum": -0.5}, "momentum"),
        ({"momentum": 2.0}, "momentum"),
        ({"eps": -1.0}, "eps"),
        ({"num_features": 0}, "num_features"),
        ({"num_features": -2}, "num_features"),
    ],
)
def test_hyper_parameters_checked_at_construction(kw, word):
    kw = {"num_features": 4, **kw}
    with pytest.raises(ValueError, match=word):
        nkn.InstanceNorm2d(**kw)


def test_integer_and_mismatched_dtype_inputs_are_type_errors():
    with pytest.raises(TypeError, match="floating"):
        nkn.InstanceNorm2d(3)(torch.ones(2, 3, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="float64"):
        nkn.InstanceNorm2d(3, affine=True)(torch.randn(2, 3, 4, 4, dtype=F64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_with_float32_params(dtype):
    ours, ref = _pair(nkn.InstanceNorm2d, nn.InstanceNorm2d, 4, affine=True, track_running_stats=True)
    x = _x((3, 4, 5, 5), seed=1, dtype=dtype)
    y = ours(x)
    assert y.dtype == dtype
    assert ours.weight.dtype == ours.running_mean.dtype == ours.running_var.dtype == torch.float32
    tol = dict(atol=2e-3, rtol=1e-3) if dtype == torch.float16 else dict(atol=1.6e-2, rtol=1.6e-2)
    torch.testing.assert_close(y.float(), ref(x.float()), **tol)
    torch.testing.assert_close(ours.running_var, ref.running_var, **TOL)


@pytest.mark.parametrize("shape", [(3, 6, 5, 4), (2, 1, 4, 4)])
def test_channels_last_is_kept_and_matches_contiguous(shape):
    ours, ref = _pair(nkn.InstanceNorm2d, nn.InstanceNorm2d, shape[1], affine=True)
    x = _x(shape, seed=2)
    g = torch.randn(shape, generator=_gen(3))
    xc = x.clone(memory_format=torch.channels_last).requires_grad_(True)
    y = ours(xc)
    y.backward(g.contiguous(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert xc.grad.is_contiguous(memory_format=torch.channels_last)
    y_ref, dx_ref = _fwd_bwd(ref, x, g)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(xc.grad, dx_ref, **TOL)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **PTOL)


@pytest.mark.parametrize("training", [True, False])
def test_batch_independence(training):
    layer = _randomize(nkn.InstanceNorm2d(4, affine=True, track_running_stats=True))
    _set_buffers(layer, 4)
    layer.train(training)
    x = _x((5, 4, 3, 3), seed=0)
    other = x.clone()
    other[1:] = _x((4, 4, 3, 3), seed=8, offset=40.0, scale=9.0)
    y = layer(x)
    torch.testing.assert_close(layer(other)[0], y[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x[:2]), y[:2], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kw", [{}, {"affine": True, "track_running_stats": True, "momentum": 0.2}, {"bias": False}]
)
def test_repr_matches_torch(kw):
    assert_same_repr(nkn.InstanceNorm2d(8, **kw), nn.InstanceNorm2d(8, **torch_kwargs(kw)))
