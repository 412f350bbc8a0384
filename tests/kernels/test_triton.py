"""normkit's Triton kernels (``normkit.kernels.triton``) in Triton's interpreter, against the float64 oracle.

The interpreter (``TRITON_INTERPRET=1``) runs the same kernels on CPU tensors, so every pattern,
dtype, layout and edge shape is checked here without a GPU; the same module runs unchanged on a
CUDA machine (``NORMKIT_TEST_DEVICE=cuda``), where the kernels are compiled instead.
"""

from __future__ import annotations

import copy
import importlib
import math
import os

import pytest
import torch

import normkit.functional as F
from normkit import kernels
from tests.reference import (
    ref_batch_norm,
    ref_group_norm,
    ref_instance_norm,
    ref_layer_norm,
    ref_layer_norm_2d,
)

triton = pytest.importorskip(
    "triton", reason="triton is not installed here (normkit's optional `triton` extra)"
)

F64 = torch.float64
DEVICE = os.environ.get("NORMKIT_TEST_DEVICE", "cpu")
TOL = {torch.float32: 2e-5, F64: 1e-10, torch.float16: 4e-3, torch.bfloat16: 3e-2}
GTOL = {torch.float32: 2e-4, F64: 1e-9, torch.float16: 2e-2, torch.bfloat16: 1e-1}


@pytest.fixture(scope="module", autouse=True)
def interpreted():
    """On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 first)."""
    from normkit.kernels import triton as nkt

    if DEVICE == "cpu":
        importlib.import_module("normkit.kernels.triton._kernels")
        if not nkt.interpreting():
            pytest.skip(
                "triton was imported without TRITON_INTERPRET=1: its interpreter is off in this process"
            )


@pytest.fixture
def ran(monkeypatch):
    """Counts the Triton launches (so a silent fallback to the reference fails the test)."""
    from normkit.kernels import triton as nkt

    calls = {"forward": 0, "backward": 0}
    for name in calls:
        real = getattr(nkt, name)

        def spy(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(nkt, name, spy)
    return calls


# (normkit op, float64 oracle) on (x, w, b); the affine is per channel except for "ln_chw"
OPS = {
    "bn": (
        lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True).output,
        lambda x, w, b: ref_batch_norm(x, None, None, w, b, training=True).output,
    ),
    "gn2": (lambda x, w, b: F.group_norm(x, 2, w, b), lambda x, w, b: ref_group_norm(x, 2, w, b)),
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


def _case(name, shape, dtype, layout, affine=True, seed=0, scale=1.0, offset=0.0, ops=None, x_grad=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=F64) * scale + offset
    dy = torch.randn(shape, generator=g, dtype=F64)
    pshape = {"ln_chw": tuple(shape[1:]), "ln_last": tuple(shape[-1:])}.get(name, (shape[1],))
    w = 1 + 0.3 * torch.randn(pshape, generator=g, dtype=F64) if affine else None
    b = 0.3 * torch.randn(pshape, generator=g, dtype=F64) if affine else None
    fn, ref = (ops or OPS)[name]
    pdtype = F64 if dtype == F64 else torch.float32
    xs = x.to(dtype)
    if layout == "cl":
        xs = xs.to(memory_format=torch.channels_last)
    xs = xs.to(DEVICE).requires_grad_(x_grad)
    ws = None if w is None else w.to(pdtype).to(DEVICE).requires_grad_()
    bs = None if b is None else b.to(pdtype).to(DEVICE).requires_grad_()
    with kernels.use("triton"):
        y = fn(xs, ws, bs)
        y.backward(dy.to(dtype).to(DEVICE))
    # the oracle on exactly the values the kernels saw
    xo = xs.detach().cpu().double().requires_grad_()
    wo = None if ws is None else ws.detach().cpu().double().requires_grad_()
    bo = None if bs is None else bs.detach().cpu().double().requires_grad_()
    yo = ref(xo, wo, bo)
    yo.backward(dy.to(dtype).double())
    got = [t.grad.cpu() for t in (xs, ws, bs) if t is not None and t.requires_grad]
    exp = [t.grad for t, u in zip((xo, wo, bo), (xs, ws, bs)) if t is not None and u.requires_grad]
    return y.detach().cpu(), yo.detach(), got, exp, xs


def _close(got, exp, rtol):
    scale = exp.abs().max().clamp_min(1e-3)
    err = (got.double() - exp).abs().max() / scale
    assert err <= rtol, f"relative error {err:.3g} > {rtol:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("name", list(OPS))
def test_every_pattern_matches_the_float64_oracle(name, layout, dtype, ran):
    y, yo, got, exp, xs = _case(name, (2, 6, 3, 5), dtype, layout)
    assert ran["forward"] == 1 and ran["backward"] == 1, ran
    assert y.dtype == dtype
    if layout == "cl":
        assert y.is_contiguous(memory_format=torch.channels_last)
    _close(y, yo, TOL[dtype])
    for g, e in zip(got, exp):
        _close(g, e, GTOL[dtype])


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("gn2", (1, 6, 1, 1)),  # N = 1, H * W = 1
        ("in", (1, 3, 7, 1)),
        ("gn1", (3, 1, 4, 4)),  # C = 1
        ("bn", (5, 3, 1, 1)),  # BatchNorm2d on H * W = 1
        ("bn", (7, 5)),  # BatchNorm1d's (N, C)
        ("ln2d", (2, 7, 1, 3)),  # C not a power of two
        ("gn2", (2, 6, 33, 9)),  # more than one block per set
        ("in", (2, 6, 3, 4, 5)),  # 3-d spatial
    ],
)
@pytest.mark.parametrize("affine", [True, False])
def test_edge_shapes(name, shape, affine, ran):
    y, yo, got, exp, _ = _case(name, shape, torch.float32, "nchw", affine=affine, seed=3)
    assert ran["forward"] == 1
    _close(y, yo, TOL[torch.float32])
    for g, e in zip(got, exp):
        _close(g, e, GTOL[torch.float32])


@pytest.fixture
def split(monkeypatch):
    """Every set cut into chunks of 16 positions: the two-phase (split) reduction on small shapes."""
    from normkit.kernels import triton as nkt

    monkeypatch.setattr(nkt, "_FORCE_CHUNK", 16)
    monkeypatch.setattr(nkt, "_ROW_MAX", 0)  # (short rows would take the blocked row walk instead)
    monkeypatch.setattr(nkt, "_TILINGS", {})  # (each launch's chunking computed afresh, for the spy)
    launched = []
    for name in ("_chunking", "_ce_chunks"):  # the per-set walk's chunks; the (C, E) walks' (BatchNorm cl)
        real = getattr(nkt, name)

        def spy(*a, _real=real, **k):
            out = _real(*a, **k)
            launched.append(out[0])
            return out

        monkeypatch.setattr(nkt, name, spy)
    return launched


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("name", ["bn", "gn2", "in", "ln_chw"])
def test_split_reduction_matches_the_float64_oracle(name, layout, dtype, split, ran):
    # 9 * 7 = 63 positions per image: chunks of 16 with a ragged last one, several per set (LN over
    # (C, H, W) with its elementwise affine: 252 values of one set, cut into runs of channels)
    y, yo, got, exp, _ = _case(name, (3, 4, 9, 7), dtype, layout, seed=11)
    assert ran["forward"] == 1 and ran["backward"] == 1, ran
    assert split and all(n > 1 for n in split), split
    _close(y, yo, TOL[dtype])
    for g, e in zip(got, exp):
        _close(g, e, GTOL[dtype])


@pytest.mark.parametrize("shape", [(4, 70, 9, 9), (37, 70)], ids=["cl-4d", "bn1d"])
def test_batch_norm_channels_last_runs_in_blocks_of_channels(shape, split, monkeypatch):
    # BatchNorm on rows of C contiguous channels (channels_last; BatchNorm1d on (N, C)) takes the (C, E)
    # kernels: blocks of 64 channels (70: a ragged second block) by chunks of 16 rows; 324 rows make
    # 21 chunks, more than one step (16) of the per-channel combination of the chunks
    from normkit.kernels import triton as nkt

    walks = []
    real = nkt._bn_cl_walk
    monkeypatch.setattr(nkt, "_bn_cl_walk", lambda *a: walks.append(real(*a)) or walks[-1])
    layout = "cl" if len(shape) == 4 else "nchw"
    for dtype in (torch.float32, torch.bfloat16):
        y, yo, got, exp, _ = _case("bn", shape, dtype, layout, seed=31)
        _close(y, yo, TOL[dtype])
        for g, e in zip(got, exp):
            _close(g, e, GTOL[dtype])
    assert walks and all(w[1] == 64 for w in walks), walks
    assert max(w[0][7] for w in walks) == (21 if len(shape) == 4 else 3), walks  # chunks
    # one shift and scale per channel over all its chunks: 1e4 + 1e-2 noise stays at fp32 accuracy
    y, yo, got, exp, _ = _case("bn", shape, torch.float32, layout, scale=1e-2, offset=1e4, seed=32)
    _close(y, yo, 1e-3)
    for g, e in zip(got, exp):
        _close(g, e, 1e-2)
    # values of 1e30 (squares beyond float32): the scaled statistics
    y, yo, got, exp, _ = _case("bn", shape, torch.float32, layout, scale=1e30, seed=34)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in got)
    _close(y, yo, 1e-4)
    # no weight: the gradient of x alone
    y, yo, got, exp, _ = _case("bn", shape, torch.float32, layout, affine=False, seed=33)
    _close(y, yo, TOL[torch.float32])
    _close(got[0], exp[0], GTOL[torch.float32])


GCL_OPS = {
    "gn32": (lambda x, w, b: F.group_norm(x, 32, w, b), lambda x, w, b: ref_group_norm(x, 32, w, b)),
    "in": OPS["in"],
    "gn1": OPS["gn1"],
}


