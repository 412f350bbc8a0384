"""Weight Standardization (issue 6.6): parametrization, StdConv, ScaledStdConv, against a per-output-channel
float64 oracle built from explicit slices of the kernel."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch.autograd import gradcheck

from normkit.nn import (
    ScaledStdConv1d,
    ScaledStdConv2d,
    StdConv1d,
    StdConv2d,
    StdConv3d,
    weight_standardization,
)
from normkit.nn.weight_standardization import standardize_weight

F64 = torch.float64


def _ref_ws(w: torch.Tensor, eps: float, groups: int = 1, transposed: bool = False) -> torch.Tensor:
    """Standardize each output channel's fan-in, found by slicing (one output channel at a time)."""
    w = w.to(F64)
    out = torch.empty_like(w)
    if not transposed:
        for o in range(w.shape[0]):
            fan = w[o]
            mu = fan.mean()
            out[o] = (fan - mu) / torch.sqrt(((fan - mu) ** 2).mean() + eps)
        return out
    cin, og = w.shape[0], w.shape[1]
    per = cin // groups
    for j in range(groups):
        for o in range(og):
            fan = w[j * per : (j + 1) * per, o]
            mu = fan.mean()
            out[j * per : (j + 1) * per, o] = (fan - mu) / torch.sqrt(((fan - mu) ** 2).mean() + eps)
    return out


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Conv1d(4, 6, 3),
        lambda: nn.Conv1d(4, 6, 3, groups=2),
        lambda: nn.Conv2d(6, 6, 3, groups=6),  # depthwise
        lambda: nn.Conv3d(2, 3, 2),
        lambda: nn.Linear(5, 4),
        lambda: nn.ConvTranspose2d(4, 6, 3, groups=2),
        lambda: nn.ConvTranspose1d(3, 2, 3),
    ],
)
def test_parametrization_matches_slice_oracle_and_conv_output(make):
    torch.manual_seed(0)
    m = make().double()
    with torch.no_grad():
        m.weight.mul_(7.0).add_(0.3)
    raw = m.weight.detach().clone()
    weight_standardization(m, eps=1e-5)
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    want = _ref_ws(raw, 1e-5, getattr(m, "groups", 1), transposed)
    torch.testing.assert_close(m.weight, want, rtol=1e-10, atol=1e-10)
    assert torch.equal(m.parametrizations.weight.original, raw)  # the raw weight is what is stored


def test_stdconv_forward_and_grads_vs_oracle_and_gradcheck():
    torch.manual_seed(1)
    conv = StdConv2d(4, 6, 3, groups=2, padding=1, eps=1e-5).double()
    x = torch.randn(2, 4, 5, 5, dtype=F64)
    dy = torch.randn(2, 6, 5, 5, dtype=F64)
    w = conv.weight
    y = conv(x)
    w_ref = w.detach().clone().requires_grad_()
    y_ref = TF.conv2d(x, _ref_ws(w_ref, 1e-5), conv.bias, padding=1, groups=2)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    (gw,) = torch.autograd.grad(y, w, dy)
    (gw_ref,) = torch.autograd.grad(y_ref, w_ref, dy)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-9, atol=1e-9)
    small = StdConv1d(2, 2, 2, eps=1e-5).double()
    assert gradcheck(
        lambda x, w: TF.conv1d(x, standardize_weight(w, 1e-5)),
        (torch.randn(1, 2, 4, dtype=F64), small.weight.detach().requires_grad_()),
    )


def test_stdconv_loads_conv_checkpoints_and_serializes():
    torch.manual_seed(2)
    ref = nn.Conv3d(2, 3, 2)
    ours = StdConv3d(2, 3, 2)
    ours.load_state_dict(ref.state_dict())
    nn.Conv3d(2, 3, 2).load_state_dict(ours.state_dict())
    x = torch.randn(1, 2, 3, 3, 3)
    torch.testing.assert_close(
        ours(x), TF.conv3d(x, _ref_ws(ref.weight, 1e-6).float(), ref.bias), rtol=1e-5, atol=1e-5
    )
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert torch.equal(clone(x), ours(x))
    assert "eps=1e-06" in repr(ours)


