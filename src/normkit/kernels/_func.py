"""The fused CPU kernels under ``torch.func`` transforms: ``autograd.Function`` s with their own rules.

Under ``grad``, ``vmap``, ``jvp`` and their compositions the eager fast paths (:mod:`._fast`) stand
aside: their tensors are functorch wrappers. Without these Functions, Proxy Norm ran as its
composite there: a dozen ATen ops on ``(C, points)`` tensors for the statistics (``(B, C, points)``
ones for per-sample gradients) and, for :class:`~normkit.nn.GroupNormProxyAct2d`, the norm, the
statistics and the activation step as separate Functions, each with torch.func's per-call Python
overhead. Here:

* :func:`proxy_stats`: the proxy statistics on the C++ kernel each way;
* :func:`gn_proxy_act`: GroupNorm without affine + Proxy Norm's activation, one fused pass each
  way, as one Function; where the optional C++ module is built (and no ``jvp`` transform is
  active), as the ``normkit_func::gn_proxy_act`` op pair instead, whose autograd nodes are C++
  (no torch.func Python per call) and whose kernels and vmap rules are this Function's. Under
  ``jvp`` the Function's analytic jvp runs: GroupNorm's jvp of the input's tangent is the backward
  kernel of it (the norm's Jacobian is symmetric), then three elementwise ops.

Each has a vmap rule that runs one call per batch: per-sample sets with shared parameters fold the
vmapped dim into the samples; otherwise the vmapped members become channels (``(B, N, C, *S)`` ->
``(N, B * C, *S)``, a view for one sample per member: per-sample gradients), so that the kernels'
per-channel sums are the per-member ones. A recorded backward (``grad`` always records it) is
itself a Function whose forward is the kernels' backward; only its own derivatives (``hessian``,
double backward) differentiate the composite, through ``torch.func.vjp`` / ``jvp``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._python_dispatch  # the attribute below is a submodule: import it explicitly
from torch import Tensor

from ..ops._vmap import (
    as_channels,
    batch_first,
    below_jvp_level,
    dense_tangents,
    from_channels,
    member_vector,
    unwrapped_zero,
)
from . import _build
from ._fast import (
    _ACT_CODE,
    _CODE,
    _act_code,
    _Fallback,
    _gn_act_backward,
    _gn_act_forward,
    _gn_reference,
    _NoFast,
    _pn_plan,
    _proxy_params_ok,
    _Spec,
    _stats_backward,
    _stats_forward,
)

__all__ = ["gn_proxy_act", "proxy_stats"]


def _active() -> bool:
    """Whether a call may take these Functions: a torch.func transform is active, and nothing that the
    C++ side must stand aside for (compiling, a dispatch mode, tracing, exporting, a double backward's
    recomputation); the kernels built."""
    from . import current

    return (
        torch._C._are_functorch_transforms_active()
        and _NoFast.depth == 0
        and current() in ("auto", "cpu")
        and not torch.compiler.is_compiling()
        and torch.utils._python_dispatch._get_current_dispatch_mode() is None
        and not torch.jit.is_tracing()  # pyright: ignore[reportPrivateImportUsage]
        and not torch.compiler.is_exporting()
        and (bool(_build._state["loaded"]) or _build.load(build=True))
    )


def _composite_stats_of(act: Any, eps: float, u: Tensor) -> Any:
    """The proxy statistics as a differentiable function of the four parameters (plain ops)."""
    from ..functional.proxy_norm import _proxy_stats_composite

    def stats(w: Tensor, b: Tensor, pb: Tensor, pw: Tensor) -> tuple[Tensor, Tensor]:
        return _proxy_stats_composite(w, b, pb, pw, u, act, eps)

    return stats


def _composite_stats_grads_of(act: Any, eps: float, u: Tensor) -> Any:
    """The statistics' parameter gradients as a differentiable function of ``(params..., gm, gr)``."""
    stats = _composite_stats_of(act, eps, u)

    def grads(w: Tensor, b: Tensor, pb: Tensor, pw: Tensor, gm: Tensor, gr: Tensor) -> tuple[Tensor, ...]:
        return tuple(torch.func.vjp(stats, w, b, pb, pw)[1]((gm, gr)))

    return grads


