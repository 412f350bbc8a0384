"""Extending normkit as a researcher does: subclassing its layers, registering a norm, custom activations,
building a new norm from the functional API, and adding hooks and parametrizations.

Each test compares against an independent oracle: the same procedure on a torch.nn subclass, a float64
computation written here, or the unmodified normkit layer. Covered: subclasses of normkit layers (a
forward that calls ``super().forward``, ``extra_repr``, an extra buffer and parameter, another
``__init__`` signature, an overridden ``_check_input_dim``) in eager, ``torch.compile(fullgraph=True)``,
``torch.export``, ``torch.fx.symbolic_trace``, deepcopy / pickle / ``torch.save``, and the surgery and
diagnostics tools; a user's norm in the registry; user activations (torch modules, a lambda, PReLU, a
subclass of a torch activation, an unhashable callable) in ``ProxyNormAct`` and the ``*Act`` layers; a
"batch-channel norm" and a moments-then-normalize norm built from ``normkit.functional`` under autograd
(first and second order, forward mode) and ``torch.func``; forward pre-hooks, a softplus
parametrization of the weight, and spectral / weight norm on the convolutions around a normkit BN.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

import normkit
import normkit.functional as NF
import normkit.nn as nkn
from normkit.diagnostics import NormMonitor
from normkit.distributed import recalibrate_bn
from normkit.nn import registry as reg
from normkit.surgery import convert_norms, fold_bn, to_torch_nn

F64 = torch.float64
C = 4


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


def _breaks(fn: Callable[..., object], *args: object) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args).graph_break_count


# ---------------------------------------------------------------------------------------------------
# 1. Subclassing normkit layers
# ---------------------------------------------------------------------------------------------------


class _Scaled(nn.Module):
    """What a researcher's BN adds, on normkit's and on torch.nn's BatchNorm2d alike: another
    ``__init__``, an extra buffer and parameter, a forward after super's."""

    def __init__(self, num_features: int, scale: float = 2.0, **kwargs: object) -> None:
        super().__init__(num_features, **kwargs)  # type: ignore[call-arg]  # (the BN after it in the MRO)
        self.scale = scale
        self.calls: Tensor
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, num_features))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.calls.add_(1)
        return super().forward(x) * self.scale * self.gain.view(1, -1, 1, 1)  # type: ignore[misc]


class ScaledBN(_Scaled, nkn.BatchNorm2d):  # type: ignore[misc]
    """The researcher's BN on normkit's BatchNorm2d, with its own repr."""

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}"


class TorchScaledBN(_Scaled, nn.BatchNorm2d):  # type: ignore[misc]
    """The same subclass of torch.nn's BatchNorm2d: the oracle."""


class TaggedBN(nkn.BatchNorm2d):
    """A subclass that only changes the repr (its computation is normkit's BatchNorm2d's)."""

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tag=exp1"


def _pair(momentum: float = 0.2) -> tuple[Any, Any]:
    ours: Any
    ref: Any
    ours, ref = ScaledBN(C, 1.5, momentum=momentum), TorchScaledBN(C, 1.5, momentum=momentum)
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.tensor([0.5, 1.0, 1.5, -1.0]))
            m.bias.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]))
    return ours, ref


def _assert_same_state(ours: nn.Module, ref: nn.Module) -> None:
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_subclass_with_own_init_buffer_parameter_and_forward_matches_a_torch_subclass():
    ours, ref = _pair()
    assert repr(ours).endswith("track_running_stats=True, scale=1.5)")
    for step in range(3):
        x = _randn(6, C, 5, 5, seed=step) * 3 + 1
        xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yr = ours(xo), ref(xr)
        torch.testing.assert_close(yo, yr, rtol=1e-5, atol=1e-5)
        g = _randn(*x.shape, seed=10 + step)
        go = torch.autograd.grad(yo, [xo, ours.weight, ours.gain], g)
        gr = torch.autograd.grad(yr, [xr, ref.weight, ref.gain], g)
        for a, b in zip(go, gr, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    _assert_same_state(ours, ref)
    assert int(ours.calls) == 3
    x = _randn(2, C, 5, 5, seed=9)
    torch.testing.assert_close(ours.eval()(x), ref.eval()(x), rtol=1e-5, atol=1e-5)

    # deepcopy, pickle and torch.save of the whole module keep the class, its attributes and its state
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    for copy_ in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours)), torch.load(buf, weights_only=False)):
        assert type(copy_) is ScaledBN and copy_.scale == 1.5
        torch.testing.assert_close(copy_(x), ref(x), rtol=1e-5, atol=1e-5)
    # a state_dict round trip into a fresh subclass, and into the torch.nn subclass
    fresh = ScaledBN(C, 1.5)
    fresh.load_state_dict(ref.state_dict())
    torch.testing.assert_close(fresh.eval()(x), ref(x), rtol=1e-5, atol=1e-5)


