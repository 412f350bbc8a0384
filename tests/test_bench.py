"""``normkit bench``: the API and the command on tiny settings (no timing is asserted)."""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from normkit import kernels
from normkit.bench import OPS, BenchConfig, ResNet18Style, _cnn4, _resnet, check_config, run_bench
from normkit.cli import build_parser, main

TINY = dict(shapes=[(2, 32, 4, 4)], repeats=1, min_time=0.01, e2e_min_time=0.01, quiet=True)
BENCH_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_norms.py"


def _providers() -> list[str]:
    return ["native"] + [f"normkit:{b}" for b in kernels.available() if b != "auto"]


def test_run_bench_rows_columns_and_ratios():
    md, data = run_bench(
        BenchConfig(
            layouts=["nchw", "cl"],
            dtypes=["fp32", "bf16"],
            passes=["fwd", "fwdbwd"],
            ops=["batch_norm", "proxy", "over CHW"],
            e2e=False,
            **TINY,
        )
    )
    rows = data["ops"]
    assert {r["op"] for r in rows} == {
        "batch_norm train",
        "GN32 + proxy norm (native: GN+affine+ReLU)",
        "layer_norm over CHW",
    }
    assert len(rows) == 3 * 2 * 2 * 2  # ops x layouts x dtypes x passes
    for r in rows:
        assert list(r["ms"]) == _providers()
        assert all(v > 0 for v in r["ms"].values()) and r["copy_ms"] > 0
        ref = r["ms"]["normkit:reference"]
        assert r["vs_native"]["normkit:reference"] == pytest.approx(ref / r["ms"]["native"])
        assert r["vs_copy"]["native"] == pytest.approx(r["ms"]["native"] / r["copy_ms"])
        assert r["vs_copy"]["normkit:reference"] == pytest.approx(ref / r["copy_ms"])
        nbytes = 2 * 32 * 16 * (4 if r["dtype"] == "fp32" else 2)
        factor = 5 if r["pass"] == "fwdbwd" else 2
        assert r["gbps"]["native"] == pytest.approx(factor * nbytes / (r["ms"]["native"] * 1e-3) / 1e9)
    lines = md.splitlines()
    head = next(line for line in lines if line.startswith("| op |"))
    cols = [c.strip() for c in head.strip("|").split("|")]
    assert cols[:6] == ["op", "shape", "layout", "dtype", "pass", "native ms"]
    for p in _providers()[1:]:
        assert f"{p}/native" in cols and f"{p}/copy" in cols and f"{p} GB/s" in cols
    assert "native/copy" in cols and "copy ms" in cols
    body = [line for line in lines if line.startswith("| batch_norm train |")]
    assert len(body) == 8 and all(len(line.strip("|").split("|")) == len(cols) for line in body)
    assert "10-30 %" in md and "5 x tensor bytes" in md and "Ratios < 1: normkit is faster" in md


def test_every_op_agrees_with_torch_native():
    # the benchmark compares like with like: each normkit op computes what its native counterpart does
    x = torch.randn(4, 32, 5, 5)
    for name, spec in OPS.items():
        shape = tuple(x.shape[1:]) if spec.affine == "chw" else (32,)
        w, b = torch.rand(shape) + 0.5, torch.randn(shape)
        exp = spec.native(x, w, b)
        torch.testing.assert_close(spec.naive(x, w, b), exp, rtol=1e-4, atol=1e-4, msg=name)
        ours = spec.normkit(__import__("normkit").functional)(x, w, b)
        if "proxy" in name:  # a different activation by design: same shape and layout only
            assert ours.shape == exp.shape
            continue
        torch.testing.assert_close(ours, exp, rtol=1e-4, atol=1e-4, msg=name)


