"""What Inductor makes of normkit's ops (normkit.ops._inductor): generated code or normkit's kernels.

Dynamo's graph holds one normkit node per norm (test_toolchain.py); Inductor decomposes each into
ATen ops it compiles into its own loops (small inputs) or into a call of normkit's kernels (large
ones, symbolic sizes). Both must compute what eager computes: outputs, every gradient, buffers.
The oracle is the same module run eagerly (itself tested against torch.nn and float64 elsewhere).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import normkit
import normkit.nn as nkn
from normkit.ops import _inductor, core

from .samples import SAMPLES, run

TOL = {"atol": 2e-5, "rtol": 2e-5}
_BY_NAME = {s.name: s for s in SAMPLES}
# one of each kind of op and walk: BN (running statistics), GN channels-last, LN over C, Proxy Norm
# (norm + proxy activation op), a fused norm + activation layer, Batch Renorm (its own correction)
_CASES = [
    ("BatchNorm2d", True),
    ("LayerNorm2d-chw", False),
    ("GroupNorm-cl", True),
    ("LayerNorm2d-c", True),
    ("ln+pn", True),
    ("BatchNormAct2d", True),
    ("BatchRenorm2d", True),
]


@pytest.fixture
def fresh_inductor():
    """Inductor without its on-disk caches: they key a graph by its nodes, not by how normkit's
    ops decompose, and these tests compile the same graph both ways."""
    torch._dynamo.reset()
    with (
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        yield
    torch._dynamo.reset()


def _normkit_calls(codes: list[str]) -> set[str]:
    return {m for c in codes for m in re.findall(r"torch\.ops\.normkit\.(\w+)", c)}


def _compiled_run(m: torch.nn.Module, x: torch.Tensor):
    compiled = torch.compile(m, fullgraph=True)
    result, codes = run_and_get_code(run, compiled, x, m)
    return result, codes


def _assert_same(got, want) -> None:
    torch.testing.assert_close(got[0], want[0], **TOL)
    assert got[1].keys() == want[1].keys()
    for k in want[1]:
        torch.testing.assert_close(got[1][k], want[1][k], **TOL, msg=lambda msg, k=k: f"grad {k}: {msg}")


def _buffers_close(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (k, u), v in zip(a.named_buffers(), b.buffers()):
        torch.testing.assert_close(v, u, **TOL, msg=lambda msg, k=k: f"buffer {k}: {msg}")


@pytest.mark.parametrize("path", ["generated", "kernels"])
@pytest.mark.parametrize(
    ("name", "train"), _CASES, ids=[f"{n}-{'train' if t else 'eval'}" for n, t in _CASES]
)
def test_inductor_computes_what_eager_computes_on_either_path(
    fresh_inductor, monkeypatch, name: str, train: bool, path: str
):
    sample = _BY_NAME[name]
    if path == "kernels":  # every input counts as large: Inductor calls normkit's kernels
        monkeypatch.setitem(_inductor.LIMITS, "cpu", 0)
    ref, m = sample.module(train), sample.module(train)
    x = sample.input()
    got, codes = _compiled_run(m, x)
    _assert_same(got, run(ref, x))
    _buffers_close(ref, m)
    calls = _normkit_calls(codes)
    assert _inductor.installed(), _inductor._state
    if path == "generated":
        assert calls == set(), f"Inductor should have generated the norm's code, but calls {calls}"
    else:
        assert calls and all(c.endswith("_kernel") for c in calls), calls
        assert any(c.startswith("norm_backward_kernel") for c in calls), calls


def test_generated_code_keeps_normkits_numerics_where_torchs_float32_norm_overflows(fresh_inductor):
    """Values near 1e20 in float32: their squares overflow, so a plain two-pass (torch's GroupNorm)
    returns zeros; normkit's scaled statistics, in Inductor's code too, give the float64 answer."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 3) * 1e20 + 3e20
    gn = nkn.GroupNorm(2, 4, affine=False)
    got, codes = _compiled_run(gn, x)
    assert _normkit_calls(codes) == set()
    want = torch.nn.functional.group_norm(x.double(), 2).float()
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)
    assert (torch.nn.functional.group_norm(x, 2) - want).abs().max() > 0.5  # (the case's point)


