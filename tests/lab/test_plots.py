"""The lab's figures: they draw the data they are given, the pass thresholds at the criteria's values,
and stay readable (>= 1000 px wide, text >= 9 pt, legends off the data, lines told apart without colour)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")

from matplotlib.image import imread

from normkit.lab import plots

# ---------------------------------------------------------------------------------------------- data


def _agg() -> list[dict[str, Any]]:
    """compare's aggregate rows: BN breaks at B=2, GN and LN+PN do not."""
    err = {
        ("bn", 32): 0.3,
        ("bn", 8): 0.6,
        ("bn", 2): 30.0,
        ("gn:8", 32): 2.8,
        ("gn:8", 8): 1.8,
        ("gn:8", 2): 1.0,
        ("ln+pn", 32): 0.7,
        ("ln+pn", 8): 0.8,
        ("ln+pn", 2): 1.0,
    }
    rows = []
    for (norm, b), e in err.items():
        row = {"model": "cnn4-head", "norm": norm, "batch_size": b, "test_err_mean": e, "test_err_std": 0.2}
        if norm == "bn":
            row["test_err_batch_stats_mean"] = 2 * e
        rows.append(row)
    return rows


def _histories() -> dict[str, list[dict[str, Any]]]:
    out = {}
    for b, norm in itertools.product((32, 8, 2), ("bn", "gn:8", "ln+pn")):
        out[f"cnn4-head {norm} B={b} seed=0"] = [
            {"epoch": e, "test_err": 50.0 / e + b / 10 + len(norm)} for e in (1, 2, 3)
        ]
    return out


def _fractions(depth: int = 6) -> dict[str, list[dict[str, float]]]:
    def layer(pm: float, vm: float, vs: float) -> dict[str, float]:
        return {"P_mean": pm, "P_varmean": vm, "P_varstd": vs, "P_meanstd": 1 - pm - vm - vs}

    return {
        "bn": [layer(1e-14, 3e-2, 4e-2) for _ in range(depth)],
        "ln": [layer(min(0.2 * d, 0.95), 3e-4, 5e-4) for d in range(depth)],
        "in": [layer(0.0, 0.0, 2e-11) for _ in range(depth)],
        "ln+pn": [layer(0.004, 4.6e-3, 2.2e-3) for _ in range(depth)],
    }


def _cnn_rows() -> list[dict[str, Any]]:
    rows = []
    for norm, lr in itertools.product(("none", "bn"), (0.01, 0.1, 1.0)):
        diverged = norm == "none" and lr == 1.0
        acc = {0.01: 0.3, 0.1: 0.8, 1.0: 0.1}[lr] if norm == "none" else 0.99
        rows.append(
            {
                "norm": norm,
                "lr": lr,
                "final_train_loss": float("nan") if diverged else 0.1 / lr,
                "diverged": diverged,
                "best_acc": acc,
                "curve": [(s, acc * s / 20) for s in (5, 10, 15, 20)],
            }
        )
    return rows


def _landscape() -> dict[str, dict[str, list[float]]]:
    steps = [0.0, 25.0, 50.0, 75.0]
    return {
        n: {
            "step": steps,
            "loss_min": [1.0] * 4,
            "loss_max": [1.0 + k * s for s in (1, 2, 3, 4)],
            "loss_range": [k * s for s in (1, 2, 3, 4)],
            "grad_change": [k * 10.0] * 4,
            "beta": [k * 5.0, k, k, k],
        }
        for n, k in (("none", 1.0), ("bn", 0.01))
    }


def _mlp() -> tuple[dict[str, dict[str, list[float]]], dict[str, list[float]]]:
    series = {
        n: {"steps": [0, 50, 100], "p15": [-1, -1.2, -1.5], "p50": [0.0, a, 2 * a], "p85": [1, 1.5, 2.5]}
        for n, a in (("none", 0.5), ("bn", 0.05))
    }
    return series, {"none": [0.1, 0.5, 0.9], "bn": [0.1, 0.9, 0.95]}


# ---------------------------------------------------------------------------------------------- helpers


def _drawn(fig: Any) -> Any:
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def _axes(fig: Any) -> list[Any]:
    return [ax for ax in fig.axes if ax.get_visible()]


