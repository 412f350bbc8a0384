"""freeze_bn / unfreeze_bn (issue 6.4): frozen layers stay bit-identical through training steps."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normkit
from normkit.nn import (
    BatchNorm1d,
    BatchNormAct2d,
    BatchRenorm2d,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    GhostBatchNorm2d,
)
from normkit.surgery import freeze_bn, unfreeze_bn
from normkit.surgery.freeze import (
    FrozenBatchNormAct1d,
    FrozenBatchNormAct2d,
    FrozenBatchNormAct3d,
    FrozenBatchNormXd,
    FrozenSyncBatchNormAct,
)
from tests.torch_compat import needs_torch_bias


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Sequential(
            nn.Conv2d(4, 4, 3, padding=1), GhostBatchNorm2d(4, ghost_batch_size=2), BatchRenorm2d(4)
        ),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
        nn.BatchNorm1d(5),
    )


def _warm(net: nn.Module) -> nn.Module:
    net.train()
    with torch.no_grad():
        for s in range(2):
            net(torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(s)) * 2 + 1)
    return net


def test_freeze_then_train_step_leaves_frozen_buffers_bit_identical():
    net = _warm(_net())
    original = copy.deepcopy(net).eval()
    freeze_bn(net)
    net.train()
    frozen = [m for m in net.modules() if isinstance(m, (FrozenBatchNorm1d, FrozenBatchNorm2d))]
    assert len(frozen) == 4 and all(not m.training for m in frozen)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in frozen]
    conv_before = net[0].weight.detach().clone()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(9))
    for _ in range(2):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    for m, b in zip(frozen, before):
        for k, v in m.state_dict().items():
            assert torch.equal(v, b[k]), k
    assert not torch.equal(net[0].weight, conv_before)  # the rest of the model did train
    # Before the step, a frozen model in train mode computes what the original computes in eval.
    net2 = freeze_bn(copy.deepcopy(original)).train()
    torch.testing.assert_close(net2(x), original(x), rtol=1e-5, atol=1e-5)


def test_state_dict_keys_unchanged_and_load_both_ways():
    net = _warm(_net())
    sd = copy.deepcopy(net.state_dict())
    frozen = freeze_bn(copy.deepcopy(net))
    assert sorted(frozen.state_dict()) == sorted(sd)
    fresh_frozen = freeze_bn(_net())
    fresh_frozen.load_state_dict(sd)  # BN checkpoint into the frozen model
    for k, v in sd.items():
        assert torch.equal(fresh_frozen.state_dict()[k], v)
    plain = _net()
    plain.load_state_dict(frozen.state_dict())  # and back
    for k, v in sd.items():
        assert torch.equal(plain.state_dict()[k], v)


def test_unfreeze_restores_classes_values_flags_and_mode():
    net = _warm(_net())
    net[1].weight.requires_grad_(False)
    ref = copy.deepcopy(net)
    freeze_bn(net)
    net.train()
    unfreeze_bn(net)
    assert type(net[1]) is nn.BatchNorm2d and type(net[6]) is nn.BatchNorm1d
    assert type(net[3][1]) is GhostBatchNorm2d and net[3][1].ghost_batch_size == 2
    assert type(net[3][2]) is BatchRenorm2d
    assert net[1].weight.requires_grad is False and net[6].weight.requires_grad is True
    assert all(m.training for m in net.modules())
    for (k, v), (k2, v2) in zip(net.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(net(x), ref(x))  # a BN training step again, stats updated alike
    torch.testing.assert_close(net[1].running_var, ref[1].running_var)


@needs_torch_bias
def test_a_bias_less_torch_batch_norm_comes_back_bias_less():
    """torch.nn.BatchNorm2d(bias=False) (torch >= 2.12) through freeze and unfreeze: the same class,
    still no bias (unfreeze gave it a zero bias Parameter and a state_dict key torch's has not)."""
    bn = _warm(nn.Sequential(nn.BatchNorm2d(3, bias=False)))
    ref = copy.deepcopy(bn)
    back = unfreeze_bn(freeze_bn(bn, inplace=False))
    assert type(back[0]) is nn.BatchNorm2d and back[0].bias is None
    assert list(back.state_dict()) == list(ref.state_dict())
    for v, v2 in zip(back.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(v, v2)


def test_what_is_left_alone_inplace_false_and_single_layers():
    model = nn.Sequential(
        BatchNormAct2d(3),
        nn.BatchNorm2d(3, track_running_stats=False),
        nn.BatchNorm3d(3),
        BatchNorm1d(3, bias=False),
        nn.BatchNorm2d(3, affine=False, track_running_stats=False),  # nothing to freeze: no warning for it
    )
    with pytest.warns(
        UserWarning, match=r"1 batch-norm layer\(s\) left unfrozen.*'1' \(BatchNorm2d\): no running"
    ):
        out = freeze_bn(model, inplace=False)
    assert type(model[2]) is nn.BatchNorm3d and type(model[0]) is BatchNormAct2d  # the original is untouched
    assert type(out[0]) is FrozenBatchNormAct2d and type(out[1]) is nn.BatchNorm2d
    assert type(out[2]) is FrozenBatchNorm3d and type(out[3]) is FrozenBatchNorm1d and out[3].bias is None
    back = unfreeze_bn(out)
    assert type(back[3]) is BatchNorm1d and back[3].bias is None and type(back[0]) is BatchNormAct2d
    single = freeze_bn(nn.BatchNorm1d(3), use_running_stats=False, update_running_stats=True)
    assert (
        isinstance(single, FrozenBatchNorm1d) and single.update_running_stats and not single.use_running_stats
    )
    x = torch.randn(5, 3)
    ref = nn.BatchNorm1d(3)
    torch.testing.assert_close(single(x), ref(x))
    torch.testing.assert_close(single.running_var, ref.running_var)
    assert isinstance(unfreeze_bn(FrozenBatchNorm1d(3)), BatchNorm1d)  # built directly: normkit BN
    assert normkit.freeze_bn is freeze_bn
    with pytest.raises(TypeError, match="expected an nn.Module, got str"):
        freeze_bn("model")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected an nn.Module"):
        unfreeze_bn(3)  # type: ignore[arg-type]


class _Aliased(nn.Module):
    """A BN reachable under two attribute names (``self.final_norm = self.bn``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.final_norm = self.bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_norm(self.conv(x))


def test_a_bn_under_two_names_is_frozen_under_both_and_stays_shared():
    """Oracle: the running statistics and the outputs of the model before freezing (eval mode)."""
    torch.manual_seed(0)
    net = _Aliased()
    net.train()(torch.randn(4, 3, 6, 6) * 2 + 1)  # non-trivial running statistics
    x = torch.randn(4, 3, 6, 6) + 5
    with torch.no_grad():
        want = net.eval()(x)
    stats = net.bn.running_mean.clone()
    net = freeze_bn(net).train()
    assert isinstance(net.bn, FrozenBatchNorm2d) and net.final_norm is net.bn
    assert [n for n, _ in net.named_parameters()] == ["conv.weight", "conv.bias"]
    with torch.no_grad():
        got = net(x)  # train mode: a frozen layer still uses the running statistics
    torch.testing.assert_close(got, want)
    assert torch.equal(net.final_norm.running_mean, stats)
    net = unfreeze_bn(net)
    assert type(net.bn) is nn.BatchNorm2d and net.final_norm is net.bn


def test_lazy_and_scripted_models_are_refused():
    """A LazyBatchNorm2d has nothing to freeze yet: a typed error naming it, not a silent skip."""
    with pytest.raises(normkit.NormError, match=r"layer '1' \(LazyBatchNorm2d\).*forward pass"):
        freeze_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d()))
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with pytest.raises(TypeError, match="scripted modules .* not supported"):
        freeze_bn(scripted)
    with pytest.raises(TypeError, match="scripted modules"):
        unfreeze_bn(scripted)


# --- every batch-norm type, and what freeze_bn cannot freeze ------------------------------------------


def _sync_layers() -> dict[str, nn.Module]:
    from normkit.nn.sync_batch_norm import SyncBatchNormAct, _BatchNormXd

    return {
        "torch SyncBatchNorm": nn.SyncBatchNorm(4),  # what torch's convert_sync_batchnorm leaves
        "normkit SyncBatchNorm": normkit.nn.SyncBatchNorm(4),  # what normkit.convert_sync_batchnorm leaves
        "normkit _BatchNormXd": _BatchNormXd(4),  # what revert_sync_batchnorm leaves of an unknown rank
        "BatchNormAct2d": BatchNormAct2d(4, activation="silu"),  # convert_norms(.., "bn") fuses into it
        "SyncBatchNormAct": SyncBatchNormAct(4, activation="silu"),
        "BatchRenormAct2d": normkit.create_norm_act_layer("brn", 4, "silu"),
        "GhostBatchNormAct2d": normkit.create_norm_act_layer("gbn:2", 4, "silu"),
    }


@pytest.mark.parametrize("name", list(_sync_layers()))
def test_every_batch_norm_type_is_frozen_and_comes_back(name):
    """Oracle: the original layer in eval mode (torch's own forward), and the layer's own state before
    freezing. After freeze_bn(model); model.train(), a training step must leave the layer's affine and
    running statistics bit-identical (they used to stay trainable / keep updating)."""
    torch.manual_seed(0)
    bn = _sync_layers()[name]
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2)
    bn.bias.requires_grad_(False)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bn)
    original = copy.deepcopy(model).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    freeze_bn(model)
    model.train()
    frozen = model[1]
    assert isinstance(frozen, (FrozenBatchNormXd, FrozenBatchNormAct2d, FrozenSyncBatchNormAct)), type(frozen)
    assert list(frozen.parameters()) == [] and not frozen.training
    assert sorted(model.state_dict()) == sorted(sd)
    x = torch.randn(4, 3, 5, 5) + 3
    if type(bn) is not nn.SyncBatchNorm:  # (torch's needs a process group in training mode)
        torch.testing.assert_close(model(x), original(x))  # frozen in train mode == original in eval
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        model(x).square().mean().backward()
        opt.step()
        for k, v in sd.items():
            if not k.startswith("0."):
                assert torch.equal(model.state_dict()[k], v), k
    back = unfreeze_bn(model)
    assert type(back[1]) is type(bn) and back[1].training
    assert [p.requires_grad for p in (back[1].weight, back[1].bias)] == [True, False]
    assert list(back[1].state_dict()) == list(original[1].state_dict())
    for k, v in back[1].state_dict().items():
        assert torch.equal(v, original[1].state_dict()[k]), k
    if hasattr(bn, "activation"):
        assert back[1].activation == "silu"
    h = torch.randn(4, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(back[1].eval()(h), original[1](h))


def test_a_frozen_sync_batch_norm_takes_any_rank_like_the_original():
    """Oracle: torch.nn.SyncBatchNorm in eval on 2-D, 3-D and 5-D inputs."""
    torch.manual_seed(0)
    sbn = nn.SyncBatchNorm(3).eval()
    with torch.no_grad():
        sbn.running_mean.uniform_(-1, 1), sbn.running_var.uniform_(0.5, 2)
    frozen = freeze_bn(copy.deepcopy(sbn))
    for shape in ((4, 3), (4, 3, 5), (2, 3, 2, 2, 2)):
        x = torch.randn(shape)
        torch.testing.assert_close(frozen.train()(x), sbn(x))


def test_norm_act_layers_refuse_the_batch_statistics_switches():
    """A frozen norm+activation layer only normalizes with the running statistics: asking for batch
    statistics (or updates) is refused before anything is changed, naming the layer."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), BatchNormAct2d(4))
    for kw in ({"use_running_stats": False}, {"update_running_stats": True}):
        with pytest.raises(normkit.NormError, match=r"'2' \(BatchNormAct2d\)"):
            freeze_bn(model, **kw)
        assert type(model[1]) is nn.BatchNorm2d  # untouched


def test_a_batch_norm_subclass_with_its_own_forward_is_named_in_a_warning():
    class ScaledBN(nn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Conv2d(3, 4, 1), ScaledBN(4), nn.BatchNorm2d(4))
    with pytest.warns(UserWarning, match=r"'1' \(ScaledBN\): a subclass of BatchNorm2d"):
        freeze_bn(model)
    assert type(model[1]) is ScaledBN and model[1].weight.requires_grad  # left as it was, and said so
    assert type(model[2]) is FrozenBatchNorm2d


def test_unfreeze_gives_back_a_layer_kept_in_eval_inside_a_training_model():
    """Oracle: every module's train/eval flag as the user set them before freeze_bn."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 1),
        nn.BatchNorm2d(4),
        BatchNormAct2d(4),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)),
    ).train()
    model[1].eval()  # a stem BN kept in eval on purpose
    model[4].eval()
    model[5].eval()  # a whole block kept in eval
    flags = [m.training for m in model.modules()]
    unfreeze_bn(freeze_bn(model))
    assert [m.training for m in model.modules()] == flags
    before = model[1].running_mean.clone()
    model(torch.randn(4, 3, 5, 5) + 3)
    assert torch.equal(model[1].running_mean, before)  # still in eval: not updated
    # A layer that had the model's mode follows the model's mode at unfreeze time.
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)).train()
    model[2].eval()
    freeze_bn(model).eval()
    unfreeze_bn(model)
    assert not model[1].training and not model[2].training
    # A single layer gets the mode it had.
    assert unfreeze_bn(freeze_bn(nn.BatchNorm2d(4).train())).training
    assert not unfreeze_bn(freeze_bn(nn.BatchNorm2d(4).eval())).training


@pytest.mark.parametrize(
    "make, conv, shape, frozen_cls",
    [
        (lambda: normkit.nn.BatchNormAct1d(4, activation="silu"), nn.Conv1d, (4, 3, 6), FrozenBatchNormAct1d),
        (lambda: normkit.create_norm_act_layer("bn1d", 4, "silu"), nn.Conv1d, (4, 3), FrozenBatchNormAct1d),
        (
            lambda: normkit.nn.BatchRenormAct1d(4, activation="silu"),
            nn.Conv1d,
            (4, 3, 6),
            FrozenBatchNormAct1d,
        ),
        (
            lambda: normkit.nn.BatchNormAct3d(4, activation="silu"),
            nn.Conv3d,
            (2, 3, 2, 3, 3),
            FrozenBatchNormAct3d,
        ),
        (
            lambda: normkit.nn.GhostBatchNormAct3d(4, activation="silu"),
            nn.Conv3d,
            (2, 3, 2, 3, 3),
            FrozenBatchNormAct3d,
        ),
    ],
    ids=["bn-act-1d", "bn-act-1d-2dinput", "brn-act-1d", "bn-act-3d", "gbn-act-3d"],
)
def test_norm_act_layers_of_every_rank_are_frozen_and_come_back(make, conv, shape, frozen_cls):
    """Oracle: the original model in eval (its activation included), and its state before freezing."""
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1), layer.running_var.uniform_(0.5, 2), layer.weight.uniform_(0.5, 2)
    if len(shape) == 2:  # (N, C): a Linear before the norm
        model = nn.Sequential(nn.Linear(3, 4), layer)
    else:
        model = nn.Sequential(conv(3, 4, 1), layer)
    original = copy.deepcopy(model).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    freeze_bn(model)
    model.train()
    assert type(model[1]) is frozen_cls and list(model[1].parameters()) == []
    assert list(model.state_dict()) == list(sd)
    x = torch.randn(shape) + 2
    torch.testing.assert_close(model(x), original(x))  # frozen in train mode == original in eval
    model(x).square().mean().backward()
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v), k
    back = unfreeze_bn(model)
    assert type(back[1]) is type(layer) and back[1].training and back[1].activation == "silu"
    back.eval()
    torch.testing.assert_close(back(x), original(x))