@pytest.mark.parametrize(
    ("name", "C"),
    [("gn32", 96), ("in", 70), ("gn1", 70)],
    ids=["gn32-cg3", "in-cg1", "gn1-cg70"],
)
def test_group_norm_channels_last_runs_in_blocks_across_groups(name, C, split, monkeypatch):
    # GroupNorm / InstanceNorm / GN(1) on channels-last memory take the gcl_* kernels: blocks of 64
    # contiguous channels across groups (96 = 32 groups of 3: group 21 straddles the two blocks; 70
    # channels: a ragged second block, and GN(1)'s one group spans both) by chunks of 16 positions
    # (35 per image: three chunks, a ragged last one)
    from normkit.kernels import triton as nkt

    walks = []
    real = nkt._gcl_walk
    monkeypatch.setattr(nkt, "_gcl_walk", lambda *a: walks.append(real(*a)) or walks[-1])
    shape = (2, C, 5, 7)
    for dtype in (torch.float32, torch.bfloat16):
        y, yo, got, exp, _ = _case(name, shape, dtype, "cl", seed=51, ops=GCL_OPS)
        assert y.is_contiguous(memory_format=torch.channels_last)
        _close(y, yo, TOL[dtype])
        for g, e in zip(got, exp):
            _close(g, e, GTOL[dtype])
    assert walks and all((w.nCB, w.BCC, w.nchunks, w.CH) == (2, 64, 3, 16) for w in walks), walks
    # one shift per group, shared by its channels and chunks: 1e4 + 1e-2 noise stays at fp32 accuracy
    y, yo, got, exp, _ = _case(name, shape, torch.float32, "cl", scale=1e-2, offset=1e4, seed=52, ops=GCL_OPS)
    _close(y, yo, 1e-3)
    for g, e in zip(got, exp):
        _close(g, e, 1e-2)
    # values of 1e30 (squares beyond float32): every set re-reads its values, scaled
    y, yo, got, exp, _ = _case(name, shape, torch.float32, "cl", scale=1e30, seed=53, ops=GCL_OPS)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in got)
    _close(y, yo, 1e-4)
    # no affine: dx alone; parameters only (x needs no gradient): dweight, dbias without dx
    y, yo, got, exp, _ = _case(name, shape, torch.float32, "cl", affine=False, seed=54, ops=GCL_OPS)
    _close(y, yo, TOL[torch.float32])
    _close(got[0], exp[0], GTOL[torch.float32])
    y, yo, got, exp, _ = _case(name, shape, torch.float32, "cl", seed=55, ops=GCL_OPS, x_grad=False)
    assert len(got) == 2
    for g, e in zip(got, exp):
        _close(g, e, GTOL[torch.float32])


# (the interpreter's numpy warns on the NaN arithmetic)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize(
    ("name", "layout", "chunks"),
    [
        ("gn32", "cl", True),  # the gcl_* kernels
        ("gn32", "nchw", False),  # one program per set
        ("gn32", "nchw", True),  # the split reduction
        ("bn", "cl", True),  # the bn_* kernels
        ("ln2d", "nchw", True),  # the ln2d_* kernels
    ],
)
def test_a_nan_stays_in_its_own_set(name, layout, chunks, monkeypatch):
    # a NaN makes its set's range non-finite: that set's outputs are NaN, as the oracle's, and every
    # other set's match it (Triton's max / min drop NaN: before, the NaN set came out finite)
    from normkit.kernels import triton as nkt

    if chunks:
        monkeypatch.setattr(nkt, "_FORCE_CHUNK", 16)
    fn, ref = GCL_OPS.get(name) or OPS[name]
    g = torch.Generator().manual_seed(56)
    x = torch.randn(2, 96, 5, 7, generator=g)
    x[1, 40, 2, 3] = float("nan")  # GN(32): sample 1, group 13 (channels 39-41)
    if layout == "cl":
        x = x.to(memory_format=torch.channels_last)
    with kernels.use("triton"):
        y = fn(x.to(DEVICE), None, None).cpu()
    yo = ref(x.double(), None, None)
    assert torch.isnan(yo).any() and not torch.isnan(yo).all()
    assert torch.equal(torch.isnan(y), torch.isnan(yo))
    ok = ~torch.isnan(yo)
    _close(y[ok], yo[ok], TOL[torch.float32])


ROW_OPS = {
    "ln_last": (
        lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b),
        lambda x, w, b: ref_layer_norm(x, x.shape[-1:], w, b),
    ),
    "ln2d": OPS["ln2d"],
    "ln_chw": OPS["ln_chw"],
}


@pytest.mark.parametrize(
    ("name", "shape", "layout", "L"),
    [
        ("ln_last", (3, 5, 37), "nchw", 37),  # 15 rows of 37: three tiles of 16 values, a ragged one
        ("ln2d", (3, 37, 2, 3), "cl", 37),  # LayerNorm2d on channels-last: a row per position
        ("ln_chw", (19, 2, 3, 3), "nchw", 18),  # LN over (C, H, W) of 19 samples of 18 values
    ],
)
def test_short_rows_run_in_blocks_of_rows(name, shape, layout, L, monkeypatch):
    # sets that are consecutive contiguous rows of at most _ROW_MAX values take the ln2d_* kernels'
    # blocked walk: blocks of 16 rows by tiles of 16 values under _FORCE_CHUNK (ragged on both axes),
    # the per-row statistics shifted by each row's first value
    from normkit.kernels import triton as nkt

    monkeypatch.setattr(nkt, "_FORCE_CHUNK", 16)
    walks = []
    real = nkt._rows_walk
    monkeypatch.setattr(nkt, "_rows_walk", lambda *a: walks.append(real(*a)) or walks[-1])
    specs = [(torch.float32, {}), (torch.bfloat16, {}), (F64, {})]
    specs += [(torch.float32, {"scale": 1e-2, "offset": 1e4}), (torch.float32, {"scale": 1e30})]
    specs += [(torch.float32, {"affine": False}), (torch.float32, {"x_grad": False})]
    for dtype, kw in specs:
        y, yo, got, exp, _ = _case(name, shape, dtype, layout, seed=71, ops=ROW_OPS, **kw)
        assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in got)
        big = "offset" in kw or "scale" in kw
        _close(y, yo, 1e-3 if big else TOL[dtype])
        for g, e in zip(got, exp):
            _close(g, e, 1e-2 if big else GTOL[dtype])
    assert walks and all(w[0][:2] == (L, math.prod(shape) // L) for w in walks), walks
    # a mean-only row pattern (LN over the last dim without an affine: one set per row of BatchNorm's
    # one-sample walk) takes it too
    walks.clear()
    y, yo, got, exp, _ = _case("ln_last", shape, torch.float32, layout, affine=False, seed=72, ops=ROW_OPS)
    if name == "ln_last":
        assert walks, "no row walk"
        _close(y, yo, TOL[torch.float32])
        _close(got[0], exp[0], GTOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16], ids=str)
def test_layer_norm_2d_on_nchw_runs_in_blocks_of_positions(dtype, split, monkeypatch):
    # LayerNorm2d on NCHW (a set: one position's C values, S apart) takes the (C, E) kernels: under
    # _FORCE_CHUNK blocks of 16 positions by tiles of 16 channels. 3 * 9 * 7 = 189 positions make 12
    # blocks (a ragged last one; blocks straddle the images' edges) and 37 channels make 3 tiles
    from normkit.kernels import triton as nkt

    walks = []
    real = nkt._ln2d_walk
    monkeypatch.setattr(nkt, "_ln2d_walk", lambda *a: walks.append(real(*a)) or walks[-1])
    y, yo, got, exp, _ = _case("ln2d", (3, 37, 9, 7), dtype, "nchw", seed=41)
    _close(y, yo, TOL[dtype])
    for g, e in zip(got, exp):
        _close(g, e, GTOL[dtype])
    assert len(walks) == 2 and all(w[1:] == (16, 16) for w in walks), walks
    if dtype == torch.float32:
        # a shift and scale per position: 1e4 + 1e-2 noise stays at fp32 accuracy; no affine
        y, yo, got, exp, _ = _case("ln2d", (3, 37, 9, 7), dtype, "nchw", scale=1e-2, offset=1e4, seed=42)
        _close(y, yo, 1e-3)
        for g, e in zip(got, exp):
            _close(g, e, 1e-2)
        y, yo, got, exp, _ = _case("ln2d", (3, 37, 9, 7), dtype, "nchw", affine=False, seed=43)
        _close(y, yo, TOL[dtype])
        _close(got[0], exp[0], GTOL[dtype])
        # values of 1e30: squares beyond float32, the blocks take the scaled statistics
        y, yo, got, exp, _ = _case("ln2d", (3, 37, 9, 7), dtype, "nchw", scale=1e30, seed=44)
        assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in got)
        _close(y, yo, 1e-4)


@pytest.mark.parametrize("name", ["bn", "gn2"])
def test_split_reduction_keeps_the_shifted_accuracy(name, split):
    # the chunks share one shift and scale (from all chunks' max / min): 1e4 + 1e-2 noise stays exact
    y, yo, got, exp, _ = _case(name, (2, 6, 5, 7), torch.float32, "nchw", scale=1e-2, offset=1e4, seed=12)
    _close(y, yo, 1e-3)
    y, yo, got, exp, _ = _case(name, (2, 6, 5, 7), torch.float32, "nchw", scale=1e30, seed=13)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in got)
    _close(y, yo, 1e-4)


@pytest.mark.parametrize("name", ["ln_chw", "gn1"])
def test_one_read_moments_over_many_tiles_keep_the_shifted_accuracy(name):
    # a set of 6000 values walked in tiles of 1024 (six Welford updates per lane, then the lanes
    # combined): an offset of 1e4 with 1e-2 noise and a skewed set (one outlier) stay at fp32 accuracy
    y, yo, got, exp, _ = _case(name, (2, 3, 40, 50), torch.float32, "nchw", scale=1e-2, offset=1e4, seed=29)
    _close(y, yo, 1e-3)
    for g, e in zip(got, exp):
        _close(g, e, 1e-2)
    y, yo, got, exp, xs = _case(name, (2, 3, 40, 50), torch.float32, "cl", seed=30)
    _close(y, yo, TOL[torch.float32])
    for g, e in zip(got, exp):
        _close(g, e, GTOL[torch.float32])


