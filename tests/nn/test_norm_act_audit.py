"""Norm+activation layers (BatchNormAct2d, GroupNormAct2d, LayerNormAct2d, create_norm_act_layer) and
normkit.param_groups, with torch.nn's Sequential(norm, act) and a float64 reference as the oracles."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import normkit
import normkit.nn as nkn
from tests.reference_family import ref_masked_norm

F64 = torch.float64


def _randn(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64).to(dtype)


def _randomize(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g, dtype=F64).to(p.dtype))
    return module


def _roundtrip(module):
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# --- norm+activation layers --------------------------------------------------------------------


@pytest.mark.parametrize(
    "ours, norm",
    [
        (lambda act: nkn.BatchNormAct2d(4, activation=act), lambda: nn.BatchNorm2d(4)),
        (lambda act: nkn.GroupNormAct2d(4, 2, activation=act), lambda: nn.GroupNorm(2, 4)),
    ],
)
def test_module_activation_is_registered_once_and_loads_a_sequential_checkpoint(ours, norm):
    ref = _randomize(nn.Sequential(norm(), nn.PReLU(4)))
    layer = ours(nn.PReLU(4))
    # the norm's own keys plus the activation's, once (it was saved as 'activation.*' and 'act.*')
    want = [k[2:] for k in ref.state_dict() if k.startswith("0.")] + ["act.weight"]
    assert list(layer.state_dict()) == want
    assert len(list(layer.parameters())) == len(list(ref.parameters()))
    remapped = {k[2:] if k.startswith("0.") else "act." + k[2:]: v for k, v in ref.state_dict().items()}
    layer.load_state_dict(remapped)
    x = _randn((3, 4, 5, 5))
    for mode in (True, False):
        torch.testing.assert_close(layer.train(mode)(x), ref.train(mode)(x))
    assert "(activation)" not in repr(layer) and repr(layer).count("PReLU(num_parameters=4)") == 1


@pytest.mark.parametrize("act", [None, "identity", "silu"])
def test_named_activations_pickle_and_repr(act):
    x = _randn((2, 4, 3, 3))
    for layer in (
        nkn.BatchNormAct2d(4, activation=act),
        nkn.GroupNormAct2d(4, 2, activation=act),
        nkn.create_norm_act_layer("in", 4, act),  # InstanceNormAct2d
        nkn.create_norm_act_layer("frozen_bn", 4, act),  # the nn.Sequential fallback
    ):
        torch.testing.assert_close(_roundtrip(layer)(x), layer(x))  # (None / identity: a lambda)
        assert "NoneType" not in repr(layer) and "<lambda>" not in repr(layer)


def test_activation_can_be_swapped():
    layer = nkn.BatchNormAct2d(4, activation=nn.PReLU(4))
    layer.activation = "silu"
    assert list(layer.state_dict()) == list(nn.BatchNorm2d(4).state_dict())
    x = _randn((2, 4, 3, 3))
    ref = nn.BatchNorm2d(4)
    torch.testing.assert_close(layer(x), nn.functional.silu(ref(x)))
    layer.activation = nn.ReLU()
    assert layer.act is layer.activation and "activation" not in layer._modules


def test_create_norm_act_layer_takes_the_keywords_create_norm_layer_takes():
    layer = nkn.create_norm_act_layer("gn", 8, "relu", num_groups=4)  # was a TypeError
    ref = _randomize(nn.GroupNorm(4, 8))
    layer.load_state_dict(ref.state_dict())
    x = _randn((2, 8, 3, 3))
    torch.testing.assert_close(layer(x), torch.relu(ref(x)))
    with pytest.raises(ValueError, match="num_groups is given twice: 2 by the spec 'gn:2' and 4"):
        nkn.create_norm_act_layer("gn:2", 8, "relu", num_groups=4)
    with pytest.raises(ValueError, match="spec 'ln' normalizes over='chw' but the keyword says over='c'"):
        nkn.create_norm_act_layer("ln", 8, "relu", over="c")
    assert nkn.create_norm_act_layer("ln", 8, "relu", over="chw").over == "chw"


@pytest.mark.parametrize(
    "layer, dims",
    [
        (lambda: nkn.BatchNormAct2d(3, activation="silu"), (0, 2, 3)),
        (lambda: nkn.GroupNormAct2d(3, 3, activation="silu"), (2, 3)),
    ],
)
def test_mask_reaches_the_norm(layer, dims):
    x = _randn((4, 3, 2, 5), seed=2)
    mask = _randn((4, 1, 2, 5), seed=3) > -0.3
    m = _randomize(layer())
    w, b = m.weight.view(1, 3, 1, 1), m.bias.view(1, 3, 1, 1)
    want = nn.functional.silu(ref_masked_norm(x, mask, dims, w.double(), b.double(), 1e-5))
    torch.testing.assert_close(m(x, mask=mask).double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda act: nkn.BatchNormAct2d(4, activation=act),
        lambda act: nkn.GroupNormAct2d(4, 2, activation=act),
        lambda act: nkn.LayerNormAct2d(4, activation=act, over="chw"),
    ],
)
def test_fullgraph_compile_and_inplace_activation(make):
    x = _randn((2, 4, 3, 3))
    want = make("silu")(x)
    torch.testing.assert_close(torch.compile(make("silu"), fullgraph=True, backend="aot_eager")(x), want)
    # an in-place activation must not break the norm's backward, in train and eval
    for train in (True, False):
        grads = []
        for act in (nn.ReLU(inplace=True), "relu"):
            xr = x.clone().requires_grad_()
            make(act).train(train)(xr).square().sum().backward()
            grads.append(xr.grad)
        torch.testing.assert_close(grads[0], grads[1])


# --- normkit.param_groups ----------------------------------------------------------------------


def _decayed(groups):
    return {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}


class _Abs(nn.Module):
    def forward(self, w):
        return w.abs()


def test_param_groups_parametrized_norm_weight_is_still_a_norm_weight():
    model = nn.Sequential(nn.Linear(5, 5), nn.LayerNorm((4, 5)))  # a 2-D norm weight
    parametrize.register_parametrization(model[1], "weight", _Abs())
    original = model[1].parametrizations.weight.original
    groups = normkit.param_groups(model, 0.1)
    assert id(original) not in _decayed(groups)  # (it was decayed: judged as a 2-D tensor)
    assert _decayed(groups) == {id(model[0].weight)}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_param_groups_shared_parameter_once_whatever_the_order():
    for norm_first in (True, False):
        ln, lin = nn.LayerNorm((5, 5)), nn.Linear(5, 5)
        lin.weight = ln.weight  # tied: a norm weight is never decayed
        model = nn.Sequential(ln, lin) if norm_first else nn.Sequential(lin, ln)
        groups = normkit.param_groups(model, 0.1)
        all_params = [p for g in groups for p in g["params"]]
        assert len(all_params) == len({id(p) for p in all_params}) == 3
        assert _decayed(groups) == set(), norm_first
    tied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    tied[1].weight = tied[0].weight
    groups = normkit.param_groups(tied, 0.1)
    assert _decayed(groups) == {id(tied[0].weight)}


def test_param_groups_refuses_params_in_group_options():
    with pytest.raises(TypeError, match="must not contain 'params'"):
        normkit.param_groups(nn.Linear(2, 2), 0.1, params=[])  # silently returned [] before


def test_a_checkpoint_that_saved_a_module_activation_twice_loads_strictly():
    """Before the activation was registered once, a PReLU's weight was saved as ``activation.weight`` and
    ``act.weight``: such a checkpoint still loads with strict=True (the copy dropped)."""
    from normkit.nn import BatchNormAct2d

    src = BatchNormAct2d(4, activation=nn.PReLU(4))
    with torch.no_grad():
        src.act.weight.uniform_(0.1, 0.9)
    old = {**src.state_dict(), "activation.weight": src.act.weight.detach().clone()}
    dst = BatchNormAct2d(4, activation=nn.PReLU(4))
    dst.load_state_dict(old, strict=True)
    torch.testing.assert_close(dst.act.weight, src.act.weight)
    wrapped = nn.Sequential(BatchNormAct2d(4, activation=nn.PReLU(4)))
    wrapped.load_state_dict({f"0.{k}": v for k, v in old.items()}, strict=True)
    torch.testing.assert_close(wrapped[0].act.weight, src.act.weight)


@pytest.mark.parametrize(
    "spec, shape",
    [
        ("bn1d", (6, 4)),
        ("bn3d", (2, 4, 2, 3, 3)),
        ("in", (2, 4, 3, 3)),
        ("in1d", (2, 4, 7)),
        ("brn", (6, 4, 3, 3)),
        ("gbn:2", (6, 4, 3, 3)),
        ("syncbn", (6, 4, 3, 3)),
    ],
)
def test_norm_act_layers_keep_the_plain_norms_keys(spec, shape):
    """create_norm_act_layer gives every BN-family / instance spec a norm+activation class with the plain
    norm's state_dict keys (they were an nn.Sequential with keys ``0.*``, so a "bn" checkpoint did not
    load into a "syncbn" / "brn" / "gbn" model): it loads the plain norm's checkpoint strictly, in
    both directions, and computes act(norm(x)) in training and eval."""
    ref = _randomize(nkn.create_norm_layer(spec, 4))
    x = _randn(shape)
    ref.train()(x)  # running statistics that are not the defaults
    layer = nkn.create_norm_act_layer(spec, 4, "silu")
    assert type(layer).__name__.replace("Act", "") == type(ref).__name__.replace("Act", "")
    assert list(layer.state_dict()) == list(ref.state_dict())
    layer.load_state_dict(ref.state_dict(), strict=True)
    back = nkn.create_norm_layer(spec, 4)
    back.load_state_dict(layer.state_dict(), strict=True)
    for mode in (True, False):
        torch.testing.assert_close(layer.train(mode)(x), nn.functional.silu(back.train(mode)(x)))
    if spec in ("brn", "bn1d"):  # a "bn" model's checkpoint loads into the other BN specs' layers
        plain = nkn.create_norm_act_layer("bn" if spec == "brn" else "bn1d", 4, "silu")
        layer.load_state_dict(plain.state_dict(), strict=True)
    torch.testing.assert_close(_roundtrip(layer)(x), layer(x))


def test_a_built_in_spec_registered_again_is_built_by_the_users_factory():
    """create_norm_act_layer took its fused classes for "bn" / "gn" / "ln" / "ln2d" even after the user
    registered their own factory under that name, so the lab's models trained the stock norm."""
    from normkit.nn import registry

    class MyBN(nn.BatchNorm2d):
        pass

    saved, classes = dict(registry._REGISTRY), dict(registry._CLASS_SPECS)
    try:
        for spec in ("bn", "gn", "ln", "ln2d"):
            nkn.register_norm(spec)(lambda c, arg, **kw: MyBN(c))
            layer = nkn.create_norm_act_layer(spec, 4, "relu")
            assert isinstance(layer[0], MyBN), (spec, layer)
            x = _randn((2, 4, 3, 3))
            torch.testing.assert_close(layer(x), torch.relu(layer[0](x)))
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved)
        registry._CLASS_SPECS.update(classes)
    assert type(nkn.create_norm_act_layer("bn", 4)) is nkn.BatchNormAct2d  # the built-in again
