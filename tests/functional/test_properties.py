"""Hypothesis property tests over the adversarial generators of TESTING.md §4.

Shapes: N in {0, 1, 2, odd}, spatial sizes including 0 and 1, C in {1, primes, 2^k}, G drawn from
the divisors of C, rank 2 to 5. Values: normal, offset + scale * N(0, 1) cancellation
(offset 1e2..1e7, scale 1e-4..1), constant tensors and constant channels, one 1e6 outlier,
alternating +-large values, (signed) zeros, subnormals, fp16-range values. eps in
{0, 1e-12, 1e-5, 0.5}; momentum in {0, 1, None, 0.1}.

Properties: output == float64 reference (and finite wherever the reference is), the running
statistics == reference, ValueError exactly when a set has one value, shift invariance,
positive-scale invariance (exact form: y(s x; s^2 eps) == y(x; eps)), batch independence /
permutation equivariance, and gradients == autograd through the reference.
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normkit.functional as nkf
from tests.reference import (
    ref_batch_norm,
    ref_group_norm,
    ref_instance_norm,
    ref_layer_norm,
    ref_layer_norm_2d,
)

F32, F64 = torch.float32, torch.float64
FAST = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

OPS = ["bn", "in", "gn", "ln2d_c", "ln2d_chw", "ln"]
EPS = [0.0, 1e-12, 1e-5, 0.5]
KINDS = [
    "normal",
    "cancel",
    "constant",
    "constant_channels",
    "outlier",
    "alternating",
    "zeros",
    "subnormal",
    "fp16_range",
    "near_fp16_max",
]


# --- generators ------------------------------------------------------------------------------


@st.composite
def case(draw, ops=OPS, kinds=KINDS, allow_empty=True, min_n=0):
    op = draw(st.sampled_from(ops))
    ns = [0, 1, 2, 3, 5] if allow_empty else [1, 2, 3, 5]
    N = draw(st.sampled_from([n for n in ns if n >= min_n]))
    C = draw(st.sampled_from([1, 2, 3, 4, 5, 7, 8, 16]))
    min_sp = 1 if op == "in" else 0
    n_sp = draw(st.integers(min_sp, 3))
    sizes = [0, 1, 2, 3, 4] if allow_empty else [1, 2, 3, 4]
    spatial = tuple(draw(st.sampled_from(sizes)) for _ in range(n_sp))
    if math.prod(spatial) * N * C > 600:  # keep it small and fast
        spatial = tuple(min(s, 2) for s in spatial)
    shape = (N, C, *spatial)
    G = draw(st.sampled_from([d for d in range(1, C + 1) if C % d == 0]))
    k_ln = draw(st.integers(1, len(shape) - 1))  # LN over the trailing k dims
    eps = draw(st.sampled_from(EPS))
    kind = draw(st.sampled_from(kinds))
    affine = draw(st.sampled_from(["wb", "w", "b", "none"]))
    tracked = draw(st.booleans())
    momentum = draw(st.sampled_from([0.0, 1.0, None, 0.1]))
    nbt0 = draw(st.integers(0, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    offset = draw(st.floats(2.0, 7.0))  # log10 of the cancellation offset
    scale = draw(st.floats(-4.0, 0.0))  # log10 of its spread
    return {
        "op": op,
        "shape": shape,
        "G": G,
        "k_ln": k_ln,
        "eps": eps,
        "kind": kind,
        "affine": affine,
        "tracked": tracked,
        "momentum": momentum,
        "nbt0": nbt0,
        "seed": seed,
        "offset": offset,
        "scale": scale,
    }


def make_x(c, dtype=F32) -> torch.Tensor:
    shape, kind = c["shape"], c["kind"]
    g = torch.Generator().manual_seed(c["seed"])
    z = torch.randn(shape, generator=g, dtype=F64)
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).to(F64)
    if kind == "normal":
        x = 0.3 + 2.0 * z
    elif kind == "cancel":
        x = float(sign.flatten()[0] if z.numel() else 1.0) * 10 ** c["offset"] + 10 ** c["scale"] * z
    elif kind == "constant":
        x = torch.full(shape, 1234.5, dtype=F64)
    elif kind == "constant_channels":
        x = z.clone()
        if len(shape) > 1 and shape[1] > 0:
            x[:, ::2] = -7.25
    elif kind == "outlier":
        x = 0.1 * z
        if x.numel():
            x.view(-1)[c["seed"] % x.numel()] = 1e6
    elif kind == "alternating":
        x = 1e6 * torch.where(torch.arange(z.numel()).reshape(shape) % 2 == 0, 1.0, -1.0).to(F64) + z
    elif kind == "zeros":
        x = 0.0 * sign  # +0.0 and -0.0
    elif kind == "subnormal":
        x = 1e-40 * z
    elif kind == "fp16_range":
        x = sign * (256.0 + (1e4 - 256.0) * torch.rand(shape, generator=g, dtype=F64))
    else:  # near_fp16_max
        x = sign * 6e4 * (0.9 + 0.1 * torch.rand(shape, generator=g, dtype=F64))
    return x.to(dtype)


def make_params(c, dtype=F32):
    pshape = pshape_of(c)
    g = torch.Generator().manual_seed(c["seed"] + 1)
    w = (1.0 + 0.5 * torch.randn(pshape, generator=g, dtype=F64)).to(dtype)  # some negative gammas
    b = (0.5 * torch.randn(pshape, generator=g, dtype=F64)).to(dtype)
    return (w if "w" in c["affine"] else None, b if "b" in c["affine"] else None)


def pshape_of(c):
    shape = c["shape"]
    return tuple(shape[len(shape) - c["k_ln"] :]) if c["op"] == "ln" else (shape[1],)


def running(c, dtype=F32):
    if not (c["tracked"] and c["op"] in ("bn", "in")):
        return None, None, None
    C = c["shape"][1]
    return (
        torch.linspace(-1, 1, C, dtype=dtype),
        torch.linspace(0.5, 2, C, dtype=dtype),
        torch.tensor(c["nbt0"], dtype=torch.long),
    )


def set_size(c) -> int:
    shape, op = c["shape"], c["op"]
    sp = math.prod(shape[2:])
    return {
        "bn": shape[0] * sp,
        "in": sp,
        "gn": shape[1] // c["G"] * sp,
        "ln2d_c": shape[1],
        "ln2d_chw": shape[1] * sp,
        "ln": math.prod(pshape_of(c)),
    }[op]


def raises_single(c) -> bool:
    return c["op"] in ("bn", "in", "gn", "ln2d_chw") and math.prod(c["shape"]) > 0 and set_size(c) == 1


def run(c, x, w, b, eps, rm=None, rv=None, nbt=None):
    """normkit -> (y, running_mean, running_var, num_batches_tracked)."""
    op = c["op"]
    mom = c["momentum"] if nbt is not None or c["momentum"] is not None else 0.1
    if op == "bn":
        return tuple(
            nkf.batch_norm(x, rm, rv, w, b, training=True, momentum=mom, eps=eps, num_batches_tracked=nbt)
        )
    if op == "in":
        return tuple(
            nkf.instance_norm(
                x, rm, rv, w, b, use_input_stats=True, momentum=mom, eps=eps, num_batches_tracked=nbt
            )
        )
    if op == "gn":
        return nkf.group_norm(x, c["G"], w, b, eps), None, None, None
    if op == "ln2d_c":
        return nkf.layer_norm_2d(x, w, b, eps, over="c"), None, None, None
    if op == "ln2d_chw":
        return nkf.layer_norm_2d(x, w, b, eps, over="chw"), None, None, None
    return nkf.layer_norm(x, pshape_of(c), w, b, eps), None, None, None


def ref(c, x, w, b, eps, rm=None, rv=None, nbt=None):
    op = c["op"]
    mom = c["momentum"] if nbt is not None or c["momentum"] is not None else 0.1
    if op == "bn":
        return tuple(
            ref_batch_norm(x, rm, rv, w, b, training=True, momentum=mom, eps=eps, num_batches_tracked=nbt)
        )
    if op == "in":
        return tuple(
            ref_instance_norm(
                x, rm, rv, w, b, use_input_stats=True, momentum=mom, eps=eps, num_batches_tracked=nbt
            )
        )
    if op == "gn":
        return ref_group_norm(x, c["G"], w, b, eps), None, None, None
    if op == "ln2d_c":
        return ref_layer_norm_2d(x, w, b, eps, over="c"), None, None, None
    if op == "ln2d_chw":
        return ref_layer_norm_2d(x, w, b, eps, over="chw"), None, None, None
    return ref_layer_norm(x, pshape_of(c), w, b, eps), None, None, None


def assert_matches_where_finite(y, r, rtol, atol):
    """``y`` equals the float64 reference wherever the reference is finite; there, y is finite."""
    fin = torch.isfinite(r)
    assert bool(torch.isfinite(y[fin]).all()), "non-finite output where the reference is finite"
    torch.testing.assert_close(y[fin].double(), r[fin], rtol=rtol, atol=atol)


# --- output == reference; errors exactly where a set has one value -------------------------


@FAST
@given(case())
def test_output_and_running_stats_match_reference(c):
    x = make_x(c)
    w, b = make_params(c)
    rm, rv, nbt = running(c)
    if c["momentum"] is None and rm is not None and nbt is None:
        nbt = torch.tensor(0)
    x_before = x.clone()
    if raises_single(c):
        try:
            run(c, x, w, b, c["eps"], rm, rv, nbt)
        except ValueError:
            return
        raise AssertionError(f"expected a ValueError for one value per set, shape {c['shape']}")
    y, nrm, nrv, nnbt = run(c, x, w, b, c["eps"], rm, rv, nbt)
    assert torch.equal(x, x_before)
    assert y.shape == x.shape and y.dtype == x.dtype
    r, rrm, rrv, rnbt = ref(c, x, w, b, c["eps"], rm, rv, nbt)
    # |y| <= sqrt(m) * |gamma| + |beta|: the tolerance scales with the output's size
    assert_matches_where_finite(y, r, rtol=1e-4, atol=1e-4)
    if rm is not None:
        assert bool(torch.isfinite(nrm).all()) and bool(torch.isfinite(nrv).all())
        # fp32 sums of values of size |x|max lose ~1e-7 * |x|max absolute, however small the mean
        xmax = float(x.abs().max()) if x.numel() else 0.0
        torch.testing.assert_close(nrm, rrm, rtol=1e-5, atol=1e-5 * max(1.0, xmax))
        torch.testing.assert_close(nrv, rrv, rtol=1e-5, atol=1e-5 * max(1.0, xmax) ** 2)
        assert torch.equal(nnbt, rnbt)


# --- invariances ----------------------------------------------------------------------------


def _grid_x(c):
    """Values k/64 with |k| <= 512: shifting by an integer or scaling by 2^j is exact in fp32."""
    g = torch.Generator().manual_seed(c["seed"])
    return torch.randint(-512, 513, c["shape"], generator=g).to(F32) / 64.0


@FAST
@given(case(kinds=["normal"]), st.integers(-4096, 4096))
def test_shift_invariance(c, shift):
    if raises_single(c) or c["op"] == "ln2d_c" and c["shape"][1] == 1:
        return
    x = _grid_x(c)
    w, b = make_params(c)
    y0 = run(c, x, w, b, c["eps"])[0]
    y1 = run(c, x + float(shift), w, b, c["eps"])[0]
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert_matches_where_finite(y0, ref(c, x, w, b, c["eps"])[0], rtol=1e-4, atol=1e-4)


@FAST
@given(case(kinds=["normal"]), st.integers(-20, 20))
def test_positive_scale_invariance(c, j):
    """y(s x; s^2 eps) == y(x; eps) exactly in real arithmetic; s = 2^j keeps fp32 exact too."""
    if raises_single(c):
        return
    s = 2.0**j
    x = _grid_x(c)
    w, b = make_params(c)
    y0 = run(c, x, w, b, c["eps"])[0]
    y1 = run(c, x * s, w, b, c["eps"] * s * s)[0]
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert_matches_where_finite(y0, ref(c, x, w, b, c["eps"])[0], rtol=1e-4, atol=1e-4)


@FAST
@given(case(ops=["in", "gn", "ln2d_c", "ln2d_chw", "ln"], allow_empty=False, min_n=2))
def test_batch_independence(c):
    if raises_single(c):
        return
    x = make_x(c)
    w, b = make_params(c)
    y = run(c, x, w, b, c["eps"])[0]
    for i in range(x.shape[0]):
        yi = run(c, x[i : i + 1], w, b, c["eps"])[0]
        torch.testing.assert_close(yi[0], y[i], rtol=1e-6, atol=1e-6, equal_nan=True)


@FAST
@given(case(ops=["bn"], allow_empty=False, min_n=2), st.randoms(use_true_random=False))
def test_batch_norm_train_is_permutation_equivariant(c, rnd):
    if raises_single(c):
        return
    x = make_x(c)
    w, b = make_params(c)
    perm = list(range(x.shape[0]))
    rnd.shuffle(perm)
    y = run(c, x, w, b, c["eps"])[0]
    yp = run(c, x[perm], w, b, c["eps"])[0]
    # a permutation changes the summation order only
    torch.testing.assert_close(yp, y[perm], rtol=1e-4, atol=1e-4, equal_nan=True)
    assert_matches_where_finite(yp, ref(c, x[perm], w, b, c["eps"])[0], rtol=1e-4, atol=1e-4)


# --- half precision -------------------------------------------------------------------------


@FAST
@given(
    case(kinds=["normal", "cancel", "zeros", "constant_channels", "fp16_range"]),
    st.sampled_from([torch.float16, torch.bfloat16]),
)
def test_half_precision_output_matches_reference(c, dtype):
    if c["kind"] == "cancel":
        c = dict(c, offset=min(c["offset"], 3.0))  # 1e2..1e3 offsets: representable in fp16
    x = make_x(c, dtype)
    w, b = make_params(c, F32)
    if raises_single(c):
        return
    y = run(c, x, w, b, c["eps"])[0]
    assert y.dtype == dtype
    r = ref(c, x, w, b, c["eps"])[0]  # float64 from the same half-precision values
    r = r.to(dtype).double()  # the best a half-precision output can be
    tol = {"rtol": 2e-3, "atol": 2e-3} if dtype == torch.float16 else {"rtol": 1.6e-2, "atol": 1.6e-2}
    fin = torch.isfinite(r)
    assert bool(torch.isfinite(y[fin]).all())
    torch.testing.assert_close(y[fin].double(), r[fin], **tol)


# --- gradients ------------------------------------------------------------------------------


@FAST
@given(
    case(kinds=["normal", "constant_channels", "outlier", "cancel"], allow_empty=False),
    st.sampled_from(["wb", "w", "b", "none"]),
    st.sampled_from([1e-12, 1e-5, 0.5]),
)
def test_gradients_match_autograd_through_reference(c, affine, eps):
    # cancellation capped at offset/spread <= 1e4: the plain two-pass float64 oracle itself loses
    # ~1e-16 * offset/spread relative, amplified by rstd in dx (the fp32 forward tests go further)
    c = dict(c, affine=affine, offset=min(c["offset"], 2.0), scale=max(c["scale"], -2.0))
    if raises_single(c):
        return
    x = make_x(c, F64).requires_grad_()
    w, b = make_params(c, F64)
    live = [x] + [t.requires_grad_() for t in (w, b) if t is not None]
    y = run(c, x, w, b, eps)[0]
    g = torch.Generator().manual_seed(c["seed"] + 2)
    dy = torch.randn(y.shape, generator=g, dtype=F64)
    got = torch.autograd.grad(y, live, dy)
    xr = x.detach().clone().requires_grad_()
    wr = None if w is None else w.detach().clone().requires_grad_()
    br = None if b is None else b.detach().clone().requires_grad_()
    live_r = [xr] + [t for t in (wr, br) if t is not None]
    exp = torch.autograd.grad(ref(c, xr, wr, br, eps)[0], live_r, dy)
    for a, e in zip(got, exp):
        scale = max(1.0, float(e.abs().max()))
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6 * scale)
