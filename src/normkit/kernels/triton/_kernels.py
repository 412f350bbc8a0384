"""Triton kernels of ``normkit::norm``: one program per set, the set seen as a ``(NC, M)`` matrix.

Every kernel pattern of :mod:`normkit.kernels._plan` (BN on NCHW / channels-last, GN / IN / LN over
(C, H, W) on NCHW / channels-last, LN over a last dim, LayerNorm2d over C) is one parametrisation
of the same walk: set ``k`` starts at ``(k // D1) * B1 + (k % D1) * B2``; its element ``(i, m)``
(``i`` the channel within the set, ``m`` the position) lies at ``i * s_c + (m // M2) * s_m1 +
(m % M2) * s_m2`` from there, and its affine index is ``(k % D1) * CK + i``.

The forward is normkit's *scaled* two-pass (:func:`normkit.ops.core.norm_forward`): per-set
max / min give the mid-range shift and a power-of-two scale, then the mean of the scaled values,
then the centred second moment, then the output: four reads of the set, exact for every finite
input and with no data-dependent host decision. The saved statistics are the reference's six rows,
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
def norm_fwd_kernel(
    X, Y, W, B, ST, nsets, NC, M, M2, s_c, s_m1, s_m2, D1, B1, B2, CK, eps, exp_bound,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr,
):
    k = tl.program_id(0)
    n = (NC * M).to(ACC)
    # 1. mid-range shift and power-of-two scale
    hi = tl.full([BC, BM], float("-inf"), ACC)
    lo = tl.full([BC, BM], float("inf"), ACC)
    for c0 in range(0, NC, BC):
        for m0 in range(0, M, BM):
            _, off, mask = _offsets(k, c0, m0, D1, B1, B2, s_c, s_m1, s_m2, M2, NC, M, BC, BM)
            x = tl.load(X + off, mask=mask, other=0.0).to(ACC)
            hi = tl.maximum(hi, tl.where(mask, x, float("-inf")))
            lo = tl.minimum(lo, tl.where(mask, x, float("inf")))
    h = tl.max(tl.max(hi, axis=1), axis=0)
    l = tl.min(tl.min(lo, axis=1), axis=0)
    half = h * 0.5 - l * 0.5
    mid = h * 0.5 + l * 0.5
    est = tl.maximum(half, tl.maximum(tl.abs(h), tl.abs(l)) * 7.888609052210118e-31)  # 2^-100
    e = tl.minimum(tl.maximum(tl.floor(tl.log2(est)) + 1.0, -exp_bound), exp_bound)
    inv = tl.exp2(-e)
    # 2. mean of the scaled values, 3. their centred second moment
    acc = tl.zeros([BC, BM], ACC)
    for c0 in range(0, NC, BC):
        for m0 in range(0, M, BM):
            _, off, mask = _offsets(k, c0, m0, D1, B1, B2, s_c, s_m1, s_m2, M2, NC, M, BC, BM)
            x = tl.load(X + off, mask=mask, other=0.0).to(ACC)
            acc += tl.where(mask, (x - mid) * inv, 0.0)
    cm = tl.sum(tl.sum(acc, axis=1), axis=0) / n
    acc = tl.zeros([BC, BM], ACC)
    for c0 in range(0, NC, BC):
        for m0 in range(0, M, BM):
            _, off, mask = _offsets(k, c0, m0, D1, B1, B2, s_c, s_m1, s_m2, M2, NC, M, BC, BM)
            x = tl.load(X + off, mask=mask, other=0.0).to(ACC)
            d = tl.where(mask, (x - mid) * inv - cm, 0.0)
            acc += d * d
    var = tl.sum(tl.sum(acc, axis=1), axis=0) / n
    # rstd of the scaled values, 1 / sqrt(var + eps * inv^2) = 2^e / sqrt(var_true + eps), written so
    # that neither form overflows (inv^2 does for sets of tiny values): each side clamps its factor
    a = tl.minimum(inv, 1.0)
    c = tl.minimum(1.0 / inv, 1.0)
    rstd = tl.where(inv <= 1.0, 1.0 / tl.sqrt(var + eps * a * a), c / tl.sqrt(var * c * c + eps))
    # 4. the output
    cbase = (k % D1) * CK
    for c0 in range(0, NC, BC):
        for m0 in range(0, M, BM):
            ci, off, mask = _offsets(k, c0, m0, D1, B1, B2, s_c, s_m1, s_m2, M2, NC, M, BC, BM)
            x = tl.load(X + off, mask=mask, other=0.0).to(ACC)
            y = ((x - mid) * inv - cm) * rstd
            if HAS_W:
                y = y * tl.load(W + cbase + ci, mask=ci < NC, other=1.0).to(ACC)[:, None]
            if HAS_B:
                y = y + tl.load(B + cbase + ci, mask=ci < NC, other=0.0).to(ACC)[:, None]
            tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(ST + k, mid)
    tl.store(ST + nsets + k, inv)
    tl.store(ST + 2 * nsets + k, cm)
    tl.store(ST + 3 * nsets + k, rstd)
    tl.store(ST + 4 * nsets + k, var)
    tl.store(ST + 5 * nsets + k, n)


@triton.jit
def norm_bwd_kernel(
    DY, X, W, ST, DX, PW, PB, nsets, NC, M, M2, s_c, s_m1, s_m2, D1, B1, B2, CK,
    HAS_W: tl.constexpr, NEED_DX: tl.constexpr, NEED_P: tl.constexpr, ACC: tl.constexpr,
    BC: tl.constexpr, BM: tl.constexpr,
):
    k = tl.program_id(0)
    n = (NC * M).to(ACC)
    shift = tl.load(ST + k).to(ACC)
    inv = tl.load(ST + nsets + k).to(ACC)
    cm = tl.load(ST + 2 * nsets + k).to(ACC)
    rstd = tl.load(ST + 3 * nsets + k).to(ACC)
    cbase = (k % D1) * CK
    # 1. the set's sums of g = w * dy and g * x_hat; each channel's sums of dy * x_hat and dy
    a1 = tl.zeros([BC, BM], ACC)
    a2 = tl.zeros([BC, BM], ACC)
    for c0 in range(0, NC, BC):
        pw = tl.zeros([BC], ACC)
        pb = tl.zeros([BC], ACC)
        for m0 in range(0, M, BM):
            ci, off, mask = _offsets(k, c0, m0, D1, B1, B2, s_c, s_m1, s_m2, M2, NC, M, BC, BM)
            x = tl.load(X + off, mask=mask, other=0.0).to(ACC)
            dy = tl.load(DY + off, mask=mask, other=0.0).to(ACC)
            xh = tl.where(mask, ((x - shift) * inv - cm) * rstd, 0.0)
            g = dy
            if HAS_W:
                g = dy * tl.load(W + cbase + ci, mask=ci < NC, other=1.0).to(ACC)[:, None]
            a1 += g
            a2 += g * xh
            pw += tl.sum(dy * xh, axis=1)
            pb += tl.sum(dy, axis=1)
        if NEED_P:
            ci = c0 + tl.arange(0, BC)
            tl.store(PW + k.to(tl.int64) * NC + ci, pw, mask=ci < NC)
            tl.store(PB + k.to(tl.int64) * NC + ci, pb, mask=ci < NC)
    if NEED_DX:
        mg = tl.sum(tl.sum(a1, axis=1), axis=0) / n
        mgx = tl.sum(tl.sum(a2, axis=1), axis=0) / n
        rt = rstd * inv  # the true 1 / sqrt(var + eps)
        # 2. dx = rt * (g - mean(g) - x_hat * mean(g * x_hat))
        for c0 in range(0, NC, BC):
            for m0 in range(0, M, BM):
                ci, off, mask = _offsets(k, c0, m0, D1, B1, B2, s_c, s_m1, s_m2, M2, NC, M, BC, BM)
                x = tl.load(X + off, mask=mask, other=0.0).to(ACC)
                dy = tl.load(DY + off, mask=mask, other=0.0).to(ACC)
                xh = ((x - shift) * inv - cm) * rstd
                g = dy
                if HAS_W:
                    g = dy * tl.load(W + cbase + ci, mask=ci < NC, other=1.0).to(ACC)[:, None]
                dx = rt * (g - mg - xh * mgx)
                tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=mask)


# --- split reduction: a set cut into chunks of positions, one program per (set, chunk) -------------
#
# Chunks are runs of positions, or of channels where a set has more channels than positions (LN
# over (C, H, W) with an elementwise affine). Used where there are too few sets to fill the GPU (BatchNorm: one set per channel; GN / LN on a
# small batch). Three launches forward (each chunk's max / min; each chunk's count, mean and centred
# second moment of the scaled values; the output, after combining the chunks' moments with Chan's
# formula), two backward (each chunk's sums; dx). Every program recomputes the set's shift and scale
# from the chunks' max / min with the same instructions, so all of them agree bit for bit.


@triton.jit
def _set_scale(HL, k, nsets, nchunks, exp_bound, ACC: tl.constexpr, BJ: tl.constexpr):
    j = tl.arange(0, BJ)
    jm = j < nchunks
    row = k.to(tl.int64) * nchunks + j
    h = tl.max(tl.load(HL + row, mask=jm, other=float("-inf")), axis=0)
    l = tl.min(tl.load(HL + nsets * nchunks + row, mask=jm, other=float("inf")), axis=0)
    half = h * 0.5 - l * 0.5
    mid = h * 0.5 + l * 0.5
    est = tl.maximum(half, tl.maximum(tl.abs(h), tl.abs(l)) * 7.888609052210118e-31)  # 2^-100
    e = tl.minimum(tl.maximum(tl.floor(tl.log2(est)) + 1.0, -exp_bound), exp_bound)
    return mid, tl.exp2(-e)


@triton.jit
def _chunk(jc, CH, NC, M, SPLIT_C: tl.constexpr):
    """The chunk's channel and position ranges: a run of ``CH`` channels (``SPLIT_C``) or positions."""
    if SPLIT_C:
        c_lo = jc * CH
        c_hi = tl.minimum(c_lo + CH, NC)
        m_lo = jc * 0
        m_hi = M + jc * 0
    else:
        c_lo = jc * 0
        c_hi = NC + jc * 0
        m_lo = jc * CH
        m_hi = tl.minimum(m_lo + CH, M)
    return c_lo, c_hi, m_lo, m_hi


