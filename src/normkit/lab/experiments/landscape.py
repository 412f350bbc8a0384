"""E5: Santurkar et al.'s loss-landscape measures along the gradient, with and without BN
    (docs/EXPERIMENTS.md, E5).

A plain 6-conv net (:class:`~normkit.lab.models.VGGish`) trains with SGD. Every ``every`` steps,
on the batch about to be used, with ``g = grad L_B(theta)`` and step sizes ``eta`` in
``linspace(0.05, eta_max, etas)``:

* loss range: ``min..max`` of ``L_B(theta - eta g)`` over ``eta``;
* gradient predictiveness: ``max_eta ||grad L_B(theta - eta g) - g||``;
* effective beta-smoothness: ``max_eta ||grad L_B(theta - eta g) - g|| / ||eta g||``.

The "fixed" variant moves a distance ``eta * delta`` along ``g / ||g||`` instead, because raw
steps scale with ``||g||``, which differs between the nets. BN nets are probed in train mode
(batch statistics: the function being optimised); their running statistics are restored after
each probe. Pass: the medians over time of all three measures are lower with BN. The summary also
gives the medians over the second half of training (informational).

A net whose batch loss becomes non-finite, or exceeds ``DIVERGE_FACTOR`` (100) times its untrained
loss (the larger of the first batch's loss and ln(classes), as in ``normkit compare``), stops there
and is marked diverged: the summary says so and the criteria it takes part in read ``n/a`` (the
landscape of a net that blew up says nothing about smoothness).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data import load_dataset
from ..models import VGGish
from ..progress import Progress
from ..train import evaluate, set_seed
from ._common import (
    DIVERGE_FACTOR,
    ConfigError,
    LabConfig,
    _norm_specs,
    check_norm_fits,
    markdown_table,
    opt,
    resolve_device,
    resolve_threads,
    set_threads,
    start_record,
    verdict,
)

__all__ = ["LandscapeConfig", "landscape_probe", "run_landscape"]

MEASURES = ("loss_range", "grad_change", "beta")


@dataclass
class LandscapeConfig(LabConfig):
    """Configuration of ``normkit landscape`` (every field is also a command-line option; :meth:`validate`
    checks them).

    Attributes:
        norms: baseline first (``"none"``), then ``"bn"`` (any registry spec works).
        steps: training steps per net.
        every: probe every N steps (step 0 included).
        lr: SGD learning rate.
        momentum: SGD momentum (0: the plain gradient step the probe follows).
        batch_size: samples per step.
        etas: number of step sizes.
        eta_min, eta_max: the step-size range (Santurkar et al.: up to 0.4).
        delta: distance unit of the fixed-distance variant.
        width: first conv width of the net.
        seed: seed of the nets and the batch order.
        data, limit_train, limit_test, device, threads, out, quiet: as in :class:`LabConfig`.
    """

    norms: list[str] = opt(["none", "bn"], "baseline first, then the norms")
    steps: int = opt(1000, "training steps", min=1)
    every: int = opt(25, "measure every N steps", min=1)
    lr: float = opt(0.1, "SGD learning rate", min=0, min_open=True, max=100)
    momentum: float = opt(0.0, "SGD momentum", min=0, max=1, max_open=True)
    batch_size: int = opt(64, "samples per step", min=2)
    etas: int = opt(8, "number of step sizes in [eta-min, eta-max]", min=1, max=1000)
    eta_min: float = opt(0.05, "smallest step size", min=0, min_open=True)
    eta_max: float = opt(0.4, "largest step size", min=0, min_open=True)
    delta: float = opt(1.0, "fixed-distance variant: steps of eta*delta along g/|g|", min=0, min_open=True)
    width: int = opt(32, "first conv width", min=1, max=512)
    seed: int = opt(0, "seed", min=0)

    def _check(self) -> None:
        self.norms = _norm_specs(
            self.norms, at_least=2, what="landscape compares a baseline with at least one norm"
        )
        if self.eta_min > self.eta_max:
            raise ConfigError(f"--eta-min {self.eta_min:g} must be <= --eta-max {self.eta_max:g}")
        for n in self.norms:
            check_norm_fits(
                n, lambda n=n: VGGish(n, width=self.width), f"the VGG-ish net (width {self.width})"
            )

    def check_data(self, data: Any) -> None:
        """``batch_size`` against the training samples; the norms against the data's channels."""
        if self.batch_size > len(data.x_train):
            raise ConfigError(
                f"--batch-size {self.batch_size} exceeds the {len(data.x_train)} training samples of "
                f"{data.name}"
            )
        if data.in_channels != 1 or data.num_classes != 10:
            for n in self.norms:
                check_norm_fits(
                    n, lambda n=n: VGGish(n, data.in_channels, data.num_classes, width=self.width), "VGG-ish"
                )


def _loss_grad(model: nn.Module, params: list[nn.Parameter], x: Tensor, y: Tensor) -> tuple[float, Tensor]:
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params)
    return loss.detach().item(), torch.cat([g.reshape(-1) for g in grads])


