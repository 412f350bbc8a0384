"""Every kernel backend (``"reference"``, ``"cpu"``, ``"auto"``) against an independent float64 oracle.

The oracle is ``tests/reference.py`` (and ``tests/reference_family.py`` for Ghost BN and Batch
Renorm): textbook two-pass float64 code that imports nothing from normkit, with autograd through it
giving the gradient oracle. Each case runs one public functional op under
``normkit.kernels.use(backend)`` and compares the output, every gradient (input, weight, bias) and
the returned running statistics with the oracle evaluated on the *same* rounded input, so the only
error measured is the backend's own.

Covered:

* every norm (BN train / eval, GN with G = 1, 4, C, IN, LN over the last dim and over (C, H, W) with
  an element-wise affine, LayerNorm2d over "c" and "chw", Ghost BN, Batch Renorm), affine on/off,
  NCHW and channels_last (the output and the input grad keep the input's memory format), fp32,
  fp64, bf16 and fp16, with tolerances relative to the output scale per dtype;
* edge shapes (every dtype): N = 0, N = 1 (eval and per-sample norms), C = 1, H = W = 1, odd
  sizes, (N, C), (N, C, L) in both memory orders, 5-d channels_last_3d, non-contiguous (transposed,
  sliced) inputs, a non-contiguous weight view, grad_outputs in another layout or expanded;
* autograd paths: weight or bias alone, partial ``requires_grad``, gradcheck + gradgradcheck in
  fp64, forward-mode AD (the kernels' saved statistics feed ``core.norm_jvp``), ``torch.func``;
* larger inputs (several chunks per set, many sets, vector tails; fp32 with a 1e4 offset), and one
  set of 1e7 values (TESTING.md item 6);
* the layers, whose eager fast paths call the kernels directly: output, grads, running buffers and
  the eval step after, for BN 1d/2d/3d, GN, IN (with and without tracking), LN, LayerNorm2d, Ghost
  BN and Batch Renorm; a batch the fused training step hands back updates the buffers once;
* the numerics cases of TESTING.md (items 3, 4, 5, 25): large mean, constant input, fp16 values
  near the fp16 maximum, |x| ~ 1e30 and subnormals in fp32, NaN confined to its own sets and kept
  out of the running statistics;
* dispatch: :func:`normkit.kernels.plan` per layer and layout, ``use`` validation, nesting and
  restoring, ``status``, which calls reach the reference core (a spy on
  ``normkit.ops.core.norm_forward`` / ``norm_backward``), including the fallback for |x| ~ 1e30;
* ``torch.compile(fullgraph=True)`` of a small BN/GN model on the cpu backend vs eager reference;
* the build fallback in a subprocess with an empty cache and ``NORMKIT_NO_BUILD=1``.

Two bugs found on the way have regression tests: Batch Renorm's forward-mode AD differentiated
through r and d, and BN eval inherited a wrong ATen input-grad for one channels_last stride pattern.
"""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import normkit
import normkit.functional as F
from normkit import kernels
from normkit.ops import core
from tests.functional.helpers import affine_params, randn, running_stats
from tests.reference import (
    ref_batch_norm,
    ref_group_norm,
    ref_instance_norm,
    ref_layer_norm,
    ref_layer_norm_2d,
)
from tests.reference_family import ref_batch_renorm, ref_ghost_batch_norm

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPES = [F32, F64, BF16, F16]
BACKENDS = ("reference", "cpu", "auto")
CL = torch.channels_last


def _cpu_kernels_available() -> bool:
    with warnings.catch_warnings():  # a failed build warns (KernelBuildWarning); here it only means "skip"
        warnings.simplefilter("ignore", kernels.KernelBuildWarning)
        return kernels.build()


CPU_BUILT = _cpu_kernels_available()
NO_CPU = "the fused CPU kernels cannot be built here (no C++ compiler or toolchain)"
needs_cpu = pytest.mark.skipif(not CPU_BUILT, reason=NO_CPU)


def _backend_params():
    return [pytest.param(b, marks=needs_cpu) if b == "cpu" else b for b in BACKENDS]


# max |got - want| / max |want| (per dtype) for the output and for the gradients
TOL = {F32: 1e-5, F64: 1e-12, F16: 2e-3, BF16: 1.6e-2}
GTOL = {F32: 5e-5, F64: 1e-11, F16: 4e-3, BF16: 2.5e-2}
STAT_TOL = {
    F32: 1e-6,
    F64: 1e-12,
    F16: 1e-6,
    BF16: 1e-6,
}  # running stats: float32 (float64) from exact inputs


def pdtype(dtype: torch.dtype) -> torch.dtype:
    """Parameters and buffers: float64 for float64 inputs, float32 otherwise (mixed precision)."""
    return F64 if dtype == F64 else F32


def rel_err(got: torch.Tensor, want: torch.Tensor, scale: float | None = None) -> float:
    if want.numel() == 0:
        assert got.numel() == 0
        return 0.0
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, (got.shape, want.shape)
    if scale is None:
        scale = float(want.abs().max())
    scale = max(scale, 1e-300)
    err = (got - want).abs().max()
    if bool(torch.isnan(err)):
        return float("inf")
    return float(err) / scale


def assert_close_rel(
    got: torch.Tensor, want: torch.Tensor, tol: float, what: str = "", scale: float | None = None
):
    err = rel_err(got, want, scale)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


# ---- the op table ------------------------------------------------------------------------------
#
# run(x, w, b) -> (y, extras) on normkit; ref(x64, w64, b64) -> (y64, extras64) on the oracle, where
# extras are the non-differentiable running statistics (and step counter) the op returns.

MOMENTUM = 0.1
GHOST = 2
R_MAX, D_MAX = 1.5, 0.5


def _buffers(C: int, dtype: torch.dtype):
    rm, rv = running_stats(C, dtype)
    return rm, rv, torch.tensor(3, dtype=torch.long)


def _bn_train(x, w, b):
    rm, rv, nbt = _buffers(x.shape[1], pdtype(x.dtype))
    out = F.batch_norm(x, rm, rv, w, b, training=True, momentum=MOMENTUM, num_batches_tracked=nbt)
    return out.output, [out.running_mean, out.running_var, out.num_batches_tracked]


def _bn_train_ref(x, w, b):
    rm, rv, nbt = _buffers(x.shape[1], F64)
    out = ref_batch_norm(x, rm, rv, w, b, training=True, momentum=MOMENTUM, num_batches_tracked=nbt)
    return out.output, [out.running_mean, out.running_var, out.num_batches_tracked]


def _bn_eval(x, w, b):
    rm, rv, _ = _buffers(x.shape[1], pdtype(x.dtype))
    return F.batch_norm(x, rm, rv, w, b, training=False).output, []


def _bn_eval_ref(x, w, b):
    rm, rv, _ = _buffers(x.shape[1], F64)
    return ref_batch_norm(x, rm, rv, w, b, training=False).output, []


def _in(x, w, b):
    rm, rv, nbt = _buffers(x.shape[1], pdtype(x.dtype))
    out = F.instance_norm(x, rm, rv, w, b, momentum=MOMENTUM, num_batches_tracked=nbt)
    return out.output, [out.running_mean, out.running_var, out.num_batches_tracked]


def _in_ref(x, w, b):
    rm, rv, nbt = _buffers(x.shape[1], F64)
    out = ref_instance_norm(x, rm, rv, w, b, momentum=MOMENTUM, num_batches_tracked=nbt)
    return out.output, [out.running_mean, out.running_var, out.num_batches_tracked]


def _ghost(x, w, b):
    rm, rv, _ = _buffers(x.shape[1], pdtype(x.dtype))
    out = F.ghost_batch_norm(x, rm, rv, w, b, training=True, momentum=MOMENTUM, ghost_batch_size=GHOST)
    return out.output, [out.running_mean, out.running_var]


def _ghost_ref(x, w, b):
    rm, rv, _ = _buffers(x.shape[1], F64)
    y, rm, rv, _ = ref_ghost_batch_norm(x, rm, rv, w, b, GHOST, MOMENTUM, 1e-5)
    return y, [rm, rv]


def _renorm(x, w, b):
    rm, rv, _ = _buffers(x.shape[1], pdtype(x.dtype))
    out = F.batch_renorm(x, rm, rv, w, b, training=True, momentum=MOMENTUM, r_max=R_MAX, d_max=D_MAX)
    return out.output, [out.running_mean, out.running_var]


def _renorm_ref(x, w, b):
    rm, rv, _ = _buffers(x.shape[1], F64)
    y, rm, rv, _, _ = ref_batch_renorm(x, rm, rv, w, b, R_MAX, D_MAX, MOMENTUM, 1e-5)
    return y, [rm, rv]


def _plain(f):
    return lambda x, w, b: (f(x, w, b), [])


def _channel(shape):
    return (shape[1],)


