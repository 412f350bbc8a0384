"""The PT2 export stack as a user who quantizes and deploys reaches it, against the same model built from
torch.nn's layers (or eager) as the oracle.

* torchao's PT2E quantization (torch 2.13 moved it out of ``torch.ao``; skipped where torchao is not
  installed): post-training (``prepare_pt2e`` / calibrate / ``convert_pt2e``) with the X86 Inductor
  quantizer on conv + BN-family layers (folded into the convolution as torch.nn's BN is), a dynamic batch
  and height, ``torch.compile`` of the converted model; quantization-aware training (``prepare_qat_pt2e``),
  where torchao's conv + BN folding and ``move_exported_model_to_eval`` match ATen's training-mode
  ``batch_norm`` node, which normkit's BatchNorm exports as torch.nn's does (it exported plain arithmetic:
  the converted model kept batch statistics and overwrote its running ones at inference), and the
  ``to_torch_nn`` way to torch.nn's graph node for node;
* other consumers of exported programs, without torchao: ``run_decompositions()`` to core ATen only,
  dynamic spatial dims (``Dim`` on the batch and every spatial dim), ``torch.export.unflatten`` and
  ``torch.export.draft_export``. (Decompositions without a normkit op, save / load, a dynamic batch and
  AOTInductor are test_toolchain.py's and test_deploy.py's.)
"""

from __future__ import annotations

import copy
import gc
import operator
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.export import Dim

import normkit
import normkit.nn as nkn
from tests.tolerances import Tol
from tests.toolchain.samples import SAMPLES, Sample
from tests.toolchain.test_deploy import _conv_bn_net, _Many

TOL: Tol = {"rtol": 1e-4, "atol": 1e-5}

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*(train|training).*:UserWarning"),
]


@pytest.fixture(scope="module")
def ao() -> Any:
    """torchao's PT2E entry points (torch 2.13 has none of its own)."""
    pytest.importorskip("torchao", reason="torchao (PT2E quantization for torch >= 2.13) is not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torchao.quantization.pt2e as pt2e
        import torchao.quantization.pt2e.quantize_pt2e as q
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    return q, x86, pt2e


def _x86(ao: Any, qat: bool = False) -> Any:
    _, x86, _ = ao
    return x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config(is_qat=qat))