def _by_title(fig: Any, title: str) -> Any:
    return next(ax for ax in _axes(fig) if ax.get_title() == title)


def _line(ax: Any, label: str) -> Any:
    for c in ax.containers:  # errorbar: the data line is the container's first artist
        if c.get_label() == label:
            return c.lines[0]
    return next(ln for ln in ax.get_lines() if ln.get_label() == label)


def _hlines(ax: Any) -> list[float]:
    """y of every full-width horizontal line (axhline) on ``ax``."""
    out = []
    for ln in ax.get_lines():
        x, y = ln.get_xdata(), ln.get_ydata()
        if len(y) == 2 and y[0] == y[1] and list(x) == [0, 1]:
            out.append(float(y[0]))
    return out


def _legends(fig: Any) -> list[Any]:
    return list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]


def _assert_legends_outside_axes(fig: Any) -> None:
    renderer = _drawn(fig)
    legends = _legends(fig)
    assert legends, "the figure has no legend"
    for leg in legends:
        box = leg.get_window_extent(renderer)
        for ax in _axes(fig):
            a = ax.get_window_extent(renderer)
            overlap_w = min(box.x1, a.x1) - max(box.x0, a.x0)
            overlap_h = min(box.y1, a.y1) - max(box.y0, a.y0)
            assert overlap_w <= 1 or overlap_h <= 1, f"legend overlaps the data area of {ax.get_title()!r}"


def _assert_text_at_least(fig: Any, points: float) -> None:
    from matplotlib.text import Text

    _drawn(fig)
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    assert sizes and min(sizes) >= points, min(sizes)


# ---------------------------------------------------------------------------------------------- style


def test_every_norm_family_differs_from_every_other_in_colour_marker_and_dash() -> None:
    specs = ["bn", "gn:8", "ln", "in", "ln+pn", "gn:4+pn", "none", "ws", "wn"]
    styles = plots._styles(specs)
    for a, b in itertools.combinations(specs, 2):
        sa, sb = styles[a], styles[b]
        assert sa["color"] != sb["color"], (a, b)
        assert sa["marker"] != sb["marker"], (a, b)
        assert sa["linestyle"] != sb["linestyle"], (a, b)


def test_a_norm_keeps_its_style_across_figures() -> None:
    fig1 = plots.curves_figure(_histories())
    fig2 = plots.compare_figure(_agg())
    a = _line(_by_title(fig1, "B=32"), "bn")
    b = _line(_by_title(fig2, "cnn4-head: bn"), "bn (eval)")
    assert (
        a.get_color() == b.get_color()
        and a.get_marker() == b.get_marker()
        and a.get_linestyle() == b.get_linestyle()
    )


# ---------------------------------------------------------------------------------------------- E1 / E3


def test_compare_draws_the_input_means_one_panel_per_norm() -> None:
    rows = _agg()
    fig = plots.compare_figure(rows)
    assert sorted(ax.get_title() for ax in _axes(fig)) == [
        "cnn4-head: bn",
        "cnn4-head: gn:8",
        "cnn4-head: ln+pn",
    ]
    for norm in ("bn", "gn:8", "ln+pn"):
        ln = _line(_by_title(fig, f"cnn4-head: {norm}"), f"{norm} (eval)")
        expect = sorted((r["batch_size"], r["test_err_mean"]) for r in rows if r["norm"] == norm)
        assert sorted(zip(ln.get_xdata(), ln.get_ydata())) == expect
    bs = _line(_by_title(fig, "cnn4-head: bn"), "bn (batch stats)")
    assert sorted(bs.get_ydata()) == [0.6, 1.2, 60.0]
    # BN's curve is repeated, grey, in the other panels for reference
    ref = _line(_by_title(fig, "cnn4-head: gn:8"), "bn (eval), for reference")
    assert sorted(ref.get_ydata()) == [0.3, 0.6, 30.0]


