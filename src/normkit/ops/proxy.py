"""Proxy Norm's activation step as registered ops: ``(act(weight * y + bias) - m) * rstd`` per channel.

``normkit::proxy_norm_act(y, weight, bias, m, rstd, act, slope)`` keeps only ``y`` (and the
per-channel vectors) for the backward, which recomputes ``weight * y + bias`` and uses the
activation's analytic derivative (ATen's ``*_backward`` ops: no ``autograd.grad`` inside, so
Dynamo traces it and ``torch.func`` vmaps it). ``act`` is a name (``relu``, ``leaky_relu`` with
``slope``, ``silu``, ``gelu``, ``gelu_tanh``, ``sigmoid``, ``tanh``, ``identity``); other callables
use the plain composite, which autograd differentiates.

The per-channel statistics ``m`` and ``rstd`` are inputs: their gradients flow on into the proxy
statistics and from there into all four parameters (computed from 200 quadrature points by plain
ops, outside the op).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._errors import NormError
from . import _inductor
from ._vmap import (
    as_channels,
    batch_first,
    below_jvp_level,
    dense_tangents,
    from_channels,
    member_vector,
    unwrapped_zero,
)
from .core import _inplace_ok, acc_dtype, compiling

__all__ = ["ACT_NAMES", "proxy_act", "proxy_act_composite"]

ACT_NAMES = ("relu", "leaky_relu", "silu", "gelu", "gelu_tanh", "sigmoid", "tanh", "identity")


def _cview(p: Tensor, nd: int) -> Tensor:
    """``(C,)`` -> ``(1, C, 1, ...)``."""
    return p.view([1, -1] + [1] * (nd - 2)) if nd > 2 else p.view(1, -1)


def _act(a: Tensor, act: str, slope: float) -> Tensor:
    if act == "relu":
        return torch.relu(a)
    if act == "leaky_relu":
        return torch.nn.functional.leaky_relu(a, slope)
    if act == "silu":
        return torch.nn.functional.silu(a)
    if act == "gelu":
        return torch.nn.functional.gelu(a)
    if act == "gelu_tanh":
        return torch.nn.functional.gelu(a, approximate="tanh")
    if act == "sigmoid":
        return torch.sigmoid(a)
    if act == "tanh":
        return torch.tanh(a)
    return a


def _act_backward(g: Tensor, a: Tensor, z: Tensor, act: str, slope: float) -> Tensor:
    """``g * act'(a)``; ``z = act(a)``. ATen's backward ops: fast, traceable and differentiable."""
    aten = torch.ops.aten
    if act == "relu":
        return aten.threshold_backward(g, z, 0)
    if act == "leaky_relu":
        return aten.leaky_relu_backward(g, a, slope, False)
    if act == "silu":  # aten.silu_backward has no derivative of its own: the formula, differentiable
        s = torch.sigmoid(a)
        return g * (s * (1.0 + a * (1.0 - s)))
    if act == "gelu":
        return aten.gelu_backward(g, a)
    if act == "gelu_tanh":
        return aten.gelu_backward(g, a, approximate="tanh")
    if act == "sigmoid":
        return aten.sigmoid_backward(g, z)
    if act == "tanh":
        return aten.tanh_backward(g, z)
    return g


_ACT_CODE = {name: i for i, name in enumerate(ACT_NAMES)}  # the fused kernel's activation codes
# The fused kernel vectorises these; the others (exp, erf, tanh) stay on ATen's vectorised math.
_FUSED_ACTS = ("relu", "leaky_relu", "identity")


def _fused_layout(y: Tensor) -> int | None:
    """0 (contiguous), 1 (channels last) or None: whether the fused CPU kernel may run on ``y`` here."""
    from ..kernels import _fast

    if not _fast.eligible(y) or y.dim() < 2:
        return None
    if y.is_contiguous():
        return 0
    if (y.dim() == 4 and y.is_contiguous(memory_format=torch.channels_last)) or (
        y.dim() == 5 and y.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        return 1
    return None


def _shape3(y: Tensor) -> tuple[int, int, int]:
    S = 1
    for s in y.shape[2:]:
        S *= s
    return y.shape[0], y.shape[1], S


def _vec(p: Tensor, dtype: torch.dtype) -> Tensor:
    return p.detach().to(dtype).contiguous()


def _triton(y: Tensor) -> Any:
    """:mod:`normkit.kernels.triton` where this call on ``y`` runs on it, else ``None``."""
    from ..kernels import triton_ready

    if not triton_ready(y):
        return None
    from ..kernels import triton

    return triton


def _forward(
    y: Tensor, weight: Tensor, bias: Tensor, m: Tensor, rstd: Tensor, act: str, slope: float
) -> Tensor:
    tri = _triton(y)
    if tri is not None:
        out = tri.proxy_act_forward(y, weight, bias, m, rstd, act, slope)
        if out is not None:
            return out
    layout = _fused_layout(y) if act in _FUSED_ACTS else None
    if layout is not None:  # one fused pass (normkit.kernels)
        from ..kernels import DTYPE_CODE, _build

        dtype = m.dtype
        w, b, mm, r = _vec(weight, dtype), _vec(bias, dtype), _vec(m, dtype), _vec(rstd, dtype)
        out = torch.empty_like(y)
        N, C, S = _shape3(y)
        _build.lib().normkit_act_forward(
            DTYPE_CODE[y.dtype],
            y.data_ptr(),
            w.data_ptr(),
            b.data_ptr(),
            mm.data_ptr(),
            r.data_ptr(),
            out.data_ptr(),
            _ACT_CODE[act],
            float(slope),
            N,
            C,
            S,
            layout,
        )
        return out
    return forward_aten(y, weight, bias, m, rstd, act, slope)


def forward_aten(
    y: Tensor, weight: Tensor, bias: Tensor, m: Tensor, rstd: Tensor, act: str, slope: float
) -> Tensor:
    """The step in ATen ops (differentiable; what Inductor generates code from).

    Example:
        >>> y, one, zero = torch.randn(2, 3, 4), torch.ones(3), torch.zeros(3)
        >>> torch.equal(forward_aten(y, one, zero, zero, one, "relu", 0.01), torch.relu(y))
        True
    """
    nd = y.dim()
    dtype = m.dtype
    a = torch.addcmul(_cview(bias.to(dtype), nd), y, _cview(weight.to(dtype), nd))
    z = _act(a, act, slope)
    if not torch.is_grad_enabled() and _inplace_ok() and z is not a:
        out = z.sub_(_cview(m, nd)).mul_(_cview(rstd, nd))  # z is fresh: reuse it
    else:
        out = (z - _cview(m, nd)) * _cview(rstd, nd)
    return out if out.dtype == y.dtype else out.to(y.dtype)


def _backward(
    dout: Tensor,
    y: Tensor,
    weight: Tensor,
    bias: Tensor,
    m: Tensor,
    rstd: Tensor,
    act: str,
    slope: float,
    needs: list[bool],
) -> tuple[Tensor | None, ...]:
    tri = (
        _triton(y)
        if not torch.is_grad_enabled() and type(dout) is Tensor and torch._C._has_storage(dout)
        else None
    )
    if tri is not None:  # create_graph=True takes the ATen formula below
        got = tri.proxy_act_backward(dout, y, weight, bias, m, rstd, act, slope, needs)
        if got is not None:
            return got
    layout = (
        _fused_layout(y)
        if act in _FUSED_ACTS
        and not torch.is_grad_enabled()
        and type(dout) is Tensor
        and torch._C._has_storage(dout)  # not the legacy vmap of gradcheck(check_batched_grad=True)
        and dout.stride() == y.stride()
        and dout.dtype == y.dtype
        else None
    )
    if layout is not None:  # one fused pass (normkit.kernels); create_graph=True takes the ATen formula below
        from ..kernels import DTYPE_CODE, _build

        dtype = m.dtype
        w, b, mm, r = _vec(weight, dtype), _vec(bias, dtype), _vec(m, dtype), _vec(rstd, dtype)
        N, C, S = _shape3(y)
        dy_t = torch.empty_like(y) if needs[0] else None
        sums = torch.empty(4, C, dtype=torch.float64)
        _build.lib().normkit_act_backward(
            DTYPE_CODE[y.dtype],
            dout.data_ptr(),
            y.data_ptr(),
            w.data_ptr(),
            b.data_ptr(),
            mm.data_ptr(),
            r.data_ptr(),
            None if dy_t is None else dy_t.data_ptr(),
            sums.data_ptr(),
            _ACT_CODE[act],
            float(slope),
            N,
            C,
            S,
            layout,
        )
        # separate tensors (the registered backward op may not return aliases of one another)
        return (
            dy_t,
            sums[0].to(weight.dtype, copy=True) if needs[1] else None,
            sums[1].to(bias.dtype, copy=True) if needs[2] else None,
            -(sums[2].to(dtype) * rstd) if needs[3] else None,
            sums[3].to(dtype, copy=True) if needs[4] else None,
        )
    return backward_aten(dout, y, weight, bias, m, rstd, act, slope, needs)


def backward_aten(
    dout: Tensor,
    y: Tensor,
    weight: Tensor,
    bias: Tensor,
    m: Tensor,
    rstd: Tensor,
    act: str,
    slope: float,
    needs: list[bool],
) -> tuple[Tensor | None, ...]:
    """The step's gradients in ATen ops (differentiable, for create_graph=True; Inductor compiles them).

    Example:
        >>> y, one, zero = torch.randn(2, 3, 4), torch.ones(3), torch.zeros(3)
        >>> dy, *_ = backward_aten(torch.ones_like(y), y, one, zero, zero, one, "relu", 0.01, [True] * 5)
        >>> torch.equal(dy, (y > 0).float())
        True
    """
    nd = y.dim()
    dims = [i for i in range(nd) if i != 1]
    dtype = m.dtype
    w = _cview(weight.to(dtype), nd)
    a = torch.addcmul(_cview(bias.to(dtype), nd), y, w)
    z = _act(a, act, slope)
    g = dout.to(dtype)
    da = _act_backward(g * _cview(rstd, nd), a, z, act, slope)
    dy = (da * w).to(y.dtype) if needs[0] else None
    dweight = (da * y).sum(dims).to(weight.dtype) if needs[1] else None
    dbias = da.sum(dims).to(bias.dtype) if needs[2] else None
    dm = -(g.sum(dims) * rstd) if needs[3] else None
    drstd = (g * (z - _cview(m, nd))).sum(dims) if needs[4] else None
    return dy, dweight, dbias, dm, drstd


def _pn_impl(
    y: Tensor, weight: Tensor, bias: Tensor, m: Tensor, rstd: Tensor, act: str, slope: float
) -> Tensor:
    return _forward(y, weight, bias, m, rstd, act, slope)


def _pn_fake(y, weight, bias, m, rstd, act, slope):  # type: ignore[no-untyped-def]
    _inductor.ensure()
    return torch.empty_like(y)


def _pn_backward_impl(
    dout: Tensor,
    y: Tensor,
    weight: Tensor,
    bias: Tensor,
    m: Tensor,
    rstd: Tensor,
    act: str,
    slope: float,
    needs: list[bool],
) -> list[Tensor]:
    grads = _backward(dout, y, weight, bias, m, rstd, act, slope, needs)
    return op_grads(grads, (y, weight, bias, m, rstd))


def op_grads(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
    """``normkit::proxy_norm_act_backward``'s outputs as its fake declares them: each gradient in its
    input's dtype, an empty tensor where none was asked for.

    Example:
        >>> y, c = torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(3)
        >>> [g.dtype if g.numel() else None for g in op_grads([torch.zeros(2, 3), None], (y, c))]
        [torch.bfloat16, None]
    """
    return [g.to(t.dtype) if g is not None else t.new_empty(0) for g, t in zip(grads, like)]


def _pn_backward_fake(dout, y, weight, bias, m, rstd, act, slope, needs):  # type: ignore[no-untyped-def]
    like = (y, weight, bias, m, rstd)
    return [torch.empty_like(t) if n else t.new_empty(0) for t, n in zip(like, needs)]


def _pn_kernel_args(y, weight, bias, m, rstd, act, slope):  # type: ignore[no-untyped-def]
    """``normkit::proxy_norm_act_kernel``'s arguments: ``y`` made dense (Inductor gives any strides)."""
    from .library import _dense

    return _dense(y), weight, bias, m, rstd, act, slope


