"""Kernel backends behind ``normkit::norm``: one dispatch point, several implementations.

Every norm in normkit runs through :func:`norm_forward` / :func:`norm_backward` (the CPU
implementation of the registered ops ``normkit::norm`` and ``normkit::norm_backward``), which pick
a backend per call:

* ``"reference"``: the pure-PyTorch core, :mod:`normkit.ops.core` (the oracle, and the fallback
  for everything the others do not cover: masks, ``torch.func`` transforms, accelerators, unusual
  layouts, dtypes other than float16/bfloat16/float32/float64, sets of one value);
* ``"cpu"``: normkit's fused C++ kernels (``csrc/norm_cpu.cpp``): the statistics in one read of
  the input (cache-sized chunks, two-pass within a chunk, exact merges), the normalization in one
  more pass, the backward in two, parallel over sets with ``at::parallel_for``. They keep the
  core's contract: float32 statistics for half inputs (float64 for float64), the same saved
  statistics, channels_last kept; a call whose statistics would leave the exact range (a
  non-finite input, ``|x|`` beyond ~1e19 in float32, a variance below 2^-100 that eps does not
  dominate) reruns on the reference's scaled path.
* ``"native"``: torch's own ATen kernels (``native_batch_norm``, ``native_layer_norm``,
  ``native_group_norm`` and their backwards) for the patterns they compute identically (BatchNorm's
  statistics, LayerNorm over trailing dims or over C, GroupNorm on a contiguous input,
  InstanceNorm as torch.nn runs it, a batch norm of the ``(1, N * C, S)`` view; see
  :mod:`normkit.kernels._native`; outputs in the input's layout), the reference for everything else.
  For comparisons: on this project's CPUs the fused kernels are at least as fast on every fp32 path,
  so on a CPU ``"auto"`` never picks it.
* ``"triton"``: normkit's Triton kernels (:mod:`normkit.kernels.triton`, the optional ``triton``
  extra) for CUDA tensors, every pattern the CPU kernels cover, saving the reference's statistics
  (the scaled two-pass: exact for every finite input, no host sync). With ``TRITON_INTERPRET=1``,
  ``use("triton")`` runs them on CPU tensors through Triton's interpreter (slow: for tests).
* ``"auto"`` (the default): ``"cpu"`` where it applies and is built, ``"triton"`` for CUDA tensors
  when triton is installed, else ``"reference"``. On CUDA, plain eager GroupNorm, InstanceNorm
  (without running statistics), LayerNorm, LayerNorm2d and BatchNorm training steps go straight to
  torch's own op under ``"auto"`` and ``"native"`` (after normkit's checks, layouts and running-statistics
  rules kept: :mod:`normkit.kernels._direct`), where torch's CUDA kernels were the faster ones.

Choose explicitly with :func:`use` (a context manager, also per thread) or the ``NORMKIT_BACKEND``
environment variable; :func:`status` (``normkit kernels status``) says what is built and what each
norm runs on. The fused kernels compile on first use (about 40 s, once per machine and torch
version, see :mod:`normkit.kernels._build`); ``normkit kernels build`` does it ahead of time.

Example:
    >>> import torch, normkit
    >>> x = torch.randn(8, 16, 10, 10)
    >>> with normkit.kernels.use("reference"):
    ...     ref = normkit.functional.group_norm(x, 4)
    >>> torch.allclose(normkit.functional.group_norm(x, 4), ref, atol=1e-5)
    True
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence

import torch
import torch.utils._python_dispatch  # (a submodule torch does not import as an attribute for checkers)
from torch import Tensor

from ..ops import core
from . import _build, _native
from ._build import KernelBuildWarning, build_dir, is_built
from ._plan import MODES, Plan, describe, plan

__all__ = [
    "BACKENDS",
    "KernelBuildWarning",
    "available",
    "build",
    "build_dir",
    "current",
    "is_built",
    "norm_backward",
    "norm_forward",
    "plan",
    "status",
    "use",
]

BACKENDS = ("auto", "reference", "cpu", "native", "triton")
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# dtype codes of the kernels' C entry points
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


class _Local(threading.local):
    backend: str | None = None


_local = _Local()


def _env_backend() -> tuple[str, str | None]:
    """``NORMKIT_BACKEND`` (empty: unset, as shells and CI files leave it; any case), and its error."""
    raw = os.environ.get("NORMKIT_BACKEND", "")
    backend = raw.strip().lower() or "auto"
    if backend not in BACKENDS:
        return (
            "auto",
            f"NORMKIT_BACKEND must be one of {', '.join(BACKENDS)} (or empty for auto), got {raw!r}",
        )
    return backend, None


# NORMKIT_BACKEND, read at import (so that nothing is bound while torch.compile traces the first
# norm: a lazily bound value changed state the compiled graph's guards see, and every model
# compiled twice in a fresh process); a bad value raises at the first norm, not at import.
_default, _default_error = _env_backend()


def current() -> str:
    """The backend chosen for this thread (``"auto"`` unless :func:`use` or ``NORMKIT_BACKEND`` says so).

    Raises:
        ValueError: ``NORMKIT_BACKEND`` names no backend (and no :func:`use` block is active).

    Example:
        >>> with normkit.kernels.use("reference"):
        ...     normkit.kernels.current()
        'reference'
    """
    if _local.backend:
        return _local.backend
    if _default_error is not None:
        raise ValueError(_default_error)
    return _default


@contextlib.contextmanager
def use(backend: str) -> Iterator[None]:
    """Run the norms inside the ``with`` block on ``backend``.

    ``backend``: ``"auto"``, ``"reference"``, ``"cpu"``, ``"native"`` or ``"triton"``.

    ``"cpu"`` builds the fused kernels if needed and raises :class:`RuntimeError` when they cannot
    be built; calls they do not cover still run on the reference.

    Example:
        >>> with use("reference"):
        ...     y = normkit.functional.group_norm(torch.randn(2, 4, 3, 3), 2)
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "cpu" and not _build.load():
        why = _build.load_error() or (
            "not built, and NORMKIT_NO_BUILD is set" if _build._no_build() else "not built"
        )
        raise RuntimeError(
            f"normkit: the fused CPU kernels are not available ({why}); `normkit kernels build` builds them"
        )
    if backend == "triton":
        from . import triton as _triton

        if not _triton.available():
            raise RuntimeError(
                f"normkit: the Triton kernels are not available ({_triton.why_not()}); "
                "`pip install normkit[triton]` installs triton"
            )
    previous = _local.backend
    _local.backend = backend
    try:
        yield
    finally:
        _local.backend = previous


