"""The direct route to torch's own ops (``normkit.kernels._direct``).

On the devices in ``_direct.DEVICES`` (CUDA in production), with the ``"auto"`` or ``"native"``
backend, plain eager calls of the functional ops and layers hand the work to
``torch.nn.functional`` in one call. This machine has no GPU, so the tests add ``"cpu"`` to
``DEVICES`` and run under ``kernels.use("native")`` (with ``"auto"`` on CPU normkit's own fused
kernels come first). The contract tested here, against normkit's pure-PyTorch reference path (the
same call under ``kernels.use("reference")`` with ``DEVICES`` at its default):

* the route is taken (one call of torch's op, counted by a spy standing in for ``_direct.TF``) for
  the patterns it covers, and its output, gradients, output layout and running statistics match
  the reference: the functional BN returns new statistics and leaves the given ones alone, the
  layers update their buffers (``num_batches_tracked`` and ``num_skipped_updates`` too);
* a batch whose statistics are not finite leaves the running statistics unchanged and counts a
  skipped update, as on the reference path;
* everything the route does not cover (strided layouts, small set counts, dtype mixes, one value
  per set, other backends, ``torch.func``, forward-mode
  AD, dispatch modes, empty inputs) makes no torch call from ``_direct`` and still gives the
  reference's result or its typed error;
* with ``DEVICES`` at its default a CPU tensor never takes the route.

"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import pytest
import torch
import torch.autograd.forward_ad as fwad
from torch.utils._python_dispatch import TorchDispatchMode

import normkit.functional as F
import normkit.nn as nkn
from normkit import kernels
from normkit._errors import NormError
from normkit.kernels import _direct

TF = torch.nn.functional
F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
DEFAULT_DEVICES = set(_direct.DEVICES)  # the production setting, as imported
M = TypeVar("M", bound=torch.nn.Module)


class _Spy:
    """Stands in for ``torch.nn.functional`` inside ``_direct``: runs torch's op and counts the calls."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def group_norm(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._count("group_norm")
        return TF.group_norm(*args, **kwargs)

    def instance_norm(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._count("instance_norm")
        return TF.instance_norm(*args, **kwargs)

    def layer_norm(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._count("layer_norm")
        return TF.layer_norm(*args, **kwargs)

    def batch_norm(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._count("batch_norm")
        return TF.batch_norm(*args, **kwargs)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Spy]:
    """CPU tensors may take the route (``"cpu"`` in ``DEVICES``, ``"native"`` backend); counts its calls."""
    s = _Spy()
    monkeypatch.setattr(_direct, "DEVICES", {"cpu", "cuda"})
    monkeypatch.setattr(_direct, "TF", s)
    with kernels.use("native"):
        yield s


@pytest.fixture
def default_spy(monkeypatch: pytest.MonkeyPatch) -> _Spy:
    """The spy with ``DEVICES`` left at its production default."""
    s = _Spy()
    monkeypatch.setattr(_direct, "TF", s)
    return s


@contextlib.contextmanager
def _reference() -> Iterator[None]:
    """normkit's pure-PyTorch path, ``DEVICES`` at its default: the oracle."""
    saved = _direct.DEVICES
    _direct.DEVICES = set(DEFAULT_DEVICES)
    try:
        with kernels.use("reference"):
            yield
    finally:
        _direct.DEVICES = saved


@contextlib.contextmanager
def _backend(name: str) -> Iterator[None]:
    """Select a backend by name without ``use``'s availability check (triton is not installed here)."""
    previous = kernels._local.backend
    kernels._local.backend = name
    try:
        yield
    finally:
        kernels._local.backend = previous


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """The same values with the channel dim innermost in memory (channels_last for 4-d, 3-d and 5-d)."""
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


def _x(shape: Sequence[int], dtype: torch.dtype = F64, layout: str = "nchw", seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(tuple(shape), generator=g, dtype=F64) * 2 + 0.5).to(dtype)
    if layout == "cl":
        x = _channels_last(x)
    return x.requires_grad_()


def _poison(x: torch.Tensor) -> None:
    """A NaN in sample 1, channel 0 (any layout)."""
    with torch.no_grad():
        x[(1, 0) + (1,) * (x.dim() - 2)] = float("nan")


def _wb(shape: Sequence[int], dtype: torch.dtype = F64, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = (1 + 0.3 * torch.randn(tuple(shape), generator=g, dtype=F64)).to(dtype).requires_grad_()
    b = (0.3 * torch.randn(tuple(shape), generator=g, dtype=F64)).to(dtype).requires_grad_()
    return w, b


def _stats(c: int, dtype: torch.dtype = F64, seed: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rm = (0.2 * torch.randn(c, generator=g, dtype=F64)).to(dtype)
    rv = (0.5 + torch.rand(c, generator=g, dtype=F64)).to(dtype)
    return rm, rv


def _randomize(layer: M, seed: int = 7) -> M:
    """Random affine parameters and running statistics; ``num_batches_tracked`` at 3."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*layer.named_parameters(), *layer.named_buffers()]:
            if name == "num_batches_tracked":
                t.fill_(3)
            elif name in ("weight", "running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g, dtype=F64))
            elif t.is_floating_point():
                t.copy_(0.3 * torch.randn(t.shape, generator=g, dtype=F64))
    return layer


def _layout(t: torch.Tensor) -> tuple[int, ...]:
    """The strides that matter (a dim of size 1 may carry any)."""
    return tuple(s for s, n in zip(t.stride(), t.shape) if n > 1)


def _tol(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for outputs in ``dtype``."""
    return {F64: (1e-12, 1e-12), F32: (1e-5, 1e-5)}.get(dtype, (2e-2, 2e-2))


def _close(a: torch.Tensor, e: torch.Tensor, tol: tuple[float, float]) -> None:
    torch.testing.assert_close(a, e, rtol=tol[0], atol=tol[1], equal_nan=True)


# A case: build() -> (fn, inputs, watch). fn() runs the call (a tensor, or BN's NormOutput); inputs
# are the tensors to differentiate against (x first); watch are tensors to compare after the call
# (the statistics a functional op was given, a layer's buffers). build() makes fresh, identical
# tensors each time, so the routed call and the reference start from the same state.
Build = Callable[[], tuple[Callable[[], Any], list[torch.Tensor], list[torch.Tensor]]]


def _run(build: Build) -> tuple[Any, tuple[torch.Tensor, ...], list[torch.Tensor], list[torch.Tensor]]:
    fn, inputs, watch = build()
    out = fn()
    y = out[0] if isinstance(out, tuple) else out
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=F64).to(y.dtype)
    grads = torch.autograd.grad(y, inputs, dy)
    return out, grads, inputs, watch


def _check(build: Build, spy: _Spy, calls: dict[str, int]) -> None:
    """Run ``build``'s call on the route (as the fixtures set it) and on the reference; compare all."""
    out, grads, inputs, watch = _run(build)
    assert spy.calls == calls
    with _reference():
        out_r, grads_r, _, watch_r = _run(build)
    assert spy.calls == calls  # the reference never reaches the route
    y = out[0] if isinstance(out, tuple) else out
    y_r = out_r[0] if isinstance(out_r, tuple) else out_r
    tol = _tol(y.dtype)
    assert y.dtype == y_r.dtype
    _close(y, y_r, tol)
    x = inputs[0]
    assert _layout(y) == _layout(y_r)
    if x.is_contiguous() or x.movedim(1, -1).is_contiguous():
        assert _layout(y) == _layout(x)  # the input's layout: contiguous or channels-last, kept
    for g, g_r in zip(grads, grads_r, strict=True):
        gtol = tol
        if y.dtype == BF16:  # sums of bfloat16 products: an error relative to the largest term
            gtol = (2e-2, 2e-2 * (1 + float(g_r.detach().abs().max())))
        _close(g, g_r, gtol)
    if isinstance(out, tuple):  # BN's (output, running_mean, running_var, num_batches_tracked)
        for a, e in zip(out[1:], out_r[1:], strict=True):
            assert (a is None) == (e is None)
            if a is not None:
                _close(a, e, tol)
    for a, e in zip(watch, watch_r, strict=True):
        _close(a, e, tol)


# ---------------------------------------------------------------------------------------------
# 1. The route is taken, and keeps normkit's contract.

FUNCTIONAL = [  # (id, shape, layout, affine shape or None, call(x, w, b), torch op called)
    ("gn-64x4", (64, 8, 3, 3), "nchw", (8,), lambda x, w, b: F.group_norm(x, 4, w, b), "group_norm"),
    ("gn-32x8", (32, 16, 2, 3), "nchw", (16,), lambda x, w, b: F.group_norm(x, 8, w, b, 1e-3), "group_norm"),
    (
        "gn-exactly-128-sets",
        (32, 8, 2, 2),
        "nchw",
        (8,),
        lambda x, w, b: F.group_norm(x, 4, w, b),
        "group_norm",
    ),
    ("gn-2d-input", (128, 6), "nchw", (6,), lambda x, w, b: F.group_norm(x, 2, w, b), "group_norm"),
    ("gn-cl", (64, 8, 3, 3), "cl", (8,), lambda x, w, b: F.group_norm(x, 4, w, b), "group_norm"),
    ("gn-3d-cl", (32, 8, 2, 3, 3), "cl", (8,), lambda x, w, b: F.group_norm(x, 4, w, b), "group_norm"),
    (
        "in",
        (32, 8, 3, 3),
        "nchw",
        (8,),
        lambda x, w, b: F.instance_norm(x, weight=w, bias=b).output,
        "instance_norm",
    ),
    (
        "in-cl",
        (32, 8, 3, 3),
        "cl",
        (8,),
        lambda x, w, b: F.instance_norm(x, weight=w, bias=b).output,
        "instance_norm",
    ),
    (
        "in-no-affine",
        (64, 4, 7),
        "nchw",
        None,
        lambda x, w, b: F.instance_norm(x, eps=1e-3).output,
        "instance_norm",
    ),
    ("gn-no-affine", (64, 4, 5), "nchw", None, lambda x, w, b: F.group_norm(x, 2, eps=1e-3), "group_norm"),
    ("ln-last", (16, 8, 12), "nchw", (12,), lambda x, w, b: F.layer_norm(x, 12, w, b), "layer_norm"),
    (
        "ln-exactly-128-rows",
        (128, 5),
        "nchw",
        (5,),
        lambda x, w, b: F.layer_norm(x, (5,), w, b),
        "layer_norm",
    ),
    (
        "ln-two-dims",
        (130, 3, 4),
        "nchw",
        (3, 4),
        lambda x, w, b: F.layer_norm(x, (3, 4), w, b, 1e-6),
        "layer_norm",
    ),
    ("ln-no-affine", (4, 40, 6), "nchw", None, lambda x, w, b: F.layer_norm(x, [6]), "layer_norm"),
    ("ln2d-nchw", (2, 8, 5, 7), "nchw", (8,), lambda x, w, b: F.layer_norm_2d(x, w, b, 1e-6), "layer_norm"),
    ("ln2d-cl", (2, 8, 5, 7), "cl", (8,), lambda x, w, b: F.layer_norm_2d(x, w, b, 1e-6), "layer_norm"),
    ("ln2d-1d-cl", (3, 6, 9), "cl", (6,), lambda x, w, b: F.layer_norm_2d(x, w, b), "layer_norm"),
    ("ln2d-3d-nchw", (2, 4, 3, 2, 5), "nchw", (4,), lambda x, w, b: F.layer_norm_2d(x, w, b), "layer_norm"),
    ("ln2d-no-affine-cl", (2, 8, 5, 7), "cl", None, lambda x, w, b: F.layer_norm_2d(x), "layer_norm"),
    (
        "ln2d-chw",
        (128, 4, 3, 3),
        "nchw",
        (4,),
        lambda x, w, b: F.layer_norm_2d(x, w, b, over="chw"),
        "group_norm",
    ),
]


def _functional(shape, layout, affine, call, dtype: torch.dtype) -> Build:
    def build():
        x = _x(shape, dtype, layout)
        w, b = _wb(affine, dtype) if affine is not None else (None, None)
        inputs = [x] + ([] if w is None or b is None else [w, b])
        return (lambda: call(x, w, b)), inputs, []

    return build


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", FUNCTIONAL, ids=[c[0] for c in FUNCTIONAL])
def test_functional_takes_the_route_and_matches_the_reference(spy, case, dtype):
    _, shape, layout, affine, call, op = case
    _check(_functional(shape, layout, affine, call, dtype), spy, {op: 1})


BN_STATS = ["no-stats", "running", "running+nbt", "eval-no-stats"]
BN_SHAPES = [
    ((16, 4, 3, 3), "nchw"),
    ((16, 4, 3, 3), "cl"),
    ((32, 5), "nchw"),
    ((8, 3, 7), "nchw"),
    ((4, 3, 2, 3, 3), "cl"),
]


def _bn_functional(
    shape,
    layout: str,
    stats: str,
    dtype: torch.dtype,
    param_dtype: torch.dtype | None = None,
    momentum: float | None = 0.1,
    unbiased: bool = True,
    nan: bool = False,
) -> Build:
    pd = param_dtype or dtype

    def build():
        x = _x(shape, dtype, layout)
        if nan:
            _poison(x)
        C = shape[1]
        w, b = _wb((C,), pd)
        rm = rv = nbt = None
        if stats.startswith("running"):
            rm, rv = _stats(C, pd)
        if stats.endswith("nbt"):
            nbt = torch.tensor(3)
        watch = [t for t in (rm, rv, nbt) if t is not None]
        saved = [t.clone() for t in watch]

        def fn():
            out = F.batch_norm(
                x,
                rm,
                rv,
                w,
                b,
                training=stats != "eval-no-stats",
                momentum=momentum,
                eps=1e-5,
                num_batches_tracked=nbt,
                unbiased_running_var=unbiased,
            )
            for t, s in zip(watch, saved, strict=True):  # never written in place
                assert torch.equal(t, s)
            return out

        return fn, [x, w, b], watch

    return build


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize(("shape", "layout"), BN_SHAPES, ids=[f"{len(s)}d-{lay}" for s, lay in BN_SHAPES])
@pytest.mark.parametrize("stats", BN_STATS)
def test_functional_batch_norm_takes_the_route_and_returns_new_statistics(spy, stats, shape, layout, dtype):
    _check(_bn_functional(shape, layout, stats, dtype), spy, {"batch_norm": 1})


@pytest.mark.parametrize("stats", ["no-stats", "running+nbt"])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_functional_batch_norm_mixed_bf16_input_float32_parameters(spy, stats, layout):
    _check(_bn_functional((16, 4, 3, 3), layout, stats, BF16, param_dtype=F32), spy, {"batch_norm": 1})


def test_functional_batch_norm_statistics_advance(spy):
    """A sanity check on the comparisons above: the returned statistics are new and updated."""
    x = _x((16, 4, 3, 3))
    rm, rv = _stats(4)
    nbt = torch.tensor(3)
    out = F.batch_norm(x, rm, rv, training=True, momentum=0.25, num_batches_tracked=nbt)
    assert spy.calls == {"batch_norm": 1}
    assert out.running_mean is not rm and out.running_var is not rv and out.num_batches_tracked is not nbt
    assert (
        out.running_mean is not None and out.running_var is not None and out.num_batches_tracked is not None
    )
    mean, var = x.detach().mean((0, 2, 3)), x.detach().var((0, 2, 3))
    torch.testing.assert_close(out.running_mean, 0.75 * rm + 0.25 * mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.running_var, 0.75 * rv + 0.25 * var, rtol=1e-12, atol=1e-12)
    assert int(out.num_batches_tracked) == 4 and int(nbt) == 3


LAYERS = [  # (id, make(dtype), shape, layout, torch op called)
    ("GroupNorm", lambda dt: nkn.GroupNorm(4, 8, dtype=dt), (64, 8, 3, 3), "nchw", "group_norm"),
    ("GroupNorm-2d", lambda dt: nkn.GroupNorm(2, 6, dtype=dt), (128, 6), "nchw", "group_norm"),
    ("GroupNorm-cl", lambda dt: nkn.GroupNorm(4, 8, dtype=dt), (64, 8, 3, 3), "cl", "group_norm"),
    (
        "InstanceNorm2d",
        lambda dt: nkn.InstanceNorm2d(8, affine=True, dtype=dt),
        (32, 8, 3, 3),
        "nchw",
        "instance_norm",
    ),
    (
        "InstanceNorm2d-cl",
        lambda dt: nkn.InstanceNorm2d(8, affine=True, dtype=dt),
        (32, 8, 3, 3),
        "cl",
        "instance_norm",
    ),
    ("InstanceNorm1d", lambda dt: nkn.InstanceNorm1d(8, dtype=dt), (32, 8, 5), "nchw", "instance_norm"),
    ("LayerNorm", lambda dt: nkn.LayerNorm(12, dtype=dt), (16, 8, 12), "nchw", "layer_norm"),
    ("LayerNorm-two-dims", lambda dt: nkn.LayerNorm((3, 4), dtype=dt), (130, 3, 4), "nchw", "layer_norm"),
    ("LayerNorm-no-bias", lambda dt: nkn.LayerNorm(6, bias=False, dtype=dt), (200, 6), "nchw", "layer_norm"),
    ("LayerNorm2d", lambda dt: nkn.LayerNorm2d(8, dtype=dt), (2, 8, 5, 7), "nchw", "layer_norm"),
    ("LayerNorm2d-cl", lambda dt: nkn.LayerNorm2d(8, dtype=dt), (2, 8, 5, 7), "cl", "layer_norm"),
    ("LayerNorm2d-1d-cl", lambda dt: nkn.LayerNorm2d(6, dtype=dt), (3, 6, 9), "cl", "layer_norm"),
    (
        "LayerNorm2d-chw",
        lambda dt: nkn.LayerNorm2d(4, over="chw", dtype=dt),
        (128, 4, 3, 3),
        "nchw",
        "group_norm",
    ),
    ("BatchNorm2d", lambda dt: nkn.BatchNorm2d(4, dtype=dt), (16, 4, 3, 3), "nchw", "batch_norm"),
    ("BatchNorm2d-cl", lambda dt: nkn.BatchNorm2d(4, dtype=dt), (16, 4, 3, 3), "cl", "batch_norm"),
    (
        "BatchNorm2d-no-affine",
        lambda dt: nkn.BatchNorm2d(4, affine=False, dtype=dt),
        (8, 4, 3, 3),
        "nchw",
        "batch_norm",
    ),
    (
        "BatchNorm2d-untracked",
        lambda dt: nkn.BatchNorm2d(4, track_running_stats=False, dtype=dt),
        (8, 4, 3, 3),
        "cl",
        "batch_norm",
    ),
    (
        "BatchNorm2d-untracked-eval",
        lambda dt: nkn.BatchNorm2d(4, track_running_stats=False, dtype=dt).eval(),
        (8, 4, 3, 3),
        "nchw",
        "batch_norm",
    ),
    ("BatchNorm1d-2d", lambda dt: nkn.BatchNorm1d(5, dtype=dt), (32, 5), "nchw", "batch_norm"),
    (
        "BatchNorm1d-3d",
        lambda dt: nkn.BatchNorm1d(3, momentum=0.3, dtype=dt),
        (8, 3, 7),
        "nchw",
        "batch_norm",
    ),
    ("BatchNorm3d-cl", lambda dt: nkn.BatchNorm3d(3, dtype=dt), (4, 3, 2, 3, 3), "cl", "batch_norm"),
]


def _layer(
    make: Callable[[torch.dtype], torch.nn.Module], shape, layout, dtype, x_dtype=None, nan=False
) -> Build:
    def build():
        layer = _randomize(make(dtype))
        x = _x(shape, x_dtype or dtype, layout)
        if nan:
            _poison(x)
        buffers = [b for _, b in sorted(layer.named_buffers())]
        return (lambda: layer(x)), [x, *layer.parameters()], buffers

    return build


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", LAYERS, ids=[c[0] for c in LAYERS])
def test_layers_take_the_route_and_match_the_reference(spy, case, dtype):
    _, make, shape, layout, op = case
    _check(_layer(make, shape, layout, dtype), spy, {op: 1})


@pytest.mark.parametrize("make", [nkn.BatchNorm2d, lambda c, **kw: nkn.BatchNorm2d(c, affine=False, **kw)])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_batch_norm_layer_mixed_bf16_input_float32_parameters(spy, make, layout):
    _check(
        _layer(lambda dt: make(4, dtype=dt), (16, 4, 3, 3), layout, F32, x_dtype=BF16), spy, {"batch_norm": 1}
    )


def test_batch_norm_layer_buffers_advance(spy):
    """A sanity check on the comparisons above: the buffers are updated in place, one step counted."""
    bn = _randomize(nkn.BatchNorm2d(4, momentum=0.25, dtype=F64))
    rm, rv = bn.running_mean, bn.running_var
    assert rm is not None and rv is not None
    before = rm.clone(), rv.clone()
    x = _x((16, 4, 3, 3))
    bn(x)
    assert spy.calls == {"batch_norm": 1}
    assert bn.running_mean is rm and bn.running_var is rv  # the same tensors, written in place
    mean, var = x.detach().mean((0, 2, 3)), x.detach().var((0, 2, 3))
    torch.testing.assert_close(rm, 0.75 * before[0] + 0.25 * mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, 0.75 * before[1] + 0.25 * var, rtol=1e-12, atol=1e-12)
    nbt, skipped = bn.num_batches_tracked, bn.num_skipped_updates
    assert nbt is not None and skipped is not None
    assert int(nbt) == 4 and int(skipped) == 0


# ---------------------------------------------------------------------------------------------
# 2. A batch with non-finite statistics.


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_non_finite_batch_leaves_layer_buffers_and_counts_a_skip(spy, layout, dtype):
    def make(dt):
        return nkn.BatchNorm2d(4, dtype=dt)

    layer = _randomize(make(dtype))
    before = {k: v.clone() for k, v in layer.named_buffers()}
    x = _x((16, 4, 3, 3), dtype, layout)
    _poison(x)
    y = layer(x)
    assert spy.calls == {"batch_norm": 1}
    assert not torch.isfinite(y[:, 0]).any() and torch.isfinite(y[:, 1:]).all()
    after = dict(layer.named_buffers())
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(after[name], before[name]), name
    assert int(after["num_skipped_updates"]) == int(before["num_skipped_updates"]) + 1
    spy.calls.clear()
    _check(_layer(make, (16, 4, 3, 3), layout, dtype, nan=True), spy, {"batch_norm": 1})


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_non_finite_batch_functional_returns_the_statistics_unchanged(spy, dtype):
    rm, rv = _stats(4, dtype)
    nbt = torch.tensor(3)
    x = _x((16, 4, 3, 3), dtype)
    _poison(x)
    out = F.batch_norm(x, rm, rv, training=True, num_batches_tracked=nbt)
    assert spy.calls == {"batch_norm": 1}
    assert (
        out.running_mean is not None and out.running_var is not None and out.num_batches_tracked is not None
    )
    assert torch.equal(out.running_mean, rm) and torch.equal(out.running_var, rv)
    assert int(out.num_batches_tracked) == 3
    spy.calls.clear()
    _check(_bn_functional((16, 4, 3, 3), "nchw", "running+nbt", dtype, nan=True), spy, {"batch_norm": 1})


# A non-finite value already in a running buffer: the batch's own statistics decide (as on the
# reference path), so the other channels keep updating.


@pytest.mark.parametrize("layer", [True, False], ids=["layer", "functional"])
def test_finite_batch_with_a_nan_running_statistic_updates_like_the_reference(spy, layer):
    def build():
        x = _x((16, 4, 3, 3))
        if layer:
            bn = _randomize(nkn.BatchNorm2d(4, dtype=F64))
            rv = bn.running_var
            assert rv is not None
            with torch.no_grad():
                rv[0] = float("nan")
            return (lambda: bn(x)), [x, *bn.parameters()], [b for _, b in sorted(bn.named_buffers())]
        rm, rv = _stats(4)
        rv[0] = float("nan")
        nbt = torch.tensor(3)
        return (lambda: F.batch_norm(x, rm, rv, training=True, num_batches_tracked=nbt)), [x], []

    _check(build, spy, {"batch_norm": 1})


def test_batch_norm_layer_parameters_on_another_device_raise_norm_error(spy, monkeypatch):
    monkeypatch.setattr(_direct, "DEVICES", {"meta", "cpu", "cuda"})  # meta stands in for a second device
    x = torch.randn(8, 4, 3, 3, device="meta", dtype=BF16)
    bn = nkn.BatchNorm2d(4, track_running_stats=False)  # float32 parameters, on the CPU
    with pytest.raises(NormError, match="weight is on cpu but the input is on meta"):
        bn(x)


# ---------------------------------------------------------------------------------------------
# 3. What the route does not take runs normkit's general path, with the reference's result.


def _strided(x: torch.Tensor) -> torch.Tensor:
    """Every other position of the last dim: neither contiguous nor channels-last."""
    return x.detach()[..., ::2].requires_grad_()


def _fbuild(make_x: Callable[[], torch.Tensor], call: Callable[..., Any], affine=None, pdtype=None) -> Build:
    """A functional case: ``call(x, w, b)`` on ``make_x()``, affine of shape ``affine`` in ``pdtype``."""

    def build():
        x = make_x()
        w, b = _wb(affine, pdtype or x.dtype) if affine is not None else (None, None)
        inputs = [x] + ([] if w is None or b is None else [w, b])
        return (lambda: call(x, w, b)), inputs, []

    return build


def _bn_layer(**kwargs: Any) -> Callable[[torch.dtype], torch.nn.Module]:
    return lambda dt: nkn.BatchNorm2d(4, dtype=dt, **kwargs)


REFUSED: list[tuple[str, Build]] = [
    (
        "gn-strided",
        _fbuild(lambda: _strided(_x((64, 8, 3, 6))), lambda x, w, b: F.group_norm(x, 4, w, b), (8,)),
    ),
    (
        "in-running-stats",
        _fbuild(
            lambda: _x((64, 4, 3, 3)),
            lambda x, w, b: F.instance_norm(x, *_stats(4), w, b).output,
            (4,),
        ),
    ),
    (
        "gn-127-sets",
        _fbuild(lambda: _x((127, 4, 3, 3)), lambda x, w, b: F.group_norm(x, 1, w, b), (4,)),
    ),
    (
        "gn-31x4-sets",
        _fbuild(lambda: _x((31, 8, 2, 2)), lambda x, w, b: F.group_norm(x, 4, w, b), (8,)),
    ),
    (
        "gn-strided",
        _fbuild(lambda: _strided(_x((64, 8, 3, 6))), lambda x, w, b: F.group_norm(x, 4, w, b), (8,)),
    ),
    (
        "gn-bf16-float32-affine",
        _fbuild(lambda: _x((64, 8, 3, 3), BF16), lambda x, w, b: F.group_norm(x, 4, w, b), (8,), F32),
    ),
    (
        "gn-parameter-input",
        _fbuild(
            lambda: torch.nn.Parameter(_x((64, 8, 3, 3)).detach()),
            lambda x, w, b: F.group_norm(x, 4, w, b),
            (8,),
        ),
    ),
    ("ln-127-rows", _fbuild(lambda: _x((127, 5)), lambda x, w, b: F.layer_norm(x, 5, w, b), (5,))),
    ("ln-one-value-per-row", _fbuild(lambda: _x((200, 1)), lambda x, w, b: F.layer_norm(x, 1, w, b), (1,))),
    (
        "ln-channels-last-rows",
        _fbuild(lambda: _x((8, 4, 5, 7), layout="cl"), lambda x, w, b: F.layer_norm(x, 7, w, b), (7,)),
    ),
    (
        "ln-bf16-float32-affine",
        _fbuild(lambda: _x((16, 8, 12), BF16), lambda x, w, b: F.layer_norm(x, 12, w, b), (12,), F32),
    ),
    (
        "ln2d-strided",
        _fbuild(lambda: _strided(_x((2, 8, 5, 14))), lambda x, w, b: F.layer_norm_2d(x, w, b), (8,)),
    ),
    (
        "ln2d-one-channel",
        _fbuild(lambda: _x((2, 1, 5, 7)), lambda x, w, b: F.layer_norm_2d(x, w, b), (1,)),
    ),
    (
        "ln2d-bf16-float32-affine",
        _fbuild(lambda: _x((2, 8, 5, 7), BF16, "cl"), lambda x, w, b: F.layer_norm_2d(x, w, b), (8,), F32),
    ),
    (
        "ln2d-chw-64-samples",
        _fbuild(lambda: _x((64, 4, 3, 3)), lambda x, w, b: F.layer_norm_2d(x, w, b, over="chw"), (4,)),
    ),
    (
        "bn-strided",
        _fbuild(
            lambda: _strided(_x((16, 4, 3, 6))),
            lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
            (4,),
        ),
    ),
    (
        "bn-bf16-bf16-affine-float32-stats",
        _fbuild(
            lambda: _x((16, 4, 3, 3), BF16),
            lambda x, w, b: F.batch_norm(x, *_stats(4, F32), w, b, training=True),
            (4,),
            BF16,
        ),
    ),
    (
        "InstanceNorm2d-tracking",
        _layer(
            lambda dt: nkn.InstanceNorm2d(4, affine=True, track_running_stats=True, dtype=dt),
            (64, 4, 3, 3),
            "nchw",
            F64,
        ),
    ),
    ("GroupNorm-few-sets", _layer(lambda dt: nkn.GroupNorm(4, 8, dtype=dt), (16, 8, 3, 3), "nchw", F64)),
    (
        "GroupNorm-bf16-input-float32-affine",
        _layer(lambda dt: nkn.GroupNorm(4, 8, dtype=dt), (64, 8, 3, 3), "nchw", F32, x_dtype=BF16),
    ),
    ("LayerNorm-few-rows", _layer(lambda dt: nkn.LayerNorm(12, dtype=dt), (10, 12, 12), "nchw", F32)),
    (
        "LayerNorm2d-bf16-input-float32-affine",
        _layer(lambda dt: nkn.LayerNorm2d(8, dtype=dt), (2, 8, 5, 7), "cl", F32, x_dtype=BF16),
    ),
    (
        "LayerNorm2d-chw-few-samples",
        _layer(lambda dt: nkn.LayerNorm2d(4, over="chw", dtype=dt), (64, 4, 3, 3), "nchw", F64),
    ),
    ("BatchNorm2d-eval", _layer(lambda dt: _bn_layer()(dt).eval(), (16, 4, 3, 3), "nchw", F64)),
    # eps=0, which normkit takes and torch's training op refuses (ValueError)
    ("BatchNorm2d-eps-0", _layer(_bn_layer(eps=0.0), (16, 4, 3, 3), "nchw", F64)),
    (
        "BatchNorm2d-eps-0-untracked",
        _layer(_bn_layer(eps=0.0, track_running_stats=False), (16, 4, 3, 3), "cl", F64),
    ),
]


BN_RULES = [  # the running-statistics rules the route keeps: the cumulative average, the biased variance
    ("bn-momentum-none", _bn_functional((16, 4, 3, 3), "nchw", "running+nbt", F64, momentum=None)),
    ("bn-momentum-none-cl", _bn_functional((16, 4, 3, 3), "cl", "running+nbt", F32, momentum=None)),
    ("bn-biased-running-var", _bn_functional((16, 4, 3, 3), "nchw", "running+nbt", F64, unbiased=False)),
    ("bn-biased-running-var-1d", _bn_functional((32, 5), "nchw", "running", F32, unbiased=False)),
    ("BatchNorm2d-momentum-none", _layer(_bn_layer(momentum=None), (16, 4, 3, 3), "nchw", F64)),
    ("BatchNorm2d-momentum-none-cl", _layer(_bn_layer(momentum=None), (16, 4, 3, 3), "cl", F32)),
    (
        "BatchNorm2d-biased-running-var",
        _layer(_bn_layer(unbiased_running_var=False), (16, 4, 3, 3), "nchw", F64),
    ),
]


@pytest.mark.parametrize("case", BN_RULES, ids=[c[0] for c in BN_RULES])
def test_batch_norm_running_statistic_rules_take_the_route(spy, case):
    _check(case[1], spy, {"batch_norm": 1})


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_calls_run_the_general_path(spy, case):
    _check(case[1], spy, {})


ONE_VALUE = [  # one value per set with batch statistics: normkit's typed error, on every path
    ("gn", lambda: F.group_norm(_x((128, 8, 1)), 8)),
    ("gn-4d", lambda: F.group_norm(_x((128, 8, 1, 1)), 8, *_wb((8,)))),
    ("GroupNorm", lambda: nkn.GroupNorm(8, 8, dtype=F64)(_x((128, 8, 1)))),
    ("LayerNorm2d-chw", lambda: nkn.LayerNorm2d(1, over="chw", dtype=F64)(_x((128, 1, 1, 1)))),
    ("bn-2d", lambda: F.batch_norm(_x((1, 4)), *_stats(4), training=True)),
    ("bn-4d-no-stats", lambda: F.batch_norm(_x((1, 4, 1, 1)), training=False)),
    ("BatchNorm1d", lambda: nkn.BatchNorm1d(4, dtype=F64)(_x((1, 4)))),
    ("BatchNorm2d", lambda: nkn.BatchNorm2d(4, dtype=F64)(_x((1, 4, 1, 1)))),
    (
        "BatchNorm2d-untracked-eval",
        lambda: nkn.BatchNorm2d(4, track_running_stats=False, dtype=F64).eval()(_x((1, 4, 1, 1))),
    ),
]


@pytest.mark.parametrize("case", ONE_VALUE, ids=[c[0] for c in ONE_VALUE])
def test_one_value_per_set_raises_the_reference_error(spy, case):
    with pytest.raises(NormError) as routed:
        case[1]()
    assert spy.calls == {}
    with _reference(), pytest.raises(NormError) as reference:
        case[1]()
    assert type(routed.value) is type(reference.value)
    assert str(routed.value) == str(reference.value)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_other_backends_refuse_the_route(spy, backend):
    x = _x((64, 8, 3, 3))
    assert _direct.route(x)  # the fixture's setting: "native", "cpu" in DEVICES
    with _backend(backend):
        assert not _direct.route(x)
        assert _direct.group_norm(x, 4, None, None, 1e-5) is None
        assert _direct.layer_norm(x, (3,), None, None, 1e-5) is None
        assert _direct.layer_norm_c(x, None, None, 1e-5) is None
        assert _direct.batch_norm_train(x, None, None, None, None, None, 0.1, 1e-5, True) is None
    assert spy.calls == {}


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize(
    "case",
    [c for c in FUNCTIONAL if c[0] in ("gn-64x4", "ln-last", "ln2d-cl", "ln2d-chw")],
    ids=lambda c: c[0],
)
def test_other_backends_run_their_own_path(spy, case, backend):
    _, shape, layout, affine, call, _ = case
    with kernels.use(backend):
        _check(_functional(shape, layout, affine, call, F64), spy, {})


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_other_backends_layers_run_their_own_path(spy, backend):
    with kernels.use(backend):
        _check(_layer(lambda dt: nkn.BatchNorm2d(4, dtype=dt), (16, 4, 3, 3), "cl", F64), spy, {})
        _check(_layer(lambda dt: nkn.LayerNorm(12, dtype=dt), (16, 8, 12), "nchw", F64), spy, {})


TRANSFORMED = [  # (id, shape, affine shape, call(x, w, b)): a plain call of these takes the route
    ("gn", (64, 8, 3, 3), (8,), lambda x, w, b: F.group_norm(x, 4, w, b)),
    ("ln", (16, 8, 12), (12,), lambda x, w, b: F.layer_norm(x, 12, w, b)),
    ("ln2d", (16, 8, 3, 3), (8,), lambda x, w, b: F.layer_norm_2d(x, w, b)),
    ("bn", (16, 8, 3, 3), (8,), lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True).output),
]


def _transformed(
    case, spy: _Spy
) -> tuple[Callable[..., torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """The case's call and plain (detached) x, w, b; checks that a plain call takes the route."""
    _, shape, affine, call = case
    x = _x(shape).detach()
    w, b = (t.detach() for t in _wb(affine))
    call(x, w, b)
    assert spy.total == 1  # so the refusals below are the transforms' doing
    spy.calls.clear()
    return call, x, w, b


def _recording(call: Callable[..., torch.Tensor], seen: list[bool]) -> Callable[..., torch.Tensor]:
    def fn(x, w, b):
        seen.append(_direct.route(x))
        return call(x, w, b)

    return fn


@pytest.mark.parametrize("case", TRANSFORMED, ids=[c[0] for c in TRANSFORMED])
def test_torch_func_grad_refuses_the_route(spy, case):
    call, x, w, b = _transformed(case, spy)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    seen: list[bool] = []
    fn = _recording(call, seen)
    gx, gw = torch.func.grad(lambda t, u: (fn(t, u, b) * dy).sum(), argnums=(0, 1))(x, w)
    assert seen == [False] and spy.calls == {}
    x.requires_grad_()
    w.requires_grad_()
    with _reference():
        ref = torch.autograd.grad(call(x, w, b), (x, w), dy)
    torch.testing.assert_close(gx, ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, ref[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", TRANSFORMED, ids=[c[0] for c in TRANSFORMED])
def test_torch_func_vmap_refuses_the_route(spy, case):
    call, x, w, b = _transformed(case, spy)
    xs = torch.stack([x, 0.5 * x.flip(0) - 1])
    seen: list[bool] = []
    y = torch.func.vmap(_recording(call, seen), in_dims=(0, None, None))(xs, w, b)
    assert seen == [False] and spy.calls == {}
    with _reference():
        ref = torch.stack([call(xi, w, b) for xi in xs])
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", TRANSFORMED, ids=[c[0] for c in TRANSFORMED])
def test_forward_mode_ad_refuses_the_route(spy, case):
    call, x, w, b = _transformed(case, spy)
    t = torch.randn(x.shape, generator=torch.Generator().manual_seed(13), dtype=F64)
    results = []
    for ctx in (contextlib.nullcontext(), _reference()):
        with ctx, fwad.dual_level():
            assert not _direct.route(x)  # at any dual level, even a plain tensor stays off the route
            d = fwad.make_dual(x, t)
            assert not _direct.route(d)
            p = fwad.unpack_dual(call(d, w, b))
            assert p.tangent is not None
            results.append((p.primal.clone(), p.tangent.clone()))
    assert spy.calls == {}
    for a, e in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


class _PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", TRANSFORMED, ids=[c[0] for c in TRANSFORMED])
def test_dispatch_mode_refuses_the_route(spy, case):
    call, x, w, b = _transformed(case, spy)
    with _PassThrough():
        assert not _direct.route(x)
        y = call(x, w, b)
    assert spy.calls == {}
    with _reference():
        ref = call(x, w, b)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


def test_dispatch_mode_refuses_the_route_for_layers(spy):
    bn, gn = _randomize(nkn.BatchNorm2d(8, dtype=F64)), nkn.GroupNorm(4, 8, dtype=F64)
    bn_ref, gn_ref = copy.deepcopy(bn), copy.deepcopy(gn)
    x = _x((64, 8, 3, 3)).detach()
    with _PassThrough():
        y_bn, y_gn = bn(x), gn(x)
    assert spy.calls == {}
    with _reference():
        torch.testing.assert_close(y_bn, bn_ref(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(y_gn, gn_ref(x), rtol=1e-12, atol=1e-12)
    for (name, a), (_, e) in zip(sorted(bn.named_buffers()), sorted(bn_ref.named_buffers()), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize(
    "call",
    [
        lambda x: F.layer_norm_2d(x, *_wb((4,))),
        lambda x: nkn.LayerNorm2d(4, dtype=F64)(x),
        lambda x: F.layer_norm(x, (3,)),
        lambda x: F.group_norm(x, 2),
    ],
    ids=["ln2d", "LayerNorm2d", "ln", "gn"],
)
def test_empty_input_refuses_the_route(spy, call):
    x = torch.empty(0, 4, 3, 3, dtype=F64)
    assert not _direct.route(x)
    assert _direct.layer_norm_c(x, None, None, 1e-5) is None  # the one check that refuses it is route's
    y = call(x)
    assert spy.calls == {}
    assert y.shape == x.shape and y.dtype == x.dtype


# ---------------------------------------------------------------------------------------------
# 4. The production setting: no CPU tensor takes the route.


def test_devices_default_is_cuda_only():
    assert DEFAULT_DEVICES == {"cuda"}


@pytest.mark.parametrize("backend", ["auto", "native"])
def test_cpu_tensors_never_take_the_route_by_default(default_spy, backend):
    assert _direct.DEVICES == DEFAULT_DEVICES
    x = _x((64, 8, 3, 3))
    with kernels.use(backend):
        assert not _direct.route(x)
        assert not _direct.route(x.detach())
        for _, shape, layout, affine, call, _ in FUNCTIONAL[:: len(FUNCTIONAL) // 4]:
            _check(_functional(shape, layout, affine, call, F32), default_spy, {})
        for case in (LAYERS[0], LAYERS[2], LAYERS[6], LAYERS[9], LAYERS[14]):
            _check(_layer(case[1], case[2], case[3], F32), default_spy, {})
        _check(_bn_functional((16, 4, 3, 3), "cl", "running+nbt", F32), default_spy, {})


# Autocast: torch's GroupNorm and LayerNorm run in float32 under autocast and return float32, where
# normkit returns the input's dtype, so those stay on normkit's path; torch's batch_norm keeps the
# input's dtype, so BatchNorm still takes the route.

AUTOCAST = [
    ("gn", lambda x, w, b: F.group_norm(x, 4, w, b), (64, 8, 3, 3), {}),
    ("ln", lambda x, w, b: F.layer_norm(x, 3, w[:3], b[:3]), (64, 8, 3), {}),
    ("ln2d", lambda x, w, b: F.layer_norm_2d(x, w, b), (4, 8, 3, 3), {}),
    (
        "bn",
        lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True).output,
        (16, 8, 3, 3),
        {"batch_norm": 1},
    ),
]


@pytest.mark.parametrize("case", AUTOCAST, ids=[c[0] for c in AUTOCAST])
def test_autocast_keeps_normkit_dtypes(spy, case):
    _, call, shape, calls = case
    x = _x(shape, BF16)
    w, b = (t.detach().to(BF16) for t in _wb((8,)))
    with torch.autocast("cpu", dtype=BF16):
        got = call(x, w, b)
    assert spy.calls == calls
    with _reference(), torch.autocast("cpu", dtype=BF16):
        want = call(x, w, b)
    assert got.dtype == want.dtype == BF16
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_autocast_batch_norm_layer_takes_the_route(spy):
    x = _x((16, 8, 3, 3), BF16)
    layer, ref = nkn.BatchNorm2d(8), nkn.BatchNorm2d(8)  # float32 parameters and buffers: AMP's case
    with torch.autocast("cpu", dtype=BF16):
        got = layer(x)
    assert spy.calls == {"batch_norm": 1}
    with _reference(), torch.autocast("cpu", dtype=BF16):
        want = ref(x)
    assert got.dtype == want.dtype == BF16
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    for a, b in zip(layer.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
