"""The lab's plots: matplotlib's object-oriented API on the Agg canvas, imported only when a plot is made.

No ``pyplot``: each function builds a :class:`matplotlib.figure.Figure`, saves a small PNG and
drops it, so no global backend state is touched and nothing needs a display.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = [
    "legend",
    "new_figure",
    "plot_compare",
    "plot_landscape",
    "plot_lr_sweep",
    "plot_curves",
    "plot_percentiles",
    "plot_power",
    "plot_power_lines",
    "save",
]

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"]


def new_figure(nrows: int = 1, ncols: int = 1, width: float = 5.0, height: float = 3.6, **kw: Any) -> tuple[Any, Any]:
    """A ``(Figure, axes)`` pair with an Agg canvas; ``axes`` is 2-D when ``squeeze=False``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, **kw)
    return fig, axes


def legend(ax: Any, **kw: Any) -> None:
    """``ax.legend(**kw)`` when something on ``ax`` has a label (matplotlib warns otherwise)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def save(fig: Any, path: str | Path, dpi: int = 90) -> Path:
    """Save ``fig`` as PNG (small: ~90 dpi) and return the path.

    Layout warnings (a panel too small for constrained layout, on tiny smoke runs) do not stop a run.
    """
    import warnings

    path = Path(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*constrained_layout.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*[Tt]ight.?layout.*", category=UserWarning)
        fig.savefig(path, dpi=dpi)
    return path


def _color(i: int) -> str:
    return _COLORS[i % len(_COLORS)]


def plot_compare(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Test error (%) against batch size, one line per norm (mean ± std over seeds), one panel per model.

    ``rows`` are aggregated results with keys ``model, norm, batch_size, test_err_mean, test_err_std``
    and optionally ``test_err_batch_stats_mean`` (drawn dashed: BN with batch statistics).
    """
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = new_figure(1, len(models), squeeze=False)
    for ax, model in zip(axes[0], models):
        sub = [r for r in rows if r["model"] == model]
        for i, norm in enumerate(dict.fromkeys(r["norm"] for r in sub)):
            pts = sorted((r for r in sub if r["norm"] == norm), key=lambda r: r["batch_size"])
            bs = [r["batch_size"] for r in pts]
            mean = [r["test_err_mean"] for r in pts]
            std = [0.0 if not math.isfinite(r["test_err_std"]) else r["test_err_std"] for r in pts]
            ax.errorbar(bs, mean, yerr=std, marker="o", capsize=3, color=_color(i), label=f"{norm} (eval)")
            if any(r.get("test_err_batch_stats_mean") is not None for r in pts):
                ax.plot(bs, [r.get("test_err_batch_stats_mean") for r in pts], ls="--", marker="x", color=_color(i),
                        label=f"{norm} (batch stats)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["batch_size"] for r in sub}))
        ax.set_xticklabels([str(b) for b in sorted({r["batch_size"] for r in sub})])
        ax.invert_xaxis()
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("batch size per process")
        ax.set_ylabel("test error (%)")
        ax.set_title(f"{model}{(' - ' + title) if title else ''}", fontsize=10)
        ax.grid(alpha=0.3)
        legend(ax, fontsize=7)
    return save(fig, path)


def plot_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, key: str = "test_err") -> Path:
    """Per-epoch curves (``key`` against epoch), one line per labelled run."""
    fig, ax = new_figure()
    for i, (label, hist) in enumerate(histories.items()):
        ax.plot([h["epoch"] for h in hist], [h[key] for h in hist], color=_color(i), label=label, lw=1.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel(key.replace("_", " ") + (" (%)" if key.endswith("err") else ""))
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    legend(ax, fontsize=6, ncol=2)
    return save(fig, path)


def plot_power(
    fractions: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path, title: str = ""
) -> Path:
    """Stacked power fractions against depth, one panel per norm (the Proxy Norm paper's power plot).

    ``fractions[norm]`` is the per-layer list of dicts with ``P_mean, P_varmean, P_varstd, P_meanstd``.
    """
    from .power import TERMS

    norms = list(fractions)
    fig, axes = new_figure(1, len(norms), width=2.6, height=2.6, squeeze=False, sharey=True)
    colors = {"P_mean": "#d62728", "P_varmean": "#ff7f0e", "P_varstd": "#2ca02c", "P_meanstd": "#1f77b4"}
    for ax, norm in zip(axes[0], norms):
        layers = fractions[norm]
        depth = list(range(1, len(layers) + 1))
        ax.stackplot(depth, *[[f[t] for f in layers] for t in TERMS], labels=TERMS, colors=[colors[t] for t in TERMS])
        ax.set_title(norm, fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1)
        ax.set_xlim(1, max(depth[-1], 2))
    axes[0][0].set_ylabel("fraction of power")
    legend(axes[0][-1], fontsize=6, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    return save(fig, path)


def plot_power_lines(
    fractions: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path, term: str = "P_mean", title: str = ""
) -> Path:
    """One power fraction (default ``P_mean``) against depth, one line per norm."""
    fig, ax = new_figure()
    for i, (norm, layers) in enumerate(fractions.items()):
        ax.plot(range(1, len(layers) + 1), [f[term] for f in layers], marker=".", color=_color(i), label=norm)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{term} / total power")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    legend(ax, fontsize=7)
    ax.set_title(title or term, fontsize=10)
    return save(fig, path)


def plot_lr_sweep(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Final train loss against learning rate per norm; diverged runs marked with an x at the top."""
    fig, ax = new_figure()
    norms = list(dict.fromkeys(r["norm"] for r in rows))
    finite = [r["final_train_loss"] for r in rows if not r["diverged"] and math.isfinite(r["final_train_loss"])]
    top = max(finite + [2.5]) * 1.5
    for i, norm in enumerate(norms):
        pts = sorted((r for r in rows if r["norm"] == norm), key=lambda r: r["lr"])
        ok = [r for r in pts if not r["diverged"]]
        ax.plot([r["lr"] for r in ok], [r["final_train_loss"] for r in ok], marker="o", color=_color(i), label=norm)
        bad = [r for r in pts if r["diverged"]]
        if bad:
            ax.scatter([r["lr"] for r in bad], [top] * len(bad), marker="x", s=60, color=_color(i), label=f"{norm} diverged")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final train loss")
    ax.grid(alpha=0.3)
    legend(ax, fontsize=7)
    return save(fig, path)


def plot_percentiles(
    series: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path, acc: Mapping[str, Sequence[float]] | None = None
) -> Path:
    """The BN paper's Figure 1: test accuracy over steps, and {15, 50, 85}th percentiles of one sigmoid input.

    ``series[label]`` holds ``steps, p15, p50, p85``; ``acc[label]`` the test accuracy at those steps.
    """
    n = len(series) + (1 if acc else 0)
    fig, axes = new_figure(1, n, width=3.6, height=3.0, squeeze=False)
    col = 0
    if acc:
        ax = axes[0][0]
        for i, (label, a) in enumerate(acc.items()):
            ax.plot(series[label]["steps"], a, color=_color(i), label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        legend(ax, fontsize=7)
        col = 1
    lo = min(min(s["p15"]) for s in series.values())
    hi = max(max(s["p85"]) for s in series.values())
    for i, (label, s) in enumerate(series.items()):
        ax = axes[0][col + i]
        ax.fill_between(s["steps"], s["p15"], s["p85"], alpha=0.25, color=_color(i))
        for q in ("p15", "p50", "p85"):
            ax.plot(s["steps"], s[q], color=_color(i), lw=1.5 if q == "p50" else 0.8)
        ax.set_ylim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
        ax.set_title(f"{label}: sigmoid input\n15/50/85th percentiles", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return save(fig, path)


def plot_landscape(series: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path, suffix: str = "") -> Path:
    """Santurkar et al.'s Figure 4: loss range (band), gradient predictiveness and effective beta over steps."""
    fig, axes = new_figure(1, 3, width=3.6, height=3.0, squeeze=False)
    for i, (label, s) in enumerate(series.items()):
        steps = s["step"]
        axes[0][0].fill_between(steps, s["loss_min" + suffix], s["loss_max" + suffix], alpha=0.35, color=_color(i), label=label)
        axes[0][1].plot(steps, s["grad_change" + suffix], color=_color(i), label=label)
        axes[0][2].plot(steps, s["beta" + suffix], color=_color(i), label=label)
    titles = ("loss along -g (min..max)", "max ||grad(θ-ηg) - grad(θ)||", "effective β-smoothness")
    for ax, t in zip(axes[0], titles):
        ax.set_title(t + (" (fixed step)" if suffix else ""), fontsize=9)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        legend(ax, fontsize=7)
    return save(fig, path)