def test_compare_draws_the_e1_thresholds_at_the_criteria_values() -> None:
    fig = plots.compare_figure(_agg())
    # (i): BN at the smallest batch must reach BN at the largest + 3 pt = 0.3 + 3
    assert _hlines(_by_title(fig, "cnn4-head: bn")) == [pytest.approx(3.3)]
    # (ii): GN at B=2 within its B=32 value ± 1.5 pt = [1.3, 4.3]
    ax = _by_title(fig, "cnn4-head: gn:8")
    band = next(p for p in ax.patches if p.get_label() == "pass band")
    assert band.get_y() == pytest.approx(1.3) and band.get_y() + band.get_height() == pytest.approx(4.3)
    assert sorted(_hlines(ax)) == [pytest.approx(1.3), pytest.approx(4.3)]
    # LN+PN: 0.7 - 1.5 < 0, the band starts at 0
    band = next(p for p in _by_title(fig, "cnn4-head: ln+pn").patches if p.get_label() == "pass band")
    assert band.get_y() == 0 and band.get_height() == pytest.approx(2.2)
    no = plots.compare_figure(_agg(), criteria=False)
    assert all(not _hlines(ax) and not ax.patches for ax in _axes(no))


@pytest.mark.parametrize("norm", ["gbn:4", "brn", "syncbn", "post:bn", "post:gbn:4"])
def test_compare_draws_no_e1_ii_band_for_a_batch_dependent_norm(norm: str) -> None:
    """E1 (ii) holds the batch-independent norms to ±1.5 pt; its criteria skip BN's relatives (and BN
    after the activation), so their panels get no band; GN's keeps its band."""
    rows = _agg() + [{**r, "norm": norm} for r in _agg() if r["norm"] == "bn"]
    fig = plots.compare_figure(rows)
    ax = _by_title(fig, f"cnn4-head: {norm}")
    assert not ax.patches and not _hlines(ax)
    assert any(p.get_label() == "pass band" for p in _by_title(fig, "cnn4-head: gn:8").patches)


def test_compare_with_one_batch_size_draws_a_point_per_norm_and_the_e3_band() -> None:
    rows = [r for r in _agg() if r["batch_size"] == 32]
    fig = plots.compare_figure(rows)
    (ax,) = _axes(fig)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["bn", "gn:8", "ln+pn"]
    assert list(_line(ax, "gn:8").get_ydata()) == [2.8]
    band = next(p for p in ax.patches if p.get_label() == "pass band")  # |LN+PN - BN| <= 1 around BN's 0.3
    assert band.get_y() == 0 and band.get_y() + band.get_height() == pytest.approx(1.3)


def test_curves_one_panel_per_batch_size_one_line_per_norm() -> None:
    hist = _histories()
    fig = plots.curves_figure(hist)
    assert [ax.get_title() for ax in _axes(fig)] == ["B=32", "B=8", "B=2"]
    ax = _by_title(fig, "B=8")
    assert sorted(ln.get_label() for ln in ax.get_lines()) == ["bn", "gn:8", "ln+pn"]
    assert list(_line(ax, "gn:8").get_ydata()) == [h["test_err"] for h in hist["cnn4-head gn:8 B=8 seed=0"]]
    lines = [_line(ax, n) for n in ("bn", "gn:8", "ln+pn")]
    for a, b in itertools.combinations(lines, 2):
        assert a.get_color() != b.get_color() and (
            a.get_marker() != b.get_marker() or a.get_linestyle() != b.get_linestyle()
        )


def test_curves_without_batch_tokens_share_one_panel() -> None:
    fig = plots.curves_figure({"a": [{"epoch": 1, "test_err": 5.0}], "b": [{"epoch": 1, "test_err": 7.0}]})
    (ax,) = _axes(fig)
    assert sorted(ln.get_label() for ln in ax.get_lines()) == ["a", "b"]


# ---------------------------------------------------------------------------------------------- E4


def test_power_draws_every_term_on_a_log_axis_with_values_under_the_floor_at_the_floor() -> None:
    fr = _fractions()
    fig = plots.power_figure(fr, floor=1e-10)
    assert sorted(ax.get_title() for ax in _axes(fig)) == ["bn", "in", "ln", "ln+pn"]
    ax = _by_title(fig, "ln+pn")
    assert ax.get_yscale() == "log"
    assert list(_line(ax, "P_varstd").get_ydata()) == [2.2e-3] * 6  # the 1e-3 terms are drawn as they are
    ax = _by_title(fig, "in")
    assert list(_line(ax, "P_varmean").get_ydata()) == [1e-10] * 6  # exact zeros: at the floor
    assert list(_line(ax, "P_varstd").get_ydata()) == [1e-10] * 6  # 2e-11 < floor
    assert ax.get_ylim()[0] < 1e-10  # the floor itself is inside the axis
    assert list(_line(ax, "P_mean").get_xdata()) == [1, 2, 3, 4, 5, 6]