def test_subclass_compiles_fullgraph_and_exports_as_a_torch_subclass_does():
    x = _randn(6, C, 5, 5, seed=1) * 2 - 1
    ours, ref = _pair()
    assert _breaks(copy.deepcopy(ours), x) == 0
    compiled = torch.compile(ours, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), ref(x), rtol=1e-5, atol=1e-5)
    _assert_same_state(ours, ref)  # the running statistics were updated by the compiled forward

    ours, ref = _pair()
    exported = torch.export.export(ours, (x,)).module()
    torch.testing.assert_close(exported(x), ref(x), rtol=1e-5, atol=1e-5)
    for key in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(exported, key), getattr(ref, key), rtol=1e-5, atol=1e-6)
    ours.eval()
    ref.eval()
    exported = torch.export.export(ours, (x,)).module()
    torch.testing.assert_close(exported(x), ref(x), rtol=1e-5, atol=1e-5)


def test_a_subclass_that_only_changes_the_repr_scripts():
    x = _randn(3, C, 4, 4, seed=2)
    scripted = torch.jit.script(TaggedBN(C))
    torch.testing.assert_close(scripted(x), nn.BatchNorm2d(C)(x), rtol=1e-5, atol=1e-5)


class _AnyRankTorchBN(nn.BatchNorm2d):
    def _check_input_dim(self, input: Tensor) -> None:  # the torch idiom (torch's own _BatchNormXd, mmcv)
        pass


@pytest.mark.parametrize(
    "base", [nkn.BatchNorm2d, nkn.BatchNorm3d, nkn.BatchNormAct2d], ids=lambda c: c.__name__
)
def test_overriding_check_input_dim_is_honoured(base: type[nn.Module]):
    cls = type(f"AnyRank{base.__name__}", (base,), {"_check_input_dim": lambda self, input: None})
    kw = {"activation": None} if base is nkn.BatchNormAct2d else {}
    ours, ref = cls(3, **kw), _AnyRankTorchBN(3)
    x = _randn(6, 3, 7, seed=3) * 2 + 1
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-6)


