"""Porting a Keras model (Keras 3 or tf.keras 2) to PyTorch with normkit, audited as a porting user.

The oracles are numpy float64 re-implementations of Keras's documented algorithms, read from
keras-team/keras (``keras/src/layers/normalization/batch_normalization.py``,
``layer_normalization.py``, ``group_normalization.py``) and from tf.keras 2's
``BatchNormalizationBase`` (fused path, ``virtual_batch_size``, ``renorm``); none of them calls
normkit. Tests marked ``xfail(strict=True)`` record defects: they assert the correct behaviour and
fail today.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import normkit
from normkit import NormError
from normkit.convert import from_keras_bn, keras_to_torch_momentum, to_keras_bn
from normkit.nn import BatchNormalization
from tests.test_convert import FakeKerasLayer

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[2]


# =============================================================================================
# numpy oracles (Keras's documented algorithms)
# =============================================================================================


def _bshape(nd: int, ax: int, c: int) -> list[int]:
    shp = [1] * nd
    shp[ax] = c
    return shp


def keras3_bn(x, axis, gamma, beta, mm, mv, momentum, eps, training):
    """keras.layers.BatchNormalization.call (Keras 3): ops.moments (biased) over every axis but
    ``axis``; moving = moving * momentum + batch * (1 - momentum); inference on the moving stats."""
    x = np.asarray(x, np.float64)
    nd = x.ndim
    ax = axis % nd
    dims = tuple(d for d in range(nd) if d != ax)
    shp = _bshape(nd, ax, x.shape[ax])
    if training:
        mu, var = x.mean(dims), x.var(dims)
        mm = mm * momentum + mu * (1.0 - momentum)
        mv = mv * momentum + var * (1.0 - momentum)
    else:
        mu, var = mm, mv
    y = (x - mu.reshape(shp)) / np.sqrt(var.reshape(shp) + eps)
    if gamma is not None:
        y = y * gamma.reshape(shp)
    if beta is not None:
        y = y + beta.reshape(shp)
    return y, mm, mv


def keras_bn_backward(x, axis, gamma, dy, eps, training, mv=None):
    """The BN backward (batch statistics: projection form; moving statistics: dy * gamma * rstd)."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    nd = x.ndim
    ax = axis % nd
    dims = tuple(d for d in range(nd) if d != ax)
    C = x.shape[ax]
    shp = _bshape(nd, ax, C)
    g = np.ones(C) if gamma is None else gamma
    if training:
        m = x.size // C
        mu, var = x.mean(dims, keepdims=True), x.var(dims, keepdims=True)
        rstd = 1.0 / np.sqrt(var + eps)
        xhat = (x - mu) * rstd
        dxhat = dy * g.reshape(shp)
        dx = (rstd / m) * (
            m * dxhat - dxhat.sum(dims, keepdims=True) - xhat * (dxhat * xhat).sum(dims, keepdims=True)
        )
    else:
        rstd = 1.0 / np.sqrt(mv.reshape(shp) + eps)
        xhat = None
        dx = dy * g.reshape(shp) * rstd
    dgamma = None if xhat is None else (dy * xhat).sum(dims)
    return dx, dgamma, dy.sum(dims)


def tf2_fused_bn_step(x_nhwc, gamma, beta, mm, mv, momentum, eps):
    """tf.keras 2's fused path (4-D input, axis 3): the output uses the biased batch variance, the
    moving variance averages the Bessel-corrected one (fused_batch_norm's exponential_avg_factor;
    tensorflow#55545)."""
    C = x_nhwc.shape[-1]
    m = x_nhwc.size // C
    mu, var = x_nhwc.mean((0, 1, 2)), x_nhwc.var((0, 1, 2))
    y = (x_nhwc - mu) / np.sqrt(var + eps) * gamma + beta
    return y, momentum * mm + (1 - momentum) * mu, momentum * mv + (1 - momentum) * var * m / (m - 1)