@dataclass(frozen=True)
class Op:
    name: str
    run: Callable
    ref: Callable
    pshape: Callable[[tuple], tuple] = _channel
    min_dim: int = 2  # fewest dims of an input it takes

    def __repr__(self) -> str:
        return self.name


OPS = {
    op.name: op
    for op in [
        Op("bn_train", _bn_train, _bn_train_ref),
        Op("bn_eval", _bn_eval, _bn_eval_ref),
        Op(
            "gn1",
            _plain(lambda x, w, b: F.group_norm(x, 1, w, b)),
            _plain(lambda x, w, b: ref_group_norm(x, 1, w, b)),
        ),
        Op(
            "gn4",
            _plain(lambda x, w, b: F.group_norm(x, 4, w, b)),
            _plain(lambda x, w, b: ref_group_norm(x, 4, w, b)),
        ),
        Op(
            "gnC",
            _plain(lambda x, w, b: F.group_norm(x, x.shape[1], w, b)),
            _plain(lambda x, w, b: ref_group_norm(x, x.shape[1], w, b)),
        ),
        Op("in", _in, _in_ref, min_dim=3),
        Op(
            "ln_last",
            _plain(lambda x, w, b: F.layer_norm(x, x.shape[-1], w, b)),
            _plain(lambda x, w, b: ref_layer_norm(x, x.shape[-1], w, b)),
            pshape=lambda s: (s[-1],),
        ),
        Op(
            "ln_chw",
            _plain(lambda x, w, b: F.layer_norm(x, x.shape[1:], w, b)),
            _plain(lambda x, w, b: ref_layer_norm(x, x.shape[1:], w, b)),
            pshape=lambda s: tuple(s[1:]),
        ),
        Op(
            "ln2d_c",
            _plain(lambda x, w, b: F.layer_norm_2d(x, w, b, over="c")),
            _plain(lambda x, w, b: ref_layer_norm_2d(x, w, b, over="c")),
        ),
        Op(
            "ln2d_chw",
            _plain(lambda x, w, b: F.layer_norm_2d(x, w, b, over="chw")),
            _plain(lambda x, w, b: ref_layer_norm_2d(x, w, b, over="chw")),
        ),
        Op("ghost_bn", _ghost, _ghost_ref),
        Op("renorm", _renorm, _renorm_ref),
    ]
}


@dataclass
class Result:
    y: torch.Tensor
    extras: list
    grads: list  # dx, dw, db (None where not used)


def _params(op: Op, shape: tuple, dtype: torch.dtype, affine: bool, seed: int = 1):
    if not affine:
        return None, None
    return affine_params(op.pshape(shape), pdtype(dtype), seed=seed)


def run_backend(op: Op, backend: str, x: torch.Tensor, w, b, dy: torch.Tensor) -> Result:
    """Forward and backward of ``op`` under ``backend``; x, w, b are leaves (copies are made)."""
    xs = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    ws = None if w is None else w.detach().clone().requires_grad_()
    bs = None if b is None else b.detach().clone().requires_grad_()
    version = xs._version
    with kernels.use(backend):
        y, extras = op.run(xs, ws, bs)
        y.backward(dy)
    assert xs._version == version, "the forward mutated its input"
    assert torch.allclose(xs.detach(), x, rtol=0, atol=0, equal_nan=True), "the forward mutated its input"
    return Result(
        y.detach(), extras, [xs.grad, None if ws is None else ws.grad, None if bs is None else bs.grad]
    )


def run_oracle(op: Op, x: torch.Tensor, w, b, dy: torch.Tensor) -> Result:
    """The float64 oracle on exactly the values the backend saw (x, w, b, dy already rounded)."""
    xs = x.detach().double().contiguous().requires_grad_()
    ws = None if w is None else w.detach().double().requires_grad_()
    bs = None if b is None else b.detach().double().requires_grad_()
    y, extras = op.ref(xs, ws, bs)
    y.backward(dy.double())
    return Result(
        y.detach(), extras, [xs.grad, None if ws is None else ws.grad, None if bs is None else bs.grad]
    )


def check(
    got: Result, want: Result, dtype: torch.dtype, *, tol: float | None = None, gtol: float | None = None
):
    assert got.y.dtype == dtype
    assert_close_rel(got.y, want.y, TOL[dtype] if tol is None else tol, "output")
    for name, g, e in zip(("dx", "dweight", "dbias"), got.grads, want.grads):
        assert (g is None) == (e is None), name
        if g is not None:
            assert bool(torch.isfinite(g).all()), f"{name} is not finite"
            assert_close_rel(g, e, GTOL[dtype] if gtol is None else gtol, name)
    assert len(got.extras) == len(want.extras)
    for i, (g, e) in enumerate(zip(got.extras, want.extras)):
        if g is None or e is None:
            assert g is None and e is None
        elif not g.is_floating_point():
            assert torch.equal(g, e), f"step counter {g} != {e}"
        else:
            assert_close_rel(g, e, STAT_TOL[dtype], f"running statistic {i}")


# ---- 1. every op, layout, dtype, affine, backend ----------------------------------------------

SHAPE = (3, 8, 5, 7)  # odd spatial sizes; every set has >= 7 values (sets of 2 are ill-conditioned in half)


@functools.cache
def _main_inputs(name: str, dtype: torch.dtype, affine: bool):
    op = OPS[name]
    seed = sorted(OPS).index(name)
    x = randn(SHAPE, F64, seed=seed, offset=1.5, scale=2.0).to(dtype)
    dy = randn(SHAPE, F64, seed=seed + 100).to(dtype)
    w, b = _params(op, SHAPE, dtype, affine, seed=seed + 200)
    return x, w, b, dy, run_oracle(op, x, w, b, dy)


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(OPS))
def test_forward_and_grads_match_float64_oracle(name, dtype, layout, affine, backend):
    op = OPS[name]
    x, w, b, dy, want = _main_inputs(name, dtype, affine)
    fmt = CL if layout == "cl" else torch.contiguous_format
    x, dy = x.to(memory_format=fmt), dy.to(memory_format=fmt)
    got = run_backend(op, backend, x, w, b, dy)
    check(got, want, dtype)
    assert got.y.is_contiguous(memory_format=fmt), "the output must keep the input's memory format"
    assert got.grads[0].is_contiguous(memory_format=fmt), "the input grad must keep the input's memory format"


@needs_cpu
@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
@pytest.mark.parametrize("name", ["bn_train", "gn4", "ln2d_c", "ln_last"])
def test_half_precision_error_no_worse_than_reference(name, dtype):
    """In fp16/bf16 the cpu backend's error vs float64 stays within 1.5x of the reference backend's."""
    op = OPS[name]
    x, w, b, dy, want = _main_inputs(name, dtype, True)
    errs = {}
    for backend in ("reference", "cpu"):
        got = run_backend(op, backend, x, w, b, dy)
        errs[backend] = [rel_err(got.y, want.y)] + [rel_err(g, e) for g, e in zip(got.grads, want.grads)]
    # the half output rounding alone is up to 2^-11 (fp16) / 2^-8 (bf16) of the scale: allow that much
    floor = {F16: 2.0**-11, BF16: 2.0**-8}[dtype]
    for what, c, r in zip(("y", "dx", "dw", "db"), errs["cpu"], errs["reference"]):
        assert c <= max(1.5 * r, floor), f"{what}: cpu error {c:.3g} vs reference {r:.3g}"


# ---- 2. edge shapes ------------------------------------------------------------------------------


def _view(kind: str, x: torch.Tensor) -> torch.Tensor:
    """A new leaf: the values of ``x`` in the layout ``kind`` (same values, different strides)."""
    x = x.detach()
    if kind == "contig":
        return x.clone(memory_format=torch.contiguous_format)
    if kind == "cl":
        return x.contiguous(memory_format=CL)
    if kind == "cl3d":
        return x.contiguous(memory_format=torch.channels_last_3d)
    if kind == "nlc":  # (N, C, L) stored as (N, L, C)
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if kind == "transposed":  # H and W swapped in memory: dense, not a standard format
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    if kind == "sliced":  # every other W column of a wider buffer: not dense
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        wide[..., ::2] = x
        v = wide[..., ::2]
        assert not v.is_contiguous()
        return v
    if kind == "batch_sliced":  # every other sample
        wide = torch.zeros(2 * x.shape[0], *x.shape[1:], dtype=x.dtype)
        wide[::2] = x
        return wide[::2]
    raise ValueError(kind)


