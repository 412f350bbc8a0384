"""E2: higher learning rates with BN (the BN paper's BN-x5 / x30 analogue), and its MLP-3 sigmoid figure.

Part 1 (CNN-4, no head, batch 64, constant LR, 5 epochs per LR): for the baseline (first norm,
``"none"`` by default) and each other norm, the final train loss and whether the run diverged
(NaN, or a final train loss above the initial loss). Target = the baseline's best test
accuracy over all its LRs and checkpoints. "Initial loss" is the larger of the first batch's loss and
ln(classes), the loss of an uninformed classifier. Pass: (i) the largest non-diverging LR with BN is
>= 5x the baseline's; (ii) BN at 5x the baseline's best LR reaches the target in fewer steps
than the baseline at its best LR (that LR is added to BN's grid when missing). A largest stable LR
that is the largest LR tried is only a lower bound: (i) is n/a when such a bound decides it
(the baseline never diverged and (i) would be met, or BN never diverged and it would not).

Part 2 (MLP-3, 64-100-100-100-10 sigmoid, batch 60, plain SGD at LR 0.1): every
``percentile_every`` steps, the test accuracy and the {15, 50, 85}th percentiles over the test
set of one last-hidden-layer sigmoid input (eval mode). Pass: the std over time of that
median with BN is < half the baseline's (also reported averaged over all 100 units), and the
test accuracy climbs faster (higher mean accuracy over the checkpoints).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import load_dataset
from ..models import CNN4, MLP3
from ..progress import Progress
from ..train import TrainConfig, evaluate, set_seed, train_classifier
from ._common import (
    ConfigError,
    LabConfig,
    _norm_specs,
    check_norm_fits,
    epochs_text,
    markdown_table,
    opt,
    resolve_device,
    resolve_threads,
    set_threads,
    start_record,
    verdict,
)

MLP_WIDTH = 100  # the BN paper's MNIST net: 3 hidden layers of 100 sigmoid units

__all__ = ["LRSweepConfig", "run_lr_sweep"]


@dataclass
class LRSweepConfig(LabConfig):
    """Configuration of ``normkit lr-sweep`` (every field is also a command-line option; :meth:`validate`
    checks them).

    Attributes:
        norms: the baseline first (``"none"``), then the norms to compare (``"bn"``).
        lrs: the CNN learning-rate grid.
        epochs: epochs per CNN run.
        batch_size: CNN batch size.
        eval_every: test accuracy every N steps (resolution of "steps to target").
        max_steps: cap on steps per CNN run (quick runs).
        mlp_steps: MLP-3 training steps (0: skip the MLP part).
        mlp_lr: MLP-3 learning rate (plain SGD).
        mlp_batch_size: MLP-3 batch size.
        percentile_every: record the percentiles every N steps.
        unit: the last-hidden-layer unit whose input is plotted (0..99).
        skip_cnn: run only the MLP part.
        seed: seed of the nets and the batch order.
        data, limit_train, limit_test, device, threads, out, quiet: as in :class:`LabConfig`.
    """

    norms: list[str] = opt(["none", "bn"], "baseline first, then the norms")
    lrs: list[float] = opt([0.01, 0.03, 0.1, 0.3, 1.0, 3.0], "LR grid", min=0, min_open=True, max=1e4)
    epochs: int = opt(5, "epochs per CNN run", min=1)
    batch_size: int = opt(64, "CNN batch size", min=2)
    eval_every: int = opt(5, "test accuracy every N steps", min=1)
    max_steps: int | None = opt(None, "cap optimizer steps per CNN run", min=1, metavar="N")
    mlp_steps: int = opt(3000, "MLP-3 steps; 0 skips the MLP part", min=0)
    mlp_lr: float = opt(0.1, "MLP-3 learning rate", min=0, min_open=True, max=1e4)
    mlp_batch_size: int = opt(60, "MLP-3 batch size", min=2)
    percentile_every: int = opt(50, "record the percentiles every N steps", min=1)
    unit: int = opt(
        0, f"which last-hidden-layer unit of MLP-3 to plot (0..{MLP_WIDTH - 1})", min=0, max=MLP_WIDTH - 1
    )
    skip_cnn: bool = opt(False, "only the MLP-3 part")
    seed: int = opt(0, "seed", min=0)

    def _check(self) -> None:
        self.norms = _norm_specs(
            self.norms, at_least=2, what="lr-sweep compares a baseline with at least one norm"
        )
        if self.skip_cnn and self.mlp_steps == 0:
            raise ConfigError("--skip-cnn with --mlp-steps 0 leaves nothing to run")
        for n in self.norms:
            if not self.skip_cnn:
                check_norm_fits(n, lambda n=n: CNN4(n), "CNN-4")
            if self.mlp_steps > 0:
                check_norm_fits(n, lambda n=n: MLP3(n, width=MLP_WIDTH), "MLP-3")

    def check_data(self, data: Any) -> None:
        """Batch sizes against the training samples; the norms against the data's channels."""
        n = len(data.x_train)
        if not self.skip_cnn and self.batch_size > n:
            raise ConfigError(
                f"--batch-size {self.batch_size} exceeds the {n} training samples of {data.name}"
            )
        if self.mlp_steps > 0 and self.mlp_batch_size > n:
            raise ConfigError(
                f"--mlp-batch-size {self.mlp_batch_size} exceeds the {n} training samples of {data.name}"
            )
        if data.in_channels != 1 or data.num_classes != 10:
            for norm in self.norms:
                if not self.skip_cnn:
                    check_norm_fits(
                        norm, lambda norm=norm: CNN4(norm, data.in_channels, data.num_classes), "CNN-4"
                    )