def tf2_virtual_bn_step(x_nhwc, vbs, gamma, beta, mm, mv, momentum, eps):
    """tf.keras 2 ``virtual_batch_size``: reshape to ``(vbs, N // vbs, ...)``, reduce over axis 0 and
    the spatial axes (so ghost batch g holds samples g, g + N/vbs, ...), one moving update with
    the ghost means and (biased) ghost variances averaged."""
    N = x_nhwc.shape[0]
    xr = x_nhwc.reshape(vbs, N // vbs, *x_nhwc.shape[1:])
    axes = (0, *range(2, xr.ndim - 1))
    mu, var = xr.mean(axes, keepdims=True), xr.var(axes, keepdims=True)
    y = ((xr - mu) / np.sqrt(var + eps) * gamma + beta).reshape(x_nhwc.shape)
    new_m, new_v = mu.mean(1).reshape(-1), var.mean(1).reshape(-1)
    return y, momentum * mm + (1 - momentum) * new_m, momentum * mv + (1 - momentum) * new_v


def keras_layer_norm(x, axis, gamma, beta, eps=1e-3):
    """keras.layers.LayerNormalization: moments over ``axis`` (int or list), affine spanning ``axis``."""
    axes = tuple(a % x.ndim for a in (axis if isinstance(axis, (list, tuple)) else [axis]))
    mu, var = x.mean(axes, keepdims=True), x.var(axes, keepdims=True)
    shp = [x.shape[d] if d in axes else 1 for d in range(x.ndim)]
    return (x - mu) / np.sqrt(var + eps) * gamma.reshape(shp) + beta.reshape(shp)


def keras_group_norm(x, groups, gamma, beta, eps=1e-3):
    """keras.layers.GroupNormalization(axis=-1): channels split into ``groups`` contiguous groups
    (``groups=-1``: one per channel), moments over everything but the batch and group axes."""
    C = x.shape[-1]
    G = C if groups == -1 else groups
    xr = x.reshape(*x.shape[:-1], G, C // G)
    axes = (*range(1, xr.ndim - 2), xr.ndim - 1)
    mu, var = xr.mean(axes, keepdims=True), xr.var(axes, keepdims=True)
    return ((xr - mu) / np.sqrt(var + eps)).reshape(x.shape) * gamma + beta


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _set(t: torch.Tensor | None, value: np.ndarray | None) -> None:
    if t is not None and value is not None:
        with torch.no_grad():
            t.copy_(torch.from_numpy(np.asarray(value)))


_TF2_BASE_CONFIG = {
    "name": "batch_normalization",
    "trainable": True,
    "dtype": "float32",
    "axis": -1,
    "momentum": 0.99,
    "epsilon": 0.001,
    "center": True,
    "scale": True,
}


# =============================================================================================
# Keras BatchNormalization: outputs, gradients, moving statistics
# =============================================================================================

_AXES = [
    ((6, 3), 0),
    ((6, 3), 1),
    ((5, 7, 3), -1),
    ((5, 3, 7), 1),
    ((2, 3, 4, 5), -3),
    ((2, 3, 4, 5), 2),
    ((2, 3, 2, 2, 4), -1),
    ((2, 3, 2, 2, 4), 1),
    ((2, 3, 2, 2, 4), 3),
    ((2, 3, 2, 2, 4), -5),
]


@pytest.mark.parametrize("shape,axis", _AXES)
@pytest.mark.parametrize("center,scale", [(True, True), (False, True), (True, False), (False, False)])
def test_keras_bn_equals_keras3_over_steps_every_rank_axis_and_affine(shape, axis, center, scale):
    C = shape[axis]
    rng = _rng(abs(axis) * 10 + len(shape))
    gamma = rng.normal(1, 0.3, C) if scale else None
    beta = rng.normal(0, 0.3, C) if center else None
    layer = BatchNormalization(
        C, axis=axis, momentum=0.9, epsilon=1e-2, center=center, scale=scale, dtype=F64
    )
    assert (layer.gamma is None) == (not scale) and (layer.beta is None) == (not center)
    _set(layer.gamma, gamma)
    _set(layer.beta, beta)
    mm, mv = np.zeros(C), np.ones(C)
    for step in range(3):
        x = rng.normal(step, 1 + step, shape)
        y = layer(torch.from_numpy(x))
        want, mm, mv = keras3_bn(x, axis, gamma, beta, mm, mv, 0.9, 1e-2, True)
        np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(layer.moving_mean.numpy(), mm, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layer.moving_variance.numpy(), mv, rtol=1e-12, atol=1e-12)
    layer.eval()
    x = rng.normal(0, 1, shape)
    want = keras3_bn(x, axis, gamma, beta, mm, mv, 0.9, 1e-2, False)[0]
    np.testing.assert_allclose(layer(torch.from_numpy(x)).detach().numpy(), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape,axis", [((6, 4), -1), ((3, 4, 5, 2), 1), ((2, 3, 2, 2, 4), -1)])
@pytest.mark.parametrize("trainable", [True, False])
def test_keras_bn_gradients_equal_the_closed_form_backward(shape, axis, trainable):
    C = shape[axis]
    rng = _rng(7)
    layer = BatchNormalization(C, axis=axis, dtype=F64)
    gamma, beta = rng.normal(1, 0.3, C), rng.normal(0, 0.3, C)
    mm, mv = rng.normal(0, 1, C), rng.uniform(0.5, 2.0, C)
    layer.set_weights([gamma, beta, mm, mv])
    layer.trainable = trainable  # False: Keras's inference mode even in training
    x = torch.from_numpy(rng.normal(1, 2, shape)).requires_grad_()
    dy = rng.normal(0, 1, shape)
    y = layer(x)
    want_y = keras3_bn(x.detach().numpy(), axis, gamma, beta, mm, mv, 0.99, 1e-3, trainable)[0]
    np.testing.assert_allclose(y.detach().numpy(), want_y, rtol=1e-10, atol=1e-10)
    dx, dgamma, dbeta = keras_bn_backward(x.detach().numpy(), axis, gamma, dy, 1e-3, trainable, mv)
    if trainable:
        gx, gg, gb = torch.autograd.grad(y, (x, layer.gamma, layer.beta), torch.from_numpy(dy))
        np.testing.assert_allclose(gg.numpy(), dgamma, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(gb.numpy(), dbeta, rtol=1e-9, atol=1e-10)
    else:
        assert not layer.gamma.requires_grad and not layer.beta.requires_grad
        (gx,) = torch.autograd.grad(y, x, torch.from_numpy(dy))
        np.testing.assert_array_equal(layer.moving_mean.numpy(), mm)  # no update in inference mode
    np.testing.assert_allclose(gx.numpy(), dx, rtol=1e-9, atol=1e-10)


def test_keras_bn_momentum_edges_and_float16_input_on_a_float32_layer():
    rng = _rng(11)
    x = rng.normal(3, 2, (8, 3))
    # momentum 0: the moving statistics become the batch's (biased variance); 1: never move
    for k in (0.0, 1.0):
        layer = BatchNormalization(3, momentum=k, dtype=F64)
        layer(torch.from_numpy(x))
        _, mm, mv = keras3_bn(x, -1, None, None, np.zeros(3), np.ones(3), k, 1e-3, True)
        np.testing.assert_allclose(layer.moving_mean.numpy(), mm, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layer.moving_variance.numpy(), mv, rtol=1e-12, atol=1e-12)
    # Keras casts float16 inputs to float32 and keeps float32 variables: same on a float32 layer
    xh = torch.from_numpy(rng.normal(50, 4, (16, 5, 5, 3))).half()
    layer = BatchNormalization(3)
    y = layer(xh)
    assert y.dtype == torch.float16 and layer.moving_mean.dtype == torch.float32
    want, mm, mv = keras3_bn(xh.double().numpy(), -1, None, None, np.zeros(3), np.ones(3), 0.99, 1e-3, True)
    np.testing.assert_allclose(y.detach().double().numpy(), want, rtol=0, atol=4e-3)
    np.testing.assert_allclose(layer.moving_mean.double().numpy(), mm, rtol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.double().numpy(), mv, rtol=1e-5)


# =============================================================================================
# Keras's weight list: get_weights / set_weights / get_config
# =============================================================================================


@pytest.mark.parametrize(
    "center,scale,n", [(True, True, 4), (False, True, 3), (True, False, 3), (False, False, 2)]
)
@pytest.mark.parametrize("np_dtype", [np.float16, np.float64, np.float32])
def test_set_weights_takes_keras_order_and_any_float_dtype(center, scale, n, np_dtype):
    C = 4
    rng = _rng(3)
    arrays = [rng.uniform(0.5, 2.0, C).astype(np_dtype) for _ in range(n)]
    layer = BatchNormalization(C, center=center, scale=scale)
    layer.set_weights(arrays)
    got = layer.get_weights()
    assert len(got) == n and all(w.dtype == np.float32 and w.shape == (C,) for w in got)
    for a, b in zip(got, arrays):
        np.testing.assert_array_equal(a, b.astype(np.float32))  # (float16 -> float32 is exact)
    names = [k for k, on in (("gamma", scale), ("beta", center)) if on] + ["moving_mean", "moving_variance"]
    for name, a in zip(names, arrays):
        np.testing.assert_array_equal(getattr(layer, name).detach().numpy(), a.astype(np.float32))
    got[0][:] = 123.0  # get_weights hands out copies, as Keras's does
    assert not (layer.get_weights()[0] == 123.0).any()
    with pytest.raises(NormError, match=f"expected {n} arrays"):
        layer.set_weights(arrays + [arrays[0]])


def test_get_config_round_trips_through_the_constructor_and_state_dict():
    layer = BatchNormalization(5, axis=1, momentum=0.97, epsilon=1e-4, center=False, trainable=False)
    cfg = layer.get_config()
    twin = BatchNormalization(5, **cfg)
    assert twin.get_config() == cfg and twin.trainable is False and not twin.gamma.requires_grad
    x = torch.from_numpy(_rng(5).normal(2, 3, (4, 5, 3)))
    trained = BatchNormalization(5, axis=1, momentum=0.97, epsilon=1e-4, center=False, dtype=F64)
    trained(x)
    clone = BatchNormalization(5, **{**cfg, "trainable": True}, dtype=F64)
    clone.load_state_dict(copy.deepcopy(trained.state_dict()))
    trained.eval(), clone.eval()
    torch.testing.assert_close(clone(x), trained(x), rtol=0, atol=0)


def test_set_weights_shape_error_names_the_weight_and_changes_nothing():
    layer = BatchNormalization(3)
    before = [w.copy() for w in layer.get_weights()]
    bad = [np.full(3, 5.0), np.full(3, 6.0), np.full(3, 7.0), np.ones(4)]
    with pytest.raises(NormError, match="moving_variance"):
        layer.set_weights(bad)
    for a, b in zip(layer.get_weights(), before):
        np.testing.assert_array_equal(a, b)


def test_numpy_scalars_are_taken_for_axis_and_momentum():
    layer = BatchNormalization(3, axis=np.int64(-1))
    assert layer.axis == -1 and layer(torch.randn(4, 3)).shape == (4, 3)
    assert keras_to_torch_momentum(np.float32(0.99)) == pytest.approx(0.01, abs=1e-7)
    src = {"moving_mean": np.zeros(3), "moving_variance": np.ones(3), "momentum": np.float32(0.99)}
    assert from_keras_bn(src).momentum == pytest.approx(0.01, abs=1e-7)


# =============================================================================================
# Conversions: Keras 3, tf.keras 2's fused path, virtual_batch_size, renorm
# =============================================================================================


def _keras_source(C: int, seed: int, momentum: float, eps: float) -> dict:
    rng = _rng(seed)
    return {
        "gamma": rng.normal(1, 0.2, C),
        "beta": rng.normal(0, 0.2, C),
        "moving_mean": rng.normal(0, 1, C),
        "moving_variance": rng.uniform(0.5, 2.0, C),
        "momentum": momentum,
        "epsilon": eps,
    }


class FusedKerasLayer(FakeKerasLayer):
    """A tf.keras 2 layer on its fused path: ``fused`` is resolved to True at construction."""

    fused = True


@pytest.mark.parametrize("how", ["layer.fused", "mapping", "variance="])
def test_a_tf_keras2_fused_layer_continues_training_after_from_keras_bn(how):
    """tf.keras 2's fused path (Conv2D + BN, axis=-1, 4-D) averages the Bessel-corrected variance:
    from_keras_bn reads ``fused`` (or takes variance="unbiased") and the converted layer reproduces
    tf.keras 2 exactly (outputs and statistics over three steps); Keras 3's source stays biased."""
    C, k, eps = 3, 0.9, 1e-3
    src = _keras_source(C, 21, k, eps)
    assert from_keras_bn(src).unbiased_running_var is False  # Keras 3's convention by default
    if how == "layer.fused":
        weights = [src[n] for n in ("gamma", "beta", "moving_mean", "moving_variance")]
        bn = from_keras_bn(FusedKerasLayer(weights, {**_TF2_BASE_CONFIG, "momentum": k, "epsilon": eps}))
    elif how == "mapping":
        bn = from_keras_bn({**src, "fused": True})
    else:
        bn = from_keras_bn(src, variance="unbiased")
    assert bn.unbiased_running_var is True
    np.testing.assert_array_equal(bn.running_var.numpy(), src["moving_variance"])  # copied as it is
    with pytest.raises(NormError, match="Bessel's factor twice"):
        from_keras_bn({**src, "fused": True}, count=16)
    assert from_keras_bn({**src, "fused": True}, variance="biased").unbiased_running_var is False
    bn = bn.double().train()
    mm, mv = src["moving_mean"], src["moving_variance"]
    rng = _rng(22)
    for s in range(3):
        x = rng.normal(s, 1 + s, (4, 3, 3, C))
        want, mm, mv = tf2_fused_bn_step(x, src["gamma"], src["beta"], mm, mv, k, eps)
        got = bn(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(bn.running_mean.numpy(), mm, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bn.running_var.numpy(), mv, rtol=1e-12, atol=1e-12)


def test_tf_keras2_virtual_batch_size_equals_ghost_bn_averaged_on_the_regrouped_batch():
    """tf.keras 2's ghost batches are strided (sample n is in ghost batch n % (N / vbs)) and update
    the moving statistics once with averaged biased ghost statistics: GhostBatchNorm2d with
    momentum_mode='averaged', unbiased_running_var=False reproduces it once the batch is regrouped
    so that its contiguous chunks are Keras's ghost batches; not regrouped, it differs."""
    C, V, N, k, eps = 3, 4, 12, 0.9, 1e-3
    src = _keras_source(C, 31, k, eps)
    gbn = normkit.nn.GhostBatchNorm2d(
        C,
        ghost_batch_size=V,
        eps=eps,
        momentum=1 - k,
        momentum_mode="averaged",
        unbiased_running_var=False,
        dtype=F64,
    )
    for name, key in (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean")):
        _set(getattr(gbn, name), src[key])
    _set(gbn.running_var, src["moving_variance"])
    order = np.arange(N).reshape(V, N // V).T.reshape(-1)  # chunk j of normkit = Keras ghost batch j
    back = np.argsort(order)
    mm, mv = src["moving_mean"], src["moving_variance"]
    rng = _rng(32)
    for s in range(3):
        x = rng.normal(s, 1 + s, (N, 2, 2, C))
        want, mm, mv = tf2_virtual_bn_step(x, V, src["gamma"], src["beta"], mm, mv, k, eps)
        got = gbn(torch.from_numpy(x[order]).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()[back]
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(gbn.running_mean.numpy(), mm, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(gbn.running_var.numpy(), mv, rtol=1e-12, atol=1e-12)
    x = rng.normal(0, 1, (N, 2, 2, C))
    x[: N // V] += 5.0
    want = tf2_virtual_bn_step(x, V, src["gamma"], src["beta"], mm, mv, k, eps)[0]
    plain = gbn(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
    assert np.abs(plain - want).max() > 0.1  # contiguous chunks are not Keras's ghost batches


def _tf2_layer(kind: str, C: int = 3) -> FakeKerasLayer:
    w = [np.ones(C), np.zeros(C), np.zeros(C), np.ones(C)]
    if kind == "virtual_batch_size":
        # tf.keras 2 adds a dim at index 1 to every weight under virtual batches: (1, 1, 1, 1, C)
        return FakeKerasLayer(
            [a.reshape(1, 1, 1, 1, C) for a in w], {**_TF2_BASE_CONFIG, "virtual_batch_size": 4}
        )
    # renorm: non-trainable moving_stddev, renorm_mean, renorm_stddev after the moving statistics
    cfg = {
        **_TF2_BASE_CONFIG,
        "renorm": True,
        "renorm_clipping": {"rmax": 3.0, "dmax": 5.0},
        "renorm_momentum": 0.99,
    }
    return FakeKerasLayer([*w, np.ones(C), np.zeros(C), np.ones(C)], cfg)


@pytest.mark.parametrize("kind", ["virtual_batch_size", "renorm"])
def test_from_keras_bn_refuses_virtual_batch_size_and_renorm_naming_the_option(kind):
    """A BatchNorm would silently drop either (tf.keras 2's strided ghost batches, its own renorm
    averages): the refusal names the option, before the weight count (renorm's 7 arrays) is read."""
    with pytest.raises(NormError, match=kind):
        from_keras_bn(_tf2_layer(kind))
    src = {**_keras_source(3, 5, 0.99, 1e-3), kind: 4 if kind == "virtual_batch_size" else True}
    with pytest.raises(NormError, match=kind):  # a mapping too
        from_keras_bn(src)


def test_to_keras_bn_on_a_keras_convention_layer_says_it_already_is_one():
    k = BatchNormalization(3)
    k(torch.randn(8, 3) + 1)
    with pytest.raises(TypeError, match="already has Keras's conventions") as e:
        to_keras_bn(k)
    assert "track_running_stats" not in str(e.value)


# =============================================================================================
# LayerNormalization / GroupNormalization equivalents on channels-last input
# =============================================================================================


def _affine(layer: nn.Module, gamma: np.ndarray, beta: np.ndarray) -> nn.Module:
    _set(layer.weight, gamma)
    _set(layer.bias, beta)
    return layer


def test_keras_layer_normalization_equivalents_on_channels_last():
    N, H, W, C = 3, 4, 5, 8
    rng = _rng(41)
    x = rng.normal(2, 3, (N, H, W, C))
    t = torch.from_numpy(x)
    g, b = rng.normal(1, 0.2, C), rng.normal(0, 0.2, C)
    want = keras_layer_norm(x, -1, g, b)
    # axis=-1 on NHWC: LayerNorm(C) on the tensor as it is, or LayerNorm2d(C) on its NCHW view
    ln = _affine(normkit.nn.LayerNorm(C, eps=1e-3, dtype=F64), g, b)
    np.testing.assert_allclose(ln(t).detach().numpy(), want, rtol=1e-12, atol=1e-12)
    ln2d = _affine(normkit.nn.LayerNorm2d(C, eps=1e-3, dtype=F64), g, b)
    got = ln2d(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-12, atol=1e-12)
    # axis=[1, 2, 3]: per-element affine over (H, W, C)
    G3, B3 = rng.normal(1, 0.2, (H, W, C)), rng.normal(0, 0.2, (H, W, C))
    ln3 = _affine(normkit.nn.LayerNorm((H, W, C), eps=1e-3, dtype=F64), G3, B3)
    np.testing.assert_allclose(
        ln3(t).detach().numpy(), keras_layer_norm(x, [1, 2, 3], G3, B3), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("groups", [1, 2, 4, -1])
def test_keras_group_normalization_equals_group_norm_on_the_nchw_view(groups):
    N, H, W, C = 3, 4, 5, 8
    rng = _rng(50 + groups)
    x = rng.normal(2, 3, (N, H, W, C))
    g, b = rng.normal(1, 0.2, C), rng.normal(0, 0.2, C)
    want = keras_group_norm(x, groups, g, b)
    G = C if groups == -1 else groups
    gn = _affine(normkit.nn.GroupNorm(G, C, eps=1e-3, dtype=F64), g, b)
    xt = torch.from_numpy(x).requires_grad_()
    y = gn(xt.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-12, atol=1e-12)
    # groups=-1 is InstanceNorm2d(affine=True); groups=1 is LayerNorm2d(over="chw") (per-channel affine)
    if groups in (-1, 1):
        other = (
            normkit.nn.InstanceNorm2d(C, eps=1e-3, affine=True, dtype=F64)
            if groups == -1
            else normkit.nn.LayerNorm2d(C, eps=1e-3, over="chw", dtype=F64)
        )
        got = _affine(other, g, b)(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-12, atol=1e-12)
    # sequences (N, L, C) and features (N, C), as Keras takes any rank
    xs = rng.normal(0, 1, (N, 7, C))
    got = gn(torch.from_numpy(xs).transpose(1, 2)).transpose(1, 2)
    np.testing.assert_allclose(
        got.detach().numpy(), keras_group_norm(xs, groups, g, b), rtol=1e-12, atol=1e-12
    )


# the docs a Keras porting user reads (normkit.convert's module docs): each fact it must state
_DOC_FACTS = {
    "tf.keras": ["tf.keras 2's fused path", "unbiased", "tensorflow#55545"],
    "GroupNormalization": [
        "GroupNormalization(groups=G)",
        "GroupNorm(G, C, eps=1e-3)",
        "groups=-1",
        "permute",
    ],
    "virtual_batch_size": ["virtual_batch_size", "strided", "renorm_momentum", "order.argsort()"],
}


@pytest.mark.parametrize("topic", sorted(_DOC_FACTS))
def test_docs_cover_what_a_keras_porting_user_needs(topic):
    text = normkit.convert.__doc__ or ""
    missing = [fact for fact in _DOC_FACTS[topic] if fact not in text]
    assert not missing, missing


# =============================================================================================
# In a model: nn.Sequential with a conv on channels-last input, state_dict, dtype, compile
# =============================================================================================


class _Permute(nn.Module):
    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


def _nhwc_conv_bn(dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        _Permute(0, 3, 1, 2),
        nn.Conv2d(3, 4, 3, padding=1, bias=False, dtype=dtype),
        _Permute(0, 2, 3, 1),
        BatchNormalization(4, momentum=0.9, dtype=dtype),
    )


def test_keras_bn_after_a_conv_on_channels_last_input_trains_saves_and_casts_as_keras():
    model = _nhwc_conv_bn(F64)
    bn = model[3]
    rng = _rng(61)
    mm, mv = np.zeros(4), np.ones(4)
    for s in range(3):
        x = torch.from_numpy(rng.normal(s, 1, (4, 6, 6, 3)))
        z = model[2](model[1](model[0](x))).detach().numpy()  # torch's conv, then Keras's formula
        want, mm, mv = keras3_bn(z, -1, np.ones(4), np.zeros(4), mm, mv, 0.9, 1e-3, True)
        np.testing.assert_allclose(model(x).detach().numpy(), want, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(bn.moving_variance.numpy(), mv, rtol=1e-12)
    # state_dict round trip into a float32 model, then .to(float64) back: eval outputs agree
    other = _nhwc_conv_bn(torch.float32)
    other.load_state_dict(model.state_dict())
    assert other[3].moving_mean.dtype == torch.float32
    other = other.to(F64).eval()
    model.eval()
    x = torch.from_numpy(rng.normal(0, 1, (2, 6, 6, 3)))
    z = model[2](model[1](model[0](x))).detach().numpy()
    want = keras3_bn(z, -1, np.ones(4), np.zeros(4), mm, mv, 0.9, 1e-3, False)[0]
    np.testing.assert_allclose(model(x).detach().numpy(), want, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(other(x).detach().numpy(), want, rtol=1e-6, atol=1e-6)  # (float32 stats)


def test_trainable_flip_after_torch_compile_switches_to_inference_mode():
    torch._dynamo.reset()
    layer = BatchNormalization(3, momentum=0.5)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x = torch.from_numpy(_rng(71).normal(2, 3, (8, 4, 3))).float()
    compiled(x)
    layer.trainable = False
    mm, mv = layer.moving_mean.clone(), layer.moving_variance.clone()
    y = compiled(x)
    want = keras3_bn(
        x.double().numpy(),
        -1,
        np.ones(3),
        np.zeros(3),
        mm.double().numpy(),
        mv.double().numpy(),
        0.5,
        1e-3,
        False,
    )[0]
    np.testing.assert_allclose(y.double().numpy(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.moving_mean, mm) and torch.equal(layer.moving_variance, mv)


def test_fold_bn_reports_keras_batch_normalization_with_the_way_to_fold_it():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), BatchNormalization(4, axis=1))
    for s in range(3):
        model(torch.randn(4, 3, 6, 6) + s)
    model.eval()
    folded, diff, report = normkit.fold_bn(model, torch.randn(2, 3, 6, 6))
    assert diff == 0.0 and isinstance(folded[1], BatchNormalization)
    assert report.folded == []
    assert [p for p, _ in report.skipped] == ["1"] and "from_keras_bn" in report.skipped[0][1]
    # the way it names works: converted first, the pair folds, to the Keras layer's output
    model_t = nn.Sequential(model[0], from_keras_bn(model[1])).eval()
    x = torch.randn(2, 3, 6, 6)
    folded, diff, report = normkit.fold_bn(model_t, x)
    assert [f.norm for f in report.folded] == ["1"]
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_freeze_bn_freezes_keras_batch_normalization_as_keras_does_and_unfreeze_restores_it():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormalization(4, axis=1), BatchNormalization(4, axis=1))
    model[2].trainable = False  # frozen by the user: stays frozen after unfreeze_bn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = normkit.surgery.freeze_bn(model).train()
    layer = model[1]
    assert layer.trainable is False and not layer.gamma.requires_grad and not layer.beta.requires_grad
    before = layer.moving_mean.clone()
    x = torch.randn(4, 3, 6, 6) + 3
    y = model(x)
    assert torch.equal(layer.moving_mean, before)  # inference mode though the model trains
    h = model[0](x)
    want = (h - before.view(1, 4, 1, 1)) / torch.sqrt(layer.moving_variance.view(1, 4, 1, 1) + 1e-3)
    torch.testing.assert_close(layer(h), want, rtol=1e-5, atol=1e-5)
    assert y.shape == (4, 4, 4, 4)
    model = normkit.surgery.unfreeze_bn(model)
    assert model[1].trainable is True and model[1].gamma.requires_grad
    assert model[2].trainable is False
    model(x)
    assert not torch.equal(model[1].moving_mean, before)  # training again
    with pytest.raises(NormError, match="BatchNormalization"):
        normkit.surgery.freeze_bn(model, use_running_stats=False)


def test_convert_sync_batchnorm_refuses_keras_batch_normalization_by_default():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormalization(4, axis=1))
    with pytest.raises(NormError, match="BatchNormalization.*from_keras_bn"):
        normkit.convert_sync_batchnorm(model)
    kept = normkit.convert_sync_batchnorm(model, unsupported="keep")
    assert isinstance(kept[1], BatchNormalization)


def test_torch_convention_layers_take_keras_momentum_silently_as_documented():
    """BatchNorm2d(momentum=0.99) is legal PyTorch (weight 0.99 on the new batch): accepted without a
    warning, as its docstring says ('Keras's 0.99 is 0.01 here'), and it tracks fast."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bn = normkit.nn.BatchNorm2d(3, momentum=0.99, dtype=F64)
    x = torch.from_numpy(_rng(81).normal(4, 1, (8, 3, 2, 2)))
    bn(x)
    want = 0.01 * 0.0 + 0.99 * x.mean((0, 2, 3))
    torch.testing.assert_close(bn.running_mean, want, rtol=1e-12, atol=1e-12)


# =============================================================================================
# Keras's ``training`` call argument
# =============================================================================================


@pytest.mark.parametrize("module_mode", ["train", "eval"])
@pytest.mark.parametrize("training", [True, False, np.bool_(True), np.bool_(False), None])
@pytest.mark.parametrize("trainable", [True, False])
def test_training_call_argument_picks_the_mode_as_keras_does(module_mode, training, trainable):
    """``layer(x, training=...)`` overrides train() / eval() (None follows them); a
    ``trainable=False`` layer stays in inference mode even with ``training=True`` (Keras's rule)."""
    rng = _rng(91)
    C = 3
    layer = BatchNormalization(C, momentum=0.8, epsilon=1e-2, trainable=trainable, dtype=F64)
    gamma, beta = rng.normal(1, 0.3, C), rng.normal(0, 0.3, C)
    mm, mv = rng.normal(0, 1, C), rng.uniform(0.5, 2, C)
    for t, v in (
        (layer.gamma, gamma),
        (layer.beta, beta),
        (layer.moving_mean, mm),
        (layer.moving_variance, mv),
    ):
        _set(t, v)
    layer.train(module_mode == "train")
    x = rng.normal(1, 2, (6, 4, C))
    batch = bool(module_mode == "train" if training is None else training) and trainable
    want, mm2, mv2 = keras3_bn(x, -1, gamma, beta, mm, mv, 0.8, 1e-2, batch)
    y = layer(torch.from_numpy(x), training=training)
    np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mm2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.moving_variance.numpy(), mv2, rtol=1e-12, atol=1e-12)
    assert layer.training == (module_mode == "train")  # the call argument does not switch the module


@pytest.mark.parametrize("bad", [1, 0, "False", torch.tensor(True)])
def test_training_call_argument_refuses_what_is_not_a_bool(bad):
    layer = BatchNormalization(3)
    before = layer.moving_mean.clone()
    with pytest.raises(TypeError, match="training must be True, False or None"):
        layer(torch.randn(4, 3), training=bad)
    assert torch.equal(layer.moving_mean, before)


def test_training_call_argument_survives_torch_fx_and_torch_compile():
    """fx keeps the argument on the layer's call_module node; torch.compile follows it per call."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = BatchNormalization(3, momentum=0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(x, training=False)

    net = Net().train()
    x = torch.from_numpy(_rng(92).normal(2, 3, (8, 4, 3))).float()
    gm = torch.fx.symbolic_trace(net)
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert node.args[1:] == (False,)
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    for run in (gm, compiled):
        y = run(x)
        want = (x - 0.0) / torch.sqrt(torch.ones(3) + 1e-3)
        torch.testing.assert_close(y, want)
        assert torch.equal(net.bn.moving_mean, torch.zeros(3))


# =============================================================================================
# BatchNormalization.from_config: a Keras config (model JSON) to a layer
# =============================================================================================

#: Keras 3's get_config() of BatchNormalization(momentum=0.9, epsilon=1e-4, gamma_initializer="zeros"):
#: initializers serialized as dicts, a dtype policy, no feature count.
_KERAS3_CONFIG = {
    "name": "bn3",
    "trainable": True,
    "dtype": {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "float32"}},
    "axis": -1,
    "momentum": 0.9,
    "epsilon": 1e-4,
    "center": True,
    "scale": True,
    "beta_initializer": {"module": "keras.initializers", "class_name": "Zeros", "config": {}},
    "gamma_initializer": {"module": "keras.initializers", "class_name": "Zeros", "config": {}},
    "moving_mean_initializer": {"module": "keras.initializers", "class_name": "Zeros", "config": {}},
    "moving_variance_initializer": {"module": "keras.initializers", "class_name": "Ones", "config": {}},
    "beta_regularizer": None,
    "gamma_regularizer": None,
    "beta_constraint": None,
    "gamma_constraint": None,
    "synchronized": False,
}


def test_from_config_builds_the_keras3_layer_and_trains_as_keras():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain Keras 3 config warns about nothing
        layer = BatchNormalization.from_config(_KERAS3_CONFIG, num_features=4, dtype=F64)
    assert (layer.momentum, layer.epsilon, layer.axis, layer.trainable) == (0.9, 1e-4, -1, True)
    assert torch.equal(layer.gamma, torch.zeros(4, dtype=F64))  # gamma_initializer="zeros" applied
    rng = _rng(101)
    mm, mv = np.zeros(4), np.ones(4)
    for step in range(2):
        x = rng.normal(step, 2, (6, 3, 4))
        want, mm, mv = keras3_bn(x, -1, np.zeros(4), np.zeros(4), mm, mv, 0.9, 1e-4, True)
        np.testing.assert_allclose(layer(torch.from_numpy(x)).detach().numpy(), want, atol=1e-12)
    np.testing.assert_allclose(layer.moving_variance.numpy(), mv, rtol=1e-12)


def test_from_config_takes_tf_keras2_configs_its_own_and_constant_initializers():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tf2 = BatchNormalization.from_config(
            {**_TF2_BASE_CONFIG, "gamma_initializer": {"class_name": "Constant", "config": {"value": 0.5}}}, 3
        )
        own = BatchNormalization(5, axis=1, momentum=0.97, epsilon=1e-4, center=False, trainable=False)
        twin = BatchNormalization.from_config(own.get_config(), 5)
    assert torch.equal(tf2.gamma.detach(), torch.full((3,), 0.5)) and tf2.get_config()["momentum"] == 0.99
    assert twin.get_config() == own.get_config() and twin.beta is None and not twin.gamma.requires_grad


def test_from_config_needs_the_feature_count_and_refuses_what_it_would_drop():
    with pytest.raises(NormError, match="num_features=C"):
        BatchNormalization.from_config(_KERAS3_CONFIG)
    with pytest.raises(NormError, match="disagrees"):
        BatchNormalization.from_config({"num_features": 3}, 4)
    with pytest.raises(TypeError, match="expected a dict"):
        BatchNormalization.from_config([("axis", -1)], 3)  # type: ignore[arg-type]
    for key, value, match in [
        ("renorm", True, "renorm=True"),
        ("virtual_batch_size", 8, "virtual_batch_size=8"),
        ("synchronized", True, "synchronized=True"),
    ]:
        with pytest.raises(NormError, match=match):
            BatchNormalization.from_config({**_KERAS3_CONFIG, key: value}, 4)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("gamma_regularizer", {"class_name": "L2", "config": {"l2": 1e-4}}, "weight decay"),
        ("beta_constraint", "non_neg", "projection"),
        ("fused", True, "unbiased batch variance"),
        ("some_future_option", 1, "some_future_option"),
        ("gamma_initializer", {"class_name": "RandomNormal", "config": {}}, "not applied"),
    ],
)
def test_from_config_warns_for_what_acts_outside_the_layer(key, value, match):
    with pytest.warns(UserWarning, match=match):
        layer = BatchNormalization.from_config({**_KERAS3_CONFIG, key: value}, 4)
    if key == "gamma_initializer":  # the default stands
        assert torch.equal(layer.gamma.detach(), torch.ones(4))


def test_from_keras_bn_warns_for_a_regularizer_it_cannot_carry():
    k = FakeKerasLayer(
        [np.ones(3), np.zeros(3), np.zeros(3), np.ones(3)],
        {**_TF2_BASE_CONFIG, "gamma_regularizer": {"class_name": "L2", "config": {"l2": 1e-4}}},
    )
    with pytest.warns(UserWarning, match="gamma_regularizer.*weight decay"):
        from_keras_bn(k)
