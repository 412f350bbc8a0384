"""The fused CPU kernels (``normkit.kernels``) against the float64 oracle and the reference backend.

Every case runs the same public op on the ``"cpu"`` backend (fp32 / fp64 / fp16 / bf16, NCHW and
channels_last) and compares the output and every gradient with ``tests.reference`` in float64
(autograd through the oracle gives the gradients), plus the dispatch rules, the layers' fused
fast paths (running statistics included), the numerics cases of TESTING.md and the build fallback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import normkit
import normkit.functional as F
from normkit import kernels
from normkit.kernels import plan
from normkit.ops import core
from tests.reference import (
    ref_batch_norm,
    ref_group_norm,
    ref_instance_norm,
    ref_layer_norm,
    ref_layer_norm_2d,
)

F64 = torch.float64
pytestmark = pytest.mark.skipif(
    not kernels.build(), reason="no C++ compiler here: the fused CPU kernels cannot be built"
)

# relative tolerance on the output scale, per input dtype
TOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.float16: 4e-3, torch.bfloat16: 3e-2}
GTOL = {torch.float32: 2e-4, torch.float64: 1e-9, torch.float16: 2e-2, torch.bfloat16: 1e-1}

# (name, normkit op, float64 oracle) with (x, w, b) -> y; w, b per channel unless noted
OPS = {
    "bn": (
        lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True).output,
        lambda x, w, b: ref_batch_norm(x, None, None, w, b, training=True).output,
    ),
    "gn4": (lambda x, w, b: F.group_norm(x, 4, w, b), lambda x, w, b: ref_group_norm(x, 4, w, b)),
    "gn1": (lambda x, w, b: F.group_norm(x, 1, w, b), lambda x, w, b: ref_group_norm(x, 1, w, b)),
    "in": (
        lambda x, w, b: F.instance_norm(x, weight=w, bias=b).output,
        lambda x, w, b: ref_instance_norm(x, weight=w, bias=b).output,
    ),
    "ln2d": (lambda x, w, b: F.layer_norm_2d(x, w, b), lambda x, w, b: ref_layer_norm_2d(x, w, b)),
    "ln_chw": (
        lambda x, w, b: F.layer_norm(x, x.shape[1:], w, b),
        lambda x, w, b: ref_layer_norm(x, x.shape[1:], w, b),
    ),
}


def _params(
    name: str, shape: tuple[int, ...], affine: bool, seed: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if not affine:
        return None, None
    g = torch.Generator().manual_seed(seed)
    pshape = tuple(shape[1:]) if name == "ln_chw" else (shape[1],)
    return 1 + 0.3 * torch.randn(pshape, generator=g, dtype=F64), 0.3 * torch.randn(
        pshape, generator=g, dtype=F64
    )


def _run(fn, x, w, b, dy, dtype, backend):
    pdtype = F64 if dtype == F64 else torch.float32
    xs = x.to(dtype).detach().requires_grad_()
    ws = None if w is None else w.to(pdtype).detach().requires_grad_()
    bs = None if b is None else b.to(pdtype).detach().requires_grad_()
    with kernels.use(backend):
        y = fn(xs, ws, bs)
        y.backward(dy.to(dtype))
    return y, [t.grad for t in (xs, ws, bs) if t is not None]


def _oracle(ref, x, w, b, dy):
    xs = x.detach().clone().requires_grad_()
    ws = None if w is None else w.detach().clone().requires_grad_()
    bs = None if b is None else b.detach().clone().requires_grad_()
    y = ref(xs, ws, bs)
    y.backward(dy)
    return y, [t.grad for t in (xs, ws, bs) if t is not None]


def _close(got, exp, rtol):
    scale = exp.abs().max().clamp_min(1e-3)
    err = (got.double() - exp).abs().max() / scale
    assert err <= rtol, f"relative error {err:.3g} > {rtol:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("name", list(OPS))
def test_every_op_matches_float64_oracle(name, layout, dtype):
    fn, ref = OPS[name]
    shape = (4, 8, 6, 7)
    g = torch.Generator().manual_seed(hash((name, layout)) % 1000)
    x = 2.0 + 3.0 * torch.randn(shape, generator=g, dtype=F64)
    dy = torch.randn(shape, generator=g, dtype=F64)
    if layout == "cl":
        x, dy = x.to(memory_format=torch.channels_last), dy.to(memory_format=torch.channels_last)
    w, b = _params(name, shape, True, 1)
    y, grads = _run(fn, x, w, b, dy, dtype, "cpu")
    ey, egrads = _oracle(ref, x, w, b, dy.to(dtype).double())
    _close(y, ey, TOL[dtype])
    for got, exp in zip(grads, egrads):
        _close(got, exp, GTOL[dtype])
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and grads[0].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("threads", [1, 4])  # 1: a sample per task; 4 > N: the blocked two-phase kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["gn4", "in", "gn1"])
def test_channels_last_group_kernels_on_both_schedules(name, dtype, threads):
    """GroupNorm on channels_last runs one sample per task when N >= threads (the forward only up to
    8 MB), else the blocked kernels."""
    fn, ref = OPS[name]
    shape = (3, 8, 9, 5)
    g = torch.Generator().manual_seed(7)
    x = (-1.0 + 2.0 * torch.randn(shape, generator=g, dtype=F64)).to(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=g, dtype=F64).to(memory_format=torch.channels_last)
    w, b = _params(name, shape, True, 2)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y, grads = _run(fn, x, w, b, dy, dtype, "cpu")
    finally:
        torch.set_num_threads(before)
    ey, egrads = _oracle(ref, x, w, b, dy.to(dtype).double())
    _close(y, ey, TOL[dtype])
    for got, exp in zip(grads, egrads):
        _close(got, exp, GTOL[dtype])
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", [(2, 8, 24, 25), (2, 256, 17, 18)], ids=["C8-S600", "C256-S306"])
def test_layer_norm_2d_nchw_over_several_column_blocks(shape):
    """LayerNorm2d on NCHW works in blocks of positions (256 KB of x: 512 positions at C = 8, 256 at
    C = 256): 600 and 306 positions per image make two blocks, the second ragged."""
    fn, ref = OPS["ln2d"]
    g = torch.Generator().manual_seed(9)
    x = 2.0 + torch.randn(shape, generator=g, dtype=F64)
    dy = torch.randn(shape, generator=g, dtype=F64)
    w, b = _params("ln2d", shape, True, 4)
    for dtype in (torch.float32, torch.bfloat16):
        y, grads = _run(fn, x, w, b, dy, dtype, "cpu")
        ey, egrads = _oracle(ref, x.to(dtype).double(), w, b, dy.to(dtype).double())
        _close(y, ey, TOL[dtype])
        for got, exp in zip(grads, egrads):
            _close(got, exp, GTOL[dtype])


def test_channels_last_group_norm_above_the_per_sample_forward_size():
    """Above 8 MB the channels-last GroupNorm forward takes the blocked kernels even when N >= threads,
    while the backward stays per sample: (2, 64, 128, 129) float32 is 8.5 MB."""
    fn, ref = OPS["gn4"]
    shape = (2, 64, 128, 129)
    g = torch.Generator().manual_seed(8)
    x = (3.0 + torch.randn(shape, generator=g, dtype=F64)).to(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=g, dtype=F64).to(memory_format=torch.channels_last)
    w, b = _params("gn4", shape, True, 3)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        y, grads = _run(fn, x, w, b, dy, torch.float32, "cpu")
    finally:
        torch.set_num_threads(before)
    ey, egrads = _oracle(ref, x, w, b, dy.double())
    _close(y, ey, TOL[torch.float32])
    for got, exp in zip(grads, egrads):
        _close(got, exp, GTOL[torch.float32])


@pytest.mark.parametrize(
    "shape,name",
    [
        ((1, 8, 5, 3), "gn4"),  # N = 1
        ((3, 1, 4, 4), "bn"),  # C = 1
        ((5, 6, 1, 1), "bn"),  # H = W = 1 (BN pools over N)
        ((3, 5, 7, 9), "in"),  # odd sizes
        ((2, 4, 3, 3), "gn1"),  # G = 1
        ((2, 6, 5), "bn"),  # (N, C, L)
        ((7, 6), "bn"),  # BatchNorm1d's (N, C)
        ((2, 6, 3, 4, 5), "gn1"),  # 3-d spatial
    ],
)
@pytest.mark.parametrize("affine", [True, False])
def test_edge_shapes(shape, name, affine):
    fn, ref = OPS[name]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g, dtype=F64)
    dy = torch.randn(shape, generator=g, dtype=F64)
    w, b = _params(name, shape, affine, 2)
    y, grads = _run(fn, x, w, b, dy, torch.float32, "cpu")
    ey, egrads = _oracle(ref, x, w, b, dy.float().double())
    _close(y, ey, TOL[torch.float32])
    for got, exp in zip(grads, egrads):
        _close(got, exp, GTOL[torch.float32])


@pytest.mark.parametrize(
    ("shape", "name", "cl"),
    [
        ((5, 1, 1001, 1003), "ln_chw", False),  # odd rows: each row's output starts unaligned
        ((2, 4, 1024, 600), "gn4", False),  # long groups (G > 1)
        # odd H * W: every (n, c) run of the NCHW patterns starts unaligned, and is not a whole
        # number of the stores' 1024-value blocks
        ((5, 8, 337, 331), "bn", False),
        ((5, 8, 337, 331), "gn4", False),
        ((5, 8, 337, 331), "in", False),
        ((5, 24, 193, 193), "ln2d", False),  # LayerNorm2d on NCHW: blocks of columns
        # channels_last: the stores' blocks cross rows of C = 25 or 28 values, and end unaligned
        ((5, 25, 193, 193), "bn", True),
        ((5, 28, 193, 193), "gn4", True),  # a sample at a time backward (N >= threads)
        ((1, 28, 401, 401), "gn4", True),  # the blocked backward (N = 1)
    ],
)
def test_outputs_beyond_the_cache_take_the_streamed_stores(shape, name, cl):
    # fp32 outputs above 16 MB go through the kernels' non-temporal stores (forward y, backward dx)
    fn, ref = OPS[name]
    g = torch.Generator().manual_seed(5)
    fmt = torch.channels_last if cl else torch.contiguous_format
    x = (torch.randn(shape, generator=g, dtype=F64) * 2 + 1).contiguous(memory_format=fmt)
    dy = torch.randn(shape, generator=g, dtype=F64).contiguous(memory_format=fmt)
    w, b = _params(name, shape, True, 4)
    assert x.numel() * 4 > 16 << 20
    y, grads = _run(fn, x, w, b, dy, torch.float32, "cpu")
    assert y.is_contiguous(memory_format=fmt)
    ey, egrads = _oracle(ref, x, w, b, dy.float().double())
    _close(y, ey, TOL[torch.float32])
    for got, exp in zip(grads, egrads):
        _close(got, exp, GTOL[torch.float32])
    dx_only = x.float().requires_grad_()
    with kernels.use("cpu"):
        fn(dx_only, None if w is None else w.float(), None if b is None else b.float()).backward(dy.float())
    _close(dx_only.grad, egrads[0], GTOL[torch.float32])


@pytest.mark.parametrize("C", [32, 64, 72, 96, 160])
@pytest.mark.parametrize("name", ["bn", "gn4"])
def test_channels_last_statistics_register_blocks(name, C):
    # the channels-last statistics walk rows in register blocks of 64 columns, then 32, then one at a
    # time: every mix of the three, about a large mean (the shifted sums)
    fn, ref = OPS[name]
    shape = (3, C, 5, 7)
    g = torch.Generator().manual_seed(C)
    x = (1e3 + torch.randn(shape, generator=g, dtype=F64)).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=g, dtype=F64).contiguous(memory_format=torch.channels_last)
    w, b = _params(name, shape, True, 6)
    y, grads = _run(fn, x, w, b, dy, torch.float32, "cpu")
    ey, egrads = _oracle(ref, x.float().double(), w, b, dy.float().double())
    _close(y, ey, TOL[torch.float32])
    for got, exp in zip(grads, egrads):
        _close(got, exp, GTOL[torch.float32])


def test_non_contiguous_input_and_weight_view():
    base = torch.randn(4, 8, 6, 10, dtype=F64)
    x = base[:, :, :, ::2]  # not dense: normkit copies it once
    w = torch.randn(16, dtype=F64)[::2]
    y, _ = _run(OPS["gn4"][0], x, w, None, torch.ones_like(x), torch.float32, "cpu")
    _close(y, ref_group_norm(x, 4, w), 2e-5)


def test_empty_batch_matches_reference():
    x = torch.randn(0, 8, 3, 3, requires_grad=True)
    with kernels.use("cpu"):
        y = F.group_norm(x, 4, torch.ones(8), torch.zeros(8))
    assert y.shape == x.shape


# ---- dispatch -----------------------------------------------------------------------------


def test_plan_recognises_each_norm():
    m = torch.empty(2, 8, 4, 4)
    cl = m.to(memory_format=torch.channels_last)
    w = torch.empty(1, 8, 1, 1)
    assert plan(m, (0, 2, 3), w, w).name == "batch_nchw"
    assert plan(cl, (0, 2, 3), w, w).name == "batch_cl"
    assert plan(torch.empty(4, 8), (0,), torch.empty(1, 8), None).name == "batch_cl"
    assert plan(m.view(2, 2, 4, 4, 4), (2, 3, 4), torch.empty(1, 2, 4, 1, 1), None).name == "group_nchw"
    gcl = cl.permute(0, 2, 3, 1).reshape(2, 4, 4, 2, 4)
    assert plan(gcl, (1, 2, 4), torch.empty(1, 1, 1, 2, 4), None).name == "group_cl"
    assert plan(m, (1,), w, w).name == "channel_nchw"
    assert plan(cl, (1,), w, w).name == "group_nchw"  # rows of C values
    assert plan(m, (0, 1, 2, 3), None, None) is not None  # one set
    assert plan(m, (), None, None) is None  # one value per set: the reference's exact zero gradient


@pytest.mark.parametrize("D", [3, 16, 1024, 2048])
def test_short_runs_without_affine_take_the_row_kernels_and_equal_torch(D):
    """LayerNorm over a last dim without an affine matches the BatchNorm template with one sample; runs
    of up to 1024 values take the row kernels instead (faster, the eager LayerNorm's): the same sets,
    checked against torch's layer_norm and its gradient in float64."""
    if not kernels.build():
        pytest.skip("the CPU kernels are not built on this machine (no compiler?)")
    x = torch.randn(6, 5, D, generator=torch.Generator().manual_seed(D)) * 2 + 0.5
    p = kernels._cpu_plan(x, None, None, None, (2,))
    assert p is not None and (p.mode, p.N, p.C, p.S) == ((2, 30, D, 1) if D <= 1024 else (0, 1, 30, D))
    y, stats = kernels.norm_forward(x, None, None, None, (2,), 1e-5)
    dy = torch.randn_like(x)
    (dx,) = kernels.norm_backward(dy, x, None, None, None, stats, (2,), (True, False, False))[:1]
    xd = x.double().requires_grad_()
    want = torch.nn.functional.layer_norm(xd, (D,), eps=1e-5)
    (want_dx,) = torch.autograd.grad(want, xd, dy.double())
    torch.testing.assert_close(y.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), want_dx, rtol=1e-4, atol=1e-4)


