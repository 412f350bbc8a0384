"""Which fused-kernel pattern a ``normkit::norm`` call is: from the input's memory layout, the reduced
dims and where the affine varies, to ``(mode, N, C, S, G)`` of ``csrc/norm_cpu.cpp`` or ``None``.

The dims of size > 1 are put in memory order and merged into blocks: reduced (``R``) or kept
(``K``), marked ``*`` where the affine varies along them. The block sequence is matched against
each kernel's template, where a template block may be absent (size 1):

==============  ===============  ========================================================
mode            template         typical norm
==============  ===============  ========================================================
BATCH_CL        ``R K*``         BatchNorm channels_last, BatchNorm1d on (N, C)
BATCH_NCHW      ``R K* R``       BatchNorm on NCHW (N, C, S)
GROUP_NCHW      ``K K* R* R``    GroupNorm / InstanceNorm / LN over (C, H, W); LN over a last dim
GROUP_CL        ``K R K* R*``    the same on channels_last
CHANNEL_NCHW    ``K R* K``       LayerNorm2d over C on NCHW
==============  ===============  ========================================================

Without an affine the ``*`` marks are dropped. The kernels number the sets in memory order of the
kept dims, so a layout whose kept dims are not in their logical order falls back to the reference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["MODES", "Plan", "plan"]

MODES = ("batch_nchw", "batch_cl", "group_nchw", "group_cl", "channel_nchw")
_TEMPLATES = (  # tried in this order: BATCH_CL before BATCH_NCHW, which would also match "R K*" (S = 1)
    (1, ("R", "K*")),
    (0, ("R", "K*", "R")),
    (2, ("K", "K*", "R*", "R")),
    (3, ("K", "R", "K*", "R*")),
    (4, ("K", "R*", "K")),
)


class Plan(NamedTuple):
    """A kernel call: ``mode`` (index into :data:`MODES`) and the ``(N, C, S, G)`` it sees."""

    mode: int
    N: int
    C: int
    S: int
    G: int
    order: tuple[int, ...] | None = None  # the affine's dims in x's memory order, when not its logical order

    @property
    def name(self) -> str:
        return MODES[self.mode]


def _blocks(
    x: Tensor, dims: tuple[int, ...], vary: tuple[bool, ...] | None
) -> tuple[list[tuple[str, int]], tuple[int, ...] | None] | None:
    entries = [(x.stride(i), i) for i in range(x.dim()) if x.shape[i] > 1]
    entries.sort(key=lambda e: -e[0])
    last_kept = -1
    varying: list[int] = []
    blocks: list[tuple[str, int]] = []
    for _, i in entries:
        red = i in dims
        v = bool(vary and vary[i])
        if not red:
            if i < last_kept:
                return None
            last_kept = i
        if v:
            varying.append(i)
        kind = ("R" if red else "K") + ("*" if v else "")
        if blocks and blocks[-1][0] == kind:
            blocks[-1] = (kind, blocks[-1][1] * x.shape[i])
        else:
            blocks.append((kind, x.shape[i]))
    order = None
    if varying != sorted(  # e.g. LayerNorm over (C, H, W) on channels_last: flatten the affine as x lies
        varying
    ):
        order = (*varying, *(i for i in range(x.dim()) if i not in varying))
    return blocks, order


def _match(blocks: list[tuple[str, int]], template: tuple[str, ...]) -> list[int] | None:
    sizes = [1] * len(template)
    t = 0
    for kind, size in blocks:
        while t < len(template) and template[t] != kind:
            t += 1
        if t == len(template):
            return None
        sizes[t] = size
        t += 1
    return sizes


def _plan(x: Tensor, dims: tuple[int, ...], vary: tuple[bool, ...] | None) -> Plan | None:
    found = _blocks(x, dims, vary)
    if found is None:
        return None
    blocks, order = found
    if not blocks or all(kind[0] == "K" for kind, _ in blocks):
        return None  # one value per set: the reference's exact zero gradient
    for mode, template in _TEMPLATES:
        if vary is None:
            template = tuple(k[0] for k in template)
        s = _match(blocks, template)
        if s is None:
            continue
        if mode == 0:
            return Plan(0, s[0], s[1], s[2], 1, order)
        if mode == 1:
            return Plan(1, s[0], s[1], 1, 1, order)
        if mode == 2:
            return Plan(2, s[0], s[1] * s[2], s[3], s[1], order)
        if mode == 3:
            return Plan(3, s[0], s[2] * s[3], s[1], s[2], order)
        return Plan(4, s[0], s[1], s[2], 1, order)
    return None


_CACHE: dict[tuple[object, ...], Plan | None] = {}


def plan(x: Tensor, dims: tuple[int, ...], weight: Tensor | None, bias: Tensor | None) -> Plan | None:
    """The kernel pattern of normalizing (dense) ``x`` over ``dims`` with this affine, or ``None``.

    Example:
        >>> x = torch.randn(8, 16, 5, 5)
        >>> normkit.kernels.plan(x, (0, 2, 3), None, None).name  # BatchNorm2d's statistics
        'batch_nchw'
    """
    ws = None if weight is None else tuple(weight.shape)
    bs = None if bias is None else tuple(bias.shape)
    key = (x.shape, x.stride(), dims, ws, bs)
    try:
        return _CACHE[key]
    except KeyError:
        pass
    vary: tuple[bool, ...] | None = None
    shapes = [s for s in (ws, bs) if s is not None]
    if shapes:
        if len(shapes) == 2 and [a > 1 for a in shapes[0]] != [b > 1 for b in shapes[1]]:
            result = None
        elif any(len(s) != x.dim() for s in shapes):
            result = None
        else:
            vary = tuple(a > 1 for a in shapes[0])
            result = _plan(x, dims, vary)
    else:
        result = _plan(x, dims, None)
    if len(_CACHE) > 4096:
        _CACHE.clear()
    _CACHE[key] = result
    return result


def describe(
    x: Tensor, dims: tuple[int, ...], weight: Tensor | None = None, bias: Tensor | None = None
) -> str:
    """A one-line description of the pattern (for ``normkit kernels status`` and error messages)."""
    p = plan(x, dims, weight, bias)
    if p is None:
        return "reference (no fused pattern)"
    return f"{p.name} (N={p.N}, C={p.C}, S={p.S}, G={p.G})"


del torch