def available() -> list[str]:
    """The backends that can run here: ``"reference"`` and ``"native"`` always, ``"cpu"`` once
    built (or buildable), ``"triton"`` with triton installed and a GPU (or Triton's interpreter).

    Example:
        >>> {"auto", "reference", "native"} <= set(normkit.kernels.available())
        True
    """
    out = ["auto", "reference"]
    if _build.load(build=True):
        out.append("cpu")
    out.append("native")
    from . import triton as _triton

    if _triton.available() and (torch.cuda.is_available() or _triton.interpreting()):
        out.append("triton")  # (on a CPU-only machine it would run the reference: not listed)
    return out


def build(verbose: bool = False) -> bool:
    """Compile (or load) the fused CPU kernels now, and the layers' C++ autograd node; True when the
    kernels are ready (the node is optional: without it the layers use a Python Function).

    Example:
        >>> ok = normkit.kernels.build()  # compiles once per machine (about 75 s), then loads the cache
        >>> ok in (True, False)  # False: no compiler here (one warning; the reference backend runs)
        True
    """
    ok = _build.load(build=True, verbose=verbose, retry=True)
    if ok:
        _build.autograd_module(build=True, verbose=verbose)
    return ok


def _cpu_ready() -> bool:
    return bool(_build._state["loaded"]) or _build.load(build=True)


