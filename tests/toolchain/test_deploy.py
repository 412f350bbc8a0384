"""Deployment paths a user of normkit's layers reaches for once a model is trained, each against an
independent oracle (eager, or the same model built from torch.nn's layers).

* AOTInductor (``aoti_compile_and_package`` / ``aoti_load_package``): every sample layer, eval and
  train mode in one package (compiles cost 10-30 s each: one module-scoped package serves every test),
  a dynamic batch dim; in training the package's buffer writes land in the module's own tensors
  (constants handed in ``user_managed``), so the running statistics are compared with eager's;
* torch.ao quantization: FX graph mode (``prepare_fx`` / ``convert_fx``, ``prepare_qat_fx``), eager mode
  (``QuantStub``, ``prepare`` / ``convert``), ``quantize_dynamic``: against the same model of torch.nn's;
* TorchScript: ``torch.jit.script`` of every sample layer, ``freeze`` + ``optimize_for_inference``;
* ``torch.export`` with ``strict=True``, ``run_decompositions()``, ``ExportedProgram.module()``'s
  train/eval, and artifacts loaded in a process that never imports normkit.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import normkit
import normkit.nn as nkn
from tests.tolerances import Tol
from tests.toolchain.samples import SAMPLES, Sample

TOL: Tol = {"rtol": 1e-4, "atol": 1e-5}

pytestmark = [
    # torch.ao (deprecated in 2.13), pytree's LeafSpec in AOTI's loader, "exporting in training mode"
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*(train|training).*:UserWarning"),
    # torch.ao's x86 qconfig and quantized tensors (deprecated in 2.13)
    pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max:UserWarning"),
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning"),
]


# ---- AOTInductor ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One layer of the shared AOTI package: a sample in a mode, with or without a dynamic batch."""

    sample: Sample
    train: bool

    @property
    def key(self) -> str:
        return f"{self.sample.name}-{'train' if self.train else 'eval'}"

    @property
    def dynamic(self) -> bool:
        # Ghost BN's program takes the batch it was exported with (docs/differences.md)
        return not self.sample.name.startswith("GhostBatchNorm2d")

    def input(self, batch: int, seed: int) -> torch.Tensor:
        if not self.dynamic:
            batch = self.sample.shape[0]
        g = torch.Generator().manual_seed(seed)
        shape = (batch, *self.sample.shape[1:])
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 0.3).float()
        return x.contiguous(memory_format=torch.channels_last) if self.sample.channels_last else x


# Layers whose training step reads a counter or takes a cumulative average (not in SAMPLES)
EXTRA_TRAIN = [
    Sample("BatchNorm2d-momentum-None", lambda: nkn.BatchNorm2d(6, momentum=None), (4, 6, 5, 5)),
    Sample(
        "InstanceNorm2d-momentum-None",
        lambda: nkn.InstanceNorm2d(6, affine=True, track_running_stats=True, momentum=None),
        (4, 6, 5, 5),
    ),
    Sample(
        "GhostBatchNorm2d-momentum-None",
        lambda: nkn.GhostBatchNorm2d(6, ghost_batch_size=2, momentum=None),
        (4, 6, 5, 5),
    ),
    Sample("BatchRenorm2d-warmup", lambda: nkn.BatchRenorm2d(6, warmup_steps=4), (4, 6, 5, 5)),
]


def _has_running_stats(s: Sample) -> bool:
    """A layer whose training step differs from its eval step (a layer without running statistics, or
    Frozen BN, computes the same in both: its eval entry covers it)."""
    m = s.module(True)
    return m.training and any(n.endswith(("running_mean", "moving_mean")) for n, _ in m.named_buffers())


# every sample in eval mode; in training the ones with running statistics (one package: compiles cost)
# (SyncBatchNorm without a process group is BatchNorm's training step: its 4d sample stands for the others)
_SAME_TRAIN_STEP = {"BatchNorm1d-3d", "SyncBatchNorm-2d", "SyncBatchNorm-cl"}
ENTRIES = [Entry(s, False) for s in SAMPLES] + [
    Entry(s, True)
    for s in [*SAMPLES, *EXTRA_TRAIN]
    if _has_running_stats(s) and s.name not in _SAME_TRAIN_STEP
]
# (batch, seed) of the package's calls: a training layer sees them in turn, each from the state left before
STEPS = ((4, 11), (7, 12), (4, 13))


