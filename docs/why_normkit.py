"""Measure the README's "why normkit" rows that compare normkit with torch.nn on this machine.

    python docs/why_normkit.py          # a Markdown table, in a few seconds on a CPU

Every number is computed here, on fixed seeds, against torch.nn (or torch.nn.functional) on the
same input; the oracle for precision is the same computation in float64. The speed rows of the
README come from ``normkit bench`` (docs/PERFORMANCE.md), not from this script.
"""

from __future__ import annotations

import torch
from torch import nn

import normkit
import normkit.functional as NF


def offset_precision() -> tuple[float, float]:
    """GroupNorm(8) of float32 ``1e4 + 1e-2 * noise``: largest error against float64, torch vs normkit."""
    g = torch.Generator().manual_seed(0)
    x = 1e4 + 1e-2 * torch.randn(4, 32, 16, 16, generator=g)
    want = nn.functional.group_norm(x.double(), 8, eps=1e-5)
    ours = NF.group_norm(x, 8, eps=1e-5).double()
    theirs = nn.functional.group_norm(x, 8, eps=1e-5).double()
    return (theirs - want).abs().max().item(), (ours - want).abs().max().item()


def nan_batch() -> tuple[str, str]:
    """One training batch with a NaN, then: are the running statistics still finite?"""
    out = []
    for cls in (nn.BatchNorm2d, normkit.nn.BatchNorm2d):
        bn = cls(8)
        x = torch.randn(4, 8, 5, 5, generator=torch.Generator().manual_seed(1))
        x[0, 3, 0, 0] = float("nan")
        bn(x)
        finite = bool(torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all())
        skipped = getattr(bn, "num_skipped_updates", None)
        note = f", {int(skipped)} update skipped" if skipped is not None else ""
        out.append(("finite" if finite else "NaN in running_mean") + note)
    return out[0], out[1]


def checkpoint_round_trip() -> float:
    """A torch.nn BN checkpoint loaded strictly into normkit's layer: largest output difference."""
    ref = nn.BatchNorm2d(16)
    with torch.no_grad():
        ref.running_mean.uniform_(-1, 1)
        ref.running_var.uniform_(0.5, 2)
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    ours = normkit.nn.BatchNorm2d(16)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(8, 16, 7, 7, generator=torch.Generator().manual_seed(2))
    worst = 0.0
    for training in (False, True):
        ref.train(training)
        ours.train(training)
        with torch.no_grad():
            worst = max(worst, (ours(x) - ref(x)).abs().max().item())
    return worst


def wrong_channels() -> tuple[str, str]:
    out = []
    for cls in (nn.BatchNorm2d, normkit.nn.BatchNorm2d):
        try:
            cls(3)(torch.randn(2, 4, 5, 5))
        except Exception as err:
            out.append(f"{type(err).__name__}: {str(err).splitlines()[0][:70]}")
    return out[0], out[1]


def main() -> None:
    torch_err, our_err = offset_precision()
    torch_nan, our_nan = nan_batch()
    torch_msg, our_msg = wrong_channels()
    rows = [
        (
            "GroupNorm(8) of fp32 `1e4 + 1e-2 * noise`: largest error vs float64",
            f"{torch_err:.2g}",
            f"{our_err:.2g}",
        ),
        ("BN running statistics after one batch with a NaN", torch_nan, our_nan),
        ("BatchNorm2d(3) on a 4-channel input", torch_msg, our_msg),
        (
            "torch.nn BN checkpoint, strict load, largest output difference (train, eval)",
            "-",
            f"{checkpoint_round_trip():.1g}",
        ),
    ]
    print(f"torch {torch.__version__}, normkit {normkit.__version__}, backend {normkit.kernels.current()}\n")
    print("| measured | torch.nn | normkit |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
