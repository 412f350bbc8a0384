"""Paths of SyncBatchNorm, sync_bn_buffers, convert and recalibrate_bn that the rest of the suite leaves out.

Found by measuring coverage in the spawned processes too. The world-2 cases run in one spawned
gloo world (``_edge_workers.py``); their oracle is ``tests.reference`` (float64 two-pass BN,
independent of normkit) on the concatenated batch, with autograd through it. The one-process
cases compare with closed forms computed here or with ``torch.nn``'s layers.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import normkit
from tests.distributed._edge_workers import (
    EMPTY,
    FREEZE,
    FX,
    NAN_CASE,
    NO_INPUT_GRAD,
    NONCONTIG,
    SPARSE_MASK,
    TASKS,
    gap_suite,
    mean_only_state,
    nan_input,
    sparse_masks,
)
from tests.distributed._spawn import run_world
from tests.distributed._workers import global_grad, global_input, init_state, rank_slice
from tests.reference import ref_batch_norm, ref_moments

F64 = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)


@pytest.fixture(scope="module")
def gaps() -> list[dict[str, Any]]:
    """Per-rank results of every task of ``_edge_workers`` (one world of 2)."""
    return run_world(gap_suite, 2, list(TASKS), timeout=120)


def _oracle(case: dict[str, Any], x: Tensor, dy: Tensor) -> dict[str, Tensor]:
    """float64 BN on the global batch ``x`` (training, momentum 0.1): output, dx, running statistics, and
    the per-rank parameter gradients (each process's own sums, as DDP expects)."""
    C = case["tail"][0]
    state = init_state(case, C)
    x = x.clone().requires_grad_(True)
    ref = ref_batch_norm(
        x, state["running_mean"], state["running_var"], state["weight"], state["bias"], training=True
    )
    ref.output.backward(dy)
    dims = (0, *range(2, x.dim()))
    mu, var = ref_moments(x.detach(), dims)
    x_hat = (x.detach() - mu) / torch.sqrt(var + 1e-5)
    dweight, dbias = [], []
    for r in range(len(case["splits"])):
        sl = rank_slice(case, r)
        dweight.append((dy[sl] * x_hat[sl]).sum(dims))
        dbias.append(dy[sl].sum(dims))
    return {
        "y": ref.output.detach(),
        "dx": x.grad,
        "running_mean": ref.running_mean,
        "running_var": ref.running_var,
        "dweight": dweight,
        "dbias": dbias,
    }


# --- sync_bn_buffers ----------------------------------------------------------------------------------


def test_buffers_src_outside_the_group_raises_on_every_process(gaps: list[dict[str, Any]]) -> None:
    for r in gaps:
        assert r["buffers"]["bad_src"]["type"] == "NormError"
        assert "src=2 is not a rank of the 2-process group" in r["buffers"]["bad_src"]["message"]


def test_buffers_model_without_statistics_is_returned_unchanged(gaps: list[dict[str, Any]]) -> None:
    for r in gaps:
        b = r["buffers"]
        assert b["no_buffers_same_object"] and b["no_buffers_unchanged"]
        assert b["no_buffers_collectives"] == {"all_gather": 1}  # the size check only


def test_buffers_mean_only_layer_averages_its_finite_means(gaps: list[dict[str, Any]]) -> None:
    states = [mean_only_state(r) for r in range(2)]
    means = torch.stack([s["running_mean"] for s in states])
    want = torch.empty(4, dtype=F64)
    for c in range(4):
        finite = means[:, c][torch.isfinite(means[:, c])]
        want[c] = finite.mean()
    for r in gaps:
        torch.testing.assert_close(r["buffers"]["mean_only_mean"], want, **TOL)
        assert r["buffers"]["mean_only_nbt"] == max(s["num_batches_tracked"] for s in states)


# --- functional sync_batch_norm: argument errors in a real group ---------------------------------------


def test_functional_input_channels_that_differ_from_the_weight_raise_on_every_process(
    gaps: list[dict[str, Any]],
) -> None:
    for r in gaps:
        e = r["functional_errors"]["wrong_channels"]
        assert e["type"] == "NormError"
        assert "expected 3 channels (dim 1), got input of shape (4, 4, 5)" in e["message"]
    own, other = gaps[1]["functional_errors"]["wrong_channels_on_1"], gaps[0]["functional_errors"]
    assert own["type"] == "NormError" and "expected 3 channels" in own["message"]
    assert other["wrong_channels_on_1"]["type"] == "NormError"
    assert (
        "process(es) [1] of the 2-process group got an invalid input"
        in other["wrong_channels_on_1"]["message"]
    )


@pytest.mark.parametrize("key", ["mean_without_var", "var_without_mean"])
def test_functional_one_running_statistic_without_the_other_raises(
    gaps: list[dict[str, Any]], key: str
) -> None:
    for r in gaps:
        e = r["functional_errors"][key]
        assert e["type"] == "NormError"
        assert "give both running_mean and running_var, or neither" in e["message"]
        assert r["functional_errors"]["after"] == torch.Size([4, 3, 5])


# --- SyncBatchNorm in training: inputs the main suite does not give -----------------------------------


def test_a_batch_empty_on_every_process_changes_nothing(gaps: list[dict[str, Any]]) -> None:
    state = init_state(EMPTY, EMPTY["tail"][0])
    for r in gaps:
        e = r["empty"]
        assert e["y_shape"] == (0, 3, 4) and e["dx_shape"] == (0, 3, 4)
        torch.testing.assert_close(e["dweight"], torch.zeros(3, dtype=F64))
        torch.testing.assert_close(e["dbias"], torch.zeros(3, dtype=F64))
        torch.testing.assert_close(e["running_mean"], state["running_mean"], rtol=0, atol=0)
        torch.testing.assert_close(e["running_var"], state["running_var"], rtol=0, atol=0)
        assert e["num_batches_tracked"] == 0  # (single-process BN keeps it too on an empty batch)


def test_a_strided_input_is_normalized_and_differentiated_as_a_contiguous_one(
    gaps: list[dict[str, Any]],
) -> None:
    case = NONCONTIG
    x, dy = global_input(case)[..., ::2], global_grad(case)[..., ::2]
    want = _oracle(case, x, dy)
    for rank, r in enumerate(gaps):
        got = r["non_contiguous"]
        assert not got["x_contiguous"]
        sl = rank_slice(case, rank)
        torch.testing.assert_close(got["y"], want["y"][sl], **TOL)
        dbase = got["dbase"]
        torch.testing.assert_close(dbase[..., ::2], want["dx"][sl], **TOL)
        assert torch.count_nonzero(dbase[..., 1::2]) == 0  # the columns the view skips get no gradient
        torch.testing.assert_close(got["running_mean"], want["running_mean"], **TOL)
        torch.testing.assert_close(got["running_var"], want["running_var"], **TOL)


def test_an_input_without_grad_still_gives_each_process_its_parameter_gradients(
    gaps: list[dict[str, Any]],
) -> None:
    case = NO_INPUT_GRAD
    want = _oracle(case, global_input(case), global_grad(case))
    for rank, r in enumerate(gaps):
        got = r["input_without_grad"]
        torch.testing.assert_close(got["y"], want["y"][rank_slice(case, rank)], **TOL)
        torch.testing.assert_close(got["dweight"], want["dweight"][rank], **TOL)
        torch.testing.assert_close(got["dbias"], want["dbias"][rank], **TOL)
        # the channel-count check, the statistics, and the backward's sums (joined although dx is not needed)
        assert got["collectives"] == {"all_gather": 2, "all_reduce": 1}


def test_fx_trace_in_training_keeps_the_layer_as_one_synchronised_call(gaps: list[dict[str, Any]]) -> None:
    case = FX
    x = global_input(case)
    want = _oracle(case, x, torch.zeros_like(x))
    for rank, r in enumerate(gaps):
        got = r["fx"]
        assert [op for op, _ in got["nodes"]] == ["placeholder", "call_module", "output"]
        assert got["nodes"][1][1] == "0"
        torch.testing.assert_close(got["y"], want["y"][rank_slice(case, rank)], **TOL)
        torch.testing.assert_close(got["running_mean"], want["running_mean"], **TOL)


def test_freeze_bn_with_batch_statistics_in_a_group_warns_and_uses_each_process_batch(
    gaps: list[dict[str, Any]],
) -> None:
    case = FREEZE
    state = init_state(case, case["tail"][0])
    x = global_input(case)
    for rank, r in enumerate(gaps):
        got = r["freeze"]
        assert any(
            "each of the 1 frozen SyncBatchNorm layer(s) uses the statistics of its own process's batch" in w
            for w in got["warnings"]
        ), got["warnings"]
        assert got["collectives"] == {}
        own = x[rank_slice(case, rank)]
        want = ref_batch_norm(own, None, None, state["weight"], state["bias"], training=True).output
        torch.testing.assert_close(got["y"], want, **TOL)


@pytest.mark.parametrize("key", ["none", "one"])
def test_masked_steps_with_fewer_than_two_valid_values_match_one_process(
    gaps: list[dict[str, Any]], key: str
) -> None:
    """The oracle: single-process masked BN (normkit's, itself checked against the float64 reference
    elsewhere) on the concatenated batch; with under 2 values nothing is stored and the output is the bias."""
    case = SPARSE_MASK
    C = case["tail"][0]
    state = init_state(case, C)
    mask = sparse_masks()[key]
    x = global_input(case).requires_grad_(True)
    ref = normkit.functional.batch_norm(
        x,
        state["running_mean"],
        state["running_var"],
        state["weight"],
        state["bias"],
        training=True,
        num_batches_tracked=torch.tensor(0),
        mask=mask,
    )
    ref.output.backward(global_grad(case))
    bias = state["bias"].view(1, C, 1).expand_as(ref.output)
    torch.testing.assert_close(ref.output.detach(), bias, **TOL)  # (the single-process rule itself)
    for rank, r in enumerate(gaps):
        got, sl = r["masked_few"][key], rank_slice(case, rank)
        torch.testing.assert_close(got["y"], ref.output.detach()[sl], **TOL)
        torch.testing.assert_close(got["dx"], x.grad[sl], **TOL)
        torch.testing.assert_close(got["running_mean"], state["running_mean"], rtol=0, atol=0)
        torch.testing.assert_close(got["running_var"], state["running_var"], rtol=0, atol=0)
        assert got["num_batches_tracked"] == int(ref.num_batches_tracked)
    # the skip counter as a single-process layer keeps it (a step with no valid pair of values is skipped)
    single = normkit.nn.BatchNorm1d(C).double().train()
    single(global_input(case), mask)
    for r in gaps:
        assert r["masked_few"][key]["num_skipped_updates"] == int(single.num_skipped_updates) == 1


def test_a_nan_on_one_process_is_never_written_into_any_running_statistics(
    gaps: list[dict[str, Any]],
) -> None:
    """Oracle: the float64 reference on the concatenated batch (channel 0 NaN, the others finite) and its
    rule that a non-finite batch leaves every buffer and the counter unchanged; a single-process layer's
    skip counter."""
    case = NAN_CASE
    C = case["tail"][0]
    state = init_state(case, C)
    x = nan_input(case)
    ref = ref_batch_norm(
        x,
        state["running_mean"],
        state["running_var"],
        state["weight"],
        state["bias"],
        training=True,
        num_batches_tracked=torch.tensor(0),
    )
    single = normkit.nn.BatchNorm1d(C).double().train()
    single(x)
    for rank, r in enumerate(gaps):
        got, sl = r["nan"], rank_slice(case, rank)
        assert bool(got["y"][:, 0].isnan().all())
        torch.testing.assert_close(got["y"][:, 1:], ref.output[sl][:, 1:], **TOL)
        torch.testing.assert_close(got["running_mean"], state["running_mean"], rtol=0, atol=0)
        torch.testing.assert_close(got["running_var"], state["running_var"], rtol=0, atol=0)
        assert got["num_batches_tracked"] == int(ref.num_batches_tracked) == 0
        assert got["num_skipped_updates"] == int(single.num_skipped_updates) == 1


# --- one process: SyncBatchNormAct, convert_sync_batchnorm, recalibrate_bn ------------------------------


def test_sync_batch_norm_act_repr_and_fx_trace() -> None:
    layer = normkit.nn.SyncBatchNormAct(3, activation="relu")
    assert "activation=relu" in repr(layer).lower()
    gm = torch.fx.symbolic_trace(nn.Sequential(layer))
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "output"]
    x = torch.randn(4, 3, 2, 2)
    ref = torch.relu(nn.functional.batch_norm(x, None, None, training=True))
    torch.testing.assert_close(gm(x), ref, rtol=1e-5, atol=1e-5)