def _targets(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


# a BN's step counter: torch.nn's add_, normkit's sum, add, copy_ (live_count: AOTInductor folds an add_)
_COUNTER = {"aten.add_.Tensor", "aten.sum.default", "aten.add.Tensor", "aten.copy_.default"}


def _without_counter(targets: list[str]) -> list[str]:
    return [t for t in targets if t not in _COUNTER]


def _perturb(m: nn.Module, seed: int = 7) -> nn.Module:
    """Non-trivial parameters and running statistics, the same for torch.nn's and normkit's copy (their
    parameters and buffers come in the same order)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(m.named_parameters()) + list(m.named_buffers()):
            if not p.is_floating_point():
                continue
            noise = torch.rand(p.shape, generator=g)
            if name.endswith("running_var"):
                p.copy_(0.5 + noise)
            else:
                p.add_(0.3 * (noise - 0.5))
    return m


# ---- post-training quantization ------------------------------------------------------------------


class _Branches(nn.Module):
    """Conv + each BN-family layer (and GN / IN / Linear + BN1d / LN), side by side on one input."""

    def __init__(self, lib: Any) -> None:
        super().__init__()
        ours = lib is nkn
        bn = lib.BatchNorm2d

        def conv() -> nn.Conv2d:
            return nn.Conv2d(3, 6, 3)

        self.convs = nn.ModuleList([conv() for _ in range(8)])
        self.norms = nn.ModuleList(
            [
                bn(6),
                nkn.BatchNormAct2d(6, activation="relu") if ours else nn.Sequential(bn(6), nn.ReLU()),
                nkn.SyncBatchNorm(6) if ours else bn(6),
                nkn.FrozenBatchNorm2d(6) if ours else bn(6),
                nkn.GhostBatchNorm2d(6, ghost_batch_size=2) if ours else bn(6),
                nkn.BatchRenorm2d(6) if ours else bn(6),
                lib.GroupNorm(2, 6),
                lib.InstanceNorm2d(6, affine=True),
            ]
        )
        self.relus = nn.ModuleList([nn.ReLU() for _ in range(8)])
        self.fc, self.bn1d = nn.Linear(3, 5), lib.BatchNorm1d(5)
        self.fc2, self.ln = nn.Linear(5, 4), lib.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ys = [r(n(c(x))) for c, n, r in zip(self.convs, self.norms, self.relus)]
        z = self.bn1d(self.fc(x.mean((2, 3))))
        return (*ys, self.ln(self.fc2(z)))


def _branches(lib: Any) -> nn.Module:
    """The branches of ``lib``'s layers, all holding torch.nn's model's parameters and statistics."""
    torch.manual_seed(0)
    ref = _perturb(_Branches(nn)).eval()
    if lib is nn:
        return ref
    ours = _Branches(nkn).eval()
    state = {k.replace("norms.1.0.", "norms.1."): v for k, v in ref.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    return ours


def _data(n: int, shape: tuple[int, ...], seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def ptq(ao):
    """Each library's model exported in eval, prepared with the X86 Inductor quantizer, calibrated on
    three batches, converted: ``{lib: (float model, converted, input)}``."""
    q, _, _ = ao
    *calib, x = _data(4, (8, 3, 10, 10))
    out = {}
    for lib in (nn, nkn):
        fp = _branches(lib)
        prepared = q.prepare_pt2e(torch.export.export(copy.deepcopy(fp), (x,)).module(), _x86(ao))
        for c in calib:
            prepared(c)
        out[lib.__name__] = (fp, q.convert_pt2e(prepared), x)
    return out


def test_ptq_x86_folds_every_bn_family_layer_and_equals_torch_nn(ptq):
    """Conv + BN, BatchNormAct2d, SyncBatchNorm, Frozen, Ghost and Renorm BN in eval export ATen's
    batch_norm: ``prepare_pt2e`` folds each into its convolution (Linear + BN1d too), the quantizer
    annotates the same nodes, and the quantized model computes torch.nn's quantized model's outputs."""
    _, ref, x = ptq["torch.nn"]
    _, ours, _ = ptq["normkit.nn"]
    for gm in (ref, ours):
        assert not [t for t in _targets(gm) if "batch_norm" in t]
    count = [sum("quantize_per" in t for t in _targets(gm)) for gm in (ref, ours)]
    assert count[0] == count[1] > 0
    with torch.no_grad():
        for i, (a, b) in enumerate(zip(ref(x), ours(x))):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=lambda m, i=i: f"output {i}: {m}")


def _conv_bn(lib: Any) -> nn.Module:
    """conv + BN + ReLU + conv + BN (test_deploy's net without its head), perturbed."""
    return _perturb(_conv_bn_net(lib)[:5])


def test_ptq_x86_converted_model_compiles_with_freezing(ao):
    """``torch.compile`` of normkit's converted conv + BN net with Inductor's freezing (its int8 lowering)
    runs and equals the converted model (Inductor's own rounding: within a tenth of a quantization step)."""
    q, _, _ = ao
    *calib, x = _data(3, (4, 3, 8, 8))
    prepared = q.prepare_pt2e(torch.export.export(_conv_bn(nkn).eval(), (x,)).module(), _x86(ao))
    for c in calib:
        prepared(c)
    converted = q.convert_pt2e(prepared)
    torch._dynamo.reset()
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        torch.testing.assert_close(torch.compile(converted)(x), converted(x), rtol=0, atol=1e-3)


def test_ptq_x86_with_a_dynamic_batch_and_height_equals_torch_nn(ao):
    """Exported with ``Dim`` on the batch and the height, calibrated on three sizes, run on a fourth."""
    q, _, _ = ao
    got = {}
    x = torch.randn(5, 3, 9, 12, generator=torch.Generator().manual_seed(0))
    for lib in (nn, nkn):
        dims = ({0: Dim("b", min=2, max=32), 2: Dim("h", min=4, max=32)},)
        program = torch.export.export(_conv_bn(lib).eval(), (torch.randn(4, 3, 12, 12),), dynamic_shapes=dims)
        prepared = q.prepare_pt2e(program.module(), _x86(ao))
        for n in (4, 6, 8):
            prepared(torch.randn(n, 3, 12 + n, 12, generator=torch.Generator().manual_seed(n)))
        with torch.no_grad():
            got[lib.__name__] = q.convert_pt2e(prepared)(x)
    torch.testing.assert_close(got["normkit.nn"], got["torch.nn"], rtol=0, atol=1e-6)


# ---- quantization-aware training ----------------------------------------------------------------


def _qat(ao: Any, net: nn.Module, convert: bool = False) -> tuple[torch.fx.GraphModule, Any]:
    """``prepare_qat_pt2e`` of ``net`` exported in training, three training forwards (observers and
    running statistics), ``move_exported_model_to_eval``, then ``convert_pt2e`` (``None`` unless
    ``convert``: that costs about 15 s where the graph has a BN node to fold, tracing torchao's patterns)."""
    q, _, pt2e = ao
    *steps, x = _data(4, (8, 3, 10, 10), seed=3)
    prepared = q.prepare_qat_pt2e(torch.export.export(net.train(), (x,)).module(), _x86(ao, qat=True))
    for s in steps:
        prepared(s)
    pt2e.move_exported_model_to_eval(prepared)
    return prepared, q.convert_pt2e(copy.deepcopy(prepared)) if convert else None


@pytest.fixture(scope="module")
def qat(ao):
    """The conv + BN net of each library through QAT (no optimizer step: the weights stay equal, so
    torch.nn's model is the oracle), and normkit's after ``to_torch_nn``. torch.nn's prepared model in
    eval (the fake-quantized simulation of the converted one) stands for its converted model, which it
    equals within 1.5 quantization steps of the output (0.04) at 15 s less."""
    out = {
        "torch.nn": _qat(ao, _conv_bn(nn)),
        "normkit.nn": _qat(ao, _conv_bn(nkn), convert=True),
        "to_torch_nn": _qat(ao, normkit.surgery.to_torch_nn(_conv_bn(nkn)).model),
    }
    return out, _data(1, (8, 3, 10, 10), seed=9)[0]


def test_qat_after_to_torch_nn_prepares_as_torch_nn(qat):
    """The documented way around exact-type tooling: after ``to_torch_nn`` the QAT graph is torch.nn's
    (conv + BN folded into the simulated quantized convolution) and computes the same."""
    runs, x = qat
    ours, ref = runs["to_torch_nn"][0], runs["torch.nn"][0]
    assert _targets(ours) == _targets(ref)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)


def test_qat_x86_prepares_conv_bn_as_torch_nn(qat):
    """``prepare_qat_pt2e`` folds conv + training BN into the simulated quantized convolution
    (``_fuse_conv_bn_qat``) and ``move_exported_model_to_eval`` switches the BN to its running
    statistics: normkit's graph has torch.nn's ops. One annotation differs: the X86 quantizer finds a
    conv + BN pair that ends the model by the class name in ``nn_module_stack`` (torch.fx's source
    matcher compares the name exactly), so torch.nn's model rounds its final output to its observer's
    grid and normkit's does not: within 1.5 steps of that grid (docs/differences.md; the observer still
    moves its grid with each batch in eval, as torchao leaves it)."""
    runs, x = qat
    ours, ref = runs["normkit.nn"][0], runs["torch.nn"][0]
    assert _without_counter(_targets(ours)) == _without_counter(_targets(ref))
    with torch.no_grad():
        got, want = ours(x), ref(x)
    step = float(ref.get_submodule("activation_post_process_4").scale)
    torch.testing.assert_close(got, want, rtol=0, atol=1.5 * step)


def test_qat_x86_converted_model_equals_torch_nn(qat):
    """normkit's converted model against torch.nn's QAT model: within 0.1 (three quantization steps) as
    torch.nn's own converted model is; it keeps the batch-statistics BN and is off by more than the
    output's range."""
    runs, x = qat
    with torch.no_grad():
        torch.testing.assert_close(runs["normkit.nn"][1](x), runs["torch.nn"][0](x), rtol=0, atol=0.1)


def test_qat_model_in_eval_leaves_its_running_statistics_alone(qat):
    """After ``move_exported_model_to_eval`` the QAT model reads its running statistics (its observers
    and ``num_batches_tracked`` still count, as torchao leaves them), torch.nn's and normkit's, prepared
    and converted (normkit's overwrote them with each inference batch)."""
    runs, x = qat
    for name, model in (("torch.nn", runs["torch.nn"][0]), *(("normkit.nn", m) for m in runs["normkit.nn"])):
        stats = {k: v for k, v in model.named_buffers() if k.endswith(("running_mean", "running_var"))}
        assert stats
        before = {k: v.clone() for k, v in stats.items()}
        with torch.no_grad():
            model(x)
        changed = [k for k, v in stats.items() if not torch.equal(v, before[k])]
        assert not changed, f"{name}: inference changed {changed}"


# ---- move_exported_model_to_eval ---------------------------------------------------------------

MOVABLE: dict[str, Callable[[Any], nn.Module]] = {
    "BatchNorm2d": lambda lib: lib.BatchNorm2d(6),
    "BatchNorm1d": lambda lib: lib.BatchNorm1d(6),
    "SyncBatchNorm": lambda lib: lib.SyncBatchNorm(6),
    "BatchNormAct2d": lambda lib: (
        nkn.BatchNormAct2d(6, activation="relu")
        if lib is nkn
        else nn.Sequential(nn.BatchNorm2d(6), nn.ReLU())
    ),
    "GroupNorm": lambda lib: lib.GroupNorm(2, 6),
    "InstanceNorm2d": lambda lib: lib.InstanceNorm2d(6, affine=True),
    "LayerNorm2d": lambda lib: nkn.LayerNorm2d(6) if lib is nkn else nn.GroupNorm(1, 6),
}


def _movable_cases() -> list[Any]:
    cases = []
    for name in MOVABLE:
        for lib in (nn, nkn):
            if lib is nn and name == "LayerNorm2d":
                continue  # (no torch.nn class: GroupNorm(1) is another norm)
            cases.append(pytest.param(lib, name, id=f"{lib.__name__}-{name}"))
    return cases


@pytest.mark.parametrize(("lib", "name"), _movable_cases())
def test_exported_training_graph_moves_to_eval_as_eager(ao, lib: Any, name: str):
    """torchao's ``move_exported_model_to_eval`` (what a QAT loop calls before evaluating or converting)
    turns an exported training graph into the eval one, as eager ``.eval()`` does: for torch.nn's BN it
    rewrites the ``batch_norm(training=True)`` node, which normkit's BN exports too (its graph kept
    batch statistics before: an error of the size of the activations)."""
    _, _, pt2e = ao
    one_d = name == "BatchNorm1d"
    torch.manual_seed(0)
    net = _perturb(nn.Sequential((nn.Conv1d if one_d else nn.Conv2d)(3, 6, 3), MOVABLE[name](lib)))
    x = _data(1, (8, 3, 7) if one_d else (8, 3, 7, 7), seed=4)[0]
    eager = copy.deepcopy(net).eval()
    moved = pt2e.move_exported_model_to_eval(torch.export.export(net.train(), (x,)).module())
    with torch.no_grad():
        torch.testing.assert_close(moved(x), eager(x), **TOL)


# ---- other consumers of exported programs (no torchao) ---------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda lib: lib.BatchNorm2d(6),
        lambda lib: lib.BatchNorm1d(6),
        lambda lib: lib.SyncBatchNorm(6),
        lambda lib: nkn.BatchNormAct2d(6) if lib is nkn else nn.Sequential(nn.BatchNorm2d(6), nn.ReLU()),
    ],
    ids=["BatchNorm2d", "BatchNorm1d", "SyncBatchNorm", "BatchNormAct2d"],
)
def test_training_bn_exports_torch_nns_graph(make: Callable[[Any], nn.Module]):
    """BatchNorm's training step exports as torch.nn's: the same ATen ops (``batch_norm(training=True)``
    on the buffers, what torchao and other graph tools match), the same output and buffer updates from the
    exported module, with and without a dynamic batch."""
    one_d = "BatchNorm1d" in str(make(nkn))
    x = _data(1, (8, 6, 5) if one_d else (8, 6, 5, 5), seed=2)[0]
    graphs, runs = {}, {}
    for lib in (nn, nkn):
        net = _perturb(nn.Sequential(make(lib))).train()
        program = torch.export.export(net, (x,), dynamic_shapes=({0: Dim("b", min=2, max=64)},))
        graphs[lib.__name__] = [t for t in _targets(program.module()) if not t.startswith("<")]
        module = program.module()
        with torch.no_grad():
            out = module(x[:5])
        runs[lib.__name__] = (out, [b.clone() for b in module.buffers() if b.is_floating_point()])
    ours, theirs = (_without_counter(graphs[k]) for k in ("normkit.nn", "torch.nn"))
    assert "aten.batch_norm.default" in ours and ours == theirs, (ours, theirs)
    torch.testing.assert_close(runs["normkit.nn"][0], runs["torch.nn"][0], **TOL)
    for a, b in zip(runs["normkit.nn"][1], runs["torch.nn"][1], strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_training_bn_export_keeps_normkits_errors():
    """One value per channel: normkit's NormError at export, as in eager (not a ZeroDivisionError from
    torch's decomposition, nor, without running statistics, a graph of a meaningless step)."""
    x = torch.randn(1, 3, 1, 1)
    for m in (nkn.BatchNorm2d(3).train(), nkn.BatchNorm2d(3, track_running_stats=False).eval()):
        with pytest.raises(normkit.NormError, match="more than 1 value per channel"):
            torch.export.export(nn.Sequential(m), (x,))


@pytest.fixture(scope="module", params=[False, True], ids=["eval", "train"])
def every_sample(request):
    train = request.param
    xs = tuple(s.input() for s in SAMPLES)
    return train, xs, torch.export.export(_Many([s.module(train) for s in SAMPLES]), xs)


def test_run_decompositions_leaves_core_aten_ops_only(every_sample):
    """Every op of the decomposed program is in the core ATen opset (what ExecuTorch and other backends
    take), as for torch.nn's layers; ``_assert_tensor_metadata`` is torch.export's own check of a
    ``.to()`` call, left by ``run_decompositions`` in any model that calls ``.to()``."""
    _, _, program = every_sample
    core = program.run_decompositions()
    outside = {
        str(n.target)
        for n in core.graph.nodes
        if n.op == "call_function"
        and n.target is not operator.getitem
        and n.target is not torch.ops.aten._assert_tensor_metadata.default
        # (torch.nn's BN in training decomposes to it too: the functional form of ATen's batch_norm)
        and n.target is not torch.ops.aten._native_batch_norm_legit_functional.default
        and not (isinstance(n.target, torch._ops.OpOverload) and torch.Tag.core in n.target.tags)
    }
    assert not outside


def test_unflatten_keeps_the_hierarchy_and_equals_eager(every_sample):
    """``torch.export.unflatten``: one submodule per layer, with the layer's parameters and buffers under
    its own path, and eager's outputs."""
    train, xs, program = every_sample
    module = torch.export.unflatten(program)
    ref = _Many([s.module(train) for s in SAMPLES])
    for i in range(len(SAMPLES)):
        theirs = dict(module.get_submodule(f"layers.{i}").named_parameters())
        assert set(theirs) == {k for k, _ in ref.layers[i].named_parameters()}
    with torch.no_grad():
        for s, a, b in zip(SAMPLES, ref(*xs), module(*xs)):
            torch.testing.assert_close(b, a, **TOL, msg=lambda m, n=s.name: f"{n}: {m}")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_draft_export_reports_no_failure(train: bool):
    xs = tuple(s.input() for s in SAMPLES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.draft_export(_Many([s.module(train) for s in SAMPLES]), xs)
        failures = [str(f.failure_type) for f in program._report.failures]
        # (draft_export leaves a log file of its own open: closed here, not in whichever test runs next)
        del program
        gc.collect()
    assert not failures, failures


def _dynamic(s: Sample) -> dict[int, Dim]:
    """``Dim`` on the batch (Ghost BN's: whole ghost batches) and every spatial dim of the sample."""
    name = s.name.replace("+", "_").replace(":", "_").replace("-", "_")
    if s.name == "BatchNormalization-keras":
        spatial = (1, 2)  # (N, H, W, C)
    elif s.name == "LayerNorm-2dims" or len(s.shape) == 2:
        spatial = ()  # (the normalized shape is fixed; (N, C) features have no spatial dim)
    elif s.name.startswith("LayerNorm"):
        spatial = (1,) if len(s.shape) == 3 else (2, 3)
    else:
        spatial = tuple(range(2, len(s.shape)))
    dims: dict[int, Dim] = {i: Dim(f"{name}_{i}", min=2, max=64) for i in spatial}
    dims[0] = (
        2 * Dim(f"{name}_k", min=2, max=32)
        if s.name == "GhostBatchNorm2d"
        else Dim(f"{name}_0", min=2, max=64)
    )
    return dims


def _grown(s: Sample, dims: dict[int, Any], seed: int) -> torch.Tensor:
    shape = [n + (2 if i in dims else 0) for i, n in enumerate(s.shape)]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.3
    return x.contiguous(memory_format=torch.channels_last) if s.channels_last else x


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_export_with_dynamic_spatial_dims_runs_other_sizes_as_eager(train: bool):
    """``Dim`` on the batch and on every spatial dim of every sample layer (test_toolchain.py covers the
    batch alone), then the program run on two larger inputs: eager's outputs and running statistics."""
    dims = [_dynamic(s) for s in SAMPLES]
    xs = tuple(s.input() for s in SAMPLES)
    program = torch.export.export(
        _Many([s.module(train) for s in SAMPLES]), xs, dynamic_shapes=(tuple(dims),)
    )
    module, ref = program.module(), _Many([s.module(train) for s in SAMPLES])
    for seed in (5, 6):
        grown = tuple(_grown(s, d, seed) for s, d in zip(SAMPLES, dims))
        with torch.no_grad():
            for s, a, b in zip(SAMPLES, ref(*grown), module(*grown)):
                assert b.shape == a.shape
                torch.testing.assert_close(b, a, **TOL, msg=lambda m, n=s.name: f"{n}: {m}")
    ours = dict(module.named_buffers())
    for name, v in ref.named_buffers():
        torch.testing.assert_close(ours[name], v, **TOL, msg=lambda m, n=name: f"buffer {n}: {m}")