@triton.jit
def split_minmax_kernel(
    X, HL, nsets, nchunks, CH, NC, M, M2, s_c, s_m1, s_m2, D1, B1, B2,
    SPLIT_C: tl.constexpr, ACC: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr,
):
    k = tl.program_id(0)
    jc = tl.program_id(1)
    c_lo, c_hi, lo_m, hi_m = _chunk(jc, CH, NC, M, SPLIT_C)
    hi = tl.full([BC, BM], float("-inf"), ACC)
    lo = tl.full([BC, BM], float("inf"), ACC)
    for c0 in range(c_lo, c_hi, BC):
        for m0 in range(lo_m, hi_m, BM):
            _, off, mask = _offsets(k, c0, m0, D1, B1, B2, s_c, s_m1, s_m2, M2, c_hi, hi_m, BC, BM)
            x = tl.load(X + off, mask=mask, other=0.0).to(ACC)
            hi = tl.maximum(hi, tl.where(mask, x, float("-inf")))
            lo = tl.minimum(lo, tl.where(mask, x, float("inf")))
    row = k.to(tl.int64) * nchunks + jc
    tl.store(HL + row, tl.max(tl.max(hi, axis=1), axis=0))
    tl.store(HL + nsets * nchunks + row, tl.min(tl.min(lo, axis=1), axis=0))


