"""The ``normkit_func`` ops: normkit's norm under ``torch.func`` as dispatcher ops with C++ autograd.

Under a transform, an ``autograd.Function`` costs about 0.25 ms of torch's Python per call, two per
norm under ``grad``; the optional C++ module (``kernels/csrc/autograd.cpp``) records the same
derivatives as C++ nodes, as torch's own norms do, and :func:`normkit.ops.library.norm` takes them
under every transform but ``jvp`` / forward AD (no forward-mode rule there: the Functions keep those).

Each case asserts two things: the transform ran without normkit's Python Functions (they are made to
raise), and its result equals a loop of the float64 reference (``tests/reference.py``) or autograd of
it. The Functions' own path (a machine without the C++ module) is checked against the same oracles.
GroupNormProxyAct2d's step (GroupNorm without affine + Proxy Norm's activation,
``normkit_func::gn_proxy_act``) is checked the same way, against its float64 definition.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import normkit.functional as NF
from normkit import kernels
from normkit.kernels import _build, _func
from normkit.ops import library
from tests.toolchain.test_func_rules import (  # the same ops and oracles
    OPS,
    SHAPE,
    _affine,
    _close,
    _fused_only,
    _gn_pn,
    _gn_pn_oracle,
    _gn_pn_params,
    _t,
)


def _module_or_skip() -> None:
    if kernels.current() != "auto" or _build.autograd_module() is None:
        why = _build.autograd_error() or _build.load_error()
        pytest.skip(f"the C++ autograd module is not built on this machine (no compiler?): {why}")


@pytest.fixture
def cpp_ops(monkeypatch):
    """The C++ ops' route, normkit's Python Functions made to raise (a case that reaches them fails)."""
    _module_or_skip()
    assert library._func_ops_ready()

    def refuse(*_a, **_k):
        raise AssertionError("a torch.func transform ran normkit's Python autograd.Function")

    monkeypatch.setattr(library._NormFunction, "apply", refuse)
    monkeypatch.setattr(library._NormBackward, "apply", refuse)
    monkeypatch.setattr(_func._GNProxyAct, "apply", refuse)
    monkeypatch.setattr(_func._GNProxyActBackward, "apply", refuse)


@pytest.fixture(params=["cpp-ops", "python-functions"])
def route(request, monkeypatch):
    """Either route: the C++ ops (Functions refused), or the Functions (the ops switched off)."""
    if request.param == "cpp-ops":
        request.getfixturevalue("cpp_ops")
    else:
        monkeypatch.setattr(library, "_func_ops_ready", lambda: False)
    return request.param


@pytest.mark.parametrize("name", OPS)
def test_grad_and_vjp_equal_autograd_of_the_reference(name, route):
    run, ref, _ = OPS[name]
    x = _t(SHAPE, 1, scale=1.5, offset=-0.5)
    w, b = _affine(name, 2)
    dy = _t(SHAPE, 4)

    def loss(fn):
        return lambda x, w, b: (torch.tanh(fn(x, w, b)) * dy).sum()

    got = grad(loss(run), argnums=(0, 1, 2))(x, w, b)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    want = torch.autograd.grad(loss(ref)(*leaves), leaves)
    for g, e, what in zip(got, want, ("dx", "dweight", "dbias")):
        _close(g, e, f"{name} grad {what}")
    y, pull = vjp(lambda x, w: run(x, w, b), x, w)
    _close(y, ref(x, w, b), f"{name} vjp output")
    got = pull(dy)
    want = torch.autograd.grad(ref(*leaves[:2], b), leaves[:2], dy)
    for g, e, what in zip(got, want, ("dx", "dweight")):
        _close(g, e, f"{name} vjp {what}")


@pytest.mark.parametrize("name", OPS)
def test_vmap_and_per_sample_gradients_equal_a_loop(name, route):
    run, ref, _ = OPS[name]
    xs = _t((4, *SHAPE), 5, scale=1.5, offset=0.5)
    w, b = _affine(name, 6)
    dy = _t(SHAPE, 8)
    got = vmap(run, in_dims=(0, None, None))(xs, w, b)
    for i in range(4):
        _close(got[i], ref(xs[i], w, b), f"{name} vmap member {i}")

    def loss(fn):
        return lambda x, w, b: (torch.tanh(fn(x, w, b)) * dy).sum()

    got = vmap(grad(loss(run), argnums=(0, 1, 2)), in_dims=(0, None, None))(xs, w, b)
    for i in range(4):
        leaves = [t.clone().requires_grad_() for t in (xs[i], w, b)]
        want = torch.autograd.grad(loss(ref)(*leaves), leaves)
        for g, e, what in zip(got, want, ("dx", "dweight", "dbias")):
            _close(g[i], e, f"{name} per-sample member {i} {what}")


@pytest.mark.parametrize("name", ["group_norm", "layer_norm_2d", "instance_norm"])
def test_an_ensemble_of_affines_under_vmap_and_grad_equals_a_loop(name, route):
    """Per-member weights (``stack_module_state``): the sets gain the vmapped dim instead of folding."""
    run, ref, wshape = OPS[name]
    x = _t(SHAPE, 9)
    ws, bs = 1 + 0.3 * _t((3, *wshape), 10), 0.2 * _t((3, *wshape), 11)
    got = vmap(grad(lambda w, b: torch.tanh(run(x, w, b)).square().sum(), argnums=(0, 1)))(ws, bs)
    for i in range(3):
        leaves = [ws[i].clone().requires_grad_(), bs[i].clone().requires_grad_()]
        want = torch.autograd.grad(torch.tanh(ref(x, *leaves)).square().sum(), leaves)
        for g, e, what in zip(got, want, ("dweight", "dbias")):
            _close(g[i], e, f"{name} member {i} {what}")


@pytest.mark.parametrize("name", ["group_norm", "layer_norm_last", "instance_norm"])
def test_jacrev_and_grad_of_grad_equal_autograd_of_the_reference(name, route):
    """``jacrev`` (vmap of vjp) and ``grad(grad)``: the backward's node differentiates the composite."""
    run, ref, _ = OPS[name]
    x = _t((2, 8, 3, 4), 12, offset=0.3)
    w, b = _affine(name, 13)
    v = _t(x.shape, 14)
    got = jacrev(lambda x: run(x, w, b))(x)
    want = torch.autograd.functional.jacobian(lambda x: ref(x, w, b), x)
    _close(got, want, f"{name} jacrev")

    def f(fn):
        return lambda x, w: (torch.tanh(fn(x, w, b)) * v).sum()

    got = grad(lambda x, w: (grad(f(run), argnums=(0, 1))(x, w)[0] * v).sum().sin(), argnums=(0, 1))(x, w)
    leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    (gx,) = torch.autograd.grad(f(ref)(*leaves), leaves[0], create_graph=True)
    want = torch.autograd.grad((gx * v).sum().sin(), leaves)
    for g, e, what in zip(got, want, ("x", "weight")):
        _close(g, e, f"{name} grad of grad w.r.t. {what}")


