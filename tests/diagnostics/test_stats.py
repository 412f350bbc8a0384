"""diagnostics.stats: each number against a direct float64 computation of its definition."""

from __future__ import annotations

import pytest
import torch

import normkit
from normkit.diagnostics import stats

F64 = torch.float64


def test_batch_running_gap_equals_the_direct_difference_of_normalized_values():
    torch.manual_seed(0)
    x = torch.randn(5, 6, 4, 3, dtype=F64) * torch.rand(1, 6, 1, 1, dtype=F64) * 3 + torch.randn(
        1, 6, 1, 1, dtype=F64
    )
    rm, rv, eps = torch.randn(6, dtype=F64), torch.rand(6, dtype=F64) + 0.2, 1e-3
    mean_b = x.mean((0, 2, 3))
    var_b = x.var((0, 2, 3), unbiased=False)
    got = stats.batch_running_gap(mean_b, var_b, rm, rv, eps)

    def v(t):
        return t.view(1, -1, 1, 1)

    x_b = (x - v(mean_b)) / (v(var_b) + eps).sqrt()
    x_r = (x - v(rm)) / (v(rv) + eps).sqrt()
    assert got["gap"] == pytest.approx(float((x_b - x_r).pow(2).mean().sqrt()), rel=1e-12)
    assert got["mean_shift"] == pytest.approx(
        float(((mean_b - rm) / (rv + eps).sqrt()).pow(2).mean().sqrt()), rel=1e-12
    )
    ratio = 0.5 * torch.log((var_b + eps) / (rv + eps))
    assert got["log_std_ratio"] == pytest.approx(float(ratio.pow(2).mean().sqrt()), rel=1e-12)


def test_ema_effective_batches_equals_kish_on_the_explicit_weights():
    for m, t in ((0.1, 1), (0.1, 7), (0.3, 50), (0.01, 400)):
        w = torch.tensor([m * (1 - m) ** k for k in range(t)], dtype=F64)
        assert stats.ema_effective_batches(m, t) == pytest.approx(
            float(w.sum() ** 2 / w.pow(2).sum()), rel=1e-10
        )
    assert stats.ema_effective_batches(0.1, 10**6) == pytest.approx(19.0)
    assert stats.ema_effective_batches(None, 12) == 12.0 and stats.ema_effective_batches(0.1, 0) == 0.0


@pytest.mark.parametrize(
    "kind, shape, groups, expected",
    [
        ("bn", (2, 64, 1, 1), None, 2),
        ("bn", (8, 3, 5, 5), None, 200),
        ("gn", (8, 16, 5, 5), 4, 100),
        ("pn", (8, 16, 5, 5), 1, 400),
        ("ln", (8, 16, 5, 5), None, 400),
        ("ln2d", (8, 16, 5, 5), None, 16),
        ("in", (8, 16, 5, 5), None, 25),
        ("bn", (4, 7), None, 4),
    ],
)
def test_values_per_statistic_counts_the_reduction_set(kind, shape, groups, expected):
    assert stats.values_per_statistic(kind, shape, groups) == expected
    # Cross-check on the tensor: the count torch.group_norm pools over equals numel / number of sets.
    if kind in ("gn", "pn", "ln"):
        sets = shape[0] * (groups or 1)
        assert torch.zeros(shape).numel() // sets == expected


def test_values_per_statistic_ghost_and_errors():
    assert stats.values_per_statistic("bn", (64, 3, 2, 2), ghost_batch_size=16) == 64
    with pytest.raises(normkit.NormError, match="unknown kind"):
        stats.values_per_statistic("xx", (2, 3))


