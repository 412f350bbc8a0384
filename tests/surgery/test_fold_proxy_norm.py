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
    net = _rand(
        nn.Sequential(
            nn.Conv2d(3, 8, 3),
            normkit.create_norm_layer(spec, 8, activation="silu"),
            nn.Conv2d(8, 8, 3, groups=groups, padding=1, padding_mode="circular"),
        )
    )
    folded = _check(net, torch.randn(4, 3, 9, 9))
    assert isinstance(folded[1], FoldedProxyAct)
    assert isinstance(net[1], GroupNormProxyAct2d)  # the original is untouched
    assert net[2].weight is not folded[2].weight


@pytest.mark.parametrize("bias", [True, False])
def test_fold_into_conv1d_conv3d_and_linear(bias):
    net1 = _rand(
        nn.Sequential(
            nn.Conv1d(2, 6, 3), normkit.create_norm_layer("ln+pn", 6), nn.Conv1d(6, 4, 1, bias=bias)
        )
    )
    assert isinstance(_check(net1, torch.randn(3, 2, 10))[1], FoldedProxyAct)
    net3 = _rand(
        nn.Sequential(
            nn.Conv3d(2, 4, 1), normkit.create_norm_layer("gn:2+pn", 4), nn.Conv3d(4, 4, 2, bias=bias)
        )
    )
    assert isinstance(_check(net3, torch.randn(2, 2, 4, 4, 4))[1], FoldedProxyAct)
    netl = _rand(nn.Sequential(nn.Linear(5, 8), ProxyNormAct(8), nn.Linear(8, 3, bias=bias)))
    assert isinstance(_check(netl, torch.randn(6, 5))[1], FoldedProxyAct)


def test_channels_last_conv_weights_fold():
    net = _rand(nn.Sequential(nn.Conv2d(3, 8, 3), normkit.create_norm_layer("ln+pn", 8), nn.Conv2d(8, 4, 1)))
    net = net.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 7, 7).to(memory_format=torch.channels_last)
    _check(net, x)


def test_zero_padding_folds_the_scale_and_keeps_the_shift():
    # The padded zeros of conv(rstd * (a - m)) stay zeros as conv'(a - m) with W' = W * rstd; the
    # shift -m cannot move into the bias (the border outputs would change), so the layer keeps it.
    net = _rand(
        nn.Sequential(
            nn.Conv2d(3, 8, 3), normkit.create_norm_layer("ln+pn", 8), nn.Conv2d(8, 4, 3, padding=1)
        )
    )
    x = torch.randn(2, 3, 8, 8)
    folded = _check(net, x)
    assert isinstance(folded[1], FoldedProxyAct) and folded[1].shift is not None
    m, _ = net[1].proxy_stats()
    torch.testing.assert_close(folded[1].shift.detach(), m.detach())
    circular = _rand(
        nn.Sequential(
            nn.Conv2d(3, 8, 3),
            normkit.create_norm_layer("ln+pn", 8),
            nn.Conv2d(8, 4, 3, padding=1, padding_mode="circular"),
        )
    )
    assert _check(circular, x)[1].shift is None  # circular padding: the shift folds too


def test_through_pooling_means_and_views_and_into_several_layers():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.pn = normkit.create_norm_layer("gn:2+pn", 8, activation="silu")
            self.pool = nn.MaxPool2d(2)
            self.a = nn.Conv2d(8, 4, 1)
            self.b = nn.Conv2d(8, 4, 1, bias=False)
            self.pn2 = ProxyNormAct(4)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            h = self.pool(self.pn(self.conv(x)))
            return self.fc(self.pn2(self.a(h) + self.b(h)).mean((2, 3)))

    net = _rand(Net())
    folded = _check(net, torch.randn(3, 3, 10, 10))
    assert isinstance(folded.pn, FoldedProxyAct) and folded.pn.shift is None  # into both a and b
    assert isinstance(folded.pn2, FoldedProxyAct)  # through the spatial mean into fc


