"""Constructor arguments, eps=0 with batch statistics and error messages, against torch.nn (the oracle)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import normkit
from normkit import NormError
from normkit import nn as nkn

# (normkit class, torch.nn class, positional args as numpy / tensor scalars, the same as Python values)
LAYERS = [
    (nkn.BatchNorm1d, nn.BatchNorm1d, (np.int64(4),), (4,)),
    (
        nkn.BatchNorm2d,
        nn.BatchNorm2d,
        (np.int32(4), np.float32(1e-3), np.float64(0.2)),
        (4, float(np.float32(1e-3)), 0.2),
    ),
    (
        nkn.BatchNorm3d,
        nn.BatchNorm3d,
        (torch.tensor(4), torch.tensor(1e-3), torch.tensor(0.1)),
        (4, float(torch.tensor(1e-3)), float(torch.tensor(0.1))),
    ),
    (nkn.SyncBatchNorm, nn.SyncBatchNorm, (np.int64(4), np.float64(1e-4)), (4, 1e-4)),
    (nkn.InstanceNorm1d, nn.InstanceNorm1d, (np.int16(4),), (4,)),
    (
        nkn.InstanceNorm2d,
        nn.InstanceNorm2d,
        (np.int32(4), 1e-5, torch.tensor(0.3)),
        (4, 1e-5, float(torch.tensor(0.3))),
    ),
    (nkn.InstanceNorm3d, nn.InstanceNorm3d, (np.uint8(4),), (4,)),
    (
        nkn.GroupNorm,
        nn.GroupNorm,
        (np.int64(2), np.int64(4), np.float32(1e-3)),
        (2, 4, float(np.float32(1e-3))),
    ),
    (nkn.GroupNorm, nn.GroupNorm, (torch.tensor(2), torch.tensor(4)), (2, 4)),
    (nkn.LayerNorm, nn.LayerNorm, (np.int64(4),), (4,)),
    (nkn.LayerNorm, nn.LayerNorm, (np.array([3, 4]),), ((3, 4),)),
    (nkn.LayerNorm, nn.LayerNorm, (torch.tensor([3, 4]), np.float64(1e-6)), ([3, 4], 1e-6)),
    (nkn.LayerNorm, nn.LayerNorm, ((np.int64(3), 4),), ((3, 4),)),
]


def _python_types(m: nn.Module) -> dict[str, type]:
    names = ("num_features", "num_groups", "num_channels", "eps", "momentum")
    out = {k: type(getattr(m, k)) for k in names if hasattr(m, k)}
    if hasattr(m, "normalized_shape"):
        out["normalized_shape"] = tuple(type(s) for s in m.normalized_shape)  # type: ignore[assignment]
    return out


def _without_bias(text: str) -> str:
    return re.sub(r", bias=(True|False)", "", text)


@pytest.mark.parametrize(
    ("ours", "theirs", "args", "plain"), LAYERS, ids=lambda v: getattr(v, "__name__", None)
)
def test_numpy_and_tensor_scalars_are_taken_as_torch_nn_takes_them(ours, theirs, args, plain):
    m = ours(*args)
    ref = theirs(*plain)  # torch.nn given the same values as Python int / float
    # torch < 2.12 leaves ``bias=...`` out of the reprs; the values themselves must agree.
    assert _without_bias(repr(m)) == _without_bias(repr(ref))
    assert _python_types(m) == _python_types(ref)
    assert {k: v.shape for k, v in m.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }


def test_layer_norm_2d_and_the_rest_take_numpy_sizes():
    assert nkn.LayerNorm2d(np.int64(4), eps=np.float32(1e-6)).normalized_shape == (4,)
    assert type(nkn.LayerNorm2d(np.int64(4)).num_channels) is int
    assert type(nkn.FrozenBatchNorm2d(np.int64(4)).num_features) is int
    assert type(nkn.BatchNormAct2d(np.int64(4), momentum=torch.tensor(0.5)).momentum) is float


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: nkn.BatchNorm2d(True), TypeError, "num_features must be an int .* got True of type bool"),
        (lambda: nkn.BatchNorm2d(4.0), TypeError, "num_features must be an int .* got 4.0 of type float"),
        (lambda: nkn.BatchNorm2d(np.float64(4)), TypeError, "num_features must be an int"),
        (lambda: nkn.BatchNorm2d(0), NormError, "num_features must be a positive int, got 0"),
        (lambda: nkn.BatchNorm2d(np.int64(-1)), NormError, "num_features must be a positive int, got -1"),
        (
            lambda: nkn.BatchNorm2d(4, eps=float("nan")),
            NormError,
            "eps must be a finite number >= 0, got nan",
        ),
        (lambda: nkn.BatchNorm2d(4, eps=np.float32("nan")), NormError, "eps must be a finite number >= 0"),
        (
            lambda: nkn.BatchNorm2d(4, eps=True),
            TypeError,
            "eps must be a real number .* got True of type bool",
        ),
        (lambda: nkn.BatchNorm2d(4, eps=torch.tensor([1e-3, 1e-3])), TypeError, "eps must be a real number"),
        (lambda: nkn.BatchNorm2d(4, momentum=torch.tensor(1.5)), NormError, "momentum must be a number in"),
        (lambda: nkn.GroupNorm(True, 4), TypeError, "num_groups must be an int .* bool"),
        (lambda: nkn.GroupNorm(np.int64(3), 4), NormError, "must be divisible by num_groups"),
        (lambda: nkn.LayerNorm(4.0), TypeError, "normalized_shape must be an int .* got 4.0"),
        (lambda: nkn.LayerNorm([3.0]), TypeError, "each entry of normalized_shape must be an int"),
        (
            lambda: nkn.LayerNorm(np.array([[3, 4]])),
            TypeError,
            "each entry of normalized_shape must be an int",
        ),
    ],
)
def test_invalid_arguments_are_refused_naming_what_came(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_torch_nn_refuses_the_same_sizes():
    """The oracle for the refusals above that torch.nn makes itself (bool and float sizes)."""
    for make in (lambda: nn.BatchNorm2d(True), lambda: nn.BatchNorm2d(4.0), lambda: nn.LayerNorm([3.0])):
        with pytest.raises(TypeError):
            make()


# -- eps=0: torch.nn.functional.batch_norm refuses it with batch statistics; normkit computes it -----------
# (docs/differences.md: a set's statistics stay exact without eps; only a constant channel divides 0 by 0)


def _constant_channel() -> torch.Tensor:
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(5))
    x[:, 0] = 1.5
    return x


@pytest.mark.parametrize(
    "cls", [nkn.BatchNorm2d, nkn.BatchNormAct2d, nkn.GhostBatchNorm2d, nkn.BatchRenorm2d]
)
def test_eps_zero_with_batch_statistics_is_computed_where_torch_refuses(cls):
    """Training with ``eps=0`` on a non-constant batch: the batch normalized exactly (the closed form in
    float64, per channel), where torch.nn raises."""
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    extra = {"r_max": 1.0, "d_max": 0.0} if cls is nkn.BatchRenorm2d else {}  # (renorm off: BN's output)
    m = cls(3, eps=0.0, dtype=torch.float64, **extra).train()
    if cls is nkn.GhostBatchNorm2d:
        m.ghost_batch_size = 4  # (one ghost batch: the whole batch's statistics)
    y = m(x)
    mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
    want = (x - mean) / var.sqrt()
    torch.testing.assert_close(y, want.relu() if cls is nkn.BatchNormAct2d else want)
    with pytest.raises(ValueError, match="eps must be positive"):
        nn.BatchNorm2d(3, eps=0.0).train()(x.float())


def test_eps_zero_on_a_constant_channel_gives_nan_there_and_finite_running_statistics():
    """A constant channel with ``eps=0``: 0 / 0 in that channel's output (the others exact), and the
    running statistics the closed form's (momentum 0.1, unbiased variance: 0 for the constant one)."""
    x = _constant_channel()
    m = nkn.BatchNorm2d(3, eps=0.0).train()
    y = m(x)
    assert y[:, 0].isnan().all() and torch.isfinite(y[:, 1:]).all()
    torch.testing.assert_close(m.running_mean, 0.1 * x.mean((0, 2, 3)))
    torch.testing.assert_close(m.running_var, 0.9 + 0.1 * x.var((0, 2, 3), unbiased=True))


