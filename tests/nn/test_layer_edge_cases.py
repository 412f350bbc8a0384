"""Layer paths the rest of the suite leaves out: fx tracing of every layer kind inside a model, reprs,
a layer whose running statistics were switched off after construction, and argument errors.

Found by measuring coverage. Oracles: torch.nn's layers and functional ops, closed forms written
here, and the documented error types and messages.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import normkit
from normkit import NormError

N = normkit.nn
TF = torch.nn.functional
F64 = torch.float64

LAYERS: dict[str, Callable[[], nn.Module]] = {
    "GhostBatchNorm2d": lambda: N.GhostBatchNorm2d(6, ghost_batch_size=2),
    "BatchRenorm2d": lambda: N.BatchRenorm2d(6),
    "FrozenBatchNorm2d": lambda: N.FrozenBatchNorm2d(6),
    "MeanOnlyBatchNorm": lambda: N.MeanOnlyBatchNorm(6),
    "InstanceNorm2d": lambda: N.InstanceNorm2d(6, affine=True),
    "LayerNorm2d": lambda: N.LayerNorm2d(6),
    "BatchNormAct2d": lambda: N.BatchNormAct2d(6),
    "GroupNormAct2d": lambda: N.GroupNormAct2d(6, num_groups=2),
    "LayerNormAct2d": lambda: N.LayerNormAct2d(6),
    "InstanceNormAct2d": lambda: N.InstanceNormAct2d(6),
    "GhostBatchNormAct2d": lambda: N.GhostBatchNormAct2d(6, ghost_batch_size=2),
    "BatchRenormAct2d": lambda: N.BatchRenormAct2d(6),
    "ProxyNormAct": lambda: N.ProxyNormAct(6),
    "GroupNormProxyAct2d": lambda: N.GroupNormProxyAct2d(6),
    "StdConv2d": lambda: N.StdConv2d(6, 6, 3),
    "norm-act-with-a-function-activation": lambda: N.create_norm_act_layer("gn:2", 6, activation=torch.tanh),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_fx_trace_inside_a_model_keeps_each_layer_one_call(name: str, training: bool) -> None:
    torch.manual_seed(0)
    layer = LAYERS[name]().train(training)
    twin = copy.deepcopy(layer)
    gm = torch.fx.symbolic_trace(nn.Sequential(layer))
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    if isinstance(layer, nn.Sequential):  # (a norm and a function activation as its own module)
        assert [n.target for n in calls] == [f"0.{k}" for k in layer._modules]
    else:
        assert [n.target for n in calls] == ["0"] and gm.get_submodule("0") is layer
    x = torch.randn(4, 6, 5, 5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(gm(x), twin(x), rtol=0, atol=0)  # the layer itself runs, with its mode


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: N.MeanOnlyBatchNorm(6, momentum=0.2, bias=False), "6, momentum=0.2, bias=False"),
        (lambda: N.LayerNormAct2d(6, activation="silu"), "activation=silu"),
        (lambda: N.ProxyNormAct(6, activation="tanh", eps=0.05), "6, activation=tanh, eps=0.05"),
        (lambda: N.ScaledStdConv2d(6, 6, 3, gamma=1.7), "gamma=1.7"),
        (lambda: N.weight_standardization(nn.Conv2d(6, 6, 3)), "WeightStandardization(eps="),
        (lambda: N.weight_norm(nn.Linear(3, 4), dim=1), "WeightNorm(dim=1)"),
    ],
    ids=["mean-only", "ln-act", "proxy", "scaled-std-conv", "weight-standardization", "weight-norm"],
)
def test_repr_shows_the_arguments(make: Callable[[], nn.Module], words: str) -> None:
    assert words in repr(make())


def test_mean_only_batch_norm_rejects_an_input_without_channels() -> None:
    with pytest.raises(
        NormError, match=r"MeanOnlyBatchNorm: expected an \(N, C, \*\) input, got shape \(4,\)"
    ):
        N.MeanOnlyBatchNorm(4)(torch.randn(4))


@pytest.mark.parametrize("cls", [N.BatchRenorm2d, N.BatchRenormAct2d])
def test_batch_renorm_with_tracking_switched_off_is_batch_norm(cls: type[nn.Module]) -> None:
    layer = cls(3).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        layer.running_mean.fill_(7.0)
    layer.track_running_stats = False  # (torch.nn's idiom: the buffers stay, batch statistics are used)
    x = torch.randn(5, 3, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(2)) * 3 + 1
    for mode in (True, False):
        layer.train(mode)
        want = TF.batch_norm(x, None, None, layer.weight, layer.bias, training=True, eps=layer.eps)
        if isinstance(layer, N.BatchRenormAct2d):
            want = torch.relu(want)
        torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-10)
    assert float(layer.running_mean[0]) == 7.0 and int(layer.num_batches_tracked) == 0


def test_a_sparse_input_to_a_layer_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"BatchNorm2d: expected a dense \(torch.strided\) input"):
        N.BatchNorm2d(3)(torch.randn(2, 3, 2, 2).to_sparse())


# --- torch.fx as the root, and layers the tracer cannot find --------------------------------------------


def test_fx_root_of_a_core_layer_in_training_warns_that_the_mode_is_fixed() -> None:
    layer = N.BatchNorm2d(3)
    with pytest.warns(UserWarning, match="BatchNorm2d traced as the root of torch.fx.symbolic_trace"):
        gm = torch.fx.symbolic_trace(layer)
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(gm(x), TF.batch_norm(x, None, None, training=True), rtol=1e-5, atol=1e-5)


def test_fx_root_of_a_layer_that_cannot_trace_its_body_raises() -> None:
    with pytest.raises(NormError, match="MeanOnlyBatchNorm cannot be the root of torch.fx.symbolic_trace"):
        torch.fx.symbolic_trace(N.MeanOnlyBatchNorm(3))


# --- registry -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "kind", "words"),
    [
        (lambda: N.register_norm(123), TypeError, "register_norm: name must be a string"),
        (lambda: N.create_norm_layer(3, 8), TypeError, "create_norm_layer"),
        (lambda: N.create_norm_layer("bn:2", 8), NormError, "'bn' takes no ':<int>' argument, got 'bn:2'"),
        (lambda: N.create_norm_layer("ln:2+pn", 8), NormError, "'ln+pn' takes no ':<int>' argument"),
        (lambda: N.create_norm_layer("ln+pn", 8, num_groups=2), NormError, "'ln+pn' is one group"),
    ],
    ids=["name-not-str", "spec-not-str", "arg-not-taken", "ln-pn-arg", "ln-pn-groups"],
)
def test_registry_argument_errors(call: Callable[[], Any], kind: type[Exception], words: str) -> None:
    with pytest.raises(kind) as e:
        call()
    assert words in str(e.value)


# --- weight norm ----------------------------------------------------------------------------------------


class _Double(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


def test_weight_norm_on_a_parameter_with_another_parametrization_raises() -> None:
    lin = nn.Linear(3, 4)
    parametrize.register_parametrization(lin, "weight", _Double())
    with pytest.raises(NormError, match=r"Linear.weight already has a parametrization \(_Double\)"):
        N.weight_norm(lin)


def test_weight_norm_removed_by_torch_still_loads_a_plain_checkpoint() -> None:
    lin = N.weight_norm(nn.Linear(3, 4))
    parametrize.remove_parametrizations(lin, "weight")  # torch's own removal: normkit's hook stays
    plain = nn.Linear(3, 4)
    lin.load_state_dict(plain.state_dict())
    torch.testing.assert_close(lin.weight, plain.weight, rtol=0, atol=0)
    x = torch.randn(2, 3)
    torch.testing.assert_close(lin(x), plain(x), rtol=0, atol=0)


def test_param_groups_skip_frozen_parameters() -> None:
    net = nn.Sequential(nn.Linear(3, 3), N.BatchNorm1d(3))
    net[0].weight.requires_grad_(False)
    groups = N.param_groups(net, weight_decay=0.1)
    params = [p for g in groups for p in g["params"]]
    assert all(p is not net[0].weight for p in params)
    assert {id(p) for p in params} == {id(p) for p in net.parameters() if p.requires_grad}
