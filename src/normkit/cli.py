"""The ``normkit`` command: argument parsing only; the work is in :mod:`normkit.lab`.

Subcommands: ``compare`` (E1/E3, the main job), ``power`` (E4), ``lr-sweep`` (E2), ``landscape``
(E5), ``report``, ``bench`` (torch native vs normkit's backends) and ``kernels`` (``status`` /
``build`` of the fused CPU kernels). ``normkit <subcommand> --help`` lists each one's options. Every experiment
writes ``runs/<experiment>-<timestamp>/`` (``--out`` moves the root). A bad option, an unknown
norm or an unreadable data path exits with status 2 and a one-line message.

Data-parallel: ``torchrun --nproc-per-node 2 -m normkit.cli compare ...`` (add ``--sync-bn`` for BN
statistics over all processes).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence

__all__ = ["build_parser", "main"]


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        try:
            return [kind(t) for t in items]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"bad list {text!r}: {e}") from e

    parse.__name__ = f"list of {kind.__name__}"
    return parse


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


_pint = _positive(int)
_pfloat = _positive(float)


def _common(p: argparse.ArgumentParser, data: str = "digits") -> None:
    g = p.add_argument_group("common")
    g.add_argument("--data", default=data,
                   help=f"data set: 'digits' (scikit-learn, no download), 'digits16', 'cifar10:PATH' "
                        f"(CIFAR-10 python batches), 'synthetic' (default: {data})")
    g.add_argument("--out", default="runs", metavar="DIR", help="runs root; each run writes DIR/<experiment>-<timestamp>/ (default: runs)")
    g.add_argument("--limit-train", type=_pint, metavar="N", help="use only the first N training samples")
    g.add_argument("--limit-test", type=_pint, metavar="N", help="use only the first N test samples")
    g.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda (default: auto)")
    g.add_argument("--threads", type=_pint, default=2, help="torch intra-op threads (default: 2)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The ``normkit`` argument parser (subcommands and their options)."""
    parser = argparse.ArgumentParser(
        prog="normkit",
        description="normkit's lab: experiments that reproduce the normalization papers' claims on small data.",
        epilog="Run 'normkit compare' for the main job (3 to 6 minutes on 2 CPU cores). Results measured here: docs/RESULTS.md.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("compare", help="E1/E3: test error per norm, batch size and seed (the main job)",
                       description="Train small CNNs with each norm across batch sizes and seeds; print the test error "
                                   "(mean ± std over seeds) and check ALGORITHMS.md §4's E1/E3 pass criteria.")
    p.add_argument("--models", type=_csv(str), default=["cnn4-head"],
                   help="cnn4-head (CNN-4 + Linear-norm-ReLU head), cnn4, resnet (pre-activation ResNet) (default: cnn4-head)")
    p.add_argument("--norms", type=_csv(str), default=["bn", "gn:8", "ln+pn"],
                   help="registry specs, e.g. bn,gn:8,ln,in,ln+pn,gn:4+pn (default: bn,gn:8,ln+pn)")
    p.add_argument("--batch-sizes", type=_csv(int), default=[32, 8, 2], help="per-process batch sizes (default: 32,8,2)")
    p.add_argument("--seeds", type=_csv(int), default=[0, 1], help="seeds, one run each (default: 0,1)")
    p.add_argument("--epochs", type=_pint, default=8, help="epochs per run (default: 8)")
    p.add_argument("--lr", type=_pfloat, default=0.05, help="peak LR at a global batch of 32, scaled linearly (default: 0.05)")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up, epochs (default: 1)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay (default: 5e-4)")
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine", help="LR schedule (default: cosine)")
    p.add_argument("--max-steps", type=_pint, help="stop each run after N optimizer steps (quick runs)")
    p.add_argument("--jobs", type=_pint, default=2,
                   help="runs in parallel worker processes, CPU only; each gets threads/jobs threads (default: 2)")
    p.add_argument("--sync-bn", action="store_true", help="under torchrun: BN statistics over all processes' batches (BN layers become normkit.nn.SyncBatchNorm)")
    _common(p)

    p = sub.add_parser("power", help="E4: power decomposition per layer of deep random (and trained) nets",
                       description="Decompose each layer's activation power into P_mean, P_varmean, P_varstd, P_meanstd "
                                   "(ALGORITHMS.md §2.8), before and after the norm, for random nets (and trained CNN-4s).")
    p.add_argument("--norms", type=_csv(str), default=["bn", "ln", "in", "gn:8", "ln+pn"],
                   help="registry specs (default: bn,ln,in,gn:8,ln+pn)")
    p.add_argument("--depth", type=_pint, default=20, help="random-net depth L (default: 20)")
    p.add_argument("--width", type=_pint, default=64, help="random-net width (default: 64)")
    p.add_argument("--samples", type=_pint, default=256, help="inputs to measure on (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--trained", action="store_true", help="also train CNN-4 with each norm and decompose its 4 layers")
    p.add_argument("--epochs", type=_pint, default=5, help="epochs for --trained (default: 5)")
    p.add_argument("--batch-size", type=_pint, default=32, help="batch size for --trained (default: 32)")
    p.add_argument("--max-steps", type=_pint, help="cap optimizer steps for --trained")
    _common(p, data="digits16")

    p = sub.add_parser("lr-sweep", help="E2: largest stable LR with and without BN; MLP-3 sigmoid percentiles",
                       description="CNN-4 without a norm vs with BN over a learning-rate grid (divergence, steps to the "
                                   "no-norm net's best accuracy), and the BN paper's MLP-3 sigmoid experiment with the "
                                   "15/50/85th percentiles of a last-hidden-layer input over training.")
    p.add_argument("--norms", type=_csv(str), default=["none", "bn"], help="baseline first, then the norm (default: none,bn)")
    p.add_argument("--lrs", type=_csv(float), default=[0.01, 0.03, 0.1, 0.3, 1.0, 3.0], help="LR grid (default: 0.01,...,3.0)")
    p.add_argument("--epochs", type=_pint, default=5, help="epochs per CNN run (default: 5)")
    p.add_argument("--batch-size", type=_pint, default=64, help="CNN batch size (default: 64)")
    p.add_argument("--eval-every", type=_pint, default=5, help="test accuracy every N steps (default: 5)")
    p.add_argument("--max-steps", type=_pint, help="cap optimizer steps per CNN run")
    p.add_argument("--mlp-steps", type=int, default=3000, help="MLP-3 steps; 0 skips the MLP part (default: 3000)")
    p.add_argument("--mlp-lr", type=_pfloat, default=0.1, help="MLP-3 learning rate (default: 0.1)")
    p.add_argument("--mlp-batch-size", type=_pint, default=60, help="MLP-3 batch size (default: 60)")
    p.add_argument("--percentile-every", type=_pint, default=50, help="record the percentiles every N steps (default: 50)")
    p.add_argument("--unit", type=int, default=0, help="which last-hidden-layer unit to plot (default: 0)")
    p.add_argument("--skip-cnn", action="store_true", help="only the MLP-3 part")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    _common(p)

    p = sub.add_parser("landscape", help="E5: Santurkar et al.'s loss-landscape measures with and without BN",
                       description="Train a plain 6-conv net with and without BN; every few steps measure, along the "
                                   "gradient, the loss range, the gradient change and the effective beta-smoothness.")
    p.add_argument("--norms", type=_csv(str), default=["none", "bn"], help="(default: none,bn)")
    p.add_argument("--steps", type=_pint, default=1000, help="training steps (default: 1000)")
    p.add_argument("--every", type=_pint, default=25, help="measure every N steps (default: 25)")
    p.add_argument("--lr", type=_pfloat, default=0.1, help="SGD learning rate (default: 0.1)")
    p.add_argument("--batch-size", type=_pint, default=64, help="(default: 64)")
    p.add_argument("--etas", type=_pint, default=8, help="number of step sizes in [0.05, 0.4] (default: 8)")
    p.add_argument("--eta-max", type=_pfloat, default=0.4, help="largest step size (default: 0.4)")
    p.add_argument("--delta", type=_pfloat, default=1.0, help="fixed-distance variant: steps of eta*delta along g/|g| (default: 1)")
    p.add_argument("--width", type=_pint, default=32, help="first conv width (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    _common(p)

    p = sub.add_parser("report", help="gather runs into one Markdown report and a static HTML page",
                       description="Collect the run folders under a runs root (or the folders given) into report.md and "
                                   "report.html (plots embedded) that a person can read.")
    p.add_argument("runs", nargs="*", help="run folders (default: the latest run of each experiment under --runs-root)")
    p.add_argument("--runs-root", default="runs", help="where to look for runs (default: runs)")
    p.add_argument("--all", action="store_true", help="every run, not only the latest per experiment")
    p.add_argument("--out", metavar="DIR", help="where to write report.md/report.html (default: the runs root)")

    p = sub.add_parser("bench", help="torch native vs every normkit backend, side by side (norms and training steps)",
                       description="Time torch's norms and normkit's (each backend) on the same shapes in one process, "
                                   "interleaved: ms, effective GB/s, ratios to native and to a same-size copy; then one "
                                   "training step of a ResNet-18-style net and of CNN-4 with torch.nn's norms vs "
                                   "normkit's. Prints Markdown; --json writes everything.")
    p.add_argument("--shapes", type=_csv(_shape), help="e.g. 32x64x56x56,8x256x28x28 (default: PERFORMANCE.md's shapes)")
    p.add_argument("--layouts", type=_csv(_choice("nchw", "cl")), default=["nchw", "cl"], help="nchw,cl (default: both)")
    p.add_argument("--dtypes", type=_csv(_choice("fp32", "bf16")), default=["fp32", "bf16"], help="fp32,bf16 (default: both)")
    p.add_argument("--passes", type=_csv(_choice("fwd", "fwdbwd")), default=["fwd", "fwdbwd"], help="fwd,fwdbwd (default: both)")
    p.add_argument("--ops", type=_csv(str), help="only the ops whose name contains one of these, e.g. batch_norm,group")
    p.add_argument("--backends", type=_csv(_choice("reference", "cpu", "native", "triton")),
                   help="normkit backends to time (default: all available for the device)")
    p.add_argument("--device", type=_choice("cpu", "cuda"), default="cpu",
                   help="cpu, or cuda: torch native (cuDNN), normkit's Triton kernels and torch.compile on a GPU, "
                        "with ResNet-50-sized shapes added and %% of the GPU's peak bandwidth (default: cpu)")
    p.add_argument("--peak-gbps", type=_pfloat, help="the device's peak bandwidth for the %% of peak column "
                                                     "(default: known GPUs' datasheet figure)")
    p.add_argument("--repeats", type=_pint, default=3, help="interleaved repeats; the best median is kept (default: 3)")
    p.add_argument("--min-time", type=_pfloat, default=0.2, help="seconds per op measurement (default: 0.2)")
    p.add_argument("--threads", type=_pint, default=2, help="torch intra-op threads (default: 2)")
    p.add_argument("--compile", action="store_true", help="also torch.compile: the naive composite, and the compiled training steps")
    p.add_argument("--no-ops", action="store_true", help="skip the per-op part")
    p.add_argument("--e2e", action=argparse.BooleanOptionalAction, default=True,
                   help="the training steps: ResNet-18-style 32x32/64x64 at batch 32 and 2, CNN-4 at batch 2 (default: on)")
    p.add_argument("--quick", action="store_true", help="a smoke run: one small shape, one repeat, small training steps")
    p.add_argument("--json", metavar="PATH", help="write every measurement as JSON")
    p.add_argument("--md", metavar="PATH", help="also write the Markdown tables to a file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-pin", action="store_true", help="do not pin glibc's allocator (fresh large outputs then pay page faults)")

    p = sub.add_parser("kernels", help="the kernel backends: what is built, what each norm runs on; build ahead of time",
                       description="'status' says which backend each common norm runs on here and whether the fused CPU "
                                   "kernels are built; 'build' compiles them now (about 40 s, once per machine and torch "
                                   "version) instead of on first use.")
    p.add_argument("action", choices=["status", "build"], help="status or build")
    p.add_argument("--verbose", action="store_true", help="build: show the compiler's output")
    return parser


def _shape(text: str) -> tuple[int, ...]:
    parts = text.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"a shape is N x C x H x W (four sizes joined by 'x'), e.g. 32x64x56x56; got {text!r}")
    return tuple(int(p) for p in parts)


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {text!r}")
        return text

    parse.__name__ = "/".join(choices)
    return parse


