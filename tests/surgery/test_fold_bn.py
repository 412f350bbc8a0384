"""fold_bn / fold_bn_weights: the folded model equals the eval model for every layer kind, unsafe cases
refused (TESTING.md 32-33)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import normkit
from normkit.nn import (
    BatchNorm2d,
    BatchNormAct2d,
    BatchRenorm2d,
    FrozenBatchNorm2d,
    GhostBatchNorm2d,
)
from normkit.surgery import fold_bn_weights
from tests.reference import ref_batch_norm
from tests.surgery.models import MobileNetish, TVResNet, randomize_norms, timm_like

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SIZE = {1: 9, 2: 7, 3: 5}


def _pair(layer: nn.Module, bn: nn.Module, dtype: torch.dtype, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return randomize_norms(nn.Sequential(layer, bn), seed).to(dtype).eval()


def _assert_folds(net: nn.Sequential, x: torch.Tensor, tol: float) -> nn.Module:
    folded, diff, report = normkit.fold_bn(net, x)
    assert len(report.folded) == 1 and isinstance(folded[1], nn.Identity), report
    x2 = torch.randn_like(x)
    with torch.no_grad():  # the oracle: the unfolded eval model on another input
        want, got = net(x2), folded(x2)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert diff <= tol * max(1.0, float(want.abs().max()))
    assert isinstance(net[1], (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))  # the original is untouched
    return folded


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_every_conv_kind_groups_bias_and_affine(rank, transposed, dtype):
    c_in, c_out = 4, 6
    for groups, bias, affine in itertools.product(("1", "2", "depthwise"), (True, False), (True, False)):
        g = {"1": 1, "2": 2, "depthwise": c_in}[groups]
        out = c_in if groups == "depthwise" else c_out
        cls = CONV_T[rank] if transposed else CONV[rank]
        kw = {"stride": 2, "padding": 1, "output_padding": 1} if transposed else {"padding": 1, "dilation": 1}
        layer = cls(c_in, out, 3, groups=g, bias=bias, **kw)
        net = _pair(layer, BN[rank](out, affine=affine), dtype)
        x = torch.randn(3, c_in, *(SIZE[rank],) * rank, dtype=dtype)
        folded = _assert_folds(net, x, TOL[dtype])
        assert folded[0].bias is not None and folded[0].weight.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias, affine", [(True, True), (False, True), (True, False), (False, False)])
def test_linear(bias, affine, dtype):
    net = _pair(nn.Linear(5, 7, bias=bias), nn.BatchNorm1d(7, affine=affine), dtype)
    _assert_folds(net, torch.randn(8, 5, dtype=dtype), TOL[dtype])


def _explicit_fold(weight, bias, rm, rv, eps, gamma, beta, groups):
    """A float64 oracle written with loops: ConvTranspose weight[i, j] feeds output channel
    (i // (C_in/groups)) * (C_out/groups) + j."""
    w = weight.double().clone()
    c_in, per = w.shape[0], w.shape[1]
    c_out = per * groups
    s = [float(gamma[o]) / (float(rv[o]) + eps) ** 0.5 for o in range(c_out)]
    for i in range(c_in):
        for j in range(per):
            o = (i // (c_in // groups)) * per + j
            w[i, j] *= s[o]
    b = torch.tensor(
        [(float(bias[o]) - float(rm[o])) * s[o] + float(beta[o]) for o in range(c_out)], dtype=torch.float64
    )
    return w, b


def test_fold_bn_weights_against_an_explicit_oracle_for_grouped_conv_transpose():
    torch.manual_seed(0)
    weight, bias = (  # groups 2
        torch.randn(6, 4, 3, 3, dtype=torch.float64),
        torch.randn(8, dtype=torch.float64),
    )
    rm, rv = torch.randn(8, dtype=torch.float64), torch.rand(8, dtype=torch.float64) + 0.5
    gamma, beta = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    w, b = fold_bn_weights(weight, bias, rm, rv, 1e-3, gamma, beta, transpose=True, groups=2)
    ew, eb = _explicit_fold(weight, bias, rm, rv, 1e-3, gamma, beta, 2)
    torch.testing.assert_close(w, ew, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(b, eb, atol=1e-12, rtol=1e-12)
    # A plain conv scales along dim 0: s[o] * W[o].
    w2, b2 = fold_bn_weights(weight, None, rm[:6], rv[:6], 1e-3)
    torch.testing.assert_close(w2, weight * (rv[:6] + 1e-3).rsqrt().view(6, 1, 1, 1))
    torch.testing.assert_close(b2, -rm[:6] * (rv[:6] + 1e-3).rsqrt())


def test_fold_bn_weights_keeps_channels_last_and_rejects_bad_shapes():
    conv, bn = nn.Conv2d(3, 8, 3), randomize_norms(nn.BatchNorm2d(8))
    w_cl = conv.weight.detach().to(memory_format=torch.channels_last)
    w, _ = fold_bn_weights(w_cl, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    with pytest.raises(
        normkit.NormError, match=r"running_mean has 7 values but the layer has 8 output channels"
    ):
        fold_bn_weights(conv.weight, None, torch.zeros(7), torch.ones(8), 1e-5)
    with pytest.raises(normkit.NormError, match="divisible by groups"):
        fold_bn_weights(
            torch.zeros(6, 2, 3), None, torch.zeros(6), torch.ones(6), 1e-5, transpose=True, groups=4
        )
    with pytest.raises(TypeError, match="weight must be a Tensor"):
        fold_bn_weights([1.0], None, torch.zeros(1), torch.ones(1), 1e-5)


def test_channels_last_model_folds():
    net = _pair(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), torch.float32).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    folded = _assert_folds(net, x, 1e-5)
    assert folded[0].weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "make",
    [
        lambda: BatchNorm2d(6),
        lambda: GhostBatchNorm2d(6, ghost_batch_size=2),
        lambda: BatchRenorm2d(6),
        lambda: FrozenBatchNorm2d(6),
        lambda: nn.SyncBatchNorm(6),
        lambda: BatchNorm2d(6, bias=False),
        lambda: timm_like()[0](6, nn.Identity),
        lambda: timm_like()[2](6),  # timm's BatchNormAct2d, torchvision's frozen BN
    ],
)
def test_normkit_bn_family_folds(make):
    net = _pair(nn.Conv2d(3, 6, 3, bias=False), make(), torch.float32)
    folded, diff, report = normkit.fold_bn(net, torch.randn(4, 3, 7, 7))
    assert [f.norm for f in report.folded] == ["1"] and isinstance(folded[1], nn.Identity)
    assert diff < 1e-5


def test_timm_norm_act_layer_leaves_its_activation_module():
    net = _pair(nn.Conv2d(3, 6, 3), timm_like()[0](6, nn.ReLU), torch.float32)
    x = torch.randn(4, 3, 7, 7)
    folded, diff, _ = normkit.fold_bn(net, x)
    assert type(folded[1]) is nn.ReLU and diff < 1e-5 and net[1].act is not folded[1]


def test_norm_act_layer_leaves_its_activation():
    net = _pair(nn.Conv2d(3, 6, 3), BatchNormAct2d(6, activation="silu"), torch.float32)
    x = torch.randn(4, 3, 7, 7)
    folded, diff, report = normkit.fold_bn(net, x)
    assert report.folded[0].replaced_by == "_Act" and diff < 1e-5
    bn = net[1]
    with torch.no_grad():  # float64 oracle: silu(BN_eval(conv(x)))
        want = nn.functional.silu(
            ref_batch_norm(net[0](x), bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps).output
        )
        torch.testing.assert_close(folded(x).double(), want, atol=1e-5, rtol=1e-5)


# --- whole models ---------------------------------------------------------------------------------


def test_torchvision_resnet_folds_every_bn():
    torch.manual_seed(0)
    net = randomize_norms(TVResNet(width=8, small_stem=False)).eval()
    folded, diff, report = normkit.fold_bn(net)  # probe made from conv1: (2, 3, 32, 32)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert len(report.folded) == n_bn == 20 and report.skipped == []
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(3, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), atol=1e-5, rtol=1e-5)
    assert diff < 1e-5 and type(folded) is TVResNet


def test_mobilenet_depthwise_and_grouped_convs_fold():
    torch.manual_seed(0)
    net = randomize_norms(MobileNetish()).eval()
    _folded, diff, report = normkit.fold_bn(net, torch.randn(2, 3, 12, 12))
    assert len(report.folded) == 11 and diff < 1e-5
    depthwise = net.features[1].conv[1][0]
    assert depthwise.groups == depthwise.in_channels and "features.1.conv.1.1" in {
        f.norm for f in report.folded
    }


def test_cnn4_with_a_bn_head_then_proxy_norm_folds():
    from normkit.lab.models import CNN4

    torch.manual_seed(0)
    bn_net = randomize_norms(CNN4("bn", head=True)).eval()
    _folded, diff, report = normkit.fold_bn(bn_net)  # the head's BN sees Linear's (N, C) as (N, C, 1, 1)
    assert [f.into for f in report.folded][-1] == "head.0" and len(report.folded) == 5 and diff < 1e-5
    # CNN-4 with LN + PN in the body and a BN head: fold the BN, then the Proxy Norm layers.
    torch.manual_seed(1)
    net = randomize_norms(CNN4("ln+pn", head=True, head_norm="bn")).eval()
    x = torch.randn(6, 1, 8, 8)
    bn_folded, diff, report = normkit.fold_bn(net, x)
    assert [f.norm for f in report.folded] == ["head.1.layer"] and diff < 1e-5
    both = normkit.fold_proxy_norm(bn_folded, x)
    assert sum(type(m).__name__ == "FoldedProxyAct" for m in both.modules()) == 4
    with torch.no_grad():
        torch.testing.assert_close(both(x), net(x), atol=1e-5, rtol=1e-5)


def test_bn_that_does_not_follow_a_conv_is_left_with_the_reason():
    from normkit.lab.models import PreActResNet

    net = randomize_norms(PreActResNet("bn")).eval()  # pre-activation: BN after the residual addition
    _, diff, report = normkit.fold_bn(net, torch.randn(2, 1, 8, 8))
    reasons = dict(report.skipped)
    assert reasons["blocks.1.na1"] == "its input comes from call_function add, not from a conv/linear layer"
    assert reasons["blocks.0.na1"] == "the output of 'stem' also feeds 1 other node(s)"  # the skip connection
    assert "blocks.0.na2" in {f.norm for f in report.folded} and diff < 1e-5
    # Linear on (N, L, F): BatchNorm1d(L) normalizes dim 1, not the Linear's features.
    seq = _pair(nn.Linear(5, 4), nn.BatchNorm1d(3), torch.float32)
    _, diff, report = normkit.fold_bn(seq, torch.randn(2, 3, 5))
    assert report.folded == [] and "not dim 1" in report.skipped[0][1] and diff == 0.0

    # A conv whose output also feeds something else.
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            h = self.conv(x)
            return self.bn(h) + h

    _folded, _, report = normkit.fold_bn(Two().eval())
    assert "also feeds 1 other node" in report.skipped[0][1]


def test_untraceable_model_falls_back_to_sequential_adjacency():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, x):
            return self.body(x) if x.sum() > -1e9 else x

    net = randomize_norms(Branchy()).eval()
    _folded, diff, report = normkit.fold_bn(net)
    assert report.method.startswith("nn.Sequential adjacency") and len(report.folded) == 1 and diff < 1e-5
    assert "folded  body.1 -> body.0" in str(report)


