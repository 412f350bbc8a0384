"""The functional ops' C++ entry points (``normkit.kernels._fast.checked``).

On an eligible eager CPU call, ``F.group_norm`` / ``F.layer_norm`` / ``F.layer_norm_2d`` /
``F.batch_norm`` (batch statistics) hand their Python arguments straight to the C++ node, which
checks them and runs the fused kernel. The contract tested here:

* every argument combination it accepts gives torch.nn.functional's output (and gradients), with the
  kernel pattern the layout calls for;
* every argument it does not take exactly (wrong shape, dtype, device-less stand-ins, a bool group
  count, an int eps, a lone affine, an odd layout...) returns ``None``, so that the general path
  runs: the public call then raises normkit's typed error, or computes the unusual case, exactly as
  under the reference backend.
"""

from __future__ import annotations

import pytest
import torch

import normkit.functional as F
from normkit import kernels
from normkit.kernels import _build, _fast, _plan

TF = torch.nn.functional
pytestmark = pytest.mark.skipif(
    _build.autograd_module() is None, reason="the C++ autograd node does not build here (no compiler)"
)


def _x(shape=(3, 8, 5, 7), layout="nchw", dtype=torch.float32, grad=True):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=dtype) * 2 + 0.5
    if layout == "cl":
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x.requires_grad_(grad)


def _wb(n=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    w = (1 + 0.3 * torch.randn(n, generator=g, dtype=dtype)).requires_grad_()
    b = (0.3 * torch.randn(n, generator=g, dtype=dtype)).requires_grad_()
    return w, b


def _check_grads(y, y_ref, inputs):
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=y.dtype)
    g = torch.autograd.grad(y, inputs, dy)
    g_ref = torch.autograd.grad(y_ref, inputs, dy)
    for a, e in zip(g, g_ref):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


