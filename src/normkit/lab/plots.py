"""The lab's plots: one figure per question, readable at the size it is viewed.

Conventions, shared by every figure (docs/EXPERIMENTS.md says which figure answers which question):

* at least 1000 px wide (:data:`MIN_WIDTH_IN` inches at :data:`DPI`), text 9-11 pt;
* legends outside the data (below the panels, or right of the axes);
* a norm has one style everywhere (:func:`norm_style`): colour *and* marker *and* dash differ
  between norms, so lines stay apart in grey-scale print and for colour-blind readers; a ``post:``
  spec (norm after the activation) has its norm's colour and marker, half-filled, and its own dash;
* facets (one panel per norm, per batch size or per measure) instead of a dozen lines in one;
* log axes where the criterion lives at 1e-3 or below (values under a floor are drawn at the floor);
* a pass criterion's threshold drawn in the panel it applies to (:data:`THRESHOLD_STYLE`).

matplotlib's object-oriented API on the Agg canvas, imported only when a plot is made; no ``pyplot``:
each ``*_figure`` function builds and returns a :class:`matplotlib.figure.Figure`, each ``plot_*``
function saves that figure as PNG and returns the path, so no global backend state is touched and
nothing needs a display.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DPI",
    "MIN_WIDTH_IN",
    "THRESHOLD_STYLE",
    "compare_figure",
    "curves_figure",
    "landscape_figure",
    "legend",
    "lr_curves_figure",
    "lr_sweep_figure",
    "new_figure",
    "norm_family",
    "norm_style",
    "percentiles_figure",
    "plot_compare",
    "plot_curves",
    "plot_landscape",
    "plot_lr_curves",
    "plot_lr_sweep",
    "plot_percentiles",
    "plot_power",
    "plot_power_lines",
    "power_figure",
    "power_lines_figure",
    "save",
]

#: Resolution of the saved PNGs, dots per inch.
DPI = 100
#: Narrowest figure, inches: 10 in at 100 dpi is 1000 px.
MIN_WIDTH_IN = 10.0
#: How a pass criterion's threshold is drawn (a line, or the edge of a shaded band).
THRESHOLD_STYLE = {"color": "#222222", "linestyle": (0, (5, 3)), "linewidth": 1.2}
#: Fill of a band a value must stay in (E1 (ii), E3).
BAND_STYLE = {"color": "#999999", "alpha": 0.25, "linewidth": 0}
#: Reference line (BN's curve in the other norms' panels).
REFERENCE_STYLE = {"color": "#9a9a9a", "linestyle": "-", "linewidth": 1.0, "marker": "o", "markersize": 3}

_TEXT: dict[Any, Any] = {  # (matplotlib's stubs key rc_context by its own literal type)
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "figure.titlesize": 11,
    "lines.linewidth": 1.6,
    "lines.markersize": 6,
}

# Okabe & Ito's colour-blind-safe palette; every family also has its own marker and dash.
_FAMILY_STYLES: dict[str, dict[str, Any]] = {
    "bn": {"color": "#0072B2", "marker": "o", "linestyle": "-"},
    "gn": {"color": "#E69F00", "marker": "^", "linestyle": (0, (6, 2))},
    "ln": {"color": "#D55E00", "marker": "v", "linestyle": (0, (6, 2, 1, 2))},
    "in": {"color": "#CC79A7", "marker": "D", "linestyle": (0, (1, 1.5))},
    "ln+pn": {"color": "#009E73", "marker": "P", "linestyle": (0, (3, 1))},
    "gn+pn": {"color": "#56B4E9", "marker": "X", "linestyle": (0, (3, 1, 1, 1, 1, 1))},
    "none": {"color": "#000000", "marker": "s", "linestyle": (0, (2, 2))},
}
#: What a ``post:`` spec changes in its norm's style: the marker half-filled (bottom half white) and a
#: dash of its own, so ``bn`` and ``post:bn`` share a colour and still part in grey scale.
_POST_STYLE: dict[str, Any] = {
    "fillstyle": "top",
    "markerfacecoloralt": "white",
    "linestyle": (0, (5, 1, 1, 1)),
}
#: Families whose training output depends on the batch: E1 (ii)'s band is not theirs.
_BATCH_DEPENDENT_FAMILIES = frozenset({"bn", "gbn", "brn", "syncbn"})
_SPARE_STYLES = [
    {"color": "#F0E442", "marker": "*", "linestyle": (0, (8, 2, 2, 2))},
    {"color": "#7f7f7f", "marker": "h", "linestyle": (0, (4, 4))},
    {"color": "#8c564b", "marker": "<", "linestyle": (0, (1, 3))},
    {"color": "#17becf", "marker": ">", "linestyle": (0, (10, 3))},
    {"color": "#bcbd22", "marker": "p", "linestyle": (0, (2, 1, 2, 4))},
]
_TERM_STYLES: dict[str, dict[str, Any]] = {
    "P_mean": {"color": "#D55E00", "marker": "o", "linestyle": "-"},
    "P_varmean": {"color": "#E69F00", "marker": "s", "linestyle": (0, (6, 2))},
    "P_varstd": {"color": "#009E73", "marker": "^", "linestyle": (0, (1, 1.5))},
    "P_meanstd": {"color": "#0072B2", "marker": "D", "linestyle": (0, (6, 2, 1, 2))},
}
_ERROR_TICKS = [0, 0.5, 1, 2, 5, 10, 20, 50, 100]


# ------------------------------------------------------------------------------------------ helpers


def new_figure(
    nrows: int = 1, ncols: int = 1, width: float = 5.0, height: float = 3.6, **kw: Any
) -> tuple[Any, Any]:
    """A ``(Figure, axes)`` pair with an Agg canvas; ``axes`` is 2-D when ``squeeze=False``.

    ``width`` and ``height`` are per panel; the figure is at least :data:`MIN_WIDTH_IN` wide.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(width * ncols, MIN_WIDTH_IN), height * nrows), layout="constrained", dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, **kw)
    return fig, axes