def test_use_validates_nests_and_restores():
    with pytest.raises(ValueError, match="reference"):
        with kernels.use("gpu"):
            pass
    assert kernels.current() == "auto"
    with kernels.use("reference"):
        assert kernels.current() == "reference"
        with kernels.use("cpu"):
            assert kernels.current() == "cpu"
        assert kernels.current() == "reference"
    assert kernels.current() == "auto"
    text = kernels.status()
    assert "cpu kernel batch_nchw" in text and "reference" in text


def test_cpu_backend_skips_the_reference_and_masks_do_not(monkeypatch):
    calls = []
    real = core.norm_forward
    monkeypatch.setattr(core, "norm_forward", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    x = torch.randn(4, 8, 5, 5)
    with kernels.use("cpu"):
        F.group_norm(x, 4)
    assert calls == []
    with kernels.use("reference"):
        F.group_norm(x, 4)
    assert calls == [1]
    with kernels.use("cpu"):
        F.group_norm(x, 4, mask=torch.ones(4, 1, 5, 5, dtype=torch.bool))
    assert calls == [1, 1]


# ---- numerics (TESTING.md) ------------------------------------------------------------------


def test_large_mean_is_as_accurate_as_the_reference():
    g = torch.Generator().manual_seed(0)
    x = (  # the oracle sees the same fp32 values
        1e4 + 1e-2 * torch.randn(4, 8, 6, 6, generator=g, dtype=F64)
    ).float()
    for backend in ("cpu", "reference"):
        with kernels.use(backend):
            _close(F.group_norm(x, 4), ref_group_norm(x.double(), 4), 2e-5)
            _close(
                F.batch_norm(x, None, None, training=True).output,
                ref_batch_norm(x.double(), training=True).output,
                2e-5,
            )


def test_constant_input_gives_the_bias_and_finite_grads():
    x = torch.full((3, 8, 4, 4), 42.0, requires_grad=True)
    b = torch.randn(8)
    with kernels.use("cpu"):
        y = F.group_norm(x, 4, torch.ones(8), b)
        y.sum().backward()
    assert torch.equal(y.detach(), b.view(1, 8, 1, 1).expand_as(y))
    assert bool(torch.isfinite(x.grad).all())


def test_huge_values_fall_back_to_the_scaled_reference(monkeypatch):
    x = 1e30 * torch.randn(4, 8, 3, 5, dtype=F64)
    calls = []
    real = core.norm_forward
    monkeypatch.setattr(core, "norm_forward", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    xs = x.float().requires_grad_()
    with kernels.use("cpu"):
        y = F.group_norm(xs, 4)
        y.backward(torch.ones_like(y))
    assert calls, "the kernel must hand |x| ~ 1e30 back to the reference"
    assert bool(torch.isfinite(y).all()) and bool(torch.isfinite(xs.grad).all())
    _close(y, ref_group_norm(x.float().double(), 4), 1e-5)


def test_fp16_near_overflow():
    x = 6e4 * torch.rand(4, 8, 5, 5, dtype=F64) - 3e4
    with kernels.use("cpu"):
        y = F.batch_norm(x.half(), None, None, training=True).output
    assert bool(torch.isfinite(y).all())
    _close(y, ref_batch_norm(x.half().double(), training=True).output, 4e-3)


def test_nan_batch_never_reaches_running_stats():
    bn = normkit.nn.BatchNorm2d(8)
    x = torch.randn(4, 8, 3, 3)
    x[0, 3, 1, 1] = float("nan")
    with kernels.use("cpu"):
        y = bn(x)
    assert torch.isnan(y[:, 3]).any() and bool(torch.isfinite(y[:, :3]).all())
    assert torch.equal(bn.running_mean, torch.zeros(8)) and torch.equal(bn.running_var, torch.ones(8))
    assert int(bn.num_batches_tracked) == 0 and int(bn.num_skipped_updates) == 1


# ---- the layers' fused fast paths ------------------------------------------------------------


@pytest.fixture(params=["node", "python"])
def autograd_path(request, monkeypatch):
    """The layers' fast path through the C++ autograd node, or through the Python Function."""
    from normkit.kernels import _build

    if request.param == "python":
        monkeypatch.setitem(_build._autograd, "module", None)
        monkeypatch.setitem(_build._autograd, "tried", True)
    elif _build.autograd_module() is None:
        pytest.skip(f"the C++ autograd node does not build here: {_build.autograd_error()}")
    return request.param


def _assert_path(y, path):
    name = y.grad_fn.name()  # the C++ node: "torch::autograd::CppNode<normkit::BatchNormBackward>" (or ...)
    assert ("normkit::" in name and "CppNode" in name) == (path == "node"), name


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_batchnorm_fast_path_matches_torch_nn(momentum, layout, autograd_path):
    torch.manual_seed(0)
    ours, theirs = normkit.nn.BatchNorm2d(6, momentum=momentum), torch.nn.BatchNorm2d(6, momentum=momentum)
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.linspace(0.5, 1.5, 6))
            m.bias.copy_(torch.linspace(-1, 1, 6))
    for step in range(3):
        x = torch.randn(4, 6, 5, 5) * (step + 1) + step
        if layout == "cl":
            x = x.to(memory_format=torch.channels_last)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        with kernels.use("cpu"):
            ya = ours(xa)
        _assert_path(ya, autograd_path)
        yb = theirs(xb)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=1e-4, atol=1e-5)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 3


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (lambda: normkit.nn.GroupNorm(3, 6), lambda: torch.nn.GroupNorm(3, 6)),
        (lambda: normkit.nn.InstanceNorm2d(6, affine=True), lambda: torch.nn.InstanceNorm2d(6, affine=True)),
        (lambda: normkit.nn.GroupNorm(1, 6), lambda: torch.nn.GroupNorm(1, 6)),
    ],
    ids=["gn", "in", "ln_chw"],
)
def test_layer_fast_paths_match_torch_nn(ours, theirs, autograd_path):
    a, b = ours(), theirs()
    with torch.no_grad():
        for m in (a, b):
            m.weight.copy_(torch.linspace(0.5, 1.5, 6))
            m.bias.copy_(torch.linspace(-1, 1, 6))
    x = torch.randn(3, 6, 7, 5).to(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with kernels.use("cpu"):
        ya = a(xa)
    _assert_path(ya, autograd_path)
    yb = b(xb)
    g = torch.randn_like(yb)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.weight.grad, b.weight.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "make",
    [
        lambda: normkit.nn.GroupNorm(2, 4),
        lambda: normkit.nn.BatchNorm2d(4),
        lambda: normkit.nn.LayerNorm2d(4),
    ],
    ids=["gn", "bn", "ln2d"],
)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_fast_path_double_backward_matches_reference(make, layout, autograd_path):
    x = torch.randn(3, 4, 3, 3, dtype=F64)
    if layout == "cl":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    torch.manual_seed(0)
    layer = make().double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    results = []
    for backend in ("cpu", "reference"):
        with kernels.use(backend):
            y = layer(x)
            (g,) = torch.autograd.grad((y * y.detach().sin()).sum(), x, create_graph=True)
            (gg,) = torch.autograd.grad(g.square().sum(), x)
        results.append((g.detach(), gg))
        if backend == "cpu":
            _assert_path(y, autograd_path)
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_layer_norm_rows_fast_path_gradcheck_and_double_backward(affine, autograd_path):
    # F.layer_norm over trailing dims: the kernels see rows; the affine keeps its own shape in the
    # gradients, and double backward differentiates ATen's layer_norm over the same dims
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 4, 3, generator=g, dtype=F64, requires_grad=True)
    w = (1 + 0.3 * torch.randn(4, 3, generator=g, dtype=F64)).requires_grad_() if affine != "none" else None
    b = (0.3 * torch.randn(4, 3, generator=g, dtype=F64)).requires_grad_() if affine == "both" else None
    inputs = tuple(t for t in (x, w, b) if t is not None)

    def fn(*ts):
        xs, ws, bs = ts[0], ts[1] if w is not None else None, ts[-1] if b is not None else None
        return F.layer_norm(xs, (4, 3), ws, bs)

    with kernels.use("cpu"):
        y = fn(*inputs)
        if affine != "weight":  # a lone weight takes the Python Function on both paths
            _assert_path(y, autograd_path)
        assert torch.autograd.gradcheck(fn, inputs)
        assert torch.autograd.gradgradcheck(fn, inputs)
        got = torch.autograd.grad((y * y.detach().cos()).sum(), inputs)
    with kernels.use("reference"):
        ref = fn(*inputs)
        exp = torch.autograd.grad((ref * ref.detach().cos()).sum(), inputs)
    for a, e in zip(got, exp):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e)


