"""Shape helpers: broadcastable parameter views for the generic core."""

from __future__ import annotations

from typing import overload

from torch import Tensor


@overload
def channel_view(p: Tensor, ndim: int, channel_dim: int = 1) -> Tensor: ...
@overload
def channel_view(p: None, ndim: int, channel_dim: int = 1) -> None: ...
@overload
def channel_view(p: Tensor | None, ndim: int, channel_dim: int = 1) -> Tensor | None: ...
def channel_view(p: Tensor | None, ndim: int, channel_dim: int = 1) -> Tensor | None:
    """View a per-channel vector ``(C,)`` as ``(1, C, 1, ...)`` for an ``ndim``-dim input."""
    if p is None:
        return None
    shape = [1] * ndim
    shape[channel_dim] = p.shape[0]
    return p.view(shape)


def spatial_dims(x: Tensor) -> tuple[int, ...]:
    """The dims after (N, C)."""
    return tuple(range(2, x.dim()))