def test_power_draws_the_e4_thresholds_only_when_asked() -> None:
    fr = _fractions()
    fig = plots.power_figure(fr, criteria=True)
    assert _hlines(_by_title(fig, "bn")) == [0.02]
    assert _hlines(_by_title(fig, "in")) == [1e-6]
    assert _hlines(_by_title(fig, "ln+pn")) == [1e-6]
    mark = _line(_by_title(fig, "ln"), "E4: LN's last P_mean must be ≥ this (5× LN+PN's)")
    assert list(mark.get_xdata()) == [6] and list(mark.get_ydata()) == [pytest.approx(5 * 0.004)]
    plain = plots.power_figure(fr)
    assert all(not _hlines(ax) for ax in _axes(plain))


def test_power_lines_keep_coinciding_norms_visible_and_draw_the_thresholds() -> None:
    fr = _fractions()
    fig = plots.power_lines_figure(fr, floor=1e-10)
    (ax,) = _axes(fig)
    bn, inn = _line(ax, "bn (all < 1e-10)"), _line(ax, "in (all < 1e-10)")
    assert list(bn.get_ydata()) == list(inn.get_ydata()) == [1e-10] * 6  # same place ...
    assert (
        bn.get_markersize() != inn.get_markersize() and bn.get_marker() != inn.get_marker()
    )  # ... both visible
    assert list(_line(ax, "ln").get_ydata()) == [
        pytest.approx(min(0.2 * d, 0.95)) if d else 1e-10 for d in range(6)
    ]
    assert _hlines(ax) == [0.02]
    _drawn(fig)
    assert all(float(t).is_integer() for t in ax.get_xticks())  # layers are integers


# ---------------------------------------------------------------------------------------------- E2


def test_lr_sweep_draws_losses_marks_divergence_and_the_5x_threshold() -> None:
    rows = _cnn_rows()
    fig = plots.lr_sweep_figure(rows)
    loss_ax, err_ax = _axes(fig)
    assert list(_line(loss_ax, "bn").get_ydata()) == [pytest.approx(0.1 / lr) for lr in (0.01, 0.1, 1.0)]
    assert list(_line(loss_ax, "none").get_xdata()) == [0.01, 0.1]  # the diverged run is not on the line
    bad = _line(loss_ax, "none: diverged")
    assert list(bad.get_xdata()) == [1.0] and bad.get_ydata()[0] >= max(0.1 / lr for lr in (0.01, 0.1, 1.0))
    assert list(_line(err_ax, "bn").get_ydata()) == [pytest.approx(1.0)] * 3
    # E2 (i): none's largest stable LR is 0.1, so the line stands at 5 x 0.1
    for ax in (loss_ax, err_ax):
        v = [ln for ln in ax.get_lines() if ln.get_label() == "pass threshold"]
        assert len(v) == 1 and list(v[0].get_xdata()) == [pytest.approx(0.5)] * 2
    assert math.log(10) in _hlines(loss_ax)


def test_lr_curves_one_panel_per_norm_target_at_the_baselines_best_error() -> None:
    rows = _cnn_rows()
    fig = plots.lr_curves_figure(rows, base="none")
    assert [ax.get_title() for ax in _axes(fig)] == ["none", "bn"]
    ax = _by_title(fig, "bn")
    assert list(_line(ax, "LR 0.1").get_ydata()) == [
        pytest.approx(100 * (1 - 0.99 * s / 20)) for s in (5, 10, 15, 20)
    ]
    for ax in _axes(fig):
        assert _hlines(ax) == [pytest.approx(20.0)]  # best baseline accuracy 0.8 -> 20 % error
    lines = [ln for ln in ax.get_lines() if ln.get_label().startswith("LR")]
    for a, b in itertools.combinations(lines, 2):
        assert a.get_color() != b.get_color() and a.get_marker() != b.get_marker()


