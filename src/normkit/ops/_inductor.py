"""What Inductor (``torch.compile``'s default backend) makes of normkit's ops.

A compiled graph holds one ``normkit.norm`` / ``normkit.proxy_norm_act`` node per norm (what Dynamo,
custom backends and graph tools see). Left opaque, Inductor would call each of them through Python
(the registered op, then normkit's dispatch) and could fuse nothing around it. So when Inductor
lowers a graph it decomposes them, per node, into one of two things:

* **ATen ops** (:func:`normkit.ops.core.norm_forward_fused` / :func:`~normkit.ops.core.norm_backward`:
  normkit's statistics in a form whose reductions depend on the input alone, so Inductor reads
  it once for them (Welford's loop; small sets on the CPU: its two-step variance, as for torch's
  own norms), then once for the output; and the Proxy Norm step's
  ATen formula), which Inductor compiles into its own fused loops together with the surrounding
  activation, residual add or cast: no Python per call. This wins where a call's arithmetic is
  small next to the cost of calling out (GroupNorm + ReLU forward + backward on (2, 32, 8, 8),
  2-core CPU: 238-264 us against 392-423 us through the kernels; torch.nn compiled 220-239 us);
* **the same kernels as in eager** (``normkit::norm_kernel`` and friends: the fused CPU kernels,
  the Triton kernels, torch's op where ``auto`` routes there), where Inductor's generated loops
  are slower than normkit's kernels (the same layer on (8, 64, 32, 32): 6696-7686 us generated,
  4767-5608 us through the kernels; on the CPU Inductor's Welford loop costs more arithmetic per
  value than normkit's kernels).

:func:`generated` decides, from the input's size and device: on the CPU up to :data:`LIMITS`
elements (32768, from ``benchmarks/inductor_crossover.py``, docs/PERFORMANCE.md §6), and a graph
with symbolic sizes (``dynamic=True``) keeps the kernels there (no guard on the size); on CUDA
always, symbolic sizes too (on an H200, torch.compile's code for GroupNorm on ResNet-50's
(64, 256, 56, 56) in bf16 ran 2.2-4x faster forward and 1.2-1.6x faster forward + backward than
normkit's Triton kernels of 2026-12-04, and small inputs are the host's time there: docs/PERFORMANCE.md §5;
that machine's torch 2.11 compiled normkit's GroupNorm into ATen's, so this is Inductor's code for
torch's GroupNorm, not yet normkit's composite;
``benchmarks/gpu_check.sh`` stage 5 measures the crossover again). The choice does not
follow ``normkit.kernels.use(...)``: a compiled call takes Inductor's code for a small input
whatever the backend, and the backend in force when a large one runs (as in eager). Nothing else
changes: ``torch.export`` and ONNX record ATen's norms as before, and other backends
(``aot_eager``, custom ones) see the normkit nodes.

The decompositions go into Inductor's table the first time Dynamo traces a normkit op
(:func:`ensure`, from the ops' fake implementations), so ``import normkit`` does not import
Inductor (about a second). Inductor's on-disk caches key a graph by Dynamo's graph, which is the
same whichever way the ops decompose: a graph compiled once keeps its choice. After changing
:data:`LIMITS`, or upgrading or downgrading normkit across a change of these decompositions (or of
the ``*_kernel`` ops), remove Inductor's cache directory (``TORCHINDUCTOR_CACHE_DIR``, by default
``/tmp/torchinductor_<user>``) or compile with ``TORCHINDUCTOR_FX_GRAPH_CACHE=0
TORCHINDUCTOR_AUTOGRAD_CACHE=0``, or the compiled model keeps what its cache holds.

Example:
    >>> import torch
    >>> from normkit.ops import _inductor
    >>> _inductor.generated(torch.empty(2, 64, 8, 8))     # 4096 values: Inductor's own loops
    True
    >>> _inductor.generated(torch.empty(32, 64, 56, 56))  # normkit's CPU kernels
    False
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["LIMITS", "ensure", "generated", "installed", "register_op"]

LIMITS: dict[str, int | None] = {"cpu": 32768, "cuda": None}
"""Per device type, the largest input (elements) whose norm Inductor generates code for; larger ones,
and symbolic sizes, call normkit's kernels. ``None``: every input, symbolic sizes too. A device
type not listed always calls the kernels."""

_state: dict[str, Any] = {"done": False, "error": None}


def generated(x: Tensor) -> bool:
    """Whether Inductor computes a norm on ``x`` in its own generated code (else it calls the kernels).

    Example:
        >>> generated(torch.empty(2, 4, 3, 3)), generated(torch.empty(64, 256, 56, 56))
        (True, False)
        >>> generated(torch.empty(64, 256, 56, 56, device="meta"))  # a device type not listed
        False
    """
    limit = LIMITS.get(x.device.type, -1)
    if limit is None:
        return True
    n = x.numel()
    return isinstance(n, int) and n <= limit


def installed() -> bool:
    """Whether the decompositions are in Inductor's table (after the first compiled normkit op).

    Example:
        >>> installed() in (True, False)
        True
    """
    return bool(_state["done"]) and _state["error"] is None


def ensure() -> None:
    """Put the decompositions into Inductor's table, once, while Dynamo traces (else nothing).

    Called from the ops' fake implementations, which Dynamo runs before a graph reaches its
    backend. Inductor's table is private API: if it is not where this expects it, the ops stay
    opaque (correct, and as fast as eager), and the reason is kept in ``_state["error"]``.

    Example:
        >>> ensure()   # outside torch.compile: does nothing
    """
    from .core import compiling

    if _state["done"] or not compiling():
        return
    _state["done"] = True
    try:
        from torch._inductor import decomposition as table_module
    except Exception as e:  # (a torch without Inductor)
        _state["error"] = f"{type(e).__name__}: {e}"
        return
    ops = torch.ops.normkit
    table: list[tuple[Any, Callable[..., Any]]] = [
        (ops.norm.default, _norm),
        (ops.norm_backward.default, _norm_backward),
        (ops.proxy_norm_act.default, _proxy_act),
        (ops.proxy_norm_act_backward.default, _proxy_act_backward),
    ]
    try:
        for op, fn in table:
            if op not in table_module.decompositions:  # (already there: this module was reloaded)
                table_module.register_decomposition(op)(fn)
        # Inductor copies its table once (with its random-op decompositions): a copy taken by an
        # earlier compile in this process must not miss these
        copy = getattr(table_module, "fast_random_decomps", None)
        if copy is not None and hasattr(copy, "cache_clear"):
            copy.cache_clear()
        missing = [str(op) for op, _ in table if op not in table_module.select_decomp_table()]
        if missing:
            _state["error"] = f"not in Inductor's table after registering: {', '.join(missing)}"
    except Exception as e:  # (the private table moved or changed shape)
        _state["error"] = f"{type(e).__name__}: {e}"


def register_op(
    name: str,
    impl: Callable[..., Any],
    fake: Callable[..., Any],
    prepare: Callable[..., Sequence[Any]],
) -> Any:
    """Register ``normkit::<name>`` (what a model's graph holds, running ``impl``) and
    ``normkit::<name>_kernel``, the name Inductor calls where normkit's kernels beat its generated
    code (this module's decompositions turn the first into ATen ops or into the second; no autograd
    on the second: it only ever appears after them). Returns the first.

    The second is tagged ``flexible_layout``: Inductor hands it its inputs in the layout it chose
    for them (a convolution's output is channels-last on the CPU) instead of copying them into the
    strides the traced graph had, and takes the outputs' strides from ``fake`` run on those inputs.
    So it runs ``impl(*prepare(*args))``: ``prepare`` makes a non-dense input dense (as
    ``torch.empty_like`` lays it out, which is what ``fake`` declares) and brings the inputs that
    must match it (a gradient, a mask) to its strides.

    Example:
        >>> op = torch.ops.normkit.norm_kernel.default   # registered by normkit.ops.library
        >>> op.name(), torch.Tag.flexible_layout in op.tags
        ('normkit::norm_kernel', True)
    """
    op = torch.library.custom_op(f"normkit::{name}", impl, mutates_args=())
    op.register_fake(fake)

    @functools.wraps(impl)  # (the op's schema is read from impl's signature)
    def kernel_impl(*args: Any) -> Any:
        return impl(*prepare(*args))

    kernel_op = torch.library.custom_op(
        f"normkit::{name}_kernel", kernel_impl, mutates_args=(), tags=(torch.Tag.flexible_layout,)
    )
    kernel_op.register_fake(fake)
    return op


def _norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    dims: Sequence[int],
    eps: float,
    view: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    if not generated(x):
        return torch.ops.normkit.norm_kernel(x, weight, bias, mask, dims, eps, view)
    from . import core

    if view is None:
        return core.norm_forward_fused(x, weight, bias, mask, tuple(dims), eps)
    xg = x.view(view)
    mg = None if mask is None else mask.view(view)
    y, stats = core.norm_forward_fused(xg, weight, bias, mg, tuple(dims), eps)
    split = _split_dim(x, xg)
    ranks = all(p is None or p.dim() == xg.dim() for p in (weight, bias))
    symbolic = any(isinstance(s, torch.SymInt) for s in x.shape)
    if mask is not None or split is None or not ranks or not symbolic:
        return y.view(x.shape), stats
    # symbolic sizes: the output's last op elementwise on x's shape, not a view (library.norm)
    return _view_output(x, xg, split, stats, weight, bias), stats


def _split_dim(x: Tensor, xg: Tensor) -> int | None:
    """``d`` where ``xg`` is ``x`` with its dim ``d`` split in two (GroupNorm's view: 1, Ghost BN's: 0)."""
    if xg.dim() != x.dim() + 1:
        return None
    for d in range(x.dim()):
        if x.shape[:d] == xg.shape[:d] and x.shape[d + 1 :] == xg.shape[d + 2 :]:
            return d
    return None


def _view_output(
    x: Tensor, xg: Tensor, split: int, stats: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """:func:`normkit.ops.core.norm_forward_fused`'s output for ``xg``, ``x`` with its dim ``split``
    split in two, computed on ``x`` with the statistics spread over that dim (as Inductor decomposes
    torch's GroupNorm: each group's over its channels), so that it is an elementwise op on ``x``'s
    shape (Inductor fuses it with the statistics' loops as before)."""
    d = split

    def merged(t: Tensor) -> Tensor:  # a statistic or parameter of xg's rank -> x's rank
        if t.shape[d] != 1 or t.shape[d + 1] != 1:  # (one varies along the split: spread both)
            t = t.expand(*t.shape[:d], xg.shape[d], xg.shape[d + 1], *t.shape[d + 2 :]).contiguous()
        return t.view(*t.shape[:d], t.shape[d] * t.shape[d + 1], *t.shape[d + 2 :])

    shift, inv, cmean, rstd = (merged(stats[i]) for i in range(4))
    scale = rstd if weight is None else rstd * merged(weight)
    c = (x.to(stats.dtype) * inv - shift * inv) - cmean
    y = c * scale if bias is None else torch.addcmul(merged(bias).to(stats.dtype), c, scale)
    return y.to(x.dtype)


def _norm_backward(
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
    if not generated(x):
        return torch.ops.normkit.norm_backward_kernel(dy, x, weight, bias, mask, stats, dims, needs, view)
    from . import core
    from .library import op_grads

    if view is not None:  # the views (no layout preference in a backward graph that they could upset)
        mask = None if mask is None else mask.view(view)
        xg, dyg = x.view(view), dy.view(view)
        dx, dw, db = core.norm_backward(dyg, xg, weight, bias, mask, stats, tuple(dims), needs)
        return op_grads(None if dx is None else dx.view(x.shape), dw, db, x, weight, bias)
    return op_grads(
        *core.norm_backward(dy, x, weight, bias, mask, stats, tuple(dims), needs), x, weight, bias
    )


def _proxy_act(
    y: Tensor, weight: Tensor, bias: Tensor, m: Tensor, rstd: Tensor, act: str, slope: float
) -> Tensor:
    if not generated(y):
        return torch.ops.normkit.proxy_norm_act_kernel(y, weight, bias, m, rstd, act, slope)
    from .proxy import forward_aten

    return forward_aten(y, weight, bias, m, rstd, act, slope)


def _proxy_act_backward(
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
    if not generated(y):
        return torch.ops.normkit.proxy_norm_act_backward_kernel(
            dout, y, weight, bias, m, rstd, act, slope, needs
        )
    from .proxy import backward_aten, op_grads

    return op_grads(
        backward_aten(dout, y, weight, bias, m, rstd, act, slope, needs), (y, weight, bias, m, rstd)
    )
