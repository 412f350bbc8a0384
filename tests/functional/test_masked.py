"""Masked batch/layer/group/instance norm (issue 6.7) against a float64 per-set oracle and torch BN
on the compacted valid tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from torch.autograd import gradcheck, gradgradcheck

import normkit
import normkit.functional as nkf
from tests.reference_family import ref_masked_channel_stats, ref_masked_norm

F32, F64 = torch.float32, torch.float64


def _randn(shape, dtype=F32, seed=0, offset=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (offset + scale * torch.randn(shape, generator=g, dtype=F64)).to(dtype)


def _mask(shape, seed=0, p=0.6):
    g = torch.Generator().manual_seed(seed + 100)
    return torch.rand(shape, generator=g) < p


def _wb(C, dtype=F32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        (1 + 0.5 * torch.randn(C, generator=g, dtype=F64)).to(dtype),
        (0.5 * torch.randn(C, generator=g, dtype=F64)).to(dtype),
    )


def _view(p, nd, axis=1):
    shape = [1] * nd
    shape[axis] = -1
    return p.reshape(shape)


# --- the four ops, forward, against the per-set oracle ---------------------------------------

CASES = [
    # name, x shape, mask shape
    ("bn", (5, 3, 7), (5, 1, 7)),
    ("bn", (4, 3, 5, 6), (4, 1, 5, 6)),
    ("bn", (4, 3, 5, 6), (4, 3, 5, 6)),
    ("ln", (3, 6, 8), (3, 6, 1)),
    ("ln", (3, 6, 8), (3, 6, 8)),
    ("gn", (3, 6, 5, 4), (3, 1, 5, 4)),
    ("gn", (3, 6, 10), (3, 6, 10)),
    ("in", (3, 4, 9), (3, 1, 9)),
    ("in", (2, 4, 5, 5), (2, 4, 5, 5)),
]


def _run(name, x, mask, w, b, eps=1e-5):
    """normkit op and the oracle's (dims, weight view, bias view) for it."""
    nd = x.dim()
    if name == "bn":
        y = nkf.batch_norm(x, None, None, w, b, training=True, eps=eps, mask=mask).output
        return y, (0, *range(2, nd)), _view(w, nd), _view(b, nd)
    if name == "ln":
        y = nkf.layer_norm(x, x.shape[-1], w, b, eps, mask=mask)
        return y, (nd - 1,), w, b
    if name == "gn":
        G = 2
        y = nkf.group_norm(x, G, w, b, eps, mask=mask)
        return y, None, _view(w, nd), _view(b, nd)
    y = nkf.instance_norm(x, None, None, w, b, eps=eps, mask=mask).output
    return y, tuple(range(2, nd)), _view(w, nd), _view(b, nd)


def _oracle(name, x, mask, dims, wv, bv, eps=1e-5):
    if name != "gn":
        return ref_masked_norm(x, mask, dims, wv, bv, eps)
    N, C = x.shape[:2]
    xg = x.reshape(N, 2, C // 2, *x.shape[2:])
    mg = mask.expand(x.shape).reshape(xg.shape)
    xhat = ref_masked_norm(xg, mg, tuple(range(2, xg.dim())), None, None, eps).reshape(x.shape)
    return xhat * wv.to(F64) + bv.to(F64)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("name,xshape,mshape", CASES)
def test_forward_matches_per_set_oracle(name, xshape, mshape, dtype):
    x = _randn(xshape, dtype, seed=3)
    mask = _mask(mshape, seed=4)
    C = xshape[-1] if name == "ln" else xshape[1]
    w, b = _wb(C, dtype)
    y, dims, wv, bv = _run(name, x, mask, w, b)
    assert y.dtype == dtype and y.shape == x.shape
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == F32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y.to(F64), _oracle(name, x, mask, dims, wv, bv), **tol)


GRAD_CASES = [
    ("bn", (4, 2, 5), (4, 1, 5)),
    ("bn", (3, 2, 2, 3), (3, 2, 2, 3)),
    ("ln", (3, 2, 6), (3, 2, 1)),
    ("gn", (2, 4, 2, 3), (2, 1, 2, 3)),
    ("in", (2, 2, 6), (2, 2, 6)),
]


@pytest.mark.parametrize("name,xshape,mshape", GRAD_CASES)
def test_gradcheck_and_gradgradcheck_fp64(name, xshape, mshape):
    x = _randn(xshape, F64, seed=5).requires_grad_()
    mask = _mask(mshape, seed=6)
    C = xshape[-1] if name == "ln" else xshape[1]
    w, b = (t.requires_grad_() for t in _wb(C, F64))

    def f(x, w, b):
        return _run(name, x, mask, w, b)[0]

    assert gradcheck(f, (x, w, b))
    assert gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("name,xshape,mshape", CASES)
