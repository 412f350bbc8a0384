"""Shared fixtures for the functional tests: seeded data, parameters, and a table of ops.

Each entry of :data:`OPS` pairs a normkit functional op with its float64 oracle from
``tests/reference.py`` behind one signature ``(x, weight, bias, eps) -> Tensor``, and knows its
reduction sets (``sets``) and how a per-channel/per-element parameter gradient reduces
(``param_sum``), so cross-op properties (TESTING.md items 2-5, 8-13, 20, 24-28, 37) are written once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import normkit.functional as nkf
from tests.reference import (
    ref_batch_norm,
    ref_group_norm,
    ref_instance_norm,
    ref_layer_norm,
    ref_layer_norm_2d,
)
from tests.tolerances import Tol

F32, F64 = torch.float32, torch.float64

# fp32 output vs the float64 oracle: outputs are O(1) (|x_hat| * |gamma| <~ 5).
TOL: dict[torch.dtype, Tol] = {F32: {"rtol": 1e-5, "atol": 1e-5}, F64: {"rtol": 1e-10, "atol": 1e-10}}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, dtype=F32, seed=0, offset=0.0, scale=1.0) -> Tensor:
    """``offset + scale * N(0, 1)`` computed in float64, then rounded once to ``dtype``."""
    z = torch.randn(shape, generator=gen(seed), dtype=F64)
    return (offset + scale * z).to(dtype)


def affine_params(shape, dtype=F32, seed=1, kind: str = "wb") -> tuple[Tensor | None, Tensor | None]:
    """weight = 1 + 0.5 N(0,1) (some negative), bias = 0.5 N(0,1); ``kind`` in {"wb", "w", "b", "none"}."""
    g = gen(seed)
    w = (1.0 + 0.5 * torch.randn(shape, generator=g, dtype=F64)).to(dtype)
    b = (0.5 * torch.randn(shape, generator=g, dtype=F64)).to(dtype)
    return (w if "w" in kind else None, b if "b" in kind else None)


def running_stats(C: int, dtype=F32) -> tuple[Tensor, Tensor]:
    """Non-trivial running buffers: mean in [-1, 1], var in [0.5, 2]."""
    return torch.linspace(-1.0, 1.0, C, dtype=dtype), torch.linspace(0.5, 2.0, C, dtype=dtype)


def prod(xs) -> int:
    return int(math.prod(xs))


# ---------------------------------------------------------------------------------------------
# The op table
# ---------------------------------------------------------------------------------------------


def _channel_sets(t: Tensor) -> Tensor:  # BN: one set per channel over (N, *spatial)
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def _per_channel_sum(t: Tensor, x_shape) -> Tensor:
    return t.transpose(0, 1).reshape(t.shape[1], -1).sum(1)


def _gn_groups(C: int) -> int:
    return 2 if C % 2 == 0 else 1


@dataclass(frozen=True)
class Op:
    name: str
    fn: Callable[[Tensor, Tensor | None, Tensor | None, float], Tensor]
    ref: Callable[[Tensor, Tensor | None, Tensor | None, float], Tensor]
    pshape: Callable[[tuple], tuple]
    sets: Callable[[Tensor], Tensor]  # (num_sets, set_size) view of a tensor shaped like x
    param_sum: Callable[[Tensor, tuple], Tensor]  # reduce an x-shaped tensor to the param shape
    set_size: Callable[[tuple], int]
    batch_stats: bool = True  # False: statistics are constants (BN eval)
    min_dim: int = 2
    single_raises: bool = True  # one value per set raises ValueError
    channel_layout: bool = True  # per-channel op that must keep channels_last

    def valid(self, shape: tuple) -> bool:
        if len(shape) < self.min_dim:
            return False
        if self.name.startswith("group_norm") and shape[1] % _gn_groups(shape[1]):
            return False
        return not (self.batch_stats and self.single_raises and prod(shape) > 0 and self.set_size(shape) == 1)

    def __repr__(self) -> str:
        return self.name


def _bn_train(x, w, b, eps):
    rm, rv = running_stats(x.shape[1], F32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype)
    return nkf.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=eps).output


def _bn_train_ref(x, w, b, eps):
    rm, rv = running_stats(x.shape[1], F64)
    return ref_batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=eps).output


def _bn_eval(x, w, b, eps):
    rm, rv = running_stats(x.shape[1], F32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype)
    return nkf.batch_norm(x, rm, rv, w, b, training=False, eps=eps).output


def _bn_eval_ref(x, w, b, eps):
    rm, rv = running_stats(x.shape[1], F64)
    return ref_batch_norm(x, rm, rv, w, b, training=False, eps=eps).output


def _ln_last_shape(shape: tuple) -> tuple:
    """torch-style LN over the trailing dims: the last two (or the last one for 2-D inputs)."""
    return tuple(shape[-2:]) if len(shape) >= 3 else tuple(shape[-1:])


OPS: list[Op] = [
    Op(
        "batch_norm_train",
        _bn_train,
        _bn_train_ref,
        pshape=lambda s: (s[1],),
        sets=_channel_sets,
        param_sum=_per_channel_sum,
        set_size=lambda s: prod(s) // s[1] if s[1] else 0,
    ),
    Op(
        "batch_norm_nostats",
        lambda x, w, b, eps: nkf.batch_norm(x, None, None, w, b, training=False, eps=eps).output,
        lambda x, w, b, eps: ref_batch_norm(x, None, None, w, b, training=False, eps=eps).output,
        pshape=lambda s: (s[1],),
        sets=_channel_sets,
        param_sum=_per_channel_sum,
        set_size=lambda s: prod(s) // s[1] if s[1] else 0,
    ),
    Op(
        "batch_norm_eval",
        _bn_eval,
        _bn_eval_ref,
        pshape=lambda s: (s[1],),
        sets=_channel_sets,
        param_sum=_per_channel_sum,
        set_size=lambda s: prod(s) // s[1] if s[1] else 0,
        batch_stats=False,
    ),
    Op(
        "instance_norm",
        lambda x, w, b, eps: nkf.instance_norm(x, None, None, w, b, eps=eps).output,
        lambda x, w, b, eps: ref_instance_norm(x, None, None, w, b, eps=eps).output,
        pshape=lambda s: (s[1],),
        sets=lambda t: t.reshape(t.shape[0] * t.shape[1], -1),
        param_sum=_per_channel_sum,
        set_size=lambda s: prod(s[2:]),
        min_dim=3,
    ),
    Op(
        "group_norm",
        lambda x, w, b, eps: nkf.group_norm(x, _gn_groups(x.shape[1]), w, b, eps=eps),
        lambda x, w, b, eps: ref_group_norm(x, _gn_groups(x.shape[1]), w, b, eps=eps),
        pshape=lambda s: (s[1],),
        sets=lambda t: t.reshape(t.shape[0] * _gn_groups(t.shape[1]), -1),
        param_sum=_per_channel_sum,
        set_size=lambda s: prod(s[1:]) // _gn_groups(s[1]),
    ),
    Op(
        "layer_norm_2d_c",
        lambda x, w, b, eps: nkf.layer_norm_2d(x, w, b, eps=eps, over="c"),
        lambda x, w, b, eps: ref_layer_norm_2d(x, w, b, eps=eps, over="c"),
        pshape=lambda s: (s[1],),
        sets=lambda t: t.movedim(1, -1).reshape(-1, t.shape[1]),
        param_sum=_per_channel_sum,
        set_size=lambda s: s[1],
        single_raises=False,
    ),
    Op(
        "layer_norm_2d_chw",
        lambda x, w, b, eps: nkf.layer_norm_2d(x, w, b, eps=eps, over="chw"),
        lambda x, w, b, eps: ref_layer_norm_2d(x, w, b, eps=eps, over="chw"),
        pshape=lambda s: (s[1],),
        sets=lambda t: t.reshape(t.shape[0], -1),
        param_sum=_per_channel_sum,
        set_size=lambda s: prod(s[1:]),
    ),
    Op(
        "layer_norm",
        lambda x, w, b, eps: nkf.layer_norm(x, _ln_last_shape(tuple(x.shape)), w, b, eps=eps),
        lambda x, w, b, eps: ref_layer_norm(x, _ln_last_shape(tuple(x.shape)), w, b, eps=eps),
        pshape=_ln_last_shape,
        sets=lambda t: t.reshape(-1, prod(_ln_last_shape(tuple(t.shape)))),
        param_sum=lambda t, s: t.reshape(-1, *_ln_last_shape(tuple(s))).sum(0),
        set_size=lambda s: prod(_ln_last_shape(tuple(s))),
        single_raises=False,
        channel_layout=False,
    ),
]

BATCH_STAT_OPS = [op for op in OPS if op.batch_stats]
CHANNEL_OPS = [op for op in OPS if op.channel_layout]

# 1-D, 2-D and 3-D spatial inputs, and an (N, C) one; C = 6 so GN runs with G = 2.
SHAPES = [(5, 6), (4, 6, 7), (3, 6, 4, 5), (2, 6, 3, 4, 2)]


def op_shapes(ops=OPS, shapes=SHAPES):
    """(op, shape) pairs where the op is defined for the shape."""
    return [(op, s) for op in ops for s in shapes if op.valid(s)]


def grads(y: Tensor, inputs, dy: Tensor, **kw):
    """``torch.autograd.grad`` over the inputs that require grad (None kept in place)."""
    live = [t for t in inputs if t is not None and t.requires_grad]
    got = torch.autograd.grad(y, live, dy, allow_unused=False, **kw)
    it = iter(got)
    return [next(it) if (t is not None and t.requires_grad) else None for t in inputs]
