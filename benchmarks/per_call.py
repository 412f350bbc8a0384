"""Per-call cost of one layer (and one functional) call on a tiny input, normkit vs torch, in one process.

    python benchmarks/per_call.py

(2, 16, 8, 8) input, 2 threads, ``timeit`` best of 7; forward (with autograd recording) and forward +
``torch.autograd.grad``. The issue "Fast" asks for normkit within 1.5x of torch here, so that the
lab's batches of 2 are not dominated by Python.
"""

from __future__ import annotations

import timeit

import torch

import normkit.functional as nkf
import normkit.nn as nkn


class _PermutedLayerNorm(torch.nn.LayerNorm):
    """timm's LayerNorm2d: permute, LayerNorm over the last dim, permute back."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return super().forward(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _best_us(fn, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6


def main() -> None:
    torch.set_num_threads(2)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    dy = torch.randn(2, 16, 8, 8)
    pairs = [
        ("BatchNorm2d (train)", nkn.BatchNorm2d(16), torch.nn.BatchNorm2d(16)),
        ("BatchNorm2d (eval)", nkn.BatchNorm2d(16).eval(), torch.nn.BatchNorm2d(16).eval()),
        ("GroupNorm(4)", nkn.GroupNorm(4, 16), torch.nn.GroupNorm(4, 16)),
        # (no torch layer: against the BatchNorm it generalises, whose step it runs after its own statistics)
        ("BatchRenorm2d (vs BatchNorm2d, train)", nkn.BatchRenorm2d(16), torch.nn.BatchNorm2d(16)),
        ("LayerNorm(8) over the last dim", nkn.LayerNorm(8), torch.nn.LayerNorm(8)),
        (
            "InstanceNorm2d(affine)",
            nkn.InstanceNorm2d(16, affine=True),
            torch.nn.InstanceNorm2d(16, affine=True),
        ),
        ("LayerNorm2d (vs permute + LayerNorm)", nkn.LayerNorm2d(16), _PermutedLayerNorm(16)),
        (
            "GroupNormProxyAct2d(4) (vs GroupNorm + ReLU)",
            nkn.GroupNormProxyAct2d(16, num_groups=4),
            torch.nn.Sequential(torch.nn.GroupNorm(4, 16), torch.nn.ReLU()),
        ),
    ]
    w, b = torch.ones(16, requires_grad=True), torch.zeros(16, requires_grad=True)
    rm, rv = torch.randn(16), torch.rand(16) + 0.5
    tf = torch.nn.functional
    functional = [  # (name, normkit's call, torch's call), both on (x, w, b)
        (
            "F.batch_norm (train)",
            lambda: nkf.batch_norm(x, None, None, w, b, training=True).output,
            lambda: tf.batch_norm(x, None, None, w, b, training=True),
        ),
        (
            "F.batch_norm (eval)",
            lambda: nkf.batch_norm(x, rm, rv, w, b).output,
            lambda: tf.batch_norm(x, rm, rv, w, b),
        ),
        ("F.group_norm(4)", lambda: nkf.group_norm(x, 4, w, b), lambda: tf.group_norm(x, 4, w, b)),
        (
            "F.instance_norm",
            lambda: nkf.instance_norm(x, weight=w, bias=b).output,
            lambda: tf.instance_norm(x, weight=w, bias=b),
        ),
        (
            "F.layer_norm_2d (vs permute + F.layer_norm)",
            lambda: nkf.layer_norm_2d(x, w, b),
            lambda: tf.layer_norm(x.permute(0, 2, 3, 1), (16,), w, b).permute(0, 3, 1, 2),
        ),
        (
            "F.layer_norm over (C, H, W)",
            lambda: nkf.layer_norm(x, x.shape[1:]),
            lambda: tf.layer_norm(x, x.shape[1:]),
        ),
    ]
    print("| layer / function | forward us (normkit / torch) | ratio | forward + backward us | ratio |")
    print("|---|---:|---:|---:|---:|")
    for name, fo_call, ft_call in functional:
        ps = [x, w, b] if "layer_norm over" not in name else [x]
        fo, ft = _best_us(fo_call, 5000), _best_us(ft_call, 5000)
        go = _best_us(lambda f=fo_call, ps=ps: torch.autograd.grad(f(), ps, dy), 2000)
        gt = _best_us(lambda f=ft_call, ps=ps: torch.autograd.grad(f(), ps, dy), 2000)
        print(f"| {name} | {fo:.1f} / {ft:.1f} | {fo / ft:.2f} | {go:.1f} / {gt:.1f} | {go / gt:.2f} |")
    for name, ours, theirs in pairs:
        po, pt = [x, *ours.parameters()], [x, *theirs.parameters()]
        fo, ft = _best_us(lambda m=ours: m(x), 5000), _best_us(lambda m=theirs: m(x), 5000)
        go = _best_us(lambda m=ours, ps=po: torch.autograd.grad(m(x), ps, dy), 2000)
        gt = _best_us(lambda m=theirs, ps=pt: torch.autograd.grad(m(x), ps, dy), 2000)
        print(f"| {name} | {fo:.1f} / {ft:.1f} | {fo / ft:.2f} | {go:.1f} / {gt:.1f} | {go / gt:.2f} |")


if __name__ == "__main__":
    main()