def legend(ax: Any, **kw: Any) -> None:
    """A legend for ``ax`` right of its data area (not over it), when something on ``ax`` has a label.

    ``loc`` / ``bbox_to_anchor`` in ``kw`` override the placement; font sizes below 9 pt are raised to 9.
    """
    if not ax.get_legend_handles_labels()[0]:
        return
    size = kw.pop("fontsize", 9)
    kw["fontsize"] = max(size, 9) if isinstance(size, (int, float)) else size
    if "loc" not in kw and "bbox_to_anchor" not in kw:
        kw.update(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    ax.legend(**kw)


def _figure_legend(
    fig: Any, axes: Iterable[Any], ncols: int | None = None, extra: Sequence[tuple[Any, str]] = ()
) -> None:
    """One legend for the whole figure, below the panels; entries collected from ``axes`` (first label
    wins)."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab and not lab.startswith("_") and lab not in seen:
                seen[lab] = h
    for h, lab in extra:
        seen.setdefault(lab, h)
    if not seen:
        return
    n = len(seen)
    fig.legend(
        list(seen.values()), list(seen), loc="outside lower center", ncols=ncols or min(n, 4), frameon=False
    )


def save(fig: Any, path: str | Path, dpi: int = DPI) -> Path:
    """Save ``fig`` as PNG, at least 1000 px wide, and return the path.

    Layout warnings (a panel too small for constrained layout, on tiny smoke runs) do not stop a run.
    """
    import warnings

    path = Path(path)
    dpi = max(dpi, math.ceil(1000 / fig.get_figwidth()))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*constrained_layout.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*[Tt]ight.?layout.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*[Dd]ata has no positive values.*", category=UserWarning)
        fig.savefig(path, dpi=dpi)
    return path


def _styled(build: Any) -> Any:
    """Run a figure builder under the lab's text sizes (matplotlib reads them when artists are made)."""
    import functools

    @functools.wraps(build)
    def wrapper(*args: Any, **kw: Any) -> Any:
        import matplotlib

        with matplotlib.rc_context(_TEXT):
            return build(*args, **kw)

    return wrapper


def _save_styled(fig: Any, path: str | Path) -> Path:
    import matplotlib

    with matplotlib.rc_context(_TEXT):
        return save(fig, path)


def norm_family(spec: str) -> str:
    """The family a norm spec belongs to, which decides its style: ``bn, gn, ln, in, ln+pn, gn+pn, none`` or
    the spec; ``post:`` and the family for a ``post:`` spec (the norm after the activation).

    Example:
        >>> [norm_family(s) for s in ("bn", "bn1d", "gn:8", "gn:4+pn", "LN+PN", "in2d", "none", "ws")]
        ['bn', 'bn', 'gn', 'gn+pn', 'ln+pn', 'in', 'none', 'ws']
        >>> norm_family("post:gn:8")
        'post:gn'
    """
    s = spec.strip().lower()
    if s.startswith("post:"):
        return "post:" + norm_family(s[len("post:") :])
    base = s.split(":")[0].split("+")[0]
    for fam in ("bn", "gn", "ln", "in"):
        if base == fam or re.fullmatch(fam + r"[123]d", base):
            base = fam
            break
    return base + ("+pn" if s.endswith("+pn") and base in ("gn", "ln") else "")


def _known(fam: str) -> bool:
    """Whether a family has a fixed style (a ``post:`` family: when its norm's family has one)."""
    return fam.removeprefix("post:") in _FAMILY_STYLES


def norm_style(spec: str, index: int = 0) -> dict[str, Any]:
    """``color, marker, linestyle`` of a norm: fixed per family, so every figure draws BN alike.

    Norms outside the known families take a spare style by ``index`` (their rank among the unknown ones).
    A ``post:`` spec takes its norm's style with a half-filled marker and a dash of its own.

    Example:
        >>> norm_style("gn:8") == norm_style("gn:32")
        True
        >>> a, b = norm_style("bn"), norm_style("ln+pn")
        >>> a["color"] != b["color"] and a["marker"] != b["marker"] and a["linestyle"] != b["linestyle"]
        True
        >>> c = norm_style("post:bn")
        >>> c["color"] == a["color"] and c["linestyle"] != a["linestyle"] and c["fillstyle"]
        'top'
    """
    fam = norm_family(spec)
    post = fam.startswith("post:")
    fam = fam.removeprefix("post:")
    if fam in _FAMILY_STYLES:
        style = dict(_FAMILY_STYLES[fam])
    else:
        style = dict(_SPARE_STYLES[index % len(_SPARE_STYLES)])
    return {**style, **_POST_STYLE} if post else style


def _styles(norms: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A style per norm; unknown families get distinct spare styles, in order."""
    out: dict[str, dict[str, Any]] = {}
    spare = 0
    for n in norms:
        if _known(norm_family(n)):
            out[n] = norm_style(n)
        else:
            out[n] = norm_style(n, spare)
            spare += 1
    return out


def _hollow(style: Mapping[str, Any]) -> dict[str, Any]:
    """The same colour and marker, unfilled, dotted: the 'batch statistics' variant of a line."""
    return {**style, "markerfacecolor": "white", "linestyle": (0, (1, 1))}


def _finite(v: Any) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _error_axis(ax: Any, values: Iterable[float | None]) -> None:
    """Test error (%) on a symmetric-log axis (linear below 1 %), ticks at 0, 0.5, 1, 2, 5, 10, 20, 50,
    100."""
    top = max([float(v) for v in values if v is not None and _finite(v)] + [1.0])
    ax.set_yscale("symlog", linthresh=1.0, linscale=0.6)
    ticks = [t for t in _ERROR_TICKS if t <= top * 1.05] + [t for t in _ERROR_TICKS if t > top * 1.05][:1]
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"{t:g}" for t in ticks])
    ax.set_ylim(0, ticks[-1] * 1.1)
    _keep_threshold_labels_inside(ax)


def _keep_threshold_labels_inside(ax: Any, top: float = 0.85) -> None:
    """Move the threshold labels (:func:`_threshold_label`) written above a line in the top part of the axes
    below it: above, they would cross the top edge into the panel's title (a threshold near 100 %)."""
    x0 = ax.get_xlim()[0]
    to_axes = ax.transAxes.inverted()
    for text in ax.texts:
        if text.get_gid() != _THRESHOLD_GID or text.get_va() != "bottom":
            continue
        frac = to_axes.transform(ax.transData.transform((x0, text.xy[1])))[1]
        if frac > top:
            text.set_va("top")
            text.xyann = (text.xyann[0], -abs(text.xyann[1]))


def _integer_x(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


_THRESHOLD_GID = "normkit-threshold-label"


def _threshold_label(ax: Any, y: float, text: str, x: float = 0.02, va: str = "bottom") -> None:
    """Write ``text`` next to a horizontal threshold at data height ``y``, from the left edge of ``ax``
    (above the line; :func:`_error_axis` moves it below when the line is near the top)."""
    ann = ax.annotate(
        text,
        xy=(x, y),
        xycoords=("axes fraction", "data"),
        fontsize=9,
        va=va,
        ha="left",
        color=THRESHOLD_STYLE["color"],
        xytext=(0, 2 if va == "bottom" else -2),
        textcoords="offset points",
        bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.8},
    )
    ann.set_gid(_THRESHOLD_GID)


def _floor(values: Iterable[float], floor: float) -> list[float]:
    """Values for a log axis: non-finite stay NaN (gaps), anything below ``floor`` is drawn at ``floor``."""
    return [max(v, floor) if _finite(v) else float("nan") for v in values]


# ------------------------------------------------------------------------------------------ E1 / E3


def _seeds_note(rows: Sequence[Mapping[str, Any]]) -> str:
    """``"; one seed"`` when every cell has one seed (``seeds`` key of compare's rows), else the mean ± std
    note."""
    counts = {r.get("seeds") for r in rows}
    return "; one seed" if counts == {1} else "; mean ± std over seeds"


def _cell(rows: Sequence[Mapping[str, Any]], model: str, norm: str, b: int) -> Mapping[str, Any] | None:
    return next((r for r in rows if r["model"] == model and r["norm"] == norm and r["batch_size"] == b), None)


@_styled
def compare_figure(rows: Sequence[Mapping[str, Any]], title: str = "", criteria: bool = True) -> Any:
    """E1: test error against batch size, one panel per (model, norm); the E1 thresholds drawn in each.

    ``rows`` are aggregated results with keys ``model, norm, batch_size, test_err_mean, test_err_std``
    and optionally ``test_err_batch_stats_mean`` (BN evaluated with batch statistics, drawn hollow and
    dotted). In every panel but BN's, BN's error is drawn in grey for reference. Thresholds (largest
    batch B_hi, smallest B_lo): BN's panel has the line BN(B_hi) + 3 pt that BN(B_lo) must reach (E1 (i));
    each other norm's panel has the band v(B_hi) ± 1.5 pt that v(B_lo) must stay in (E1 (ii)).
    With a single batch size it draws :func:`_compare_single` instead (E3: one point per norm).
    """
    models = list(dict.fromkeys(r["model"] for r in rows))
    sizes_all = sorted({r["batch_size"] for r in rows})
    if len(sizes_all) == 1:
        return _compare_single(rows, models, title, criteria)
    norms = list(dict.fromkeys(r["norm"] for r in rows))
    styles = _styles(norms)
    fig, axes = new_figure(len(models), len(norms), width=3.4, height=3.8, squeeze=False, sharey=True)
    values = [r.get(k) for r in rows for k in ("test_err_mean", "test_err_batch_stats_mean")]
    values += [
        r["test_err_mean"] + (r["test_err_std"] if _finite(r.get("test_err_std")) else 0) for r in rows
    ]
    for i, model in enumerate(models):
        sub = [r for r in rows if r["model"] == model]
        sizes = sorted({r["batch_size"] for r in sub})
        lo, hi = sizes[0], sizes[-1]
        bn = next((n for n in norms if norm_family(n) == "bn"), None)
        for j, norm in enumerate(norms):
            ax = axes[i][j]
            pts = sorted((r for r in sub if r["norm"] == norm), key=lambda r: r["batch_size"])
            if bn is not None and norm != bn:
                ref = sorted((r for r in sub if r["norm"] == bn), key=lambda r: r["batch_size"])
                ax.plot(
                    [r["batch_size"] for r in ref],
                    [r["test_err_mean"] for r in ref],
                    **REFERENCE_STYLE,
                    label=f"{bn} (eval), for reference",
                )
            if pts:
                bs = [r["batch_size"] for r in pts]
                std = [r["test_err_std"] if _finite(r.get("test_err_std")) else 0.0 for r in pts]
                ax.errorbar(
                    bs,
                    [r["test_err_mean"] for r in pts],
                    yerr=std,
                    capsize=3,
                    **styles[norm],
                    label=f"{norm} (eval)",
                )
                if any(r.get("test_err_batch_stats_mean") is not None for r in pts):
                    ax.plot(
                        bs,
                        [r.get("test_err_batch_stats_mean", float("nan")) for r in pts],
                        **_hollow(styles[norm]),
                        label=f"{norm} (batch stats)",
                    )
            if criteria and len(sizes) > 1:
                at_hi, at_lo = _cell(sub, model, norm, hi), _cell(sub, model, norm, lo)
                if at_hi is not None and at_lo is not None and norm_family(norm) == "bn":
                    y = at_hi["test_err_mean"] + 3.0
                    ax.axhline(y, **THRESHOLD_STYLE, label="pass threshold")
                    _threshold_label(ax, y, f"E1 (i): B={lo} must reach ≥ {y:.2f}")
                    values.append(y)
                # (E1 (ii) is for the batch-independent norms; E1 (i) is BN's before the activation)
                elif (
                    at_hi is not None
                    and at_lo is not None
                    and norm_family(norm).removeprefix("post:") not in _BATCH_DEPENDENT_FAMILIES
                ):
                    c = at_hi["test_err_mean"]
                    ax.axhspan(max(c - 1.5, 0.0), c + 1.5, **BAND_STYLE, label="pass band")
                    for y in (max(c - 1.5, 0.0), c + 1.5):
                        ax.axhline(y, **{**THRESHOLD_STYLE, "linewidth": 0.8})
                    _threshold_label(ax, c + 1.5, f"E1 (ii): B={lo} within {c:.2f} ± 1.5")
                    values.append(c + 1.5)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes)
            ax.set_xticklabels([str(b) for b in sizes])
            ax.minorticks_off()
            ax.set_xlim(hi * 1.4, lo / 1.4)  # large batches left, small right
            ax.set_title(f"{model}: {norm}")
            ax.set_xlabel("batch size per process")
            ax.grid(alpha=0.3)
        axes[i][0].set_ylabel("test error (%)")
    for ax in axes.flat:
        _error_axis(ax, values)
    _figure_legend(fig, axes.flat)
    fig.suptitle(
        "Test error against batch size"
        + (f" ({title})" if title else "")
        + _seeds_note(rows)
        + ("; dashed lines and grey bands: E1 pass thresholds" if criteria else "")
    )
    return fig


def _compare_single(rows: Sequence[Mapping[str, Any]], models: list[str], title: str, criteria: bool) -> Any:
    """E3: one batch size, one point per norm (mean ± std), one panel per model; band BN ± 1 pt (|LN+PN − BN|
    <= 1)."""
    fig, axes = new_figure(1, len(models), width=5.0, height=3.4, squeeze=False, sharey=True)
    norms = list(dict.fromkeys(r["norm"] for r in rows))
    styles = _styles(norms)
    values = [r["test_err_mean"] + (r["test_err_std"] if _finite(r.get("test_err_std")) else 0) for r in rows]
    b = rows[0]["batch_size"]
    for ax, model in zip(axes[0], models):
        for k, norm in enumerate(norms):
            r = _cell(rows, model, norm, b)
            if r is None:
                continue
            st = {key: v for key, v in styles[norm].items() if key != "linestyle"}
            ax.errorbar(
                [k],
                [r["test_err_mean"]],
                yerr=[r["test_err_std"] if _finite(r.get("test_err_std")) else 0.0],
                capsize=3,
                ls="none",
                **st,
                label=norm,
            )
        bn = next((n for n in norms if norm_family(n) == "bn"), None)
        ref = _cell(rows, model, bn, b) if bn else None
        if criteria and ref is not None and any(norm_family(n) == "ln+pn" for n in norms):
            c = ref["test_err_mean"]
            ax.axhspan(max(c - 1.0, 0.0), c + 1.0, **BAND_STYLE, label="pass band")
            for y in sorted({max(c - 1.0, 0.0), c + 1.0} - {0.0}):
                ax.axhline(y, **{**THRESHOLD_STYLE, "linewidth": 0.8})
            _threshold_label(ax, c + 1.0, f"E3: LN+PN within {c:.2f} ± 1 (BN)")
            values.append(c + 1.0)
        ax.set_xticks(range(len(norms)))
        ax.set_xticklabels(norms)
        ax.set_xlim(-0.6, len(norms) - 0.4)
        ax.set_title(f"{model}, B={b}")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("test error (%)")
    for ax in axes.flat:
        _error_axis(ax, values)
    _figure_legend(fig, axes.flat, ncols=min(len(norms) + 1, 7))
    fig.suptitle("Test error per norm" + (f" ({title})" if title else "") + _seeds_note(rows))
    return fig


def plot_compare(
    rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "", criteria: bool = True
) -> Path:
    """Save :func:`compare_figure` (test error against batch size, E1 thresholds) to ``path``."""
    return _save_styled(compare_figure(rows, title=title, criteria=criteria), path)


_B_TOKEN = re.compile(r"^B=(\d+)$")
_SEED_TOKEN = re.compile(r"^seed=\S+$")


def _split_label(labels: Sequence[str]) -> dict[str, tuple[int | None, str]]:
    """``label -> (batch size or None, line label)``: the ``B=..`` token picks the panel; ``seed=..`` and the
    tokens every label shares (the model, when there is one) are dropped from the line label."""
    parts = {lab: lab.split() for lab in labels}
    common = set.intersection(*(set(p) for p in parts.values())) if len(parts) > 1 else set()
    out: dict[str, tuple[int | None, str]] = {}
    for lab, toks in parts.items():
        b = next((int(m.group(1)) for t in toks if (m := _B_TOKEN.match(t))), None)
        rest = [t for t in toks if not _B_TOKEN.match(t) and not _SEED_TOKEN.match(t) and t not in common]
        out[lab] = (b, " ".join(rest) or lab)
    return out


@_styled
def curves_figure(histories: Mapping[str, Sequence[Mapping[str, Any]]], key: str = "test_err") -> Any:
    """Per-epoch curves (``key`` against epoch), one panel per batch size, one line per norm.

    Labels like ``"cnn4-head bn B=32 seed=0"`` (``compare``'s) are split: ``B=32`` picks the panel, the
    rest (less the seed and the words all labels share) names the line; labels without ``B=`` share
    one panel.
    """
    split = _split_label(list(histories))
    sizes = sorted({b for b, _ in split.values() if b is not None}, reverse=True)
    panels: list[int | None] = list(sizes) if sizes else [None]
    if sizes and any(b is None for b, _ in split.values()):
        panels.append(None)
    lines = list(dict.fromkeys(name for _, name in split.values()))
    styles = _styles([name.split()[-1] for name in lines])
    fig, axes = new_figure(1, len(panels), width=3.6, height=3.8, squeeze=False, sharey=True)
    values: list[float] = []
    for ax, b in zip(axes[0], panels):
        for label, hist in histories.items():
            pb, name = split[label]
            if pb != b:
                continue
            ys = [h[key] for h in hist]
            values += ys
            st = styles[name.split()[-1]]
            ax.plot([h["epoch"] for h in hist], ys, **st, markevery=max(1, len(ys) // 8), label=name)
        ax.set_title(f"B={b}" if b is not None else "runs")
        ax.set_xlabel("epoch")
        _integer_x(ax)
        ax.grid(alpha=0.3)
    ylabel = key.replace("_err", "_error").replace("_", " ") + (" (%)" if key.endswith("err") else "")
    axes[0][0].set_ylabel(ylabel)
    for ax in axes[0]:
        if key.endswith("err"):
            _error_axis(ax, values)
        else:
            ax.set_yscale("log")
    _figure_legend(fig, axes[0], ncols=min(len(lines), 6))
    seeds = {t for lab in histories for t in lab.split() if _SEED_TOKEN.match(t)}
    fig.suptitle(
        f"{ylabel.capitalize()} per epoch"
        + (", one panel per batch size" if sizes else "")
        + (f" ({seeds.pop().replace('=', ' ')})" if len(seeds) == 1 else "")
    )
    return fig


def plot_curves(
    histories: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, key: str = "test_err"
) -> Path:
    """Save :func:`curves_figure` to ``path``."""
    return _save_styled(curves_figure(histories, key=key), path)


# ------------------------------------------------------------------------------------------ E4


#: Where an E4 pass criterion's threshold lies on the fraction axis, per norm family (post-norm site).
POWER_THRESHOLDS: dict[str, list[tuple[float, str]]] = {
    "bn": [(0.02, "E4: P_mean < 0.02 at every layer")],
    "in": [(1e-6, "E4: P_varmean, P_varstd ≤ 1e-6")],
    "ln+pn": [(1e-6, "E4: P_varmean, P_varstd > 1e-6")],
}


def _power_floor(floor: float | None) -> float:
    return 1e-10 if floor is None else floor


@_styled
def power_figure(
    fractions: Mapping[str, Sequence[Mapping[str, float]]],
    title: str = "",
    criteria: bool = False,
    floor: float | None = None,
) -> Any:
    """The four power fractions against depth, one panel per norm, on a log axis.

    ``fractions[norm]`` is the per-layer list of dicts with ``P_mean, P_varmean, P_varstd, P_meanstd``
    (fractions of the total power). The log axis shows the ~1e-3 between-input terms next to the ~1
    terms; a fraction below ``floor`` (default 1e-10: IN's exact zeros, BN's P_mean of 1e-14) is
    drawn at the floor. With ``criteria`` (the post-norm site of the random nets, where E4's criteria
    apply) each norm's threshold is drawn: BN's 0.02 on P_mean, IN's and LN+PN's 1e-6 on the
    between-input terms, and on LN's panel the point LN's last-layer P_mean must reach (5x LN+PN's).
    """
    from .power import TERMS

    lo = _power_floor(floor)
    norms = list(fractions)
    ncols = min(len(norms), 3)
    nrows = math.ceil(len(norms) / ncols)
    fig, axes = new_figure(nrows, ncols, width=3.6, height=3.3, squeeze=False, sharey=True, sharex=True)
    lnpn = next((n for n in norms if norm_family(n) == "ln+pn"), None)
    for k, norm in enumerate(norms):
        ax = axes[k // ncols][k % ncols]
        layers = fractions[norm]
        depth = list(range(1, len(layers) + 1))
        for size, t in zip(
            (6.5, 5.0, 4.0, 3.5), TERMS
        ):  # shrinking markers: terms that coincide stay visible
            ax.plot(depth, _floor([f[t] for f in layers], lo), **_TERM_STYLES[t], markersize=size, label=t)
        if criteria:
            for y, text in POWER_THRESHOLDS.get(norm_family(norm), []):
                ax.axhline(y, **THRESHOLD_STYLE, label="pass threshold")
                _threshold_label(ax, y, text, va="top" if y > 1e-3 else "bottom")
            if norm_family(norm) == "ln" and lnpn is not None and fractions[lnpn]:
                y = max(5 * fractions[lnpn][-1]["P_mean"], lo)
                ax.plot(
                    [depth[-1]],
                    [y],
                    marker="_",
                    markersize=22,
                    markeredgewidth=2.5,
                    color=THRESHOLD_STYLE["color"],
                    ls="none",
                    label="E4: LN's last P_mean must be ≥ this (5× LN+PN's)",
                )
                _threshold_label(ax, y, f"≥ 5× {lnpn} at layer {depth[-1]}", x=0.35, va="top")
        ax.set_yscale("log")
        ax.set_ylim(lo / 3, 3.0)
        ax.set_title(norm)
        ax.grid(alpha=0.3, which="major")
        _integer_x(ax)
    for ax in axes.flat[len(norms) :]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel("fraction of total power")
    for ax in axes[-1]:
        ax.set_xlabel("layer")
    if len(norms) % ncols:  # the hidden panel's column has no x label: put it on the panel above
        for ax in axes[-2][len(norms) % ncols :] if nrows > 1 else []:
            ax.set_xlabel("layer")
            ax.xaxis.set_tick_params(labelbottom=True)
    _figure_legend(fig, axes.flat)
    fig.suptitle((title + "\n" if title else "") + f"values below {lo:.0e} drawn at {lo:.0e}")
    return fig


def plot_power(
    fractions: Mapping[str, Sequence[Mapping[str, float]]],
    path: str | Path,
    title: str = "",
    criteria: bool = False,
    floor: float | None = None,
) -> Path:
    """Save :func:`power_figure` (power fractions against depth, one panel per norm) to ``path``."""
    return _save_styled(power_figure(fractions, title=title, criteria=criteria, floor=floor), path)


@_styled
def power_lines_figure(
    fractions: Mapping[str, Sequence[Mapping[str, float]]],
    term: str = "P_mean",
    title: str = "",
    criteria: bool = True,
    floor: float | None = None,
) -> Any:
    """One power fraction (default ``P_mean``) against depth, one line per norm, log axis.

    Lines that coincide (BN's and IN's P_mean, both ~0) stay visible: markers shrink from the first
    norm to the last and alternate filled / hollow, and a norm whose values all lie below the floor
    (default 1e-6, well under the thresholds at 0.02 and 5x LN+PN's ~1e-3) says so in the legend. With
    ``criteria`` and ``term == "P_mean"``: BN's 0.02 line and the point
    LN's last-layer value must reach (5x LN+PN's).
    """
    lo = 1e-6 if floor is None else floor
    norms = list(fractions)
    styles = _styles(norms)
    fig, ax = new_figure(1, 1, width=MIN_WIDTH_IN, height=4.2)
    for k, norm in enumerate(norms):
        layers = fractions[norm]
        vals = [f[term] for f in layers]
        st = dict(styles[norm], markersize=max(9 - 1.2 * k, 3.5))
        if k % 2:
            st["markerfacecolor"] = "white"
        note = f" (all < {lo:.0e})" if vals and all(_finite(v) and v < lo for v in vals) else ""
        ax.plot(range(1, len(layers) + 1), _floor(vals, lo), **st, label=norm + note)
    if criteria and term == "P_mean":
        if any(norm_family(n) == "bn" for n in norms):
            ax.axhline(0.02, **THRESHOLD_STYLE, label="pass threshold")
            _threshold_label(ax, 0.02, "E4: BN's P_mean < 0.02 at every layer", va="top")
        lnpn = next((n for n in norms if norm_family(n) == "ln+pn"), None)
        if lnpn is not None and any(norm_family(n) == "ln" for n in norms) and fractions[lnpn]:
            depth = len(fractions[lnpn])
            y = max(5 * fractions[lnpn][-1]["P_mean"], lo)
            ax.plot(
                [depth],
                [y],
                marker="_",
                markersize=26,
                markeredgewidth=2.5,
                color=THRESHOLD_STYLE["color"],
                ls="none",
                label=f"E4: LN at layer {depth} must be ≥ this (5× {lnpn})",
            )
    ax.set_yscale("log")
    ax.set_ylim(lo / 3, 3.0)
    _integer_x(ax)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{term} / total power")
    ax.grid(alpha=0.3)
    legend(ax)
    ax.set_title((title or term) + f" (values below {lo:.0e} drawn at {lo:.0e})")
    return fig


def plot_power_lines(
    fractions: Mapping[str, Sequence[Mapping[str, float]]],
    path: str | Path,
    term: str = "P_mean",
    title: str = "",
    criteria: bool = True,
    floor: float | None = None,
) -> Path:
    """Save :func:`power_lines_figure` to ``path``."""
    return _save_styled(
        power_lines_figure(fractions, term=term, title=title, criteria=criteria, floor=floor), path
    )


# ------------------------------------------------------------------------------------------ E2


@_styled
def lr_sweep_figure(rows: Sequence[Mapping[str, Any]], num_classes: int = 10, criteria: bool = True) -> Any:
    """E2 (i): final train loss and best test error against the learning rate, one line per norm.

    Diverged runs are marked with an x on the top edge of the loss panel. The loss panel has the
    chance loss ln(classes) (a run ending above its initial loss, at least this, counts as
    diverged); with ``criteria`` both panels have a vertical line at 5x the baseline's (the first
    norm's) largest stable LR: the other norms must still be stable at or beyond it.
    """
    fig, axes = new_figure(1, 2, width=5.0, height=4.2, squeeze=False)
    ax_loss, ax_err = axes[0]
    norms = list(dict.fromkeys(r["norm"] for r in rows))
    styles = _styles(norms)
    finite = [r["final_train_loss"] for r in rows if not r["diverged"] and _finite(r["final_train_loss"])]
    top = max(finite + [math.log(num_classes)]) * 3
    for norm in norms:
        pts = sorted((r for r in rows if r["norm"] == norm), key=lambda r: r["lr"])
        ok = [r for r in pts if not r["diverged"]]
        ax_loss.plot([r["lr"] for r in ok], [r["final_train_loss"] for r in ok], **styles[norm], label=norm)
        errs = [(r["lr"], 100 * (1 - r["best_acc"])) for r in ok if _finite(r.get("best_acc"))]
        ax_err.plot([e[0] for e in errs], [e[1] for e in errs], **styles[norm], label=norm)
        bad = [r for r in pts if r["diverged"]]
        if bad:
            ax_loss.plot(
                [r["lr"] for r in bad],
                [top] * len(bad),
                ls="none",
                marker="x",
                markersize=9,
                mew=2,
                color=styles[norm]["color"],
                label=f"{norm}: diverged",
                clip_on=False,
            )
    ax_loss.axhline(
        math.log(num_classes), color="#666666", lw=1, ls=(0, (1, 2)), label=f"chance loss ln {num_classes}"
    )
    if criteria and norms:
        stable = [r["lr"] for r in rows if r["norm"] == norms[0] and not r["diverged"]]
        if stable and len(norms) > 1:
            x = 5 * max(stable)
            for ax in (ax_loss, ax_err):
                ax.axvline(x, **THRESHOLD_STYLE, label="pass threshold")
            ax_loss.annotate(
                f"E2 (i): 5× {norms[0]}'s largest\nstable LR = {x:g}",
                xy=(x, 0.02),
                xycoords=("data", "axes fraction"),
                xytext=(4, 0),
                textcoords="offset points",
                fontsize=9,
            )
    for ax in (ax_loss, ax_err):
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.grid(alpha=0.3)
    ax_loss.set_yscale("log")
    _error_axis(ax_err, [100 * (1 - r["best_acc"]) for r in rows if _finite(r.get("best_acc"))])
    ax_loss.set_ylim(top=top * 1.3)
    ax_loss.set_ylabel("final train loss")
    ax_loss.set_title("final train loss (x on top: diverged)")
    ax_err.set_ylabel("best test error (%)")
    ax_err.set_title("best test error over the run")
    _figure_legend(fig, axes[0])
    fig.suptitle("Learning-rate tolerance (CNN-4, constant LR)")
    return fig


def plot_lr_sweep(
    rows: Sequence[Mapping[str, Any]], path: str | Path, num_classes: int = 10, criteria: bool = True
) -> Path:
    """Save :func:`lr_sweep_figure` to ``path``."""
    return _save_styled(lr_sweep_figure(rows, num_classes=num_classes, criteria=criteria), path)


@_styled
def lr_curves_figure(cnn: Sequence[Mapping[str, Any]], base: str = "none", criteria: bool = True) -> Any:
    """E2 (ii): test error against step, one panel per norm, one line per learning rate.

    ``cnn`` holds ``lr-sweep``'s CNN runs (``norm, lr, diverged, best_acc, curve`` with ``curve`` a list of
    ``(step, test accuracy)``). With ``criteria``: the target, the baseline's best test error
    (its best accuracy over all LRs), as a horizontal line in every panel; E2 (ii) asks BN at 5x the
    baseline's best LR to cross it in fewer steps than the baseline at its best LR. Those two runs
    are drawn thick.
    """
    from matplotlib import colormaps

    norms = list(dict.fromkeys(r["norm"] for r in cnn))
    lrs = sorted({r["lr"] for r in cnn})
    cmap = colormaps["viridis"]
    markers = ["o", "s", "^", "v", "D", "P", "X", "*", "h"]
    dashes: list[Any] = ["-", (0, (6, 2)), (0, (1, 1.5)), (0, (6, 2, 1, 2)), (0, (3, 1)), (0, (8, 2, 2, 2))]
    fig, axes = new_figure(1, len(norms), width=5.0, height=4.2, squeeze=False, sharey=True)
    ok_base = [r for r in cnn if r["norm"] == base and not r["diverged"] and _finite(r.get("best_acc"))]
    target = 100 * (1 - max(r["best_acc"] for r in ok_base)) if ok_base else None
    best_lr = max(ok_base, key=lambda r: r["best_acc"])["lr"] if ok_base else None
    values: list[float] = []
    for ax, norm in zip(axes[0], norms):
        for r in sorted((r for r in cnn if r["norm"] == norm), key=lambda r: r["lr"]):
            k = lrs.index(r["lr"])
            if not r.get("curve"):
                continue
            ys = [100 * (1 - a) for _, a in r["curve"]]
            values += ys
            # the two runs E2 (ii) compares: the baseline at its best LR, the others at 5x that LR
            key = best_lr is not None and math.isclose(r["lr"], best_lr if norm == base else 5 * best_lr)
            ax.plot(
                [s for s, _ in r["curve"]],
                ys,
                color=cmap(k / max(len(lrs) - 1, 1) * 0.9),
                marker=markers[k % len(markers)],
                ls=dashes[k % len(dashes)],
                markevery=max(1, len(ys) // 8),
                markersize=5,
                lw=2.8 if key else 1.2,
                zorder=3 if key else 2,
                label=f"LR {r['lr']:g}"
                + (" (diverged)" if r["diverged"] else "")
                + (" (E2 (ii), thick)" if key else ""),
            )
        if criteria and target is not None:
            ax.axhline(target, **THRESHOLD_STYLE, label="pass threshold")
            _threshold_label(ax, target, f"target: {base}'s best, {target:.1f} %", x=0.4)
        ax.set_title(norm)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        legend(ax)
    axes[0][0].set_ylabel("test error (%)")
    for ax in axes[0]:
        _error_axis(ax, values)
    fig.suptitle("Test error during training at each learning rate (one panel per norm)")
    return fig


def plot_lr_curves(
    cnn: Sequence[Mapping[str, Any]], path: str | Path, base: str = "none", criteria: bool = True
) -> Path:
    """Save :func:`lr_curves_figure` to ``path`` (``lr-sweep``'s ``lr_curves.png``)."""
    return _save_styled(lr_curves_figure(cnn, base=base, criteria=criteria), path)


@_styled
def percentiles_figure(
    series: Mapping[str, Mapping[str, Sequence[float]]], acc: Mapping[str, Sequence[float]] | None = None
) -> Any:
    """The BN paper's Figure 1: test accuracy over steps, and {15, 50, 85}th percentiles of one sigmoid input.

    ``series[label]`` holds ``steps, p15, p50, p85``; ``acc[label]`` the test accuracy at those steps.
    One panel per label, on a shared y axis; each panel's title gives the std over time of the
    median, the number E2's MLP criterion compares (the norm's must be < half the baseline's).
    """
    labels = list(series)
    styles = _styles(labels)
    n = len(labels) + (1 if acc else 0)
    fig, axes = new_figure(1, n, width=3.6, height=3.9, squeeze=False)
    col = 0
    if acc:
        ax = axes[0][0]
        for label, a in acc.items():
            steps = series[label]["steps"]
            ax.plot(steps, [100 * v for v in a], **styles[label], markevery=max(1, len(a) // 8), label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title("test accuracy")
        ax.grid(alpha=0.3)
        col = 1
    lo = min(min(s["p15"]) for s in series.values())
    hi = max(max(s["p85"]) for s in series.values())
    pad = 0.1 * (hi - lo) or 0.1
    for i, label in enumerate(labels):
        s = series[label]
        ax = axes[0][col + i]
        color = styles[label]["color"]
        ax.fill_between(s["steps"], s["p15"], s["p85"], alpha=0.2, color=color, lw=0)
        ax.plot(s["steps"], s["p50"], color=color, lw=2.0, label=f"{label}: median")
        for q in ("p15", "p85"):
            ax.plot(
                s["steps"], s[q], color=color, lw=0.9, ls=(0, (4, 2)), label=f"{label}: {q[1:]}th percentile"
            )
        med = list(s["p50"])
        mean = sum(med) / len(med)
        std = math.sqrt(sum((v - mean) ** 2 for v in med) / (len(med) - 1)) if len(med) > 1 else 0.0
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_title(f"{label}: sigmoid input\nstd of the median over time {std:.3f}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][col].set_ylabel("input to one last-hidden sigmoid")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    grey = "#555555"
    keys = [
        (Line2D([], [], color=grey, lw=2.0), "median (thick)"),
        (Line2D([], [], color=grey, lw=0.9, ls=(0, (4, 2))), "15th and 85th percentiles (dashed)"),
        (Patch(color=grey, alpha=0.2, lw=0), "15th-85th band"),
    ]
    _figure_legend(fig, axes[0][:col], ncols=len(labels) + 3, extra=keys)
    fig.suptitle("MLP-3 (sigmoid) over training: test accuracy, and the distribution of one sigmoid's input")
    return fig


def plot_percentiles(
    series: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | Path,
    acc: Mapping[str, Sequence[float]] | None = None,
) -> Path:
    """Save :func:`percentiles_figure` to ``path``."""
    return _save_styled(percentiles_figure(series, acc=acc), path)


# ------------------------------------------------------------------------------------------ E5


@_styled
def landscape_figure(
    series: Mapping[str, Mapping[str, Sequence[float]]], suffix: str = "", criteria: bool = True
) -> Any:
    """Santurkar et al.'s measures over training: loss range, gradient change, effective beta; one panel each.

    ``series[norm]`` holds ``step`` and, per measure, ``loss_range`` (or ``loss_min`` / ``loss_max``),
    ``grad_change``, ``beta``, each with ``suffix`` (``"_fixed"``: the fixed-distance variant). Log axes.
    With ``criteria``: each norm's median over time as a horizontal line of its colour; E5 asks
    every median to be lower with BN than without a norm.
    """
    norms = list(series)
    styles = _styles(norms)
    fig, axes = new_figure(1, 3, width=3.6, height=3.9, squeeze=False)
    titles = (
        "loss range along −g (max − min)",
        "gradient change: max ‖∇L(θ−ηg) − g‖",
        "effective β-smoothness",
    )
    for norm in norms:
        s = series[norm]
        steps = s["step"]
        rng = s.get("loss_range" + suffix)
        if rng is None:
            rng = [b - a for a, b in zip(s["loss_min" + suffix], s["loss_max" + suffix])]
        for ax, vals in zip(axes[0], (rng, s["grad_change" + suffix], s["beta" + suffix])):
            pos = [v for v in vals if _finite(v) and v > 0]
            floor = min(pos) / 10 if pos else 1e-12
            ax.plot(
                steps,
                _floor(vals, floor),
                **styles[norm],
                markevery=max(1, len(vals) // 10),
                markersize=5,
                lw=1.3,
                label=norm,
            )
            if criteria and pos:
                med = statistics.median(v for v in vals if _finite(v))
                ax.axhline(
                    max(med, floor),
                    color=styles[norm]["color"],
                    lw=1.0,
                    ls=(0, (5, 3)),
                    label=f"{norm}: median over time",
                )
    for ax, t in zip(axes[0], titles):
        ax.set_title(t)
        ax.set_xlabel("training step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax, label in zip(axes[0], ("loss range", "gradient change", "effective β")):
        ax.set_ylabel(label)
    _figure_legend(fig, axes[0], ncols=4)
    fig.suptitle(
        "Loss landscape along the gradient, "
        + ("steps of fixed length η·Δ along −g/‖g‖" if suffix else "steps θ − ηg, η from 0.05 to 0.4")
        + ("; E5 asks every median to be lower with BN" if criteria else "")
    )
    return fig


def plot_landscape(
    series: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | Path,
    suffix: str = "",
    criteria: bool = True,
) -> Path:
    """Save :func:`landscape_figure` to ``path``."""
    return _save_styled(landscape_figure(series, suffix=suffix, criteria=criteria), path)