def test_chunking_policy_fills_the_device_only_when_sets_are_few():
    from normkit.kernels import triton as nkt
    from normkit.kernels._plan import Plan

    class Cuda:  # a stand-in device: the policy reads only the SM count
        type = "cuda"

    real = nkt._programs
    try:
        nkt._programs = lambda device: 4 * 132  # an H100 / H200
        # BN on (64, 256, 56, 56): 256 sets of 200704 values -> split, chunks of BM's multiples
        n, ch, split_c, _, bm = nkt._chunking(256, 1, 64 * 56 * 56, 1, 256, Cuda())
        assert not split_c and bm == 256 and n > 1 and ch % 256 == 0 and (n - 1) * ch < 64 * 56 * 56 <= n * ch
        assert 256 * n >= 4 * 132
        # GN on (64, 256, 56, 56), G = 32: 2048 sets already fill it
        assert nkt._chunking(64 * 32, 8, 56 * 56, 4, 256, Cuda())[:2] == (1, 56 * 56)
        # small sets are never cut below the minimum chunk
        assert nkt._chunking(4, 1, 3000, 1, 256, Cuda())[0] == 1
        # LN over (C, H, W) with an elementwise affine on a batch of 8: one set per sample, cut by channels
        n, ch, split_c, bc, _ = nkt._chunking(8, 256 * 28 * 28, 1, 1024, 1, Cuda())
        assert split_c and n > 1 and ch % bc == 0 and ch >= nkt._MIN_CHUNK  # (the minimum chunk caps n)
        # GroupNorm(32) channels-last on (64, 256, 56, 56): 64 samples x 4 blocks of 64 channels, cut
        # into chunks of positions until the programs fill the device
        w = nkt._gcl_walk(Plan(3, 64, 256, 56 * 56, 32), Cuda())
        assert (w.nCB, w.BCC) == (4, 64) and w.CH % w.BE == 0
        assert (w.nchunks - 1) * w.CH < 56 * 56 <= w.nchunks * w.CH
        assert 64 * 4 * w.nchunks >= 4 * 132 and w.nchunks == 3
        # a small input: one chunk, never below the minimum chunk
        assert nkt._gcl_walk(Plan(3, 2, 64, 8 * 8, 32), Cuda()).nchunks == 1
    finally:
        nkt._programs = real


def test_group_equals_channels_is_instance_norm(ran):
    y, yo, got, exp, _ = _case("gn2", (2, 2, 4, 4), torch.float32, "cl", seed=4)  # G = C
    _close(y, yo, TOL[torch.float32])


@pytest.mark.parametrize("name", ["gn2", "bn", "ln2d"])
def test_large_mean_keeps_float32_accuracy(name):
    # 1e4 + 1e-2 * noise: the shift makes the float32 statistics exact (a plain two-pass is off by 0.07)
    y, yo, got, exp, _ = _case(name, (2, 6, 4, 4), torch.float32, "nchw", scale=1e-2, offset=1e4, seed=5)
    _close(y, yo, 1e-3)


def test_huge_and_constant_inputs_stay_finite():
    y, yo, got, exp, _ = _case("gn2", (2, 6, 4, 4), torch.float32, "nchw", scale=1e30, seed=6)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in got)
    _close(y, yo, 1e-4)
    x = torch.full((2, 4, 3, 3), 7.0, device=DEVICE, requires_grad=True)
    b = torch.arange(4.0, device=DEVICE)
    with kernels.use("triton"):
        y = F.group_norm(x, 2, None, b)
        y.sum().backward()
    torch.testing.assert_close(y.cpu(), b.view(1, 4, 1, 1).expand(2, 4, 3, 3).cpu())
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    ("name", "shape", "layout", "chunks"),
    [
        ("gn1", (1, 1, 256, 256), "nchw", None),  # the per-set walk
        ("gn1", (1, 1, 256, 256), "nchw", 4096),  # the split reduction
        ("gn1", (1, 4, 128, 128), "cl", None),  # GroupNorm channels-last, blocks across groups
        ("bn", (65536, 2), "nchw", None),  # BatchNorm's rows of channels
    ],
)
def test_the_plain_range_counts_the_set_size(name, shape, layout, chunks, monkeypatch):
    # 2^16 values in [-2^58, 2^58]: each deviation's square fits float32 (the range is under the
    # plain bound of 2^59) but their sum, 2^16 * 2^114, does not. The plain statistics would give an
    # infinite variance (every output the bias): the size-aware bound takes the scaled statistics.
    from normkit.kernels import triton as nkt

    if chunks:
        monkeypatch.setattr(nkt, "_FORCE_CHUNK", chunks)
    g = torch.Generator().manual_seed(71)
    x = (torch.rand(shape, generator=g, dtype=F64) * 2 - 1) * 2.0**58
    if layout == "cl":
        x = x.to(memory_format=torch.channels_last)
    fn, ref = OPS[name]
    with kernels.use("triton"):
        y = fn(x.float().to(DEVICE), None, None).cpu()
    _close(y, ref(x.float().double(), None, None), 1e-4)


def test_statistics_interoperate_with_the_reference_backward():
    # the kernels save the reference's six statistic rows: the reference's backward accepts them
    from normkit.ops import core

    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 6, 3, 5, generator=g).to(DEVICE)
    w, b = (
        torch.rand(1, 6, 1, 1, generator=g).to(DEVICE) + 0.5,
        torch.randn(1, 6, 1, 1, generator=g).to(DEVICE),
    )
    dy = torch.randn(x.shape, generator=g).to(DEVICE)
    with kernels.use("triton"):
        y, st = kernels.norm_forward(x, w, b, None, (0, 2, 3), 1e-5)
        got = kernels.norm_backward(dy, x, w, b, None, st, (0, 2, 3), (True, True, True))
    ry, rst = core.norm_forward(x, w, b, None, (0, 2, 3), 1e-5)
    exp = core.norm_backward(dy, x, w, b, None, st, (0, 2, 3), (True, True, True))
    torch.testing.assert_close(y, ry, rtol=1e-5, atol=1e-5)
    mt, vt = core.mean_var(st)
    mr, vr = core.mean_var(rst)
    torch.testing.assert_close(mt, mr)
    torch.testing.assert_close(vt, vr)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_use_triton_without_triton_is_a_clear_error(monkeypatch):
    from normkit.kernels import triton as nkt

    monkeypatch.setattr(nkt, "why_not", lambda: "ModuleNotFoundError: No module named 'triton'")
    with pytest.raises(RuntimeError, match="Triton kernels are not available"):
        with kernels.use("triton"):
            pass


# --- Proxy Norm's activation step ------------------------------------------------------------------

_TORCH_ACTS = {
    "relu": torch.relu,
    "leaky_relu": lambda a: torch.nn.functional.leaky_relu(a, 0.1),
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda a: torch.nn.functional.gelu(a, approximate="tanh"),
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "identity": lambda a: a,
}


