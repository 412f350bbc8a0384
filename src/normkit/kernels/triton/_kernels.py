"""Triton kernels of ``normkit::norm``: one program per set, the set seen as a ``(NC, M)`` matrix
(BatchNorm on rows of contiguous channels: blocks of channels, the ``bn_*`` kernels; LayerNorm2d on
NCHW, and short contiguous rows: blocks of positions or rows, the ``ln2d_*`` kernels; GroupNorm /
InstanceNorm on channels-last: blocks of channels across groups, the ``gcl_*`` kernels; BatchNorm's
running statistics: ``bn_running_kernel``).

Every kernel pattern of :mod:`normkit.kernels._plan` (BN on NCHW / channels-last, GN / IN / LN over
(C, H, W) on NCHW / channels-last, LN over a last dim, LayerNorm2d over C) is one parametrisation
of the same walk: set ``k`` starts at ``(k // D1) * B1 + (k % D1) * B2``; its element ``(i, m)``
(``i`` the channel within the set, ``m`` the position) lies at ``i * s_c + (m // M2) * s_m1 +
(m % M2) * s_m2`` from there, and its affine index is ``(k % D1) * CK + i``.

The forward keeps normkit's *scaled* statistics contract (:func:`normkit.ops.core.norm_forward`):
stable for every finite input, with no data-dependent host decision. One read gives the set's
max / min and the mean and centred second moment of ``x - x0`` (``x0`` the set's first value;
Welford per tile lane, Chan's combination of the lanes); where the range stays within float range
(:func:`_plain`) those are the statistics, and the second read writes the output. Only a set whose
range does not takes the mid-range shift and power-of-two scale and re-reads for the moments of the
scaled values (the blocked kernels decide per block of sets, the split ones per set). The saved
statistics are the reference's six rows,
so every backend's backward accepts them. The backward makes two reads: the per-set sums (and each
channel's ``sum dy * x_hat``, ``sum dy`` into a per-set buffer, summed by the launcher), then ``dx``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _offsets(k, c0, m0, D1, B1, B2, s_c, s_m1, s_m2, M2, NC, M, BC: tl.constexpr, BM: tl.constexpr):
    ci = c0 + tl.arange(0, BC)
    mi = m0 + tl.arange(0, BM)
    base = (k // D1).to(tl.int64) * B1 + (k % D1).to(tl.int64) * B2
    off = (
        base
        + ci.to(tl.int64)[:, None] * s_c
        + (mi // M2).to(tl.int64)[None, :] * s_m1
        + (mi % M2).to(tl.int64)[None, :] * s_m2
    )
    mask = (ci < NC)[:, None] & (mi < M)[None, :]
    return ci, off, mask


@triton.jit
def _count(NC, M):
    """The number of values of a ``(NC, M)`` set, in int64: Triton passes each size that fits as an
    int32, and their product overflows past 2^31 values (a set of 2^16 channels by 2^16 positions)."""
    return tl.cast(NC, tl.int64) * M


@triton.jit
def _srow(r: tl.constexpr, nsets, WIDE: tl.constexpr):
    """The offset of row ``r`` of the saved statistics (rows of ``nsets``): ``r * nsets``, in int64
    with ``WIDE``, which the launcher sets where the six rows pass 2^31 values (past about 358M
    sets: LayerNorm2d's positions), as int32 wrapped there. Not always int64: one int64 row offset
    took a GroupNorm backward from 42 to 56 registers a thread (read from the compiled code), so the
    common sizes keep the int32 code they had."""
    n = nsets
    if WIDE:
        n = tl.cast(nsets, tl.int64)
    return r * n


@triton.jit
def _block_start(j, B, E):
    """``j * B``, the first index of block ``j`` of ``B`` along a walk of ``E``, in ``E``'s integer
    type: int32 while ``E`` fits one (``E * 0`` folds away), int64 where ``E`` is 2^31 or more (Triton
    then passes it as int64), which a product of two int32 program indices would overflow."""
    return (E * 0 + j) * B


@triton.jit
def _shift_scale(h, lw, exp_bound):
    """The mid-range shift and the power-of-two scale of a set with max ``h`` and min ``lw``."""
    half = h * 0.5 - lw * 0.5
    est = tl.maximum(half, tl.maximum(tl.abs(h), tl.abs(lw)) * 7.888609052210118e-31)  # 2^-100
    e = tl.minimum(tl.maximum(tl.floor(tl.log2(est)) + 1.0, -exp_bound), exp_bound)
    return h * 0.5 + lw * 0.5, tl.exp2(-e)


@triton.jit
def _rstd(var, inv, eps):
    """rstd of the scaled values, 1 / sqrt(var + eps * inv^2) = 2^e / sqrt(var_true + eps), written
    so that neither form overflows (inv^2 does for sets of tiny values): each side clamps its factor."""
    a = tl.minimum(inv, 1.0)
    c = tl.minimum(1.0 / inv, 1.0)
    return tl.where(inv <= 1.0, 1.0 / tl.sqrt(var + eps * a * a), c / tl.sqrt(var * c * c + eps))


@triton.jit
def _affine(y, W, B, idx, valid, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr):
    """``y * W[idx] + B[idx]`` per row of the tile (either factor absent when not ``HAS_*``)."""
    if HAS_W:
        y = y * tl.load(W + idx, mask=valid, other=1.0).to(ACC)[:, None]
    if HAS_B:
        y = y + tl.load(B + idx, mask=valid, other=0.0).to(ACC)[:, None]
    return y


@triton.jit
def _saved(ST, k, nsets, ACC: tl.constexpr, WIDE: tl.constexpr):
    """A set's shift, scale, mean of the scaled values and their rstd (the saved statistic rows)."""
    shift = tl.load(ST + k).to(ACC)
    inv = tl.load(ST + _srow(1, nsets, WIDE) + k).to(ACC)
    cm = tl.load(ST + _srow(2, nsets, WIDE) + k).to(ACC)
    rstd = tl.load(ST + _srow(3, nsets, WIDE) + k).to(ACC)
    return shift, inv, cm, rstd


@triton.jit
def _range_state(ACC: tl.constexpr, R: tl.constexpr, K: tl.constexpr):
    """Empty per-lane state of a one-read range-and-moments pass: (max, min, mean, M2)."""
    hi = tl.full([R, K], float("-inf"), ACC)
    lo = tl.full([R, K], float("inf"), ACC)
    return hi, lo, tl.zeros([R, K], ACC), tl.zeros([R, K], ACC)


@triton.jit
def _range_step(hi, lo, mean, m2, x, x0, mask, rc):
    """One tile of that pass: the lanes' max / min of ``x`` and Welford's update with ``x - x0``
    (``rc``: 1 / each lane's count after it). Lanes outside the walk must hold ``x0`` (load them with
    ``other=x0``): they leave the max and min as they are, and the mask keeps them out of the moments.
    No clamp: a set whose deviations or squares could leave the float range is not plain
    (:func:`_plain`) and its moments are discarded. A NaN is dropped by the max and min but not by
    the moments: its set comes out NaN, as on every backend."""
    hi = tl.maximum(hi, x)
    lo = tl.minimum(lo, x)
    mean, m2 = _welford_at(mean, m2, x - x0, mask, rc)
    return hi, lo, mean, m2


@triton.jit
def _run_counts(lo, hi, B: tl.constexpr):
    """Per lane index of a walk over ``[lo, hi)`` in steps of ``B``: how many steps reach it (the
    walk's lanes all see a value at every step but the ragged last). A lane's count after step ``t``
    is then ``t + 1``: the same for every lane the step reaches, one reciprocal per step."""
    j = tl.arange(0, B)
    ns = (hi - lo + (B - 1)) // B
    return tl.where(j < hi - lo - (ns - 1) * B, ns, ns - 1)


@triton.jit
def _lanes0(cnt, mean, m2):
    """Per column of the tile: ``(count, mean, var)`` from its lanes' Welford states (Chan et al.)."""
    n = tl.sum(cnt, axis=0)
    nn = tl.maximum(n, 1.0)
    cmean = tl.sum(cnt * mean, axis=0) / nn
    dm = mean - cmean[None, :]
    return n, cmean, tl.sum(m2 + cnt * dm * dm, axis=0) / nn


@triton.jit
def _walk_counts(c_lo, c_hi, lo_m, hi_m, BC: tl.constexpr, BM: tl.constexpr):
    """The lane counts of a tile walk over channels ``[c_lo, c_hi)`` x positions ``[lo_m, hi_m)``,
    known from the bounds: ``(nm, full, cnt)``, the steps of one pass over the positions, which
    columns the last (ragged) step reaches, and each lane's count of values in all. A lane's count
    after a step is one of two numbers, the same for the whole tile (:func:`_step_rc`). (A count
    carried through the loop took a layout of its own and a shared-memory round trip with barriers
    every step, and a division per value: read from the compiled code.)"""
    j = tl.arange(0, BM)
    r = tl.arange(0, BC)
    nm = (hi_m - lo_m + (BM - 1)) // BM
    full = j < hi_m - lo_m - (nm - 1) * BM
    passes = (tl.maximum(c_hi - c_lo - r, 0) + (BC - 1)) // BC
    return nm, full, passes[:, None] * tl.where(full, nm, nm - 1)[None, :]


@triton.jit
def _step_rc(c0, c_lo, m0, lo_m, nm, full, ACC: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr):
    """``1 / count`` of every column of the tile after the step at ``(c0, m0)``: a column the ragged
    last step reaches has seen ``nm`` values per pass of the blocks of channels before, the others
    ``nm - 1``; two reciprocals per step, not one per value."""
    ic = (c0 - c_lo) // BC
    im = (m0 - lo_m) // BM + 1
    r_full = 1.0 / tl.cast(ic * nm + im, ACC)
    r_short = 1.0 / tl.cast(tl.maximum(ic * (nm - 1) + im, 1), ACC)
    return tl.where(full, r_full, r_short)[None, :]


@triton.jit
def _welford_at(mean, m2, v, mask, rc):
    """Welford's update of every tile lane with its value ``v``, ``rc`` the reciprocal of each lane's
    count after it (lanes outside ``mask`` unchanged: ``d`` is 0 there, so M2's product is too)."""
    d = tl.where(mask, v - mean, 0.0)
    mean += d * rc
    m2 += d * (v - mean)
    return mean, m2


@triton.jit
def _chan(cnt, mean, m2):
    """``(count, mean, M2)`` of a whole tile from its lanes' Welford states (Chan et al.: every term
    non-negative, no cancellation)."""
    n = tl.sum(tl.sum(cnt, axis=1), axis=0)
    mb = tl.sum(tl.sum(cnt * mean, axis=1), axis=0) / n
    dm = mean - mb
    return n, mb, tl.sum(tl.sum(m2 + cnt * dm * dm, axis=1), axis=0)


@triton.jit
def _moments(
    X, k, c_lo, c_hi, lo_m, hi_m, D1, B1, B2, s_c, s_m1, s_m2, M2, mid, inv,
    ACC: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr,
):  # fmt: skip
    """``(count, mean, M2)`` of the scaled values ``(x - mid) * inv`` over channels ``[c_lo, c_hi)`` x
    positions ``[lo_m, hi_m)`` of set ``k``, in one read: each lane of the tile keeps Welford's running
    mean and M2 of the values it sees (its count known from the walk), and Chan et al.'s formula
    combines the lanes. This replaced a mean pass and a centred second-moment pass."""
    mean = tl.zeros([BC, BM], ACC)
    m2 = tl.zeros([BC, BM], ACC)
    nm, full, cnt = _walk_counts(c_lo, c_hi, lo_m, hi_m, BC, BM)
    for c0 in range(c_lo, c_hi, BC):
        for m0 in range(lo_m, hi_m, BM):
            _, off, mask = _offsets(k, c0, m0, D1, B1, B2, s_c, s_m1, s_m2, M2, c_hi, hi_m, BC, BM)
            v = (tl.load(X + off, mask=mask, other=0.0).to(ACC) - mid) * inv
            rc = _step_rc(c0, c_lo, m0, lo_m, nm, full, ACC, BC, BM)
            mean, m2 = _welford_at(mean, m2, v, mask, rc)
    return _chan(cnt.to(ACC), mean, m2)


@triton.jit
def _first(X, k, D1, B1, B2, ACC: tl.constexpr):
    """Set ``k``'s first value (element (0, 0) of its walk): the shift of its one-read moments."""
    return tl.load(X + (k // D1).to(tl.int64) * B1 + (k % D1).to(tl.int64) * B2).to(ACC)


@triton.jit
def _moments_range(
    X, k, c_lo, c_hi, lo_m, hi_m, D1, B1, B2, s_c, s_m1, s_m2, M2, x0, exp_bound,
    ACC: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr,
):  # fmt: skip
    """``(max, min, count, mean, M2)`` over channels ``[c_lo, c_hi)`` x positions ``[lo_m, hi_m)`` of
    set ``k`` in one read: the range of x, and the mean and centred
    second moment of ``x - x0`` (Welford per tile lane, Chan's combination of the lanes, as
    :func:`_moments`). Deviations are clamped to :func:`_plain`'s bound, so no square overflows;
    no clamp is needed: a set whose deviations or squares could leave the float range is not plain
    (:func:`_plain`), and its moments are discarded. A NaN is dropped by the max and min but not by
    the moments: its set comes out NaN, as on every backend. Lanes outside the walk read x0, which
    leaves the max and min as they are (the moments skip them by the mask)."""
    hi, lo, mean, m2 = _range_state(ACC, BC, BM)
    nm, full, cnt = _walk_counts(c_lo, c_hi, lo_m, hi_m, BC, BM)
    for c0 in range(c_lo, c_hi, BC):
        for m0 in range(lo_m, hi_m, BM):
            _, off, mask = _offsets(k, c0, m0, D1, B1, B2, s_c, s_m1, s_m2, M2, c_hi, hi_m, BC, BM)
            x = tl.load(X + off, mask=mask, other=x0).to(ACC)
            rc = _step_rc(c0, c_lo, m0, lo_m, nm, full, ACC, BC, BM)
            hi, lo, mean, m2 = _range_step(hi, lo, mean, m2, x, x0, mask, rc)
    n, mb, m2 = _chan(cnt.to(ACC), mean, m2)
    return tl.max(tl.max(hi, axis=1), axis=0), tl.min(tl.min(lo, axis=1), axis=0), n, mb, m2


@triton.jit
def _plain(h, lw, exp_bound, n):
    """Whether a set of ``n`` values with max ``h`` and min ``lw`` takes its moments unscaled: a range
    r with n r^2 <= 2^0.94b (b = 126 for float32; 1022 for float64: so r <= 2^59 in float32) and
    r >= 2^-0.32b (2^-40), or constant, so no deviation, square or sum of squares leaves the float
    range and none underflows where eps would not dominate. False for a non-finite range (inf, NaN),
    which takes the scaled path."""
    r = h - lw
    b = r * 0.0 + exp_bound  # in the set's dtype (2^480 is beyond float32)
    return (r * r * n <= tl.exp2(b * 0.94)) & ((r >= tl.exp2(b * -0.32)) | (r == 0.0))


@triton.jit
def norm_fwd_kernel(
    X,
    Y,
    W,
    B,
    ST,
    MU,
    R,
    SL,
    nsets,
    NC,
    M,
    M2,
    s_c,
    s_m1,
    s_m2,
    D1,
    B1,
    B2,
    CK,
    eps,
    exp_bound,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACC: tl.constexpr,
    BC: tl.constexpr,
    BM: tl.constexpr,
    PN: tl.constexpr = False,
    ACT: tl.constexpr = 7,
    WIDE: tl.constexpr = False,
):
    k = tl.program_id(0)
    n = _count(NC, M).to(ACC)
    # 1. one read: the set's max / min, and the moments of x - x0 (x0: the set's first value, a shift
    #    within the set's range, so a large offset costs no precision)
    x0 = _first(X, k, D1, B1, B2, ACC)
    h, lw, _, cm, m2 = _moments_range(
        X, k, 0, NC, 0, M, D1, B1, B2, s_c, s_m1, s_m2, M2, x0, exp_bound, ACC, BC, BM
    )
    if _plain(h, lw, exp_bound, n):
        mid = x0
        inv = x0 * 0.0 + 1.0
    else:  # 2. rare: values or deviations beyond float range -> normkit's scaled statistics, one more read
        mid, inv = _shift_scale(h, lw, exp_bound)
        _, cm, m2 = _moments(X, k, 0, NC, 0, M, D1, B1, B2, s_c, s_m1, s_m2, M2, mid, inv, ACC, BC, BM)
    var = m2 / n
    rstd = _rstd(var, inv, eps)
    # 3. the output
    cbase = (k % D1) * CK
    for c0 in range(0, NC, BC):
        for m0 in range(0, M, BM):
            ci, off, mask = _offsets(k, c0, m0, D1, B1, B2, s_c, s_m1, s_m2, M2, NC, M, BC, BM)
            x = tl.load(X + off, mask=mask, other=0.0).to(ACC)
            y = _affine(((x - mid) * inv - cm) * rstd, W, B, cbase + ci, ci < NC, HAS_W, HAS_B, ACC)
            if PN:  # Proxy Norm's step on the affine output: (act(y) - m) * rstd per channel
                mu = tl.load(MU + cbase + ci, mask=ci < NC, other=0.0).to(ACC)[:, None]
                r = tl.load(R + cbase + ci, mask=ci < NC, other=0.0).to(ACC)[:, None]
                y = (_act_fwd(y, tl.load(SL).to(ACC), ACT) - mu) * r
            tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)
    _store_stats(ST, k, k < nsets, nsets, mid, inv, cm, rstd, var, n, WIDE)


@triton.jit
def norm_bwd_kernel(
    DY,
    X,
    W,
    ST,
    DX,
    PW,
    PB,
    B,
    MU,
    R,
    SL,
    PG,
    PZ,
    nsets,
    NC,
    M,
    M2,
    s_c,
    s_m1,
    s_m2,
    D1,
    B1,
    B2,
    CK,
    HAS_W: tl.constexpr,
    NEED_DX: tl.constexpr,
    NEED_P: tl.constexpr,
    ACC: tl.constexpr,
    BC: tl.constexpr,
    BM: tl.constexpr,
    PN: tl.constexpr = False,
    ACT: tl.constexpr = 7,
    WIDE: tl.constexpr = False,
):
    # With PN, DY is the gradient of Proxy Norm's step that followed the affine (W, B): it is taken
    # back to the affine output first, and each channel also sums it (PG) and it times z - m (PZ).
    k = tl.program_id(0)
    n = _count(NC, M).to(ACC)
    shift, inv, cm, rstd = _saved(ST, k, nsets, ACC, WIDE)
    cbase = (k % D1) * CK
    # 1. each channel's sums of dy * x_hat and dy, elementwise over the tile and reduced once per block
    # of channels (a reduction across the tile inside the loop costs a barrier per step); the set's
    # sums of g = w * dy and g * x_hat follow from them, weighted by each channel's w
    a1 = tl.zeros([BC], ACC)
    a2 = tl.zeros([BC], ACC)
    slope = 0.0
    if PN:
        slope = tl.load(SL).to(ACC)
    for c0 in range(0, NC, BC):
        cv = c0 + tl.arange(0, BC)
        s_w = tl.zeros([BC, BM], ACC)
        s_b = tl.zeros([BC, BM], ACC)
        if PN:
            pw_, pb_, pmu, pr = _pn_vectors(W + cbase, B + cbase, MU + cbase, R + cbase, cv, cv < NC, ACC)
            s_g = tl.zeros([BC, BM], ACC)
            s_z = tl.zeros([BC, BM], ACC)
        for m0 in range(0, M, BM):
            ci, off, mask = _offsets(k, c0, m0, D1, B1, B2, s_c, s_m1, s_m2, M2, NC, M, BC, BM)
            x = tl.load(X + off, mask=mask, other=0.0).to(ACC)
            dy = tl.load(DY + off, mask=mask, other=0.0).to(ACC)
            xh = tl.where(mask, ((x - shift) * inv - cm) * rstd, 0.0)
            if PN:
                a = pw_ * xh + pb_
                z = _act_fwd(a, slope, ACT)
                s_g += dy
                s_z += tl.where(mask, dy * (z - pmu), 0.0)
                dy = tl.where(mask, dy * pr * _act_grad(a, z, slope, ACT), 0.0)
            s_w += dy * xh
            s_b += dy
        pw = tl.sum(s_w, axis=1)
        pb = tl.sum(s_b, axis=1)
        wv = tl.full([BC], 1.0, ACC)
        if HAS_W:
            wv = tl.load(W + cbase + cv, mask=cv < NC, other=0.0).to(ACC)
        a1 += wv * pb
        a2 += wv * pw
        if NEED_P:
            tl.store(PW + k.to(tl.int64) * NC + cv, pw, mask=cv < NC)
            tl.store(PB + k.to(tl.int64) * NC + cv, pb, mask=cv < NC)
            if PN:
                tl.store(PG + k.to(tl.int64) * NC + cv, tl.sum(s_g, axis=1), mask=cv < NC)
                tl.store(PZ + k.to(tl.int64) * NC + cv, tl.sum(s_z, axis=1), mask=cv < NC)
    if NEED_DX:
        mg = tl.sum(a1, axis=0) / n
        mgx = tl.sum(a2, axis=0) / n
        rt = rstd * inv  # the true 1 / sqrt(var + eps)
        # 2. dx = rt * (g - mean(g) - x_hat * mean(g * x_hat))
        for c0 in range(0, NC, BC):
            cv = c0 + tl.arange(0, BC)
            wt = tl.full([BC, 1], 1.0, ACC)
            if HAS_W:
                wt = tl.load(W + cbase + cv, mask=cv < NC, other=1.0).to(ACC)[:, None]
            if PN:
                pw_, pb_, pmu, pr = _pn_vectors(W + cbase, B + cbase, MU + cbase, R + cbase, cv, cv < NC, ACC)
            for m0 in range(0, M, BM):
                ci, off, mask = _offsets(k, c0, m0, D1, B1, B2, s_c, s_m1, s_m2, M2, NC, M, BC, BM)
                x = tl.load(X + off, mask=mask, other=0.0).to(ACC)
                dy = tl.load(DY + off, mask=mask, other=0.0).to(ACC)
                xh = ((x - shift) * inv - cm) * rstd
                if PN:
                    a = pw_ * xh + pb_
                    dy = dy * pr * _act_grad(a, _act_fwd(a, slope, ACT), slope, ACT)
                dx = rt * (wt * dy - mg - xh * mgx)
                tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=mask)


# --- split reduction: a set cut into chunks of positions, one program per (set, chunk) -------------
#
# Chunks are runs of positions, or of channels where a set has more channels than positions (LN
# over (C, H, W) with an elementwise affine). Used where there are too few sets to fill the GPU
# (BatchNorm: one set per channel; GN / LN on a small batch). Two launches forward (each chunk's
# max / min and count, mean and centred second moment of x - x0; the output, after combining the
# chunks' moments with Chan's formula): two reads of x. A set whose range is not plain (rare) has
# each of its output programs read the whole set once more for its scaled moments, where a launch
# between the two passes cost every call a launch (host time and a GPU launch). Two launches
# backward (each chunk's sums; dx). Every program recomputes the set's range, shift and scale from
# the chunks' max / min with the same instructions, so all of them agree bit for bit.


@triton.jit
def _set_range(HL, k, nsets, nchunks, BJ: tl.constexpr):
    """Set ``k``'s max / min from its chunks' (every program of the set computes the same)."""
    j = tl.arange(0, BJ)
    jm = j < nchunks
    row = k.to(tl.int64) * nchunks + j
    h = tl.max(tl.load(HL + row, mask=jm, other=float("-inf")), axis=0)
    lw = tl.min(tl.load(HL + nsets * nchunks + row, mask=jm, other=float("inf")), axis=0)
    return h, lw


@triton.jit
def _chunk(jc, CH, NC, M, SPLIT_C: tl.constexpr):
    """The chunk's channel and position ranges: a run of ``CH`` channels (``SPLIT_C``) or positions."""
    if SPLIT_C:
        c_lo = _block_start(jc, CH, NC)
        c_hi = tl.minimum(c_lo + CH, NC)
        m_lo = jc * 0
        m_hi = M + jc * 0
    else:
        c_lo = jc * 0
        c_hi = NC + jc * 0
        m_lo = _block_start(jc, CH, M)
        m_hi = tl.minimum(m_lo + CH, M)
    return c_lo, c_hi, m_lo, m_hi


@triton.jit
def split_stats_kernel(
    X, HL, PM, nsets, nchunks, CH, NC, M, M2, s_c, s_m1, s_m2, D1, B1, B2, exp_bound,
    SPLIT_C: tl.constexpr, ACC: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr,
):  # fmt: skip
    """Per (set, chunk), one read: the chunk's max / min, and the count, mean and M2 of x - x0 (x0 the
    set's first value, the same for all its chunks): the set's statistics where its range is plain."""
    k = tl.program_id(0)
    jc = tl.program_id(1)
    c_lo, c_hi, lo_m, hi_m = _chunk(jc, CH, NC, M, SPLIT_C)
    x0 = _first(X, k, D1, B1, B2, ACC)
    h, lw, cnt, mb, m2 = _moments_range(
        X, k, c_lo, c_hi, lo_m, hi_m, D1, B1, B2, s_c, s_m1, s_m2, M2, x0, exp_bound, ACC, BC, BM
    )
    row = k.to(tl.int64) * nchunks + jc
    tl.store(HL + row, h)
    tl.store(HL + nsets * nchunks + row, lw)
    tl.store(PM + row, cnt)
    tl.store(PM + nsets * nchunks + row, mb)
    tl.store(PM + 2 * nsets * nchunks + row, m2)


@triton.jit
def _scaled_set_moments(
    X, k, z, h, lw, mid, inv, NC, M, D1, B1, B2, s_c, s_m1, s_m2, M2,
    ACC: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr,
):  # fmt: skip
    """``(count, mean, var)`` of the scaled values ``(x - mid) * inv`` of the whole of set ``k``: for
    a set whose range is not plain (rare: values beyond about 2^59 or a range below 2^-40 in float32),
    each of its programs reads the set once more itself, where a launch between the statistics and
    the output would cost every call a launch. A non-finite range (an inf) reads nothing: NaN."""
    span = h - lw
    finite = span < float("inf")  # (False for inf and NaN)
    hi_m = tl.where(finite, M, 0) + z
    cnt, mb, m2 = _moments(X, k, z, NC + z, z, hi_m, D1, B1, B2, s_c, s_m1, s_m2, M2, mid, inv, ACC, BC, BM)
    n = (_count(NC, M) + z).to(ACC)
    bad = tl.where(finite, 0.0, float("nan")).to(ACC)
    return n, mb + bad, m2 / tl.maximum(cnt, 1.0) + bad


@triton.jit
def split_apply_kernel(
    X,
    Y,
    W,
    B,
    ST,
    HL,
    PM,
    nsets,
    nchunks,
    CH,
    NC,
    M,
    M2,
    s_c,
    s_m1,
    s_m2,
    D1,
    B1,
    B2,
    CK,
    eps,
    exp_bound,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    SPLIT_C: tl.constexpr,
    ACC: tl.constexpr,
    BC: tl.constexpr,
    BM: tl.constexpr,
    BJ: tl.constexpr,
    RBM: tl.constexpr,
):
    # RBM: the narrower tile of the rare scaled re-read (its registers would otherwise be the
    # kernel's, and halve the warps an SM holds for the common output pass)
    k = tl.program_id(0)
    jc = tl.program_id(1)
    c_lo, c_hi, lo_m, hi_m = _chunk(jc, CH, NC, M, SPLIT_C)
    h, lw = _set_range(HL, k, nsets, nchunks, BJ)
    mid = _first(X, k, D1, B1, B2, ACC)
    inv = mid * 0.0 + 1.0
    if _plain(h, lw, exp_bound, _count(NC, M)).to(tl.int32) != 0:
        # Chan et al.'s combination of the chunks' (count, mean, M2) of x - x0
        j = tl.arange(0, BJ)
        jm = j < nchunks
        row = k.to(tl.int64) * nchunks + j
        cnt = tl.load(PM + row, mask=jm, other=0.0)
        mb = tl.load(PM + nsets * nchunks + row, mask=jm, other=0.0)
        m2 = tl.load(PM + 2 * nsets * nchunks + row, mask=jm, other=0.0)
        n = tl.sum(cnt, axis=0)
        cm = tl.sum(cnt * mb, axis=0) / n
        dm = mb - cm
        var = tl.sum(m2 + cnt * dm * dm, axis=0) / n
    else:
        mid, inv = _shift_scale(h, lw, exp_bound)
        n, cm, var = _scaled_set_moments(
            X, k, jc * 0, h, lw, mid, inv, NC, M, D1, B1, B2, s_c, s_m1, s_m2, M2, ACC, BC, RBM
        )
    rstd = _rstd(var, inv, eps)
    cbase = (k % D1) * CK
    for c0 in range(c_lo, c_hi, BC):
        for m0 in range(lo_m, hi_m, BM):
            ci, off, mask = _offsets(k, c0, m0, D1, B1, B2, s_c, s_m1, s_m2, M2, c_hi, hi_m, BC, BM)
            x = tl.load(X + off, mask=mask, other=0.0).to(ACC)
            y = _affine(((x - mid) * inv - cm) * rstd, W, B, cbase + ci, ci < c_hi, HAS_W, HAS_B, ACC)
            tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)
    if jc == 0:
        _store_stats(ST, k, k < nsets, nsets, mid, inv, cm, rstd, var, n, False)  # (nsets < programs)


