"""Argument errors and edge inputs of the functional ops that the rest of the suite leaves out.

Found by measuring coverage. Each error is checked on both backends that run on a CPU (the fused
C++ checks of ``auto`` and the Python checks of ``reference``): the documented type and the words
that tell the user what to fix. Values are checked against ``torch.nn.functional`` or closed
forms computed here.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import normkit
from normkit import NormError
from normkit.functional.activations import activation_spec

F = normkit.functional
TF = torch.nn.functional
F64 = torch.float64
BACKENDS = ["auto", "reference"]


def _x() -> torch.Tensor:
    return torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0))


def _ones(*shape: int, **kw: Any) -> torch.Tensor:
    return torch.ones(*shape, **kw)


def _quantized() -> torch.Tensor:
    with warnings.catch_warnings():  # (torch deprecates quantized tensors; they still exist)
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(_x(), 0.1, 0, torch.quint8)


def _nested() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.nested.nested_tensor(
        [torch.randn(2, 3, generator=g), torch.randn(4, 3, generator=g)], layout=torch.jagged
    )


ERRORS: dict[str, tuple[Callable[[], Any], type[Exception], str]] = {
    "sparse-input": (
        lambda: F.batch_norm(_x().to_sparse(), training=True),
        TypeError,
        "expected a dense (torch.strided) input, got a torch.sparse_coo tensor; convert it with x.to_dense()",
    ),
    "nested-input": (
        lambda: F.batch_norm(_nested(), training=True),
        TypeError,
        "got a NestedTensor; convert it with x.to_padded_tensor(0.0) with a mask",
    ),
    "quantized-input": (
        lambda: F.batch_norm(_quantized(), training=True),
        TypeError,
        "got a quantized torch.quint8 tensor",
    ),
    "weight-a-list": (
        lambda: F.batch_norm(_x(), weight=[1.0, 1.0, 1.0], training=True),  # type: ignore[arg-type]
        TypeError,
        "weight must be a Tensor or None, got list",
    ),
    "weight-elsewhere": (
        lambda: F.batch_norm(_x(), weight=_ones(3, device="meta"), training=True),
        NormError,
        "weight is on meta but the input is on cpu",
    ),
    "mask-elsewhere": (
        lambda: F.batch_norm(_x(), training=True, mask=_ones(4, 3, 5, dtype=torch.bool, device="meta")),
        NormError,
        "mask is on meta but the input is on cpu",
    ),
    "nested-with-mask": (
        lambda: F.layer_norm(_nested(), 3, mask=_ones(2, 3, dtype=torch.bool)),
        NormError,
        "a NestedTensor has none, so pass mask=None",
    ),
    "layer-norm-empty-shape-masked": (
        lambda: F.layer_norm(_x(), (), mask=_ones(4, 3, 5, dtype=torch.bool)),
        NormError,
        "normalized_shape must name at least one trailing dim",
    ),
    "layer-norm-shape-masked": (
        lambda: F.layer_norm(_x(), (4,), mask=_ones(4, 3, 5, dtype=torch.bool)),
        NormError,
        "normalized_shape (4,) must match the trailing dims of the input, got input of shape (4, 3, 5)",
    ),
    "renorm-r_max-vector": (
        lambda: F.batch_renorm(_x(), torch.zeros(3), _ones(3), training=True, r_max=_ones(2)),
        NormError,
        "r_max must be a float or a 0-dim floating tensor, got a tensor of shape (2,)",
    ),
    "renorm-r_max-integer-tensor": (
        lambda: F.batch_renorm(_x(), torch.zeros(3), _ones(3), training=True, r_max=torch.tensor(3)),
        NormError,
        "dtype torch.int64",
    ),
    "renorm-r_max-inf": (
        lambda: F.batch_renorm(_x(), torch.zeros(3), _ones(3), training=True, r_max=float("inf")),
        NormError,
        "r_max must be a finite number >= 1.0, got inf",
    ),
    "renorm-r_max-below-1": (
        lambda: F.batch_renorm(_x(), torch.zeros(3), _ones(3), training=True, r_max=0.5),
        NormError,
        "r_max must be a finite number >= 1.0, got 0.5",
    ),
    "renorm-d_max-negative": (
        lambda: F.batch_renorm(_x(), torch.zeros(3), _ones(3), training=True, d_max=-1.0),
        NormError,
        "d_max must be a finite number >= 0.0, got -1.0",
    ),
    "ghost-momentum_mode": (
        lambda: F.ghost_batch_norm(
            _x(), torch.zeros(3), _ones(3), training=True, ghost_batch_size=2, momentum_mode="x"
        ),
        NormError,
        "momentum_mode must be 'per_chunk' or 'averaged', got 'x'",
    ),
    "ghost-mean-without-var": (
        lambda: F.ghost_batch_norm(_x(), torch.zeros(3), None, training=True, ghost_batch_size=2),
        NormError,
        "give both running_mean and running_var, or neither",
    ),
    "ghost-cumulative-without-counter": (
        lambda: F.ghost_batch_norm(
            _x(), torch.zeros(3), _ones(3), training=True, ghost_batch_size=2, momentum=None
        ),
        NormError,
        "momentum=None (cumulative average) needs num_batches_tracked",
    ),
    "instance-mean-without-var": (
        lambda: F.instance_norm(_x(), torch.zeros(3), None),
        NormError,
        "give both running_mean and running_var, or neither",
    ),
    "gn-proxy-missing-bias": (
        lambda: F.group_norm_proxy_act(_x(), 1, _ones(3), None, _ones(3), _ones(3)),  # type: ignore[arg-type]
        TypeError,
        "bias is required (a (C,) tensor), got None",
    ),
    "masked-dims-a-string": (
        lambda: F.masked_moments(_x(), None, "a"),  # type: ignore[arg-type]
        TypeError,
        "dims must be a tuple of ints, got str 'a'",
    ),
    "masked-weight-a-list": (
        lambda: F.masked_norm(_x(), None, (0, 2), [1.0], None, 1e-5),  # type: ignore[arg-type]
        TypeError,
        "weight must be a Tensor (a view that broadcasts to x) or None, got list",
    ),
    "masked-weight-elsewhere": (
        lambda: F.masked_norm(_x(), None, (0, 2), _ones(1, 3, 1, device="meta"), None, 1e-5),
        NormError,
        "weight is on meta but the input is on cpu",
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(ERRORS))
def test_documented_error_on_every_cpu_backend(case: str, backend: str) -> None:
    call, kind, words = ERRORS[case]
    with normkit.kernels.use(backend), pytest.raises(kind) as e:
        call()
    assert words in str(e.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_of_a_nested_tensor_normalizes_each_row(backend: str) -> None:
    nt = _nested()
    w = torch.tensor([1.5, 0.5, 2.0])
    b = torch.tensor([0.1, -0.2, 0.3])
    with normkit.kernels.use(backend):
        out = F.layer_norm(nt, 3, w, b, eps=1e-5)
    assert out.is_nested
    for got, row in zip(out.unbind(), nt.unbind()):
        r = row.to(F64)
        mu = r.mean(-1, keepdim=True)
        var = ((r - mu) ** 2).mean(-1, keepdim=True)
        want = (r - mu) / torch.sqrt(var + 1e-5) * w.to(F64) + b.to(F64)
        torch.testing.assert_close(got.to(F64), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_only_batch_norm_of_an_empty_batch_adds_the_bias_and_keeps_the_mean(backend: str) -> None:
    x = torch.zeros(0, 3, 2)
    rm, bias = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, -0.5, 0.25])
    with normkit.kernels.use(backend):
        out = F.mean_only_batch_norm(x, rm, bias, training=True, num_batches_tracked=torch.tensor(4))
        plain = F.mean_only_batch_norm(x, rm, None, training=True)
    assert out.output.shape == (0, 3, 2) and plain.output.shape == (0, 3, 2)
    torch.testing.assert_close(out.running_mean, torch.tensor([1.0, 2.0, 3.0]), rtol=0, atol=0)
    assert int(out.num_batches_tracked) == 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_norm_proxy_act_of_a_2d_input(backend: str) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 6, generator=g, dtype=F64)
    w, b = torch.rand(6, generator=g, dtype=F64) + 0.5, torch.randn(6, generator=g, dtype=F64)
    pb, pw = torch.randn(6, generator=g, dtype=F64) * 0.1, torch.randn(6, generator=g, dtype=F64) * 0.1
    with normkit.kernels.use(backend):
        got = F.group_norm_proxy_act(x, 2, w, b, pb, pw)
        # the same input with a unit spatial dim: the same group statistics
        spatial = F.group_norm_proxy_act(x[..., None], 2, w, b, pb, pw)[..., 0]
        composite = F.proxy_norm_act(TF.group_norm(x, 2, eps=1e-3), w, b, pb, pw)
    torch.testing.assert_close(got, spatial, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got, composite, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dims", [1, torch.tensor(1)], ids=["int", "int-tensor"])
def test_masked_moments_takes_a_single_dim(dims: Any) -> None:
    x = _x().to(F64)
    mean, var, count = F.masked_moments(x, None, dims)
    torch.testing.assert_close(mean, x.mean(1, keepdim=True), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, x.var(1, unbiased=False, keepdim=True), rtol=1e-12, atol=1e-12)
    assert bool((count == 3).all())


# --- activations --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("act", "spec"),
    [
        (None, ("identity", 0.01)),
        ("relu:3", None),  # an argument only leaky_relu takes
        ("elu", None),
        (nn.GELU(approximate="tanh"), ("gelu_tanh", 0.01)),
        (nn.GELU(), ("gelu", 0.01)),
        (nn.LeakyReLU(0.3), ("leaky_relu", 0.3)),
        (TF.leaky_relu, ("leaky_relu", 0.01)),
    ],
    ids=["none", "relu-with-arg", "unknown", "gelu-tanh-module", "gelu-module", "leaky-module", "leaky-fn"],
)
def test_activation_spec(act: Any, spec: tuple[str, float] | None) -> None:
    assert activation_spec(act) == spec


class _Unhashable:
    """A callable activation object that defines equality, so Python makes it unhashable."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Unhashable)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return torch.clamp(t, min=-0.5)