def test_probe_input_from_the_first_layer():
    for net in (
        nn.Sequential(nn.Conv1d(2, 3, 5), nn.BatchNorm1d(3)),
        nn.Sequential(nn.Conv3d(2, 3, 3), nn.BatchNorm3d(3)),
        nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)),
        nn.Sequential(nn.ConvTranspose2d(2, 3, 3), nn.BatchNorm2d(3)),
    ):
        _folded, diff, _ = normkit.fold_bn(randomize_norms(net).eval())
        assert diff < 1e-5
    with pytest.raises(normkit.NormError, match="pass example_input"):
        normkit.fold_bn(nn.Sequential(nn.Embedding(5, 3), nn.BatchNorm1d(3)).eval())
    with pytest.raises(normkit.NormError, match="failed on the example input of shape"):
        normkit.fold_bn(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).eval(), torch.randn(2, 4, 5, 5))


# --- refusals --------------------------------------------------------------------------------------


def test_refuses_train_mode_and_missing_running_statistics():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), BatchNorm2d(4))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(normkit.NormError, match=r"'1' \(BatchNorm2d\) is in training mode.*model.eval\(\)"):
        normkit.fold_bn(net)
    net.eval()
    net[4].track_running_stats = False  # flipped after construction: eval uses batch statistics
    with pytest.raises(normkit.NormError, match=r"'4' \(BatchNorm2d\) has no running statistics"):
        normkit.fold_bn(net)
    no_stats = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    with pytest.raises(normkit.NormError, match="has no running statistics"):
        normkit.fold_bn(no_stats)
    frozen = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4, use_running_stats=False))
    with pytest.raises(normkit.NormError, match="use_running_stats=False"):
        normkit.fold_bn(frozen)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert type(net[1]) is nn.BatchNorm2d  # nothing was changed
    with pytest.raises(TypeError, match="expected an nn.Module"):
        normkit.fold_bn(torch.zeros(3))