@triton.jit
def split_bwd_sums_kernel(
    DY,
    X,
    W,
    ST,
    PA,
    PW,
    PB,
    nsets,
    nchunks,
    CH,
    NC,
    M,
    M2,
    s_c,
    s_m1,
    s_m2,
    D1,
    B1,
    B2,
    CK,
    HAS_W: tl.constexpr,
    NEED_P: tl.constexpr,
    SPLIT_C: tl.constexpr,
    ACC: tl.constexpr,
    BC: tl.constexpr,
    BM: tl.constexpr,
):
    k = tl.program_id(0)
    jc = tl.program_id(1)
    c_lo, c_hi, lo_m, hi_m = _chunk(jc, CH, NC, M, SPLIT_C)
    shift, inv, cm, rstd = _saved(ST, k, nsets, ACC, False)  # (nsets < programs)
    cbase = (k % D1) * CK
    a1 = tl.zeros([BC], ACC)  # (as norm_bwd_kernel: elementwise sums, reduced once per block)
    a2 = tl.zeros([BC], ACC)
    for c0 in range(c_lo, c_hi, BC):
        s_w = tl.zeros([BC, BM], ACC)
        s_b = tl.zeros([BC, BM], ACC)
        for m0 in range(lo_m, hi_m, BM):
            ci, off, mask = _offsets(k, c0, m0, D1, B1, B2, s_c, s_m1, s_m2, M2, c_hi, hi_m, BC, BM)
            x = tl.load(X + off, mask=mask, other=0.0).to(ACC)
            dy = tl.load(DY + off, mask=mask, other=0.0).to(ACC)
            xh = tl.where(mask, ((x - shift) * inv - cm) * rstd, 0.0)
            s_w += dy * xh
            s_b += dy
        cv = c0 + tl.arange(0, BC)
        pw = tl.sum(s_w, axis=1)
        pb = tl.sum(s_b, axis=1)
        wv = tl.full([BC], 1.0, ACC)
        if HAS_W:
            wv = tl.load(W + cbase + cv, mask=cv < c_hi, other=0.0).to(ACC)
        a1 += wv * pb
        a2 += wv * pw
        if NEED_P:
            prow = (k.to(tl.int64) * nchunks + jc) * NC + cv
            tl.store(PW + prow, pw, mask=cv < c_hi)
            tl.store(PB + prow, pb, mask=cv < c_hi)
    row = k.to(tl.int64) * nchunks + jc
    tl.store(PA + row, tl.sum(a1, axis=0))
    tl.store(PA + nsets * nchunks + row, tl.sum(a2, axis=0))


