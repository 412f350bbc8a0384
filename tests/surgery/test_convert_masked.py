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


class _Positive(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return nn.functional.softplus(w)


def test_a_norm_with_a_parametrized_weight_is_left_with_the_reason() -> None:
    """convert_norms copied the parametrization's computed weight into a plain layer (the constraint
    and the state_dict key ``parametrizations.weight.original`` gone, the report saying "kept weight");
    freeze_bn called the layer "a subclass ... (it may have its own forward)". Both now leave it and
    say that it is parametrized."""
    from torch.nn.utils import parametrize

    from normkit.surgery import freeze_bn

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    parametrize.register_parametrization(model[1], "weight", _Positive())
    new, report = normkit.convert_norms(model, "gn:2")
    assert report.converted == [] and parametrize.is_parametrized(new[1])
    assert report.skipped[0][0] == "1" and "its weight is parametrized" in report.skipped[0][2]
    assert list(new.state_dict()) == list(model.state_dict())
    with pytest.warns(UserWarning, match="its weight is parametrized"):
        freeze_bn(model)
    assert parametrize.is_parametrized(model[1])
