"""What each rank of the spawned world of ``test_sync_edge_cases.py`` runs (see ``_spawn.py``).

Paths that only a real process group reaches and the main suite's world leaves out: an
out-of-range ``src``, a model without normalization buffers, a mean-only layer, the functional
form's own argument errors, a batch empty on every process, a non-contiguous input, an input
that needs no gradient and an fx trace in training. Workers return plain tensors, numbers and
strings; the tests compare them with oracles computed in the parent process. (Also freeze_bn's
warning for a synchronised layer frozen with batch statistics.)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import normkit
from tests.distributed._workers import (
    _raised,
    build_sync_bn,
    count_collectives,
    global_grad,
    global_input,
    rank_slice,
)

F = normkit.functional

#: the cases the parent rebuilds for its oracles (global batches from a seed, as in ``_workers``)
NONCONTIG = dict(tail=(3, 4, 6), splits=[3, 2], seed=61)
NO_INPUT_GRAD = dict(tail=(3, 5), splits=[2, 4], seed=62)
FX = dict(tail=(3, 4, 4), splits=[2, 3], seed=63)
EMPTY = dict(tail=(3, 4), splits=[0, 0], seed=64)
FREEZE = dict(tail=(3, 4), splits=[3, 4], seed=65)
SPARSE_MASK = dict(tail=(3, 5), splits=[2, 3], seed=66)


def sparse_masks() -> dict[str, torch.Tensor]:
    """Global (N, 1, L) masks of ``SPARSE_MASK``: nothing valid, and one valid position (on rank 1)."""
    n, L = sum(SPARSE_MASK["splits"]), SPARSE_MASK["tail"][-1]
    none = torch.zeros(n, 1, L, dtype=torch.bool)
    one = none.clone()
    one[3, 0, 2] = True
    return {"none": none, "one": one}


def mean_only_state(rank: int) -> dict[str, Any]:
    """A MeanOnlyBatchNorm's running mean and counter on ``rank`` (rank 1: a NaN in channel 2)."""
    g = torch.Generator().manual_seed(700 + rank)
    mean = torch.randn(4, generator=g, dtype=torch.float64) * 2
    if rank == 1:
        mean[2] = float("nan")
    return {"running_mean": mean, "num_batches_tracked": 5 + 7 * rank}


def buffers_tasks(rank: int) -> dict[str, Any]:
    world = dist.get_world_size()
    out: dict[str, Any] = {}
    # a src outside the group: every process raises before any collective
    out["bad_src"] = _raised(
        lambda: normkit.sync_bn_buffers(nn.Sequential(nn.BatchNorm2d(2)), mode="broadcast", src=world)
    )
    # no normalization buffer anywhere: one size exchange, then nothing
    plain = nn.Sequential(nn.Linear(3, 2))
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with count_collectives() as counts:
        returned = normkit.sync_bn_buffers(plain)
    out["no_buffers_same_object"] = returned is plain
    out["no_buffers_unchanged"] = all(torch.equal(before[k], v) for k, v in plain.state_dict().items())
    out["no_buffers_collectives"] = dict(counts)
    # a layer with a running mean and no running variance (mean-only BN)
    layer = normkit.nn.MeanOnlyBatchNorm(4, dtype=torch.float64)
    state = mean_only_state(rank)
    with torch.no_grad():
        layer.running_mean.copy_(state["running_mean"])
        layer.num_batches_tracked.fill_(state["num_batches_tracked"])
    normkit.sync_bn_buffers(nn.Sequential(layer), mode="average")
    out["mean_only_mean"] = layer.running_mean.clone()
    out["mean_only_nbt"] = int(layer.num_batches_tracked)
    return out


def functional_errors(rank: int) -> dict[str, Any]:
    x = torch.randn(4, 4, 5, dtype=torch.float64)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    w = torch.ones(3, dtype=torch.float64)
    x3 = torch.randn(4, 3, 5, dtype=torch.float64)
    return {
        # the count comes from the weight (3), the input has 4 channels: every process raises
        "wrong_channels": _raised(lambda: F.sync_batch_norm(x, weight=w, training=True)),
        # on one process only: it names its own error, the other names it
        "wrong_channels_on_1": _raised(
            lambda: F.sync_batch_norm(x if rank == 1 else x3, weight=w, training=True)
        ),
        "mean_without_var": _raised(lambda: F.sync_batch_norm(x3, rm, None, training=True)),
        "var_without_mean": _raised(lambda: F.sync_batch_norm(x3, None, rv, training=True)),
        # the group still works afterwards
        "after": F.sync_batch_norm(x3, training=True).output.shape,
    }


