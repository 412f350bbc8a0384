"""Checkpoints: torch <-> normkit round trips, save/load, pickle/deepcopy, legacy dicts (TESTING.md 29, 30).

The oracle is torch.nn: the same checkpoint loaded into the torch layer, and torch's own keys,
dtypes and values.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections import OrderedDict

import pytest
import torch
from torch import nn

import normkit.nn as nkn
from tests.tolerances import Tol
from tests.torch_compat import needs_torch_bias, torch_kwargs

F64 = torch.float64
TOL: Tol = {"atol": 1e-5, "rtol": 1e-5}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(shape, seed=0, dtype=torch.float32):
    g = _gen(seed)
    return (1.0 + 2.0 * torch.randn(shape, generator=g, dtype=F64)).to(dtype)


def _randomize(module, seed=1):
    g = _gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    return module


# (ours factory, torch factory, input shape): every layer with a torch counterpart.
PAIRS = [
    pytest.param(lambda: nkn.BatchNorm1d(6), lambda: nn.BatchNorm1d(6), (8, 6), id="bn1d"),
    pytest.param(lambda: nkn.BatchNorm2d(6), lambda: nn.BatchNorm2d(6), (4, 6, 3, 3), id="bn2d"),
    pytest.param(lambda: nkn.BatchNorm3d(6), lambda: nn.BatchNorm3d(6), (2, 6, 2, 2, 2), id="bn3d"),
    pytest.param(
        lambda: nkn.BatchNorm2d(6, momentum=None, bias=False),
        lambda: nn.BatchNorm2d(6, momentum=None, bias=False),
        (4, 6, 3, 3),
        id="bn2d-cma-nobias",
        marks=needs_torch_bias,
    ),
    pytest.param(
        lambda: nkn.BatchNorm2d(6, affine=False, track_running_stats=False),
        lambda: nn.BatchNorm2d(6, affine=False, track_running_stats=False),
        (4, 6, 3, 3),
        id="bn2d-stateless",
    ),
    pytest.param(
        lambda: nkn.InstanceNorm2d(6, affine=True, track_running_stats=True),
        lambda: nn.InstanceNorm2d(6, affine=True, track_running_stats=True),
        (2, 6, 3, 3),
        id="in2d-tracked",
    ),
    pytest.param(
        lambda: nkn.InstanceNorm1d(6, affine=True),
        lambda: nn.InstanceNorm1d(6, affine=True),
        (2, 6, 5),
        id="in1d-affine",
    ),
    pytest.param(lambda: nkn.GroupNorm(3, 6), lambda: nn.GroupNorm(3, 6), (2, 6, 3, 3), id="gn"),
    pytest.param(lambda: nkn.LayerNorm((4, 5)), lambda: nn.LayerNorm((4, 5)), (3, 4, 5), id="ln-2dims"),
    pytest.param(
        lambda: nkn.LayerNorm(5, bias=False), lambda: nn.LayerNorm(5, bias=False), (3, 5), id="ln-nobias"
    ),
]


def _train(module, shape, steps=3, seed=0, dtype=torch.float32):
    module.train()
    for k in range(steps):
        module(_x(shape, seed=seed + k, dtype=dtype))
    return module


def _assert_same_state(sd, sd_ref):
    assert list(sd) == list(sd_ref)
    for k in sd_ref:
        assert sd[k].dtype == sd_ref[k].dtype, k
        assert sd[k].shape == sd_ref[k].shape, k
        assert torch.equal(sd[k], sd_ref[k]), k


@pytest.mark.parametrize("make_ours, make_torch, shape", PAIRS)
def test_torch_checkpoint_to_ours_and_back_to_torch(make_ours, make_torch, shape):
    ref = _train(_randomize(make_torch()), shape)
    ours = make_ours()
    ours.load_state_dict(ref.state_dict(), strict=True)
    back = make_torch()
    back.load_state_dict(ours.state_dict(), strict=True)
    _assert_same_state(ours.state_dict(), ref.state_dict())
    _assert_same_state(back.state_dict(), ref.state_dict())
    for training in (True, False):
        for m in (ours, ref):
            m.train(training)
        x = _x(shape, seed=20)
        torch.testing.assert_close(ours(x), ref(x), **TOL)


@pytest.mark.parametrize("make_ours, make_torch, shape", PAIRS)
def test_our_checkpoint_to_torch_and_back(make_ours, make_torch, shape):
    ours = _train(_randomize(make_ours()), shape)
    ref = make_torch()
    ref.load_state_dict(ours.state_dict(), strict=True)
    again = make_ours()
    again.load_state_dict(ref.state_dict(), strict=True)
    _assert_same_state(ref.state_dict(), ours.state_dict())
    _assert_same_state(again.state_dict(), ours.state_dict())
    # Keys and their order are torch's, from the start (fresh layers too).
    assert list(make_ours().state_dict()) == list(make_torch().state_dict())
    ours.eval()
    ref.eval()
    x = _x(shape, seed=21)
    torch.testing.assert_close(ours(x), ref(x), **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_save_to_disk_and_load(tmp_path, dtype):
    ours = _train(_randomize(nkn.BatchNorm2d(5, dtype=dtype)), (4, 5, 3, 3), steps=4, dtype=dtype)
    ours.eval()
    x = _x((4, 5, 3, 3), seed=9, dtype=dtype)
    y_eval = ours(x)
    path = tmp_path / "bn.pt"
    torch.save(ours.state_dict(), path)
    sd = torch.load(path, weights_only=True)
    assert sd["num_batches_tracked"].dtype == torch.long and sd["num_batches_tracked"].item() == 4
    assert sd["running_var"].dtype == dtype and sd["weight"].dtype == dtype

    loaded = nkn.BatchNorm2d(5, dtype=dtype)
    loaded.load_state_dict(sd, strict=True)
    _assert_same_state(loaded.state_dict(), ours.state_dict())
    ref = nn.BatchNorm2d(5, dtype=dtype)
    ref.load_state_dict(torch.load(path, weights_only=True), strict=True)
    loaded.eval()
    ref.eval()
    assert torch.equal(loaded(x), y_eval)
    torch.testing.assert_close(loaded(x), ref(x), **TOL)
    # Train mode: the same output and the same buffers afterwards.
    ours.train()
    loaded.train()
    ref.train()
    y = loaded(x)
    assert torch.equal(y, ours(x))
    torch.testing.assert_close(y, ref(x), **TOL)
    _assert_same_state(loaded.state_dict(), ours.state_dict())
    assert loaded.num_batches_tracked.item() == ref.num_batches_tracked.item() == 5


@pytest.mark.parametrize(
    "make",
    [
        lambda: nkn.BatchNorm2d(4),
        lambda: nkn.InstanceNorm2d(4, affine=True, track_running_stats=True),
        lambda: nkn.GroupNorm(2, 4),
        lambda: nkn.LayerNorm2d(4),
        lambda: nkn.LayerNorm2d(4, over="chw"),
        lambda: nkn.BatchRenorm2d(4, warmup_steps=2),
        lambda: nkn.GhostBatchNorm2d(4, ghost_batch_size=2),
        lambda: nkn.FrozenBatchNorm2d(4, use_running_stats=False, update_running_stats=True),
        lambda: nkn.BatchNormAct2d(4, activation="silu"),
    ],
)
@pytest.mark.parametrize("how", ["pickle", "deepcopy", "torch.save", "weights_only"])
def test_whole_module_pickle_and_deepcopy(make, how):
    m = _randomize(make())
    shape = (3, 4, 3, 3)
    _train(m, shape, steps=2)
    if hasattr(m, "num_skipped_updates"):
        bad = _x(shape, seed=5)
        bad[0, 0, 0, 0] = float("nan")
        m(bad)  # one skipped update, so the non-persistent counter is non-zero
        assert m.num_skipped_updates.item() == 1
    if how == "pickle":
        c = pickle.loads(pickle.dumps(m))
    elif how == "deepcopy":
        c = copy.deepcopy(m)
    else:
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        if how == "weights_only":  # torch's default: the layer's class allow-listed, nothing else
            with torch.serialization.safe_globals([type(m)]):
                c = torch.load(buf, weights_only=True)
        else:
            c = torch.load(buf, weights_only=False)
    assert type(c) is type(m) and repr(c) == repr(m)
    for (k, v), (k2, v2) in zip(m.named_buffers(), c.named_buffers()):
        assert k == k2 and v.dtype == v2.dtype and torch.equal(v, v2), k
    for (k, v), (k2, v2) in zip(m.named_parameters(), c.named_parameters()):
        assert k == k2 and torch.equal(v, v2) and v2.requires_grad, k
    x = _x(shape, seed=7)
    for training in (False, True):
        m.train(training)
        c.train(training)
        assert torch.equal(c(x), m(x))

    # The copy is independent of the original.
    def first(mod):
        return next(t for t in (*mod.parameters(), *mod.buffers()) if t.is_floating_point())

    with torch.no_grad():
        first(c).add_(1.0)
    assert not torch.equal(first(c), first(m))


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize(
    "kwargs", [{}, {"affine": False}, {"bias": False}], ids=["affine", "no-affine", "no-bias"]
)
def test_frozen_batch_norm_keys_come_in_torch_order(dim, kwargs):
    """FrozenBatchNorm keeps its affine in buffers, yet its state_dict lists the keys as torch's
    BatchNorm does (scripts that port a checkpoint by position depend on the order)."""
    frozen = getattr(nkn, f"FrozenBatchNorm{dim}d")(5, **kwargs)
    ref = getattr(nn, f"BatchNorm{dim}d")(5, **torch_kwargs(kwargs))
    assert list(frozen.state_dict()) == list(ref.state_dict())
    frozen.load_state_dict(_randomize(ref).state_dict(), strict=True)
    _assert_same_state(frozen.state_dict(), ref.state_dict())


# ---------------------------------------------------------------------------------------------
# Version-aware loading (30)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["version-1", "no-metadata"])
@pytest.mark.parametrize(
    "make_ours, make_torch",
    [
        (lambda: nkn.BatchNorm2d(4), lambda: nn.BatchNorm2d(4)),
        (
            lambda: nkn.InstanceNorm2d(4, track_running_stats=True),
            lambda: nn.InstanceNorm2d(4, track_running_stats=True),
        ),
    ],
)
def test_legacy_state_dict_without_num_batches_tracked_loads(make_ours, make_torch, style):
    ref = _train(_randomize(make_torch()), (3, 4, 3, 3))
    sd = ref.state_dict()
    del sd["num_batches_tracked"]
    if style == "version-1":
        sd._metadata[""] = {"version": 1}
    else:
        sd = OrderedDict((k, v) for k, v in sd.items())  # a plain mapping: no _metadata at all
        assert not hasattr(sd, "_metadata")
    ours = make_ours()
    with torch.no_grad():
        ours.num_batches_tracked.fill_(7)
    ours.load_state_dict(sd, strict=True)
    assert torch.equal(ours.running_mean, ref.running_mean)
    assert torch.equal(ours.running_var, ref.running_var)
    assert ours.num_batches_tracked.item() == 7  # kept, not reset (torch does the same)
    assert "num_batches_tracked" not in sd  # the caller's dict is not mutated
    # And torch accepts the very same legacy dict (the oracle for "it loads").
    make_torch().load_state_dict(sd, strict=True)


def test_non_strict_load_of_a_partial_dict_keeps_num_batches_tracked():
    bn = _train(nkn.BatchNorm2d(4), (3, 4, 3, 3), steps=3)
    rm = bn.running_mean.clone()
    w = torch.full((4,), 2.0)
    result = bn.load_state_dict({"weight": w}, strict=False)
    assert bn.num_batches_tracked.item() == 3
    assert torch.equal(bn.weight.detach(), w)
    assert torch.equal(bn.running_mean, rm)
    # The same missing keys as torch reports for the same call.
    expected = nn.BatchNorm2d(4).load_state_dict({"weight": w}, strict=False).missing_keys
    assert sorted(result.missing_keys) == sorted(expected)
    bn.load_state_dict({}, strict=False)
    assert bn.num_batches_tracked.item() == 3
    # A versioned partial dict behaves the same.
    sd = nn.BatchNorm2d(4).state_dict()
    partial = OrderedDict(weight=sd["weight"])
    partial._metadata = sd._metadata
    bn.load_state_dict(partial, strict=False)
    assert bn.num_batches_tracked.item() == 3


def test_running_stats_into_a_non_tracking_layer():
    sd = _train(nn.BatchNorm2d(4), (3, 4, 3, 3)).state_dict()
    layer = nkn.BatchNorm2d(4, track_running_stats=False)
    # torch.nn.Module.load_state_dict always calls _load_from_state_dict with strict=True and
    # applies strictness afterwards, so the targeted reason comes as a warning; a strict load
    # then fails on the unexpected keys, a non-strict one reports them, as torch does.
    with (
        pytest.warns(UserWarning, match="track_running_stats=False"),
        pytest.raises(RuntimeError, match="running_mean"),
    ):
        layer.load_state_dict(sd, strict=True)
    expected = nn.BatchNorm2d(4, track_running_stats=False).load_state_dict(sd, strict=False)
    with pytest.warns(UserWarning, match="track_running_stats=True to load them"):
        result = layer.load_state_dict(sd, strict=False)
    assert sorted(result.unexpected_keys) == sorted(expected.unexpected_keys)
    assert set(result.unexpected_keys) == {"running_mean", "running_var", "num_batches_tracked"}
    assert torch.equal(layer.weight.detach(), sd["weight"])
    assert layer.running_mean is None
    inn = nkn.InstanceNorm2d(4, affine=True)
    with pytest.warns(UserWarning, match="track_running_stats"), pytest.raises(RuntimeError):
        inn.load_state_dict(
            _train(nn.InstanceNorm2d(4, affine=True, track_running_stats=True), (2, 4, 3, 3)).state_dict(),
            strict=True,
        )


def test_missing_running_stats_fail_a_strict_load_like_torch():
    sd = nn.BatchNorm2d(4, track_running_stats=False).state_dict()
    with pytest.raises(RuntimeError) as ref_info:
        nn.BatchNorm2d(4).load_state_dict(sd, strict=True)
    with pytest.raises(RuntimeError) as info:
        nkn.BatchNorm2d(4).load_state_dict(sd, strict=True)
    for key in ("running_mean", "running_var"):
        assert key in str(ref_info.value) and key in str(info.value)


def test_wrong_shape_in_checkpoint_fails_like_torch():
    sd = nn.BatchNorm2d(8).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch"):
        nkn.BatchNorm2d(4).load_state_dict(sd)


def test_checkpoint_of_a_whole_torch_model_loads_into_the_converted_model():
    torch.manual_seed(0)
    ref = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.GroupNorm(4, 8),
        nn.Flatten(),
        nn.LayerNorm(8 * 2 * 2),
    )
    _train(ref, (4, 3, 6, 6))
    ours = copy.deepcopy(ref)
    ours[1], ours[4], ours[6] = nkn.BatchNorm2d(8), nkn.GroupNorm(4, 8), nkn.LayerNorm(8 * 2 * 2)
    ours.load_state_dict(ref.state_dict(), strict=True)
    _assert_same_state(ours.state_dict(), ref.state_dict())
    for training in (True, False):
        ours.train(training)
        ref.train(training)
        x = _x((4, 3, 6, 6), seed=30)
        torch.testing.assert_close(ours(x), ref(x), **TOL)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, **TOL)
