"""The lab's small models, every norm + activation built by name through the registry.

Each model takes a norm spec (``"bn"``, ``"gn:8"``, ``"ln"``, ``"in"``, ``"ln+pn"``, ``"gn:4+pn"``,
``"none"``, ...) or a ``norm_layer`` callable ``C -> nn.Module``; the layer it builds is the norm
*and* its activation (:func:`normkit.create_norm_act_layer`), so Proxy Norm specs, whose layer
contains its own activation, drop in like any other norm.

A spec with the ``post:`` prefix (``"post:bn"``, ``"post:gn:8"``) puts the norm *after* the
activation instead: the layer is :class:`ActNorm`, ``activation -> norm`` with the plain norm of
:func:`normkit.create_norm_layer`, and the conv (or linear) before it keeps its bias, since no norm
follows it directly any more. ``"post:none"`` and ``post:`` with a Proxy Norm spec (norm and
activation by construction) are refused; so is :class:`RandNet` (E4 measures norm -> activation
sites).

Models (docs/EXPERIMENTS.md, E1..E5):

* :class:`CNN4`: 4 conv3x3 layers (32, 32, pool, 64, 64), global average pool, linear; optional
  ``Linear(64->64, bias=False) -> norm -> act`` head (E1's head variant, where BN pools over
  just B values).
* :class:`PreActResNet`: a small pre-activation ResNet (He et al. 2016 v2), ``norm_layer=``.
* :class:`MLP3`: 64-100-100-100-10 with sigmoid (the BN paper's MNIST net), norm before each sigmoid.
* :class:`RandNet`: L conv3x3 layers, circular padding, random per-channel affine (E4).
* :class:`VGGish`: 6 conv layers, no residuals (E5, Santurkar et al.).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .. import functional as F
from ..functional.activations import get_activation
from ..nn import GroupNormProxyAct2d, ProxyNormAct, available_norms, create_norm_act_layer, create_norm_layer
from ..nn.registry import _REGISTRY, spec_key

__all__ = [
    "CNN4",
    "POST_PREFIX",
    "ActNorm",
    "MLP3",
    "MODEL_NAMES",
    "NormLayer",
    "PreActResNet",
    "RandNet",
    "VGGish",
    "activation_module",
    "build_model",
    "check_norm_spec",
    "is_instance_norm",
    "is_post",
    "norm_act_factory",
    "split_post",
]

#: A norm spec (``"gn:8"``) or a callable ``num_channels -> nn.Module`` that returns norm + activation.
NormLayer = str | Callable[[int], nn.Module]

_SPEC = re.compile(r"^(?P<base>[a-z][a-z0-9_]*)(?::(?P<arg>[0-9]+))?(?P<suffix>(?:\+[a-z][a-z0-9_]*)*)$")

#: Spec prefix that puts the norm after the activation (``"post:bn"``: ``activation -> BN``).
POST_PREFIX = "post:"


def split_post(spec: str) -> tuple[bool, str]:
    """``(post, spec without the prefix)``: whether ``spec`` puts the norm after the activation.

    Example:
        >>> split_post("post:gn:8"), split_post("gn:8")
        ((True, 'gn:8'), (False, 'gn:8'))
    """
    s = spec.strip().lower()
    if s.startswith(POST_PREFIX):
        return True, s[len(POST_PREFIX) :].strip()
    return False, s


def is_post(spec: NormLayer) -> bool:
    """Whether ``spec`` is a ``post:`` spec (norm after the activation); ``False`` for a callable.

    Example:
        >>> is_post("post:bn"), is_post("bn")
        (True, False)
    """
    return isinstance(spec, str) and split_post(spec)[0]


def _includes_activation(spec: str) -> bool:
    """Whether the registry builds ``spec`` with its activation inside (Proxy Norm)."""
    key, _ = spec_key(spec)
    factory = _REGISTRY[key][0] if key is not None and key in _REGISTRY else None
    return bool(getattr(factory, "includes_activation", False))


def check_norm_spec(spec: str) -> str:
    """Return ``spec`` normalised (stripped, lower case) if the registry knows it, else raise ValueError.

    The error lists the registered names, so a typo on the command line gets a useful message.
    ``post:`` followed by a registered spec (``"post:bn"``) is a spec too: the norm after the
    activation; ``"post:none"`` and ``post:`` with a spec that contains its own activation (Proxy Norm,
    ``"post:ln+pn"``) are refused.

    Example:
        >>> check_norm_spec(" GN:8 "), check_norm_spec("Post:BN")
        ('gn:8', 'post:bn')
        >>> check_norm_spec("batchnorm")
        Traceback (most recent call last):
        ...
        ValueError: unknown norm 'batchnorm'; registered norms: ...
        >>> check_norm_spec("post:ln+pn")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: norm spec 'post:ln+pn': 'ln+pn' contains its own activation (Proxy Norm), so it ...
    """
    if not isinstance(spec, str):
        raise TypeError(f"norm spec must be a string such as 'bn' or 'gn:8', got {type(spec).__name__}")
    post, inner = split_post(spec)
    if post:
        if inner.startswith(POST_PREFIX):
            raise ValueError(f"norm spec {spec!r}: 'post:' given twice; use e.g. 'post:bn'")
        try:
            inner = check_norm_spec(inner)
        except ValueError as e:
            raise ValueError(f"norm spec {spec!r}: 'post:' must be followed by a norm spec: {e}") from None
        if inner == "none":
            raise ValueError(
                f"norm spec {spec!r}: there is no norm to put after the activation; use 'none' for no norm"
            )
        if _includes_activation(inner):
            raise ValueError(
                f"norm spec {spec!r}: {inner!r} contains its own activation (Proxy Norm), so it cannot go "
                f"after the activation; use {inner!r}"
            )
        return POST_PREFIX + inner
    s = inner
    match = _SPEC.match(s)
    names = available_norms()
    if match is None or match["base"] + match["suffix"] not in names:
        raise ValueError(
            f"unknown norm {spec!r}; registered norms: {', '.join(names)} "
            "(add ':G' for a group count, e.g. 'gn:8' or 'gn:4+pn')"
        )
    return s


def is_instance_norm(spec: str) -> bool:
    """Whether ``spec`` normalises each channel of each sample alone (IN), degenerate on 1x1 maps; a
    ``post:`` spec is judged by its norm.

    Example:
        >>> is_instance_norm("in"), is_instance_norm("gn:8"), is_instance_norm("post:in")
        (True, False, True)
    """
    return split_post(spec)[1].split(":")[0].split("+")[0] in ("in", "in1d", "in2d", "in3d")


_ACT_MODULES: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "identity": nn.Identity,
}


class _Activation(nn.Module):
    """An activation by name (:func:`normkit.functional.activations.get_activation`) as a module."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.fn = get_activation(name)

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


