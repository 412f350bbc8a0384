"""Norms a forward calls as functions (``F.batch_norm(x, ...)``) are reported as left by convert_norms and
fold_bn (they said "1 converted, 0 skipped" / "1 folded, 0 left" while the model still normalized
with a BN they never saw)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import normkit


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 1)
        self.register_buffer("rm", torch.zeros(8))
        self.register_buffer("rv", torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.c1(x)))
        return F.group_norm(F.batch_norm(self.c2(h), self.rm, self.rv, training=False), 2)


def test_functional_norms_are_reported_as_left() -> None:
    model = _Mixed().eval()
    new, report = normkit.convert_norms(model, "gn:4")
    assert [c.name for c in report.converted] == ["bn1"]
    assert [(s[0], s[1]) for s in report.skipped] == [
        ("batch_norm", "F.batch_norm"),
        ("group_norm", "F.group_norm"),
    ]
    assert "not a module" in report.skipped[0][2]

    x = torch.randn(2, 3, 4, 4)
    folded, diff, freport = normkit.fold_bn(model, example_input=x)
    assert [f[0] for f in freport.folded] == ["bn1"] and diff < 1e-5
    assert freport.skipped == [
        (
            "batch_norm",
            "F.batch_norm: a function the forward calls, not a module; make it a BN module to fold it",
        )
    ]