def _eligible(x: Tensor, mask: Tensor | None, in_vmap_rule: bool = False) -> bool:
    return (
        mask is None
        and type(x) is Tensor
        and x.device.type == "cpu"
        and x.dtype in _DTYPES
        and x.numel() > 0
        and torch._C._has_storage(x)
        and not torch.compiler.is_compiling()
        and (in_vmap_rule or not torch._C._are_functorch_transforms_active())
        and torch.utils._python_dispatch._get_current_dispatch_mode() is None
    )


def _cpu_plan(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    dims: tuple[int, ...],
    in_vmap_rule: bool = False,
) -> Plan | None:
    backend = current()
    if backend in ("reference", "native", "triton") or not _eligible(x, mask, in_vmap_rule):
        return None
    p = plan(x, dims, weight, bias)
    if p is None or not _cpu_ready():
        return None
    if p.mode == 0 and p.N == 1 and p.S <= 1024 and weight is None and bias is None:
        # Without an affine, short contiguous runs (LayerNorm over a last dim) match the BatchNorm
        # template with one sample: the same sets in the same order as rows of the GroupNorm pattern,
        # whose row kernels the eager LayerNorm uses (LayerNorm(16) on (16, 64, 16, 16): 320 -> 195 us
        # forward, 146 -> 93 us backward here; runs of 2048 and more measured the same either way).
        return Plan(2, p.C, p.S, 1, 1, p.order)
    return p


def triton_ready(x: Tensor, mask: Tensor | None = None) -> bool:
    """Whether a call on ``x`` runs on the Triton kernels: a CUDA tensor on "auto" / "triton" with
    triton installed, or a CPU tensor on "triton" under Triton's interpreter (plain tensors, no
    mask, not while compiling or under torch.func).

    Example:
        >>> normkit.kernels.triton_ready(torch.ones(2, 3))  # a CPU tensor on the default backend
        False
    """
    backend = current()  # first the cheap checks: this runs on every CPU call too
    if x.device.type == "cuda":
        if backend not in ("auto", "triton"):
            return False
    elif not (backend == "triton" and x.device.type == "cpu"):
        return False
    if not (
        mask is None
        and type(x) is Tensor
        and x.dtype in _DTYPES
        and x.numel() > 0
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
        and torch.utils._python_dispatch._get_current_dispatch_mode() is None
    ):
        return False
    from . import triton as _triton

    return _triton.available() and (x.device.type == "cuda" or _triton.interpreting())


def _triton_plan(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, mask: Tensor | None, dims: tuple[int, ...]
) -> Plan | None:
    """The plan of a call the Triton kernels take (see :func:`triton_ready`), else ``None``."""
    return plan(x, dims, weight, bias) if triton_ready(x, mask) else None


def _flat(p: Tensor | None, dtype: torch.dtype, order: tuple[int, ...] | None) -> Tensor | None:
    """The affine as one vector in the kernel's channel order (x's memory order of its dims)."""
    if p is None:
        return None
    if order is None and p.dtype == dtype and p.is_contiguous():
        return p  # the kernels read its memory, in this order, and nothing else
    p = p.detach()
    if order is not None:
        p = p.permute(order)
    return p.reshape(-1).to(dtype).contiguous()


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _unflat(g: Tensor, p: Tensor, order: tuple[int, ...] | None) -> Tensor:
    """A gradient from the kernel (channel order) back to the shape and dtype of the affine ``p``."""
    if order is not None:
        g = g.reshape([p.shape[d] for d in order]).permute([order.index(d) for d in range(p.dim())])
    return g.reshape(p.shape).to(p.dtype)