@pytest.fixture
def ran_pn(monkeypatch):
    """Counts the Triton launches of Proxy Norm's step that ran (the registered op's and the one
    autograd node's)."""
    from normkit.kernels import triton as nkt

    calls = {"_step_fwd": 0, "_step_bwd": 0}
    for name in calls:
        real = getattr(nkt, name)

        def spy(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(nkt, name, spy)
    return calls


def _pn_case(act, shape, dtype, layout, seed=0):
    from normkit.ops import proxy

    g = torch.Generator().manual_seed(seed)
    acc = F64 if dtype == F64 else torch.float32
    y = torch.randn(shape, generator=g, dtype=F64).to(dtype)
    if layout == "cl":
        y = y.to(memory_format=torch.channels_last)
    C = shape[1]
    w, b, m = (torch.randn(C, generator=g, dtype=F64).to(acc) for _ in range(3))
    r = torch.rand(C, generator=g, dtype=F64).to(acc) + 0.5
    dout = torch.randn(shape, generator=g, dtype=F64).to(dtype)
    dev = [t.to(DEVICE).requires_grad_() for t in (y, w, b, m, r)]
    with kernels.use("triton"):
        out = proxy.proxy_act(*dev, act, 0.1)
        got = torch.autograd.grad(out, dev, dout.to(DEVICE))
    ref = [t.detach().cpu().double().requires_grad_() for t in dev]
    exp_out = proxy.proxy_act_composite(*ref, _TORCH_ACTS[act])
    exp = torch.autograd.grad(exp_out, ref, dout.double())
    return out, exp_out, got, exp


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl", "2d"])
@pytest.mark.parametrize("act", list(_TORCH_ACTS))
def test_proxy_act_matches_the_float64_composite(act, layout, dtype, ran_pn):
    shape = (6, 5) if layout == "2d" else (2, 5, 3, 4)
    out, exp_out, got, exp = _pn_case(act, shape, dtype, "cl" if layout == "cl" else "nchw", seed=21)
    assert ran_pn == {"_step_fwd": 1, "_step_bwd": 1}, ran_pn
    assert out.dtype == dtype
    if layout == "cl":
        assert out.is_contiguous(memory_format=torch.channels_last)
    _close(out.detach().cpu(), exp_out.detach(), TOL[dtype])
    for name, a, e in zip(("y", "weight", "bias", "m", "rstd"), got, exp):
        assert a.dtype == (dtype if name == "y" else (F64 if dtype == F64 else torch.float32)), name
        _close(a.cpu(), e, GTOL[dtype])


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_proxy_act_split_over_elements(layout, split, ran_pn):
    # chunks of 16 of the 2 * 9 * 7 = 126 elements per channel: the per-channel sums add the chunks
    out, exp_out, got, exp = _pn_case("silu", (2, 5, 9, 7), torch.float32, layout, seed=22)
    assert ran_pn["_step_bwd"] == 1
    _close(out.detach().cpu(), exp_out.detach(), TOL[torch.float32])
    for a, e in zip(got, exp):
        _close(a.cpu(), e, GTOL[torch.float32])


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_group_norm_proxy_layer_runs_on_triton(groups, layout, ran, ran_pn, monkeypatch):
    # the layer's two-op path where the fused kernel declines (here made to): GN (normkit::norm),
    # then F.proxy_norm_act, the proxy statistics and the step as one autograd node
    from normkit.kernels import triton as nkt
    from normkit.nn import GroupNormProxyAct2d

    monkeypatch.setattr(nkt, "gn_proxy_act", lambda *a, **k: None)

    torch.manual_seed(23)
    layer = GroupNormProxyAct2d(4, num_groups=groups, activation="relu").double()
    with torch.no_grad():
        for p in (layer.weight, layer.bias, layer.proxy_bias, layer.proxy_weight):
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(3, 4, 5, 5, dtype=F64)
    if layout == "cl":
        x = x.to(memory_format=torch.channels_last)
    dout = torch.randn(3, 4, 5, 5, dtype=F64)
    ref_layer = GroupNormProxyAct2d(4, num_groups=groups, activation="relu").double()
    ref_layer.load_state_dict(layer.state_dict())
    with kernels.use("reference"):
        xr = x.clone().requires_grad_()
        yr = ref_layer(xr)
        yr.backward(dout)
    xt = x.float().to(DEVICE).requires_grad_()
    tl_ = layer.float().to(DEVICE)
    with kernels.use("triton"):
        yt = tl_(xt)
        yt.backward(dout.float().to(DEVICE))
    assert ran["forward"] == 1 and ran_pn == {"_step_fwd": 1, "_step_bwd": 1}, ran_pn
    assert type(yt.grad_fn).__name__ == "_ProxyNormActBackward"
    _close(yt.detach().cpu(), yr.detach(), 1e-5)
    _close(xt.grad.cpu(), xr.grad, 1e-4)
    for pt, pr in zip(tl_.parameters(), ref_layer.parameters()):
        _close(pt.grad.cpu(), pr.grad, 1e-4)


@pytest.fixture
def ran_fused(monkeypatch):
    from normkit.kernels import triton as nkt

    calls = {"gn_proxy_forward": 0, "gn_proxy_backward": 0}
    for name in calls:
        real = getattr(nkt, name)

        def spy(*a, _real=real, _name=name, **k):
            out = _real(*a, **k)
            calls[_name] += out is not None
            return out

        monkeypatch.setattr(nkt, name, spy)
    return calls


@pytest.mark.parametrize("act", ["relu", "silu", "leaky_relu", "gelu"])
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_fused_group_norm_proxy_matches_the_reference_layer(act, groups, layout, ran_fused):
    # GroupNormProxyAct2d on the Triton backend: GN + the step in one kernel each way (y never stored)
    from normkit.nn import GroupNormProxyAct2d

    torch.manual_seed(24)
    activation = torch.nn.LeakyReLU(0.2) if act == "leaky_relu" else act
    layer = GroupNormProxyAct2d(4, num_groups=groups, activation=activation).double()
    with torch.no_grad():
        for p in (layer.weight, layer.bias, layer.proxy_bias, layer.proxy_weight):
            p.add_(0.3 * torch.randn_like(p))
    ref_layer = GroupNormProxyAct2d(4, num_groups=groups, activation=activation).double()
    ref_layer.load_state_dict(layer.state_dict())
    x = torch.randn(3, 4, 5, 6, dtype=F64)
    if layout == "cl":
        x = x.to(memory_format=torch.channels_last)
    dout = torch.randn(3, 4, 5, 6, dtype=F64)
    with kernels.use("reference"):
        xr = x.clone().requires_grad_()
        yr = ref_layer(xr)
        yr.backward(dout)
    for dtype, tol, gtol in ((F64, 1e-10, 1e-9), (torch.float32, 2e-5, 2e-4)):
        lt = GroupNormProxyAct2d(4, num_groups=groups, activation=activation).to(dtype).to(DEVICE)
        lt.load_state_dict(layer.state_dict())
        xt = x.to(dtype).to(DEVICE).detach().requires_grad_()
        with kernels.use("triton"):
            yt = lt(xt)
            yt.backward(dout.to(dtype).to(DEVICE))
        if layout == "cl":
            assert yt.is_contiguous(memory_format=torch.channels_last)
        _close(yt.detach().cpu(), yr.detach(), tol)
        _close(xt.grad.cpu(), xr.grad, gtol)
        for pt, pr in zip(lt.parameters(), ref_layer.parameters()):
            _close(pt.grad.cpu(), pr.grad, gtol)
    assert ran_fused == {"gn_proxy_forward": 2, "gn_proxy_backward": 2}, ran_fused


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_functional_group_norm_proxy_act_takes_the_fused_kernels(layout, ran_fused):
    # F.group_norm_proxy_act on the Triton backend runs the layer's fused kernels too (the bench times it)
    torch.manual_seed(26)
    x = torch.randn(3, 4, 5, 6, dtype=F64)
    if layout == "cl":
        x = x.to(memory_format=torch.channels_last)
    w, b, pb, pw = (torch.randn(4, dtype=F64) * 0.3 + s for s in (1.0, 0.0, 0.0, 0.0))
    dout = torch.randn(3, 4, 5, 6, dtype=F64)

    def run(backend, dtype):
        ins = [t.to(dtype).to(DEVICE).detach().requires_grad_() for t in (x, w, b, pb, pw)]
        with kernels.use(backend):
            y = F.group_norm_proxy_act(ins[0], 2, *ins[1:], activation="silu")
            grads = torch.autograd.grad(y, ins, dout.to(dtype).to(DEVICE))
        return y, grads

    yr, gr = run("reference", F64)
    for dtype, tol, gtol in ((F64, 1e-10, 1e-9), (torch.float32, 2e-5, 2e-4)):
        yt, gt = run("triton", dtype)
        assert yt.is_contiguous(
            memory_format=torch.channels_last if layout == "cl" else torch.contiguous_format
        )
        _close(yt.detach().cpu(), yr.detach(), tol)
        for a, r in zip(gt, gr):
            _close(a.cpu(), r, gtol)
    assert ran_fused == {"gn_proxy_forward": 2, "gn_proxy_backward": 2}, ran_fused


# GroupNorm(3), InstanceNorm and LayerNorm2d with a per-channel affine; LayerNorm over (C, H, W)
# with a (C, H, W) affine (on channels-last memory its plan reorders the affine to the memory's order)
_ONE_NODE = {
    "gn": (lambda x, w, b: F.group_norm(x, 3, w, b), (6,)),
    "ln": (lambda x, w, b: F.layer_norm(x, x.shape[1:], w, b), (6, 4, 5)),
    "in": (lambda x, w, b: F.instance_norm(x, weight=w, bias=b).output, (6,)),
    "ln2d": (lambda x, w, b: F.layer_norm_2d(x, w, b), (6,)),
    "bn": (lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True).output, (6,)),
}


@pytest.mark.parametrize("op", list(_ONE_NODE))
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize(
    ("wants", "affine"),
    [("all", True), ("x", True), ("params", True), ("none", True), ("all", False), ("none", False)],
)
def test_norm_is_one_node_and_differentiates_what_is_asked(op, wants, layout, affine, ran):
    # F.group_norm, F.layer_norm, F.instance_norm, F.layer_norm_2d and F.batch_norm (batch statistics)
    # on the Triton kernels are one node on
    # x as it lies (no views of x, the affine or the output around it); frozen parameters, a
    # constant input or no grad at all run the same kernels, and what is asked for matches the
    # float64 reference
    fn, pshape = _ONE_NODE[op]
    torch.manual_seed(33)
    x = torch.randn(2, 6, 4, 5, dtype=F64)
    if layout == "cl":
        x = x.to(memory_format=torch.channels_last)
    w, b = (torch.randn(pshape, dtype=F64) * 0.3 + s for s in (1.0, 0.0))
    dy = torch.randn(2, 6, 4, 5, dtype=F64)

    def run(backend, dtype):
        xt = x.to(dtype).to(DEVICE).detach().requires_grad_(wants in ("all", "x"))
        ps = (
            [t.detach().to(dtype).to(DEVICE).requires_grad_(wants in ("all", "params")) for t in (w, b)]
            if affine
            else [None, None]
        )
        with kernels.use(backend):
            y = fn(xt, *ps)
        live = [t for t in (xt, *ps) if t is not None and t.requires_grad]
        return y, live, (torch.autograd.grad(y, live, dy.to(dtype).to(DEVICE)) if live else ())

    yr, _, gr = run("reference", F64)
    for dtype in (F64, torch.float32):
        yt, live, gt = run("triton", dtype)
        _close(yt.detach().cpu(), yr.detach(), TOL[dtype])
        assert yt.stride() == x.stride()
        if wants == "none":
            assert yt.grad_fn is None
            continue
        assert type(yt.grad_fn).__name__ == "_NormBackward"
        assert {type(f).__name__ for f, _ in yt.grad_fn.next_functions if f is not None} == {"AccumulateGrad"}
        assert len(gt) == len(gr)
        for a, r in zip(gt, gr):
            assert a.shape == r.shape
            _close(a.cpu(), r, GTOL[dtype])
    assert ran["forward"] == 2 and ran["backward"] == (0 if wants == "none" else 2), ran


def test_layer_norm_double_backward_on_the_triton_backend():
    # create_graph=True differentiates the reference composite (LayerNorm over (C, H, W) and
    # LayerNorm2d, channels-last)
    torch.manual_seed(35)
    x = (
        torch.randn(2, 3, 2, 2, dtype=F64, device=DEVICE)
        .to(memory_format=torch.channels_last)
        .requires_grad_()
    )
    w = (torch.rand(3, 2, 2, dtype=F64, device=DEVICE) + 0.5).requires_grad_()
    b = torch.randn(3, 2, 2, dtype=F64, device=DEVICE, requires_grad=True)
    w2, b2 = (t[:, 0, 0].detach().clone().requires_grad_() for t in (w, b))  # LayerNorm2d's (C,) affine
    with kernels.use("triton"):
        assert torch.autograd.gradgradcheck(lambda *t: F.layer_norm(t[0], (3, 2, 2), t[1], t[2]), (x, w, b))
        assert torch.autograd.gradgradcheck(lambda *t: F.layer_norm_2d(t[0], t[1], t[2]), (x, w2, b2))


