"""The analysis and debugging tools a user runs on a model holding normkit layers, against the torch.nn twin.

torch.profiler, FlopCounterMode and the module trackers, anomaly mode, module hooks (full backward,
global, with kwargs), ``torch.nn.utils`` (parametrize, spectral / weight norm, gradient clipping),
``swa_utils.update_bn``, BN fusion, tensor subclasses and odd inputs. Where torch.nn has the layer, its
output is the oracle; elsewhere the same normkit layer run plainly (no tool) is. A test marked
``xfail(strict=True)`` pins a defect: it fails now and passes once the defect is fixed.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrizations, parametrize
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import normkit
import normkit.nn as nkn
from tests.tolerances import Tol
from tests.toolchain.samples import SAMPLE_IDS, SAMPLES, Sample, by_name, run

MODES = [pytest.param(True, id="train"), pytest.param(False, id="eval")]
TOL: Tol = {"rtol": 1e-4, "atol": 1e-5}
ANOMALY_WARNINGS = [
    pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled:UserWarning"),
    pytest.mark.filterwarnings("ignore:Error detected in:UserWarning"),
]

#: the layers whose eager CPU call is normkit's fused C++ kernel (kernels/_fast.py), with the torch.nn twin
FAST = {
    "BatchNorm2d": lambda: nn.BatchNorm2d(6),
    "GroupNorm": lambda: nn.GroupNorm(3, 6),
    "LayerNorm": lambda: nn.LayerNorm(7),
    "InstanceNorm2d": lambda: nn.InstanceNorm2d(6, affine=True),
    "LayerNorm2d-c": None,
    "ln+pn": None,
}
TWINS = {k: v for k, v in FAST.items() if v is not None}


def _weights(y: torch.Tensor) -> torch.Tensor:
    return torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)


def _twin(name: str, train: bool) -> nn.Module:
    """The torch.nn layer with the sample's parameters and buffers."""
    ours = by_name(name).module(train)
    ref = TWINS[name]()
    ref.load_state_dict(ours.state_dict())
    return ref.train(train)


def _conv_model(norm: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), norm, nn.ReLU(), nn.Conv2d(6, 4, 1))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in norm.parameters():
            p.uniform_(0.5, 1.5)
    return model


NORM_PAIRS = {
    "bn": (lambda: nn.BatchNorm2d(6), lambda: nkn.BatchNorm2d(6)),
    "gn": (lambda: nn.GroupNorm(3, 6), lambda: nkn.GroupNorm(3, 6)),
    "ln": (lambda: nn.LayerNorm(8), lambda: nkn.LayerNorm(8)),
    "in": (lambda: nn.InstanceNorm2d(6, affine=True), lambda: nkn.InstanceNorm2d(6, affine=True)),
}


# --- 1. torch.profiler ------------------------------------------------------------------------------


def _forward_events(m: nn.Module, x: torch.Tensor, grad: bool) -> list:
    m(x)  # (warm: the first call may build the kernels)
    with torch.set_grad_enabled(grad), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        with torch.autograd.profiler.record_function("user_scope"):
            m(x)
    return [e for e in prof.events() if e.name != "user_scope"]


@pytest.mark.parametrize("name", list(TWINS))
def test_profiler_names_torch_nn_norm_forward(name: str):
    """The oracle for the next test: torch.nn's layer is an ATen op the profiler names, with its shapes."""
    x = by_name(name).input().requires_grad_()
    events = _forward_events(_twin(name, True), x, grad=True)
    named = [e for e in events if "norm" in e.name.lower()]
    assert named, [e.name for e in events]
    assert any(list(x.shape) in e.input_shapes for e in named)


@pytest.mark.parametrize("grad", [pytest.param(True, id="grad"), pytest.param(False, id="no_grad")])
@pytest.mark.parametrize("name", list(FAST))
def test_profiler_names_normkit_norm_forward(name: str, grad: bool):
    sample = by_name(name)
    x = sample.input().requires_grad_(grad)
    events = _forward_events(sample.module(True), x, grad)
    named = [e for e in events if "norm" in e.name.lower()]
    assert named, [e.name for e in events]
    assert any(list(x.shape) in e.input_shapes for e in named)