def norm_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    dims: Sequence[int],
    eps: float,
) -> tuple[Tensor, Tensor]:
    """``(y, stats)`` of :func:`normkit.ops.core.norm_forward`, on the backend this call dispatches to.

    Example:
        >>> x = torch.randn(2, 4, 3, 3)
        >>> y, stats = normkit.kernels.norm_forward(x, None, None, None, (1, 2, 3), 1e-5)  # LN over (C, H, W)
        >>> torch.allclose(y, torch.nn.functional.layer_norm(x, (4, 3, 3)), atol=1e-5)
        True
    """
    dims = tuple(dims)
    if current() == "native" and _eligible(x, mask):
        got = _native.forward(x, weight, bias, dims, eps)
        return got if got is not None else core.norm_forward(x, weight, bias, mask, dims, eps)
    tp = _triton_plan(x, weight, bias, mask, dims)
    if tp is not None:
        from . import triton as _triton

        acc = core.acc_dtype(x.dtype)
        try:
            return _triton.forward(
                x, _flat(weight, acc, tp.order), _flat(bias, acc, tp.order), tp, eps, core.stat_shape(x, dims)
            )
        except Exception as e:
            if not _triton.gave_up(e):  # (Triton failing to compile a kernel: the next backend takes it)
                raise
    p = _cpu_plan(x, weight, bias, mask, dims)
    if p is None:
        return core.norm_forward(x, weight, bias, mask, dims, eps)
    acc = core.acc_dtype(x.dtype)
    y = torch.empty_like(x)
    stats = x.new_empty((core.STAT_ROWS, *core.stat_shape(x, dims)), dtype=acc)
    w = _flat(weight, acc, p.order)
    b = _flat(bias, acc, p.order)
    ok = _build.lib().normkit_forward(
        DTYPE_CODE[x.dtype],
        x.data_ptr(),
        _ptr(w),
        _ptr(b),
        y.data_ptr(),
        stats.data_ptr(),
        p.mode,
        p.N,
        p.C,
        p.S,
        p.G,
        float(eps),
    )
    if not ok:  # a set needs the scaled statistics (or the input is not finite)
        return core.norm_forward(x, weight, bias, mask, dims, eps)
    return y, stats