@triton.jit
def split_moments_kernel(
    X, HL, PM, nsets, nchunks, CH, NC, M, M2, s_c, s_m1, s_m2, D1, B1, B2, exp_bound,
    SPLIT_C: tl.constexpr, ACC: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr, BJ: tl.constexpr,
):
    k = tl.program_id(0)
    jc = tl.program_id(1)
    c_lo, c_hi, lo_m, hi_m = _chunk(jc, CH, NC, M, SPLIT_C)
    mid, inv = _set_scale(HL, k, nsets, nchunks, exp_bound, ACC, BJ)
    cnt = ((c_hi - c_lo) * (hi_m - lo_m)).to(ACC)
    acc = tl.zeros([BC, BM], ACC)
    for c0 in range(c_lo, c_hi, BC):
        for m0 in range(lo_m, hi_m, BM):
            _, off, mask = _offsets(k, c0, m0, D1, B1, B2, s_c, s_m1, s_m2, M2, c_hi, hi_m, BC, BM)
            x = tl.load(X + off, mask=mask, other=0.0).to(ACC)
            acc += tl.where(mask, (x - mid) * inv, 0.0)
    mb = tl.sum(tl.sum(acc, axis=1), axis=0) / cnt
    acc = tl.zeros([BC, BM], ACC)
    for c0 in range(c_lo, c_hi, BC):
        for m0 in range(lo_m, hi_m, BM):
            _, off, mask = _offsets(k, c0, m0, D1, B1, B2, s_c, s_m1, s_m2, M2, c_hi, hi_m, BC, BM)
            x = tl.load(X + off, mask=mask, other=0.0).to(ACC)
            d = tl.where(mask, (x - mid) * inv - mb, 0.0)
            acc += d * d
    row = k.to(tl.int64) * nchunks + jc
    tl.store(PM + row, cnt)
    tl.store(PM + nsets * nchunks + row, mb)
    tl.store(PM + 2 * nsets * nchunks + row, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def split_apply_kernel(
    X, Y, W, B, ST, HL, PM, nsets, nchunks, CH, NC, M, M2, s_c, s_m1, s_m2, D1, B1, B2, CK, eps, exp_bound,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SPLIT_C: tl.constexpr, ACC: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr,
    BJ: tl.constexpr,
):
    k = tl.program_id(0)
    jc = tl.program_id(1)
    c_lo, c_hi, lo_m, hi_m = _chunk(jc, CH, NC, M, SPLIT_C)
    mid, inv = _set_scale(HL, k, nsets, nchunks, exp_bound, ACC, BJ)
    # Chan et al.'s combination of the chunks' (count, mean, M2)
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
    a = tl.minimum(inv, 1.0)
    c = tl.minimum(1.0 / inv, 1.0)
    rstd = tl.where(inv <= 1.0, 1.0 / tl.sqrt(var + eps * a * a), c / tl.sqrt(var * c * c + eps))
    cbase = (k % D1) * CK
    for c0 in range(c_lo, c_hi, BC):
        for m0 in range(lo_m, hi_m, BM):
            ci, off, mask = _offsets(k, c0, m0, D1, B1, B2, s_c, s_m1, s_m2, M2, c_hi, hi_m, BC, BM)
            x = tl.load(X + off, mask=mask, other=0.0).to(ACC)
            y = ((x - mid) * inv - cm) * rstd
            if HAS_W:
                y = y * tl.load(W + cbase + ci, mask=ci < c_hi, other=1.0).to(ACC)[:, None]
            if HAS_B:
                y = y + tl.load(B + cbase + ci, mask=ci < c_hi, other=0.0).to(ACC)[:, None]
            tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)
    if jc == 0:
        tl.store(ST + k, mid)
        tl.store(ST + nsets + k, inv)
        tl.store(ST + 2 * nsets + k, cm)
        tl.store(ST + 3 * nsets + k, rstd)
        tl.store(ST + 4 * nsets + k, var)
        tl.store(ST + 5 * nsets + k, n)


