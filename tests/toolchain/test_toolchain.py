"""Every public norm layer through every PyTorch tool a user reaches for, against eager (the oracle).

One sample table (``samples.py``) x train/eval x {Dynamo explain, torch.compile(fullgraph=True),
torch.export, ONNX (dynamo and legacy exporters) in ONNX Runtime, torch.fx, torch.func}.
Eager itself is checked against the float64 reference elsewhere (tests/functional, tests/nn).
"""

from __future__ import annotations

import copy
import io
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import normkit
from tests.tolerances import Tol
from tests.toolchain.samples import SAMPLE_IDS, SAMPLES, Sample, run

MODES = [pytest.param(True, id="train"), pytest.param(False, id="eval")]
TOL: Tol = {"rtol": 1e-4, "atol": 1e-5}


def _assert_same_run(a: tuple, b: tuple) -> None:
    (ya, ga), (yb, gb) = a, b
    torch.testing.assert_close(yb, ya, **TOL)
    assert len(ga) == len(gb)  # same parameters, in order (a traced copy prefixes their names)
    for (k, a), b in zip(ga.items(), gb.values()):
        torch.testing.assert_close(b, a, **TOL, msg=lambda m, k=k: f"grad of {k}: {m}")


def _buffers(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.named_buffers()}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_dynamo_sees_no_graph_break(sample: Sample, train: bool):
    m = sample.module(train)
    explanation = torch._dynamo.explain(m)(sample.input())
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_compile_fullgraph_equals_eager_with_gradients_and_buffers(sample: Sample, train: bool):
    ref, m = sample.module(train), sample.module(train)
    x = sample.input()
    compiled = torch.compile(m, fullgraph=True)
    _assert_same_run(run(ref, x), run(compiled, x, m))
    for (k, a), b in zip(_buffers(ref).items(), _buffers(m).values()):
        torch.testing.assert_close(b, a, **TOL, msg=lambda msg, k=k: f"buffer {k}: {msg}")


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_compiled_module_runs_its_second_call_without_recompiling(sample: Sample, train: bool, monkeypatch):
    """The first compiled call must not leave state its guards see changed on the second (a lazily
    bound module-level list did: every model compiled twice in a fresh process)."""
    from normkit.kernels import _fast

    monkeypatch.setattr(_fast, "_backend", [])  # as in a fresh process: nothing bound yet
    m = sample.module(train)
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    run(compiled, sample.input(), m)
    with torch._dynamo.config.patch(error_on_recompile=True):
        run(compiled, sample.input(seed=2), m)


@pytest.mark.parametrize("train", MODES)
def test_a_fresh_process_compiles_every_layer_once(train: bool):
    """In a new process (nothing of normkit's bound yet), one compiled function calling every sample
    layer runs a second time without recompiling: NORMKIT_BACKEND was read while Dynamo traced the
    first norm, and the guard on it failed on the next call (torch.nn's layers compile once)."""
    code = f"""
import torch
from tests.toolchain.samples import SAMPLES
mods = [s.module({train}) for s in SAMPLES]
def f(xs):
    return [m(x) for m, x in zip(mods, xs)]
compiled = torch.compile(f, backend="eager", fullgraph=True)
compiled([s.input() for s in SAMPLES])
with torch._dynamo.config.patch(error_on_recompile=True):
    compiled([s.input(seed=2) for s in SAMPLES])
print("compiled once")
"""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=600, check=False
    )
    assert out.returncode == 0 and "compiled once" in out.stdout, (out.stdout + out.stderr)[-3000:]


def _other_batch(sample: Sample) -> torch.Tensor:
    """The sample's input with 3 more samples (another size for a dynamic graph to serve)."""
    shape = (sample.shape[0] + 3, *sample.shape[1:])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    return x.contiguous(memory_format=torch.channels_last) if sample.channels_last else x


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_compile_dynamic_fullgraph_equals_eager_on_two_batch_sizes(sample: Sample, train: bool):
    """``torch.compile(dynamic=True)``: sizes and float attributes (eps, momentum) are symbolic. One
    graph, no break (normkit's checks once called math.isfinite and divmod on them), for two batch
    sizes. (aot_eager: Dynamo and AOTAutograd; Inductor's own handling is test_inductor.py's.)"""
    ref, m = sample.module(train), sample.module(train)
    compiled = torch.compile(m, dynamic=True, fullgraph=True, backend="aot_eager")
    for x in (sample.input(), _other_batch(sample)):
        _assert_same_run(run(ref, x), run(compiled, x, m))
    for (k, a), b in zip(_buffers(ref).items(), _buffers(m).values()):
        torch.testing.assert_close(b, a, **TOL, msg=lambda msg, k=k: f"buffer {k}: {msg}")


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_export_module_equals_eager(sample: Sample, train: bool):
    ref, m = sample.module(train), sample.module(train)
    x = sample.input()
    with torch.no_grad():
        want = ref(x)
        got = torch.export.export(m, (x,)).module()(x)
    torch.testing.assert_close(got, want, **TOL)