class _Many(nn.Module):
    def __init__(self, mods: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(mods)

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(m(x) for m, x in zip(self.layers, xs))


def _modules() -> _Many:
    return _Many([e.sample.module(e.train) for e in ENTRIES])


@pytest.fixture(scope="module")
def aoti_runs(tmp_path_factory):
    """Every entry through one AOTI package (dynamic batch), called on STEPS; the eager model on the same.

    Returns ``(package_path, eager_outputs, aoti_outputs, eager_model, aoti_model)``: outputs per step,
    models whose buffers are the state after the steps (the package writes into ``aoti_model``'s own
    tensors: its constants are handed in ``user_managed``)."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        pytest.skip(f"AOTInductor compiles C++: no {compiler} on this machine (set CXX)")
    torch._dynamo.reset()
    ref, m = _modules(), _modules()
    batch = torch.export.Dim("batch", min=2, max=64)
    xs = tuple(e.input(4, 1) for e in ENTRIES)
    dyn = tuple({0: batch} if e.dynamic else None for e in ENTRIES)
    path = str(tmp_path_factory.mktemp("aoti") / "model.pt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(m, xs, dynamic_shapes=(dyn,))
        path = torch._inductor.aoti_compile_and_package(program, package_path=path)
        runner = torch._inductor.aoti_load_package(path)
    tensors = {**dict(m.named_parameters()), **dict(m.named_buffers())}
    runner.load_constants(
        {k: tensors[k] for k in runner.get_constant_fqns()}, check_full_update=True, user_managed=True
    )
    want, got = [], []
    for n, seed in STEPS:
        xs = tuple(e.input(n, seed) for e in ENTRIES)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want.append(ref(*xs))
            got.append(runner(*xs))
    return path, want, got, ref, m


def _index(key: str) -> int:
    return [e.key for e in ENTRIES].index(key)


EVAL_KEYS = [e.key for e in ENTRIES if not e.train]
TRAIN_KEYS = [e.key for e in ENTRIES if e.train]


@pytest.mark.parametrize(
    "key",
    EVAL_KEYS + TRAIN_KEYS,
)
def test_aoti_package_outputs_equal_eager(aoti_runs, key: str):
    """Each call's output (batches 4, 7, 4 through one package with a dynamic batch dim; Ghost BN keeps
    its batch) equals eager's; in training each call sees the state the previous ones left. (AOTInductor
    folds arithmetic on a one-element buffer alone into its compile-time value: Batch Renorm's warm-up
    was stuck at step 0 until its limits read ``num_batches_tracked`` through ``live_count``.)"""
    _, want, got, _, _ = aoti_runs
    i = _index(key)
    for step, (w, g) in enumerate(zip(want, got)):
        torch.testing.assert_close(g[i], w[i], **TOL, msg=lambda m, s=step: f"step {s}: {m}")


@pytest.mark.parametrize("key", TRAIN_KEYS)
def test_aoti_training_updates_the_running_statistics_as_eager(aoti_runs, key: str):
    """After three training calls of the package the running statistics and step counter (the module's own
    tensors, handed to the package user-managed) equal eager's after the same three steps (``momentum=None``
    restarted its cumulative average at every step while its weight read the counter alone)."""
    _, _, _, ref, m = aoti_runs
    i = _index(key)
    ours = dict(m.layers[i].named_buffers())
    for name, want in ref.layers[i].named_buffers():
        if name == "num_skipped_updates":
            continue  # (test_aoti_training_counts_no_skipped_update)
        torch.testing.assert_close(ours[name], want, **TOL, msg=lambda msg, n=name: f"{n}: {msg}")


def test_aoti_training_counts_no_skipped_update(aoti_runs):
    """``num_skipped_updates`` stays 0 over three finite steps (it went down by one per step while the
    step was counted as ``num_batches_tracked + 1 - new_count``, the first term folded to a constant)."""
    _, _, _, ref, m = aoti_runs
    wrong = {}
    for (path, want), got in zip(ref.named_buffers(), m.buffers()):
        if path.endswith("num_skipped_updates") and not torch.equal(got, want):
            wrong[path] = (want.item(), got.item())
    assert not wrong, f"num_skipped_updates (eager, aoti): {wrong}"


def test_aoti_package_and_saved_program_run_in_a_process_without_normkit(aoti_runs, tmp_path):
    """The AOTI package and a saved ``torch.export`` program of every sample layer load and compute eager's
    outputs in a process that imports torch only (no normkit op or class is needed to run them)."""
    path, want, _, _, _ = aoti_runs
    evals = [e for e in ENTRIES if not e.train]
    model = _Many([e.sample.module(False) for e in evals])
    xs = tuple(e.input(4, 21) for e in evals)
    with torch.no_grad():
        expected = model(*xs)
    program = tmp_path / "program.pt2"
    torch.export.save(torch.export.export(model, xs), program)
    torch.save(
        {"xs": xs, "want": expected, "aoti_x": tuple(e.input(4, 11) for e in ENTRIES)}, tmp_path / "io.pt"
    )
    n_eval = len(evals)
    code = f"""