def test_group_norm_double_backward_and_forward_ad_on_the_triton_backend():
    # create_graph=True differentiates the reference composite; dual tensors take the general op's jvp
    torch.manual_seed(34)
    x = torch.randn(1, 4, 2, 3, dtype=F64, device=DEVICE, requires_grad=True)
    w = (torch.rand(4, dtype=F64, device=DEVICE) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=F64, device=DEVICE, requires_grad=True)
    with kernels.use("triton"):
        assert torch.autograd.gradcheck(lambda *t: F.group_norm(t[0], 2, t[1], t[2]), (x, w, b))
        assert torch.autograd.gradgradcheck(lambda *t: F.group_norm(t[0], 2, t[1], t[2]), (x, w, b))
        tx = torch.randn_like(x)
        with torch.autograd.forward_ad.dual_level():
            y = F.group_norm(torch.autograd.forward_ad.make_dual(x.detach(), tx), 2, w.detach(), b.detach())
            jvp = torch.autograd.forward_ad.unpack_dual(y).tangent
    _, want = torch.func.jvp(lambda t: ref_group_norm(t, 2, w.detach(), b.detach()), (x.detach(),), (tx,))
    _close(jvp, want, 1e-9)


@pytest.mark.parametrize(
    ("shape", "layout"), [((4, 6, 3, 5), "nchw"), ((4, 6, 3, 5), "cl"), ((9, 6), "nchw")], ids=str
)
@pytest.mark.parametrize(("momentum", "unbiased"), [(0.1, True), (None, True), (0.3, False)], ids=str)
def test_batch_norm_layer_trains_as_one_node_with_its_buffers_in_one_launch(
    shape, layout, momentum, unbiased, ran, monkeypatch
):
    # BatchNorm1d / 2d training under use("triton"): the output is one node on x (no registered op, no
    # views), the running statistics and counters are updated in one Triton launch from the statistics
    # the forward kernel saved, and output, gradients and buffers match the float64 reference layer
    # over three steps (momentum, cumulative average, biased stored variance)
    from normkit.nn import BatchNorm1d, BatchNorm2d

    launched = []
    real = _kernels_module().bn_running_kernel
    spy = type("Spy", (), {"__getitem__": lambda s, g: launched.append(g) or real[g]})
    monkeypatch.setattr(_kernels_module(), "bn_running_kernel", spy())
    from normkit.kernels import triton as nkt

    took = []  # the update reads the saved statistics itself (no mean_var ops before it)
    real_update = nkt.bn_running_update_from_stats
    monkeypatch.setattr(
        nkt, "bn_running_update_from_stats", lambda *a: took.append(real_update(*a)) or took[-1]
    )
    cls = BatchNorm2d if len(shape) == 4 else BatchNorm1d
    torch.manual_seed(71)
    ref = cls(6, momentum=momentum, unbiased_running_var=unbiased).double()
    with torch.no_grad():
        ref.weight.add_(0.3 * torch.randn(6, dtype=F64))
        ref.bias.add_(0.3 * torch.randn(6, dtype=F64))
    layer = copy.deepcopy(ref).float().to(DEVICE)
    for step in range(3):
        x = torch.randn(shape, dtype=F64) * (1 + step) + step
        if layout == "cl":
            x = x.to(memory_format=torch.channels_last)
        dy = torch.randn(shape, dtype=F64)
        xt = x.float().to(DEVICE).requires_grad_()
        with kernels.use("triton"):
            y = layer(xt)
        assert type(y.grad_fn).__name__ == "_NormBackward"
        assert {type(f).__name__ for f, _ in y.grad_fn.next_functions if f is not None} == {"AccumulateGrad"}
        y.backward(dy.float().to(DEVICE))
        xr = x.clone().requires_grad_()
        with kernels.use("reference"):
            yr = ref(xr)
        yr.backward(dy)
        assert y.stride() == xt.stride()
        _close(y.detach().cpu(), yr.detach(), TOL[torch.float32])
        _close(xt.grad.cpu(), xr.grad, GTOL[torch.float32])
        for a, r in ((layer.weight, ref.weight), (layer.bias, ref.bias)):
            _close(a.grad.cpu(), r.grad, GTOL[torch.float32])
        for name in ("running_mean", "running_var"):
            _close(getattr(layer, name).cpu(), getattr(ref, name), 1e-5)
        assert layer.num_batches_tracked.item() == ref.num_batches_tracked.item() == step + 1
    assert launched == [(1,)] * 3, launched
    assert took == [True] * 3, took
    assert ran == {"forward": 3, "backward": 3}, ran


def test_batch_norm_on_triton_skips_a_non_finite_batch_and_returns_new_statistics(ran):
    # a batch with a non-finite value leaves the layer's buffers as they are and counts a skip (as
    # the reference layer does); the functional returns new running statistics, never writing its
    # arguments
    from normkit.nn import BatchNorm2d

    torch.manual_seed(72)
    layer = BatchNorm2d(5).to(DEVICE)
    x = torch.randn(3, 5, 2, 2, device=DEVICE)
    with kernels.use("triton"):
        layer(x)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    bad = x.clone()
    bad[1, 2, 0, 0] = float("nan")
    with kernels.use("triton"):
        layer(bad)
    after = layer.state_dict()
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(after[k], before[k]), k
    assert layer.num_skipped_updates.item() == 1
    # far from zero (the saved statistics' shift and power-of-two scale carry the mean): the buffers
    # read from them inside the update launch match the float64 statistics
    far = torch.randn(64, 5, 3, 3, dtype=F64) * 1e3 + 1e5
    with kernels.use("triton"):
        layer(far.float().to(DEVICE))
    xf = far.float().double()
    f = 0.1
    _close(layer.running_mean.cpu(), (1 - f) * before["running_mean"].double() + f * xf.mean((0, 2, 3)), 1e-6)
    _close(layer.running_var.cpu(), (1 - f) * before["running_var"].double() + f * xf.var((0, 2, 3)), 1e-5)
    rm, rv = torch.zeros(5, device=DEVICE), torch.ones(5, device=DEVICE)
    with kernels.use("triton"):
        out = F.batch_norm(x, rm, rv, training=True, momentum=0.5)
    assert torch.equal(rm, torch.zeros(5)) and torch.equal(rv, torch.ones(5))  # (the arguments, untouched)
    xd = x.cpu().double()
    _close(out.running_mean.cpu(), 0.5 * xd.mean((0, 2, 3)), 1e-5)
    _close(out.running_var.cpu(), 0.5 + 0.5 * xd.var((0, 2, 3)), 1e-5)
    assert ran["forward"] == 4


def test_batch_norm_buffers_the_update_launch_declines_take_torchs_ops(ran, monkeypatch):
    # running statistics that are strided views: the one-launch update declines them, and the same
    # rule runs on torch's ops (no launch of the update kernel at all, not one that fails first)
    from normkit.kernels import triton as nkt

    launched = []
    real = _kernels_module().bn_running_kernel
    spy = type("Spy", (), {"__getitem__": lambda s, g: launched.append(g) or real[g]})
    monkeypatch.setattr(_kernels_module(), "bn_running_kernel", spy())
    torch.manual_seed(74)
    x = torch.randn(4, 5, 3, 3, device=DEVICE)
    store = torch.stack([torch.zeros(5), torch.ones(5)], 1).to(DEVICE)  # (5, 2): columns stride 2
    rm, rv = store[:, 0], store[:, 1]
    nbt = torch.tensor(3, device=DEVICE)
    with kernels.use("triton"):
        y = nkt.batch_norm_train(x, None, None, rm, rv, nbt, None, 1e-5, False)
    assert y is not None and launched == [], launched
    xd = x.cpu().double()
    _close(rm.cpu(), 0.25 * xd.mean((0, 2, 3)), 1e-6)  # (cumulative: 1 / 4 after this step)
    _close(rv.cpu(), 0.75 + 0.25 * xd.var((0, 2, 3), unbiased=False), 1e-6)
    assert nbt.item() == 4
    _close(y.cpu(), ref_batch_norm(xd, None, None, training=True).output, TOL[torch.float32])
    assert ran["forward"] == 1


def test_batch_norm_double_backward_and_declined_cases_on_the_triton_backend(ran):
    # create_graph=True differentiates the reference composite; parameters the fast paths do not
    # take (a float64 weight with a float32 input) reach the general path and its clear error, as
    # one value per channel does
    torch.manual_seed(73)
    x = torch.randn(3, 4, 2, 1, dtype=F64, device=DEVICE, requires_grad=True)
    w = (torch.rand(4, dtype=F64, device=DEVICE) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=F64, device=DEVICE, requires_grad=True)
    bn = lambda *t: F.batch_norm(t[0], None, None, t[1], t[2], training=True).output  # noqa: E731
    with kernels.use("triton"):
        assert torch.autograd.gradcheck(bn, (x, w, b))
        assert torch.autograd.gradgradcheck(bn, (x, w, b))
    assert ran["forward"] > 0
    with kernels.use("triton"), pytest.raises(TypeError, match="weight"):
        F.batch_norm(x.detach().float(), None, None, w.detach(), None, training=True)
    with kernels.use("triton"), pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm(torch.randn(1, 4, device=DEVICE), None, None, training=True)


def test_batch_norm_layer_traces_with_fx_under_the_triton_backend():
    # symbolic tracing hands the layer an fx Proxy: the fast-path choice must not read its device
    from normkit.nn import BatchNorm2d

    model = torch.nn.Sequential(BatchNorm2d(3)).to(DEVICE)
    with kernels.use("triton"):
        gm = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    with kernels.use("reference"):
        torch.testing.assert_close(gm(x), copy.deepcopy(model)(x))


