"""What each rank of a spawned world runs (see ``_spawn.py``); the tests compare the results with oracles.

Every input is rebuilt on each rank from a seed (the global batch, then this rank's slice), so
the parent process can rebuild the same global batch for its single-process oracle. Workers
return plain tensors, numbers and strings; they assert nothing themselves.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import normkit
from normkit import NormError

COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_reduce",
    "broadcast",
    "reduce",
    "reduce_scatter",
    "all_to_all",
    "gather",
    "scatter",
    "barrier",
)


@contextmanager
def count_collectives() -> Iterator[Counter[str]]:
    """Count the torch.distributed collectives called inside the block (by name), calling through."""
    counts: Counter[str] = Counter()
    saved = {name: getattr(dist, name) for name in COLLECTIVES}

    def wrap(name: str, fn: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return fn(*args, **kwargs)

        return counted

    for name, fn in saved.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


# --- inputs every rank and the parent rebuild identically ----------------------------------------


def global_input(case: dict[str, Any]) -> Tensor:
    """The global batch of a case (float64 master copy; cast by the caller)."""
    g = torch.Generator().manual_seed(case["seed"])
    n = sum(case["splits"])
    x = torch.randn((n, *case["tail"]), generator=g, dtype=torch.float64)
    return x * case.get("scale", 1.5) + case.get("offset", 0.3)


def global_grad(case: dict[str, Any]) -> Tensor:
    g = torch.Generator().manual_seed(case["seed"] + 1000)
    return torch.randn((sum(case["splits"]), *case["tail"]), generator=g, dtype=torch.float64)


def global_mask(case: dict[str, Any]) -> Tensor | None:
    if not case.get("mask"):
        return None
    g = torch.Generator().manual_seed(case["seed"] + 2000)
    n = sum(case["splits"])
    L = case["tail"][-1]
    return torch.rand((n, 1, L), generator=g) < 0.6  # (N, 1, L): padded sequences


def init_state(case: dict[str, Any], C: int) -> dict[str, Tensor]:
    """Non-trivial affine parameters and running statistics, the same on every rank."""
    g = torch.Generator().manual_seed(case["seed"] + 3000)

    def r():
        return torch.rand(C, generator=g, dtype=torch.float64)

    return {
        "weight": 1.0 + 0.5 * (r() - 0.5),
        "bias": 0.3 * (r() - 0.5),
        "running_mean": 0.2 * r(),
        "running_var": 0.5 + r(),
    }


def rank_slice(case: dict[str, Any], rank: int) -> slice:
    splits = case["splits"]
    start = sum(splits[:rank])
    return slice(start, start + splits[rank])


def build_sync_bn(case: dict[str, Any], group: Any = None) -> nn.Module:
    C = case["tail"][0]
    dtype = case.get("dtype", torch.float64)
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32  # half inputs keep fp32 parameters and buffers (as under autocast)
    affine = case.get("affine", True)
    layer = normkit.nn.SyncBatchNorm(
        C,
        eps=case.get("eps", 1e-5),
        momentum=case.get("momentum", 0.1),
        affine=affine,
        track_running_stats=case.get("track", True),
        process_group=group,
        unbiased_running_var=case.get("unbiased", True),
        dtype=dtype,
    )
    state = init_state(case, C)
    with torch.no_grad():
        for k, v in state.items():
            t = getattr(layer, k)
            if t is not None:
                t.copy_(v)
    if case.get("nbt") is not None and layer.num_batches_tracked is not None:
        layer.num_batches_tracked.fill_(case["nbt"])
    return layer


# --- tasks -----------------------------------------------------------------------------------------


def sync_bn_case(rank: int, case: dict[str, Any], group: Any = None) -> dict[str, Any]:
    """One SyncBN training step (forward, backward) on this rank's slice; outputs, grads, buffers,
    collectives."""
    dtype = case.get("dtype", torch.float64)
    sl = rank_slice(case, rank)
    x = global_input(case)[sl].to(dtype)
    if case.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    x.requires_grad_(True)
    dy = global_grad(case)[sl].to(dtype)
    mask = global_mask(case)
    layer = build_sync_bn(case, group).train()
    with count_collectives() as counts:
        y = layer(x) if mask is None else layer(x, mask[sl])
        forward_counts = dict(counts)
        y.backward(dy)
    twin = copy.deepcopy(layer)  # (its buffers apart) a later forward of the same layer
    with count_collectives() as later:
        twin(x.detach()) if mask is None else twin(x.detach(), mask[sl])
    out: dict[str, Any] = {
        "y": y.detach(),
        "dx": x.grad,
        "forward_collectives": forward_counts,
        "later_forward_collectives": dict(later),
        "collectives": dict(counts),
        "y_channels_last": y.is_contiguous(memory_format=torch.channels_last) if y.dim() == 4 else None,
        "dx_channels_last": x.grad.is_contiguous(memory_format=torch.channels_last) if y.dim() == 4 else None,
        "y_dtype": y.dtype,
    }
    for k in ("weight", "bias"):
        p = getattr(layer, k)
        out["d" + k] = None if p is None else p.grad
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        t = getattr(layer, k)
        out[k] = None if t is None else t.detach().clone()
    return out


BAD_INPUTS = {
    "channels": lambda x: x[:, :-1],  # one channel short
    "integer": lambda x: x.long(),  # not floating point
    "rank1": lambda x: x[:, 0],  # (N,) instead of (N, C, ...)
}


def expect_error(rank: int, case: dict[str, Any], group: Any = None) -> dict[str, Any]:
    """A SyncBN step that should raise on every rank: the error type and message (or 'no error')."""
    bad_rank = case.get("bad_rank")
    sl = rank_slice(case, rank)
    x = global_input(case)[sl]
    if bad_rank == rank:
        x = BAD_INPUTS[case["bad"]](x)
    layer = build_sync_bn(case, group).train()
    before = {k: getattr(layer, k).clone() for k in ("running_mean", "running_var", "num_batches_tracked")}
    try:
        layer(x)
    except (NormError, TypeError) as e:
        unchanged = all(torch.equal(before[k], getattr(layer, k)) for k in before)
        return {"type": type(e).__name__, "message": str(e), "buffers_unchanged": unchanged}
    return {"type": None, "message": "no error"}


def eval_and_world_one(rank: int, case: dict[str, Any]) -> dict[str, Any]:
    """Collectives issued by SyncBN in eval mode (forward + backward), and in a one-process group."""
    sl = rank_slice(case, rank)
    x = global_input(case)[sl].requires_grad_(True)
    layer = build_sync_bn(case).eval()
    with count_collectives() as counts:
        y = layer(x)
        y.sum().backward()
    eval_counts = sum(counts.values())
    eval_y = y.detach()
    # a group of this rank alone: plain BN, no collective
    solo = [dist.new_group([r]) for r in range(dist.get_world_size())][rank]
    layer1 = build_sync_bn(case, solo).train()
    x1 = global_input(case)[sl].requires_grad_(True)
    with count_collectives() as counts1:
        y1 = layer1(x1)
        y1.sum().backward()
    return {
        "eval_collectives": eval_counts,
        "eval_y": eval_y,
        "solo_collectives": sum(counts1.values()),
        "solo_y": y1.detach(),
        "solo_rm": layer1.running_mean.clone(),
        "solo_rv": layer1.running_var.clone(),
    }


def subgroup_case(rank: int, case: dict[str, Any]) -> dict[str, Any]:
    """SyncBN over a subgroup: ranks in ``members`` synchronise, each other rank runs alone."""
    members = case["members"]
    groups = {tuple(members): dist.new_group(members)}
    others = [r for r in range(dist.get_world_size()) if r not in members]
    for r in others:
        groups[(r,)] = dist.new_group([r])
    key = tuple(members) if rank in members else (rank,)
    return sync_bn_case(rank, case, groups[key])


def train_steps(rank: int, case: dict[str, Any]) -> dict[str, Any]:
    """3 SGD steps of a small conv net converted to SyncBatchNorm and wrapped in DDP, on uneven shards.

    The local loss is ``world * sum(local losses) / global N``: DDP averages the gradients over
    the processes, so each step follows the gradient of the mean loss over the global batch.
    """
    from torch.nn.parallel import DistributedDataParallel

    world = dist.get_world_size()
    torch.manual_seed(case["seed"])
    net = make_net(case)
    net = normkit.convert_sync_batchnorm(net)
    kinds = sorted({type(m).__name__ for m in net.modules()})
    ddp = DistributedDataParallel(net)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        c = {**case, "seed": case["seed"] + 10 * step}
        sl = rank_slice(c, rank)
        x = global_input(c)[sl]
        target = global_grad(c)[sl][:, 0, 0, :3]
        out = ddp(x)
        loss = world * ((out - target) ** 2).sum() / sum(c["splits"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"params": {k: v.detach().clone() for k, v in net.state_dict().items()}, "kinds": kinds}


def make_net(case: dict[str, Any]) -> nn.Module:
    """Conv -> BN -> ReLU -> Conv -> BN -> pool -> (N, 3), float64 (built identically by the parent for the
    oracle)."""
    C = case["tail"][0]
    net = nn.Sequential(
        nn.Conv2d(C, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 3, 1),
        normkit.nn.BatchNorm2d(3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ).double()
    return net


def recalibrate_case(rank: int, case: dict[str, Any]) -> dict[str, Any]:
    """normkit.recalibrate_bn over this rank's share of a dataset; returns the recalibrated buffers."""
    torch.manual_seed(case["seed"])
    net = recal_net(case)
    loader = [b for i, b in enumerate(recal_batches(case)) if i % dist.get_world_size() == rank]
    if rank == case.get("extra_rank", -1):
        loader = loader + loader[:1]  # one more batch than the others: stopped in lockstep
    with count_collectives() as counts:
        normkit.recalibrate_bn(net, loader, progress=False)
    return {
        "buffers": {k: v.clone() for k, v in net.state_dict().items()},
        "collectives": dict(counts),
        "batches_seen": len(loader),
    }


