"""One table of sample modules and inputs drives every toolchain test (the OpInfo / ModuleInfo habit).

Each sample builds a fresh module (so stateful layers start equal) and an input. ``batch_free``
marks layers whose output for one sample does not depend on the rest of the batch (vmap per-sample
gradients are meaningful for them in training too).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import normkit
import normkit.nn as nkn


@dataclass(frozen=True)
class Sample:
    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    batch_free: bool = False
    channels_last: bool = False
    tags: frozenset[str] = field(default_factory=frozenset)

    def module(self, train: bool, dtype: torch.dtype = torch.float32) -> nn.Module:
        torch.manual_seed(0)
        m = self.build().to(dtype)
        _perturb(m)
        return m.train(train)

    def input(self, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(self.shape, generator=g, dtype=torch.float64) * 1.5 + 0.3).to(dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def _perturb(m: nn.Module) -> None:
    """Non-trivial affine parameters and running statistics, so that every term matters."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in list(m.named_parameters()) + list(m.named_buffers()):
            if not p.is_floating_point() or name.endswith("proxy_points"):
                continue
            noise = torch.rand(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            if name.endswith("running_var"):
                p.copy_(0.5 + noise)
            elif name.endswith(("weight", "running_mean", "bias")) or "proxy" in name:
                p.add_(0.3 * (noise - 0.5))


SAMPLES: list[Sample] = [
    Sample("BatchNorm1d-2d", lambda: nkn.BatchNorm1d(6), (5, 6)),
    Sample("BatchNorm1d-3d", lambda: nkn.BatchNorm1d(6), (4, 6, 7)),
    Sample("BatchNorm2d", lambda: nkn.BatchNorm2d(6), (4, 6, 5, 5)),
    Sample("BatchNorm2d-cl", lambda: nkn.BatchNorm2d(6), (4, 6, 5, 5), channels_last=True),
    Sample("BatchNorm3d", lambda: nkn.BatchNorm3d(4), (2, 4, 3, 3, 3)),
    Sample("InstanceNorm1d", lambda: nkn.InstanceNorm1d(6), (4, 6, 7), batch_free=True),
    Sample(
        "InstanceNorm2d-affine-tracked",
        lambda: nkn.InstanceNorm2d(6, affine=True, track_running_stats=True),
        (4, 6, 5, 5),
    ),
    Sample("InstanceNorm2d", lambda: nkn.InstanceNorm2d(6, affine=True), (4, 6, 5, 5), batch_free=True),
    Sample("GroupNorm", lambda: nkn.GroupNorm(3, 6), (4, 6, 5, 5), batch_free=True),
    Sample("GroupNorm-cl", lambda: nkn.GroupNorm(2, 6), (4, 6, 5, 5), batch_free=True, channels_last=True),
    Sample("LayerNorm", lambda: nkn.LayerNorm(7), (4, 5, 7), batch_free=True),
    Sample("LayerNorm-2dims", lambda: nkn.LayerNorm((5, 7)), (4, 5, 7), batch_free=True),
    Sample("LayerNorm2d-c", lambda: nkn.LayerNorm2d(6), (4, 6, 5, 5), batch_free=True),
    Sample("LayerNorm2d-chw", lambda: nkn.LayerNorm2d(6, over="chw"), (4, 6, 5, 5), batch_free=True),
    # (N, C) features: the registry's "ln" in an MLP (LayerNorm over C, as GroupNorm(1, C) takes them)
    Sample("LayerNorm2d-chw-NC", lambda: nkn.LayerNorm2d(6, over="chw"), (5, 6), batch_free=True),
    Sample(
        "ln-sigmoid-NC", lambda: normkit.create_norm_act_layer("ln", 6, "sigmoid"), (5, 6), batch_free=True
    ),
    Sample("ln+pn", lambda: normkit.create_norm_layer("ln+pn", 6), (4, 6, 5, 5), batch_free=True),
    Sample(
        "gn:2+pn-silu",
        lambda: normkit.create_norm_layer("gn:2+pn", 6, activation="silu"),
        (4, 6, 5, 5),
        batch_free=True,
    ),
    Sample(
        "ProxyNormAct-gelu", lambda: nkn.ProxyNormAct(6, activation="gelu"), (4, 6, 5, 5), batch_free=True
    ),
    Sample("GhostBatchNorm2d", lambda: nkn.GhostBatchNorm2d(6, ghost_batch_size=2), (4, 6, 5, 5)),
    Sample("BatchRenorm2d", lambda: nkn.BatchRenorm2d(6), (4, 6, 5, 5)),
    Sample("BatchRenormAct2d", lambda: normkit.create_norm_act_layer("brn", 6, "silu"), (4, 6, 5, 5)),
    Sample("FrozenBatchNorm2d", lambda: nkn.FrozenBatchNorm2d(6), (4, 6, 5, 5), batch_free=True),
    Sample("BatchNormAct2d", lambda: nkn.BatchNormAct2d(6, activation="relu"), (4, 6, 5, 5)),
    # SyncBatchNorm without a process group (and with one process) is BatchNorm: the toolchain sees that
    Sample("SyncBatchNorm", lambda: nkn.SyncBatchNorm(6), (4, 6, 5, 5)),
    Sample("SyncBatchNorm-2d", lambda: nkn.SyncBatchNorm(6), (5, 6)),
    Sample("SyncBatchNorm-cl", lambda: nkn.SyncBatchNorm(6), (4, 6, 5, 5), channels_last=True),
    Sample("SyncBatchNormAct", lambda: nkn.SyncBatchNormAct(6, activation="silu"), (4, 6, 5, 5)),
    Sample(
        "GroupNormAct2d",
        lambda: nkn.GroupNormAct2d(6, num_groups=2, activation="silu"),
        (4, 6, 5, 5),
        batch_free=True,
    ),
    Sample("LayerNormAct2d", lambda: nkn.LayerNormAct2d(6, activation="gelu"), (4, 6, 5, 5), batch_free=True),
    Sample("MeanOnlyBatchNorm", lambda: nkn.MeanOnlyBatchNorm(6), (4, 6, 5, 5)),
    Sample("BatchNormalization-keras", lambda: nkn.BatchNormalization(6), (4, 5, 5, 6)),
    # the weight-standardized convolutions: a norm of the kernel (batch-free: one sample's output is its own)
    Sample("StdConv2d", lambda: nkn.StdConv2d(6, 6, 3, padding=1), (4, 6, 5, 5), batch_free=True),
    Sample(
        "ScaledStdConv2d-cl",
        lambda: nkn.ScaledStdConv2d(6, 6, 3, padding=1, gamma=1.7),
        (4, 6, 5, 5),
        batch_free=True,
        channels_last=True,
    ),
]

SAMPLE_IDS = [s.name for s in SAMPLES]


def by_name(name: str) -> Sample:
    return next(s for s in SAMPLES if s.name == name)


def run(
    m: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, params: nn.Module | None = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Output, and the gradients of a fixed weighted sum w.r.t. the input and every parameter.

    ``params`` is the module whose parameters to read (when ``m`` wraps it, e.g. compiled).
    """
    x = x.detach().clone().requires_grad_(True)
    y = m(x)
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    (y * w).sum().backward()
    grads = {"input": x.grad}
    owner = params if params is not None else m
    assert isinstance(owner, nn.Module)
    grads.update({k: p.grad for k, p in owner.named_parameters() if p.grad is not None})
    return y.detach(), grads