class _StrictBN(nkn.BatchNorm2d):
    """A subclass that adds its own check to the inherited one (which keeps the class's rank)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.shape[0] < 2:
            raise ValueError("a batch of at least 2")
        super()._check_input_dim(input)


def test_an_added_check_input_dim_keeps_the_inherited_rank_check():
    layer = _StrictBN(3)
    with pytest.raises(ValueError, match="at least 2"):
        layer(_randn(1, 3, 4, 4))
    with pytest.raises(normkit.NormError, match="expected 4D"):  # (as torch.nn's BatchNorm2d)
        layer(_randn(6, 3, 7))
    torch.testing.assert_close(layer.eval()(_randn(2, 3, 4, 4)), nn.BatchNorm2d(3).eval()(_randn(2, 3, 4, 4)))


@pytest.mark.parametrize(
    "base", [nkn.BatchNorm1d, nkn.GhostBatchNorm2d, nkn.SyncBatchNorm], ids=lambda c: c.__name__
)
def test_overriding_check_input_dim_works_where_the_layer_calls_it(base: type[nn.Module]):
    cls = type(f"AnyRank{base.__name__}", (base,), {"_check_input_dim": lambda self, input: None})
    ours, ref = cls(3), _AnyRankTorchBN(3)
    x = _randn(6, 3, 7, seed=3) * 2 + 1
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-6)


class _After(nn.Module):
    """What the extending subclasses below add after super().forward: ``2 y + 1``."""

    @staticmethod
    def apply(y: Tensor) -> Tensor:
        return y * 2 + 1


def _extended(base: type[nn.Module]) -> type[nn.Module]:
    def forward(self: nn.Module, input: Tensor) -> Tensor:
        return _After.apply(base.forward(self, input))

    return type(f"Extended{base.__name__}", (base,), {"forward": forward})


_EXTENDED = {
    "BatchNorm2d": lambda: _extended(nkn.BatchNorm2d)(C),
    "GroupNorm": lambda: _extended(nkn.GroupNorm)(2, C),
    "LayerNorm2d": lambda: _extended(nkn.LayerNorm2d)(C),
    "InstanceNorm2d": lambda: _extended(nkn.InstanceNorm2d)(C, affine=True),
    "BatchNormAct2d": lambda: _extended(nkn.BatchNormAct2d)(C, activation="silu"),
    "ProxyNormAct": lambda: _extended(nkn.ProxyNormAct)(C),
}


@pytest.mark.parametrize("name", list(_EXTENDED))
def test_extending_subclass_compiles_fullgraph_equal_to_eager(name: str):
    x = _randn(3, C, 5, 5, seed=4)
    layer = _EXTENDED[name]().eval()
    model = nn.Sequential(nn.Conv2d(C, C, 1), layer).eval()
    expected = model(x)
    assert _breaks(model, x) == 0
    torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="eager")(x), expected)
    torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), expected, rtol=1e-5, atol=1e-5)


# the extended layers whose output depends on train/eval: traced through, their mode is fixed (and said)
_MODAL = {"BatchNorm2d", "BatchNormAct2d"}


@pytest.mark.parametrize("name", [n for n in _EXTENDED if n != "ProxyNormAct"])
def test_fx_symbolic_trace_of_an_extending_subclass_equals_eager(name: str):
    """fx traces a subclass's own forward; normkit's, reached through ``super().forward()``, must not
    record a node calling the module (it would run the subclass's extra ops a second time: every
    output off by 4-9), but trace its body, saying where the mode is then fixed."""
    x = _randn(3, C, 5, 5, seed=5)
    model = nn.Sequential(nn.Conv2d(C, C, 1), _EXTENDED[name]()).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.fx.symbolic_trace(model)
    said = [str(w.message) for w in caught if "fixed at trace time" in str(w.message)]
    assert len(said) == (1 if name in _MODAL else 0), said
    assert all("is_leaf_module" in m for m in said)
    torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (nkn.ProxyNormAct, nkn.BatchNorm2d)) or super().is_leaf_module(
            m, module_qualified_name
        )


@pytest.mark.parametrize("name", ["ProxyNormAct", "BatchNorm2d"])
def test_fx_trace_of_an_extending_subclass_as_a_leaf_equals_eager(name: str):
    """A layer whose body fx cannot trace (Proxy Norm) refuses, naming the fix: a tracer that keeps the
    subclass as a leaf, with which the graph is one call_module node that follows train/eval."""
    x = _randn(3, C, 5, 5, seed=5)
    model = nn.Sequential(nn.Conv2d(C, C, 1), _EXTENDED[name]()).eval()
    if name == "ProxyNormAct":
        with pytest.raises(normkit.NormError, match="extends normkit's.*is_leaf_module"):
            torch.fx.symbolic_trace(model)
    graph = _LeafTracer().trace(model)
    traced = torch.fx.GraphModule(model, graph)
    assert [n.target for n in graph.nodes if n.op == "call_module"] == ["0", "1"]
    torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)
    traced.train()
    model.train()
    torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)


def _conv_bn(bn: nn.Module) -> Any:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, C, 3), bn, nn.ReLU())


def test_surgery_and_diagnostics_on_a_subclass_that_keeps_the_forward():
    batches = [_randn(4, 3, 6, 6, seed=s) for s in range(3)]
    model = _conv_bn(TaggedBN(C, momentum=0.3))
    for x in batches:
        model(x)
    model.eval()
    x = batches[0]
    # fold_bn folds it (its computation is BatchNorm2d's)
    folded: Any = fold_bn(model, x)
    assert [type(m) for m in folded.model] == [nn.Conv2d, nn.Identity, nn.ReLU]
    torch.testing.assert_close(folded.model(x), model(x), rtol=1e-5, atol=1e-5)
    # convert_norms converts it and keeps its affine
    converted: Any
    converted, report = convert_norms(model, "gn:2")
    assert type(converted[1]) is nkn.GroupNorm and len(report.converted) == 1
    torch.testing.assert_close(converted[1].weight, model[1].weight)
    # recalibrate_bn: the precise statistics of the conv outputs over every batch (float64 here)
    recalibrate_bn(model, batches, progress=False)
    with torch.no_grad():
        z = torch.cat([model[0](b) for b in batches]).to(F64)
    torch.testing.assert_close(model[1].running_mean.to(F64), z.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var.to(F64), z.var((0, 2, 3)), rtol=1e-5, atol=1e-6)
    # NormMonitor watches it as a BN: each statistic pools N * H * W values
    model.train()
    with NormMonitor(model) as monitor:
        model(x)
    assert list(monitor.layers) == ["1"]
    record = monitor.records["1"]
    assert record.calls == 1 and record.last["values_per_stat"] == 4 * 4 * 4


def test_surgery_reports_a_subclass_with_its_own_forward():
    model = _conv_bn(ScaledBN(C)).eval()
    x = _randn(2, 3, 6, 6, seed=6)
    folded: Any = fold_bn(model, x)
    assert type(folded.model[1]) is ScaledBN
    assert [name for name, _ in folded.report.skipped] == ["1"]
    assert "its own forward" in folded.report.skipped[0][1]
    torch.testing.assert_close(folded.model(x), model(x))
    converted: Any
    converted, report = convert_norms(model, "gn:2")
    assert type(converted[1]) is ScaledBN and [s[0] for s in report.skipped] == ["1"]


@pytest.mark.parametrize("make", [lambda: TaggedBN(C), lambda: ScaledBN(C)], ids=["tagged", "own_forward"])
def test_to_torch_nn_names_a_subclass_it_leaves(make: Callable[[], nn.Module]):
    model = _conv_bn(make()).eval()
    plain, report = to_torch_nn(model)
    x = _randn(2, 3, 6, 6, seed=7)
    torch.testing.assert_close(plain(x), model(x))
    converted = [c.name for c in report.converted]
    skipped = [s[0] for s in report.skipped]
    assert "1" in converted + skipped


def test_to_torch_nn_gives_a_parametrized_layer_its_own_reason():
    """torch's parametrize makes the layer an instance of a generated subclass (``ParametrizedBatchNorm2d``,
    from torch.nn.utils.parametrize): the report says it is parametrized, not that it is a user's class."""
    model = _conv_bn(nkn.BatchNorm2d(C)).eval()
    parametrize.register_parametrization(model[1], "weight", _Softplus())
    _, report = to_torch_nn(model)
    assert [(s[0], s[1]) for s in report.skipped] == [("1", "ParametrizedBatchNorm2d")]
    assert "parametrized" in report.skipped[0][2] and "subclass" not in report.skipped[0][2]


