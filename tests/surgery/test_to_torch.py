"""``normkit.surgery.to_torch_nn``: normkit's layers back to the torch.nn classes they extend, for the tools
that look layers up by exact type (torch.ao quantization, torch.fx's fuser). Oracle: the torch.nn layer
built with the same arguments and loaded with the same state_dict, and torch's own tools run on it."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import normkit
import normkit.nn as nkn
from normkit.surgery import to_torch_nn

CASES = [
    (lambda: nkn.BatchNorm1d(6), nn.BatchNorm1d, (5, 6, 7)),
    (lambda: nkn.BatchNorm2d(6, momentum=None), nn.BatchNorm2d, (4, 6, 5, 5)),
    (lambda: nkn.BatchNorm3d(6, affine=False), nn.BatchNorm3d, (2, 6, 3, 3, 3)),
    (lambda: nkn.BatchNorm2d(6, track_running_stats=False), nn.BatchNorm2d, (4, 6, 5, 5)),
    (lambda: nkn.GroupNorm(3, 6, eps=1e-3), nn.GroupNorm, (4, 6, 5, 5)),
    (lambda: nkn.LayerNorm((5, 5), bias=False), nn.LayerNorm, (4, 6, 5, 5)),
    (lambda: nkn.InstanceNorm1d(6), nn.InstanceNorm1d, (4, 6, 7)),
    (lambda: nkn.InstanceNorm2d(6, affine=True, track_running_stats=True), nn.InstanceNorm2d, (4, 6, 5, 5)),
    (lambda: nkn.InstanceNorm3d(6, affine=True), nn.InstanceNorm3d, (2, 6, 3, 3, 3)),
]


def _perturbed(make) -> nn.Module:
    torch.manual_seed(0)
    m = make()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, t in [*m.named_parameters(), *m.named_buffers()]:
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + (0.5 if "var" in name else -0.5))
    return m


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    ("make", "twin", "shape"), CASES, ids=[c[1].__name__ + str(i) for i, c in enumerate(CASES)]
)
def test_each_layer_becomes_its_torch_twin_with_its_tensors_and_computes_as_it(make, twin, shape, train):
    layer = _perturbed(make).train(train)
    original = copy.deepcopy(layer.state_dict())
    new, report = to_torch_nn(layer)
    assert type(new) is twin and new.training == train
    assert [c.target for c in report.converted] == [f"torch.nn.{twin.__name__}"]
    # the input is untouched; the new layer holds the same values under torch's keys
    assert type(layer) is not twin and all(torch.equal(v, layer.state_dict()[k]) for k, v in original.items())
    assert new.state_dict().keys() == {k for k in original if k != "num_skipped_updates"}
    ref = twin(**_args(new))  # a fresh torch.nn layer, same arguments and state
    ref.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "num_skipped_updates"})
    ref.train(train)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # (two steps: the running statistics too)
        torch.testing.assert_close(new(x), ref(x), rtol=0, atol=0)
    for (k, a), b in zip(ref.state_dict().items(), new.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")


def _args(m: nn.Module) -> dict:
    if isinstance(m, nn.GroupNorm):
        return {"num_groups": m.num_groups, "num_channels": m.num_channels, "eps": m.eps, "affine": m.affine}
    if isinstance(m, nn.LayerNorm):
        return {
            "normalized_shape": m.normalized_shape,
            "eps": m.eps,
            "elementwise_affine": m.elementwise_affine,
            "bias": m.bias is not None,
        }
    return {
        "num_features": m.num_features,
        "eps": m.eps,
        "momentum": m.momentum,
        "affine": m.affine,
        "track_running_stats": m.track_running_stats,
    }


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nkn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1), nkn.GroupNorm(2, 8)
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_parameters_stay_the_same_tensors_and_hooks_and_aliases_follow():
    """An optimizer built on the model still holds the new layers' parameters; a forward hook registered
    on a normkit layer runs on its twin (its handle still removes it); a layer reachable under two names
    becomes one torch layer."""
    net = _net()
    holder = nn.ModuleDict({"net": net, "alias": net[1]})  # the BN under two names
    new_holder, _ = to_torch_nn(holder)
    assert type(new_holder["alias"]) is nn.BatchNorm2d and new_holder["alias"] is new_holder["net"][1]
    seen = []
    new, _ = to_torch_nn(net)
    assert new[1].weight is not net[1].weight  # (a deep copy: the input model keeps its own)
    # in the copy, parameters are shared between its old and new layer: nothing for an optimizer to lose
    params = dict(new.named_parameters())
    assert params["1.weight"] is new[1].weight
    handle = new[1].register_forward_hook(lambda m, a, out: seen.append(1))
    new(torch.randn(2, 3, 6, 6))
    handle.remove()
    new(torch.randn(2, 3, 6, 6))
    assert seen == [1]
    hooked = _net()
    hooked[1].register_forward_hook(lambda m, a, out: out * 0)
    moved, _ = to_torch_nn(hooked)
    assert bool((moved[:2](torch.randn(2, 3, 6, 6)) == 0).all())


def test_what_torch_has_no_class_for_is_left_with_its_reason():
    net = nn.Sequential(
        nkn.LayerNorm2d(6),
        nkn.BatchNormAct2d(6),
        nkn.BatchNorm2d(6, bias=False),
        normkit.create_norm_layer("ln+pn", 6),
        nkn.SyncBatchNorm(6),
        nkn.BatchRenorm2d(6),
        nkn.GroupNorm(3, 6),
    )
    new, report = to_torch_nn(net, where=lambda path, m: path != "6")
    assert [type(m) for m in new] == [type(m) for m in net]
    why = {name: reason for name, _, reason in report.skipped}
    assert "bias=False" in why["2"] and "revert_sync_batchnorm" in why["4"] and "activation" in why["1"]
    assert set(why) == {"0", "1", "2", "3", "4", "5"} and report.excluded == ["6"]
    assert "6 skipped" in str(report)


def test_a_compiled_model_is_unwrapped_with_a_warning():
    net = _net()
    with pytest.warns(UserWarning, match="torch.compile"):
        new, _ = to_torch_nn(torch.compile(net))
    assert type(new[1]) is nn.BatchNorm2d


def test_torch_fx_fuser_folds_the_converted_bn_into_the_conv():
    """``torch.fx.experimental.optimization.fuse`` matches ``(nn.Conv2d, nn.BatchNorm2d)`` by exact type: it
    left normkit's BN; after ``to_torch_nn`` it folds it, and the output stays the model's."""
    from torch.fx.experimental.optimization import fuse

    net = _net()
    x = torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = fuse(copy.deepcopy(net))
        folded = fuse(to_torch_nn(net).model)
    assert any(isinstance(m, nn.BatchNorm2d) for m in kept.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)