def test_dynamic_sizes_call_the_kernels_and_serve_every_size(fresh_inductor):
    m = nkn.GroupNorm(2, 6)
    compiled = torch.compile(m, dynamic=True, fullgraph=True)
    for i, (n, hw) in enumerate(((2, 5), (3, 4), (5, 7))):
        x = torch.randn(n, 6, hw, hw)
        if i == 0:  # (run_and_get_code resets Dynamo first: only the first call may use it)
            (got, grads), codes = run_and_get_code(run, compiled, x, m)
            assert _normkit_calls(codes) == {"norm_kernel", "norm_backward_kernel"}, codes
        else:  # the same graph serves every size
            with torch._dynamo.config.patch(error_on_recompile=True):
                got, grads = run(compiled, x, m)
        want, want_grads = run(m, x)
        torch.testing.assert_close(got, want, **TOL)
        for k in want_grads:
            torch.testing.assert_close(grads[k], want_grads[k], **TOL)


def test_the_choice_follows_the_size_and_device():
    assert _inductor.generated(torch.empty(2, 32, 8, 8))  # 4096 values: Inductor's own code
    assert not _inductor.generated(torch.empty(8, 32, 16, 16))  # 65536: normkit's CPU kernels
    assert _inductor.generated(torch.empty(64, 64, 64, device="meta")) is False  # not a known device
    assert _inductor.LIMITS["cuda"] is None  # on CUDA Inductor's code always (PERFORMANCE.md §5)


_DYNAMIC_CASES = ["BatchNorm2d", "GroupNorm-cl", "LayerNorm2d-c", "ln+pn"]


@pytest.mark.parametrize("name", _DYNAMIC_CASES)
def test_an_unlimited_device_generates_symbolic_sizes_without_recompiling(fresh_inductor, monkeypatch, name):
    """``LIMITS[device] = None`` (CUDA's setting, tried here on the CPU): a ``dynamic=True`` graph
    generates the norm's code for every size (no normkit call, no guard on the size: one compile
    serves three batch sizes) and computes what eager computes."""
    monkeypatch.setitem(_inductor.LIMITS, "cpu", None)
    sample = _BY_NAME[name]
    ref, m = sample.module(True), sample.module(True)
    x0 = sample.input()
    compiled = torch.compile(m, dynamic=True, fullgraph=True)
    for i, n in enumerate((2, 3, 5)):
        x = torch.cat([x0] * 5)[:n]
        if sample.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if i == 0:  # (run_and_get_code resets Dynamo first: only the first call may use it)
            got, codes = run_and_get_code(run, compiled, x, m)
            assert _normkit_calls(codes) == set(), codes
        else:
            with torch._dynamo.config.patch(error_on_recompile=True):
                got = run(compiled, x, m)
        _assert_same(got, run(ref, x))
        _buffers_close(ref, m)


def test_ensure_outside_compile_touches_nothing(monkeypatch):
    monkeypatch.setitem(_inductor._state, "done", False)
    _inductor.ensure()
    assert _inductor._state["done"] is False


def test_dynamo_graph_still_holds_one_normkit_node_per_norm():
    """What other backends and graph tools see is unchanged: the normkit op, once per norm."""
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = torch.nn.Sequential(nkn.GroupNorm(2, 4), torch.nn.ReLU(), normkit.create_norm_layer("ln+pn", 4))
    torch.compile(model, backend=backend, fullgraph=True)(torch.randn(2, 4, 3, 3))
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert targets.count("normkit.norm") == 2, targets
    assert targets.count("normkit.proxy_norm_act") == 1, targets
    torch._dynamo.reset()


def _variant(kind: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 3) * 2 + 1
    if kind == "bf16 module":  # bfloat16 parameters and input: the backward's casts to their dtypes
        return nkn.GroupNorm(2, 4).to(torch.bfloat16), x.to(torch.bfloat16)
    if kind == "float32 params, bf16 input":
        return nkn.GroupNorm(2, 4), x.to(torch.bfloat16)
    if kind == "no affine":
        return nkn.LayerNorm2d(4, affine=False), x
    if kind == "BatchNorm1d (N, C)":
        return nkn.BatchNorm1d(6), torch.randn(5, 6)
    if kind == "LayerNorm over the last dim":
        return nkn.LayerNorm(7), torch.randn(4, 5, 7)
    if kind == "ln+pn bf16":
        return normkit.create_norm_layer("ln+pn", 4).to(torch.bfloat16), x.to(torch.bfloat16)
    raise AssertionError(kind)


