"""When Triton cannot compile one of normkit's kernels for the GPU at hand, the call still gives the
right answer: on the default backend the Triton kernels are switched off for the process (one
warning; ``why_not()`` and ``normkit kernels status`` say why) and the call runs on the next backend;
under ``use("triton")`` a clear error says which Triton release failed.

Each Triton release has compiler bugs of its own (Triton 3.6 rejected a BatchNorm kernel that the
other releases compile), so the failure is simulated here: a launch raises the exception Triton's
compiler raises, from a frame inside Triton's compiler package, as a real one does. The kernels run
in Triton's interpreter on CPU tensors; the answers are checked against torch.nn in float64.
"""

from __future__ import annotations

import importlib
import os
import warnings

import pytest
import torch

import normkit.functional as F
from normkit import kernels

triton = pytest.importorskip(
    "triton", reason="triton is not installed here (normkit's optional `triton` extra)"
)

from normkit.kernels import triton as nkt  # noqa: E402


@pytest.fixture(autouse=True)
def interpreted(monkeypatch):
    """The kernels in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 first), and the
    backend's state restored after each test (a test switches the Triton kernels off)."""
    importlib.import_module("normkit.kernels.triton._kernels")
    if not nkt.interpreting():
        pytest.skip("triton was imported without TRITON_INTERPRET=1: its interpreter is off in this process")
    nkt.why_not()
    monkeypatch.setattr(nkt, "_state", dict(nkt._state))


def _pass_manager_failure() -> Exception:
    """The RuntimeError Triton raises when one of its MLIR passes fails, raised (and caught) in a
    function whose code lives in Triton's ``compiler`` package, where Triton's own frames are."""
    src = "def run_passes():\n    raise RuntimeError('PassManager::run failed')\n"
    path = os.path.join(os.path.dirname(triton.__file__), "compiler", "compiler.py")
    ns: dict = {}
    exec(compile(src, path, "exec"), ns)
    try:
        ns["run_passes"]()
    except RuntimeError as e:
        return e
    raise AssertionError("unreachable")


class _Failing:
    """Stands in for the kernels module: every ``kernel[grid](...)`` raises ``error``; counts them."""

    def __init__(self, error: Exception) -> None:
        self.error, self.launches = error, 0

    def __getattr__(self, name: str):
        return self

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            raise self.error

        return launch


def _failing(monkeypatch, error: Exception | None = None) -> _Failing:
    fake = _Failing(error if error is not None else _pass_manager_failure())
    monkeypatch.setattr(nkt, "_kern", lambda: fake)
    return fake


def _oracle_gn(x, w, b, groups):
    return torch.nn.functional.group_norm(x.double(), groups, w.double(), b.double())


def test_compile_failure_tells_triton_s_compiler_errors_from_the_rest():
    assert nkt.compile_failure(_pass_manager_failure())
    from triton.runtime.errors import OutOfResources

    assert nkt.compile_failure(OutOfResources(300000, 232448, "shared memory"))
    assert not nkt.compile_failure(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not nkt.compile_failure(ValueError("a bad shape"))
    try:  # an exception raised by the caller's own code, not inside Triton's compiler
        torch.empty(2).view(3)
    except RuntimeError as e:
        assert not nkt.compile_failure(e)


def test_on_the_default_backend_a_compile_failure_falls_back_with_one_warning(monkeypatch):
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 6, 3, 5), torch.rand(6) + 0.5, torch.randn(6)
    fake = _failing(monkeypatch)
    with pytest.warns(RuntimeWarning, match=r"Triton .* could not compile .*PassManager::run failed"):
        got = nkt.group_norm(x, 3, w, b, 1e-5)  # the Triton entry point on "auto"
    assert got is None and fake.launches == 1  # (the caller then runs the next backend)
    assert not nkt.available()
    assert "could not compile" in (nkt.why_not() or "")
    assert "could not compile" in kernels.status()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: later calls do not reach the kernels, nor warn again
        y = F.group_norm(x, 3, w, b)
    assert fake.launches == 1
    torch.testing.assert_close(y.double(), _oracle_gn(x, w, b, 3), atol=2e-5, rtol=0)
    with pytest.raises(RuntimeError, match="not available .*could not compile"):
        with kernels.use("triton"):
            pass