def recal_net(case: dict[str, Any]) -> nn.Module:
    torch.manual_seed(case["seed"])
    net = nn.Sequential(
        normkit.nn.BatchNorm2d(3),
        nn.Conv2d(3, 4, 3, padding=1),
        normkit.nn.SyncBatchNorm(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 1),
        nn.BatchNorm2d(5),
    ).double()
    return net


def recal_batches(case: dict[str, Any]) -> list[Tensor]:
    g = torch.Generator().manual_seed(case["seed"] + 5000)
    return [torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64) * 2 + 1 for n in case["batch_sizes"]]


def buffers_case(rank: int, case: dict[str, Any]) -> dict[str, Any]:
    """Per-rank different buffers, then sync_bn_buffers in each mode."""
    out: dict[str, Any] = {}
    for mode in ("average", "broadcast"):
        net = buffer_net(rank)
        with count_collectives() as counts:
            normkit.sync_bn_buffers(net, mode=mode, src=case.get("src", 0))
        out[mode] = {
            k: v.clone()
            for k, v in net.state_dict().items()
            if "running" in k or "num_batches" in k or "moving" in k
        }
        out[mode + "_collectives"] = sum(counts.values())
    return out


def buffer_net(rank: int) -> nn.Module:
    """A net whose normalization buffers differ by rank (rank-seeded); rank 1 has a NaN running_var
    channel."""
    torch.manual_seed(100 + rank)
    net = nn.Sequential(
        nn.BatchNorm2d(3),
        normkit.nn.SyncBatchNorm(4),
        normkit.nn.FrozenBatchNorm2d(2),
        nn.InstanceNorm2d(2, track_running_stats=True),
        normkit.nn.BatchNormalization(3),
    )
    with torch.no_grad():
        for name, b in net.named_buffers():
            if b.is_floating_point():
                b.copy_(torch.rand(b.shape) * (3 if "var" in name else 1) + (0.1 if "var" in name else -0.5))
            elif "num_batches" in name:
                b.fill_(10 * rank + 3)
        if rank == 1:
            net[0].running_var[0] = float("nan")  # a broken channel on one rank: left out of the average
    return net