def landscape_probe(
    model: nn.Module, x: Tensor, y: Tensor, etas: list[float], delta: float
) -> dict[str, float]:
    """The three measures at the current parameters on batch ``(x, y)``, raw and fixed-distance (``*_fixed``).

    Leaves the parameters and buffers (running statistics) exactly as they were.

    Example:
        >>> import torch
        >>> from normkit.lab.models import VGGish
        >>> m = VGGish("bn", width=4)
        >>> before = [p.clone() for p in m.state_dict().values()]
        >>> r = landscape_probe(m, torch.randn(8, 1, 8, 8), torch.arange(8), [0.1, 0.2], 1.0)
        >>> sorted(r)[:3], all(torch.equal(a, b) for a, b in zip(before, m.state_dict().values()))
        (['beta', 'beta_fixed', 'grad_change'], True)
    """
    params = [p for p in model.parameters() if p.requires_grad]
    saved_params = [p.detach().clone() for p in params]
    saved_buffers = {k: b.clone() for k, b in model.named_buffers()}
    model.train()
    loss0, g = _loss_grad(model, params, x, y)
    gnorm = float(g.norm())
    out: dict[str, float] = {"loss": loss0, "grad_norm": gnorm}
    for suffix, unit in (("", 1.0), ("_fixed", delta / max(gnorm, 1e-12))):
        losses, changes, betas = [], [], []
        for eta in etas:
            step = eta * unit  # theta - step * g; ||step * g|| = eta * ||g|| (raw) or eta * delta (fixed)
            with torch.no_grad():
                offset = 0
                for p, p0 in zip(params, saved_params):
                    n = p.numel()
                    p.copy_(p0 - step * g[offset : offset + n].view_as(p))
                    offset += n
            loss, g_eta = _loss_grad(model, params, x, y)
            change = float((g_eta - g).norm())
            losses.append(loss)
            changes.append(change)
            betas.append(change / max(step * gnorm, 1e-12))
        out.update(
            {
                f"loss_min{suffix}": min(losses),
                f"loss_max{suffix}": max(losses),
                f"loss_range{suffix}": max(losses) - min(losses),
                f"grad_change{suffix}": max(changes),
                f"beta{suffix}": max(betas),
            }
        )
    with torch.no_grad():
        for p, p0 in zip(params, saved_params):
            p.copy_(p0)
        for k, b in model.named_buffers():
            b.copy_(saved_buffers[k])
    return out


def _blown_text(norm: str, final: dict[str, Any]) -> str:
    """``"none diverged at step 7"``."""
    return f"{norm} diverged at step {final['diverged_at_step']}"


def _final_text(final: dict[str, Any]) -> str:
    """The final test error cell: the error in %, or ``"diverged at step k"``."""
    if final["diverged"]:
        return f"diverged at step {final['diverged_at_step']}"
    return f"{final['test_err']:.2f}"