@triton.jit
def split_bwd_dx_kernel(
    DY,
    X,
    W,
    ST,
    PA,
    DX,
    nsets,
    nchunks,
    CH,
    NC,
    M,
    M2,
    s_c,
    s_m1,
    s_m2,
    D1,
    B1,
    B2,
    CK,
    HAS_W: tl.constexpr,
    SPLIT_C: tl.constexpr,
    ACC: tl.constexpr,
    BC: tl.constexpr,
    BM: tl.constexpr,
    BJ: tl.constexpr,
):
    k = tl.program_id(0)
    jc = tl.program_id(1)
    c_lo, c_hi, lo_m, hi_m = _chunk(jc, CH, NC, M, SPLIT_C)
    shift, inv, cm, rstd = _saved(ST, k, nsets, ACC, False)  # (nsets < programs)
    n = _count(NC, M).to(ACC)
    j = tl.arange(0, BJ)
    jm = j < nchunks
    row = k.to(tl.int64) * nchunks + j
    mg = tl.sum(tl.load(PA + row, mask=jm, other=0.0), axis=0) / n
    mgx = tl.sum(tl.load(PA + nsets * nchunks + row, mask=jm, other=0.0), axis=0) / n
    rt = rstd * inv
    cbase = (k % D1) * CK
    for c0 in range(c_lo, c_hi, BC):
        for m0 in range(lo_m, hi_m, BM):
            ci, off, mask = _offsets(k, c0, m0, D1, B1, B2, s_c, s_m1, s_m2, M2, c_hi, hi_m, BC, BM)
            x = tl.load(X + off, mask=mask, other=0.0).to(ACC)
            dy = tl.load(DY + off, mask=mask, other=0.0).to(ACC)
            xh = ((x - shift) * inv - cm) * rstd
            g = _affine(dy, W, W, cbase + ci, ci < c_hi, HAS_W, False, ACC)
            dx = rt * (g - mg - xh * mgx)
            tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=mask)