import sys, warnings
warnings.simplefilter("ignore")
import torch
io = torch.load({str(tmp_path / "io.pt")!r})
program = torch.export.load({str(program)!r}).module()
with torch.no_grad():
    got = program(*io["xs"])
    aoti = torch._inductor.aoti_load_package({path!r})(*io["aoti_x"])
for a, b in zip(got, io["want"]):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
torch.save(aoti[:{n_eval}], {str(tmp_path / "aoti_out.pt")!r})
print("normkit" in sys.modules)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "False", "loading the artifacts imported normkit"
    # the package's eval layers, on the first step's input, in the fresh process: eager's outputs
    got = torch.load(tmp_path / "aoti_out.pt")
    for a, b in zip(got, want[0][:n_eval]):
        torch.testing.assert_close(a, b, **TOL)


# ---- torch.ao quantization -----------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _x86_engine(request):
    """The quantization tests run torch's x86 quantized kernels (FBGEMM / oneDNN)."""
    quantizes = any(k in request.node.name for k in ("ptq", "qat", "quantiz"))
    if quantizes and "x86" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch build has no x86 quantized engine (FBGEMM / oneDNN)")


def _conv_bn_net(lib) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        lib.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        lib.BatchNorm2d(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for bn in (net[1], net[4]):
            assert isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None
            assert bn.running_var is not None
            bn.running_mean.copy_(torch.rand(8, generator=g) - 0.5)
            bn.running_var.copy_(torch.rand(8, generator=g) * 1.5 + 0.5)
            bn.weight.copy_(torch.rand(8, generator=g) + 0.5)
            bn.bias.copy_(torch.rand(8, generator=g) * 0.4 - 0.2)
    return net.eval()


def _calibration() -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 16, 16, generator=g) for _ in range(4)], torch.randn(16, 3, 16, 16, generator=g)


def _ptq_fx(lib) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    calib, x = _calibration()
    fp = _conv_bn_net(lib)
    plain = normkit.surgery.to_torch_nn(fp).model if lib is nkn else copy.deepcopy(fp)
    prepared = prepare_fx(plain, get_default_qconfig_mapping("x86"), (x,))
    for c in calib:
        prepared(c)
    return fp, convert_fx(prepared), x


def _kinds(model: nn.Module) -> list[str]:
    return [type(m).__name__ for _, m in model.named_children()]


def test_fx_ptq_of_normkit_bn_runs_and_is_as_accurate_as_torch_nn():
    ours_fp, ours_q, x = _ptq_fx(nkn)
    ref_fp, ref_q, _ = _ptq_fx(nn)
    with torch.no_grad():
        ours_err = (ours_q(x) - ours_fp(x)).abs().max().item()
        ref_err = (ref_q(x) - ref_fp(x)).abs().max().item()
    assert ours_err <= 2 * ref_err + 1e-3, (ours_err, ref_err)


def test_fx_ptq_after_to_torch_nn_fuses_conv_bn_relu_as_for_torch_nn():
    """FX graph mode quantization matches torch.ao's fusion patterns by exact type: normkit's BN stayed a
    float module between a dequantize and a quantize. After ``normkit.surgery.to_torch_nn`` the model
    quantizes into the same modules as torch.nn's (a ConvReLU2d and a Conv2d), with the same output."""
    _, ours, x = _ptq_fx(nkn)
    _, ref, _ = _ptq_fx(nn)
    assert _kinds(ours) == _kinds(ref)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)


