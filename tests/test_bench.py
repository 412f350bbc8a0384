"""``normkit bench``: the API and the command on tiny settings (no timing is asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from normkit import kernels
from normkit.bench import OPS, BenchConfig, ResNet18Style, run_bench
from normkit.cli import main


def test_run_bench_rows_and_ratios():
    md, data = run_bench(BenchConfig(shapes=[(2, 32, 4, 4)], layouts=["nchw", "cl"], dtypes=["fp32"],
                                     passes=["fwd", "fwdbwd"], ops=["batch_norm", "proxy"], repeats=1,
                                     min_time=0.01, e2e=False, quiet=True))
    rows = data["ops"]
    assert {r["op"] for r in rows} == {"batch_norm train", "GN32 + proxy norm (native: GN+ReLU)"}
    assert len(rows) == 2 * 2 * 2  # ops x layouts x passes
    providers = ["native"] + [f"normkit:{b}" for b in kernels.available() if b != "auto"]
    for r in rows:
        assert list(r["ms"]) == providers
        assert all(v > 0 for v in r["ms"].values())
        assert r["vs_native"]["normkit:reference"] == pytest.approx(r["ms"]["normkit:reference"] / r["ms"]["native"])
        assert r["vs_copy"]["native"] == pytest.approx(r["ms"]["native"] / r["copy_ms"])
        factor = 5 if r["pass"] == "fwdbwd" else 2
        assert r["gbps"]["native"] == pytest.approx(factor * 2 * 32 * 16 * 4 / (r["ms"]["native"] * 1e-3) / 1e9)
    assert md.count("\n| batch_norm train |") == 4 and "normkit:reference/native" in md


def test_every_op_agrees_with_torch_native():
    # the benchmark compares like with like: each normkit op computes what its native counterpart does
    x = torch.randn(4, 32, 5, 5)
    w, b = torch.rand(32) + 0.5, torch.randn(32)
    for name, (native, ours, naive) in OPS.items():
        exp = native(x, w, b)
        if "proxy" in name:  # a different activation by design: same shape and layout only
            assert ours(x, w, b).shape == exp.shape
            continue
        torch.testing.assert_close(ours(x, w, b), exp, rtol=1e-4, atol=1e-4, msg=name)
        torch.testing.assert_close(naive(x, w, b), exp, rtol=1e-4, atol=1e-4, msg=name)


def test_e2e_and_cli_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    md_path = tmp_path / "bench.md"
    rc = main(["bench", "--quick", "--no-ops", "--quiet", "--backends", "reference", "--json", str(out), "--md", str(md_path)])
    assert rc == 0
    data = json.loads(out.read_text())
    models = {r["model"] for r in data["e2e"]}
    assert models == {"ResNet-18-style 32x32", "CNN-4 bn"}
    for r in data["e2e"]:
        assert set(r["ms"]) == {"torch.nn", "normkit:reference"} and r["vs_torch"]["normkit:reference"] > 0
    printed = capsys.readouterr().out
    assert "| ResNet-18-style 32x32 |" in printed and md_path.read_text().strip() == printed.strip()


@pytest.mark.parametrize("bad", [["--shapes", "3x4"], ["--dtypes", "fp8"], ["--repeats", "0"], ["--backends", "gpu"]])
def test_bad_options_exit_2(bad, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", *bad])
    assert e.value.code == 2
    assert "normkit bench: error" in capsys.readouterr().err


def test_resnet18_style_matches_torchvision_layout():
    model = ResNet18Style(torch.nn.BatchNorm2d)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 20  # stem + 16 block convs + 3 projection shortcuts
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(11.17e6, rel=0.01)