@pytest.mark.parametrize("name", ["BatchNorm2d", "GroupNorm", "ln+pn"])
def test_profiler_names_the_norm_on_the_python_function_path(name: str, monkeypatch):
    """Without the C++ autograd node (it is optional), the ctypes kernels run inside a named scope."""
    from normkit.kernels import _build

    monkeypatch.setitem(_build._autograd, "module", None)
    monkeypatch.setitem(_build._autograd, "tried", True)
    sample = by_name(name)
    events = _forward_events(sample.module(True), sample.input().requires_grad_(), grad=True)
    assert any(e.name.startswith("normkit::") and "norm" in e.name for e in events), [e.name for e in events]


def test_profiler_memory_trace_export_and_nesting(tmp_path):
    """profile_memory, record_shapes, export_chrome_trace and record_function scopes work on a model of
    normkit layers; the convolutions inside a user scope are nested under it, as with torch.nn."""
    found = {}
    for lib, idx in (("torch", 0), ("normkit", 1)):
        model = _conv_model(NORM_PAIRS["bn"][idx]()).train()
        x = torch.randn(2, 3, 8, 8, requires_grad=True)
        model(x).sum().backward()
        acts = [ProfilerActivity.CPU]
        with profile(activities=acts, record_shapes=True, profile_memory=True) as prof:
            with torch.autograd.profiler.record_function("block"):
                y = model(x)
            y.sum().backward()
        path = tmp_path / f"{lib}.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
        events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
        block = next(e for e in events if e["name"] == "block")
        ops = [e for e in events if e.get("cat") == "cpu_op"]
        convs = [e for e in ops if e["name"] == "aten::convolution"]
        inside = [e for e in convs if block["ts"] <= e["ts"] <= block["ts"] + block["dur"]]
        mem = [e for e in prof.events() if e.cpu_memory_usage != 0]
        found[lib] = (len(convs), len(inside), bool(mem))
    assert found["normkit"] == found["torch"] == (2, 2, True)


# --- 2. FlopCounterMode and the module trackers -------------------------------------------------------


@pytest.mark.parametrize("norm", list(NORM_PAIRS))
def test_flop_counter_totals_and_per_module_breakdown_match_torch(norm: str):
    counts = []
    for make in NORM_PAIRS[norm]:
        model = _conv_model(make()).train()
        with FlopCounterMode(display=False) as fc:
            model(torch.randn(2, 3, 8, 8)).sum().backward()
        counts.append(
            (
                fc.get_total_flops(),
                {k: {str(op): n for op, n in v.items()} for k, v in fc.get_flop_counts().items()},
            )
        )
    assert counts[1] == counts[0]
    assert counts[0][1]["Sequential.0"]  # the convolutions are counted under their own module


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_flop_counter_runs_every_layer(sample: Sample, train: bool):
    """Every layer runs under the counter with its values unchanged; a norm counts 0 flops (as torch.nn's),
    a weight-standardized convolution exactly a convolution's."""
    ref_y, ref_g = run(sample.module(train), sample.input())
    with FlopCounterMode(display=False) as fc:
        y, g = run(sample.module(train), sample.input())
    torch.testing.assert_close(y, ref_y, **TOL)
    torch.testing.assert_close(g["input"], ref_g["input"], **TOL)
    if "StdConv" in sample.name:
        conv = nn.Conv2d(6, 6, 3, padding=1)
        with FlopCounterMode(display=False) as plain:
            run(conv, sample.input())
        assert fc.get_total_flops() == plain.get_total_flops() > 0
    else:
        assert fc.get_total_flops() == 0


