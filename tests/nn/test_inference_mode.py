"""Every layer runs under ``torch.inference_mode()``, in training and in eval, built outside or inside it,
and gives what it gives under ``torch.no_grad()`` (Batch Renorm's checkpoint cache and Proxy Norm's
quadrature-point cache read the version counter, which inference tensors do not have: they raised
"Inference tensors do not track version counter")."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.toolchain.samples import SAMPLES


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.name)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_inference_mode_equals_no_grad(sample, train: bool) -> None:
    layer = sample.module(train)
    twin = copy.deepcopy(layer)
    x = sample.input()
    with torch.no_grad():
        want = twin(x)
    with torch.inference_mode():
        got = layer(x)
        inner = sample.input()  # an inference tensor
        again = copy.deepcopy(twin)(inner)  # (the layer's state after one step, as the twin's)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert again.shape == want.shape and torch.isfinite(again).all()
    for (name, b), (_, b2) in zip(layer.named_buffers(), twin.named_buffers()):
        torch.testing.assert_close(b, b2, rtol=0, atol=0, msg=name)  # the same running statistics


@pytest.mark.parametrize("spec", ["ln+pn", "gn:4+pn", "brn"])
def test_a_layer_built_inside_inference_mode_runs(spec: str) -> None:
    import normkit

    x = torch.randn(4, 8, 5, 5)
    with torch.no_grad():
        want = normkit.create_norm_layer(spec, 8).eval()(x)
    with torch.inference_mode():
        got = normkit.create_norm_layer(spec, 8).eval()(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