# ---- Proxy Norm's fused activation step -----------------------------------------------------


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "identity"])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_proxy_act_fused_matches_reference(act, layout):
    _proxy_act_case(act, layout, (3, 6, 4, 5))


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_proxy_act_beyond_the_cache_matches_reference(layout):
    # above 16 MB the NCHW pattern streams out / dy through an L1 buffer (the backward's sums then add
    # per buffer run); odd H * W puts every run's ends off the vector width
    _proxy_act_case("leaky_relu", layout, (5, 8, 337, 331))


def _proxy_act_case(act, layout, shape):
    g = torch.Generator().manual_seed(5)
    C = shape[1]
    y = torch.randn(shape, generator=g, dtype=F64)
    dout = torch.randn(shape, generator=g, dtype=F64)
    if layout == "cl":
        y, dout = y.to(memory_format=torch.channels_last), dout.to(memory_format=torch.channels_last)
    params = [1 + 0.3 * torch.randn(C, generator=g, dtype=F64)] + [
        0.3 * torch.randn(C, generator=g, dtype=F64) for _ in range(3)
    ]
    res = {}
    for backend in ("cpu", "reference"):
        ys = y.float().requires_grad_()
        ps = [p.float().requires_grad_() for p in params]
        with kernels.use(backend):
            out = F.proxy_norm_act(ys, *ps, activation=act)
            out.backward(dout.float())
        res[backend] = [out, ys.grad] + [p.grad for p in ps]
    for got, exp in zip(res["cpu"], res["reference"]):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5)
    assert res["cpu"][0].is_contiguous(memory_format=torch.channels_last) == (layout == "cl")