@pytest.mark.parametrize("name", ["group_norm", "layer_norm_2d"])
def test_jvp_transforms_keep_the_python_functions_and_equal_the_reference(name, monkeypatch):
    """The ops have no forward-mode rule: under ``jvp``, ``jacfwd`` and ``hessian`` norm() takes the
    Functions (analytic jvp), also when the jvp level sits under a vmap or grad one."""
    _module_or_skip()
    calls = []
    apply = library._NormFunction.apply

    def counted(*args):
        calls.append(1)
        return apply(*args)

    monkeypatch.setattr(library._NormFunction, "apply", counted)
    run, ref, _ = OPS[name]
    x = _t((2, 8, 3, 2), 15, offset=0.5)
    w, b = _affine(name, 16)
    t = _t(x.shape, 18)
    got = jvp(lambda x: run(x, w, b), (x,), (t,))[1]
    want = torch.autograd.functional.jvp(lambda x: ref(x, w, b), x, t)[1]
    _close(got, want, f"{name} jvp")
    assert calls, "jvp did not take the Python Function"
    got = hessian(lambda x: torch.tanh(run(x, w, b)).sum())(x)
    want = torch.autograd.functional.hessian(lambda x: torch.tanh(ref(x, w, b)).sum(), x)
    _close(got, want, f"{name} hessian")
    got = jacfwd(lambda x: run(x, w, b))(x)
    _close(got, torch.autograd.functional.jacobian(lambda x: ref(x, w, b), x), f"{name} jacfwd")