EDGE = [  # (op, shape, layout)
    ("bn_eval", (1, 8, 5, 7), "contig"),  # N = 1 in eval
    ("bn_eval", (1, 8, 5, 7), "cl"),
    ("bn_eval", (1, 6), "contig"),  # BatchNorm1d, N = 1, eval
    ("gn4", (1, 8, 5, 7), "cl"),  # N = 1, per-sample norms
    ("in", (1, 8, 5, 7), "contig"),
    ("ln2d_c", (1, 8, 5, 7), "cl"),
    ("bn_train", (3, 1, 5, 7), "contig"),  # C = 1
    ("bn_train", (3, 1, 5, 7), "cl"),
    ("gn1", (3, 1, 5, 7), "contig"),
    ("in", (3, 1, 5, 7), "cl"),
    ("ln2d_c", (3, 1, 5, 7), "contig"),  # one value per set: y = bias, exact zero dx
    ("bn_train", (6, 8, 1, 1), "contig"),  # H = W = 1: BN pools over N
    ("bn_train", (6, 8, 1, 1), "cl"),
    ("gn4", (6, 8, 1, 1), "contig"),
    ("ln2d_chw", (6, 8, 1, 1), "cl"),
    ("bn_train", (3, 5, 7), "contig"),  # odd sizes, (N, C, L)
    ("bn_train", (3, 5, 7), "nlc"),
    ("gn1", (3, 5, 7), "nlc"),
    ("gnC", (3, 5, 7), "contig"),
    ("in", (3, 5, 7), "nlc"),
    ("ln_last", (3, 5, 7), "contig"),
    ("ln2d_c", (3, 5, 7), "nlc"),
    ("ln_chw", (3, 5, 7), "nlc"),
    ("bn_train", (3, 5, 7, 9), "cl"),
    ("gnC", (3, 5, 7, 9), "cl"),
    ("bn_train", (7, 6), "contig"),  # BatchNorm1d's (N, C)
    ("bn_eval", (7, 6), "contig"),
    ("gn1", (7, 6), "contig"),
    ("ln_last", (7, 6), "contig"),
    ("ghost_bn", (7, 6, 5), "nlc"),  # ghost chunks of 2 samples and a ragged last chunk of 1
    ("bn_train", (2, 4, 3, 4, 5), "cl3d"),  # 3-d spatial, channels_last_3d
    ("gn4", (2, 8, 3, 4, 5), "cl3d"),
    ("in", (2, 4, 3, 4, 5), "contig"),
    ("ln2d_c", (2, 4, 3, 4, 5), "cl3d"),
    ("bn_train", (4, 8, 5, 6), "transposed"),  # non-contiguous views
    ("gn4", (4, 8, 5, 6), "transposed"),
    ("ln2d_c", (4, 8, 5, 6), "transposed"),
    ("ln_last", (4, 8, 5, 6), "transposed"),
    ("bn_train", (4, 8, 5, 6), "sliced"),
    ("gn4", (4, 8, 5, 6), "sliced"),
    ("in", (4, 8, 5, 6), "batch_sliced"),
    ("ln_chw", (4, 8, 5, 6), "sliced"),
    ("renorm", (4, 8, 5, 6), "batch_sliced"),
]


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "name,shape,layout", EDGE, ids=[f"{n}-{'x'.join(map(str, s))}-{lay}" for n, s, lay in EDGE]
)
def test_edge_shapes(name, shape, layout, dtype, backend):
    op = OPS[name]
    x = randn(shape, F64, seed=7, offset=-0.5, scale=1.5).to(dtype)
    dy = randn(shape, F64, seed=8).to(dtype)
    w, b = _params(op, shape, dtype, True, seed=9)
    want = run_oracle(op, x, w, b, dy)
    xv = _view(layout, x)
    dyv = _view(layout, dy) if layout not in ("sliced", "batch_sliced") else dy
    got = run_backend(op, backend, xv, w, b, dyv)
    if dtype in (F16, BF16) and backend != "reference":
        # small sets (GN(4) on 1x1 maps: 2 values) are ill-conditioned for dx in half precision, the
        # reference included: allow the reference backend's own error (x1.5) where it exceeds the tolerance
        ref = run_backend(op, "reference", xv, w, b, dyv)
        gtol = max(
            [GTOL[dtype]] + [1.5 * rel_err(r, e) for r, e in zip(ref.grads, want.grads) if r is not None]
        )
        check(got, want, dtype, gtol=gtol)
    else:
        check(got, want, dtype)
    if layout in ("cl", "cl3d"):
        fmt = CL if layout == "cl" else torch.channels_last_3d
        assert got.y.is_contiguous(memory_format=fmt) and got.grads[0].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("backend", _backend_params())