# ---------------------------------------------------------------------------------------------------
# 2. The registry and user activations
# ---------------------------------------------------------------------------------------------------


def test_a_registered_user_norm_is_created_converted_to_and_combined_with_an_activation():
    name = "test_extending_scaled_bn"
    seen: list[tuple[int, int | None, dict[str, object]]] = []

    def factory(c: int, arg: int | None, **kw: object) -> nn.Module:
        seen.append((c, arg, kw))
        return ScaledBN(c, scale=float(arg or 2), **kw)

    normkit.register_norm(name, "a test-only BN")(factory)
    try:
        layer = normkit.create_norm_layer(f"  {name.upper()}:3 ", C, momentum=0.3)
        assert type(layer) is ScaledBN and layer.scale == 3.0 and layer.momentum == 0.3
        assert seen[-1] == (C, 3, {"momentum": 0.3})
        with pytest.raises(ValueError, match=name):  # the valid names listed include the user's
            normkit.create_norm_layer("test_extending_no_such_norm", C)
        # get_norm_layer hands back something torchvision can call with the channel count
        assert type(normkit.get_norm_layer(name)(C)) is ScaledBN
        # with an activation: the subclass's own forward, then the activation (oracle: torch.nn)
        block = normkit.create_norm_act_layer(name, C, nn.SiLU())
        ref = nn.Sequential(TorchScaledBN(C), nn.SiLU())
        ref.load_state_dict(block.state_dict())
        x = _randn(4, C, 3, 3, seed=8)
        torch.testing.assert_close(block(x), ref(x), rtol=1e-5, atol=1e-5)
        # convert_norms to the user's spec
        converted: Any
        converted, report = convert_norms(_conv_bn(nn.BatchNorm2d(C)), name)
        assert type(converted[1]) is ScaledBN and len(report.converted) == 1
    finally:
        reg._REGISTRY.pop(name, None)


def _proxy_points(n: int = 200) -> Tensor:
    i = torch.arange(n, dtype=F64)
    return math.sqrt(2.0) * torch.erfinv(2.0 * (i + 0.5) / n - 1.0)


def _proxy_norm_act_f64(
    y: Tensor,
    weight: Tensor,
    bias: Tensor,
    proxy_bias: Tensor,
    proxy_weight: Tensor,
    act: Callable,
    eps: float,
) -> Tensor:
    """``(act(w y + b) - m) / sqrt(v + eps)``; m, v: mean and variance of act over the Gaussian proxy."""
    proxy = (1 + proxy_weight)[:, None] * _proxy_points()[None] + proxy_bias[:, None]  # (C, P)
    zp = act(weight[:, None] * proxy + bias[:, None])
    m = zp.mean(1)
    v = ((zp - m[:, None]) ** 2).mean(1)
    view = (1, -1) + (1,) * (y.dim() - 2)
    return (act(weight.view(view) * y + bias.view(view)) - m.view(view)) / torch.sqrt(v.view(view) + eps)


