"""Host (Python) time per call of normkit's GPU path, measured without a GPU.

On a GPU a small norm's time is mostly the host's: argument checks, dispatch, the plan, the Triton
launches. This script runs normkit's Triton path on CPU tensors (``kernels.use("triton")`` under
``TRITON_INTERPRET=1``) with every kernel launch replaced by a no-op, so what it times is exactly
the host work around the kernels, next to torch.nn.functional's whole CPU call on the same small
input for scale. Ratios between runs of this script are the useful numbers (the machine drifts).

    python benchmarks/host_overhead.py [gn bn bnr ln2d ln pn step ...]
"""

from __future__ import annotations

import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: CPU tensors are accepted

import torch
import torch.nn.functional as TF

import normkit.functional as NF
import normkit.kernels.triton as nkt
from normkit import kernels


class _NoLaunch:
    """Stands in for the kernels module: ``kernel[grid](...)`` does nothing (and is counted)."""

    launches = 0

    def __getattr__(self, name: str):
        return self

    def __getitem__(self, grid):
        _NoLaunch.launches += 1
        return lambda *a, **k: None


def _best_us(fn, n: int = 300) -> float:
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e6


def main(names: list[str]) -> None:
    nkt._kern = lambda: _NoLaunch()  # the Triton path's host work only
    x = torch.randn(2, 64, 8, 8)
    w1, b1 = torch.rand(64) + 0.5, torch.randn(64)
    xg, wg1, bg1 = (t.clone().requires_grad_() for t in (x, w1, b1))
    dy = torch.randn_like(x)
    z = torch.zeros(64)
    rm, rv = torch.zeros(64), torch.ones(64)
    cases = {
        "gn": (lambda x, w, b: NF.group_norm(x, 32, w, b), lambda x, w, b: TF.group_norm(x, 32, w, b)),
        "bn": (
            lambda x, w, b: NF.batch_norm(x, None, None, w, b, training=True).output,
            lambda x, w, b: TF.batch_norm(x, None, None, w, b, True),
        ),
        "bnr": (  # with running statistics (the functional returns updated copies; a layer, in place)
            lambda x, w, b: NF.batch_norm(x, rm, rv, w, b, training=True).output,
            lambda x, w, b: TF.batch_norm(x, rm.clone(), rv.clone(), w, b, True),
        ),
        "ln2d": (
            lambda x, w, b: NF.layer_norm_2d(x, w, b),
            lambda x, w, b: TF.layer_norm(x.permute(0, 2, 3, 1), (64,), w, b).permute(0, 3, 1, 2),
        ),
        "ln": (  # LayerNorm over (C, H, W), the case auto keeps on the Triton kernels for few samples
            lambda x, w, b: NF.layer_norm(x, x.shape[1:], w, b),
            lambda x, w, b: TF.layer_norm(x, x.shape[1:], w, b),
        ),
        "pn": (
            lambda x, w, b: NF.group_norm_proxy_act(x, 32, w, b, z, z, eps=1e-5),
            lambda x, w, b: torch.relu(TF.group_norm(x, 32, w, b)),
        ),
        "step": (  # Proxy Norm's step alone (after a LayerNorm): its statistics and the activation
            lambda x, w, b: NF.proxy_norm_act(x, w, b, z, z),
            lambda x, w, b: torch.relu(torch.addcmul(b[:, None, None], x, w[:, None, None])),
        ),
    }
    print(
        f"{'call':6s} {'fwd us':>8s} {'torch cpu':>10s} {'fwd+bwd us':>11s} {'torch cpu':>10s} "
        f"{'launches fwd / fwd+bwd':>23s}"
    )
    w3, b3 = torch.rand(64, 8, 8) + 0.5, torch.randn(64, 8, 8)  # (LayerNorm's (C, H, W) affine)
    wg3, bg3 = (t.clone().requires_grad_() for t in (w3, b3))
    for name in names or list(cases):
        params = (w3, b3, wg3, bg3) if name == "ln" else (w1, b1, wg1, bg1)
        print(f"{name:6s} " + _row(*cases[name], x, xg, dy, *params))


def _row(ours, ref, x, xg, dy, w, b, wg, bg) -> str:  # type: ignore[no-untyped-def]
    with kernels.use("triton"):
        f = _best_us(lambda: ours(x, w, b))
        fb = _best_us(lambda: torch.autograd.grad(ours(xg, wg, bg), (xg, wg, bg), dy), 200)
        _NoLaunch.launches = 0
        ours(x, w, b)
        lf = _NoLaunch.launches
        torch.autograd.grad(ours(xg, wg, bg), (xg, wg, bg), dy)
        lfb = _NoLaunch.launches - lf
    nf = _best_us(lambda: ref(x, w, b))
    nfb = _best_us(lambda: torch.autograd.grad(ref(xg, wg, bg), (xg, wg, bg), dy), 200)
    # (the launches of this small shape's path: one program per set; a GPU splits few sets into chunks)
    return f"{f:8.1f} {nf:10.1f} {fb:11.1f} {nfb:10.1f} {lf:>11d} / {lfb:<11d}"


if __name__ == "__main__":
    main(sys.argv[1:])