# ---- the registered stable-ABI ops and the build fallback -----------------------------------


def test_registered_ops_agree_with_the_ctypes_entry_points():
    x = torch.randn(4, 8, 5, 5)
    w, b = torch.randn(8), torch.randn(8)
    p = plan(x, (0, 2, 3), w.view(1, 8, 1, 1), None)
    y, st, ok = torch.empty_like(x), torch.empty(6, 8), torch.empty(1, dtype=torch.int32)
    torch.ops.normkit_cpu.norm_forward(x, w, b, y, st, ok, p.mode, p.N, p.C, p.S, p.G, 1e-5)
    assert int(ok) == 1
    with kernels.use("cpu"):
        ref = F.batch_norm(x, None, None, w, b, training=True).output
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_no_compiler_or_no_build_still_works(tmp_path):
    code = textwrap.dedent(
        """
        import torch, normkit
        x = torch.randn(2, 8, 4, 4)
        y = normkit.functional.group_norm(x, 2)
        assert torch.allclose(y, torch.nn.functional.group_norm(x, 2), atol=1e-5)
        try:
            with normkit.kernels.use("cpu"):
                pass
            raise SystemExit("use('cpu') should fail without a build")
        except RuntimeError as e:
            assert "normkit kernels build" in str(e)
        print(normkit.kernels.status())
        """
    )
    env = dict(os.environ, NORMKIT_CACHE=str(tmp_path), NORMKIT_NO_BUILD="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "not built" in out.stdout


_VARIANTS = {
    "gn-noaffine": lambda: normkit.nn.GroupNorm(4, 16, affine=False),
    "bn-noaffine": lambda: normkit.nn.BatchNorm2d(16, affine=False),
    "bn-untracked": lambda: normkit.nn.BatchNorm2d(16, track_running_stats=False),
    "in-noaffine": lambda: normkit.nn.InstanceNorm2d(16),
    "gn-half-params": lambda: normkit.nn.GroupNorm(4, 16).half(),
}


@pytest.mark.parametrize(
    "variant, dtype",
    [
        (v, d)
        for v in _VARIANTS
        for d in (torch.float32, torch.float16)
        if not (v.endswith("half-params") and d != torch.float16)
    ],
    ids=str,
)
def test_layer_fast_path_variants_match_reference(variant, dtype, autograd_path):
    """Without affine, without running statistics, half inputs and half parameters; inference mode."""
    import copy

    torch.manual_seed(3)
    layer = _VARIANTS[variant]()
    x = torch.randn(3, 16, 5, 6).to(dtype)
    res = {}
    for backend in ("reference", "cpu"):
        m = copy.deepcopy(layer)
        xs = x.clone().requires_grad_()
        with kernels.use(backend):
            y = m(xs)
            grads = torch.autograd.grad(y.float().square().sum(), [xs, *m.parameters()])
        if backend == "cpu":
            _assert_path(y, autograd_path)
        res[backend] = [y, *grads, *(b for b in m.buffers() if b.is_floating_point())]
    for got, want in zip(res["cpu"], res["reference"]):
        torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)
    with torch.inference_mode(), kernels.use("cpu"):
        out = layer(x)
    torch.testing.assert_close(
        out.float(), res["reference"][0].float(), rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: normkit.nn.GroupNorm(2, 4),
        lambda: normkit.nn.BatchNorm2d(4),
        lambda: normkit.nn.LayerNorm2d(4),
        lambda: normkit.nn.GroupNormProxyAct2d(4, num_groups=2),
    ],
    ids=["gn", "bn", "ln2d", "gn+pn"],
)
def test_fast_paths_pass_batched_gradcheck(make, autograd_path):
    """gradcheck(check_batched_grad=True) hands the backward a batched gradient without storage."""
    layer = make().double()
    names = [n for n, _ in layer.named_parameters()]
    x = torch.randn(2, 4, 3, 3, dtype=F64, requires_grad=True)

    def f(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))

    with kernels.use("cpu"):
        if not isinstance(layer, normkit.nn.GroupNormProxyAct2d):  # (its node is GNProxy, checked elsewhere)
            _assert_path(f(x, *layer.parameters()), autograd_path)
        assert torch.autograd.gradcheck(f, (x, *layer.parameters()), check_batched_grad=True)