def activation_module(name: str) -> nn.Module:
    """The activation ``name`` as a module: torch's own class where there is one (``nn.ReLU``).

    Example:
        >>> activation_module("relu")
        ReLU()
    """
    make = _ACT_MODULES.get(name)
    return make() if make is not None else _Activation(name)


class ActNorm(nn.Sequential):
    """``activation -> norm``: what a ``post:`` spec builds where the models put norm + activation.

    ``self[0]`` is the activation, ``self[1]`` the plain norm (:func:`normkit.create_norm_layer`);
    state_dict keys ``1.*``.

    Example:
        >>> ActNorm("relu", "bn", 8)
        ActNorm(
          (0): ReLU()
          (1): BatchNorm2d(8, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)
        )
    """

    def __init__(self, activation: str, spec: str, num_features: int) -> None:
        super().__init__(activation_module(activation), create_norm_layer(spec, num_features))


def _warn_if_plain(make: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
    """``make``, warning once if what it builds is a norm without an activation: the lab's models take
    their activations from ``norm_layer``, so such a network would have none."""
    from ..nn._inspect import NormInfo, describe_norm

    warned = False

    def build(c: int) -> nn.Module:
        nonlocal warned
        layer = make(c)
        info = describe_norm(layer)
        if not warned and isinstance(info, NormInfo) and info.activation is None:
            warned = True
            warnings.warn(
                f"norm_layer built {type(layer).__name__}, a norm without an activation: the lab's models "
                "take the norm and its activation from norm_layer, so this network has no activation; pass "
                "a spec ('gn:8') or a callable that returns norm + activation "
                "(functools.partial(normkit.create_norm_act_layer, 'gn:8'))",
                stacklevel=3,
            )
        return layer

    return build


def norm_act_factory(norm: NormLayer, activation: str = "relu") -> Callable[[int], nn.Module]:
    """``C -> norm + activation`` for a spec (through :func:`normkit.create_norm_act_layer`) or a callable;
    ``C -> activation -> norm`` (:class:`ActNorm`) for a ``post:`` spec.

    Example:
        >>> norm_act_factory("gn:4")(16)
        GroupNormAct2d(16, num_groups=4, eps=1e-05, affine=True, bias=True, activation=relu)
        >>> norm_act_factory("post:gn:4")(16)[1]
        GroupNorm(4, 16, eps=1e-05, affine=True, bias=True)
    """
    if callable(norm):
        return _warn_if_plain(norm)
    spec = check_norm_spec(norm)
    post, inner = split_post(spec)
    if post:
        return lambda c: ActNorm(activation, inner, c)
    return lambda c: create_norm_act_layer(spec, c, activation)


def _conv_bias(norm: NormLayer) -> bool:
    """A conv followed by a norm needs no bias; with ``"none"`` it keeps one, and with a ``post:`` spec too
    (the activation comes between the conv and the norm, so the bias shifts what the activation sees)."""
    return isinstance(norm, str) and (norm.strip().lower() == "none" or is_post(norm))


class CNN4(nn.Module):
    """CNN-4 (docs/EXPERIMENTS.md, E1): conv(in->32) N conv(32->32) N pool conv(32->64) N conv(64->64) N GAP
    [head] linear.

    Args:
        norm: norm spec or ``norm_layer`` callable (norm + activation); a ``post:`` spec
            (``"post:bn"``) builds ``conv -> act -> norm`` instead, its convs with a bias.
        in_channels: image channels (1 for digits, 3 for CIFAR-10).
        num_classes: outputs.
        head: add ``Linear(64->64, bias=False) -> norm -> act`` before the classifier. The norm
            there sees ``(N, 64, 1, 1)``, so BN pools over only the B samples of the batch.
            Instance norm has one value per channel there; use ``head_norm="none"`` for it
            (:func:`build_model` does).
        head_norm: the head's norm (default: ``norm``).
        activation: activation name.

    Example:
        >>> import torch
        >>> model = CNN4("gn:8", head=True)
        >>> model(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        norm: NormLayer = "bn",
        in_channels: int = 1,
        num_classes: int = 10,
        head: bool = False,
        head_norm: NormLayer | None = None,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        na = norm_act_factory(norm, activation)
        bias = _conv_bias(norm)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1, bias=bias),
            na(32),
            nn.Conv2d(32, 32, 3, padding=1, bias=bias),
            na(32),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=bias),
            na(64),
            nn.Conv2d(64, 64, 3, padding=1, bias=bias),
            na(64),
        )
        self.head: nn.Module | None = None
        if head:
            hn = norm if head_norm is None else head_norm
            self.head = nn.Sequential(
                nn.Linear(64, 64, bias=_conv_bias(hn)), _Spatial1x1(norm_act_factory(hn, activation)(64))
            )
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x).mean(dim=(2, 3))  # (N, 64): global average pool
        if self.head is not None:
            h = self.head(h)
        return self.classifier(h)


class _Spatial1x1(nn.Module):
    """Run a 2d norm layer on ``(N, C)`` features viewed as ``(N, C, 1, 1)``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x[:, :, None, None]).flatten(1)  # (N, C, 1, 1) -> (N, C)


