"""group_norm: forward over G, the GN(1) == LN and GN(C) == IN equivalences, edge cases, errors.

Oracles: the float64 reference, ``torch.nn.functional`` group/layer/instance norm, closed forms.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

from normkit.functional import group_norm, instance_norm, layer_norm_2d
from tests.functional.helpers import F32, F64, TOL, affine_params, randn
from tests.reference import ref_group_norm, ref_instance_norm, ref_layer_norm_2d

CASES = [  # (shape, G)
    ((5, 6), 3),
    ((5, 14), 7),
    ((4, 8, 9), 4),
    ((3, 12, 4, 5), 3),
    ((3, 12, 4, 5), 12),
    ((2, 6, 3, 4, 2), 2),
    ((2, 5, 3, 3), 1),
    ((1, 4, 2, 2), 2),
]


@pytest.mark.parametrize("shape,G", CASES)
@pytest.mark.parametrize("kind", ["wb", "w", "b", "none"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_forward_matches_reference_and_torch(shape, G, kind, dtype):
    x = randn(shape, dtype, seed=1, offset=-0.4, scale=1.7)
    w, b = affine_params((shape[1],), dtype, kind=kind)
    y = group_norm(x, G, w, b, eps=1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), ref_group_norm(x, G, w, b, 1e-5), **TOL[dtype])
    torch.testing.assert_close(y, TF.group_norm(x, G, w, b, 1e-5), **TOL[dtype])


# --- 7. equivalences ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 6, 4, 5), (2, 4, 7), (4, 6), (2, 3, 2, 3, 2)])
def test_one_group_is_layer_norm_over_chw(shape):
    x = randn(shape, F64, seed=2)
    C = shape[1]
    w, b = affine_params((C,), F64)
    y = group_norm(x, 1, w, b, eps=1e-5)
    view = [1, C] + [1] * (len(shape) - 2)
    # torch LN over (C, *spatial) with no affine, then the per-channel affine
    ln = TF.layer_norm(x, shape[1:], eps=1e-5) * w.view(view) + b.view(view)
    torch.testing.assert_close(y, ln, **TOL[F64])
    torch.testing.assert_close(y, ref_layer_norm_2d(x, w, b, 1e-5, over="chw"), **TOL[F64])
    torch.testing.assert_close(layer_norm_2d(x, w, b, 1e-5, over="chw"), ln, **TOL[F64])


@pytest.mark.parametrize("shape", [(3, 6, 4, 5), (2, 4, 7), (2, 3, 2, 3, 2)])
def test_c_groups_is_instance_norm(shape):
    x = randn(shape, F64, seed=3)
    C = shape[1]
    w, b = affine_params((C,), F64)
    y = group_norm(x, C, w, b, eps=1e-5)
    torch.testing.assert_close(y, TF.instance_norm(x, weight=w, bias=b, eps=1e-5), **TOL[F64])
    torch.testing.assert_close(y, ref_instance_norm(x, None, None, w, b, eps=1e-5).output, **TOL[F64])
    torch.testing.assert_close(
        instance_norm(x, None, None, w, b, eps=1e-5).output,
        TF.instance_norm(x, weight=w, bias=b, eps=1e-5),
        **TOL[F64],
    )


def test_groups_are_contiguous_channel_blocks():
    """Changing channels of group 0 changes group 0's output only."""
    x = randn((2, 6, 4), F64, seed=4)
    y = group_norm(x, 3)
    x2 = x.clone()
    x2[:, 0:2] = randn((2, 2, 4), F64, seed=5, scale=50.0)
    y2 = group_norm(x2, 3)
    torch.testing.assert_close(y2[:, 2:], y[:, 2:], rtol=0, atol=0)
    torch.testing.assert_close(y2.double(), ref_group_norm(x2, 3), **TOL[F64])


def test_constant_group_next_to_normal_ones():
    x = randn((3, 6, 5), seed=6)
    x[:, 2:4] = -1234.5
    w, b = affine_params((6,))
    y = group_norm(x, 3, w, b)
    assert torch.equal(y[:, 2:4], b[2:4].view(1, 2, 1).expand(3, 2, 5))
    torch.testing.assert_close(y.double(), ref_group_norm(x, 3, w, b), **TOL[F32])


# --- 6. a long reduction in GN (the pytorch#54293 shape) -------------------------------------


def test_long_reduction_group_norm():
    """GN over 2 groups of 2.5e6 elements each (5e6 total), mean 10: fp32 within 1e-5 of fp64."""
    x = randn((1, 4, 1250, 1000), F32, seed=7, offset=10.0)
    y = group_norm(x, 2)
    err = (y.double() - ref_group_norm(x, 2)).abs().max().item()
    assert err <= 1e-5, err