_VARIANTS = [
    "bf16 module",
    "float32 params, bf16 input",
    "no affine",
    "BatchNorm1d (N, C)",
    "LayerNorm over the last dim",
    "ln+pn bf16",
]


_GRADS = ["all", "input only", "parameters only"]


@pytest.mark.parametrize("path", ["generated", "kernels"])
@pytest.mark.parametrize(
    ("kind", "grads"),
    # (a layer without parameters has only its input to differentiate)
    [(k, g) for k in _VARIANTS for g in _GRADS if not (k == "no affine" and g == "parameters only")],
)
def test_dtypes_shapes_and_partial_gradients_match_eager(fresh_inductor, monkeypatch, kind, path, grads):
    """The decompositions' outputs in each dtype (casts back to the input's and parameters' dtypes)
    and with gradients asked for only in part (the ops' empty placeholders)."""
    if path == "kernels":
        monkeypatch.setitem(_inductor.LIMITS, "cpu", 0)
    m, x = _variant(kind)
    params = [p for p in m.parameters() if p.requires_grad]
    results = []
    for f in (m, torch.compile(m, fullgraph=True)):
        for p in params:
            p.grad = None
            p.requires_grad_(grads != "input only")
        xi = x.detach().clone().requires_grad_(grads != "parameters only")
        y = f(xi)
        (y.float() * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        results.append((y, xi.grad, [p.grad for p in params]))
    (y0, gx0, gp0), (y1, gx1, gp1) = results
    tol = {"atol": 5e-2, "rtol": 5e-2} if x.dtype == torch.bfloat16 else TOL
    assert y1.dtype == y0.dtype
    torch.testing.assert_close(y1, y0, **tol)
    assert (gx1 is None) == (gx0 is None)
    if gx0 is not None:
        assert gx1.dtype == gx0.dtype == x.dtype
        torch.testing.assert_close(gx1, gx0, **tol)
    for a, b, p in zip(gp0, gp1, params):
        assert (a is None) == (b is None)
        if a is not None:
            assert b.dtype == a.dtype == p.dtype
            torch.testing.assert_close(b, a, **tol)


@pytest.mark.parametrize("moments", ["auto", "both"])
def test_the_crossover_script_times_both_ways_and_checks_them_against_eager(
    fresh_inductor, monkeypatch, capsys, moments
):
    """``benchmarks/inductor_crossover.py`` (the GPU script's stage 5) on one small CPU shape: a row
    with the timings (torch.nn; normkit's generated code, with ``--moments both`` once with
    Welford's moments and once with the two-pass ones; normkit's kernels), and each normkit way's
    largest difference from eager at float32 rounding."""
    import runpy
    from pathlib import Path

    from normkit.ops import core

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "inductor_crossover.py"
    argv = [str(script), "--quick", "--shapes", "2x8x4x4", "--threads", "1", "--moments", moments]
    monkeypatch.setattr("sys.argv", argv)
    limits, choice = dict(_inductor.LIMITS), core.two_pass_moments
    runpy.run_path(str(script), run_name="__main__")
    assert _inductor.LIMITS == limits and core.two_pass_moments is choice  # (restored)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| GroupNorm")]
    assert len(rows) == 1, rows
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    ways = 2 if moments == "auto" else 3
    assert cells[1:3] == ["2x8x4x4", "fp32"] and all(float(c) > 0 for c in cells[3 : 6 + ways])
    diffs = [float(v) for v in cells[6 + ways].split("/")]
    assert len(diffs) == ways and max(diffs) < 1e-5


# ---- the kernel ops take the layout Inductor chose (flexible_layout) --------------------------------


def _layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``x``'s values in five layouts: contiguous, channels-last, a dense permutation that is
    neither, and two non-dense views (every other column of a wider tensor; an expanded batch)."""
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    wide[..., ::2] = x
    perm = x.permute(2, 0, 3, 1).contiguous().permute(1, 3, 0, 2)
    return {
        "contiguous": x,
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "permuted": perm,
        "strided": wide[..., ::2],
        "expanded": x[:1].expand(x.shape),
    }


def _fake_strides(op, *args):
    """The strides ``op``'s fake gives its outputs for these inputs (what Inductor lays its buffers
    out by, and asserts the real outputs against)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode:
        out = op(*fake_args)
    return [o.stride() for o in (out if isinstance(out, (list, tuple)) else [out])]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted", "strided", "expanded"])