@triton.jit
def split_bwd_sums_kernel(
    DY, X, W, ST, PA, PW, PB, nsets, nchunks, CH, NC, M, M2, s_c, s_m1, s_m2, D1, B1, B2, CK,
    HAS_W: tl.constexpr, NEED_P: tl.constexpr, SPLIT_C: tl.constexpr, ACC: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr,
):
    k = tl.program_id(0)
    jc = tl.program_id(1)
    c_lo, c_hi, lo_m, hi_m = _chunk(jc, CH, NC, M, SPLIT_C)
    shift = tl.load(ST + k).to(ACC)
    inv = tl.load(ST + nsets + k).to(ACC)
    cm = tl.load(ST + 2 * nsets + k).to(ACC)
    rstd = tl.load(ST + 3 * nsets + k).to(ACC)
    cbase = (k % D1) * CK
    a1 = tl.zeros([BC, BM], ACC)
    a2 = tl.zeros([BC, BM], ACC)
    for c0 in range(c_lo, c_hi, BC):
        pw = tl.zeros([BC], ACC)
        pb = tl.zeros([BC], ACC)
        for m0 in range(lo_m, hi_m, BM):
            ci, off, mask = _offsets(k, c0, m0, D1, B1, B2, s_c, s_m1, s_m2, M2, c_hi, hi_m, BC, BM)
            x = tl.load(X + off, mask=mask, other=0.0).to(ACC)
            dy = tl.load(DY + off, mask=mask, other=0.0).to(ACC)
            xh = tl.where(mask, ((x - shift) * inv - cm) * rstd, 0.0)
            g = dy
            if HAS_W:
                g = dy * tl.load(W + cbase + ci, mask=ci < c_hi, other=1.0).to(ACC)[:, None]
            a1 += g
            a2 += g * xh
            pw += tl.sum(dy * xh, axis=1)
            pb += tl.sum(dy, axis=1)
        if NEED_P:
            ci = c0 + tl.arange(0, BC)
            prow = (k.to(tl.int64) * nchunks + jc) * NC + ci
            tl.store(PW + prow, pw, mask=ci < c_hi)
            tl.store(PB + prow, pb, mask=ci < c_hi)
    row = k.to(tl.int64) * nchunks + jc
    tl.store(PA + row, tl.sum(tl.sum(a1, axis=1), axis=0))
    tl.store(PA + nsets * nchunks + row, tl.sum(tl.sum(a2, axis=1), axis=0))


@triton.jit
def split_bwd_dx_kernel(
    DY, X, W, ST, PA, DX, nsets, nchunks, CH, NC, M, M2, s_c, s_m1, s_m2, D1, B1, B2, CK,
    HAS_W: tl.constexpr, SPLIT_C: tl.constexpr, ACC: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr, BJ: tl.constexpr,
):
    k = tl.program_id(0)
    jc = tl.program_id(1)
    c_lo, c_hi, lo_m, hi_m = _chunk(jc, CH, NC, M, SPLIT_C)
    shift = tl.load(ST + k).to(ACC)
    inv = tl.load(ST + nsets + k).to(ACC)
    cm = tl.load(ST + 2 * nsets + k).to(ACC)
    rstd = tl.load(ST + 3 * nsets + k).to(ACC)
    n = (NC * M).to(ACC)
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
            g = dy
            if HAS_W:
                g = dy * tl.load(W + cbase + ci, mask=ci < c_hi, other=1.0).to(ACC)[:, None]
            dx = rt * (g - mg - xh * mgx)
            tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=mask)