def test_cli_quick_e2e_json_md(tmp_path, capsys):
    out, md_path = tmp_path / "bench.json", tmp_path / "bench.md"
    rc = main(
        [
            "bench",
            "--quick",
            "--no-ops",
            "--quiet",
            "--backends",
            "reference",
            "--json",
            str(out),
            "--md",
            str(md_path),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["ops"] == [] and data["config"]["quick"] is True
    assert [(r["model"], r["norm"], r["input"], r["mode"]) for r in data["e2e"]] == [
        ("ResNet-18-style", "bn", [2, 3, 32, 32], "eager"),
        ("CNN-4", "bn", [2, 1, 8, 8], "eager"),
    ]
    for r in data["e2e"]:
        assert set(r["ms"]) == {"torch.nn", "normkit:reference"}
        assert r["vs_torch"]["normkit:reference"] == pytest.approx(
            r["ms"]["normkit:reference"] / r["ms"]["torch.nn"]
        )
    printed = capsys.readouterr().out
    assert (
        "| ResNet-18-style | bn | 2x3x32x32 | eager |" in printed
        and md_path.read_text().strip() == printed.strip()
    )
    assert "normkit:reference/torch.nn" in printed


def test_cli_ops_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = main(
        [
            "bench",
            "--shapes",
            "2x32x4x4",
            "--ops",
            "instance",
            "--layouts",
            "cl",
            "--dtypes",
            "fp32",
            "--passes",
            "fwdbwd",
            "--repeats",
            "1",
            "--min-time",
            "0.01",
            "--no-e2e",
            "--quiet",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    (row,) = json.loads(out.read_text())["ops"]
    assert (row["op"], row["shape"], row["layout"], row["pass"]) == (
        "instance_norm",
        [2, 32, 4, 4],
        "cl",
        "fwdbwd",
    )
    assert set(row["vs_native"]) == set(_providers()[1:]) and row["vs_copy"]["native"] > 0
    assert "| instance_norm | (2, 32, 4, 4) | cl | fp32 | fwdbwd |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "bad, why",
    [
        (["--shapes", "3x4"], "N x C x H x W"),
        (["--dtypes", "fp8"], "fp8"),
        (["--layouts", "nhwc"], "nhwc"),
        (["--passes", "bwd"], "bwd"),
        (["--repeats", "0"], "must be > 0"),
        (["--backends", "gpu"], "gpu"),
        (["--ops", "nosuchop", "--no-e2e"], "matches no op"),
        (["--no-ops", "--no-e2e"], "nothing to run"),
    ],
)
def test_bad_options_exit_2(bad, why, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--quiet", *bad])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "normkit bench: error" in err and why in err


def test_unavailable_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(kernels, "available", lambda: ["auto", "reference"])
    with pytest.raises(ValueError, match="backend 'cpu' is not available here"):
        check_config(BenchConfig(backends=["cpu"]))


def test_resnet18_style_matches_torchvision_layout():
    model = ResNet18Style(torch.nn.BatchNorm2d)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 20  # stem + 16 block convs + 3 projection shortcuts
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(11.17e6, rel=0.01)
    big = ResNet18Style(torch.nn.BatchNorm2d, small=False)
    assert big.stem[0].kernel_size == (7, 7) and isinstance(big.stem[3], torch.nn.MaxPool2d)


@pytest.mark.parametrize(
    "build, shape",
    [
        (_resnet(True, "bn"), (2, 3, 32, 32)),
        (_resnet(False, "gn:32"), (2, 3, 64, 64)),
        (_cnn4("bn"), (2, 1, 8, 8)),
        (_cnn4("gn:8"), (2, 1, 8, 8)),
    ],
)
def test_e2e_pairs_are_the_same_net(build, shape):
    # torch.nn's norms and normkit's in the same architecture, same weights: the same outputs (train mode)
    x = torch.randn(shape)
    torch.testing.assert_close(build("normkit")(x), build("torch")(x), rtol=1e-4, atol=1e-4)


def test_benchmark_script_is_a_wrapper(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(BENCH_SCRIPT)])
    script = runpy.run_path(str(BENCH_SCRIPT), run_name="bench_norms")
    rc = script["main"](
        [
            "--shapes",
            "2x32x4x4",
            "--only",
            "group_norm",
            "--layouts",
            "nchw",
            "--dtypes",
            "fp32",
            "--passes",
            "fwd",
            "--repeats",
            "1",
            "--min-time",
            "0.01",
            "--no-e2e",
            "--quiet",
            "--baseline",
            str(Path(__file__).resolve().parents[1] / "no" / "such"),
        ]
    )
    assert rc == 2 and "no package at" in capsys.readouterr().err


def test_timed_statements_run_on_the_configured_threads():
    # torch.utils.benchmark.Timer defaults to one intra-op thread; the bench must time what it reports
    from normkit import bench

    seen = []
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        bench._time(lambda: seen.append(torch.get_num_threads()), 0.01)
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {2}


def test_percent_of_peak_is_the_bandwidth_over_the_given_peak():
    # --peak-gbps on any device: the % of peak column is gbps / peak, per provider
    cfg = BenchConfig(
        shapes=[(2, 32, 4, 4)],
        dtypes=["fp32"],
        layouts=["nchw"],
        passes=["fwd"],
        ops=["group_norm"],
        backends=["reference"],
        repeats=1,
        min_time=0.01,
        e2e=False,
        quiet=True,
        peak_gbps=50.0,
    )
    md, data = run_bench(cfg)
    row = data["ops"][0]
    assert data["peak_gbps"] == 50.0
    for prov, g in row["gbps"].items():
        assert row["pct_peak"][prov] == pytest.approx(100 * g / 50.0)
    assert "peak bandwidth 50 GB/s" in md and "native % peak" in md


def test_cuda_device_is_refused_with_its_reason_where_there_is_none():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal is for machines without one")
    with pytest.raises(ValueError, match="--device cuda: torch .* sees no CUDA device"):
        check_config(BenchConfig(device="cuda"))
    with pytest.raises(ValueError, match="--device: expected cpu or cuda"):
        check_config(BenchConfig(device="tpu"))


def test_cuda_providers_leave_out_the_cpu_kernels(monkeypatch):
    # on CUDA "auto" is a provider of its own (torch's op where normkit hands the call to it)
    from normkit import bench

    monkeypatch.setattr(kernels, "available", lambda: ["auto", "reference", "cpu", "native", "triton"])
    assert bench._backends(BenchConfig(device="cuda")) == ["auto", "reference", "native", "triton"]
    assert bench._backends(BenchConfig()) == ["reference", "cpu", "native", "triton"]
    assert bench._selectable(BenchConfig(device="cuda"))[0] == ["auto", "reference", "native", "triton"]
    assert "auto" not in bench._selectable(BenchConfig())[0]
    with pytest.raises(ValueError, match="unknown backend 'auto'"):  # on the CPU eager it is "cpu"
        check_config(BenchConfig(backends=["auto"]))
    parsed = build_parser().parse_args(["bench", "--backends", "auto,triton", "--device", "cuda"])
    assert parsed.backends == ["auto", "triton"]  # (benchmarks/gpu_check.sh's stage 4 passes this)


def _ab_module():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ab_kernels.py"
    spec = importlib.util.spec_from_file_location("ab_kernels", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ab_kernels_variants_get_their_own_namespace_and_the_source_honours_it():
    """benchmarks/ab_kernels.py builds two versions side by side through the NORMKIT_CPU_NS macro."""
    import re

    ab = _ab_module()
    text = ab.source_of(None)
    assert text == (Path(__file__).resolve().parents[1] / ab.SOURCE).read_text()
    # the library namespace must stay overridable, or the two builds cannot load together
    assert "#ifndef NORMKIT_CPU_NS" in text and "NORMKIT_LIBRARY(NORMKIT_CPU_NS" in text
    a, b = ab.variant_namespace(text), ab.variant_namespace(text + "\n// changed")
    assert a != b and a == ab.variant_namespace(text)
    assert all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", ns) for ns in (a, b))
    assert ab.parse_shape("8x256x28x28") == (8, 256, 28, 28)
    for bad in ("8", "8x0x3", "ax2"):
        with pytest.raises((argparse.ArgumentTypeError, ValueError)):
            ab.parse_shape(bad)


def test_large_inputs_are_read_cold_from_copies_taken_in_turn():
    from normkit.bench import COLD_BYTES, ROTATE_BYTES, _input_copies, _op_stmt, _turns

    small = torch.randn(2, 3, 4, 4)
    assert _input_copies(small) == [small]
    big = torch.empty(COLD_BYTES // 4 + 1).view(1, 1, 1, -1).to(memory_format=torch.channels_last)
    xs = _input_copies(big)
    assert len(xs) * big.numel() * 4 >= ROTATE_BYTES > (len(xs) - 1) * big.numel() * 4
    assert xs[0] is big and all(x.stride() == big.stride() and x.data_ptr() != big.data_ptr() for x in xs[1:])
    turn = _turns(3)
    assert [turn() for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    seen: list[int] = []
    stmt = _op_stmt(lambda x, w, b: seen.append(x.data_ptr()) or x * w, xs[:3], torch.ones(()), None, False)
    for _ in range(4):
        stmt()
    assert seen == [xs[0].data_ptr(), xs[1].data_ptr(), xs[2].data_ptr(), xs[0].data_ptr()]


def test_compiled_rows_stay_compiled_past_dynamos_recompile_limit():
    """The bench compiles one code object (the composite, a model's forward) for many shapes: each
    must get a static graph of its own (by default Dynamo goes dynamic after one recompile and runs
    eagerly after eight, which once made later "compiled" rows eager ones)."""
    from normkit.bench import _compile_settings

    seen: list[tuple[int, ...]] = []

    def backend(gm, example_inputs):
        seen.append(tuple(example_inputs[0].shape))
        return gm.forward

    torch._dynamo.reset()
    f = torch.compile(lambda x: x * 2 + 1, backend=backend)
    with _compile_settings(True):
        for n in range(1, 13):
            assert torch.equal(f(torch.ones(n)), torch.full((n,), 3.0))
    torch._dynamo.reset()
    assert seen == [(n,) for n in range(1, 13)]
    assert all(isinstance(s, int) for shape in seen for s in shape)
