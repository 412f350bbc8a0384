"""Ghost BN, Batch Renorm, Frozen BN, mean-only BN and Keras BatchNormalization (issue 6, items 1-5).

Oracles: the float64 loop/formula references in tests/reference_family.py, torch.nn.BatchNorm for the
cases that must equal BN, and hand-written closed forms.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as TF
from torch.autograd import gradcheck

import normkit
import normkit.functional as nkf
from normkit.nn import (
    BatchNormalization,
    BatchRenorm1d,
    BatchRenorm2d,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    MeanOnlyBatchNorm,
)
from tests.reference_family import (
    ref_batch_renorm,
    ref_bn_train,
    ref_ghost_batch_norm,
    ref_keras_bn,
)

F32, F64 = torch.float32, torch.float64


def _randn(shape, dtype=F32, seed=0, offset=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (offset + scale * torch.randn(shape, generator=g, dtype=F64)).to(dtype)


def _set_affine(m, C, dtype=F32, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if getattr(m, "weight", None) is not None:
            m.weight.copy_((1 + 0.5 * torch.randn(C, generator=g, dtype=F64)).to(dtype))
        if getattr(m, "bias", None) is not None:
            m.bias.copy_((0.5 * torch.randn(C, generator=g, dtype=F64)).to(dtype))
    return m


def _set_stats(m, C, dtype=F32):
    with torch.no_grad():
        m.running_mean.copy_(torch.linspace(-1, 1, C, dtype=dtype))
        m.running_var.copy_(torch.linspace(0.5, 2, C, dtype=dtype))
    return m


def _roundtrip(m):
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# =============================================================================================
# Ghost BN
# =============================================================================================


@pytest.mark.parametrize("mode", ["per_chunk", "averaged"])
@pytest.mark.parametrize("N,B", [(12, 4), (11, 4), (11, 3), (10, 7)])
@pytest.mark.parametrize("spatial", [(), (4,)])
def test_ghost_forward_and_running_stats_match_loop_oracle(mode, N, B, spatial):
    C = 3
    x = _randn((N, C, *spatial), F64, seed=N + B)
    layer = GhostBatchNorm1d(C, ghost_batch_size=B, momentum=0.3, momentum_mode=mode, dtype=F64)
    _set_stats(_set_affine(layer, C, F64), C, F64)
    rm0, rv0 = layer.running_mean.clone(), layer.running_var.clone()
    y = layer(x)
    want, rm, rv, k = ref_ghost_batch_norm(
        x, rm0, rv0, layer.weight.detach(), layer.bias.detach(), B, 0.3, 1e-5, mode
    )
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.running_mean, rm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_var, rv, rtol=1e-12, atol=1e-12)
    assert layer.num_batches_tracked.item() == k


def test_ghost_fp32_matches_oracle_and_grads_match_autograd_through_oracle():
    N, C, B = 14, 4, 4
    x = _randn((N, C, 3, 3), F32, seed=2)
    dy = _randn((N, C, 3, 3), F32, seed=3)
    layer = _set_affine(GhostBatchNorm2d(C, ghost_batch_size=B), C)
    xs = x.clone().requires_grad_()
    y = layer(xs)
    gx, gw, gb = torch.autograd.grad(y, (xs, layer.weight, layer.bias), dy)
    x64 = x.double().requires_grad_()
    w64 = layer.weight.detach().double().requires_grad_()
    b64 = layer.bias.detach().double().requires_grad_()
    want = torch.cat([ref_bn_train(x64[i : i + B], w64, b64, 1e-5)[0] for i in range(0, N, B)])
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    rx, rw, rb = torch.autograd.grad(want, (x64, w64, b64), dy.double())
    for got, ref in ((gx, rx), (gw, rw), (gb, rb)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


def test_ghost_gradcheck_fp64():
    x = _randn((7, 2, 3), F64, seed=4).requires_grad_()
    w = torch.tensor([1.3, -0.7], dtype=F64, requires_grad=True)
    b = torch.tensor([0.2, 0.1], dtype=F64, requires_grad=True)
    assert gradcheck(
        lambda x, w, b: nkf.ghost_batch_norm(x, None, None, w, b, True, ghost_batch_size=3).output, (x, w, b)
    )


def test_ghost_size_n_equals_torch_bn_including_grads():
    x = _randn((8, 3, 5, 5), seed=5)
    ours = GhostBatchNorm2d(3, ghost_batch_size=8)
    ref = torch.nn.BatchNorm2d(3)
    ours.load_state_dict(ref.state_dict())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    dy = _randn(x.shape, seed=6)
    torch.testing.assert_close(
        torch.autograd.grad(ya, xa, dy)[0], torch.autograd.grad(yb, xb, dy)[0], rtol=1e-4, atol=1e-5
    )


def test_each_chunk_equals_torch_bn_on_that_chunk_alone():
    N, B = 11, 4
    x = _randn((N, 3, 6), seed=7)
    layer = _set_affine(GhostBatchNorm1d(3, ghost_batch_size=B), 3)
    y = layer(x)
    for i in range(0, N, B):
        ref = TF.batch_norm(x[i : i + B], None, None, layer.weight, layer.bias, training=True)
        torch.testing.assert_close(y[i : i + B], ref, rtol=1e-5, atol=1e-5)


def test_ghost_per_chunk_equals_sequential_torch_bn_updates_including_cumulative():
    N, B = 10, 3
    x = _randn((N, 2, 4), seed=8)
    for momentum in (0.2, None):
        layer = GhostBatchNorm1d(2, ghost_batch_size=B, momentum=momentum)
        ref = torch.nn.BatchNorm1d(2, momentum=momentum)
        for _ in range(2):  # two steps: the cumulative average must continue from the counter
            layer(x)
            for i in range(0, N, B):
                ref(x[i : i + B])
        torch.testing.assert_close(layer.running_mean, ref.running_mean)
        torch.testing.assert_close(layer.running_var, ref.running_var)
        assert layer.num_batches_tracked.item() == ref.num_batches_tracked.item() == 8


def test_ghost_eval_uses_running_stats_for_any_batch_size():
    layer = _set_stats(_set_affine(GhostBatchNorm2d(3, ghost_batch_size=4), 3), 3).eval()
    ref = torch.nn.BatchNorm2d(3).eval()
    ref.load_state_dict(layer.state_dict())
    for N in (1, 3, 9):
        x = _randn((N, 3, 2, 2), seed=N)
        torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-6)
    assert layer.num_batches_tracked.item() == 0


def test_ghost_without_running_stats_uses_whole_batch_in_eval():
    layer = GhostBatchNorm1d(3, ghost_batch_size=2, track_running_stats=False).eval()
    x = _randn((6, 3), seed=9)
    torch.testing.assert_close(layer(x), TF.batch_norm(x, None, None, training=True), rtol=1e-5, atol=1e-5)


def test_ghost_keeps_channels_last_in_output_and_grad():
    x = _randn((10, 3, 4, 4), seed=10).to(memory_format=torch.channels_last).requires_grad_()
    layer = GhostBatchNorm2d(3, ghost_batch_size=4)
    y = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    (g,) = torch.autograd.grad(y, x, torch.randn_like(y))
    assert g.is_contiguous(memory_format=torch.channels_last)
    ref = GhostBatchNorm2d(3, ghost_batch_size=4)(x.detach().contiguous())
    torch.testing.assert_close(y, ref)


def test_ghost_is_vectorised_two_core_calls_at_most(monkeypatch):
    import importlib

    gbn_mod = importlib.import_module("normkit.functional.ghost_batch_norm")  # the module, not the function

    calls = []
    real = gbn_mod.norm

    def counting(*a, **k):
        calls.append(tuple(k.get("view") or a[0].shape))
        return real(*a, **k)

    monkeypatch.setattr(gbn_mod, "norm", counting)
    GhostBatchNorm1d(2, ghost_batch_size=3)(_randn((101, 2), seed=11))
    # 101 = 33 * 3 + 2: the 33 full chunks in one call whose sets are those of a (33, 3, 2) view, the
    # ragged 2 in another.
    assert calls == [(33, 3, 2), (2, 2)]


def test_ghost_state_dict_with_torch_bn_both_ways_and_serialization():
    ref = torch.nn.BatchNorm2d(3)
    ref(_randn((6, 3, 2, 2), seed=12))
    layer = GhostBatchNorm2d(3, ghost_batch_size=2)
    layer.load_state_dict(ref.state_dict())
    layer(_randn((6, 3, 2, 2), seed=13))
    back = torch.nn.BatchNorm2d(3)
    back.load_state_dict(layer.state_dict())
    assert torch.equal(back.running_var, layer.running_var)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer)), _roundtrip(layer)):
        assert clone.ghost_batch_size == 2 and clone.momentum_mode == "per_chunk"
        x = _randn((6, 3, 2, 2), seed=14)
        torch.testing.assert_close(clone.eval()(x), layer.eval()(x), rtol=0, atol=0)


def test_ghost_errors():
    with pytest.raises(ValueError, match="ghost_batch_size must be a positive int, got 0"):
        GhostBatchNorm1d(3, ghost_batch_size=0)
    with pytest.raises(ValueError, match="momentum_mode must be 'per_chunk' or 'averaged', got 'mean'"):
        GhostBatchNorm1d(3, momentum_mode="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"last ghost chunk has 1 sample.*N=9, ghost_batch_size=4"):
        GhostBatchNorm1d(3, ghost_batch_size=4)(torch.randn(9, 3))
    with pytest.raises(ValueError, match="expected 4 channels"):
        GhostBatchNorm2d(4, ghost_batch_size=2)(torch.randn(4, 3, 2, 2))
    with pytest.raises(ValueError, match="expected 4D input"):
        GhostBatchNorm2d(3)(torch.randn(4, 3))
    assert isinstance(normkit.create_norm_layer("gbn:4", 8), GhostBatchNorm2d)
    assert normkit.create_norm_layer("gbn:4", 8).ghost_batch_size == 4


# =============================================================================================
# Batch Renorm
# =============================================================================================


@pytest.mark.parametrize("r_max,d_max", [(1.5, 0.3), (3.0, 5.0), (1.01, 0.0)])
def test_renorm_forward_stats_and_grads_match_ioffe_oracle(r_max, d_max):
    C = 4
    x = _randn((10, C, 3), F64, seed=20, offset=0.5, scale=2.0)
    layer = _set_stats(
        _set_affine(BatchRenorm1d(C, r_max=r_max, d_max=d_max, momentum=0.2, dtype=F64), C, F64), C, F64
    )
    rm0, rv0 = layer.running_mean.clone(), layer.running_var.clone()
    xs = x.clone().requires_grad_()
    y = layer(xs)
    w64 = layer.weight.detach().clone().requires_grad_()
    b64 = layer.bias.detach().clone().requires_grad_()
    x64 = x.clone().requires_grad_()
    want, rm, rv, r, d = ref_batch_renorm(x64, rm0, rv0, w64, b64, r_max, d_max, 0.2, 1e-5)
    assert (r != 1).any() or r_max == 1.01  # the correction is really active
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.running_mean, rm)
    torch.testing.assert_close(layer.running_var, rv)
    dy = _randn(x.shape, F64, seed=21)
    got = torch.autograd.grad(y, (xs, layer.weight, layer.bias), dy)
    ref = torch.autograd.grad(want, (x64, w64, b64), dy)
    for g, rr in zip(got, ref):
        torch.testing.assert_close(g, rr, rtol=1e-9, atol=1e-9)


def test_renorm_gradients_do_not_flow_through_r_and_d():
    C = 3
    x = _randn((8, C), F64, seed=22, offset=1.0, scale=3.0)
    rm, rv = torch.zeros(C, dtype=F64), torch.ones(C, dtype=F64)
    xs = x.clone().requires_grad_()
    y = nkf.batch_renorm(xs, rm, rv, training=True, r_max=5.0, d_max=5.0).output
    dy = _randn(x.shape, F64, seed=23)
    (g,) = torch.autograd.grad(y, xs, dy)
    # Oracle: BN's backward with constant scale r (no d term): dx = r * BN_backward.
    xb = x.clone().requires_grad_()
    mu = xb.mean(0)
    var = ((xb - mu) ** 2).mean(0)
    sigma = torch.sqrt(var + 1e-5)
    r = (sigma / torch.sqrt(rv + 1e-5)).clamp(0.2, 5.0)
    d = ((mu - rm) / torch.sqrt(rv + 1e-5)).clamp(-5.0, 5.0)
    y_detached = (xb - mu) / sigma * r.detach() + d.detach()
    (g_det,) = torch.autograd.grad(y_detached, xb, dy, retain_graph=True)
    torch.testing.assert_close(g, g_det, rtol=1e-10, atol=1e-10)
    (g_through,) = torch.autograd.grad((xb - mu) / sigma * r + d, xb, dy)
    assert not torch.allclose(g, g_through, atol=1e-3)  # the detach matters here


def test_renorm_with_r_max_1_d_max_0_equals_torch_bn():
    x = _randn((6, 3, 4, 4), seed=24, offset=2.0)
    layer = BatchRenorm2d(3, r_max=1.0, d_max=0.0)
    ref = torch.nn.BatchNorm2d(3)
    _set_affine(layer, 3)
    ref.load_state_dict(layer.state_dict())
    for step in range(3):
        xa, xb = (x + step).requires_grad_(), (x + step).requires_grad_()
        ya, yb = layer(xa), ref(xb)
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
        dy = torch.ones_like(ya)
        ga = torch.autograd.grad(ya, (xa, layer.weight, layer.bias), dy * x)
        gb = torch.autograd.grad(yb, (xb, ref.weight, ref.bias), dy * x)
        for u, v in zip(ga, gb):
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.running_mean, ref.running_mean)
    torch.testing.assert_close(layer.running_var, ref.running_var)
    layer.eval(), ref.eval()
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)


def test_renorm_warmup_schedule_ramps_limits_linearly():
    layer = BatchRenorm1d(2, r_max=3.0, d_max=5.0, warmup_steps=4)
    seen = []
    for t in range(6):
        layer.num_batches_tracked.fill_(t)
        r, d = layer.current_limits()
        seen.append((round(r.item(), 6), round(d.item(), 6)))
    assert seen == [(1.0, 0.0), (1.5, 1.25), (2.0, 2.5), (2.5, 3.75), (3.0, 5.0), (3.0, 5.0)]
    # At step 2 the forward uses (2.0, 2.5): compare with the oracle at those limits.
    x = _randn((8, 2), F64, seed=25, offset=3.0, scale=4.0)
    layer = _set_stats(BatchRenorm1d(2, r_max=3.0, d_max=5.0, warmup_steps=4, dtype=F64), 2, F64)
    layer.num_batches_tracked.fill_(2)
    want = ref_batch_renorm(x, layer.running_mean, layer.running_var, None, None, 2.0, 2.5, 0.1, 1e-5)
    torch.testing.assert_close(layer(x), want[0], rtol=1e-10, atol=1e-10)
    assert layer.num_batches_tracked.item() == 3


def test_renorm_gradcheck_fp64_where_r_and_d_are_clipped():
    # r and d get no gradient by design, so finite differences agree with the analytic gradient
    # only where they are locally constant: both clipped (running var huge, running mean far away).
    x = _randn((6, 2, 2), F64, seed=26, offset=1.0).requires_grad_()
    w = torch.tensor([1.2, 0.8], dtype=F64, requires_grad=True)
    b = torch.tensor([0.1, -0.3], dtype=F64, requires_grad=True)
    rm, rv = torch.tensor([50.0, -50.0], dtype=F64), torch.tensor([400.0, 900.0], dtype=F64)
    assert gradcheck(
        lambda x, w, b: nkf.batch_renorm(x, rm, rv, w, b, training=True, r_max=2.0, d_max=1.0).output,
        (x, w, b),
    )


def test_renorm_state_dict_with_torch_bn_and_errors():
    ref = torch.nn.BatchNorm1d(3)
    ref(_randn((5, 3), seed=27))
    layer = BatchRenorm1d(3)
    layer.load_state_dict(ref.state_dict())
    torch.nn.BatchNorm1d(3).load_state_dict(layer.state_dict())
    clone = pickle.loads(pickle.dumps(layer))
    assert clone.r_max == 3.0 and torch.equal(clone.running_var, ref.running_var)
    with pytest.raises(ValueError, match="needs track_running_stats=True"):
        BatchRenorm1d(3, track_running_stats=False)
    with pytest.raises(ValueError, match="r_max must be a finite number >= 1.0, got 0.5"):
        BatchRenorm1d(3, r_max=0.5)
    with pytest.raises(ValueError, match="d_max must be a finite number >= 0.0, got -1"):
        BatchRenorm1d(3, d_max=-1)
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 0"):
        BatchRenorm1d(3, warmup_steps=-2)
    with pytest.raises(ValueError, match="running_mean and running_var are required"):
        nkf.batch_renorm(torch.randn(4, 3), None, None, training=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchRenorm1d(3)(torch.randn(1, 3))
    assert isinstance(normkit.create_norm_layer("brn", 8), BatchRenorm2d)


# =============================================================================================
# Frozen BN
# =============================================================================================


@pytest.mark.parametrize(
    "cls,shape,ref_cls",
    [
        (FrozenBatchNorm1d, (4, 3), torch.nn.BatchNorm1d),
        (FrozenBatchNorm2d, (4, 3, 5, 5), torch.nn.BatchNorm2d),
        (FrozenBatchNorm3d, (2, 3, 2, 3, 3), torch.nn.BatchNorm3d),
    ],
)
def test_frozen_equals_torch_bn_eval_in_train_mode_and_state_dict_both_ways(cls, shape, ref_cls):
    ref = _set_stats(_set_affine(ref_cls(3), 3), 3).eval()
    frozen = cls(3)
    frozen.load_state_dict(ref.state_dict())  # BN -> Frozen, strict
    frozen.train()
    assert frozen.training is False and list(frozen.parameters()) == []
    x = _randn(shape, seed=30)
    torch.testing.assert_close(frozen(x), ref(x), rtol=1e-5, atol=1e-6)
    back = ref_cls(3)
    back.load_state_dict(frozen.state_dict())  # Frozen -> BN, strict
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


def test_frozen_survives_parent_train_and_only_input_gets_gradients():
    frozen = _set_stats(_set_affine(FrozenBatchNorm1d(3), 3), 3)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), frozen)
    model.train()
    assert model.training and not frozen.training
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    x = _randn((5, 3), seed=31).requires_grad_()
    dy = _randn((5, 3), seed=32)
    (g,) = torch.autograd.grad(frozen(x), x, dy)
    torch.testing.assert_close(g, dy * frozen.weight / torch.sqrt(frozen.running_var + 1e-5))
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, before[k])


def test_frozen_switches():
    x = _randn((6, 3, 2), seed=33)
    base = _set_stats(_set_affine(torch.nn.BatchNorm1d(3, momentum=0.3), 3), 3)
    # use=False, update=False: batch statistics, buffers untouched.
    f = FrozenBatchNorm1d(3, momentum=0.3, use_running_stats=False)
    f.load_state_dict(base.state_dict())
    want = TF.batch_norm(x, None, None, base.weight, base.bias, training=True)
    torch.testing.assert_close(f(x), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(f.running_mean, base.running_mean) and f.num_batches_tracked.item() == 0
    # use=False, update=True: exactly a BN training step with a frozen affine.
    f = FrozenBatchNorm1d(3, momentum=0.3, use_running_stats=False, update_running_stats=True)
    f.load_state_dict(base.state_dict())
    ref = copy.deepcopy(base).train()
    torch.testing.assert_close(f(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f.running_var, ref.running_var)
    assert f.num_batches_tracked.item() == 1
    # use=True, update=True: output from the old running statistics, buffers then updated.
    f = FrozenBatchNorm1d(3, momentum=0.3, update_running_stats=True)
    f.load_state_dict(base.state_dict())
    want = copy.deepcopy(base).eval()(x)
    ref = copy.deepcopy(base).train()
    ref(x)
    torch.testing.assert_close(f(x), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f.running_mean, ref.running_mean)
    torch.testing.assert_close(f.running_var, ref.running_var)
    assert "update_running_stats=True" in repr(f)


def test_frozen_affine_false_and_serialization():
    ref = _set_stats(torch.nn.BatchNorm2d(3, affine=False), 3).eval()
    f = FrozenBatchNorm2d(3, affine=False)
    f.load_state_dict(ref.state_dict())
    x = _randn((2, 3, 3, 3), seed=34)
    torch.testing.assert_close(f(x), ref(x), rtol=1e-5, atol=1e-6)
    for clone in (copy.deepcopy(f), pickle.loads(pickle.dumps(f)), _roundtrip(f)):
        assert torch.equal(clone(x), f(x)) and clone.training is False
    assert isinstance(normkit.create_norm_layer("frozen_bn", 8), FrozenBatchNorm2d)
    with pytest.raises(ValueError, match="expected 4D input"):
        f(torch.randn(2, 3))


# =============================================================================================
# Mean-only BN
# =============================================================================================


def test_mean_only_forward_grads_running_mean_and_eval():
    C = 3
    x = _randn((6, C, 4), F64, seed=40, offset=5.0, scale=2.0)
    layer = MeanOnlyBatchNorm(C, momentum=0.25, dtype=F64)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.5, -1.0, 2.0], dtype=F64))
    xs = x.clone().requires_grad_()
    y = layer(xs)
    mu = x.mean((0, 2))
    torch.testing.assert_close(y, x - mu[:, None] + layer.bias.detach()[:, None], rtol=1e-12, atol=1e-12)
    dy = _randn(x.shape, F64, seed=41)
    gx, gb = torch.autograd.grad(y, (xs, layer.bias), dy)
    torch.testing.assert_close(gx, dy - dy.mean((0, 2), keepdim=True), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb, dy.sum((0, 2)))
    torch.testing.assert_close(layer.running_mean, 0.25 * mu)
    assert layer.num_batches_tracked.item() == 1
    layer.eval()
    x2 = _randn((2, C, 4), F64, seed=42)
    torch.testing.assert_close(layer(x2), x2 - layer.running_mean[:, None] + layer.bias.detach()[:, None])
    assert layer.num_batches_tracked.item() == 1


def test_mean_only_cumulative_state_dict_and_errors():
    layer = MeanOnlyBatchNorm(2, momentum=None)
    xs = [_randn((4, 2), seed=s) for s in (43, 44, 45)]
    for x in xs:
        layer(x)
    torch.testing.assert_close(layer.running_mean, torch.stack([x.mean(0) for x in xs]).mean(0))
    sd = layer.state_dict()
    assert sorted(sd) == ["bias", "num_batches_tracked", "running_mean"]
    other = MeanOnlyBatchNorm(2)
    other.load_state_dict(sd)
    assert torch.equal(other.running_mean, layer.running_mean)
    nostats = MeanOnlyBatchNorm(2, track_running_stats=False, bias=False).eval()
    x = _randn((4, 2), seed=46)
    torch.testing.assert_close(nostats(x), x - x.mean(0))
    with pytest.raises(ValueError, match="expected 2 channels"):
        layer(torch.randn(4, 3))
    with pytest.raises(ValueError, match="momentum must be a number in"):
        MeanOnlyBatchNorm(2, momentum=2.0)


# =============================================================================================
# Keras BatchNormalization
# =============================================================================================


@pytest.mark.parametrize("shape,axis", [((6, 4, 4, 3), -1), ((6, 3, 4, 4), 1), ((5, 3, 7), -2), ((8, 3), -1)])
def test_keras_bn_training_and_moving_stats_match_keras_formulas(shape, axis):
    C = shape[axis]
    layer = BatchNormalization(C, axis=axis, momentum=0.9, dtype=F64)
    with torch.no_grad():
        layer.gamma.copy_(torch.linspace(0.5, 1.5, C, dtype=F64))
        layer.beta.copy_(torch.linspace(-1, 1, C, dtype=F64))
    mm, mv = layer.moving_mean.clone(), layer.moving_variance.clone()
    for step in range(3):
        x = _randn(shape, F64, seed=50 + step, offset=step, scale=1 + step)
        y = layer(x)
        want, mm, mv = ref_keras_bn(
            x, axis, layer.gamma.detach(), layer.beta.detach(), mm, mv, 0.9, 1e-3, True
        )
        torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(layer.moving_mean, mm, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.moving_variance, mv, rtol=1e-12, atol=1e-12)
    layer.eval()
    x = _randn(shape, F64, seed=60)
    want, _, _ = ref_keras_bn(x, axis, layer.gamma.detach(), layer.beta.detach(), mm, mv, 0.9, 1e-3, False)
    torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-10)


def test_keras_bn_grads_match_autograd_through_keras_formulas():
    x = _randn((5, 4, 3), F64, seed=61, offset=2.0)
    layer = BatchNormalization(3, dtype=F64)
    xs = x.clone().requires_grad_()
    dy = _randn(x.shape, F64, seed=62)
    got = torch.autograd.grad(layer(xs), (xs, layer.gamma, layer.beta), dy)
    x64 = x.clone().requires_grad_()
    g = torch.ones(3, dtype=F64, requires_grad=True)
    b = torch.zeros(3, dtype=F64, requires_grad=True)
    want = ref_keras_bn(x64, -1, g, b, torch.zeros(3), torch.ones(3), 0.99, 1e-3, True)[0]
    ref = torch.autograd.grad(want, (x64, g, b), dy)
    for u, v in zip(got, ref):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)


def test_keras_bn_trainable_false_is_inference_mode_in_training():
    layer = BatchNormalization(3, momentum=0.5)
    x = _randn((8, 3), seed=63, offset=4.0)
    layer(x)  # one real training step so the moving statistics are not trivial
    layer.trainable = False
    assert not layer.gamma.requires_grad and not layer.beta.requires_grad
    before = (layer.moving_mean.clone(), layer.moving_variance.clone())
    layer.train()
    x2 = _randn((8, 3), seed=64)
    want = ref_keras_bn(x2, -1, layer.gamma.detach(), layer.beta.detach(), *before, 0.5, 1e-3, False)[0]
    torch.testing.assert_close(layer(x2).double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(layer.moving_mean, before[0]) and torch.equal(layer.moving_variance, before[1])
    layer.trainable = True
    assert layer.gamma.requires_grad
    assert BatchNormalization(3, trainable=False).get_config()["trainable"] is False


def test_keras_bn_center_scale_weights_api_and_state_dict():
    layer = BatchNormalization(4, center=False, scale=True)
    assert layer.beta is None and [w.shape for w in layer.get_weights()] == [(4,), (4,), (4,)]
    assert sorted(layer.state_dict()) == ["gamma", "moving_mean", "moving_variance"]
    x = _randn((6, 4), seed=65)
    y = layer(x)
    torch.testing.assert_close(
        y.double(),
        ref_keras_bn(x, -1, torch.ones(4), None, torch.zeros(4), torch.ones(4), 0.99, 1e-3, True)[0],
        rtol=1e-5,
        atol=1e-5,
    )
    other = BatchNormalization(4, center=False)
    other.set_weights(layer.get_weights())
    for a, b in zip(other.get_weights(), layer.get_weights()):
        assert (a == b).all()
    assert layer.get_config() == {
        "axis": -1,
        "momentum": 0.99,
        "epsilon": 1e-3,
        "center": False,
        "scale": True,
        "trainable": True,
    }
    clone = pickle.loads(pickle.dumps(layer))
    assert torch.equal(clone.moving_variance, layer.moving_variance)


def test_keras_bn_errors():
    with pytest.raises(ValueError, match="axis=3 is out of range for an input of shape"):
        BatchNormalization(3, axis=3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="expected 3 features along axis -1, got input of shape .* with 5"):
        BatchNormalization(3)(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="momentum must be a number in"):
        BatchNormalization(3, momentum=1.5)
    with pytest.raises(ValueError, match="epsilon|eps must be a finite number"):
        BatchNormalization(3, epsilon=-1.0)
    with pytest.raises(ValueError, match="expected 4 arrays"):
        BatchNormalization(3).set_weights([torch.zeros(3)])
    with pytest.raises(ValueError, match="more than 1 value per feature"):
        BatchNormalization(3)(torch.randn(1, 3))
    with pytest.raises(TypeError, match="floating-point"):
        BatchNormalization(3)(torch.ones(2, 3, dtype=torch.long))


# =============================================================================================
# Shared edge cases: mixed precision, empty batches, eval never writes, flags flipped later
# =============================================================================================


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: GhostBatchNorm2d(3, ghost_batch_size=3), (7, 3, 4, 4)),
        (lambda: BatchRenorm2d(3, r_max=2.0, d_max=1.0), (6, 3, 4, 4)),
        (lambda: BatchNormalization(3, axis=1), (6, 3, 4, 4)),
        (lambda: MeanOnlyBatchNorm(3), (6, 3, 4, 4)),
        (lambda: FrozenBatchNorm2d(3, use_running_stats=False), (6, 3, 4, 4)),
    ],
)
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_inputs_keep_dtype_fp32_buffers_and_match_fp32(make, shape, half):
    x = _randn(shape, seed=80, offset=1.0).to(half)
    a, b = make(), make()
    y_half, y_ref = a(x), b(x.float())
    assert y_half.dtype == half
    assert all(t.dtype == torch.float32 for t in a.state_dict().values() if t.is_floating_point())
    tol = 1e-2 if half == torch.float16 else 5e-2
    torch.testing.assert_close(y_half.float(), y_ref, rtol=tol, atol=tol)
    for k, v in b.state_dict().items():
        torch.testing.assert_close(a.state_dict()[k].float(), v.float(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "make",
    [
        lambda: GhostBatchNorm1d(3, ghost_batch_size=2),
        lambda: BatchRenorm1d(3),
    ],
)
def test_empty_batch_and_eval_never_writes(make):
    layer = _set_stats(_set_affine(make(), 3), 3)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.zeros(0, 3, 4, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 3, 4)
    gw, gb = torch.autograd.grad(y.sum(), (layer.weight, layer.bias), allow_unused=True)
    assert (gw is None or torch.all(gw == 0)) and (gb is None or torch.all(gb == 0))
    layer.eval()
    layer(_randn((5, 3, 4), seed=81))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_ghost_track_running_stats_flipped_later_leaves_buffers_alone():
    layer = GhostBatchNorm1d(3, ghost_batch_size=2)
    layer.track_running_stats = False
    x = _randn((6, 3), seed=82)
    y = layer(x)
    torch.testing.assert_close(y[:2], TF.batch_norm(x[:2], None, None, training=True), rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.running_mean, torch.zeros(3)) and layer.num_batches_tracked.item() == 0
    layer.eval()
    torch.testing.assert_close(layer(x), TF.batch_norm(x, None, None, training=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d])
def test_frozen_bn_updating_its_statistics_backpropagates_through_the_old_ones(cls):
    """``use_running_stats=True, update_running_stats=True``: the output normalizes with the statistics
    before this batch (its gradient too: dx = dy * w / sqrt(var + eps)), then the buffers take the
    batch's (momentum 0.1, unbiased variance). The backward once failed: the update wrote the buffers
    the output's backward had saved."""
    torch.manual_seed(0)
    rank = {FrozenBatchNorm1d: 1, FrozenBatchNorm2d: 2, FrozenBatchNorm3d: 3}[cls]
    m = cls(3, use_running_stats=True, update_running_stats=True).double()
    with torch.no_grad():
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    x = torch.randn(4, 3, *([3] * rank), dtype=torch.float64, requires_grad=True)
    view = (1, 3) + (1,) * rank
    y = m(x)
    want = (x - rm.view(view)) / (rv.view(view) + m.eps).sqrt() * m.weight.view(view) + m.bias.view(view)
    torch.testing.assert_close(y, want)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    torch.testing.assert_close(dx, dy * (m.weight / (rv + m.eps).sqrt()).view(view))
    dims = (0, *range(2, x.dim()))
    torch.testing.assert_close(m.running_mean, 0.9 * rm + 0.1 * x.detach().mean(dims))
    torch.testing.assert_close(m.running_var, 0.9 * rv + 0.1 * x.detach().var(dims, unbiased=True))


def test_ghost_batches_of_one_sample_without_spatial_dims_are_refused():
    """One value per channel in every ghost batch: an error naming the fix (the layer returned zeros and
    skipped its update), as BatchNorm refuses one value per channel."""
    with pytest.raises(normkit.NormError, match="ghost_batch_size of at least 2"):
        GhostBatchNorm1d(3, ghost_batch_size=1)(torch.randn(4, 3))
    y = GhostBatchNorm1d(3, ghost_batch_size=1)(torch.randn(4, 3, 5))  # (5 values a channel: fine)
    assert torch.isfinite(y).all() and y.abs().sum() > 0