def test_a_dual_tensor_into_the_op_raises_instead_of_dropping_its_tangent():
    _module_or_skip()
    assert library._func_ops_ready()
    x, t = _t(SHAPE, 19), _t(SHAPE, 20)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, t)
        with pytest.raises(RuntimeError, match="no forward-mode derivative"):
            torch.ops.normkit_func.norm(dual, None, None, None, [1, 2, 3], 1e-5)


def test_the_ops_called_eagerly_record_c_plus_plus_nodes_that_pass_gradcheck():
    """Outside torch.func too: ``gradcheck`` and ``gradgradcheck`` (finite differences of the ops,
    ``check_batched_grad`` running the backward's vmap rule), and the nodes' names."""
    _module_or_skip()
    assert library._func_ops_ready()
    x = _t((2, 4, 3, 2), 21).requires_grad_()
    w = (1 + 0.3 * _t((1, 4, 1, 1), 22)).requires_grad_()
    b = (0.2 * _t((1, 4, 1, 1), 23)).requires_grad_()

    def f(x, w, b):
        return torch.ops.normkit_func.norm(x, w, b, None, [2, 3], 1e-5)[0]

    y = f(x, w, b)
    assert y.grad_fn.name() == "NormkitNormBackward"
    (gx,) = torch.autograd.grad(y.sin().sum(), x, create_graph=True)
    assert gx.grad_fn is not None
    assert torch.autograd.gradcheck(f, (x, w, b), check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, (x, w, b), check_batched_grad=True)


# --- GroupNormProxyAct2d's step: normkit_func::gn_proxy_act and its backward --------------------------
GN_PN_CASES = ["grad", "per-sample", "ensemble, three samples each", "vmap, shared", "vmap, per-member"]


@pytest.mark.parametrize("case", GN_PN_CASES)
def test_group_norm_proxy_act_under_transforms_equals_a_loop_of_its_definition(case, route, gn_pn_calls):
    """grad (all five arguments), per-sample gradients, an ensemble's per-member gradients and vmap
    (shared or per-member parameters): the op's vmap rules fold the members into the samples or make
    them channels."""
    u = NF.proxy_points(200, dtype=torch.float64)
    members = case in ("ensemble, three samples each", "vmap, per-member")
    xs = _t((4, 3 if "three" in case else 1, 6, 5, 2), 30, scale=1.5, offset=0.3)
    params = _gn_pn_params(31, 4 if members else None)
    in_dims = (0, 0, 0, 0, 0) if members else (0, None, None, None, None)
    pick = [(lambda p, i=i: p[i] if members else p) for i in range(4)]
    if case.startswith("vmap"):
        got = vmap(lambda x, *p: _gn_pn(x, *p, u), in_dims=in_dims)(xs, *params)
        for i in range(4):
            _close(got[i], _gn_pn_oracle(xs[i], *map(pick[i], params), u), f"{case}, member {i}")
        _fused_only(gn_pn_calls, "auto", backward=False)  # (the fused kernels ran, no unfused part)
        return
    dy = _t(xs.shape[1:], 32)

    def loss(step):
        return lambda x, *p: (torch.tanh(step(x, *p, u)) * dy).sum()

    argnums = (0, 1, 2, 3, 4)
    if case == "grad":
        grads = [g.unsqueeze(0) for g in grad(loss(_gn_pn), argnums=argnums)(xs[0], *params)]
    else:
        grads = vmap(grad(loss(_gn_pn), argnums=argnums), in_dims=in_dims)(xs, *params)
    for i in range(grads[0].shape[0]):
        leaves = [t.clone().requires_grad_() for t in (xs[i], *map(pick[i], params))]
        want = torch.autograd.grad(loss(_gn_pn_oracle)(*leaves), leaves)
        for g, e, what in zip(grads, want, ("x", "weight", "bias", "proxy_bias", "proxy_weight")):
            _close(g[i], e, f"{case}, member {i}, d{what}")
    _fused_only(gn_pn_calls, "auto", backward=True)