@pytest.mark.parametrize("dy_layout", ["same", "contiguous", "channels_last"])
def test_kernel_ops_take_any_strides_and_return_what_their_fakes_declare(layout, dy_layout):
    """``normkit::norm_kernel`` and ``norm_backward_kernel`` are ``flexible_layout``: Inductor passes
    its buffers as laid out (a CPU convolution's output is channels-last) and takes the outputs'
    strides from the fakes. Every layout gives the fake's strides and the values of the graph op
    on a contiguous copy (itself tested against float64 elsewhere)."""
    ops = torch.ops.normkit
    torch.manual_seed(0)
    x0 = torch.randn(3, 4, 5, 6)
    w, b = torch.randn(1, 4, 1, 1), torch.randn(1, 4, 1, 1)
    x = _layouts(x0)[layout]
    x0 = x.contiguous()  # (the expanded view's values are its first sample's)
    want_y, want_stats = ops.norm(x0, w, b, None, [0, 2, 3], 1e-5)
    y, stats = ops.norm_kernel(x, w, b, None, [0, 2, 3], 1e-5)
    assert [y.stride(), stats.stride()] == _fake_strides(ops.norm_kernel, x, w, b, None, [0, 2, 3], 1e-5)
    torch.testing.assert_close(y, want_y, **TOL)
    torch.testing.assert_close(stats, want_stats, **TOL)

    dy0 = torch.randn_like(x0)
    dy = {"same": _layouts(dy0)[layout], "contiguous": dy0}.get(
        dy_layout, dy0.contiguous(memory_format=torch.channels_last)
    )
    dy0 = dy.contiguous()
    needs = [True, True, True]
    want = ops.norm_backward(dy0, x0, w, b, None, want_stats, [0, 2, 3], needs)
    got = ops.norm_backward_kernel(dy, x, w, b, None, stats, [0, 2, 3], needs)
    fake = _fake_strides(ops.norm_backward_kernel, dy, x, w, b, None, stats, [0, 2, 3], needs)
    assert [g.stride() for g in got] == fake
    for g, ref in zip(got, want):
        torch.testing.assert_close(g, ref, **TOL)


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted", "strided", "expanded"])
def test_the_grouped_kernel_op_is_the_kernel_op_on_the_grouped_view(layout, masked):
    """``normkit::norm_kernel(x, ..., view=(N, G, C // G, H, W))`` (GroupNorm under torch.compile) is
    the op on that view with the output in ``x``'s shape, in any layout (the kernel op makes a
    non-dense one dense first), with the strides its fake declares."""
    ops = torch.ops.normkit
    torch.manual_seed(0)
    x = _layouts(torch.randn(3, 6, 5, 4))[layout]
    w, b = torch.randn(1, 2, 3, 1, 1), torch.randn(1, 2, 3, 1, 1)
    mask = (torch.rand(3, 6, 5, 4) > 0.3) if masked else None
    x0 = x.contiguous()
    grouped = (3, 2, 3, 5, 4)
    m0 = None if mask is None else mask.view(grouped)
    want_y, want_stats = ops.norm(x0.view(grouped), w, b, m0, [2, 3, 4], 1e-5)
    y, stats = ops.norm_kernel(x, w, b, mask, [2, 3, 4], 1e-5, list(grouped))
    fake = _fake_strides(ops.norm_kernel, x, w, b, mask, [2, 3, 4], 1e-5, list(grouped))
    assert [y.stride(), stats.stride()] == fake
    assert y.shape == x.shape
    torch.testing.assert_close(y, want_y.view(x.shape), **TOL)
    # (the saved shift is an implementation's choice, which a layout may change: the moments are not)
    for got, want in zip(core.mean_var(stats), core.mean_var(want_stats)):
        torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(core.stats_count(stats), core.stats_count(want_stats))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted", "strided", "expanded"])