class _ShiftedReLU(nn.ReLU):
    def forward(self, input: Tensor) -> Tensor:
        return torch.relu(input) - 0.5


class _ScaledGELU(nn.GELU):
    def forward(self, input: Tensor) -> Tensor:
        return super().forward(input) * 1.7


class _LeakyPlusLinear(nn.LeakyReLU):
    def forward(self, input: Tensor) -> Tensor:
        return F.leaky_relu(input, self.negative_slope) + 0.1 * input


@dataclass
class _ScaledTanh:
    """A callable dataclass (eq=True makes it unhashable)."""

    alpha: float = 1.5

    def __call__(self, t: Tensor) -> Tensor:
        return torch.tanh(self.alpha * t)


def _swish15(t: Tensor) -> Tensor:
    return t * torch.sigmoid(1.5 * t)


_ACTS_OK: dict[str, tuple[Callable[[], Callable], Callable[[Tensor], Tensor]]] = {
    "SiLU": (nn.SiLU, F.silu),
    "Hardswish": (nn.Hardswish, F.hardswish),
    "lambda": (lambda: lambda t: t * torch.sigmoid(1.5 * t), _swish15),
    "function": (lambda: F.hardtanh, F.hardtanh),
    "ReLU_subclass": (_ShiftedReLU, lambda t: torch.relu(t) - 0.5),
}
_ACTS_WRONG = {
    "GELU_subclass": (_ScaledGELU, lambda t: F.gelu(t) * 1.7),
    "LeakyReLU_subclass": (lambda: _LeakyPlusLinear(0.2), lambda t: F.leaky_relu(t, 0.2) + 0.1 * t),
}


def _check_proxy_norm_act(
    act: Callable, ref_act: Callable[[Tensor], Tensor], extra: list[Tensor] | None = None
):
    pn = nkn.ProxyNormAct(C, activation=act)
    with torch.no_grad():
        for i, p in enumerate((pn.weight, pn.bias, pn.proxy_bias, pn.proxy_weight)):
            p.add_(0.3 * _randn(C, seed=20 + i))
    params: list[Tensor] = [pn.weight, pn.bias, pn.proxy_bias, pn.proxy_weight]
    y = _randn(3, C, 4, 4, seed=11).requires_grad_()
    out = pn(y)
    y64 = y.detach().to(F64).requires_grad_()
    p64 = [p.detach().to(F64).requires_grad_() for p in params]
    ref = _proxy_norm_act_f64(y64, p64[0], p64[1], p64[2], p64[3], ref_act, pn.proxy_eps)
    torch.testing.assert_close(out.to(F64), ref, rtol=1e-5, atol=1e-5)
    g = _randn(*out.shape, seed=12)
    got = torch.autograd.grad(out, [y, *params, *(extra or [])], g)
    want = torch.autograd.grad(ref, [y64, *p64], g.to(F64))
    for a, b in zip(got, want, strict=False):
        torch.testing.assert_close(a.to(F64), b, rtol=1e-4, atol=1e-5)
    return got


@pytest.mark.parametrize("name", list(_ACTS_OK))
def test_proxy_norm_act_with_a_user_activation_matches_float64(name: str):
    make, ref_act = _ACTS_OK[name]
    _check_proxy_norm_act(make(), ref_act)


def test_proxy_norm_act_with_prelu_trains_its_slope():
    act = nn.PReLU(1, init=0.3)
    slope = torch.tensor([0.3], dtype=F64, requires_grad=True)
    pn_got = _check_proxy_norm_act(act, lambda t: torch.where(t >= 0, t, slope * t), extra=[act.weight])
    # the slope's gradient, through the output and the proxy statistics, against the float64 composite
    pn: Any = nkn.ProxyNormAct(C, activation=nn.PReLU(1, init=0.3))
    assert "activation.weight" in dict(pn.named_parameters())
    y = _randn(3, C, 4, 4, seed=11)
    g = _randn(3, C, 4, 4, seed=12)
    got = torch.autograd.grad(pn(y), pn.activation.weight, g)[0]
    p64 = [p.detach().to(F64) for p in (pn.weight, pn.bias, pn.proxy_bias, pn.proxy_weight)]
    prelu = lambda t: torch.where(t >= 0, t, slope * t)  # noqa: E731
    ref = _proxy_norm_act_f64(y.to(F64), p64[0], p64[1], p64[2], p64[3], prelu, pn.proxy_eps)
    want = torch.autograd.grad(ref, slope, g.to(F64))[0]
    torch.testing.assert_close(got.to(F64), want, rtol=1e-4, atol=1e-5)
    assert len(pn_got) == 6