def test_mod_tracker_sees_normkit_layers_as_torch_nn_layers():
    mod_tracker = pytest.importorskip("torch.distributed._tools.mod_tracker")
    seen = []
    for make in NORM_PAIRS["gn"]:
        model = _conv_model(make()).train()
        tracker = mod_tracker.ModTracker()
        events: list[tuple[str, str]] = []

        def note(kind: str, tracker=tracker, events=events):
            return lambda mod, *_: events.append((kind, tracker.get_known_fqn(mod)))

        tracker.register_user_hooks(note("pre_fw"), note("post_fw"), note("pre_bw"), note("post_bw"))
        with tracker:
            model(torch.randn(2, 3, 8, 8, requires_grad=True)).sum().backward()
        seen.append(events)
    assert seen[1] == seen[0]
    assert ("post_bw", "Sequential.1") in seen[1]


# --- 3. anomaly mode --------------------------------------------------------------------------------


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
@ANOMALY_WARNINGS[0]
def test_anomaly_mode_forward_backward_raises_nothing(sample: Sample, train: bool):
    ref_y, ref_g = run(sample.module(train), sample.input())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a warning
        warnings.filterwarnings("ignore", "Anomaly Detection has been enabled")
        with torch.autograd.detect_anomaly(check_nan=True):
            y, g = run(sample.module(train), sample.input())
    torch.testing.assert_close(y, ref_y, **TOL)
    for k in ref_g:
        torch.testing.assert_close(g[k], ref_g[k], **TOL)


def _nan_backward_message(m: nn.Module, x: torch.Tensor) -> str:
    x = x.detach().clone().requires_grad_()
    with torch.autograd.detect_anomaly():
        y = m(x)
        with pytest.raises(RuntimeError, match="returned nan values") as info:
            y.backward(torch.full_like(y, float("nan")))
    return str(info.value)


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
@ANOMALY_WARNINGS[0]
@ANOMALY_WARNINGS[1]
def test_anomaly_mode_reports_a_nan_gradient(sample: Sample, train: bool):
    _nan_backward_message(sample.module(train), sample.input())


@pytest.mark.parametrize("name", list(FAST))
@ANOMALY_WARNINGS[0]
@ANOMALY_WARNINGS[1]
def test_anomaly_mode_and_grad_fn_name_the_norm(name: str):
    """The fast path's node is named after its norm (``CppNode<normkit::BatchNormBackward>``: a CppNode,
    which compiled autograd can trace, not a hand-made node), not ``CppNode<(anonymous namespace)::...>``."""
    sample = by_name(name)
    message = _nan_backward_message(sample.module(True), sample.input())
    y = sample.module(True)(sample.input().requires_grad_())
    want = "ProxyAct" if name == "ln+pn" else "Norm"
    for text in (message, y.grad_fn.name()):
        assert "anonymous" not in text and "normkit::" in text and want in text, text


@pytest.mark.parametrize("name", list(TWINS))
@ANOMALY_WARNINGS[0]
@ANOMALY_WARNINGS[1]
def test_anomaly_mode_names_torch_nn_nodes(name: str):
    """The oracle of the test above."""
    message = _nan_backward_message(_twin(name, True), by_name(name).input())
    assert "Backward0" in message and "anonymous" not in message


@ANOMALY_WARNINGS[0]
@ANOMALY_WARNINGS[1]
@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_anomaly_mode_under_torch_compile(norm: str):
    torch._dynamo.reset()
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 6, 3), NORM_PAIRS[norm][1]()).train()  # (the norm's node first)
        x = torch.randn(2, 3, 6, 6, requires_grad=True)
        ref = model(x)
        with torch.autograd.detect_anomaly():
            compiled = torch.compile(model, backend="eager")
            y = compiled(x)
            torch.testing.assert_close(y, ref, **TOL)
            y.pow(2).sum().backward()
            y = compiled(x)
            with pytest.raises(RuntimeError, match="normkit_norm.*returned nan values"):
                y.backward(torch.full_like(y, float("nan")))
    finally:
        torch._dynamo.reset()