def test_refuses_when_not_followed_by_a_conv():
    net = _rand(
        nn.Sequential(nn.Conv2d(3, 8, 3), normkit.create_norm_layer("ln+pn", 8), nn.AdaptiveAvgPool2d(1))
    )
    with pytest.raises(ValueError, match="reaches the model's output"):
        normkit.fold_proxy_norm(net, torch.randn(2, 3, 8, 8), strict=True)
    with pytest.warns(UserWarning, match="left these Proxy Norm layers unfolded"):
        kept = normkit.fold_proxy_norm(net, torch.randn(2, 3, 8, 8))
    assert isinstance(kept[1], GroupNormProxyAct2d)
    net2 = _rand(nn.Sequential(nn.Conv2d(3, 8, 1), ProxyNormAct(8), nn.Linear(8, 2)))
    with pytest.raises(ValueError, match="Linear layer after a feature map"):
        normkit.fold_proxy_norm(net2, torch.randn(2, 3, 8, 8), strict=True)
    residual = nn.Sequential(nn.Conv2d(3, 8, 1), ProxyNormAct(8))

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = residual
            self.conv = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            h = self.body(x)
            return self.conv(h + h)

    with pytest.raises(ValueError, match="call_function add"):
        normkit.fold_proxy_norm(Res(), torch.randn(2, 3, 4, 4), strict=True)


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


def test_models_with_normkit_bn_and_gn_fold():
    torch.manual_seed(0)
    net = _rand(
        nn.Sequential(
            nn.Conv2d(3, 8, 3),
            normkit.nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 1),
            normkit.nn.GroupNorm(2, 8),
            nn.Conv2d(8, 8, 1),
            normkit.nn.BatchNormAct2d(8),
            nn.Conv2d(8, 8, 1),
            normkit.create_norm_layer("ln+pn", 8),
            nn.Conv2d(8, 4, 1),
            normkit.nn.FrozenBatchNorm2d(4),
        )
    )
    with torch.no_grad():
        net[1].running_var.uniform_(0.5, 2)
    folded = _check(net, torch.randn(4, 3, 8, 8))
    assert isinstance(folded[8], FoldedProxyAct) and type(folded[1]) is normkit.nn.BatchNorm2d


def test_converted_torchvision_resnet_folds_its_proxy_norms():
    from tests.surgery.models import TVResNet

    torch.manual_seed(0)
    net, _report = normkit.convert_norms(TVResNet(width=8, layers=(1, 1, 1, 1)), "ln+pn")
    net = _rand(net)
    x = torch.randn(2, 3, 8, 8)
    # The blocks' PN feed conv2 (zero padding: scale folded, shift kept); the stem's feeds a
    # residual addition too, so it stays.
    with pytest.warns(UserWarning, match=r"bn1: its output reaches call_function add"):
        folded = normkit.fold_proxy_norm(net, x)
    names = {n for n, m in folded.named_modules() if isinstance(m, FoldedProxyAct)}
    assert names == {f"layer{i}.0.bn1" for i in range(1, 5)}
    torch.testing.assert_close(folded(x), net.eval()(x), atol=1e-5, rtol=1e-5)


def test_avg_pool_with_divisor_override_keeps_its_proxy_norm():
    """sum / d does not pass a shift through (b becomes b * window / d): the PN layer is left, with a
    warning; oracle: the original model's output."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        _rand(normkit.create_norm_layer("ln+pn", 8)),
        nn.AvgPool2d(2, divisor_override=1),
        nn.Conv2d(8, 4, 1),
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"1: its output reaches module AvgPool2d"):
        folded = normkit.fold_proxy_norm(net, x)
    assert isinstance(folded[1], ProxyNormAct)
    torch.testing.assert_close(folded(x), net(x))


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Sequential(nn.Conv2d(3, 8, 3), normkit.create_norm_layer("ln+pn", 8), nn.Conv2d(8, 4, 1))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.s(a + b)


def test_tuple_example_input_and_a_bad_input_prints_nothing(capfd):
    """A tuple is the model's positional inputs (as in fold_bn); oracle: the original model's output. A
    wrong input gives fold_proxy_norm's NormError and nothing on stderr (fx's ShapeProp prints one)."""
    net = _rand(_TwoInputs()).eval()
    a, b = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    folded = normkit.fold_proxy_norm(net, (a, b))
    assert isinstance(folded.s[1], FoldedProxyAct)
    torch.testing.assert_close(folded(b, a), net(b, a), atol=1e-5, rtol=1e-5)
    capfd.readouterr()
    with pytest.raises(normkit.NormError, match="failed on the example input"):
        normkit.fold_proxy_norm(net, a)  # one input short
    assert capfd.readouterr().err == ""


def test_scripted_and_lazy_models_are_refused():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), normkit.create_norm_layer("ln+pn", 8), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(TypeError, match="scripted modules .* not supported"):
        normkit.fold_proxy_norm(torch.jit.trace(nn.Sequential(nn.Conv2d(3, 4, 3)), x), x)
    with pytest.raises(normkit.NormError, match=r"layer '0' \(LazyConv2d\).*forward pass"):
        normkit.fold_proxy_norm(nn.Sequential(nn.LazyConv2d(8, 3), net[1], net[2]), x)
