"""normkit's layers under ``torch.func`` next to the torch.nn layers they replace, in one process.

    python benchmarks/func_transforms.py            # the table in docs/PERFORMANCE.md §7
    python benchmarks/func_transforms.py --quick     # one small shape, fewer repeats
    python benchmarks/func_transforms.py --layers Proxy   # only the layers whose names contain "Proxy"
    python benchmarks/func_transforms.py --functions # also normkit without its normkit_func ops
    python benchmarks/func_transforms.py --ensembles # model ensembling: vmap over stacked parameters

Each model is two norms with a tanh between them (so the second norm's input depends on the first's
parameters), run on torch.nn's layer and on normkit's, interleaved, ``timeit`` best of the repeats:

* ``grad``: ``torch.func.grad`` of a loss w.r.t. the parameters (``functional_call``);
* ``per-sample``: ``vmap(grad(loss), in_dims=(None, 0))``, the per-sample gradients of DP-SGD;
* ``vmap``: the forward, vmapped over the samples (each a batch of one);
* ``jvp``: ``torch.func.jvp`` w.r.t. the input.

With ``--ensembles`` the columns are torch.func's model ensembling instead (four members'
parameters stacked by ``torch.func.stack_module_state``, one input shared by every member):

* ``ensemble``: the members' forward, ``vmap(functional_call, in_dims=(0, 0, None))``;
* ``ensemble grad``: each member's parameter gradients, ``vmap(grad(loss), in_dims=(0, 0, None))``.

Ratios are normkit / torch (below 1: normkit is faster). The machine is noisy: compare within a run.
"""

from __future__ import annotations

import argparse
import copy
import timeit
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, stack_module_state, vmap

import normkit.nn as nkn
from normkit.ops import library

# name -> (torch.nn's layer, normkit's) for C channels
PAIRS: dict[str, tuple[Callable[[int, int], nn.Module], Callable[[int, int], nn.Module]]] = {
    "GroupNorm(8)": (lambda c, w: nn.GroupNorm(8, c), lambda c, w: nkn.GroupNorm(8, c)),
    "InstanceNorm2d(affine)": (
        lambda c, w: nn.InstanceNorm2d(c, affine=True),
        lambda c, w: nkn.InstanceNorm2d(c, affine=True),
    ),
    "LayerNorm(W) (last dim)": (lambda c, w: nn.LayerNorm(w), lambda c, w: nkn.LayerNorm(w)),
    "LayerNorm2d(chw) vs GroupNorm(1)": (
        lambda c, w: nn.GroupNorm(1, c),
        lambda c, w: nkn.LayerNorm2d(c, over="chw"),
    ),
    "BatchNorm2d (eval)": (lambda c, w: nn.BatchNorm2d(c).eval(), lambda c, w: nkn.BatchNorm2d(c).eval()),
    "GroupNormProxyAct2d(8) vs GroupNorm(8) + ReLU": (
        lambda c, w: nn.Sequential(nn.GroupNorm(8, c), nn.ReLU()),
        lambda c, w: nkn.GroupNormProxyAct2d(c, num_groups=8),
    ),
}


def _best_ms(fns: list[Callable[[], object]], number: int, repeat: int) -> list[float]:
    """Each function's best time per call (ms), the repeats interleaved."""
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], timeit.timeit(fn, number=number) / number * 1e3)
    return best


def _cases(model: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {**p, **buffers}, (xi,)).square().mean()

    per_sample = vmap(grad(lambda p, xi: loss(p, xi.unsqueeze(0))), in_dims=(None, 0))
    forward = vmap(lambda xi: functional_call(model, {**params, **buffers}, (xi.unsqueeze(0),)))
    tangent = torch.randn_like(x)
    return {
        "grad": lambda: grad(loss)(params, x),
        "per-sample": lambda: per_sample(params, x),
        "vmap": lambda: forward(x),
        "jvp": lambda: jvp(lambda t: functional_call(model, {**params, **buffers}, (t,)), (x,), (tangent,)),
    }


def _ensemble_cases(members: list[nn.Module], x: torch.Tensor) -> dict[str, Callable[[], object]]:
    params, buffers = stack_module_state(members)  # pyright: ignore[reportArgumentType]
    base = copy.deepcopy(members[0]).to("meta")

    def forward(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(base, (p, b), (xi,))

    def loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return forward(p, b, xi).square().mean()

    fwd = vmap(forward, in_dims=(0, 0, None))
    grads = vmap(grad(loss), in_dims=(0, 0, None))
    return {"ensemble": lambda: fwd(params, buffers, x), "ensemble grad": lambda: grads(params, buffers, x)}


def _without_the_ops(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with normkit's ``normkit_func`` ops switched off: the Python autograd.Functions run."""

    def run() -> object:
        saved = library._func_ops_ready
        library._func_ops_ready = lambda: False
        try:
            return fn()
        finally:
            library._func_ops_ready = saved

    return run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one small shape, fewer repeats")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", default="", help="only the layers whose names contain this text")
    ap.add_argument(
        "--functions",
        action="store_true",
        help="a third provider: normkit with its normkit_func ops switched off (the Python "
        "autograd.Functions, which run without the C++ module)",
    )
    ap.add_argument(
        "--ensembles",
        action="store_true",
        help="model ensembling (vmap over four members' stacked parameters) instead of the four transforms",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [(4, 64, 16, 16)] if args.quick else [(4, 64, 16, 16), (64, 32, 16, 16), (16, 64, 32, 32)]
    repeat = 3 if args.quick else 7
    print(f"torch {torch.__version__}, {args.threads} threads; ms, best of {repeat}; ratio = normkit / torch")
    print()
    who = "torch / normkit / Functions" if args.functions else "torch / normkit"
    ratios = "ratio | Functions' ratio" if args.functions else "ratio"
    kinds = ("ensemble", "ensemble grad") if args.ensembles else ("grad", "per-sample", "vmap", "jvp")
    print("| layer | shape | " + " | ".join(f"{k} ms ({who}) | {ratios}" for k in kinds) + " |")
    print("|---|---|" + ("---:|---:|---:|" if args.functions else "---:|---:|") * len(kinds))
    for shape in shapes:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        number = max(2, int(8e6 // x.numel()))
        for name, (make_torch, make_ours) in PAIRS.items():
            if args.layers not in name:
                continue
            makes = (make_torch, make_ours, *((make_ours,) if args.functions else ()))
            cases = []
            for make in makes:
                torch.manual_seed(0)
                nets = [
                    nn.Sequential(make(shape[1], shape[-1]), nn.Tanh(), make(shape[1], shape[-1]))
                    for _ in range(4 if args.ensembles else 1)
                ]
                cases.append(_ensemble_cases(nets, x) if args.ensembles else _cases(nets[0], x))
            if args.functions:
                cases[2] = {k: _without_the_ops(fn) for k, fn in cases[2].items()}
            cells = []
            for kind in cases[0]:
                fns = [c[kind] for c in cases]
                for fn in fns:
                    fn()  # warm up
                times = _best_ms(fns, number, repeat)
                ratio = " | ".join(f"{t / times[0]:.2f}" for t in times[1:])
                cells.append(" / ".join(f"{t:.2f}" for t in times) + " | " + ratio)
            print(f"| {name} | {tuple(shape)} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