class PreActBlock(nn.Module):
    """Pre-activation residual block: ``x + conv(na(conv(na(x))))``; 1x1 projection shortcut when the shape
    changes."""

    def __init__(self, cin: int, cout: int, stride: int, na: Callable[[int], nn.Module], bias: bool) -> None:
        super().__init__()
        self.na1 = na(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)
        self.na2 = na(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=bias)
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if stride != 1 or cin != cout else None
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.na1(x)
        skip = x if self.shortcut is None else self.shortcut(h)
        return skip + self.conv2(self.na2(self.conv1(h)))


class PreActResNet(nn.Module):
    """A small pre-activation ResNet (ResNet v2) for 8x8 to 32x32 images; every norm is followed by an
    activation (with a ``post:`` spec, preceded by one: ``act -> norm -> conv``, convs with a bias).

    Stem conv3x3(in->widths[0]), then one stage per width (stride 2 from the second), each with
    ``blocks`` :class:`PreActBlock`, a final norm + activation, global average pool and linear.

    Args:
        norm_layer: norm spec or callable ``C -> norm + activation`` (e.g. ``"ln+pn"``).
        in_channels, num_classes: data shape.
        widths: channels per stage.
        blocks: blocks per stage.

    Example:
        >>> import torch
        >>> PreActResNet("ln+pn")(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        norm_layer: NormLayer = "bn",
        in_channels: int = 1,
        num_classes: int = 10,
        widths: tuple[int, ...] = (32, 64),
        blocks: int = 1,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        na = norm_act_factory(norm_layer, activation)
        bias = _conv_bias(norm_layer)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=bias)
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(PreActBlock(cin, w, 2 if (i > 0 and j == 0) else 1, na, bias))
                cin = w
        self.blocks = nn.Sequential(*layers)
        self.final = na(cin)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.final(self.blocks(self.stem(x)))
        return self.classifier(h.mean(dim=(2, 3)))


class MLP3(nn.Module):
    """MLP-3 (the BN paper's MNIST net): in->100->100->100->classes, norm before each sigmoid.

    ``norm`` is ``"none"`` or a norm usable on ``(N, C)`` features (``"bn"`` means ``"bn1d"``
    here); a ``post:`` spec puts it after each sigmoid instead (the linears then keep their bias).
    Weights start ``N(0, init_std^2)`` ("small random Gaussian values"), biases 0.
    :meth:`forward` can also return the pre-sigmoid input of the last hidden layer, whose
    percentiles the BN paper plots over training.

    Example:
        >>> import torch
        >>> logits, pre = MLP3("bn")(torch.randn(5, 64), return_hidden=True)
        >>> logits.shape, pre.shape
        (torch.Size([5, 10]), torch.Size([5, 100]))
    """

    def __init__(
        self,
        norm: str = "none",
        in_features: int = 64,
        num_classes: int = 10,
        width: int = 100,
        init_std: float = 0.1,
    ) -> None:
        super().__init__()
        post, spec = split_post(check_norm_spec(norm))
        if spec in ("bn", "bn2d"):
            spec = "bn1d"
        if is_instance_norm(spec):
            raise ValueError(
                f"MLP3: instance norm {norm!r} has one value per channel on (N, C) features; use bn, ln, "
                "gn:G or none"
            )
        self.norm = POST_PREFIX + spec if post else spec
        dims = [in_features, width, width, width]
        self.linears = nn.ModuleList(
            nn.Linear(a, b, bias=spec == "none" or post) for a, b in zip(dims[:-1], dims[1:])
        )
        self.norm_acts = nn.ModuleList(
            ActNorm("sigmoid", spec, width) if post else create_norm_act_layer(spec, width, "sigmoid")
            for _ in range(3)
        )
        self.classifier = nn.Linear(width, num_classes)
        for lin in [*self.linears, self.classifier]:
            nn.init.normal_(lin.weight, std=init_std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, return_hidden: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        h = x.flatten(1)
        pre = h
        for lin, na in zip(self.linears, self.norm_acts):
            z = lin(h)
            if isinstance(na, ActNorm):  # activation then norm: the activation's input is z itself
                pre = z
                h = na(z)
            elif isinstance(na, nn.Sequential):  # norm then activation: keep the activation's input
                pre = na[0](z)
                h = na[1](pre)
            elif isinstance(na, ProxyNormAct):  # the activation's input: the proxy step's affine of
                h = na(z)  # the normalized z (its output is the activation's, normalized again)
                pre = _proxy_activation_input(na, z)
            else:  # a fused norm + sigmoid layer: recover the sigmoid's input from its output
                h = na(z)
                pre = torch.logit(h, eps=1e-7)
        out = self.classifier(h)
        return (out, pre) if return_hidden else out


def _proxy_activation_input(layer: ProxyNormAct, z: Tensor) -> Tensor:
    """``weight * y + bias``, the activation's input inside a Proxy Norm layer, where ``y`` is ``z``
    group-normalized without affine (:class:`~normkit.nn.GroupNormProxyAct2d`) or ``z`` itself."""
    y = z
    if isinstance(layer, GroupNormProxyAct2d):
        y = F.group_norm(z, layer.num_groups, None, None, layer.eps)
    shape = [1, -1] + [1] * (z.dim() - 2)
    return y * layer.weight.view(shape) + layer.bias.view(shape)


class RandNet(nn.Module):
    """RandNet-L (E4, the Proxy Norm paper's Definition-1 analogue): L x [conv3x3 circular -> norm -> act].

    Untrained: conv weights He-normal (fan-in, ReLU gain), no bias; every affine weight
    (``weight``) ~ N(1, affine_std^2) and bias ~ N(0, affine_std^2) per channel, Proxy Norm's
    affine included (its proxy parameters stay 0).

    Example:
        >>> import torch
        >>> RandNet("ln", depth=3, width=8)(torch.randn(4, 1, 6, 6)).shape
        torch.Size([4, 8, 6, 6])
    """

    def __init__(
        self,
        norm: NormLayer = "bn",
        depth: int = 20,
        width: int = 64,
        in_channels: int = 1,
        affine_std: float = 0.2,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if is_post(norm):
            raise ValueError(
                f"RandNet: {norm!r} puts the norm after the activation; RandNet (E4) measures the power at "
                "conv -> norm -> activation sites, so it takes no 'post:' spec (use the spec without 'post:')"
            )
        na = norm_act_factory(norm, activation)
        self.convs = nn.ModuleList()
        self.norm_acts = nn.ModuleList()
        for i in range(depth):
            conv = nn.Conv2d(
                in_channels if i == 0 else width, width, 3, padding=1, padding_mode="circular", bias=False
            )
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            layer = na(width)
            with torch.no_grad():
                for name, p in layer.named_parameters():
                    leaf = name.rsplit(".", 1)[-1]
                    if leaf == "weight":
                        p.normal_(1.0, affine_std)
                    elif leaf == "bias":
                        p.normal_(0.0, affine_std)
            self.convs.append(conv)
            self.norm_acts.append(layer)

    def forward(self, x: Tensor) -> Tensor:
        for conv, na in zip(self.convs, self.norm_acts):
            x = na(conv(x))
        return x


class VGGish(nn.Module):
    """A plain 6-conv net without residuals (E5): [c, c, pool, 2c, 2c, pool, 4c, 4c], GAP, linear.

    Example:
        >>> import torch
        >>> VGGish("none", width=8)(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        norm: NormLayer = "bn",
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 32,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        na = norm_act_factory(norm, activation)
        bias = _conv_bias(norm)
        c = [width, width, 2 * width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        cin = in_channels
        for i, w in enumerate(c):
            layers += [nn.Conv2d(cin, w, 3, padding=1, bias=bias), na(w)]
            if i in (1, 3):
                layers.append(nn.MaxPool2d(2))
            cin = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


#: Model names accepted by :func:`build_model` (``normkit compare --models``).
MODEL_NAMES = ("cnn4-head", "cnn4", "resnet")


def build_model(name: str, norm: str, in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """Build a classifier by name: ``"cnn4-head"`` (CNN-4 + Linear-norm-ReLU head), ``"cnn4"``, ``"resnet"``.

    For ``"cnn4-head"`` with an instance norm the head gets no norm (IN is undefined on a
    ``(N, C, 1, 1)`` input). A ``post:`` spec (``"post:bn"``) works with every model here:
    ``activation -> norm`` wherever the model has ``norm -> activation``.

    Example:
        >>> sum(p.numel() for p in build_model("cnn4", "bn").parameters())
        65834
    """
    norm = check_norm_spec(norm)
    if name == "cnn4-head":
        return CNN4(
            norm, in_channels, num_classes, head=True, head_norm="none" if is_instance_norm(norm) else norm
        )
    if name == "cnn4":
        return CNN4(norm, in_channels, num_classes)
    if name == "resnet":
        return PreActResNet(norm, in_channels, num_classes)
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
