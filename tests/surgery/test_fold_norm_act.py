"""fold_bn on Conv -> norm+activation layer: the folded model equals the eager one for every such layer type
(the norm folds into the conv, the activation stays), or the layer is left as it is.

Regression: ``describe_norm`` reported no activation for ``SyncBatchNormAct`` (and its frozen form), so
fold_bn replaced it by ``Identity`` and the ReLU vanished from the folded model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
import torch
from torch import nn

import normkit
import normkit.nn as nkn
from normkit.nn._inspect import NormInfo, describe_norm
from normkit.nn.norm_act import _ActMixin
from normkit.surgery.freeze import (
    FrozenBatchNormAct1d,
    FrozenBatchNormAct2d,
    FrozenBatchNormAct3d,
    FrozenSyncBatchNormAct,
    freeze_bn,
)
from tests.surgery.models import randomize_norms

FROZEN_ACT = (FrozenBatchNormAct1d, FrozenBatchNormAct2d, FrozenBatchNormAct3d, FrozenSyncBatchNormAct)

C = 6


def _frozen(layer: nn.Module) -> nn.Module:
    frozen = freeze_bn(layer)
    assert type(frozen) in FROZEN_ACT
    return frozen


#: Every BN+activation layer type fold_bn folds: the norm goes into the conv, the activation stays.
FOLDED: dict[str, Callable[[], nn.Module]] = {
    "BatchNormAct2d-relu": lambda: nkn.BatchNormAct2d(C, activation="relu"),
    "SyncBatchNormAct-relu": lambda: nkn.SyncBatchNormAct(C, activation="relu"),
    "SyncBatchNormAct-leaky": lambda: nkn.SyncBatchNormAct(C, activation="leaky_relu:0.2"),
    "SyncBatchNormAct-module": lambda: nkn.SyncBatchNormAct(C, activation=nn.Hardswish()),
    "SyncBatchNormAct-callable": lambda: nkn.SyncBatchNormAct(C, activation=torch.tanh),
    "FrozenBatchNormAct2d": lambda: _frozen(nkn.BatchNormAct2d(C, activation="relu")),
    "FrozenSyncBatchNormAct": lambda: _frozen(nkn.SyncBatchNormAct(C, activation="silu")),
    "FrozenBatchNormAct1d": lambda: _frozen(nkn.BatchRenormAct1d(C, activation="relu")),
    "FrozenBatchNormAct3d": lambda: _frozen(nkn.GhostBatchNormAct3d(C, activation="relu")),
    "BatchNormAct1d": lambda: nkn.BatchNormAct1d(C, activation="relu"),
    "BatchNormAct3d": lambda: nkn.BatchNormAct3d(C, activation="relu"),
    "BatchRenormAct1d": lambda: nkn.BatchRenormAct1d(C, activation="relu"),
    "BatchRenormAct2d": lambda: normkit.create_norm_act_layer("brn", C, "relu"),
    "BatchRenormAct3d": lambda: nkn.BatchRenormAct3d(C, activation="relu"),
    "GhostBatchNormAct1d": lambda: nkn.GhostBatchNormAct1d(C, activation="relu"),
    "GhostBatchNormAct2d": lambda: normkit.create_norm_act_layer("gbn:2", C, "relu"),
    "GhostBatchNormAct3d": lambda: nkn.GhostBatchNormAct3d(C, activation="relu"),
}
#: Norm+activation layers that are not BN: fold_bn leaves them as they are.
LEFT: dict[str, Callable[[], nn.Module]] = {
    "GroupNormAct2d": lambda: nkn.GroupNormAct2d(C, num_groups=2, activation="relu"),
    "LayerNormAct2d": lambda: nkn.LayerNormAct2d(C, activation="relu"),
    "LayerNormAct2d-chw": lambda: nkn.LayerNormAct2d(C, over="chw", activation="gelu"),
    "InstanceNormAct1d": lambda: nkn.InstanceNormAct1d(C, activation="relu", affine=True),
    "InstanceNormAct2d": lambda: normkit.create_norm_act_layer("in", C, "relu"),
    "InstanceNormAct3d": lambda: nkn.InstanceNormAct3d(C, activation="relu"),
}


def _rank(layer: nn.Module) -> int:
    name = type(layer).__name__
    return 1 if name.endswith("1d") else 3 if name.endswith("3d") else 2


def _net(make: Callable[[], nn.Module]) -> nn.Sequential:
    torch.manual_seed(0)
    layer = make()
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[_rank(layer) - 1](3, C, 3, padding=1)
    return randomize_norms(nn.Sequential(conv, layer)).eval()


def _input(net: nn.Sequential, seed: int) -> torch.Tensor:
    shape = {1: (4, 3, 7), 2: (4, 3, 5, 5), 3: (2, 3, 3, 4, 4)}[_rank(net[1])]
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(FOLDED))
def test_bn_act_layers_fold_and_keep_their_activation(name: str) -> None:
    net = _net(FOLDED[name])
    x = _input(net, 1)
    folded, diff, report = normkit.fold_bn(net, example_input=x)  # (a mismatch would warn: an error here)

    assert [tuple(f[:2]) for f in report.folded] == [("1", "0")], report  # (norm, into)
    assert not isinstance(folded[1], nn.Identity)  # the activation stays where the layer was
    x2 = _input(net, 2)
    with torch.no_grad():
        want, got = net(x2), folded(x2)
    assert (want < 0).any() or (want == 0).any()  # the activation matters on this input
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert diff <= 1e-5 * max(1.0, float(want.abs().max()))
    assert type(net[1]).__name__ == name.split("-")[0]  # the original is untouched


@pytest.mark.parametrize("name", list(LEFT))
def test_other_norm_act_layers_are_left_as_they_are(name: str) -> None:
    net = _net(LEFT[name])
    x = _input(net, 3)
    folded, diff, report = normkit.fold_bn(net, example_input=x)
    assert report.folded == [] and type(folded[1]) is type(net[1])
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), atol=0.0, rtol=0.0)
    assert diff == 0.0


def _act_classes() -> set[type[nn.Module]]:
    public = (getattr(nkn, n) for n in nkn.__all__)
    found = {c for c in public if inspect.isclass(c) and issubclass(c, _ActMixin)}
    return found | set(FROZEN_ACT)


def test_describe_norm_reports_the_activation_of_every_norm_act_class() -> None:
    """Every normkit norm+activation class (normkit.nn.__all__ and freeze_bn's frozen ones) reports its
    activation, or explains itself with a string; none looks like a plain norm."""
    layers = [f() for f in (*FOLDED.values(), *LEFT.values())] + [nkn.GroupNormProxyAct2d(C, num_groups=2)]
    covered = {type(m) for m in layers}
    missing = _act_classes() - covered
    assert not missing, f"add a layer of each of {sorted(c.__name__ for c in missing)} to FOLDED or LEFT"
    for m in layers:
        info = describe_norm(m)
        assert isinstance(info, NormInfo), (type(m).__name__, info)
        assert info.activation is not None and info.activation is m.activation, type(m).__name__
        if isinstance(m.activation, nn.Module):
            assert info.act_module is m.activation
    plain = describe_norm(nkn.SyncBatchNormAct(C, activation=None))  # identity: a plain norm
    assert isinstance(plain, NormInfo) and plain.activation is None and plain.describe() == f"bn, {C} ch"
    assert describe_norm(nkn.SyncBatchNormAct(C, activation="relu")).describe() == f"bn, {C} ch + relu"  # type: ignore[union-attr]
