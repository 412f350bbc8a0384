"""Eager fast paths for the layers: one fused C++ call per forward and one per backward.

A layer's forward normally runs through the functional op, the registered ``normkit::norm`` op
and the running-statistics update, each a few tensor operations in Python: tens of microseconds
per call, more than the arithmetic of a small input (a (2, 16, 8, 8) batch). In plain eager mode
on a CPU tensor the layers instead call :func:`batch_norm_train` / :func:`norm`, which take the
kernel pattern straight from the input's shape and layout, run ``normkit_cpu::norm_forward``
(for BatchNorm's training step ``norm_forward_train``, which also updates the running statistics
in place) and attach the fused backward with a minimal ``autograd.Function``.

They return ``None`` whenever they do not apply (not plain eager, an unusual layout or dtype, the
kernels not built, a batch the kernels hand back to the reference): the caller then runs the
general path, which computes the same thing.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.utils._python_dispatch  # the attribute below is a submodule: import it explicitly
from torch import Tensor

from ..ops import core
from . import _build

__all__ = ["batch_norm_train", "checked", "eligible", "group_norm", "layer_norm_c"]

BATCH_NCHW, BATCH_CL, GROUP_NCHW, GROUP_CL, CHANNEL_NCHW = range(5)
_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


_is_compiling = torch.compiler.is_compiling
_functorch_active = torch._C._are_functorch_transforms_active
_dispatch_mode = torch.utils._python_dispatch._get_current_dispatch_mode
_tracing_state = torch._C._get_tracing_state
_is_exporting = torch.compiler.is_exporting
_has_storage = torch._C._has_storage
_fwad = torch.autograd.forward_ad


_backend: list[Callable[[], str]] = []  # normkit.kernels.current, bound on first use (no import per call)


def eligible(x: Tensor) -> bool:
    """Whether a layer call on ``x`` may take the fused fast path (plain eager, CPU, a supported dtype)."""
    if _is_compiling():  # first: Dynamo must not look at the rest (a list bound in a trace recompiles)
        return False
    if not _backend:
        from . import current

        _backend.append(current)
    return (
        type(x) is Tensor
        and x.is_cpu
        and x.dtype in _CODE
        and x.numel() > 0
        and _backend[0]() in ("auto", "cpu")
        and (bool(_build._state["loaded"]) or _build.load(build=True))
        and not _functorch_active()
        and _fwad._current_level < 0
        and _dispatch_mode() is None
        and _tracing_state() is None
        and not _is_exporting()
        and _has_storage(x)
    )


def _layout(x: Tensor) -> str | None:
    """``"nchw"`` (contiguous), ``"cl"`` (channels last) or ``None`` (anything else)."""
    if x.is_contiguous():
        return "nchw"
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "cl"
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return "cl"
    return None


def _affine(p: Tensor | None, acc: torch.dtype) -> Tensor | None:
    if p is None or (p.dtype == acc and p.is_contiguous()):
        return p
    return p.detach().to(acc).contiguous()


class _Spec:
    """One fast call: the kernel pattern, and how to recompute it differentiably (double backward)."""

    __slots__ = ("mode", "N", "C", "S", "G", "eps", "reference", "kind")

    def __init__(
        self,
        mode: int,
        N: int,
        C: int,
        S: int,
        G: int,
        eps: float,
        reference: Callable[..., Tensor],
        kind: int = 1,
    ):
        self.mode, self.N, self.C, self.S, self.G, self.eps = mode, N, C, S, G, eps
        self.reference = reference
        # the C++ node's recomputation: 0 BatchNorm, 1 GroupNorm, 2 LayerNorm over C, 3 over the last dims
        self.kind = kind


class _Fallback(Exception):
    """The kernel handed the batch back (statistics outside its exact range): run the general path."""


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


#: whether a profiler listens (torch's C++ flag; torch.autograd does not list it in __all__)
_profiling = torch.autograd._profiler_enabled  # pyright: ignore[reportPrivateImportUsage]
#: the profiler's names for the kernels' forward by ``_Spec.kind`` (the C++ node records them, with shapes)
_EVENT = ("normkit::batch_norm", "normkit::group_norm", "normkit::layer_norm_2d", "normkit::layer_norm")


def _forward(
    x: Tensor, w: Tensor | None, b: Tensor | None, spec: _Spec, train: tuple[Any, ...] | None
) -> tuple[Tensor, Tensor]:
    if _profiling():  # an event named after the norm (free while none listens)
        with torch.profiler.record_function(_EVENT[spec.kind]):
            return _forward_kernel(x, w, b, spec, train)
    return _forward_kernel(x, w, b, spec, train)


def _forward_kernel(
    x: Tensor, w: Tensor | None, b: Tensor | None, spec: _Spec, train: tuple[Any, ...] | None
) -> tuple[Tensor, Tensor]:
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    wk = _affine(w, acc)
    bk = _affine(b, acc)
    y = torch.empty_like(x)
    mode = spec.mode
    nsets = spec.C if mode <= BATCH_CL else (spec.N * spec.S if mode == CHANNEL_NCHW else spec.N * spec.G)
    stats = torch.empty((core.STAT_ROWS, nsets), dtype=acc)
    so = _build.lib()
    if train is None:
        ok = so.normkit_forward(
            _CODE[x.dtype],
            x.data_ptr(),
            _ptr(wk),
            _ptr(bk),
            y.data_ptr(),
            stats.data_ptr(),
            mode,
            spec.N,
            spec.C,
            spec.S,
            spec.G,
            spec.eps,
        )
    else:
        rm, rv, nbt, momentum, unbiased = train
        ok = so.normkit_forward_train(
            _CODE[x.dtype],
            x.data_ptr(),
            _ptr(wk),
            _ptr(bk),
            y.data_ptr(),
            stats.data_ptr(),
            rm.data_ptr(),
            rv.data_ptr(),
            _ptr(nbt),
            mode,
            spec.N,
            spec.C,
            spec.S,
            spec.eps,
            -1.0 if momentum is None else float(momentum),
            int(unbiased),
        )
    if not ok:
        raise _Fallback
    return y, stats


class _FastNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor | None, b: Tensor | None, spec: _Spec, train: Any) -> Tensor:  # type: ignore[override]
        y, stats = _forward(x, w, b, spec, train)
        ctx.save_for_backward(x, w, b, stats)
        ctx.spec = spec
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, w, b, stats = ctx.saved_tensors
        spec: _Spec = ctx.spec
        needs = ctx.needs_input_grad[:3]
        # create_graph=True, or a batched gradient without storage (gradcheck's check_batched_grad):
        # differentiate a differentiable recomputation
        if torch.is_grad_enabled() or type(dy) is not Tensor or not torch._C._has_storage(dy):
            create = torch.is_grad_enabled()
            with torch.enable_grad():
                inputs = [t for t, n in zip((x, w, b), needs) if n and t is not None]
                y = spec.reference(x, w, b)
                grads = iter(torch.autograd.grad(y, inputs, dy, create_graph=create))
            return (
                *(next(grads) if (n and t is not None) else None for t, n in zip((x, w, b), needs)),
                None,
                None,
            )
        if dy.dtype != x.dtype or dy.stride() != x.stride():
            dy = torch.empty_like(x).copy_(dy)
        acc = stats.dtype
        need_w = needs[1] and w is not None
        need_b = needs[2] and b is not None
        dx = torch.empty_like(x) if needs[0] else None
        dw = torch.empty(spec.C, dtype=acc) if need_w else None
        db = torch.empty(spec.C, dtype=acc) if need_b else None
        wk = _affine(w, acc)  # held: the kernel reads its memory
        _build.lib().normkit_backward(
            _CODE[x.dtype],
            dy.data_ptr(),
            x.data_ptr(),
            _ptr(wk),
            stats.data_ptr(),
            _ptr(dx),
            _ptr(dw),
            _ptr(db),
            spec.mode,
            spec.N,
            spec.C,
            spec.S,
            spec.G,
        )  # the statistics are the kernel's own (never the reference's scaled ones): it always succeeds
        return (
            dx if needs[0] else None,
            (dw if dw.dtype == w.dtype else dw.to(w.dtype)).view(w.shape) if need_w else None,  # type: ignore[union-attr]
            (db if db.dtype == b.dtype else db.to(b.dtype)).view(b.shape) if need_b else None,  # type: ignore[union-attr]
            None,
            None,
        )


def _params_ok(x: Tensor, *params: Tensor | None) -> bool:
    """The parameter dtypes the functional ops accept (their checks raise the error otherwise)."""
    xd = x.dtype
    for p in params:
        if p is None:
            continue
        if p.dtype != xd and not (p.dtype == torch.float32 and xd in (torch.float16, torch.bfloat16)):
            return False
        if not p.is_cpu:
            return False
    return True


def _node() -> Any:
    """The C++ autograd node's module (built on first use), or ``None`` (the Python Function then runs)."""
    mod = _build._autograd["module"]
    if mod is None and not _build._autograd["tried"]:
        mod = _build.autograd_module()
    return mod


