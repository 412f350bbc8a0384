"""The ``normkit_func`` ops: normkit's norm under ``torch.func`` as dispatcher ops with C++ autograd.

Under a transform, an ``autograd.Function`` costs about 0.25 ms of torch's Python per call, two per
norm under ``grad``; the optional C++ module (``kernels/csrc/autograd.cpp``) records the same
derivatives as C++ nodes, as torch's own norms do, and :func:`normkit.ops.library.norm` takes them
under every transform but ``jvp`` / forward AD (no forward-mode rule there: the Functions keep those).

Each case asserts two things: the transform ran without normkit's Python Functions (they are made to
raise), and its result equals a loop of the float64 reference (``tests/reference.py``) or autograd of
it. The Functions' own path (a machine without the C++ module) is checked against the same oracles.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

from normkit import kernels
from normkit.kernels import _build
from normkit.ops import library
from tests.toolchain.test_func_rules import OPS, SHAPE, _affine, _close, _t  # the same ops and oracles


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