# --- 4. module hooks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_full_backward_hooks_see_the_right_gradients(sample: Sample, train: bool):
    ref_y, ref_g = run(sample.module(train), sample.input())
    m = sample.module(train)
    seen: dict[str, tuple] = {}
    m.register_full_backward_pre_hook(lambda mod, go: seen.update(pre=go))
    m.register_full_backward_hook(lambda mod, gi, go: seen.update(gi=gi, go=go))
    y, g = run(m, sample.input())
    torch.testing.assert_close(y, ref_y, **TOL)
    for k in ref_g:
        torch.testing.assert_close(g[k], ref_g[k], **TOL)
    w = _weights(y)
    torch.testing.assert_close(seen["pre"][0], w)
    torch.testing.assert_close(seen["go"][0], w)
    torch.testing.assert_close(seen["gi"][0], ref_g["input"], **TOL)


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_global_hooks_and_a_hook_replacing_grad_input(sample: Sample, train: bool):
    """torch.nn.modules.module's global full backward hooks see the layer's gradients; a module hook that
    returns a new grad_input (3x) replaces it."""
    ref_y, ref_g = run(sample.module(train), sample.input())
    m = sample.module(train)
    seen: dict[str, tuple] = {}

    def global_hook(mod, gi, go):
        if mod is m:
            seen.update(gi=gi, go=go)

    def global_pre(mod, go):
        if mod is m:
            seen.update(pre=go)

    m.register_full_backward_hook(lambda mod, gi, go: (gi[0] * 3,))
    handles = [
        nn.modules.module.register_module_full_backward_hook(global_hook),
        nn.modules.module.register_module_full_backward_pre_hook(global_pre),
    ]
    try:
        y, g = run(m, sample.input())
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(y, ref_y, **TOL)
    torch.testing.assert_close(g["input"], 3 * ref_g["input"], **TOL)
    torch.testing.assert_close(seen["pre"][0], _weights(y))
    torch.testing.assert_close(seen["gi"][0], ref_g["input"], **TOL)


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_forward_hooks_with_kwargs_and_an_input_replacing_pre_hook(sample: Sample, train: bool):
    x = sample.input()
    ref_y, ref_g = run(sample.module(train), 2 * x)
    m = sample.module(train)
    seen: dict[str, object] = {}
    m.register_forward_pre_hook(lambda mod, args: (args[0] * 2,))
    m.register_forward_hook(lambda mod, args, kwargs, out: seen.update(out=out, kw=kwargs), with_kwargs=True)
    y, g = run(m, x)
    torch.testing.assert_close(y, ref_y, **TOL)
    torch.testing.assert_close(g["input"], 2 * ref_g["input"], **TOL)
    for k in ref_g:
        if k != "input":
            torch.testing.assert_close(g[k], ref_g[k], **TOL)
    assert seen["kw"] == {}
    torch.testing.assert_close(seen["out"].detach(), y, rtol=0, atol=0)


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("name", list(TWINS))
def test_backward_hook_gradients_equal_the_torch_twin(name: str, train: bool):
    got = []
    for m in (_twin(name, train), by_name(name).module(train)):
        seen: dict[str, tuple] = {}
        m.register_full_backward_hook(lambda mod, gi, go, seen=seen: seen.update(gi=gi, go=go))
        run(m, by_name(name).input())
        got.append(seen)
    torch.testing.assert_close(got[1]["gi"][0], got[0]["gi"][0], **TOL)
    torch.testing.assert_close(got[1]["go"][0], got[0]["go"][0], rtol=0, atol=0)


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_saved_tensors_hooks_that_move_the_saved_tensors(sample: Sample, train: bool):
    """saved_tensors_hooks (activation offloading, memory tools) packing a copy in other memory: the
    backward reads what the hooks give back, not the original's pointer."""
    ref_y, ref_g = run(sample.module(train), sample.input())
    packed = []

    def pack(t):
        packed.append(1)
        return t.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, g = run(sample.module(train), sample.input())
    assert packed
    torch.testing.assert_close(y, ref_y, **TOL)
    for k in ref_g:
        torch.testing.assert_close(g[k], ref_g[k], **TOL)


# --- 5. torch.nn.utils, swa_utils, fusion --------------------------------------------------------------