def test_shared_layers_are_not_folded():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn1(self.conv(x)) + self.bn2(self.conv(x))

    _folded, diff, report = normkit.fold_bn(randomize_norms(Shared()).eval())
    assert report.folded == [] and all("called 2 times" in why for _, why in report.skipped) and diff == 0.0


def test_the_comparison_runs_in_eval_and_flags_are_kept():
    net = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.9)))
    net[1].eval()  # BN in eval, dropout still in training
    folded, diff, _ = normkit.fold_bn(net)
    assert diff < 1e-5  # dropout was off for the comparison
    assert net[2].training and folded[2].training and not net[1].training and net.training


class _MaskedBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 1)
        self.bn = normkit.nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x), mask)


def test_bn_called_with_a_mask_is_left_with_the_reason():
    """Oracle: the original model on (x, mask); an Identity in the BN's place could not take the mask."""
    net = randomize_norms(_MaskedBN()).eval()
    x = torch.randn(2, 3, 6)
    mask = torch.ones(2, 1, 6, dtype=torch.bool)
    mask[..., 4:] = False
    folded, diff, report = normkit.fold_bn(net, (x, mask))
    assert report.folded == [] and report.skipped == [("bn", "it is called with extra arguments")]
    with torch.no_grad():
        torch.testing.assert_close(folded(x, mask), net(x, mask))
    assert diff == 0.0