def test_proxy_kernel_ops_take_any_strides_and_return_what_their_fakes_declare(layout):
    ops = torch.ops.normkit
    torch.manual_seed(0)
    y0 = torch.randn(3, 4, 5, 6)
    w, b, m, r = torch.randn(4), torch.randn(4), torch.randn(4), torch.rand(4) + 0.5
    y = _layouts(y0)[layout]
    y0 = y.contiguous()
    args = (w, b, m, r, "relu", 0.01)
    out = ops.proxy_norm_act_kernel(y, *args)
    assert [out.stride()] == _fake_strides(ops.proxy_norm_act_kernel, y, *args)
    torch.testing.assert_close(out, ops.proxy_norm_act(y0, *args), **TOL)
    dout0 = torch.randn_like(y0)
    for dout in (dout0, dout0.contiguous(memory_format=torch.channels_last)):
        needs = [True] * 5
        got = ops.proxy_norm_act_backward_kernel(dout, y, *args, needs)
        assert [g.stride() for g in got] == _fake_strides(
            ops.proxy_norm_act_backward_kernel, dout, y, *args, needs
        )
        for g, ref in zip(got, ops.proxy_norm_act_backward(dout0, y0, *args, needs)):
            torch.testing.assert_close(g, ref, **TOL)


@pytest.mark.parametrize("norm", ["BatchNorm2d", "GroupNorm"])
def test_a_channels_last_convolution_output_reaches_the_norm_kernel_uncopied(
    fresh_inductor, monkeypatch, norm
):
    """On the CPU Inductor lays convolutions out channels-last. The norm's kernel call takes that
    buffer as it is, and its backward's ``dx`` goes to the convolution's backward as it is: before
    the flexible layout, a generated kernel copied the activation to the traced graph's NCHW strides
    first and the gradient back, a full read and write of the activation each way (GroupNorm with
    several groups kept those copies until its op took the input itself, ``view=``: the grouped
    view it saved had the traced strides)."""
    monkeypatch.setitem(_inductor.LIMITS, "cpu", 0)
    torch.manual_seed(0)
    m, ref = (
        torch.nn.Sequential(
            torch.nn.Conv2d(4, 8, 3, padding=1, bias=False),
            nkn.BatchNorm2d(8) if norm == "BatchNorm2d" else nkn.GroupNorm(2, 8),
            torch.nn.ReLU(),
        )
        for _ in range(2)
    )
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 4, 6, 6)
    got, codes = _compiled_run(m, x)
    _assert_same(got, run(ref, x))
    _buffers_close(ref, m)
    forward = codes[0]
    conv = re.search(r"(buf\d+) = extern_kernels\.convolution\(", forward)
    assert conv, forward
    call = re.search(r"torch\.ops\.normkit\.norm_kernel\.default\((\w+),", forward)
    took = call and call.group(1)
    assert took == conv.group(1), f"the kernel takes {took}, not the convolution's {conv.group(1)}"
    layout = re.search(rf"assert_size_stride\({conv.group(1)}, \(2, 8, 6, 6\), \(([\d, ]+)\)", forward)
    assert layout and layout.group(1) == "288, 1, 48, 8", "the test's premise: a channels-last convolution"
    backward = codes[1]
    call = re.search(r"(buf\d+) = torch\.ops\.normkit\.norm_backward_kernel\.default\(\w+, (\w+),", backward)
    assert call and call.group(2) == "convolution", f"the backward kernel takes {call and call.group(2)}"
    dx = re.search(rf"(buf\d+) = {call.group(1)}\[0\]", backward)
    conv_backward = re.search(r"convolution_backward\.default\((\w+),", backward)
    assert dx and conv_backward and conv_backward.group(1) == dx.group(1), backward


def _between_convolutions(compiled, m, shapes, channels_last=False, vanishing=()) -> None:
    """Each input shape through ``compiled`` and through an eager copy of ``m``: outputs, gradients and
    buffers alike. ``vanishing``: gradients that are 0 in closed form (a convolution's bias before a
    batch norm: the norm removes each set's constant), float32 noise around 0 on both sides, checked
    against 0 instead (compared with each other, their noise reads as a relative error of 40)."""
    ref = copy.deepcopy(m)
    for shape in shapes:
        m.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        x = torch.randn(shape)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        got, want = run(compiled, x, m), run(ref, x)
        for k in vanishing:
            scale = want[1]["input"].abs().sum()  # (the sum the bias gradient adds up, without its signs)
            for g in (got[1].pop(k), want[1].pop(k)):
                assert g.abs().max() <= 1e-6 * scale, (k, g, scale)
        _assert_same(got, want)
        _buffers_close(ref, m)