class _Softplus(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return nn.functional.softplus(w)


class _Shared(nn.Module):
    """One value for every channel, as a view (stride 0): a parametrization that ties the channels."""

    def __init__(self, contiguous: bool = False) -> None:
        super().__init__()
        self.contiguous = contiguous

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if w.dim() != 1:
            return w
        shared = w[:1].expand_as(w)
        return shared.contiguous() if self.contiguous else shared


def _has_weight(sample: Sample) -> bool:
    w = getattr(sample.module(True), "weight", None)
    return isinstance(w, nn.Parameter)


WEIGHTED = [s for s in SAMPLES if _has_weight(s)]


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("sample", WEIGHTED, ids=[s.name for s in WEIGHTED])
def test_parametrized_weight(sample: Sample, train: bool):
    ref = sample.module(train)
    m = sample.module(train)
    parametrize.register_parametrization(m, "weight", _Softplus())
    with torch.no_grad():
        ref.weight.copy_(nn.functional.softplus(ref.weight))
    ref_y, ref_g = run(ref, sample.input())
    y, g = run(m, sample.input())
    torch.testing.assert_close(y, ref_y, **TOL)
    torch.testing.assert_close(g["input"], ref_g["input"], **TOL)
    original = m.parametrizations.weight.original.detach()
    torch.testing.assert_close(
        g["parametrizations.weight.original"], ref_g["weight"] * torch.sigmoid(original), **TOL
    )


def _shared_cases() -> list:
    return [
        pytest.param(s, train, id=f"{s.name}-{'train' if train else 'eval'}")
        for s in WEIGHTED
        for train in (True, False)
    ]


@pytest.mark.parametrize(("sample", "train"), _shared_cases())
def test_parametrization_giving_a_non_contiguous_weight(sample: Sample, train: bool):
    """A parametrization whose value is a view (stride 0) computes what the same value made contiguous
    computes: output, input gradient and the gradient of the parametrization's original. (Regressions: the
    fused Proxy Norm kernels read a strided parameter as dense, output off by 1.8; ATen's eval BatchNorm
    backward misreads a strided weight where the spatial size is 1, an input gradient off by 0.4.)"""
    results = []
    for contiguous in (True, False):
        m = sample.module(train)
        parametrize.register_parametrization(m, "weight", _Shared(contiguous))
        results.append(run(m, sample.input()))
    (ref_y, ref_g), (y, g) = results
    torch.testing.assert_close(y, ref_y, **TOL)
    for k in ref_g:
        torch.testing.assert_close(g[k], ref_g[k], **TOL, msg=lambda msg, k=k: f"grad of {k}: {msg}")


@pytest.mark.parametrize("param", ["weight", "proxy_weight"])
def test_proxy_norm_act_with_a_non_contiguous_parameter(param: str):
    """ProxyNormAct with an activation the kernels fuse (relu): _FastProxyStats passes the raw parameters."""
    results = []
    for contiguous in (True, False):
        torch.manual_seed(0)
        m = nkn.ProxyNormAct(6, activation="relu")
        with torch.no_grad():  # (distinct values per channel: the layer starts with ones and zeros)
            for p in m.parameters():
                p.add_(torch.linspace(-0.3, 0.3, p.numel()))
        parametrize.register_parametrization(m, param, _Shared(contiguous))
        results.append(run(m, torch.randn(4, 6, 5, 5)))
    (ref_y, ref_g), (y, g) = results
    torch.testing.assert_close(y, ref_y, **TOL)
    for k in ref_g:
        torch.testing.assert_close(g[k], ref_g[k], **TOL)


@pytest.mark.parametrize("how", ["weight_norm", "spectral_norm"])
@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("name", list(TWINS))
def test_weight_and_spectral_norm_of_a_norm_weight_match_torch(name: str, train: bool, how: str):
    got = []
    for m in (_twin(name, train), by_name(name).module(train)):
        torch.manual_seed(3)  # (spectral_norm's random start vector)
        getattr(parametrizations, how)(m, "weight")
        got.append(run(m, by_name(name).input()))
    (ref_y, ref_g), (y, g) = got
    torch.testing.assert_close(y, ref_y, **TOL)
    for k in ref_g:
        torch.testing.assert_close(g[k], ref_g[k], **TOL)


@pytest.mark.parametrize("norm", list(NORM_PAIRS))
def test_clip_grad_norm_and_parameters_to_vector_match_torch(norm: str):
    got = []
    for make in NORM_PAIRS[norm]:
        model = _conv_model(make()).train()
        model(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))).pow(2).sum().backward()
        total = nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
        grads = nn.utils.parameters_to_vector(p.grad for p in model.parameters())
        got.append((total, grads, nn.utils.parameters_to_vector(model.parameters())))
    for a, b in zip(*got):
        torch.testing.assert_close(b, a, **TOL)