@pytest.mark.parametrize(
    "act",
    [TF.leaky_relu, functools.partial(TF.elu, alpha=0.5), _Unhashable()],
    ids=["leaky-relu-function", "partial-of-another-function", "unhashable-callable"],
)
def test_norm_act_inference_with_any_activation_callable(act: Any) -> None:
    layer = normkit.nn.BatchNormAct2d(3, activation=act).eval()
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
        layer.running_var.copy_(torch.tensor([1.5, 0.5, 2.0]))
        layer.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        layer.bias.copy_(torch.tensor([0.0, 0.1, -0.1]))
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    ref = nn.BatchNorm2d(3).eval()
    ref.load_state_dict(layer.state_dict())
    with torch.no_grad():
        want = act(ref(x))
        got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# --- normkit.functional.moments's dims: () and 0.7 / True / '1' were taken; now masked_moments's errors ---


@pytest.mark.parametrize("backend", BACKENDS)
def test_moments_with_empty_dims_raises_or_is_per_element(backend: str) -> None:
    x = _x().to(F64)
    with normkit.kernels.use(backend):
        try:
            m = F.moments(x, ())
        except (NormError, TypeError):
            return  # masked_moments's rule: "dims is empty"
    # otherwise the only consistent reading (functional.norm's): every value its own set
    assert m.count.shape == x.shape and bool((m.count == 1).all())
    torch.testing.assert_close(m.mean, x, rtol=0, atol=0)
    torch.testing.assert_close(m.var, torch.zeros_like(x), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [0.7, True, "1"], ids=["float", "bool", "str"])
def test_moments_rejects_a_dim_that_is_not_an_int(dim: Any, backend: str) -> None:
    with pytest.raises(TypeError, match="masked_moments: dims must be an int"):
        F.masked_moments(_x(), None, (dim,))  # the masked form's rule (passes today)
    with normkit.kernels.use(backend), pytest.raises(TypeError, match="dims must be an int"):
        F.moments(_x(), (dim,))
