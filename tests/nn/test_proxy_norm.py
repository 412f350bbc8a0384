"""Proxy Norm modules, norm+act layers, the registry entries and param_groups."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as TF

import normkit
from normkit.nn import (
    BatchNormAct2d,
    GroupNormAct2d,
    GroupNormProxyAct2d,
    LayerNormAct2d,
    ProxyNormAct,
    create_norm_act_layer,
    param_groups,
)


def _oracle_pn(x, groups, w, b, pb, pw, eps=1e-3, proxy_eps=0.03, n=200):
    """float64 composite from torch primitives: GN without affine, then proxy-normalized ReLU."""
    x = x.double()
    y = TF.group_norm(x, groups, eps=eps)
    u = torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)
    w, b, pb, pw = (p.detach().double() for p in (w, b, pb, pw))
    zp = torch.relu(w[:, None] * ((1 + pw)[:, None] * u + pb[:, None]) + b[:, None])
    m, v = zp.mean(1), zp.var(1, unbiased=False)  # ok: tiny test oracle
    shape = [1, -1] + [1] * (x.dim() - 2)
    return (torch.relu(w.view(shape) * y + b.view(shape)) - m.view(shape)) / torch.sqrt(
        v.view(shape) + proxy_eps
    )


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return module


@pytest.mark.parametrize("spec, groups", [("ln+pn", 1), ("gn+pn", 4), ("gn:4+pn", 4), ("gn:2+pn", 2)])
def test_registry_specs_build_the_block(spec, groups):
    layer = normkit.create_norm_layer(spec, 64)
    assert isinstance(layer, GroupNormProxyAct2d)
    assert layer.num_groups == groups
    assert sorted(layer.state_dict()) == ["bias", "proxy_bias", "proxy_weight", "weight"]
    x = torch.randn(3, 64, 5, 5)
    _randomize(layer)
    torch.testing.assert_close(
        layer(x).double(),
        _oracle_pn(x, groups, layer.weight, layer.bias, layer.proxy_bias, layer.proxy_weight),
        atol=2e-5,
        rtol=1e-5,
    )


def test_gn_pn_default_groups_fall_back_for_small_channel_counts():
    assert normkit.create_norm_layer("gn+pn", 6).num_groups == 3
    with pytest.raises(ValueError, match="takes no"):
        normkit.create_norm_layer("ln:2+pn", 8)


@pytest.mark.parametrize("spec", ["ln+pn", "gn:4+pn"])
def test_sample_output_independent_of_batch_in_train_and_eval(spec):
    torch.manual_seed(0)
    layer = _randomize(normkit.create_norm_layer(spec, 64))
    x = torch.randn(5, 64, 6, 6)
    outs = []
    for mode in (True, False):
        layer.train(mode)
        full = layer(x)
        alone = layer(x[3:4])
        mixed = layer(torch.cat([50 * torch.randn(2, 64, 6, 6), x[3:4]]))[2:3]
        torch.testing.assert_close(alone, full[3:4], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mixed, full[3:4], atol=1e-5, rtol=1e-5)
        outs.append(full)
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


def test_module_gradients_reach_every_parameter_and_channels_last_is_kept():
    layer = _randomize(GroupNormProxyAct2d(8, num_groups=2, activation="silu"))
    x = torch.randn(4, 8, 5, 5).to(memory_format=torch.channels_last).requires_grad_(True)
    out = layer(x)
    out.square().mean().backward()
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert x.grad is not None and x.grad.is_contiguous(memory_format=torch.channels_last)
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_proxy_norm_act_module_matches_functional_oracle_and_checks_channels():
    pn = _randomize(ProxyNormAct(6))
    y = TF.group_norm(torch.randn(3, 6, 4, 4), 1)
    # identical to the GN block when fed the normalized input (eps of the oracle's GN does not matter here)
    block = GroupNormProxyAct2d(6, num_groups=1)
    block.load_state_dict(pn.state_dict())
    x = torch.randn(3, 6, 4, 4)
    torch.testing.assert_close(block(x), pn(TF.group_norm(x, 1, eps=1e-3)), atol=1e-6, rtol=1e-6)
    assert pn(y).shape == y.shape
    with pytest.raises(ValueError, match="expected 6 channels"):
        pn(torch.randn(3, 5, 4, 4))
    with pytest.raises(ValueError, match="unknown activation"):
        ProxyNormAct(4, activation="nope")


def test_state_dict_pickle_deepcopy_round_trip():
    layer = _randomize(normkit.create_norm_layer("gn:4+pn", 16))
    x = torch.randn(2, 16, 4, 4)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = normkit.create_norm_layer("gn:4+pn", 16)
    fresh.load_state_dict(torch.load(buf))
    want = layer(x)
    torch.testing.assert_close(fresh(x), want, atol=0, rtol=0)
    torch.testing.assert_close(copy.deepcopy(layer)(x), want, atol=0, rtol=0)
    torch.testing.assert_close(pickle.loads(pickle.dumps(layer))(x), want, atol=0, rtol=0)


# ------------------------------------------------------------------------------------- norm+act
@pytest.mark.parametrize("act, fn", [("relu", torch.relu), ("silu", TF.silu), ("gelu", TF.gelu)])
def test_norm_act_layers_equal_torch_norm_then_activation(act, fn):
    x = torch.randn(4, 8, 5, 5)
    tbn = _randomize(torch.nn.BatchNorm2d(8))
    ours = BatchNormAct2d(8, activation=act)
    ours.load_state_dict(tbn.state_dict())
    for mode in (True, False):
        tbn.train(mode)
        ours.train(mode)
        torch.testing.assert_close(ours(x), fn(tbn(x)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.running_mean, tbn.running_mean)

    tgn = _randomize(torch.nn.GroupNorm(4, 8))
    gn = GroupNormAct2d(8, num_groups=4, activation=act)
    gn.load_state_dict(tgn.state_dict())
    torch.testing.assert_close(gn(x), fn(tgn(x)), atol=1e-5, rtol=1e-5)

    tln = _randomize(torch.nn.GroupNorm(1, 8))
    ln = LayerNormAct2d(8, activation=act, over="chw")
    ln.load_state_dict(tln.state_dict())
    torch.testing.assert_close(ln(x), fn(tln(x)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "spec, cls",
    [
        ("bn", BatchNormAct2d),
        ("gn:4", GroupNormAct2d),
        ("gn", GroupNormAct2d),
        ("ln", LayerNormAct2d),
        ("ln2d", LayerNormAct2d),
        ("ln+pn", GroupNormProxyAct2d),
        ("gn:4+pn", GroupNormProxyAct2d),
    ],
)
def test_create_norm_act_layer(spec, cls):
    layer = create_norm_act_layer(spec, 16, "silu")
    assert isinstance(layer, cls)
    assert layer.activation == "silu"


def test_create_norm_act_layer_falls_back_to_sequential():
    layer = create_norm_act_layer("in", 4, "relu")
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(layer(x), torch.relu(TF.instance_norm(x)), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------- param_groups
def test_param_groups_follow_the_authors_weight_decay_rule():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, bias=True),
        normkit.create_norm_layer("ln+pn", 8),
        torch.nn.Conv2d(8, 8, 3, bias=False),
        torch.nn.BatchNorm2d(8),
        normkit.nn.GroupNorm(2, 8),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
    )
    groups = param_groups(model, 5e-4, lr=0.1)
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    pn = model[1]
    want_decay = {
        id(model[0].weight),
        id(model[2].weight),
        id(model[6].weight),
        id(pn.proxy_bias),
        id(pn.proxy_weight),
    }
    assert decay == want_decay
    want_no = {
        id(model[0].bias),
        id(pn.weight),
        id(pn.bias),
        id(model[3].weight),
        id(model[3].bias),
        id(model[4].weight),
        id(model[4].bias),
        id(model[6].bias),
    }
    assert no_decay == want_no
    assert groups[0]["weight_decay"] == 5e-4 and groups[1]["weight_decay"] == 0.0 and groups[0]["lr"] == 0.1
    torch.optim.SGD(groups, lr=0.1)  # accepted by an optimizer
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(model, -1.0)


def test_param_groups_rmsnorm_is_a_norm_and_bad_arguments_are_typed_errors():
    """Oracle: torch.nn.RMSNorm's weight is a norm parameter like LayerNorm's (no decay), here a 2-D one
    that the ``dim >= 2`` rule alone would decay."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.RMSNorm((6, 6)), torch.nn.LayerNorm((6, 6))
    )
    decay, no_decay = ({id(p) for p in g["params"]} for g in param_groups(model, 1e-4))
    assert decay == {id(model[0].weight)}
    assert id(model[1].weight) in no_decay and id(model[2].weight) in no_decay
    for bad, err, got in (
        ("1e-4", TypeError, "got str"),
        (None, TypeError, "got NoneType"),
        (True, TypeError, "got bool"),
        (float("nan"), ValueError, "got nan"),
        (float("inf"), ValueError, "got inf"),
    ):
        with pytest.raises(err, match=f"weight_decay must be a (finite )?float >= 0, {got}"):
            param_groups(model, bad)  # type: ignore[arg-type]
    assert param_groups(model, 0)[0]["weight_decay"] == 0.0  # an int is fine
    with pytest.raises(TypeError, match="expected an eager nn.Module, got list"):
        param_groups([torch.nn.Linear(2, 2)], 1e-4)  # type: ignore[arg-type]


def test_bad_proxy_eps_and_activation_spec_are_named_errors():
    with pytest.raises(ValueError, match=r"GroupNormProxyAct2d: proxy_eps .* got -1"):
        GroupNormProxyAct2d(4, proxy_eps=-1)
    with pytest.raises(TypeError, match="proxy_eps must be a real number"):
        GroupNormProxyAct2d(4, proxy_eps="0.03")
    with pytest.raises(ValueError, match=r"'leaky_relu:abc'.*leaky_relu:<negative slope>"):
        ProxyNormAct(4, activation="leaky_relu:abc")