def run_landscape(cfg: LandscapeConfig) -> tuple[Path, str]:
    """Run E5; returns the run folder and the Markdown summary.

    Raises:
        ConfigError: a bad setting (checked before the data is loaded or the run folder made).
        normkit.lab.data.DataError: the data cannot be loaded.
        RunInterrupted: Ctrl-C (the run folder is marked ``interrupted``).
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.data, limit_train=cfg.limit_train, limit_test=cfg.limit_test)
    cfg.check_data(data)
    threads, why = resolve_threads(cfg.threads)
    set_threads(threads)
    record = start_record(cfg.out, "landscape", cfg, device, parallelism=why)
    with record.guard():
        etas = torch.linspace(cfg.eta_min, cfg.eta_max, cfg.etas).tolist() if cfg.etas > 1 else [cfg.eta_max]
        x, y = data.x_train.to(device), data.y_train.to(device)
        series: dict[str, dict[str, list[float]]] = {}
        finals: dict[str, dict[str, Any]] = {}
        with Progress(cfg.quiet) as progress:
            for norm in cfg.norms:
                bar = progress.add(f"{norm}: steps", total=cfg.steps)
                set_seed(cfg.seed, device)
                model = VGGish(norm, data.in_channels, data.num_classes, width=cfg.width).to(device).train()
                opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
                gen = torch.Generator().manual_seed(cfg.seed)
                perm, pos = torch.randperm(len(x), generator=gen), 0
                s: dict[str, list[float]] = {}
                diverged_at: int | None = None
                untrained = math.log(data.num_classes)
                for step in range(cfg.steps):
                    if pos + cfg.batch_size > len(x):
                        perm, pos = torch.randperm(len(x), generator=gen), 0
                    idx = perm[pos : pos + cfg.batch_size].to(device)
                    pos += cfg.batch_size
                    xb, yb = x[idx], y[idx]
                    if step % cfg.every == 0:
                        m = landscape_probe(model, xb, yb, etas, cfg.delta)
                        record.log(norm=norm, step=step, **m)
                        for k, v in {"step": float(step), **m}.items():
                            s.setdefault(k, []).append(v)
                    loss = nn.functional.cross_entropy(model(xb), yb)
                    value = loss.detach().item()
                    if step == 0:
                        untrained = max(untrained, value)
                    if not math.isfinite(value) or value > DIVERGE_FACTOR * untrained:
                        diverged_at = step
                        break
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    progress.advance(bar, info=f"loss {value:.3f}")
                test_loss, test_err = evaluate(model, data.x_test.to(device), data.y_test.to(device))
                finals[norm] = {
                    "test_err": test_err,
                    "test_loss": test_loss,
                    "diverged": diverged_at is not None,
                    "diverged_at_step": diverged_at,
                }
                record.log(norm=norm, kind="final", **finals[norm])
                series[norm] = s
        base, others = cfg.norms[0], cfg.norms[1:]
        med = {
            n: {
                k: statistics.median(s[k])
                for suffix in ("", "_fixed")
                for k in (m + suffix for m in MEASURES)
            }
            for n, s in series.items()
        }
        crit = []
        blown = [n for n in series if finals[n]["diverged"]]
        for n in others:
            for suffix in ("", "_fixed"):
                lower: bool | None = all(med[n][m + suffix] < med[base][m + suffix] for m in MEASURES)
                detail = ", ".join(
                    f"{m}: {med[n][m + suffix]:.3g} vs {med[base][m + suffix]:.3g}" for m in MEASURES
                )
                if n in blown or base in blown:
                    lower = None
                    who = " and ".join(x for x in (base, n) if x in blown)
                    detail = f"{who} diverged: the comparison means nothing; {detail}"
                crit.append(
                    {
                        "text": f"{n}: medians of loss range, gradient change and beta all lower "
                        f"than {base}'s" + (" (fixed-distance steps)" if suffix else " (steps eta*g)"),
                        "ok": lower,
                        "detail": detail,
                    }
                )
        # The same medians over the second half of training only: a net that sits on its initial plateau
        # (flat loss, tiny gradients) for long has a deceptively smooth landscape there.
        late = {
            n: {
                k: statistics.median([v for st, v in zip(s["step"], s[k]) if st >= cfg.steps / 2] or s[k])
                for suffix in ("", "_fixed")
                for k in (m + suffix for m in MEASURES)
            }
            for n, s in series.items()
        }
        rows = [
            [
                n,
                *[f"{med[n][m + suffix]:.3g}" for suffix in ("", "_fixed") for m in MEASURES],
                _final_text(finals[n]),
            ]
            for n in series
        ]
        rows += [
            [
                f"{n} (2nd half)",
                *[f"{late[n][m + suffix]:.3g}" for suffix in ("", "_fixed") for m in MEASURES],
                "",
            ]
            for n in series
        ]
        summary = (
            "\n".join(
                [
                    f"# landscape: Santurkar et al.'s measures on {data.name} (VGG-ish, width {cfg.width})",
                    "",
                    f"SGD LR {cfg.lr}, batch {cfg.batch_size}, {cfg.steps} steps, probe every {cfg.every} "
                    "steps with "
                    f"{len(etas)} step sizes in [{etas[0]:.2f}, {etas[-1]:.2f}]; fixed variant: distance "
                    f"eta*{cfg.delta} along g/|g|. "
                    "Medians over time (all probes, then the second half of training only):",
                    "",
                    markdown_table(
                        [
                            "norm",
                            "loss range",
                            "grad change",
                            "beta",
                            "loss range (fixed)",
                            "grad change (fixed)",
                            "beta (fixed)",
                            "final test err %",
                        ],
                        rows,
                    ),
                    "",
                    *(
                        [
                            f"**Warning**: {', '.join(_blown_text(n, finals[n]) for n in blown)} "
                            f"(non-finite loss, or loss above {DIVERGE_FACTOR:g}x the untrained loss); "
                            + ("their" if len(blown) > 1 else "its")
                            + " criteria read n/a. A lower --lr trains "
                            + ("them." if len(blown) > 1 else "it."),
                            "",
                        ]
                        if blown
                        else []
                    ),
                    "Pass criteria (docs/EXPERIMENTS.md, E5):",
                    "",
                    *[f"- {c['text']}: **{verdict(c['ok'])}** ({c['detail']})" for c in crit],
                ]
            )
            + "\n"
        )
        from ..plots import plot_landscape

        plot_landscape(series, record.path / "landscape.png")
        plot_landscape(series, record.path / "landscape_fixed.png", suffix="_fixed")
        record.write_json(
            "results.json",
            {"medians": med, "medians_second_half": late, "final": finals, "criteria": crit, "etas": etas},
        )
        record.write_text(
            "summary.md",
            summary + "\n![landscape](landscape.png)\n\n![landscape, fixed steps](landscape_fixed.png)\n",
        )
        record.finish()
        return record.path, summary