def _module_step(case: dict[str, Any], x: torch.Tensor, dy: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    layer = build_sync_bn(case).train()
    y = layer(x)
    y.backward(dy)
    return layer, y


def empty_everywhere(rank: int) -> dict[str, Any]:
    """Every process has an empty batch: empty output, zero parameter grads, statistics unchanged."""
    case = EMPTY
    x = torch.zeros((0, *case["tail"]), dtype=torch.float64, requires_grad=True)
    layer, y = _module_step(case, x, torch.zeros_like(x))
    return {
        "y_shape": tuple(y.shape),
        "dx_shape": tuple(x.grad.shape),
        "dweight": layer.weight.grad,
        "dbias": layer.bias.grad,
        "running_mean": layer.running_mean.clone(),
        "running_var": layer.running_var.clone(),
        "num_batches_tracked": int(layer.num_batches_tracked),
    }


def non_contiguous(rank: int) -> dict[str, Any]:
    """A strided view as input (every other column): values and gradients as for a contiguous one."""
    case = NONCONTIG
    sl = rank_slice(case, rank)
    base = global_input(case)[sl].clone().requires_grad_(True)
    x = base[..., ::2]
    dy = global_grad(case)[sl][..., ::2]
    layer, y = _module_step(case, x, dy)
    return {
        "x_contiguous": x.is_contiguous(),
        "y": y.detach(),
        "dbase": base.grad,
        "running_mean": layer.running_mean.clone(),
        "running_var": layer.running_var.clone(),
    }


def input_without_grad(rank: int) -> dict[str, Any]:
    """Only the parameters need gradients: every process still joins the backward's all_reduce."""
    case = NO_INPUT_GRAD
    sl = rank_slice(case, rank)
    x = global_input(case)[sl]
    dy = global_grad(case)[sl]
    with count_collectives() as counts:
        layer, y = _module_step(case, x, dy)
    return {
        "y": y.detach(),
        "dweight": layer.weight.grad,
        "dbias": layer.bias.grad,
        "collectives": dict(counts),
    }


def fx_trace_in_training(rank: int) -> dict[str, Any]:
    """torch.fx.symbolic_trace of a model with a SyncBatchNorm in training, inside a world of 2."""
    case = FX
    sl = rank_slice(case, rank)
    model = nn.Sequential(build_sync_bn(case)).train()
    gm = torch.fx.symbolic_trace(model)
    nodes = [(n.op, str(n.target)) for n in gm.graph.nodes]
    x = global_input(case)[sl]
    y = gm(x)
    return {"nodes": nodes, "y": y.detach(), "running_mean": gm.get_submodule("0").running_mean.clone()}


def freeze_with_batch_statistics(rank: int) -> dict[str, Any]:
    """freeze_bn(use_running_stats=False) of a SyncBatchNorm in a world of 2: a frozen layer issues no
    collective, so it uses its own process's batch, and says so."""
    import warnings

    case = FREEZE
    model = nn.Sequential(build_sync_bn(case))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frozen = normkit.surgery.freeze_bn(model, use_running_stats=False)
    x = global_input(case)[rank_slice(case, rank)]
    with count_collectives() as counts:
        y = frozen(x)
    return {
        "warnings": [str(w.message) for w in caught],
        "kind": type(frozen[0]).__name__,
        "y": y.detach(),
        "collectives": dict(counts),
    }


def masked_with_few_values(rank: int) -> dict[str, Any]:
    """Masked SyncBatchNorm steps whose global valid count is 0, then 1, per channel."""
    case = SPARSE_MASK
    sl = rank_slice(case, rank)
    out: dict[str, Any] = {}
    for key, mask in sparse_masks().items():
        x = global_input(case)[sl].requires_grad_(True)
        layer = build_sync_bn(case).train()
        y = layer(x, mask[sl])
        y.backward(global_grad(case)[sl])
        out[key] = {
            "y": y.detach(),
            "dx": x.grad,
            "running_mean": layer.running_mean.clone(),
            "running_var": layer.running_var.clone(),
            "num_batches_tracked": int(layer.num_batches_tracked),
            "num_skipped_updates": int(layer.num_skipped_updates),
        }
    return out


NAN_CASE = dict(tail=(3, 4), splits=[3, 2], seed=67)


def nan_input(case: dict[str, Any]) -> torch.Tensor:
    """The global batch of ``NAN_CASE`` with one NaN, in channel 0 of a sample of rank 1."""
    x = global_input(case)
    x[4, 0, 1] = float("nan")
    return x


def nan_on_one_rank(rank: int) -> dict[str, Any]:
    """A NaN in one process's input: no process may write it into its running statistics."""
    case = NAN_CASE
    layer = build_sync_bn(case).train()
    y = layer(nan_input(case)[rank_slice(case, rank)])
    return {
        "y": y.detach(),
        "running_mean": layer.running_mean.clone(),
        "running_var": layer.running_var.clone(),
        "num_batches_tracked": int(layer.num_batches_tracked),
        "num_skipped_updates": int(layer.num_skipped_updates),
    }


TASKS = {
    "buffers": buffers_tasks,
    "functional_errors": functional_errors,
    "empty": empty_everywhere,
    "non_contiguous": non_contiguous,
    "input_without_grad": input_without_grad,
    "fx": fx_trace_in_training,
    "freeze": freeze_with_batch_statistics,
    "masked_few": masked_with_few_values,
    "nan": nan_on_one_rank,
}


def gap_suite(rank: int, world: int, payload: list[str]) -> dict[str, Any]:
    """Run every task named in ``payload`` in order on this rank; results by name."""
    return {name: TASKS[name](rank) for name in payload}


__all__ = [
    "EMPTY",
    "FREEZE",
    "FX",
    "NAN_CASE",
    "NONCONTIG",
    "NO_INPUT_GRAD",
    "SPARSE_MASK",
    "TASKS",
    "gap_suite",
    "mean_only_state",
    "nan_input",
    "sparse_masks",
]
