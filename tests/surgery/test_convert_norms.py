"""convert_norms: every norm found and replaced, what keeps its meaning carried over, PN pairs fused, the
input untouched."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import Tensor, nn

import normkit
from normkit.nn import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct2d,
    BatchRenorm2d,
    FrozenBatchNorm2d,
    GhostBatchNorm2d,
    GroupNorm,
    GroupNormAct2d,
    GroupNormProxyAct2d,
    InstanceNorm2d,
    LayerNorm2d,
    MeanOnlyBatchNorm,
)
from tests.reference import ref_group_norm
from tests.surgery.models import MobileNetish, TinyConvNeXt, TVResNet, randomize_norms, timm_like

SMALL = {"width": 8, "layers": (1, 1, 1, 1)}  # a ResNet-18-style layout, narrow and short, for speed


def _resnet(**kw) -> TVResNet:
    torch.manual_seed(0)
    return randomize_norms(TVResNet(**{**SMALL, **kw}))


def _types(model: nn.Module, cls: type) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, cls)]


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the torch.nn-BN ResNet into each registry spec ------------------------------------------------


@pytest.mark.parametrize(
    "spec, cls",
    [
        ("bn", BatchNorm2d),
        ("frozen_bn", FrozenBatchNorm2d),
        ("gbn:16", GhostBatchNorm2d),
        ("brn", BatchRenorm2d),
    ],
)
def test_bn_family_targets_keep_the_running_statistics_so_eval_is_unchanged(spec, cls):
    net = _resnet().eval()
    x = torch.randn(4, 3, 8, 8)
    before = _snapshot(net)
    new, report = normkit.convert_norms(net, spec)
    assert len(_types(new, cls)) == len(_types(net, nn.BatchNorm2d)) == len(report.converted) == 12
    assert not [n for n, m in new.named_modules() if type(m) is nn.BatchNorm2d]
    # The oracle is the unconverted model: BN in eval is the affine map of its running statistics.
    torch.testing.assert_close(new(x), net(x), atol=1e-5, rtol=1e-5)
    assert _same(before, _snapshot(net)) and all(type(m) is not cls for m in net.modules())  # input untouched
    assert all("running_mean" in c.kept and "weight" in c.kept for c in report.converted)


def test_gn_keeps_the_affine_parameters():
    net = _resnet()
    new, report = normkit.convert_norms(net, "gn")
    assert len(_types(new, GroupNorm)) == 12 and report.skipped == []
    for name, m in net.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            g = new.get_submodule(name)
            assert type(g) is GroupNorm and g.num_groups == min(32, m.num_features)
            assert (
                torch.equal(g.weight, m.weight) and torch.equal(g.bias, m.bias) and g.weight is not m.weight
            )
            x = torch.randn(2, m.num_features, 3, 3)  # the layer computes GN with the BN's affine
            torch.testing.assert_close(g(x), ref_group_norm(x, g.num_groups, m.weight, m.bias, m.eps).float())
    assert all("running statistics (GroupNorm has none)" in c.dropped for c in report.converted)
    out = new(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 10)


@pytest.mark.parametrize(
    "spec, cls, check",
    [
        ("gn:4", GroupNorm, lambda m: m.num_groups == 4),
        ("ln", LayerNorm2d, lambda m: m.over == "chw"),
        ("ln2d", LayerNorm2d, lambda m: m.over == "c"),
        ("in", InstanceNorm2d, lambda m: m.affine and not m.track_running_stats),
    ],
)
def test_batch_independent_targets(spec, cls, check):
    net = _resnet()
    new, _ = normkit.convert_norms(net, spec)
    layers = [m for m in new.modules() if isinstance(m, cls)]
    assert len(layers) == 12 and all(check(m) for m in layers)
    new.train()
    x = torch.randn(6, 3, 16, 16)  # 16x16: instance norm needs more than one position in the last stage
    torch.testing.assert_close(new(x)[:2], new(x[:2]), atol=1e-5, rtol=1e-4)  # a sample ignores its batch


def test_flags_device_dtype_and_requires_grad_are_preserved():
    net = _resnet().double()
    net.layer1.eval()  # mixed train/eval flags
    net.bn1.weight.requires_grad_(False)
    new, _ = normkit.convert_norms(net, "gn:2")
    for name, m in net.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            g = new.get_submodule(name)
            assert g.training == m.training and g.weight.dtype == torch.float64
            assert g.weight.requires_grad == m.weight.requires_grad and g.weight.device == m.weight.device
    assert new.bn1.weight.requires_grad is False and new.layer1[0].bn1.training is False


def test_rank_follows_the_layer():
    net = nn.Sequential(
        nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.Flatten(), nn.Linear(24, 6), nn.BatchNorm1d(6)
    )
    new, _ = normkit.convert_norms(net, "bn")
    assert type(new[1]) is BatchNorm1d and type(new[4]) is BatchNorm1d
    net3 = nn.Sequential(nn.Conv3d(2, 4, 1), nn.BatchNorm3d(4))
    assert type(normkit.convert_norms(net3, "frozen_bn").model[1]).__name__ == "FrozenBatchNorm3d"
    # GN says nothing about the rank: the conv before it does.
    gn1d = nn.Sequential(nn.Conv1d(2, 4, 3), nn.GroupNorm(2, 4))
    assert type(normkit.convert_norms(gn1d, "bn").model[1]) is BatchNorm1d
    # "ln" on the (N, C) output of a Linear: GroupNorm(1, C), the LN over all features.
    mlp = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6))
    ln = normkit.convert_norms(mlp, "ln").model[1]
    assert type(ln) is GroupNorm and ln.num_groups == 1
    with pytest.raises(normkit.NormError, match=r"'1' \(BatchNorm1d, 6 channels\).*one value per channel"):
        normkit.convert_norms(mlp, "in")
    with pytest.raises(normkit.NormError, match="spec is for 3d inputs"):
        normkit.convert_norms(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), "bn3d")


# --- ln+pn: norm + activation pairs become Proxy Norm blocks -----------------------------------------


def test_ln_pn_on_a_torchvision_resnet_fuses_every_norm_activation_pair():
    net = _resnet()
    new, report = normkit.convert_norms(net, "ln+pn")
    # bn1 -> relu in the stem and in each block; bn2 (then +identity) and the downsample norms have none.
    pairs = {"bn1"} | {f"layer{i}.0.bn1" for i in range(1, 5)}
    assert {n for n, _ in report.fused} == pairs
    assert set(_types(new, GroupNormProxyAct2d)) == pairs
    unfused = {n for n, _ in report.unfused}
    assert unfused == {f"layer{i}.0.bn2" for i in range(1, 5)} | {
        f"layer{i}.0.downsample.1" for i in range(2, 5)
    }
    assert all(
        "operator.add" in why or "add" in why or "output" in why for n, why in report.unfused if "bn2" in n
    )
    assert all(m.over == "chw" for m in new.modules() if isinstance(m, LayerNorm2d))  # plain LN where no act
    assert not any(isinstance(m, nn.BatchNorm2d) for m in new.modules())
    # A BasicBlock calls its one ReLU after bn1 and after the addition: only the first may go, so the
    # result is a GraphModule without those calls (the stem's relu, used once, is just Identity).
    assert isinstance(new, torch.fx.GraphModule) and "also used elsewhere" in report.graph_module
    relus = [
        n
        for n in new.graph.nodes
        if n.op == "call_module" and isinstance(new.get_submodule(n.target), nn.ReLU)
    ]
    assert len(relus) == 4  # the four after-addition ones
    assert isinstance(new.relu, nn.Identity)
    for name in pairs:  # the BN affine moved into the PN block's activation step
        src, dst = net.get_submodule(name), new.get_submodule(name)
        assert (
            torch.equal(dst.weight, src.weight)
            and torch.equal(dst.bias, src.bias)
            and dst.activation == "relu"
        )
    # The state_dict keeps the original names (minus what BN had and the new layers lack).
    assert set(new.state_dict()) >= {k for k in net.state_dict() if "bn" not in k and "downsample.1" not in k}


def test_ln_pn_resnet_is_batch_independent_and_trains_on_digits():
    from normkit.lab.data import load_digits

    torch.manual_seed(0)
    net = TVResNet(width=8)  # the full ResNet-18 layout (2, 2, 2, 2), narrow
    new, _ = normkit.convert_norms(net, "ln+pn")
    ds = load_digits()
    x, y = ds.x_train[:320].repeat(1, 3, 1, 1), ds.y_train[:320]  # 8x8 digits tiled to 3 channels
    new.train()
    with torch.no_grad():
        torch.testing.assert_close(new(x[:8])[:3], new(x[:3]), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(new(torch.cat([x[:3], 5 * x[3:9]]))[:3], new(x[:3]), atol=1e-5, rtol=1e-4)
    opt = torch.optim.Adam(new.parameters(), lr=3e-3)
    losses = []
    for step in range(20):
        xb, yb = x[16 * step : 16 * (step + 1)], y[16 * step : 16 * (step + 1)]
        loss = nn.functional.cross_entropy(new(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_ln_pn_on_the_project_resnet18_with_functional_relu():
    from normkit.bench import ResNet18Style

    torch.manual_seed(0)
    net = ResNet18Style(nn.BatchNorm2d)
    new, report = normkit.convert_norms(net, "ln+pn")
    assert len(report.fused) == 9 and len(_types(new, GroupNormProxyAct2d)) == 9  # stem + 8 bn1
    assert "stem.1" in dict(report.fused) and "is a function" in report.graph_module
    assert not [
        n
        for n in new.graph.nodes
        if n.op == "call_function"
        and n.target is torch.relu
        and isinstance(n.args[0], torch.fx.Node)
        and n.args[0].op == "call_module"
        and isinstance(new.get_submodule(n.args[0].target), GroupNormProxyAct2d)
    ]
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(new(x)[:2], new(x[:2]), atol=1e-5, rtol=1e-4)


def test_mobilenet_relu6_pairs_fuse_in_place_and_project_norms_stay_plain():
    torch.manual_seed(0)
    net = randomize_norms(MobileNetish())
    new, report = normkit.convert_norms(net, "gn:4+pn")
    # stem, expand and depthwise (x3 blocks), head: each BN then ReLU6 in an nn.Sequential.
    assert len(report.fused) == 8 and len(report.unfused) == 3
    assert not isinstance(new, torch.fx.GraphModule)  # each ReLU6 module was used once: now Identity
    pn = new.features[0][1]
    assert (
        isinstance(pn, GroupNormProxyAct2d)
        and pn.num_groups == 4
        and isinstance(new.features[0][2], nn.Identity)
    )
    y = torch.randn(3, 16, 4, 4)  # relu6 went into the block: act(weight * GN(y) + bias) with relu6
    z = nn.functional.relu6(
        pn.weight.view(1, -1, 1, 1) * nn.functional.group_norm(y, 4, eps=pn.eps) + pn.bias.view(1, -1, 1, 1)
    )
    m, rstd = pn.proxy_stats()
    torch.testing.assert_close(
        pn(y), (z - m.view(1, -1, 1, 1)) * rstd.view(1, -1, 1, 1), atol=1e-5, rtol=1e-5
    )
    assert all(type(new.get_submodule(n)) is GroupNorm for n, _ in report.unfused)
    assert new(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_norm_act_layers_bring_their_activation():
    from normkit.lab.models import CNN4

    net = CNN4("bn", head=True)
    new, report = normkit.convert_norms(net, "ln+pn")
    assert len(report.fused) == 5 and all(a == "relu (in the layer)" for _, a in report.fused)
    gn, _ = normkit.convert_norms(net, "gn:8")
    assert type(gn.features[1]) is GroupNormAct2d and gn.features[1].activation == "relu"
    back, _ = normkit.convert_norms(new, "bn")  # a PN block back to BN + its activation
    assert type(back.features[1]) is BatchNormAct2d and back.features[1].activation == "relu"
    assert torch.equal(back.features[1].weight, net.features[1].weight)


def test_sequential_adjacency_when_fx_cannot_trace():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
            )

        def forward(self, x):
            return self.body(x) if x.sum() > 0 else -self.body(x)

    with pytest.warns(UserWarning, match=r"fused into body\.1 were found by nn\.Sequential adjacency"):
        new, report = normkit.convert_norms(Branchy(), "ln+pn")
    assert report.method.startswith("nn.Sequential adjacency (torch.fx could not trace the model: TraceError")
    assert report.fused == [("body.1", "relu (body.2)")]
    assert isinstance(new.body[1], GroupNormProxyAct2d) and isinstance(new.body[2], nn.Identity)
    assert [n for n, _ in report.unfused] == ["body.4"] and isinstance(new.body[4], LayerNorm2d)


# --- where=, skips and errors ------------------------------------------------------------------------


def test_where_selects_layers():
    net = _resnet()
    by_glob, rep = normkit.convert_norms(net, "gn:2", where="layer1.*")
    assert _types(by_glob, GroupNorm) == ["layer1.0.bn1", "layer1.0.bn2"] and len(rep.excluded) == 10
    by_fn, _ = normkit.convert_norms(net, "gn:2", where=lambda name, m: m.num_features == 64)
    assert _types(by_fn, GroupNorm) == ["layer4.0.bn1", "layer4.0.bn2", "layer4.0.downsample.1"]
    by_re, _ = normkit.convert_norms(net, "gn:2", where=re.compile(r"downsample"))
    assert len(_types(by_re, GroupNorm)) == 3
    by_list, _ = normkit.convert_norms(net, "gn:2", where=["bn1", "layer2.*"])
    assert len(_types(by_list, GroupNorm)) == 4
    with pytest.raises(TypeError, match="where must be"):
        normkit.convert_norms(net, "gn", where=3)


def test_skipped_layers_say_why():
    class OwnForward(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    net = nn.Sequential(
        nn.Conv2d(3, 8, 1), OwnForward(8), MeanOnlyBatchNorm(8), nn.Conv2d(8, 8, 1), GroupNorm(4, 8)
    )
    new, report = normkit.convert_norms(net, "gn:4")
    skipped = {name: why for name, _, why in report.skipped}
    assert (
        "own forward" in skipped["1"]
        and "MeanOnlyBatchNorm" in skipped["2"]
        and "already GroupNorm" in skipped["4"]
    )
    assert type(new[1]) is OwnForward and new[4] is not net[4]
    convnext, rep = normkit.convert_norms(TinyConvNeXt(), "gn:1")
    assert [n for n, _, _ in rep.skipped] == ["head_norm"] and "channels-last" in rep.skipped[0][2]
    assert len(rep.converted) == 5 and type(convnext.head_norm) is nn.LayerNorm
    text = str(rep)
    assert "convert_norms to 'gn:1'" in text and "skipped head_norm (LayerNorm)" in text and "stem.1" in text


def test_convnext_layernorm2d_round_trip_is_exact():
    torch.manual_seed(0)
    net = randomize_norms(TinyConvNeXt())
    x = torch.randn(2, 3, 8, 8)
    gn, _ = normkit.convert_norms(net, "ln2d")  # the same LN over C: already so, except eps kept
    torch.testing.assert_close(gn(x), net(x))
    ln_chw, rep = normkit.convert_norms(net, "ln")  # LN over (C, H, W): the affine is kept per channel
    assert all(c.kept == ("weight", "bias", "eps") for c in rep.converted)
    assert ln_chw.stem[1].over == "chw" and torch.equal(ln_chw.stem[1].weight, net.stem[1].weight)


def test_errors_name_the_layer_and_the_rule():
    net = _resnet(width=64, layers=(1, 1, 1, 1))
    with pytest.raises(
        normkit.NormError,
        match=r"'bn1' \(BatchNorm2d, 64 channels\) to 'gn:3'.*divisible by num_groups \(3\)",
    ):
        normkit.convert_norms(net, "gn:3")
    with pytest.raises(normkit.NormError, match="unknown norm spec 'groupnorm'"):
        normkit.convert_norms(net, "groupnorm")
    with pytest.raises(TypeError, match="expected an nn.Module"):
        normkit.convert_norms("resnet", "gn")
    with pytest.raises(TypeError, match="to must be a norm spec string"):
        normkit.convert_norms(net, nn.GroupNorm)
    gn_net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4))
    with pytest.raises(normkit.NormError, match="frozen_bn normalizes with running statistics"):
        normkit.convert_norms(gn_net, "frozen_bn")
    assert type(normkit.convert_norms(gn_net, "frozen_bn", transfer=False).model[1]) is FrozenBatchNorm2d


def test_transfer_false_builds_fresh_layers():
    net = _resnet()
    new, report = normkit.convert_norms(net, "bn", transfer=False)
    assert all(c.kept == () for c in report.converted)
    assert torch.equal(new.bn1.weight, torch.ones(8)) and torch.equal(new.bn1.running_var, torch.ones(8))


def test_a_single_norm_layer_and_a_model_without_norms():
    bn = randomize_norms(nn.BatchNorm2d(6))
    new, report = normkit.convert_norms(bn, "frozen_bn")
    assert type(new) is FrozenBatchNorm2d and report.converted[0].name == "<root>"
    x = torch.randn(2, 6, 3, 3)
    torch.testing.assert_close(new(x), bn.eval()(x))
    plain = nn.Sequential(nn.Conv2d(3, 3, 1))
    same, rep = normkit.convert_norms(plain, "gn")
    assert rep.converted == [] and same is not plain


# --- other libraries' layers (duck-typed: timm is not installed) ------------------------------------


def test_timm_and_torchvision_layers_are_recognized_without_importing_them():
    BNAct, LN2d, Frozen = timm_like()
    torch.manual_seed(0)
    net = randomize_norms(
        nn.Sequential(
            nn.Conv2d(3, 8, 3), BNAct(8, nn.SiLU), nn.Conv2d(8, 8, 1), LN2d(8), nn.Conv2d(8, 8, 1), Frozen(8)
        )
    ).eval()
    x = torch.randn(2, 3, 6, 6)
    to_bn, rep = normkit.convert_norms(net, "bn")
    assert [type(m).__name__ for m in to_bn][1::2] == ["BatchNormAct2d", "BatchNorm2d", "BatchNorm2d"]
    assert to_bn[1].activation == "silu"
    # LN over C -> BN: only the affine carries; so compare the BN-family layers only.
    torch.testing.assert_close(to_bn[1](x.new_ones(2, 8, 3, 3)), net[1](x.new_ones(2, 8, 3, 3)))
    f = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(to_bn.eval()[5](f), net[5](f), atol=1e-5, rtol=1e-5)
    to_ln2d, _ = normkit.convert_norms(net, "ln2d", where="3")
    torch.testing.assert_close(to_ln2d[3](f), net[3](f), atol=1e-5, rtol=1e-5)
    pn, rep = normkit.convert_norms(net, "ln+pn")
    assert isinstance(pn[1], GroupNormProxyAct2d) and pn[1].activation == "silu"
    assert rep.fused == [("1", "silu (in the layer)")]


def test_describe_norm_covers_the_layer_zoo():
    from normkit.nn._inspect import describe_norm

    kinds = {
        nn.BatchNorm2d(4): "bn",
        nn.SyncBatchNorm(4): "bn",
        BatchNorm3d(4): "bn",
        GhostBatchNorm2d(4): "bn",
        FrozenBatchNorm2d(4): "frozen_bn",
        nn.GroupNorm(2, 4): "gn",
        GroupNormAct2d(4, 2): "gn",
        LayerNorm2d(4): "ln2d",
        LayerNorm2d(4, over="chw"): "ln",
        nn.InstanceNorm1d(4): "in",
        GroupNormProxyAct2d(4): "pn",
        BatchNormAct2d(4): "bn",
    }
    for layer, kind in kinds.items():
        info = describe_norm(layer)
        assert not isinstance(info, str) and info.kind == kind and info.num_channels == 4, layer
    assert isinstance(describe_norm(nn.LazyBatchNorm2d()), str)
    assert describe_norm(nn.ReLU()) is None and describe_norm(normkit.nn.ProxyNormAct(4)).startswith(
        "ProxyNormAct is"
    )


def test_original_model_is_never_mutated():
    net = _resnet()
    before = _snapshot(net)
    modules = dict(net.named_modules())
    for spec in ("ln+pn", "gn", "frozen_bn"):
        normkit.convert_norms(net, spec)
    assert _same(before, _snapshot(net)) and dict(net.named_modules()) == modules
    assert isinstance(net.relu, nn.ReLU) and net.training


def test_report_table_is_readable():
    _, report = normkit.convert_norms(_resnet(), "ln+pn")
    text = report.table()
    assert text == str(report)
    first = text.splitlines()
    assert first[0].startswith(
        "convert_norms to 'ln+pn': 12 converted, 0 skipped, 5 norm+activation pairs fused"
    )
    assert first[1].split()[:5] == ["layer", "was", "now", "kept", "activation"]
    assert (
        "no activation fused (it is followed by call_function add that takes more than its output): "
        "layer1.0.bn2,"
        in text
        and "returned a torch.fx.GraphModule" in text
    )
    assert copy.deepcopy(report).converted == report.converted


def test_real_timm_models_convert_where_timm_imports():
    timm = pytest.importorskip(
        "timm",
        reason="timm is not installed here "
        "(it imports torchvision, whose wheel does not import next to the CPU torch)",
    )
    torch.manual_seed(0)
    for name in ("resnet18", "convnext_atto"):
        net = timm.create_model(name, pretrained=False, num_classes=5).eval()
        x = torch.randn(3, 3, 32, 32)
        gn, rep = normkit.convert_norms(net, "gn")
        assert rep.converted, name
        assert gn(x).shape == (3, 5)
        pn, _ = normkit.convert_norms(net, "ln+pn")
        pn.eval()
        torch.testing.assert_close(pn(x)[:1], pn(x[:1]), atol=1e-4, rtol=1e-4)  # no batch dependence


# --- what a same-family conversion keeps (found by an audit: momentum None, no affine, own forward) --------


@pytest.mark.parametrize("spec", ["bn", "gbn:2", "brn", "syncbn", "frozen_bn"])
def test_momentum_none_and_no_affine_survive_a_batch_norm_family_conversion(spec):
    """``momentum=None`` (the cumulative average) and ``affine=False`` carry over within the BN family:
    the original checkpoint loads with ``strict=True`` and no trainable affine appears."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None, affine=False))
    new, _ = normkit.convert_norms(net, spec)
    assert new[1].momentum is None
    assert [n for n, _ in new.named_parameters()] == ["0.weight", "0.bias"]
    new.load_state_dict(net.state_dict(), strict=True)