FUNCTIONAL_FAST = {  # functional calls that take the eager fast path: (x, w, b, stats) -> (y, returned stats)
    "batch_norm": lambda x, w, b, s: _nt(F.batch_norm(x, None, None, w, b, training=True)),
    "batch_norm+running": lambda x, w, b, s: _nt(
        F.batch_norm(x, s[0], s[1], w, b, training=True, momentum=0.2, num_batches_tracked=s[2])
    ),
    "batch_norm+cumulative": lambda x, w, b, s: _nt(
        F.batch_norm(x, s[0], s[1], w, b, training=True, momentum=None, num_batches_tracked=s[2])
    ),
    "instance_norm": lambda x, w, b, s: _nt(F.instance_norm(x, weight=w, bias=b)),
    "group_norm": lambda x, w, b, s: (F.group_norm(x, 4, w, b), ()),
    "group_norm+bias_only": lambda x, w, b, s: (F.group_norm(x, 4, None, b), ()),
    "layer_norm_2d": lambda x, w, b, s: (F.layer_norm_2d(x, w, b), ()),
    "layer_norm": lambda x, w, b, s: (F.layer_norm(x, x.shape[1:]), ()),
    "layer_norm_affine": lambda x, w, b, s: (
        F.layer_norm(x, x.shape[2:], w[:35].view(5, 7), b[:35].view(5, 7)),
        (),
    ),
}