BN_FAMILY = [s for s in SAMPLES if isinstance(s.module(False), _BatchNorm)]


def _channel_means(sample: Sample, batches: list[torch.Tensor]) -> torch.Tensor:
    c = len(sample.shape) - 1 if "keras" in sample.name else 1
    dims = [d for d in range(len(sample.shape)) if d != c]
    return torch.stack([b.mean(dims) for b in batches]).mean(0)


def _update_bn_batches(sample: Sample) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(sample.shape, generator=g) * (1 + i) + i for i in range(3)]


@pytest.mark.parametrize("sample", BN_FAMILY, ids=[s.name for s in BN_FAMILY])
def test_update_bn_recalibrates_every_bn_family_layer(sample: Sample):
    m = sample.module(False)
    momentum = m.momentum
    batches = _update_bn_batches(sample)
    torch.optim.swa_utils.update_bn(batches, m)
    torch.testing.assert_close(m.running_mean, _channel_means(sample, batches), **TOL)
    assert m.momentum == momentum and not m.training


def test_update_bn_leaves_mean_only_bn_alone_as_documented():
    sample = by_name("MeanOnlyBatchNorm")
    m = sample.module(False)
    before = m.running_mean.clone()
    torch.optim.swa_utils.update_bn(_update_bn_batches(sample), m)
    assert torch.equal(m.running_mean, before)


def test_keras_layout_layer_recalibrates_with_recalibrate_bn_not_update_bn():
    """The Keras-layout ``BatchNormalization`` (channels last, ``moving_mean``) is not a ``_BatchNorm``:
    ``swa_utils.update_bn`` leaves it alone, as differences.md says; ``normkit.recalibrate_bn`` recomputes
    its statistics as the plain average over the batches."""
    sample = by_name("BatchNormalization-keras")
    m = sample.module(False)
    batches = _update_bn_batches(sample)
    before = m.moving_mean.clone()
    torch.optim.swa_utils.update_bn(batches, m)
    assert torch.equal(m.moving_mean, before)
    normkit.recalibrate_bn(m, batches, progress=False)
    torch.testing.assert_close(m.moving_mean, _channel_means(sample, batches), **TOL)


FUSABLE = [s for s in BN_FAMILY if len(s.shape) == 4 and "Act" not in s.name]


@pytest.mark.parametrize("sample", FUSABLE, ids=[s.name for s in FUSABLE])
def test_fuse_conv_bn_eval(sample: Sample):
    bn = sample.module(False)
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1).eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        ref = bn(conv(x))
        fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)(x)
    torch.testing.assert_close(fused, ref, **TOL)


# --- 6. tensor subclasses and odd inputs -----------------------------------------------------------


class _LoggingTensor(torch.Tensor):
    calls: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_torch_function_subclass_and_parameter_inputs(sample: Sample, train: bool):
    ref = sample.module(train)
    ref_y, ref_g = run(ref, sample.input())
    # a __torch_function__ subclass: same values, the subclass comes out, the buffers stay plain tensors
    m = sample.module(train)
    x = sample.input().as_subclass(_LoggingTensor).requires_grad_()
    y = m(x)
    (y * _weights(y).as_subclass(_LoggingTensor)).sum().backward()
    assert type(y) is _LoggingTensor
    torch.testing.assert_close(y.as_subclass(torch.Tensor).detach(), ref_y, **TOL)
    assert x.grad is not None
    torch.testing.assert_close(x.grad.as_subclass(torch.Tensor), ref_g["input"], **TOL)
    for k, b in m.named_buffers():
        assert type(b) is torch.Tensor
        torch.testing.assert_close(b, ref.get_buffer(k), **TOL)
    # an nn.Parameter as the input
    p = nn.Parameter(sample.input())
    y = sample.module(train)(p)
    (y * _weights(y)).sum().backward()
    torch.testing.assert_close(y.detach(), ref_y, **TOL)
    torch.testing.assert_close(p.grad, ref_g["input"], **TOL)