# --- BatchNorm on channels-last memory: blocks of channels, chunks of rows -------------------------
#
# The per-set walk above gives BatchNorm channels-last one program per channel, whose values lie C
# apart: every load is its own memory transaction (measured 9-13x torch's time on an H200). Here a
# program takes a block of BCC channels, contiguous in every row, and a chunk of rows (the (C, E)
# walk of Proxy Norm's step below: element (c, e) at c * s_c + (e // E2) * s_e1 + (e % E2) * s_e2),
# so each row of the tile is one coalesced load; every reduction is per channel (axis 1). Three
# launches forward, as the split kernels (max / min and the moments of x - x0; only for a block with a
# channel that is not plain, the moments of the scaled values; the output after Chan's combination of
# the chunks), two backward (sum dy and sum dy * x_hat; dx). The saved statistics are the per-set
# kernels' (one set per channel), so either backward reads either's.


@triton.jit
def _store_stats(ST, k, mask, nsets, mid, inv, cm, rstd, var, n, WIDE: tl.constexpr):
    """The six saved statistic rows (shift, scale, mean of the scaled values, rstd, var, count) of the
    sets ``k`` (a block of them: ``mask`` marks the real ones)."""
    tl.store(ST + k, mid, mask=mask)
    tl.store(ST + _srow(1, nsets, WIDE) + k, inv, mask=mask)
    tl.store(ST + _srow(2, nsets, WIDE) + k, cm, mask=mask)
    tl.store(ST + _srow(3, nsets, WIDE) + k, rstd, mask=mask)
    tl.store(ST + _srow(4, nsets, WIDE) + k, var, mask=mask)
    tl.store(ST + _srow(5, nsets, WIDE) + k, n, mask=mask)


@triton.jit
def _bn_chunk(C, E, CH, BCC: tl.constexpr):
    c0 = tl.program_id(0) * BCC
    jc = tl.program_id(1)
    ci = c0 + tl.arange(0, BCC)
    e_lo = _block_start(jc, CH, E)
    return c0, jc, ci, ci < C, e_lo, tl.minimum(e_lo + CH, E)


@triton.jit
def _bn_idx(ci, cm, j0, nchunks, BJ: tl.constexpr):
    j = j0 + tl.arange(0, BJ)
    return ci.to(tl.int64)[:, None] * nchunks + j[None, :], cm[:, None] & (j < nchunks)[None, :]


@triton.jit
def _bn_range(HL, ci, cm, C, nchunks, ACC: tl.constexpr, BCC: tl.constexpr, BJ: tl.constexpr):
    """Per channel of the block: the max / min over every chunk (as _set_range), BJ chunks at a time
    (a BatchNorm on a large GPU has hundreds of chunks per channel); 1.0 for masked channels."""
    h = tl.full([BCC, BJ], float("-inf"), ACC)
    lw = tl.full([BCC, BJ], float("inf"), ACC)
    for j0 in range(0, nchunks, BJ):  # (elementwise per step, reduced once: see _bn_psum)
        idx, m = _bn_idx(ci, cm, j0, nchunks, BJ)
        h = tl.maximum(h, tl.load(HL + idx, mask=m, other=float("-inf")))
        lw = tl.minimum(lw, tl.load(HL + C * nchunks + idx, mask=m, other=float("inf")))
    return tl.where(cm, tl.max(h, axis=1), 1.0), tl.where(cm, tl.min(lw, axis=1), 1.0)


@triton.jit
def _bn_all_plain(h, lw, exp_bound, n):
    """Whether every channel of the block is plain: then the block keeps the one-read moments of
    x - x0, else all its channels take the scaled statistics (the moments and apply kernels decide
    alike, per block)."""
    return tl.min(_plain(h, lw, exp_bound, n).to(tl.int32), axis=0)  # 1: all plain


@triton.jit
def _lanes1(cnt, mean, m2):
    """Per row of the tile: ``(count, mean, M2)`` from its lanes' Welford states (Chan et al.)."""
    n = tl.sum(cnt, axis=1)
    mb = tl.sum(cnt * mean, axis=1) / tl.maximum(n, 1.0)
    dm = mean - mb[:, None]
    return n, mb, tl.sum(m2 + cnt * dm * dm, axis=1)


@triton.jit
def _bn_combine(PM, ci, cm, C, nchunks, ACC: tl.constexpr, BCC: tl.constexpr, BJ: tl.constexpr):
    """Per channel: ``(count, mean, var)`` of the values the chunks' (count, mean, M2) describe
    by Chan et al.'s formula (the mean first, then every chunk's M2 plus its mean's deviation)."""
    n2 = tl.zeros([BCC, BJ], ACC)
    s2 = tl.zeros([BCC, BJ], ACC)
    for j0 in range(0, nchunks, BJ):  # (elementwise per step, reduced once: see _bn_psum)
        idx, m = _bn_idx(ci, cm, j0, nchunks, BJ)
        cnt = tl.load(PM + idx, mask=m, other=0.0)
        n2 += cnt
        s2 += cnt * tl.load(PM + C * nchunks + idx, mask=m, other=0.0)
    n = tl.sum(n2, axis=1)
    nn = tl.maximum(n, 1.0)
    mean = tl.sum(s2, axis=1) / nn
    q2 = tl.zeros([BCC, BJ], ACC)
    for j0 in range(0, nchunks, BJ):
        idx, m = _bn_idx(ci, cm, j0, nchunks, BJ)
        cnt = tl.load(PM + idx, mask=m, other=0.0)
        dm = tl.load(PM + C * nchunks + idx, mask=m, other=0.0) - mean[:, None]
        q2 += tl.load(PM + 2 * C * nchunks + idx, mask=m, other=0.0) + cnt * dm * dm
    return n, mean, tl.sum(q2, axis=1) / nn


@triton.jit
def _bn_psum(P, ci, cm, nchunks, ACC: tl.constexpr, BCC: tl.constexpr, BJ: tl.constexpr):
    """Per channel: the sum over chunks of one (C, nchunks) row block of partial sums.

    The chunks are summed elementwise per step and the tile reduced once after the loop, here and in
    :func:`_bn_range` / :func:`_bn_combine`: a reduction inside the loop whose result has two uses
    after it fails Triton 3.6's compiler for sm_90 (an assertion in its thread-locality pass; read by
    ``python -m tests.kernels.triton_compile`` under each Triton release)."""
    t = tl.zeros([BCC, BJ], ACC)
    for j0 in range(0, nchunks, BJ):
        idx, m = _bn_idx(ci, cm, j0, nchunks, BJ)
        t += tl.load(P + idx, mask=m, other=0.0)
    return tl.sum(t, axis=1)


@triton.jit
def _bn_saved(ST, ci, cm, C, ACC: tl.constexpr):
    shift = tl.load(ST + ci, mask=cm, other=0.0).to(ACC)
    inv = tl.load(ST + C + ci, mask=cm, other=1.0).to(ACC)
    cmean = tl.load(ST + 2 * C + ci, mask=cm, other=0.0).to(ACC)
    rstd = tl.load(ST + 3 * C + ci, mask=cm, other=0.0).to(ACC)
    return shift, inv, cmean, rstd