def test_old_hook_based_weight_norm_conv_is_left_as_reparametrized():
    """torch.nn.utils.weight_norm (hooks) makes the weight a non-leaf tensor that deepcopy refuses;
    oracle: the original model's output."""
    with pytest.warns(FutureWarning):
        conv = nn.utils.weight_norm(nn.Conv2d(3, 4, 3))
    net = randomize_norms(nn.Sequential(conv, nn.BatchNorm2d(4))).eval()
    x = torch.randn(2, 3, 6, 6)
    folded, diff, report = normkit.fold_bn(net, x)
    assert report.folded == [] and [n for n, _ in report.skipped] == ["1"]
    assert "reparametrized" in report.skipped[0][1]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x))


def test_lazy_and_scripted_models_are_refused():
    """Uninitialized lazy layers and TorchScript modules: typed errors, not torch's or a silent no-op."""
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(normkit.NormError, match=r"layer '1' \(LazyBatchNorm2d\).*forward pass"):
        normkit.fold_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d()).eval(), x)
    with pytest.raises(normkit.NormError, match=r"layer '0' \(LazyConv2d\)"):
        normkit.fold_bn(nn.Sequential(nn.LazyConv2d(4, 3), nn.BatchNorm2d(4)).eval(), x)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    for scripted in (torch.jit.script(net), torch.jit.trace(net, x)):
        with pytest.raises(TypeError, match="scripted modules .* not supported; pass the eager"):
            normkit.fold_bn(scripted, x)


