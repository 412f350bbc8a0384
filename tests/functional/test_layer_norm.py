"""layer_norm (torch semantics) and layer_norm_2d (both CNN senses).

Oracles: the float64 reference, ``torch.nn.functional.layer_norm`` / ``group_norm``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

from normkit.functional import group_norm, layer_norm, layer_norm_2d
from tests.functional.helpers import F32, F64, TOL, affine_params, randn
from tests.reference import ref_layer_norm, ref_layer_norm_2d

LN_CASES = [  # (shape, normalized_shape)
    ((7,), 7),
    ((4, 10), 10),
    ((4, 10), (10,)),
    ((3, 5, 16), [16]),
    ((2, 3, 4, 5), (4, 5)),
    ((2, 3, 4, 5), (3, 4, 5)),
    ((2, 3, 2, 3, 4), (3, 4)),
]


@pytest.mark.parametrize("shape,ns", LN_CASES)
@pytest.mark.parametrize("kind", ["wb", "w", "b", "none"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_layer_norm_matches_reference_and_torch(shape, ns, kind, dtype):
    x = randn(shape, dtype, seed=1, offset=0.8, scale=2.5)
    pshape = (ns,) if isinstance(ns, int) else tuple(ns)
    w, b = affine_params(pshape, dtype, kind=kind)
    y = layer_norm(x, ns, w, b, eps=1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), ref_layer_norm(x, ns, w, b, 1e-5), **TOL[dtype])
    torch.testing.assert_close(y, TF.layer_norm(x, pshape, w, b, 1e-5), **TOL[dtype])


def test_layer_norm_accepts_torch_size():
    x = randn((3, 4, 5), seed=2)
    y = layer_norm(x, x.shape[1:])
    torch.testing.assert_close(y.double(), ref_layer_norm(x, (4, 5)), **TOL[F32])


@pytest.mark.parametrize("shape", [(3, 6), (3, 6, 5), (2, 6, 4, 5), (2, 6, 3, 2, 4)])
@pytest.mark.parametrize("over", ["c", "chw"])
@pytest.mark.parametrize("kind", ["wb", "w", "b", "none"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_layer_norm_2d_matches_reference(shape, over, kind, dtype):
    x = randn(shape, dtype, seed=3, offset=-1.0, scale=0.5)
    w, b = affine_params((6,), dtype, kind=kind)
    y = layer_norm_2d(x, w, b, eps=1e-5, over=over)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), ref_layer_norm_2d(x, w, b, 1e-5, over=over), **TOL[dtype])


# --- 7. equivalences ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 6, 4, 5), (2, 6, 7), (2, 6, 3, 2, 4)])
def test_layer_norm_2d_over_c_is_torch_layer_norm_on_channels_last_permutation(shape):
    x = randn(shape, F64, seed=4)
    w, b = affine_params((6,), F64)
    perm = (0, *range(2, len(shape)), 1)
    inv = (0, len(shape) - 1, *range(1, len(shape) - 1))
    expected = TF.layer_norm(x.permute(perm), (6,), w, b, 1e-5).permute(inv)
    torch.testing.assert_close(layer_norm_2d(x, w, b, 1e-5, over="c"), expected, **TOL[F64])
    mod = torch.nn.LayerNorm(6, eps=1e-5, dtype=F64)
    with torch.no_grad():
        mod.weight.copy_(w)
        mod.bias.copy_(b)
        torch.testing.assert_close(
            layer_norm_2d(x, w, b, 1e-5, over="c"), mod(x.permute(perm)).permute(inv), **TOL[F64]
        )


@pytest.mark.parametrize("shape", [(3, 6, 4, 5), (2, 6, 7), (4, 6)])
def test_layer_norm_2d_over_chw_is_group_norm_one_group(shape):
    x = randn(shape, F64, seed=5)
    w, b = affine_params((6,), F64)
    torch.testing.assert_close(
        layer_norm_2d(x, w, b, 1e-5, over="chw"), TF.group_norm(x, 1, w, b, 1e-5), **TOL[F64]
    )
    torch.testing.assert_close(group_norm(x, 1, w, b, 1e-5), TF.group_norm(x, 1, w, b, 1e-5), **TOL[F64])


def test_layer_norm_over_chw_without_affine_is_torch_layer_norm():
    x = randn((3, 6, 4, 5), F64, seed=6)
    torch.testing.assert_close(layer_norm(x, (6, 4, 5)), TF.layer_norm(x, (6, 4, 5)), **TOL[F64])
    torch.testing.assert_close(layer_norm_2d(x, over="chw"), TF.layer_norm(x, (6, 4, 5)), **TOL[F64])


# --- single element sets follow torch (no error): output == bias ----------------------------


def test_layer_norm_over_a_single_element_gives_bias_like_torch():
    x = randn((4, 3, 1), seed=7)
    b = torch.tensor([0.25])
    y = layer_norm(x, 1, torch.tensor([2.0]), b)
    torch.testing.assert_close(y, TF.layer_norm(x, (1,), torch.tensor([2.0]), b), rtol=0, atol=0)
    assert torch.equal(y, torch.full_like(x, 0.25))


# --- 22. bad normalized_shape / over -> ValueError, never IndexError -------------------------


@pytest.mark.parametrize(
    "shape,ns",
    [
        ((2, 3), (4,)),
        ((2, 3), (2, 2, 3)),
        ((2, 3, 4), (3,)),
        ((2, 3, 4), ()),
        ((2, 3), (-3,)),
        ((5,), (5, 1)),
    ],
)
def test_bad_normalized_shape_is_a_value_error(shape, ns):
    with pytest.raises(ValueError) as info:
        layer_norm(randn(shape), ns)
    assert str(tuple(shape)) in str(info.value)


def test_an_empty_normalized_shape_says_so():
    # (torch.nn.functional.layer_norm refuses it too: "Expected normalized_shape to be at least 1-dim...")
    with pytest.raises(ValueError, match="at least one trailing dim"):
        layer_norm(randn((2, 3)), ())


def test_bad_over_is_a_value_error():
    with pytest.raises(ValueError, match="over"):
        layer_norm_2d(randn((2, 3, 4)), over="hw")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_wrong_affine_shape_names_both_shapes(name):
    with pytest.raises(ValueError) as info:
        layer_norm(randn((2, 3, 4)), (3, 4), **{name: torch.ones(4, 3)})
    msg = str(info.value)
    assert "(4, 3)" in msg and "(3, 4)" in msg
    with pytest.raises(ValueError) as info:
        layer_norm_2d(randn((2, 3, 4)), **{name: torch.ones(4)})
    msg = str(info.value)
    assert "(4,)" in msg and "(3,)" in msg


@pytest.mark.parametrize(
    "fn", [lambda x: layer_norm(x, 4), lambda x: layer_norm_2d(x), lambda x: layer_norm_2d(x, over="chw")]
)
def test_integer_input_is_a_type_error(fn):
    with pytest.raises(TypeError):
        fn(torch.ones((2, 3, 4), dtype=torch.int64))


def test_dtype_mismatch_is_a_type_error():
    with pytest.raises(TypeError) as info:
        layer_norm(randn((2, 4), F64), 4, torch.ones(4))
    assert "float64" in str(info.value) and "float32" in str(info.value)
    with pytest.raises(TypeError):
        layer_norm_2d(randn((2, 4, 3), F64), torch.ones(4))


@pytest.mark.parametrize("eps", [-1e-3, float("nan")])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        layer_norm(randn((2, 4)), 4, eps=eps)
    with pytest.raises(ValueError, match="eps"):
        layer_norm_2d(randn((2, 4, 3)), eps=eps)


# --- 38. batch independence ----------------------------------------------------------------


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: layer_norm(x, (4, 3)),
        lambda x: layer_norm_2d(x, over="c"),
        lambda x: layer_norm_2d(x, over="chw"),
    ],
)
def test_batch_independence(fn):
    x = randn((5, 6, 4, 3), seed=8)
    y = fn(x)
    other = x.clone()
    other[1:] = randn((4, 6, 4, 3), seed=9, offset=-5.0, scale=20.0)
    torch.testing.assert_close(fn(other)[0], y[0], rtol=0, atol=0)
    torch.testing.assert_close(fn(x[2:4]), y[2:4], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "fn,shape",
    [
        (lambda x, b: layer_norm(x, 1, None, b), (4, 3, 1)),
        (lambda x, b: layer_norm_2d(x, None, b, over="c"), (3, 1, 4, 5)),
    ],
)
def test_single_element_sets_have_exactly_zero_input_grad(fn, shape):
    """y == bias whatever x is, so dx == 0 exactly (closed form), and dbias == sum dy."""
    x = randn(shape, seed=10, scale=3.0).requires_grad_()
    b = torch.full((1,), 0.5, requires_grad=True)
    y = fn(x, b)
    assert torch.equal(y.detach(), torch.full(shape, 0.5))
    dy = randn(shape, seed=11)
    dx, db = torch.autograd.grad(y, (x, b), dy)
    assert torch.equal(dx, torch.zeros(shape))
    torch.testing.assert_close(db, dy.sum().reshape(1), rtol=1e-6, atol=1e-6)
