"""Forward hooks on a norm layer survive the tools that swap the layer (convert_norms, freeze_bn /
unfreeze_bn, convert_sync_batchnorm / revert_sync_batchnorm); fold_bn, which removes the layer, leaves
a hooked BN (or a BN after a hooked conv) unfolded and says why.

Regression: every swap dropped the hooks silently (a feature-extraction hook stopped firing, an
output-clamping hook stopped clamping: outputs off by 1.0-2.7).
"""

from __future__ import annotations

import torch
from torch import nn

import normkit
from normkit.surgery import freeze_bn, unfreeze_bn


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1), model[1].running_var.uniform_(0.5, 2)
    return model.eval()


def _hooked(model: nn.Sequential) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    model[1].register_forward_hook(lambda m, args, out: seen.append(out.detach()))
    model[1].register_forward_hook(lambda m, args, out: out.clamp(max=0.1))  # changes the output
    return seen


def _check(swapped: nn.Module, seen: list[torch.Tensor], want: torch.Tensor, x: torch.Tensor) -> None:
    seen.clear()
    with torch.no_grad():
        got = swapped.eval()(x)
    assert len(seen) == 1  # the feature hook ran on the new layer
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # the clamp still applies


def test_swapping_tools_keep_the_forward_hooks() -> None:
    x = torch.randn(2, 3, 5, 5)
    model = _model()
    seen = _hooked(model)
    with torch.no_grad():
        want = model(x)  # the oracle: torch.nn's own layer with both hooks
    assert len(seen) == 1

    converted, report = normkit.convert_norms(model, "bn")  # torch.nn -> normkit: the same layer
    assert type(converted[1]) is normkit.nn.BatchNorm2d
    assert "forward hook" in str(report.converted[0].dropped)
    _check(converted, seen, want, x)

    model2 = _model()
    seen2 = _hooked(model2)
    freeze_bn(model2)
    assert type(model2[1]).__name__ == "FrozenBatchNorm2d"
    _check(model2, seen2, want, x)
    unfreeze_bn(model2)
    assert type(model2[1]) is nn.BatchNorm2d
    _check(model2, seen2, want, x)

    model3 = _model()
    seen3 = _hooked(model3)
    synced = normkit.convert_sync_batchnorm(model3)
    assert type(synced[1]) is normkit.nn.SyncBatchNorm
    _check(synced, seen3, want, x)
    back = normkit.revert_sync_batchnorm(synced)
    _check(back, seen3, want, x)


def test_fold_bn_leaves_a_hooked_bn_or_a_bn_after_a_hooked_conv() -> None:
    x = torch.randn(2, 3, 5, 5)
    model = _model()
    _hooked(model)
    folded, diff, report = normkit.fold_bn(model, example_input=x)
    assert report.folded == [] and type(folded[1]) is nn.BatchNorm2d
    assert report.skipped == [("1", "it has forward hooks, which folding it away would drop")]
    assert diff == 0.0

    model = _model()
    model[0].register_forward_hook(lambda m, args, out: out.abs())
    folded, diff, report = normkit.fold_bn(model, example_input=x)
    assert report.folded == [] and diff == 0.0
    assert "'0' has forward hooks" in report.skipped[0][1]

    plain = _model()  # the oracle that folding still happens without hooks
    folded, diff, report = normkit.fold_bn(plain, example_input=x)
    assert [f[0] for f in report.folded] == ["1"] and diff < 1e-5