def _run(x: Tensor, w: Tensor | None, b: Tensor | None, spec: _Spec, train: Any) -> Tensor | None:
    if not _params_ok(x, w, b):
        return None
    node = _node()
    # one C++ call: kernel and autograd node (None: the general path). The C++ Function counts an
    # absent optional affine differently from a present one, so a lone weight or bias (functional
    # calls only; the layers have both or neither) takes the Python Function.
    if node is not None and (w is None) == (b is None):
        if train is None:
            return node.fast_norm(  # type: ignore[no-any-return]
                x,
                w,
                b,
                spec.mode,
                spec.N,
                spec.C,
                spec.S,
                spec.G,
                spec.kind,
                spec.eps,
                None,
                None,
                None,
                -1.0,
                False,
            )
        rm, rv, nbt, momentum, unbiased = train
        return node.fast_norm(  # type: ignore[no-any-return]
            x,
            w,
            b,
            spec.mode,
            spec.N,
            spec.C,
            spec.S,
            spec.G,
            spec.kind,
            spec.eps,
            rm,
            rv,
            nbt,
            -1.0 if momentum is None else float(momentum),
            bool(unbiased),
        )
    try:
        if torch.is_grad_enabled() and (
            x.requires_grad or (w is not None and w.requires_grad) or (b is not None and b.requires_grad)
        ):
            return _FastNorm.apply(x, w, b, spec, train)  # type: ignore[no-any-return]
        return _forward(x, w, b, spec, train)[0]
    except _Fallback:
        return None