def test_one_value_per_set_gives_the_bias_and_zero_dx(backend):
    x = randn((3, 1, 5, 7), F32, seed=3)
    w, b = torch.full((1,), 2.0, requires_grad=True), torch.full((1,), 0.25, requires_grad=True)
    xs = x.clone().requires_grad_()
    with kernels.use(backend):
        y = F.layer_norm_2d(xs, w, b, over="c")
        y.backward(torch.ones_like(y))
    assert torch.equal(y, torch.full_like(y, 0.25))
    assert torch.equal(xs.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_non_contiguous_weight_view(backend, dtype):
    """A weight that is a stride-2 view of a bigger buffer: grads land in the right elements."""
    shape = (4, 8, 5, 6)
    x = randn(shape, F64, seed=11).to(dtype).contiguous(memory_format=CL)
    dy = randn(shape, F64, seed=12).to(dtype).contiguous(memory_format=CL)
    base_w = affine_params((16,), F32, seed=13)[0]
    bias = affine_params((8,), F32, seed=14)[1]
    for norm in ("gn4", "bn_train", "ln2d_c"):
        wb = base_w.clone().requires_grad_()
        xs = x.clone().requires_grad_()
        bs = bias.clone().requires_grad_()
        with kernels.use(backend):
            y, _ = OPS[norm].run(xs, wb[::2], bs)
            y.backward(dy)
        want = run_oracle(OPS[norm], x, base_w[::2], bias, dy)
        assert_close_rel(y, want.y, TOL[dtype], f"{norm} output")
        assert_close_rel(xs.grad, want.grads[0], GTOL[dtype], f"{norm} dx")
        assert_close_rel(wb.grad[::2], want.grads[1], GTOL[dtype], f"{norm} dweight")
        assert torch.equal(wb.grad[1::2], torch.zeros(8)), "the skipped elements of the buffer get no grad"


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("dy_kind", ["contig", "expanded", "cl"])
@pytest.mark.parametrize("x_kind", ["contig", "cl"])
def test_grad_output_in_another_layout(backend, x_kind, dy_kind):
    """grad_output whose strides differ from the input's (contiguous vs channels_last, stride 0)."""
    shape = (3, 8, 5, 7)
    x = randn(shape, F64, seed=21).float()
    w, b = affine_params((8,), F32, seed=22)
    for name in ("gn4", "bn_train", "ln2d_c"):
        op = OPS[name]
        if dy_kind == "expanded":
            # stride 0 over N and W (a dy constant over a whole set would make dx ~ 0: no test)
            dy = randn((1, 8, 5, 1), F64, seed=23).float().expand(shape)
        else:
            dy = _view(dy_kind, randn(shape, F64, seed=23).float())
        want = run_oracle(op, x, w, b, dy)
        got = run_backend(op, backend, _view(x_kind, x), w, b, dy)
        check(got, want, F32)
        fmt = CL if x_kind == "cl" else torch.contiguous_format
        assert got.grads[0].is_contiguous(memory_format=fmt), f"{name}: dx must keep the input's format"


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("layout", ["contig", "cl"])
@pytest.mark.parametrize(
    "name", ["bn_train", "bn_eval", "gn4", "in", "ln_last", "ln_chw", "ln2d_c", "ghost_bn", "renorm"]
)
def test_empty_batch_same_as_reference(name, layout, backend):
    """N = 0: empty output and input grad, zero parameter grads, running statistics unchanged."""
    op = OPS[name]
    shape = (0, 8, 5, 7)
    x = _view(layout, torch.zeros(shape))
    w, b = _params(op, shape, F32, True)
    got = run_backend(op, backend, x, w, b, torch.zeros_like(x))
    assert got.y.shape == shape and got.grads[0].shape == shape
    assert torch.equal(got.grads[1], torch.zeros_like(w)) and torch.equal(got.grads[2], torch.zeros_like(b))
    ref = run_backend(op, "reference", x, w, b, torch.zeros_like(x))
    for g, r in zip(got.extras, ref.extras):
        assert torch.equal(g, r)
    if name in ("bn_train", "in", "ghost_bn", "renorm"):
        rm, rv, nbt = _buffers(8, F32)
        assert torch.equal(got.extras[0], rm) and torch.equal(got.extras[1], rv)
        if len(got.extras) > 2:
            assert torch.equal(got.extras[2], nbt)


# ---- 2b. autograd paths ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("kind", ["w", "b", "x_only", "params_only", "w_only_grad"])
def test_partial_affine_and_requires_grad(backend, kind):
    """weight without bias, bias without weight, and grads wanted for only some inputs."""
    shape = (3, 8, 5, 7)
    x = randn(shape, F64, seed=15).float()
    dy = randn(shape, F64, seed=16).float().contiguous(memory_format=CL)
    w, b = affine_params((8,), F32, seed=17)
    if kind == "w":
        b = None
    elif kind == "b":
        w = None
    for name in ("bn_train", "gn4", "in", "ln2d_c"):
        op = OPS[name]
        for layout in ("contig", "cl"):
            xs = _view(layout, x).requires_grad_(kind not in ("params_only", "w_only_grad"))
            ws = None if w is None else w.clone().requires_grad_(kind != "x_only")
            bs = None if b is None else b.clone().requires_grad_(kind not in ("x_only", "w_only_grad"))
            want = run_oracle(op, x, w, b, dy)
            with kernels.use(backend):
                y, _ = op.run(xs, ws, bs)
                y.backward(dy)
            assert_close_rel(y, want.y, TOL[F32], f"{name} output")
            for t, e, what in (
                (xs, want.grads[0], "dx"),
                (ws, want.grads[1], "dw"),
                (bs, want.grads[2], "db"),
            ):
                if t is None:
                    continue
                if t.requires_grad:
                    assert_close_rel(t.grad, e, GTOL[F32], f"{name} {layout} {what}")
                else:
                    assert t.grad is None


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("name", ["bn_train", "gn4", "in", "ln2d_c", "ln_chw"])
def test_gradcheck_and_gradgradcheck_fp64(backend, name):
    op = OPS[name]
    shape = (2, 8, 3, 3)
    x = randn(shape, F64, seed=19).contiguous(memory_format=CL).requires_grad_()
    w, b = (t.requires_grad_() for t in affine_params(op.pshape(shape), F64, seed=20))

    def f(x, w, b):
        return op.run(x, w, b)[0]

    with kernels.use(backend):
        assert torch.autograd.gradcheck(f, (x, w, b))
        assert torch.autograd.gradgradcheck(f, (x, w, b))


# Regression: batch_renorm once computed r and d under no_grad only, which does not stop forward-mode
# AD, so its jvp differentiated through r and d while its backward held them constant.
JVP_OPS = [n for n in OPS if n != "bn_eval"]


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("name", JVP_OPS)
def test_forward_mode_ad_matches_oracle_jvp(name, dtype, backend):
    """Forward-mode AD (dual tensors) takes the kernel's saved statistics into ``core.norm_jvp``."""
    import torch.autograd.forward_ad as fwAD

    op = OPS[name]
    shape = (3, 8, 5, 7)
    x = randn(shape, F64, seed=37, offset=1.5, scale=2.0).to(dtype)
    tx = randn(shape, F64, seed=38).to(dtype)
    w, b = _params(op, shape, dtype, True, seed=39)
    tw, tb = _params(op, shape, dtype, True, seed=40)
    _, want = torch.func.jvp(
        lambda a, c, d: op.ref(a, c, d)[0],
        (x.double(), w.double(), b.double()),
        (tx.double(), tw.double(), tb.double()),
    )
    for layout in ("contig", "cl"):
        with kernels.use(backend), fwAD.dual_level():
            xd = fwAD.make_dual(_view(layout, x), _view(layout, tx))
            y, _ = op.run(xd, fwAD.make_dual(w, tw), fwAD.make_dual(b, tb))
            _, tangent = fwAD.unpack_dual(y)
        assert_close_rel(tangent, want, 1e-4 if dtype == F32 else 1e-10, f"{layout} tangent")


@pytest.mark.parametrize("backend", _backend_params())
def test_torch_func_transforms_run_on_the_chosen_backend(monkeypatch, backend):
    """torch.func.grad / vmap under any backend: correct, and on the backend's own kernels where it has
    them (the vmap rule folds the vmapped dim into the samples; grad's backward is one Function on the
    kernels), the reference core otherwise."""
    x = randn((4, 8, 5, 6), F64, seed=43)
    w, b = affine_params((8,), F64, seed=44)
    dy = randn((4, 8, 5, 6), F64, seed=45)

    def loss(x, w):
        return (F.group_norm(x, 4, w, b) * dy).sum()

    def ref_loss(x, w):
        return (ref_group_norm(x, 4, w, b) * dy).sum()

    want = torch.func.grad(ref_loss, argnums=(0, 1))(x, w)
    fwd = _spy(monkeypatch, "norm_forward")
    bwd = _spy(monkeypatch, "norm_backward")

    def sample_loss(xi, w, dyi):
        return (F.group_norm(xi.unsqueeze(0), 4, w, b) * dyi).sum()

    with kernels.use(backend):
        got = torch.func.grad(loss, argnums=(0, 1))(x, w)
        per_sample = torch.func.vmap(lambda xi: F.layer_norm_2d(xi.unsqueeze(0), w, b))(x)
        # per-sample gradients of the input and the shared weight
        sample_grads = torch.func.vmap(torch.func.grad(sample_loss, argnums=(0, 1)), in_dims=(0, None, 0))(
            x, w, dy.unsqueeze(1)
        )
    for i in range(x.shape[0]):
        leaves = [x[i : i + 1].clone().requires_grad_(), w.clone().requires_grad_()]
        want_i = torch.autograd.grad(
            (ref_group_norm(leaves[0], 4, leaves[1], b) * dy[i : i + 1]).sum(), leaves
        )
        assert_close_rel(sample_grads[0][i], want_i[0][0], 1e-10)
        assert_close_rel(sample_grads[1][i], want_i[1], 1e-10)
    if backend == "reference":
        assert fwd and bwd, "the reference backend runs the reference core"
    elif backend == "cpu":
        assert not fwd and not bwd, f"torch.func fell back to the reference core: {fwd + bwd}"
    for g, e in zip(got, want):
        assert_close_rel(g, e, 1e-10)
    assert_close_rel(per_sample.squeeze(1), ref_layer_norm_2d(x, w, b), 1e-10)


# Regression: torch's CPU eval batch_norm backward returns a wrong input grad for channels-last memory
# with a non-canonical stride on a size-1 dim, strides (C*W, 1, 1, C), against a contiguous
# grad_output; normkit routes such inputs around ATen.


@pytest.mark.parametrize("backend", _backend_params())
def test_bn_eval_grad_with_unit_height_channels_last_strides(backend):
    x = (
        randn((3, 7, 8, 1), F32, seed=47).permute(0, 2, 3, 1).requires_grad_()
    )  # (3, 8, 1, 7), strides (56, 1, 1, 8)
    dy = randn((3, 8, 1, 7), F32, seed=48)  # contiguous
    rm, rv = running_stats(8, F32)
    with kernels.use(backend):
        F.batch_norm(x, rm, rv, training=False).output.backward(dy)
    want = dy / torch.sqrt(rv.view(1, 8, 1, 1) + 1e-5)
    assert_close_rel(x.grad, want, GTOL[F32], "dx")


# ---- 2c. larger inputs -------------------------------------------------------------------------

# larger inputs: several cache-sized chunks per set (the kernels' exact merges), many sets (parallel
# splits), odd sizes (vector tails); with a large offset the merges must stay exact
BIG = (8, 24, 33, 35)
BIG_CASES = [(F32, 0.0), (F32, 1e4), (BF16, 0.0)]


@functools.cache
def _big_inputs(name: str, dtype: torch.dtype, offset: float):
    op = OPS[name]
    x = randn(BIG, F64, seed=25, offset=offset, scale=1.0 if offset == 0 else 1e-2).to(dtype)
    dy = randn(BIG, F64, seed=26).to(dtype)
    w, b = _params(op, BIG, dtype, True, seed=27)
    return x, w, b, dy, run_oracle(op, x, w, b, dy)


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("layout", ["contig", "cl"])
@pytest.mark.parametrize("dtype,offset", BIG_CASES, ids=[f"{d}-{o:g}" for d, o in BIG_CASES])
@pytest.mark.parametrize("name", ["bn_train", "gn4", "gn1", "in", "ln_last", "ln2d_c", "ln_chw"])
def test_large_inputs_match_float64_oracle(name, dtype, offset, layout, backend):
    x, w, b, dy, want = _big_inputs(name, dtype, offset)
    got = run_backend(OPS[name], backend, _view(layout, x), w, b, _view(layout, dy))
    # a long reduction: dweight/dbias sum ~1e4 terms; allow the fp32 rounding of such sums
    check(got, want, dtype, gtol=2e-4 if dtype == F32 else None)


@functools.lru_cache(maxsize=1)
def _long_set():
    shape = (1, 4, 1600, 1600)  # 1.02e7 values in one set (TESTING.md item 6)
    x = randn(shape, F32, seed=29, offset=3.0)
    x64 = x.double()
    mu = x64.mean()
    want = (x64 - mu) / ((x64 - mu).square().mean() + 1e-5).sqrt()
    return x, want


@pytest.mark.parametrize("backend", _backend_params())
def test_long_reduction_within_atol_1e5(backend):
    x, want = _long_set()
    with kernels.use(backend):
        y = F.group_norm(x, 1)
    assert float((y.double() - want).abs().max()) <= 1e-5


# ---- the layers (their eager fast paths call the kernels directly) --------------------------------


def _layer_oracle(layer: torch.nn.Module, x64: torch.Tensor):
    """(y, [running_mean, running_var, num_batches_tracked] or []) of one training step, float64."""
    p = {k: v.detach().double().requires_grad_() for k, v in layer.named_parameters()}
    w, b = p.get("weight"), p.get("bias")
    cls = type(layer).__name__
    if cls.startswith("BatchNorm"):
        out = ref_batch_norm(
            x64,
            torch.zeros(layer.num_features, dtype=F64),
            torch.ones(layer.num_features, dtype=F64),
            w,
            b,
            training=True,
            momentum=layer.momentum,
            eps=layer.eps,
            num_batches_tracked=torch.tensor(0),
        )
        return out.output, [out.running_mean, out.running_var, out.num_batches_tracked], p
    if cls == "GroupNorm":
        return ref_group_norm(x64, layer.num_groups, w, b, eps=layer.eps), [], p
    if cls.startswith("InstanceNorm"):
        C = layer.num_features
        if layer.track_running_stats:
            out = ref_instance_norm(
                x64,
                torch.zeros(C, dtype=F64),
                torch.ones(C, dtype=F64),
                w,
                b,
                momentum=layer.momentum,
                eps=layer.eps,
                num_batches_tracked=torch.tensor(0),
            )
            return out.output, [out.running_mean, out.running_var, out.num_batches_tracked], p
        return ref_instance_norm(x64, weight=w, bias=b, eps=layer.eps).output, [], p
    if cls == "LayerNorm":
        return ref_layer_norm(x64, tuple(layer.normalized_shape), w, b, eps=layer.eps), [], p
    if cls == "LayerNorm2d":
        return ref_layer_norm_2d(x64, w, b, eps=layer.eps, over=layer.over), [], p
    if cls.startswith("GhostBatchNorm"):
        C = layer.num_features
        y, rm, rv, k = ref_ghost_batch_norm(
            x64,
            torch.zeros(C, dtype=F64),
            torch.ones(C, dtype=F64),
            w,
            b,
            layer.ghost_batch_size,
            layer.momentum,
            layer.eps,
        )
        return y, [rm, rv, torch.tensor(k)], p
    if cls.startswith("BatchRenorm"):
        C = layer.num_features
        y, rm, rv, _, _ = ref_batch_renorm(
            x64,
            torch.zeros(C, dtype=F64),
            torch.ones(C, dtype=F64),
            w,
            b,
            layer.r_max,
            layer.d_max,
            layer.momentum,
            layer.eps,
        )
        return y, [rm, rv, torch.tensor(1)], p
    raise AssertionError(cls)


LAYERS = {  # name: (factory, shape, layouts)
    "BatchNorm1d-NC": (lambda: normkit.nn.BatchNorm1d(6), (7, 6), ["contig"]),
    "BatchNorm1d-NCL": (lambda: normkit.nn.BatchNorm1d(6), (4, 6, 9), ["contig", "nlc"]),
    "BatchNorm2d": (lambda: normkit.nn.BatchNorm2d(8), (4, 8, 5, 7), ["contig", "cl"]),
    "BatchNorm2d-nobias": (lambda: normkit.nn.BatchNorm2d(8, bias=False), (4, 8, 5, 7), ["contig", "cl"]),
    "BatchNorm3d": (lambda: normkit.nn.BatchNorm3d(4), (2, 4, 3, 4, 5), ["contig", "cl3d"]),
    "GroupNorm": (lambda: normkit.nn.GroupNorm(4, 8), (3, 8, 5, 7), ["contig", "cl"]),
    "GroupNorm-G=C": (lambda: normkit.nn.GroupNorm(8, 8), (3, 8, 5, 7), ["contig", "cl"]),
    "InstanceNorm2d": (lambda: normkit.nn.InstanceNorm2d(8, affine=True), (3, 8, 5, 7), ["contig", "cl"]),
    "InstanceNorm2d-tracked": (
        lambda: normkit.nn.InstanceNorm2d(8, affine=True, track_running_stats=True),
        (3, 8, 5, 7),
        ["contig", "cl"],
    ),
    "LayerNorm": (lambda: normkit.nn.LayerNorm(7), (3, 8, 5, 7), ["contig", "cl"]),
    "LayerNorm2d-c": (lambda: normkit.nn.LayerNorm2d(8), (3, 8, 5, 7), ["contig", "cl"]),
    "LayerNorm2d-chw": (lambda: normkit.nn.LayerNorm2d(8, over="chw"), (3, 8, 5, 7), ["contig", "cl"]),
    "GhostBatchNorm2d": (
        lambda: normkit.nn.GhostBatchNorm2d(8, ghost_batch_size=2),
        (5, 8, 5, 7),
        ["contig", "cl"],
    ),
    "BatchRenorm2d": (
        lambda: normkit.nn.BatchRenorm2d(8, r_max=1.5, d_max=0.5),
        (4, 8, 5, 7),
        ["contig", "cl"],
    ),
}
LAYER_CASES = [(n, lay) for n, (_, _, ls) in LAYERS.items() for lay in ls]


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,layout", LAYER_CASES, ids=[f"{n}-{lay}" for n, lay in LAYER_CASES])
def test_layers_match_float64_oracle(name, layout, dtype, backend):
    """A training step of each layer: output, input and parameter grads, and the buffers it wrote."""
    factory, shape, _ = LAYERS[name]
    torch.manual_seed(0)
    layer = factory()
    if dtype == F64:
        layer = layer.double()
    with torch.no_grad():
        for k, v in layer.named_parameters():
            v.copy_(affine_params(v.shape, v.dtype, seed=31)[0 if k == "weight" else 1])
    x = randn(shape, F64, seed=32, offset=1.5, scale=2.0).to(dtype)
    dy = randn(shape, F64, seed=33).to(dtype)
    xs = _view(layout, x).requires_grad_()
    with kernels.use(backend):
        y = layer(xs)
        y.backward(_view(layout, dy))
    x64 = x.double().requires_grad_()
    y64, extras64, p64 = _layer_oracle(layer, x64)
    y64.backward(dy.double())
    assert y.dtype == dtype
    assert_close_rel(y, y64, TOL[dtype], "output")
    assert_close_rel(xs.grad, x64.grad, GTOL[dtype], "dx")
    for k, v in layer.named_parameters():
        assert_close_rel(v.grad, p64[k].grad, GTOL[dtype], f"d{k}")
    if extras64:
        rm, rv, nbt = extras64
        assert_close_rel(layer.running_mean, rm, STAT_TOL[dtype], "running_mean")
        assert_close_rel(layer.running_var, rv, STAT_TOL[dtype], "running_var")
        assert int(layer.num_batches_tracked) == int(nbt)
    if layout in ("cl", "cl3d"):
        fmt = CL if layout == "cl" else torch.channels_last_3d
        assert y.is_contiguous(memory_format=fmt) and xs.grad.is_contiguous(memory_format=fmt)
    if name.startswith(("BatchNorm", "BatchRenorm", "GhostBatchNorm")) or name.endswith("tracked"):
        layer.eval()  # and eval from the buffers just written
        with kernels.use(backend):
            ye = layer(_view(layout, x))
        C = shape[1]
        want = ref_batch_norm(
            x.double(),
            layer.running_mean.double(),
            layer.running_var.double(),
            layer.weight.double(),
            None if layer.bias is None else layer.bias.double(),
            training=False,
            eps=layer.eps,
        ).output
        if name.startswith("InstanceNorm"):
            want = ref_instance_norm(
                x.double(),
                layer.running_mean.double(),
                layer.running_var.double(),
                layer.weight.double(),
                layer.bias.double(),
                use_input_stats=False,
                eps=layer.eps,
            ).output
        assert C == layer.running_mean.numel()
        assert_close_rel(ye, want, TOL[dtype], "eval output")


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("layout", ["contig", "cl"])
@pytest.mark.parametrize("case", ["tiny_eps0", "huge", "nan"])
def test_layer_fallback_updates_the_buffers_once(monkeypatch, backend, layout, case):
    """A batch the fused training step hands back to the reference updates the buffers exactly as the
    reference backend does (once, or not at all for non-finite statistics)."""
    if case == "tiny_eps0":  # variance ~1e-60 with eps = 0: below the kernels' exact range
        x, eps = randn((4, 8, 3, 3), F32, seed=35, scale=1e-30), 0.0
    elif case == "huge":  # |x| ~ 1e30: the variance overflows float32 (the update is skipped)
        x, eps = randn((4, 8, 3, 3), F32, seed=35, scale=1e30), 1e-5
    else:
        x, eps = randn((4, 8, 3, 3), F32, seed=35), 1e-5
        x[1, 2, 0, 0] = float("nan")
    layers = {}
    for be in ("reference", backend):
        layer = normkit.nn.BatchNorm2d(8, eps=eps)
        with torch.no_grad():
            layer.running_mean.fill_(0.5)
        fwd = _spy(monkeypatch, "norm_forward")
        with kernels.use(be):
            y = layer(_view(layout, x))
        monkeypatch.undo()
        assert fwd, f"{be}: the batch must run on the reference core"
        layers[be] = (layer, y)
    (ref_layer, ref_y), (layer, y) = layers["reference"], layers[backend]
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5, equal_nan=True)
    for name in ("running_mean", "running_var", "num_batches_tracked", "num_skipped_updates"):
        torch.testing.assert_close(
            getattr(layer, name),
            getattr(ref_layer, name),
            rtol=1e-6,
            atol=0.0,
            msg=lambda m, n=name: f"{n}: {m}",
        )
    want = ref_batch_norm(
        x.double(),
        torch.full((8,), 0.5, dtype=F64),
        torch.ones(8, dtype=F64),
        training=True,
        eps=eps,
        num_batches_tracked=torch.tensor(0),
    )
    if case == "tiny_eps0":
        assert_close_rel(y, want.output, TOL[F32], "output")
        assert int(layer.num_batches_tracked) == 1
        assert_close_rel(layer.running_mean, want.running_mean, 1e-6, "running_mean")
        assert_close_rel(layer.running_var, want.running_var, 1e-6, "running_var")
    else:  # non-finite statistics (NaN; a variance beyond float32): buffers untouched, step not counted
        if case == "huge":
            assert bool(torch.isfinite(y).all())
            assert_close_rel(y, want.output, TOL[F32], "output")
        assert torch.equal(layer.running_mean, torch.full((8,), 0.5)) and torch.equal(
            layer.running_var, torch.ones(8)
        )
        assert int(layer.num_batches_tracked) == 0 and int(layer.num_skipped_updates) == 1