def _pn_layer(C, groups, act, seed):
    """A float64 GroupNormProxyAct2d with its four parameter vectors moved off their init (seeded)."""
    from normkit.nn import GroupNormProxyAct2d

    torch.manual_seed(seed)
    layer = GroupNormProxyAct2d(C, num_groups=groups, activation=act).double()
    with torch.no_grad():
        for q in layer.parameters():
            q.add_(0.3 * torch.randn_like(q))
    return layer


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("wants", ["all", "x", "params", "none"])
def test_fused_group_norm_proxy_is_one_node_and_differentiates_what_is_asked(layout, wants, ran_fused):
    # the proxy statistics and GN + the step are one autograd node (the parameters' AccumulateGrad
    # nodes hang straight off it): with frozen parameters, a constant input, or no grad at all the
    # same kernels run and what is asked for matches the float64 reference layer
    from normkit.nn import GroupNormProxyAct2d

    layer = _pn_layer(6, 3, "silu", seed=29)
    x = torch.randn(2, 6, 4, 5, dtype=F64)
    if layout == "cl":
        x = x.to(memory_format=torch.channels_last)
    dout = torch.randn(2, 6, 4, 5, dtype=F64)

    def run(backend, dtype):
        lt = GroupNormProxyAct2d(6, num_groups=3, activation="silu").to(dtype).to(DEVICE)
        lt.load_state_dict(layer.state_dict())
        lt.requires_grad_(wants in ("all", "params"))
        xt = x.to(dtype).to(DEVICE).detach().requires_grad_(wants in ("all", "x"))
        with kernels.use(backend):
            y = lt(xt)
            if wants != "none":
                y.backward(dout.to(dtype).to(DEVICE))
        return y, xt.grad, [q.grad for q in lt.parameters()]

    yr, gxr, gpr = run("reference", F64)
    for dtype in (F64, torch.float32):
        yt, gxt, gpt = run("triton", dtype)
        _close(yt.detach().cpu(), yr.detach(), TOL[dtype])
        if wants == "none":
            assert yt.grad_fn is None and not yt.requires_grad
            continue
        assert type(yt.grad_fn).__name__ == "_GNProxyActBackward"
        assert {type(f).__name__ for f, _ in yt.grad_fn.next_functions if f is not None} == {"AccumulateGrad"}
        assert (gxt is None) == (gxr is None) and all((a is None) == (b is None) for a, b in zip(gpt, gpr))
        if gxt is not None:
            _close(gxt.cpu(), gxr, GTOL[dtype])
        for a, b in zip(gpt, gpr):
            if a is not None:
                _close(a.cpu(), b, GTOL[dtype])
    grads = 0 if wants == "none" else 2
    assert ran_fused == {"gn_proxy_forward": 2, "gn_proxy_backward": grads}, ran_fused


def test_fused_group_norm_proxy_forward_ad_takes_the_general_ops():
    # dual tensors: the fused node has no jvp, so the call takes GroupNorm + the step's ops, whose
    # tangent matches torch.func.jvp of the float64 reference composite
    from normkit.ops.proxy import proxy_act_composite

    torch.manual_seed(32)
    x = torch.randn(2, 4, 3, 3, dtype=F64, device=DEVICE)
    tx = torch.randn_like(x)
    w, b, pb, pw = (torch.randn(4, dtype=F64, device=DEVICE) * 0.3 + s for s in (1.0, 0.0, 0.0, 0.0))
    with kernels.use("triton"), torch.autograd.forward_ad.dual_level():
        y = F.group_norm_proxy_act(
            torch.autograd.forward_ad.make_dual(x, tx), 2, w, b, pb, pw, activation="silu"
        )
        got = torch.autograd.forward_ad.unpack_dual(y).tangent

    def ref(t):
        m, r = F.proxy_stats(w, b, pb, pw, "silu")
        return proxy_act_composite(ref_group_norm(t, 2, eps=1e-3), w, b, m, r, torch.nn.functional.silu)

    with kernels.use("reference"):
        _, want = torch.func.jvp(ref, (x,), (tx,))
    _close(got.cpu(), want.cpu(), 1e-9)


def test_fused_group_norm_proxy_half_parameters(ran_fused):
    # a bf16 layer (bf16 input and parameters): float32 statistics inside, gradients in bf16
    from normkit.nn import GroupNormProxyAct2d

    layer = _pn_layer(8, 2, "relu", seed=31)
    x = torch.randn(3, 8, 4, 4, dtype=F64)
    dout = torch.randn(3, 8, 4, 4, dtype=F64)
    outs = {}
    for backend, dtype in (("reference", F64), ("triton", torch.bfloat16)):
        lt = GroupNormProxyAct2d(8, num_groups=2, activation="relu").to(dtype).to(DEVICE)
        lt.load_state_dict(layer.state_dict())
        xt = x.to(dtype).to(DEVICE).detach().requires_grad_()
        with kernels.use(backend):
            y = lt(xt)
            y.backward(dout.to(dtype).to(DEVICE))
        outs[backend] = [y.detach(), xt.grad, *(q.grad for q in lt.parameters())]
    for got, want in zip(outs["triton"], outs["reference"]):
        assert got.dtype == torch.bfloat16
        _close(got.double().cpu(), want, GTOL[torch.bfloat16])
    assert ran_fused == {"gn_proxy_forward": 1, "gn_proxy_backward": 1}, ran_fused


def test_fused_group_norm_proxy_double_backward_takes_the_composite():
    from normkit.nn import GroupNormProxyAct2d

    torch.manual_seed(25)
    layer = GroupNormProxyAct2d(4, num_groups=2, activation="silu").double().to(DEVICE)
    x = torch.randn(
        1, 4, 2, 2, dtype=F64, device=DEVICE, requires_grad=True
    )  # (small: the interpreter is slow)
    with kernels.use("triton"):
        assert torch.autograd.gradcheck(lambda t: layer(t), (x,))
        assert torch.autograd.gradgradcheck(lambda t: layer(t), (x,))


@pytest.fixture
def ran_stats(monkeypatch):
    from normkit.kernels import triton as nkt

    calls = {"n": 0}
    real = nkt._ProxyStats.apply

    def spy(*a):
        calls["n"] += 1
        return real(*a)

    monkeypatch.setattr(nkt._ProxyStats, "apply", spy)
    return calls


# (the interpreter's numpy warns when fp32 sigmoid's exp overflows to inf, which gives the right 0 there;
# compiled kernels do not warn: the points reach |a| ~ 16 here, so gelu_tanh's 2u does overflow)
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize(
    "act", ["relu", "silu", "gelu", "gelu_tanh", "leaky_relu:0.2", "sigmoid", "tanh", "identity"]
)
def test_proxy_stats_kernel_matches_the_composite(act, ran_stats):
    # Proxy Norm's (C, 200) quadrature in one kernel each way, against the composite in float64
    torch.manual_seed(27)
    ps = [torch.randn(7, dtype=F64) * 0.5 + s for s in (1.0, 0.0, 0.0, 0.0)]
    dm, dr = torch.randn(7, dtype=F64), torch.randn(7, dtype=F64)

    def run(backend, dtype):
        ins = [p.to(dtype).to(DEVICE).requires_grad_() for p in ps]
        with kernels.use(backend):
            m, r = F.proxy_stats(*ins, act)
        grads = torch.autograd.grad((m, r), ins, (dm.to(m.dtype).to(DEVICE), dr.to(m.dtype).to(DEVICE)))
        return [t.detach().cpu() for t in (m, r, *grads)]

    ref = run("reference", F64)
    for dtype, tol in ((F64, 1e-12), (torch.float32, 2e-5)):
        for got, want in zip(run("triton", dtype), ref):
            _close(got, want, tol)
    assert ran_stats["n"] == 2


def test_proxy_stats_kernel_double_backward_takes_the_composite(ran_stats):
    torch.manual_seed(28)
    ps = [(torch.randn(3, dtype=F64, device=DEVICE) * 0.5 + s).requires_grad_() for s in (1.0, 0.0, 0.0, 0.0)]
    with kernels.use("triton"):
        assert torch.autograd.gradcheck(lambda *p: F.proxy_stats(*p, "silu"), ps)
        assert torch.autograd.gradgradcheck(lambda *p: F.proxy_stats(*p, "silu"), ps)
    assert ran_stats["n"] > 0


def test_fused_proxy_layer_trains_after_running_in_inference_mode():
    # the kernels' cached constants (leaky_relu's slope) are made outside inference mode, so a layer
    # first run under torch.inference_mode() still saves them for a later backward
    from normkit.kernels import triton as nkt
    from normkit.nn import GroupNormProxyAct2d

    nkt._SLOPES.clear()
    nkt._AS_ACC.clear()
    for dtype, tol in ((F64, 1e-9), (torch.float32, 1e-4)):  # (float32: the points' conversion too)
        layer = GroupNormProxyAct2d(4, num_groups=2, activation="leaky_relu:0.2").to(dtype).to(DEVICE)
        x = torch.randn(2, 4, 3, 3, dtype=dtype, device=DEVICE)
        with kernels.use("triton"):
            with torch.inference_mode():
                layer(x)
            xg = x.clone().requires_grad_()
            layer(xg).sum().backward()
        with kernels.use("reference"):
            xr = x.clone().requires_grad_()
            layer(xr).sum().backward()
        assert xg.grad is not None and xr.grad is not None
        _close(xg.grad.cpu(), xr.grad.cpu(), tol)


def test_float64_points_convert_once_per_version():
    # a layer keeps its quadrature points in float64; the kernels read float32 ones: converted once
    # (on a GPU each conversion is a launch), again after an in-place change, never across tensors
    from normkit.kernels import triton as nkt

    u = F.proxy_points(200, dtype=F64)
    a = nkt._points_vec(u, torch.float32)
    assert a.dtype == torch.float32 and torch.equal(a, u.float())
    assert nkt._points_vec(u, torch.float32) is a
    assert nkt._points_vec(u, F64) is u  # (already as the kernels read it)
    u.mul_(2.0)
    b = nkt._points_vec(u, torch.float32)
    assert b is not a and torch.equal(b, u.float())
    v = u.clone()  # (equal values, another tensor: its own conversion)
    c = nkt._points_vec(v, torch.float32)
    assert c is not b and torch.equal(c, b)