# Ghost BatchNorm's ghost batches need a batch that is a multiple of their size: its own test below
DYNAMIC_BATCH = [s for s in SAMPLES if s.name != "GhostBatchNorm2d"]


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("sample", DYNAMIC_BATCH, ids=[s.name for s in DYNAMIC_BATCH])
def test_export_with_a_dynamic_batch_runs_another_batch_size_as_eager(sample: Sample, train: bool):
    """``torch.export`` with a dynamic batch dim (``Dim``), then the program run on 3 more samples: the
    output and the buffers it updates equal eager's (a training BatchNorm's sample count once pinned
    the batch: "specialized it to be a constant")."""
    ref, m = sample.module(train), sample.module(train)
    batch = torch.export.Dim("batch", min=2, max=64)
    program = torch.export.export(m, (sample.input(),), dynamic_shapes=({0: batch},)).module()
    x = _other_batch(sample)
    with torch.no_grad():
        want, got = ref(x), program(x)
    torch.testing.assert_close(got, want, **TOL)
    ours = {k.rpartition(".")[2]: v for k, v in program.named_buffers()}
    for k, v in _buffers(ref).items():
        torch.testing.assert_close(
            ours[k.rpartition(".")[2]], v, **TOL, msg=lambda msg, k=k: f"buffer {k}: {msg}"
        )


@pytest.mark.parametrize("train", MODES)
def test_ghost_batch_norm_exports_a_batch_that_is_any_multiple_of_its_ghost_batch(train: bool):
    """``dynamic_shapes={0: B * Dim("k")}``: one program for every batch of whole ghost batches, whose
    outputs and running statistics (K EMA steps, ``num_batches_tracked += K``) equal eager's at 2, 3
    and 5 ghost batches. (Its sizes were read with ``int()``, which pinned the batch: "specialized it
    to be a constant".) In training a plain ``Dim`` fails with torch's message naming the ``% 4``
    guard; in eval (BatchNorm on the running statistics) it exports."""
    ref = normkit.nn.GhostBatchNorm2d(6, ghost_batch_size=4).train(train)
    m = copy.deepcopy(ref)
    k = torch.export.Dim("k", min=2, max=16)  # (one ghost batch is plain BN: another program)
    g = torch.Generator().manual_seed(0)
    program = torch.export.export(m, (torch.randn(8, 6, 3, 3, generator=g),), dynamic_shapes=({0: 4 * k},))
    program = program.module()
    for n in (8, 12, 20):
        x = torch.randn(n, 6, 3, 3, generator=g)
        with torch.no_grad():
            torch.testing.assert_close(program(x), ref(x), **TOL)
        ours = {k.rpartition(".")[2]: v for k, v in program.named_buffers()}
        for name, v in _buffers(ref).items():
            torch.testing.assert_close(ours[name], v, **TOL, msg=lambda msg, n=name: f"buffer {n}: {msg}")
    plain = {0: torch.export.Dim("b", min=2, max=64)}
    if train:
        with pytest.raises(Exception, match=r"% 4"):
            torch.export.export(m, (torch.randn(8, 6, 3, 3),), dynamic_shapes=(plain,))
    else:
        torch.export.export(m, (torch.randn(8, 6, 3, 3),), dynamic_shapes=(plain,))


