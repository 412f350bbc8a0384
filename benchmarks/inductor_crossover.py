"""Where Inductor should generate a norm's code and where it should call normkit's kernels.

``torch.compile`` (Inductor) decomposes each normkit norm either into ATen ops it compiles into its
own loops, or into a call of normkit's kernels (``normkit.ops._inductor``; the choice is by size,
``_inductor.LIMITS``). This times one compiled forward + backward of a few layers both ways,
next to the torch.nn layers they replace compiled the same way, on a range of sizes, in one
process, and prints the ratios: the crossover is where "generated / kernels" passes 1. (Each way
is timed right after its compile: Dynamo serves one model class with one graph at a time.) Each
way's output and input gradient are also compared with the module run eagerly (largest difference
relative to the largest entry: float32 rounding, about 1e-6, on a correct path).

On CUDA, bfloat16 / float16 inputs' generated code computes the moments in two passes of sums
instead of Welford's (``normkit.ops.core.two_pass_moments``, chosen from the compiled code's
instruction counts); ``--moments both`` times the generated code both ways, to check that choice.

    python benchmarks/inductor_crossover.py [--device cuda] [--shapes 2x32x8x8,8x32x16x16] [--quick]
        [--dtypes fp32,bf16] [--moments both]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

import normkit.nn as nkn
from normkit.bench import _time_steps  # (median of single steps, synchronised on a GPU)
from normkit.ops import _inductor, core

_SHAPES = "2x32x8x8,4x32x16x16,8x32x16x16,8x64x32x32,32x64x56x56"
_LAYERS: dict[str, tuple[Callable[[int], nn.Module], Callable[[int], nn.Module]]] = {
    "GroupNorm(8) + ReLU": (
        lambda c: nn.Sequential(nn.GroupNorm(8, c), nn.ReLU()),
        lambda c: nkn.GroupNormAct2d(c, 8),
    ),
    "BatchNorm2d (train)": (nn.BatchNorm2d, nkn.BatchNorm2d),
    "LayerNorm2d (vs permute + LayerNorm)": (
        lambda c: _PermutedLayerNorm(c),
        nkn.LayerNorm2d,
    ),
}


class _PermutedLayerNorm(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _step(m: nn.Module, x: torch.Tensor) -> tuple[Callable[[], None], Callable[[], float]]:
    """``(step, check)``: one compiled forward + backward, and the largest difference of its output
    and input gradient from the same module run eagerly, relative to their largest entry."""
    f = torch.compile(m)
    w = torch.randn_like(x)

    def step() -> None:
        x.grad = None
        (f(x) * w).sum().backward()

    def check() -> float:
        got = []
        for fn in (f, m):
            x.grad = None
            y = fn(x)
            (y * w).sum().backward()
            assert x.grad is not None
            got.append((y.detach().float(), x.grad.float()))
        x.grad = None
        if any(type(s).__module__.startswith("normkit.") for s in m.modules()):
            from normkit.ops import _inductor

            if not _inductor.installed():  # (else this times something other than normkit's norms)
                raise RuntimeError(f"normkit's ops never reached Inductor's lowering: {_inductor._state}")
        return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(*got))

    return step, check


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _ways(moments: str) -> list[str]:
    """The normkit ways: the generated code (with the device's moments, or each of the two), and a
    call of normkit's kernels."""
    gen = ["generated"] if moments == "auto" else ["generated Welford", "generated two-pass"]
    return [*gen, "kernels"]


@contextmanager
def _way(way: str, device: str) -> Iterator[None]:
    """normkit's decomposition set for ``way`` while a model compiles: Inductor's own code or a call of
    normkit's kernels (``_inductor.LIMITS``), and with ``"... Welford"`` / ``"... two-pass"`` the
    moments that code computes (``core.two_pass_moments``; by default two passes for bfloat16 and
    float16 off the CPU)."""
    old, old_moments = dict(_inductor.LIMITS), core.two_pass_moments
    _inductor.LIMITS[device] = 0 if way == "kernels" else 1 << 62
    if way.endswith(" Welford") or way.endswith(" two-pass"):
        core.two_pass_moments = (lambda x: True) if way.endswith("two-pass") else (lambda x: False)
    try:
        yield
    finally:
        _inductor.LIMITS.clear()
        _inductor.LIMITS.update(old)
        core.two_pass_moments = old_moments


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", default=_SHAPES)
    ap.add_argument("--dtypes", default="fp32", help="comma-separated: fp32, bf16")
    ap.add_argument(
        "--moments",
        choices=("auto", "both"),
        default="auto",
        help="both: time the generated code with Welford's moments and with the two-pass ones",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one layer, two shapes, one repeat")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    layers = dict(list(_LAYERS.items())[:1]) if args.quick else _LAYERS
    if args.quick:
        shapes, args.repeats, args.min_time = shapes[:2], 1, 0.2
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    print(
        f"torch {torch.__version__}, {dev}, {torch.get_num_threads()} threads; limits now: {_inductor.LIMITS}"
    )
    ways = _ways(args.moments)
    gen = [w for w in ways if w != "kernels"]
    head = ["layer", "shape", "dtype", "torch.nn compiled us", *(f"normkit {w} us" for w in ways)]
    tail = [
        "best generated / kernels",
        "best normkit / torch.nn",
        f"max diff from eager: {' / '.join(ways)}",
    ]
    print("| " + " | ".join([*head, *tail]) + " |")
    print("|---|---|---|" + "---:|" * (len(head) - 3 + len(tail)))
    # each (layer, shape, way) a static graph of its own, compiled afresh (the caches key a graph by its
    # nodes, not by how normkit's ops decompose)
    with (
        dynamo_config.patch(recompile_limit=4096, automatic_dynamic_shapes=False),
        inductor_config.patch(fx_graph_cache=False),
        functorch_config.patch(enable_autograd_cache=False),
    ):
        for name, (make_torch, make_nk) in layers.items():
            for dname in args.dtypes.split(","):
                dtype = _DTYPES[dname]
                for shape in shapes:
                    torch.manual_seed(0)
                    x = torch.randn(shape, device=dev, dtype=dtype, requires_grad=True)
                    best: dict[str, float] = {}
                    err: dict[str, float] = {}
                    for way in ("torch.nn", *ways):
                        # (a reset between the ways: Dynamo would serve the second normkit model with
                        # the first one's graph, the same code and guards, whatever the limit says now)
                        torch._dynamo.reset()
                        m = (make_torch if way == "torch.nn" else make_nk)(shape[1]).to(dev, dtype)
                        with _way(way, dev.type) if way != "torch.nn" else nullcontext():
                            step, check = _step(m, x)
                            step()  # compile now, under this way's setting (forward and backward graphs)
                        best[way] = 1e3 * min(_time_steps(step, args.min_time) for _ in range(args.repeats))
                        if way != "torch.nn":
                            err[way] = check()
                    t, k = best["torch.nn"], best["kernels"]
                    g = min(best[w] for w in gen)
                    shp = "x".join(map(str, shape))
                    cells = [name, shp, dname, f"{t:.0f}", *(f"{best[w]:.0f}" for w in ways)]
                    cells += [
                        f"{g / k:.2f}",
                        f"{min(g, k) / t:.2f}",
                        " / ".join(f"{err[w]:.1e}" for w in ways),
                    ]
                    print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