def test_convert_a_layer_without_weight_or_statistics_keeps_the_default_dtype() -> None:
    bn = nn.BatchNorm2d(3, affine=False, track_running_stats=False)
    sync = normkit.convert_sync_batchnorm(bn)
    assert isinstance(sync, normkit.nn.SyncBatchNorm)
    assert sync.weight is None and sync.running_mean is None
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(sync(x), bn(x), rtol=1e-5, atol=1e-5)
    back = normkit.revert_sync_batchnorm(sync)
    assert type(back) is nn.BatchNorm2d
    torch.testing.assert_close(back(x), bn(x), rtol=1e-5, atol=1e-5)


def test_convert_keeps_a_quantization_config_and_skips_empty_child_slots() -> None:
    net = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    net.register_module("unused", None)
    marker = object()
    net[1].qconfig = marker  # type: ignore[assignment]
    out = normkit.convert_sync_batchnorm(net)
    assert out is net and isinstance(net[1], normkit.nn.SyncBatchNorm)
    assert net[1].qconfig is marker and net.unused is None


def test_convert_without_a_group_keeps_the_group_an_existing_layer_has() -> None:
    group = object()
    layer = normkit.nn.SyncBatchNorm(3, process_group=group)
    net = normkit.convert_sync_batchnorm(nn.Sequential(layer))
    assert net[0] is layer and layer.process_group is group
    other = object()
    normkit.convert_sync_batchnorm(net, process_group=other)
    assert layer.process_group is other


