"""E4: the power decomposition per layer (docs/EXPERIMENTS.md, E4), before and after the norm.

For each norm, a random ``RandNet-L`` (L conv3x3 layers, circular padding, He-normal weights,
random per-channel affine ``gamma ~ N(1, 0.2^2)``, ``beta ~ N(0, 0.2^2)``) sees ``samples``
inputs; at every layer the activations are decomposed at three sites:

* ``pre_norm``: the conv output the norm receives;
* ``post_norm``: the norm's output *before* its affine (the pass criteria's site), computed with
  the layer's own statistics (BN: batch statistics in train mode, running ones in eval mode);
* ``post_act``: the layer's output (for Proxy Norm: the proxy-normalized activation), what the
  next conv receives.

With ``trained=True`` CNN-4 is also trained with each norm and its 4 layers decomposed on test
inputs, at initialisation (train mode: batch statistics) and after training (eval mode: BN's running
statistics, the function the trained net computes), informational.

Pass criteria (post-norm site): BN's P_mean fraction < 0.02 at every layer; LN's P_mean fraction
grows with depth (mean over the deeper half > mean over the shallower half, last > first) and at
layer L is >= 5x LN+PN's; IN's P_varmean and P_varstd fractions <= 1e-6 at every layer; LN+PN's
P_varmean and P_varstd fractions > 1e-6 at every layer.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ... import functional as F
from ...nn import GroupNorm, GroupNormProxyAct2d, LayerNorm2d
from ...nn.batch_norm import _BatchNorm
from ...nn.instance_norm import _InstanceNorm
from ..data import load_dataset
from ..models import CNN4, RandNet, is_instance_norm
from ..power import TERMS, power_decomposition
from ..progress import Progress
from ..train import TrainConfig, set_seed, train_classifier
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

__all__ = ["SITES", "PowerConfig", "decompose_sequence", "normalized_output", "power_criteria", "run_power"]

SITES = ("pre_norm", "post_norm", "post_act")


@dataclass
class PowerConfig(LabConfig):
    """Configuration of ``normkit power`` (every field is also a command-line option; :meth:`validate` checks
    them).

    Attributes:
        data: inputs (default ``"digits16"``: digits upsampled to 16x16).
        norms: registry specs.
        depth: random-net depth L.
        width: random-net channels.
        samples: inputs to measure on (taken from the training split for random nets, the test split for
            trained ones).
        seed: seed of the random nets (the same for every norm).
        trained: also train CNN-4 per norm and decompose its layers.
        epochs, batch_size, lr, max_steps: training of the ``trained`` nets.
        limit_train, limit_test, device, threads, out, quiet: as in :class:`LabConfig`.
    """

    data: str = opt(
        "digits16", "data set: 'digits', 'digitsN' (upsampled to NxN, 8..64), 'cifar10:PATH', 'synthetic'"
    )
    norms: list[str] = opt(["bn", "ln", "in", "gn:8", "ln+pn"], "registry specs")
    depth: int = opt(20, "random-net depth L", min=1, max=500)
    width: int = opt(64, "random-net width", min=1, max=1024)
    samples: int = opt(256, "inputs to measure on", min=2)
    seed: int = opt(0, "seed", min=0)
    trained: bool = opt(False, "also train CNN-4 with each norm and decompose its 4 layers")
    epochs: int = opt(5, "epochs for --trained", min=1)
    batch_size: int = opt(32, "batch size for --trained", min=2)
    lr: float = opt(0.05, "peak LR for --trained at batch 32, scaled linearly", min=0, min_open=True, max=100)
    max_steps: int | None = opt(None, "cap optimizer steps for --trained", min=1, metavar="N")

    def _check(self) -> None:
        self.norms = _norm_specs(self.norms)
        for n in self.norms:
            check_norm_fits(
                n, lambda n=n: RandNet(n, depth=1, width=self.width), f"RandNet (width {self.width})"
            )
            if self.trained:
                check_norm_fits(n, lambda n=n: CNN4(n), "CNN-4")

    def check_data(self, data: Any) -> None:
        """``samples`` and ``batch_size`` against the data; the norms against its channels."""
        n_train, n_test = len(data.x_train), len(data.x_test)
        if self.samples > n_train or (self.trained and self.samples > n_test):
            raise ConfigError(
                f"--samples {self.samples} exceeds the {min(n_train, n_test) if self.trained else n_train} "
                f"samples of {data.name}"
            )
        if self.trained and self.batch_size > n_train:
            raise ConfigError(
                f"--batch-size {self.batch_size} exceeds the {n_train} training samples of {data.name}"
            )
        if data.in_channels != 1:
            for n in self.norms:
                check_norm_fits(
                    n,
                    lambda n=n: RandNet(n, depth=1, width=self.width, in_channels=data.in_channels),
                    "RandNet",
                )


def normalized_output(layer: nn.Module, x: Tensor) -> Tensor:
    """The output of ``layer``'s norm *before* its affine and activation, for input ``x``.

    Uses the layer's own statistics (BN: the batch's in train mode, the running ones in eval
    mode) and eps. Handles normkit's BN, GN, LN (2d), IN, GN/LN + Proxy Norm and their
    norm+activation forms, ``norm -> act`` sequences, torch's BN/GN/IN, and ``Identity``.

    Example:
        >>> import torch, normkit
        >>> layer = normkit.create_norm_act_layer("gn:2", 4)
        >>> y = normalized_output(layer, torch.randn(3, 4, 5, 5))
        >>> float(y[0, :2].mean()).__abs__() < 1e-5
        True
    """
    if isinstance(layer, nn.Sequential):
        return normalized_output(layer[0], x)
    if isinstance(layer, nn.Identity):
        return x
    if isinstance(layer, _BatchNorm):
        batch = layer.training or not layer._tracking
        rm = None if batch else layer.running_mean
        rv = None if batch else layer.running_var
        return F.batch_norm(x, rm, rv, training=batch, eps=layer.eps).output
    if isinstance(layer, (GroupNorm, GroupNormProxyAct2d, nn.GroupNorm)):
        return F.group_norm(x, layer.num_groups, None, None, layer.eps)
    if isinstance(layer, LayerNorm2d):
        return F.layer_norm_2d(x, None, None, layer.eps, over="chw" if layer.over == "chw" else "c")
    if isinstance(layer, _InstanceNorm):
        use_input = layer.training or not layer._tracking
        rm = None if use_input else layer.running_mean
        rv = None if use_input else layer.running_var
        return F.instance_norm(x, rm, rv, use_input_stats=use_input, eps=layer.eps).output
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        batch = layer.training or layer.running_mean is None
        return nn.functional.batch_norm(
            x,
            None if batch else layer.running_mean,
            None if batch else layer.running_var,
            training=batch,
            eps=layer.eps,
        )
    if isinstance(layer, nn.modules.instancenorm._InstanceNorm):
        return nn.functional.instance_norm(x, eps=layer.eps)
    raise TypeError(f"normalized_output: don't know the normalization of {type(layer).__name__}")


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))


@torch.no_grad()
def decompose_sequence(modules: Sequence[nn.Module], x: Tensor) -> list[dict[str, dict[str, float]]]:
    """Run ``x`` through ``modules``; for every conv followed by a norm(+act) layer, decompose the three
    sites.

    Returns one ``{site: {P_mean, P_varmean, P_varstd, P_meanstd (fractions), total}}`` per conv.
    """
    out: list[dict[str, dict[str, float]]] = []
    pending: Tensor | None = None
    for m in modules:
        if pending is not None and not _is_conv(m) and not isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            y = m(pending)
            sites = {"pre_norm": pending, "post_norm": normalized_output(m, pending), "post_act": y}
            out.append(
                {k: {**(d := power_decomposition(v)).fractions(), "total": d.total} for k, v in sites.items()}
            )
            pending, x = None, y
            continue
        if pending is not None:  # a conv or a pool straight after a conv: nothing to decompose
            x, pending = pending, None
        x = m(x)
        if _is_conv(m):
            pending = x
    return out


def power_criteria(fr: dict[str, list[dict[str, float]]]) -> list[dict[str, Any]]:
    """E4's pass criteria on per-norm, per-layer post-norm fractions ``fr[norm][layer][term]``."""
    out: list[dict[str, Any]] = []
    norms = list(fr)
    bn = next((n for n in norms if n in ("bn", "bn2d")), None)
    ln = "ln" if "ln" in fr else None
    lnpn = "ln+pn" if "ln+pn" in fr else None
    inn = next((n for n in norms if is_instance_norm(n)), None)
    if bn:
        worst = max(f["P_mean"] for f in fr[bn])
        out.append(
            {
                "text": "BN: P_mean fraction < 0.02 at every layer",
                "ok": worst < 0.02,
                "detail": f"max {worst:.2e}",
            }
        )
    if ln:
        pm = [f["P_mean"] for f in fr[ln]]
        half = len(pm) // 2
        grows = (
            len(pm) > 1
            and pm[-1] > pm[0]
            and sum(pm[half:]) / len(pm[half:]) > sum(pm[: half or 1]) / len(pm[: half or 1])
        )
        out.append(
            {
                "text": "LN: P_mean fraction increases with depth",
                "ok": grows,
                "detail": " / ".join(f"{v:.3f}" for v in _at_depths(pm)),
            }
        )
        if lnpn:
            a, b = pm[-1], fr[lnpn][-1]["P_mean"]
            out.append(
                {
                    "text": f"LN: P_mean fraction at layer {len(pm)} >= 5x LN+PN's",
                    "ok": a >= 5 * b,
                    "detail": f"{a:.3f} vs {b:.4f} ({a / b if b > 0 else float('inf'):.0f}x)",
                }
            )
    if inn:
        worst = max(max(f["P_varmean"], f["P_varstd"]) for f in fr[inn])
        out.append(
            {
                "text": "IN: P_varmean = P_varstd = 0 (<= 1e-6) at every layer",
                "ok": worst <= 1e-6,
                "detail": f"max {worst:.1e}",
            }
        )
    if lnpn:
        least = min(min(f["P_varmean"], f["P_varstd"]) for f in fr[lnpn])
        out.append(
            {
                "text": "LN+PN: P_varmean > 0 and P_varstd > 0 (> 1e-6) at every layer",
                "ok": least > 1e-6,
                "detail": f"min {least:.1e}",
            }
        )
    return out