def _bench(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from . import bench

    if not args.no_pin and argv is None:  # the console script: pin glibc's allocator (re-exec)
        bench.pin_allocator(["-m", "normkit.cli", *sys.argv[1:]])
    return bench.main_from_args(args)


def _kernels(args: argparse.Namespace) -> int:
    from . import kernels

    if args.action == "build":
        ok = kernels.build(verbose=args.verbose)
        if not ok:
            print(f"normkit kernels: build failed: {kernels._build.load_error()}", file=sys.stderr)
            return 1
        print(f"normkit kernels: fused CPU kernels ready in {kernels.build_dir()}")
        return 0
    print(kernels.status())
    return 0


def _run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    cmd = args.command
    if cmd == "kernels":
        return _kernels(args)
    if cmd == "bench":
        return _bench(args, argv)
    if cmd == "compare":
        from .lab.experiments.compare import CompareConfig, run_compare

        outcome = run_compare(CompareConfig(
            data=args.data, models=args.models, norms=args.norms, batch_sizes=args.batch_sizes, seeds=args.seeds,
            epochs=args.epochs, lr=args.lr, warmup_epochs=args.warmup_epochs, momentum=args.momentum,
            weight_decay=args.weight_decay, schedule=args.schedule, max_steps=args.max_steps,
            limit_train=args.limit_train, limit_test=args.limit_test, device=args.device, threads=args.threads,
            jobs=args.jobs, sync_bn=args.sync_bn, out=args.out, quiet=args.quiet,
        ))
        path, summary = outcome.path, outcome.summary
    elif cmd == "power":
        from .lab.experiments.power import PowerConfig, run_power

        path, summary = run_power(PowerConfig(
            data=args.data, norms=args.norms, depth=args.depth, width=args.width, samples=args.samples, seed=args.seed,
            trained=args.trained, epochs=args.epochs, batch_size=args.batch_size, max_steps=args.max_steps,
            limit_train=args.limit_train, limit_test=args.limit_test, device=args.device, threads=args.threads,
            out=args.out, quiet=args.quiet,
        ))
    elif cmd == "lr-sweep":
        from .lab.experiments.lr_sweep import LRSweepConfig, run_lr_sweep

        path, summary = run_lr_sweep(LRSweepConfig(
            data=args.data, norms=args.norms, lrs=args.lrs, epochs=args.epochs, batch_size=args.batch_size,
            eval_every=args.eval_every, max_steps=args.max_steps, mlp_steps=args.mlp_steps, mlp_lr=args.mlp_lr,
            mlp_batch_size=args.mlp_batch_size, percentile_every=args.percentile_every, unit=args.unit,
            skip_cnn=args.skip_cnn, seed=args.seed, limit_train=args.limit_train, limit_test=args.limit_test,
            device=args.device, threads=args.threads, out=args.out, quiet=args.quiet,
        ))
    elif cmd == "landscape":
        from .lab.experiments.landscape import LandscapeConfig, run_landscape

        path, summary = run_landscape(LandscapeConfig(
            data=args.data, norms=args.norms, steps=args.steps, every=args.every, lr=args.lr, batch_size=args.batch_size,
            etas=args.etas, eta_max=args.eta_max, delta=args.delta, width=args.width, seed=args.seed,
            limit_train=args.limit_train, limit_test=args.limit_test, device=args.device, threads=args.threads,
            out=args.out, quiet=args.quiet,
        ))
    else:  # report
        from .lab.report import write_report

        md, html = write_report(args.runs, runs_root=args.runs_root, out=args.out, latest_only=not args.all)
        print(f"report: {md}\n        {html}")
        return 0
    if path is not None:  # rank 0 (or the only process)
        print(summary, end="")
        print(f"\nrun folder: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``normkit`` console script; returns the exit status.

    Example:
        >>> main(["compare", "--norms", "nosuchnorm", "--quiet"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        SystemExit: 2
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    from .lab.data import DataError
    from .lab.experiments.compare import NotAvailableError

    try:
        return _run(args, argv)
    except (DataError, NotAvailableError, ValueError) as e:
        print(f"normkit {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"normkit {args.command}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    sys.exit(main())
