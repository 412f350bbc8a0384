"""normkit.nn.BatchNorm1d/2d/3d against torch.nn (same weights) and closed forms (TESTING.md 14-27, 37, 38).

The oracle is ``torch.nn.BatchNorm*d`` loaded with the same state_dict, or a float64 closed form
written here from ALGORITHMS.md §1.1; normkit is never compared with itself.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn

import normkit.nn as nkn
from tests.tolerances import Tol
from tests.torch_compat import assert_same_repr, torch_kwargs

F64 = torch.float64
TOL: Tol = {"atol": 1e-5, "rtol": 1e-5}
# Parameter grads are sums over m = N*prod(spatial) terms with |sum| up to ~30 here, so two
# correct fp32 results differ by a few fp32 ulps of ~30 (measured vs float64: torch 4e-6, ours 1.4e-5).
PTOL: Tol = {"atol": 5e-5, "rtol": 1e-5}

BN_CASES = [
    pytest.param(nkn.BatchNorm1d, nn.BatchNorm1d, (16, 6), id="bn1d-2D"),
    pytest.param(nkn.BatchNorm1d, nn.BatchNorm1d, (8, 6, 7), id="bn1d-3D"),
    pytest.param(nkn.BatchNorm2d, nn.BatchNorm2d, (4, 6, 5, 6), id="bn2d"),
    pytest.param(nkn.BatchNorm3d, nn.BatchNorm3d, (3, 6, 3, 4, 5), id="bn3d"),
]

KWARGS = [
    pytest.param({}, id="default"),
    pytest.param({"momentum": None}, id="momentum-None"),
    pytest.param({"momentum": 0.5, "eps": 1e-3}, id="momentum-0.5-eps-1e-3"),
    pytest.param({"affine": False}, id="affine-False"),
    pytest.param({"bias": False}, id="bias-False"),
    pytest.param({"track_running_stats": False}, id="no-tracking"),
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(shape, seed=0, dtype=torch.float32, offset=3.0, scale=2.0):
    """Input with a per-channel offset so that mean and variance matter."""
    g = _gen(seed)
    C = shape[1]
    off = offset * torch.linspace(-1, 1, C, dtype=F64).view([1, C] + [1] * (len(shape) - 2))
    return (off + scale * torch.randn(shape, generator=g, dtype=F64)).to(dtype)


def _randomize(module: nn.Module, seed: int = 1) -> nn.Module:
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


def _batch_stats(x: torch.Tensor):
    """float64 per-channel mean and biased variance over (N, *spatial), and the set size n."""
    xd = x.double()
    dims = (0, *range(2, x.dim()))
    mu = xd.mean(dims)
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    var = ((xd - mu.view(shape)) ** 2).mean(dims)
    return mu, var, x.numel() // x.shape[1]


def _affine_closed_form(x, mean, var, eps, weight=None, bias=None):
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    y = (x.double() - mean.double().view(shape)) / torch.sqrt(var.double().view(shape) + eps)
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
    for m in (ours, ref):
        m.zero_grad(set_to_none=True)
    y, dx = _fwd_bwd(ours, x, g)
    y_ref, dx_ref = _fwd_bwd(ref, x, g)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(dx, dx_ref, **TOL)
    for name in ("weight", "bias"):
        p, p_ref = getattr(ours, name), getattr(ref, name)
        assert (p is None) == (p_ref is None)
        if p is not None:
            torch.testing.assert_close(p.grad, p_ref.grad, **PTOL)


def _compare_buffers(ours, ref):
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        b, b_ref = getattr(ours, name), getattr(ref, name)
        assert (b is None) == (b_ref is None), name
        if b is not None:
            assert b.dtype == b_ref.dtype, name
            torch.testing.assert_close(b, b_ref, **TOL)


# ---------------------------------------------------------------------------------------------
# Drop-in: torch.nn as the oracle
# ---------------------------------------------------------------------------------------------


def _small_model(norm: nn.Module) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1, bias=False),
        norm,
        nn.ReLU(),
        nn.Conv2d(64, 10, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def test_drop_in_replacement_inside_a_small_model_trains_like_torch():
    torch.manual_seed(0)
    ref = _small_model(nn.BatchNorm2d(64))
    _randomize(ref[1])
    with torch.no_grad():  # non-default buffers before the swap
        ref(torch.randn(4, 3, 8, 8))
    ours = copy.deepcopy(ref)
    ours[1] = nkn.BatchNorm2d(64)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert isinstance(ours[1], nkn.BatchNorm2d)
    assert ours[1].num_batches_tracked.item() == ref[1].num_batches_tracked.item() == 1

    opt = torch.optim.SGD(ours.parameters(), lr=0.05)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05)
    for step in range(10):
        x = torch.randn(4, 3, 8, 8, generator=_gen(step)) * 2 + 1
        target = torch.randint(0, 10, (4,), generator=_gen(100 + step))
        outs = []
        for model, opt_ in ((ours, opt), (ref, opt_ref)):
            opt_.zero_grad()
            xx = x.clone().requires_grad_(True)
            out = model(xx)
            nn.functional.cross_entropy(out, target).backward()
            outs.append((out.detach(), xx.grad))
        torch.testing.assert_close(outs[0][0], outs[1][0], **TOL)
        torch.testing.assert_close(outs[0][1], outs[1][1], **TOL)
        for (name, p), (_, p_ref) in zip(ours.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad, **PTOL, msg=lambda m, n=name: f"{n}: {m}")
        opt.step()
        opt_ref.step()
        _compare_buffers(ours[1], ref[1])
    assert ours[1].num_batches_tracked.item() == 11

    ours.eval()
    ref.eval()
    x = torch.randn(5, 3, 8, 8, generator=_gen(99))
    torch.testing.assert_close(ours(x), ref(x), **TOL)
    for (k, v), (k_ref, v_ref) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert k == k_ref
        torch.testing.assert_close(v, v_ref, **TOL)


@pytest.mark.parametrize("kw", KWARGS)
@pytest.mark.parametrize("ours_cls, torch_cls, shape", BN_CASES)
def test_matches_torch_train_and_eval_for_10_steps(ours_cls, torch_cls, shape, kw):
    ours, ref = _pair(ours_cls, torch_cls, shape[1], **kw)
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    for step in range(10):
        # Batches of different statistics so the running average is non-trivial.
        x = _x(shape, seed=step, offset=1.0 + step, scale=0.5 + 0.2 * step)
        _compare_step(ours, ref, x, step)
        _compare_buffers(ours, ref)
    ours.eval()
    ref.eval()
    for step in range(2):
        x = _x(shape, seed=50 + step)
        _compare_step(ours, ref, x, 50 + step)
        _compare_buffers(ours, ref)


def test_float64_module_matches_torch_float64():
    ours, ref = _pair(nkn.BatchNorm2d, nn.BatchNorm2d, 5, dtype=F64)
    assert ours.weight.dtype == ours.running_var.dtype == F64
    for step in range(3):
        x = _x((4, 5, 3, 3), seed=step, dtype=F64)
        y, y_ref = ours(x), ref(x)
        torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ours.running_var, ref.running_var, atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Running statistics (14-18)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize(
    "cls, shape",
    [
        (nkn.BatchNorm1d, (6, 4)),
        (nkn.BatchNorm1d, (3, 4, 5)),
        (nkn.BatchNorm2d, (2, 4, 3, 5)),
        (nkn.BatchNorm3d, (2, 4, 2, 3, 2)),
    ],
)
def test_one_train_step_closed_form(cls, shape, unbiased):
    m = 0.3
    bn = cls(4, momentum=m, unbiased_running_var=unbiased)
    rm0 = torch.tensor([0.5, -1.0, 2.0, 0.0])
    rv0 = torch.tensor([1.5, 0.5, 3.0, 1.0])
    with torch.no_grad():
        bn.running_mean.copy_(rm0)
        bn.running_var.copy_(rv0)
        bn.num_batches_tracked.fill_(7)
    x = _x(shape, seed=3)
    y = bn(x)
    mu, var, n = _batch_stats(x)
    assert n == math.prod(shape) // shape[1]
    stored = var * n / (n - 1) if unbiased else var
    torch.testing.assert_close(
        bn.running_mean.double(), (1 - m) * rm0.double() + m * mu, atol=1e-6, rtol=1e-6
    )
    torch.testing.assert_close(
        bn.running_var.double(), (1 - m) * rv0.double() + m * stored, atol=1e-6, rtol=1e-6
    )
    assert bn.num_batches_tracked.dtype == torch.long
    assert bn.num_batches_tracked.item() == 8
    # The forward itself uses the biased batch variance.
    torch.testing.assert_close(y.double(), _affine_closed_form(x, mu, var, bn.eps), **TOL)


def test_momentum_zero_and_one():
    x = _x((6, 3, 4), seed=1)
    mu, var, n = _batch_stats(x)
    bn0 = nkn.BatchNorm1d(3, momentum=0.0)
    bn0(x)
    assert torch.equal(bn0.running_mean, torch.zeros(3))
    assert torch.equal(bn0.running_var, torch.ones(3))
    bn1 = nkn.BatchNorm1d(3, momentum=1.0)
    bn1(x)
    torch.testing.assert_close(bn1.running_mean.double(), mu, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(bn1.running_var.double(), var * n / (n - 1), atol=1e-6, rtol=1e-6)


def test_momentum_none_is_the_cumulative_average():
    bn = nkn.BatchNorm2d(3, momentum=None)
    for k in range(3):  # some history that the reset must erase
        bn(_x((2, 3, 4, 4), seed=40 + k, offset=10.0))
    bn.reset_running_stats()
    batches = [_x((n, 3, 3, 2), seed=k, offset=1.0 + k, scale=0.5 + k) for k, n in enumerate((2, 5, 3, 4))]
    for b in batches:
        bn(b)
    stats = [_batch_stats(b) for b in batches]
    exp_mean = torch.stack([mu for mu, _, _ in stats]).mean(0)
    exp_var = torch.stack([v * n / (n - 1) for _, v, n in stats]).mean(0)
    torch.testing.assert_close(bn.running_mean.double(), exp_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), exp_var, atol=1e-6, rtol=1e-6)
    assert bn.num_batches_tracked.item() == 4


def _set_buffers(bn, C, nbt=5):
    with torch.no_grad():
        bn.running_mean.copy_(torch.linspace(-1, 1, C))
        bn.running_var.copy_(torch.linspace(0.5, 2, C))
        bn.num_batches_tracked.fill_(nbt)


def test_eval_uses_the_buffers_and_never_writes_them():
    bn = _randomize(nkn.BatchNorm2d(4))
    _set_buffers(bn, 4)
    before = {k: v.clone() for k, v in bn.named_buffers()}
    x = _x((3, 4, 5, 5), seed=2, offset=4.0)
    bn.eval()
    y_eval = bn(x)
    expected = _affine_closed_form(x, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    torch.testing.assert_close(y_eval.double(), expected, **TOL)
    for k, v in bn.named_buffers():
        assert torch.equal(v, before[k]), k
    # The module reads self.training itself, not a global flag or a cached mode.
    bn.train()
    bn.training = False
    assert torch.equal(bn(x), y_eval)
    model = nn.Sequential(nn.Identity(), bn)
    model.train()
    assert bn.training
    model.eval()
    assert not bn.training
    assert torch.equal(model(x), y_eval)
    for k, v in bn.named_buffers():
        assert torch.equal(v, before[k]), k
    # Train mode gives a different output (batch statistics) and updates the buffers.
    bn.training = True
    y_train = bn(x)
    mu, var, _ = _batch_stats(x)
    torch.testing.assert_close(
        y_train.double(), _affine_closed_form(x, mu, var, bn.eps, bn.weight, bn.bias), **TOL
    )
    assert (y_train - y_eval).abs().max() > 0.1
    assert bn.num_batches_tracked.item() == 6


@pytest.mark.parametrize("cls, shape", [(nkn.BatchNorm1d, (6, 4)), (nkn.BatchNorm2d, (3, 4, 3, 3))])
def test_track_running_stats_false_at_construction(cls, shape):
    bn = _randomize(cls(4, track_running_stats=False))
    assert bn.running_mean is None and bn.running_var is None and bn.num_batches_tracked is None
    assert sorted(bn.state_dict()) == ["bias", "weight"]
    x = _x(shape, seed=4)
    mu, var, _ = _batch_stats(x)
    expected = _affine_closed_form(x, mu, var, bn.eps, bn.weight, bn.bias)
    torch.testing.assert_close(bn.train()(x).double(), expected, **TOL)
    torch.testing.assert_close(bn.eval()(x).double(), expected, **TOL)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_track_running_stats_flipped_later_leaves_buffers_bit_identical(mode):
    bn = _randomize(nkn.BatchNorm2d(4))
    bn(_x((3, 4, 3, 3), seed=5))
    before = {k: v.clone() for k, v in bn.named_buffers()}
    bn.track_running_stats = False
    bn.train(mode == "train")
    for seed in range(3):
        x = _x((3, 4, 3, 3), seed=10 + seed)
        mu, var, _ = _batch_stats(x)
        y = bn(x)
        torch.testing.assert_close(
            y.double(), _affine_closed_form(x, mu, var, bn.eps, bn.weight, bn.bias), **TOL
        )
    for k, v in bn.named_buffers():
        assert torch.equal(v, before[k]), k


def test_reset_running_stats_and_reset_parameters():
    bn = _randomize(nkn.BatchNorm2d(4, momentum=0.5))
    for k in range(3):
        bn(_x((2, 4, 3, 3), seed=k))
    w = bn.weight.detach().clone()
    assert bn.num_batches_tracked.item() == 3
    bn.reset_running_stats()
    assert torch.equal(bn.running_mean, torch.zeros(4))
    assert torch.equal(bn.running_var, torch.ones(4))
    assert bn.num_batches_tracked.item() == 0
    assert torch.equal(bn.weight.detach(), w)  # parameters untouched
    bn(_x((2, 4, 3, 3), seed=9))
    bn.reset_parameters()
    assert torch.equal(bn.weight.detach(), torch.ones(4))
    assert torch.equal(bn.bias.detach(), torch.zeros(4))
    assert torch.equal(bn.running_mean, torch.zeros(4))
    assert torch.equal(bn.running_var, torch.ones(4))
    assert bn.num_batches_tracked.item() == 0
    # Same as a freshly built torch layer.
    for k, v in nn.BatchNorm2d(4).state_dict().items():
        assert torch.equal(bn.state_dict()[k], v), k


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape", [(0, 4), (0, 4, 3), (0, 4, 3, 3)])
def test_empty_batch_leaves_stats_unchanged_and_backward_works(shape, momentum):
    cls = {2: nkn.BatchNorm1d, 3: nkn.BatchNorm1d, 4: nkn.BatchNorm2d}[len(shape)]
    bn = _randomize(cls(4, momentum=momentum))
    _set_buffers(bn, 4)
    before = {k: v.clone() for k, v in bn.named_buffers()}
    for training in (True, False):
        bn.train(training)
        bn.zero_grad(set_to_none=True)
        x = torch.randn(shape, requires_grad=True)
        y = bn(x)
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape
        assert torch.equal(bn.weight.grad, torch.zeros(4))
        assert torch.equal(bn.bias.grad, torch.zeros(4))
        for k, v in bn.named_buffers():
            assert torch.equal(v, before[k]), (training, k)


def test_non_finite_batch_is_not_written_into_the_buffers():
    bn = nkn.BatchNorm2d(3, momentum=0.5)
    _set_buffers(bn, 3, nbt=2)
    before = {k: v.clone() for k, v in bn.named_buffers() if k != "num_skipped_updates"}
    assert bn.num_skipped_updates.item() == 0
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = _x((2, 3, 3, 3), seed=1)
        x[1, 2, 0, 1] = bad
        y = bn(x)
        # Like torch: the affected channel is non-finite, the others are normalized as usual.
        y_ref = nn.BatchNorm2d(3)(x)
        torch.testing.assert_close(y, y_ref, equal_nan=True, **TOL)
        for k, v in before.items():
            assert torch.equal(getattr(bn, k), v), k
        assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()
    assert bn.num_batches_tracked.item() == 2
    assert bn.num_skipped_updates.item() == 3
    # A finite batch afterwards updates normally and does not count as skipped.
    x = _x((2, 3, 3, 3), seed=2)
    bn(x)
    mu, var, n = _batch_stats(x)
    torch.testing.assert_close(
        bn.running_mean.double(), 0.5 * before["running_mean"].double() + 0.5 * mu, atol=1e-6, rtol=1e-6
    )
    torch.testing.assert_close(
        bn.running_var.double(),
        0.5 * before["running_var"].double() + 0.5 * var * n / (n - 1),
        atol=1e-6,
        rtol=1e-6,
    )
    assert bn.num_batches_tracked.item() == 3
    assert bn.num_skipped_updates.item() == 3
    bn.reset_running_stats()
    assert bn.num_skipped_updates.item() == 0


def test_non_finite_batch_does_not_enter_the_cumulative_average():
    bn = nkn.BatchNorm1d(3, momentum=None)
    good = [_x((5, 3), seed=k, offset=1.0 + k) for k in range(2)]
    bad = _x((5, 3), seed=7)
    bad[0, 0] = float("nan")
    bn(good[0])
    bn(bad)
    bn(good[1])
    stats = [_batch_stats(b) for b in good]
    torch.testing.assert_close(
        bn.running_mean.double(), (stats[0][0] + stats[1][0]) / 2, atol=1e-6, rtol=1e-6
    )
    torch.testing.assert_close(
        bn.running_var.double(), sum(v * n / (n - 1) for _, v, n in stats) / 2, atol=1e-6, rtol=1e-6
    )
    assert bn.num_batches_tracked.item() == 2
    assert bn.num_skipped_updates.item() == 1


# ---------------------------------------------------------------------------------------------
# Edge cases and bad input (19-23)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, shape", [(nkn.BatchNorm1d, (1, 4)), (nkn.BatchNorm1d, (1, 4, 1)), (nkn.BatchNorm2d, (1, 4, 1, 1))]
)
def test_one_value_per_channel(cls, shape):
    x = _x(shape, seed=0)
    bn = _randomize(cls(4))
    _set_buffers(bn, 4)
    with pytest.raises(ValueError, match="1 value per channel"):
        bn(x)
    # Eval with running statistics: fine, and it is the affine map of the buffers.
    bn.eval()
    y = bn(x)
    expected = _affine_closed_form(x, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    torch.testing.assert_close(y.double(), expected, **TOL)
    # Eval without running statistics uses batch statistics, and the error says so.
    off = cls(4, track_running_stats=False).eval()
    with pytest.raises(ValueError) as info:
        off(x)
    msg = str(info.value)
    assert "1 value per channel" in msg
    # It must say *why* eval needs batch statistics here (pytorch#156051), not only suggest eval.
    assert re.search(r"eval[^.;]*uses batch statistics", msg), msg


@pytest.mark.parametrize(
    "module, shape",
    [
        (lambda: nkn.BatchNorm2d(7), (2, 5, 4, 4)),
        (lambda: nkn.BatchNorm2d(7, affine=False, track_running_stats=False), (2, 5, 4, 4)),
        (lambda: nkn.BatchNorm1d(7), (3, 5)),
        (lambda: nkn.BatchNorm1d(7, affine=False), (3, 5, 4)),
        (lambda: nkn.BatchNorm3d(7, affine=False, track_running_stats=False), (2, 5, 2, 2, 2)),
    ],
)
def test_wrong_channel_count_names_both_sizes(module, shape):
    bn = module()
    for training in (True, False):
        bn.train(training)
        with pytest.raises(ValueError) as info:
            bn(torch.randn(shape))
        msg = str(info.value)
        assert re.search(r"\b7\b", msg) and re.search(r"\b5\b", msg), msg


@pytest.mark.parametrize(
    "cls, shape",
    [
        (nkn.BatchNorm1d, (2, 3, 4, 4)),
        (nkn.BatchNorm2d, (2, 3, 4)),
        (nkn.BatchNorm3d, (2, 3, 4, 4)),
        (nkn.BatchNorm1d, (3,)),
    ],
)
def test_wrong_rank_is_a_value_error(cls, shape):
    with pytest.raises(ValueError, match=r"expected .*D input"):
        cls(3)(torch.randn(shape))


@pytest.mark.parametrize(
    "kw",
    [
        {"momentum": -0.1},
        {"momentum": 1.5},
        {"momentum": float("nan")},
        {"eps": -1e-5},
        {"eps": float("nan")},
    ],
)
@pytest.mark.parametrize("cls", [nkn.BatchNorm1d, nkn.BatchNorm2d, nkn.BatchNorm3d])
def test_hyper_parameters_checked_at_construction(cls, kw):
    with pytest.raises(ValueError, match="momentum" if "momentum" in kw else "eps"):
        cls(4, **kw)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "4"])
def test_num_features_must_be_a_positive_int(bad):
    with pytest.raises((ValueError, TypeError), match="num_features"):
        nkn.BatchNorm2d(bad)


def test_boundary_hyper_parameters_are_accepted():
    for kw in ({"momentum": 0.0}, {"momentum": 1.0}, {"momentum": None}, {"eps": 0.0}):
        nkn.BatchNorm2d(4, **kw)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_input_is_a_type_error(dtype):
    x = torch.ones(4, 3, 2, 2).to(dtype)
    for training in (True, False):
        with pytest.raises(TypeError, match="floating"):
            nkn.BatchNorm2d(3).train(training)(x)


@pytest.mark.parametrize("affine", [True, False])
def test_float32_module_with_float64_input_is_a_type_error(affine):
    bn = nkn.BatchNorm2d(3, affine=affine)
    x = torch.randn(4, 3, 2, 2, dtype=F64)
    for training in (True, False):
        with pytest.raises(TypeError) as info:
            bn.train(training)(x)
        assert "float64" in str(info.value) and "float32" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Mixed precision (24, 26)
# ---------------------------------------------------------------------------------------------

HALF_TOL = {torch.float16: dict(atol=2e-3, rtol=1e-3), torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ours_cls, torch_cls, shape", BN_CASES)
def test_half_input_with_float32_params(ours_cls, torch_cls, shape, dtype):
    ours, ref = _pair(ours_cls, torch_cls, shape[1])
    for step in range(3):
        x = _x(shape, seed=step, dtype=dtype)
        g = torch.randn(shape, generator=_gen(7 + step)).to(dtype)
        ours.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        xo = x.clone().requires_grad_(True)
        y = ours(xo)
        y.backward(g)
        # Oracle: the fp32 torch layer on the same (already rounded) values.
        xr = x.float().requires_grad_(True)
        y_ref = ref(xr)
        y_ref.backward(g.float())
        assert y.dtype == dtype and xo.grad.dtype == dtype
        torch.testing.assert_close(y.float(), y_ref, **HALF_TOL[dtype])
        torch.testing.assert_close(xo.grad.float(), xr.grad, **HALF_TOL[dtype])
        for name in ("weight", "bias"):
            p = getattr(ours, name)
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
            torch.testing.assert_close(p.grad, getattr(ref, name).grad, atol=1e-3, rtol=1e-4)
        for name in ("running_mean", "running_var"):
            assert getattr(ours, name).dtype == torch.float32
            torch.testing.assert_close(getattr(ours, name), getattr(ref, name), **TOL)
    ours.eval()
    ref.eval()
    x = _x(shape, seed=11, dtype=dtype)
    y = ours(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), ref(x.float()), **HALF_TOL[dtype])


def test_running_buffers_hold_values_beyond_the_float16_range():
    bn = nkn.BatchNorm2d(3, momentum=1.0)
    # Mean 3e4 and spread 1e4 (all below 65504): the variance, ~1e8, is far beyond float16.
    x = (3e4 + 1e4 * torch.randn(8, 3, 4, 4, generator=_gen(0))).clamp(-6e4, 6e4).half()
    y = bn(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    mu, var, n = _batch_stats(x)
    assert bn.running_var.dtype == torch.float32
    assert (bn.running_var > 65504).all()
    assert torch.isfinite(bn.running_var).all() and torch.isfinite(bn.running_mean).all()
    torch.testing.assert_close(bn.running_mean.double(), mu, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(bn.running_var.double(), var * n / (n - 1), rtol=1e-5, atol=0.0)


def test_running_buffers_under_cpu_autocast():
    conv = nn.Conv2d(3, 4, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1000.0)
    bn = nkn.BatchNorm2d(4, momentum=1.0)
    x = torch.randn(4, 3, 5, 5, generator=_gen(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        y = bn(h)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    assert bn.running_var.dtype == torch.float32 and bn.weight.dtype == torch.float32
    mu, var, n = _batch_stats(h)
    assert (bn.running_var > 65504).all()
    torch.testing.assert_close(bn.running_var.double(), var * n / (n - 1), rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_single_position_single_sample_in_eval_is_finite(dtype):
    # (1, C, 1, 1): one value per channel -> an error in training, the buffers in eval.
    bn = _randomize(nkn.BatchNorm2d(5))
    _set_buffers(bn, 5)
    x = torch.randn(1, 5, 1, 1, generator=_gen(0)).to(dtype)
    with pytest.raises(ValueError):
        bn(x)
    bn.eval()
    y = bn(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    expected = _affine_closed_form(x, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    tol = TOL if dtype == torch.float32 else HALF_TOL[dtype]
    torch.testing.assert_close(y.double(), expected, **tol)
    assert torch.isfinite(bn.running_var).all() and bn.num_batches_tracked.item() == 5


# ---------------------------------------------------------------------------------------------
# Memory layout (27)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ours_cls, torch_cls, shape, fmt",
    [
        (nkn.BatchNorm2d, nn.BatchNorm2d, (4, 6, 5, 3), torch.channels_last),
        (nkn.BatchNorm2d, nn.BatchNorm2d, (4, 1, 5, 5), torch.channels_last),
        (nkn.BatchNorm2d, nn.BatchNorm2d, (6, 3, 1, 1), torch.channels_last),
        (nkn.BatchNorm3d, nn.BatchNorm3d, (2, 4, 3, 2, 3), torch.channels_last_3d),
    ],
)
@pytest.mark.parametrize("training", [True, False])
def test_channels_last_is_kept_and_matches_contiguous(ours_cls, torch_cls, shape, fmt, training):
    ours, ref = _pair(ours_cls, torch_cls, shape[1])
    _set_buffers(ours, shape[1])
    ref.load_state_dict(ours.state_dict())
    ours.train(training)
    ref.train(training)
    x = _x(shape, seed=1)
    g = torch.randn(shape, generator=_gen(2))
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
    _compare_buffers(ours, ref)


def test_channels_last_grad_output_with_contiguous_input():
    ours, ref = _pair(nkn.BatchNorm2d, nn.BatchNorm2d, 6)
    x = _x((3, 6, 4, 5), seed=1)
    g = torch.randn(3, 6, 4, 5, generator=_gen(2))
    y, dx = _fwd_bwd(ours, x, g.contiguous(memory_format=torch.channels_last))
    y_ref, dx_ref = _fwd_bwd(ref, x, g)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(dx, dx_ref, **TOL)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **PTOL)


# ---------------------------------------------------------------------------------------------
# Determinism (37) and batch independence (38)
# ---------------------------------------------------------------------------------------------


def _seeded_run():
    torch.manual_seed(1234)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nkn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nkn.GroupNorm(4, 16),
        nkn.InstanceNorm2d(16, affine=True, track_running_stats=True),
        nkn.LayerNorm2d(16),
        nkn.LayerNorm2d(16, over="chw"),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    outs = []
    for _ in range(3):
        x = torch.randn(4, 3, 6, 6)
        opt.zero_grad()
        y = model(x)
        (y**2).mean().backward()
        outs.append(y.detach().clone())
        outs.extend(p.grad.clone() for p in model.parameters())
        opt.step()
    model.eval()
    outs.append(model(torch.randn(2, 3, 6, 6)).detach())
    outs.extend(b.clone() for b in model.buffers())
    return outs


def test_same_seed_gives_bitwise_identical_runs_under_deterministic_algorithms():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        a = _seeded_run()
        b = _seeded_run()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert len(a) == len(b) > 10
    for i, (u, v) in enumerate(zip(a, b)):
        assert u.dtype == v.dtype and torch.equal(u, v), i


def test_eval_mode_is_batch_independent():
    bn = _randomize(nkn.BatchNorm2d(4)).eval()
    _set_buffers(bn, 4)
    x = _x((5, 4, 3, 3), seed=0)
    other = x.clone()
    other[1:] = _x((4, 4, 3, 3), seed=9, offset=50.0, scale=10.0)
    y, y_other = bn(x), bn(other)
    torch.testing.assert_close(y[0], y_other[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(bn(x[:2]), y[:2], atol=1e-6, rtol=0)
    expected = _affine_closed_form(x, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    torch.testing.assert_close(y.double(), expected, **TOL)


def test_train_mode_is_permutation_equivariant_over_the_batch():
    bn = _randomize(nkn.BatchNorm2d(4))
    bn_perm = copy.deepcopy(bn)
    x = _x((6, 4, 3, 3), seed=3)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    y = bn(x)
    y_perm = bn_perm(x[perm])
    torch.testing.assert_close(y_perm, y[perm], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(bn_perm.running_mean, bn.running_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(bn_perm.running_var, bn.running_var, atol=1e-6, rtol=1e-6)
    # And the batch statistics really couple the samples: changing one changes the others.
    x2 = x.clone()
    x2[0] += 5.0
    assert (bn(x2)[1] - y[1]).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------
# repr
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ours_cls, torch_cls",
    [(nkn.BatchNorm1d, nn.BatchNorm1d), (nkn.BatchNorm2d, nn.BatchNorm2d), (nkn.BatchNorm3d, nn.BatchNorm3d)],
)
@pytest.mark.parametrize(
    "kw",
    [{}, {"eps": 1e-3, "momentum": None, "affine": False, "track_running_stats": False}, {"bias": False}],
)
def test_repr_matches_torch(ours_cls, torch_cls, kw):
    assert_same_repr(ours_cls(64, **kw), torch_cls(64, **torch_kwargs(kw)))
