"""normkit's norms as ``torch.library`` ops, and the one entry point every norm calls.

Two ops carry every norm (``normkit::norm`` and ``normkit::norm_backward``), because BN, LN, IN,
GN, LayerNorm2d and the rest differ only in the dims they reduce over (:mod:`normkit.ops.core`): the
schema takes the reduction ``dims`` of a view of the input, and a kernel backend can dispatch on
that pattern. Proxy Norm's activation step has its own pair (``normkit::proxy_norm_act`` and
``normkit::proxy_norm_act_backward``).

Which path runs (:func:`norm`):

* under ``torch.compile`` (Dynamo): the registered op, with its fake (meta) implementation and
  ``register_autograd``, so a compiled graph holds one ``normkit.norm`` node per norm and no
  graph break (Inductor then compiles each into its own loops or a call of the kernels:
  :mod:`normkit.ops._inductor`);
* while exporting or tracing (``torch.export``, ``torch.onnx.export``, ``torch.jit.trace``):
  plain standard ops (:func:`normkit.ops.core.composite_norm`); the functional layer uses ATen's
  ``batch_norm`` / ``group_norm`` / ``layer_norm`` / ``instance_norm`` where they compute the same
  thing, so ONNX Runtime and other backends see operators they know;
* under a ``torch.func`` transform other than ``jvp`` (``grad``, ``vjp``, ``jacrev``, ``vmap``, per-sample
  gradients), where the optional C++ module is built: the ``normkit_func`` ops, the same pair with
  C++ autograd kernels (``kernels/csrc/autograd.cpp``) and the vmap rules below, since torch runs an
  ``autograd.Function`` under a transform through about 0.25 ms of Python per call;
* otherwise (eager, ``torch.func``, forward-mode AD): an ``autograd.Function`` with
  ``setup_context``, an analytic ``jvp`` and a vmap rule around the same implementation. Under
  ``torch.func`` the kernels run too: the vmap rule folds the vmapped dim into the samples, and a
  recorded backward (``grad``, ``jacrev``, ``create_graph=True``) is one more Function on the kernels
  whose own derivatives differentiate the composite.
  (Measured with torch 2.13: an op with ``register_autograd`` alone returns zero tangents under
  ``torch.func.jvp``, and Dynamo refuses Functions with a custom ``jvp``: hence two wrappers.)

The statistics output is non-differentiable: running statistics never carry gradients.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.utils._python_dispatch  # (a submodule: imported explicitly for the check below)
from torch import Tensor

from .. import kernels
from . import _inductor, core
from ._vmap import batch_first, below_jvp_level, dense_tangents, register_batched, unwrapped_zero

_JVP = torch._C._functorch.TransformType.Jvp  # type: ignore[attr-defined]
_VMAP = torch._C._functorch.TransformType.Vmap  # type: ignore[attr-defined]

__all__ = ["exporting", "norm", "norm_stats", "proxy_act"]


def exporting() -> bool:
    """True while ``torch.export`` / ``torch.onnx.export`` / ``torch.jit.trace`` records the model.

    Reads the flag behind ``torch.compiler.is_exporting()`` rather than calling it: Dynamo in
    torch <= 2.11 traces that call as ``True`` under ``torch.compile`` too (pytorch/pytorch#176347,
    fixed in 2.12), which sent every compiled norm to the standard op meant for exporters (torch's
    semantics, not normkit's: a compiled BatchRenorm took plain BatchNorm's gradient). Dynamo reads
    the module attribute's value at trace time instead: set by torch.export, not by torch.compile.

    Example:
        >>> exporting()
        False
        >>> torch.compile(lambda x: x + exporting(), backend="eager")(torch.zeros(1))
        tensor([0.])
        >>> torch._dynamo.reset()  # (what it compiled refers to this example's namespace)
    """
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    if not isinstance(flag, bool):  # (a torch without the flag: its public function)
        flag = torch.compiler.is_exporting()
    # torch.jit.is_tracing is public API that torch.jit.__all__ leaves out:
    return flag or torch.jit.is_tracing()  # pyright: ignore[reportPrivateImportUsage]


def _is_dense(x: Tensor) -> bool:
    """Non-overlapping and dense: the strides, sorted, are the running products of the sizes."""
    expected = 1
    for size, stride in sorted(zip(x.shape, x.stride()), key=lambda t: t[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _dense(x: Tensor) -> Tensor:
    """``x`` itself when its memory is dense and non-overlapping, else a dense copy in its memory format.

    The ops give their output ``x``'s strides (``torch.empty_like`` in the fake), which only a
    dense input makes well defined: a transposed ``(N, L, C) -> (N, C, L)`` input keeps its layout in
    eager code (differences.md, "Output layout"). Under ``torch.compile`` the strides may be symbolic,
    which Dynamo cannot sort: there an input neither contiguous nor channels-last is made contiguous.
    """
    if x.is_contiguous():
        return x
    try:
        if x.is_contiguous(memory_format=torch.channels_last):
            return x
        if torch.compiler.is_compiling():  # (no sort of possibly symbolic strides)
            cl3d = x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)
            return x if cl3d else x.contiguous()
        if _is_dense(x):
            return x
    except RuntimeError:
        # inside vmap functorch answers only the contiguous-format query (the other layouts raise NYI)
        return x.contiguous()
    return torch.empty_like(x).copy_(x)  # empty_like picks the memory format a non-dense x suggests


def _like(t: Tensor, x: Tensor) -> Tensor:
    """``t`` (x's shape) with ``x``'s strides: a copy only when the layouts differ (e.g. an expanded dy)."""
    if t.stride() == x.stride():
        return t
    return torch.empty_like(x, dtype=t.dtype).copy_(t)


# ---- normkit::norm ------------------------------------------------------------------------------


def sets_view(t: Tensor, view: Sequence[int] | None) -> Tensor:
    """``t.view(view)`` (``t`` itself for ``None``): the view of a norm's input whose dims name its sets
    (:func:`norm`'s ``view``: GroupNorm's ``(N, G, C // G, *S)``, Ghost BN's ``(K, B, C, *S)``).

    Example:
        >>> sets_view(torch.zeros(2, 6, 5), (2, 3, 2, 5)).shape
        torch.Size([2, 3, 2, 5])
    """
    return t if view is None else t.view(view)


def _norm_impl(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    dims: Sequence[int],
    eps: float,
    view: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    if view is not None:  # (see norm: dims, the affine and the statistics are those of the view)
        m = None if mask is None else mask.view(view)
        y, stats = kernels.norm_forward(x.view(view), weight, bias, m, tuple(dims), eps)
        return y.view(x.shape), stats
    return kernels.norm_forward(x, weight, bias, mask, tuple(dims), eps)


def _norm_fake(x, weight, bias, mask, dims, eps, view=None):  # type: ignore[no-untyped-def]
    _inductor.ensure()
    shape = core.stat_shape(sets_view(x, view), tuple(dims))
    return torch.empty_like(x), x.new_empty((core.STAT_ROWS, *shape), dtype=core.acc_dtype(x.dtype))


def _norm_backward_impl(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    stats: Tensor,
    dims: Sequence[int],
    needs: Sequence[bool],
    view: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    if view is not None:  # (see norm: x, dy, mask and dx in x's shape; the rest the view's)
        m = None if mask is None else mask.view(view)
        xv, dyv = x.view(view), dy.view(view)
        dx, dw, db = kernels.norm_backward(dyv, xv, weight, bias, m, stats, tuple(dims), needs)
        return op_grads(None if dx is None else dx.view(x.shape), dw, db, x, weight, bias)
    return op_grads(
        *kernels.norm_backward(dy, x, weight, bias, mask, stats, tuple(dims), needs), x, weight, bias
    )


def op_grads(
    dx: Tensor | None,
    dw: Tensor | None,
    db: Tensor | None,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``normkit::norm_backward``'s outputs as its fake declares them: each gradient in its input's
    dtype (autograd would cast it there anyway), a fresh empty tensor where none was asked for.

    Example:
        >>> x, w = torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16)
        >>> dx, dw, db = op_grads(torch.zeros(2, 3), torch.ones(3), None, x, w, None)
        >>> dx.dtype, dw.dtype, db.shape
        (torch.bfloat16, torch.bfloat16, torch.Size([0]))
    """
    empty = x.new_empty(0)
    return (
        dx.to(x.dtype) if dx is not None else empty,
        dw.to(weight.dtype) if dw is not None and weight is not None else empty.clone(),
        db.to(bias.dtype) if db is not None and bias is not None else empty.clone(),
    )


def _norm_backward_fake(dy, x, weight, bias, mask, stats, dims, needs, view=None):  # type: ignore[no-untyped-def]
    empty = x.new_empty(0)
    return (
        torch.empty_like(x) if needs[0] else empty,
        torch.empty_like(weight) if (needs[1] and weight is not None) else empty.clone(),
        torch.empty_like(bias) if (needs[2] and bias is not None) else empty.clone(),
    )


def _norm_kernel_args(x, weight, bias, mask, dims, eps, view=None):  # type: ignore[no-untyped-def]
    """``normkit::norm_kernel``'s arguments as the kernels take them: Inductor passes its buffers in
    the layout it chose (flexible layout), which may be any strides."""
    x = _dense(x)
    return x, weight, bias, None if mask is None else _like(mask, x), dims, eps, view


def _norm_backward_kernel_args(dy, x, weight, bias, mask, stats, dims, needs, view=None):  # type: ignore[no-untyped-def]
    """``normkit::norm_backward_kernel``'s arguments: ``dy`` and ``mask`` in ``x``'s strides (the kernels'
    condition) where Inductor gave them others."""
    x = _dense(x)
    mask = None if mask is None else _like(mask, x)
    return _like(dy, x), x, weight, bias, mask, stats.contiguous(), dims, needs, view


# What a model's graph holds (one node per norm), and the same under the names Inductor calls
_norm_op = _inductor.register_op("norm", _norm_impl, _norm_fake, _norm_kernel_args)
_inductor.register_op("norm_backward", _norm_backward_impl, _norm_backward_fake, _norm_backward_kernel_args)


def _backward(
    ctx: Any,
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    stats: Tensor,
    view: Sequence[int] | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    needs = list(ctx.needs_input_grad[:3])
    dims, eps = ctx.dims, ctx.eps
    if view is not None and (torch.is_grad_enabled() or not core.compiling()):  # on the view itself
        m = None if mask is None else mask.view(view)
        dx, dw, db = _backward(ctx, dy.view(view), x.view(view), weight, bias, m, stats)
        return (None if dx is None else dx.view(x.shape)), dw, db
    if torch.is_grad_enabled() and not core.compiling():
        # create_graph=True, or a torch.func transform (grad, vjp, jacrev: they always record the
        # backward): the kernels' backward as a Function whose own derivatives recompute the composite.
        grads = _NormBackward.apply(dy, x, weight, bias, mask, stats, dims, eps, tuple(needs))
        return tuple(g if keep else None for g, keep in zip(grads, _which(needs, weight, bias)))  # type: ignore[return-value]
    if torch.is_grad_enabled():  # (compiling with create_graph=True: the composite, traced)
        dx, dw, db = core.norm_backward_composite(dy, x, weight, bias, mask, stats, dims, eps, needs)
        return (dx.to(x.dtype) if dx is not None else None), dw, db
    dy = _like(dy, x)
    if core.compiling():  # (AOTAutograd tracing the backward: the op, which Inductor lowers)
        dx, dw, db = torch.ops.normkit.norm_backward(
            dy, x, weight, bias, mask, stats, list(dims), needs, view
        )
        return (dx if needs[0] else None), (dw if needs[1] else None), (db if needs[2] else None)
    dx, dw, db = kernels.norm_backward(dy, x, weight, bias, mask, stats, dims, needs)
    return (dx.to(x.dtype) if dx is not None else None), dw, db


def _op_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    x, weight, bias, mask, dims, eps, view = inputs
    ctx.save_for_backward(x, weight, bias, mask, output[1])
    ctx.dims, ctx.eps, ctx.view = tuple(dims), eps, view


def _op_backward(ctx: Any, dy: Tensor, _dstats: Tensor | None) -> tuple[Any, ...]:
    x, weight, bias, mask, stats = ctx.saved_tensors
    dx, dw, db = _backward(ctx, dy, x, weight, bias, mask, stats, ctx.view)
    return dx, dw, db, None, None, None, None


_norm_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def _batched_param(p: Tensor | None, bdim: int | None, size: int) -> Tensor | None:
    return None if p is None else batch_first(p, bdim, size)


def _foldable(
    in_dims: Sequence[int | None],
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    dims: Sequence[int],
) -> bool:
    """Whether a vmapped call folds its batch into dim 0 (every set within one sample, the affine shared
    and not varying along dim 0, no mask): then it is one call of the unbatched pattern, B times as many
    samples, which the kernels take as they take an ordinary batch."""
    return (
        0 not in dims
        and all(d is None for d in in_dims)
        and mask is None
        and all(p is None or p.shape[0] == 1 for p in (weight, bias))
    )


def _members_affine(
    in_dims: Sequence[int | None],
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    dims: Sequence[int],
) -> bool:
    """Whether a vmapped call is foldable but for a per-member affine (an ensemble's stacked
    parameters, ``torch.func.stack_module_state``): every set within one sample, no mask, an affine
    that does not vary along the samples (full-rank with one sample, or of lower rank: LayerNorm's
    ``(W,)``), batched itself; a float32 / float64 input (the affine is then applied after the norm
    without a rounding of its own in between)."""
    if mask is not None or 0 in dims or x.dtype not in (torch.float32, torch.float64):
        return False
    rank = x.dim() - (in_dims[0] is not None)  # the unbatched input's
    batched = False
    for p, d in zip((weight, bias), in_dims[1:3]):
        if p is None:
            continue
        shape = p.shape if d is None else p.movedim(d, 0).shape[1:]  # the unbatched parameter's
        if len(shape) > rank or (len(shape) == rank and shape[0] != 1):  # (the same for every sample)
            return False
        batched |= d is not None
    return batched


def _members_first(p: Tensor, bdim: int | None, B: int, rank: int) -> Tensor:
    """A parameter with the members first and ``rank`` dims in all, broadcasting against the output
    (one of lower rank than the input aligns with its trailing dims, as in the unbatched call)."""
    p = batch_first(p, bdim, B)
    return p.reshape(B, *([1] * (rank - p.dim())), *p.shape[1:])


def _members_affine_forward(
    B: int,
    in_dims: Sequence[int | None],
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    dims: tuple[int, ...],
    eps: float,
) -> tuple[tuple[Tensor, Tensor], tuple[int, int | None]]:
    """:func:`_members_affine`'s case: the norm without affine, one call (once for an input every member
    shares, the usual ensemble; on the folded batch otherwise), then each member's affine, broadcast
    (one elementwise pass). Without it the sets gained the vmapped dim and ran on the reference."""
    if in_dims[0] is None:  # one input for every member: its statistics are every member's
        y, stats = norm(x, None, None, dims, eps)
        y, stats_dim = y.unsqueeze(0), None
    else:
        xb = batch_first(x, in_dims[0], B)
        y, stats = norm(_fold(xb), None, None, dims, eps)
        y, stats, stats_dim = _unfold(y, B), _unfold(stats, B, at=1), 1
    w, b = (
        None if t is None else _members_first(t, d, B, y.dim()) for t, d in zip((weight, bias), in_dims[1:3])
    )
    # (a product, then the bias added in place: torch's CPU addcmul took twice as long here); the
    # batch_first parameters have the members first, so every result does
    out = y if w is None else y * w.to(y.dtype)
    if b is not None:
        out = out.add_(b.to(y.dtype)) if w is not None else out + b.to(y.dtype)
    return (out, stats), (0, stats_dim)


def _fold(t: Tensor, at: int = 0) -> Tensor:
    """Merge dims ``at`` and ``at + 1`` (the vmapped dim and the samples)."""
    return t.reshape(*t.shape[:at], t.shape[at] * t.shape[at + 1], *t.shape[at + 2 :])


def _unfold(t: Tensor, size: int, at: int = 0) -> Tensor:
    return t.reshape(*t.shape[:at], size, t.shape[at] // size, *t.shape[at + 1 :])


class _NormFunction(torch.autograd.Function):
    """Eager / ``torch.func`` wrapper of the same computation: analytic backward and jvp, a vmap rule.

    The vmap rule (``torch.func.vmap``, per-sample gradients, ``jacrev`` / ``jacfwd``) calls the op
    once on the whole batch: for per-sample sets with a shared affine (GroupNorm, LayerNorm,
    InstanceNorm, LayerNorm2d: the usual case) the vmapped dim folds into the samples, so the fused
    kernels run as on an ordinary batch; otherwise the sets gain the vmapped dim (``dims`` shift by
    one), on the reference where the kernels do not take the pattern.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mask: Tensor | None,
        dims: tuple[int, ...],
        eps: float,
    ) -> tuple[Tensor, Tensor]:
        return kernels.norm_forward(x, weight, bias, mask, dims, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        x, weight, bias, mask, dims, eps = inputs
        stats = output[1]
        ctx.save_for_backward(x, weight, bias, mask, stats)
        ctx.save_for_forward(x, weight, bias, mask, stats)
        ctx.mark_non_differentiable(stats)
        ctx.dims, ctx.eps = dims, eps

    @staticmethod
    def backward(ctx: Any, dy: Tensor, _dstats: Tensor | None) -> tuple[Any, ...]:  # type: ignore[override]
        x, weight, bias, mask, stats = ctx.saved_tensors
        dx, dw, db = _backward(ctx, dy, x, weight, bias, mask, stats)
        return dx, dw, db, None, None, None

    @staticmethod
    def jvp(  # type: ignore[override]
        ctx: Any, tx: Tensor | None, tw: Tensor | None, tb: Tensor | None, *_: Any
    ) -> tuple[Tensor, None]:
        x, weight, _bias, mask, stats = ctx.saved_tensors
        if mask is None and tx is not None:
            return below_jvp_level(_norm_jvp, (tx, tw, tb, x, weight, stats, ctx.dims)), None
        return core.norm_jvp(tx, tw, tb, x, weight, mask, stats, ctx.dims), None

    @staticmethod
    def vmap(  # type: ignore[override]
        info: Any,
        in_dims: tuple[Any, ...],
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mask: Tensor | None,
        dims: tuple[int, ...],
        eps: float,
    ) -> tuple[tuple[Tensor, Tensor], tuple[int, int | None]]:
        B = info.batch_size
        if _members_affine(in_dims, x, weight, bias, mask, dims):
            return _members_affine_forward(B, in_dims, x, weight, bias, dims, eps)
        x = batch_first(x, in_dims[0], B)
        if _foldable(in_dims[1:4], weight, bias, mask, dims):
            y, stats = norm(_fold(x), weight, bias, dims, eps)
            return (_unfold(y, B), _unfold(stats, B, at=1)), (0, 1)
        w, b, m = (_batched_param(t, d, B) for t, d in zip((weight, bias, mask), in_dims[1:4]))
        y, stats = norm(x, w, b, tuple(d + 1 for d in dims), eps, mask=m)
        return (y, stats), (0, 1)


def _norm_jvp(
    tx: Tensor,
    tw: Tensor | None,
    tb: Tensor | None,
    x: Tensor,
    weight: Tensor | None,
    stats: Tensor,
    dims: tuple[int, ...],
) -> Tensor:
    """:func:`core.norm_jvp` on the backend's kernels: the normalization's Jacobian is symmetric, so the
    jvp of ``x_hat`` is the backward (no affine) of ``tx``, one kernel call; the affine's tangents
    (where not zero) add ``x_hat * tw + tb``."""
    tw, tb = (None if unwrapped_zero(t) else t for t in (tw, tb))
    if torch._C._has_storage(tx) and tx.stride() != x.stride():
        tx = torch.empty_like(x).copy_(tx)  # (the kernels take the tangent in x's layout)
    ty = kernels.norm_backward(tx, x, None, None, None, stats, dims, (True, False, False))[0]
    assert ty is not None
    if weight is not None:
        ty = ty * weight
    if tw is not None or tb is not None:
        ty = ty + core.norm_jvp(None, tw, tb, x, weight, None, stats, dims)
    return ty.to(x.dtype)


def _composite_grads(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    stats: Tensor,
    dims: tuple[int, ...],
    eps: float,
    needs: Sequence[bool],
) -> tuple[Any, tuple[Tensor, ...]]:
    """The backward as a differentiable function of ``(dy, x[, weight])`` returning the needed gradients
    (in their inputs' dtypes), and those primals: what :class:`_NormBackward` differentiates."""

    def grads(dy: Tensor, x: Tensor, weight: Tensor | None = None) -> tuple[Tensor, ...]:
        dx, dw, db = core.norm_backward_composite(dy, x, weight, bias, mask, stats, dims, eps, needs)
        return tuple(
            t.to(like.dtype)
            for t, like in ((dx, x), (dw, weight), (db, bias))
            if t is not None and like is not None
        )

    return grads, (dy, x) if weight is None else (dy, x, weight)


def _which(needs: Sequence[bool], weight: Tensor | None, bias: Tensor | None) -> tuple[bool, bool, bool]:
    """Which of ``(dx, dweight, dbias)`` the backward computes (the rest are empty tensors / ``None``)."""
    return bool(needs[0]), bool(needs[1]) and weight is not None, bool(needs[2]) and bias is not None


def _double_backward(
    gdx: Tensor | None,
    gdw: Tensor | None,
    gdb: Tensor | None,
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    stats: Tensor,
    dims: Sequence[int],
    eps: float,
    needs: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """``(d dy, d x, d weight)`` (an empty tensor for the weight without one): the vjp of the backward's
    composite recomputation with the cotangents ``(gdx, gdweight, gdbias)`` (``None``: zero)."""
    fn, primals = _composite_grads(dy, x, weight, bias, mask, stats, tuple(dims), eps, needs)
    picked = [
        (g, like)
        for g, keep, like in zip((gdx, gdw, gdb), _which(needs, weight, bias), (x, weight, bias))
        if keep
    ]
    cotangents = dense_tangents([g for g, _ in picked], [like for _, like in picked])  # type: ignore[misc]
    got = torch.func.vjp(fn, *primals)[1](cotangents)
    return got[0], got[1], (got[2] if len(got) > 2 else x.new_empty(0))


class _NormBackward(torch.autograd.Function):
    """``normkit::norm``'s backward (the kernels' ``(dx, dweight, dbias)``) as a differentiable function.

    What the norm's backward calls when autograd records it (``create_graph=True``, and always under
    ``torch.func.grad`` / ``vjp`` / ``jacrev``): the first derivative runs on the fused kernels, as
    without recording, and only the derivatives of this one (double backward, ``hessian``, ``jvp``
    of a gradient) differentiate the composite recomputation
    (:func:`normkit.ops.core.norm_backward_composite`).
    Its vmap rule folds the vmapped dim into the samples as :class:`_NormFunction`'s does, for
    ``dx``; per-sample affine gradients come from the reference's sums.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        dy: Tensor,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mask: Tensor | None,
        stats: Tensor,
        dims: tuple[int, ...],
        eps: float,
        needs: tuple[bool, bool, bool],
    ) -> tuple[Tensor, Tensor, Tensor]:
        dx, dw, db = kernels.norm_backward(_like(dy, x), x, weight, bias, mask, stats, dims, needs)
        return op_grads(dx, dw, db, x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        dy, x, weight, bias, mask, stats, dims, eps, needs = inputs
        ctx.save_for_backward(dy, x, weight, bias, mask, stats)
        ctx.save_for_forward(dy, x, weight, bias, mask, stats)
        ctx.dims, ctx.eps, ctx.needs = dims, eps, needs

    @staticmethod
    def backward(ctx: Any, gdx: Tensor, gdw: Tensor, gdb: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        dy, x, weight, bias, mask, stats = ctx.saved_tensors
        got = _double_backward(gdx, gdw, gdb, dy, x, weight, bias, mask, stats, ctx.dims, ctx.eps, ctx.needs)
        return got[0], got[1], got[2] if weight is not None else None, None, None, None, None, None, None

    @staticmethod
    def jvp(
        ctx: Any, tdy: Tensor | None, tx: Tensor | None, tw: Tensor | None, *_: Any
    ) -> tuple[Tensor, ...]:  # type: ignore[override]
        dy, x, weight, bias, mask, stats = ctx.saved_tensors
        fn, primals = _composite_grads(dy, x, weight, bias, mask, stats, ctx.dims, ctx.eps, ctx.needs)
        tangents = dense_tangents((tdy, tx, tw), primals)
        out = torch.func.jvp(fn, primals, tangents)[1]
        it = iter(out)
        empty = x.new_empty(0)
        return tuple(next(it) if keep else empty.clone() for keep in _which(ctx.needs, weight, bias))

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], *args: Any) -> Any:  # type: ignore[override]
        return _backward_vmap(_NormBackward.apply, info, in_dims, *args)


def _plain_call(*ts: Tensor | None) -> bool:
    """Whether a call on these tensors made now is seen by no transform: plain tensors (not functorch's
    wrappers) and no transform on the stack but vmaps (inside a vmap rule, the rule's own level: a
    vmap does nothing to plain tensors). Plain autograd may still record it."""
    if any(i.key() != _VMAP for i in torch._C._functorch.get_interpreter_stack() or ()):  # type: ignore[attr-defined]
        return False
    return not any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in ts)  # type: ignore[attr-defined]


def _lowered(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` with the vmap level this rule runs at (if any: the Functions' rules run below it
    already) off functorch's stack, as ``torch.library.register_vmap``'s rules run."""
    if not torch._C._functorch.get_interpreter_stack():  # type: ignore[attr-defined]
        return fn(*args)
    from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter

    with retrieve_current_functorch_interpreter().lower():
        return fn(*args)


def _members_backward(
    B: int,
    in_dims: tuple[Any, ...],
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    stats: Tensor,
    dims: tuple[int, ...],
    eps: float,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, Tensor] | None:
    """The backward's vmap rule in one kernel call where the kernels take it (short rows: LayerNorm over a
    last dim): per-sample gradients (the members' inputs folded into the samples, the affine shared)
    and ensembles (one input every member shares, or one each; the affine shared or each member's),
    ``dx`` and each member's ``dweight`` / ``dbias``. Where autograd records (parameters that require
    grad), the result is a :class:`_MembersBackward` node. ``None``: the rule's general route."""
    if 0 in dims or (in_dims[1] is None) != (in_dims[5] is None):
        return None
    shared_x = in_dims[1] is None
    rank = x.dim() - (0 if shared_x else 1)  # the unbatched input's
    ps, shapes = [], []  # (each parameter at the input's rank; its unbatched shape, the gradient's)
    for p, d in zip((weight, bias), in_dims[2:4]):
        if p is not None:
            p = p if d is None else batch_first(p, d, B)
            one = p if d is None else p[0]
            if one.dim() > rank or (one.dim() == rank and one.shape[0] != 1):  # (varies along the samples)
                return None
            shapes.append(one.shape)
            p = p.reshape(*(() if d is None else (B,)), *([1] * (rank - one.dim())), *one.shape)
        else:
            shapes.append(None)
        ps.append(p)
    w, b = ps
    lay = _Members(
        B, shared_x, in_dims[2] is not None, b if b is None or in_dims[3] is None else b[0], dims, eps, needs
    )
    dyb = batch_first(dy, in_dims[0], B)
    xb = x if shared_x else batch_first(x, in_dims[1], B)
    st = stats if shared_x else stats.movedim(in_dims[5], 1)
    with torch.no_grad():
        got = lay.kernel(dyb, xb, w, st)
    if got is None:
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (dyb, xb, w, st)):
        got = _lowered(_MembersBackward.apply, dyb, xb, w, st, lay, got)
    empty = dy.new_empty(0)
    gx, gw, gb = got
    return (
        gx if gx.numel() else empty,
        gw.reshape(B, *shapes[0]) if gw.numel() else empty.clone(),
        gb.reshape(B, *shapes[1]) if gb.numel() else empty.clone(),
    )


class _Members(NamedTuple):
    """How a vmapped backward's members lie (see :func:`_members_backward`): ``B`` members; one input for
    all (``shared_x``, its statistics too) or one each, members first; the weight shared or each
    member's (``member_w``, members first), at the input's rank; one member's bias (its shape, dtype)."""

    B: int
    shared_x: bool
    member_w: bool
    bias: Tensor | None
    dims: tuple[int, ...]
    eps: float
    needs: tuple[bool, bool, bool]

    def kernel(
        self, dyb: Tensor, xb: Tensor, w: Tensor | None, st: Tensor
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(dx, dweight, dbias)``, members first (empty where not asked for), from one kernel call."""
        B = self.B
        xf = xb if self.shared_x else _fold(xb)
        stf = st if self.shared_x else _fold(st, at=1)
        got = kernels.norm_backward_members(
            _fold(dyb.contiguous()),
            xf.contiguous(),
            w,
            self.bias,
            stf.contiguous(),
            self.dims,
            self.needs,
            B,
            self.shared_x,
            self.member_w,
        )
        if got is None:
            return None
        empty = dyb.new_empty(0)
        gx, gw, gb = got
        return (
            _unfold(gx, B) if gx is not None else empty,
            gw if gw is not None else empty.clone(),
            gb if gb is not None else empty.clone(),
        )

    def composite(self, dyb: Tensor, xb: Tensor, w: Tensor | None, st: Tensor) -> tuple[Tensor, ...]:
        """The same gradients from the composite recomputation, vmapped over the members (the needed
        ones only): what :class:`_MembersBackward`'s own derivatives differentiate."""
        x_dim, w_dim = None if self.shared_x else 0, 0 if self.member_w else None

        def one(dy: Tensor, x: Tensor, w: Tensor | None, st: Tensor) -> tuple[Tensor, ...]:
            fn, primals = _composite_grads(dy, x, w, self.bias, None, st, self.dims, self.eps, self.needs)
            return fn(*primals)

        st_dim = None if self.shared_x else 1  # (the statistics: (6, members, ...))
        return torch.func.vmap(one, in_dims=(0, x_dim, w_dim if w is not None else None, st_dim))(
            dyb, xb, w, st
        )


class _MembersBackward(torch.autograd.Function):
    """:func:`_members_backward`'s kernel result as an autograd node (where the gradients may be
    differentiated again: parameters that require grad): its backward is the vjp of the members'
    composite recomputation (:meth:`_Members.composite`)."""

    @staticmethod
    def forward(  # type: ignore[override]
        dyb: Tensor,
        xb: Tensor,
        w: Tensor | None,
        st: Tensor,
        lay: _Members,
        got: tuple[Tensor, Tensor, Tensor],
    ) -> tuple[Tensor, Tensor, Tensor]:
        return got

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        # (setup_context style: functorch accepts it with the rule's vmap level on the stack)
        ctx.save_for_backward(*inputs[:4])
        ctx.lay = inputs[4]

    @staticmethod
    def backward(ctx: Any, *cotangents: Tensor | None) -> tuple[Any, ...]:  # type: ignore[override]
        dyb, xb, w, st = ctx.saved_tensors
        lay: _Members = ctx.lay

        def grads(dy: Tensor, x: Tensor, *wp: Tensor) -> tuple[Tensor, ...]:
            return lay.composite(dy, x, wp[0] if wp else None, st)

        primals = (dyb, xb) if w is None else (dyb, xb, w)
        outs, pull = torch.func.vjp(grads, *primals)[:2]
        picked = [g for g, keep in zip(cotangents, _which(lay.needs, w, lay.bias)) if keep]
        cts = dense_tangents(
            [None if g is None else g.reshape(o.shape) for g, o in zip(picked, outs)], list(outs)
        )
        got = pull(tuple(cts))
        return got[0], got[1], (got[2] if w is not None else None), None, None, None


def _backward_vmap(
    apply: Any,
    info: Any,
    in_dims: tuple[Any, ...],
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    stats: Tensor,
    dims: tuple[int, ...],
    eps: float,
    needs: tuple[bool, bool, bool],
) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[int | None, int | None, int | None]]:
    """The backward's vmap rule, calling ``apply`` (:class:`_NormBackward`'s, or the ``normkit_func`` op)
    with the backward's arguments: ``dx`` on the folded batch where the pattern folds, per-member affine
    gradients with the vmapped dim as one more set dim."""
    B = info.batch_size
    need_x, need_w, need_b = _which(needs, weight, bias)
    out_dims = (0 if need_x else None, 0 if need_w else None, 0 if need_b else None)
    if (need_w or need_b) and mask is None and _plain_call(dy, x, weight, bias, stats):
        got = _members_backward(B, in_dims, dy, x, weight, bias, stats, dims, eps, (need_x, need_w, need_b))
        if got is not None:
            return got, out_dims
    dy, x = batch_first(dy, in_dims[0], B), batch_first(x, in_dims[1], B)
    stats = (
        stats.movedim(in_dims[5], 1)
        if in_dims[5] is not None
        else stats.unsqueeze(1).expand(stats.shape[0], B, *stats.shape[1:])
    )

    def with_the_vmapped_dim(wanted: tuple[bool, bool, bool]) -> tuple[Tensor, Tensor, Tensor]:
        # the sets gain the vmapped dim; the affine gets it too (expanded where shared), so that its
        # gradients stay per member (the reference's sums: no kernel pattern takes an expanded affine)
        w, b, m = (_batched_param(t, d, B) for t, d in zip((weight, bias, mask), in_dims[2:5]))
        return apply(dy, x, w, b, m, stats, tuple(d + 1 for d in dims), eps, wanted)

    if not _foldable(in_dims[2:5], weight, bias, mask, dims):
        return with_the_vmapped_dim(needs), out_dims
    dx = dw = db = x.new_empty(0)
    if need_x:  # one call of the unbatched pattern on the folded batch
        folded = (_fold(dy), _fold(x), weight, bias, None, _fold(stats, at=1))
        dx = _unfold(apply(*folded, dims, eps, (True, False, False))[0], B)
    if need_w or need_b:  # per-member affine gradients
        _, dw, db = with_the_vmapped_dim((False, need_w, need_b))
    return (dx, dw, db), out_dims


class _NormFunctionEager(torch.autograd.Function):
    """The same Function in the classic ``forward(ctx, ...)`` style, for plain eager calls.

    ``Function.apply`` binds the arguments with ``inspect.signature`` on every call for
    setup_context-style Functions (about 50 us here, more than a small norm's arithmetic); the
    classic style skips that. functorch needs the setup_context style, so :func:`norm` picks this
    one only while no torch.func transform is active. Forward-mode AD (dual tensors) works with both.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mask: Tensor | None,
        dims: tuple[int, ...],
        eps: float,
    ) -> tuple[Tensor, Tensor]:
        y, stats = kernels.norm_forward(x, weight, bias, mask, dims, eps)
        ctx.save_for_backward(x, weight, bias, mask, stats)
        ctx.save_for_forward(x, weight, bias, mask, stats)
        ctx.mark_non_differentiable(stats)
        ctx.dims, ctx.eps = dims, eps
        return y, stats

    # autograd.Function types backward as (ctx, *grad_outputs); this one names its two gradients
    backward = _NormFunction.backward  # pyright: ignore[reportAssignmentType]
    jvp = _NormFunction.jvp


def norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    dims: Sequence[int],
    eps: float,
    mask: Tensor | None = None,
    view: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(y, stats)``: normalize ``x`` over ``dims`` (non-negative) with a broadcastable affine.

    ``stats`` is the non-differentiable saved-statistics tensor (see :mod:`normkit.ops.core`);
    :func:`norm_stats` gives the mean, variance and count from it. Not for tracers: while
    exporting, callers use :func:`normkit.ops.core.composite_norm`.

    ``view`` (a shape): the sets are those of ``x.view(view)``, which ``dims``, the affine and
    ``stats`` refer to (GroupNorm's ``(N, G, C // G, *S)``, Ghost BN's ``(K, B, C, *S)``); ``x``,
    ``mask`` and ``y`` keep ``x``'s shape. A compiled graph then holds the op on ``x`` itself, with no
    view of it around the op: in a graph that saves such a view for the backward next to a
    convolution, Inductor (torch 2.13) materialises it in the traced strides (a copy of the
    channels-last activation each way) and, once the sizes are symbolic, cannot lay it out at all
    (``TypeError: cannot determine truth value of Relational``).

    Example:
        >>> x = torch.randn(2, 6, 4, 4)
        >>> y, _ = norm(x, None, None, (2, 3, 4), 1e-5, view=(2, 3, 2, 4, 4))
        >>> torch.allclose(y, torch.nn.functional.group_norm(x, 3), atol=1e-5)
        True
    """
    dims = tuple(dims)
    x = _dense(x)
    if mask is not None:
        mask = _like(mask.expand(x.shape), x)
    functorch = torch._C._are_functorch_transforms_active()
    if view is not None and not (torch.compiler.is_compiling() and not functorch):  # on the view itself
        m = None if mask is None else mask.view(view)
        y, stats = norm(x.view(view), weight, bias, dims, eps, m)
        return y.view(x.shape), stats
    if torch.compiler.is_compiling():
        if functorch:
            # torch.func inside torch.compile: a custom op's autograd does not compose with functorch
            # transforms (torch.library's generated Function has no setup_context), so the norm is
            # traced as the reference's plain ops, which every transform and Inductor take.
            return core.norm_forward(x, weight, bias, mask, dims, float(eps))
        shape = None if view is None else list(view)
        return torch.ops.normkit.norm(x, weight, bias, mask, list(dims), float(eps), shape)
    if torch._C._are_functorch_transforms_active():
        if _func_ops_ready():
            return torch.ops.normkit_func.norm(x, weight, bias, mask, list(dims), float(eps))  # type: ignore[no-any-return]
        return _NormFunction.apply(x, weight, bias, mask, dims, float(eps))  # type: ignore[no-any-return]
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if not needs_grad and torch.autograd.forward_ad._current_level < 0:
        return kernels.norm_forward(x, weight, bias, mask, dims, float(eps))  # nothing to differentiate
    return _NormFunctionEager.apply(x, weight, bias, mask, dims, float(eps))  # type: ignore[no-any-return]


# ---- torch.func: the normkit_func ops (C++ autograd kernels) -----------------------------------------
# Under a torch.func transform an autograd.Function costs about 0.25 ms of torch's Python per call
# (custom_function_call), and a norm is two of them under grad. The optional C++ module
# (kernels/csrc/autograd.cpp) defines the same pair as dispatcher ops with C++ autograd kernels, as
# torch's own norms are; here they get their backend kernels (the kernels' dispatch, as the Functions'
# forwards) and the same vmap rules. A jvp transform or forward AD keeps the Functions: the ops have no
# forward-mode rule.
_func_ops: dict[str, Any] = {"ready": False, "tried": False, "lib": None, "gn_proxy_act": False}
_FUNC_OPS_LOCK = threading.Lock()


def _func_backward_kernel(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    stats: Tensor,
    dims: list[int],
    eps: float,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    return _NormBackward.forward(dy, x, weight, bias, mask, stats, tuple(dims), eps, tuple(needs))  # type: ignore[arg-type]


def _func_backward_op(*args: Any) -> tuple[Tensor, Tensor, Tensor]:
    dy, x, weight, bias, mask, stats, dims, eps, needs = args
    return torch.ops.normkit_func.norm_backward(  # type: ignore[no-any-return]
        dy, x, weight, bias, mask, stats, list(dims), float(eps), list(needs)
    )


def _func_backward_vmap(info: Any, in_dims: tuple[Any, ...], *args: Any) -> Any:
    return _backward_vmap(_func_backward_op, info, in_dims, *args)


def _func_ops_ready() -> bool:
    """Whether :func:`norm` under this torch.func transform takes the ``normkit_func`` ops: the C++
    module loaded (built on first use where the CPU kernels are the backend), no jvp transform or
    forward AD, no dispatch mode or tracer."""
    if not _func_ops["ready"]:
        if _func_ops["tried"] or kernels.current() not in ("auto", "cpu"):
            return False
        with _FUNC_OPS_LOCK:  # (one registration; a thread arriving meanwhile takes the Functions)
            if _func_ops["tried"]:
                return bool(_func_ops["ready"])
            _func_ops["tried"] = True
            mod = kernels._build.autograd_module()
            if mod is None or not hasattr(mod, "set_double_backward"):
                return False
            mod.set_double_backward(_double_backward)  # type: ignore[attr-defined]
            lib = torch.library.Library("normkit_func", "IMPL")
            lib.impl("norm", _norm_impl, "CompositeExplicitAutograd")  # (normkit::norm's own kernel)
            lib.impl("norm_backward", _func_backward_kernel, "CompositeExplicitAutograd")
            register_batched(lib, "norm", _NormFunction.vmap)
            register_batched(lib, "norm_backward", _func_backward_vmap)
            from ..kernels import _func  # (GroupNormProxyAct2d's step: the same op pair)

            _func_ops["gn_proxy_act"] = _func.register_ops(lib, mod)
            # (the registrations last as long as the Library object: it is kept here)
            _func_ops["lib"], _func_ops["ready"] = lib, True
    return (
        torch.autograd.forward_ad._current_level < 0
        and not any(i.key() == _JVP for i in torch._C._functorch.get_interpreter_stack() or ())  # type: ignore[attr-defined]
        and torch.utils._python_dispatch._get_current_dispatch_mode() is None
        and not exporting()
    )


def norm_stats(stats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(mean, var, count)`` (keepdim, accumulation dtype) from :func:`norm`'s statistics."""
    mean, var = core.mean_var(stats)
    return mean, var, core.stats_count(stats)


# ---- normkit::proxy_norm_act --------------------------------------------------------------------
from . import proxy as _proxy  # noqa: E402  (the Proxy Norm op pair lives in its own module)

proxy_act = _proxy.proxy_act