def test_under_use_triton_a_compile_failure_raises_naming_the_release(monkeypatch):
    x = torch.randn(2, 6, 3, 5)
    _failing(monkeypatch)
    with kernels.use("triton"), pytest.raises(RuntimeError, match=r"Triton \d.*use\('auto'\)") as info:
        F.group_norm(x, 3)
    assert "PassManager::run failed" in str(info.value.__cause__)
    assert nkt.available()  # (asked for by name: nothing switched off, nothing silently replaced)


def test_other_errors_are_not_swallowed(monkeypatch):
    _failing(monkeypatch, ValueError("a launcher bug"))
    with pytest.raises(ValueError, match="a launcher bug"):
        nkt.group_norm(torch.randn(2, 6, 3, 5), 3, None, None, 1e-5)
    assert nkt.available()


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_a_backward_kernel_that_fails_to_compile_falls_back_to_the_reference(monkeypatch, layout):
    """The forward compiled and ran; the backward's kernel fails to compile: the gradients come from
    the reference path, the same as torch.nn's."""
    torch.manual_seed(1)
    x = torch.randn(2, 6, 3, 5)
    if layout == "cl":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    w, b = (torch.rand(6) + 0.5).requires_grad_(), torch.randn(6).requires_grad_()
    dy = torch.randn(2, 6, 3, 5)
    y = nkt.group_norm(x, 3, w, b, 1e-5)  # (interpreted kernels, a Triton autograd node)
    assert y is not None and type(y.grad_fn).__name__ == "_NormBackward"
    _failing(monkeypatch)
    with pytest.warns(RuntimeWarning, match="could not compile"):
        got = torch.autograd.grad(y, (x, w, b), dy)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    want = torch.autograd.grad(torch.nn.functional.group_norm(xd, 3, wd, bd), (xd, wd, bd), dy.double())
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-4)


def test_the_general_op_falls_back_both_ways(monkeypatch):
    """normkit.kernels.norm_forward / norm_backward (the registered op's dispatch) on a call the
    Triton kernels would take: a compile failure there gives the next backend's result."""
    monkeypatch.setattr(kernels, "triton_ready", lambda x, mask=None: True)  # (as a CUDA tensor would)
    torch.manual_seed(2)
    x, w = torch.randn(4, 5, 3, 3), torch.rand(1, 5, 1, 1) + 0.5
    fake = _failing(monkeypatch)
    with pytest.warns(RuntimeWarning, match="could not compile"):
        y, stats = kernels.norm_forward(x, w, None, None, (0, 2, 3), 1e-5)
    assert fake.launches == 1
    want = torch.nn.functional.batch_norm(x.double(), None, None, w.view(-1).double(), None, True)
    torch.testing.assert_close(y.double(), want, atol=2e-5, rtol=0)
    nkt._state["error"] = None  # (on again, to reach the backward's launch)
    dy = torch.randn_like(x)
    with pytest.warns(RuntimeWarning, match="could not compile"):
        dx, dw, _ = kernels.norm_backward(dy, x, w, None, None, stats, (0, 2, 3), (True, True, False))
    assert fake.launches == 2
    xd, wd = x.double().requires_grad_(), w.view(-1).double().requires_grad_()
    ref = torch.autograd.grad(
        torch.nn.functional.batch_norm(xd, None, None, wd, None, True), (xd, wd), dy.double()
    )
    torch.testing.assert_close(dx.double(), ref[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(dw.view(-1).double(), ref[1], atol=1e-4, rtol=0)


def test_proxy_norm_s_fused_layer_falls_back(monkeypatch):
    """GroupNorm + Proxy Norm's activation (one Triton node): a forward compile failure runs the two
    ops on the reference path; a backward one takes the composite's gradients."""
    import normkit.nn as nkn

    torch.manual_seed(3)
    m = nkn.GroupNormProxyAct2d(6, 3)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 6, 4, 4, requires_grad=True)
    with kernels.use("reference"):
        want = m(x)
        gwant = torch.autograd.grad(want.square().sum(), (x, *m.parameters()))
    with kernels.use("triton"):
        y = m(x)  # (the fused Triton node, interpreted)
    assert "GNProxyAct" in type(y.grad_fn).__name__
    _failing(monkeypatch)
    with pytest.warns(RuntimeWarning, match="could not compile"):
        got = torch.autograd.grad(y.square().sum(), (x, *m.parameters()))
    for g, r in zip(got, gwant):
        torch.testing.assert_close(g, r, atol=2e-4, rtol=2e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(m(x), want, atol=2e-5, rtol=0)  # (switched off: the reference path)