def test_group_norm_proxy_act_jacrev_and_grad_of_grad_equal_its_definition(route, gn_pn_calls):
    """``jacrev`` (vmap of the recorded backward) and ``grad(grad)`` (the backward's own node, whose
    derivative differentiates the reference)."""
    u = NF.proxy_points(200, dtype=torch.float64)
    x = _t((2, 6, 3, 2), 33, offset=0.2)
    params = _gn_pn_params(34)
    r = _t(x.shape, 35)
    got = jacrev(lambda x: _gn_pn(x, *params, u))(x)
    want = torch.autograd.functional.jacobian(lambda x: _gn_pn_oracle(x, *params, u), x)
    _close(got, want, "jacrev")
    _fused_only(gn_pn_calls, "auto", backward=True)

    def second(step):
        inner = grad(lambda z, w: (torch.tanh(step(z, w, *params[1:], u)) * r).sum(), argnums=(0, 1))
        return grad(lambda z, w: inner(z, w)[0].square().sum() + inner(z, w)[1].sin().sum(), argnums=(0, 1))(
            x, params[0]
        )

    for g, e, what in zip(second(_gn_pn), second(_gn_pn_oracle), ("x", "weight")):
        _close(g, e, f"grad of grad w.r.t. {what}")


def test_group_norm_proxy_act_hands_float32_near_1e20_to_the_reference_inside_the_ops(route):
    """Where the float32 kernels hand a batch back (squares overflow), the ops' backend kernels compute
    it by the reference, each way (a torch.func.vjp inside the backward's kernel)."""
    u = NF.proxy_points(200, dtype=torch.float64)
    xs = (_t((3, 1, 6, 4, 2), 36) * 1e20).float()
    params = tuple(p.float() for p in _gn_pn_params(37))
    dy = _t(xs.shape[1:], 38)

    def loss(step, u):
        return lambda x, *p: (step(x, *p, u) * dy.to(x.dtype)).sum()

    in_dims = (0, None, None, None, None)
    grads = vmap(grad(loss(_gn_pn, u.float()), argnums=(0, 1)), in_dims=in_dims)(xs, *params)
    for i in range(3):
        leaves = [t.double().clone().requires_grad_() for t in (xs[i], *params)]
        want = torch.autograd.grad(loss(_gn_pn_oracle, u)(*leaves), leaves[:2])
        for g, e, scale, what in zip(grads, want, (1e-20, 1.0), ("x", "weight")):
            torch.testing.assert_close(g[i].double() / scale, e / scale, rtol=1e-4, atol=1e-4, msg=what)


def _gnp_op(x, w, b, pb, pw, u):
    return torch.ops.normkit_func.gn_proxy_act(x, w, b, pb, pw, u, 3, 1e-3, 0, 0.01, 0.03)[0]


def test_the_group_norm_proxy_op_called_eagerly_passes_gradcheck_and_refuses_a_dual_tensor():
    """The op outside torch.func: its C++ nodes, ``gradcheck`` / ``gradgradcheck`` (finite differences;
    ``check_batched_grad`` runs the backward's vmap rule), and a dual tensor refused."""
    _module_or_skip()
    assert library._func_ops_ready() and library._func_ops["gn_proxy_act"]
    u = NF.proxy_points(200, dtype=torch.float64)
    x = _t((2, 6, 2, 2), 39, offset=0.2).requires_grad_()
    params = tuple(p.clone().requires_grad_() for p in _gn_pn_params(40))
    y = _gnp_op(x, *params, u)
    _close(y, _gn_pn_oracle(x, *params, u), "output")
    assert y.grad_fn.name() == "NormkitGNProxyActBackward"
    (gx,) = torch.autograd.grad(y.sin().sum(), x, create_graph=True)
    assert gx.grad_fn.name() == "NormkitGNProxyActBackwardBackward"
    f = lambda x, *p: _gnp_op(x, *p, u)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, *params), check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, (x, *params), check_batched_grad=True)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x.detach(), torch.ones_like(x))
        with pytest.raises(RuntimeError, match="no forward-mode derivative"):
            _gnp_op(dual, *(p.detach() for p in params), u)


