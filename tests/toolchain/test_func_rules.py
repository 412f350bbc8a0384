"""normkit's own torch.func rules, float64, against independent oracles.

Under ``torch.func`` the norms run one op per call: a vmap rule that folds the vmapped dim into the
samples (or gives the sets that dim where it cannot: batch statistics, per-member affines, masks),
and a backward that is itself a differentiable ``autograd.Function`` (first derivative on the
kernels, higher ones through the composite). Every case here is checked against a Python loop of
the float64 reference (``tests/reference.py``), ``torch.autograd.functional.hessian`` of that
reference, or finite differences; never against normkit's own transforms.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

import normkit.functional as NF
import normkit.nn as nkn
from normkit import kernels
from tests.reference import (
    ref_batch_norm,
    ref_group_norm,
    ref_instance_norm,
    ref_layer_norm,
    ref_layer_norm_2d,
)

F64 = torch.float64
SHAPE = (3, 8, 5, 4)  # one vmapped member: (N, C, H, W)

# name -> (normkit's call on (x, w, b), the float64 reference's, the affine's shape)
OPS = {
    "group_norm": (
        lambda x, w, b: NF.group_norm(x, 4, w, b),
        lambda x, w, b: ref_group_norm(x, 4, w, b),
        (8,),
    ),
    "layer_norm_last": (
        lambda x, w, b: NF.layer_norm(x, (4,), w, b),
        lambda x, w, b: ref_layer_norm(x, (4,), w, b),
        (4,),
    ),
    "layer_norm_2d": (
        lambda x, w, b: NF.layer_norm_2d(x, w, b),
        lambda x, w, b: ref_layer_norm_2d(x, w, b),
        (8,),
    ),
    "instance_norm": (
        lambda x, w, b: NF.instance_norm(x, weight=w, bias=b).output,
        lambda x, w, b: ref_instance_norm(x, weight=w, bias=b).output,
        (8,),
    ),
    "batch_norm_batch_stats": (  # its sets span the samples: the vmap rule cannot fold
        lambda x, w, b: NF.batch_norm(x, None, None, w, b, training=True).output,
        lambda x, w, b: ref_batch_norm(x, None, None, w, b, training=True).output,
        (8,),
    ),
}
BACKENDS = [b for b in ("reference", "auto") if b in kernels.available()]


def _t(shape, seed, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64) * scale + offset


def _affine(name, seed, members=None):
    shape = OPS[name][2] if members is None else (members, *OPS[name][2])
    return 1 + 0.3 * _t(shape, seed), 0.2 * _t(shape, seed + 1)


def _close(got, want, what=""):
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_dim", [0, 2])
@pytest.mark.parametrize("name", OPS)
def test_vmap_equals_a_loop_of_the_reference(name, in_dim, backend):
    run, ref, _ = OPS[name]
    xs = _t((5, *SHAPE), 1, scale=2.0, offset=1.5).movedim(0, in_dim)
    w, b = _affine(name, 2)
    with kernels.use(backend):
        got = vmap(lambda x: run(x, w, b), in_dims=in_dim)(xs)
    want = torch.stack([ref(xs.select(in_dim, i), w, b) for i in range(5)])
    _close(got, want, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared_input", [False, True], ids=["own-input", "shared-input"])
@pytest.mark.parametrize("name", OPS)
def test_vmap_over_an_ensemble_of_affines_equals_a_loop(name, shared_input, backend):
    """``stack_module_state``-style ensembles: each member its own weight and bias."""
    run, ref, _ = OPS[name]
    w, b = _affine(name, 3, members=4)
    x = _t(SHAPE, 4) if shared_input else _t((4, *SHAPE), 4)
    with kernels.use(backend):
        got = vmap(run, in_dims=(None if shared_input else 0, 0, 0))(x, w, b)
    want = torch.stack([ref(x if shared_input else x[i], w[i], b[i]) for i in range(4)])
    _close(got, want, name)


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "a-strided-slice"])
@pytest.mark.parametrize("name", ["group_norm", "layer_norm_2d", "batch_norm_batch_stats"])
def test_nested_vmap_equals_a_loop(name, strided):
    """vmap of vmap (and of vmap of grad); a strided slice once failed with functorch's NYI for
    layout queries inside vmap."""
    run, ref, _ = OPS[name]
    xs = _t((2, 3, 2, *SHAPE), 5)[:, :, 1] if strided else _t((2, 3, *SHAPE), 5)
    w, b = _affine(name, 6)
    got = vmap(vmap(lambda x: run(x, w, b)))(xs)
    want = torch.stack([torch.stack([ref(xs[i, j], w, b) for j in range(3)]) for i in range(2)])
    _close(got, want, name)
    grads = vmap(vmap(grad(lambda x: torch.tanh(run(x, w, b)).sum())))(xs)
    for i in range(2):
        for j in range(3):
            leaf = xs[i, j].clone().requires_grad_()
            (want_g,) = torch.autograd.grad(torch.tanh(ref(leaf, w, b)).sum(), leaf)
            _close(grads[i, j], want_g, f"{name} d x[{i}, {j}]")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", OPS)
def test_per_sample_gradients_of_input_and_affine_equal_a_loop(name, backend):
    """``vmap(grad)``: per-member gradients of the input, the weight and the bias, each member's own."""
    run, ref, _ = OPS[name]
    xs = _t((4, *SHAPE), 7, scale=1.5, offset=-0.5)
    w, b = _affine(name, 8)
    dy = _t(SHAPE, 9)

    def loss(fn, x, w, b):
        return (fn(x, w, b) * dy).sum()

    with kernels.use(backend):
        got = vmap(grad(lambda x, w, b: loss(run, x, w, b), argnums=(0, 1, 2)), in_dims=(0, None, None))(
            xs, w, b
        )
    for i in range(4):
        leaves = [t.clone().requires_grad_() for t in (xs[i], w, b)]
        want = torch.autograd.grad(loss(ref, *leaves), leaves)
        for g, e, what in zip(got, want, ("dx", "dweight", "dbias")):
            _close(g[i], e, f"{name} member {i} {what}")