def test_fx_qat_after_to_torch_nn_fuses_conv_bn_as_for_torch_nn():
    """``prepare_qat_fx`` builds torch.ao's ConvBn2d / ConvBnReLU2d QAT modules (the folded-BN simulation)
    from the model ``to_torch_nn`` returns, as from torch.nn's."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    _, x = _calibration()
    kinds = {}
    for lib in (nn, nkn):
        net = _conv_bn_net(lib).train()
        if lib is nkn:
            net = normkit.surgery.to_torch_nn(net).model
        kinds[lib.__name__] = [
            k
            for k in _kinds(prepare_qat_fx(net, get_default_qat_qconfig_mapping("x86"), (x,)))
            if "Quant" not in k
        ]
    assert kinds["normkit.nn"] == kinds["torch.nn"]


class _StubNet(nn.Module):
    def __init__(self, lib) -> None:
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub

        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 8, 3, padding=1), lib.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), lib.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        return self.dequant(self.bn2(self.conv2(self.relu(self.bn(self.conv(x))))))


def _stub_net(lib) -> nn.Module:
    torch.manual_seed(0)
    net = _StubNet(lib)
    with torch.no_grad():
        for bn in (net.bn, net.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _eager_static_quant(lib, fuse: bool) -> tuple[nn.Module, nn.Module]:
    import torch.ao.quantization as tq

    net = _stub_net(lib)
    net.qconfig = tq.get_default_qconfig("x86")  # pyright: ignore[reportArgumentType]
    if fuse:
        mapping = {
            (nn.Conv2d, nkn.BatchNorm2d): tq.fuser_method_mappings.fuse_conv_bn,
            (nn.Conv2d, nkn.BatchNorm2d, nn.ReLU): tq.fuser_method_mappings.fuse_conv_bn_relu,
        }
        net = tq.fuse_modules(
            net,
            [["conv", "bn", "relu"], ["conv2", "bn2"]],
            fuse_custom_config_dict={"additional_fuser_method_mapping": mapping},
        )
    prepared = tq.prepare(copy.deepcopy(net))
    calib, _ = _calibration()
    for c in calib:
        prepared(c)
    return _stub_net(lib), tq.convert(prepared)


def test_eager_static_quantization_with_the_documented_fuser_mapping_equals_torch_nn():
    """differences.md's ``additional_fuser_method_mapping``: fused, quantized, and the same as torch.nn's."""
    _, x = _calibration()
    _, ours = _eager_static_quant(nkn, fuse=True)
    _, ref = _eager_static_quant(nn, fuse=True)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)


def test_eager_static_quantization_without_fusion_names_to_torch_nn_and_runs_after_it():
    """torch.ao's ``prepare`` / ``convert`` swap BatchNorm2d for the quantized one by exact type, so normkit's
    BN stayed float and got the quantized convolution output, with a TypeError advising ``x.float()`` (which
    fails on a quantized tensor). The error now names ``to_torch_nn``; after it the model quantizes as
    torch.nn's does, with the same output."""
    import torch.ao.quantization as tq

    _, x = _calibration()
    net = _stub_net(nkn)
    net.qconfig = tq.get_default_qconfig("x86")  # pyright: ignore[reportArgumentType]
    prepared = tq.prepare(copy.deepcopy(net))
    prepared(x)
    with pytest.raises(TypeError, match=r"quantized .*to_torch_nn"):
        tq.convert(prepared)(x)
    plain = normkit.surgery.to_torch_nn(net).model
    prepared = tq.prepare(plain)
    calib, _ = _calibration()
    for c in calib:
        prepared(c)
    _, ref = _eager_static_quant(nn, fuse=False)
    torch.testing.assert_close(tq.convert(prepared)(x), ref(x), rtol=0, atol=1e-6)


def test_quantize_dynamic_leaves_normkit_layers_and_equals_torch_nn():
    from torch.ao.quantization import quantize_dynamic

    _, x = _calibration()
    ours = quantize_dynamic(_conv_bn_net(nkn), {nn.Linear}, dtype=torch.qint8)
    ref = quantize_dynamic(_conv_bn_net(nn), {nn.Linear}, dtype=torch.qint8)
    torch.testing.assert_close(ours(x), ref(x), **TOL)


# ---- TorchScript ---------------------------------------------------------------------------------