@pytest.mark.parametrize("activation", ["leaky_relu:0.2", "identity"])
def test_group_norm_proxy_act_ops_carry_the_activation(activation, route, gn_pn_calls):
    """The op takes the activation as its kernel code and slope: per-sample gradients and a vmap over
    per-member parameters with leaky_relu(0.2) and no activation, against the float64 definition."""
    from tests.reference import ref_group_norm

    act = (lambda t: torch.nn.functional.leaky_relu(t, 0.2)) if activation != "identity" else (lambda t: t)

    def oracle(x, w, b, pb, pw, u):
        y = ref_group_norm(x, 3, eps=1e-3)
        zp = act(w[:, None] * ((1 + pw)[:, None] * u[None, :] + pb[:, None]) + b[:, None])
        m, v = zp.mean(1), zp.var(1, unbiased=False)
        view = (1, -1, *([1] * (y.dim() - 2)))
        return (act(w.view(view) * y + b.view(view)) - m.view(view)) / torch.sqrt(v.view(view) + 0.03)

    def step(x, w, b, pb, pw, u):
        return NF.group_norm_proxy_act(x, 3, w, b, pb, pw, activation, 1e-3, points=u)

    u = NF.proxy_points(200, dtype=torch.float64)
    xs = _t((3, 1, 6, 4, 3), 41, scale=1.5, offset=0.3)
    params = _gn_pn_params(42)
    dy = _t(xs.shape[1:], 43)

    def loss(f):
        return lambda x, *p: (torch.tanh(f(x, *p, u)) * dy).sum()

    grads = vmap(grad(loss(step), argnums=(0, 1, 2, 3, 4)), in_dims=(0, None, None, None, None))(xs, *params)
    for i in range(3):
        leaves = [t.clone().requires_grad_() for t in (xs[i], *params)]
        want = torch.autograd.grad(loss(oracle)(*leaves), leaves)
        for g, e, what in zip(grads, want, ("x", "weight", "bias", "proxy_bias", "proxy_weight")):
            _close(g[i], e, f"{activation}, sample {i}, d{what}")
    members = _gn_pn_params(44, 3)
    got = vmap(lambda x, *p: step(x, *p, u))(xs, *members)
    for i in range(3):
        _close(got[i], oracle(xs[i], *(p[i] for p in members), u), f"{activation}, member {i}")
    _fused_only(gn_pn_calls, "auto", backward=True)


# --- ensembles: vmap over stacked parameters (torch.func.stack_module_state) ---------------------------
ENSEMBLE_LAYERS = {
    "GroupNorm": (lambda: __import__("normkit.nn").nn.GroupNorm(4, 8), lambda: torch.nn.GroupNorm(4, 8)),
    "InstanceNorm2d": (
        lambda: __import__("normkit.nn").nn.InstanceNorm2d(8, affine=True),
        lambda: torch.nn.InstanceNorm2d(8, affine=True),
    ),
    "LayerNorm2d(chw)": (
        lambda: __import__("normkit.nn").nn.LayerNorm2d(8, over="chw"),
        lambda: torch.nn.GroupNorm(1, 8),
    ),
}


@pytest.mark.parametrize("shared_input", [True, False], ids=["one-input", "an-input-per-member"])
@pytest.mark.parametrize("name", ENSEMBLE_LAYERS)
def test_an_ensembles_forward_normalizes_without_affine_then_applies_each_members(
    name, shared_input, monkeypatch
):
    """An ensemble's forward (``vmap`` over stacked parameters): the norm runs once without affine (on the
    shared input, or the folded batch) and each member's affine is applied after it; against a loop of
    the torch.nn layer each member replaces, in float64."""
    import copy

    from torch.func import functional_call, stack_module_state

    calls = []
    real = library._members_affine_forward
    monkeypatch.setattr(library, "_members_affine_forward", lambda *a: calls.append(1) or real(*a))
    ours, theirs = ENSEMBLE_LAYERS[name]
    torch.manual_seed(0)
    members = [ours().double() for _ in range(3)]
    with torch.no_grad():
        for m in members:
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_()
    params, buffers = stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")
    x = _t((2, 8, 3, 4), 50, scale=2.0, offset=0.5) if shared_input else _t((3, 2, 8, 3, 4), 50, offset=0.5)
    got = vmap(
        lambda p, b, x: functional_call(base, (p, b), (x,)), in_dims=(0, 0, None if shared_input else 0)
    )(params, buffers, x)
    assert calls, "the ensemble's forward did not take the per-member affine rule"
    for i, m in enumerate(members):
        ref = theirs().double()
        ref.load_state_dict({k: v for k, v in m.state_dict().items() if k in ref.state_dict()})
        _close(got[i], ref(x if shared_input else x[i]), f"{name} member {i}")