def test_scaled_stdconv_is_gain_gamma_over_sqrt_fan_in_times_ws():
    torch.manual_seed(3)
    conv = ScaledStdConv2d(4, 3, 3, gamma=1.7139, gain_init=0.5, eps=1e-5).double()
    with torch.no_grad():
        conv.gain.copy_(torch.tensor([0.5, 1.0, 2.0], dtype=F64).reshape(3, 1, 1, 1))
    fan_in = 4 * 9
    want = conv.gain.detach() * 1.7139 / fan_in**0.5 * _ref_ws(conv.weight.detach(), 1e-5)
    torch.testing.assert_close(conv.standardized_weight(), want, rtol=1e-10, atol=1e-10)
    x = torch.randn(2, 4, 6, 6, dtype=F64)
    torch.testing.assert_close(conv(x), TF.conv2d(x, want, conv.bias), rtol=1e-10, atol=1e-10)
    (ggain,) = torch.autograd.grad(conv(x).sum(), conv.gain)
    assert torch.isfinite(ggain).all() and (ggain != 0).all()
    assert sorted(conv.state_dict()) == ["bias", "gain", "weight"]
    conv1 = ScaledStdConv1d(2, 2, 3)
    torch.testing.assert_close(
        conv1.standardized_weight().square().sum((1, 2)), torch.ones(2), atol=2e-3, rtol=0
    )


def test_parametrized_conv_deepcopy_pickle_and_state_dict():
    torch.manual_seed(4)
    m = weight_standardization(nn.Conv1d(4, 6, 3, groups=2))
    x = torch.randn(2, 4, 7)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert torch.equal(clone(x), m(x))
    assert sorted(m.state_dict()) == ["bias", "parametrizations.weight.original"]


def test_errors():
    with pytest.raises(ValueError, match="rank >= 2"):
        weight_standardization(nn.LayerNorm(3))
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        StdConv2d(2, 2, 3, eps=-1.0)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        weight_standardization(nn.Conv2d(2, 2, 3), eps=float("nan"))


def test_weight_standardization_arguments_and_deepcopy():
    with pytest.raises(TypeError, match="expected an nn.Module, got str"):
        weight_standardization("conv")
    conv = weight_standardization(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="Conv2d.weight is already standardized"):
        weight_standardization(conv)
    # removing it from a deepcopy must not delete the original's weight property (shared class)
    raw = conv.parametrizations.weight.original.detach().to(torch.float64)
    flat = raw.flatten(1)
    want = (flat - flat.mean(1, keepdim=True)) / (flat.var(1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    dup = copy.deepcopy(conv)
    torch.nn.utils.parametrize.remove_parametrizations(dup, "weight")
    torch.testing.assert_close(conv.weight.to(torch.float64).flatten(1), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dup.weight.to(torch.float64).flatten(1), want, atol=1e-5, rtol=1e-5)


def test_scaled_stdconv_loads_timm_and_flat_gain_checkpoints():
    """timm's ScaledStdConv2d stores ``gain`` as (out, 1, 1, 1), so does this layer (it loads a timm
    checkpoint with strict=True, and saves one timm loads); a flat (out,) gain, as earlier normkit
    versions saved it, still loads."""
    torch.manual_seed(0)
    ref = ScaledStdConv2d(3, 4, 3, gamma=1.7139)
    timm_sd = {
        "weight": torch.randn(4, 3, 3, 3),
        "bias": torch.randn(4),
        "gain": torch.rand(4, 1, 1, 1) + 0.5,
    }
    ref.load_state_dict(timm_sd, strict=True)
    assert ref.state_dict()["gain"].shape == (4, 1, 1, 1)
    x = torch.randn(2, 3, 7, 7)
    # timm's formula: gain * gamma / sqrt(fan_in) * the standardized kernel (eps=1e-6), written out here
    w = timm_sd["weight"]
    ws = (w - w.mean((1, 2, 3), keepdim=True)) / torch.sqrt(
        w.var((1, 2, 3), unbiased=False, keepdim=True) + 1e-6
    )
    want = TF.conv2d(x, timm_sd["gain"] * 1.7139 / 27**0.5 * ws, timm_sd["bias"])
    torch.testing.assert_close(ref(x), want, rtol=1e-5, atol=1e-5)
    flat = dict(timm_sd, gain=timm_sd["gain"].flatten())
    old = ScaledStdConv2d(3, 4, 3, gamma=1.7139)
    old.load_state_dict(flat, strict=True)
    assert torch.equal(old(x), ref(x))
    assert ScaledStdConv1d(2, 5, 3).gain.shape == (5, 1, 1)