def test_bad_example_input_prints_nothing(capfd):
    """fx's ShapeProp prints a traceback before raising; only fold_bn's NormError must come out."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(normkit.NormError, match="failed on the example input of shape"):
        normkit.fold_bn(net, torch.randn(2, 5, 6, 6))
    assert capfd.readouterr().err == ""


def test_a_fold_by_sequential_adjacency_that_is_not_exact_warns():
    """torch.fx cannot trace this model and its forward calls the nn.Sequential's children one by one (the
    conv's output also feeds an addition): the adjacency fold is wrong, and fold_bn says so, with the
    difference it measured against the original model."""

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, x):
            if x.sum() > -1e9:  # (data-dependent: fx cannot trace it)
                y = self.block[0](x)
                return self.block[2](self.block[1](y) + y)
            return x

    torch.manual_seed(0)
    net = Untraceable().eval()
    with torch.no_grad():
        net.block[1].running_mean.uniform_(-1, 1)
        net.block[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(UserWarning, match="a fold was not exact .*nn.Sequential adjacency"):
        folded, diff, _ = normkit.fold_bn(net, x)
    with torch.no_grad():
        assert diff == pytest.approx((folded(x) - net(x)).abs().max().item()) and diff > 1e-3


# --- Linear folds without an example input; the probe's failure ---------------------------------------


def test_a_linear_on_the_models_own_input_is_folded_only_with_an_example_input():
    """Linear(5, 4) -> BatchNorm1d(4) used on (N, L=4, F=5): the BN normalizes L, not the Linear's outputs.
    The generated probe is 2-D and cannot show it, so without example_input the pair is left (it used to
    fold and report success). Oracle: the unfolded eval model, eagerly, on each input."""
    net = _pair(nn.Linear(5, 4), nn.BatchNorm1d(4), torch.float32)
    x3 = torch.randn(3, 4, 5)
    folded, _, report = normkit.fold_bn(net)
    assert report.folded == [] and "pass example_input" in report.skipped[0][1], report
    with torch.no_grad():
        torch.testing.assert_close(folded(x3), net(x3))
    _, _, report = normkit.fold_bn(net, x3)  # the real input: refused, as before
    assert report.folded == [] and "not dim 1" in report.skipped[0][1]
    folded, _, report = normkit.fold_bn(net, torch.randn(6, 5))  # a real (N, F) batch: folded
    assert len(report.folded) == 1
    x = torch.randn(7, 5)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), atol=1e-5, rtol=1e-5)


def test_an_untraceable_linear_pair_is_folded_only_with_an_example_input():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))

        def forward(self, x):
            return self.body(x) if x.sum() > -1e9 else x

    torch.manual_seed(0)
    net = randomize_norms(Branchy()).eval()
    folded, _, report = normkit.fold_bn(net)
    assert report.method.startswith("nn.Sequential adjacency") and report.folded == []
    assert "pass example_input" in report.skipped[0][1]
    x3 = torch.randn(3, 4, 5)
    with torch.no_grad():
        torch.testing.assert_close(folded(x3), net(x3))
    _, diff, report = normkit.fold_bn(net, torch.randn(6, 5))
    assert len(report.folded) == 1 and diff < 1e-5


class _PoolViewHead(nn.Module):
    """conv -> BN -> global pool -> ``h.view(h.size(0), -1)`` -> Linear -> BN: the Linear's input is 2-D."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.pool, self.fc, self.bn_fc = nn.AdaptiveAvgPool2d(1), nn.Linear(4, 6), nn.BatchNorm1d(6)

    def forward(self, x):
        h = self.pool(self.bn(self.conv(x)))
        return self.bn_fc(self.fc(h.view(h.size(0), -1)))


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 6),
            nn.BatchNorm1d(6),
        ),
        _PoolViewHead,
    ],
)
def test_a_linear_whose_input_the_graph_proves_2d_still_folds_without_an_example(make):
    """After Flatten (or a view to (N, -1)) the Linear's input is (N, features) whatever the model is
    given: folded with the generated probe. Oracle: the unfolded eval model on another input."""
    torch.manual_seed(0)
    net = randomize_norms(make()).eval()
    folded, _, report = normkit.fold_bn(net)
    assert len(report.folded) == 2 and report.skipped == [], report
    x = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), atol=1e-5, rtol=1e-5)


def test_a_probe_the_model_rejects_names_the_layer_and_its_error():
    """A model sized for 8x8 inputs fails on the 32x32 probe: the message gives the layer and torch's own
    error (oracle: the eager model on the probe's shape), not fx's ShapeProp wrapper, and the fix."""
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
    ).eval()
    with pytest.raises(RuntimeError) as eager:
        net(torch.randn(2, 1, 32, 32))
    with pytest.raises(normkit.NormError) as err:
        normkit.fold_bn(net)
    msg = str(err.value)
    assert "probe input of shape (2, 1, 32, 32) in layer '4' (Linear)" in msg
    assert str(eager.value).splitlines()[0] in msg and "ShapeProp" not in msg
    assert "pass example_input" in msg
    _, diff, report = normkit.fold_bn(net, torch.randn(2, 1, 8, 8))  # what the message asks for works
    assert len(report.folded) == 1 and diff < 1e-5
