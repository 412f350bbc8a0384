"""The one numerical core: per-set statistics, normalize-from-statistics, and its backward.

Every norm in normkit (BN, LN, IN, GN, LayerNorm2d, Ghost BN, Batch Renorm, the norm under Proxy
Norm ...) is this computation over a different set of dims:

    mean = mean_S(x),  var = mean_S((x - mean)^2)  (biased),  rstd = 1 / sqrt(var + eps)
    y    = (x - mean) * rstd * weight + bias

A boolean ``mask`` (True = valid) only changes which elements each set pools over; masked and
unmasked inputs run the same code.

Numerics (no host sync on accelerators, no data-dependent control flow where anything traces or
transforms the call; the one data-dependent check is described below):

* Statistics accumulate in float32 for float16/bfloat16/float32 inputs and in float64 for float64.
* Each set is *shifted*, and where needed *scaled*: ``d = (x - shift) * 2^-e``. Subtracting a
  shift that lies inside the data is exact for values close to it (Sterbenz), so a large common
  offset costs nothing: fp32 ``1e4 + 1e-2 * noise`` normalizes to 2.5e-7, where a plain fp32
  two-pass (torch's GN) is off by 0.07.
* The variance is two-pass on ``d`` (mean of ``d``, then mean of ``(d - mean)^2``), never
  ``E[x^2] - E[x]^2``.
* Two paths, one result (:func:`norm_forward`). The *scaled* path shifts by the set's mid-range
  ``(max + min) / 2`` and scales by a power of two ``2^e`` just above the half-range (never below
  ``max|x| * 2^-100``): scaling by a power of two is exact and ``|d| <= 1``, so no square or sum
  can overflow or underflow, and inputs up to the fp32 maximum (``[3e38, -3e38, 1, 2]``) and down
  to subnormals (1e-40, even with ``eps = 0``) give finite, exact outputs. It has no
  data-dependent control flow, and costs two read-only reductions (per-set max and min) more.
  The *unscaled* path shifts by one element of each set and does not scale: a plain two-pass.
  Plain eager CPU calls try it first and check, on the per-set results, that no set needed the
  scale (a finite variance, at least ``2^-100`` unless ``eps`` dominates it); only a failing check
  reruns the call on the scaled path (the check a fused kernel would make). Under ``torch.func``,
  Dynamo, tracing, fake tensors, on accelerators and with a mask, the scaled path runs directly.
* For compilers, :func:`norm_forward_fused` computes the same statistics from reads that each
  depend on ``x`` alone (the moments of ``x - x0``, and of ``(x - x0) * 2^-96`` for the sets
  whose squares overflow), so Inductor reads ``x`` once for them, as for torch's own norms; on
  GPUs, bfloat16 / float16 inputs take two passes of sums instead of Welford's divisions
  (:func:`two_pass_moments`).
* The variance itself is returned in the accumulation dtype and is ``inf`` only when the true
  variance exceeds it (fp32: ``|x|`` above about 1.8e19); ``rstd`` stays exact.

Range covered: float32 and float16/bfloat16 inputs, every finite value (outputs finite whenever
the input is finite); float64 likewise up to 1.8e308. A non-finite input propagates NaN into its
own sets, and callers keep such statistics out of running buffers.

The saved statistics (``stats``) are one tensor of ``STAT_ROWS`` rows, each with the keepdim
shape of the sets: the scaled shift, the inverse scale ``2^-e``, the mean of ``d``, the scaled
``rstd``, the scaled variance and the count. :func:`mean_var` turns them into the true mean and
(biased) variance. Functions here are plain PyTorch (the reference, and the oracle for the kernels
of later backends); :mod:`normkit.ops.library` registers them as ``torch.library`` ops.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.utils._python_dispatch  # the attribute below is a submodule: import it explicitly
from torch import Tensor

from .._errors import NormError

__all__ = [
    "STAT_ROWS",
    "Moments",
    "acc_dtype",
    "composite_norm",
    "mean_var",
    "moments",
    "norm_backward",
    "norm_backward_composite",
    "norm_forward",
    "norm_forward_fused",
    "norm_jvp",
    "stat_shape",
    "two_pass_moments",
]

STAT_ROWS = 6
_SHIFT, _INV, _CMEAN, _RSTD, _VAR, _COUNT = range(STAT_ROWS)

# Exponent range for the power-of-two scale: 2^e and 2^-e are both normal numbers.
_EXP_RANGE = {torch.float32: 126.0, torch.float64: 1022.0}
# The scale is never below max|x| * 2^-100: a constant (or nearly constant) set of large values
# then scales to at most 2^100, far from overflow, and its centred values are still exact zeros.
_GUARD = 2.0**-100


class Moments(NamedTuple):
    """``(count, mean, var)`` of each reduction set, keepdim shapes, in the accumulation dtype.

    ``var`` is the biased variance. ``count`` is the number of (valid) elements per set, as a
    float tensor.
    """

    count: Tensor
    mean: Tensor
    var: Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated in: float64 for float64, float32 otherwise.

    Example:
        >>> acc_dtype(torch.float16), acc_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def stat_shape(x: Tensor, dims: Sequence[int]) -> list[int]:
    """The keepdim shape of the per-set statistics of ``x`` reduced over ``dims``."""
    return [1 if i in dims else s for i, s in enumerate(x.shape)]


def compiling() -> bool:
    """Whether torch.compile (or torch.export) is tracing, also where normkit's Python runs as plain
    Python inside a trace: a fake implementation Dynamo calls, a backward AOTAutograd traces.

    ``torch.compiler.is_compiling()`` alone says so there only from torch 2.12 (which sets its flag
    for a whole compile); torch <= 2.11 sets it for torch.export only, so Dynamo's tracing context
    is asked too. Under Dynamo's own bytecode tracing the first call answers.

    Example:
        >>> compiling()
        False
    """
    if torch.compiler.is_compiling():
        return True
    from torch._guards import TracingContext

    return TracingContext.try_get() is not None


def _functorch_active() -> bool:
    # Under torch.func transforms some tensors are batched and others not: in-place arithmetic
    # between them is not allowed, so the backward then builds fresh tensors.
    return torch._C._are_functorch_transforms_active()


def _tracing() -> bool:
    """Traced rather than run: Dynamo (first: it must not look at the rest), or a Python dispatch
    mode (fake tensors; ``make_fx`` tracing this code into a graph: Inductor's decomposition of the
    ops, :mod:`normkit.ops._inductor`)."""
    return (
        torch.compiler.is_compiling() or torch.utils._python_dispatch._get_current_dispatch_mode() is not None
    )


def _inplace_ok(*ts: Tensor | None) -> bool:
    """Whether the computation may reuse its own temporaries in place: not under ``torch.func``
    (above), nor while traced (a traced graph must be functional for the compiler), nor where
    autograd records the ops on any of ``ts`` (a direct call of this core on a tensor that requires
    grad, ``normkit.functional.moments`` or a user's own norm: autograd may have saved a temporary;
    the ops' own implementations run with grad mode off)."""
    if _tracing() or _functorch_active():
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts))


