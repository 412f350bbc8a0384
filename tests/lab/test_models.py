"""Models build every norm through the registry; unknown specs fail with the list of known ones."""

from __future__ import annotations

import pytest
import torch

import normkit
from normkit.lab.models import (
    CNN4,
    MLP3,
    MODEL_NAMES,
    PreActResNet,
    RandNet,
    VGGish,
    build_model,
    check_norm_spec,
)

NORMS = ["bn", "gn:8", "ln", "in", "none", "ln+pn", "gn:4+pn", "gn+pn"]


@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("norm", NORMS)
def test_every_model_and_norm_runs(model: str, norm: str) -> None:
    torch.manual_seed(0)
    net = build_model(model, norm)
    out = net(torch.randn(3, 1, 8, 8))
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    out.sum().backward()


def test_proxy_norm_layers_come_from_the_registry() -> None:
    net = CNN4("ln+pn", head=True)
    kinds = [type(m).__name__ for m in net.modules()]
    assert kinds.count("GroupNormProxyAct2d") == 5  # 4 conv layers + the head
    res = PreActResNet("gn:4+pn")
    assert any(isinstance(m, normkit.nn.GroupNormProxyAct2d) and m.num_groups == 4 for m in res.modules())


def test_head_with_instance_norm_has_no_norm() -> None:
    net = build_model("cnn4-head", "in")
    assert net.head is not None
    assert not any(isinstance(m, normkit.nn.InstanceNorm2d) for m in net.head.modules())


def test_norm_layer_callable() -> None:
    calls = []

    def layer(c: int) -> torch.nn.Module:
        calls.append(c)
        return torch.nn.Sequential(torch.nn.BatchNorm2d(c), torch.nn.ReLU())

    PreActResNet(layer)(torch.randn(2, 1, 8, 8))
    assert calls == [32, 32, 32, 64, 64]


def test_unknown_norm_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"unknown norm 'batchnorm'; registered norms: .*bn.*gn"):
        build_model("cnn4", "batchnorm")
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg", "bn")
    assert check_norm_spec("GN:4+PN") == "gn:4+pn"


def test_mlp3_returns_sigmoid_input() -> None:
    torch.manual_seed(0)
    for norm in ("none", "bn", "ln+pn"):
        mlp = MLP3(norm)
        logits, pre = mlp(torch.randn(8, 64), return_hidden=True)
        assert logits.shape == (8, 10) and pre.shape == (8, 100)
    with pytest.raises(ValueError, match="instance norm"):
        MLP3("in")


def test_randnet_random_affine_and_circular_padding() -> None:
    torch.manual_seed(0)
    net = RandNet("bn", depth=3, width=16)
    w = torch.cat([m.weight.detach() for m in net.norm_acts])
    assert 0.1 < float(w.std()) < 0.3 and abs(float(w.mean()) - 1) < 0.1
    assert all(c.padding_mode == "circular" for c in net.convs)
    pn = RandNet("ln+pn", depth=2, width=8)
    layer = pn.norm_acts[0]
    assert float(layer.bias.detach().abs().sum()) > 0 and float(layer.proxy_bias.detach().abs().sum()) == 0


def test_vggish_has_six_convs() -> None:
    net = VGGish("bn", width=8)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == 6


def test_a_norm_layer_callable_without_an_activation_is_warned_about() -> None:
    """The lab's models take norm + activation from norm_layer; torchvision's convention (a norm only)
    built a network with no activation at all, silently."""
    import functools
    import warnings

    import normkit
    from normkit.lab.models import CNN4

    with pytest.warns(UserWarning, match="norm_layer built BatchNorm2d, a norm without an activation"):
        model = CNN4(torch.nn.BatchNorm2d)
    assert not any(isinstance(m, (torch.nn.ReLU, normkit.nn.BatchNormAct2d)) for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CNN4(functools.partial(normkit.create_norm_act_layer, "gn:8"))
        CNN4("gn:8")