@pytest.fixture
def members_calls(monkeypatch):
    """Counts the backward calls that took the kernels' per-member sums (one call for ``dx`` and every
    member's affine gradients), and their dtypes."""
    calls: list[torch.dtype] = []
    real = kernels.norm_backward_members

    def spy(dy, *a, **k):
        got = real(dy, *a, **k)
        if got is not None:
            calls.append(dy.dtype)
        return got

    monkeypatch.setattr(kernels, "norm_backward_members", spy)
    return calls


def _per_sample_layer_norm_case(width, dtype, offset=0.5):
    from tests.reference import ref_layer_norm

    xs = _t((4, 2, 3, width), 60, scale=1.5, offset=offset)
    w, b = 1 + 0.3 * _t((width,), 61), 0.2 * _t((width,), 62)
    dy = _t((2, 3, width), 63)

    def loss(fn):
        return lambda x, w, b: (torch.tanh(fn(x, (width,), w, b)) * dy.to(x.dtype)).sum()

    got = vmap(grad(loss(NF.layer_norm), argnums=(0, 1, 2)), in_dims=(0, None, None))(
        *(t.to(dtype) for t in (xs, w, b))
    )
    want = []
    for i in range(4):
        leaves = [t.clone().requires_grad_() for t in (xs[i], w, b)]
        want.append(torch.autograd.grad(loss(ref_layer_norm)(*leaves), leaves))
    return got, want


@pytest.mark.parametrize(
    "width, dtype, tol",
    [
        (6, torch.float64, 1e-9),
        (6, torch.float32, 2e-5),
        (20000, torch.float32, 2e-5),  # past the kernels' long-row threshold: column tiles per member
        (6, torch.bfloat16, 6e-2),
    ],
    ids=["short-f64", "short-f32", "long-f32", "short-bf16"],
)
def test_per_sample_affine_gradients_of_layer_norm_come_from_one_kernel_call(
    width, dtype, tol, route, members_calls
):
    """Per-sample gradients of LayerNorm over a last dim: ``dx`` and each member's ``dweight`` /
    ``dbias`` in one call of the row kernels (no per-member pass of the reference), on both routes;
    against autograd of the float64 reference, member by member."""
    _module_or_skip()
    got, want = _per_sample_layer_norm_case(width, dtype)
    assert members_calls, "the per-member affine gradients did not come from the kernels"
    for i in range(4):
        for g, e, what in zip(got, want[i], ("dx", "dweight", "dbias")):
            assert g.dtype == dtype
            torch.testing.assert_close(
                g[i].double(),
                e,
                rtol=tol,
                atol=tol * e.abs().max().item(),
                msg=lambda m, i=i, what=what: f"member {i} {what}: {m}",
            )


def test_per_sample_layer_norm_near_1e20_takes_the_reference_and_stays_exact(members_calls):
    """float32 inputs near 1e20 (the reference's scaled statistics): the kernels hand the per-member
    sums back, and the general route gives the same gradients as the float64 reference."""
    _module_or_skip()
    from tests.reference import ref_layer_norm

    xs = (_t((3, 2, 5), 70) * 1e20 + 1e20).float()  # (squares of the deviations past float32)
    w = (1 + 0.3 * _t((5,), 71)).float()
    got = vmap(
        grad(lambda x, w: (NF.layer_norm(x, (5,), w) * torch.arange(5.0)).sum(), argnums=1), (0, None)
    )(xs, w)
    assert not members_calls
    for i in range(3):
        leaf = w.double().requires_grad_()
        want = torch.autograd.grad(
            (ref_layer_norm(xs[i].double(), (5,), leaf) * torch.arange(5.0)).sum(), leaf
        )[0]
        torch.testing.assert_close(got[i].double(), want, rtol=1e-4, atol=1e-4)


