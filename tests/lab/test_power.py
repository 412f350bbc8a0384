"""The power decomposition: the exact identity against a float64 closed form, and what each norm forces."""

from __future__ import annotations

import pytest
import torch

import normkit
from normkit.lab.experiments.power import decompose_sequence, normalized_output, power_criteria
from normkit.lab.models import RandNet
from normkit.lab.power import TERMS, power_decomposition, power_fractions


def _closed_form_case(seed: int) -> tuple[torch.Tensor, dict[str, float]]:
    """y[x,c,h,w] = a_c + b[x,c] + s[x,c] * z[c,h,w], z with spatial mean 0 and biased std 1 exactly."""
    g = torch.Generator().manual_seed(seed)
    N, C, H, W = 7, 5, 4, 6
    a = torch.randn(C, generator=g, dtype=torch.float64) * 2
    b = torch.randn(N, C, generator=g, dtype=torch.float64)
    s = torch.randn(N, C, generator=g, dtype=torch.float64) * 3
    z = torch.randn(C, H, W, generator=g, dtype=torch.float64)
    z = z - z.mean(dim=(1, 2), keepdim=True)
    z = z / z.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
    y = a[None, :, None, None] + b[:, :, None, None] + s[:, :, None, None] * z[None]
    mu, sig = a[None] + b, s.abs()  # the instance statistics, known without looking at y
    expected = {
        "P_mean": float((mu.mean(0) ** 2).mean()),
        "P_varmean": float(((mu - mu.mean(0)) ** 2).mean(0).mean()),
        "P_varstd": float(((sig - sig.mean(0)) ** 2).mean(0).mean()),
        "P_meanstd": float((sig.mean(0) ** 2).mean()),
        "total": float((y**2).mean()),
    }
    return y, expected


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_float64_closed_form_and_sums_to_total(seed: int) -> None:
    y, expected = _closed_form_case(seed)
    for inp, tol in ((y, 1e-10), (y.float(), 1e-5)):
        d = power_decomposition(inp)
        for k, v in expected.items():
            assert getattr(d, k) == pytest.approx(v, rel=tol, abs=tol)
        assert sum(getattr(d, k) for k in TERMS) == pytest.approx(d.total, rel=1e-12)
    # the four closed-form terms also sum to the directly computed power: the identity itself
    assert sum(expected[k] for k in TERMS) == pytest.approx(expected["total"], rel=1e-12)


def test_fractions_sum_to_one_and_nc_input() -> None:
    f = power_fractions(torch.randn(10, 3, 5, 5) * 2 + 1)
    assert sum(f[k] for k in TERMS) == pytest.approx(1.0, abs=1e-12)
    d = power_decomposition(torch.randn(10, 3))  # no spatial dims: sig = 0
    assert d.P_varstd == 0 and d.P_meanstd == 0
    assert power_decomposition(torch.zeros(2, 3, 2, 2)).fractions() == {k: 0.0 for k in TERMS}
    with pytest.raises(ValueError, match="expected an"):
        power_decomposition(torch.randn(5))


def test_instance_norm_zeroes_the_variance_terms() -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 8, 6, 6) * (torch.rand(32, 8, 1, 1) + 0.5) * 3 + torch.randn(32, 8, 1, 1)
    y = normkit.nn.InstanceNorm2d(8)(x)
    f = power_fractions(y)
    assert f["P_varmean"] < 1e-12 and f["P_varstd"] < 1e-6 and f["P_mean"] < 1e-12
    # and inside a deep random net, at every layer, after the norm
    net = RandNet("in", depth=4, width=8)
    layers = decompose_sequence(
        [m for pair in zip(net.convs, net.norm_acts) for m in pair], torch.randn(16, 1, 8, 8)
    )
    assert len(layers) == 4
    for layer in layers:
        assert layer["post_norm"]["P_varmean"] <= 1e-6 and layer["post_norm"]["P_varstd"] <= 1e-6


def test_batch_norm_zeroes_the_channel_mean() -> None:
    torch.manual_seed(0)
    y = normkit.nn.BatchNorm2d(8)(torch.randn(32, 8, 6, 6) + 5)
    assert power_fractions(y)["P_mean"] < 1e-10


@pytest.mark.parametrize(
    ("spec", "reference"),
    [
        ("bn", lambda x: torch.nn.functional.batch_norm(x, None, None, training=True)),
        ("gn:4", lambda x: torch.nn.functional.group_norm(x, 4)),
        ("ln", lambda x: torch.nn.functional.group_norm(x, 1)),
        ("in", lambda x: torch.nn.functional.instance_norm(x)),
        ("ln+pn", lambda x: torch.nn.functional.group_norm(x, 1, eps=1e-3)),
        ("gn:4+pn", lambda x: torch.nn.functional.group_norm(x, 4, eps=1e-3)),
        ("ln2d", lambda x: torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (8,)).permute(0, 3, 1, 2)),
        ("none", lambda x: x),
    ],
)
def test_normalized_output_is_the_norm_before_its_affine(spec: str, reference) -> None:
    torch.manual_seed(0)
    layer = normkit.create_norm_act_layer(spec, 8)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()  # a non-trivial affine must not show up in the result
    x = torch.randn(6, 8, 5, 5) * 2 + 1
    torch.testing.assert_close(normalized_output(layer, x), reference(x), atol=1e-5, rtol=1e-5)


def test_normalized_output_bn_eval_uses_running_stats() -> None:
    layer = normkit.create_norm_act_layer("bn", 4)
    layer(torch.randn(16, 4, 3, 3) * 3 + 2)
    layer.eval()
    x = torch.randn(5, 4, 3, 3)
    ref = torch.nn.functional.batch_norm(x, layer.running_mean, layer.running_var, training=False)
    torch.testing.assert_close(normalized_output(layer, x), ref)
    with pytest.raises(TypeError, match="don't know"):
        normalized_output(torch.nn.ReLU(), x)


def test_criteria_on_synthetic_fractions() -> None:
    def layers(pmean: list[float], var: float) -> list[dict[str, float]]:
        return [{"P_mean": p, "P_varmean": var, "P_varstd": var, "P_meanstd": 1 - p - 2 * var} for p in pmean]

    fr = {
        "bn": layers([0.0] * 4, 0.01),
        "ln": layers([0.0, 0.5, 0.8, 0.9], 1e-4),
        "in": layers([0.0] * 4, 0.0),
        "ln+pn": layers([0.0, 0.01, 0.01, 0.01], 0.003),
    }
    crit = power_criteria(fr)
    assert len(crit) == 5 and all(c["ok"] for c in crit)
    fr["ln"] = layers([0.5, 0.4, 0.3, 0.02], 1e-4)
    assert [c["ok"] for c in power_criteria(fr)][1:3] == [False, False]