def test_fp32_grads_match_autograd_through_oracle(name, xshape, mshape):
    x = _randn(xshape, F32, seed=7)
    mask = _mask(mshape, seed=8)
    C = xshape[-1] if name == "ln" else xshape[1]
    w, b = _wb(C, F32)
    dy = _randn(xshape, F32, seed=9)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    y, dims, _, _ = _run(name, xs, mask, ws, bs)
    got = torch.autograd.grad(y, (xs, ws, bs), dy)
    x64, w64, b64 = (t.to(F64).requires_grad_() for t in (x, w, b))
    nd = x.dim()
    wv, bv = (w64, b64) if name == "ln" else (_view(w64, nd), _view(b64, nd))
    want = torch.autograd.grad(_oracle(name, x64, mask, dims, wv, bv), (x64, w64, b64), dy.to(F64))
    for g, r in zip(got, want):
        torch.testing.assert_close(g.to(F64), r, rtol=1e-4, atol=1e-4)
    # Padded positions get no gradient.
    if name in ("bn", "in"):
        assert torch.all(got[0][~mask.expand(x.shape)] == 0)


# --- torch BN on the compacted tokens is an independent oracle for padded sequences -------------


@pytest.mark.parametrize("unbiased", [True, False])
def test_padded_sequence_bn_equals_torch_bn_on_valid_tokens(unbiased):
    N, C, L = 4, 5, 9
    x = _randn((N, C, L), seed=10)
    lengths = torch.tensor([9, 3, 6, 1])
    mask = (torch.arange(L)[None, :] < lengths[:, None])[:, None, :]  # (N, 1, L)
    w, b = _wb(C)
    rm, rv = torch.linspace(-1, 1, C), torch.linspace(0.5, 2, C)
    nbt = torch.tensor(3)
    out = nkf.batch_norm(
        x,
        rm,
        rv,
        w,
        b,
        training=True,
        momentum=0.2,
        num_batches_tracked=nbt,
        unbiased_running_var=unbiased,
        mask=mask,
    )
    tokens = x.permute(0, 2, 1)[mask[:, 0, :]]  # (K, C): the valid tokens only
    t_rm, t_rv = rm.clone(), rv.clone()
    ref = TF.batch_norm(tokens, t_rm, t_rv, w, b, training=True, momentum=0.2)
    got_tokens = out.output.permute(0, 2, 1)[mask[:, 0, :]]
    torch.testing.assert_close(got_tokens, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.running_mean, t_rm)
    if unbiased:
        torch.testing.assert_close(out.running_var, t_rv)
    else:
        K = tokens.shape[0]
        biased = (1 - 0.2) * rv + 0.2 * tokens.var(0, unbiased=True) * (K - 1) / K  # ok
        torch.testing.assert_close(out.running_var, biased)
    assert out.num_batches_tracked.item() == 4
    # Padded positions output the bias.
    pad = ~mask.expand(x.shape)
    torch.testing.assert_close(out.output[pad], b[:, None].expand(C, L).unsqueeze(0).expand(N, C, L)[pad])


def test_all_masked_channel_keeps_running_stats_and_outputs_bias():
    N, C, L = 3, 4, 5
    x = _randn((N, C, L), seed=11)
    mask = torch.ones(N, C, L, dtype=torch.bool)
    mask[:, 2] = False  # channel 2 fully masked
    mask[:, 3] = False
    mask[0, 3, 0] = True  # channel 3: a single valid value -> no unbiased variance
    w, b = _wb(C)
    rm, rv, nbt = torch.linspace(-1, 1, C), torch.linspace(0.5, 2, C), torch.tensor(0)
    out = nkf.batch_norm(x, rm, rv, w, b, training=True, num_batches_tracked=nbt, mask=mask)
    assert torch.equal(out.output[:, 2], b[2].expand(N, L))
    assert torch.equal(out.output[:, 3], b[3].expand(N, L))  # one value: x_hat = 0
    assert torch.equal(out.running_mean[2:], rm[2:]) and torch.equal(out.running_var[2:], rv[2:])
    mean, var, cnt = ref_masked_channel_stats(x, mask)
    torch.testing.assert_close(out.running_mean[:2].double(), 0.9 * rm[:2].double() + 0.1 * mean[:2])
    torch.testing.assert_close(
        out.running_var[:2].double(), 0.9 * rv[:2].double() + 0.1 * var[:2] * cnt[:2] / (cnt[:2] - 1)
    )
    assert out.num_batches_tracked.item() == 1


