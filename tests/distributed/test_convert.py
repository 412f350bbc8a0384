"""normkit.convert_sync_batchnorm / revert_sync_batchnorm: round trips lose nothing, unsafe layers are
refused.

Single process (no process group): a converted layer then computes plain BN, so its outputs are
compared with the original layer's, and every Parameter, buffer and flag with the original's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import normkit
import normkit.nn as nkn
from normkit import NormError

F64 = torch.float64


def _used(layer: nn.Module, x: torch.Tensor, steps: int = 3) -> nn.Module:
    """A layer with non-default parameters and statistics (a few training steps)."""
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(0.5, 1.5)
        was = layer.training
        layer.train()
        for i in range(steps):
            layer(x + i)
        layer.train(was)
    return layer


SOURCES: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    ("torch-BatchNorm1d", lambda: nn.BatchNorm1d(4), (6, 4)),
    ("torch-BatchNorm2d", lambda: nn.BatchNorm2d(4), (3, 4, 3, 3)),
    ("torch-BatchNorm3d-f64", lambda: nn.BatchNorm3d(4, dtype=F64), (2, 4, 2, 2, 2)),
    ("torch-BatchNorm2d-momentum-none", lambda: nn.BatchNorm2d(4, momentum=None), (3, 4, 3, 3)),
    ("torch-BatchNorm2d-no-affine", lambda: nn.BatchNorm2d(4, affine=False), (3, 4, 3, 3)),
    ("torch-BatchNorm2d-no-tracking", lambda: nn.BatchNorm2d(4, track_running_stats=False), (3, 4, 3, 3)),
    ("normkit-BatchNorm1d-3d", lambda: nkn.BatchNorm1d(4), (3, 4, 5)),
    ("normkit-BatchNorm2d-no-bias", lambda: nkn.BatchNorm2d(4, bias=False), (3, 4, 3, 3)),
    (
        "normkit-BatchNorm2d-biased-f64",
        lambda: nkn.BatchNorm2d(4, unbiased_running_var=False, dtype=F64),
        (3, 4, 3, 3),
    ),
    ("normkit-BatchNorm3d-eps", lambda: nkn.BatchNorm3d(4, eps=1e-3, momentum=0.3), (2, 4, 2, 2, 2)),
    ("normkit-BatchNormAct2d-silu", lambda: nkn.BatchNormAct2d(4, activation="silu"), (3, 4, 3, 3)),
    (
        "normkit-BatchNormAct2d-module",
        lambda: nkn.BatchNormAct2d(4, activation=nn.LeakyReLU(0.3)),
        (3, 4, 3, 3),
    ),
]


def _flags(m: nn.Module) -> dict[str, Any]:
    return {
        "training": m.training,
        "track_running_stats": m.track_running_stats,
        "eps": m.eps,
        "momentum": m.momentum,
        "affine": m.affine,
        "unbiased": getattr(m, "unbiased_running_var", True),
        "requires_grad": [p.requires_grad for p in m.parameters()],
        "dtypes": sorted({str(t.dtype) for t in m.state_dict().values()}),
    }


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize(("name", "build", "shape"), SOURCES, ids=[s[0] for s in SOURCES])
def test_round_trip_keeps_everything(
    name: str, build: Callable[[], nn.Module], shape: tuple[int, ...], train: bool
) -> None:
    torch.manual_seed(0)
    layer = build()
    x = torch.randn(shape, dtype=layer.weight.dtype if layer.weight is not None else torch.float32) * 2 + 1
    _used(layer, x).train(train)
    if layer.weight is not None:
        layer.weight.requires_grad_(False)  # a frozen scale must stay frozen
    original = copy.deepcopy(layer)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    params = {k: p for k, p in layer.named_parameters()}
    net = nn.Sequential(nn.Identity(), nn.Sequential(layer))
    net[1].train(train)

    net = normkit.convert_sync_batchnorm(net)
    sync = net[1][0]
    assert isinstance(sync, nkn.SyncBatchNorm)
    assert isinstance(sync, nkn.SyncBatchNormAct) == name.startswith("normkit-BatchNormAct2d")
    assert _flags(sync) == _flags(original)
    for k, p in sync.named_parameters():
        assert p is params[k]  # the very same Parameter objects: an optimizer built before still works
    assert list(sync.state_dict()) == list(before)
    for k, v in sync.state_dict().items():
        assert torch.equal(v, before[k]), k
    # with one process a SyncBatchNorm computes exactly what the original did, train or eval
    a, b = copy.deepcopy(sync), copy.deepcopy(original)
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-6)
    for k, v in b.state_dict().items():
        torch.testing.assert_close(a.state_dict()[k], v, rtol=1e-6, atol=1e-7)

    net = normkit.revert_sync_batchnorm(net)
    back = net[1][0]
    assert type(back) is type(original)
    assert _flags(back) == _flags(original)
    assert list(back.state_dict()) == list(before)
    for k, v in back.state_dict().items():
        assert torch.equal(v, before[k]), k
    if isinstance(original, nkn.BatchNormAct2d):  # the same activation (a Module one: the same object)
        assert back.activation is layer.activation and repr(back) == repr(original)


def test_flipped_tracking_flag_and_skip_counter_are_kept() -> None:
    bn = nkn.BatchNorm2d(3)
    bn(torch.randn(4, 3, 2, 2))
    bn.track_running_stats = False  # flipped after construction: buffers exist but are not used
    sync = normkit.convert_sync_batchnorm(bn)
    assert sync.track_running_stats is False and sync.running_mean is bn.running_mean
    assert sync.num_skipped_updates is bn.num_skipped_updates
    rm = sync.running_mean.clone()
    sync.train()(torch.randn(4, 3, 2, 2))
    assert torch.equal(sync.running_mean, rm)
    assert normkit.revert_sync_batchnorm(sync).track_running_stats is False


def test_torch_sync_batch_norm_converts_and_keeps_its_process_group() -> None:
    group = object()  # any process-group handle: kept by identity, never copied
    torch_sync = nn.SyncBatchNorm(5, process_group=group)
    torch_sync.num_batches_tracked.fill_(9)
    ours = normkit.convert_sync_batchnorm(nn.Sequential(torch_sync))[0]
    assert type(ours) is nkn.SyncBatchNorm and ours.process_group is group
    assert int(ours.num_batches_tracked) == 9
    assert copy.deepcopy(ours).process_group is group
    other = object()
    assert normkit.convert_sync_batchnorm(ours, process_group=other).process_group is other
    back = normkit.revert_sync_batchnorm(nn.Sequential(ours))[0]
    assert isinstance(back, nkn.BatchNorm2d.__mro__[1]) and int(back.num_batches_tracked) == 9
    # torch's SyncBatchNorm does not know its input rank: normkit's BN for 2D-5D
    assert back(torch.randn(3, 5)).shape == (3, 5) and back(torch.randn(3, 5, 2, 2, 2)).shape == (
        3,
        5,
        2,
        2,
        2,
    )
    # and a torch SyncBatchNorm reverts directly too
    assert type(normkit.revert_sync_batchnorm(nn.SyncBatchNorm(2))).__name__ == "_BatchNormXd"


def test_torch_spelling_of_the_conversion_works_on_normkit_classes() -> None:
    # torch's idiom: nn.SyncBatchNorm.convert_sync_batchnorm(model, group), a classmethod
    group = object()
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nkn.BatchNormAct2d(4))
    weight = net[1].weight
    out = nkn.SyncBatchNorm.convert_sync_batchnorm(net, group)
    assert [type(m).__name__ for m in out] == ["Conv2d", "SyncBatchNorm", "SyncBatchNormAct"]
    assert out[1].weight is weight and out[1].process_group is group and out[2].process_group is group
    assert type(nkn.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm1d(2))) is nkn.SyncBatchNorm


def test_process_group_is_given_to_every_converted_layer_and_kept_through_the_round_trip() -> None:
    group = object()
    net = nn.Sequential(nn.BatchNorm2d(2), nn.Sequential(nkn.BatchNorm1d(3)))
    net = normkit.convert_sync_batchnorm(net, process_group=group)
    assert net[0].process_group is group and net[1][0].process_group is group
    net = normkit.convert_sync_batchnorm(normkit.revert_sync_batchnorm(net), group)
    assert net[0].process_group is group


def test_other_layers_are_never_touched() -> None:
    keep = [
        nn.GroupNorm(2, 4),
        nn.LayerNorm(4),
        nkn.FrozenBatchNorm2d(4),
        nn.InstanceNorm2d(4, track_running_stats=True),
        nkn.GroupNorm(2, 4),
        nkn.LayerNorm2d(4),
        nn.Conv2d(4, 4, 1),
    ]  # (Keras's BatchNormalization, a batch norm SyncBatchNorm cannot express, is refused: test_keras_port)
    net = nn.Sequential(*keep)
    out = normkit.convert_sync_batchnorm(net)
    assert out is net and all(a is b for a, b in zip(out, keep))
    assert normkit.revert_sync_batchnorm(net) is net and all(a is b for a, b in zip(net, keep))


def test_a_single_layer_model_returns_the_new_layer() -> None:
    bn = nn.BatchNorm2d(3)
    sync = normkit.convert_sync_batchnorm(bn)
    assert type(sync) is nkn.SyncBatchNorm and sync.weight is bn.weight
    assert type(normkit.revert_sync_batchnorm(sync)) is nn.BatchNorm2d


class _ForwardOverride(nkn.BatchNorm2d):
    def forward(self, x: torch.Tensor, mask: Any = None) -> torch.Tensor:
        return super().forward(x) * 2


class _InitOnly(nn.BatchNorm2d):
    def __init__(self, c: int) -> None:
        super().__init__(c, eps=1e-3)


@pytest.mark.parametrize(
    ("layer", "words"),
    [
        (
            nkn.GhostBatchNorm2d(4, ghost_batch_size=2),
            ["'1.1'", "GhostBatchNorm2d", "ghost_batch_size=2", "BatchNorm2d first", "silently"],
        ),
        (nkn.BatchRenorm1d(4), ["'1.1'", "BatchRenorm1d", "(r, d)", "BatchNorm1d first", "silently"]),
        (_ForwardOverride(4), ["'1.1'", "_ForwardOverride overrides BatchNorm's forward", "silently"]),
        (nn.LazyBatchNorm2d(), ["'1.1'", "LazyBatchNorm2d", "run one forward pass first"]),
    ],
    ids=["ghost", "renorm", "custom-forward", "lazy"],
)
def test_layers_whose_forward_would_be_dropped_are_refused(layer: nn.Module, words: list[str]) -> None:
    net = nn.Sequential(nn.BatchNorm2d(4), nn.Sequential(nn.Identity(), layer))
    with pytest.raises(NormError) as e:
        normkit.convert_sync_batchnorm(net)
    msg = str(e.value)
    for w in [*words, "unsupported='keep'"]:
        assert w in msg, (w, msg)
    assert type(net[0]) is nn.BatchNorm2d  # a refused model is left as it was, not half-converted
    kept = normkit.convert_sync_batchnorm(
        nn.Sequential(nn.BatchNorm2d(4), nn.Sequential(nn.Identity(), layer)), unsupported="keep"
    )
    assert type(kept[0]) is nkn.SyncBatchNorm and kept[1][1] is layer


def test_subclass_that_keeps_the_forward_converts_and_reverts_to_its_base() -> None:
    layer = _InitOnly(3)
    sync = normkit.convert_sync_batchnorm(layer)
    assert type(sync) is nkn.SyncBatchNorm and sync.eps == 1e-3
    assert type(normkit.revert_sync_batchnorm(sync)) is nn.BatchNorm2d


def test_meta_device_and_optimizer_state_survive() -> None:
    meta = normkit.convert_sync_batchnorm(nn.BatchNorm2d(3, device="meta"))
    assert meta.weight.device.type == "meta" and meta.running_var.device.type == "meta"
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net = normkit.convert_sync_batchnorm(net)
    net(torch.randn(4, 2, 3, 3)).square().sum().backward()  # (a plain sum has a zero weight gradient)
    w0 = net[1].weight.detach().clone()
    opt.step()  # the optimizer built before the conversion updates the converted layer
    assert not torch.equal(net[1].weight, w0)


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="expected an nn.Module"):
        normkit.convert_sync_batchnorm([nn.BatchNorm2d(2)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected an nn.Module"):
        normkit.revert_sync_batchnorm(None)  # type: ignore[arg-type]
    with pytest.raises(NormError, match="unsupported must be 'raise' or 'keep', got 'skip'"):
        normkit.convert_sync_batchnorm(nn.BatchNorm2d(2), unsupported="skip")  # type: ignore[arg-type]
