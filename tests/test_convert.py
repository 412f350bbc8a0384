"""Keras <-> PyTorch batch-norm conversion (issue 6.1), tested both ways against the Keras formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import normkit
from normkit.convert import from_keras_bn, keras_to_torch_momentum, to_keras_bn, torch_to_keras_momentum
from normkit.nn import BatchNorm2d, BatchNormalization, FrozenBatchNorm2d
from tests.reference_family import ref_keras_bn

F64 = torch.float64


def _randn(shape, dtype=torch.float32, seed=0, offset=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (offset + scale * torch.randn(shape, generator=g, dtype=F64)).to(dtype)


def _trained_keras(C=3, steps=3, dtype=torch.float32, **kw):
    layer = BatchNormalization(C, dtype=dtype, **kw)
    with torch.no_grad():
        if layer.gamma is not None:
            layer.gamma.copy_(torch.linspace(0.5, 1.5, C, dtype=dtype))
        if layer.beta is not None:
            layer.beta.copy_(torch.linspace(-1, 1, C, dtype=dtype))
    for s in range(steps):
        layer(_randn((4, 5, 5, C), dtype, seed=s, offset=s, scale=1 + s))
    return layer


class FakeKerasLayer:
    """The slice of the Keras layer API that from_keras_bn reads (get_weights / get_config)."""

    def __init__(self, weights, config):
        self._w, self._c = weights, config

    def get_weights(self):
        return [np.array(w) for w in self._w]

    def get_config(self):
        return dict(self._c)


@pytest.mark.parametrize(
    "torch_m,keras_m",
    [
        (0.1, 0.9),
        (0.01, 0.99),
        (0.003, 0.997),
        (0.03, 0.97),
        (0.5, 0.5),
        (0.0, 1.0),
        (1.0, 0.0),
        (0.25, 0.75),
    ],
)
def test_momentum_converts_exactly_both_ways(torch_m, keras_m):
    assert torch_to_keras_momentum(torch_m) == keras_m
    assert keras_to_torch_momentum(keras_m) == torch_m
    assert keras_to_torch_momentum(torch_to_keras_momentum(torch_m)) == torch_m


def test_keras_to_torch_inference_identical_and_continued_training_matches():
    C = 3
    k = _trained_keras(C, dtype=F64)
    bn = from_keras_bn(k)
    assert isinstance(bn, BatchNorm2d) and bn.momentum == 0.01 and bn.eps == 1e-3
    assert torch.equal(bn.running_var, k.moving_variance) and bn.unbiased_running_var is False
    x = _randn((2, 5, 5, C), F64, seed=10)
    # Inference: the torch layer on the NCHW view equals the Keras formula on NHWC.
    want = ref_keras_bn(
        x, -1, k.gamma.detach(), k.beta.detach(), k.moving_mean, k.moving_variance, 0.99, 1e-3, False
    )[0]
    torch.testing.assert_close(
        bn.eval()(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), want, rtol=1e-12, atol=1e-12
    )
    # Two more training steps on both sides: identical outputs and statistics (momentum and the
    # biased variance convention carried over).
    bn.train()
    mm, mv = k.moving_mean.clone(), k.moving_variance.clone()
    for s in range(2):
        xs = _randn((4, 5, 5, C), F64, seed=20 + s, offset=2.0)
        want, mm, mv = ref_keras_bn(xs, -1, k.gamma.detach(), k.beta.detach(), mm, mv, 0.99, 1e-3, True)
        got = bn(xs.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(bn.running_mean, mm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, mv, rtol=1e-12, atol=1e-12)


def test_torch_to_keras_inference_identical_and_count_keeps_conventions_in_step():
    C, N, H = 3, 4, 5
    m = N * H * H
    bn = torch.nn.BatchNorm2d(C, momentum=0.2, dtype=F64)
    for s in range(3):
        bn(_randn((N, C, H, H), F64, seed=30 + s, offset=s))
    # count=None: identical inference.
    k = to_keras_bn(bn)
    assert k.momentum == 0.8 and k.epsilon == 1e-5 and k.trainable
    x = _randn((2, C, H, H), F64, seed=40)
    torch.testing.assert_close(
        k.eval()(x.permute(0, 2, 3, 1)), bn.eval()(x).permute(0, 2, 3, 1), rtol=1e-12, atol=1e-12
    )
    # count=m: Keras's biased moving variance; training both on batches of m values per channel
    # keeps keras_var == torch_var * (m - 1) / m exactly as the two conventions predict.
    k = to_keras_bn(bn, count=m)
    torch.testing.assert_close(k.moving_variance, bn.running_var * (m - 1) / m, rtol=1e-15, atol=0)
    bn.train(), k.train()
    for s in range(2):
        xs = _randn((N, C, H, H), F64, seed=50 + s, offset=-1.0)
        bn(xs)
        k(xs.permute(0, 2, 3, 1))
    torch.testing.assert_close(k.moving_mean, bn.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k.moving_variance, bn.running_var * (m - 1) / m, rtol=1e-12, atol=1e-12)


def test_round_trips_are_lossless():
    k = _trained_keras(3)
    k2 = to_keras_bn(from_keras_bn(k))
    for a, b in zip(k.get_weights(), k2.get_weights()):
        assert (a == b).all()
    assert k2.get_config() == k.get_config()
    bn = torch.nn.BatchNorm2d(3)
    bn(_randn((4, 3, 2, 2), seed=60, offset=1.0))
    back = from_keras_bn(to_keras_bn(bn))
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(back, key), getattr(bn, key)), key
    assert back.momentum == bn.momentum and back.eps == bn.eps
    # With the Bessel conversion both ways: within one float32 rounding.
    back = from_keras_bn(to_keras_bn(bn, count=16), count=16)
    torch.testing.assert_close(back.running_var, bn.running_var, rtol=2e-7, atol=0)
    assert back.unbiased_running_var is True


def test_count_converts_keras_variance_to_unbiased():
    k = _trained_keras(3, dtype=F64)
    bn = from_keras_bn(k, count=100)
    torch.testing.assert_close(bn.running_var, k.moving_variance * 100 / 99, rtol=1e-15, atol=0)
    assert bn.unbiased_running_var is True


def test_keras_layer_api_center_scale_and_trainable_false():
    C = 4
    mean, var = np.linspace(-1, 1, C).astype(np.float32), np.linspace(0.5, 2, C).astype(np.float32)
    beta = np.full(C, 0.25, np.float32)
    cfg = {"axis": -1, "momentum": 0.97, "epsilon": 1e-3, "center": True, "scale": False, "trainable": False}
    layer = FakeKerasLayer([beta, mean, var], cfg)
    bn = from_keras_bn(layer, dim=1)
    assert type(bn).__name__ == "FrozenBatchNorm1d" and bn.weight is None
    assert bn.momentum == pytest.approx(0.03) and bn.momentum == 0.03
    x = _randn((5, C), seed=70)
    want = (x.double() - torch.from_numpy(mean).double()) / torch.sqrt(
        torch.from_numpy(var).double() + 1e-3
    ) + 0.25
    torch.testing.assert_close(bn.train()(x).double(), want, rtol=1e-6, atol=1e-6)
    k = to_keras_bn(bn)
    assert k.get_config() == cfg
    assert [w.tolist() for w in k.get_weights()] == [beta.tolist(), mean.tolist(), var.tolist()]


def test_mapping_source_and_dims():
    src = {
        "gamma": np.ones(2),
        "beta": np.zeros(2),
        "moving_mean": np.array([1.0, 2.0]),
        "moving_variance": np.array([4.0, 9.0]),
    }
    bn3 = from_keras_bn(src, dim=3)
    assert type(bn3).__name__ == "BatchNorm3d" and bn3.momentum == 0.01
    x = torch.ones(1, 2, 1, 1, 1, dtype=F64)
    want = torch.tensor([(1 - 1) / 4.001**0.5, (1 - 2) / 9.001**0.5], dtype=F64)  # Keras eps 1e-3
    torch.testing.assert_close(bn3.eval()(x).flatten(), want, rtol=1e-12, atol=1e-12)


def test_errors():
    with pytest.raises(ValueError, match="momentum=None .* no Keras equivalent"):
        to_keras_bn(torch.nn.BatchNorm1d(3, momentum=None))
    with pytest.raises(ValueError, match="without running_mean/running_var"):
        to_keras_bn(torch.nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="count must be None or an int >= 2 .* got 1"):
        to_keras_bn(torch.nn.BatchNorm1d(3), count=1)
    with pytest.raises(ValueError, match="dim must be 1, 2 or 3"):
        from_keras_bn(BatchNormalization(3), dim=4)
    with pytest.raises(TypeError, match="got int"):
        from_keras_bn(3)
    with pytest.raises(ValueError, match="lacks \\['moving_variance'\\]"):
        from_keras_bn({"moving_mean": np.zeros(3)})
    with pytest.raises(ValueError, match="momentum must be a number in \\[0, 1\\]"):
        keras_to_torch_momentum(1.5)
    assert normkit.convert.to_keras_bn is to_keras_bn
    assert isinstance(from_keras_bn(BatchNormalization(3, trainable=False)), FrozenBatchNorm2d)


def test_to_keras_bn_refuses_what_keras_bn_cannot_express():
    # A norm+activation layer would lose its activation (eval outputs differed by ~3 with relu).
    with pytest.raises(ValueError, match="BatchNormAct2d applies the activation relu .* would drop it"):
        to_keras_bn(normkit.nn.BatchNormAct2d(3, activation="relu"))
    k = to_keras_bn(normkit.nn.BatchNormAct2d(3, activation=None))  # nothing to drop
    assert k.num_features == 3
    # InstanceNorm with running statistics: eval looks like BN, training normalizes per sample.
    with pytest.raises(TypeError, match="expected a batch-norm layer, got InstanceNorm2d"):
        to_keras_bn(torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True))
    with pytest.raises(ValueError, match="dim must be 1, 2 or 3 .* got True"):
        from_keras_bn(BatchNormalization(3), dim=True)  # type: ignore[arg-type]


def _torchvision_frozen_bn(C: int) -> torch.nn.Module:
    """torchvision.ops.FrozenBatchNorm2d's layout (and class name): four buffers and eps, no momentum."""

    class FrozenBatchNorm2d(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.eps = 1e-5
            self.register_buffer("weight", torch.linspace(0.5, 1.5, C, dtype=F64))
            self.register_buffer("bias", torch.linspace(-1, 1, C, dtype=F64))
            self.register_buffer("running_mean", torch.linspace(-2, 2, C, dtype=F64))
            self.register_buffer("running_var", torch.linspace(0.5, 3, C, dtype=F64))

    return FrozenBatchNorm2d()


def test_to_keras_bn_takes_torchvision_frozen_bn():
    f = _torchvision_frozen_bn(3)
    k = to_keras_bn(f)  # (was an AttributeError: no momentum)
    assert k.trainable is False
    x = _randn((2, 4, 4, 3), F64, seed=5)
    want = (x - f.running_mean) / torch.sqrt(f.running_var + 1e-5) * f.weight + f.bias  # closed form
    torch.testing.assert_close(
        k.train()(x), want, rtol=1e-12, atol=1e-12
    )  # frozen: running stats in training