def _jagged() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(3, 8, generator=g), torch.randn(5, 8, generator=g)]
    return torch.nested.nested_tensor(parts, layout=torch.jagged, requires_grad=True)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_layer_norm_of_a_jagged_nested_tensor(affine: bool):
    got = []
    for cls in (nn.LayerNorm, nkn.LayerNorm):
        torch.manual_seed(0)
        m = cls(8, elementwise_affine=affine)
        nt = _jagged()
        y = m(nt)
        (y.values() * _weights(y.values())).sum().backward()
        got.append((y.values().detach(), nt.grad.values()))
    for a, b in zip(*got):
        torch.testing.assert_close(b, a, **TOL)


NO_CONV = [s for s in SAMPLES if "StdConv" not in s.name]  # (the convolutions raise torch's conv errors)


@pytest.mark.parametrize(
    "dtype", [torch.complex64, torch.int64, torch.bool], ids=["complex64", "int64", "bool"]
)
@pytest.mark.parametrize("sample", NO_CONV, ids=[s.name for s in NO_CONV])
def test_complex_integer_and_bool_inputs_are_type_errors(sample: Sample, dtype: torch.dtype):
    x = sample.input()
    x = x.round().to(dtype) if dtype != torch.complex64 else x.to(dtype)
    with pytest.raises(TypeError, match="floating-point input"):
        sample.module(True)(x)


@pytest.mark.parametrize("name", ["BatchNorm2d", "GroupNorm", "LayerNorm", "InstanceNorm2d"])
def test_sparse_input_is_a_type_error_naming_the_layout(name: str):
    sample = by_name(name)
    with pytest.raises(TypeError, match="sparse|layout"):
        sample.module(True)(sample.input().to_sparse())


def _odd_strides(sample: Sample) -> dict:
    base, shape = sample.input(), sample.shape
    cases = {
        # two overlapping windows of one buffer: every sample's rows share memory
        "as_strided": (
            base.flatten()[: shape[-1] + 8].clone(),
            lambda t: t.as_strided(shape, (0,) * (len(shape) - 2) + (1, 1)),
        ),
        "flip": (base.clone(), lambda t: t.flip(-1)),
        "step": (torch.cat([base, base], -1), lambda t: t[..., ::2]),
    }
    if len(shape) > 2:  # (a 2-d input broadcast over the batch would leave each channel constant)
        cases["expand"] = (base[:1].clone(), lambda t: t.expand(shape))
    return cases


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_overlapping_and_odd_stride_inputs(sample: Sample, train: bool):
    """Inputs with internal overlap (stride 0, as_strided windows) and negative-direction / step views:
    output, the gradient reaching the leaf, parameter gradients and buffers as for a dense copy."""
    for case, (leaf, view) in _odd_strides(sample).items():
        results = []
        for dense in (True, False):
            m = sample.module(train)
            t = leaf.detach().clone().requires_grad_()
            x = view(t)
            y = m(x.contiguous() if dense else x)
            (y * _weights(y)).sum().backward()
            params = {k: p.grad for k, p in m.named_parameters()}
            results.append((y.detach(), t.grad, params, {k: b.clone() for k, b in m.named_buffers()}))
        (ry, rg, rp, rb), (y, g, p, b) = results
        msg = f"{case}: "
        torch.testing.assert_close(y, ry, **TOL, msg=lambda m, c=msg: c + m)
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-4, msg=lambda m, c=msg: c + m)
        for k in rp:
            torch.testing.assert_close(p[k], rp[k], rtol=1e-4, atol=1e-4, msg=lambda m, c=msg: c + m)
        for k in rb:
            torch.testing.assert_close(b[k], rb[k], **TOL, msg=lambda m, c=msg: c + m)
