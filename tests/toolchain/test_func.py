"""torch.func and autograd on every sample layer and functional op, float64, against independent oracles.

The oracles are never normkit's own transforms: per-sample gradients from ``vmap(grad(...))`` are
checked against a Python loop of ordinary autograd, ``jvp`` against central finite differences,
``jacrev`` against ``torch.autograd.functional.jacobian``, the functional ops with
``gradcheck`` / ``gradgradcheck`` (finite differences), and forward-mode AD on dual tensors against
the float64 ``torch.nn`` layer.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad as fwAD
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call

import normkit.functional as NF
import normkit.nn as nkn
from tests.toolchain.samples import SAMPLES, Sample

F64 = torch.float64

MODES = [pytest.param(True, id="train"), pytest.param(False, id="eval")]

# vmap per-sample gradients: batch-independent layers in training, every layer in eval.
# (Stateful BN in training mode is out of scope for vmap, as in torch.)
PER_SAMPLE_CASES = [pytest.param(s, True, id=f"{s.name}-train") for s in SAMPLES if s.batch_free] + [
    pytest.param(s, False, id=f"{s.name}-eval") for s in SAMPLES
]
# jvp / jacrev w.r.t. parameters: the samples that have any (InstanceNorm1d has none)
PARAM_CASES = [
    pytest.param(s, t, id=f"{s.name}-{'train' if t else 'eval'}")
    for s in SAMPLES
    if any(True for _ in s.build().parameters())
    for t in (True, False)
]
ALL_CASES = [
    pytest.param(s, t, id=f"{s.name}-{'train' if t else 'eval'}") for s in SAMPLES for t in (True, False)
]


def _params(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.named_parameters()}


def _buffers(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.named_buffers()}


def _call(m: nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor):
    """The module on ``params`` and a *fresh copy* of ``buffers`` (so a training step's running-statistics
    update never leaks from one evaluation into the next: every call sees the same function)."""
    fresh = {k: v.clone() for k, v in buffers.items()}
    return functional_call(m, {**params, **fresh}, (x,))


def _weights(shape: torch.Size | tuple[int, ...], seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=g, dtype=F64)


def _tangent_like(t: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t.shape, generator=g, dtype=t.dtype)


# --- per-sample gradients: vmap(grad) vs a loop of ordinary autograd --------------------------


@pytest.mark.parametrize("sample, train", PER_SAMPLE_CASES)
def test_vmap_grad_per_sample_gradients_equal_a_loop(sample: Sample, train: bool):
    m = sample.module(train, F64)
    x = sample.input(F64)
    params, buffers = _params(m), _buffers(m)
    w = _weights((1, *x.shape[1:]))

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        y = functional_call(m, {**p, **buffers}, (xi.unsqueeze(0),))
        return (y * w).sum()

    got_p, got_x = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, 0))(params, x)

    for i in range(x.shape[0]):
        ref = sample.module(train, F64)
        xi = x[i : i + 1].detach().clone().requires_grad_(True)
        names = [k for k, _ in ref.named_parameters()]
        out = (ref(xi) * w).sum()
        grads = torch.autograd.grad(out, [xi, *ref.parameters()], allow_unused=True)
        torch.testing.assert_close(got_x[i], grads[0][0], rtol=1e-9, atol=1e-10)
        for k, g in zip(names, grads[1:]):
            want = torch.zeros_like(params[k]) if g is None else g
            torch.testing.assert_close(
                got_p[k][i], want, rtol=1e-9, atol=1e-10, msg=lambda s, i=i, k=k: f"sample {i}, {k}: {s}"
            )
    # buffers read by vmap were never written (eval, or a batch-free layer)
    for k, v in buffers.items():
        torch.testing.assert_close(v, dict(m.named_buffers())[k], rtol=1e-12, atol=1e-12)


# --- jvp vs central finite differences ---------------------------------------------------------

H = 1e-6


def _assert_matches_fd(jvp_out: torch.Tensor, fd: torch.Tensor, what: str) -> None:
    scale = max(1.0, fd.abs().max().item())
    torch.testing.assert_close(jvp_out, fd, rtol=1e-6, atol=1e-6 * scale, msg=lambda s: f"{what}: {s}")


@pytest.mark.parametrize("sample, train", ALL_CASES)
def test_jvp_wrt_input_equals_central_finite_differences(sample: Sample, train: bool):
    m = sample.module(train, F64)
    x = sample.input(F64)
    params, buffers = _params(m), _buffers(m)
    t = _tangent_like(x, 11)

    def f(xx: torch.Tensor) -> torch.Tensor:
        return _call(m, params, buffers, xx)

    y, jv = torch.func.jvp(f, (x,), (t,))
    with torch.no_grad():
        # torch.func runs the core's scaled path, plain eager CPU its unscaled one: same maths, other rounding
        torch.testing.assert_close(y, f(x), rtol=1e-12, atol=1e-12)
        fd = (f(x + H * t) - f(x - H * t)) / (2 * H)
    if train and sample.name.startswith("BatchRenorm"):
        # r and d are stop-gradient constants (the paper's rule), so the derivative the layer defines
        # is not the forward's finite difference; the oracle is reverse-mode autograd's Jacobian
        # (jvp and vjp must describe the same linear map).
        jac = torch.autograd.functional.jacobian(f, x)
        want = (jac.reshape(x.numel(), x.numel()) @ t.reshape(-1)).reshape(x.shape)
        torch.testing.assert_close(jv, want, rtol=1e-9, atol=1e-10)
        assert (jv - fd).abs().max() > 1e-3, "r and d must not be differentiated"
        return
    _assert_matches_fd(jv, fd, "d/dx")


@pytest.mark.parametrize("sample, train", PARAM_CASES)
def test_jvp_wrt_parameters_equals_central_finite_differences(sample: Sample, train: bool):
    m = sample.module(train, F64)
    x = sample.input(F64)
    params, buffers = _params(m), _buffers(m)
    assert params
    tangents = {k: _tangent_like(v, 20 + i) for i, (k, v) in enumerate(params.items())}

    def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return _call(m, p, buffers, x)

    _, jv = torch.func.jvp(f, (params,), (tangents,))
    with torch.no_grad():
        plus = {k: v + H * tangents[k] for k, v in params.items()}
        minus = {k: v - H * tangents[k] for k, v in params.items()}
        fd = (f(plus) - f(minus)) / (2 * H)
    _assert_matches_fd(jv, fd, "d/dparams")


# --- jacrev vs torch.autograd.functional.jacobian -----------------------------------------------


@pytest.mark.parametrize("sample, train", PARAM_CASES)
def test_jacrev_wrt_parameters_equals_autograd_jacobian(sample: Sample, train: bool):
    m = sample.module(train, F64)
    x = sample.input(F64)
    params, buffers = _params(m), _buffers(m)
    assert params
    # a fixed projection of the output keeps autograd's row-by-row jacobian small
    proj = _weights((x.numel(), 8), seed=5) / x.numel() ** 0.5

    def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return _call(m, p, buffers, x).reshape(-1) @ proj

    got = torch.func.jacrev(f)(params)
    names = list(params)

    def g(*ps: torch.Tensor) -> torch.Tensor:
        return f(dict(zip(names, ps)))

    want = torch.autograd.functional.jacobian(g, tuple(params.values()))
    for k, w in zip(names, want):
        assert got[k].shape == w.shape == (8, *params[k].shape)
        torch.testing.assert_close(got[k], w, rtol=1e-9, atol=1e-11, msg=lambda s, k=k: f"{k}: {s}")
    # the Jacobian is not trivially zero
    assert any(float(w.abs().max()) > 1e-3 for w in want)


# --- gradcheck / gradgradcheck on the functional ops -------------------------------------------

SHAPE = (3, 4, 3, 3)
EPS = 1e-3


def _rand(shape: tuple[int, ...], seed: int, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) * scale + offset).requires_grad_(True)


def _mask(shape: tuple[int, ...], seed: int, p: float = 0.7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=F64) < p


def _bn(mask: bool):
    rm, rv = torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64)
    mk = _mask(SHAPE, 40) if mask else None

    def fn(x, w, b):
        return NF.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=EPS, mask=mk).output

    return fn, (_rand(SHAPE, 1, 1.5, 0.3), _rand((4,), 2, 0.3, 1.0), _rand((4,), 3, 0.3))


def _gn(mask: bool):
    mk = _mask(SHAPE, 41) if mask else None

    def fn(x, w, b):
        return NF.group_norm(x, 2, w, b, EPS, mask=mk)

    return fn, (_rand(SHAPE, 4, 1.5, 0.3), _rand((4,), 5, 0.3, 1.0), _rand((4,), 6, 0.3))


def _ln(mask: bool):
    mk = _mask(SHAPE, 42) if mask else None

    def fn(x, w, b):
        return NF.layer_norm(x, (3, 3), w, b, EPS, mask=mk)

    return fn, (_rand(SHAPE, 7, 1.5, 0.3), _rand((3, 3), 8, 0.3, 1.0), _rand((3, 3), 9, 0.3))


def _ln2d(over: str):
    def fn(x, w, b):
        return NF.layer_norm_2d(x, w, b, EPS, over=over)

    return fn, (_rand(SHAPE, 10, 1.5, 0.3), _rand((4,), 11, 0.3, 1.0), _rand((4,), 12, 0.3))


def _in():
    rm, rv = torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64)

    def fn(x, w, b):
        return NF.instance_norm(x, rm, rv, w, b, use_input_stats=True, momentum=0.1, eps=EPS).output

    return fn, (_rand(SHAPE, 13, 1.5, 0.3), _rand((4,), 14, 0.3, 1.0), _rand((4,), 15, 0.3))


def _pn(act: str):
    def fn(y, w, b, pb, pw):
        return NF.proxy_norm_act(y, w, b, pb, pw, act)

    return fn, (
        _rand(SHAPE, 16),
        _rand((4,), 17, 0.3, 1.0),
        _rand((4,), 18, 0.3),
        _rand((4,), 19, 0.2),
        _rand((4,), 20, 0.2),
    )


FUNCTIONAL_CASES = {
    "batch_norm": lambda: _bn(False),
    "batch_norm-mask": lambda: _bn(True),
    "group_norm": lambda: _gn(False),
    "group_norm-mask": lambda: _gn(True),
    "layer_norm": lambda: _ln(False),
    "layer_norm-mask": lambda: _ln(True),
    "layer_norm_2d-c": lambda: _ln2d("c"),
    "layer_norm_2d-chw": lambda: _ln2d("chw"),
    "instance_norm": _in,
    "proxy_norm_act-relu": lambda: _pn("relu"),
    "proxy_norm_act-silu": lambda: _pn("silu"),
    "proxy_norm_act-gelu": lambda: _pn("gelu"),
}


@pytest.mark.parametrize("name", list(FUNCTIONAL_CASES))
def test_functional_gradcheck_batched_and_forward_ad(name: str):
    fn, inputs = FUNCTIONAL_CASES[name]()
    assert gradcheck(
        fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, check_batched_grad=True, check_forward_ad=True
    )


@pytest.mark.parametrize("name", list(FUNCTIONAL_CASES))
def test_functional_gradgradcheck(name: str):
    fn, inputs = FUNCTIONAL_CASES[name]()
    assert gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_masks_are_non_trivial():
    """The random masks leave some positions out and keep most (so the masked cases test something)."""
    for seed in (40, 41, 42):
        mk = _mask(SHAPE, seed)
        assert 0 < int(mk.sum()) < mk.numel()


# --- forward-mode AD with dual tensors vs torch.nn ---------------------------------------------


def _gn_pair():
    ours = nkn.GroupNorm(2, 6).to(F64)
    ref = nn.GroupNorm(2, 6).to(F64)
    return ours, ref


def _bn_pair():
    ours = nkn.BatchNorm2d(6).to(F64)
    ref = nn.BatchNorm2d(6).to(F64)
    return ours, ref


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("pair", [_gn_pair, _bn_pair], ids=["GroupNorm", "BatchNorm2d"])
def test_forward_ad_dual_tensors_equal_torch_nn(pair, train: bool):
    ours, ref = pair()
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=F64))
        for name, buf in ours.named_buffers():
            if name == "running_mean":
                buf.normal_(0.0, 0.3, generator=g)
            elif name == "running_var":
                buf.uniform_(0.5, 1.5, generator=g)
    ref.load_state_dict(ours.state_dict())
    ours.train(train)
    ref.train(train)
    x = torch.randn(4, 6, 5, 5, generator=g, dtype=F64) * 1.5 + 0.3
    t = torch.randn(x.shape, generator=g, dtype=F64)
    tw = torch.randn(6, generator=g, dtype=F64)
    results = []
    for m in (ours, ref):
        with fwAD.dual_level():
            # tangents on the input and on the weight (a dual parameter, swapped in by functional_call)
            dual_x = fwAD.make_dual(x, t)
            dual_w = fwAD.make_dual(m.weight.detach(), tw)
            y = functional_call(m, {"weight": dual_w}, (dual_x,), strict=False)
            primal, tangent = fwAD.unpack_dual(y)
            assert tangent is not None
            results.append((primal.clone(), tangent.clone()))
    (y_ours, t_ours), (y_ref, t_ref) = results
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(t_ours, t_ref, rtol=1e-9, atol=1e-10)
    ref_buffers = dict(ref.named_buffers())
    for k, a in ours.named_buffers():
        if k in ref_buffers:
            torch.testing.assert_close(
                a, ref_buffers[k], rtol=1e-12, atol=1e-12, msg=lambda s, k=k: f"buffer {k}: {s}"
            )