# ---- 3. numerics (TESTING.md items 3, 4, 5, 25) -----------------------------------------------

NUMERIC_OPS = ["bn_train", "gn4", "in", "ln_last", "ln2d_c", "ln_chw"]


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("offset", [1e4, 1e6])
@pytest.mark.parametrize("layout", ["contig", "cl"])
def test_large_mean_small_spread(backend, offset, layout):
    """fp32 ``offset + 1e-2 * noise`` normalizes to float64 accuracy; the variance is >= 0 and right."""
    shape = (4, 8, 6, 6)
    x = randn(shape, F32, seed=31, offset=offset, scale=1e-2)  # the oracle sees these fp32 values exactly
    dy = randn(shape, F32, seed=32)
    for name in NUMERIC_OPS:
        op = OPS[name]
        w, b = _params(op, shape, F32, True, seed=33)
        want = run_oracle(op, x, w, b, dy)
        got = run_backend(op, backend, _view(layout, x), w, b, _view(layout, dy))
        check(got, want, F32, tol=1e-5, gtol=1e-4)
    with kernels.use(backend):
        _, mean, var = F.norm(_view(layout, x), (0, 2, 3), None, None, 1e-5)
    m64, v64 = (
        x.double().mean((0, 2, 3), keepdim=True),
        x.double().var((0, 2, 3), unbiased=False, keepdim=True),
    )
    assert bool((var >= 0).all())
    assert_close_rel(mean, m64, 1e-7, "mean")
    assert_close_rel(var, v64, 1e-4, "var")


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("layout", ["contig", "cl"])
def test_constant_input_gives_exactly_the_bias(backend, dtype, layout):
    """Constant sets: output == bias exactly, finite grads equal to the oracle's (TESTING.md items 4, 13)."""
    shape = (3, 8, 4, 5)
    per_channel = torch.full(shape, 42.0, dtype=dtype)
    per_channel[:, :4] = 3.0  # constant per channel (and per group of GN(4)), two different constants
    per_channel = _view(layout, per_channel)
    everywhere = _view(layout, torch.full(shape, -7.5, dtype=dtype))  # for the sets that span the channels
    dy = randn(shape, F64, seed=41).to(dtype)
    for name in NUMERIC_OPS + ["ln2d_chw", "gn1"]:
        x = everywhere if name in ("ln2d_chw", "gn1", "ln_chw", "ln2d_c") else per_channel
        op = OPS[name]
        w, b = _params(op, shape, dtype, True, seed=42)
        got = run_backend(op, backend, x, w, b, _view(layout, dy))
        view = b.view([1, -1] + [1] * (len(shape) - 2)) if op.pshape(shape) == (shape[1],) else b
        assert torch.equal(got.y, view.to(dtype).expand(shape)), f"{name}: output != bias"
        for g in got.grads:
            assert bool(torch.isfinite(g).all()), f"{name}: grads not finite"
        want = run_oracle(op, x, w, b, dy)
        for what, g, e in zip(("dx", "dw", "db"), got.grads, want.grads):
            assert_close_rel(g, e, GTOL[dtype], f"{name} {what}")


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("kind", ["near_max", "mid_range"])
def test_fp16_overflow_prone_values(backend, kind):
    """fp16 inputs whose squares (and sums) overflow 65504: finite, and equal to the float64 oracle."""
    shape = (4, 8, 5, 6)
    g = torch.Generator().manual_seed(51)
    if kind == "near_max":
        x = (6e4 * (2 * torch.rand(shape, generator=g, dtype=F64) - 1)).half()
        x[0, 0, 0, 0] = 65504.0
    else:
        x = (5e3 + 4e3 * torch.rand(shape, generator=g, dtype=F64)).half()  # in (256, 1e4)
    assert bool(torch.isfinite(x).all())
    dy = randn(shape, F64, seed=52).half()
    for name in NUMERIC_OPS:
        op = OPS[name]
        w, b = _params(op, shape, F16, True, seed=53)
        want = run_oracle(op, x, w, b, dy)
        got = run_backend(op, backend, x, w, b, dy)
        assert bool(torch.isfinite(got.y).all())
        check(got, want, F16)


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("case", ["huge", "tiny_eps0", "subnormal_eps0", "max_spread"])
def test_extreme_magnitudes_fp32(backend, case):
    """|x| ~ 1e30, ~1e-30 and subnormals with eps = 0, and values at the fp32 max: finite, float64-exact.

    With subnormal inputs and eps = 0 the true dx is ~1/sigma ~ 1e40, beyond float32: only the
    output is checked there (``tiny_eps0`` checks the gradient of the same path within range).
    """
    shape = (4, 8, 5, 3)
    eps = 1e-5
    if case == "huge":
        x = randn(shape, F64, seed=61, scale=1e30).float()
    elif case == "tiny_eps0":
        x = randn(shape, F64, seed=61, scale=1e-30).float()
        eps = 0.0
    elif case == "subnormal_eps0":
        x = randn(shape, F64, seed=61, scale=1e-40).float()
        eps = 0.0
        assert bool((x[x != 0].abs() < 1.2e-38).all())
    else:
        x = randn(shape, F64, seed=61, scale=1e38).clamp(-3.3e38, 3.3e38).float()
    assert bool(torch.isfinite(x).all())
    dy = randn(shape, F32, seed=62)
    x64 = x.double().requires_grad_()
    for dims, fn in [
        ((0, 2, 3), lambda t: F.batch_norm(t, None, None, training=True, eps=eps).output),
        ((1, 2, 3), lambda t: F.group_norm(t, 1, eps=eps)),
        ((2, 3), lambda t: F.group_norm(t, 8, eps=eps)),
        ((1,), lambda t: F.layer_norm_2d(t, eps=eps)),
    ]:
        mu = x64.mean(dims, keepdim=True)
        want = (x64 - mu) / ((x64 - mu).square().mean(dims, keepdim=True) + eps).sqrt()
        (want_dx,) = torch.autograd.grad(want, x64, dy.double())
        xs = x.clone().requires_grad_()
        with kernels.use(backend):
            y = fn(xs)
            y.backward(dy)
        assert bool(torch.isfinite(y).all()), f"dims {dims}: non-finite output"
        assert_close_rel(y, want, 1e-5, f"dims {dims} output")
        if case == "subnormal_eps0":
            continue
        assert bool(torch.isfinite(xs.grad).all()), f"dims {dims}: non-finite dx"
        # dx scales as 1/|x|: compare relative to its own scale
        assert_close_rel(xs.grad, want_dx, 1e-4, f"dims {dims} dx")


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("layout", ["contig", "cl"])
def test_nan_stays_in_its_sets(backend, layout):
    shape = (3, 8, 5, 4)
    x = randn(shape, F32, seed=71)
    x[1, 5, 2, 3] = float("nan")  # GN(4): set (1, 2); IN: (1, 5); LN2d(c): (1, :, 2, 3); BN: channel 5
    dy = randn(shape, F32, seed=72)
    sets = {  # a bool mask of the elements that must be NaN
        "gn4": lambda m: m.__setitem__((1, slice(4, 6)), True),
        "in": lambda m: m.__setitem__((1, 5), True),
        "ln2d_c": lambda m: m.__setitem__((1, slice(None), 2, 3), True),
        "bn_train": lambda m: m.__setitem__((slice(None), 5), True),
        "ln_chw": lambda m: m.__setitem__(1, True),
    }
    for name, mark in sets.items():
        op = OPS[name]
        w, b = _params(op, shape, F32, True, seed=73)
        bad = torch.zeros(shape, dtype=torch.bool)
        mark(bad)
        want = run_oracle(op, x, w, b, dy)
        got = run_backend(op, backend, _view(layout, x), w, b, _view(layout, dy))
        assert bool(torch.isnan(got.y[bad]).all()), f"{name}: the NaN must reach its whole set"
        assert bool(torch.isfinite(got.y[~bad]).all()), f"{name}: the NaN leaked into other sets"
        assert_close_rel(got.y[~bad], want.y[~bad], TOL[F32], f"{name} output")
        assert bool(torch.isfinite(got.grads[0][~bad]).all()), f"{name}: the NaN leaked into other sets' dx"
        assert_close_rel(got.grads[0][~bad], want.grads[0][~bad], GTOL[F32], f"{name} dx")
        if got.extras:  # the running statistics and the step counter are left as they were
            rm, rv, nbt = _buffers(8, F32)
            assert torch.equal(got.extras[0], rm) and torch.equal(got.extras[1], rv), (
                f"{name}: buffers changed"
            )
            assert torch.equal(got.extras[2], nbt), f"{name}: step counter changed"


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("layout", ["contig", "cl"])
@pytest.mark.parametrize("layer", ["bn", "in"])
def test_nan_batch_never_reaches_module_buffers(backend, layout, layer):
    """The layers (whose eager fast path bypasses the op) skip the update exactly as the reference does."""
    results = {}
    for be in ("reference", backend):
        m = (
            normkit.nn.BatchNorm2d(8)
            if layer == "bn"
            else normkit.nn.InstanceNorm2d(8, track_running_stats=True)
        )
        good = _view(layout, randn((4, 8, 3, 3), F32, seed=81))
        bad = good.clone()
        bad[0, 3, 1, 1] = float("nan")
        with kernels.use(be):
            m(good)
            rm, rv = m.running_mean.clone(), m.running_var.clone()
            y = m(bad)
        assert torch.equal(m.running_mean, rm) and torch.equal(m.running_var, rv), f"{be}: buffers changed"
        assert int(m.num_batches_tracked) == 1, f"{be}: the skipped step was counted"
        assert int(m.num_skipped_updates) == 1, f"{be}: the skipped step was not recorded"
        nan_part = y[:, 3] if layer == "bn" else y[0, 3]
        assert bool(torch.isnan(nan_part).all()), f"{be}: the NaN must reach its whole set"
        keep = torch.ones_like(y, dtype=torch.bool)
        if layer == "bn":
            keep[:, 3] = False
        else:
            keep[0, 3] = False
        assert bool(torch.isfinite(y[keep]).all()), f"{be}: the NaN leaked"
        results[be] = (y, [t.clone() for t in m.buffers()])
    (ya, ba), (yb, bb) = results["reference"], results[backend]
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5, equal_nan=True)
    for ta, tb in zip(ba, bb):
        torch.testing.assert_close(tb, ta, rtol=1e-6, atol=1e-7)