def _data(n: int, seed: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 4, generator=g, dtype=F64) * 2 + 1 for b in (5, 3, 6)][:n]


def test_recalibrate_a_generator_loader_and_an_empty_batch() -> None:
    data = _data(3, 0)
    want = torch.cat(data)
    bn = nn.BatchNorm1d(3).double()
    # a generator has no len (no progress total); an empty batch adds no value
    loader = (b for b in [data[0], torch.zeros(0, 3, 4, dtype=F64), *data[1:]])
    normkit.recalibrate_bn(nn.Sequential(bn), loader, progress=False)
    torch.testing.assert_close(bn.running_mean, want.mean((0, 2)), **TOL)
    torch.testing.assert_close(bn.running_var, want.var((0, 2)), **TOL)


def test_recalibrate_leaves_layers_without_running_statistics_and_models_without_bn_alone() -> None:
    data = _data(2, 1)
    untracked = nn.BatchNorm1d(3, track_running_stats=False).double()
    tracked = nn.BatchNorm1d(3).double()
    net = nn.Sequential(untracked, tracked)
    normkit.recalibrate_bn(net, data, progress=False)
    assert untracked.running_mean is None
    # the tracked layer sees the untracked one's output: batch-normalized values, per batch
    seen = torch.cat([nn.functional.batch_norm(b, None, None, training=True) for b in data])
    torch.testing.assert_close(tracked.running_mean, seen.mean((0, 2)), **TOL)
    torch.testing.assert_close(tracked.running_var, seen.var((0, 2)), **TOL)
    calls = []
    plain = nn.Sequential(nn.Linear(4, 2).double())
    plain.register_forward_hook(lambda m, a, o: calls.append(a[0].shape))
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert normkit.recalibrate_bn(plain, data, progress=False) is plain
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())
    assert len(calls) == len(data)


