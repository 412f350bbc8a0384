"""convert_norms on a norm the model calls with ``mask=``: a spec whose layer takes the mask converts
(the converted model equals the layer built by hand, called with the mask); one whose layer does not
is refused with a NormError naming the layer and the argument (it converted, and the model then
failed at its first forward with a TypeError)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normkit
from normkit._errors import NormError


class _Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 1)
        self.bn = normkit.nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x), mask=mask))


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(2, 3, 10, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 1, 10, dtype=torch.bool)
    mask[1, :, 6:] = False
    return x, mask


@pytest.mark.parametrize("spec", ["ln2d", "frozen_bn", "gbn:2", "brn", "ln+pn"])
def test_a_spec_whose_layer_takes_no_mask_is_refused(spec: str) -> None:
    with pytest.raises(NormError, match=r"cannot convert 'bn' \(BatchNorm1d\) .* calls it with mask="):
        normkit.convert_norms(_Masked(), spec)


@pytest.mark.parametrize("spec, make", [("gn:2", lambda: normkit.nn.GroupNorm(2, 8)), ("bn", None)])
def test_a_spec_whose_layer_takes_the_mask_converts(spec: str, make) -> None:
    torch.manual_seed(0)
    model = _Masked()
    new, report = normkit.convert_norms(model, spec)
    x, mask = _inputs()
    layer = make() if make is not None else normkit.nn.BatchNorm1d(8)
    layer.load_state_dict(new.bn.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(new(x, mask), torch.relu(layer(model.conv(x), mask=mask)))