# --- 19. one value per group ---------------------------------------------------------------


@pytest.mark.parametrize("shape,G", [((4, 3), 3), ((4, 6, 1), 6), ((2, 4, 1, 1), 4)])
def test_one_value_per_group_raises(shape, G):
    with pytest.raises(ValueError, match="more than 1 value per group"):
        group_norm(randn(shape), G)


# --- 20. empty ------------------------------------------------------------------------------


def test_empty_batch():
    x = torch.zeros((0, 6, 3), requires_grad=True)
    w, b = (t.requires_grad_() for t in affine_params((6,)))
    y = group_norm(x, 3, w, b)
    assert y.shape == (0, 6, 3)
    dx, dw, db = torch.autograd.grad(y.sum(), (x, w, b))
    assert torch.equal(dw, torch.zeros(6)) and torch.equal(db, torch.zeros(6)) and dx.shape == x.shape


# --- 21-23. errors --------------------------------------------------------------------------


def test_not_divisible_suggests_valid_groups():
    with pytest.raises(ValueError) as info:
        group_norm(randn((2, 30, 4)), 4)
    msg = str(info.value)
    assert "30" in msg and "4" in msg and "num_groups=3" in msg and "5" in msg


@pytest.mark.parametrize("G", [7, 64])
def test_more_groups_than_channels(G):
    with pytest.raises(ValueError) as info:
        group_norm(randn((2, 6, 4)), G)
    msg = str(info.value)
    assert "6" in msg and str(G) in msg


@pytest.mark.parametrize("G", [0, -2, 2.0, "2", None, True])
def test_non_positive_or_non_int_groups(G):
    with pytest.raises((ValueError, TypeError)) as info:
        group_norm(randn((2, 6, 4)), G)  # type: ignore[arg-type]
    assert "num_groups" in str(info.value)


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_wrong_affine_size_names_both_sizes(name):
    kw = {name: torch.ones(5)}
    with pytest.raises(ValueError) as info:
        group_norm(randn((2, 6, 4)), 3, **kw)
    msg = str(info.value)
    assert "(5,)" in msg and "(6,)" in msg


def test_bad_eps():
    with pytest.raises(ValueError, match="eps"):
        group_norm(randn((2, 6, 4)), 3, eps=-1.0)


def test_integer_input_is_a_type_error():
    with pytest.raises(TypeError) as info:
        group_norm(torch.ones((2, 6, 4), dtype=torch.int32), 3)
    assert "int32" in str(info.value)


@pytest.mark.parametrize(
    "xdtype,pdtype", [(F64, F32), (torch.bfloat16, torch.float16), (F32, torch.bfloat16)]
)
def test_param_dtype_mismatch(xdtype, pdtype):
    """pytorch#102922: the message must name both dtypes (no misleading bfloat16 text)."""
    with pytest.raises(TypeError) as info:
        group_norm(randn((2, 6, 4), xdtype), 3, torch.ones(6, dtype=pdtype))
    msg = str(info.value)
    assert str(xdtype) in msg and str(pdtype) in msg


# --- 24. bf16 GN keeps fp32 statistics (pytorch#77507) --------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_group_norm_has_fp32_statistics(dtype):
    x = randn((4, 8, 16, 16), dtype, seed=8, offset=300.0, scale=2.0)
    w, b = affine_params((8,), F32)
    y = group_norm(x, 4, w, b)
    assert y.dtype == dtype
    ref = ref_group_norm(x, 4, w, b)  # float64 from the same half values
    tol = {"rtol": 1.6e-2, "atol": 1.6e-2} if dtype == torch.bfloat16 else {"rtol": 2e-3, "atol": 2e-3}
    torch.testing.assert_close(y.double(), ref, **tol)


# --- 38. batch independence ----------------------------------------------------------------


def test_batch_independence():
    x = randn((5, 6, 4, 3), seed=9)
    w, b = affine_params((6,))
    y = group_norm(x, 2, w, b)
    other = x.clone()
    other[1:] = randn((4, 6, 4, 3), seed=10, offset=7.0, scale=30.0)
    torch.testing.assert_close(group_norm(other, 2, w, b)[0], y[0], rtol=0, atol=0)
    torch.testing.assert_close(group_norm(x[3:4], 2, w, b)[0], y[3], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y.double(), ref_group_norm(x, 2, w, b), **TOL[F32])
