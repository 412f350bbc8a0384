"""Differential fuzzing of normkit's drop-in layers against ``torch.nn`` (audit F).

Each example draws a layer kind (BatchNorm1d/2d/3d, SyncBatchNorm without a process group,
GroupNorm, LayerNorm, InstanceNorm1d/2d/3d, batched and unbatched) with constructor arguments (odd
and prime channel counts and 1; every divisor of C as the group count; eps 0, tiny, default, large;
momentum None, 0, 1, 0.1, 0.5; affine / bias / track_running_stats on and off), train or eval mode,
an input shape (batch 1..5, 0..3 spatial dims of sizes 1..7, LayerNorm over 1..3 trailing dims, a
zero-size batch or spatial dim), values (N(0, 1), an offset mean, small or large magnitudes, one
constant channel), a dtype (float32, float64; float16 / bfloat16 with a layer in that dtype or in
float32), a memory layout (contiguous, channels_last(_3d), a permuted view, a strided slice
``x[..., ::2]``, an expanded stride-0 view, a storage offset), a grad mode (autograd, ``no_grad``,
``inference_mode``) and a backend (auto, cpu, reference, native).

normkit's layer and torch.nn's, built with the same arguments and the same (random) parameters and
buffers, run two steps on the same inputs with the same upstream gradient; compared: the output,
the input gradient (of the view and of its leaf), the parameter gradients, the running statistics,
``num_batches_tracked`` and ``num_skipped_updates`` after each step, and the layout of the output
and of the input gradient (dense; torch's layout, or the input's when it is dense). The yardstick is
torch's layer on a contiguous copy (torch's own CPU batch_norm backward is wrong for some strided
inputs), in the drawn dtype and in float64: normkit's error against the float64 result must be
within 4x torch's own error, or within the dtype's tolerance of the natural scale (|weight|, and
|dy| |weight| / sigma for the input gradient, times the set's condition max|x| / sigma).

Errors (``test_fuzz_errors_match_torch``): wrong channel counts, ranks and trailing sizes, integer /
bool / complex / mismatched float dtypes, one value per set, numpy inputs. Where torch raises,
normkit must raise a TypeError / ValueError / RuntimeError whose message says what was expected or
what came; where torch succeeds, normkit must succeed.

The deliberate differences of docs/differences.md are allowed for (eps=0 with batch statistics:
compared with torch at eps=1e-30, NaN on a constant set; GroupNorm with one value per group; empty
batches; InstanceNorm's step counter and ``momentum=None``; normkit keeping a dense input's layout).
The audit's findings are pinned by the regression tests at the end (each failed before its fix, or
holds normkit to what docs/differences.md now lists).

Deterministic in CI (``derandomize=True``; 400 layer draws, 300 error draws: about 30 s on 2
cores). For a local hunt:
``NORMKIT_FUZZ_EXAMPLES=3000 NORMKIT_FUZZ_RANDOM=1 pytest tests/functional/test_fuzz_vs_torch.py``.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normkit
import normkit.kernels

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
EXAMPLES = int(os.environ.get("NORMKIT_FUZZ_EXAMPLES", "0") or 0)


def _settings(ci_examples: int) -> settings:
    return settings(
        max_examples=EXAMPLES or ci_examples,
        deadline=None,
        derandomize=not os.environ.get("NORMKIT_FUZZ_RANDOM"),
        database=None,
        suppress_health_check=list(HealthCheck),
    )


FUZZ = _settings(400)  # about 25 s on 2 cores
FUZZ_ERRORS = _settings(300)  # about 3 s

# error of normkit vs torch-in-float64 allowed, relative to the magnitude, beyond torch's own error
TOL = {F64: 1e-9, F32: 2e-5, F16: 4e-3, BF16: 3e-2}
BACKENDS = ["auto", "cpu", "reference", "native"]
KINDS = ["bn1d", "bn2d", "bn3d", "sync", "gn", "ln", "in1d", "in2d", "in3d"]
CHANNELS = [1, 2, 3, 4, 5, 6, 7, 8, 12, 13]
SIZES = [1, 2, 3, 4, 5, 7]
LAYOUTS = ["contiguous", "channels_last", "permuted", "sliced", "expanded", "offset"]


def _tolerated(e: BaseException) -> bool:
    return isinstance(e, (TypeError, ValueError, RuntimeError))


# --- the draw ----------------------------------------------------------------------------------


@dataclass
class Case:
    kind: str
    C: int
    shape: tuple[int, ...]
    eps: float = 1e-5
    momentum: float | None = 0.1
    affine: bool = True
    bias: bool = True
    track: bool = True
    groups: int = 1
    ln_dims: int = 1  # LayerNorm over the trailing ln_dims dims
    train: bool = True
    dtype: torch.dtype = F32
    param_dtype: torch.dtype = F32
    layout: str = "contiguous"
    layout_arg: int = 0  # which dim to slice / expand, which permutation, the offset
    backend: str = "auto"
    values: str = "normal"
    grad_mode: str = "grad"  # or "no_grad", "inference_mode": the forward only
    seed: int = 0

    def __repr__(self) -> str:  # a line to paste into a reproducer
        fields = ", ".join(
            f"{k}={v!r}"
            for k, v in self.__dict__.items()
            if k not in ("kind", "C", "shape") and v != Case.__dataclass_fields__[k].default
        )
        return f"Case(kind={self.kind!r}, C={self.C}, shape={self.shape}, {fields})"


def _ranks(kind: str) -> list[int]:
    return {
        "bn1d": [2, 3],
        "bn2d": [4],
        "bn3d": [5],
        "sync": [2, 3, 4, 5],
        "gn": [2, 3, 4, 5],
        "ln": [1, 2, 3, 4, 5],
        "in1d": [2, 3],  # 2: unbatched (C, L)
        "in2d": [3, 4],
        "in3d": [4, 5],
    }[kind]


def _batched(kind: str, rank: int) -> bool:
    return not (kind.startswith("in") and rank == int(kind[2]) + 1)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    kind = draw(st.sampled_from(KINDS))
    C = draw(st.sampled_from(CHANNELS))
    rank = draw(st.sampled_from(_ranks(kind)))
    N = draw(st.sampled_from([1, 2, 3, 4, 5]))
    if kind == "ln":
        shape = tuple(draw(st.sampled_from([1, 2, 3, 4, 5, 7, 8])) for _ in range(rank))
    elif _batched(kind, rank):
        shape = (N, C, *(draw(st.sampled_from(SIZES)) for _ in range(rank - 2)))
    else:
        shape = (C, *(draw(st.sampled_from(SIZES)) for _ in range(rank - 1)))
    if draw(st.integers(0, 9)) == 0:  # a zero-size dim: the batch or a spatial one
        zdim = draw(st.sampled_from([0] + list(range(2, len(shape)))))
        if (
            kind == "ln"
        ):  # (not in normalized_shape: normkit refuses a size-0 normalized_shape at construction)
            zdim = draw(st.integers(0, max(0, len(shape) - 2)))
        elif not _batched(kind, rank):
            zdim = draw(st.integers(1, len(shape) - 1))
        shape = shape[:zdim] + (0,) + shape[zdim + 1 :]
    first = 0 if kind == "ln" else 2 if _batched(kind, rank) else 1  # (never the channel dim)
    while math.prod(shape) > 1500:  # keep each step small
        i = max(range(first, len(shape)), key=lambda d: shape[d])
        shape = shape[:i] + (shape[i] // 2,) + shape[i + 1 :]
    c = Case(kind=kind, C=C, shape=shape)
    c.eps = draw(st.sampled_from([1e-5, 1e-5, 0.0, 1e-12, 1e-3, 0.5, 10.0]))
    c.momentum = draw(st.sampled_from([0.1, 0.1, None, 0.0, 1.0, 0.5]))
    c.affine = draw(st.booleans()) if not kind.startswith("in") else draw(st.booleans())
    c.bias = draw(st.sampled_from([True, True, False]))
    c.track = draw(st.booleans())
    if kind == "gn":
        c.groups = draw(st.sampled_from([g for g in range(1, C + 1) if C % g == 0]))
    if kind == "ln":
        c.ln_dims = draw(st.integers(1, min(3, len(shape))))
        while 0 in shape[len(shape) - c.ln_dims :]:
            c.ln_dims -= 1
        if c.ln_dims == 0:
            c.ln_dims, shape = 1, shape[:-1] + (max(1, shape[-1]),)
            c.shape = shape
        c.C = shape[-1]
    c.train = draw(st.booleans())
    c.dtype = draw(st.sampled_from([F32, F32, F64, F16, BF16]))
    c.param_dtype = c.dtype if c.dtype in (F32, F64) else draw(st.sampled_from([c.dtype, F32]))
    c.layout = draw(st.sampled_from(LAYOUTS))
    c.layout_arg = draw(st.integers(0, 10_000))
    c.backend = draw(st.sampled_from(BACKENDS))
    c.values = draw(st.sampled_from(VALUES))
    c.grad_mode = draw(st.sampled_from(["grad", "grad", "grad", "no_grad", "inference_mode"]))
    c.seed = draw(st.integers(0, 2**31 - 1))
    return c


# --- building the layers -----------------------------------------------------------------------


def _make(lib: Any, c: Case, eps: float | None = None) -> torch.nn.Module:
    nn = lib.nn
    eps = c.eps if eps is None else eps
    k = c.kind
    if k.startswith("bn") or k == "sync":
        cls = nn.SyncBatchNorm if k == "sync" else getattr(nn, f"BatchNorm{k[2]}d")
        return cls(
            c.C, eps=eps, momentum=c.momentum, affine=c.affine, track_running_stats=c.track, bias=c.bias
        )
    if k.startswith("in"):
        cls = getattr(nn, f"InstanceNorm{k[2]}d")
        return cls(
            c.C, eps=eps, momentum=c.momentum, affine=c.affine, track_running_stats=c.track, bias=c.bias
        )
    if k == "gn":
        return nn.GroupNorm(c.groups, c.C, eps=eps, affine=c.affine, bias=c.bias)
    if k == "ln":
        return nn.LayerNorm(
            c.shape[len(c.shape) - c.ln_dims :], eps=eps, elementwise_affine=c.affine, bias=c.bias
        )
    raise AssertionError(k)


def _init_state(m: torch.nn.Module, c: Case, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Random parameters (weight around 1, some negative; bias around 0) and running statistics."""
    state = {}
    for name, p in m.named_parameters():
        z = torch.randn(p.shape, generator=g, dtype=F64)
        state[name] = (1 + 0.5 * z if name == "weight" else 0.5 * z).to(c.param_dtype)
    for name, b in m.named_buffers():
        if name == "running_mean":
            state[name] = torch.randn(b.shape, generator=g, dtype=F64).to(c.param_dtype)
        elif name == "running_var":
            state[name] = (0.5 + torch.rand(b.shape, generator=g, dtype=F64) * 2).to(c.param_dtype)
        elif name == "num_batches_tracked":
            state[name] = torch.tensor(int(torch.randint(0, 4, (), generator=g)), dtype=torch.long)
    return state


