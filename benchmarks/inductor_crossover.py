"""Where Inductor should generate a norm's code and where it should call normkit's kernels.

``torch.compile`` (Inductor) decomposes each normkit norm either into ATen ops it compiles into its
own loops, or into a call of normkit's kernels (``normkit.ops._inductor``; the choice is by size,
``_inductor.LIMITS``). This times one compiled forward + backward of a few layers both ways,
next to the torch.nn layers they replace compiled the same way, on a range of sizes, in one
process, and prints the ratios: the crossover is where "generated / kernels" passes 1. (Each way
is timed right after its compile: Dynamo serves one model class with one graph at a time.) Each
way's output and input gradient are also compared with the module run eagerly (largest difference
relative to the largest entry: float32 rounding, about 1e-6, on a correct path).

    python benchmarks/inductor_crossover.py [--device cuda] [--shapes 2x32x8x8,8x32x16x16] [--quick]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn

import normkit.nn as nkn
from normkit.bench import _time_steps  # (median of single steps, synchronised on a GPU)
from normkit.ops import _inductor

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
        return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(*got))

    return step, check


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", default=_SHAPES)
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
    head = ["layer", "shape", "torch.nn compiled us", "normkit generated us", "normkit kernels us"]
    tail = ["generated / kernels", "best normkit / torch.nn", "max diff from eager: generated / kernels"]
    print("| " + " | ".join([*head, *tail]) + " |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    # each (layer, shape, way) a static graph of its own, compiled afresh (the caches key a graph by its
    # nodes, not by how normkit's ops decompose)
    with (
        dynamo_config.patch(recompile_limit=4096, automatic_dynamic_shapes=False),
        inductor_config.patch(fx_graph_cache=False),
        functorch_config.patch(enable_autograd_cache=False),
    ):
        for name, (make_torch, make_nk) in layers.items():
            for shape in shapes:
                torch.manual_seed(0)
                x = torch.randn(shape, device=dev, requires_grad=True)
                best: dict[str, float] = {}
                err: dict[str, float] = {}
                for way in ("torch.nn", "generated", "kernels"):
                    # (a reset between the ways: Dynamo would serve the second normkit model with the
                    # first one's graph, the same code and guards, whatever the limit says now)
                    torch._dynamo.reset()
                    m = (make_torch if way == "torch.nn" else make_nk)(shape[1]).to(dev)
                    old = dict(_inductor.LIMITS)
                    _inductor.LIMITS[dev.type] = 1 << 62 if way == "generated" else 0
                    try:
                        step, check = _step(m, x)
                        step()  # compile now, under this way's limit (forward and backward graphs)
                    finally:
                        _inductor.LIMITS.clear()
                        _inductor.LIMITS.update(old)
                    best[way] = 1e3 * min(_time_steps(step, args.min_time) for _ in range(args.repeats))
                    if way != "torch.nn":
                        err[way] = check()
                t, g, k = best["torch.nn"], best["generated"], best["kernels"]
                shp = "x".join(map(str, shape))
                print(
                    f"| {name} | {shp} | {t:.0f} | {g:.0f} | {k:.0f} | {g / k:.2f} | {min(g, k) / t:.2f} "
                    f"| {err['generated']:.1e} / {err['kernels']:.1e} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
