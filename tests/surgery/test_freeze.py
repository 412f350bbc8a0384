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
    )
    out = freeze_bn(model, inplace=False)
    assert type(model[2]) is nn.BatchNorm3d  # the original is untouched
    assert type(out[0]) is BatchNormAct2d and type(out[1]) is nn.BatchNorm2d
    assert type(out[2]) is FrozenBatchNorm3d and type(out[3]) is FrozenBatchNorm1d and out[3].bias is None
    back = unfreeze_bn(out)
    assert type(back[3]) is BatchNorm1d and back[3].bias is None
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