@triton.jit
def bn_stats_kernel(
    X, HL, PM, C, E, E2, s_c, s_e1, s_e2, CH, nchunks, exp_bound,
    ACC: tl.constexpr, BCC: tl.constexpr, BE: tl.constexpr,
):  # fmt: skip
    """Per block of channels and chunk, one read: max / min, and the count, mean and M2 of x - x0
    (x0 each channel's first value), as split_stats_kernel."""
    c0, jc, ci, cm, e_lo, e_hi = _bn_chunk(C, E, CH, BCC)
    x0 = tl.load(X + ci.to(tl.int64) * s_c, mask=cm, other=0.0).to(ACC)[:, None]
    hi, lo, mean, m2 = _range_state(ACC, BCC, BE)
    for e0 in range(e_lo, e_hi, BE):
        _, off, mask = _ce_offsets(c0, e0, e_hi, C, E2, s_c, s_e1, s_e2, BCC, BE)
        x = tl.load(X + off, mask=mask, other=x0).to(ACC)
        rc = 1.0 / tl.cast((e0 - e_lo) // BE + 1, ACC)
        hi, lo, mean, m2 = _range_step(hi, lo, mean, m2, x, x0, mask, rc)
    cnt = tl.where(cm[:, None], _run_counts(e_lo, e_hi, BE)[None, :], 0).to(ACC)
    n, mb, q = _lanes1(cnt, mean, m2)
    row = ci.to(tl.int64) * nchunks + jc
    tl.store(HL + row, tl.max(hi, axis=1), mask=cm)
    tl.store(HL + C * nchunks + row, tl.min(lo, axis=1), mask=cm)
    tl.store(PM + row, n, mask=cm)
    tl.store(PM + C * nchunks + row, mb, mask=cm)
    tl.store(PM + 2 * C * nchunks + row, q, mask=cm)


@triton.jit
def bn_moments_kernel(
    X, HL, PM, C, E, E2, s_c, s_e1, s_e2, CH, nchunks, exp_bound,
    ACC: tl.constexpr, BCC: tl.constexpr, BE: tl.constexpr, BJ: tl.constexpr,
):  # fmt: skip
    """Only for a block with a channel that is not plain (its programs return at once otherwise):
    each chunk's moments of the scaled values, over bn_stats_kernel's."""
    c0, jc, ci, cm, e_lo, e_hi = _bn_chunk(C, E, CH, BCC)
    h, lw = _bn_range(HL, ci, cm, C, nchunks, ACC, BCC, BJ)
    if _bn_all_plain(h, lw, exp_bound, E) == 0:
        mid, inv = _shift_scale(h, lw, exp_bound)
        mean = tl.zeros([BCC, BE], ACC)
        m2 = tl.zeros([BCC, BE], ACC)
        for e0 in range(e_lo, e_hi, BE):  # Welford per lane, as _moments
            _, off, mask = _ce_offsets(c0, e0, e_hi, C, E2, s_c, s_e1, s_e2, BCC, BE)
            v = (tl.load(X + off, mask=mask, other=0.0).to(ACC) - mid[:, None]) * inv[:, None]
            mean, m2 = _welford_at(mean, m2, v, mask, 1.0 / tl.cast((e0 - e_lo) // BE + 1, ACC))
        cnt = tl.where(cm[:, None], _run_counts(e_lo, e_hi, BE)[None, :], 0).to(ACC)
        n, mb, q = _lanes1(cnt, mean, m2)
        row = ci.to(tl.int64) * nchunks + jc
        tl.store(PM + row, n, mask=cm)
        tl.store(PM + C * nchunks + row, mb, mask=cm)
        tl.store(PM + 2 * C * nchunks + row, q, mask=cm)


@triton.jit
def bn_apply_kernel(
    X, Y, W, B, ST, HL, PM, C, E, E2, s_c, s_e1, s_e2, CH, nchunks, eps, exp_bound,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr, BCC: tl.constexpr, BE: tl.constexpr,
    BJ: tl.constexpr,
):  # fmt: skip
    c0, jc, ci, cm, e_lo, e_hi = _bn_chunk(C, E, CH, BCC)
    h, lw = _bn_range(HL, ci, cm, C, nchunks, ACC, BCC, BJ)
    mid = tl.load(X + ci.to(tl.int64) * s_c, mask=cm, other=0.0).to(ACC)
    inv = mid * 0.0 + 1.0
    if _bn_all_plain(h, lw, exp_bound, E) == 0:
        mid, inv = _shift_scale(h, lw, exp_bound)
    n, cmean, var = _bn_combine(PM, ci, cm, C, nchunks, ACC, BCC, BJ)
    rstd = _rstd(var, inv, eps)
    for e0 in range(e_lo, e_hi, BE):
        _, off, mask = _ce_offsets(c0, e0, e_hi, C, E2, s_c, s_e1, s_e2, BCC, BE)
        x = tl.load(X + off, mask=mask, other=0.0).to(ACC)
        y = ((x - mid[:, None]) * inv[:, None] - cmean[:, None]) * rstd[:, None]
        y = _affine(y, W, B, ci, cm, HAS_W, HAS_B, ACC)
        tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)
    if jc == 0:
        _store_stats(ST, ci, cm, C, mid, inv, cmean, rstd, var, n, False)  # (sets: the channels)


@triton.jit
def bn_bwd_sums_kernel(
    DY, X, ST, P, C, E, E2, s_c, s_e1, s_e2, CH, nchunks,
    ACC: tl.constexpr, BCC: tl.constexpr, BE: tl.constexpr,
):  # fmt: skip
    """Per channel and chunk: sum dy (dbias) and sum dy * x_hat (dweight); with the per-channel
    weight, the dx formula's sums of g = w * dy are these times w."""
    c0, jc, ci, cm, e_lo, e_hi = _bn_chunk(C, E, CH, BCC)
    shift, inv, cmean, rstd = _bn_saved(ST, ci, cm, C, ACC)
    s1 = tl.zeros([BCC, BE], ACC)
    s2 = tl.zeros([BCC, BE], ACC)
    for e0 in range(e_lo, e_hi, BE):
        _, off, mask = _ce_offsets(c0, e0, e_hi, C, E2, s_c, s_e1, s_e2, BCC, BE)
        x = tl.load(X + off, mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + off, mask=mask, other=0.0).to(ACC)
        s1 += dy
        s2 += dy * tl.where(mask, ((x - shift[:, None]) * inv[:, None] - cmean[:, None]) * rstd[:, None], 0.0)
    row = ci.to(tl.int64) * nchunks + jc
    tl.store(P + row, tl.sum(s1, axis=1), mask=cm)
    tl.store(P + C * nchunks + row, tl.sum(s2, axis=1), mask=cm)


@triton.jit
def bn_bwd_dx_kernel(
    DY, X, W, ST, P, DX, C, E, E2, s_c, s_e1, s_e2, CH, nchunks,
    HAS_W: tl.constexpr, ACC: tl.constexpr, BCC: tl.constexpr, BE: tl.constexpr, BJ: tl.constexpr,
):  # fmt: skip
    c0, jc, ci, cm, e_lo, e_hi = _bn_chunk(C, E, CH, BCC)
    shift, inv, cmean, rstd = _bn_saved(ST, ci, cm, C, ACC)
    n = tl.load(ST + 5 * C + ci, mask=cm, other=1.0).to(ACC)
    w = tl.full([BCC], 1.0, ACC)
    if HAS_W:
        w = tl.load(W + ci, mask=cm, other=1.0).to(ACC)
    mg = w * _bn_psum(P, ci, cm, nchunks, ACC, BCC, BJ) / n
    mgx = w * _bn_psum(P + C * nchunks, ci, cm, nchunks, ACC, BCC, BJ) / n
    rt = rstd * inv  # the true 1 / sqrt(var + eps)
    for e0 in range(e_lo, e_hi, BE):
        _, off, mask = _ce_offsets(c0, e0, e_hi, C, E2, s_c, s_e1, s_e2, BCC, BE)
        x = tl.load(X + off, mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + off, mask=mask, other=0.0).to(ACC)
        xh = ((x - shift[:, None]) * inv[:, None] - cmean[:, None]) * rstd[:, None]
        dx = rt[:, None] * (w[:, None] * dy - mg[:, None] - xh * mgx[:, None])
        tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=mask)


# --- LayerNorm2d on NCHW memory: blocks of positions, every channel ---------------------------------
#
# LayerNorm2d's set (n, s) holds the C values of one position, S apart: the per-set walk gives each
# program C scattered values. Here a program takes BE consecutive positions (contiguous in every
# channel plane) and walks the channels in tiles (the (C, E) walk again, E = N * S, set k = e), so
# every load is a coalesced row and each reduction is per position (axis 0); a block's values are
# re-read from cache by the second and third passes. The backward writes each program's per-channel
# dweight / dbias terms (PW, PB: one row of C per program), summed by the launcher.


@triton.jit
def _ln2d_saved(ST, ei, em, E, ACC: tl.constexpr, WIDE: tl.constexpr):
    shift = tl.load(ST + ei, mask=em, other=0.0).to(ACC)[None, :]
    inv = tl.load(ST + _srow(1, E, WIDE) + ei, mask=em, other=1.0).to(ACC)[None, :]
    cm = tl.load(ST + _srow(2, E, WIDE) + ei, mask=em, other=0.0).to(ACC)[None, :]
    rstd = tl.load(ST + _srow(3, E, WIDE) + ei, mask=em, other=0.0).to(ACC)[None, :]
    return shift, inv, cm, rstd


@triton.jit
def ln2d_fwd_kernel(
    X, Y, W, B, ST, C, E, E2, s_c, s_e1, s_e2, eps, exp_bound,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr, BCC: tl.constexpr, BE: tl.constexpr,
    WIDE: tl.constexpr = False,
):  # fmt: skip
    e0 = _block_start(tl.program_id(0), BE, E)
    ei = e0 + tl.arange(0, BE)
    em = ei < E
    # 1. one read: per position the range of x and the moments of x - x0 (x0: its channel-0 value)
    off0 = (ei // E2).to(tl.int64) * s_e1 + (ei % E2).to(tl.int64) * s_e2
    x0 = tl.load(X + off0, mask=em, other=0.0).to(ACC)
    hi, lo, mean, m2 = _range_state(ACC, BCC, BE)
    for c0 in range(0, C, BCC):
        _, off, mask = _ce_offsets(c0, e0, E, C, E2, s_c, s_e1, s_e2, BCC, BE)
        x = tl.load(X + off, mask=mask, other=x0[None, :]).to(ACC)
        hi, lo, mean, m2 = _range_step(
            hi, lo, mean, m2, x, x0[None, :], mask, 1.0 / tl.cast(c0 // BCC + 1, ACC)
        )
    h = tl.where(em, tl.max(hi, axis=0), 1.0)  # (masked positions: any finite value)
    lw = tl.where(em, tl.min(lo, axis=0), 1.0)
    cnt = tl.where(em[None, :], _run_counts(0, C, BCC)[:, None], 0).to(ACC)
    n, cmean, var = _lanes0(cnt, mean, m2)
    mid = x0
    inv = x0 * 0.0 + 1.0
    if tl.min(_plain(h, lw, exp_bound, C).to(tl.int32), axis=0) == 0:
        # 2. rare: a position's values leave float range -> the block's scaled statistics, one more read
        mid, inv = _shift_scale(h, lw, exp_bound)
        mean = tl.zeros([BCC, BE], ACC)
        m2 = tl.zeros([BCC, BE], ACC)
        for c0 in range(0, C, BCC):
            _, off, mask = _ce_offsets(c0, e0, E, C, E2, s_c, s_e1, s_e2, BCC, BE)
            v = (tl.load(X + off, mask=mask, other=0.0).to(ACC) - mid[None, :]) * inv[None, :]
            mean, m2 = _welford_at(mean, m2, v, mask, 1.0 / tl.cast(c0 // BCC + 1, ACC))
        n, cmean, var = _lanes0(cnt, mean, m2)
    rstd = _rstd(var, inv, eps)
    # 3. the output
    for c0 in range(0, C, BCC):
        ci, off, mask = _ce_offsets(c0, e0, E, C, E2, s_c, s_e1, s_e2, BCC, BE)
        x = tl.load(X + off, mask=mask, other=0.0).to(ACC)
        y = ((x - mid[None, :]) * inv[None, :] - cmean[None, :]) * rstd[None, :]
        y = _affine(y, W, B, ci, ci < C, HAS_W, HAS_B, ACC)
        tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)
    _store_stats(ST, ei, em, E, mid, inv, cmean, rstd, var, n, WIDE)


@triton.jit
def ln2d_bwd_kernel(
    DY, X, W, ST, DX, PW, PB, C, E, E2, s_c, s_e1, s_e2,
    HAS_W: tl.constexpr, NEED_DX: tl.constexpr, NEED_P: tl.constexpr, ACC: tl.constexpr,
    BCC: tl.constexpr, BE: tl.constexpr, WIDE: tl.constexpr = False,
):  # fmt: skip
    pid = tl.program_id(0)
    e0 = _block_start(pid, BE, E)
    ei = e0 + tl.arange(0, BE)
    em = ei < E
    shift, inv, cm, rstd = _ln2d_saved(ST, ei, em, E, ACC, WIDE)
    n = tl.load(ST + _srow(5, E, WIDE) + ei, mask=em, other=1.0).to(ACC)
    # 1. per position: sums of g = w * dy and g * x_hat; per channel: this block's dy * x_hat, dy
    a1 = tl.zeros([BCC, BE], ACC)
    a2 = tl.zeros([BCC, BE], ACC)
    for c0 in range(0, C, BCC):
        ci, off, mask = _ce_offsets(c0, e0, E, C, E2, s_c, s_e1, s_e2, BCC, BE)
        x = tl.load(X + off, mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + off, mask=mask, other=0.0).to(ACC)
        xh = tl.where(mask, ((x - shift) * inv - cm) * rstd, 0.0)
        g = _affine(dy, W, W, ci, ci < C, HAS_W, False, ACC)
        a1 += g
        a2 += g * xh
        if NEED_P:
            tl.store(PW + pid.to(tl.int64) * C + ci, tl.sum(dy * xh, axis=1), mask=ci < C)
            tl.store(PB + pid.to(tl.int64) * C + ci, tl.sum(dy, axis=1), mask=ci < C)
    if NEED_DX:
        mg = (tl.sum(a1, axis=0) / n)[None, :]
        mgx = (tl.sum(a2, axis=0) / n)[None, :]
        rt = rstd * inv  # the true 1 / sqrt(var + eps)
        # 2. dx = rt * (g - mean(g) - x_hat * mean(g * x_hat))
        for c0 in range(0, C, BCC):
            ci, off, mask = _ce_offsets(c0, e0, E, C, E2, s_c, s_e1, s_e2, BCC, BE)
            x = tl.load(X + off, mask=mask, other=0.0).to(ACC)
            dy = tl.load(DY + off, mask=mask, other=0.0).to(ACC)
            xh = ((x - shift) * inv - cm) * rstd
            g = _affine(dy, W, W, ci, ci < C, HAS_W, False, ACC)
            tl.store(DX + off, (rt * (g - mg - xh * mgx)).to(DX.dtype.element_ty), mask=mask)


# --- Proxy Norm's activation step: out = (act(w * y + b) - m) * rstd, per channel ------------------
#
# The tensor is walked as a (C, E) matrix, E = N * positions: element (c, e) lies at c * s_c +
# (e // E2) * s_e1 + (e % E2) * s_e2 (NCHW: s_c = S, E2 = S; channels last: s_c = 1, E2 = 1), one
# program per block of channels and chunk of E (``SL`` holds leaky_relu's slope in the accumulation
# dtype). The backward recomputes ``a = w * y + b`` and writes each program's per-channel sums; the
# launcher adds the chunks.
# Activation codes: 0 relu, 1 leaky_relu, 2 silu, 3 gelu, 4 gelu_tanh, 5 sigmoid, 6 tanh, 7 identity.


@triton.jit
def _act_fwd(a, slope, ACT: tl.constexpr):
    if ACT == 0:
        z = tl.maximum(a, 0.0)
    elif ACT == 1:
        z = tl.where(a > 0, a, a * slope)
    elif ACT == 2:
        z = a * tl.sigmoid(a)
    elif ACT == 3:
        z = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))
    elif ACT == 4:
        u = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        z = 0.5 * a * (1.0 + (2.0 * tl.sigmoid(2.0 * u) - 1.0))
    elif ACT == 5:
        z = tl.sigmoid(a)
    elif ACT == 6:
        z = 2.0 * tl.sigmoid(2.0 * a) - 1.0
    else:
        z = a
    return z


@triton.jit
def _act_grad(a, z, slope, ACT: tl.constexpr):
    """act'(a), with z = act(a)."""
    if ACT == 0:
        d = tl.where(a > 0, 1.0, 0.0)
    elif ACT == 1:
        d = tl.where(a > 0, 1.0, slope)
    elif ACT == 2:
        s = tl.sigmoid(a)
        d = s * (1.0 + a * (1.0 - s))
    elif ACT == 3:
        d = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476)) + a * 0.3989422804014327 * tl.exp(-0.5 * a * a)
    elif ACT == 4:
        u = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        d = 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * a * a)
    elif ACT == 5:
        d = z * (1.0 - z)
    elif ACT == 6:
        d = 1.0 - z * z
    else:
        d = a * 0.0 + 1.0
    return d