def _steps_to(curve: list[tuple[int, float]], target_acc: float) -> int | None:
    for step, acc in curve:
        if acc >= target_acc - 1e-9:
            return step
    return None


def _cnn_run(
    cfg: LRSweepConfig, data: Any, norm: str, lr: float, device: torch.device, record: Any
) -> dict[str, Any]:
    set_seed(cfg.seed, device)
    model = CNN4(norm, data.in_channels, data.num_classes).to(device)
    curve: list[tuple[int, float]] = []
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)

    def on_step(step: int, loss: float) -> None:
        if step % cfg.eval_every == 0:
            acc = 1.0 - evaluate(model, x_test, y_test)[1] / 100.0
            curve.append((step, acc))
            model.train()
            record.log(part="cnn", norm=norm, lr=lr, step=step, train_loss=loss, test_acc=acc)

    res = train_classifier(
        model,
        data,
        TrainConfig(
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            lr=lr,
            schedule="constant",
            max_steps=cfg.max_steps,
            seed=cfg.seed,
            eval_batch_stats=False,
        ),
        device=device,
        on_step=on_step,
    )
    final_loss = res.history[-1]["train_loss"] if res.history else float("nan")
    initial = max(
        res.first_loss, math.log(data.num_classes)
    )  # the first batch's loss is a noisy estimate of it
    diverged = res.diverged or not math.isfinite(final_loss) or final_loss > initial
    if not curve and res.history:
        curve.append((res.steps, 1.0 - res.final["test_err"] / 100.0))
    row = {
        "norm": norm,
        "lr": lr,
        "final_train_loss": final_loss,
        "first_loss": res.first_loss,
        "diverged": diverged,
        "best_acc": max((a for _, a in curve), default=float("nan")),
        "steps": res.steps,
    }
    record.log(part="cnn", kind="final", **row)
    return {**row, "curve": curve}


