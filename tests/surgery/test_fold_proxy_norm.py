"""fold_proxy_norm: the folded model equals the original where folding is exact, refuses elsewhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normkit
from normkit.nn import GroupNormProxyAct2d, ProxyNormAct
from normkit.surgery import FoldedProxyAct


def _rand(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proxy" in name or (p.dim() == 1 and "bias" in name):
                p.add_(0.3 * torch.randn_like(p))
            elif p.dim() == 1:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    return model


def _check(net, x):
    folded = normkit.fold_proxy_norm(net, x)
    x2 = torch.randn_like(x)
    torch.testing.assert_close(folded(x2), net.eval()(x2), atol=1e-5, rtol=1e-5)
    return folded


@pytest.mark.parametrize("groups", [1, 2, 8])
@pytest.mark.parametrize("spec", ["ln+pn", "gn:4+pn"])
def test_fold_into_conv2d_is_exact(groups, spec):
    net = _rand(nn.Sequential(
        nn.Conv2d(3, 8, 3), normkit.create_norm_layer(spec, 8, activation="silu"),
        nn.Conv2d(8, 8, 3, groups=groups, padding=1, padding_mode="circular"),
    ))
    folded = _check(net, torch.randn(4, 3, 9, 9))
    assert isinstance(folded[1], FoldedProxyAct)
    assert isinstance(net[1], GroupNormProxyAct2d)  # the original is untouched
    assert net[2].weight is not folded[2].weight


@pytest.mark.parametrize("bias", [True, False])
def test_fold_into_conv1d_conv3d_and_linear(bias):
    net1 = _rand(nn.Sequential(nn.Conv1d(2, 6, 3), normkit.create_norm_layer("ln+pn", 6), nn.Conv1d(6, 4, 1, bias=bias)))
    assert isinstance(_check(net1, torch.randn(3, 2, 10))[1], FoldedProxyAct)
    net3 = _rand(nn.Sequential(nn.Conv3d(2, 4, 1), normkit.create_norm_layer("gn:2+pn", 4), nn.Conv3d(4, 4, 2, bias=bias)))
    assert isinstance(_check(net3, torch.randn(2, 2, 4, 4, 4))[1], FoldedProxyAct)
    netl = _rand(nn.Sequential(nn.Linear(5, 8), ProxyNormAct(8), nn.Linear(8, 3, bias=bias)))
    assert isinstance(_check(netl, torch.randn(6, 5))[1], FoldedProxyAct)


def test_channels_last_conv_weights_fold():
    net = _rand(nn.Sequential(nn.Conv2d(3, 8, 3), normkit.create_norm_layer("ln+pn", 8), nn.Conv2d(8, 4, 1)))
    net = net.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 7, 7).to(memory_format=torch.channels_last)
    _check(net, x)


def test_zero_padding_is_refused_with_the_reason():
    net = _rand(nn.Sequential(nn.Conv2d(3, 8, 3), normkit.create_norm_layer("ln+pn", 8), nn.Conv2d(8, 4, 3, padding=1)))
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="zero-pads"):
        folded = normkit.fold_proxy_norm(net, x)
    assert isinstance(folded[1], GroupNormProxyAct2d)
    torch.testing.assert_close(folded(x), net.eval()(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"1: the next conv zero-pads"):
        normkit.fold_proxy_norm(net, x, strict=True)


def test_refuses_when_not_followed_by_a_conv():
    net = _rand(nn.Sequential(nn.Conv2d(3, 8, 3), normkit.create_norm_layer("ln+pn", 8), nn.AdaptiveAvgPool2d(1)))
    with pytest.raises(ValueError, match="followed by module AdaptiveAvgPool2d"):
        normkit.fold_proxy_norm(net, torch.randn(2, 3, 8, 8), strict=True)
    net2 = _rand(nn.Sequential(nn.Conv2d(3, 8, 1), ProxyNormAct(8), nn.Linear(8, 2)))
    with pytest.raises(ValueError, match="Linear layer after a feature map"):
        normkit.fold_proxy_norm(net2, torch.randn(2, 3, 8, 8), strict=True)


def test_untraceable_model_gives_a_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            if x.sum() > 0:
                return self.conv(x)
            return x

    with pytest.raises(ValueError, match="could not trace"):
        normkit.fold_proxy_norm(Branchy(), torch.randn(1, 3, 4, 4))
