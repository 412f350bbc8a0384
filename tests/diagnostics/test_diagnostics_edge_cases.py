"""NormMonitor and diagnostics.stats paths the rest of the suite leaves out: ``where=`` as a regex or a
callable, the norm layers it names as unwatched, a layer never called, attach twice, plot with no
data, and the statistics helpers' argument errors.

Found by measuring coverage. Oracles: the documented selection rules, error types and messages,
and closed forms.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import normkit
from normkit import NormError

D = normkit.diagnostics


class _OwnLayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class _OwnLRN(nn.LocalResponseNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1


def _two() -> nn.Module:
    return nn.Sequential(nn.BatchNorm2d(3), nn.GroupNorm(1, 3))


@pytest.mark.parametrize(
    ("where", "names"),
    [(re.compile(r"^0$"), ["0"]), (lambda name, m: isinstance(m, nn.GroupNorm), ["1"])],
    ids=["regex", "callable"],
)
def test_where_as_a_regex_or_a_callable_selects_layers(where: object, names: list[str]) -> None:
    net = _two()
    with D.NormMonitor(net, where=where) as mon:  # type: ignore[arg-type]
        net(torch.randn(4, 3, 2, 2))
    assert list(mon.records) == names
    assert all(mon.records[n].last for n in names)


def test_layers_it_cannot_watch_are_named_with_why() -> None:
    net = nn.Sequential(_OwnLayerNorm(4), _OwnLRN(2), nn.LayerNorm(()), nn.BatchNorm1d(4))
    with pytest.warns(UserWarning, match="not watching 3 norm layer"):
        mon = D.NormMonitor(net)
    assert list(mon.records) == ["3"]
    assert mon.unwatched == {
        "0": "_OwnLayerNorm: it subclasses torch.nn.LayerNorm with its own forward, so what it computes is "
        "unknown; exclude it with where=",
        "1": "_OwnLRN: it subclasses torch.nn.LocalResponseNorm with its own forward, so what it computes is "
        "unknown; exclude it with where=",
        "2": "LayerNorm: its normalized_shape is empty, so it refuses every input "
        "(torch builds it all the same)",
    }


def test_a_layer_never_called_attach_twice_and_plot_without_data(tmp_path: Path) -> None:
    net = _two()
    mon = D.NormMonitor(net)
    assert mon.attach() is mon.attach()  # already attached: nothing more
    try:
        with pytest.raises(
            NormError, match="NormMonitor.plot: no layer was called while the monitor was attached"
        ):
            mon.plot(tmp_path / "p.png")
        net[0](torch.randn(4, 3, 2, 2))  # the GroupNorm is never called
        text = mon.table(print_=False)
    finally:
        mon.detach()
    row = next(line for line in text.splitlines() if "not called" in line)
    assert row.split()[1] == "1" and "gn" in row
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (
            lambda: D.power_decomposition(torch.zeros(0, 3)),
            "need at least one sample and one value, got shape (0, 3)",
        ),
        (lambda: D.channel_moments(torch.randn(3)), "channel_moments: expected an (N, C, *spatial) tensor"),
        (
            lambda: D.values_per_statistic("bn", (3,)),
            "values_per_statistic: expected an (N, C, *spatial) shape",
        ),
    ],
    ids=["power-empty", "moments-1d", "values-per-stat-1d"],
)
def test_stats_argument_errors(call: object, words: str) -> None:
    with pytest.raises(NormError) as e:
        call()  # type: ignore[operator]
    assert words in str(e.value)


@pytest.mark.parametrize(("momentum", "want"), [(0.0, 0.0), (1.0, 1.0), (None, 6.0), (0.5, None)])
def test_ema_effective_batches_closed_form(momentum: float | None, want: float | None) -> None:
    t = 6
    if want is None:  # (sum w)^2 / sum w^2 with w_k = m (1 - m)^k, k < t
        w = [momentum * (1 - momentum) ** k for k in range(t)]  # type: ignore[operator]
        want = sum(w) ** 2 / sum(v * v for v in w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert D.ema_effective_batches(momentum, t) == pytest.approx(want, rel=1e-12)