def _mlp_run(cfg: LRSweepConfig, data: Any, norm: str, device: torch.device, record: Any) -> dict[str, Any]:
    set_seed(cfg.seed, device)
    model = MLP3(norm, in_features=data.x_train[0].numel(), num_classes=data.num_classes, width=MLP_WIDTH).to(
        device
    )
    opt = torch.optim.SGD(model.parameters(), lr=cfg.mlp_lr)
    x, y = data.x_train.flatten(1).to(device), data.y_train.to(device)
    xt, yt = data.x_test.flatten(1).to(device), data.y_test.to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    perm, pos = torch.randperm(len(x), generator=gen), 0
    series: dict[str, list[float]] = {"steps": [], "p15": [], "p50": [], "p85": [], "acc": []}
    medians_all: list[torch.Tensor] = []
    q = torch.tensor([0.15, 0.50, 0.85], dtype=torch.float64)

    def probe(step: int) -> None:
        model.eval()
        with torch.no_grad():
            logits, pre = model(xt, return_hidden=True)
        model.train()
        acc = float((logits.argmax(1) == yt).double().mean())
        p15, p50, p85 = torch.quantile(pre[:, cfg.unit].double().cpu(), q).tolist()
        medians_all.append(pre.double().cpu().median(dim=0).values)
        for k, v in (("steps", step), ("p15", p15), ("p50", p50), ("p85", p85), ("acc", acc)):
            series[k].append(v)
        record.log(part="mlp", norm=norm, step=step, test_acc=acc, p15=p15, p50=p50, p85=p85)

    probe(0)
    for step in range(1, cfg.mlp_steps + 1):
        if pos + cfg.mlp_batch_size > len(x):
            perm, pos = torch.randperm(len(x), generator=gen), 0
        idx = perm[pos : pos + cfg.mlp_batch_size].to(device)
        pos += cfg.mlp_batch_size
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.percentile_every == 0 or step == cfg.mlp_steps:
            probe(step)
    meds = torch.stack(medians_all)  # (checkpoints, 100 units)
    return {
        **series,
        "median_std_unit": float(torch.tensor(series["p50"], dtype=torch.float64).std())
        if len(series["p50"]) > 1
        else 0.0,
        "median_std_all_units": float(meds.std(dim=0).mean())
        if len(meds) > 1
        else 0.0,  # ok: one summary number, not a hot path
        "mean_acc": sum(series["acc"]) / len(series["acc"]),
        "final_acc": series["acc"][-1],
    }


