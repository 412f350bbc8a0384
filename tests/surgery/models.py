"""Test-only models in the shapes users bring: a torchvision-style ResNet, MobileNet and ConvNeXt blocks.

torchvision and timm are not dependencies (torchvision's wheel does not import with the CPU torch
here), so their layouts are written out: the same module names, the same ``forward`` (a
BasicBlock calls its one ``relu`` twice, ``out += identity``), ``norm_layer=`` as they take it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from normkit.nn import LayerNorm2d

NormLayer = Callable[[int], nn.Module]


class BasicBlock(nn.Module):
    """torchvision's ``resnet.BasicBlock``."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class TVResNet(nn.Module):
    """torchvision's ``ResNet`` (``resnet18`` with the defaults), with ``width`` scaling the 64-128-256-512
    widths and ``small_stem`` (3x3, stride 1, no max-pool) for tiny images."""

    def __init__(
        self,
        layers: tuple[int, ...] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
        small_stem: bool = True,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self._norm_layer = norm_layer
        self.inplanes = width
        if small_stem:
            self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_stem else nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), self._norm_layer(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample, self._norm_layer)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes, norm_layer=self._norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ConvNormAct(nn.Sequential):
    """torchvision's ``Conv2dNormActivation``: conv, norm, activation in a Sequential."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int = 3,
        stride: int = 1,
        groups: int = 1,
        norm_layer: NormLayer = nn.BatchNorm2d,
        act: type[nn.Module] | None = nn.ReLU6,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            norm_layer(cout),
        ]
        if act is not None:
            layers.append(act(inplace=True) if act in (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish) else act())
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand (optionally grouped) + ReLU6, 3x3 depthwise + ReLU6, 1x1 project (no
    activation)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int = 1,
        expand: int = 4,
        pw_groups: int = 1,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            ConvNormAct(cin, hidden, 1, groups=pw_groups, norm_layer=norm_layer),
            ConvNormAct(hidden, hidden, 3, stride, groups=hidden, norm_layer=norm_layer),
            nn.Conv2d(hidden, cout, 1, bias=False),
            norm_layer(cout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetish(nn.Module):
    """A small MobileNetV2-style network: stem, inverted residuals (depthwise and grouped convs), head."""

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, norm_layer: NormLayer = nn.BatchNorm2d
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            ConvNormAct(in_channels, 16, 3, 1, norm_layer=norm_layer),
            InvertedResidual(16, 16, 1, 4, pw_groups=2, norm_layer=norm_layer),
            InvertedResidual(16, 24, 2, 4, norm_layer=norm_layer),
            InvertedResidual(24, 24, 1, 4, pw_groups=4, norm_layer=norm_layer),
            ConvNormAct(24, 64, 1, norm_layer=norm_layer),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block (timm's ``conv_mlp`` form): 7x7 depthwise conv, LayerNorm2d, 1x1 conv, GELU, 1x1
    conv, layer scale."""

    def __init__(self, dim: int, norm_layer: NormLayer | None = None, ls_init: float = 1e-1) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = (norm_layer or (lambda c: LayerNorm2d(c, eps=1e-6)))(dim)
        self.pwconv1 = nn.Conv2d(dim, 4 * dim, 1)
        self.act = nn.GELU()
        self.pwconv2 = nn.Conv2d(4 * dim, dim, 1)
        self.gamma = nn.Parameter(torch.full((dim, 1, 1), ls_init))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))


class TinyConvNeXt(nn.Module):
    """Stem (2x2 conv + LayerNorm2d), blocks, a downsampling layer, and ConvNeXt's head: pool, a
    channels-last ``nn.LayerNorm``, linear."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        dims: tuple[int, int] = (16, 32),
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        norm = norm_layer or (lambda c: LayerNorm2d(c, eps=1e-6))
        self.stem = nn.Sequential(nn.Conv2d(in_channels, dims[0], 2, 2), norm(dims[0]))
        self.stage1 = nn.Sequential(ConvNeXtBlock(dims[0], norm_layer), ConvNeXtBlock(dims[0], norm_layer))
        self.down = nn.Sequential(norm(dims[0]), nn.Conv2d(dims[0], dims[1], 2, 2))
        self.stage2 = ConvNeXtBlock(dims[1], norm_layer)
        self.head_norm = nn.LayerNorm(dims[1], eps=1e-6)
        self.fc = nn.Linear(dims[1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.fc(self.head_norm(x.mean((2, 3))))


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN-like layer non-trivial affine and running statistics, so that a conversion or a
    fold that drops or misplaces any of them shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            for key, lo, hi in (
                ("weight", 0.5, 1.5),
                ("bias", -0.5, 0.5),
                ("running_mean", -0.5, 0.5),
                ("running_var", 0.5, 2.0),
            ):
                t = getattr(m, key, None)
                if (
                    isinstance(t, Tensor)
                    and t.dim() == 1
                    and not isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
                ):
                    t.copy_(
                        torch.rand(t.shape, generator=g, dtype=torch.float64).to(t.dtype) * (hi - lo) + lo
                    )
    return model


def timm_like() -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
    """Stand-ins with timm's names, modules and attributes (``timm.layers.norm_act.BatchNormAct2d``)."""

    class BatchNormAct2d(nn.BatchNorm2d):
        def __init__(self, num_features, act_layer=nn.ReLU):
            super().__init__(num_features)
            self.drop = nn.Identity()
            self.act = act_layer()

        def forward(self, x):
            return self.act(self.drop(super().forward(x)))

    class LayerNorm2d(nn.LayerNorm):
        def forward(self, x):
            return nn.functional.layer_norm(
                x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps
            ).permute(0, 3, 1, 2)

    class FrozenBatchNorm2d(nn.Module):  # torchvision.ops.misc's: buffers only
        def __init__(self, n):
            super().__init__()
            self.eps = 1e-5
            for k, v in (
                ("weight", torch.ones(n)),
                ("bias", torch.zeros(n)),
                ("running_mean", torch.zeros(n)),
                ("running_var", torch.ones(n)),
            ):
                self.register_buffer(k, v)

        def forward(self, x):
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            return x * scale.view(1, -1, 1, 1) + (self.bias - self.running_mean * scale).view(1, -1, 1, 1)

    BatchNormAct2d.__module__ = "timm.layers.norm_act"
    LayerNorm2d.__module__ = "timm.layers.norm"
    FrozenBatchNorm2d.__module__ = "torchvision.ops.misc"
    return BatchNormAct2d, LayerNorm2d, FrozenBatchNorm2d