def test_eps_zero_in_eval_with_running_statistics_equals_torch():
    """Against the closed form, and torch.nn's layer where it takes eps=0 in eval (torch >= 2.12; 2.11
    refuses it there too)."""
    x = _constant_channel()
    m, ref = nkn.BatchNorm2d(3, eps=0.0).eval(), nn.BatchNorm2d(3, eps=0.0).eval()
    with torch.no_grad():
        for t in (m, ref):
            t.running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(0))
    y = m(x)
    torch.testing.assert_close(y, x / m.running_var.view(1, 3, 1, 1).sqrt())
    assert not y.isnan().any()
    try:
        want = ref(x)
    except ValueError as e:  # (torch < 2.12)
        assert "eps must be positive" in str(e)
    else:
        torch.testing.assert_close(y, want)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda: nkn.GroupNorm(3, 3, eps=0.0), lambda: nn.GroupNorm(3, 3, eps=0.0)),
        (lambda: nkn.InstanceNorm2d(3, eps=0.0), lambda: nn.InstanceNorm2d(3, eps=0.0)),
        (lambda: nkn.LayerNorm(2, eps=0.0), lambda: nn.LayerNorm(2, eps=0.0)),
    ],
)
def test_eps_zero_elsewhere_is_taken_as_torch_takes_it(ours, theirs):
    # (seeded: with eps=0, LayerNorm(2) of two close values divides by their small difference, and
    # float32 rounding then differs between implementations by more than the tolerance)
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours()(x), theirs()(x))