def run_lr_sweep(cfg: LRSweepConfig) -> tuple[Path, str]:
    """Run E2; returns the run folder and the Markdown summary.

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
    record = start_record(cfg.out, "lr-sweep", cfg, device, parallelism=why)
    with record.guard():
        base, others = cfg.norms[0], cfg.norms[1:]
        cnn: list[dict[str, Any]] = []
        mlp: dict[str, dict[str, Any]] = {}
        lines = [f"# lr-sweep: learning-rate tolerance with and without a norm on {data.name}", ""]
        crit: list[dict[str, Any]] = []
        with Progress(cfg.quiet) as progress:
            if not cfg.skip_cnn:
                bar = progress.add("CNN-4 LR grid", total=len(cfg.lrs) * len(cfg.norms))
                for norm in cfg.norms:
                    for lr in sorted(cfg.lrs):
                        cnn.append(_cnn_run(cfg, data, norm, lr, device, record))
                        progress.advance(
                            bar, info=f"{norm} lr={lr}: {'diverged' if cnn[-1]['diverged'] else 'ok'}"
                        )
                base_runs = [r for r in cnn if r["norm"] == base and not r["diverged"]]
                best = max(base_runs, key=lambda r: r["best_acc"]) if base_runs else None
                if best is not None:
                    lr5 = 5 * best["lr"]
                    for norm in others:
                        if not any(r["norm"] == norm and math.isclose(r["lr"], lr5) for r in cnn):
                            cnn.append(_cnn_run(cfg, data, norm, lr5, device, record))
                crit = _cnn_criteria(cnn, base, others, best)
                lines += _cnn_summary(cfg, cnn, base, best, crit)
            if cfg.mlp_steps > 0:
                bar = progress.add("MLP-3 sigmoid", total=len(cfg.norms))
                for norm in cfg.norms:
                    mlp[norm] = _mlp_run(cfg, data, norm, device, record)
                    progress.advance(bar, info=norm)
                mcrit = _mlp_criteria(mlp, base, others)
                crit += mcrit
                lines += _mlp_summary(cfg, mlp, mcrit)
        from ..plots import plot_lr_curves, plot_lr_sweep, plot_percentiles

        figs = []
        if cnn:
            plot_lr_sweep(cnn, record.path / "lr_sweep.png", num_classes=data.num_classes)
            plot_lr_curves(cnn, record.path / "lr_curves.png", base=base)
            figs += ["lr_sweep.png", "lr_curves.png"]
        if mlp:
            plot_percentiles(
                {n: s for n, s in mlp.items()},
                record.path / "mlp_percentiles.png",
                acc={n: s["acc"] for n, s in mlp.items()},
            )
            figs.append("mlp_percentiles.png")
        summary = "\n".join(lines) + "\n"
        record.write_json("results.json", {"cnn": cnn, "mlp": mlp, "criteria": crit})
        record.write_text("summary.md", summary + "\n" + "\n".join(f"![{f}]({f})" for f in figs) + "\n")
        record.finish()
        return record.path, summary


def _max_stable(cnn: list[dict[str, Any]], norm: str) -> float | None:
    ok = [r["lr"] for r in cnn if r["norm"] == norm and not r["diverged"]]
    return max(ok) if ok else None


def _bounded(cnn: list[dict[str, Any]], norm: str, stable: float) -> bool:
    """Whether ``norm`` diverged at some LR above ``stable`` (else ``stable`` is only a lower bound of its
    largest stable LR)."""
    return any(r["norm"] == norm and r["diverged"] and r["lr"] > stable for r in cnn)


def _lr_text(lr: float | None) -> str:
    return "no stable LR" if lr is None else f"{lr:g}"


def _cnn_criteria(
    cnn: list[dict[str, Any]], base: str, others: list[str], best: dict[str, Any] | None
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    mb = _max_stable(cnn, base)
    for norm in others:
        mn = _max_stable(cnn, norm)
        ok = None if mb is None or mn is None else mn >= 5 * mb
        detail = f"{_lr_text(mn)} vs {_lr_text(mb)}" + (
            f" ({mn / mb:.0f}x)" if mn is not None and mb is not None else ""
        )
        # a norm stable at every LR tried has only a lower bound: it decides nothing in its favour
        if ok is True and mb is not None and not _bounded(cnn, base, mb):
            ok, detail = None, f"{detail}; {base} was stable at every learning rate tried; extend --lrs"
        elif ok is False and mn is not None and not _bounded(cnn, norm, mn):
            ok, detail = None, f"{detail}; {norm} was stable at every learning rate tried; extend --lrs"
        out.append(
            {
                "name": "E2 (i)",
                "text": f"largest stable LR with {norm} >= 5x {base}'s",
                "ok": ok,
                "detail": detail,
            }
        )
        if best is not None:
            target = best["best_acc"]
            s_base = _steps_to(best["curve"], target)
            run5 = next((r for r in cnn if r["norm"] == norm and math.isclose(r["lr"], 5 * best["lr"])), None)
            s5 = _steps_to(run5["curve"], target) if run5 else None
            ok = None if s_base is None else (s5 is not None and s5 < s_base)
            out.append(
                {
                    "name": "E2 (ii)",
                    "text": f"{norm} at 5x {base}'s best LR ({5 * best['lr']:g}) reaches {base}'s best "
                    f"accuracy ({100 * target:.2f}%) in fewer steps",
                    "ok": ok,
                    "detail": f"{s5 if s5 is not None else 'never'} vs {s_base} steps at LR {best['lr']:g}",
                }
            )
    return out


def _cnn_summary(
    cfg: LRSweepConfig,
    cnn: list[dict[str, Any]],
    base: str,
    best: dict[str, Any] | None,
    crit: list[dict[str, Any]],
) -> list[str]:
    lrs = sorted({r["lr"] for r in cnn})
    norms = list(dict.fromkeys(r["norm"] for r in cnn))
    rows = []
    for n in norms:
        cells = []
        for lr in lrs:
            r = next((r for r in cnn if r["norm"] == n and r["lr"] == lr), None)
            cells.append(
                ""
                if r is None
                else (
                    "diverged"
                    if r["diverged"]
                    else f"{r['final_train_loss']:.3g} / {100 * r['best_acc']:.1f}%"
                )
            )
        rows.append([n, *cells])
    return [
        f"## CNN-4, batch {cfg.batch_size}, {epochs_text(cfg.epochs, cfg.max_steps)} per LR, constant LR",
        "",
        "Cells: final train loss / best test accuracy; 'diverged' = NaN or final loss above the initial loss "
        "(max of the first batch's and ln(classes)).",
        "",
        markdown_table(["norm", *[f"LR {lr:g}" for lr in lrs]], rows),
        "",
        *(
            ["Baseline best: LR " + f"{best['lr']:g}, {100 * best['best_acc']:.2f}% test accuracy.", ""]
            if best
            else []
        ),
        "Pass criteria (docs/EXPERIMENTS.md, E2):",
        "",
        *[f"- {c['name']}: {c['text']}: **{verdict(c['ok'])}** ({c['detail']})" for c in crit],
        "",
    ]


def _mlp_criteria(mlp: dict[str, dict[str, Any]], base: str, others: list[str]) -> list[dict[str, Any]]:
    out = []
    b = mlp[base]
    for n in others:
        m = mlp[n]
        out.append(
            {
                "name": "E2 MLP",
                "text": f"{n}: std over time of the unit's median < half of {base}'s",
                "ok": m["median_std_unit"] < 0.5 * b["median_std_unit"],
                "detail": f"{m['median_std_unit']:.3f} vs {b['median_std_unit']:.3f}; all 100 units: "
                f"{m['median_std_all_units']:.3f} vs {b['median_std_all_units']:.3f}",
            }
        )
        out.append(
            {
                "name": "E2 MLP",
                "text": f"{n}: test accuracy climbs faster (mean over checkpoints)",
                "ok": m["mean_acc"] > b["mean_acc"],
                "detail": f"{100 * m['mean_acc']:.1f}% vs {100 * b['mean_acc']:.1f}%; "
                f"final {100 * m['final_acc']:.1f}% "
                f"vs {100 * b['final_acc']:.1f}%",
            }
        )
    return out


def _mlp_summary(cfg: LRSweepConfig, mlp: dict[str, dict[str, Any]], crit: list[dict[str, Any]]) -> list[str]:
    rows = [
        [
            n,
            f"{s['median_std_unit']:.3f}",
            f"{s['median_std_all_units']:.3f}",
            f"{100 * s['mean_acc']:.1f}",
            f"{100 * s['final_acc']:.1f}",
            f"{s['p15'][-1]:.2f} / {s['p50'][-1]:.2f} / {s['p85'][-1]:.2f}",
        ]
        for n, s in mlp.items()
    ]
    return [
        f"## MLP-3 sigmoid, batch {cfg.mlp_batch_size}, LR {cfg.mlp_lr}, {cfg.mlp_steps} steps (the BN "
        "paper's Figure 1)",
        "",
        markdown_table(
            [
                "norm",
                f"std of unit {cfg.unit}'s median",
                "same, mean over units",
                "mean test acc %",
                "final test acc %",
                "final p15 / p50 / p85",
            ],
            rows,
        ),
        "",
        *[f"- {c['name']}: {c['text']}: **{verdict(c['ok'])}** ({c['detail']})" for c in crit],
        "",
    ]