# the same ops on a smaller member (a (48 x 48) Hessian): 2 groups of 2 channels, LayerNorm over 2 values
SMALL = {
    **{name: (run, ref, (4,)) for name, (run, ref, _) in OPS.items()},
    "group_norm": (
        lambda x, w, b: NF.group_norm(x, 2, w, b),
        lambda x, w, b: ref_group_norm(x, 2, w, b),
        (4,),
    ),
    "layer_norm_last": (
        lambda x, w, b: NF.layer_norm(x, (2,), w, b),
        lambda x, w, b: ref_layer_norm(x, (2,), w, b),
        (2,),
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", OPS)
def test_hessian_equals_autograd_of_the_reference(name, backend):
    """``hessian`` = ``jacfwd(jacrev)``: the backward's jvp and vmap rules, w.r.t. input and weight."""
    run, ref, wshape = SMALL[name]
    x = _t((2, 4, 3, 2), 10, scale=1.5, offset=0.5)
    w, b = 1 + 0.3 * _t(wshape, 11), 0.2 * _t(wshape, 12)
    dy = _t(x.shape, 13)

    def f(fn):
        return lambda x, w: (torch.tanh(fn(x, w, b)) * dy).sum()  # tanh: a non-zero second derivative

    with kernels.use(backend):
        got = hessian(f(run), argnums=(0, 1))(x, w)
    want = torch.autograd.functional.hessian(f(ref), (x, w))
    for i in range(2):
        for j in range(2):
            _close(got[i][j], want[i][j], f"{name} H[{i}][{j}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_third_order_eager_derivatives_equal_the_reference(backend):
    """create_graph=True three times: the backward's backward is itself differentiable."""
    x0 = _t((2, 4, 3, 2), 14, offset=0.3)
    w0 = 1 + 0.3 * _t((4,), 15)
    v = _t((2, 4, 3, 2), 16)

    def third(fn):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = torch.tanh(fn(x, 2, w, None))
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        (gxx,) = torch.autograd.grad((gx * v).sum(), x, create_graph=True)
        return torch.autograd.grad(gxx.square().sum(), (x, w))

    with kernels.use(backend):
        got = third(NF.group_norm)
    want = third(ref_group_norm)
    for g, e in zip(got, want):
        _close(g, e, "third order")


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_of_a_masked_norm_with_per_member_masks_equals_a_loop(backend):
    xs = _t((3, 4, 6, 5), 17)
    masks = _t((3, 4, 6, 1), 18) > -0.5
    masks[:, :, 0] = True  # every row keeps a valid position
    w, b = 1 + 0.3 * _t((5,), 19), 0.2 * _t((5,), 20)
    with kernels.use(backend):
        got = vmap(lambda x, m: NF.layer_norm(x, (5,), w, b, mask=m))(xs, masks)
    for i in range(3):
        want = NF.layer_norm(xs[i], (5,), w, b, mask=masks[i])  # eager: itself checked in test_masked
        _close(got[i], want, f"member {i}")
        row = xs[i, 0, 0]  # one row with every position valid: plain LayerNorm of it
        _close(got[i, 0, 0], ref_layer_norm(row, (5,), w, b), "a full row")


def test_jacrev_of_vmapped_group_norm_wrt_the_shared_weight_sums_the_members():
    """A shared (unbatched) weight's Jacobian through a vmapped call: the members' contributions add up."""
    xs = _t((3, *SHAPE), 21)
    w, b = _affine("group_norm", 22)
    got = jacrev(lambda w: vmap(lambda x: NF.group_norm(x, 4, w, b))(xs).sum((1, 2, 3, 4)))(w)
    want = torch.autograd.functional.jacobian(
        lambda w: torch.stack([ref_group_norm(xs[i], 4, w, b).sum() for i in range(3)]), w
    )
    _close(got, want, "jacobian")


def _proxy_oracle(y, w, b, pb, pw, u, eps=0.03):
    """Proxy Norm's activation step in float64 from its definition (Labatie et al., 2021): the proxy
    mean and variance of relu(w * ((1 + pw) * u + pb) + b) over the quadrature points u."""
    zp = torch.relu(w[:, None] * ((1 + pw)[:, None] * u[None, :] + pb[:, None]) + b[:, None])
    m, v = zp.mean(1), zp.var(1, unbiased=False)
    view = (1, -1, *([1] * (y.dim() - 2)))
    return (torch.relu(w.view(view) * y + b.view(view)) - m.view(view)) / torch.sqrt(v.view(view) + eps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("members", [False, True], ids=["shared-params", "per-member-params"])
def test_vmap_of_proxy_norm_act_equals_a_loop(members, backend, monkeypatch):
    from normkit.kernels import _build
    from normkit.ops import proxy

    aten_steps: list[tuple[int, ...]] = []
    real = proxy.forward_aten
    monkeypatch.setattr(proxy, "forward_aten", lambda y, *a: aten_steps.append(tuple(y.shape)) or real(y, *a))
    aten_grads: list[tuple[int, ...]] = []
    real_bw = proxy.backward_aten
    monkeypatch.setattr(
        proxy, "backward_aten", lambda g, y, *a: aten_grads.append(tuple(y.shape)) or real_bw(g, y, *a)
    )
    from normkit.functional import proxy_norm as pn_module

    composite_stats: list[tuple[int, ...]] = []
    real_stats = pn_module._proxy_stats_composite
    monkeypatch.setattr(
        pn_module,
        "_proxy_stats_composite",
        lambda w, *a: composite_stats.append(tuple(w.shape)) or real_stats(w, *a),
    )
    u = NF.proxy_points(200, dtype=F64)
    ys = _t((4, 3, 6, 5, 2), 25)
    shape = (4, 6) if members else (6,)
    w, b = 1 + 0.3 * _t(shape, 26), 0.2 * _t(shape, 27)
    pb, pw = 0.1 * _t(shape, 28), 0.1 * _t(shape, 29)
    in_dims = (0, 0, 0, 0, 0) if members else (0, None, None, None, None)

    def step(y, w, b, pb, pw):
        return NF.proxy_norm_act(y, w, b, pb, pw, "relu", points=u)

    with kernels.use(backend):
        got = vmap(step, in_dims=in_dims)(ys, w, b, pb, pw)
    for i in range(4):
        p = [t[i] if members else t for t in (w, b, pb, pw)]
        _close(got[i], _proxy_oracle(ys[i], *p, u), f"member {i}")
    if backend == "auto" and _build.load(build=False):
        # the vmap rules: the fused step once (shared vectors fold the members into the samples,
        # per-member ones make them channels), the statistics on the C++ kernel, not ATen's ops
        assert not aten_steps, f"the vmapped step ran ATen's ops on {aten_steps}"
        assert not composite_stats, f"the vmapped statistics ran the composite on {composite_stats}"
    if members:
        return
    dy = _t(ys.shape[1:], 30)

    def loss(y, *p):
        return (step(y, *p) * dy).sum()

    with kernels.use(backend):  # per-sample gradients of the input and the four parameters
        grads = vmap(grad(loss, argnums=(0, 1, 2, 3, 4)), in_dims=(0, None, None, None, None))(
            ys, w, b, pb, pw
        )
    for i in range(4):
        leaves = [t.clone().requires_grad_() for t in (ys[i], w, b, pb, pw)]
        want = torch.autograd.grad((_proxy_oracle(*leaves, u) * dy).sum(), leaves)
        for g, e, what in zip(grads, want, ("y", "weight", "bias", "proxy_bias", "proxy_weight")):
            _close(g[i], e, f"member {i} d{what}")
    if backend == "auto" and _build.load(build=False):
        # the recorded backwards' vmap rules make the members channels: the fused backward, once, and
        # the statistics' backward on the C++ kernel
        assert not aten_grads, f"the per-sample backward ran ATen's formula on {aten_grads}"
        assert not composite_stats, f"the per-sample statistics ran the composite on {composite_stats}"


PROXY_ARGS = ("y", "weight", "bias", "proxy_bias", "proxy_weight")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("samples", [1, 3], ids=["one-sample-members", "three-sample-members"])
def test_per_member_gradients_of_an_ensembles_proxy_step_equal_a_loop(samples, backend):
    """vmap over an ensemble (per-member parameters and inputs) of ``grad``: the recorded backward's
    vmap rule with batched per-channel vectors, its members as channels."""
    u = NF.proxy_points(200, dtype=F64)
    ys = _t((4, samples, 6, 5, 2), 31)
    w, b = 1 + 0.3 * _t((4, 6), 32), 0.2 * _t((4, 6), 33)
    pb, pw = 0.1 * _t((4, 6), 34), 0.1 * _t((4, 6), 35)
    dy = _t(ys.shape[1:], 36)

    def loss(y, *p):
        return (NF.proxy_norm_act(y, *p, "relu", points=u) * dy).sum()

    with kernels.use(backend):
        grads = vmap(grad(loss, argnums=(0, 1, 2, 3, 4)))(ys, w, b, pb, pw)
    for i in range(4):
        leaves = [t[i].clone().requires_grad_() for t in (ys, w, b, pb, pw)]
        want = torch.autograd.grad((_proxy_oracle(*leaves, u) * dy).sum(), leaves)
        for g, e, what in zip(grads, want, PROXY_ARGS):
            _close(g[i], e, f"member {i} d{what}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_jvp_of_the_proxy_step_in_every_argument_equals_its_definition(backend):
    """``torch.func.jvp`` w.r.t. the input and the four parameters (the statistics' and the step's jvp
    rules) against forward-mode AD of the float64 definition."""
    u = NF.proxy_points(200, dtype=F64)
    primals = (
        _t((2, 3, 4, 2), 49),
        1 + 0.3 * _t((3,), 50),
        0.2 * _t((3,), 51),
        0.1 * _t((3,), 52),
        0.1 * _t((3,), 53),
    )
    tangents = tuple(_t(p.shape, 54 + i) for i, p in enumerate(primals))
    with kernels.use(backend):
        got = torch.func.jvp(lambda y, *p: NF.proxy_norm_act(y, *p, "relu", points=u), primals, tangents)
    want = torch.func.jvp(lambda y, *p: _proxy_oracle(y, *p, u), primals, tangents)
    _close(got[0], want[0], "value")
    _close(got[1], want[1], "tangent")


@pytest.mark.parametrize("backend", BACKENDS)
def test_hessian_of_the_proxy_step_equals_autograd_of_its_definition(backend):
    """``hessian`` (jacfwd of jacrev) w.r.t. the input and the weight: the recorded backward's jvp and
    vmap rules, whose own derivatives are the ATen formula's."""
    u = NF.proxy_points(200, dtype=F64)
    y = _t((2, 3, 2, 2), 37, offset=0.2)
    w, b = 1 + 0.3 * _t((3,), 38), 0.2 * _t((3,), 39)
    pb, pw = 0.1 * _t((3,), 40), 0.1 * _t((3,), 41)
    dy = _t(y.shape, 42)

    def f(step):
        return lambda y, w: (torch.tanh(step(y, w)) * dy).sum()  # tanh: non-zero second derivatives

    with kernels.use(backend):
        step = f(lambda y, w: NF.proxy_norm_act(y, w, b, pb, pw, "relu", points=u))
        got = hessian(step, argnums=(0, 1))(y, w)
    want = torch.autograd.functional.hessian(f(lambda y, w: _proxy_oracle(y, w, b, pb, pw, u)), (y, w))
    for i in range(2):
        for j in range(2):
            _close(got[i][j], want[i][j], f"H[{i}][{j}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_third_order_eager_derivatives_of_the_proxy_step_equal_its_definition(backend):
    """create_graph=True three times through the step (eager double backward: the recorded backward)."""
    u = NF.proxy_points(200, dtype=F64)
    y0 = _t((2, 3, 4, 2), 43, offset=0.2)
    p0 = (1 + 0.3 * _t((3,), 44), 0.2 * _t((3,), 45), 0.1 * _t((3,), 46), 0.1 * _t((3,), 47))
    v = _t(y0.shape, 48)

    def third(step):
        leaves = [t.clone().requires_grad_() for t in (y0, *p0)]
        out = torch.tanh(step(*leaves))
        (gy,) = torch.autograd.grad(out.square().sum(), leaves[0], create_graph=True)
        (gyy,) = torch.autograd.grad((gy * v).sum(), leaves[0], create_graph=True)
        return torch.autograd.grad(gyy.square().sum(), leaves)

    with kernels.use(backend):
        got = third(lambda y, *p: NF.proxy_norm_act(y, *p, "relu", points=u))
    want = third(lambda y, *p: _proxy_oracle(y, *p, u))
    for g, e, what in zip(got, want, PROXY_ARGS):
        _close(g, e, f"third order d{what}")


# --- GroupNorm + Proxy Norm's activation (GroupNormProxyAct2d's step), one Function under torch.func ---
GN_PN = {"groups": 3, "eps": 1e-3}


def _gn_pn_oracle(x, w, b, pb, pw, u):
    """GroupNormProxyAct2d's step in float64 from its definition: GroupNorm without affine (the float64
    reference), then the proxy-normalized activation."""
    return _proxy_oracle(ref_group_norm(x, GN_PN["groups"], eps=GN_PN["eps"]), w, b, pb, pw, u)


def _gn_pn(x, w, b, pb, pw, u):
    return NF.group_norm_proxy_act(x, GN_PN["groups"], w, b, pb, pw, "relu", GN_PN["eps"], points=u)


def _gn_pn_params(seed, members=None):
    shape = (6,) if members is None else (members, 6)
    return (
        1 + 0.3 * _t(shape, seed),
        0.2 * _t(shape, seed + 1),
        0.1 * _t(shape, seed + 2),
        0.1 * _t(shape, seed + 3),
    )


def _fused_only(seen, backend, backward):
    from normkit.kernels import _build

    if backend != "auto" or not _build.load(build=False):
        return
    assert seen["fused forward"] > 0 and (seen["fused backward"] > 0 or not backward), seen
    assert seen["unfused"] == 0, f"the composite's parts ran under the transform: {seen}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("members", [False, True], ids=["shared-params", "per-member-params"])
def test_vmap_of_group_norm_proxy_act_equals_a_loop(members, layout, backend, gn_pn_calls):
    u = NF.proxy_points(200, dtype=F64)
    xs = _t((4, 3, 6, 5, 2), 60, scale=1.5, offset=0.3)
    if layout == "channels_last":  # each member channels-last, as a vmapped channels-last batch is
        xs = xs.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (4, 3))
    params = _gn_pn_params(61, 4 if members else None)
    in_dims = (0, 0, 0, 0, 0) if members else (0, None, None, None, None)
    with kernels.use(backend):
        got = vmap(lambda x, *p: _gn_pn(x, *p, u), in_dims=in_dims)(xs, *params)
    for i in range(4):
        _close(got[i], _gn_pn_oracle(xs[i], *(p[i] if members else p for p in params), u), f"member {i}")
    _fused_only(gn_pn_calls, backend, backward=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case", ["per-sample", "ensemble, one sample each", "ensemble, three samples each", "grad"]
)
def test_gradients_of_group_norm_proxy_act_under_transforms_equal_a_loop(case, backend, gn_pn_calls):
    """grad, per-sample gradients (shared parameters) and per-member gradients of an ensemble: the
    fused Function's recorded backward and its vmap rule (members folded, or made channels)."""
    u = NF.proxy_points(200, dtype=F64)
    samples = 3 if "three" in case else 1
    xs = _t((4, samples, 6, 5, 2), 62, scale=1.5, offset=0.3)
    members = case.startswith("ensemble")
    params = _gn_pn_params(63, 4 if members else None)
    dy = _t(xs.shape[1:], 64)

    def loss(step):
        return lambda x, *p: (torch.tanh(step(x, *p, u)) * dy).sum()

    argnums = (0, 1, 2, 3, 4)
    with kernels.use(backend):
        if case == "grad":
            grads = [g.unsqueeze(0) for g in grad(loss(_gn_pn), argnums=argnums)(xs[0], *params)]
        else:
            in_dims = (0, 0, 0, 0, 0) if members else (0, None, None, None, None)
            grads = vmap(grad(loss(_gn_pn), argnums=argnums), in_dims=in_dims)(xs, *params)
    for i in range(grads[0].shape[0]):
        leaves = [t.clone().requires_grad_() for t in (xs[i], *(p[i] if members else p for p in params))]
        want = torch.autograd.grad(loss(_gn_pn_oracle)(*leaves), leaves)
        for g, e, what in zip(grads, want, ("x", *PROXY_ARGS[1:])):
            _close(g[i], e, f"{case}, member {i}, d{what}")
    _fused_only(gn_pn_calls, backend, backward=True)


@pytest.mark.parametrize("members", [False, True], ids=["shared-params", "per-member-params"])
def test_group_norm_proxy_act_under_transforms_takes_float32_inputs_near_1e20(members):
    """Where the float32 kernels hand a batch back (squares overflow), the Function computes it by the
    reference, each way and in its vmap rules; against the float64 definition of the same values."""
    u = NF.proxy_points(200, dtype=F64)
    xs = (_t((3, 1, 6, 4, 2), 80) * 1e20).float()
    params = _gn_pn_params(81, 3 if members else None)
    dy = _t(xs.shape[1:], 85)
    in_dims = (0, 0, 0, 0, 0) if members else (0, None, None, None, None)
    p32 = tuple(p.float() for p in params)

    def loss(step, u):
        return lambda x, *p: (step(x, *p, u) * dy.to(x.dtype)).sum()

    grads = vmap(grad(loss(_gn_pn, u.float()), argnums=(0, 1, 2, 3, 4)), in_dims=in_dims)(xs, *p32)
    for i in range(3):
        leaves = [
            t.double().clone().requires_grad_() for t in (xs[i], *(p[i] if members else p for p in p32))
        ]
        want = torch.autograd.grad(loss(_gn_pn_oracle, u)(*leaves), leaves)
        for g, e, what in zip(grads, want, ("x", *PROXY_ARGS[1:])):
            scale = 1e-20 if what == "x" else 1.0  # (dx is about 1e-20: compare it relative to that)
            torch.testing.assert_close(
                g[i].double() / scale,
                e / scale,
                rtol=1e-4,
                atol=1e-4,
                msg=lambda m, label=f"member {i} d{what}": f"{label}: {m}",
            )


@pytest.mark.parametrize("backend", BACKENDS)
def test_hessian_and_jvp_of_group_norm_proxy_act_equal_its_definition(backend):
    """``hessian`` (jacfwd of jacrev: the recorded backward's jvp and vmap rules) w.r.t. the input and
    the weight, and ``jvp`` in every argument, against autograd of the float64 definition."""
    u = NF.proxy_points(200, dtype=F64)
    x = _t((2, 6, 2, 2), 65, offset=0.2)
    w, b, pb, pw = _gn_pn_params(66)
    dy = _t(x.shape, 70)

    def f(step):
        return lambda x, w: (torch.tanh(step(x, w, b, pb, pw, u)) * dy).sum()

    with kernels.use(backend):
        got = hessian(f(_gn_pn), argnums=(0, 1))(x, w)
        primals = (x, w, b, pb, pw)
        tangents = tuple(_t(t.shape, 71 + i) for i, t in enumerate(primals))
        got_jvp = torch.func.jvp(lambda *a: _gn_pn(*a, u), primals, tangents)
    want = torch.autograd.functional.hessian(f(_gn_pn_oracle), (x, w))
    for i in range(2):
        for j in range(2):
            _close(got[i][j], want[i][j], f"H[{i}][{j}]")
    want_jvp = torch.func.jvp(lambda *a: _gn_pn_oracle(*a, u), primals, tangents)
    _close(got_jvp[0], want_jvp[0], "jvp value")
    _close(got_jvp[1], want_jvp[1], "jvp tangent")


@pytest.mark.parametrize("wrt", ["x", "x-and-affine"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", OPS)
def test_jvp_in_the_input_is_the_backward_kernel_of_the_tangent(name, layout, wrt, monkeypatch):
    """``jvp`` of a norm: the normalization's Jacobian is symmetric, so the tangent of ``x_hat`` is one
    backward-kernel call on the input's tangent (on plain tensors, one functorch level down), times
    the weight; the affine's tangents add ``x_hat * tw + tb``. Against the float64 reference's jvp, with
    a contiguous tangent for a channels_last ``x``."""
    from normkit.kernels import _build
    from normkit.ops import library

    run, ref, _ = OPS[name]
    seen = []
    backward = kernels.norm_backward

    def spy(dy, *a, **k):
        seen.append(torch._C._has_storage(dy))
        return backward(dy, *a, **k)

    monkeypatch.setattr(library.kernels, "norm_backward", spy)
    x = _t(SHAPE, 110, scale=2.0, offset=1.5)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = _affine(name, 111)
    primals = (x, w, b) if wrt == "x-and-affine" else (x,)
    tangents = tuple(_t(p.shape, 112 + i) for i, p in enumerate(primals))

    def f(step):
        return lambda x, *p: step(x, *p, *(w, b)[len(p) :])

    got = torch.func.jvp(f(run), primals, tangents)
    want = torch.func.jvp(f(ref), primals, tangents)
    _close(got[0], want[0], "value")
    _close(got[1], want[1], "tangent")
    if _build.load(build=False):
        assert seen and all(seen), f"the jvp did not run the backward kernel on plain tensors: {seen}"


def test_jvp_of_a_bf16_group_norm_is_close_to_float64():
    x = _t((4, 8, 6, 6), 115, scale=1.5, offset=0.5).to(torch.bfloat16)
    w, b = (p.float() for p in _affine("group_norm", 116))
    tx = _t(x.shape, 117).to(torch.bfloat16)
    got = torch.func.jvp(lambda x: NF.group_norm(x, 4, w, b), (x,), (tx,))[1]
    want = torch.func.jvp(
        lambda x: ref_group_norm(x, 4, w.double(), b.double()), (x.double(),), (tx.double(),)
    )[1]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=5e-2, atol=5e-2)


PN_STEP_ACTS = {
    "relu": torch.relu,
    "leaky_relu:0.2": lambda a: torch.nn.functional.leaky_relu(a, 0.2),
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "tanh": torch.tanh,
    "identity": lambda a: a,
}


@pytest.mark.parametrize("which", ["y", *PROXY_ARGS[1:]])
@pytest.mark.parametrize("act", PN_STEP_ACTS)
def test_jvp_of_proxy_norm_act_in_one_argument_equals_its_definition(act, which):
    """``F.proxy_norm_act`` (after LayerNorm: the ln+pn step) under ``jvp`` in one argument at a time:
    the step's rule skips the tangents functorch hands as zeros, so each term is checked alone."""
    fn = PN_STEP_ACTS[act]
    u = NF.proxy_points(200, dtype=F64)
    params = [1 + 0.3 * _t((5,), 122), 0.2 * _t((5,), 123), 0.1 * _t((5,), 124), 0.1 * _t((5,), 125)]
    args = [_t((3, 5, 2, 2), 120, offset=0.1), *params]
    k = ["y", *PROXY_ARGS[1:]].index(which)
    t = _t(args[k].shape, 126)

    def oracle(y, w, b, pb, pw):
        zp = fn(w[:, None] * ((1 + pw)[:, None] * u[None, :] + pb[:, None]) + b[:, None])
        m, v = zp.mean(1), zp.var(1, unbiased=False)
        view = (1, -1, 1, 1)
        return (fn(w.view(view) * y + b.view(view)) - m.view(view)) / torch.sqrt(v.view(view) + 0.03)

    def f(step):
        return lambda a: step(*args[:k], a, *args[k + 1 :])

    got = torch.func.jvp(f(lambda *a: NF.proxy_norm_act(*a, act, points=u)), (args[k],), (t,))
    want = torch.func.jvp(f(oracle), (args[k],), (t,))
    _close(got[0], want[0], "value")
    _close(got[1], want[1], f"tangent in {which}")


GN_PN_ACTS = {
    "relu": torch.relu,
    "leaky_relu:0.2": lambda a: torch.nn.functional.leaky_relu(a, 0.2),
    "identity": lambda a: a,
}


def _gn_pn_act_oracle(x, w, b, pb, pw, u, groups, act):
    """GroupNorm (no affine) + the proxy-normalized ``act`` in float64, from the definitions."""
    y = ref_group_norm(x, groups, eps=GN_PN["eps"])
    zp = act(w[:, None] * ((1 + pw)[:, None] * u[None, :] + pb[:, None]) + b[:, None])
    m, v = zp.mean(1), zp.var(1, unbiased=False)
    view = (1, -1, *([1] * (y.dim() - 2)))
    return (act(w.view(view) * y + b.view(view)) - m.view(view)) / torch.sqrt(v.view(view) + 0.03)


def _gn_pn_act(groups, act, u):
    return lambda x, *p: NF.group_norm_proxy_act(x, groups, *p, act, GN_PN["eps"], points=u)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", GN_PN_ACTS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("groups", [1, 3, 6], ids=["G=1", "G=3", "G=C"])
def test_jvp_of_group_norm_proxy_act_in_the_input_equals_its_definition(
    groups, layout, act, backend, gn_pn_calls
):
    """``jvp`` w.r.t. the input alone (the common case: forward gradients, jvp-based Hessian products):
    the fused forward and its analytic jvp (GroupNorm's jvp as the backward kernel of the tangent), not
    the composite's parts. The tangent is contiguous where ``x`` is channels_last."""
    u = NF.proxy_points(200, dtype=F64)
    x = _t((2, 6, 3, 2), 90, scale=1.3, offset=0.2)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    params = _gn_pn_params(91)
    tx = _t(x.shape, 92)
    with kernels.use(backend):
        got = torch.func.jvp(lambda x: _gn_pn_act(groups, act, u)(x, *params), (x,), (tx,))
    want = torch.func.jvp(lambda x: _gn_pn_act_oracle(x, *params, u, groups, GN_PN_ACTS[act]), (x,), (tx,))
    _close(got[0], want[0], "value")
    _close(got[1], want[1], "tangent")
    _fused_only(gn_pn_calls, backend, backward=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", GN_PN_ACTS)
@pytest.mark.parametrize("which", PROXY_ARGS[1:])
def test_jvp_of_group_norm_proxy_act_in_one_parameter_equals_its_definition(which, act, backend, gn_pn_calls):
    """A tangent in one parameter alone: the statistics' jvp and the step's parameter terms."""
    u = NF.proxy_points(200, dtype=F64)
    x = _t((2, 6, 2, 3), 93, offset=-0.1)
    params = list(_gn_pn_params(94))
    k = PROXY_ARGS.index(which) - 1
    t = _t((6,), 95)

    def f(step):
        return lambda p: step(x, *params[:k], p, *params[k + 1 :])

    with kernels.use(backend):
        got = torch.func.jvp(f(_gn_pn_act(3, act, u)), (params[k],), (t,))
    oracle = lambda x, *p: _gn_pn_act_oracle(x, *p, u, 3, GN_PN_ACTS[act])  # noqa: E731
    want = torch.func.jvp(f(oracle), (params[k],), (t,))
    _close(got[1], want[1], f"tangent in {which}")
    if backend == "auto":  # (the statistics' jvp is their composite's, on (C, points) tensors)
        assert gn_pn_calls["fused forward"] > 0, gn_pn_calls


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_jvp_of_group_norm_proxy_act_in_low_precision_is_close_to_float64(dtype, layout, gn_pn_calls):
    """float32 / bf16 inputs (float32 parameters, as a layer holds them): the jvp in the accumulation
    dtype, rounded once (the backward kernel's ``t_xhat`` in the input's dtype for bf16)."""
    u = NF.proxy_points(200, dtype=torch.float32)
    x = _t((3, 6, 4, 4), 96, scale=1.5, offset=0.5).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    params = tuple(p.float() for p in _gn_pn_params(97))
    tx = _t(x.shape, 98).to(dtype)
    got = torch.func.jvp(lambda x: _gn_pn_act(3, "relu", u)(x, *params), (x,), (tx,))[1]
    want = torch.func.jvp(
        lambda x: _gn_pn_act_oracle(x, *(p.double() for p in params), u.double(), 3, torch.relu),
        (x.double(),),
        (tx.double(),),
    )[1]
    tol = 2e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    assert got.dtype == dtype
    _fused_only(gn_pn_calls, "auto", backward=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jacfwd_of_group_norm_proxy_act_equals_the_jacobian_of_its_definition(backend):
    """``jacfwd`` (vmap over the jvp: the jvp rule sees batched tangents and takes plain ops for them)."""
    u = NF.proxy_points(200, dtype=F64)
    x = _t((2, 6, 2, 2), 99, offset=0.3)
    params = _gn_pn_params(100)
    with kernels.use(backend):
        got = torch.func.jacfwd(lambda x: _gn_pn_act(3, "leaky_relu:0.2", u)(x, *params))(x)
    want = torch.autograd.functional.jacobian(
        lambda x: _gn_pn_act_oracle(x, *params, u, 3, GN_PN_ACTS["leaky_relu:0.2"]), x
    )
    _close(got, want, "jacfwd")


# --- torch.func inside torch.compile ----------------------------------------------------------------
# (torch.library's autograd for a custom op does not compose with functorch transforms, and the op has
# no batching rule: under a transform a compiled norm is traced as plain ops instead.)
# oracle: torch.nn's layer where there is one, else normkit's eager reference backend
COMPILED_LAYERS = {
    "GroupNorm": (lambda: nkn.GroupNorm(4, 8), lambda: nn.GroupNorm(4, 8)),
    "InstanceNorm2d": (lambda: nkn.InstanceNorm2d(8, affine=True), lambda: nn.InstanceNorm2d(8, affine=True)),
    "GroupNormProxyAct2d": (lambda: nkn.GroupNormProxyAct2d(8, num_groups=4), None),
}


def _func_cases(model: nn.Module):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x):
        return functional_call(model, p, (x,)).tanh().square().sum()

    return {
        "vmap": lambda xs: vmap(lambda x: functional_call(model, params, (x,)))(xs),
        "grad": lambda xs: grad(loss)(params, xs[0]),
        "vmap(grad)": lambda xs: vmap(grad(loss), in_dims=(None, 0))(params, xs),
    }


@pytest.mark.parametrize("transform", ["vmap", "grad", "vmap(grad)"])
@pytest.mark.parametrize("name", COMPILED_LAYERS)
def test_torch_func_inside_torch_compile_equals_the_oracle(name, transform):
    make, make_torch = COMPILED_LAYERS[name]
    torch.manual_seed(0)
    ours = make().double()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.2 * torch.randn_like(p))
    xs = _t((3, 2, 8, 5, 4), 23, scale=1.5, offset=0.5)
    if make_torch is not None:
        oracle = make_torch().double()
        oracle.load_state_dict(ours.state_dict())
        want = _func_cases(oracle)[transform](xs)
    else:
        with kernels.use("reference"):
            want = _func_cases(ours)[transform](xs)
    code: list[str] = []

    def capture(gm: torch.fx.GraphModule, example_inputs):  # Dynamo's graph, run as traced
        code.extend(m.code for m in gm.modules() if isinstance(m, torch.fx.GraphModule))
        return gm.forward

    torch._dynamo.reset()
    got = torch.compile(_func_cases(ours)[transform], backend=capture, fullgraph=True)(xs)
    torch._dynamo.reset()
    # no registered normkit op under a transform (vmap would run it once per sample: no batching rule)
    assert code and not any("normkit" in c for c in code), "\n".join(code)
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for k in want:
            _close(got[k], want[k], f"{name} {transform} d{k}")
    else:
        _close(got, want, f"{name} {transform}")


def test_per_sample_gradients_compile_with_inductor():
    """The same through Inductor (the default backend), once."""
    model = nkn.GroupNorm(4, 8).double()
    cases = _func_cases(model)
    xs = _t((3, 2, 8, 5, 4), 24)
    want = cases["vmap(grad)"](xs)
    torch._dynamo.reset()
    got = torch.compile(cases["vmap(grad)"], fullgraph=True)(xs)
    torch._dynamo.reset()
    for k in want:
        _close(got[k], want[k], k)


# --- regressions found by probing layers x transforms (2026-12-06) ----------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["group_norm", "layer_norm_last", "layer_norm_2d", "instance_norm"])
def test_grad_and_jvp_of_a_strided_input_equal_the_reference(name, backend):
    """A strided view under grad / jvp (a transform wraps it, so the layout check passes it on): the
    kernels must not read it as dense memory (they once did, silently wrong)."""
    run, ref, _ = OPS[name]
    x = _t((3, 8, 5, 8), 90)[..., ::2]
    w, b = _affine(name, 91)
    dy, tx = _t(x.shape, 92), _t(x.shape, 93)
    with kernels.use(backend):
        out, vjp_fn = torch.func.vjp(lambda x: run(x, w, b), x)
        (gx,) = vjp_fn(dy)
        _, tangent = torch.func.jvp(lambda x: run(x, w, b), (x,), (tx,))
    leaf = x.clone().requires_grad_()
    want = ref(leaf, w, b)
    _close(out, want.detach(), f"{name} value")
    _close(gx, torch.autograd.grad(want, leaf, dy)[0], f"{name} grad")
    _close(tangent, torch.func.jvp(lambda x: ref(x, w, b), (x,), (tx,))[1], f"{name} tangent")


@pytest.mark.parametrize("backend", BACKENDS)
def test_jacrev_of_proxy_norm_act_on_a_channels_last_input_equals_its_definition(backend):
    """jacrev vmaps the backward over a channels-last cotangent (it once tried an in-place copy of the
    vmapped cotangent into y's layout)."""
    u = NF.proxy_points(200, dtype=F64)
    y = _t((1, 3, 2, 2), 94).contiguous(memory_format=torch.channels_last)
    w, b, pb, pw = (1 + 0.3 * _t((3,), 95), 0.2 * _t((3,), 96), 0.1 * _t((3,), 97), 0.1 * _t((3,), 98))
    with kernels.use(backend):
        got = jacrev(lambda y: NF.proxy_norm_act(y, w, b, pb, pw, "relu", points=u))(y)
    want = torch.autograd.functional.jacobian(lambda y: _proxy_oracle(y, w, b, pb, pw, u), y)
    _close(got, want, "jacobian")


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_of_grad_of_group_norm_proxy_act_equals_its_definition(backend):
    """grad of grad through the fused Function (its recorded backward's derivative once hit a
    functorch internal assert: normkit's own norm Functions nested inside its torch.func.vjp)."""
    u = NF.proxy_points(200, dtype=F64)
    x = _t((2, 6, 3, 3), 99, offset=0.2)
    r = _t(x.shape, 100)
    params = _gn_pn_params(101)

    def second(step):
        inner = grad(lambda z: (torch.tanh(step(z, *params, u)) * r).sum())
        return grad(lambda z: inner(z).square().sum())(x)

    with kernels.use(backend):
        got = second(_gn_pn)
    _close(got, second(_gn_pn_oracle), "d/dx |d/dx f|^2")


@pytest.mark.parametrize("backend", BACKENDS)
def test_instance_norm_tracking_stats_trains_under_grad_as_torch_nn(backend):
    """InstanceNorm2d(track_running_stats=True) in train mode under grad: torch.nn updates its buffers
    inside the ATen op; normkit's layer stores the values (it once raised functorch's error for an
    in-place op on a captured tensor)."""
    x = _t((2, 6, 4, 5), 102, scale=3.0, offset=1.0)
    ours = nkn.InstanceNorm2d(6, affine=True, track_running_stats=True).double()
    theirs = nn.InstanceNorm2d(6, affine=True, track_running_stats=True).double()
    with kernels.use(backend):
        got = grad(lambda z: (ours(z) ** 3).sum())(x)
    want = grad(lambda z: (theirs(z) ** 3).sum())(x)
    _close(got, want, "dx")
    _close(ours.running_mean, theirs.running_mean, "running_mean")
    _close(ours.running_var, theirs.running_var, "running_var")


def test_batch_norm_training_under_vmap_names_the_fix():
    """A training step under vmap would update one set of running statistics per member: refused with
    the fixes named (torch.nn raises too), never functorch's generic in-place error."""
    from normkit import NormError

    bn = nkn.BatchNorm2d(6).train()
    before = bn.running_mean.clone()
    with pytest.raises(NormError, match="track_running_stats=False.*replace_all_batch_norm_modules_"):
        vmap(bn)(_t((3, 4, 6, 5, 5), 103).float())
    assert torch.equal(bn.running_mean, before)
