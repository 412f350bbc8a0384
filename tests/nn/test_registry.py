"""normkit.create_norm_layer / available_norms / register_norm, with torch.nn layers as the oracle."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normkit
import normkit.nn as nkn
from normkit.nn import registry as reg
from tests.tolerances import Tol

TOL: Tol = {"atol": 1e-5, "rtol": 1e-5}
CORE = {"bn", "bn1d", "bn3d", "gn", "ln", "ln2d", "in", "none"}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(shape, seed=0):
    g = _gen(seed)
    return 2.0 + 1.5 * torch.randn(shape, generator=g)


def _randomize(module, seed=1):
    g = _gen(seed)
    with torch.no_grad():
        module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=g))
        module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=g))
    return module


def _largest_divisor_at_most(c: int, cap: int = 32) -> int:
    """Independent brute force: the largest divisor of c that is <= cap."""
    best = 1
    for g in range(1, c + 1):
        if c % g == 0 and g <= cap:
            best = g
    return best


@pytest.mark.parametrize(
    "spec, ours_cls, torch_cls, shape",
    [
        ("bn", nkn.BatchNorm2d, nn.BatchNorm2d, (4, 16, 3, 3)),
        ("bn2d", nkn.BatchNorm2d, nn.BatchNorm2d, (4, 16, 3, 3)),
        ("bn1d", nkn.BatchNorm1d, nn.BatchNorm1d, (6, 16)),
        ("bn3d", nkn.BatchNorm3d, nn.BatchNorm3d, (2, 16, 2, 3, 2)),
    ],
)
def test_batch_norm_specs(spec, ours_cls, torch_cls, shape):
    layer = normkit.create_norm_layer(spec, 16)
    assert type(layer) is ours_cls
    ref = _randomize(torch_cls(16))
    layer.load_state_dict(ref.state_dict(), strict=True)
    x = _x(shape)
    torch.testing.assert_close(layer(x), ref(x), **TOL)
    torch.testing.assert_close(layer.running_var, ref.running_var, **TOL)
    layer.eval()
    ref.eval()
    torch.testing.assert_close(layer(x), ref(x), **TOL)


@pytest.mark.parametrize(
    "C, G", [(64, 32), (48, 24), (16, 16), (32, 32), (96, 32), (6, 6), (1, 1), (100, 25)]
)
def test_gn_default_groups(C, G):
    assert _largest_divisor_at_most(C) == G  # the table agrees with the rule
    layer = normkit.create_norm_layer("gn", C)
    assert type(layer) is nkn.GroupNorm and layer.num_groups == G and layer.num_channels == C
    assert nkn.default_groups(C) == G
    if C > 1:
        ref = _randomize(nn.GroupNorm(G, C))
        layer.load_state_dict(ref.state_dict(), strict=True)
        x = _x((2, C, 3, 3))
        torch.testing.assert_close(layer(x), ref(x), **TOL)


def test_default_groups_matches_brute_force():
    for c in range(1, 130):
        assert nkn.default_groups(c) == _largest_divisor_at_most(c), c
    assert nkn.default_groups(48, preferred=16) == 16
    assert nkn.default_groups(30, preferred=4) == 3


def test_gn_with_explicit_groups():
    layer = normkit.create_norm_layer("gn:16", 64)
    assert type(layer) is nkn.GroupNorm and layer.num_groups == 16
    ref = _randomize(nn.GroupNorm(16, 64))
    layer.load_state_dict(ref.state_dict(), strict=True)
    x = _x((2, 64, 3, 3))
    torch.testing.assert_close(layer(x), ref(x), **TOL)
    with pytest.raises(ValueError, match="divisible"):
        normkit.create_norm_layer("gn:7", 64)


def test_ln_is_group_norm_with_one_group():
    layer = normkit.create_norm_layer("ln", 8)
    assert type(layer) is nkn.LayerNorm2d and layer.over == "chw"
    ref = _randomize(nn.GroupNorm(1, 8))
    layer.load_state_dict(ref.state_dict(), strict=True)
    x = _x((3, 8, 4, 4))
    torch.testing.assert_close(layer(x), ref(x), **TOL)


def test_ln2d_is_torch_layer_norm_over_channels():
    layer = normkit.create_norm_layer("ln2d", 8)
    assert type(layer) is nkn.LayerNorm2d and layer.over == "c"
    ref = _randomize(nn.LayerNorm(8))
    layer.load_state_dict(ref.state_dict(), strict=True)
    x = _x((3, 8, 4, 4))
    torch.testing.assert_close(layer(x), ref(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), **TOL)


def test_in_is_affine_instance_norm():
    layer = normkit.create_norm_layer("in", 8)
    assert type(layer) is nkn.InstanceNorm2d
    assert layer.affine and not layer.track_running_stats
    ref = _randomize(nn.InstanceNorm2d(8, affine=True))
    layer.load_state_dict(ref.state_dict(), strict=True)
    x = _x((3, 8, 4, 4))
    torch.testing.assert_close(layer(x), ref(x), **TOL)


def test_none_is_identity():
    layer = normkit.create_norm_layer("none", 8)
    assert isinstance(layer, nn.Identity)
    x = _x((2, 8, 3, 3))
    assert layer(x) is x
    with pytest.raises(ValueError, match="takes no"):
        normkit.create_norm_layer("none:2", 8)


def test_kwargs_pass_through():
    bn = normkit.create_norm_layer("bn", 8, momentum=0.01, eps=1e-3, affine=False)
    assert (bn.momentum, bn.eps, bn.affine, bn.weight) == (0.01, 1e-3, False, None)
    gn = normkit.create_norm_layer("gn:4", 8, eps=1e-6, affine=False)
    assert (gn.num_groups, gn.eps, gn.weight) == (4, 1e-6, None)
    inn = normkit.create_norm_layer("in", 8, affine=False, track_running_stats=True)
    assert not inn.affine and inn.track_running_stats and inn.running_mean is not None
    ln = normkit.create_norm_layer("ln2d", 8, bias=False)
    assert ln.bias is None and ln.weight is not None
    with pytest.raises(TypeError):
        normkit.create_norm_layer("bn", 8, not_an_argument=1)


def test_spec_is_case_and_space_insensitive():
    assert type(normkit.create_norm_layer(" BN ", 4)) is nkn.BatchNorm2d
    assert normkit.create_norm_layer("GN:2", 4).num_groups == 2


@pytest.mark.parametrize("spec", ["foo", "batchnorm", "gn:", "gn:x", "", "bn:3"])
def test_unknown_or_malformed_spec_is_a_value_error(spec):
    with pytest.raises(ValueError) as info:
        normkit.create_norm_layer(spec, 8)
    msg = str(info.value)
    if spec != "bn:3":
        for name in ("bn", "gn", "ln", "ln2d", "in", "none"):
            assert f"{name}" in msg, (name, msg)
        assert repr(spec) in msg


@pytest.mark.parametrize("spec", [None, 3, nn.BatchNorm2d, ["bn"]])
def test_non_string_spec_is_a_type_error(spec):
    with pytest.raises(TypeError, match="spec must be a string"):
        normkit.create_norm_layer(spec, 8)


def test_available_norms():
    names = normkit.available_norms()
    assert isinstance(names, dict)
    assert CORE <= set(names)
    assert all(isinstance(h, str) and h for h in names.values())
    assert list(names) == sorted(names)
    for name in CORE:  # every advertised core name builds
        layer = normkit.create_norm_layer(name, 16)
        assert isinstance(layer, nn.Module)


def test_register_norm_adds_a_factory():
    name = "test_registry_custom_norm"
    calls = []

    def factory(num_features, arg, **kw):
        calls.append((num_features, arg, kw))
        return nn.GroupNorm(arg or 1, num_features, **kw)

    returned = normkit.register_norm(name, "a test-only norm")(factory)
    try:
        assert returned is factory  # usable as a decorator
        assert normkit.available_norms()[name] == "a test-only norm"
        layer = normkit.create_norm_layer(f"{name}:4", 8, eps=1e-3)
        assert calls == [(8, 4, {"eps": 1e-3})]
        assert isinstance(layer, nn.GroupNorm) and layer.num_groups == 4 and layer.eps == 1e-3
        normkit.create_norm_layer(name, 8)
        assert calls[-1] == (8, None, {})
    finally:
        reg._REGISTRY.pop(name, None)
    assert name not in normkit.available_norms()
    with pytest.raises(ValueError):
        normkit.create_norm_layer(name, 8)


@pytest.mark.parametrize("spec", ["bn:4", "in:2", "ln2d:8", "none:1", "syncbn:2"])
def test_get_norm_layer_rejects_an_argument_at_once_naming_the_spec(spec):
    # (it used to hand back a partial that failed only when the model was built)
    with pytest.raises(ValueError, match=rf"get_norm_layer: .* takes no ':<int>' argument, got '{spec}'"):
        normkit.get_norm_layer(spec)


@pytest.mark.parametrize(
    "spec, C, error, match",
    [
        ("gn", 0, ValueError, r"num_channels must be a positive int, got 0"),  # was max() of nothing
        ("gn", 6.0, TypeError, r"num_channels must be an int .* got 6\.0"),
        (
            "gn:4",
            6,
            ValueError,
            r"num_channels \(6\) must be divisible by num_groups \(4\); try num_groups=3",
        ),
        ("gn:0", 6, ValueError, r"num_groups must be a positive int, got 0"),
    ],
)
def test_bad_channel_or_group_counts_are_typed(spec, C, error, match):
    with pytest.raises(error, match=match):
        normkit.create_norm_layer(spec, C)
    with pytest.raises(error, match=match):
        normkit.get_norm_layer(spec)(C)


def test_registered_names_must_be_creatable_and_overrides_reach_get_norm_layer():
    with pytest.raises(ValueError, match=r"name 'MyNorm' is not a valid spec name"):
        normkit.register_norm("MyNorm")  # lower-cased specs could never find it
    with pytest.raises(ValueError, match="not a valid spec name"):
        normkit.register_norm("gn:4")
    saved_factory, saved_class = reg._REGISTRY["bn"], reg._CLASS_SPECS["bn"]
    try:
        normkit.register_norm("bn", "user BN")(lambda c, arg, **kw: nn.BatchNorm2d(c, eps=1e-3, **kw))
        built = normkit.get_norm_layer("bn")(8)
        assert type(built) is nn.BatchNorm2d and built.eps == 1e-3  # the same as create_norm_layer's
        assert type(normkit.create_norm_layer("bn", 8)) is nn.BatchNorm2d
    finally:
        reg._REGISTRY["bn"] = saved_factory
        reg._CLASS_SPECS["bn"] = saved_class
    assert normkit.get_norm_layer("bn") is nkn.BatchNorm2d


def test_get_norm_layer_refuses_an_int_on_ln_pn_at_once():
    """'ln+pn' is one group: ``get_norm_layer("ln:1+pn")`` raises when asked, not when the model is built."""
    with pytest.raises(normkit.NormError, match=r"'ln\+pn' takes no ':<int>'"):
        normkit.get_norm_layer("ln:1+pn")
    assert normkit.get_norm_layer("ln+pn")(8).num_groups == 1