def _vmapped_stats_call(
    fn: Any,
    info: Any,
    in_dims: tuple[Any, ...],
    vectors: tuple[Tensor, ...],
    u: Tensor,
    rest: tuple[Any, ...],
) -> tuple[Any, ...]:
    """One call of a per-channel statistics Function on the vmapped members as channels: each ``(C,)``
    vector vmapped to ``(B, C)`` becomes a ``(B * C,)`` one (the statistics are per channel, so the
    members' channels are independent), and each output ``(B * C,)`` goes back to ``(B, C)``."""
    B = info.batch_size
    flat = [member_vector(v, d, B) for v, d in zip(vectors, in_dims)]
    if in_dims[len(vectors)] is not None:  # (points vmapped too: one member at a time)
        us = u.movedim(in_dims[len(vectors)], 0)
        C = flat[0].shape[0] // B
        per = [fn.apply(*(v[i * C : (i + 1) * C] for v in flat), us[i], *rest) for i in range(B)]
        return tuple(torch.stack(col) for col in zip(*per))
    return tuple(o.reshape(B, -1) for o in fn.apply(*flat, u, *rest))


class _FuncProxyStats(torch.autograd.Function):
    """:func:`normkit.functional.proxy_stats` under ``torch.func`` transforms: the C++ statistics each way
    (a recorded backward is :class:`_FuncProxyStatsBackward`, whose own derivatives differentiate the
    composite), with a vmap rule that makes the vmapped members channels. Without it the transforms
    ran the composite's dozen ops on ``(C, points)`` tensors (``(B, C, points)`` ones for per-sample
    gradients), each way."""

    @staticmethod
    def forward(  # type: ignore[override]
        w: Tensor, b: Tensor, pb: Tensor, pw: Tensor, u: Tensor, act: Any, code: int, slope: float, eps: float
    ) -> tuple[Tensor, Tensor]:
        ps = [p.contiguous() for p in (w, b, pb, pw)]
        return _stats_forward(ps, u.to(ps[0].dtype).contiguous(), code, slope, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        ctx.save_for_backward(*inputs[:5], *output)
        ctx.save_for_forward(*inputs[:5], *output)
        ctx.rest = inputs[5:]

    @staticmethod
    def backward(ctx: Any, gm: Tensor, gr: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        w, b, pb, pw, u, m, r = ctx.saved_tensors
        grads = _FuncProxyStatsBackward.apply(w, b, pb, pw, u, m, r, gm, gr, *ctx.rest)
        return (*grads, None, None, None, None, None)

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        w, b, pb, pw, u, _m, _r = ctx.saved_tensors
        primals = (w, b, pb, pw)
        ts = dense_tangents(tangents[:4], primals)
        return torch.func.jvp(_composite_stats_of(ctx.rest[0], ctx.rest[3], u), primals, ts)[1]

    @staticmethod
    def vmap(
        info: Any,
        in_dims: tuple[Any, ...],
        w: Tensor,
        b: Tensor,
        pb: Tensor,
        pw: Tensor,
        u: Tensor,
        *rest: Any,
    ) -> Any:  # type: ignore[override]
        return _vmapped_stats_call(_FuncProxyStats, info, in_dims, (w, b, pb, pw), u, rest), (0, 0)


class _FuncProxyStatsBackward(torch.autograd.Function):
    """The statistics' backward (the four parameter gradients) on the C++ kernel, differentiable."""

    @staticmethod
    def forward(  # type: ignore[override]
        w: Tensor,
        b: Tensor,
        pb: Tensor,
        pw: Tensor,
        u: Tensor,
        m: Tensor,
        r: Tensor,
        gm: Tensor,
        gr: Tensor,
        act: Any,
        code: int,
        slope: float,
        eps: float,
    ) -> tuple[Tensor, ...]:
        ps = [p.contiguous() for p in (w, b, pb, pw)]
        u = u.to(ps[0].dtype).contiguous()
        return tuple(_stats_backward(ps, u, code, slope, m.contiguous(), r.contiguous(), gm, gr))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        w, b, pb, pw, u, _m, _r, gm, gr = inputs[:9]
        ctx.save_for_backward(w, b, pb, pw, gm, gr, u)
        ctx.save_for_forward(w, b, pb, pw, gm, gr, u)
        ctx.act, ctx.eps = inputs[9], inputs[12]

    @staticmethod
    def backward(ctx: Any, *cotangents: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        *primals, u = ctx.saved_tensors
        got = torch.func.vjp(_composite_stats_grads_of(ctx.act, ctx.eps, u), *primals)[1](cotangents)
        # (m and r come back as constants: the composite recomputes them from the parameters)
        return (*got[:4], None, None, None, *got[4:], None, None, None, None)

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> tuple[Tensor, ...]:  # type: ignore[override]
        *primals, u = ctx.saved_tensors
        tin = (*tangents[:4], *tangents[7:9])
        ts = dense_tangents(tin, primals)
        return torch.func.jvp(_composite_stats_grads_of(ctx.act, ctx.eps, u), tuple(primals), ts)[1]

    @staticmethod
    def vmap(
        info: Any,
        in_dims: tuple[Any, ...],
        w: Tensor,
        b: Tensor,
        pb: Tensor,
        pw: Tensor,
        u: Tensor,
        m: Tensor,
        r: Tensor,
        gm: Tensor,
        gr: Tensor,
        *rest: Any,
    ) -> Any:  # type: ignore[override]
        dims = (*in_dims[:4], *in_dims[5:9], in_dims[4])  # the points last, as _vmapped_stats_call takes them
        out = _vmapped_stats_call(_StatsBackwardPointsLast, info, dims, (w, b, pb, pw, m, r, gm, gr), u, rest)
        return out, (0, 0, 0, 0)


class _StatsBackwardPointsLast:
    """:class:`_FuncProxyStatsBackward` with its points after the other vectors (for the vmap helper)."""

    @staticmethod
    def apply(
        w: Tensor,
        b: Tensor,
        pb: Tensor,
        pw: Tensor,
        m: Tensor,
        r: Tensor,
        gm: Tensor,
        gr: Tensor,
        u: Tensor,
        *rest: Any,
    ) -> Any:
        return _FuncProxyStatsBackward.apply(w, b, pb, pw, u, m, r, gm, gr, *rest)


def proxy_stats(
    weight: Tensor,
    bias: Tensor,
    proxy_bias: Tensor,
    proxy_weight: Tensor,
    points: Tensor,
    activation: Any,
    eps: float,
) -> tuple[Tensor, Tensor] | None:
    """Under a ``torch.func`` transform (and nothing else that the C++ side must stand aside for): the
    statistics as :class:`_FuncProxyStats`, or ``None``."""
    if not _active():
        return None
    code = _act_code(activation)
    if code is None or not _proxy_params_ok((weight, bias, proxy_bias, proxy_weight), points):
        return None
    return _FuncProxyStats.apply(  # type: ignore[no-any-return]
        weight, bias, proxy_bias, proxy_weight, points, activation, code[0], code[1], float(eps)
    )


# --- GroupNorm without affine + Proxy Norm's activation, one Function -------------------------------


def _gn_proxy_reference(
    x: Tensor, w: Tensor, b: Tensor, pb: Tensor, pw: Tensor, u: Tensor, cfg: tuple[Any, ...]
) -> Tensor:
    """The layer's step from normkit's reference (plain ops): what the derivatives of the recorded
    backward differentiate, and the forward where the kernels hand a batch back."""
    from ..functional.proxy_norm import proxy_norm_act
    from ..ops import core
    from . import use

    groups, eps, act, peps = cfg
    # GroupNorm by the reference's plain ops (normkit's own norm is a Function, whose rules would nest
    # their torch.func calls inside this one's: grad of grad failed there)
    N, C = x.shape[:2]
    xv = x.reshape(N, groups, C // groups, *x.shape[2:])
    y = core.norm_forward(xv, None, None, None, tuple(range(2, xv.dim())), eps)[0].reshape(x.shape)
    with use("reference"):  # (the statistics and the step as plain ops too)
        return proxy_norm_act(y, w, b, pb, pw, act, peps, u.shape[0], points=u, memory_efficient=False)


def _gn_proxy_grads_of(u: Tensor, cfg: tuple[Any, ...], needs: tuple[bool, ...]) -> Any:
    """The step's needed gradients as a differentiable function of ``(dout, x, w, b, pb, pw)``."""

    def grads(dout: Tensor, x: Tensor, w: Tensor, b: Tensor, pb: Tensor, pw: Tensor) -> tuple[Tensor, ...]:
        def step(x: Tensor, w: Tensor, b: Tensor, pb: Tensor, pw: Tensor) -> Tensor:
            return _gn_proxy_reference(x, w, b, pb, pw, u, cfg)

        vjp = torch.func.vjp(step, x, w, b, pb, pw)[1]
        return tuple(g for g, keep in zip(vjp(dout), needs) if keep)

    return grads


def _plan(x: Tensor, w: Tensor, cfg: tuple[Any, ...]) -> tuple[_Spec, int, float] | None:
    groups, eps, act, _peps = cfg
    plan = _pn_plan(x, groups, eps, w, act)
    if plan is None:
        return None
    mode, N, C, S, code, slope = plan
    return _Spec(mode, N, C, S, groups, eps, _gn_reference(groups, eps)), code, slope


def _statsas_channels(stats: Tensor, N: int) -> Tensor:
    """Per-member GroupNorm statistics ``(B, rows, N * G)`` -> those of the members-as-channels call,
    ``(rows, N * B * G)`` (its sets: sample-major, then the B * G groups)."""
    B, rows = stats.shape[:2]
    return stats.reshape(B, rows, N, -1).permute(1, 2, 0, 3).reshape(rows, -1)


def _stats_from_channels(stats: Tensor, N: int, B: int) -> Tensor:
    rows = stats.shape[0]
    return stats.reshape(rows, N, B, -1).permute(2, 0, 1, 3).reshape(B, rows, -1)


class _GNProxyAct(torch.autograd.Function):
    """:class:`~normkit.nn.GroupNormProxyAct2d`'s step under torch.func: the proxy statistics, then
    GroupNorm with the activation step in one pass (the kernels of the eager path). Outputs
    ``(out, stats, m, rstd)``; the last three (the norm's and the proxy's statistics, kept for the
    backward) are not differentiable; ``stats`` is empty where the kernels handed the batch back."""

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor, w: Tensor, b: Tensor, pb: Tensor, pw: Tensor, u: Tensor, cfg: tuple[Any, ...]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        ps = [p.contiguous() for p in (w, b, pb, pw)]
        u = u.to(ps[0].dtype).contiguous()
        plan = _plan(x, ps[0], cfg)
        code = _act_code(cfg[2])
        assert code is not None  # (checked by gn_proxy_act)
        m, r = _stats_forward(ps, u, code[0], code[1], cfg[3])
        if plan is not None:
            try:
                out, stats = _gn_act_forward(x, ps, m, r, *plan)
                return out, stats, m, r
            except _Fallback:
                pass
        w, b, pb, pw = ps
        return _gn_proxy_reference(x, w, b, pb, pw, u, cfg), x.new_empty(0, dtype=m.dtype), m, r

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        x, w, b, pb, pw, u, cfg = inputs
        ctx.save_for_backward(x, w, b, pb, pw, u, *output[1:])
        ctx.save_for_forward(x, w, b, pb, pw, u, *output[1:])
        ctx.mark_non_differentiable(*output[1:])
        ctx.cfg = cfg

    @staticmethod
    def backward(ctx: Any, dout: Tensor, *_: Any) -> tuple[Any, ...]:  # type: ignore[override]
        needs = tuple(ctx.needs_input_grad[:5])
        grads = _GNProxyActBackward.apply(dout, *ctx.saved_tensors, ctx.cfg, needs)
        it = iter(grads)
        return (*(next(it) if keep else None for keep in needs), None, None)

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> tuple[Any, ...]:  # type: ignore[override]
        x, w, b, pb, pw, u, stats, m, r = ctx.saved_tensors
        if stats.numel():
            return (
                below_jvp_level(_gnp_jvp, (x, (w, b, pb, pw), u, stats, m, r, ctx.cfg, tangents[:5])),
                None,
                None,
                None,
            )
        # (the kernels handed the batch back: the reference's forward ran, so differentiate it)
        primals = (x, w, b, pb, pw)
        ts = dense_tangents(tangents[:5], primals)
        tout = torch.func.jvp(
            lambda x, w, b, pb, pw: _gn_proxy_reference(x, w, b, pb, pw, u, ctx.cfg), primals, ts
        )[1]
        return tout, None, None, None

    @staticmethod
    def vmap(  # type: ignore[override]
        info: Any, in_dims: tuple[Any, ...], *args: Any
    ) -> tuple[tuple[Tensor, ...], tuple[int | None, ...]]:
        return _gnp_vmap(_GNProxyAct.apply, info, in_dims, *args)


def _gnp_jvp(
    x: Tensor,
    ps: tuple[Tensor, ...],
    u: Tensor,
    stats: Tensor,
    m: Tensor,
    r: Tensor,
    cfg: tuple[Any, ...],
    tangents: tuple[Any, ...],
) -> Tensor:
    """The step's forward-mode derivative from the fused forward's statistics: GroupNorm's jvp of ``t_x``,
    then the activation step's jvp (:func:`normkit.ops.proxy._jvp`, ``y = x_hat``).

    GroupNorm's Jacobian (no affine) is symmetric, so ``t_xhat`` is its backward of ``t_x``: one call
    of the backward kernel (two passes over ``x`` and ``t_x``). The proxy statistics' jvp
    (``(C, points)`` sized) runs only for parameter tangents; functorch hands zeros for the inputs
    without one, which are tested (the small ones), so a jvp w.r.t. the input skips them.
    """
    from ..ops import core
    from ..ops.proxy import _jvp as step_jvp
    from . import norm_backward

    tx, tw, tb, tpb, tpw = tangents[:1] + tuple(None if unwrapped_zero(t) else t for t in tangents[1:])
    groups, _eps, act, peps = cfg
    code = _act_code(act)
    assert code is not None  # (checked by gn_proxy_act)
    N, C = x.shape[:2]
    nd, dtype = x.dim(), m.dtype
    # x_hat = x * alpha + beta per (sample, channel), from the per-set statistics
    st = stats.reshape(core.STAT_ROWS, N, groups, 1)
    shift, inv, cmean, rstd = st[0], st[1], st[2], st[3]
    ones = (1,) * (nd - 2)
    alpha = (inv * rstd).expand(N, groups, C // groups).reshape(N, C, *ones)
    beta = (-(shift * inv + cmean) * rstd).expand(N, groups, C // groups).reshape(N, C, *ones)
    x_hat = torch.addcmul(beta, x, alpha)
    t_xhat = None
    if tx is not None:
        xv = x.reshape(N, groups, C // groups, *x.shape[2:])  # (a view for contiguous / channels_last x)
        txv = tx.reshape(xv.shape)
        if type(txv) is Tensor and txv.stride() != xv.stride():
            txv = torch.empty_like(xv).copy_(txv)  # the kernels take the tangent in x's layout
        st6 = stats.reshape(core.STAT_ROWS, N, groups, *((1,) * (xv.dim() - 2)))
        dims = tuple(range(2, xv.dim()))
        t_xhat = norm_backward(txv, xv, None, None, None, st6, dims, (True, False, False))[0]
        assert t_xhat is not None
        t_xhat = t_xhat.reshape(x.shape)
    tm = tr = None
    if any(t is not None for t in (tw, tb, tpb, tpw)):
        primals = tuple(p.to(dtype) for p in ps)
        tm, tr = torch.func.jvp(
            _composite_stats_of(act, peps, u), primals, dense_tangents((tw, tb, tpb, tpw), primals)
        )[1]
    out = step_jvp(x_hat, ps[0], ps[1], m, r, (t_xhat, tw, tb, tm, tr), _ACT_NAME[code[0]], code[1])
    return out.to(x.dtype)


def _gnp_vmap(
    apply: Any,
    info: Any,
    in_dims: tuple[Any, ...],
    x: Tensor,
    w: Tensor,
    b: Tensor,
    pb: Tensor,
    pw: Tensor,
    u: Tensor,
    cfg: tuple[Any, ...],
) -> tuple[tuple[Tensor, ...], tuple[int | None, ...]]:
    """The step's vmap rule, calling ``apply`` (:class:`_GNProxyAct`'s, or the ``normkit_func`` op's)
    with the Function's arguments ``(x, w, b, pb, pw, u, cfg)``."""
    B = info.batch_size
    x = batch_first(x, in_dims[0], B)
    N = x.shape[1]
    if all(d is None for d in in_dims[1:6]):  # shared parameters: the members are more samples
        out, stats, m, r = apply(x.reshape(B * N, *x.shape[2:]), w, b, pb, pw, u, cfg)
        stats = stats.reshape(stats.shape[0], B, -1) if stats.numel() else stats.new_empty(0, B)
        return (out.reshape(x.shape), stats, m, r), (0, 1, None, None)
    if in_dims[5] is not None:  # (the points vmapped too: one member at a time)
        us = u.movedim(in_dims[5], 0)
        ps = [batch_first(p, d, B) for p, d in zip((w, b, pb, pw), in_dims[1:5])]
        per = [apply(x[i], *(p[i] for p in ps), us[i], cfg) for i in range(B)]
        return tuple(torch.stack(col) for col in zip(*per)), (0, 0, 0, 0)
    # per-member parameters: the members become channels (groups: B * G)
    ps = [batch_first(p, d, B).reshape(-1) for p, d in zip((w, b, pb, pw), in_dims[1:5])]
    wide = (cfg[0] * B, *cfg[1:])
    out, stats, m, r = apply(as_channels(x), *ps, u, wide)
    stats = _stats_from_channels(stats, N, B) if stats.numel() else stats.expand(B, 0)
    return (from_channels(out, x.shape), stats, m.reshape(B, -1), r.reshape(B, -1)), (0, 0, 0, 0)


class _GNProxyActBackward(torch.autograd.Function):
    """:class:`_GNProxyAct`'s backward, ``(dx, dw, db, dpb, dpw)`` (those asked for), on the kernels;
    differentiable (its own derivatives differentiate the reference's composite)."""

    @staticmethod
    def forward(  # type: ignore[override]
        dout: Tensor,
        x: Tensor,
        w: Tensor,
        b: Tensor,
        pb: Tensor,
        pw: Tensor,
        u: Tensor,
        stats: Tensor,
        m: Tensor,
        r: Tensor,
        cfg: tuple[Any, ...],
        needs: tuple[bool, ...],
    ) -> tuple[Tensor, ...]:
        ps = [p.contiguous() for p in (w, b, pb, pw)]
        u = u.to(ps[0].dtype).contiguous()
        plan = _plan(x, ps[0], cfg)
        if plan is None or not stats.numel():  # (the kernels handed the batch back: the reference)
            with torch.enable_grad():
                return _gn_proxy_grads_of(u, cfg, needs)(dout, x, *ps)
        spec, code, slope = plan
        if dout.dtype != x.dtype or dout.stride() != x.stride():
            dout = torch.empty_like(x).copy_(dout)
        mc, rc = m.contiguous(), r.contiguous()
        grads = _gn_act_backward(dout, x, ps, u, mc, rc, stats.contiguous(), spec, code, slope, needs[0])
        return tuple(
            g.to(t.dtype) for g, t, keep in zip(grads, (x, w, b, pb, pw), needs) if keep and g is not None
        )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(*inputs[:7])
        ctx.save_for_forward(*inputs[:7])
        ctx.cfg, ctx.needs = inputs[10:12]

    @staticmethod
    def backward(ctx: Any, *cotangents: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        *primals, u = ctx.saved_tensors
        got = torch.func.vjp(_gn_proxy_grads_of(u, ctx.cfg, ctx.needs), *primals)[1](cotangents)
        return (*got, None, None, None, None, None, None)

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> tuple[Tensor, ...]:  # type: ignore[override]
        *primals, u = ctx.saved_tensors
        ts = dense_tangents(tangents[:6], primals)
        return torch.func.jvp(_gn_proxy_grads_of(u, ctx.cfg, ctx.needs), tuple(primals), ts)[1]

    @staticmethod
    def vmap(  # type: ignore[override]
        info: Any, in_dims: tuple[Any, ...], *args: Any
    ) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
        return _gnp_backward_vmap(_GNProxyActBackward.apply, info, in_dims, *args)


def _gnp_backward_vmap(
    apply: Any,
    info: Any,
    in_dims: tuple[Any, ...],
    dout: Tensor,
    x: Tensor,
    w: Tensor,
    b: Tensor,
    pb: Tensor,
    pw: Tensor,
    u: Tensor,
    stats: Tensor,
    m: Tensor,
    r: Tensor,
    cfg: tuple[Any, ...],
    needs: tuple[bool, ...],
) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
    """The backward's vmap rule, calling ``apply`` (:class:`_GNProxyActBackward`'s, or the
    ``normkit_func`` op's, each returning the gradients asked for) with the Function's arguments."""
    B = info.batch_size
    dout, x = batch_first(dout, in_dims[0], B), batch_first(x, in_dims[1], B)
    N = x.shape[1]
    stats = batch_first(stats, in_dims[7], B)
    out_dims = tuple(0 for keep in needs if keep)
    shared = all(d is None for d in (*in_dims[2:7], *in_dims[8:10]))
    if shared and not any(needs[1:]):  # only dx, shared parameters: the members are more samples
        fold = (dout.reshape(B * N, *x.shape[2:]), x.reshape(B * N, *x.shape[2:]))
        flat = stats.movedim(0, 1).reshape(stats.shape[1], -1) if stats.shape[-1] else stats[0]
        (dx,) = apply(*fold, w, b, pb, pw, u, flat, m, r, cfg, needs)
        return (dx.reshape(x.shape),), out_dims
    if in_dims[6] is not None:  # (the points vmapped too: one member at a time)
        us = u.movedim(in_dims[6], 0)
        vs = [batch_first(t, d, B) for t, d in zip((w, b, pb, pw), in_dims[2:6])]
        ms = [batch_first(t, d, B) for t, d in zip((m, r), in_dims[8:10])]
        per = [
            apply(
                dout[i],
                x[i],
                vs[0][i],
                vs[1][i],
                vs[2][i],
                vs[3][i],
                us[i],
                stats[i],
                ms[0][i],
                ms[1][i],
                cfg,
                needs,
            )
            for i in range(B)
        ]
        return tuple(torch.stack(col) for col in zip(*per)), out_dims
    # per-member gradients (or parameters): the members become channels
    vs = [
        batch_first(t, d, B).reshape(-1)
        for t, d in zip((w, b, pb, pw, m, r), (*in_dims[2:6], *in_dims[8:10]))
    ]
    flat = _statsas_channels(stats, N) if stats.shape[-1] else stats[0]
    wide = (cfg[0] * B, *cfg[1:])
    wv, bv, pbv, pwv, mv, rv = vs
    got = apply(as_channels(dout), as_channels(x), wv, bv, pbv, pwv, u, flat, mv, rv, wide, needs)
    it = iter(got)
    back = []
    for i, keep in enumerate(needs):
        if keep:
            g = next(it)
            back.append(from_channels(g, x.shape) if i == 0 else g.reshape(B, -1))
    return tuple(back), out_dims


# --- the same step as normkit_func ops (C++ autograd kernels; see normkit.ops.library) ---------------
# An autograd.Function costs about 0.25 ms of torch's Python per call under a transform (two per layer
# under grad). The C++ module defines `normkit_func::gn_proxy_act` and its backward as dispatcher ops
# whose autograd kernels record C++ nodes; here are their backend kernels (the Functions' forwards),
# their vmap rules (the Functions' own) and the backward's own derivative. The activation travels as
# its kernel code and slope.
_ACT_NAME = {code: name for name, code in _ACT_CODE.items()}


def _act_name(code: int, slope: float) -> str:
    name = _ACT_NAME[int(code)]
    return f"leaky_relu:{float(slope)!r}" if name == "leaky_relu" else name


def _gnp_kernel(
    x: Tensor,
    w: Tensor,
    b: Tensor,
    pb: Tensor,
    pw: Tensor,
    u: Tensor,
    groups: int,
    eps: float,
    act: int,
    slope: float,
    peps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _GNProxyAct.forward(x, w, b, pb, pw, u, (groups, eps, _act_name(act, slope), peps))


def _all_five(got: tuple[Tensor, ...], needs: tuple[bool, ...], x: Tensor) -> tuple[Tensor, ...]:
    """The gradients asked for (``got``, in order) as the backward op's five outputs: a new empty tensor
    for each one not asked for (outputs of an op never share a tensor)."""
    it = iter(got)
    return tuple(next(it) if keep else x.new_empty(0) for keep in needs)


def _gnp_backward_kernel(*args: Any) -> tuple[Tensor, ...]:
    dout, x, w, b, pb, pw, u, stats, m, r, groups, eps, act, slope, peps, needs = args
    needs = tuple(needs)
    cfg = (groups, eps, _act_name(act, slope), peps)
    return _all_five(_GNProxyActBackward.forward(dout, x, w, b, pb, pw, u, stats, m, r, cfg, needs), needs, x)


def _gnp_apply(
    x: Tensor, w: Tensor, b: Tensor, pb: Tensor, pw: Tensor, u: Tensor, cfg: tuple[Any, ...]
) -> Any:
    """The forward op, called as :class:`_GNProxyAct` is."""
    groups, eps, act, peps = cfg
    code, slope = _act_code(act)  # type: ignore[misc]
    return torch.ops.normkit_func.gn_proxy_act(x, w, b, pb, pw, u, groups, eps, code, slope, peps)


def _gnp_backward_apply(*args: Any) -> tuple[Tensor, ...]:
    """The backward op, called as :class:`_GNProxyActBackward` is (the gradients asked for)."""
    *tensors, (groups, eps, act, peps), needs = args
    code, slope = _act_code(act)  # type: ignore[misc]
    got = torch.ops.normkit_func.gn_proxy_act_backward(*tensors, groups, eps, code, slope, peps, list(needs))
    return tuple(g for g, keep in zip(got, needs) if keep)


def _gnp_op_vmap(info: Any, in_dims: tuple[Any, ...], *args: Any) -> Any:
    x, w, b, pb, pw, u, groups, eps, act, slope, peps = args
    return _gnp_vmap(
        _gnp_apply, info, in_dims, x, w, b, pb, pw, u, (groups, eps, _act_name(act, slope), peps)
    )


def _gnp_op_backward_vmap(info: Any, in_dims: tuple[Any, ...], *args: Any) -> Any:
    dout, x, w, b, pb, pw, u, stats, m, r, groups, eps, act, slope, peps, needs = args
    needs = tuple(needs)
    cfg = (groups, eps, _act_name(act, slope), peps)
    tensors = (dout, x, w, b, pb, pw, u, stats, m, r)
    outs, _ = _gnp_backward_vmap(_gnp_backward_apply, info, in_dims, *tensors, cfg, needs)
    return _all_five(outs, needs, x), tuple(0 if keep else None for keep in needs)


def _gnp_double_backward(*args: Any) -> list[Tensor]:
    """``gn_proxy_act_backward``'s own derivative, called by its C++ node: ``(d dout, d x, d w, d b, d pb,
    d pw)``, the vjp of the reference's gradients with the cotangents of the five outputs (``None``:
    zero)."""
    g = args[:5]
    dout, x, w, b, pb, pw, u, _stats, _m, _r, groups, eps, act, slope, peps, needs = args[5:]
    needs = tuple(needs)
    cfg = (groups, eps, _act_name(act, slope), peps)
    picked = [(t, like) for t, like, keep in zip(g, (x, w, b, pb, pw), needs) if keep]
    cotangents = dense_tangents([t for t, _ in picked], [like for _, like in picked])
    return list(torch.func.vjp(_gn_proxy_grads_of(u, cfg, needs), dout, x, w, b, pb, pw)[1](cotangents))


def register_ops(lib: torch.library.Library, module: Any) -> bool:
    """Give the C++ module's ``normkit_func::gn_proxy_act`` pair its kernels, vmap rules and double
    backward (called once, by :func:`normkit.ops.library._func_ops_ready`); ``False`` for a module
    without them."""
    from ..ops._vmap import register_batched

    if not hasattr(module, "set_gn_proxy_double_backward"):
        return False
    module.set_gn_proxy_double_backward(_gnp_double_backward)
    lib.impl("gn_proxy_act", _gnp_kernel, "CompositeExplicitAutograd")
    lib.impl("gn_proxy_act_backward", _gnp_backward_kernel, "CompositeExplicitAutograd")
    register_batched(lib, "gn_proxy_act", _gnp_op_vmap)
    register_batched(lib, "gn_proxy_act_backward", _gnp_op_backward_vmap)
    return True


def _forward_mode() -> bool:
    """Whether a ``jvp`` transform (``jvp``, ``jacfwd``, ``hessian``) is active: the C++ ops have no
    forward-mode rule, so :class:`_GNProxyAct` (whose jvp is analytic) runs instead."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters())


def gn_proxy_act(
    x: Tensor,
    groups: int,
    eps: float,
    weight: Tensor,
    bias: Tensor,
    proxy_bias: Tensor,
    proxy_weight: Tensor,
    points: Tensor,
    activation: Any,
    proxy_eps: float,
) -> Tensor | None:
    """GroupNorm (no affine) + Proxy Norm's activation under a torch.func transform, as one Function (the
    fused kernels each way), or ``None`` where it does not apply."""
    if not _active() or not x.is_cpu or x.dtype not in _CODE or x.dim() < 3:
        return None
    params = (weight, bias, proxy_bias, proxy_weight)
    code = _act_code(activation)
    if (
        code is None
        or not _proxy_params_ok(params, points)
        or (x.dtype == torch.float64) != (weight.dtype == torch.float64)
        or weight.shape[0] != x.shape[1]
        or (x.shape[1] // groups) * (x.numel() // max(x.shape[0] * x.shape[1], 1)) < 2
    ):
        return None
    from ..ops.library import _func_ops, _func_ops_ready

    if _func_ops_ready() and _func_ops["gn_proxy_act"] and not _forward_mode():  # (no forward-mode rule)
        args = (groups, float(eps), code[0], code[1], float(proxy_eps))
        return torch.ops.normkit_func.gn_proxy_act(x, *params, points, *args)[0]  # type: ignore[no-any-return]
    out, *_ = _GNProxyAct.apply(x, *params, points, (groups, float(eps), activation, float(proxy_eps)))
    return out  # type: ignore[no-any-return]