def test_dead_and_collapsed_and_channel_moments():
    y = torch.randn(4, 5, 6)
    y[:, 1] = 0.0
    y[:, 3] = -2.0
    y[:, 4] = 7.0 + 1e-5 * torch.randn(4, 6)
    assert stats.dead_and_collapsed(y) == ([1], [3, 4])
    n, mean, var = stats.channel_moments(y)
    assert n == 24
    torch.testing.assert_close(mean, y.double().mean((0, 2)))
    torch.testing.assert_close(var, y.double().var((0, 2), unbiased=False))
    with pytest.raises(TypeError):
        stats.channel_moments([1.0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_power_fractions_of_non_finite_values_are_nan(bad):
    y = torch.randn(4, 3, 5)
    y[1, 2, 0] = bad
    f = stats.power_fractions(y)
    assert all(f[k] != f[k] for k in stats.TERMS)  # NaN: not the 0.0 of an all-zero tensor
    assert stats.power_fractions(torch.zeros(4, 3, 5))["P_mean"] == 0.0


@pytest.mark.parametrize("pad", [50.0, float("nan"), float("inf")])
def test_masked_statistics_are_over_the_valid_values_only(pad):
    # the valid values by boolean indexing, in float64; the padding never reaches a number
    torch.manual_seed(3)
    y = torch.randn(4, 3, 6) * 2 + 1
    mask = torch.zeros(4, 3, 6, dtype=torch.bool)
    for i, length in enumerate([6, 2, 0, 4]):  # sample 2: nothing valid in channels 0 and 1
        mask[i, :2, :length] = True
    mask[:, 2, 0] = True  # channel 2: one valid value per sample
    y[:, 0] = 0.0  # channel 0: 0 on its valid values (not on the padding)
    y[:, 1] = 4.0  # channel 1: constant on its valid values
    y = torch.where(mask, y, torch.full((), pad))
    y64 = y.double()
    n, mean, var = stats.channel_moments(y, mask=mask)
    valid = [y64[:, c][mask[:, c]] for c in range(3)]
    assert n == min(v.numel() for v in valid) == 4
    torch.testing.assert_close(mean, torch.stack([v.mean() for v in valid]))
    torch.testing.assert_close(var, torch.stack([v.var(unbiased=False) for v in valid]))
    assert stats.dead_and_collapsed(y, mask=mask) == ([0], [1])
    # the power decomposition: each (sample, channel) over its valid positions, weighted by their count
    d = stats.power_decomposition(y, mask=mask)
    terms = torch.zeros(5, dtype=F64)
    for c in range(3):
        inst = [y64[i, c][mask[i, c]] for i in range(4) if mask[i, c].any()]
        w = torch.tensor([v.numel() for v in inst], dtype=F64) / sum(v.numel() for v in inst)
        mu = torch.stack([v.mean() for v in inst])
        sig = torch.stack([v.var(unbiased=False).sqrt() for v in inst])
        e_mu, e_sig = (w * mu).sum(), (w * sig).sum()
        terms += torch.stack(
            [
                e_mu**2,
                (w * (mu - e_mu) ** 2).sum(),
                (w * (sig - e_sig) ** 2).sum(),
                e_sig**2,
                valid[c].pow(2).mean(),
            ]
        )
    terms /= 3
    assert d.total == pytest.approx(float(terms[4]), rel=1e-12)
    for i, k in enumerate(stats.TERMS):
        assert getattr(d, k) == pytest.approx(float(terms[i]), rel=1e-9, abs=1e-15), k
    assert sum(d.fractions().values()) == pytest.approx(1.0, rel=1e-12)
    assert stats.power_fractions(y, mask=mask)["total"] == d.total
    # an all-valid mask: what no mask gives
    full = torch.ones(1, 1, 6, dtype=torch.bool)
    x = torch.randn(4, 3, 6)
    for a, b in zip(stats.power_decomposition(x, mask=full), stats.power_decomposition(x)):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-15)


def test_masked_statistics_refuse_a_mask_they_cannot_use():
    y = torch.randn(2, 3, 4)
    with pytest.raises(TypeError, match="bool"):
        stats.channel_moments(y, mask=torch.ones(2, 1, 4))
    with pytest.raises(
        normkit.NormError, match=r"\(2, 4\) does not broadcast to the input shape \(2, 3, 4\)"
    ):
        stats.dead_and_collapsed(y, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(normkit.NormError, match="no valid value"):
        stats.power_decomposition(y, mask=torch.zeros(1, 1, 1, dtype=torch.bool))
    n, mean, _ = stats.channel_moments(y, mask=torch.zeros(1, 3, 1, dtype=torch.bool))
    assert n == 0 and bool(mean.isnan().all())  # no valid value: NaN, not a clean-looking 0