def functional_case(rank: int, case: dict[str, Any]) -> dict[str, Any]:
    """normkit.functional.sync_batch_norm: returns the output and the new statistics, writes no argument."""
    sl = rank_slice(case, rank)
    x = global_input(case)[sl]
    state = init_state(case, case["tail"][0])
    rm, rv, nbt = state["running_mean"].clone(), state["running_var"].clone(), torch.tensor(0)
    out = normkit.functional.sync_batch_norm(
        x, rm, rv, state["weight"], state["bias"], training=True, num_batches_tracked=nbt
    )
    unchanged = (
        torch.equal(rm, state["running_mean"]) and torch.equal(rv, state["running_var"]) and int(nbt) == 0
    )
    return {
        "y": out.output,
        "running_mean": out.running_mean,
        "running_var": out.running_var,
        "num_batches_tracked": out.num_batches_tracked,
        "arguments_unchanged": unchanged,
    }


def _raised(fn: Any) -> dict[str, Any]:
    try:
        fn()
    except (NormError, TypeError) as e:
        return {"type": type(e).__name__, "message": str(e)}
    return {"type": None, "message": "no error"}


def mismatch_case(rank: int, case: dict[str, Any]) -> dict[str, Any]:
    """Processes that disagree on sizes (a user's bug): each call must raise on every rank, not abort or hang.

    (Without the size checks gloo aborts the processes, std::terminate, or the others wait forever.)
    """
    F = normkit.functional
    c3 = torch.randn(4, 3, 5)
    other = torch.randn(4, 5, 5) if rank == 1 else c3  # 5 channels on rank 1, 3 on rank 0
    flat = torch.randn(4) if rank == 1 else c3  # rank 1: no channel dim, and no parameter to tell C
    return {
        "functional_channels": _raised(lambda: F.sync_batch_norm(other, training=True)),
        "functional_no_channels": _raised(lambda: F.sync_batch_norm(flat, training=True)),
        "functional_eps": _raised(lambda: F.sync_batch_norm(c3, training=True, eps=-1.0 if rank else 1e-5)),
        "buffers_sizes": _raised(lambda: normkit.sync_bn_buffers(nn.Sequential(nn.BatchNorm2d(3 + rank)))),
        "buffers_none_on_1": _raised(
            lambda: normkit.sync_bn_buffers(nn.Sequential(nn.BatchNorm2d(3) if rank == 0 else nn.ReLU()))
        ),
        "recalibrate_sizes": _raised(
            lambda: normkit.recalibrate_bn(
                nn.Sequential(nn.Conv2d(2, 3 + rank, 1), nn.BatchNorm2d(3 + rank)),
                [torch.randn(2, 2, 2, 2)],
                progress=False,
            )
        ),
        # the module form: SyncBatchNorm(3) on rank 0, SyncBatchNorm(5) on rank 1 (gloo aborted rank 0
        # and gave rank 1 NaN); inputs that fit each process's own layer
        "module_channels": _raised(lambda: normkit.nn.SyncBatchNorm(3 + 2 * rank).train()(other)),
        # the group still works afterwards: nothing was left half-done
        "after": F.sync_batch_norm(c3, training=True).output.shape,
    }