@pytest.mark.parametrize("spec", ["ln", "ln+pn", "gn:2", "gn+pn", "bn", "ln2d", "in"])
def test_a_second_input_size_recompiles_with_symbolic_sizes_between_convolutions(fresh_inductor, spec):
    """A plain ``torch.compile(model)`` recompiles with symbolic sizes at the second spatial size.
    A norm between two convolutions must compile then too and compute what eager computes.

    The case GroupNorm's grouped view makes hard: Inductor (torch 2.13) cannot lay out channels-last
    a 4-d view that the graph saves for the backward once the sizes are symbolic
    (``TypeError: cannot determine truth value of Relational``). One group normalizes ``x`` itself;
    more groups take the kernel op that reads and writes ``(N, C, H, W)`` (ops/_inductor.py)."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), normkit.create_norm_layer(spec, 8), torch.nn.Conv2d(8, 4, 1)
    )
    _between_convolutions(torch.compile(m), m, [(2, 3, 6, 6), (2, 3, 7, 7), (3, 3, 9, 5)])


def test_ghost_batch_norm_between_convolutions_compiles_at_new_sizes(fresh_inductor):
    """Ghost BN views the batch as ``(K, B, C, H, W)``: the op takes the input itself (``view=``), so
    new spatial sizes (symbolic) and a new number of ghost batches compile, and every size computes
    what eager computes (running statistics too). A batch that leaves a ragged last chunk is a new
    batch size, fine while the spatial sizes are static (docs/differences.md: with symbolic spatial
    sizes it is the one case that still fails)."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), normkit.create_norm_layer("gbn:2", 8), torch.nn.Conv2d(8, 4, 1)
    )
    shapes = [(4, 3, 6, 6), (4, 3, 7, 5), (6, 3, 9, 5)]
    _between_convolutions(torch.compile(m), m, shapes, vanishing=("0.bias",))
    torch._dynamo.reset()
    shapes = [(4, 3, 6, 6), (5, 3, 6, 6), (7, 3, 6, 6)]
    _between_convolutions(torch.compile(m), m, shapes, vanishing=("0.bias",))


@pytest.mark.parametrize(
    ("case", "path"),
    [
        ("2d-channels_last", "generated"),
        ("2d-channels_last", "kernels"),
        ("no-affine", "generated"),
        ("no-affine", "kernels"),
        ("1d", "kernels"),
        ("3d", "generated"),
    ],
)
def test_group_norm_between_convolutions_compiles_with_symbolic_sizes_on_either_path(
    fresh_inductor, monkeypatch, path, case
):
    """``dynamic=True``, GroupNorm with several groups between convolutions, every spatial rank and
    layout: on the kernels (the CPU's choice for symbolic sizes) and on generated code
    (``LIMITS[device] = None``, CUDA's setting, tried here on the CPU: the output's last op is then
    elementwise on ``(N, C, *S)``). (Inductor's convolution backward fixes the spatial size it
    compiled for, so each size compiles anew: torch's doing, as for torch.nn's GroupNorm.)"""
    monkeypatch.setitem(_inductor.LIMITS, "cpu", None if path == "generated" else 0)
    torch.manual_seed(0)
    conv = {"1d": torch.nn.Conv1d, "3d": torch.nn.Conv3d}.get(case, torch.nn.Conv2d)
    rank = {"1d": 1, "3d": 3}.get(case, 2)
    m = torch.nn.Sequential(
        conv(3, 8, 3, padding=1), nkn.GroupNorm(4, 8, affine=case != "no-affine"), conv(8, 4, 1)
    )
    sizes = [(5,) * rank, (6,) * (rank - 1) + (4,), (7,) * rank]
    compiled = torch.compile(m, dynamic=True, fullgraph=True)
    shapes = [(2, 3, *s) for s in sizes]
    _between_convolutions(compiled, m, shapes, channels_last=case.endswith("last"))
