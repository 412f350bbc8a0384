"""Surgery paths the rest of the suite leaves out: the reasons fold_bn leaves a BN, fold_bn_weights'
argument errors, to_torch_nn's notes, freeze_bn on shared blocks and a copy.

Found by measuring coverage. Oracles: the original model's eval output (a fold or conversion must
not change it), closed-form reasons and the documented error types and messages.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import normkit
from normkit import NormError

S = normkit.surgery
F64 = torch.float64


def _stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters for every BN of ``model``; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                C = m.num_features
                m.running_mean.copy_(torch.randn(C, generator=g))
                m.running_var.copy_(torch.rand(C, generator=g) + 0.5)
                m.weight.copy_(torch.rand(C, generator=g) + 0.5)
                m.bias.copy_(torch.randn(C, generator=g))
    return model.eval()


class _CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.bn(x)


class _Keyword(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), normkit.nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(input=self.conv(x))


class _PlainTensorWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        w = self.conv.weight.detach().clone()
        del self.conv.weight
        self.conv.weight = w  # a plain tensor attribute, not a Parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class _Aliased(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.same_bn = self.bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (_CalledTwice, "it is called 2 times"),
        (_Keyword, "it is called with a keyword argument (input=...)"),
        (_PlainTensorWeight, "its weight is not a Parameter"),
        (_Aliased, "the same BN module is reachable by several paths"),
    ],
    ids=["called-twice", "keyword", "weight-not-parameter", "aliased"],
)
def test_fold_bn_leaves_a_bn_it_cannot_fold_and_says_why(make: Callable[[], nn.Module], why: str) -> None:
    model = _stats(make())
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
    out = S.fold_bn(model, x)
    assert out.report.folded == [] and out.report.skipped == [("bn", why)]
    with torch.no_grad():
        torch.testing.assert_close(out.model(x), want, rtol=0, atol=0)


def test_fold_bn_of_a_norm_act_layer_leaves_its_activation() -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 1), normkit.nn.BatchNormAct2d(3, activation="relu"))
    _stats(model)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        bn = model[1]
        want = torch.relu(
            nn.functional.batch_norm(
                model[0](x), bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=1e-5
            )
        )
    out = S.fold_bn(model, x)
    assert [(f.norm, f.into) for f in out.report.folded] == [("1", "0")]
    assert repr(out.model[1]) == "_Act(relu)"
    with torch.no_grad():
        torch.testing.assert_close(out.model(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        (dict(weight=torch.ones(3)), "weight must have at least 2 dims (out, in, ...), got shape (3,)"),
        (dict(groups=0), "groups must be a positive int, got 0"),
        (dict(groups=True), "groups must be a positive int, got True"),
    ],
    ids=["weight-1d", "groups-0", "groups-bool"],
)
def test_fold_bn_weights_argument_errors(kwargs: dict[str, Any], words: str) -> None:
    args: dict[str, Any] = dict(
        weight=torch.ones(3, 2, 1, 1),
        bias=None,
        running_mean=torch.zeros(3),
        running_var=torch.ones(3),
        eps=1e-5,
    )
    args.update(kwargs)
    with pytest.raises(NormError) as e:
        S.fold_bn_weights(**args)
    assert words in str(e.value)


class _Double(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


def test_to_torch_nn_notes_what_torch_lacks_and_skips_a_parametrized_layer() -> None:
    model = nn.Sequential(
        normkit.nn.BatchNorm2d(3, unbiased_running_var=False),
        normkit.nn.InstanceNorm2d(3, track_running_stats=True, momentum=None),
        normkit.nn.GroupNorm(1, 3),
    )
    parametrize.register_parametrization(model[2], "weight", _Double())
    _stats(model)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(x)
    out = S.to_torch_nn(model)
    dropped = {c.name: c.dropped for c in out.report.converted}
    assert "unbiased_running_var=False (torch.nn stores the unbiased variance)" in dropped["0"]
    assert "momentum=None's cumulative average (torch.nn's InstanceNorm takes it as 0)" in dropped["1"]
    assert [(n, why.split(",")[0]) for n, _, why in out.report.skipped] == [
        ("2", "its weight is parametrized (torch.nn.utils.parametrize)")
    ]
    assert type(out.model[0]) is nn.BatchNorm2d and type(out.model[1]) is nn.InstanceNorm2d
    with torch.no_grad():
        torch.testing.assert_close(out.model(x), want, rtol=1e-6, atol=1e-6)  # eval computes the same


def test_freeze_bn_copy_with_a_shared_block_and_an_empty_slot() -> None:
    block = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    net = nn.Sequential(block)
    net.add_module("again", block)  # the same block under a second name
    net.add_module("empty", None)
    _stats(net)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = block(block(x)[:, :3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frozen = S.freeze_bn(net, inplace=False)
    assert type(block[1]) is nn.BatchNorm1d  # the caller's model is untouched
    assert frozen[0] is frozen.again and frozen.empty is None
    assert type(frozen[0][1]).__name__ == "FrozenBatchNorm1d"
    frozen.train()  # frozen: running statistics even in training
    with torch.no_grad():
        torch.testing.assert_close(frozen.again(frozen[0](x)[:, :3]), want, rtol=1e-6, atol=1e-6)


# --- convert_norms --------------------------------------------------------------------------------------


def _conv_bn_relu() -> nn.Module:
    return _stats(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()))


def test_convert_norms_transfer_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="convert_norms: transfer must be a bool, got str"):
        S.convert_norms(_conv_bn_relu(), "gn", transfer="yes")  # type: ignore[arg-type]


def test_convert_norms_to_none_removes_the_norm() -> None:
    model = _conv_bn_relu()
    out = S.convert_norms(model, "none")
    assert type(out.model[1]) is nn.Identity
    (layer,) = out.report.converted
    assert layer.name == "1" and "running statistics (Identity has none)" in layer.dropped
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(out.model(x), torch.relu(model[0](x)), rtol=0, atol=0)


class _Spare(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.spare, self.act = (
            nn.Conv2d(3, 4, 1),
            nn.BatchNorm2d(4),
            nn.BatchNorm2d(4),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class _NormTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.bn(self.conv(x))))


class _MethodRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).relu()


def test_convert_norms_to_proxy_norm_says_which_norms_kept_no_activation() -> None:
    spare = S.convert_norms(_Spare(), "ln+pn")
    assert type(spare.model.bn).__name__ == "GroupNormProxyAct2d"
    assert type(spare.model.spare).__name__ == "LayerNorm2d"  # no activation after it: the plain norm
    assert ("spare", "it is never called in the traced forward") in spare.report.unfused
    twice = S.convert_norms(_NormTwice(), "ln+pn")
    assert type(twice.model.bn).__name__ == "LayerNorm2d"
    assert ("bn", "it is called 2 times") in twice.report.unfused


def test_convert_norms_takes_a_tensor_method_activation_into_the_block() -> None:
    out = S.convert_norms(_MethodRelu(), "ln+pn")
    assert out.report.fused == [("bn", "relu (method)")]
    assert isinstance(out.model, torch.fx.GraphModule)
    assert not any(n.op == "call_method" and n.target == "relu" for n in out.model.graph.nodes)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(out.model(x), out.model.bn(out.model.conv(x)), rtol=0, atol=0)


@pytest.mark.parametrize("spec", ["ln", "ln2d"])
def test_convert_norms_of_a_norm_act_layer_to_layer_norm_keeps_the_activation(spec: str) -> None:
    src = normkit.nn.BatchNormAct2d(4, activation="relu")
    with torch.no_grad():
        src.weight.copy_(torch.tensor([1.5, 0.5, 2.0, 1.0]))
        src.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    out = S.convert_norms(nn.Sequential(src), spec)
    layer = out.model[0]
    assert type(layer).__name__ == "LayerNormAct2d"
    x = torch.randn(2, 4, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(7))
    w, b = src.weight.detach().to(F64), src.bias.detach().to(F64)
    dims = (1, 2, 3) if spec == "ln" else (1,)  # over (C, H, W), or over C at each position
    mu = x.mean(dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dims, keepdim=True)
    want = torch.relu((x - mu) / torch.sqrt(var + 1e-5) * w.view(1, 4, 1, 1) + b.view(1, 4, 1, 1))
    with torch.no_grad():
        torch.testing.assert_close(layer.double()(x), want, rtol=1e-10, atol=1e-10)


def test_convert_norms_instance_norm_keeps_its_running_statistics() -> None:
    src = nn.InstanceNorm2d(4, track_running_stats=True)
    with torch.no_grad():
        src.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.4]))
        src.running_var.copy_(torch.tensor([1.5, 0.5, 2.0, 1.0]))
        src.num_batches_tracked.fill_(3)
    out = S.convert_norms(nn.Sequential(src).eval(), "in")
    layer = out.model[0]
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(layer, key), getattr(src, key), rtol=0, atol=0)
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), src(x), rtol=1e-6, atol=1e-6)  # eval: the running statistics


# --- timm's layers, recognized by name and module (timm is not needed) ----------------------------------


def _timm_class(name: str, base: type[nn.Module], forward: Any = None) -> type[nn.Module]:
    body = {} if forward is None else {"forward": forward}
    cls = type(name, (base,), body)
    cls.__module__ = "timm.layers.norm_act"
    return cls


def _bn_act_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    return self.act(self.drop(nn.BatchNorm2d.forward(self, x)))


def _gn_act_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    return self.act(self.drop(nn.GroupNorm.forward(self, x)))


def _with(m: nn.Module, drop: nn.Module | None = None, act: nn.Module | None = None) -> nn.Module:
    m.drop = drop if drop is not None else nn.Identity()
    m.act = act if act is not None else nn.ReLU()
    return m


def test_convert_norms_timm_layers_it_cannot_take_are_skipped_with_why() -> None:
    bn_act = _timm_class("BatchNormAct2d", nn.BatchNorm2d, _bn_act_forward)
    gn_act = _timm_class("GroupNormAct", nn.GroupNorm, _gn_act_forward)
    gn1_act = _timm_class("GroupNorm1Act", nn.GroupNorm, _gn_act_forward)
    model = nn.Sequential()
    model.add_module("a", _with(bn_act(4), drop=nn.AlphaDropout(0.1)))
    model.add_module("b", _with(gn_act(2, 4), act=nn.PReLU(4)))
    model.add_module("c", _with(gn1_act(1, 4)))
    model.add_module("d", _timm_class("LayerNorm2d", nn.LayerNorm)((4, 3)))
    model.add_module("e", _timm_class("FrozenBatchNorm2d", nn.Module)())
    with torch.no_grad():
        model.c.weight.copy_(torch.tensor([1.5, 0.5, 2.0, 1.0]))
        model.c.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    out = S.convert_norms(model, "gn:2")
    assert out.report.skipped == [
        ("a", "BatchNormAct2d", "its drop layer AlphaDropout sits between the norm and the activation"),
        ("b", "GroupNormAct", "its activation PReLU is not an elementwise activation normkit knows"),
        ("d", "LayerNorm2d", "LayerNorm2d with normalized_shape (4, 3) (expected one channel dim)"),
        ("e", "FrozenBatchNorm2d", "FrozenBatchNorm2d without weight/bias/running_mean/running_var tensors"),
    ]
    layer = out.model.c  # timm's GroupNorm1Act: one group and a ReLU, now two groups with the ReLU
    assert type(layer).__name__ == "GroupNormAct2d" and layer.num_groups == 2
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(9))
    want = torch.relu(nn.functional.group_norm(x, 2, model.c.weight, model.c.bias, model.c.eps))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)