def diverge_on_one_rank(rank: int, case: dict[str, Any]) -> dict[str, Any]:
    """The lab's training loop where only rank 1's loss turns NaN (at its third step): every process
    must stop there as diverged (rank 0 went on alone: under DDP it then waited in a collective)."""
    from normkit.lab.data import Dataset
    from normkit.lab.train import TrainConfig, train_classifier

    class NanOnRank1(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.calls = nn.Linear(4, 3), 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            out = self.lin(x.flatten(1))
            return out * float("nan") if rank == 1 and self.calls == 3 and self.training else out

    g = torch.Generator().manual_seed(0)
    data = Dataset(
        "toy",
        torch.randn(32, 1, 2, 2, generator=g),
        torch.arange(32) % 3,
        torch.randn(8, 1, 2, 2),
        torch.arange(8) % 3,
        3,
    )
    torch.manual_seed(0)
    res = train_classifier(
        NanOnRank1(), data, TrainConfig(epochs=2, batch_size=4, warmup_epochs=0), world_size=2, rank=rank
    )
    return {"diverged": res.diverged, "steps": res.steps}


TASKS = {
    "functional": functional_case,
    "sync_bn": sync_bn_case,
    "error": expect_error,
    "eval": eval_and_world_one,
    "subgroup": subgroup_case,
    "train_steps": train_steps,
    "recalibrate": recalibrate_case,
    "buffers": buffers_case,
    "mismatch": mismatch_case,
    "diverge": diverge_on_one_rank,
}


def suite(rank: int, world: int, payload: list[tuple[str, str, dict[str, Any]]]) -> dict[str, Any]:
    """Run every ``(key, task, case)`` of the payload in order on this rank; results by key."""
    results: dict[str, Any] = {}
    for key, task, case in payload:
        results[key] = TASKS[task](rank, case)
    return results