def checked(op: str, x: Tensor, *args: Any) -> Any:
    """A functional op's whole call in C++ (``"group_norm"``, ``"layer_norm"``, ``"layer_norm_2d"``: the
    output; ``"batch_norm"`` with batch statistics: the output and running statistics), or ``None``.

    The C++ node checks the Python arguments as the functional checks do and runs the fused kernel;
    it returns ``None`` for anything it does not take exactly (bad arguments included, so that the
    caller's general path raises the typed error), or when the node is not built. Call it only when
    :func:`eligible` holds.
    """
    node = _node()
    if node is None:
        return None
    return getattr(node, op + "_checked")(x, *args)


def _spatial(x: Tensor) -> int:
    return math.prod(x.shape[2:])


def batch_norm_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    eps: float,
    unbiased: bool,
    num_skipped_updates: Tensor | None = None,
) -> Tensor | None:
    """A BatchNorm layer's training step (batch statistics; running statistics, if any, updated in place), or
    ``None``. The same interface as :func:`normkit.kernels._direct.batch_norm_train`;
    ``num_skipped_updates`` is never written here: a batch with non-finite statistics is handed back
    (``None``) and the general path counts it."""
    acc = core.acc_dtype(x.dtype)
    if running_mean is None or running_var is None:
        train = None
    elif (
        running_mean.dtype != acc
        or running_var.dtype != acc
        or not running_mean.is_contiguous()
        or not running_var.is_contiguous()
        or (num_batches_tracked is not None and num_batches_tracked.dtype != torch.int64)
    ):
        return None
    else:
        train = (running_mean, running_var, num_batches_tracked, momentum, unbiased)
    layout = _layout(x)
    if layout is None:
        return None
    N, C = x.shape[0], x.shape[1]
    S = _spatial(x)
    if N * S < 2:
        return None
    if x.dim() == 2 or layout == "cl":
        spec = _Spec(BATCH_CL, N, C, S, 1, eps, _bn_reference(eps), 0)
    else:
        spec = _Spec(BATCH_NCHW, N, C, S, 1, eps, _bn_reference(eps), 0)
    return _run(x, weight, bias, spec, train)


_BN_REFS: dict[float, Callable[..., Tensor]] = {}


