"""fold_bn / convert_norms on a torch.compile'd model work on the eager module inside it, as on the eager
model, with a warning that the result is not compiled (they folded 1 of 10 BNs, saying each was "not
directly after a conv", and fused no activation)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normkit


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
    )
    with torch.no_grad():
        for m in (net[1], net[4]):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    return net.eval()


def test_fold_bn_and_convert_norms_see_through_torch_compile() -> None:
    x = torch.randn(2, 3, 6, 6)
    eager, compiled = _net(), torch.compile(_net())  # (never called: nothing is compiled)
    _, _, want = normkit.fold_bn(eager, example_input=x)
    with pytest.warns(UserWarning, match="torch.compile'd module; fold_bn works on the eager module"):
        folded, diff, report = normkit.fold_bn(compiled, example_input=x)
    assert [f[:2] for f in report.folded] == [f[:2] for f in want.folded] == [("1", "0"), ("4", "3")]
    assert isinstance(folded, nn.Sequential) and diff < 1e-5
    with torch.no_grad():
        torch.testing.assert_close(folded(x), eager(x), atol=1e-5, rtol=1e-5)

    with pytest.warns(UserWarning, match="convert_norms works on the eager module"):
        new, report = normkit.convert_norms(compiled, "ln+pn")
    assert report.fused == normkit.convert_norms(eager, "ln+pn").report.fused == [("1", "relu (2)")]
    assert [type(m).__name__ for m in new] == [
        "Conv2d",
        "GroupNormProxyAct2d",
        "Identity",
        "Conv2d",
        "LayerNorm2d",
    ]