def test_an_instance_norm_without_affine_stays_so_and_loads_its_checkpoint():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4))
    new, _ = normkit.convert_norms(net, "in")
    assert not new[1].affine and [n for n, _ in new.named_parameters()] == ["0.weight", "0.bias"]
    new.load_state_dict(net.state_dict(), strict=True)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(new(x), net(x))


@pytest.mark.parametrize("base", [nn.BatchNorm2d, normkit.nn.BatchNorm2d])
def test_a_subclass_with_its_own_forward_is_skipped_by_convert_and_fold(base):
    """A user's subclass of torch.nn's or normkit's BatchNorm2d whose forward differs: neither converted
    nor folded (what it computes is unknown); the model's output is unchanged."""

    class ScaledBN(base):
        def forward(self, x):
            return 2 * super().forward(x)

    net = nn.Sequential(nn.Conv2d(3, 4, 3), ScaledBN(4)).eval()
    x = torch.randn(2, 3, 6, 6)
    new, report = normkit.convert_norms(net, "bn")
    assert report.skipped and "with its own forward" in report.skipped[0][2] and type(new[1]) is ScaledBN
    folded, diff, fold_report = normkit.fold_bn(net, x)
    torch.testing.assert_close(folded(x), net(x))
    assert type(folded[1]) is ScaledBN


