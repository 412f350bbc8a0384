"""The ``"native"`` backend (torch's ATen kernels behind normkit's ops) against the float64 oracle.

Each norm runs through the public functional op under ``kernels.use("native")``; outputs and every
gradient are compared with ``tests.reference`` in float64, the output layout with the input's, and a
spy checks which calls reach ATen's kernels (the others run on the reference core).
"""

from __future__ import annotations

import pytest
import torch

import normkit
import normkit.functional as F
from normkit import kernels
from normkit.kernels import _native
from tests.reference import (
    ref_batch_norm,
    ref_group_norm,
    ref_instance_norm,
    ref_layer_norm,
    ref_layer_norm_2d,
)

F64 = torch.float64
CL = torch.channels_last
TOL = {torch.float32: 2e-5, F64: 1e-10, torch.bfloat16: 3e-2}
GTOL = {torch.float32: 2e-4, F64: 1e-9, torch.bfloat16: 1e-1}

# name -> (normkit op, float64 oracle, affine shape from x's shape, whether ATen serves (nchw, cl))
OPS = {
    "bn": (
        lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True).output,
        lambda x, w, b: ref_batch_norm(x, None, None, w, b, training=True).output,
        lambda s: (s[1],),
        (True, True),
    ),
    "gn": (
        lambda x, w, b: F.group_norm(x, 4, w, b),
        lambda x, w, b: ref_group_norm(x, 4, w, b),
        lambda s: (s[1],),
        (True, False),
    ),
    "in": (
        lambda x, w, b: F.instance_norm(x, weight=w, bias=b).output,
        lambda x, w, b: ref_instance_norm(x, weight=w, bias=b).output,
        lambda s: (s[1],),
        (True, False),
    ),
    "ln_chw": (
        lambda x, w, b: F.layer_norm(x, x.shape[1:], w, b),
        lambda x, w, b: ref_layer_norm(x, x.shape[1:], w, b),
        lambda s: tuple(s[1:]),
        (True, False),
    ),
    "ln2d": (
        lambda x, w, b: F.layer_norm_2d(x, w, b),
        lambda x, w, b: ref_layer_norm_2d(x, w, b),
        lambda s: (s[1],),
        (False, True),
    ),
}


def _rel(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(OPS))
def test_native_backend_matches_the_float64_oracle(monkeypatch, name, dtype, layout):
    op, ref, pshape, served = OPS[name]
    calls = []
    monkeypatch.setattr(_native, "forward", lambda *a, _f=_native.forward: calls.append(1) or _f(*a))
    shape = (4, 8, 5, 6)
    g = torch.Generator().manual_seed(11)
    x64 = 1.5 + 2 * torch.randn(shape, generator=g, dtype=F64)
    dy64 = torch.randn(shape, generator=g, dtype=F64)
    w64 = 1 + 0.3 * torch.randn(pshape(shape), generator=g, dtype=F64)
    b64 = 0.3 * torch.randn(pshape(shape), generator=g, dtype=F64)
    pdtype = F64 if dtype == F64 else torch.float32
    x = x64.to(dtype)
    dy = dy64.to(dtype)
    if layout == "cl":
        x, dy = x.contiguous(memory_format=CL), dy.contiguous(memory_format=CL)
    x.requires_grad_()
    w, b = w64.to(pdtype).requires_grad_(), b64.to(pdtype).requires_grad_()
    with kernels.use("native"):
        y = op(x, w, b)
        grads = torch.autograd.grad(y, (x, w, b), dy)
    assert calls, "the native backend is consulted"
    assert y.stride() == x.stride(), "output in the input's layout"
    xo, wo, bo = (t.detach().requires_grad_() for t in (x64, w64, b64))
    want = ref(xo, wo, bo)
    wgrads = torch.autograd.grad(want, (xo, wo, bo), dy.double())
    assert _rel(y, want) < TOL[dtype]
    for n, got, exp in zip(("x", "weight", "bias"), grads, wgrads):
        assert _rel(got, exp) < GTOL[dtype], n


@pytest.mark.parametrize(
    "name, layout",
    [(n, lay) for n, (*_, served) in OPS.items() for lay, s in zip(("nchw", "cl"), served) if s],
)
def test_native_backend_runs_atens_kernels(monkeypatch, name, layout):
    """The patterns ATen computes identically reach ATen's kernels, forward and backward."""
    op, _, pshape, _ = OPS[name]
    seen = []
    real = torch.ops.aten

    def spy(name):
        op = getattr(real, name)
        return lambda *a: seen.append(name) or op(*a)

    for fn in ("native_batch_norm", "native_layer_norm", "native_group_norm"):
        for f in (fn, fn + "_backward"):
            monkeypatch.setattr(_native.aten, f, spy(f), raising=False)
    x = torch.randn(4, 8, 5, 6)
    if layout == "cl":
        x = x.contiguous(memory_format=CL)
    x.requires_grad_()
    w, b = torch.ones(pshape(x.shape), requires_grad=True), torch.zeros(pshape(x.shape), requires_grad=True)
    with kernels.use("native"):
        op(x, w, b).sum().backward()
    assert any(s.endswith("_backward") for s in seen) and any(not s.endswith("_backward") for s in seen), seen


def test_native_backend_keeps_the_running_statistics_contract():
    m, t = normkit.nn.BatchNorm2d(8), torch.nn.BatchNorm2d(8)
    with kernels.use("native"):
        for step in range(3):
            x = torch.randn(4, 8, 5, 6) * (step + 1) + step
            torch.testing.assert_close(m(x), t(x), rtol=1e-5, atol=1e-5)
        bad = torch.randn(4, 8, 5, 6)
        bad[0, 0, 0, 0] = float("nan")
        m(bad)
    torch.testing.assert_close(m.running_mean, t.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.running_var, t.running_var, rtol=1e-5, atol=1e-6)
    assert bool(torch.isfinite(m.running_var).all()), "a NaN batch never reaches the running statistics"


def test_native_backend_is_listed_and_validated():
    assert "native" in kernels.available() and "native" in kernels.BACKENDS
    with kernels.use("native"):
        assert kernels.current() == "native"
        assert "ATen native_batch_norm" in kernels.status()
    with pytest.raises(ValueError, match="native"):
        with kernels.use("aten"):
            pass