def _step_run(backend, dtype, y, params, dout, wants, act="silu", layout="nchw"):
    """F.proxy_norm_act on ``backend`` in ``dtype``: ``(out, grads of y and the four parameters)``,
    each gradient ``None`` where ``wants`` did not ask for it."""
    yt = y.to(dtype)
    if layout == "cl":
        yt = yt.to(memory_format=torch.channels_last)
    yt = yt.to(DEVICE).detach().requires_grad_(wants in ("all", "y"))
    ps = [q.to(dtype).to(DEVICE).detach().requires_grad_(wants in ("all", "params")) for q in params]
    with kernels.use(backend):
        out = F.proxy_norm_act(yt, *ps, activation=act)
        if wants != "none":
            out.backward(dout.to(dtype).to(DEVICE))
    return out, [t.grad for t in (yt, *ps)]


def _step_inputs(shape, seed):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    y = torch.randn(shape, generator=g, dtype=F64)
    params = [torch.randn(C, generator=g, dtype=F64) * 0.3 + s for s in (1.0, 0.0, 0.0, 0.0)]
    return y, params, torch.randn(shape, generator=g, dtype=F64)


@pytest.mark.parametrize("layout", ["nchw", "cl", "2d"])
@pytest.mark.parametrize("wants", ["all", "y", "params", "none"])
def test_proxy_norm_act_is_one_node_and_differentiates_what_is_asked(layout, wants, ran_pn, ran_stats):
    # F.proxy_norm_act (Proxy Norm after a LayerNorm) on the Triton kernels: the proxy statistics and
    # the step are one autograd node whose backward feeds the step's partial sums straight into the
    # statistics' kernel; every requires-grad combination matches the float64 reference
    y, params, dout = _step_inputs((6, 5) if layout == "2d" else (2, 5, 3, 4), seed=33)
    out_r, grads_r = _step_run("reference", F64, y, params, dout, wants)
    for dtype in (F64, torch.float32):
        out, grads = _step_run("triton", dtype, y, params, dout, wants, layout=layout)
        assert out.dtype == dtype
        if layout == "cl":
            assert out.is_contiguous(memory_format=torch.channels_last)
        _close(out.detach().cpu(), out_r.detach(), TOL[dtype])
        if wants == "none":
            assert out.grad_fn is None
            continue
        assert type(out.grad_fn).__name__ == "_ProxyNormActBackward"
        nexts = {type(f).__name__ for f, _ in out.grad_fn.next_functions if f is not None}
        assert nexts == {"AccumulateGrad"}
        for a, e in zip(grads, grads_r):
            assert (a is None) == (e is None)
            if a is not None:
                assert a.dtype == dtype
                _close(a.cpu(), e, GTOL[dtype])
    calls = 0 if wants == "none" else 2
    assert ran_pn == {"_step_fwd": 2, "_step_bwd": calls}, ran_pn
    assert ran_stats["n"] == 0  # (the statistics ran inside the node, not as a node of their own)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_proxy_norm_act_backward_adds_the_chunks(layout, split, ran_pn):
    # elements in chunks of 16: the statistics' backward kernel sums the step's (4, C, nchunks) partials
    y, params, dout = _step_inputs((2, 5, 9, 7), seed=34)
    out_r, grads_r = _step_run("reference", F64, y, params, dout, "all", act="leaky_relu:0.2")
    out, grads = _step_run("triton", torch.float32, y, params, dout, "all", "leaky_relu:0.2", layout)
    assert ran_pn == {"_step_fwd": 1, "_step_bwd": 1} and max(split) > 1, (ran_pn, split)
    _close(out.detach().cpu(), out_r.detach(), TOL[torch.float32])
    for a, e in zip(grads, grads_r):
        _close(a.cpu(), e, GTOL[torch.float32])


def test_proxy_norm_act_half_and_declined_cases(ran_pn):
    # bf16 input and parameters stay on the node (float32 inside, bf16 gradients); a layout the kernels
    # lack (a transposed view) or an activation outside their list runs the statistics and the step
    # as before, with the same answer
    y, params, dout = _step_inputs((3, 8, 4, 4), seed=35)
    out_r, grads_r = _step_run("reference", F64, y, params, dout, "all")
    out, grads = _step_run("triton", torch.bfloat16, y, params, dout, "all")
    assert type(out.grad_fn).__name__ == "_ProxyNormActBackward"
    for a, e in zip([out.detach(), *grads], [out_r.detach(), *grads_r]):
        assert a.dtype == torch.bfloat16
        _close(a.double().cpu(), e, GTOL[torch.bfloat16])
    yt = y.transpose(2, 3).to(DEVICE)  # neither contiguous nor channels-last
    softplus = torch.nn.Softplus()
    for yy, act in ((yt, "silu"), (y.to(DEVICE), softplus)):
        with kernels.use("triton"):
            got = F.proxy_norm_act(yy, *(q.to(DEVICE) for q in params), activation=act)
        with kernels.use("reference"):
            want = F.proxy_norm_act(yy.cpu(), *params, activation=act)
        _close(got.cpu(), want, 1e-10)
    assert ran_pn["_step_fwd"] == 1  # (the bf16 call only)


def test_proxy_norm_act_forward_ad_and_double_backward_take_the_general_ops():
    # dual tensors take the statistics and the registered step (their jvp matches torch.func.jvp of the
    # float64 composite); create_graph=True differentiates the composite (gradgradcheck)
    from normkit.ops.proxy import proxy_act_composite

    y, params, _ = _step_inputs((2, 4, 3, 3), seed=36)
    y, params = y.to(DEVICE), [q.to(DEVICE) for q in params]
    ty = torch.randn_like(y)
    with kernels.use("triton"), torch.autograd.forward_ad.dual_level():
        out = F.proxy_norm_act(torch.autograd.forward_ad.make_dual(y, ty), *params, activation="silu")
        got = torch.autograd.forward_ad.unpack_dual(out).tangent

    def ref(t):
        m, r = F.proxy_stats(*params, "silu")
        return proxy_act_composite(t, params[0], params[1], m, r, torch.nn.functional.silu)

    with kernels.use("reference"):
        _, want = torch.func.jvp(ref, (y,), (ty,))
    _close(got.cpu(), want.cpu(), 1e-9)
    ins = [y[:1, :, :2, :2].clone().requires_grad_(), *(q.clone().requires_grad_() for q in params)]
    with kernels.use("triton"):
        assert torch.autograd.gradcheck(lambda *t: F.proxy_norm_act(*t, activation="silu"), ins)
        assert torch.autograd.gradgradcheck(lambda *t: F.proxy_norm_act(*t, activation="silu"), ins)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize(
    ("momentum", "unbiased", "nbt", "skipped", "rdtype", "bad"),
    [
        (0.1, True, True, True, torch.float32, False),
        (0.1, False, False, False, torch.float32, False),
        (None, True, True, False, torch.float32, False),  # the cumulative average
        (0.3, True, True, True, F64, False),  # (on a float64 input)
        (0.3, True, True, True, torch.bfloat16, False),  # AMP: bf16 input, float32 buffers
        (0.7, True, True, False, torch.float32, False),  # lerp's other form
        (0.1, True, True, True, torch.float32, True),  # a non-finite batch
        (None, True, True, True, torch.float32, True),
    ],
)
def test_running_statistics_take_one_launch_on_the_route(
    momentum, unbiased, nbt, skipped, rdtype, bad, monkeypatch
):
    # BatchNorm's training step on the route to torch's op (a GPU's "auto"; here CPU tensors with "cpu"
    # admitted to the route): the running statistics take normkit's rule in one Triton launch, against
    # that rule in float64 (momentum or 1 / num_batches_tracked; unbiased or biased variance; a batch
    # with a non-finite statistic leaves every buffer as it is and counts a skip)
    from normkit.kernels import _direct

    monkeypatch.setattr(_direct, "DEVICES", {"cpu", "cuda"})
    launched = []
    real = _kernels_module().bn_running_kernel
    spy = type("Spy", (), {"__getitem__": lambda s, g: launched.append(g) or real[g]})
    monkeypatch.setattr(_kernels_module(), "bn_running_kernel", spy())
    g = torch.Generator().manual_seed(61)
    x = torch.randn(6, 70, 3, 4, generator=g) * 2 + 1
    if bad:
        x[2, 5, 1, 1] = float("inf")
    x = x.to(rdtype)
    if rdtype == torch.bfloat16:
        rdtype = torch.float32
    rm0 = torch.randn(70, generator=g).to(rdtype)
    rv0 = (torch.rand(70, generator=g) + 0.5).to(rdtype)
    rm, rv = rm0.clone().to(DEVICE), rv0.clone().to(DEVICE)
    n1 = torch.tensor(4, device=DEVICE) if nbt else None
    s1 = torch.tensor(2, device=DEVICE) if skipped else None
    versions = (rm._version, rv._version)
    with kernels.use("auto"):
        y = _direct.batch_norm_train(x.to(DEVICE), None, None, rm, rv, n1, momentum, 1e-5, unbiased, s1)
    assert y is not None and launched == [(1,)], launched
    assert rm._version > versions[0] and rv._version > versions[1]  # (autograd sees the in-place writes)
    y, rm, rv = y.cpu(), rm.cpu(), rv.cpu()
    xd = x.double()
    mean = xd.mean((0, 2, 3))
    var = xd.var((0, 2, 3), unbiased=unbiased)
    if bad:
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
        if nbt:
            assert n1.item() == 4
        if skipped:
            assert s1.item() == 3
        return
    f = momentum if momentum is not None else 1 / 5
    torch.testing.assert_close(rm.double(), (1 - f) * rm0.double() + f * mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv.double(), (1 - f) * rv0.double() + f * var, rtol=1e-6, atol=1e-6)
    assert rm.dtype == rdtype and rv.dtype == rdtype
    if nbt:
        assert n1.item() == 5
    if skipped:
        assert s1.item() == 2
    tol = 2e-2 if x.dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True).output, rtol=tol, atol=tol)