def _bn_reference(eps: float) -> Callable[..., Tensor]:
    if eps in _BN_REFS:
        return _BN_REFS[eps]

    def ref(x: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
        from ..functional.batch_norm import batch_norm
        from . import use

        with use("reference"):
            return batch_norm(x, None, None, w, b, training=True, eps=eps).output

    _BN_REFS[eps] = ref
    return ref


_GN_SPECS: dict[tuple[Any, ...], _Spec | None] = {}


def group_norm(
    x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor | None:
    """GroupNorm (``groups = C``: InstanceNorm without running statistics; 1: LN over (C, *spatial)), or
    ``None``."""
    key = (x.shape, x.stride(), groups, eps)
    spec: _Spec | Literal[False] | None = _GN_SPECS.get(key, False)  # False: not cached yet
    if spec is False:  # this shape and layout's kernel pattern (cached: the per-call cost matters at B=2)
        spec = None
        layout = _layout(x) if x.dim() >= 3 else None
        if layout is not None:
            N, C = x.shape[0], x.shape[1]
            S = _spatial(x)
            if (C // groups) * S >= 2:
                mode = GROUP_CL if layout == "cl" else GROUP_NCHW
                spec = _Spec(mode, N, C, S, groups, eps, _gn_reference(groups, eps))
        if len(_GN_SPECS) > 4096:
            _GN_SPECS.clear()
        _GN_SPECS[key] = spec
    if spec is None:
        return None
    return _run(x, weight, bias, spec, None)


_GN_REFS: dict[tuple[int, float], Callable[..., Tensor]] = {}


def _gn_reference(groups: int, eps: float) -> Callable[..., Tensor]:
    key = (groups, eps)
    if key not in _GN_REFS:

        def ref(x: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
            from ..functional.group_norm import group_norm as gn
            from . import use

            with use("reference"):
                return gn(x, groups, w, b, eps)

        _GN_REFS[key] = ref
    return _GN_REFS[key]


_ROW_SPECS: dict[tuple[Any, ...], _Spec | None] = {}


def layer_norm_rows(
    x: Tensor, k: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor | None:
    """LayerNorm over the last ``k`` dims of a contiguous ``x`` (element-wise affine of that shape), or
    ``None``.

    The kernels see rows: ``x``'s memory as ``(N, D)`` and the affine's as ``(D,)``, a GroupNorm with
    one group over ``D`` channels; no views are made (each costs a node when autograd records).
    """
    key = (x.shape, k, eps)
    spec: _Spec | Literal[False] | None = _ROW_SPECS.get(key, False)  # False: not cached yet
    if spec is False:
        spec = None
        D = math.prod(x.shape[x.dim() - k :])
        if D >= 2:
            spec = _Spec(GROUP_NCHW, x.numel() // D, D, 1, 1, eps, _rows_reference(k, eps), 3)
        if len(_ROW_SPECS) > 4096:
            _ROW_SPECS.clear()
        _ROW_SPECS[key] = spec
    if spec is None or not x.is_contiguous():
        return None
    for p in (weight, bias):
        if p is not None and not p.is_contiguous():
            return None
    return _run(x, weight, bias, spec, None)


def _rows_reference(k: int, eps: float) -> Callable[..., Tensor]:
    def ref(x: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
        from ..functional.layer_norm import layer_norm
        from . import use

        with use("reference"):
            return layer_norm(x, x.shape[x.dim() - k :], w, b, eps)

    return ref


def layer_norm_c(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor | None:
    """LayerNorm over the channel dim of an (N, C, *spatial) input (LayerNorm2d, ConvNeXt), or ``None``."""
    if x.dim() < 3:
        return None
    layout = _layout(x)
    if layout is None or x.shape[1] < 2:
        return None
    N, C = x.shape[0], x.shape[1]
    S = _spatial(x)

    def ref(x: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
        from ..functional.layer_norm import layer_norm_2d
        from . import use

        with use("reference"):
            return layer_norm_2d(x, w, b, eps)

    if layout == "cl":  # rows of C values
        return _run(x, weight, bias, _Spec(GROUP_NCHW, N * S, C, 1, 1, eps, ref, 2), None)
    return _run(x, weight, bias, _Spec(CHANNEL_NCHW, N, C, S, 1, eps, ref, 2), None)


# ---- Proxy Norm -------------------------------------------------------------------------------------
# The proxy statistics are C x 200 quadrature evaluations: as plain ops (about ten forward, twenty
# backward) their dispatch costs more than the arithmetic; here they are one C++ call each way. The
# GroupNorm + Proxy-Norm layer runs as one Function over three fused calls each way.

_ACT_CODE = {"relu": 0, "leaky_relu": 1, "identity": 7}  # activations the C++ side evaluates exactly and fast


def _act_code(activation: Any) -> tuple[int, float] | None:
    from ..functional.activations import activation_spec

    spec = activation_spec(activation)
    if spec is None or spec[0] not in _ACT_CODE:
        return None
    return _ACT_CODE[spec[0]], float(spec[1])


def _proxy_params_ok(params: tuple[Tensor, ...], points: Tensor) -> bool:
    """Whether the four (C,) parameter vectors and the points suit the C++ side: one float32 / float64
    dtype, on the CPU, one shape; the points 1-d on the CPU."""
    dtype, shape = params[0].dtype, params[0].shape
    if (
        dtype not in (torch.float32, torch.float64)
        or len(shape) != 1
        or not points.is_cpu
        or points.dim() != 1
    ):
        return False
    return all(p.dtype == dtype and p.is_cpu and p.shape == shape for p in params)


def _proxy_params(params: tuple[Tensor, ...], points: Tensor) -> tuple[list[Tensor], Tensor] | None:
    """The parameters detached and contiguous, and the points in their dtype, or ``None`` (see
    :func:`_proxy_params_ok`)."""
    if not _proxy_params_ok(params, points):
        return None
    return _dense(*params), _points(points, params[0].dtype)


def _dense(*ts: Tensor) -> list[Tensor]:
    """Detached and contiguous, as the C kernels read them (a parametrization may hand over a strided
    view, an ``expand`` among them, as a parameter)."""
    return [t.detach().contiguous() for t in ts]


def _stats_forward(ps: list[Tensor], u: Tensor, code: int, slope: float, eps: float) -> tuple[Tensor, Tensor]:
    C = ps[0].shape[0]
    m, r = ps[0].new_empty(C), ps[0].new_empty(C)
    _build.lib().normkit_proxy_stats(
        0 if ps[0].dtype == torch.float32 else 1,
        *(p.data_ptr() for p in ps),
        u.data_ptr(),
        u.shape[0],
        C,
        code,
        slope,
        float(eps),
        m.data_ptr(),
        r.data_ptr(),
    )
    return m, r


def _stats_backward(
    ps: list[Tensor],
    u: Tensor,
    code: int,
    slope: float,
    m: Tensor,
    r: Tensor,
    gm: Tensor | None,
    gr: Tensor | None,
) -> list[Tensor]:
    C = ps[0].shape[0]
    dtype = ps[0].dtype
    gm = None if gm is None else gm.detach().to(dtype).contiguous()
    gr = None if gr is None else gr.detach().to(dtype).contiguous()
    out = [ps[0].new_empty(C) for _ in range(4)]
    _build.lib().normkit_proxy_stats_backward(
        0 if dtype == torch.float32 else 1,
        *(p.data_ptr() for p in ps),
        u.data_ptr(),
        u.shape[0],
        C,
        code,
        slope,
        m.data_ptr(),
        r.data_ptr(),
        _ptr(gm),
        _ptr(gr),
        *(t.data_ptr() for t in out),
    )
    return out  # dweight, dbias, dproxy_bias, dproxy_weight


def _composite_stats(
    w: Tensor, b: Tensor, pb: Tensor, pw: Tensor, u: Tensor, act: Any, eps: float
) -> tuple[Tensor, Tensor]:
    from ..functional.proxy_norm import proxy_stats

    with _no_fast():
        return proxy_stats(w, b, pb, pw, act, eps, u.shape[0], u)  # type: ignore[no-any-return]


class _NoFast:
    depth = 0


class _no_fast:
    """Within: the fast paths stand aside (the differentiable recomputations of a double backward)."""

    def __enter__(self) -> None:
        _NoFast.depth += 1

    def __exit__(self, *exc: Any) -> None:
        _NoFast.depth -= 1


def _leaf(t: Tensor) -> Tensor:
    """``t`` itself when it requires grad, else a detached copy that does (for ``torch.autograd.grad``,
    which refuses an input outside the graph; the gradient of a tensor that needs none is dropped)."""
    return t if t.requires_grad else t.detach().requires_grad_()


class _FastProxyStats(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        w: Tensor,
        b: Tensor,
        pb: Tensor,
        pw: Tensor,
        u: Tensor,
        act: Any,
        code: int,
        slope: float,
        eps: float,
    ):
        ps = _dense(w, b, pb, pw)
        m, r = _stats_forward(ps, u, code, slope, eps)
        ctx.save_for_backward(w, b, pb, pw, u, m, r)
        ctx.act, ctx.code, ctx.slope, ctx.eps = act, code, slope, eps
        return m, r

    @staticmethod
    def backward(ctx: Any, gm: Tensor | None, gr: Tensor | None) -> tuple[Any, ...]:  # type: ignore[override]
        w, b, pb, pw, u, m, r = ctx.saved_tensors
        # create_graph=True, or gradcheck's batched gradients (no storage): differentiate the composite
        if torch.is_grad_enabled() or not all(
            g is None or (type(g) is Tensor and torch._C._has_storage(g)) for g in (gm, gr)
        ):
            with torch.enable_grad():
                params = [_leaf(t) for t in (w, b, pb, pw)]  # (a frozen parameter too: grad() needs all)
                wi, bi, pbi, pwi = params
                outs = _composite_stats(wi, bi, pbi, pwi, u, ctx.act, ctx.eps)
                pairs = [(o, g) for o, g in zip(outs, (gm, gr)) if g is not None]
                grads = torch.autograd.grad(
                    [o for o, _ in pairs], params, [g for _, g in pairs], create_graph=True, allow_unused=True
                )
            return (*grads, None, None, None, None, None)
        return (
            *_stats_backward(_dense(w, b, pb, pw), u, ctx.code, ctx.slope, m, r, gm, gr),
            None,
            None,
            None,
            None,
            None,
        )


def _proxy_ok() -> bool:
    return (
        _NoFast.depth == 0
        and not torch.compiler.is_compiling()
        and (bool(_build._state["loaded"]) or _build.load(build=True))
        and not torch._C._are_functorch_transforms_active()
        and torch.autograd.forward_ad._current_level < 0
        and torch.utils._python_dispatch._get_current_dispatch_mode() is None
        # torch.jit.is_tracing is public API that torch.jit.__all__ leaves out:
        and not torch.jit.is_tracing()  # pyright: ignore[reportPrivateImportUsage]
        and not torch.compiler.is_exporting()
    )


def proxy_stats(
    weight: Tensor,
    bias: Tensor,
    proxy_bias: Tensor,
    proxy_weight: Tensor,
    points: Tensor,
    activation: Any,
    eps: float,
) -> tuple[Tensor, Tensor] | None:
    """:func:`normkit.functional.proxy_stats` in one C++ call each way, or ``None`` where it does not
    apply."""
    from . import current

    if current() not in ("auto", "cpu"):
        return None
    if not _proxy_ok():  # under a torch.func transform: the same kernels with torch.func's rules
        from . import _func

        return _func.proxy_stats(weight, bias, proxy_bias, proxy_weight, points, activation, eps)
    code = _act_code(activation)
    got = _proxy_params((weight, bias, proxy_bias, proxy_weight), points)
    if code is None or got is None:
        return None
    ps, u = got
    if torch.is_grad_enabled() and any(p.requires_grad for p in (weight, bias, proxy_bias, proxy_weight)):
        return _FastProxyStats.apply(  # type: ignore[no-any-return]
            weight, bias, proxy_bias, proxy_weight, u, activation, code[0], code[1], float(eps)
        )
    return _stats_forward(ps, u, code[0], code[1], eps)


def _gn_act_forward(
    x: Tensor, ps: list[Tensor], m: Tensor, r: Tensor, spec: _Spec, code: int, slope: float
) -> tuple[Tensor, Tensor]:
    if _profiling():
        with torch.profiler.record_function("normkit::group_norm_proxy_act"):
            return _gn_act_kernel(x, ps, m, r, spec, code, slope)
    return _gn_act_kernel(x, ps, m, r, spec, code, slope)


def _gn_act_kernel(
    x: Tensor, ps: list[Tensor], m: Tensor, r: Tensor, spec: _Spec, code: int, slope: float
) -> tuple[Tensor, Tensor]:
    out = torch.empty_like(x)
    stats = torch.empty((core.STAT_ROWS, spec.N * spec.G), dtype=m.dtype)
    ok = _build.lib().normkit_gn_act_forward(
        _CODE[x.dtype],
        x.data_ptr(),
        ps[0].data_ptr(),
        ps[1].data_ptr(),
        m.data_ptr(),
        r.data_ptr(),
        out.data_ptr(),
        stats.data_ptr(),
        spec.mode,
        spec.N,
        spec.C,
        spec.S,
        spec.G,
        spec.eps,
        code,
        slope,
    )
    if not ok:
        raise _Fallback
    return out, stats


class _FastGNProxy(torch.autograd.Function):
    """GroupNorm without affine, then Proxy Norm's activation, in two fused calls each way: the proxy
    statistics, and the norm with the activation step in one pass (the normalized input is never stored;
    the backward recomputes it from x and the statistics)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        w: Tensor,
        b: Tensor,
        pb: Tensor,
        pw: Tensor,
        u: Tensor,
        spec: _Spec,
        act: Any,
        code: int,
        slope: float,
        peps: float,
    ):
        ps = _dense(w, b, pb, pw)
        m, r = _stats_forward(ps, u, code, slope, peps)
        out, stats = _gn_act_forward(x, ps, m, r, spec, code, slope)
        ctx.save_for_backward(x, stats, w, b, pb, pw, u, m, r)
        ctx.spec, ctx.act, ctx.code, ctx.slope, ctx.peps = spec, act, code, slope, peps
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, stats, w, b, pb, pw, u, m, r = ctx.saved_tensors
        spec: _Spec = ctx.spec
        # create_graph=True, or gradcheck's batched gradients (no storage): differentiate the composite
        if torch.is_grad_enabled() or type(dout) is not Tensor or not torch._C._has_storage(dout):
            from ..functional.group_norm import group_norm as gn
            from ..functional.proxy_norm import proxy_norm_act
            from . import use

            with torch.enable_grad(), use("reference"):
                inputs = [_leaf(t) for t in (x, w, b, pb, pw)]  # (a frozen parameter too: grad() needs all)
                xi, wi, bi, pbi, pwi = inputs
                out = proxy_norm_act(
                    gn(xi, spec.G, None, None, spec.eps),
                    wi,
                    bi,
                    pbi,
                    pwi,
                    ctx.act,
                    ctx.peps,
                    u.shape[0],
                    points=u,
                )
                grads = torch.autograd.grad(out, inputs, dout, create_graph=True, allow_unused=True)
            return (*grads, None, None, None, None, None, None)
        if dout.dtype != x.dtype or dout.stride() != x.stride():
            dout = torch.empty_like(x).copy_(dout)
        ps = _dense(w, b, pb, pw)
        grads = _gn_act_backward(
            dout, x, ps, u, m, r, stats, spec, ctx.code, ctx.slope, ctx.needs_input_grad[0]
        )
        return *grads, None, None, None, None, None, None


def _gn_act_backward(
    dout: Tensor,
    x: Tensor,
    ps: list[Tensor],
    u: Tensor,
    m: Tensor,
    r: Tensor,
    stats: Tensor,
    spec: _Spec,
    code: int,
    slope: float,
    need_x: bool,
) -> tuple[Tensor | None, Tensor, Tensor, Tensor, Tensor]:
    """GroupNorm + Proxy Norm activation's backward on the kernels: ``(dx, dweight, dbias, dproxy_bias,
    dproxy_weight)`` (``dx`` ``None`` unless ``need_x``). ``dout`` laid out as ``x``; ``ps`` the four
    parameters and ``m``, ``r``, ``stats`` contiguous."""
    dx = torch.empty_like(x) if need_x else None
    sums = torch.empty(4, spec.C, dtype=torch.float64)
    _build.lib().normkit_gn_act_backward(
        _CODE[x.dtype],
        dout.data_ptr(),
        x.data_ptr(),
        ps[0].data_ptr(),
        ps[1].data_ptr(),
        m.data_ptr(),
        r.data_ptr(),
        stats.data_ptr(),
        _ptr(dx),
        sums.data_ptr(),
        spec.mode,
        spec.N,
        spec.C,
        spec.S,
        spec.G,
        code,
        slope,
    )
    sums = sums.to(m.dtype)
    dw_s, db_s, dpb, dpw = _stats_backward(ps, u, code, slope, m, r, -(sums[2] * r), sums[3])
    return dx, dw_s.add_(sums[0]), db_s.add_(sums[1]), dpb, dpw


_U_CACHE: dict[tuple[Any, ...], tuple[Any, Tensor]] = {}


def _points(points: Tensor, dtype: torch.dtype) -> Tensor:
    """The quadrature points in the parameters' dtype, contiguous (cached per buffer and version).

    A hit must be the same live tensor (a weak reference), not a recycled address: points passed by
    the user may differ from the layer's.
    """
    if points.dtype == dtype and points.is_contiguous():
        return points.detach()
    if points.is_inference():  # (an inference tensor has no version counter to key a cache on)
        return points.detach().to(dtype).contiguous()
    key = (id(points), points.data_ptr(), points._version, points.shape[0], dtype)
    hit = _U_CACHE.get(key)
    if hit is not None and hit[0]() is points:
        return hit[1]
    if len(_U_CACHE) > 64:
        _U_CACHE.clear()
    u = points.detach().to(dtype).contiguous()
    _U_CACHE[key] = (weakref.ref(points), u)
    return u


_PN_PLANS: dict[tuple[Any, ...], tuple[int, int, int, int, int, float] | None] = {}


def _pn_plan(
    x: Tensor, groups: int, eps: float, weight: Tensor, activation: Any
) -> tuple[int, int, int, int, int, float] | None:
    """(mode, N, C, S, act code, slope) of the fused GroupNorm + Proxy Norm call, or ``None`` (cached)."""
    # the activation itself in the key (names and functions hash by value or identity; the key keeps it
    # alive, so its id is never reused for another one while cached), a Module by what it computes (a
    # deleted layer's PReLU, with its weight and gradient, is not kept alive by the cache; a LeakyReLU
    # whose slope changes gets its new code)
    act = ("module", _act_code(activation)) if isinstance(activation, torch.nn.Module) else activation
    try:
        key = (x.shape, x.stride(), x.dtype, groups, eps, act, weight.dtype)
        hash(key)
    except TypeError:
        return _pn_plan_uncached(x, groups, weight, activation)
    plan: tuple[int, int, int, int, int, float] | Literal[False] | None = _PN_PLANS.get(key, False)
    if plan is False:
        plan = _pn_plan_uncached(x, groups, weight, activation)
        if len(_PN_PLANS) > 4096:
            _PN_PLANS.clear()
        _PN_PLANS[key] = plan
    return plan


def _pn_plan_uncached(
    x: Tensor, groups: int, weight: Tensor, activation: Any
) -> tuple[int, int, int, int, int, float] | None:
    code = _act_code(activation)
    layout = _layout(x) if x.dim() >= 3 else None
    if code is None or layout is None or (x.dtype == torch.float64) != (weight.dtype == torch.float64):
        return None
    N, C = x.shape[0], x.shape[1]
    S = _spatial(x)
    if (C // groups) * S < 2 or weight.shape[0] != C:
        return None
    return (GROUP_CL if layout == "cl" else GROUP_NCHW, N, C, S, code[0], code[1])


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
    """GroupNorm (no affine) + Proxy Norm's activation, the :class:`~normkit.nn.GroupNormProxyAct2d` step, or
    ``None``."""
    if _NoFast.depth:
        return None
    plan = _pn_plan(x, groups, eps, weight, activation)
    if plan is None:
        return None
    params = (weight, bias, proxy_bias, proxy_weight)
    mode, N, C, S, code, slope = plan
    dtype = weight.dtype
    if dtype in (torch.float16, torch.bfloat16) and x.dtype == dtype:  # half parameters: float32 copies
        params = tuple(p.float() if p.dtype == dtype else p for p in params)  # (differentiable casts)
        dtype = torch.float32
    if (x.dtype == torch.float64) != (dtype == torch.float64) or not _proxy_params_ok(params, points):
        return None
    node = _node()
    if node is not None and all(p.is_contiguous() for p in params):  # one C++ call: kernels and autograd node
        return node.gn_proxy_act(  # type: ignore[no-any-return]
            x, *params, _points(points, dtype), mode, N, C, S, groups, eps, code, slope, float(proxy_eps)
        )
    spec = _Spec(mode, N, C, S, groups, eps, _gn_reference(groups, eps))
    ps, u = _dense(*params), _points(points, dtype)
    try:
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
            return _FastGNProxy.apply(x, *params, u, spec, activation, code, slope, float(proxy_eps))  # type: ignore[no-any-return]
        m, r = _stats_forward(ps, u, code, slope, proxy_eps)
        return _gn_act_forward(x, ps, m, r, spec, code, slope)[0]
    except _Fallback:
        return None