def test_percentiles_draw_the_input_and_report_the_median_std() -> None:
    series, acc = _mlp()
    fig = plots.percentiles_figure(series, acc=acc)
    ax = _by_title(fig, "test accuracy")
    assert list(_line(ax, "bn").get_ydata()) == [pytest.approx(v) for v in (10, 90, 95)]
    bn_ax = next(a for a in _axes(fig) if a.get_title().startswith("bn"))
    assert list(_line(bn_ax, "bn: median").get_ydata()) == [0.0, 0.05, 0.1]
    assert list(_line(bn_ax, "bn: 85th percentile").get_ydata()) == [1, 1.5, 2.5]
    assert "std of the median over time 0.050" in bn_ax.get_title()  # std of (0, 0.05, 0.1), ddof 1


# ---------------------------------------------------------------------------------------------- E5


def test_landscape_draws_each_measure_and_each_norms_median() -> None:
    series = _landscape()
    fig = plots.landscape_figure(series)
    axes = _axes(fig)
    assert len(axes) == 3 and all(ax.get_yscale() == "log" for ax in axes)
    assert list(_line(axes[0], "bn").get_ydata()) == [pytest.approx(0.01 * s) for s in (1, 2, 3, 4)]
    assert list(_line(axes[2], "none").get_ydata()) == [5.0, 1.0, 1.0, 1.0]
    med = [ln for ln in axes[2].get_lines() if ln.get_label() == "none: median over time"]
    assert list(med[0].get_ydata()) == [1.0, 1.0]  # median of (5, 1, 1, 1)
    fixed = plots.landscape_figure(
        {n: {**s, **{k + "_fixed": v for k, v in s.items() if k != "step"}} for n, s in series.items()},
        suffix="_fixed",
    )
    assert "fixed length" in fixed.get_suptitle()
    assert list(_line(_axes(fixed)[1], "none").get_ydata()) == [10.0] * 4


# ---------------------------------------------------------------------------------------------- readability


def _all_figures() -> list[tuple[str, Any]]:
    series, acc = _mlp()
    return [
        ("compare", plots.compare_figure(_agg())),
        ("compare-single", plots.compare_figure([r for r in _agg() if r["batch_size"] == 32])),
        ("curves", plots.curves_figure(_histories())),
        ("power", plots.power_figure(_fractions(), criteria=True)),
        ("power-lines", plots.power_lines_figure(_fractions())),
        ("lr-sweep", plots.lr_sweep_figure(_cnn_rows())),
        ("lr-curves", plots.lr_curves_figure(_cnn_rows())),
        ("percentiles", plots.percentiles_figure(series, acc=acc)),
        ("landscape", plots.landscape_figure(_landscape())),
    ]


@pytest.mark.parametrize("name", [n for n, _ in _all_figures()])
def test_figures_are_readable(name: str) -> None:
    fig = dict(_all_figures())[name]
    _assert_legends_outside_axes(fig)
    _assert_text_at_least(fig, 9)


def test_saved_pngs_are_at_least_1000_px_wide(tmp_path: Path) -> None:
    series, acc = _mlp()
    paths = [
        plots.plot_compare(_agg(), tmp_path / "a.png"),
        plots.plot_curves(_histories(), tmp_path / "b.png"),
        plots.plot_power(_fractions(), tmp_path / "c.png"),
        plots.plot_power_lines(_fractions(), tmp_path / "d.png"),
        plots.plot_lr_sweep(_cnn_rows(), tmp_path / "e.png"),
        plots.plot_lr_curves(_cnn_rows(), tmp_path / "f.png"),
        plots.plot_percentiles(series, tmp_path / "g.png", acc=acc),
        plots.plot_landscape(_landscape(), tmp_path / "h.png"),
    ]
    for p in paths:
        assert imread(p).shape[1] >= 1000, p.name
    # a figure someone else builds with the helpers is saved at >= 1000 px too, even when narrow
    fig, ax = plots.new_figure(width=3.0)
    ax.plot([1, 2], [3, 4], label="x")
    plots.legend(ax, fontsize=6)
    assert imread(plots.save(fig, tmp_path / "i.png")).shape[1] >= 1000
    _assert_legends_outside_axes(fig)
    assert ax.get_legend().get_texts()[0].get_fontsize() >= 9
