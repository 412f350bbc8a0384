"""Providers side by side: torch native vs normkit (vs the torch.compile'd composite, opt-in).

Usage:
    python benchmarks/bench_norms.py                 # all cases, fwd and fwd+bwd, 3 interleaved repeats
    python benchmarks/bench_norms.py --quick         # small shapes, one repeat (a smoke run)
    python benchmarks/bench_norms.py --compile       # also the compiled naive composite (16 s cold compile)
    python benchmarks/bench_norms.py --baseline /tmp/old/src/normkit
        # also an earlier normkit (e.g. `git worktree add /tmp/old <commit>`), loaded as a second package
        # in the same process, so a regression check compares like with like (the baseline must not
        # register the same torch.library ops as the current one)

Prints one Markdown table: best-of-N median per provider and the ratio normkit / native (< 1 is
faster). The machine drifts 10-50% between repeats (PERFORMANCE.md): only ratios from one run
mean anything, and differences under ~30% are noise. The allocator is pinned (glibc MALLOC_*
settings, re-exec'd if absent) so fresh large allocations do not pay page faults on every call.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": "17179869184",
    "MALLOC_TRIM_THRESHOLD_": "17179869184",
    "MALLOC_TOP_PAD_": "1073741824",
}
if any(os.environ.get(k) != v for k, v in _MALLOC.items()) and "--no-pin" not in sys.argv:
    os.environ.update(_MALLOC)
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.benchmark import Timer  # noqa: E402

import normkit.functional as NF  # noqa: E402

Op = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _naive_gn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, groups: int) -> torch.Tensor:
    n, c = x.shape[:2]
    xv = x.reshape(n, groups, -1)
    mean = xv.mean(-1, keepdim=True)
    var = (xv - mean).square().mean(-1, keepdim=True)
    y = ((xv - mean) * torch.rsqrt(var + 1e-5)).view_as(x)
    return y * w.view(1, c, 1, 1) + b.view(1, c, 1, 1)


def _naive_bn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mean = x.mean((0, 2, 3), keepdim=True)
    var = (x - mean).square().mean((0, 2, 3), keepdim=True)
    return (x - mean) * torch.rsqrt(var + 1e-5) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


def _pn_native(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.relu(F.group_norm(x, 32, w, b))


def load_baseline(path: str):
    """Import the normkit package at ``path`` as ``normkit_baseline`` and return its functional module."""
    import importlib
    import importlib.util

    init = os.path.join(path, "__init__.py")
    spec = importlib.util.spec_from_file_location("normkit_baseline", init, submodule_search_locations=[path])
    if spec is None or spec.loader is None:
        raise SystemExit(f"--baseline: no package at {path!r} (expected {init})")
    module = importlib.util.module_from_spec(spec)
    sys.modules["normkit_baseline"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("normkit_baseline.functional")


def _normkit_ops(nf) -> dict[str, Op]:
    return {
        "batch_norm train": lambda x, w, b: nf.batch_norm(x, None, None, w, b, True).output,
        "group_norm G=32": lambda x, w, b: nf.group_norm(x, 32, w, b),
        "instance_norm": lambda x, w, b: nf.instance_norm(x, weight=w, bias=b).output,
        "layer_norm over CHW": lambda x, w, b: nf.layer_norm_2d(x, w, b, over="chw"),
        # proxy_bias / proxy_weight sized from w: the channel count changes between shapes
        "GN32 + proxy norm (ref: native GN+ReLU)": lambda x, w, b: nf.proxy_norm_act(
            nf.group_norm(x, 32), w, b, torch.zeros_like(w), torch.zeros_like(w)
        ),
    }


def cases(baseline=None) -> dict[str, dict[str, Op]]:
    table = _cases()
    for provider, nf in (("normkit", NF), ("baseline", baseline)):
        if nf is not None:
            for name, fn in _normkit_ops(nf).items():
                table[name][provider] = fn
    return table


def _cases() -> dict[str, dict[str, Op]]:
    return {
        "batch_norm train": {
            "native": lambda x, w, b: F.batch_norm(x, None, None, w, b, True),
            "compiled": _naive_bn,
        },
        "group_norm G=32": {
            "native": lambda x, w, b: F.group_norm(x, 32, w, b),
            "compiled": lambda x, w, b: _naive_gn(x, w, b, 32),
        },
        "instance_norm": {
            "native": lambda x, w, b: F.instance_norm(x, weight=w, bias=b),
            "compiled": lambda x, w, b: _naive_gn(x, w, b, x.shape[1]),
        },
        "layer_norm over CHW": {
            "native": lambda x, w, b: F.group_norm(x, 1, w, b),
            "compiled": lambda x, w, b: _naive_gn(x, w, b, 1),
        },
        "GN32 + proxy norm (ref: native GN+ReLU)": {
            "native": _pn_native,
        },
    }


def measure(fn: Op, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, backward: bool, min_time: float) -> float:
    if backward:
        xg = x.detach().requires_grad_(True)
        dy = torch.randn_like(x)
        stmt = lambda: fn(xg, w, b).backward(dy)  # noqa: E731
    else:

        def stmt() -> None:
            with torch.no_grad():
                fn(x, w, b)

    stmt()  # warm-up (and the compile, for the compiled provider)
    return Timer("stmt()", globals={"stmt": stmt}).blocked_autorange(min_run_time=min_time).median * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, one repeat")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the naive composite")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-pin", action="store_true", help="do not pin the allocator")
    parser.add_argument("--baseline", metavar="DIR", help="an earlier normkit package directory to time alongside")
    parser.add_argument("--only", metavar="TEXT", help="only the ops whose name contains TEXT")
    args = parser.parse_args(argv)
    baseline = load_baseline(args.baseline) if args.baseline else None
    torch.set_num_threads(args.threads)
    shapes = [(4, 64, 16, 16)] if args.quick else [(32, 64, 56, 56), (8, 256, 28, 28)]
    repeats = 1 if args.quick else args.repeats
    min_time = 0.1 if args.quick else 0.5
    formats = ["NCHW", "CL"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; ms = best-of-{repeats} median\n")
    extra = (" compiled ms |" if args.compile else "") + (" baseline ms | normkit/baseline |" if baseline else "")
    print("| op | shape | layout | pass | native ms | normkit ms | normkit/native |" + extra)
    print("|---|---|---|---|---:|---:|---:|" + "---:|" * extra.count("|"))
    for name, providers in cases(baseline).items():
        if args.only and args.only not in name:
            continue
        for shape in shapes:
            c = shape[1]
            for fmt in formats:
                x = torch.randn(shape)
                if fmt == "CL":
                    x = x.to(memory_format=torch.channels_last)
                w = torch.ones(c, requires_grad=True)
                b = torch.zeros(c, requires_grad=True)
                for backward in (False, True):
                    if name.startswith("GN32") and c % 32:
                        continue
                    wanted = ["native", "normkit"] + (["compiled"] if args.compile and "compiled" in providers else [])
                    wanted += ["baseline"] if baseline else []
                    fns = {k: (torch.compile(providers[k]) if k == "compiled" else providers[k]) for k in wanted}
                    best = {k: float("inf") for k in wanted}
                    for _ in range(repeats):  # interleaved repeats
                        for k in wanted:
                            best[k] = min(best[k], measure(fns[k], x, w, b, backward, min_time))
                    row = (
                        f"| {name} | {tuple(shape)} | {fmt} | {'fwd+bwd' if backward else 'fwd'} | "
                        f"{best['native']:.2f} | {best['normkit']:.2f} | {best['normkit'] / best['native']:.2f} |"
                    )
                    if args.compile:
                        row += f" {best['compiled']:.2f} |" if "compiled" in best else " - |"
                    if baseline:
                        row += f" {best['baseline']:.2f} | {best['normkit'] / best['baseline']:.2f} |"
                    print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