@pytest.mark.parametrize("momentum", [0.1, 0.7, None])
def test_float16_running_statistics_round_once_and_skip_only_what_the_buffers_cannot_hold(momentum):
    # A float16 model's buffers: the update is computed in float32 and rounded once (as torch does), so a
    # batch variance above 65504 (finite in float32) still updates them; a step whose result float16 cannot
    # hold changes nothing but num_skipped_updates (inf was written before). Oracle: float64, rounded once.
    from normkit.kernels import triton as nkt

    g = torch.Generator().manual_seed(5)
    mean = (torch.randn(37, generator=g) * 300).to(DEVICE)
    var = (torch.rand(37, generator=g) * 2e4 + 6.6e4).to(DEVICE)  # above float16's 65504
    rm0 = torch.randn(37, generator=g).half()
    rv0 = (torch.rand(37, generator=g) + 0.5).half()
    rm, rv = rm0.clone().to(DEVICE), rv0.clone().to(DEVICE)
    nbt, skip = torch.tensor(9, device=DEVICE), torch.tensor(0, device=DEVICE)
    assert nkt.bn_running_update(mean, var, rm, rv, nbt, skip, momentum, 1.0)
    f = momentum if momentum is not None else 1 / 10
    want_m = ((1 - f) * rm0.double() + f * mean.cpu().double()).half()
    want_v = ((1 - f) * rv0.double() + f * var.cpu().double()).half()
    assert torch.isfinite(want_v).all()
    torch.testing.assert_close(rm.cpu(), want_m, rtol=0, atol=0)
    torch.testing.assert_close(rv.cpu(), want_v, rtol=0, atol=0)
    assert (nbt.item(), skip.item()) == (10, 0)
    # a variance whose update float16 cannot hold: nothing changes, the skip is counted
    huge = var.clone()
    huge[3] = 1e9
    before = (rm.clone(), rv.clone())
    assert nkt.bn_running_update(mean, huge, rm, rv, nbt, skip, momentum, 1.0)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
    assert (nbt.item(), skip.item()) == (10, 1)


def _kernels_module():
    return importlib.import_module("normkit.kernels.triton._kernels")


# --- the current CUDA device: Triton launches there, so the launchers make the tensors' current ----

_ENTRY_POINTS = (
    "forward",
    "backward",
    "proxy_act_forward",
    "proxy_act_backward",
    "proxy_stats",
    "proxy_norm_act",
    "gn_proxy_forward",
    "gn_proxy_backward",
    "group_norm",
    "batch_norm_train",
    "layer_norm",
    "layer_norm_2d",
    "gn_proxy_act",
    "bn_running_update",
    "bn_running_update_from_stats",
)


def test_launchers_run_under_their_tensors_cuda_device(monkeypatch):
    # Triton launches on the current CUDA device: a call on cuda:1 tensors while cuda:0 is current
    # must run under torch.cuda.device(cuda:1), and one on the current device (or the CPU) enter no
    # context at all. Read here with a stand-in for the device guard and the current device's index.
    from normkit.kernels import triton as nkt

    log = []

    class Guard:
        def __init__(self, d):
            self.d = d

        def __enter__(self):
            log.append(("enter", self.d))

        def __exit__(self, *exc):
            log.append(("exit", self.d))

    class T:  # all the guard reads of a tensor
        def __init__(self, dev):
            self.device = torch.device(dev)

    monkeypatch.setattr(torch.cuda, "device", Guard)
    monkeypatch.setattr(nkt, "_current_cuda", lambda: 0)

    def launcher(t, a, k=0):
        log.append(("ran", a, k))
        return a + k

    fn = nkt._on_device(launcher)
    assert fn(T("cuda:1"), 1, k=2) == 3
    one = torch.device("cuda", 1)
    assert log == [("enter", one), ("ran", 1, 2), ("exit", one)]
    log.clear()
    assert fn(T("cuda:0"), 1) == 1 and fn(T("cpu"), 2, k=1) == 3
    assert log == [("ran", 1, 0), ("ran", 2, 1)]  # (the common case: no context)
    assert fn.__name__ == "launcher" and fn._device_guarded
    # an autograd node's backward: the context it launches under
    assert isinstance(nkt._device_of(T("cuda:1")), Guard)
    assert nkt._device_of(T("cuda:0")) is nkt._device_of(T("cpu")) is nkt._SAME_DEVICE
    # every entry point the rest of normkit calls is guarded (through _or's wrapper too)
    for name in _ENTRY_POINTS:
        assert getattr(getattr(nkt, name), "_device_guarded", False), name


@pytest.mark.skipif(
    DEVICE != "cuda" or torch.cuda.device_count() < 2,
    reason="needs two CUDA devices (NORMKIT_TEST_DEVICE=cuda on a machine with at least 2 GPUs)",
)
def test_a_second_gpu_runs_its_own_kernels_while_the_first_is_current():
    # every launcher on cuda:1 tensors with cuda:0 current: the kernels ran on cuda:1 (not cuda:0 with
    # cuda:1's pointers: an illegal memory access), the same values as on cuda:0, and cuda:0 stays current
    from normkit.nn import BatchNorm2d, GroupNormProxyAct2d

    torch.cuda.set_device(0)
    g = torch.Generator().manual_seed(91)
    x = torch.randn(4, 8, 6, 5, generator=g)
    dy = torch.randn(x.shape, generator=g)
    w, b = torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)

    def run(dev, layout):
        xs = x.to(memory_format=torch.channels_last) if layout == "cl" else x
        outs = []
        for name in ("bn", "gn2", "in", "ln2d"):
            xi = xs.to(dev).requires_grad_()
            wi, bi = w.to(dev).requires_grad_(), b.to(dev).requires_grad_()
            with kernels.use("triton"):
                y = OPS[name][0](xi, wi, bi)
                outs += [y, *torch.autograd.grad(y, (xi, wi, bi), dy.to(dev))]
        xi = xs.to(dev).requires_grad_()
        ps = [t.to(dev).requires_grad_() for t in (w, b, b * 0.1, w * 0.1)]
        layer = GroupNormProxyAct2d(8, num_groups=2).to(dev)
        bn = BatchNorm2d(8).to(dev)
        with kernels.use("triton"):
            y = F.proxy_norm_act(xi, *ps, activation="silu")
            outs += [y, *torch.autograd.grad(y, (xi, *ps), dy.to(dev))]
            y = layer(xi)
            outs += [y, *torch.autograd.grad(y, (xi, *layer.parameters()), dy.to(dev))]
            outs += [bn(xs.to(dev)), bn.running_mean, bn.running_var]
        torch.cuda.synchronize(dev)
        return outs

    for layout in ("nchw", "cl"):
        on0 = run("cuda:0", layout)
        on1 = run("cuda:1", layout)
        assert torch.cuda.current_device() == 0
        for a, e in zip(on1, on0):
            assert a.device == torch.device("cuda", 1)
            torch.testing.assert_close(a.cpu(), e.cpu(), rtol=1e-5, atol=1e-6)


# --- sizes past int32: the kernels' index helpers -----------------------------------------------

tl = importlib.import_module("triton.language")
_NK = importlib.import_module("normkit.kernels.triton._kernels")


@triton.jit
def _index_probe(OUT, NC, M, nsets, J, B, E):
    tl.store(OUT, _NK._count(NC, M))
    tl.store(OUT + 1, _NK._srow(5, nsets, True))
    tl.store(OUT + 2, _NK._block_start(J, B, E))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((3, 7, 10, 3, 256, 1000), [21, 50, 768]),  # (the common case: every product fits int32)
        # a set of 2^16 x 2^16 values; 500M sets' sixth statistic row (LayerNorm2d's positions);
        # block 2^25 + 3 of 256 along a walk past 2^31 (Triton passes that size as int64)
        ((2**16, 2**16, 500_000_000, 2**25 + 3, 256, 2**33 + 5), [2**32, 2_500_000_000, (2**25 + 3) * 256]),
    ],
)
def test_kernel_index_helpers_do_not_overflow_int32(args, expected):
    # Triton passes each integer that fits as an int32, so a product of two (a set's NC * M values,
    # the offset of a statistic row 5 * nsets, a block's start j * B) wrapped past 2^31, silently
    # (the interpreter wraps as the GPU does). A set that large, or 429M LayerNorm2d positions, is
    # gigabytes: the helpers every kernel takes those products from are checked here instead (the
    # statistic rows as launched WIDE: test_wide_statistic_rows_give_the_same_norms runs those kernels).
    out = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    _index_probe[(1,)](out, *args)
    assert out.cpu().tolist() == expected


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_wide_statistic_rows_give_the_same_norms(layout, monkeypatch):
    # the kernels' WIDE variants (int64 offsets of the saved statistic rows, launched where six rows
    # of nsets pass 2^31 values) forced on small inputs: the same outputs and gradients as the float64
    # oracle, on each kernel family that takes it (per set, channels-last GroupNorm, LayerNorm2d's
    # blocks and short rows; GroupNorm + Proxy Norm's step fused)
    from normkit.kernels import triton as nkt
    from normkit.nn import GroupNormProxyAct2d

    widened = []
    real = nkt._wide
    monkeypatch.setattr(nkt, "_FORCE_WIDE", True)
    monkeypatch.setattr(nkt, "_wide", lambda n: widened.append(n) or real(n))
    for name in ("gn2", "in", "ln2d", "ln_chw"):
        y, yo, got, exp, _ = _case(name, (2, 6, 5, 4), torch.float32, layout, seed=95)
        _close(y, yo, TOL[torch.float32])
        for a, e in zip(got, exp):
            _close(a, e, GTOL[torch.float32])
    layer = GroupNormProxyAct2d(6, num_groups=2).double()
    x = torch.randn(2, 6, 5, 4, dtype=F64, generator=torch.Generator().manual_seed(96))
    if layout == "cl":
        x = x.to(memory_format=torch.channels_last)
    with kernels.use("reference"):
        xr = x.clone().requires_grad_()
        yr = layer(xr)
        yr.sum().backward()
    lt = copy.deepcopy(layer).to(DEVICE)
    xt = x.to(DEVICE).requires_grad_()
    with kernels.use("triton"):
        yt = lt(xt)
        yt.sum().backward()
    _close(yt.detach().cpu(), yr.detach(), TOL[F64])
    _close(xt.grad.cpu(), xr.grad, GTOL[F64])
    assert len(widened) >= 10, widened