# --- the source's flags: track_running_stats=False, affine=False; group norms on a Linear head ---------


@pytest.mark.parametrize("spec", ["bn", "gbn:2", "syncbn"])
def test_batch_statistics_in_eval_stay_so_between_batch_norms(spec):
    """A BN built with track_running_stats=False normalizes with batch statistics in eval too. Oracle: the
    torch.nn source model in eval; a converted layer with fresh running statistics gave another output."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    x = torch.randn(4, 3, 4, 4) * 3 + 2
    new, _ = normkit.convert_norms(net, spec)
    assert new[1].track_running_stats is False and new[1].running_mean is None
    with torch.no_grad():
        torch.testing.assert_close(new.eval()(x), net(x), atol=1e-5, rtol=1e-5)


def test_batch_renorm_refuses_a_layer_without_running_statistics():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(normkit.NormError, match=r"'1' \(BatchNorm2d.*'brn'.*track_running_stats=False"):
        normkit.convert_norms(net, "brn")
    new, _ = normkit.convert_norms(net, "brn", transfer=False)  # asked for a fresh one: it has its own
    assert isinstance(new[1], BatchRenorm2d) and new[1].track_running_stats


@pytest.mark.parametrize("spec, groups", [("gn:2", 2), ("ln", 1), ("ln2d", None), ("in", None)])
def test_a_norm_without_affine_gets_no_learnable_affine(spec, groups):
    """Oracle: torch.nn.functional's norm with weight=None, bias=None; the source's affine=False flag."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False), nn.ReLU())
    new, _ = normkit.convert_norms(net, spec)
    assert list(new[1].parameters()) == [] and new[1].weight is None and new[1].bias is None
    h = torch.randn(2, 4, 3, 3) * 2 + 1
    F = torch.nn.functional
    if groups is not None:
        want = F.group_norm(h, groups, None, None, 1e-5)
    elif spec == "in":
        want = F.instance_norm(h, eps=1e-5)
    else:  # per position over C
        want = F.layer_norm(h.permute(0, 2, 3, 1), (4,), eps=1e-5).permute(0, 3, 1, 2)
    torch.testing.assert_close(new[1](h), want, atol=1e-5, rtol=1e-5)