@pytest.mark.parametrize("bias", [True, False])
def test_eps_zero_constant_set_pads_with_the_bias_not_nan(bias):
    """eps=0 and a set whose valid values are all equal: its valid positions are 0 / 0 (NaN, as
    torch's norms give for a constant input at eps=0), but its padded positions output the bias as
    everywhere else, not 0 * inf."""
    x = torch.tensor([[[1.0, 1.0, 50.0], [2.0, 3.0, 2.0]]])
    mask = torch.tensor([[[True, True, False], [True, True, True]]])
    b = torch.tensor([0.5, -0.25]) if bias else None
    y, *_ = nkf.masked_norm(x, mask, (2,), None, None if b is None else b.view(1, 2, 1), eps=0.0)
    assert torch.isnan(y[0, 0, :2]).all()
    assert y[0, 0, 2].item() == (0.5 if bias else 0.0)
    want = (x[0, 1] - x[0, 1].mean()) / x[0, 1].var(unbiased=False).sqrt() + (-0.25 if bias else 0.0)
    torch.testing.assert_close(y[0, 1], want)
    assert TF.layer_norm(torch.ones(1, 2), (2,), eps=0.0).isnan().all()  # (torch's, for the valid ones)


def test_fully_masked_batch_changes_nothing_and_grads_are_zero():
    x = _randn((3, 4, 5), seed=12).requires_grad_()
    w, b = (t.requires_grad_() for t in _wb(4))
    mask = torch.zeros(3, 1, 5, dtype=torch.bool)
    rm, rv, nbt = torch.linspace(-1, 1, 4), torch.linspace(0.5, 2, 4), torch.tensor(7)
    for momentum in (0.1, None):
        out = nkf.batch_norm(
            x, rm, rv, w, b, training=True, momentum=momentum, num_batches_tracked=nbt, mask=mask
        )
        assert torch.equal(out.running_mean, rm) and torch.equal(out.running_var, rv)
        assert out.num_batches_tracked.item() == 7
        assert torch.equal(out.output, b.detach()[None, :, None].expand(3, 4, 5))
    gx, gw, gb = torch.autograd.grad(out.output.sum(), (x, w, b))
    assert torch.all(gx == 0) and torch.all(gw == 0)
    torch.testing.assert_close(gb, torch.full((4,), 15.0))
    for y in (nkf.group_norm(x, 2, w, b, mask=mask), nkf.layer_norm(x, 5, None, None, mask=mask)):
        assert torch.isfinite(y).all()