def test_ghost_batch_norm_compiles_one_graph_for_every_batch_of_whole_ghost_batches():
    """``torch.compile(dynamic=True)``: batches of 2, 3, 5 and 8 ghost batches run one graph, and a
    ragged last chunk one more (a chunk of one sample, or a single whole ghost batch, one each: size-1
    dims are specialized); every call equals eager, running statistics too. Each batch size compiled
    its own graph before."""
    from torch._dynamo.testing import CompileCounter

    ref = normkit.nn.GhostBatchNorm2d(6, ghost_batch_size=4).train()
    m = copy.deepcopy(ref)
    counter = CompileCounter()
    compiled = torch.compile(m, backend=counter, dynamic=True, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    for n, graphs in ((8, 1), (12, 1), (20, 1), (32, 1), (10, 2), (14, 2), (22, 2)):
        x = torch.randn(n, 6, 3, 3, generator=g)
        torch.testing.assert_close(compiled(x), ref(x), **TOL)
        assert counter.frame_count == graphs, (n, counter.frame_count)
    for (k, a), b in zip(_buffers(ref).items(), _buffers(m).values()):
        torch.testing.assert_close(b, a, **TOL, msg=lambda msg, k=k: f"buffer {k}: {msg}")


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_export_save_load_runs_as_eager_with_buffers(sample: Sample, train: bool):
    """``torch.export.export`` -> ``torch.export.save`` -> ``torch.export.load``, then the loaded program
    run twice: its outputs and the buffers it updates equal eager's. (A training layer's buffer update
    under ``no_grad`` became a ``wrap_with_set_grad_enabled`` node that ``torch.export.save`` refused:
    "Node.meta wrap_with_set_grad_enabled is missing val field"; torch.nn.BatchNorm2d saved fine.)"""
    ref, m = sample.module(train), sample.module(train)
    x = sample.input()
    buf = io.BytesIO()
    torch.export.save(torch.export.export(m, (x,)), buf)
    buf.seek(0)
    program = torch.export.load(buf).module()
    for seed in (1, 2):
        x = sample.input(seed=seed)
        with torch.no_grad():
            want, got = ref(x), program(x)
        torch.testing.assert_close(got, want, **TOL)
    ours = {k.rpartition(".")[2]: v for k, v in program.named_buffers()}
    for k, v in _buffers(ref).items():
        torch.testing.assert_close(
            ours[k.rpartition(".")[2]], v, **TOL, msg=lambda msg, k=k: f"buffer {k}: {msg}"
        )


def _ort(model_bytes: bytes, x: torch.Tensor) -> torch.Tensor:
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out)


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_onnx_dynamo_export_runs_in_onnxruntime(sample: Sample, train: bool):
    pytest.importorskip("onnxscript", reason="onnxscript is not installed")
    ref, m = sample.module(train), sample.module(train)
    x = sample.input().contiguous()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "exporting a model in training mode" and exporter notes
        want = ref(x)
        program = torch.onnx.export(m, (x,), dynamo=True, verbose=False)
    got = _ort(program.model_proto.SerializeToString(), x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_onnx_legacy_export_runs_in_onnxruntime(sample: Sample, train: bool):
    pytest.importorskip("onnx", reason="onnx is not installed")
    ref, m = sample.module(train), sample.module(train)
    x = sample.input().contiguous()
    buf = io.BytesIO()
    mode = torch.onnx.TrainingMode.TRAINING if train else torch.onnx.TrainingMode.EVAL
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's own deprecation and tracer notes
        torch.onnx.export(m, (x,), buf, dynamo=False, training=mode)
        if train:
            ref(x)  # the legacy exporter stores the buffers as they are after its tracing run
        want = ref(x)
    got = _ort(buf.getvalue(), x)
    assert got.shape == want.shape  # the bug this guards: a statistic exported instead of the output
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize(
    "make",
    [
        lambda: normkit.nn.LayerNorm2d(4),
        lambda: normkit.nn.LayerNorm2d(4, affine=False),
        lambda: normkit.nn.LayerNormAct2d(4),
        lambda: normkit.nn.LayerNorm2d(4, over="chw"),
    ],
    ids=["LayerNorm2d-c", "LayerNorm2d-c-no-affine", "LayerNormAct2d", "LayerNorm2d-chw"],
)
def test_onnx_legacy_export_with_dynamic_axes_runs_on_another_batch_size(make):
    """dynamic_axes (batch and height): the channel count of ``over="c"`` must be recorded as a constant
    (it was a traced size, which the legacy exporter's LayerNorm refused); the model then runs in ONNX
    Runtime on a batch size and height other than the exported ones, equal to eager."""
    pytest.importorskip("onnx", reason="onnx is not installed")
    m = make().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(0.5, 1.5)  # non-trivial affine
    buf = io.BytesIO()
    dims = {0: "batch", 2: "height"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's own deprecation and tracer notes
        torch.onnx.export(
            m,
            (torch.randn(2, 4, 3, 3),),
            buf,
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": dims, "y": dims},
        )
    x = torch.randn(5, 4, 6, 3)
    with torch.no_grad():
        want = m(x)
    got = _ort(buf.getvalue(), x)
    assert got.shape == want.shape == (5, 4, 6, 3)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_fx_symbolic_trace_keeps_the_layer_and_equals_eager(sample: Sample, train: bool):
    ref, m = sample.module(train), sample.module(train)
    x = sample.input()
    gm = torch.fx.symbolic_trace(nn.Sequential(m))
    assert any(n.op == "call_module" for n in gm.graph.nodes)
    _assert_same_run(run(ref, x), run(gm, x))
    # the traced graph still follows train/eval, as torch.nn's leaf layers do
    gm.train(not train)
    ref.train(not train)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref(x), **TOL)


CORE = ["BatchNorm2d", "InstanceNorm2d", "GroupNorm", "LayerNorm", "LayerNorm2d-c", "LayerNorm2d-chw"]


# the layers whose output depends on train/eval (running statistics)
MODAL = {"BatchNorm2d", "InstanceNorm2d-affine-tracked"}


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("name", [*CORE, "InstanceNorm2d-affine-tracked"])
def test_fx_traces_a_core_layer_as_the_root(name: str, train: bool):
    """A core layer as the traced root: its graph equals eager in the mode it was traced in. That mode is
    fixed at trace time (as for any root-traced module, torch.nn.Dropout's too); where train/eval
    changes the output the trace says so, and a layer without running statistics traces silently."""
    sample = next(s for s in SAMPLES if s.name == name)
    ref, m = sample.module(train), sample.module(train)
    x = sample.input()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = torch.fx.symbolic_trace(m)
    said = [str(w.message) for w in caught if "fixed at trace time" in str(w.message)]
    assert len(said) == (1 if name in MODAL else 0), said
    _assert_same_run(run(ref, x), run(gm, x))


# the layers fx cannot trace the body of, as the root: they refuse with a NormError that says what to do
ROOT_REFUSED = {
    "ln+pn",
    "gn:2+pn-silu",
    "ProxyNormAct-gelu",
    "GhostBatchNorm2d",
    "BatchRenorm2d",
    "BatchRenormAct2d",
    "FrozenBatchNorm2d",
    "MeanOnlyBatchNorm",
    "BatchNormalization-keras",
    "StdConv2d",
    "ScaledStdConv2d-cl",
}


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_fx_traces_every_layer_as_the_root_or_says_what_to_do(sample: Sample, train: bool):
    """Every layer as the traced root (the norm + act layers included: their in-place activation tested
    a Proxy's requires_grad, and the generated ones took ``*args``, which fx cannot unpack)."""
    ref, m = sample.module(train), sample.module(train)
    x = sample.input()
    if sample.name in ROOT_REFUSED:
        with pytest.raises(normkit.NormError, match="Sequential"):
            torch.fx.symbolic_trace(m)
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fixed at trace time")
        gm = torch.fx.symbolic_trace(m)
    _assert_same_run(run(ref, x), run(gm, x))


def test_fx_root_trace_of_a_composite_layer_says_what_to_do():
    with pytest.raises(normkit.NormError, match="Sequential"):
        torch.fx.symbolic_trace(normkit.create_norm_layer("ln+pn", 4))


def test_torch_fx_fuser_runs_on_a_model_with_normkit_layers():
    # fx's fuser matches exact types (so it leaves normkit BN unfused) but must not fail.
    from torch.fx.experimental.optimization import fuse

    model = nn.Sequential(nn.Conv2d(3, 6, 3), normkit.nn.BatchNorm2d(6), nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fuse(copy.deepcopy(model))(x), model(x), **TOL)


# --- inputs that are neither contiguous nor channels-last (a transposed (N, L, C), a permuted image) ------

STRIDED = {
    "BatchNorm1d on (N, L, C).transpose(1, 2)": (
        lambda: nn.BatchNorm1d(4),
        lambda: normkit.nn.BatchNorm1d(4),
        lambda x: x.transpose(1, 2),
        (3, 5, 4),
    ),
    "LayerNorm over the last dim of a transpose": (
        lambda: nn.LayerNorm(3),
        lambda: normkit.nn.LayerNorm(3),
        lambda x: x.transpose(1, 2),
        (3, 3, 5),
    ),
    "InstanceNorm1d on (N, L, C).transpose(1, 2)": (
        lambda: nn.InstanceNorm1d(4, affine=True),
        lambda: normkit.nn.InstanceNorm1d(4, affine=True),
        lambda x: x.transpose(1, 2),
        (3, 5, 4),
    ),
    "BatchNorm2d on (N, H, C, W).transpose(1, 2)": (
        lambda: nn.BatchNorm2d(4),
        lambda: normkit.nn.BatchNorm2d(4),
        lambda x: x.transpose(1, 2),
        (2, 3, 4, 5),
    ),
    "BatchNorm3d on channels_last_3d": (
        lambda: nn.BatchNorm3d(4),
        lambda: normkit.nn.BatchNorm3d(4),
        lambda x: x.permute(0, 4, 1, 2, 3),  # (N, D, H, W, C) memory: channels_last_3d
        (2, 3, 3, 2, 4),
    ),
}


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("name", STRIDED)
def test_a_transposed_input_equals_torch_nn(name: str, train: bool):
    """A dense input in any layout is read as it lies: the values and buffers are torch.nn's. (The
    training step's output keeps the input's strides where torch.nn returns a transposed input's
    output contiguous: differences.md, "Output layout".)"""
    theirs, ours, view, shape = STRIDED[name]
    ref, m = theirs().train(train), ours().train(train)
    x = view(torch.randn(shape, generator=torch.Generator().manual_seed(11)))
    with torch.no_grad():
        want, got = ref(x), m(x)
    torch.testing.assert_close(got, want, **TOL)
    if train:
        assert got.stride() == x.stride()
    for (k, a), b in zip(_buffers(ref).items(), _buffers(m).values()):
        torch.testing.assert_close(b, a, **TOL, msg=lambda msg, k=k: f"buffer {k}: {msg}")


@pytest.mark.parametrize("name", STRIDED)
def test_compile_dynamic_takes_a_transposed_input_in_one_graph(name: str):
    """``torch.compile(dynamic=True, fullgraph=True)`` on a transposed / channels_last_3d input: one graph
    on two sizes (normkit's layout check once sorted symbolic strides: "sort with non-constant keys")."""
    _, ours, view, shape = STRIDED[name]
    ref, m = ours(), ours()
    compiled = torch.compile(m, dynamic=True, fullgraph=True, backend="aot_eager")
    for n in (shape[0], shape[0] + 3):
        x = view(torch.randn((n, *shape[1:]), generator=torch.Generator().manual_seed(n)))
        _assert_same_run(run(ref, x), run(compiled, x, m))


def test_jit_trace_shows_the_models_tracer_warnings_and_none_from_normkits_checks():
    """``torch.jit.trace`` (and the legacy ONNX exporter) warn at each Python bool of a traced value:
    normkit's own argument checks took a dozen per layer (torch.nn's BatchNorm2d: one). Those are
    silenced, the model's own still show (a fresh interpreter with the default warning filters)."""
    import subprocess
    import sys

    code = (
        "import torch, normkit\n"
        "nkn = normkit.nn\n"
        "m = torch.nn.Sequential(nkn.BatchNorm2d(3), nkn.GroupNorm(1, 3), nkn.LayerNorm(5))\n"
        "torch.jit.trace(m.train(), (torch.randn(4, 3, 5, 5),), check_trace=False)\n"
        "def user(x):\n"
        "    return x * 2 if bool(x.sum() > -1e9) else x\n"
        "torch.jit.trace(user, (torch.randn(3),), check_trace=False)\n"
    )
    err = subprocess.run(
        [sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=300, check=True
    ).stderr
    lines = [ln for ln in err.splitlines() if "TracerWarning" in ln]
    assert not [ln for ln in lines if "normkit" in ln], err
    assert any("<string>" in ln for ln in lines), err  # the model's own warning