def _load(m: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.nn.Module:
    m.to(dtype)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(state[name])
        for name, b in m.named_buffers():
            if name in state:
                b.copy_(state[name])
    return m


# --- inputs in every layout --------------------------------------------------------------------


def _layout_input(data: torch.Tensor, c: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """(leaf, x): ``x`` holds ``data``'s values (or, for "expanded", ``data`` with one dim
    broadcast) in the drawn layout, a differentiable function of the leaf."""
    data = data.detach().clone()  # (a fresh leaf each call: `contiguous` / `to` may return data itself)
    shape = data.shape
    nd = data.dim()
    a = c.layout_arg
    if c.layout == "channels_last" and nd in (4, 5):
        fmt = torch.channels_last if nd == 4 else torch.channels_last_3d
        leaf = data.contiguous(memory_format=fmt).requires_grad_()
        return leaf, leaf
    if c.layout == "permuted" and nd >= 2:
        perms = [p for p in __import__("itertools").permutations(range(nd)) if list(p) != list(range(nd))]
        p = perms[a % len(perms)]
        inv = [p.index(d) for d in range(nd)]
        leaf = data.permute(p).contiguous().requires_grad_()
        return leaf, leaf.permute(inv)
    if c.layout == "sliced":
        d = a % nd
        big_shape = list(shape)
        big_shape[d] = 2 * shape[d]
        big = torch.zeros(big_shape, dtype=data.dtype)
        idx = [slice(None)] * nd
        idx[d] = slice(None, None, 2)
        big[tuple(idx)] = data
        leaf = big.requires_grad_()
        return leaf, leaf[tuple(idx)]
    if c.layout == "expanded":
        d = a % nd
        small = data.narrow(d, 0, min(1, shape[d])).contiguous()
        leaf = small.requires_grad_()
        return leaf, leaf.expand(shape)
    if c.layout == "offset":
        k = 1 + a % 7
        flat = torch.cat([torch.zeros(k, dtype=data.dtype), data.reshape(-1)])
        leaf = flat.requires_grad_()
        return leaf, leaf[k:].view(shape)
    leaf = data.clone().requires_grad_()
    return leaf, leaf


VALUES = ["normal", "normal", "normal", "offset", "small", "large", "constant_channel"]


def _data(c: Case, g: torch.Generator, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's input values (float64 rounded to the dtype) and upstream gradient.

    ``c.values``: N(0, 1); an offset mean (3 + N(0, 1)); small (1e-2 N(0, 1)) or large (50 N(0, 1))
    values; one channel (or LayerNorm row) constant."""
    x = torch.randn(c.shape, generator=g, dtype=F64)
    if c.values == "offset":
        x = 3 + x
    elif c.values == "small":
        x = 1e-2 * x
    elif c.values == "large":
        x = 50 * x
    elif c.values == "constant_channel" and x.numel():
        if c.kind == "ln":
            x[(0,) * (x.dim() - c.ln_dims)] = 0.75
        elif _batched(c.kind, x.dim()):
            x[:, 0] = 0.75
        else:
            x[0] = 0.75
    if step == 1:
        x = 0.5 + 2 * x  # another batch with other statistics
    dy = torch.randn(c.shape, generator=g, dtype=F64)
    return x.to(c.dtype), dy.to(c.dtype)


# --- running one layer -------------------------------------------------------------------------


@dataclass
class Run:
    error: BaseException | None = None
    ys: list[torch.Tensor] = field(default_factory=list)
    xs: list[torch.Tensor] = field(default_factory=list)  # the inputs (strides of x)
    dxs: list[torch.Tensor] = field(default_factory=list)  # gradient w.r.t. the x view
    dleaf: list[torch.Tensor] = field(default_factory=list)
    dparams: list[dict[str, torch.Tensor]] = field(default_factory=list)
    buffers: list[dict[str, torch.Tensor]] = field(default_factory=list)


def _run(
    m: torch.nn.Module,
    c: Case,
    inputs: list[tuple[torch.Tensor, torch.Tensor]],
    dtype: torch.dtype,
    contiguous: bool = False,
) -> Run:
    """Two steps of ``m`` on the inputs in the drawn layout; ``contiguous``: on a contiguous copy of
    the same values (torch's yardstick: torch's CPU batch_norm backward is wrong for some strided
    inputs, e.g. (1, 2, 2, 1) with strides (4, 1, 2, 1) and a contiguous upstream gradient), the
    gradient then carried back through the layout's view."""
    r = Run()
    m.train(c.train)
    try:
        for data, dy in inputs:
            leaf, x = _layout_input(data.to(dtype), c)
            if x is not leaf:
                x.retain_grad()
            xin = x.detach().contiguous().requires_grad_() if contiguous else x
            m.zero_grad(set_to_none=True)
            mode = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(c.grad_mode)
            with warnings.catch_warnings(), mode() if mode else contextlib.nullcontext():
                warnings.simplefilter("ignore")
                y = m(xin)
            r.ys.append(y.detach())
            r.xs.append(x)
            r.buffers.append({n: b.detach().clone() for n, b in m.named_buffers()})
            if mode is not None:  # the forward only
                r.dxs.append(None)
                r.dleaf.append(None)
                r.dparams.append({n: None for n, _ in m.named_parameters()})
                continue
            y.backward(dy.to(dtype))
            if contiguous:
                (dleaf,) = torch.autograd.grad(x, leaf, xin.grad) if x is not leaf else (xin.grad,)
                r.dxs.append(xin.grad)
                r.dleaf.append(dleaf)
            else:
                r.dxs.append(x.grad)
                r.dleaf.append(leaf.grad)
            r.dparams.append({n: p.grad for n, p in m.named_parameters()})
    except Exception as e:
        r.error = e
    return r


def _run_normkit(m: torch.nn.Module, c: Case, inputs: list) -> Run:
    with normkit.kernels.use(c.backend):
        return _run(m, c, inputs, c.dtype)


# --- comparisons -------------------------------------------------------------------------------


def _maxabs(t: torch.Tensor) -> float:
    return float(t.double().abs().max()) if t.numel() else 0.0


def _close(
    what: str,
    got: torch.Tensor | None,
    want: torch.Tensor | None,
    want64: torch.Tensor | None,
    dtype: torch.dtype,
    c: Case,
    floor: float = 0.0,
) -> None:
    """``got`` (normkit) vs ``want`` (torch, same dtype) vs ``want64`` (torch in float64)."""
    if want is None or got is None:
        assert (got is None) == (want is None), (
            f"{what}: normkit {got is None and 'None'} vs torch {want is None and 'None'}: {c!r}"
        )
        return
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs torch {tuple(want.shape)}: {c!r}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} vs torch {want.dtype}: {c!r}"
    if got.numel() == 0:
        return
    ref = want64.double() if want64 is not None else want.double()
    g, w = got.double(), want.double()
    if math.prod(c.shape) == 0 and not w.isfinite().all():
        # torch's parameter gradients of an empty GroupNorm spatial dim are NaN; normkit's are 0, as
        # docs/differences.md says (zero parameter gradients for an empty batch)
        assert (g == 0).all(), f"{what}: an empty input gives {got}, not zeros: {c!r}"
        return
    finite = ref.isfinite()
    tfinite = finite & w.isfinite()  # (torch's half-precision layers give NaN on some sets normkit handles)
    assert g[tfinite].isfinite().all(), (
        f"{what}: non-finite where torch is finite: {c!r}\n"
        f" normkit={got.flatten()[:12]}\n torch  ={want.flatten()[:12]}"
    )
    if not tfinite.any():
        return
    err = _maxabs(g[tfinite] - ref[tfinite])
    torch_err = _maxabs(w[tfinite] - ref[tfinite])
    scale = max(_maxabs(ref[finite]), floor, 1e-30 if dtype == F64 else 1e-20)
    allowed = max(4 * torch_err, TOL[dtype] * scale)
    assert err <= allowed, (
        f"{what}: max error {err:.3g} vs torch's own {torch_err:.3g} (allowed {allowed:.3g}, scale "
        f"{scale:.3g}): {c!r}\n normkit={got.flatten()[:12]}\n torch  ={want.flatten()[:12]}"
    )


def _order(t: torch.Tensor) -> tuple[int, ...]:
    """The dims of size > 1, slowest first: a layout class."""
    dims = [d for d in range(t.dim()) if t.shape[d] > 1]
    return tuple(sorted(dims, key=lambda d: -t.stride(d)))


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: every element once, no gaps (a permutation of a contiguous tensor)."""
    if t.numel() <= 1:
        return True
    dims = sorted((d for d in range(t.dim()) if t.shape[d] > 1), key=lambda d: t.stride(d))
    expected = 1
    for d in dims:
        if t.stride(d) != expected:
            return False
        expected *= t.shape[d]
    return True


def _check_layout(what: str, got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, c: Case) -> None:
    if got is None or want is None or got.numel() == 0:
        return
    assert _dense(got), (
        f"{what}: normkit's is not dense (strides {got.stride()}, shape {tuple(got.shape)}): {c!r}"
    )
    ok = [_order(want)]
    if _dense(x):
        ok.append(_order(x))
    assert _order(got) in ok, (
        f"{what}: layout {got.stride()} is neither torch's {want.stride()} nor the input's "
        f"{x.stride()}: {c!r}"
    )


def _documented_refusal(c: Case, e: BaseException) -> bool:
    """normkit refuses on purpose (docs/differences.md): GroupNorm with one value per group."""
    if c.kind == "gn" and isinstance(e, ValueError) and "value per group" in str(e):
        n_spatial = math.prod(c.shape[2:]) if len(c.shape) > 2 else 1
        return (c.C // c.groups) * n_spatial == 1
    return False


def _batch_stats(c: Case) -> bool:
    if c.kind.startswith("in"):
        return c.train or not c.track
    if c.kind in ("gn", "ln"):
        return True
    return c.train or not c.track


def _sets(c: Case, x: torch.Tensor) -> torch.Tensor:
    """``x`` (float64, the layer's input) as (sets, values per set) of its batch statistics."""
    if c.kind == "ln":
        return x.reshape(-1, math.prod(x.shape[x.dim() - c.ln_dims :]))
    if c.kind.startswith("in"):
        if not _batched(c.kind, x.dim()):
            x = x.unsqueeze(0)
        return x.reshape(x.shape[0] * x.shape[1], -1)
    if c.kind == "gn":
        return x.reshape(x.shape[0] * c.groups, -1)
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def _condition(c: Case, x: torch.Tensor, state: dict[str, torch.Tensor], eps: float) -> float:
    """max |x| / sigma over the sets: how much of the input's last bit reaches the normalized value."""
    if x.numel() == 0 or not _batch_stats(c):
        return 1.0
    sets = _sets(c, x.double())
    if sets.shape[1] < 2:
        return 1.0
    sigma = (sets.var(1, unbiased=False) + eps).sqrt()
    return float((sets.abs().amax(1) / sigma.clamp_min(1e-300)).max())


def _grad_floor(
    c: Case, x: torch.Tensor, dy: torch.Tensor, state: dict[str, torch.Tensor], eps: float
) -> float:
    """The natural size of the input gradient, |dy| |weight| / sigma: its rounding noise is relative to
    this, not to its own (cancelling) magnitude."""
    if x.numel() == 0:
        return 0.0
    if _batch_stats(c):
        sets = _sets(c, x.double())
        var = sets.var(1, unbiased=False).min() if sets.shape[1] > 1 else torch.tensor(0.0, dtype=F64)
    else:
        var = state["running_var"].double().min()
    w = _maxabs(state["weight"]) if "weight" in state else 1.0
    return _maxabs(dy) * max(w, 1e-3) / math.sqrt(float(var) + eps + 1e-300)


def check_case(c: Case) -> None:
    g = torch.Generator().manual_seed(c.seed)
    inputs = [_data(c, g, 0), _data(c, g, 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            theirs = _make(torch, c)
            torch_ctor_error = None
        except Exception as e:
            theirs, torch_ctor_error = None, e
        try:
            ours = _make(normkit, c)
            ours_ctor_error = None
        except Exception as e:
            ours, ours_ctor_error = None, e
    if torch_ctor_error is not None or ours_ctor_error is not None:
        assert torch_ctor_error is not None and ours_ctor_error is not None, (
            f"constructor: torch {torch_ctor_error!r} vs normkit {ours_ctor_error!r}: {c!r}"
        )
        assert _tolerated(ours_ctor_error), f"constructor: normkit raised {ours_ctor_error!r}: {c!r}"
        return
    state = _init_state(theirs, c, g)
    _load(theirs, state, c.param_dtype)
    _load(ours, state, c.param_dtype)
    want = _run(theirs, c, inputs, c.dtype)  # in the drawn layout: errors and the output's layout
    eps_zero_doc = (
        want.error is not None
        and c.eps == 0
        and isinstance(want.error, ValueError)
        and "eps must be positive" in str(want.error)
    )
    if eps_zero_doc:
        # documented: normkit computes eps=0 with batch statistics; compare with torch at eps=1e-30
        theirs = _load(_make(torch, c, eps=1e-30), state, c.param_dtype)
        want = _run(theirs, c, inputs, c.dtype)
    got = _run_normkit(ours, c, inputs)
    want_layout = want
    if (
        want.error is not None
        and got.error is None
        and math.prod(c.shape) == 0
        and ("spatial element" in str(want.error) or isinstance(want.error, IndexError))
    ):
        # torch refuses an empty InstanceNorm batch of one spatial position, normkit normalizes the
        # empty batch (docs/differences.md: InstanceNorm takes empty batches); reported, not a defect.
        # torch's eval InstanceNorm with running statistics fails on an empty batch with an IndexError
        # (its own bug, see normkit.nn.instance_norm)
        return
    if want.error is not None:
        assert got.error is not None, f"torch raised {want.error!r}, normkit did not: {c!r}"
        assert _tolerated(got.error), f"torch raised {want.error!r}, normkit {got.error!r}: {c!r}"
        assert str(got.error), f"normkit's error has no message: {got.error!r}: {c!r}"
        return
    if got.error is not None:
        if _documented_refusal(c, got.error):
            return
        raise AssertionError(f"torch succeeded, normkit raised {got.error!r}: {c!r}") from got.error
    # torch on a contiguous copy, in the dtype and in float64 (the yardstick of rounding error)
    teps = 1e-30 if eps_zero_doc else None
    want = _run(_load(_make(torch, c, eps=teps), state, c.param_dtype), c, inputs, c.dtype, contiguous=True)
    assert want.error is None, f"torch on a contiguous copy failed: {want.error!r}"
    ref_m = _load(_make(torch, c, eps=teps), state, F64)
    ref = _run(
        ref_m, c, [(a.to(c.dtype).double(), b.to(c.dtype).double()) for a, b in inputs], F64, contiguous=True
    )
    assert ref.error is None, f"torch float64 failed: {ref.error!r}"
    for step in range(2):
        s = f"step {step}"
        x64, dy64 = inputs[step][0].double(), inputs[step][1].double()
        if c.layout == "expanded":
            x64 = _layout_input(x64, c)[1].detach()
        constant_set = x64.numel() > 0 and bool((_sets(c, x64).var(1, unbiased=False) == 0).any())
        if not (c.eps == 0 and constant_set):  # documented: eps=0 on a constant set gives NaN (0 / 0)
            _compare_step(c, s, step, got, want, ref, state, inputs, x64, dy64)
        _check_layout(f"{s} output", got.ys[step], want_layout.ys[step], got.xs[step], c)
        _check_layout(f"{s} input grad", got.dxs[step], want_layout.dxs[step], got.xs[step], c)
        gb, wb, rb = got.buffers[step], want.buffers[step], ref.buffers[step]
        _compare_buffers(c, s, step, gb, wb, rb, state)


def _compare_step(
    c: Case,
    s: str,
    step: int,
    got: Run,
    want: Run,
    ref: Run,
    state: dict[str, torch.Tensor],
    inputs: list,
    x64: torch.Tensor,
    dy64: torch.Tensor,
) -> None:
    """Output, input gradient (of the view and of its leaf) and parameter gradients of one step."""
    dt, pdt = c.dtype, c.param_dtype
    w = max(1.0, _maxabs(state.get("weight", torch.ones(1))))
    # normalized values are O(|weight|); their rounding error grows with max|x| / sigma
    yscale = w * max(1.0, _condition(c, x64, state, c.eps))
    _close(f"{s} output", got.ys[step], want.ys[step], ref.ys[step], dt, c, floor=yscale)
    # (and its rounding error, relative to |dy| |weight| / sigma, grows with max|x| / sigma too)
    floor = _grad_floor(c, x64, dy64, state, c.eps) * max(1.0, _condition(c, x64, state, c.eps) / 10)
    _close(f"{s} input grad", got.dxs[step], want.dxs[step], ref.dxs[step], dt, c, floor=floor)
    _close(f"{s} leaf grad", got.dleaf[step], want.dleaf[step], ref.dleaf[step], dt, c, floor=floor)
    gscale = _maxabs(inputs[step][1]) * w * max(1.0, _condition(c, x64, state, c.eps) / 10)
    for name in want.dparams[step]:
        _close(
            f"{s} {name}.grad",
            got.dparams[step][name],
            want.dparams[step][name],
            ref.dparams[step][name],
            pdt,
            c,
            floor=gscale,
        )


def _compare_buffers(c: Case, s: str, step: int, gb: dict, wb: dict, rb: dict, state: dict) -> None:
    """Running statistics, num_batches_tracked and num_skipped_updates after one step."""
    pdt = c.param_dtype
    empty = math.prod(c.shape) == 0
    is_in = c.kind.startswith("in")
    bn = c.kind.startswith("bn") or c.kind == "sync"
    nbt0 = int(state.get("num_batches_tracked", torch.tensor(0)))
    if empty and (bn or (is_in and c.track)) and c.train:
        # documented: an empty batch leaves every buffer as it was (InstanceNorm counts steps as BN does)
        for name, b in gb.items():
            if name in state:
                assert torch.equal(b, state[name].to(b.dtype)), f"{s} {name} changed on an empty batch: {c!r}"
        return
    if "running_mean" in wb:
        if not (is_in and c.momentum is None):  # documented: normkit's InstanceNorm averages cumulatively
            _close(f"{s} running_mean", gb["running_mean"], wb["running_mean"], rb["running_mean"], pdt, c)
            _close(f"{s} running_var", gb["running_var"], wb["running_var"], rb["running_var"], pdt, c)
        if is_in:  # documented: normkit counts InstanceNorm's training steps
            want_nbt = nbt0 + (step + 1 if c.train else 0)
        else:
            want_nbt = int(wb["num_batches_tracked"])
        got_nbt = int(gb["num_batches_tracked"])
        assert got_nbt == want_nbt, f"{s} num_batches_tracked {got_nbt} vs {want_nbt}: {c!r}"
    skipped = gb.get("num_skipped_updates")
    assert skipped is None or int(skipped) == 0, (
        f"{s} num_skipped_updates={int(skipped)} on finite input: {c!r}"
    )


@settings(FUZZ)
@given(cases())
def test_fuzz_layers_match_torch(c: Case) -> None:
    check_case(c)


# --- error cases ---------------------------------------------------------------------------------

MUTATIONS = [
    "channels",  # C + 1 or C - 1 channels
    "rank_low",  # one dim fewer than the layer takes (LayerNorm: fewer dims than normalized_shape)
    "rank_high",  # one dim more (BatchNorm1d/2d/3d, InstanceNorm: out of range)
    "trailing",  # LayerNorm: a trailing size that differs from normalized_shape
    "int",
    "bool",
    "complex",
    "float64_into_float32",
    "float32_into_float64",
    "one_value",  # BN training on one value per channel / IN on one spatial position / GN one per group
    "numpy",
]


@st.composite
def error_cases(draw: st.DrawFn) -> tuple[Case, str]:
    c = draw(cases())
    c.layout, c.dtype, c.param_dtype, c.eps = "contiguous", F32, F32, draw(st.sampled_from([1e-5, 0.1]))
    c.shape = tuple(max(1, s) for s in c.shape)  # (no empty dims: an empty batch hides most checks)
    return c, draw(st.sampled_from(MUTATIONS))


def _mutated_input(c: Case, mutation: str, g: torch.Generator) -> Any:
    shape = list(c.shape)
    cdim = 0 if c.kind.startswith("in") and not _batched(c.kind, len(shape)) else 1
    if c.kind == "ln":
        cdim = len(shape) - 1
    dtype = F32
    if mutation == "channels":
        shape[cdim] = shape[cdim] + 1 if shape[cdim] == 1 or c.seed % 2 else shape[cdim] - 1
    elif mutation == "rank_low":
        shape = shape[1:] if len(shape) > 1 else []
    elif mutation == "rank_high":
        shape = shape + [3]
    elif mutation == "trailing":
        shape[-1] += 1
    elif mutation == "one_value":
        if c.kind == "ln":
            shape = shape[: len(shape) - c.ln_dims] + [1] * c.ln_dims
        elif c.kind.startswith("in"):
            shape = shape[: cdim + 1] + [1] * (len(shape) - cdim - 1)
        else:
            shape = [1, shape[1]] + [1] * (len(shape) - 2)
    x = torch.randn(shape, generator=g, dtype=F64)
    if mutation == "int":
        return (10 * x).to(torch.int64)
    if mutation == "bool":
        return x > 0
    if mutation == "complex":
        return x.to(torch.complex64)
    if mutation == "float64_into_float32":
        dtype = F64
    if mutation == "numpy":
        return x.to(F32).numpy()
    return x.to(dtype)


def _error_documented(
    c: Case, mutation: str, ours: BaseException | None, theirs: BaseException | None
) -> bool:
    """Error differences that docs/differences.md lists."""
    if ours is not None and theirs is None:
        if _documented_refusal(c, ours):  # GroupNorm with one value per group
            return True
        if "channels" in str(ours) and (
            (c.kind == "gn" and not c.affine)
            or (c.kind in ("bn1d", "bn2d", "bn3d", "sync") and not c.affine and not c.track)
        ):
            return True  # F6 (test_the_channel_count_is_checked_without_affine_or_stats too)
        if c.kind.startswith("in") and c.track and not c.affine and mutation.startswith("float"):
            return True  # F10 (test_instance_norm_float64_input_with_float32_buffers_is_a_type_error)
    return False


def check_error_case(c: Case, mutation: str) -> None:
    g = torch.Generator().manual_seed(c.seed)
    x = _mutated_input(c, mutation, g)
    outcome: dict[str, BaseException | None] = {}
    for lib in (torch, normkit):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                m = _make(lib, c)
                if mutation == "float32_into_float64":
                    m.double()
                m.train(c.train)
                with normkit.kernels.use(c.backend):
                    m(x)
                outcome[lib.__name__] = None
            except Exception as e:
                outcome[lib.__name__] = e
    theirs, ours = outcome["torch"], outcome["normkit"]
    if _error_documented(c, mutation, ours, theirs):
        return
    if theirs is None:
        assert ours is None, f"{mutation}: torch succeeded, normkit raised {ours!r}: {c!r}"
        return
    assert ours is not None, f"{mutation}: torch raised {theirs!r}, normkit did not: {c!r}"
    assert _tolerated(ours), f"{mutation}: normkit raised {ours!r} (torch {theirs!r}): {c!r}"
    msg = str(ours).lower()
    assert any(w in msg for w in ("expected", "got", "must", "match")), (
        f"{mutation}: normkit's message does not say what was expected and what came: {ours!r}: {c!r}"
    )


@settings(FUZZ_ERRORS)
@given(error_cases())
def test_fuzz_errors_match_torch(case: tuple[Case, str]) -> None:
    check_error_case(*case)


# --- regressions: the audit's findings ----------------------------------------------------------------


@pytest.mark.parametrize("momentum", [1.0, None])
def test_running_var_of_a_small_variance_batch_with_factor_one(momentum: float | None) -> None:
    x = 1e-3 * torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    theirs = torch.nn.BatchNorm1d(3, momentum=momentum)
    theirs(x)
    ours = normkit.nn.BatchNorm1d(3, momentum=momentum)
    ours(x)  # default backend: the fused CPU kernels
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-5, atol=0)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_native_half_batch_norm_gradients_and_running_var(dtype: torch.dtype) -> None:
    x = torch.tensor([[0.3, 1.2, -0.7, 2.0]], dtype=F64)
    x = torch.cat([x, x + torch.tensor([[1e-2, 3e-2, 2e-3, 0.5]], dtype=F64)]).to(dtype)  # 2 values a channel
    dy = torch.randn(2, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
    theirs = torch.nn.BatchNorm1d(4, affine=False)  # float32 buffers, a half input (the mixed path)
    tx = x.clone().requires_grad_()
    theirs(tx).backward(dy)
    ours = normkit.nn.BatchNorm1d(4, affine=False)
    nx = x.clone().requires_grad_()
    with normkit.kernels.use("native"):
        ours(nx).backward(dy)
    tol = {F16: 2e-3, BF16: 2e-2}[dtype]
    scale = float(tx.grad.double().abs().max())
    assert float((nx.grad.double() - tx.grad.double()).abs().max()) <= tol * scale
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-3, atol=1e-7)


def test_native_eps_zero_constant_channel_updates_the_running_stats() -> None:
    x = torch.tensor([[0.7, 0.3], [0.7, 0.9]])  # channel 0 constant
    ours = normkit.nn.BatchNorm1d(2, eps=0.0)
    with normkit.kernels.use("native"):
        y = ours(x)
    theirs = torch.nn.BatchNorm1d(2, eps=1e-30)
    theirs(x)
    assert int(ours.num_skipped_updates) == 0 and int(ours.num_batches_tracked) == 1
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    with normkit.kernels.use("reference"):
        ref = normkit.nn.BatchNorm1d(2, eps=0.0)(x)
    torch.testing.assert_close(y, ref, equal_nan=True)  # the documented NaN on the constant channel


@pytest.mark.parametrize("kind", ["bn", "in"])
def test_native_running_var_when_eps_dominates(kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    if kind == "bn":
        x = 1e-3 * torch.randn(64, 3, generator=g)
        make = lambda nn: nn.BatchNorm1d(3, eps=0.1, momentum=0.5)  # noqa: E731
    else:
        x = 1e-3 * torch.randn(4, 3, 16, generator=g)
        make = lambda nn: nn.InstanceNorm1d(3, eps=0.1, momentum=0.5, track_running_stats=True)  # noqa: E731
    theirs, ours = make(torch.nn), make(normkit.nn)
    with torch.no_grad():
        theirs.running_var.fill_(1e-6)
        ours.running_var.fill_(1e-6)
    theirs(x)
    with normkit.kernels.use("native"):
        ours(x)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-4, atol=0)


def test_instance_norm_eps_zero_constant_instance_is_nan_where_torch_gives_0() -> None:
    """docs/differences.md: with eps=0 a constant set is 0 / 0, NaN (torch.nn's InstanceNorm returns 0:
    ATen's rstd is 0 there); the other instance is normalized as torch's."""
    x = torch.tensor([[[0.7, 0.7, 0.7], [0.1, 0.2, 0.4]]])
    want = torch.nn.InstanceNorm1d(2, eps=0.0)(x)
    got = normkit.nn.InstanceNorm1d(2, eps=0.0)(x)
    assert bool(want[0, 0].eq(0).all()) and bool(got[0, 0].isnan().all())
    torch.testing.assert_close(got[0, 1], want[0, 1])


@pytest.mark.parametrize(
    "make",
    [
        lambda nn: nn.BatchNorm2d(3, affine=False, track_running_stats=False),
        lambda nn: nn.SyncBatchNorm(3, affine=False, track_running_stats=False),
        lambda nn: nn.GroupNorm(1, 3, affine=False),
    ],
    ids=["BatchNorm2d", "SyncBatchNorm", "GroupNorm"],
)
def test_the_channel_count_is_checked_without_affine_or_stats(make: Any) -> None:
    """docs/differences.md: torch.nn normalizes an input of any channel count where the layer has neither
    affine nor running statistics; normkit holds it to ``num_features`` there too (a NormError naming
    both counts)."""
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    make(torch.nn)(x)
    with pytest.raises(normkit.NormError, match="4"):
        make(normkit.nn)(x)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("canonical", [False, True], ids=["permuted-image", "channels_last"])
def test_eval_batch_norm_input_grad_of_a_single_permuted_image(backend: str, canonical: bool) -> None:
    """One HWC image made NCHW (strides (3, 1, 6, 3): channels-last but for the size-1 batch's stride),
    which ATen's CPU backward misreads (off by up to 2.4; torch.nn too), and the same image in a fresh
    channels-last tensor (strides (12, 1, 6, 3), read right, ATen's op kept; ``.contiguous`` would keep
    the odd stride, which ``is_contiguous`` ignores on a size-1 dim): the input gradient is
    ``dy / sqrt(running_var + eps)`` for both."""
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 2, 3, generator=g, dtype=F64)  # H, W, C
    dy = torch.randn(1, 3, 2, 2, generator=g, dtype=F64)
    leaf = img.clone().requires_grad_()
    x = leaf.permute(2, 0, 1).unsqueeze(0)
    if canonical:
        x = torch.empty((1, 3, 2, 2), dtype=F64, memory_format=torch.channels_last).copy_(x)
        assert x.stride() == (12, 1, 6, 3)
    x.retain_grad()
    bn = normkit.nn.BatchNorm2d(3).double().eval()
    with normkit.kernels.use(backend):
        bn(x).backward(dy)
    torch.testing.assert_close(x.grad, dy / math.sqrt(1 + 1e-5))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_group_norm_of_an_expanded_input_is_contiguous(backend: str) -> None:
    x = torch.randn(5, 4, 1, generator=torch.Generator().manual_seed(0)).expand(5, 4, 7)
    with normkit.kernels.use(backend):
        y = normkit.nn.GroupNorm(2, 4)(x)
    assert y.is_contiguous(), y.stride()


def test_sync_batch_norm_takes_any_rank_from_2() -> None:
    x = torch.randn(2, 3, 2, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    theirs, ours = torch.nn.SyncBatchNorm(3), normkit.nn.SyncBatchNorm(3)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_var, theirs.running_var)


@pytest.mark.parametrize("train", [True, False])
def test_instance_norm_float64_input_with_float32_buffers_is_a_type_error(train: bool) -> None:
    """docs/differences.md: a float64 input into a float32 layer is a TypeError naming both dtypes, also
    where the layer has only running statistics (torch.nn computes that one)."""
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.nn.InstanceNorm1d(3, track_running_stats=True).train(train)(x)
    ours = normkit.nn.InstanceNorm1d(3, track_running_stats=True).train(train)
    with pytest.raises(TypeError, match="float64"):
        ours(x)
    assert int(ours.num_batches_tracked) == 0