# ---- 4. dispatch ----------------------------------------------------------------------------------


def test_plan_modes_for_each_layout():
    m = torch.empty(2, 8, 4, 4)
    cl = m.contiguous(memory_format=CL)
    w = torch.empty(1, 8, 1, 1)
    gw = torch.empty(1, 2, 4, 1, 1)
    P = kernels.plan
    assert P(m, (0, 2, 3), w, w).name == "batch_nchw"  # BatchNorm2d
    assert P(cl, (0, 2, 3), w, w).name == "batch_cl"
    assert (
        P(torch.empty(4, 8), (0,), torch.empty(1, 8), torch.empty(1, 8)).name == "batch_cl"
    )  # BatchNorm1d (N, C)
    assert P(torch.empty(4, 8, 9), (0, 2), torch.empty(1, 8, 1), None).name == "batch_nchw"  # (N, C, L)
    assert P(m.view(2, 2, 4, 4, 4), (2, 3, 4), gw, gw).name == "group_nchw"  # GroupNorm(2) NCHW
    gcl = cl.view(2, 2, 4, 4, 4)  # the same view of channels_last memory
    assert P(gcl, (2, 3, 4), gw, gw).name == "group_cl"
    assert P(m, (2, 3), w, w).name == "group_nchw"  # InstanceNorm2d
    assert P(cl, (2, 3), w, w).name == "group_cl"
    assert P(m, (1,), w, w).name == "channel_nchw"  # LayerNorm2d over C
    assert P(cl, (1,), w, w).name == "group_nchw"  # rows of C values in memory
    assert (
        P(torch.empty(2, 5, 8), (2,), torch.empty(1, 1, 8), None).name == "group_nchw"
    )  # LayerNorm(last dim)
    assert (
        P(m, (1, 2, 3), torch.empty(1, 8, 4, 4), None).name == "group_nchw"
    )  # LN over (C, H, W), elementwise
    p = P(m, (0, 2, 3), w, w)
    assert (p.N, p.C, p.S, p.G) == (2, 8, 16, 1)
    p = P(m.view(2, 2, 4, 4, 4), (2, 3, 4), gw, gw)
    assert (p.N, p.C, p.G) == (2, 8, 2) and p.S == 16
    assert P(m, (), None, None) is None  # one value per set: reference
    assert (
        P(m, (0, 2, 3), torch.empty(1, 8, 1, 1), torch.empty(1, 1, 4, 1)) is None
    )  # affines vary differently