@triton.jit
def _ce_offsets(c0, e0, e_hi, C, E2, s_c, s_e1, s_e2, BCC: tl.constexpr, BE: tl.constexpr):
    ci = c0 + tl.arange(0, BCC)
    ei = e0 + tl.arange(0, BE)
    off = (
        ci.to(tl.int64)[:, None] * s_c
        + (ei // E2).to(tl.int64)[None, :] * s_e1
        + (ei % E2).to(tl.int64)[None, :] * s_e2
    )
    mask = (ci < C)[:, None] & (ei < e_hi)[None, :]
    return ci, off, mask


@triton.jit
def proxy_act_fwd_kernel(
    Yn,
    W,
    B,
    MU,
    R,
    SL,
    OUT,
    C,
    E,
    E2,
    s_c,
    s_e1,
    s_e2,
    CH,
    ACT: tl.constexpr,
    ACC: tl.constexpr,
    BCC: tl.constexpr,
    BE: tl.constexpr,
):
    slope = tl.load(SL).to(ACC)
    c0 = tl.program_id(0) * BCC
    e_lo = _block_start(tl.program_id(1), CH, E)
    e_hi = tl.minimum(e_lo + CH, E)
    ci = c0 + tl.arange(0, BCC)
    cm = ci < C
    w = tl.load(W + ci, mask=cm, other=0.0).to(ACC)[:, None]
    b = tl.load(B + ci, mask=cm, other=0.0).to(ACC)[:, None]
    mu = tl.load(MU + ci, mask=cm, other=0.0).to(ACC)[:, None]
    r = tl.load(R + ci, mask=cm, other=0.0).to(ACC)[:, None]
    for e0 in range(e_lo, e_hi, BE):
        _, off, mask = _ce_offsets(c0, e0, e_hi, C, E2, s_c, s_e1, s_e2, BCC, BE)
        y = tl.load(Yn + off, mask=mask, other=0.0).to(ACC)
        z = _act_fwd(w * y + b, slope, ACT)
        tl.store(OUT + off, ((z - mu) * r).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def proxy_act_bwd_kernel(
    DOUT,
    Yn,
    W,
    B,
    MU,
    R,
    SL,
    DY,
    P,
    C,
    E,
    E2,
    s_c,
    s_e1,
    s_e2,
    CH,
    nchunks,
    NEED_DY: tl.constexpr,
    ACT: tl.constexpr,
    ACC: tl.constexpr,
    BCC: tl.constexpr,
    BE: tl.constexpr,
):
    slope = tl.load(SL).to(ACC)
    c0 = tl.program_id(0) * BCC
    jc = tl.program_id(1)
    e_lo = _block_start(jc, CH, E)
    e_hi = tl.minimum(e_lo + CH, E)
    ci = c0 + tl.arange(0, BCC)
    cm = ci < C
    w = tl.load(W + ci, mask=cm, other=0.0).to(ACC)[:, None]
    b = tl.load(B + ci, mask=cm, other=0.0).to(ACC)[:, None]
    mu = tl.load(MU + ci, mask=cm, other=0.0).to(ACC)[:, None]
    r = tl.load(R + ci, mask=cm, other=0.0).to(ACC)[:, None]
    s_w = tl.zeros([BCC, BE], ACC)  # sum da * y      (dweight)
    s_b = tl.zeros([BCC, BE], ACC)  # sum da          (dbias)
    s_g = tl.zeros([BCC, BE], ACC)  # sum g           (dm = -rstd * this)
    s_r = tl.zeros([BCC, BE], ACC)  # sum g * (z - m) (drstd)
    for e0 in range(e_lo, e_hi, BE):
        _, off, mask = _ce_offsets(c0, e0, e_hi, C, E2, s_c, s_e1, s_e2, BCC, BE)
        y = tl.load(Yn + off, mask=mask, other=0.0).to(ACC)
        g = tl.load(DOUT + off, mask=mask, other=0.0).to(ACC)
        a = w * y + b
        z = _act_fwd(a, slope, ACT)
        da = tl.where(mask, g * r * _act_grad(a, z, slope, ACT), 0.0)
        if NEED_DY:
            tl.store(DY + off, (da * w).to(DY.dtype.element_ty), mask=mask)
        s_w += da * y
        s_b += da
        s_g += g
        s_r += tl.where(mask, g * (z - mu), 0.0)
    row = ci.to(tl.int64) * nchunks + jc
    tl.store(P + row, tl.sum(s_w, axis=1), mask=cm)
    tl.store(P + C * nchunks + row, tl.sum(s_b, axis=1), mask=cm)
    tl.store(P + 2 * C * nchunks + row, tl.sum(s_g, axis=1), mask=cm)
    tl.store(P + 3 * C * nchunks + row, tl.sum(s_r, axis=1), mask=cm)


# Proxy Norm's statistics (normkit.functional.proxy_stats): per channel c, over the n quadrature points u,
# a = w * ((1 + pw) * u + pb) + b, z = act(a), m = mean(z), v = mean((z - m)^2), rstd = 1 / sqrt(v + eps).
# One program per block of channels, all n points in one tile (n <= 4096: the launcher checks).


@triton.jit
def _proxy_points(W, B, PB, PW, U, c0, C, n, ACC: tl.constexpr, BCC: tl.constexpr, BN: tl.constexpr):
    ci = c0 + tl.arange(0, BCC)
    cm = ci < C
    ni = tl.arange(0, BN)
    valid = cm[:, None] & (ni < n)[None, :]
    w = tl.load(W + ci, mask=cm, other=0.0).to(ACC)[:, None]
    b = tl.load(B + ci, mask=cm, other=0.0).to(ACC)[:, None]
    pb = tl.load(PB + ci, mask=cm, other=0.0).to(ACC)[:, None]
    pw = tl.load(PW + ci, mask=cm, other=0.0).to(ACC)[:, None]
    u = tl.load(U + ni, mask=ni < n, other=0.0).to(ACC)[None, :]
    yt = (1.0 + pw) * u + pb
    return ci, cm, valid, w, u, yt, w * yt + b


@triton.jit
def proxy_stats_fwd_kernel(
    W, B, PB, PW, U, SL, MU, R, C, n, eps,
    ACT: tl.constexpr, ACC: tl.constexpr, BCC: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    slope = tl.load(SL).to(ACC)
    ci, cm, valid, w, u, yt, a = _proxy_points(W, B, PB, PW, U, tl.program_id(0) * BCC, C, n, ACC, BCC, BN)
    z = _act_fwd(a, slope, ACT)
    m = tl.sum(tl.where(valid, z, 0.0), axis=1) / n
    d = tl.where(valid, z - m[:, None], 0.0)
    v = tl.sum(d * d, axis=1) / n
    tl.store(MU + ci, m, mask=cm)
    tl.store(R + ci, 1.0 / tl.sqrt(v + eps), mask=cm)


@triton.jit
def proxy_stats_bwd_kernel(
    W, B, PB, PW, U, SL, MU, R, DM, DR, P, NP, NK, G, C, n,
    ACT: tl.constexpr, ACC: tl.constexpr, BCC: tl.constexpr, BN: tl.constexpr, FROM_SUMS: tl.constexpr,
):  # fmt: skip
    # dL/dz_k = (dm - dr * rstd^3 * (z_k - m)) / n (v's dependence on m vanishes: sum (z - m) = 0);
    # G's four rows: dweight, dbias, dproxy_bias, dproxy_weight. FROM_SUMS: dm and drstd come from the
    # fused GroupNorm + step's backward partial sums P, (4, NP, C, NK) contiguous, summed over NP and NK
    # here (rows: sum dout * x_hat-part of dweight, of dbias, sum dout, sum dout * (z - m)):
    # dm = -rstd * sum dout, drstd = sum dout * (z - m), and the first two rows add to dweight, dbias.
    slope = tl.load(SL).to(ACC)
    ci, cm, valid, w, u, yt, a = _proxy_points(W, B, PB, PW, U, tl.program_id(0) * BCC, C, n, ACC, BCC, BN)
    z = _act_fwd(a, slope, ACT)
    m = tl.load(MU + ci, mask=cm, other=0.0).to(ACC)
    r = tl.load(R + ci, mask=cm, other=0.0).to(ACC)
    sw = tl.zeros([BCC], dtype=ACC)
    sb = tl.zeros([BCC], dtype=ACC)
    if FROM_SUMS:
        sg = tl.zeros([BCC], dtype=ACC)
        sz = tl.zeros([BCC], dtype=ACC)
        row = NP * C * NK
        for j in range(0, NP):
            for k in range(0, NK):
                q = P + (j * C + ci) * NK + k
                sw += tl.load(q, mask=cm, other=0.0).to(ACC)
                sb += tl.load(q + row, mask=cm, other=0.0).to(ACC)
                sg += tl.load(q + 2 * row, mask=cm, other=0.0).to(ACC)
                sz += tl.load(q + 3 * row, mask=cm, other=0.0).to(ACC)
        dm = -r * sg
        dr = sz
    else:
        dm = tl.load(DM + ci, mask=cm, other=0.0).to(ACC)
        dr = tl.load(DR + ci, mask=cm, other=0.0).to(ACC)
    k3 = (dr * r * r * r)[:, None]
    da = tl.where(valid, (dm[:, None] - k3 * (z - m[:, None])) / n * _act_grad(a, z, slope, ACT), 0.0)
    tl.store(G + ci, tl.sum(da * yt, axis=1) + sw, mask=cm)
    tl.store(G + C + ci, tl.sum(da, axis=1) + sb, mask=cm)
    tl.store(G + 2 * C + ci, tl.sum(da * w, axis=1), mask=cm)
    tl.store(G + 3 * C + ci, tl.sum(da * w * u, axis=1), mask=cm)


# --- GroupNorm on channels-last memory: blocks of channels across groups, chunks of positions ------
#
# On channels-last memory a GroupNorm set (n, g) holds Cg contiguous channels of each of the sample's
# S positions, C apart: the per-set walk reads a short run per position (Cg = 2 for GroupNorm(32) on
# 64 channels, 1 for InstanceNorm; measured 5-7 % of an H200's bandwidth). Here a program takes one
# sample's block of BCC contiguous channels, across groups, by a chunk of positions, so each position
# of the tile is one coalesced run; the reductions are per channel (axis 1). Each channel's partial
# (max / min, and the count, mean and M2 of x - x0 with x0 its *group's* first value, so a group's
# channels share one shift) goes to a (N * C, nchunks) buffer in which a group's partials are one
# contiguous run, (n * C + g * Cg) * nchunks onwards; a small kernel combines each run into the set's
# saved statistics (the rare set whose range is not plain re-reads its values there, scaled); the
# apply kernel gathers each channel's set statistics. Forward: stats, combine, apply; backward:
# per-channel sums, per-set combination (with the weight), dx. With PN, Proxy Norm's activation step
# follows the affine, as in norm_fwd_kernel / norm_bwd_kernel.


@triton.jit
def _gcl_tile(C, S, CH, nCB, BCC: tl.constexpr):
    """This program's sample ``n``, its channels ``ci`` (mask ``cm``), chunk ``jc`` = positions
    ``[s_lo, s_hi)``, and the sample's base offset."""
    pid = tl.program_id(0)
    n = pid // nCB
    ci = (pid % nCB) * BCC + tl.arange(0, BCC)
    jc = tl.program_id(1)
    s_lo = _block_start(jc, CH, S)
    return n, ci, ci < C, jc, s_lo, tl.minimum(s_lo + CH, S), n.to(tl.int64) * S * C


@triton.jit
def _gcl_offsets(base, ci, cm, s0, s_hi, C, BE: tl.constexpr):
    si = s0 + tl.arange(0, BE)
    return base + si.to(tl.int64)[None, :] * C + ci[:, None], cm[:, None] & (si < s_hi)[None, :]


@triton.jit
def _gcl_saved(ST, k, cm, nsets, ACC: tl.constexpr, WIDE: tl.constexpr):
    """Per channel of the tile (``k`` its set): shift, scale, mean of the scaled values, rstd, as columns."""
    shift = tl.load(ST + k, mask=cm, other=0.0).to(ACC)[:, None]
    inv = tl.load(ST + _srow(1, nsets, WIDE) + k, mask=cm, other=1.0).to(ACC)[:, None]
    cmean = tl.load(ST + _srow(2, nsets, WIDE) + k, mask=cm, other=0.0).to(ACC)[:, None]
    rstd = tl.load(ST + _srow(3, nsets, WIDE) + k, mask=cm, other=0.0).to(ACC)[:, None]
    return shift, inv, cmean, rstd


@triton.jit
def _pn_vectors(W, B, MU, R, ci, cm, ACC: tl.constexpr):
    """Proxy Norm's per-channel ``(w, b, m, rstd)`` as columns of a tile."""
    w = tl.load(W + ci, mask=cm, other=0.0).to(ACC)[:, None]
    b = tl.load(B + ci, mask=cm, other=0.0).to(ACC)[:, None]
    mu = tl.load(MU + ci, mask=cm, other=0.0).to(ACC)[:, None]
    r = tl.load(R + ci, mask=cm, other=0.0).to(ACC)[:, None]
    return w, b, mu, r


@triton.jit
def gcl_stats_kernel(
    X, HL, PM, C, S, Cg, nCB, CH, nchunks, tot, exp_bound,
    ACC: tl.constexpr, BCC: tl.constexpr, BE: tl.constexpr,
):  # fmt: skip
    n, ci, cm, jc, s_lo, s_hi, base = _gcl_tile(C, S, CH, nCB, BCC)
    x0 = tl.load(X + base + (ci // Cg) * Cg, mask=cm, other=0.0).to(ACC)[:, None]  # the group's first
    hi, lo, mean, m2 = _range_state(ACC, BCC, BE)
    for s0 in range(s_lo, s_hi, BE):
        off, mask = _gcl_offsets(base, ci, cm, s0, s_hi, C, BE)
        x = tl.load(X + off, mask=mask, other=x0).to(ACC)
        rc = 1.0 / tl.cast((s0 - s_lo) // BE + 1, ACC)
        hi, lo, mean, m2 = _range_step(hi, lo, mean, m2, x, x0, mask, rc)
    cnt = tl.where(cm[:, None], _run_counts(s_lo, s_hi, BE)[None, :], 0).to(ACC)
    cn, mb, q = _lanes1(cnt, mean, m2)
    row = n * C * nchunks + ci * nchunks + jc  # (tot = N * C * nchunks entries per buffer row)
    tl.store(HL + row, tl.max(hi, axis=1), mask=cm)
    tl.store(HL + tot + row, tl.min(lo, axis=1), mask=cm)
    tl.store(PM + row, cn, mask=cm)
    tl.store(PM + tot + row, mb, mask=cm)
    tl.store(PM + 2 * tot + row, q, mask=cm)


@triton.jit
def gcl_combine_kernel(
    X, HL, PM, ST, C, S, SC, G, Cg, nchunks, tot, eps, exp_bound,
    ACC: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr, WIDE: tl.constexpr = False,
):  # fmt: skip
    """Set ``k = (n, g)``: its Cg * nchunks partials, one contiguous run, combined by Chan et al.'s
    formula into the six saved statistic rows; a set whose range is not plain takes the scaled
    statistics with one more (per-set, strided) read of its values."""
    k = tl.program_id(0)
    nsets = tl.num_programs(0)
    L = Cg * nchunks
    r0 = k.to(tl.int64) * L  # ((n * G + g) * Cg == n * C + g * Cg)
    h = tl.full([BL], float("-inf"), ACC)
    lw = tl.full([BL], float("inf"), ACC)
    cnt = tl.zeros([BL], ACC)
    s = tl.zeros([BL], ACC)
    for j0 in range(0, L, BL):
        j = j0 + tl.arange(0, BL)
        jm = j < L
        h = tl.maximum(h, tl.load(HL + r0 + j, mask=jm, other=float("-inf")))
        lw = tl.minimum(lw, tl.load(HL + tot + r0 + j, mask=jm, other=float("inf")))
        c = tl.load(PM + r0 + j, mask=jm, other=0.0)
        cnt += c
        s += c * tl.load(PM + tot + r0 + j, mask=jm, other=0.0)
    h = tl.max(h, axis=0)
    lw = tl.min(lw, axis=0)
    n = tl.sum(cnt, axis=0)
    cm = tl.sum(s, axis=0) / n
    mid = _first(X, k, G, SC, Cg, ACC)
    inv = mid * 0.0 + 1.0
    if _plain(h, lw, exp_bound, n).to(tl.int32) == 0:  # rare: the set's own walk, scaled
        mid, inv = _shift_scale(h, lw, exp_bound)
        _, cm, m2 = _moments(X, k, 0, Cg, 0, S, G, SC, Cg, 1, C, 0, 1, mid, inv, ACC, BC, BM)
    else:  # the partials' M2 plus each one's mean deviation (clamped partials could overflow: not here)
        q = tl.zeros([BL], ACC)
        for j0 in range(0, L, BL):
            j = j0 + tl.arange(0, BL)
            jm = j < L
            c = tl.load(PM + r0 + j, mask=jm, other=0.0)
            dm = tl.load(PM + tot + r0 + j, mask=jm, other=0.0) - cm
            q += tl.load(PM + 2 * tot + r0 + j, mask=jm, other=0.0) + c * dm * dm
        m2 = tl.sum(q, axis=0)
    var = m2 / n
    rstd = _rstd(var, inv, eps)
    _store_stats(ST, k, k < nsets, nsets, mid, inv, cm, rstd, var, n, WIDE)


@triton.jit
def gcl_apply_kernel(
    X, Y, W, B, ST, MU, R, SL, C, S, G, Cg, nCB, CH, nsets,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr, BCC: tl.constexpr, BE: tl.constexpr,
    PN: tl.constexpr = False, ACT: tl.constexpr = 7, WIDE: tl.constexpr = False,
):  # fmt: skip
    n, ci, cm, jc, s_lo, s_hi, base = _gcl_tile(C, S, CH, nCB, BCC)
    mid, inv, cmean, rstd = _gcl_saved(ST, n * G + ci // Cg, cm, nsets, ACC, WIDE)
    if PN:
        slope = tl.load(SL).to(ACC)
        mu = tl.load(MU + ci, mask=cm, other=0.0).to(ACC)[:, None]
        r = tl.load(R + ci, mask=cm, other=0.0).to(ACC)[:, None]
    for s0 in range(s_lo, s_hi, BE):
        off, mask = _gcl_offsets(base, ci, cm, s0, s_hi, C, BE)
        x = tl.load(X + off, mask=mask, other=0.0).to(ACC)
        y = _affine(((x - mid) * inv - cmean) * rstd, W, B, ci, cm, HAS_W, HAS_B, ACC)
        if PN:
            y = (_act_fwd(y, slope, ACT) - mu) * r
        tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def gcl_bwd_sums_kernel(
    DY, X, W, B, ST, MU, R, SL, P, C, S, G, Cg, nCB, CH, nchunks, tot, nsets,
    ACC: tl.constexpr, BCC: tl.constexpr, BE: tl.constexpr, PN: tl.constexpr = False, ACT: tl.constexpr = 7,
    WIDE: tl.constexpr = False,
):  # fmt: skip
    """Per channel and chunk: sum dy * x_hat and sum dy (dweight, dbias); with PN, ``dy`` is taken
    back through Proxy Norm's step first, and the step's own sums (sum dout, sum dout * (z - m)) follow."""
    n, ci, cm, jc, s_lo, s_hi, base = _gcl_tile(C, S, CH, nCB, BCC)
    k = n * G + ci // Cg
    shift, inv, cmean, rstd = _gcl_saved(ST, k, cm, nsets, ACC, WIDE)
    s1 = tl.zeros([BCC, BE], ACC)
    s2 = tl.zeros([BCC, BE], ACC)
    if PN:
        slope = tl.load(SL).to(ACC)
        w, b, mu, r = _pn_vectors(W, B, MU, R, ci, cm, ACC)
        s3 = tl.zeros([BCC, BE], ACC)
        s4 = tl.zeros([BCC, BE], ACC)
    for s0 in range(s_lo, s_hi, BE):
        off, mask = _gcl_offsets(base, ci, cm, s0, s_hi, C, BE)
        x = tl.load(X + off, mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + off, mask=mask, other=0.0).to(ACC)
        xh = tl.where(mask, ((x - shift) * inv - cmean) * rstd, 0.0)
        if PN:
            a = w * xh + b
            z = _act_fwd(a, slope, ACT)
            s3 += dy
            s4 += tl.where(mask, dy * (z - mu), 0.0)
            dy = tl.where(mask, dy * r * _act_grad(a, z, slope, ACT), 0.0)
        s1 += dy * xh
        s2 += dy
    row = n * C * nchunks + ci * nchunks + jc
    tl.store(P + row, tl.sum(s1, axis=1), mask=cm)
    tl.store(P + tot + row, tl.sum(s2, axis=1), mask=cm)
    if PN:
        tl.store(P + 2 * tot + row, tl.sum(s3, axis=1), mask=cm)
        tl.store(P + 3 * tot + row, tl.sum(s4, axis=1), mask=cm)


@triton.jit
def gcl_bwd_combine_kernel(
    W, P, PA, G, Cg, nchunks, tot, HAS_W: tl.constexpr, ACC: tl.constexpr, BL: tl.constexpr
):  # fmt: skip
    """Set ``k``: the sums of g = w * dy and g * x_hat over its channels' chunks (one contiguous run)."""
    k = tl.program_id(0)
    nsets = tl.num_programs(0)
    L = Cg * nchunks
    r0 = k.to(tl.int64) * L
    c0 = (k % G) * Cg  # the group's first channel
    a1 = tl.zeros([BL], ACC)
    a2 = tl.zeros([BL], ACC)
    for j0 in range(0, L, BL):
        j = j0 + tl.arange(0, BL)
        jm = j < L
        w = tl.full([BL], 1.0, ACC)
        if HAS_W:
            w = tl.load(W + c0 + j // nchunks, mask=jm, other=0.0).to(ACC)
        a1 += w * tl.load(P + tot + r0 + j, mask=jm, other=0.0)
        a2 += w * tl.load(P + r0 + j, mask=jm, other=0.0)
    tl.store(PA + k, tl.sum(a1, axis=0))
    tl.store(PA + nsets + k, tl.sum(a2, axis=0))


@triton.jit
def gcl_bwd_dx_kernel(
    DY, X, W, B, ST, MU, R, SL, PA, DX, C, S, G, Cg, nCB, CH, nsets,
    HAS_W: tl.constexpr, ACC: tl.constexpr, BCC: tl.constexpr, BE: tl.constexpr,
    PN: tl.constexpr = False, ACT: tl.constexpr = 7, WIDE: tl.constexpr = False,
):  # fmt: skip
    n, ci, cm, jc, s_lo, s_hi, base = _gcl_tile(C, S, CH, nCB, BCC)
    k = n * G + ci // Cg
    shift, inv, cmean, rstd = _gcl_saved(ST, k, cm, nsets, ACC, WIDE)
    cnt = tl.load(ST + _srow(5, nsets, WIDE) + k, mask=cm, other=1.0).to(ACC)[:, None]
    mg = tl.load(PA + k, mask=cm, other=0.0).to(ACC)[:, None] / cnt
    mgx = tl.load(PA + nsets + k, mask=cm, other=0.0).to(ACC)[:, None] / cnt
    rt = rstd * inv  # the true 1 / sqrt(var + eps)
    wt = tl.full([BCC, 1], 1.0, ACC)
    if HAS_W:
        wt = tl.load(W + ci, mask=cm, other=1.0).to(ACC)[:, None]
    if PN:
        slope = tl.load(SL).to(ACC)
        w, b, mu, r = _pn_vectors(W, B, MU, R, ci, cm, ACC)
    for s0 in range(s_lo, s_hi, BE):
        off, mask = _gcl_offsets(base, ci, cm, s0, s_hi, C, BE)
        x = tl.load(X + off, mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + off, mask=mask, other=0.0).to(ACC)
        xh = ((x - shift) * inv - cmean) * rstd
        if PN:
            a = w * xh + b
            dy = dy * r * _act_grad(a, _act_fwd(a, slope, ACT), slope, ACT)
        dx = rt * (wt * dy - mg - xh * mgx)
        tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=mask)


# --- BatchNorm's running statistics: normkit's update rule in one launch ----------------------------


@triton.jit
def _batch_moments(MEAN, VAR, ci, cm, C, var_scale, FROM_STATS: tl.constexpr, ACC: tl.constexpr):
    """A block of channels' batch mean and variance (times ``var_scale``): read from two vectors, or
    (``FROM_STATS``) from the forward kernels' saved statistics at ``MEAN`` (rows of ``C``: the shift,
    the inverse scale 2^-e, the mean and the variance of the scaled values; normkit.ops.core.mean_var)."""
    if FROM_STATS:
        shift = tl.load(MEAN + ci, mask=cm, other=0.0).to(ACC)
        s = 1.0 / tl.load(MEAN + C + ci, mask=cm, other=1.0).to(ACC)  # (exact: a power of two)
        m = shift + tl.load(MEAN + 2 * C + ci, mask=cm, other=0.0).to(ACC) * s
        v = tl.load(MEAN + 4 * C + ci, mask=cm, other=0.0).to(ACC) * s * s * var_scale  # (s * s: > 2^128)
    else:
        m = tl.load(MEAN + ci, mask=cm, other=0.0).to(ACC)
        v = tl.load(VAR + ci, mask=cm, other=0.0).to(ACC) * var_scale
    return m, v


@triton.jit
def _lerp(a, b, w):
    """torch.lerp's two forms (exact at either end)."""
    return tl.where(w < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


@triton.jit
def _running_block(MEAN, VAR, RM, RV, ci, cm, C, w, var_scale, FROM_STATS: tl.constexpr, ACC: tl.constexpr):
    """A block of channels' updated running mean and variance, ``lerp(running, batch, w)`` in ``ACC``,
    rounded once to the buffers' dtype."""
    rm = tl.load(RM + ci, mask=cm, other=0.0).to(ACC)
    rv = tl.load(RV + ci, mask=cm, other=0.0).to(ACC)
    m, v = _batch_moments(MEAN, VAR, ci, cm, C, var_scale, FROM_STATS, ACC)
    return _lerp(rm, m, w).to(RM.dtype.element_ty), _lerp(rv, v, w).to(RV.dtype.element_ty)


@triton.jit
def bn_running_kernel(
    MEAN, VAR, RM, RV, NBT, SKIP, C, momentum, var_scale,
    HAS_NBT: tl.constexpr, HAS_SKIP: tl.constexpr, CUMULATIVE: tl.constexpr, FROM_STATS: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program: ``running <- lerp(running, batch, factor)`` per channel, ``factor`` the momentum or
    (``CUMULATIVE``) ``1 / num_batches_tracked`` after this step, computed in ``ACC`` and rounded once to
    the buffers' dtype; a step whose result is not finite there anywhere (a non-finite batch mean or
    variance, or a value a float16 buffer cannot hold) leaves every buffer as it is, no device sync (as
    :func:`normkit.functional._running.update_running_stats`); ``num_batches_tracked`` advances by
    one for a finite step, ``num_skipped_updates`` for the other. ``VAR`` is the batch's unbiased
    variance, times ``var_scale`` for the biased one; with ``FROM_STATS`` the batch's mean and biased
    variance come from the saved statistics at ``MEAN`` (``var_scale`` then makes it the one stored)."""
    if CUMULATIVE:
        w = 1.0 / tl.maximum(tl.load(NBT) + 1, 1).to(ACC)  # (this step's weight, if it counts)
    else:
        w = tl.full([], momentum, ACC)
    fin = tl.full([BLOCK], 1, tl.int32)
    for c0 in range(0, C, BLOCK):
        ci = c0 + tl.arange(0, BLOCK)
        cm = ci < C
        m, v = _running_block(MEAN, VAR, RM, RV, ci, cm, C, w, var_scale, FROM_STATS, ACC)
        m, v = m.to(ACC), v.to(ACC)
        ok = (tl.abs(m) < float("inf")) & (tl.abs(v) < float("inf"))  # (False for NaN too)
        fin = fin & ok.to(tl.int32)
    f = tl.min(fin, axis=0)  # 1: every channel finite
    if HAS_NBT:
        tl.store(NBT, tl.load(NBT) + f.to(tl.int64))
        if HAS_SKIP:
            tl.store(SKIP, tl.load(SKIP) + (1 - f).to(tl.int64))
    if f == 1:
        for c0 in range(0, C, BLOCK):
            ci = c0 + tl.arange(0, BLOCK)
            cm = ci < C
            m, v = _running_block(MEAN, VAR, RM, RV, ci, cm, C, w, var_scale, FROM_STATS, ACC)
            tl.store(RM + ci, m, mask=cm)
            tl.store(RV + ci, v, mask=cm)