@pytest.mark.parametrize(
    ("make", "x"),
    [
        (lambda: nn.BatchNorm1d(3), torch.randn(5, 4)),  # channels: torch's own error
        (lambda: normkit.nn.BatchNorm1d(3), torch.ones(5, 3, dtype=torch.long)),  # not floating point
        (lambda: normkit.nn.BatchNormalization(3), torch.randn(5, 4)),  # features along the axis
        (lambda: normkit.nn.BatchNormalization(3, axis=5), torch.randn(5, 3)),  # axis out of range
    ],
    ids=["torch-channels", "integer", "keras-features", "keras-axis"],
)
def test_recalibrate_inputs_the_layer_rejects_raise_the_layers_own_error(make: Any, x: Tensor) -> None:
    with pytest.raises(Exception) as direct:
        make().train()(x)
    with pytest.raises(type(direct.value)) as got:
        normkit.recalibrate_bn(nn.Sequential(make()), [x], progress=False)
    assert str(got.value) == str(direct.value)


def test_recalibrate_torch_layer_without_skip_counter_warns_on_a_nan_batch() -> None:
    data = _data(3, 2)
    bad = data[1].clone()
    bad[0, 1, 0] = float("nan")
    bn = nn.BatchNorm1d(3).double()
    with pytest.warns(UserWarning, match="1 of 3 input batch"):
        normkit.recalibrate_bn(nn.Sequential(bn), [data[0], bad, data[2]], progress=False)
    good = torch.cat([data[0], data[2]])
    every = torch.cat([data[0], bad, data[2]])
    # channel 1: the NaN batch left out; channel 0: all three
    torch.testing.assert_close(bn.running_mean[1], good[:, 1].mean(), **TOL)
    torch.testing.assert_close(bn.running_mean[0], every[:, 0].mean(), **TOL)
    assert not hasattr(bn, "num_skipped_updates")