@pytest.mark.parametrize("name", list(_ACTS_WRONG))
def test_proxy_norm_act_runs_a_torch_activation_subclass_own_forward(name: str):
    make, ref_act = _ACTS_WRONG[name]
    _check_proxy_norm_act(make(), ref_act)


def test_proxy_norm_act_takes_an_unhashable_callable():
    _check_proxy_norm_act(_ScaledTanh(1.5), lambda t: torch.tanh(1.5 * t))


def test_proxy_norm_act_refuses_a_per_channel_prelu_by_name():
    """Proxy Norm applies its activation to a (C, num_points) proxy tensor too, where PReLU(C)'s slopes
    would run along the points: a NormError naming it (was a shape error from deep in the op)."""
    for make in (
        lambda: nkn.ProxyNormAct(C, activation=nn.PReLU(C)),
        lambda: nkn.GroupNormProxyAct2d(C, 2, activation=nn.PReLU(C)),
    ):
        with pytest.raises(normkit.NormError, match=r"elementwise.*PReLU\(4\)"):
            make()
    x = _randn(2, C, 3, 3, seed=14)
    p = torch.ones(C)
    with pytest.raises(normkit.NormError, match="elementwise"):
        NF.proxy_norm_act(x, p, p * 0, p * 0, p * 0, activation=nn.PReLU(C))


