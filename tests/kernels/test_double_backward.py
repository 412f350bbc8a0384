"""Double backward (``create_graph=True``: gradient penalties, R1 / WGAN-GP, meta-learning) through every
sample layer when only some of the tensors require a gradient: a frozen network, one frozen
parameter, an input that needs none. The fused kernels' nodes differentiate a recomputation there,
which once asked ``torch.autograd.grad`` for a frozen parameter's gradient and failed
("element 1 of the input tensors does not require grad"). Oracle: the same in the reference backend
(plain differentiable PyTorch ops), float64.
"""

from __future__ import annotations

import pytest
import torch

import normkit
import normkit.nn as nkn
from normkit.kernels import _fast
from tests.toolchain.samples import SAMPLES, Sample

# the fused GroupNorm + proxy-normalized activation kernels (ReLU and leaky ReLU; the samples' "gn:2+pn"
# uses SiLU, which they do not fuse)
FUSED = [
    Sample("GroupNormProxyAct2d-relu", lambda: nkn.GroupNormProxyAct2d(6, num_groups=2), (4, 6, 5, 5)),
    Sample(
        "GroupNormProxyAct2d-leaky",
        lambda: nkn.GroupNormProxyAct2d(6, num_groups=3, activation="leaky_relu"),
        (2, 6, 4, 4),
        channels_last=True,
    ),
]

# which tensors require a gradient: the input and/or the parameters (none, all, or all but the first)
CASES = ["frozen-net", "one-frozen-param", "input-needs-none"]


def _second_order(m: torch.nn.Module, x: torch.Tensor, case: str) -> list[torch.Tensor]:
    params = list(m.parameters())
    if case == "frozen-net":
        m.requires_grad_(False)
        wrt = [x.requires_grad_()]
    elif case == "one-frozen-param":
        params[0].requires_grad_(False)
        wrt = [x.requires_grad_(), *params[1:]]
    else:
        wrt = params
    y = m(x)
    grads = torch.autograd.grad((y * y.detach().cos()).sum(), wrt, create_graph=True)
    penalty = sum((g**2).sum() for g in grads)
    assert isinstance(penalty, torch.Tensor)
    if not penalty.requires_grad:  # first-order grads constant in wrt (MeanOnlyBatchNorm's dx = dy - mean)
        return [torch.zeros_like(t) for t in wrt]
    return list(torch.autograd.grad(penalty, wrt, allow_unused=True, materialize_grads=True))


def _cases() -> list:
    out = []
    for sample in SAMPLES + FUSED:
        n = len(list(sample.build().parameters()))
        for case in CASES:
            if n >= {"frozen-net": 0, "one-frozen-param": 2, "input-needs-none": 1}[case]:
                out.append(pytest.param(sample, case, id=f"{sample.name}-{case}"))
    return out


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("sample", "case"), _cases())
def test_double_backward_with_frozen_tensors_equals_the_reference(sample: Sample, case: str, train: bool):
    m = sample.module(train, torch.float64)
    x = sample.input(torch.float64)
    got = _second_order(m, x.clone(), case)
    with normkit.kernels.use("reference"):
        want = _second_order(sample.module(train, torch.float64), x.clone(), case)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-9, msg=lambda s, i=i: f"tensor {i}: {s}")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(
    "sample", [*FUSED, next(s for s in SAMPLES if s.name == "ln+pn")], ids=lambda s: s.name
)
def test_double_backward_with_frozen_tensors_on_the_python_kernel_nodes(
    sample: Sample, case: str, monkeypatch
):
    """The same where the C++ autograd module is not there (the kernels' Python autograd.Functions)."""
    x = sample.input(torch.float64)
    with normkit.kernels.use("reference"):
        want = _second_order(sample.module(True, torch.float64), x.clone(), case)
    monkeypatch.setattr(_fast, "_node", lambda: None)
    got = _second_order(sample.module(True, torch.float64), x.clone(), case)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-9, msg=lambda s, i=i: f"tensor {i}: {s}")