def _pn_backward_kernel_args(dout, y, weight, bias, m, rstd, act, slope, needs):  # type: ignore[no-untyped-def]
    """``normkit::proxy_norm_act_backward_kernel``'s arguments: ``dout`` in ``y``'s strides."""
    from .library import _dense, _like

    y = _dense(y)
    return _like(dout, y), y, weight, bias, m, rstd, act, slope, needs


# What a model's graph holds, and the same under the names Inductor calls (normkit.ops._inductor)
_pn_op = _inductor.register_op("proxy_norm_act", _pn_impl, _pn_fake, _pn_kernel_args)
_inductor.register_op(
    "proxy_norm_act_backward", _pn_backward_impl, _pn_backward_fake, _pn_backward_kernel_args
)


def _grads(ctx: Any, dout: Tensor) -> tuple[Any, ...]:
    y, weight, bias, m, rstd = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])
    if dout.stride() != y.stride() and torch._C._has_storage(dout):  # (the fused kernels want y's layout;
        dout = torch.empty_like(y, dtype=dout.dtype).copy_(dout)  # a vmapped dout is laid out by the rules)
    if compiling():
        if torch.is_grad_enabled():  # (compiling with create_graph=True: the formula, traced)
            grads: tuple[Any, ...] = backward_aten(dout, y, weight, bias, m, rstd, ctx.act, ctx.slope, needs)
        else:  # (AOTAutograd tracing the backward: the op, which Inductor lowers)
            out = torch.ops.normkit.proxy_norm_act_backward(
                dout, y, weight, bias, m, rstd, ctx.act, ctx.slope, needs
            )
            grads = tuple(g if n else None for g, n in zip(out, needs))
    elif torch.is_grad_enabled():
        # create_graph=True, or a torch.func transform (grad, vjp, jacrev always record the backward):
        # the fused backward as a Function whose own derivatives differentiate the ATen formula
        out = _ProxyActBackward.apply(dout, y, weight, bias, m, rstd, ctx.act, ctx.slope, tuple(needs))
        grads = tuple(g if n else None for g, n in zip(out, needs))
    else:
        grads = _backward(dout, y, weight, bias, m, rstd, ctx.act, ctx.slope, needs)
    return (*grads, None, None)