def test_a_norm_without_bias_gets_no_bias_and_proxy_norm_a_fixed_identity_affine():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), BatchNorm2d(4, bias=False), nn.ReLU())
    new, _ = normkit.convert_norms(net, "gn:2")
    assert new[1].bias is None and torch.equal(new[1].weight, net[1].weight)
    # Proxy Norm blocks always have weight and bias: fixed at 1 and 0, not trainable, and said so.
    plain = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False), nn.ReLU())
    new, report = normkit.convert_norms(plain, "ln+pn")
    pn = new[1]
    assert isinstance(pn, GroupNormProxyAct2d)
    assert not pn.weight.requires_grad and not pn.bias.requires_grad
    assert torch.equal(pn.weight, torch.ones(4)) and torch.equal(pn.bias, torch.zeros(4))
    assert "affine=False" in str(report)
    new, report = normkit.convert_norms(net, "ln+pn")
    assert new[1].weight.requires_grad and not new[1].bias.requires_grad and "bias=False" in str(report)


@pytest.mark.parametrize("spec", ["gn", "gn:6", "gn:6+pn"])
def test_a_group_norm_with_one_value_per_group_on_a_linear_head_is_refused_at_conversion(spec):
    """On the (N, C) output of a Linear, GroupNorm(6, 6) sees one value per group: refused at conversion
    time, as "in" refuses the same layer, not at the first forward."""
    head = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6))
    with pytest.raises(normkit.NormError, match="cannot convert '1'.*'in'.*Linear"):
        normkit.convert_norms(head, "in")  # the oracle for consistency
    with pytest.raises(normkit.NormError, match=r"cannot convert '1'.*Linear.*one value per group.*'gn:3'"):
        normkit.convert_norms(head, spec)
    new, _ = normkit.convert_norms(head, "gn:3")  # what the message suggests works
    x = torch.randn(4, 5)
    h = head[0](x)
    torch.testing.assert_close(new(x), torch.nn.functional.group_norm(h, 3, new[1].weight, new[1].bias))