def _spy(monkeypatch, attr: str) -> list:
    calls: list = []
    real = getattr(core, attr)

    def spy(*a, **k):
        calls.append(attr)
        return real(*a, **k)

    monkeypatch.setattr(core, attr, spy)
    return calls


def _spy_plans(monkeypatch) -> list:
    seen: list = []
    real = kernels.plan

    def spy(x, dims, weight, bias):
        p = real(x, dims, weight, bias)
        seen.append(None if p is None else p.name)
        return p

    monkeypatch.setattr(kernels, "plan", spy)
    # the eager fast path (layers, and functional group_norm) hands the kernels its own pattern
    from normkit.kernels import _fast, _plan

    real_run = _fast._run

    def spy_run(x, w, b, spec, train):
        seen.append(_plan.MODES[spec.mode])
        return real_run(x, w, b, spec, train)

    monkeypatch.setattr(_fast, "_run", spy_run)
    real_checked = _fast.checked

    def spy_checked(op, x, *args):  # the functional ops' C++ entry: the pattern its kernel call ran
        out = real_checked(op, x, *args)
        if out is not None:
            seen.append(_plan.MODES[_fast._node().last_mode()])
        return out

    monkeypatch.setattr(_fast, "checked", spy_checked)
    return seen


LAYER_PLANS = [  # (op, shape, layout, mode the cpu backend runs it with)
    ("bn_train", (4, 8, 5, 5), "contig", "batch_nchw"),
    ("bn_train", (4, 8, 5, 5), "cl", "batch_cl"),
    ("bn_train", (6, 8), "contig", "batch_cl"),
    ("bn_train", (4, 8, 9), "contig", "batch_nchw"),
    ("gn4", (4, 8, 5, 5), "contig", "group_nchw"),
    ("gn4", (4, 8, 5, 5), "cl", "group_cl"),
    ("in", (4, 8, 5, 5), "contig", "group_nchw"),
    ("in", (4, 8, 5, 5), "cl", "group_cl"),
    ("ln2d_c", (4, 8, 5, 5), "contig", "channel_nchw"),
    ("ln2d_c", (4, 8, 5, 5), "cl", "group_nchw"),
    ("ln2d_chw", (4, 8, 5, 5), "contig", "group_nchw"),
    ("ln_last", (4, 8, 5, 5), "contig", "group_nchw"),
    ("ln_chw", (4, 8, 5, 5), "contig", "group_nchw"),
]


@needs_cpu
@pytest.mark.parametrize(
    "name,shape,layout,mode", LAYER_PLANS, ids=[f"{n}-{lay}-{len(s)}d" for n, s, lay, _ in LAYER_PLANS]
)
def test_each_layer_runs_its_kernel_pattern(monkeypatch, name, shape, layout, mode):
    """Under "cpu" and "auto", forward and backward of an eligible input never touch the reference core."""
    op = OPS[name]
    x = _view(layout, randn(shape, F32, seed=91))
    w, b = _params(op, shape, F32, True)
    fwd, bwd = _spy(monkeypatch, "norm_forward"), _spy(monkeypatch, "norm_backward")
    plans = _spy_plans(monkeypatch)
    for backend in ("cpu", "auto"):
        run_backend(op, backend, x, w, b, torch.ones_like(x))
        assert fwd == [] and bwd == [], f"{backend}: the reference core ran ({fwd + bwd})"
        assert plans and set(plans) == {mode}, f"{backend}: plans {plans}, expected {mode}"
        plans.clear()
    run_backend(op, "reference", x, w, b, torch.ones_like(x))
    assert fwd == ["norm_forward"] and bwd == ["norm_backward"]