def _setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    y, weight, bias, m, rstd, act, slope = inputs
    ctx.save_for_backward(y, weight, bias, m, rstd)
    ctx.act, ctx.slope = act, slope


_pn_op.register_autograd(_grads, setup_context=_setup)


class _ProxyActBackward(torch.autograd.Function):
    """The step's backward (``dy, dweight, dbias, dm, drstd``) as a differentiable function.

    What the step's backward calls when autograd records it (``create_graph=True``, and always under
    ``torch.func.grad`` / ``vjp`` / ``jacrev``): the first derivative runs on the fused kernel, as
    without recording, and only this function's own derivatives (double backward, ``hessian``)
    differentiate the ATen formula (:func:`backward_aten`). Its vmap rule makes the vmapped members
    channels (:func:`normkit.ops._vmap.as_channels`), so that per-sample gradients are one call of the
    fused backward, whose per-channel sums are then the per-member ones.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        dout: Tensor,
        y: Tensor,
        weight: Tensor,
        bias: Tensor,
        m: Tensor,
        rstd: Tensor,
        act: str,
        slope: float,
        needs: tuple[bool, ...],
    ) -> tuple[Tensor, ...]:
        if dout.stride() != y.stride():
            dout = torch.empty_like(y, dtype=dout.dtype).copy_(dout)
        grads = _backward(dout, y, weight, bias, m, rstd, act, slope, list(needs))
        return tuple(op_grads(grads, (y, weight, bias, m, rstd)))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(*inputs[:6])
        ctx.save_for_forward(*inputs[:6])
        ctx.act, ctx.slope, ctx.needs = inputs[6:9]

    @staticmethod
    def _formula(ctx: Any) -> Any:
        needs = list(ctx.needs)

        def grads(dout: Tensor, y: Tensor, w: Tensor, b: Tensor, m: Tensor, r: Tensor) -> tuple[Tensor, ...]:
            got = backward_aten(dout, y, w, b, m, r, ctx.act, ctx.slope, needs)
            return tuple(g for g in got if g is not None)

        return grads

    @staticmethod
    def backward(ctx: Any, *cotangents: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        primals = ctx.saved_tensors
        vjp = torch.func.vjp(_ProxyActBackward._formula(ctx), *primals)[1]
        got = vjp(tuple(g for g, keep in zip(cotangents, ctx.needs) if keep))
        return (*got, None, None, None)

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> tuple[Tensor, ...]:  # type: ignore[override]
        primals = ctx.saved_tensors
        ts = dense_tangents(tangents[:6], primals)
        out = iter(torch.func.jvp(_ProxyActBackward._formula(ctx), primals, ts)[1])
        like = primals[1:6]
        return tuple(next(out) if keep else t.new_empty(0) for keep, t in zip(ctx.needs, like))

    @staticmethod
    def vmap(  # type: ignore[override]
        info: Any,
        in_dims: tuple[Any, ...],
        dout: Tensor,
        y: Tensor,
        weight: Tensor,
        bias: Tensor,
        m: Tensor,
        rstd: Tensor,
        act: str,
        slope: float,
        needs: tuple[bool, ...],
    ) -> tuple[tuple[Tensor, ...], tuple[int | None, ...]]:
        B = info.batch_size
        dout, y = batch_first(dout, in_dims[0], B), batch_first(y, in_dims[1], B)
        out_dims = tuple(0 if keep else None for keep in needs)
        w, b, mm, r = (member_vector(p, d, B) for p, d in zip((weight, bias, m, rstd), in_dims[2:6]))
        got = _ProxyActBackward.apply(as_channels(dout), as_channels(y), w, b, mm, r, act, slope, needs)
        dy = from_channels(got[0], y.shape) if needs[0] else got[0]
        per_member = tuple(g.reshape(B, -1) if keep else g for g, keep in zip(got[1:], needs[1:]))
        return (dy, *per_member), out_dims


class _ProxyActFunction(torch.autograd.Function):
    """Eager / ``torch.func`` wrapper: analytic backward (recomputing from ``y``), jvp and a vmap rule
    (shared per-channel vectors: one call on the vmapped dim folded into the samples, so the fused
    step runs once per batch; per-member vectors, as in an ensemble: the members as channels, one
    call too)."""

    @staticmethod
    def forward(  # type: ignore[override]
        y: Tensor, weight: Tensor, bias: Tensor, m: Tensor, rstd: Tensor, act: str, slope: float
    ) -> Tensor:
        return _forward(y, weight, bias, m, rstd, act, slope)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        _setup(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:5])

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        return _grads(ctx, dout)

    @staticmethod
    def vmap(  # type: ignore[override]
        info: Any,
        in_dims: tuple[Any, ...],
        y: Tensor,
        weight: Tensor,
        bias: Tensor,
        m: Tensor,
        rstd: Tensor,
        act: str,
        slope: float,
    ) -> tuple[Tensor, int]:
        B = info.batch_size
        y = batch_first(y, in_dims[0], B)
        if all(d is None for d in in_dims[1:5]) and y.dim() >= 3:
            out = proxy_act(y.reshape(-1, *y.shape[2:]), weight, bias, m, rstd, act, slope)
            return out.reshape(y.shape), 0
        # per-member vectors (an ensemble): the members become channels, one call of the step
        w, b, mm, r = (member_vector(p, d, B) for p, d in zip((weight, bias, m, rstd), in_dims[1:5]))
        out = proxy_act(as_channels(y), w, b, mm, r, act, slope)
        return from_channels(out, y.shape), 0

    @staticmethod
    def jvp(ctx: Any, ty: Any, tw: Any, tb: Any, tm: Any, tr: Any, *_: Any) -> Tensor:  # type: ignore[override]
        y, weight, bias, m, rstd = ctx.saved_tensors
        args = (y, weight, bias, m, rstd, (ty, tw, tb, tm, tr), ctx.act, ctx.slope)
        return below_jvp_level(_jvp, args)


def _jvp(
    y: Tensor,
    weight: Tensor,
    bias: Tensor,
    m: Tensor,
    rstd: Tensor,
    tangents: tuple[Any, ...],
    act: str,
    slope: float,
) -> Tensor:
    """The step's jvp: ``act'(a) * r * (w * ty + y * tw + tb) - r * tm + (z - m) * tr``, ``a = w * y + b``;
    the per-channel tangents that functorch hands as zeros (no tangent) are skipped."""
    ty = tangents[0]
    tw, tb, tm, tr = (None if unwrapped_zero(t) else t for t in tangents[1:])
    nd = y.dim()
    dtype = m.dtype
    w = _cview(weight.to(dtype), nd)
    r = _cview(rstd, nd)
    a = torch.addcmul(_cview(bias.to(dtype), nd), y, w)
    ta: Tensor | None = None
    if ty is not None:
        ta = ty.to(dtype) * (w * r)  # (r folded into the per-channel factor)
    if tw is not None:
        extra = y.to(dtype) * _cview(tw.to(dtype), nd) * r
        ta = extra if ta is None else ta + extra
    if tb is not None:
        extra = _cview(tb.to(dtype), nd) * r
        ta = extra if ta is None else ta + extra
    z = _act(a, act, slope) if act not in ("relu", "leaky_relu", "identity") or tr is not None else a
    tout = torch.zeros_like(a) if ta is None else _act_backward(ta.expand(a.shape), a, z, act, slope)
    if tm is not None:
        tout = tout - _cview(tm, nd) * r
    if tr is not None:
        tout = tout + (z - _cview(m, nd)) * _cview(tr, nd)
    return tout.to(y.dtype)


def proxy_act_composite(y: Tensor, weight: Tensor, bias: Tensor, m: Tensor, rstd: Tensor, act: Any) -> Tensor:
    """The plain composite (any elementwise callable ``act``; also what exporters record)."""
    nd = y.dim()
    dtype = m.dtype
    out = (
        act(_cview(weight.to(dtype), nd) * y.to(dtype) + _cview(bias.to(dtype), nd)) - _cview(m, nd)
    ) * _cview(rstd, nd)
    return out.to(y.dtype)


def proxy_act(
    y: Tensor, weight: Tensor, bias: Tensor, m: Tensor, rstd: Tensor, act: str, slope: float = 0.01
) -> Tensor:
    """``(act(weight * y + bias) - m) * rstd`` per channel for a named activation, on the registered op."""
    if act not in ACT_NAMES:
        raise NormError(f"proxy_act: unknown activation {act!r}; expected one of {', '.join(ACT_NAMES)}")
    if acc_dtype(y.dtype) != m.dtype:
        m, rstd = m.to(acc_dtype(y.dtype)), rstd.to(acc_dtype(y.dtype))
    if torch.compiler.is_compiling():
        if torch._C._are_functorch_transforms_active():  # torch.func inside torch.compile: plain ATen
            # ops (a custom op's autograd does not compose with functorch transforms; see library.norm)
            return forward_aten(y, weight, bias, m, rstd, act, float(slope))
        return torch.ops.normkit.proxy_norm_act(y, weight, bias, m, rstd, act, float(slope))
    return _ProxyActFunction.apply(y, weight, bias, m, rstd, act, float(slope))  # type: ignore[no-any-return]
