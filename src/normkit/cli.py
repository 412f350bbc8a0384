"""The ``normkit`` command: argument parsing only; the work is in :mod:`normkit.lab`.

The experiments' options are generated from their config dataclasses
(:func:`normkit.lab.experiments._common.add_config_arguments`), which also hold the defaults and
the checks: every setting is checked before any data is loaded or any run folder made.

Subcommands: ``compare`` (E1/E3, the main job), ``power`` (E4), ``lr-sweep`` (E2), ``landscape``
(E5), ``reproduce`` (all of them, writing docs/RESULTS.md), ``report``, ``bench`` (torch native vs
normkit's backends) and ``kernels`` (``status`` / ``build`` of the fused CPU kernels).
``normkit <subcommand> --help`` lists each one's options. Every experiment writes
``runs/<experiment>-<timestamp>/`` (``--out`` moves the root). A bad option, an unknown
norm or an unreadable data path exits with status 2 and a one-line message; Ctrl-C stops the run
within a couple of seconds, marks its folder ``interrupted`` and exits with status 130. SIGTERM
(``kill``, ``timeout``, a job scheduler) does the same and exits with status 143 (128 + 15).

Data-parallel: ``torchrun --nproc-per-node 2 -m normkit.cli compare ...`` (add ``--sync-bn`` for BN
statistics over all processes).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["build_parser", "main"]

EXPERIMENTS = ("compare", "power", "lr-sweep", "landscape")


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


def build_parser() -> argparse.ArgumentParser:
    """The ``normkit`` argument parser (subcommands and their options)."""
    parser = argparse.ArgumentParser(
        prog="normkit",
        description="normkit's lab: experiments that reproduce the normalization papers' claims on small "
        "data.",
        epilog="Run 'normkit compare' for the main job (3 to 6 minutes on 2 CPU cores). Results measured "
        "here: docs/RESULTS.md.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"normkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    from .lab.experiments import CONFIGS
    from .lab.experiments._common import add_config_arguments

    for name, (cls, help_text, description) in CONFIGS.items():
        p = sub.add_parser(name, help=help_text, description=description)
        add_config_arguments(p, cls)

    from .lab.reproduce import ReproduceConfig

    p = sub.add_parser(
        "reproduce",
        help="run E1..E5 as docs/RESULTS.md reports them and write RESULTS.md from the runs",
        description="Run the lab's protocol (compare with and without the head, E3, power --trained, "
        "lr-sweep, landscape) with the current code and write docs/RESULTS.md (tables, "
        "verdicts with their margins over the seeds, figures, and the machine it ran on). "
        "About 17 minutes on 2 idle CPU cores with the default 5 seeds (docs/RESULTS.md).",
    )
    add_config_arguments(p, ReproduceConfig)

    p = sub.add_parser(
        "report",
        help="gather runs into one Markdown report and a static HTML page",
        description="Collect the run folders under a runs root (or the folders given) into report.md and "
        "report.html (plots embedded) that a person can read.",
    )
    p.add_argument(
        "runs", nargs="*", help="run folders (default: the latest run of each experiment under --runs-root)"
    )
    p.add_argument(
        "--runs-root", default="runs", help="where to look for runs when none is given (default: runs)"
    )
    p.add_argument(
        "--all", action="store_true", help="every run under --runs-root, not only the latest per experiment"
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="where to write report.md/report.html (default: the runs root, or the folder of the first "
        "run given)",
    )

    p = sub.add_parser(
        "bench",
        help="torch native vs every normkit backend, side by side (norms and training steps)",
        description="Time torch's norms and normkit's (each backend) on the same shapes in one process, "
        "interleaved: ms, effective GB/s, ratios to native and to a same-size copy; then one "
        "training step of a ResNet-18-style net and of CNN-4 with torch.nn's norms vs "
        "normkit's. Prints Markdown; --json writes everything.",
    )
    p.add_argument(
        "--shapes", type=_csv(_shape), help="e.g. 32x64x56x56,8x256x28x28 (default: PERFORMANCE.md's shapes)"
    )
    p.add_argument(
        "--layouts", type=_csv(_choice("nchw", "cl")), default=["nchw", "cl"], help="nchw,cl (default: both)"
    )
    p.add_argument(
        "--dtypes",
        type=_csv(_choice("fp32", "bf16")),
        default=["fp32", "bf16"],
        help="fp32,bf16 (default: both)",
    )
    p.add_argument(
        "--passes",
        type=_csv(_choice("fwd", "fwdbwd")),
        default=["fwd", "fwdbwd"],
        help="fwd,fwdbwd (default: both)",
    )
    p.add_argument(
        "--ops", type=_csv(str), help="only the ops whose name contains one of these, e.g. batch_norm,group"
    )
    p.add_argument(
        "--backends",
        type=_csv(_choice("auto", "reference", "cpu", "native", "triton")),
        help="normkit backends to time (default: all available for the device; auto: cuda only)",
    )
    p.add_argument(
        "--device",
        type=_choice("cpu", "cuda"),
        default="cpu",
        help="cpu, or cuda: torch native (cuDNN), normkit's Triton kernels and torch.compile on a GPU, "
        "with ResNet-50-sized shapes added and %% of the GPU's peak bandwidth (default: cpu)",
    )
    p.add_argument(
        "--peak-gbps",
        type=_pfloat,
        help="the device's peak bandwidth for the %% of peak column (default: known GPUs' datasheet figure)",
    )
    p.add_argument(
        "--repeats",
        type=_pint,
        help="interleaved repeats; the best median is kept (default: 3; 1 with --quick)",
    )
    p.add_argument(
        "--min-time", type=_pfloat, help="seconds per op measurement (default: 0.2; 0.05 with --quick)"
    )
    p.add_argument("--threads", type=_pint, default=2, help="torch intra-op threads (default: 2)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also torch.compile: the naive composite, and the compiled training steps",
    )
    p.add_argument("--no-ops", action="store_true", help="skip the per-op part")
    p.add_argument(
        "--e2e",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the training steps: ResNet-18-style 32x32/64x64 at batch 32 and 2, CNN-4 at batch 2 (default: "
        "on)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: one small shape, one repeat, small training steps (what you also give wins)",
    )
    p.add_argument("--json", metavar="PATH", help="write every measurement as JSON")
    p.add_argument("--md", metavar="PATH", help="also write the Markdown tables to a file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin glibc's allocator (fresh large outputs then pay page faults)",
    )

    p = sub.add_parser(
        "kernels",
        help="the kernel backends: what is built, what each norm runs on; build ahead of time",
        description="'status' says which backend each common norm runs on here and whether the fused CPU "
        "kernels are built; 'build' compiles them now (about 40 s, once per machine and torch "
        "version) instead of on first use.",
    )
    p.add_argument("action", choices=["status", "build"], help="status or build")
    p.add_argument("--verbose", action="store_true", help="build: show the compiler's output")
    return parser


def _shape(text: str) -> tuple[int, ...]:
    parts = text.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(
            f"a shape is N x C x H x W (four sizes joined by 'x'), e.g. 32x64x56x56; got {text!r}"
        )
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
    if cmd in EXPERIMENTS:
        from .lab.experiments import CONFIGS, RUNNERS
        from .lab.experiments._common import config_from_args

        out = RUNNERS[cmd](config_from_args(CONFIGS[cmd][0], args))
        path, summary = (out.path, out.summary) if hasattr(out, "summary") else out
    elif cmd == "reproduce":
        from .lab.experiments._common import config_from_args
        from .lab.reproduce import ReproduceConfig, run_reproduce

        print(f"reproduce: wrote {run_reproduce(config_from_args(ReproduceConfig, args))}")
        return 0
    else:  # report
        from .lab.report import write_report

        if args.runs and args.all:
            raise ValueError("--all reports every run under --runs-root: give run folders or --all, not both")
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
    from .lab.records import RunInterrupted, sigterm_interrupts

    try:
        with sigterm_interrupts():  # SIGTERM: a KeyboardInterrupt (Terminated), handled as Ctrl-C below
            return _run(args, argv)
    except (DataError, NotAvailableError, ValueError) as e:
        print(f"normkit {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except BrokenPipeError:  # the reader went away (normkit ... | head -1): the work is done, say nothing
        import os
        import signal

        try:  # (the interpreter flushes stdout at exit: it must not meet the closed pipe again)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # an in-process caller's stdout without a file descriptor
            pass
        raise SystemExit(128 + signal.SIGPIPE) from None
    except KeyboardInterrupt as e:
        import signal

        # exiting: a second Ctrl-C (or SIGTERM) must not cut this short. As the process's entry point
        # (argv None) both stay ignored until the exit; an in-process caller (main([...]): a notebook, a
        # test) gets its handlers back, so that neither it nor its child processes are left ignoring them.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        previous_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signum = int(getattr(e, "signum", signal.SIGINT))
        try:
            where = ""
            if isinstance(e, RunInterrupted) and e.path is not None:
                done = f"{e.done} of {e.total} trainings finished, " if e.total else ""
                where = f"; {done}kept in {e.path} (marked interrupted)"
            how = "interrupted" if signum == signal.SIGINT else f"terminated ({signal.Signals(signum).name})"
            print(f"normkit {args.command}: {how}{where}", file=sys.stderr)
        finally:
            if argv is not None:
                signal.signal(signal.SIGINT, previous)
                signal.signal(signal.SIGTERM, previous_term)
        raise SystemExit(128 + signum) from None


if __name__ == "__main__":
    sys.exit(main())