def _depths(n: int) -> list[int]:
    """Layers shown in the summary: 1, 5, 10, ..., L (1-based), those that exist."""
    return sorted({d for d in (1, 5, 10, 15, n) if 1 <= d <= n})


def _at_depths(vals: Sequence[float]) -> list[float]:
    return [vals[d - 1] for d in _depths(len(vals))]


def _table(fr: dict[str, list[dict[str, dict[str, float]]]], site: str) -> str:
    norms = list(fr)
    depth = len(next(iter(fr.values())))
    ds = _depths(depth)
    rows = []
    for n in norms:
        layers = [layer[site] for layer in fr[n]]
        rows.append(
            [
                n,
                *[f"{layers[d - 1]['P_mean']:.3f}" for d in ds],
                f"{layers[-1]['P_varmean']:.4f}",
                f"{layers[-1]['P_varstd']:.4f}",
                f"{layers[-1]['P_meanstd']:.3f}",
            ]
        )
    return markdown_table(
        [
            "norm",
            *[f"P_mean @{d}" for d in ds],
            f"P_varmean @{depth}",
            f"P_varstd @{depth}",
            f"P_meanstd @{depth}",
        ],
        rows,
    )


def run_power(cfg: PowerConfig) -> tuple[Path, str]:
    """Run E4; returns the run folder and the Markdown summary.

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
    x = data.x_train[: cfg.samples].to(device)
    record = start_record(cfg.out, "power", cfg, device, parallelism=why)
    with record.guard():
        random_fr: dict[str, list[dict[str, dict[str, float]]]] = {}
        trained_fr: dict[str, dict[str, list[dict[str, dict[str, float]]]]] = {"init": {}, "trained": {}}
        with Progress(cfg.quiet) as progress:
            bar = progress.add("random nets", total=len(cfg.norms))
            for norm in cfg.norms:
                set_seed(cfg.seed, device)
                net = (
                    RandNet(norm, depth=cfg.depth, width=cfg.width, in_channels=data.in_channels)
                    .to(device)
                    .train()
                )
                seq = [m for pair in zip(net.convs, net.norm_acts) for m in pair]
                random_fr[norm] = decompose_sequence(seq, x)
                for i, layer in enumerate(random_fr[norm], 1):
                    for site, d in layer.items():
                        record.log(net="randnet", norm=norm, layer=i, site=site, **d)
                progress.advance(bar, info=norm)
            if cfg.trained:
                bar = progress.add("trained CNN-4", total=len(cfg.norms))
                xt = data.x_test[: cfg.samples].to(device)
                for norm in cfg.norms:
                    set_seed(cfg.seed, device)
                    model = CNN4(norm, data.in_channels, data.num_classes).to(device)
                    # at initialisation BN's running statistics are still (0, 1): measure with batch
                    # statistics
                    trained_fr["init"][norm] = decompose_sequence(
                        list(copy.deepcopy(model).train().features), xt
                    )
                    res = train_classifier(
                        model,
                        data,
                        TrainConfig(
                            epochs=cfg.epochs,
                            batch_size=cfg.batch_size,
                            lr=cfg.lr * cfg.batch_size / 32,
                            warmup_epochs=1.0,
                            max_steps=cfg.max_steps,
                            seed=cfg.seed,
                            eval_batch_stats=False,
                        ),
                        device=device,
                    )
                    trained_fr["trained"][norm] = decompose_sequence(list(model.eval().features), xt)
                    for stage in ("init", "trained"):
                        for i, layer in enumerate(trained_fr[stage][norm], 1):
                            for site, d in layer.items():
                                record.log(net=f"cnn4-{stage}", norm=norm, layer=i, site=site, **d)
                    record.log(
                        net="cnn4-trained", norm=norm, kind="final", test_err=res.final.get("test_err")
                    )
                    progress.advance(
                        bar, info=f"{norm}: {res.final.get('test_err', float('nan')):.2f}% test error"
                    )
        post = {n: [layer["post_norm"] for layer in v] for n, v in random_fr.items()}
        crit = power_criteria(post)
        lines = [
            f"# power: decomposition of RandNet-{cfg.depth} (width {cfg.width}) on {cfg.samples} {data.name} "
            "inputs",
            "",
            "Fractions of the total power (docs/EXPERIMENTS.md, E4). P_mean = channel-wise squared mean "
            "(LN's collapse), "
            "P_varmean / P_varstd = variance over inputs of the instance means / stds (IN forces 0).",
            "",
            "## After the norm, before its affine (the pass-criteria site)",
            "",
            _table(random_fr, "post_norm"),
            "",
            "## Before the norm (conv output)",
            "",
            _table(random_fr, "pre_norm"),
            "",
            "## Layer output (after affine + activation; Proxy Norm's output for +pn)",
            "",
            _table(random_fr, "post_act"),
            "",
            "Pass criteria (docs/EXPERIMENTS.md, E4):",
            "",
            *[f"- {c['text']}: **{verdict(c['ok'])}** ({c['detail']})" for c in crit],
        ]
        if cfg.trained:
            for stage in ("init", "trained"):
                lines += [
                    "",
                    f"## CNN-4 {stage} ({epochs_text(cfg.epochs, cfg.max_steps)} at B={cfg.batch_size})"
                    if stage == "trained"
                    else "## CNN-4 at initialisation",
                    "",
                    _table(trained_fr[stage], "post_norm"),
                    "",
                    _table(trained_fr[stage], "pre_norm").replace("| norm |", "| norm (pre-norm) |"),
                ]
        summary = "\n".join(lines) + "\n"
        from ..plots import plot_power, plot_power_lines

        plot_power(
            post,
            record.path / "power_post_norm.png",
            criteria=True,
            title=f"RandNet-{cfg.depth}: after the norm (before affine)",
        )
        plot_power(
            {n: [layer["pre_norm"] for layer in v] for n, v in random_fr.items()},
            record.path / "power_pre_norm.png",
            title=f"RandNet-{cfg.depth}: conv output, before the norm",
        )
        plot_power_lines(post, record.path / "pmean_vs_depth.png", title="P_mean fraction after the norm")
        figs = ["power_post_norm.png", "power_pre_norm.png", "pmean_vs_depth.png"]
        if cfg.trained:
            plot_power(
                {n: [layer["post_norm"] for layer in v] for n, v in trained_fr["trained"].items()},
                record.path / "power_trained.png",
                title="trained CNN-4: after the norm",
            )
            figs.append("power_trained.png")
        record.write_json(
            "results.json",
            {
                "randnet": random_fr,
                "cnn4": trained_fr if cfg.trained else None,
                "criteria": crit,
                "terms": list(TERMS),
            },
        )
        record.write_text("summary.md", summary + "\n" + "\n".join(f"![{f}]({f})" for f in figs) + "\n")
        record.finish()
        return record.path, summary