@needs_cpu
def test_reference_runs_for_masks_and_huge_values(monkeypatch):
    fwd, bwd = _spy(monkeypatch, "norm_forward"), _spy(monkeypatch, "norm_backward")
    x = randn((4, 8, 5, 5), F32, seed=92).requires_grad_()
    mask = torch.ones(4, 1, 5, 5, dtype=torch.bool)
    mask[:, :, 0] = False
    with kernels.use("cpu"):
        F.group_norm(x, 4).sum().backward()
        assert fwd == [] and bwd == []
        F.group_norm(x, 4, mask=mask).sum().backward()
        assert fwd == ["norm_forward"] and bwd == ["norm_backward"], "a masked call runs on the reference"
    fwd.clear()
    bwd.clear()
    huge = (1e30 * randn((4, 8, 5, 5), F64, seed=93)).float().requires_grad_()
    for backend in ("cpu", "auto"):
        with kernels.use(backend):
            y = F.group_norm(huge, 4)
            y.backward(torch.ones_like(y))
        assert fwd == ["norm_forward"], f"{backend}: |x| ~ 1e30 must rerun on the reference's scaled path"
        assert bwd == ["norm_backward"], (
            f"{backend}: the backward of scaled statistics must defer to the reference"
        )
        assert bool(torch.isfinite(y).all()) and bool(torch.isfinite(huge.grad).all())
        fwd.clear()
        bwd.clear()
        huge.grad = None
    for kind in ("nan", "inf"):  # a non-finite input: the kernel hands it back too
        bad = randn((4, 8, 5, 5), F32, seed=94)
        bad[0, 0, 0, 0] = float(kind)
        with kernels.use("cpu"):
            F.group_norm(bad, 4)
        assert fwd == ["norm_forward"], kind
        fwd.clear()


def test_use_validates_nests_restores_and_status():
    start = kernels.current()
    with pytest.raises(ValueError) as info, kernels.use("gpu"):
        pass
    for choice in kernels.BACKENDS:
        assert choice in str(info.value)
    assert "gpu" in str(info.value)
    assert kernels.current() == start
    with kernels.use("reference"):
        assert kernels.current() == "reference"
        with kernels.use("auto"):
            assert kernels.current() == "auto"
            with kernels.use("reference"):
                assert kernels.current() == "reference"
            assert kernels.current() == "auto"
        assert kernels.current() == "reference"
    assert kernels.current() == start
    with pytest.raises(KeyError), kernels.use("reference"):  # restored on an exception too
        raise KeyError("boom")
    assert kernels.current() == start
    text = kernels.status()
    assert isinstance(text, str)
    for choice in kernels.BACKENDS:
        assert choice in text
    with kernels.use("reference"):
        assert "backend: reference" in kernels.status()


@needs_cpu
def test_status_names_the_cpu_kernels_when_built():
    with kernels.use("cpu"):
        text = kernels.status()
        assert kernels.current() == "cpu"
    assert "backend: cpu" in text
    assert "loaded" in text
    for mode in ("batch_nchw", "batch_cl", "group_nchw", "group_cl", "channel_nchw"):
        assert f"cpu kernel {mode}" in text


# ---- 5. torch.compile -------------------------------------------------------------------------------


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(
            3, 8, 3, padding=1, bias=False
        )  # BN follows: a conv bias gets a zero grad
        self.bn = normkit.nn.BatchNorm2d(8)
        self.gn = normkit.nn.GroupNorm(4, 8)

    def forward(self, x):
        return self.gn(torch.relu(self.bn(self.conv(x))))


@needs_cpu
def test_compile_fullgraph_cpu_backend_equals_eager_reference(monkeypatch):
    torch.manual_seed(0)
    eager = _Net()
    with torch.no_grad():
        for m in (eager.bn, eager.gn):
            m.weight.copy_(torch.linspace(0.5, 1.5, 8))
            m.bias.copy_(torch.linspace(-0.5, 0.5, 8))
    model = copy.deepcopy(eager)
    x = randn((4, 3, 6, 6), F32, seed=101, offset=0.5).contiguous(memory_format=CL)
    dy = randn((4, 8, 6, 6), F32, seed=102)

    def step(m, fn, backend):
        xs = x.clone().requires_grad_()
        with kernels.use(backend):
            y = fn(xs)
            y.backward(dy)
        return y.detach(), xs.grad

    y_ref, dx_ref = step(eager, eager, "reference")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    y, dx = step(model, compiled, "cpu")
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=lambda s, n=name: f"{n}: {s}")
    for b, c in zip(model.buffers(), eager.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6)
    # a second call runs the compiled graph: its normkit ops run the fused kernels, not the core
    fwd, bwd = _spy(monkeypatch, "norm_forward"), _spy(monkeypatch, "norm_backward")
    step(model, compiled, "cpu")
    assert fwd == [] and bwd == [], f"compiled graph ran the reference core: {fwd + bwd}"
    torch._dynamo.reset()


# ---- 6. build fallback ------------------------------------------------------------------------------


def test_no_build_falls_back_to_the_reference(tmp_path):
    code = textwrap.dedent(
        """
        import sys, torch, normkit
        from normkit import kernels
        x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
        y = normkit.functional.group_norm(x, 2)
        assert torch.allclose(y, torch.nn.functional.group_norm(x, 2), atol=1e-10), "group_norm is wrong"
        with kernels.use("auto"):
            assert torch.allclose(normkit.functional.group_norm(x, 2), y, atol=1e-12)
        try:
            with kernels.use("cpu"):
                pass
        except RuntimeError as e:
            print("RuntimeError:", e)
        else:
            raise SystemExit("use('cpu') did not raise without a build")
        assert not kernels.is_built()
        from normkit.cli import main
        sys.exit(main(["kernels", "status"]))
        """
    )
    env = dict(os.environ, NORMKIT_CACHE=str(tmp_path / "cache"), NORMKIT_NO_BUILD="1")
    env.pop("NORMKIT_BACKEND", None)
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "RuntimeError:" in out.stdout and "normkit kernels build" in out.stdout
    assert "not built" in out.stdout
    assert not any((tmp_path / "cache").rglob("*.so")), "NORMKIT_NO_BUILD must not compile anything"


@pytest.mark.parametrize(
    ("value", "want"), [("", "auto"), ("  ", "auto"), ("REFERENCE", "reference"), ("native", "native")]
)
def test_normkit_backend_reads_empty_as_unset_and_any_case(value, want):
    """``NORMKIT_BACKEND=`` (empty, as shells and CI files leave it) is auto; the name in any case."""
    env = dict(os.environ, NORMKIT_BACKEND=value)
    out = subprocess.run(
        [sys.executable, "-c", "import normkit; print(normkit.kernels.current())"],
        check=True,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.stdout.strip() == want


def test_a_bad_normkit_backend_is_one_clear_error_at_the_first_norm_and_in_the_cli():
    """``import normkit`` works; the first norm raises a ValueError naming the choices; ``normkit kernels
    status`` says the same in one line (exit 2), no traceback."""
    env = dict(os.environ, NORMKIT_BACKEND="bogus")
    code = (
        "import torch, normkit\n"
        "try:\n"
        "    normkit.nn.GroupNorm(1, 2)(torch.randn(2, 2, 3))\n"
        "except ValueError as e:\n"
        "    print('ValueError:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "ValueError: NORMKIT_BACKEND must be one of auto, reference, cpu, native, triton" in out.stdout
    cli = subprocess.run(
        [sys.executable, "-m", "normkit.cli", "kernels", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    assert "NORMKIT_BACKEND must be one of" in cli.stderr


def test_status_under_triton_without_a_gpu_says_the_reference_runs():
    """``use("triton")`` on CPU tensors without Triton's interpreter runs the reference (the output equals
    ``use("reference")`` bit for bit): ``kernels.status()`` says so, not "cpu kernel"."""
    from normkit.kernels import triton as nk_triton

    x = torch.randn(4, 8, 5, 5)
    with kernels.use("reference"):
        ref = F.group_norm(x, 2)
    if not nk_triton.available():  # (triton not installed: use("triton") refuses, saying how to get it)
        with pytest.raises(RuntimeError, match=r"pip install normkit\[triton\]"):
            with kernels.use("triton"):
                pass
        return
    with kernels.use("triton"):
        text = kernels.status()
        got = F.group_norm(x, 2)
        interpreted = kernels.triton_ready(x)  # (TRITON_INTERPRET=1 and triton installed: the interpreter)
    if interpreted:
        assert "Triton kernels in the interpreter" in text
        return
    assert torch.equal(got, ref)
    assert "cpu kernel" not in text and "reference (Triton takes CUDA tensors" in text