def test_norm_act_layers_run_a_torch_activation_subclass_and_an_unhashable_callable():
    x = _randn(4, C, 3, 3, seed=13)
    for act, ref_act in (
        (_ScaledGELU(), lambda t: F.gelu(t) * 1.7),
        (_ScaledTanh(1.5), lambda t: torch.tanh(1.5 * t)),
    ):
        layer = nkn.BatchNormAct2d(C, activation=act)
        torch.testing.assert_close(
            layer(x), ref_act(F.batch_norm(x, None, None, training=True)), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize(
    "make, ref_norm",
    [
        (lambda a: nkn.BatchNormAct2d(C, activation=a), lambda: nn.BatchNorm2d(C)),
        (lambda a: nkn.GroupNormAct2d(C, 2, activation=a), lambda: nn.GroupNorm(2, C)),
    ],
    ids=["BatchNormAct2d", "GroupNormAct2d"],
)
def test_norm_act_layer_with_a_per_channel_prelu_matches_torch_and_compiles(make, ref_norm):
    layer: Any = make(nn.PReLU(C, init=0.2))
    ref: Any = nn.Sequential(ref_norm(), nn.PReLU(C, init=0.2))
    with torch.no_grad():
        layer.act.weight.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    ref.load_state_dict(
        {
            k.replace("act.", "1.") if k.startswith("act.") else f"0.{k}": v
            for k, v in layer.state_dict().items()
        }
    )
    x = _randn(4, C, 3, 3, seed=14).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    out, want = layer(x), ref(xr)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    g = _randn(*out.shape, seed=15)
    got = torch.autograd.grad(out, [x, layer.weight, layer.act.weight], g)
    exp = torch.autograd.grad(want, [xr, ref[0].weight, ref[1].weight], g)
    for a, b in zip(got, exp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    model = nn.Sequential(layer).eval()
    assert _breaks(model, x.detach()) == 0
    torch.testing.assert_close(
        torch.compile(model, fullgraph=True, backend="eager")(x.detach()), model(x.detach())
    )


@pytest.mark.parametrize(
    "act", [nn.Hardswish(), nn.PReLU(1, init=0.25), _swish15], ids=["Hardswish", "PReLU", "function"]
)
def test_proxy_norm_act_with_a_user_activation_compiles_and_exports(act):
    pn = nkn.GroupNormProxyAct2d(C, num_groups=2, activation=act)
    x = _randn(3, C, 4, 4, seed=16)
    expected = pn(x)
    assert _breaks(pn, x) == 0
    torch.testing.assert_close(torch.compile(pn, fullgraph=True, backend="eager")(x), expected)
    torch.testing.assert_close(torch.export.export(pn, (x,)).module()(x), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# 3. A new norm from the functional API
# ---------------------------------------------------------------------------------------------------


def _batch_channel_norm(x: Tensor, w: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    """A user's "batch-channel norm": BN statistics (no affine), then GN(2) with the affine."""
    y = NF.batch_norm(x, training=True, mask=mask).output
    return NF.group_norm(y, 2, w, b, 1e-5, mask=mask)


def _batch_channel_norm_f64(x: Tensor, w: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    valid = torch.ones_like(x) if mask is None else mask.expand(x.shape).to(x.dtype)

    def norm(t: Tensor, v: Tensor, dims: tuple[int, ...]) -> Tensor:
        n = v.sum(dims, keepdim=True)
        mean = (t * v).sum(dims, keepdim=True) / n
        var = ((t - mean) ** 2 * v).sum(dims, keepdim=True) / n
        return (t - mean) / torch.sqrt(var + 1e-5)

    y = norm(x, valid, (0, 2, 3))
    n, c, h, w_ = x.shape
    groups = (n, 2, c // 2, h, w_)
    z = norm(y.reshape(groups), valid.reshape(groups), (2, 3, 4)).reshape(x.shape)
    out = z * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
    return (
        out if mask is None else torch.where(mask.expand(x.shape), out, b.view(1, -1, 1, 1).expand(x.shape))
    )


def _bcn_inputs() -> tuple[Tensor, Tensor, Tensor]:
    x = (_randn(3, C, 3, 3, seed=17, dtype=F64) * 2 + 1).requires_grad_()
    w = (1 + 0.3 * _randn(C, seed=18, dtype=F64)).requires_grad_()
    b = (0.1 * _randn(C, seed=19, dtype=F64)).requires_grad_()
    return x, w, b


def test_batch_channel_norm_from_functional_ops_matches_float64_under_autograd():
    x, w, b = _bcn_inputs()
    torch.testing.assert_close(_batch_channel_norm(x, w, b), _batch_channel_norm_f64(x, w, b))
    assert torch.autograd.gradcheck(_batch_channel_norm, (x, w, b))
    assert torch.autograd.gradgradcheck(_batch_channel_norm, (x, w, b))
    assert torch.autograd.gradcheck(
        _batch_channel_norm,
        (x, w, b),
        check_forward_ad=True,
        check_backward_ad=False,
        check_undefined_grad=False,
    )
    mask = torch.rand(3, 1, 3, 3, generator=_gen(20)) > 0.3
    torch.testing.assert_close(_batch_channel_norm(x, w, b, mask), _batch_channel_norm_f64(x, w, b, mask))
    assert torch.autograd.gradcheck(lambda x_, w_, b_: _batch_channel_norm(x_, w_, b_, mask), (x, w, b))


def test_batch_channel_norm_from_functional_ops_under_torch_func_and_compile():
    x, w, b = (t.detach() for t in _bcn_inputs())

    def loss(t: Tensor) -> Tensor:
        return (_batch_channel_norm(t, w, b) ** 2).sum()

    def loss_ref(t: Tensor) -> Tensor:
        return (_batch_channel_norm_f64(t, w, b) ** 2).sum()

    torch.testing.assert_close(torch.func.grad(loss)(x), torch.func.grad(loss_ref)(x))
    t = _randn(*x.shape, seed=21, dtype=F64)
    got = torch.func.jvp(lambda v: _batch_channel_norm(v, w, b), (x,), (t,))[1]
    want = torch.func.jvp(lambda v: _batch_channel_norm_f64(v, w, b), (x,), (t,))[1]
    torch.testing.assert_close(got, want)
    xs = _randn(2, *x.shape, seed=22, dtype=F64)
    torch.testing.assert_close(
        torch.func.vmap(torch.func.grad(loss))(xs), torch.stack([torch.func.grad(loss_ref)(v) for v in xs])
    )
    assert _breaks(_batch_channel_norm, x, w, b) == 0
    compiled = torch.compile(_batch_channel_norm, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, w, b), _batch_channel_norm_f64(x, w, b))


def _moments_norm(x: Tensor) -> Tensor:
    """A user's norm from the two public halves: moments over (N, H, W), then normalize."""
    m = NF.moments(x, (0, 2, 3))
    return NF.normalize(x, m.mean, torch.rsqrt(m.var + 1e-5))


def _moments_norm_f64(x: Tensor) -> Tensor:
    mean = x.mean((0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean((0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5)


def test_moments_then_normalize_under_torch_func_grad_matches_float64():
    x = _randn(3, C, 3, 3, seed=23, dtype=F64)
    g = _randn(*x.shape, seed=24, dtype=F64)
    got = torch.func.grad(lambda t: (_moments_norm(t) * g).sum())(x)
    want = torch.func.grad(lambda t: (_moments_norm_f64(t) * g).sum())(x)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("masked", [False, True], ids=["moments", "masked_moments"])
def test_moments_is_differentiable_in_eager_autograd(masked: bool):
    x = _randn(3, C, 3, 3, seed=25, dtype=F64).requires_grad_()
    if masked:
        mask = torch.rand(3, 1, 3, 3, generator=_gen(26)) > 0.3

        def stats(t: Tensor) -> tuple[Tensor, Tensor]:
            _, mean, var = NF.masked_moments(t, mask, (0, 2, 3))
            return mean, var
    else:

        def stats(t: Tensor) -> tuple[Tensor, Tensor]:
            m = NF.moments(t, (0, 2, 3))
            return m.mean, m.var

    assert torch.autograd.gradcheck(stats, (x,))
    assert torch.autograd.gradcheck(_moments_norm, (x,))


# ---------------------------------------------------------------------------------------------------
# 4. Hooks and parametrizations
# ---------------------------------------------------------------------------------------------------


class _Softplus(nn.Module):
    def forward(self, weight: Tensor) -> Tensor:
        return F.softplus(weight)


def _shift_input(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return (args[0] * 2 + 1, *args[1:])


_PARAMETRIZED = {
    "BatchNorm2d": lambda: nkn.BatchNorm2d(C),
    "GroupNorm": lambda: nkn.GroupNorm(2, C),
    "LayerNorm2d": lambda: nkn.LayerNorm2d(C),
    "BatchRenorm2d": lambda: nkn.BatchRenorm2d(C),
    "GhostBatchNorm2d": lambda: nkn.GhostBatchNorm2d(C, ghost_batch_size=2),
    "BatchNormAct2d": lambda: nkn.BatchNormAct2d(C, activation="silu"),
    "ProxyNormAct": lambda: nkn.ProxyNormAct(C),
}


@pytest.mark.parametrize("name", list(_PARAMETRIZED))
def test_softplus_weight_and_input_pre_hook_equal_the_plain_layer(name: str):
    """Oracle: the unmodified layer, its weight set to softplus(w), on the hooked input."""
    make = _PARAMETRIZED[name]
    torch.manual_seed(0)
    ours, plain = make(), make()
    raw = _randn(C, seed=27)
    with torch.no_grad():
        ours.weight.copy_(raw)
    parametrize.register_parametrization(ours, "weight", _Softplus())
    ours.register_forward_pre_hook(_shift_input)
    base = copy.deepcopy(ours)
    x = _randn(4, C, 3, 3, seed=28)
    with torch.no_grad():
        plain.weight.copy_(F.softplus(raw))
    for step in range(2):
        torch.testing.assert_close(ours(x + step), plain((x + step) * 2 + 1), rtol=1e-5, atol=1e-5)
    # the gradient reaches the raw weight through the softplus
    g = _randn(*x.shape, seed=29)
    got = torch.autograd.grad(ours(x), ours.parametrizations.weight.original, g)[0]
    grad_w = torch.autograd.grad(plain(x * 2 + 1), plain.weight, g)[0]
    torch.testing.assert_close(got, grad_w * torch.sigmoid(raw), rtol=1e-4, atol=1e-5)
    # compiled in a model: no graph break, the same output and running statistics as eager
    eager, compiled_model = nn.Sequential(copy.deepcopy(base)), nn.Sequential(copy.deepcopy(base))
    assert _breaks(nn.Sequential(copy.deepcopy(base)), x) == 0
    compiled = torch.compile(compiled_model, fullgraph=True, backend="eager")
    for step in range(2):
        torch.testing.assert_close(compiled(x + step), eager(x + step), rtol=1e-5, atol=1e-5)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled_model.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize(
    "wrap", [spectral_norm, weight_norm, nkn.weight_norm], ids=["spectral", "weight", "normkit_wn"]
)
def test_reparametrized_convs_around_a_normkit_bn_match_torch_bn(wrap: Callable[[nn.Module], nn.Module]):
    def build(bn: type[nn.Module]) -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(wrap(nn.Conv2d(3, C, 3)), bn(C), nn.ReLU(), wrap(nn.Conv2d(C, C, 3)), bn(C))

    ours, ref = build(nkn.BatchNorm2d), build(nn.BatchNorm2d)
    ref.load_state_dict(ours.state_dict())
    x = _randn(4, 3, 7, 7, seed=30)
    compiled_ours, compiled_ref = copy.deepcopy(ours), copy.deepcopy(ref)
    for _ in range(2):
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    _assert_same_state(ours, ref)
    assert _breaks(copy.deepcopy(compiled_ours), x) == 0
    compiled = torch.compile(compiled_ours, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), compiled_ref(x), rtol=1e-5, atol=1e-5)
    _assert_same_state(compiled_ours, compiled_ref)
    # fold_bn leaves a BN after a reparametrized conv, with the reason, and the model as it was
    ours.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a report of what was left is the point here)
        folded = fold_bn(ours, x)
    assert not folded.report.folded and {n for n, _ in folded.report.skipped} == {"1", "4"}
    assert all("reparametrized" in why for _, why in folded.report.skipped)
    torch.testing.assert_close(folded.model(x), ours(x))