SCRIPTABLE = {
    "BatchNorm1d-2d",
    "BatchNorm1d-3d",
    "BatchNorm2d",
    "BatchNorm2d-cl",
    "BatchNorm3d",
    "InstanceNorm1d",
    "InstanceNorm2d-affine-tracked",
    "InstanceNorm2d",
    "GroupNorm",
    "GroupNorm-cl",
    "LayerNorm",
    "LayerNorm-2dims",
    "LayerNorm2d-c",
    "LayerNorm2d-chw",
    "LayerNorm2d-chw-NC",
    "SyncBatchNorm",
    "SyncBatchNorm-2d",
    "SyncBatchNorm-cl",
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("sample", SAMPLES, ids=[s.name for s in SAMPLES])
def test_jit_script_equals_eager_or_names_the_alternatives(sample: Sample, train: bool):
    """The layers docs/differences.md lists script, and compute eager's outputs and buffers over two calls;
    the others raise a NormError naming torch.jit.trace / torch.compile / torch.export."""
    ref, m = sample.module(train), sample.module(train)
    if sample.name not in SCRIPTABLE:
        with pytest.raises(normkit.NormError, match="torch.jit.trace"):
            torch.jit.script(m)
        return
    scripted = torch.jit.script(m)
    for seed in (1, 2):
        x = sample.input(seed=seed)
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), ref(x), **TOL)
    theirs = dict(scripted.named_buffers())
    for name, want in ref.named_buffers():
        torch.testing.assert_close(theirs[name], want, **TOL, msg=lambda msg, n=name: f"{n}: {msg}")


def _cnn(lib) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        lib.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        lib.GroupNorm(2, 8),
        nn.Conv2d(8, 8, 1),
        lib.InstanceNorm2d(8, affine=True),
    )
    bn = net[1]
    assert isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None and bn.running_var is not None
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_jit_freeze_and_optimize_for_inference_fold_conv_bn_as_for_torch_nn():
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    folded = {}
    for lib in (nn, nkn):
        net = _cnn(lib)
        opt = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.script(net)))
        torch.testing.assert_close(opt(x), net(x), **TOL)
        folded[lib.__name__] = sum(n.kind() == "aten::batch_norm" for n in opt.graph.nodes())
    assert folded["normkit.nn"] == folded["torch.nn"] == 0


# ---- torch.export extras ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[False, True], ids=["eval", "train"])
def exported(request):
    train = request.param
    samples = list(SAMPLES)
    xs = tuple(s.input() for s in samples)
    program = torch.export.export(_Many([s.module(train) for s in samples]), xs)
    return train, samples, xs, program


def _check_program(train: bool, samples: list[Sample], xs: tuple, module: nn.Module) -> None:
    ref = _Many([s.module(train) for s in samples])
    with torch.no_grad():
        want, got = ref(*xs), module(*xs)
    for s, a, b in zip(samples, want, got):
        torch.testing.assert_close(b, a, **TOL, msg=lambda m, n=s.name: f"{n}: {m}")
    ours = dict(module.named_buffers())
    fresh = dict(_Many([s.module(train) for s in samples]).named_buffers())
    for name, v in ref.named_buffers():
        if name not in ours:  # (strict export drops the buffers the program never reads, as for torch.nn's)
            assert torch.equal(v, fresh[name]), f"buffer {name}: updated in eager, missing from the program"
            continue
        torch.testing.assert_close(ours[name], v, **TOL, msg=lambda m, n=name: f"buffer {n}: {m}")


def test_export_run_decompositions_core_aten_equals_eager(exported):
    train, samples, xs, program = exported
    core = program.run_decompositions()
    ops = {str(n.target) for n in core.graph.nodes if n.op == "call_function"}
    assert not [op for op in ops if "normkit" in op]
    _check_program(train, samples, xs, core.module())


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_export_strict_equals_eager(train: bool):
    samples = list(SAMPLES)
    xs = tuple(s.input() for s in samples)
    torch._dynamo.reset()
    program = torch.export.export(_Many([s.module(train) for s in samples]), xs, strict=True)
    _check_program(train, samples, xs, program.module())


@pytest.mark.parametrize("lib", [nn, nkn], ids=["torch.nn", "normkit"])
def test_exported_module_refuses_train_eval_switch_as_torch_nn(lib):
    """``ExportedProgram.module()`` keeps the mode it was exported in; ``.train()`` / ``.eval()`` raise, for
    torch.nn's layers and normkit's alike (so a user cannot silently get the other mode's graph)."""
    net = nn.Sequential(nn.Conv2d(3, 3, 1), lib.BatchNorm2d(3)).train()
    module = torch.export.export(net, (torch.randn(4, 3, 5, 5),)).module()
    with pytest.raises(NotImplementedError):
        module.eval()