def norm_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    stats: Tensor,
    dims: Sequence[int],
    needs: Sequence[bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dweight, dbias)`` of :func:`normkit.ops.core.norm_backward` (``dx`` in ``x.dtype`` here).

    Example:
        >>> x, dy = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
        >>> y, stats = normkit.kernels.norm_forward(x, None, None, None, (1, 2, 3), 1e-5)
        >>> needs = (True, False, False)  # dx only
        >>> dx, dw, db = normkit.kernels.norm_backward(dy, x, None, None, None, stats, (1, 2, 3), needs)
        >>> ref = x.clone().requires_grad_()
        >>> torch.nn.functional.layer_norm(ref, (4, 3, 3)).backward(dy)
        >>> torch.allclose(dx, ref.grad, atol=1e-5), dw, db
        (True, None, None)
    """
    dims = tuple(dims)
    if current() == "native" and _eligible(x, mask) and type(dy) is Tensor and torch._C._has_storage(dy):
        got = _native.backward(dy, x, weight, bias, stats, dims, needs)
        return got if got is not None else core.norm_backward(dy, x, weight, bias, mask, stats, dims, needs)
    tp = _triton_plan(x, weight, bias, mask, dims)
    if (
        tp is not None
        and type(dy) is Tensor
        and dy.stride() == x.stride()
        and dy.dtype == x.dtype
        and stats.is_contiguous()
    ):
        from . import triton as _triton

        need_x, need_w, need_b = needs[0], needs[1] and weight is not None, needs[2] and bias is not None
        try:
            tdx, tdw, tdb = _triton.backward(
                dy, x, _flat(weight, stats.dtype, tp.order), stats, tp, need_x, need_w or need_b
            )
            return (
                tdx,
                _unflat(tdw, weight, tp.order) if need_w else None,  # type: ignore[arg-type]
                _unflat(tdb, bias, tp.order) if need_b else None,  # type: ignore[arg-type]
            )
        except Exception as e:
            if not _triton.gave_up(e):  # (Triton failing to compile a kernel: the next backend takes it)
                raise
    p = _cpu_plan(x, weight, bias, mask, dims)
    if (
        p is None
        or type(dy) is not Tensor
        or not torch._C._has_storage(dy)  # the legacy vmap of gradcheck(check_batched_grad=True)
        or dy.stride() != x.stride()
        or dy.dtype != x.dtype
        or not stats.is_contiguous()
    ):
        return core.norm_backward(dy, x, weight, bias, mask, stats, dims, needs)
    need_x, need_w, need_b = needs[0], needs[1] and weight is not None, needs[2] and bias is not None
    acc = stats.dtype
    dx = torch.empty_like(x) if need_x else None
    dw = x.new_empty(p.C, dtype=acc) if need_w else None
    db = x.new_empty(p.C, dtype=acc) if need_b else None
    w = _flat(weight, acc, p.order)
    ok = _build.lib().normkit_backward(
        DTYPE_CODE[x.dtype],
        dy.data_ptr(),
        x.data_ptr(),
        _ptr(w),
        stats.data_ptr(),
        _ptr(dx),
        _ptr(dw),
        _ptr(db),
        p.mode,
        p.N,
        p.C,
        p.S,
        p.G,
    )
    if not ok:  # statistics of the reference's scaled path: its backward keeps them representable
        return core.norm_backward(dy, x, weight, bias, mask, stats, dims, needs)
    return (
        dx if need_x else None,
        _unflat(dw, weight, p.order) if need_w else None,  # type: ignore[arg-type]
        _unflat(db, bias, p.order) if need_b else None,  # type: ignore[arg-type]
    )


def norm_backward_members(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    stats: Tensor,
    dims: Sequence[int],
    needs: Sequence[bool],
    members: int,
    shared_x: bool = False,
    member_weight: bool = False,
) -> tuple[Tensor | None, Tensor | None, Tensor | None] | None:
    """:func:`norm_backward` of ``members`` calls at once (a vmapped call: per-sample gradients, an
    ensemble), with ``dweight`` / ``dbias`` per member, ``(members, *weight.shape)``, in one kernel
    call. ``dy`` holds the members' batches one after another along dim 0; ``x`` and ``stats`` too, or
    one batch every member shares (``shared_x``); ``weight`` is shared, or ``(members, ...)`` with
    ``member_weight`` (``bias`` only gives ``dbias`` its shape and dtype: pass one member's). For the
    pattern of short rows (LayerNorm over a last dim, GroupNorm of ``(N, C)``); ``None`` where the
    kernels do not take the call (the caller then takes the general route). For plain tensors only,
    called where nothing records the call (a vmap rule's own level, see ``ops.library._plain_call``).

    Example:
        >>> x, w = torch.randn(4, 3, 8), torch.ones(1, 1, 8)  # two members of two samples; w as the op has it
        >>> y, stats = normkit.ops.core.norm_forward(x, w, None, None, (2,), 1e-5)
        >>> got = norm_backward_members(torch.ones_like(x), x, w, None, stats, (2,), (True, True, False), 2)
        >>> dx, dw, _ = got  # (None on a machine without the compiled kernels)  # doctest: +SKIP
        >>> dw.shape  # doctest: +SKIP
        torch.Size([2, 1, 1, 8])
    """
    n = dy.shape[0] // members if members > 0 else 0
    one = x if shared_x else x[:n]  # one member's call, for the plan
    w1 = weight[0] if member_weight and weight is not None else weight
    p = _cpu_plan(one, w1, bias, None, tuple(dims), in_vmap_rule=True)
    if (
        p is None
        or p.mode != 2
        or p.S != 1
        or p.order is not None
        or n * members != dy.shape[0]
        or x.shape[0] != (n if shared_x else dy.shape[0])
        or type(dy) is not Tensor
        or not torch._C._has_storage(dy)
        or not (dy.is_contiguous() and x.is_contiguous() and stats.is_contiguous())
        or dy.dtype != x.dtype
        or stats.numel() != 6 * p.N * p.G * (1 if shared_x else members)
    ):
        return None
    need_x, need_w, need_b = needs[0], needs[1] and weight is not None, needs[2] and bias is not None
    acc = stats.dtype
    dx = torch.empty_like(dy) if need_x else None
    dw = x.new_empty(members, p.C, dtype=acc) if need_w else None
    db = x.new_empty(members, p.C, dtype=acc) if need_b else None
    w = None if weight is None else weight.detach().reshape(members if member_weight else 1, p.C)
    w = None if w is None else w.to(acc).contiguous()
    ok = _build.lib().normkit_backward_members(
        DTYPE_CODE[x.dtype],
        dy.data_ptr(),
        x.data_ptr(),
        _ptr(w),
        stats.data_ptr(),
        _ptr(dx),
        _ptr(dw),
        _ptr(db),
        p.N,
        p.C,
        p.G,
        members,
        0 if shared_x else p.N * p.C,
        p.C if member_weight else 0,
        0 if shared_x else p.N * p.G,
    )
    if not ok:
        return None
    shape = lambda t: tuple(t.shape[1:]) if member_weight and t is weight else tuple(t.shape)  # noqa: E731
    return (
        dx,
        None if dw is None or weight is None else dw.reshape(members, *shape(weight)).to(weight.dtype),
        None if db is None or bias is None else db.reshape(members, *bias.shape).to(bias.dtype),
    )


def status() -> str:
    """What is built, where, and which backend each common norm runs on here (``normkit kernels status``).

    Example:
        >>> print(normkit.kernels.status())  # doctest: +ELLIPSIS
        backend: ...
    """
    lines = [
        f"backend: {current()}  (choices: {', '.join(BACKENDS)}; NORMKIT_BACKEND or normkit.kernels.use)"
    ]
    built = _build._sealed(build_dir() / "normkit_cpu.so")
    loaded = bool(_build._state["loaded"])
    state = "loaded" if loaded else "built" if built else "not built"
    if not loaded and not built and is_built():
        state = "not built (an unfinished build is in the cache: rebuilt on first use)"
    if not loaded and not built and _build._no_build():
        state += "; NORMKIT_NO_BUILD is set: nothing is compiled"
    lines.append(f"fused CPU kernels: {state}  ({build_dir()})")
    err = _build.load_error()
    failed = None if loaded or built else _build._recorded_failure(build_dir())
    if err:
        lines.append(f"  last build error: {err.splitlines()[0]}")
    elif failed:
        lines.append(
            f"  an earlier build failed with this compiler: {failed} (not tried again until the compiler "
            "or ninja changes; `normkit kernels build` tries now)"
        )
    node = _build._autograd["module"] is not None
    node_built = (build_dir() / "autograd").is_dir() and any(
        (build_dir() / "autograd").glob("normkit_autograd*.so")
    )
    lines.append(
        "layers' C++ autograd node and torch.func ops: "
        + (
            "loaded"
            if node
            else "built"
            if node_built
            else "not built (the layers, and the norms under torch.func, use Python Functions)"
        )
    )
    aerr = _build.autograd_error()
    if aerr:
        lines.append(f"  last build error: {aerr.splitlines()[0]}")
    lines.append(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    cases = _status_cases()
    width = max(len(name) for name, *_ in cases)
    lines.append("")
    lines.append("norm (example input) -> what runs")
    for name, x, dims, w in cases:
        p = plan(x, dims, w, w)
        if current() == "native":
            pat = _native._pattern(x, tuple(dims), w, w)
            aten = (
                "native_batch_norm",
                "native_layer_norm",
                "native_layer_norm (movedim)",
                "native_group_norm",
                "native_batch_norm (of the (1, N * C, S) view)",
            )
            where = f"ATen {aten[pat[0]]}" if pat else "reference"
        elif p is None:
            where = "reference"
        elif current() == "triton":  # (CPU tensors: the Triton kernels only in Triton's interpreter)
            where = (
                f"Triton kernels in the interpreter ({p.name})"
                if triton_ready(torch.zeros(1))  # (the cases are meta tensors: a CPU one decides)
                else "reference (Triton takes CUDA tensors; CPU ones only with TRITON_INTERPRET=1)"
            )
        elif current() == "reference":
            where = f"reference (fused pattern {p.name} not used)"
        elif loaded or built:
            where = f"cpu kernel {p.name}"
        else:
            where = f"reference until built (fused pattern {p.name})"
        lines.append(f"  {name:<{width}}  {where}")
    from . import triton as _triton

    if not _triton.available():
        tri = f"not available ({_triton.why_not()})"
    elif torch.cuda.is_available():
        tri = f"installed, used for CUDA tensors ({torch.cuda.get_device_name()})"
    else:
        tri = "installed; no GPU here (use('triton') runs them in Triton's interpreter if TRITON_INTERPRET=1)"
    lines.append(f"Triton kernels: {tri}")
    lines.append(
        "  every norm pattern above (a split reduction where sets are too few to fill the GPU), "
        "Proxy Norm's statistics and activation step, GroupNormProxyAct2d fused in one kernel each way"
    )
    lines.append(
        "  on CUDA with auto / native, plain eager GroupNorm, InstanceNorm (no running statistics), "
        "LayerNorm, LayerNorm2d and BatchNorm training steps call torch's own op (faster there, "
        "PERFORMANCE.md §5); the Triton kernels run the rest"
    )
    lines.append(
        "  any norm with a mask or under torch.func: reference; "
        "the rest on CUDA: triton when installed, else reference"
    )
    return "\n".join(lines)


def _status_cases() -> list[tuple[str, Tensor, tuple[int, ...], Tensor | None]]:
    m = torch.empty(2, 8, 4, 4, device="meta")
    cl = m.to(memory_format=torch.channels_last)
    g = m.view(2, 2, 4, 4, 4)
    gcl = cl.permute(0, 2, 3, 1).reshape(2, 4, 4, 2, 4)
    return [
        ("BatchNorm2d NCHW", m, (0, 2, 3), torch.empty(1, 8, 1, 1, device="meta")),
        ("BatchNorm2d channels_last", cl, (0, 2, 3), torch.empty(1, 8, 1, 1, device="meta")),
        ("BatchNorm1d (N, C)", torch.empty(4, 8, device="meta"), (0,), torch.empty(1, 8, device="meta")),
        ("GroupNorm NCHW", g, (2, 3, 4), torch.empty(1, 2, 4, 1, 1, device="meta")),
        ("GroupNorm channels_last", gcl, (1, 2, 4), torch.empty(1, 1, 1, 2, 4, device="meta")),
        ("InstanceNorm2d NCHW", m, (2, 3), torch.empty(1, 8, 1, 1, device="meta")),
        ("InstanceNorm2d channels_last", cl, (2, 3), torch.empty(1, 8, 1, 1, device="meta")),
        ("LayerNorm2d (over C) NCHW", m, (1,), torch.empty(1, 8, 1, 1, device="meta")),
        ("LayerNorm2d (over C) channels_last", cl, (1,), torch.empty(1, 8, 1, 1, device="meta")),
        (
            "LayerNorm over last dim",
            torch.empty(2, 5, 8, device="meta"),
            (2,),
            torch.empty(1, 1, 8, device="meta"),
        ),
    ]


del MODES, describe