ACCEPTED = [  # (name, op, args after x, torch's call on (x, *args), expected pattern by layout)
    ("gn4", "group_norm", lambda w, b: (4, w, b, 1e-5), lambda x, w, b: TF.group_norm(x, 4, w, b)),
    (
        "gn1-noaffine",
        "group_norm",
        lambda w, b: (1, None, None, 1e-3),
        lambda x, w, b: TF.group_norm(x, 1, eps=1e-3),
    ),
    ("gn8", "group_norm", lambda w, b: (8, w, b, 1e-5), lambda x, w, b: TF.group_norm(x, 8, w, b)),
    (
        "ln-chw",
        "layer_norm",
        lambda w, b: ((8, 5, 7), None, None, 1e-5),
        lambda x, w, b: TF.layer_norm(x, (8, 5, 7)),
    ),
    (
        "ln-last-int",
        "layer_norm",
        lambda w, b: (
            7,
            w[:7].detach().clone().requires_grad_(),
            b[:7].detach().clone().requires_grad_(),
            1e-5,
        ),
        None,  # built from the args below
    ),
    (
        "ln2d",
        "layer_norm_2d",
        lambda w, b: (w, b, 1e-6),
        lambda x, w, b: TF.layer_norm(x.permute(0, 2, 3, 1), (8,), w, b, 1e-6).permute(0, 3, 1, 2),
    ),
]


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("case", ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_accepted_arguments_run_the_kernel_and_match_torch(case, layout):
    name, op, args, ref = case
    x = _x(layout=layout)
    w, b = _wb()
    a = args(w, b)
    with kernels.use("auto"):
        y = _fast.checked(op, x, *a)
    if op == "layer_norm" and layout == "cl":  # rows of a non-contiguous x: the general path
        assert y is None
        return
    assert y is not None
    mode = _plan.MODES[_fast._node().last_mode()]
    expected = {
        ("group_norm", "nchw"): "group_nchw",
        ("group_norm", "cl"): "group_cl",
        ("layer_norm", "nchw"): "group_nchw",
        ("layer_norm_2d", "nchw"): "channel_nchw",
        ("layer_norm_2d", "cl"): "group_nchw",
    }[(op, layout)]
    assert mode == expected
    if ref is None:  # ln-last-int: the trailing dim with an element-wise affine
        y_ref = TF.layer_norm(x, (7,), a[1], a[2])
    else:
        y_ref = ref(x, w, b)
    assert y.stride() == x.stride()  # the output keeps the input's layout
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    inputs = [x] + [t for t in a if isinstance(t, torch.Tensor)]
    _check_grads(y, y_ref, inputs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_accepted_dtypes_and_float32_affine_for_half_inputs(dtype):
    x = _x(dtype=dtype, grad=False)
    pd = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w, b = _wb(dtype=pd)
    y = _fast.checked("group_norm", x, 4, w, b, 1e-5)
    assert y is not None and y.dtype == dtype
    y_ref = TF.group_norm(x.double(), 4, w.double(), b.double())
    tol = 1e-10 if dtype == torch.float64 else 3e-2
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)


def test_batch_norm_accepted_forms_match_torch_and_leave_the_given_statistics_alone():
    x = _x()
    w, b = _wb()
    rm, rv, nbt = torch.randn(8), torch.rand(8) + 0.5, torch.tensor(4)
    saved = (rm.clone(), rv.clone(), nbt.clone())
    out = _fast.checked("batch_norm", x, rm, rv, w, b, True, 0.2, 1e-5, nbt, True)
    assert out is not None
    y, rm2, rv2, nbt2 = out
    rm_ref, rv_ref = rm.clone(), rv.clone()
    y_ref = TF.batch_norm(x, rm_ref, rv_ref, w, b, training=True, momentum=0.2)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rm2, rm_ref)
    torch.testing.assert_close(rv2, rv_ref)
    assert int(nbt2) == 5
    for t, s in zip((rm, rv, nbt), saved):  # the functional contract: never written in place
        assert torch.equal(t, s)
    _check_grads(y, y_ref, [x, w, b])
    # no running statistics: the given (absent) ones come back as they were
    y, rm2, rv2, nbt2 = _fast.checked("batch_norm", x, None, None, None, None, False, 0.1, 1e-5, None, True)
    assert rm2 is None and rv2 is None and nbt2 is None
    torch.testing.assert_close(y, TF.batch_norm(x, None, None, training=True), rtol=1e-5, atol=1e-5)
    # a cumulative average (momentum None) with the counter
    y, rm2, rv2, nbt2 = _fast.checked("batch_norm", x, rm, rv, w, b, True, None, 1e-5, nbt, False)
    mean = x.detach().mean((0, 2, 3))
    var = x.detach().var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(rm2, rm + (mean - rm) / 5, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv2, rv + (var - rv) / 5, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "shape,layout",
    [
        ((3, 8, 5, 7), "nchw"),
        ((3, 8, 5, 7), "cl"),
        ((1, 8, 1, 1), "nchw"),
        ((6, 8), "nchw"),
        ((2, 8, 3), "nchw"),
    ],
)
def test_batch_norm_eval_is_atens_affine_map_of_the_given_statistics(shape, layout):
    """Running statistics in eval: ATen's batch_norm of them, the given buffers handed back as they were
    (the same objects); one value per channel and a cumulative momentum without a counter are fine here."""
    x = _x(shape, layout)
    w, b = _wb()
    rm, rv, nbt = torch.randn(8), torch.rand(8) + 0.5, torch.tensor(3)
    saved = (rm.clone(), rv.clone())
    for momentum, counter in ((0.1, nbt), (None, None)):
        out = _fast.checked("batch_norm", x, rm, rv, w, b, False, momentum, 1e-3, counter, True)
        assert out is not None
        y, rm2, rv2, nbt2 = out
        assert rm2 is rm and rv2 is rv and nbt2 is counter
        y_ref = TF.batch_norm(x, rm.clone(), rv.clone(), w, b, training=False, eps=1e-3)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        _check_grads(y, y_ref, [x, w, b])
    assert torch.equal(rm, saved[0]) and torch.equal(rv, saved[1])