def _stages(t: Tensor, dims: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Split a reduction whose sets interleave with kept dims in memory into two stages, or ``None``.

    TensorIterator reduces a set that is split around a kept dim, with a short innermost run
    (GroupNorm's sets on a channels-last view: the group's channels innermost, the spatial
    positions outermost; BatchNorm on NCHW with a small feature map) up to 20x slower
    than the same work in two stages (measured 2026-12: 32 ms vs 1.7 ms for (32, 64, 56, 56)): first
    over the reduced dims outside the innermost kept dim, then over those inside it.
    """
    if len(dims) < 2 or _tracing():  # (a trace: the compiler schedules its own reductions)
        return None
    key = (t.shape, t.stride(), dims)
    if key not in _STAGES:
        if len(_STAGES) > 4096:
            _STAGES.clear()
        _STAGES[key] = _find_stages(t, dims)
    return _STAGES[key]


_STAGES: dict[tuple[object, ...], tuple[tuple[int, ...], tuple[int, ...]] | None] = {}


def _find_stages(t: Tensor, dims: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    strides = t.stride()
    kept = [i for i in range(t.dim()) if i not in dims and t.shape[i] > 1]
    if not kept:
        return None
    min_kept = min(strides[i] for i in kept)
    inner = tuple(d for d in dims if strides[d] < min_kept and t.shape[d] > 1)
    outer = tuple(d for d in dims if d not in inner and t.shape[d] > 1)
    if not inner or not outer:
        return None
    run = 1
    for d in inner:
        run *= t.shape[d]
    if run >= _LONG_RUN:  # long contiguous runs (BatchNorm on NCHW): TensorIterator is fine, staging costs
        return None
    return outer, inner


# Staging pays while the innermost reduced run is short (measured 2026-12: 2x at 49 elements, even at
# 196, 2x slower at 3136).
_LONG_RUN = 192


def _reduce(t: Tensor, dims: tuple[int, ...], op: str) -> Tensor:
    """``t.<op>(dims, keepdim=True)`` for op in sum / mean / amax / amin, in two stages where faster."""
    stages = _stages(t, dims)
    if stages is None:
        return getattr(t, op)(dims, keepdim=True)
    outer, inner = stages
    return getattr(getattr(t, op)(outer, keepdim=True), op)(inner, keepdim=True)


def _scale_shift(
    x: Tensor, dims: tuple[int, ...], mask: Tensor | None, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Per-set ``(shift, inv)``: the mid-range shift and the power-of-two inverse scale ``2^-e``."""
    if mask is None:
        hi = _reduce(x, dims, "amax").to(dtype)
        lo = _reduce(x, dims, "amin").to(dtype)
    else:
        inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
        hi = torch.where(mask, x, -inf).amax(dims, keepdim=True).to(dtype)
        lo = torch.where(mask, x, inf).amin(dims, keepdim=True).to(dtype)
        # A set with no valid element: any finite scale does.
        empty = hi < lo
        hi = torch.where(empty, 0.0, hi)
        lo = torch.where(empty, 0.0, lo)
    half_range = hi * 0.5 - lo * 0.5  # (hi - lo) / 2 without overflow
    mid = hi * 0.5 + lo * 0.5  # |x - mid| <= half_range: the centring cannot overflow
    est = torch.maximum(half_range, torch.maximum(hi.abs(), lo.abs()) * _GUARD)
    bound = _EXP_RANGE[dtype]
    # est < 2^e; log2 of 0 is -inf, clamped to the smallest exponent.
    e = (torch.floor(torch.log2(est)) + 1.0).clamp(-bound, bound)
    return mid, torch.exp2(-e)  # exact for integral exponents in range


def _sample(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """One element of each set (index 0 along every reduced dim), keepdim shape: the fast path's shift."""
    k = x
    for d in dims:
        k = k.narrow(d, 0, 1)
    return k


def _centered(x: Tensor, shift: Tensor, inv: Tensor | None) -> Tensor:
    """``(x - shift) * inv`` in the statistics dtype: a fresh tensor in x's layout (``inv=None``: 1)."""
    d = torch.sub(x, shift)  # type promotion: a float16 / bfloat16 x gives a float32 result in one pass
    if inv is None:
        return d
    return d.mul_(inv) if _inplace_ok(d) else d * inv


def _count(x: Tensor, dims: tuple[int, ...], mask: Tensor | None, like: Tensor) -> Tensor:
    if mask is None:
        m = 1
        for d in dims:
            m *= x.shape[d]
        if not isinstance(m, int):  # a symbolic size (torch.compile(dynamic=True)): no guard on it
            return torch.ones_like(like) * m
        return torch.full_like(like, float(m))
    return mask.expand(x.shape).sum(dims, keepdim=True, dtype=like.dtype)


def _scaled_rstd(var: Tensor, inv: Tensor, eps: float) -> Tensor:
    """rstd of the scaled values, ``1 / sqrt(var_s + eps * inv^2)``, which is ``2^e / sqrt(var + eps)``.

    ``eps * inv^2`` overflows for sets of tiny values (scale below ~1e-22); there ``eps`` dominates
    the variance by over 40 orders of magnitude, so the true rstd is ``1 / sqrt(eps)`` and the
    scaled one ``2^e / sqrt(eps)``.
    """
    if not eps:
        return torch.rsqrt(var)
    t = eps * inv * inv
    return torch.where(torch.isinf(t), inv.reciprocal() * (1.0 / eps**0.5), torch.rsqrt(var + t))


# The unscaled fast path is exact while every set's variance is finite and, unless eps dominates it
# by 2^40, at least 2^-100 (float32; 2^-900 for float64): squares of smaller deviations lose bits.
_TINY_VAR = {torch.float32: 2.0**-100, torch.float64: 2.0**-900}


def _fast_path_allowed(x: Tensor, mask: Tensor | None) -> bool:
    """Whether :func:`norm_forward` may try the unscaled path and check it (a CPU tensor in plain eager)."""
    return (
        not _tracing()  # first: Dynamo must not look at the rest
        and mask is None
        and type(x) is Tensor
        and x.device.type == "cpu"
        and not _functorch_active()
    )


def _centred_moments(
    x: Tensor, shift: Tensor, inv: Tensor | None, dims: tuple[int, ...], mask: Tensor | None, count: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(d, cmean, var)``: ``d = (x - shift) * inv - cmean`` (zero where masked out), two-pass."""
    d = _centered(x, shift, inv)
    if mask is None:
        cmean = _reduce(d, dims, "mean")
        d = d.sub_(cmean) if _inplace_ok(d) else d - cmean
        return d, cmean, _reduce(d * d, dims, "mean")
    zero = torch.zeros((), dtype=d.dtype, device=x.device)
    safe = count.clamp_min(1.0)
    cmean = torch.where(mask, d, zero).sum(dims, keepdim=True) / safe
    d = torch.where(mask, d - cmean, zero)
    return d, cmean, (d * d).sum(dims, keepdim=True) / safe


def norm_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    dims: Sequence[int],
    eps: float,
) -> tuple[Tensor, Tensor]:
    """``(y, stats)``: the normalized output in ``x.dtype`` and the saved per-set statistics.

    ``weight`` and ``bias`` broadcast against ``x`` (e.g. ``(1, C, 1, 1)``). With a ``mask``,
    statistics pool over the valid elements only, and masked-out elements (and sets without a
    valid element) output the bias. ``x`` must be non-empty along every reduced dim.

    Two paths compute the same statistics. The scaled path (mid-range shift, power-of-two scale)
    is exact for every finite input and has no data-dependent control flow: it runs under
    ``torch.func`` transforms, tracing, Dynamo, fake tensors, on accelerators and for masks. A
    plain eager CPU call first tries the unscaled path (shift by one element of each set, as
    fast as a plain two-pass), checks on the per-set results whether any set needs the scale
    (a non-finite variance, or a variance below ``2^-100`` that ``eps`` does not dominate), and
    only then recomputes with the scaled path: the check a fused CPU kernel makes, here on a few
    numbers per set.
    """
    dims = tuple(dims)
    dtype = acc_dtype(x.dtype)
    if _fast_path_allowed(x, mask):
        shift = _sample(x, dims).to(dtype)
        count = _count(x, dims, None, shift)
        d, cmean, var = _centred_moments(x, shift, None, dims, None, count)
        ok = torch.isfinite(var)
        tiny = _TINY_VAR[dtype]
        if eps < tiny * 2.0**40:
            ok = ok & (var >= tiny)
        if bool(ok.all()):
            rstd = torch.rsqrt(var + eps)
            return _finish(x, d, weight, bias, count, shift, torch.ones_like(shift), cmean, rstd, var)
        del d
    shift, inv = _scale_shift(x, dims, mask, dtype)
    count = _count(x, dims, mask, inv)
    d, cmean, var = _centred_moments(x, shift, inv, dims, mask, count)
    rstd = _scaled_rstd(var, inv, eps)
    if mask is not None:
        rstd = torch.where(count > 0, rstd, 0.0)
    y, stats = _finish(x, d, weight, bias, count, shift, inv, cmean, rstd, var)
    if mask is not None and eps == 0:
        # eps=0 and a set of one repeated value: rstd is inf, and its padded positions (d = 0) would
        # come out 0 * inf = NaN; they output the bias (its valid ones are 0 / 0, NaN, as in torch)
        fill = torch.zeros((), dtype=y.dtype, device=y.device) if bias is None else bias.to(y.dtype)
        y = torch.where(mask, y, fill)
    return y, stats


# One-read statistics (norm_forward_fused): the second moments run on (x - x0) * 2^-k, for the sets
# whose squared deviations leave the float range (fp32: beyond ~2^47-2^63); 2^-96 keeps the largest
# float32 deviation (2^129) at 2^33 and every deviation the plain one cannot hold above 2^-49.
_WIDE = {torch.float32: 2.0**-96, torch.float64: 2.0**-768}
# The two-pass moments' wide mean is the sum of (x - x0) * 2^-34, rescaled: a float32 deviation (at
# most 2^129) scales to 2^95, so sets of up to 2^32 values cannot overflow it (the values it loses
# below 2^-92 are nothing next to a wide set's spread).
_MEAN_SCALE = 2.0**-34
#: Device types whose generated code takes Welford's one-read moments for every input. On the
#: others (GPUs: Inductor's Triton code), inputs of 2 bytes a value (bfloat16, float16) take the
#: two-pass moments (:func:`two_pass_moments`).
WELFORD_DEVICES = {"cpu"}


def norm_forward_fused(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    dims: Sequence[int],
    eps: float,
) -> tuple[Tensor, Tensor]:
    """:func:`norm_forward` with statistics a compiler reads ``x`` once for (``torch.compile``).

    The scaled path reads ``x`` three times before its output (the range, the mean, the centred
    second moment), each read depending on the one before. Here (with Welford's moments, below)
    every statistic depends on ``x`` alone, so Inductor fuses them into one loop over the set, as
    it does for torch's own norms (``var_mean``: Welford's running moments):

    * the moments of ``x - x0``, ``x0`` each set's first value: a shift inside the set, exact for
      values close to it (a large common offset costs nothing, as on the other paths);
    * the moments of ``x * 2^-96 - x0 * 2^-96`` (float64: ``2^-768``), for sets whose squared
      deviations leave the float range (float32: deviations beyond about ``2^47``-``2^63``); a set
      takes them where the first variance is not finite.

    Both are ``torch.var_mean``, which Inductor computes as it does for torch's own norms: Welford's
    running moments in one read, or, for small sets (CPU: up to 1024 values), its two-step variance
    (a second read, of data in cache). Both arms read the same values in the same loops. On GPUs a
    bfloat16 / float16 input takes both as two passes of sums instead (the mean, then the centred
    second moments: two reads for the statistics), which Inductor's code issues in about half the
    instructions (:func:`two_pass_moments`). Sets of tiny variance need no further read when ``eps``
    dominates every variance that could lose bits (``eps >= 2^-60`` in float32, ``2^-860`` in
    float64); a smaller ``eps``, or a mask, takes :func:`norm_forward`. Same outputs and saved
    statistics (``shift`` is ``x0``; ``inv`` is 1 or the wide scale) as :func:`norm_forward`, to
    rounding, and the same backward (:func:`norm_backward` scales before it subtracts the shift when
    traced, so a wide set's ``x - x0`` cannot overflow).

    Example:
        >>> x = torch.randn(2, 4, 3, 3) + 1e4
        >>> y, stats = norm_forward_fused(x, None, None, None, (1, 2, 3), 1e-5)
        >>> ref, _ = norm_forward(x, None, None, None, (1, 2, 3), 1e-5)
        >>> bool(torch.allclose(y, ref, atol=1e-4))
        True
    """
    dims = tuple(dims)
    dtype = acc_dtype(x.dtype)
    if mask is not None or eps < _TINY_VAR[dtype] * 2.0**40:
        return norm_forward(x, weight, bias, mask, dims, eps)
    xa = x.to(dtype)
    x0 = _sample(xa, dims)
    s = _WIDE[dtype]
    count = _count(x, dims, None, x0)
    if two_pass_moments(x):
        mean_p, var_p, mean_w, var_w = _two_pass_moments(xa, x0, dims, s, count)
    else:
        # (traced only: Inductor writes var_mean into its own loops; ATen's var_mean, far slower than
        # a sum on the CPU, never runs here outside tests)
        var_p, mean_p = torch.var_mean(xa - x0, dims, correction=0, keepdim=True)
        # (scaled before the shift: |x * s - x0 * s| <= 2^33 in float32, where x - x0 can overflow)
        var_w, mean_w = torch.var_mean(xa * s - x0 * s, dims, correction=0, keepdim=True)
    plain = torch.isfinite(var_p)
    one = torch.ones((), dtype=dtype, device=x.device)  # (tensors: Python scalars in a where
    inv = torch.where(plain, one, one * s)  # would come out in the default dtype, float32)
    cmean = torch.where(plain, mean_p, mean_w)
    var = torch.where(plain, var_p, var_w)
    rstd = torch.where(plain, torch.rsqrt(var_p + eps), torch.rsqrt(var_w + eps * s * s))
    d = (xa * inv - x0 * inv) - cmean
    shift = x0
    return _finish(x, d, weight, bias, count, shift, inv, cmean, rstd, var)


def two_pass_moments(x: Tensor) -> bool:
    """Whether :func:`norm_forward_fused` computes ``x``'s moments in two passes (the mean, then the
    centred second moments) rather than with ``torch.var_mean``: for bfloat16 / float16 inputs
    outside :data:`WELFORD_DEVICES` (GPUs).

    Inductor's Triton code for ``var_mean`` is Welford's update per value, a division each; with
    the wide moments beside the plain ones that is about 40 instructions per value, against the 14
    an H100 / H200 can issue per bfloat16 value it reads at full bandwidth: the statistics would
    run at about a third of the memory's speed (read from the compiled code by
    ``python -m tests.kernels.inductor_compile``). Two passes of sums take about 20, for a second
    read of each set: even if every read of the generated kernel (two for the statistics, one for
    the output) came from memory, the bfloat16 forward's bytes would take less time (about 86 µs
    on ResNet-50's (64, 256, 56, 56) on an H200) than Welford's instructions (116 µs). A float32
    value brings twice the bytes per instruction: there the extra read could cost more than the
    instructions save, and it keeps Welford's single read; so does the CPU, whose generated
    Welford multiplies by tabled reciprocals instead of dividing, and which takes the two-step
    variance on small sets itself. ``benchmarks/gpu_check.sh``'s stage 5 times both on a GPU.

    Example:
        >>> two_pass_moments(torch.zeros(2, dtype=torch.bfloat16))  # (a CPU tensor)
        False
    """
    return x.element_size() <= 2 and x.device.type not in WELFORD_DEVICES


def _two_pass_moments(
    xa: Tensor, x0: Tensor, dims: tuple[int, ...], s: float, n: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(mean_p, var_p, mean_w, var_w)``: the moments of ``xa - x0`` and of ``xa * s - x0 * s`` over
    sets of ``n`` values, as :func:`torch.var_mean` gives them, from the sums for the mean and a
    second pass for the centred second moments (of deviations from that mean: never
    ``E[y^2] - E[y]^2``)."""
    # (a set whose sum of x - x0 overflows has deviations whose squares do: its var_p is not finite
    # either way, and it takes the wide moments, whose mean sums values scaled first)
    mean_p = (xa - x0).sum(dims, keepdim=True) / n
    mean_w = (xa * _MEAN_SCALE - x0 * _MEAN_SCALE).sum(dims, keepdim=True) / n * (s / _MEAN_SCALE)
    var_p = ((xa - x0) - mean_p).square().sum(dims, keepdim=True) / n
    var_w = ((xa * s - x0 * s) - mean_w).square().sum(dims, keepdim=True) / n
    return mean_p, var_p, mean_w, var_w


def _varies_innermost(x: Tensor, p: Tensor) -> bool:
    """Whether the broadcast factor ``p`` changes along ``x``'s innermost (stride-1) dim."""
    for i, (size, stride) in enumerate(zip(x.shape, x.stride())):
        if stride == 1 and size > 1:
            return p.shape[i] > 1
    return False


def _finish(
    x: Tensor,
    d: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    count: Tensor,
    shift: Tensor,
    inv: Tensor,
    cmean: Tensor,
    rstd: Tensor,
    var: Tensor,
) -> tuple[Tensor, Tensor]:
    """``y = d * rstd * weight + bias`` in place on ``d``, and the stacked statistics."""
    scale = rstd if weight is None else rstd * weight.to(rstd.dtype)
    # (out of place: d and the affine may be batched differently (torch.func), a trace, or autograd
    # saved d for the backward of the statistics)
    if not _inplace_ok(d, weight, bias):
        y = d * scale if bias is None else torch.addcmul(bias.to(rstd.dtype), d, scale)
    elif bias is None:
        y = d.mul_(scale)
    elif _varies_innermost(d, scale):  # one fused pass vectorizes well when the factors vary innermost
        y = torch.addcmul(bias.to(rstd.dtype), d, scale, out=d)
    else:  # ... and two in-place passes beat it when they are constant along the innermost run
        y = d.mul_(scale).add_(bias.to(rstd.dtype))
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    stats = torch.stack(torch.broadcast_tensors(shift, inv, cmean, rstd, var, count))
    return y, stats


def mean_var(stats: Tensor) -> tuple[Tensor, Tensor]:
    """The true per-set mean and biased variance from saved ``stats`` (keepdim, accumulation dtype).

    The variance is ``inf`` when it exceeds the accumulation dtype (fp32: values above ~1.8e19).
    """
    s = stats[_INV].reciprocal()  # exact: a power of two
    mean = torch.addcmul(stats[_SHIFT], stats[_CMEAN], s)
    var = (stats[_VAR] * s) * s  # (not s * s: 2^192, a wide float32 set's, is beyond float32)
    return mean, var


def stats_count(stats: Tensor) -> Tensor:
    """The number of (valid) elements behind each set's statistics."""
    return stats[_COUNT]


def moment_dims(x: Tensor, dims: Sequence[int], op: str) -> tuple[int, ...]:
    """``dims`` made non-negative; a ``ValueError`` (NormError) for one out of range or given twice.

    Example:
        >>> moment_dims(torch.zeros(2, 3, 4), (0, -1), "moments")
        (0, 2)
    """
    nd = x.dim()
    out = []
    for d in dims:
        if not -nd <= int(d) < nd:
            raise NormError(
                f"{op}: dim {int(d)} is out of range for an input with {nd} dims (shape {tuple(x.shape)}); "
                f"expected dims in [-{nd}, {nd - 1}]"
            )
        out.append(int(d) % nd)
    if len(set(out)) != len(out):
        raise NormError(f"{op}: dims {tuple(dims)} name a dim twice (input with {nd} dims)")
    return tuple(out)


def moments(x: Tensor, dims: Sequence[int], mask: Tensor | None = None) -> Moments:
    """``(count, mean, var)`` of ``x`` over ``dims`` (biased variance, keepdim, fp32 / fp64 for fp64).

    The statistics half of the core: shifted, scaled two-pass moments (exact for large offsets,
    finite for every finite fp32 input). With a ``mask`` only the valid elements count; a set
    without any has count 0, mean 0 and var 0.

    Example:
        >>> x = torch.tensor([[1.0, 2.0, 3.0], [1e4, 1e4 + 1.0, 1e4 + 2.0]])
        >>> m = moments(x, dims=(1,))
        >>> m.mean.squeeze(1), m.var.squeeze(1)
        (tensor([2.0000e+00, 1.0001e+04]), tensor([0.6667, 0.6667]))
        >>> moments(x, (1,), mask=torch.tensor([[True, True, False], [True, False, False]])).count.squeeze(1)
        tensor([2., 1.])
    """
    dims = moment_dims(x, dims, "moments")
    if x.numel() == 0:  # every set is empty (count 0, mean 0, var 0, as a mask leaving none), or none exists
        shape = [1 if i in dims else n for i, n in enumerate(x.shape)]
        zero = x.new_zeros(shape, dtype=acc_dtype(x.dtype))
        return Moments(zero, zero.clone(), zero.clone())
    # torch.jit.is_tracing is public API that torch.jit.__all__ leaves out:
    if torch.compiler.is_exporting() or torch.jit.is_tracing():  # pyright: ignore[reportPrivateImportUsage]
        _, mean, var, count = composite_norm(x, None, None, mask, dims, 0.0)  # standard ops for exporters
        return Moments(count, mean, var)
    _, stats = norm_forward(x, None, None, mask, dims, 0.0)
    mean, var = mean_var(stats)
    return Moments(stats[_COUNT], mean, var)


def _param_dims(x: Tensor, p: Tensor) -> tuple[int, ...]:
    """Dims a parameter gradient sums over: those where the broadcast parameter view has size 1."""
    return tuple(i for i in range(x.dim()) if p.shape[i] == 1 and x.shape[i] != 1)


def _sum_to(t: Tensor, p: Tensor) -> Tensor:
    dims = _param_dims(t, p)
    out = t.sum(dims, keepdim=True) if dims else t
    return out.to(p.dtype)


def norm_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    stats: Tensor,
    dims: Sequence[int],
    needs: Sequence[bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dweight, dbias)`` of :func:`norm_forward` (the §0 backward), ``None`` where not needed.

    First the per-set sums (``sum dy``, ``sum dy * x_hat``, at the finest shape the statistics
    and the affine share), then ``dx`` in one pass:

        dx = rstd * (g - mean_S(g) - x_hat * mean_S(g * x_hat)),   g = dy * weight

    written in terms of the saved scaled statistics so that every factor stays representable.
    ``dy`` must have ``x``'s shape and layout.
    """
    dims = tuple(dims)
    need_x, need_w, need_b = needs[0], needs[1] and weight is not None, needs[2] and bias is not None
    dtype = stats.dtype
    shift, inv, cmean, rstd = stats[_SHIFT], stats[_INV], stats[_CMEAN], stats[_RSTD]
    count = stats[_COUNT]
    dy_a = dy.to(dtype)
    dbias = None
    # Reduce first over the set dims along which neither weight nor bias varies.
    fine = tuple(i for i in dims if all(p is None or p.shape[i] == 1 for p in (weight, bias)))
    inplace = _inplace_ok(x, dy, weight, bias)
    # d = (x - shift) * inv: the scaled deviations before removing cmean, whose effect is folded
    # into the per-set sums and the constant term (one full-size temporary, as a plain two-pass).
    # (scaled before subtracting when traced: the one-read statistics shift a wide set by a member)
    d = _centered(x, shift, inv) if inplace else x.to(dtype) * inv - shift * inv
    if mask is not None:
        zero = torch.zeros((), dtype=dtype, device=x.device)
        if need_b:  # padded positions output the bias: their dy counts for it
            assert bias is not None
            dbias = _sum_to(_reduce(dy_a, fine, "sum") if fine else dy_a, bias)
        d = torch.where(mask, d - cmean, zero)  # already centred: nothing left to fold below
        dy_a = torch.where(mask, dy_a, zero)
    s_dy = _reduce(dy_a, fine, "sum") if fine else dy_a
    if need_b and mask is None:
        assert bias is not None
        dbias = _sum_to(s_dy, bias)
    prod = dy_a * d
    s_dyd = _reduce(prod, fine, "sum") if fine else prod
    cm = cmean if mask is None else None  # the centring still to fold into the sums
    s_dyxh = (s_dyd if cm is None else s_dyd - cm * s_dy) * rstd  # sum dy * x_hat, at the fine shape
    dweight = _sum_to(s_dyxh, weight) if need_w and weight is not None else None
    if not need_x:
        return None, dweight, dbias
    if mask is None and all(x.shape[i] == 1 for i in dims):
        # One value per set: x_hat is identically 0, so is dx (avoid rounding noise * 1/sqrt(eps)).
        return torch.zeros_like(x, dtype=dtype), dweight, dbias
    w = weight.to(dtype) if weight is not None else None
    rest = tuple(i for i in dims if i not in fine)
    g_sum = s_dy if w is None else w * s_dy
    gx_sum = s_dyxh if w is None else w * s_dyxh
    if rest:
        g_sum = g_sum.sum(rest, keepdim=True)
        gx_sum = gx_sum.sum(rest, keepdim=True)
    safe = count.clamp_min(1.0)
    true_rstd = rstd * inv  # 1 / sqrt(var + eps)
    # dx = a * dy + b * d + c, with x_hat = (d - cm) * rstd.
    a = true_rstd if w is None else w * true_rstd
    b = -(rstd * true_rstd) * (gx_sum / safe)
    c = -true_rstd * (g_sum / safe)
    if cm is not None:
        c = c - cm * b
    if inplace:
        # prod (dy * d) is dead once summed: reuse its memory for dx (no fresh full-size allocation).
        try:
            dx = torch.addcmul(c, d, b, out=prod) if prod.shape == d.shape else torch.addcmul(c, d, b)
        except RuntimeError:  # the legacy vmap of gradcheck(check_batched_grad=True) has no out= rule
            dx = torch.addcmul(c, d, b)
        dx = dx.addcmul_(dy_a, a)
    else:
        dx = torch.addcmul(d * b + c, dy_a, a)
    if mask is not None:
        dx = torch.where(mask, dx, torch.zeros((), dtype=dtype, device=x.device))
    return dx, dweight, dbias


def _differentiable_stats(
    x: Tensor,
    mask: Tensor | None,
    dims: tuple[int, ...],
    eps: float,
    shift: Tensor,
    inv: Tensor,
    count: Tensor,
) -> tuple[Tensor, Tensor]:
    """``(x_hat, true_rstd)`` from plain differentiable ops (double backward, jvp reference)."""
    dtype = inv.dtype
    d = (x.to(dtype) - shift) * inv
    zero = torch.zeros((), dtype=dtype, device=x.device)
    safe = count.clamp_min(1.0)
    if mask is not None:
        d = torch.where(mask, d, zero)
    cm = d.sum(dims, keepdim=True) / safe
    dc = d - cm
    if mask is not None:
        dc = torch.where(mask, dc, zero)
    var = (dc * dc).sum(dims, keepdim=True) / safe
    rstd = _scaled_rstd(var, inv, eps)
    return dc * rstd, rstd * inv


def norm_backward_composite(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    stats: Tensor,
    dims: Sequence[int],
    eps: float,
    needs: Sequence[bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The same gradients as :func:`norm_backward` in differentiable ops (for ``create_graph=True``).

    The statistics are recomputed from ``x`` so that autograd can differentiate the backward
    (``gradgradcheck``); the shift and scale are constants, which the result does not depend on.
    """
    dims = tuple(dims)
    dtype = stats.dtype
    x_hat, true_rstd = _differentiable_stats(x, mask, dims, eps, stats[_SHIFT], stats[_INV], stats[_COUNT])
    dy_a = dy.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=x.device)
    dx = dweight = dbias = None
    if needs[1] and weight is not None:
        dweight = _sum_to(dy_a * x_hat, weight)
    if needs[2] and bias is not None:
        dbias = _sum_to(dy_a.expand(x.shape), bias)
    if needs[0]:
        g = dy_a if weight is None else dy_a * weight.to(dtype)
        if mask is not None:
            g = torch.where(mask, g, zero)
        safe = stats[_COUNT].clamp_min(1.0)
        mean_g = g.sum(dims, keepdim=True) / safe
        mean_gx = (g * x_hat).sum(dims, keepdim=True) / safe
        dx = (g - mean_g - x_hat * mean_gx) * true_rstd
        if mask is not None:
            dx = torch.where(mask, dx, zero)
    return dx, dweight, dbias


def norm_jvp(
    tx: Tensor | None,
    tw: Tensor | None,
    tb: Tensor | None,
    x: Tensor,
    weight: Tensor | None,
    mask: Tensor | None,
    stats: Tensor,
    dims: Sequence[int],
) -> Tensor:
    """Forward-mode derivative of ``y`` for tangents ``(tx, tweight, tbias)`` (any may be ``None``).

    ``t_xhat = rstd * (t_c - x_hat * mean_S(x_hat * t_c))`` with ``t_c = tx - mean_S(tx)``, and
    ``t_y = t_xhat * weight + x_hat * tweight + tbias``.
    """
    dims = tuple(dims)
    dtype = stats.dtype
    shift, inv, cmean, rstd, count = stats[_SHIFT], stats[_INV], stats[_CMEAN], stats[_RSTD], stats[_COUNT]
    zero = torch.zeros((), dtype=dtype, device=x.device)
    x_hat = ((x.to(dtype) - shift) * inv - cmean) * rstd
    if mask is not None:
        x_hat = torch.where(mask, x_hat, zero)
    safe = count.clamp_min(1.0)
    ty = torch.zeros_like(x_hat)
    if tx is not None:
        t = tx.to(dtype)
        if mask is not None:
            t = torch.where(mask, t, zero)
        tc = t - t.sum(dims, keepdim=True) / safe
        if mask is not None:
            tc = torch.where(mask, tc, zero)
        t_xhat = (tc - x_hat * ((x_hat * tc).sum(dims, keepdim=True) / safe)) * (rstd * inv)
        ty = ty + (t_xhat if weight is None else t_xhat * weight.to(dtype))
    if tw is not None:
        ty = ty + x_hat * tw.to(dtype)
    if tb is not None:
        ty = ty + tb.to(dtype)
    return ty.to(x.dtype)


def composite_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    dims: Sequence[int],
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, var, count)`` from plain standard ops, for tracers and exporters (ONNX, TorchScript).

    A straightforward two-pass in the accumulation dtype: what an exported graph runs on another
    backend. Eager, compiled and ``torch.func`` code use :func:`norm_forward` instead.
    """
    dims = tuple(dims)
    dtype = acc_dtype(x.dtype)
    xa = x.to(dtype)
    if mask is None:
        mean = xa.mean(dims, keepdim=True)
        xc = xa - mean
        var = (xc * xc).mean(dims, keepdim=True)
        # (no float() of the count: a symbolic batch size stays symbolic under torch.export)
        count = torch.ones_like(mean) * (x.numel() // max(mean.numel(), 1))
    else:
        zero = torch.zeros((), dtype=dtype, device=x.device)
        count = mask.expand(x.shape).sum(dims, keepdim=True, dtype=dtype)
        safe = count.clamp_min(1.0)
        mean = torch.where(mask, xa, zero).sum(dims, keepdim=True) / safe
        xc = torch.where(mask, xa - mean, zero)
        var = (xc * xc).sum(dims, keepdim=True) / safe
    y = xc * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(dtype)
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(x.dtype), mean, var, count