def test_instance_norm_eps_zero_keeps_finite_running_statistics():
    x = _constant_channel()
    m = nkn.InstanceNorm2d(3, eps=0.0, track_running_stats=True)
    ref = nn.InstanceNorm2d(3, eps=0.0, track_running_stats=True)
    m(x), ref(x)
    assert torch.isfinite(m.running_var).all() and torch.isfinite(m.running_mean).all()
    torch.testing.assert_close(m.running_var, ref.running_var)
    torch.testing.assert_close(m.running_mean, ref.running_mean)


# -- error messages ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: nkn.BatchNorm2d(4),
        lambda: nkn.InstanceNorm2d(4),
        lambda: nkn.GroupNorm(2, 4),
        lambda: nkn.LayerNorm2d(4),
        lambda: nkn.FrozenBatchNorm2d(4),
        lambda: nkn.LayerNorm(3),
    ],
)
def test_a_numpy_input_is_a_type_error_naming_torch_tensor(make):
    with pytest.raises(TypeError, match=r"expected a torch\.Tensor input, got (numpy\.)?ndarray"):
        make()(np.zeros((2, 4, 3, 3), np.float32))


def test_group_norm_channel_error_names_num_channels():
    with pytest.raises(NormError, match="built with num_channels=4") as info:
        nkn.GroupNorm(2, 4)(torch.randn(2, 6, 3))
    assert "num_features" not in str(info.value)
    with pytest.raises(NormError, match="built with num_features=4"):
        nkn.BatchNorm1d(4)(torch.randn(2, 6, 3))


def test_registry_group_count_given_twice_names_the_conflict():
    with pytest.raises(
        NormError, match=r"num_groups is given twice: 4 by the spec 'gn:4' and 2 by the keyword"
    ):
        normkit.create_norm_layer("gn:4", 8, num_groups=2)
    with pytest.raises(NormError, match="ghost_batch_size is given twice"):
        normkit.create_norm_layer("gbn:4", 8, ghost_batch_size=2)
    with pytest.raises(NormError, match="num_groups is given twice"):
        normkit.create_norm_layer("gn:4+pn", 8, num_groups=2)
    # given one way, the keyword counts
    assert normkit.create_norm_layer("gn", 8, num_groups=2).num_groups == 2
    assert normkit.create_norm_layer("gn:4", 8).num_groups == 4


# -- forward's argument name: torch.nn's layers take `input=` --------------------------------------------

KEYWORD_LAYERS = {
    "BatchNormAct2d": (lambda: nkn.BatchNormAct2d(3), (4, 3, 2, 2)),
    "BatchRenorm2d": (lambda: nkn.BatchRenorm2d(3), (4, 3, 2, 2)),
    "FrozenBatchNorm2d": (lambda: nkn.FrozenBatchNorm2d(3), (4, 3, 2, 2)),
    "GhostBatchNorm2d": (lambda: nkn.GhostBatchNorm2d(3, ghost_batch_size=2), (4, 3, 2, 2)),
    "MeanOnlyBatchNorm": (lambda: nkn.MeanOnlyBatchNorm(3), (4, 3, 2, 2)),
    "GroupNormAct2d": (lambda: nkn.GroupNormAct2d(4, num_groups=2), (2, 4, 3, 3)),
    "LayerNormAct2d": (lambda: nkn.LayerNormAct2d(4), (2, 4, 3, 3)),
    "SyncBatchNormAct": (lambda: nkn.SyncBatchNormAct(3), (4, 3, 2, 2)),
    "StdConv2d": (lambda: nkn.StdConv2d(3, 4, 3), (2, 3, 5, 5)),
    "ScaledStdConv2d": (lambda: nkn.ScaledStdConv2d(3, 4, 3), (2, 3, 5, 5)),
}


@pytest.mark.parametrize("name", KEYWORD_LAYERS)
def test_every_layer_takes_its_input_by_torch_nns_keyword(name):
    """``layer(input=t)`` works as for torch.nn's layers (these named it ``x``) and equals ``layer(t)``."""
    make, shape = KEYWORD_LAYERS[name]
    torch.manual_seed(0)
    m = make().eval()
    x = torch.randn(shape)
    torch.testing.assert_close(m(input=x), m(x))