x4 = _x(grad=False)
w8, b8 = torch.ones(8), torch.zeros(8)
REFUSED = [  # (why, op, x, args): the C++ entry hands these to the general path
    ("bool groups", "group_norm", x4, (True, w8, b8, 1e-5)),
    ("float groups", "group_norm", x4, (4.0, w8, b8, 1e-5)),
    ("groups not dividing C", "group_norm", x4, (3, w8, b8, 1e-5)),
    ("zero groups", "group_norm", x4, (0, w8, b8, 1e-5)),
    ("negative groups", "group_norm", x4, (-2, w8, b8, 1e-5)),
    ("huge groups", "group_norm", x4, (2**80, w8, b8, 1e-5)),
    ("int eps", "group_norm", x4, (4, w8, b8, 0)),
    ("negative eps", "group_norm", x4, (4, w8, b8, -1e-5)),
    ("nan eps", "group_norm", x4, (4, w8, b8, float("nan"))),
    ("weight too short", "group_norm", x4, (4, torch.ones(4), b8, 1e-5)),
    ("weight 2-d", "group_norm", x4, (4, torch.ones(1, 8), b8, 1e-5)),
    ("weight float64", "group_norm", x4, (4, w8.double(), b8, 1e-5)),
    ("weight a list", "group_norm", x4, (4, [1.0] * 8, b8, 1e-5)),
    ("lone weight", "group_norm", x4, (4, w8, None, 1e-5)),
    ("one value per group", "group_norm", torch.randn(2, 8, 1, 1), (8, w8, b8, 1e-5)),
    ("2-d input", "group_norm", torch.randn(4, 8), (4, w8, b8, 1e-5)),
    ("integer input", "group_norm", torch.ones(2, 8, 3, 3, dtype=torch.int64), (4, w8, b8, 1e-5)),
    ("strided input", "group_norm", torch.randn(3, 8, 5, 14)[..., ::2], (4, w8, b8, 1e-5)),
    ("empty input", "group_norm", torch.randn(0, 8, 5, 5), (4, w8, b8, 1e-5)),
    ("not a tensor", "group_norm", [[1.0]], (4, w8, b8, 1e-5)),
    ("shape mismatch", "layer_norm", x4, ((8, 5, 6), None, None, 1e-5)),
    ("shape too long", "layer_norm", x4, ((1, 3, 8, 5, 7), None, None, 1e-5)),
    ("empty shape", "layer_norm", x4, ((), None, None, 1e-5)),
    ("shape of floats", "layer_norm", x4, ((5.0, 7.0), None, None, 1e-5)),
    ("shape a string", "layer_norm", x4, ("57", None, None, 1e-5)),
    ("one value per row", "layer_norm", x4, (1, None, None, 1e-5)),
    ("affine of the wrong shape", "layer_norm", x4, ((5, 7), torch.ones(35), torch.zeros(35), 1e-5)),
    ("non-contiguous affine", "layer_norm", x4, ((5, 7), torch.ones(7, 5).t(), torch.zeros(5, 7), 1e-5)),
    ("channels-last rows", "layer_norm", x4.to(memory_format=torch.channels_last), (7, None, None, 1e-5)),
    ("one channel", "layer_norm_2d", torch.randn(2, 1, 4, 4), (None, None, 1e-5)),
    ("weight of the wrong size", "layer_norm_2d", x4, (torch.ones(7), torch.zeros(7), 1e-5)),
    (  # (float32 statistics and affine for a half input are ATen's mixed-dtype op: taken, test below)
        "eval, float32 running stats with a half weight for a half input",
        "batch_norm",
        x4.half(),
        (w8, w8 + 1, w8.half(), None, False, 0.1, 1e-5, None, True),
    ),
    (
        "eval, channels-last input with a size-1 dim that needs a gradient",  # ATen's CPU backward errs
        "batch_norm",
        torch.randn(2, 5, 8, 1).permute(0, 2, 3, 1).requires_grad_(),
        (w8, w8 + 1, None, None, False, 0.1, 1e-5, None, True),
    ),
    ("eval, int eps", "batch_norm", x4, (w8, w8 + 1, None, None, False, 0.1, 0, None, True)),
    ("one running stat", "batch_norm", x4, (w8, None, None, None, True, 0.1, 1e-5, None, True)),
    ("momentum out of range", "batch_norm", x4, (None, None, None, None, True, 1.5, 1e-5, None, True)),
    ("int momentum", "batch_norm", x4, (None, None, None, None, True, 1, 1e-5, None, True)),
    ("truthy training", "batch_norm", x4, (None, None, None, None, 1, 0.1, 1e-5, None, True)),
    ("cumulative without counter", "batch_norm", x4, (w8, w8 + 1, None, None, True, None, 1e-5, None, True)),
    (
        "float64 running stats",
        "batch_norm",
        x4,
        (w8.double(), w8.double(), None, None, True, 0.1, 1e-5, None, True),
    ),
    ("float counter", "batch_norm", x4, (w8, w8 + 1, None, None, True, 0.1, 1e-5, torch.tensor(1.0), True)),
    (
        "one value per channel",
        "batch_norm",
        torch.randn(1, 8),
        (None, None, None, None, True, 0.1, 1e-5, None, True),
    ),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_arguments_go_to_the_general_path(case):
    _, op, x, args = case
    assert _fast.checked(op, x, *args) is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_eval_half_input_with_float32_statistics_is_atens_mixed_dtype_op(dtype):
    """A half input with float32 running statistics and affine (a float32 model fed half activations):
    ATen's mixed-dtype eval op, as torch.nn's BatchNorm runs it (the half input kept for the backward,
    no float32 copy), with torch.nn's output and gradients."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 7).to(dtype).requires_grad_()
    rm, rv, w, b = torch.randn(8), torch.rand(8) + 0.5, torch.randn(8).requires_grad_(), torch.randn(8)
    out = _fast.checked("batch_norm", x, rm, rv, w, b, False, 0.1, 1e-5, None, True)
    assert out is not None
    y = out[0]
    xt = x.detach().clone().requires_grad_()
    wt = w.detach().clone().requires_grad_()
    ref = torch.nn.functional.batch_norm(xt, rm, rv, wt, b, False, 0.1, 1e-5)
    assert y.dtype == dtype and torch.equal(y, ref)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    assert torch.equal(x.grad, xt.grad) and torch.equal(w.grad, wt.grad)


PUBLIC = {
    "group_norm": lambda x, *a: F.group_norm(x, *a),
    "layer_norm": lambda x, *a: F.layer_norm(x, *a),
    "layer_norm_2d": lambda x, *a: F.layer_norm_2d(x, *a),
    "batch_norm": lambda x, rm, rv, w, b, t, m, e, n, u: (
        F.batch_norm(x, rm, rv, w, b, t, m, e, n, unbiased_running_var=u).output
    ),
}


def _outcome(fn):
    try:
        return fn()
    except Exception as e:  # the general path's typed error
        return type(e), str(e)


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_arguments_behave_as_under_the_reference_backend(case):
    """Errors: same type and message; computed cases: the same values."""
    _, op, x, args = case
    with kernels.use("auto"):
        fast = _outcome(lambda: PUBLIC[op](x, *args))
    with kernels.use("reference"):
        ref = _outcome(lambda: PUBLIC[op](x, *args))
    if isinstance(ref, tuple):
        assert fast == ref
    else:
        assert isinstance(fast, torch.Tensor)
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