def test_grad_through_per_sample_gradients_equals_the_reference(route, members_calls):
    """Differentiating the per-sample gradients again: under an outer ``grad`` the rule keeps the op it
    records (no direct kernel call, which that transform would not see); with parameters that require
    grad the kernel's result is an autograd node whose backward differentiates the members' composite;
    against autograd of autograd of the float64 reference."""
    from tests.reference import ref_layer_norm

    xs = _t((3, 2, 4), 80, offset=0.5)
    w = 1 + 0.3 * _t((4,), 81)
    dy = _t((2, 4), 82)

    def per_sample(fn, w):
        inner = grad(lambda w, x: (torch.tanh(fn(x, (4,), w)) * dy).sum())
        return vmap(inner, in_dims=(None, 0))(w, xs)

    got = grad(lambda w: per_sample(NF.layer_norm, w).square().sum())(w)
    leaf = w.clone().requires_grad_()
    rows = []
    for i in range(3):
        out = (torch.tanh(ref_layer_norm(xs[i], (4,), leaf)) * dy).sum()
        rows.append(torch.autograd.grad(out, leaf, create_graph=True)[0])
    want = torch.autograd.grad(torch.stack(rows).square().sum(), leaf)[0]
    _close(got, want, "grad of per-sample dweight")
    assert not members_calls
    # autograd on parameters that require grad, through the per-sample gradients
    leaf2 = w.clone().requires_grad_()
    (g2,) = torch.autograd.grad(per_sample(NF.layer_norm, leaf2).square().sum(), leaf2)
    _close(g2, want, "autograd through per-sample dweight")
    assert members_calls or kernels.current() != "auto" or _build.autograd_module() is None


def test_per_sample_gradients_of_group_norm_on_features_come_from_one_kernel_call(route, members_calls):
    """GroupNorm of ``(N, C)`` features (an MLP's): the same row kernels with groups, per member."""
    _module_or_skip()
    from tests.reference import ref_group_norm

    xs, w, b, dy = (
        _t((5, 3, 12), 90, offset=0.5),
        1 + 0.3 * _t((12,), 91),
        0.2 * _t((12,), 92),
        _t((3, 12), 93),
    )

    def loss(fn):
        return lambda x, w, b: (torch.tanh(fn(x, 4, w, b)) * dy).sum()

    got = vmap(grad(loss(NF.group_norm), argnums=(0, 1, 2)), in_dims=(0, None, None))(xs, w, b)
    assert members_calls
    for i in range(5):
        leaves = [t.clone().requires_grad_() for t in (xs[i], w, b)]
        want = torch.autograd.grad(loss(ref_group_norm)(*leaves), leaves)
        for g, e, what in zip(got, want, ("dx", "dweight", "dbias")):
            _close(g[i], e, f"member {i} {what}")


@pytest.mark.parametrize("width", [6, 20000], ids=["short", "long"])
def test_an_ensemble_of_layer_norms_takes_the_member_kernel_and_equals_torch_nn(width, route, members_calls):
    """torch.func's model ensembling (``stack_module_state``, one input every member shares) of two
    LayerNorms over the last dim with a tanh between: the first one's backward has the shared input
    and each member's affine, the second's each member's input and affine; short rows take one kernel
    call each; against a loop of torch.nn.LayerNorm in float64."""
    import copy

    from torch.func import functional_call, stack_module_state

    _module_or_skip()
    import normkit.nn as nkn

    torch.manual_seed(1)
    members = [
        torch.nn.Sequential(nkn.LayerNorm(width), torch.nn.Tanh(), nkn.LayerNorm(width)).double()
        for _ in range(3)
    ]
    with torch.no_grad():
        for m in members:
            for p in m.parameters():
                p.uniform_(0.5, 1.5)
    params, buffers = stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")
    x = _t((2, 3, width), 95, scale=2.0, offset=0.5)
    dy = _t((2, 3, width), 96)

    def loss(p, b, x):
        return (functional_call(base, (p, b), (x,)) * dy).sum()

    # stack_module_state's parameters require grad (the rule's result is then an autograd node); detached
    for detached in (True, False):
        members_calls.clear()
        ps = {k: v.detach() for k, v in params.items()} if detached else params
        got = vmap(grad(loss), in_dims=(0, 0, None))(ps, buffers, x)
        assert len(members_calls) == (2 if width == 6 else 0)  # (long rows: the general route)
        for i, m in enumerate(members):
            ref = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Tanh(), torch.nn.LayerNorm(width))
            ref = ref.double()
            ref.load_state_dict(m.state_dict())
            want = torch.autograd.grad((ref(x) * dy).sum(), list(ref.parameters()))
            for (k, _), e in zip(ref.named_parameters(), want):
                _close(got[k][i], e, f"member {i} {k}")