def _nt(out):
    return out.output, tuple(
        t for t in (out.running_mean, out.running_var, out.num_batches_tracked) if t is not None
    )


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("name", list(FUNCTIONAL_FAST))
def test_functional_fast_paths_match_the_reference_and_keep_the_functional_contract(
    monkeypatch, name, layout, autograd_path
):
    from normkit.kernels import _fast

    calls = []
    real = _fast._run
    monkeypatch.setattr(_fast, "_run", lambda *a: calls.append(1) or real(*a))
    real_checked = _fast.checked

    def checked(*a):  # the functional ops' C++ entry (arguments checked and kernel run in C++)
        out = real_checked(*a)
        if out is not None:
            calls.append(1)
        return out

    monkeypatch.setattr(_fast, "checked", checked)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 8, 5, 7, generator=g) * 3 + 1
    if layout == "cl":
        x = x.to(memory_format=torch.channels_last)
    n = 40 if name == "layer_norm_affine" else 8
    w, b = 1 + 0.3 * torch.randn(n, generator=g), 0.3 * torch.randn(n, generator=g)
    stats = (torch.randn(8, generator=g), torch.rand(8, generator=g) + 0.5, torch.tensor(3))
    dy = torch.randn(x.shape, generator=g)
    results = {}
    for backend in ("auto", "reference"):
        xs, ws, bs = (
            t.detach().clone(memory_format=torch.preserve_format).requires_grad_() for t in (x, w, b)
        )
        ss = tuple(s.clone() for s in stats)
        with kernels.use(backend):
            y, out_stats = FUNCTIONAL_FAST[name](xs, ws, bs, ss)
            y.backward(dy)
        for s, s0 in zip(ss, stats):  # functional: the given statistics are never written
            assert torch.equal(s, s0)
        results[backend] = (y.detach(), out_stats, [t.grad for t in (xs, ws, bs) if t.grad is not None])
    expected_fast = layout == "nchw" or name not in (  # LN: contiguous rows only
        "layer_norm",
        "layer_norm_affine",
    )
    assert bool(calls) == expected_fast
    (y1, s1, g1), (y0, s0, g0) = results["auto"], results["reference"]
    assert y1.stride() == y0.stride()
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    assert len(s1) == len(s0)
    for a, e in zip(s1, s0):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    for a, e in zip(g1, g0):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