def test_all_true_mask_equals_unmasked_torch_ops():
    x = _randn((4, 6, 5, 3), seed=13)
    w, b = _wb(6)
    ones = torch.ones(1, dtype=torch.bool)
    rm, rv = torch.zeros(6), torch.ones(6)
    t_rm, t_rv = rm.clone(), rv.clone()
    out = nkf.batch_norm(x, rm, rv, w, b, training=True, mask=ones)
    torch.testing.assert_close(
        out.output, TF.batch_norm(x, t_rm, t_rv, w, b, training=True), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(out.running_var, t_rv)
    torch.testing.assert_close(
        nkf.group_norm(x, 3, w, b, mask=ones), TF.group_norm(x, 3, w, b), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(nkf.layer_norm(x, 3, mask=ones), TF.layer_norm(x, (3,)), rtol=1e-5, atol=1e-5)
    t_rm, t_rv = rm.clone(), rv.clone()
    ins = nkf.instance_norm(x, rm, rv, w, b, mask=ones)
    torch.testing.assert_close(ins.output, TF.instance_norm(x, t_rm, t_rv, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ins.running_mean, t_rm)
    torch.testing.assert_close(ins.running_var, t_rv)


def test_instance_norm_running_stats_average_valid_instances():
    N, C, L = 4, 3, 6
    x = _randn((N, C, L), F64, seed=14)
    mask = _mask((N, C, L), seed=15, p=0.5)
    mask[1, 0] = False  # an empty instance
    mask[2, 0] = False
    mask[2, 0, 1] = True  # a one-value instance
    rm, rv = torch.zeros(C, dtype=F64), torch.ones(C, dtype=F64)
    out = nkf.instance_norm(x, rm, rv, momentum=0.5, mask=mask)
    want_m, want_v = [], []
    for c in range(C):
        ms, vs = [], []
        for n in range(N):
            v = x[n, c][mask[n, c]]
            if v.numel() >= 2:
                ms.append(v.mean())
                vs.append(v.var())  # ok: oracle, unbiased per instance
        want_m.append(torch.stack(ms).mean())
        want_v.append(torch.stack(vs).mean())
    torch.testing.assert_close(out.running_mean, 0.5 * torch.stack(want_m))
    torch.testing.assert_close(out.running_var, 0.5 + 0.5 * torch.stack(want_v))


def test_nan_and_inf_padding_is_harmless():
    x = _randn((3, 4, 6), seed=16)
    mask = _mask((3, 1, 6), seed=17)
    mask[0, 0, 0] = True
    xp = x.clone()
    xp[~mask.expand(x.shape)] = float("nan")
    xp[0, 0, -1] = float("inf") if not mask[0, 0, -1] else xp[0, 0, -1]
    xs = xp.clone().requires_grad_()
    for f in (
        lambda t: nkf.batch_norm(t, training=True, mask=mask).output,
        lambda t: nkf.group_norm(t, 2, mask=mask),
        lambda t: nkf.instance_norm(t, mask=mask).output,
        lambda t: nkf.layer_norm(t.transpose(1, 2), 4, mask=mask.transpose(1, 2)),
    ):
        y = f(xs)
        assert torch.isfinite(y).all()
        (g,) = torch.autograd.grad(y.square().sum(), xs)
        assert torch.isfinite(g).all()
    torch.testing.assert_close(
        nkf.batch_norm(xp, training=True, mask=mask).output,
        nkf.batch_norm(x, training=True, mask=mask).output,
    )


def test_large_offset_fp32_matches_oracle():
    x = _randn((6, 3, 40), F32, seed=18, offset=1e4, scale=1e-1)
    mask = _mask((6, 1, 40), seed=19)
    y = nkf.batch_norm(x, training=True, mask=mask).output
    want = ref_masked_norm(x, mask, (0, 2), None, None, 1e-5)
    torch.testing.assert_close(y.double(), want, rtol=1e-3, atol=2e-3)
    m = mask.expand(x.shape)
    assert abs(y[m].double().mean().item()) < 1e-3


def test_eval_mode_uses_running_stats_and_bias_at_padding():
    x = _randn((3, 4, 5), seed=20)
    mask = _mask((3, 1, 5), seed=21)
    w, b = _wb(4)
    rm, rv = torch.linspace(-1, 1, 4), torch.linspace(0.5, 2, 4)
    y = nkf.batch_norm(x, rm, rv, w, b, training=False, mask=mask).output
    want = (x.double() - rm.double()[:, None]) / torch.sqrt(rv.double()[:, None] + 1e-5) * w.double()[
        :, None
    ] + b.double()[:, None]
    m = mask.expand(x.shape)
    torch.testing.assert_close(y.double()[m], want[m])
    assert torch.equal(y[~m], b[None, :, None].expand(3, 4, 5)[~m])
    yi = nkf.instance_norm(x, rm, rv, w, b, use_input_stats=False, mask=mask).output
    torch.testing.assert_close(yi, y)


# --- modules -----------------------------------------------------------------------------------


def test_modules_accept_mask_and_match_oracle():
    x = _randn((4, 6, 7), seed=22)
    mask = _mask((4, 1, 7), seed=23)
    bn = normkit.nn.BatchNorm1d(6)
    y = bn(x, mask=mask)
    torch.testing.assert_close(
        y.double(), ref_masked_norm(x, mask, (0, 2), None, None, 1e-5), rtol=1e-5, atol=1e-5
    )
    mean, var, cnt = ref_masked_channel_stats(x, mask)
    torch.testing.assert_close(bn.running_mean.double(), 0.1 * mean)
    torch.testing.assert_close(bn.running_var.double(), 0.9 + 0.1 * var * cnt / (cnt - 1))
    gn = normkit.nn.GroupNorm(3, 6)
    want_gn = ref_masked_norm(
        x.reshape(4, 3, 2, 7), mask[:, None].expand(4, 3, 2, 7), (2, 3), None, None, 1e-5
    )
    torch.testing.assert_close(gn(x, mask=mask).double(), want_gn.reshape(x.shape), rtol=1e-5, atol=1e-5)
    inn = normkit.nn.InstanceNorm1d(6, track_running_stats=True)
    torch.testing.assert_close(
        inn(x, mask=mask).double(), ref_masked_norm(x, mask, (2,), None, None, 1e-5), rtol=1e-5, atol=1e-5
    )
    # Unbatched input with an unbatched mask.
    torch.testing.assert_close(inn(x[0], mask=mask[0]), inn(x[:1], mask=mask[:1])[0])
    ln = normkit.nn.LayerNorm(7)
    torch.testing.assert_close(
        ln(x, mask=mask).double(), ref_masked_norm(x, mask, (2,), None, None, 1e-5), rtol=1e-5, atol=1e-5
    )


# --- bad input -----------------------------------------------------------------------------------


def test_mask_errors_are_typed_and_name_the_shapes():
    x = torch.randn(4, 3, 5)
    with pytest.raises(TypeError, match="torch.bool"):
        nkf.batch_norm(x, training=True, mask=torch.ones(4, 1, 5))
    with pytest.raises(TypeError, match="bool Tensor or None"):
        nkf.group_norm(x, 3, mask=[True])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(4, 3, 5\).*mask\[:, None, :\]"):
        nkf.batch_norm(x, training=True, mask=torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not broadcast"):
        nkf.layer_norm(x, 5, mask=torch.ones(2, 3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not broadcast"):
        nkf.instance_norm(x, mask=torch.ones(4, 3, 5, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not broadcast"):
        normkit.nn.BatchNorm1d(3)(x, mask=torch.ones(3, 3, 5, dtype=torch.bool))


# --- masked_norm / masked_moments, the public helpers: every broadcastable mask, typed errors --


@pytest.mark.parametrize(
    "mshape", [(4, 6, 5), (4, 1, 5), (1, 1, 5), (5,), (1, 5), (4, 6, 1), (6, 1), (1,), ()]
)
@pytest.mark.parametrize("dims", [(0, 2), (2,), (-1,), (1, 2)])
def test_masked_norm_every_broadcastable_mask_matches_float64_oracle(mshape, dims):
    x = _randn((4, 6, 5), seed=3)
    mask = _mask(mshape, seed=len(mshape) + sum(mshape)) if mshape else torch.tensor(True)
    w, b = _wb(6)
    wv, bv = _view(w, 3), _view(b, 3)
    xr = x.clone().requires_grad_()
    y, mean, var, n = nkf.masked_norm(xr, mask, dims, wv, bv, eps=1e-5)
    torch.testing.assert_close(y, ref_masked_norm(x, mask, dims, wv, bv, 1e-5).float(), atol=2e-5, rtol=1e-5)
    y.backward(_randn(y.shape, seed=9))
    assert (xr.grad[~mask.expand(x.shape)] == 0).all()  # padded positions get no gradient
    mean2, var2, n2 = nkf.masked_moments(x, mask, dims)
    torch.testing.assert_close(n2, mask.expand(x.shape).sum(dims, keepdim=True).float())
    torch.testing.assert_close((mean2, var2), (mean, var))


def test_masked_helpers_validate_like_the_ops():
    x = _randn((2, 3, 4))
    mask = torch.ones(2, 1, 4, dtype=torch.bool)
    calls = (
        lambda m, d: nkf.masked_norm(x, m, d, None, None, 1e-5),
        lambda m, d: nkf.masked_moments(x, m, d),
    )
    for call in calls:
        with pytest.raises(TypeError, match=r"mask must have dtype torch\.bool .* got torch\.float32"):
            call(mask.float(), (2,))
        with pytest.raises(
            ValueError, match=r"mask of shape \(3,\) does not broadcast to the input shape \(2, 3, 4\)"
        ):
            call(torch.ones(3, dtype=torch.bool), (2,))
        with pytest.raises(ValueError, match=r"dim 3 is out of range .* 3 dims"):  # was wrapped onto dim 0
            call(mask, (3,))
        with pytest.raises(ValueError, match="dims is empty"):  # sum(dim=()) would reduce every dim
            call(mask, ())
        with pytest.raises(ValueError, match="same dim twice"):
            call(mask, (2, -1))
    with pytest.raises(TypeError, match="floating-point input .* got torch.int64"):
        nkf.masked_norm(x.long(), mask, (2,), None, None, 1e-5)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0, got -1.0"):
        nkf.masked_norm(x, mask, (2,), None, None, -1.0)
    broadcast = r"weight of shape \(1, 4, 1\) does not broadcast to the input shape \(2, 3, 4\)"
    with pytest.raises(ValueError, match=broadcast):
        nkf.masked_norm(x, mask, (2,), torch.ones(4).view(1, 4, 1), None, 1e-5)
    with pytest.raises(TypeError, match="bias has dtype torch.float64 but the input is torch.float32"):
        nkf.masked_norm(x, mask, (2,), None, torch.zeros(1, 3, 1, dtype=F64), 1e-5)
