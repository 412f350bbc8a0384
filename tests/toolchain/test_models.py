"""Whole models and the numerics promises of the README, on the registered-op core.

* ``torch.compile(model, fullgraph=True)`` of a small CNN with each of BN, GN, LN, LayerNorm2d, IN
  and LN+PN equals eager in training (output, every gradient, running statistics) and in eval.
* The README's promises, against the float64 oracle: a large common offset, |x| ~ 1e30, the fp32
  extremes ``[3e38, -3e38, 1, 2]``, a non-finite batch kept out of the running statistics.
* A mask of all True gives exactly what no mask gives, at every scale (one core for both).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normkit
import normkit.functional as F
from tests.reference import ref_batch_norm, ref_group_norm, ref_layer_norm
from tests.toolchain.samples import run

SPECS = ["bn", "gn:4", "ln", "ln2d", "in", "ln+pn"]


class CNN(nn.Module):
    def __init__(self, spec: str) -> None:
        super().__init__()

        def act() -> nn.Module:  # PN brings its own activation
            return nn.Identity() if spec.endswith("+pn") else nn.ReLU()

        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            normkit.create_norm_layer(spec, 8),
            act(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False),
            normkit.create_norm_layer(spec, 8),
            act(),
        )
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("spec", SPECS)
def test_compiled_cnn_equals_eager(spec: str, train: bool):
    torch.manual_seed(0)
    ref = CNN(spec).train(train)
    model = CNN(spec).train(train)
    model.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 8, 8)
    compiled = torch.compile(model, fullgraph=True)
    (y_ref, g_ref), (y, g) = run(ref, x), run(compiled, x, model)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    for (k, a), b in zip(g_ref.items(), g.values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_large_offset_readme_example():
    # fp32 1e4 + 1e-2 * noise: ulp(1e4) = 1e-3, so the data are there; torch's GN loses them.
    g = torch.Generator().manual_seed(0)
    x = 1e4 + 1e-2 * torch.randn(4, 8, 16, 16, generator=g)
    want = ref_group_norm(x.double(), 2, None, None, 1e-5)
    got = F.group_norm(x, 2)
    assert float((got.double() - want).abs().max()) < 1e-5
    torch_err = float((torch.nn.functional.group_norm(x, 2).double() - want).abs().max())
    assert torch_err > 1e-2  # the failure normkit exists to avoid (0.07 here)


@pytest.mark.parametrize(
    "op",
    [
        lambda x: F.group_norm(x, 1),
        lambda x: F.layer_norm(x, x.shape[1:]),
        lambda x: F.batch_norm(x.transpose(0, 1).contiguous(), training=True).output.transpose(0, 1),
    ],
    ids=["group_norm", "layer_norm", "batch_norm"],
)
def test_fp32_extremes_stay_finite_and_exact(op):
    x = torch.tensor([[[3e38, -3e38, 1.0, 2.0]]])
    y = op(x)
    assert bool(torch.isfinite(y).all())
    want = ref_layer_norm(x.double(), x.shape[1:], None, None, 1e-5)
    torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale", [1e-40, 1e-30, 1.0, 1e20, 1e30, 1e37])
def test_huge_and_tiny_inputs_match_the_reference(scale: float):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 6, 5, 5, generator=g, dtype=torch.float64) * scale).float()
    y = F.group_norm(x, 3, eps=0.0)
    assert bool(torch.isfinite(y).all())
    torch.testing.assert_close(
        y.double(), ref_group_norm(x.double(), 3, None, None, 0.0), rtol=1e-5, atol=1e-5
    )


def test_non_finite_batch_never_reaches_running_statistics():
    bn = normkit.nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    x[0, 1, 0, 0] = float("nan")
    bn(x)
    assert bool(torch.isfinite(bn.running_mean).all()) and bool(torch.isfinite(bn.running_var).all())
    assert int(bn.num_batches_tracked) == 0 and int(bn.num_skipped_updates) == 1


@pytest.mark.parametrize("scale", [1e-38, 1.0, 1e4, 1e20, 1e30])
@pytest.mark.parametrize(
    "op",
    [
        lambda x, m: F.group_norm(x, 2, mask=m),
        lambda x, m: F.layer_norm(x, x.shape[2:], mask=m),
        lambda x, m: F.batch_norm(x, training=True, mask=m).output,
        lambda x, m: F.instance_norm(x, mask=m).output,
    ],
    ids=["group_norm", "layer_norm", "batch_norm", "instance_norm"],
)
def test_all_true_mask_is_the_unmasked_op_at_every_scale(op, scale: float):
    g = torch.Generator().manual_seed(2)
    x = (
        (
            1.0
            + torch.randn(4, 6, 7, generator=g, dtype=torch.float64) * 1e-2 * (scale > 1e3)
            + torch.randn(4, 6, 7, generator=g, dtype=torch.float64) * (scale <= 1e3)
        )
        .mul(scale)
        .float()
    )
    mask = torch.ones(4, 1, 7, dtype=torch.bool)
    y, y_masked = op(x, None), op(x, mask)
    assert bool(torch.isfinite(y_masked).all())
    torch.testing.assert_close(y_masked, y, rtol=1e-5, atol=1e-5)
    assert float(y_masked.std()) == pytest.approx(float(y.std()), rel=1e-4)


def test_masked_and_unmasked_share_the_core_reference_at_1e20():
    # The bug this guards: the old masked path gave std 0.0 at |x| ~ 1e20 (unmasked 1.0).
    x = torch.randn(2, 4, 9) * 1e20
    y = F.group_norm(x, 1, mask=torch.ones(2, 1, 9, dtype=torch.bool))
    torch.testing.assert_close(
        y.double(), ref_group_norm(x.double(), 1, None, None, 1e-5), rtol=1e-5, atol=1e-5
    )


def test_running_statistics_follow_the_reference_after_compiled_steps():
    torch.manual_seed(3)
    bn = normkit.nn.BatchNorm2d(4, momentum=0.3)
    compiled = torch.compile(bn, fullgraph=True)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    for _ in range(3):
        x = torch.randn(5, 4, 3, 3)
        compiled(x)
        r = ref_batch_norm(x.double(), rm, rv, None, None, training=True, momentum=0.3, eps=1e-5)
        rm, rv = r.running_mean, r.running_var
    torch.testing.assert_close(bn.running_mean.double(), rm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), rv, rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == 3
