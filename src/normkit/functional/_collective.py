"""Per-channel moments merged across processes: Chan et al.'s parallel formula over torch.distributed.

Synchronised BN and precise-BN recalibration both need the statistics of values spread over
several processes. Each process summarises its own values per channel as ``(count, mean, M2)``
(``M2 = count * biased variance``, computed by normkit's shifted two-pass core), one collective
(``all_gather``) brings every process's summary to every process, and each process merges them
the same way, in the same order, in float64 (Chan, Golub & LeVeque 1979, k-way form):

    N    = sum_r n_r
    mean = sum_r n_r * mean_r / N
    M2   = sum_r M2_r + sum_r n_r * (mean_r - mean)^2

Every term of ``M2`` is non-negative, so there is no ``E[x^2] - E[x]^2`` cancellation, and all
processes end with bit-identical statistics. Nothing here runs a collective unless
``torch.distributed`` is initialised and the group has more than one process.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "GatheredMoments",
    "all_gather_moments",
    "all_gather_sizes",
    "chan_merge",
    "comm_device",
    "group_size",
    "merge_moments",
]

F64 = torch.float64


def group_size(group: Any = None) -> int:
    """Processes in ``group`` (default: the world); 1 without an initialised torch.distributed.

    A process outside ``group`` also gets 1: it has nobody to synchronise with.

    Example:
        >>> group_size()          # no process group here
        1
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    size = dist.get_world_size(group)
    return max(1, size)


def comm_device(group: Any, like: torch.device) -> torch.device:
    """The device a collective of ``group`` runs on: ``like`` when its backend takes it, else the other kind.

    gloo takes CPU tensors, nccl CUDA ones; a mixed ``"cpu:gloo,cuda:nccl"`` group takes both.
    """
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    cpu_ok = "gloo" in backend or "mpi" in backend or "cpu" in backend or "ucc" in backend
    gpu_ok = "nccl" in backend or "cuda" in backend or "ucc" in backend or "xccl" in backend
    if like.type == "cpu":
        return like if cpu_ok or not gpu_ok else torch.device("cuda", torch.cuda.current_device())
    return like if gpu_ok or not cpu_ok else torch.device("cpu")


def all_gather_sizes(size: int, group: Any = None, device: torch.device | None = None) -> list[int]:
    """Every process's ``size`` (an int, ``-1`` for "failed"), with one small ``all_gather``.

    Run before a collective whose tensor size each process works out for itself (a channel count,
    a number of buffer values): gloo aborts the whole process (``std::terminate``) when the sizes
    of one collective differ between processes, so they are compared first and a clear error can
    be raised on every process instead.
    """
    import torch.distributed as dist

    dev = comm_device(group, device if device is not None else torch.device("cpu"))
    local = torch.tensor([float(size)], dtype=F64, device=dev)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    return [int(v) for v in torch.cat(parts).tolist()]


def merge_moments(count: Tensor, mean: Tensor, m2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merge per-part ``(count, mean, M2)`` along dim 0 (float64, k-way Chan); empty parts add nothing.

    Returns ``(N, mean, M2)``; ``mean`` and ``M2`` are 0 where ``N`` is 0.

    Example:
        >>> x = torch.randn(10, dtype=torch.float64) + 1e4
        >>> parts = [x[:3], x[3:3], x[3:]]                      # one empty part
        >>> n = torch.tensor([float(p.numel()) for p in parts], dtype=torch.float64)
        >>> zero = torch.tensor(0.0, dtype=torch.float64)
        >>> mu = torch.stack([p.mean() if p.numel() else zero for p in parts])
        >>> m2 = torch.stack([((p - p.mean()) ** 2).sum() if p.numel() else zero for p in parts])
        >>> N, mean, M2 = merge_moments(n, mu, m2)
        >>> N.item(), torch.allclose(mean, x.mean()), torch.allclose(M2 / N, x.var(unbiased=False))
        (10.0, True, True)
    """
    count, mean, m2 = count.to(F64), mean.to(F64), m2.to(F64)
    zero = torch.zeros((), dtype=F64, device=count.device)
    has = count > 0
    mean = torch.where(has, mean, zero)  # an empty part's mean is undefined: keep NaN out
    m2 = torch.where(has, m2, zero)
    n = count.sum(0)
    safe = n.clamp_min(1.0)
    mu = (count * mean).sum(0) / safe
    dev = torch.where(has, mean - mu, zero)
    return n, mu, m2.sum(0) + (count * dev * dev).sum(0)


Summary = tuple[Tensor, Tensor, Tensor]


def chan_merge(a: Summary, b: Summary) -> Summary:
    """Merge two ``(count, mean, M2)`` summaries (float64): Chan et al.'s pairwise update.

    Example:
        >>> x = torch.randn(7, dtype=torch.float64)
        >>> def s(v):
        ...     n = torch.tensor(float(v.numel()), dtype=torch.float64)
        ...     return n, v.mean(), ((v - v.mean()) ** 2).sum()
        >>> n, mean, m2 = chan_merge(s(x[:2]), s(x[2:]))
        >>> torch.allclose(mean, x.mean()), torch.allclose(m2 / n, x.var(unbiased=False))
        (True, True)
    """
    return merge_moments(torch.stack([a[0], b[0]]), torch.stack([a[1], b[1]]), torch.stack([a[2], b[2]]))


class GatheredMoments(NamedTuple):
    """What :func:`all_gather_moments` returns: the merged statistics, each process's counts, any errors.

    ``count``, ``mean``, ``m2`` are the merged float64 per-channel values (identical on every
    process); ``counts`` is ``(world, C)``; ``failed`` lists the ranks (in the group) that reported
    an error instead of statistics; ``first_count`` is ``count[0]`` as a Python number (the count
    of every channel when there is no mask), read with the same host transfer as ``failed``.
    """

    count: Tensor
    mean: Tensor
    m2: Tensor
    counts: Tensor
    failed: list[int]
    first_count: float


def all_gather_moments(
    count: Tensor, mean: Tensor, m2: Tensor, group: Any = None, *, failed: bool = False
) -> GatheredMoments:
    """One ``all_gather`` of every process's ``(count, mean, M2)`` (``C`` values each), merged (Chan).

    ``failed=True`` tells the others that this process could not compute its statistics (a bad
    input): every process still joins the collective, so none waits forever, and each learns who
    failed (its statistics are then ignored). Call it on every process of ``group``, with the
    same ``C``.
    """
    import torch.distributed as dist

    device = comm_device(group, count.device)
    flag = torch.ones(1, dtype=F64, device=device) if failed else torch.zeros(1, dtype=F64, device=device)
    local = torch.cat(
        [
            flag,
            count.to(device, F64).reshape(-1),
            mean.to(device, F64).reshape(-1),
            m2.to(device, F64).reshape(-1),
        ]
    )
    if failed:
        local[1:] = 0.0
    world = dist.get_world_size(group)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=group)
    table = torch.stack(parts)  # (world, 1 + 3C)
    C = count.numel()
    bad = table[:, 0]
    counts, means, m2s = table[:, 1 : 1 + C], table[:, 1 + C : 1 + 2 * C], table[:, 1 + 2 * C :]
    n, mu, m2_all = merge_moments(counts, means, m2s)
    host = torch.cat([bad, n[:1]]).tolist()  # the one host transfer: who failed, and the global count
    failed_ranks = [i for i, v in enumerate(host[:-1]) if v != 0.0]
    home = count.device
    return GatheredMoments(n.to(home), mu.to(home), m2_all.to(home), counts.to(home), failed_ranks, host[-1])
