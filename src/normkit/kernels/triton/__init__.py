"""normkit's Triton kernels (the optional ``triton`` extra): ``normkit::norm`` on GPU tensors.

``import normkit`` never imports this package; :mod:`normkit.kernels` imports it on the first CUDA
call when triton is installed (or, with ``TRITON_INTERPRET=1``, for CPU tensors under
``normkit.kernels.use("triton")``: Triton's interpreter, for the tests).

Kernels (``_kernels.py``) → launchers here, which return the saved statistics in the reference's
format (so any backend's backward accepts them) → :func:`normkit.kernels.norm_forward` /
:func:`normkit.kernels.norm_backward` dispatch. Every kernel pattern of the CPU kernels is covered
by one parametrised kernel pair (one program per set), except BatchNorm on rows of contiguous
channels (channels-last, BatchNorm1d), which takes blocks of channels (the ``bn_*`` kernels), and
LayerNorm2d on NCHW, which takes blocks of positions (the ``ln2d_*`` kernels); see ``_kernels.py``.

Example:
    >>> import normkit.kernels.triton as nkt
    >>> nkt.available() == (nkt.why_not() is None)   # whether triton imports here
    True
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import weakref
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ...ops import core
from .._plan import Plan

__all__ = ["available", "backward", "forward", "proxy_act_backward", "proxy_act_forward", "why_not"]

_state: dict[str, object] = {"checked": False, "error": None}


def why_not() -> str | None:
    """``None`` when triton imports here, else why not (the message of the import error).

    Example:
        >>> msg = normkit.kernels.triton.why_not()
        >>> msg is None or "triton" in msg.lower() or "Error" in msg
        True
    """
    if not _state["checked"]:
        try:
            import triton  # noqa: F401
        except Exception as e:
            _state["error"] = f"{type(e).__name__}: {e}"
        _state["checked"] = True
    return _state["error"]  # type: ignore[return-value]


def available() -> bool:
    """Whether the Triton kernels can run here (triton importable).

    Example:
        >>> normkit.kernels.triton.available() in (True, False)
        True
    """
    return why_not() is None


_COMPILE_ERRORS = ("CompilationError", "OutOfResources", "PTXASError")  # (triton.compiler / .runtime)


def compile_failure(e: BaseException) -> bool:
    """Whether ``e`` is Triton failing to build one of normkit's kernels for this GPU, not a failure of
    the call itself: an exception of Triton's compiler or its resource checks, or one raised from
    inside Triton's compiler (its MLIR passes, ptxas). Each Triton release has its own compiler bugs
    (Triton 3.6 rejected a BatchNorm kernel that 3.0-3.5 and 3.7-3.9 compile:
    ``python -m tests.kernels.triton_compile`` under each release reads them without a GPU).

    Example:
        >>> compile_failure(ValueError("a bad shape"))
        False
    """
    t = type(e)
    if t.__module__.startswith("triton.") and t.__name__ in _COMPILE_ERRORS:
        return True
    here = _triton_dir()
    if here is None:
        return False
    comp, back = os.path.join(here, "compiler", ""), os.path.join(here, "backends", "")
    tb = e.__traceback__
    while tb is not None:
        f = tb.tb_frame.f_code.co_filename
        if f.startswith(comp) or (f.startswith(back) and os.path.basename(f) == "compiler.py"):
            return True
        tb = tb.tb_next
    return False


def _triton_dir() -> str | None:
    import sys

    mod = sys.modules.get("triton")
    f = getattr(mod, "__file__", None)
    return os.path.dirname(f) if f else None


def _kernel_named(e: BaseException) -> str:
    """Which Triton kernel was being compiled when ``e`` was raised, in words."""
    tb = e.__traceback__
    while tb is not None:
        me = tb.tb_frame.f_locals.get("self")
        name = getattr(getattr(me, "fn", None), "__name__", None)
        if type(me).__name__ == "JITFunction" and name:
            return f"normkit's {name}"
        tb = tb.tb_next
    return "one of normkit's kernels"


def gave_up(e: Exception) -> bool:
    """After an exception from the Triton path: ``True`` where it is Triton failing to compile a kernel
    (:func:`compile_failure`) on the default backend: the Triton kernels are then switched off for this
    process (:func:`why_not` says why, and so does ``normkit kernels status``), with one warning, and
    the caller runs the call on the next backend (torch's op or normkit's reference path, the same
    values). ``False`` for any other exception (the caller re-raises it). Under
    ``normkit.kernels.use("triton")``, which asked for these kernels by name, a compile failure raises
    a ``RuntimeError`` naming the Triton release and the kernel instead.

    Example:
        >>> try:
        ...     raise KeyError("not Triton's")
        ... except Exception as e:
        ...     gave_up(e)
        False
    """
    if not compile_failure(e):
        return False
    import triton

    from .. import current

    first = (str(e).strip().splitlines() or [""])[-1][:300]
    why = (
        f"Triton {triton.__version__} could not compile {_kernel_named(e)} for this device "
        f"({type(e).__name__}: {first})"
    )
    if current() == "triton":
        raise RuntimeError(
            f"normkit: {why}; normkit.kernels.use('auto') runs these norms on torch's ops and normkit's "
            "reference path instead (please report it with the output of `normkit kernels status`)"
        ) from e
    _state["error"] = why  # (why_not() ran before any launch: this stays its answer)
    import warnings

    warnings.warn(
        f"normkit: {why}. normkit's norms run on torch's ops and normkit's reference path for the rest "
        "of this process (the same values); `normkit kernels status` says so. Please report it.",
        RuntimeWarning,
        stacklevel=3,
    )
    return True


def _or(default: Any) -> Any:
    """Decorates a Triton entry point that returns ``default`` where it does not take a call: it
    returns ``default`` too where Triton fails to compile one of its kernels (:func:`gave_up`)."""

    def wrap(fn: Any) -> Any:
        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                if not gave_up(e):
                    raise
                return default

        return guarded

    return wrap


def _current_cuda() -> int:
    """The current CUDA device's index (the one Triton launches on). Asked only with a CUDA tensor
    at hand, so CUDA is initialised: torch's own call without ``torch.cuda``'s lazy-init check."""
    return torch._C._cuda_getDevice()


def _on_device(fn: Any) -> Any:
    """Decorates a launcher entry point whose first argument is a tensor on the device its kernels
    must run on. Triton launches on the *current* CUDA device (and that device's current stream),
    which normkit never sets: a call on ``cuda:1`` tensors while ``cuda:0`` is current ran its
    kernels on ``cuda:0`` with ``cuda:1``'s pointers (an illegal memory access). Where the tensor's
    device is not the current one, the call runs under ``torch.cuda.device(it)``; the common case
    costs a comparison of indices (no context entered). Marks the wrapper ``_device_guarded``."""

    @functools.wraps(fn)
    def guarded(t: Any, *args: Any, **kwargs: Any) -> Any:
        d = t.device
        if d.type == "cuda" and d.index != _current_cuda():
            with torch.cuda.device(d):
                return fn(t, *args, **kwargs)
        return fn(t, *args, **kwargs)

    guarded._device_guarded = True  # type: ignore[attr-defined]
    return guarded


_SAME_DEVICE = contextlib.nullcontext()


def _device_of(t: Tensor) -> Any:
    """The context an autograd node's backward launches its kernels under: ``torch.cuda.device`` of
    ``t``'s device where that is not the current one (autograd's engine makes it current on its
    device threads already: this holds where it does not), else a no-op context."""
    d = t.device
    if d.type == "cuda" and d.index != _current_cuda():
        return torch.cuda.device(d)
    return _SAME_DEVICE


def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter (they then take CPU tensors).

    Triton decides when a kernel is defined (``TRITON_INTERPRET=1`` at import of ``_kernels``), so
    once they exist this asks them; before, the environment.

    Example:
        >>> normkit.kernels.triton.interpreting() in (True, False)
        True
    """
    import sys

    mod = sys.modules.get(__name__ + "._kernels")
    if mod is not None:
        return type(mod.norm_fwd_kernel).__name__ == "InterpretedFunction"
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints. (Triton's own ``triton.cdiv`` and ``triton.next_power_of_2`` are
    constexpr functions, about 3 us a call from the host: a launch's set-up made 20 of them.)"""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (``n`` itself for 0 and 1), as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length() if n > 1 else n


def _kern() -> Any:
    """The kernels module, untyped: Triton's ``kernel[grid](...)`` launch is not a call a static
    checker can match to the kernel's ``tl.constexpr`` signature."""
    from . import _kernels

    return _kernels


def _walk(p: Plan) -> tuple[int, tuple[int, ...]]:
    """``nsets`` and ``(NC, M, M2, s_c, s_m1, s_m2, D1, B1, B2, CK)`` of a plan (see ``_kernels.py``),
    with a set's positions that form one run given as ``M2 = 1``, stride ``s_m1`` (see :func:`_one_run`)."""
    nsets, walk = _walk_of(p)
    m2, s_m1, s_m2 = _one_run(walk[1], walk[2], walk[4], walk[5])
    return nsets, (walk[0], walk[1], m2, walk[3], s_m1, s_m2, *walk[6:])


def _one_run(E: int, E2: int, s1: int, s2: int) -> tuple[int, int, int]:
    """``(E2, s1, s2)`` of a walk of ``E`` positions, where the kernels address position ``e`` at
    ``(e // E2) * s1 + (e % E2) * s2``: for one run (``E2 >= E``) ``(1, s2, 0)``. Triton compiles an
    argument equal to 1 as a constant, so that drops an integer division and remainder per tile
    column from every step (about a quarter of a statistics pass's instructions, compiled)."""
    return (1, s2, 0) if E2 >= E else (E2, s1, s2)


def _walk_of(p: Plan) -> tuple[int, tuple[int, ...]]:
    N, C, S, G = p.N, p.C, p.S, p.G
    if p.mode == 0:  # BATCH_NCHW: set c, elements (n, s)
        return C, (1, N * S, S, 0, C * S, 1, C, 0, S, 1)
    if p.mode == 1:  # BATCH_CL: set c, rows of C
        return C, (1, N, N, 0, 0, C, C, 0, 1, 1)
    Cg = C // G
    if p.mode == 2:  # GROUP_NCHW: set (n, g), Cg contiguous runs of S
        return N * G, (Cg, S, S, S, 0, 1, G, C * S, Cg * S, Cg)
    if p.mode == 3:  # GROUP_CL: set (n, g), S rows of C, Cg channels each
        return N * G, (Cg, S, S, 1, 0, C, G, S * C, Cg, Cg)
    return N * S, (C, 1, 1, S, 0, 0, S, C * S, 1, 0)  # CHANNEL_NCHW: set (n, s), C values S apart


def _blocks(NC: int, M: int) -> tuple[int, int]:
    """Tile of a set's ``(NC, M)`` matrix: 1024 values, at least 256 positions wide, by as many
    channels as fit; 2048 positions where a set has one channel (BatchNorm and InstanceNorm on NCHW).
    Each step of a walk has fixed work (the addresses, the counts' reciprocals), so a tile of 256
    values (two per thread) ran to ~50 instructions a value in the compiled code, 16 per thread to ~14."""
    T = 2048 if NC == 1 else 1024
    BM = min(next_power_of_2(M), max(256, T // next_power_of_2(NC)))
    BC = max(1, min(next_power_of_2(NC), T // BM))
    return BC, BM


_ACC: dict[torch.dtype, tuple[torch.dtype, object]] = {}


def _acc(x: Tensor) -> tuple[torch.dtype, object]:
    """``(torch dtype, Triton dtype)`` the kernels accumulate ``x`` in (float64 for float64, else
    float32); kept per dtype (an ``import`` inside a function is a microsecond a call)."""
    got = _ACC.get(x.dtype)
    if got is None:
        import triton.language as tl

        got = _ACC[x.dtype] = (
            (torch.float64, tl.float64) if x.dtype == torch.float64 else (torch.float32, tl.float32)
        )
    return got


def _bound(acc: torch.dtype) -> float:
    """The exponent bound of the kernels' scaled statistics (and of their plain-range test) in the
    accumulation dtype ``acc``."""
    return 1022.0 if acc == torch.float64 else 126.0


# Split reduction: below this many programs a launch leaves most of a GPU idle, so the sets are cut
# into chunks of positions (tests set ``_FORCE_CHUNK`` to take that path on small CPU shapes).
_MIN_CHUNK = 4096  # values of a set per program, at least
_FORCE_CHUNK: int | None = None


def _programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _chunking(
    nsets: int, NC: int, M: int, BC: int, BM: int, device: torch.device
) -> tuple[int, int, bool, int, int]:
    """``(nchunks, CH, split_c, BC, BM)``: each set cut into ``nchunks`` runs of ``CH`` positions, or
    of ``CH`` channels (``split_c``: where a set has more channels than positions), ``CH`` a multiple
    of the tile along that axis (which shrinks to a forced chunk)."""
    split_c = NC > M
    along, tile = (NC, BC) if split_c else (M, BM)
    if _FORCE_CHUNK is not None:
        tile = min(tile, next_power_of_2(_FORCE_CHUNK))
        ch = cdiv(_FORCE_CHUNK, tile) * tile
    else:
        want = _programs(device)
        if nsets >= want or NC * M < 2 * _MIN_CHUNK:
            return 1, along, split_c, BC, BM
        per = max(1, min(cdiv(want, nsets), (NC * M) // _MIN_CHUNK, 1024))
        ch = cdiv(cdiv(along, per), tile) * tile
    return cdiv(along, ch), ch, split_c, (tile if split_c else BC), (BM if split_c else tile)


_TILINGS: dict[tuple[object, ...], tuple[int, tuple[int, ...], int, int, bool, int, int]] = {}


def _tiling(x: Tensor, p: Plan) -> tuple[int, tuple[int, ...], int, int, bool, int, int]:
    """``(nsets, walk, nchunks, CH, split_c, BC, BM)`` of a launch on ``x`` with plan ``p``: the walk
    (:func:`_walk`), the tile (:func:`_blocks`) and the chunks (:func:`_chunking`), in one place.
    Kept per (plan, device): a training step meets the same few, forward and backward (each a few
    microseconds of host time, which on a GPU is much of a small norm's)."""
    key = (p, x.device, _FORCE_CHUNK, _programs)  # (tests and tools replace the last two)
    got = _TILINGS.get(key)
    if got is None:
        nsets, walk = _walk(p)
        BC, BM = _blocks(walk[0], walk[1])
        got = (nsets, walk, *_chunking(nsets, walk[0], walk[1], BC, BM, x.device))
        if len(_TILINGS) > 1024:
            _TILINGS.clear()
        _TILINGS[key] = got
    return got


# The saved statistics are six rows of ``nsets``: kernels address row ``r`` at ``r * nsets`` in int32
# (Triton passes a size that fits as int32) unless the launch says ``WIDE`` (int64 row offsets, a
# variant of its own: an int64 offset cost some kernels registers). Tests set ``_FORCE_WIDE``.
_FORCE_WIDE = False


def _wide(nsets: int) -> bool:
    """Whether the saved statistics of ``nsets`` sets pass int32 offsets (the kernels' ``WIDE``)."""
    return _FORCE_WIDE or 6 * nsets >= 2**31


_BN_BJ = 16  # chunks per step of the BatchNorm kernels' per-channel combination (bounds registers)


def _bn_cl_walk(p: Plan, device: torch.device) -> tuple[tuple[int, ...], int, int, int]:
    """BatchNorm on channels-last memory (``p.mode == 1``: rows of ``C`` contiguous channels) as the
    (C, E) walk of the ``bn_*`` kernels: ``((C, E, E2, s_c, s_e1, s_e2, CH, nchunks), BCC, BE, BJ)``,
    blocks of up to 64 channels by chunks of rows that fill the device."""
    C, E = p.C, p.N * p.S
    BCC = min(next_power_of_2(C), 64)
    BE = max(1, min(next_power_of_2(E), 2048 // BCC))
    nchunks, ch, BE = _ce_chunks(C, E, BCC, BE, device)
    e2, s_e1, s_e2 = _one_run(E, E, 0, C)  # rows of C: one run of E rows, C apart
    return (C, E, e2, 1, s_e1, s_e2, ch, nchunks), BCC, BE, min(_BN_BJ, next_power_of_2(nchunks))


def _bn_cl_forward(
    x: Tensor, w: Tensor | None, b: Tensor | None, p: Plan, eps: float, stat_shape: list[int]
) -> tuple[Tensor, Tensor]:
    _kernels = _kern()
    acc, tacc = _acc(x)
    walk, BCC, BE, BJ = _bn_cl_walk(p, x.device)
    C, nchunks = walk[0], walk[7]
    grid = (cdiv(C, BCC), nchunks)
    y = torch.empty_like(x)
    stats = torch.empty((core.STAT_ROWS, *stat_shape), dtype=acc, device=x.device)
    hl = torch.empty((2, C, nchunks), dtype=acc, device=x.device)
    pm = torch.empty((3, C, nchunks), dtype=acc, device=x.device)
    bound = _bound(acc)
    _kernels.bn_stats_kernel[grid](x, hl, pm, *walk, bound, ACC=tacc, BCC=BCC, BE=BE)
    _kernels.bn_moments_kernel[grid](x, hl, pm, *walk, bound, ACC=tacc, BCC=BCC, BE=BE, BJ=BJ)
    _kernels.bn_apply_kernel[grid](
        x,
        y,
        w if w is not None else x,
        b if b is not None else x,
        stats,
        hl,
        pm,
        *walk,
        float(eps),
        bound,
        HAS_W=w is not None,
        HAS_B=b is not None,
        ACC=tacc,
        BCC=BCC,
        BE=BE,
        BJ=BJ,
    )
    return y, stats


def _bn_cl_backward(
    dy: Tensor, x: Tensor, w: Tensor | None, stats: Tensor, p: Plan, need_x: bool, need_p: bool
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    _kernels = _kern()
    acc, tacc = _acc(x)
    walk, BCC, BE, BJ = _bn_cl_walk(p, x.device)
    C, nchunks = walk[0], walk[7]
    grid = (cdiv(C, BCC), nchunks)
    part = torch.empty((2, C, nchunks), dtype=acc, device=x.device)
    _kernels.bn_bwd_sums_kernel[grid](dy, x, stats, part, *walk, ACC=tacc, BCC=BCC, BE=BE)
    dx = None
    if need_x:
        dx = torch.empty_like(x)
        wt = w if w is not None else x
        _kernels.bn_bwd_dx_kernel[grid](
            dy, x, wt, stats, part, dx, *walk, HAS_W=w is not None, ACC=tacc, BCC=BCC, BE=BE, BJ=BJ
        )
    if not need_p:
        return dx, None, None
    sums = part.sum(2)
    return dx, sums[1], sums[0]


def _ln2d_walk(p: Plan, device: torch.device) -> tuple[tuple[int, ...], int, int]:
    """LayerNorm2d on NCHW memory (``p.mode == 4``: set (n, s) = C values S apart) as the (C, E) walk
    of the ``ln2d_*`` kernels: ``((C, E, E2, s_c, s_e1, s_e2), BCC, BE)``, blocks of BE positions
    (up to 256, fewer where that leaves the device short of programs; 16 under ``_FORCE_CHUNK``, so
    the tests cross several blocks and channel tiles) by tiles of channels."""
    C, S = p.C, p.S
    E = p.N * S
    if _FORCE_CHUNK is not None:
        BE = BCC = 16
    else:
        BE = min(256, next_power_of_2(E))
        while BE > 32 and cdiv(E, BE) < _programs(device):
            BE //= 2
        BCC = max(1, min(next_power_of_2(C), 2048 // BE))
    return (C, E, S, S, C * S, 1), BCC, BE


_ROW_MAX = 512  # the longest row the blocked row walk takes (a longer one fills a program's tiles alone)


def _rows(p: Plan, affine: bool) -> tuple[int, int] | None:
    """``(L, R)`` where a plan's sets are ``R`` consecutive contiguous rows of ``L <= _ROW_MAX``
    values, with an affine (if any) indexed by the position in the row: LayerNorm over a short last
    dim, LayerNorm2d on channels-last (GROUP_NCHW with one value per run, one group); a mean-only
    row pattern without an affine (BATCH_NCHW of one sample). Else ``None``."""
    if p.mode == 2 and p.S == 1 and p.G == 1:
        L, R = p.C, p.N
    elif p.mode == 0 and p.N == 1 and not affine:
        L, R = p.S, p.C
    else:
        return None
    return (L, R) if L <= _ROW_MAX else None


def _rows_walk(rows: tuple[int, int], device: torch.device) -> tuple[tuple[int, ...], int, int]:
    """Short rows as the (C, E) walk of the ``ln2d_*`` kernels (C = the row's values, contiguous;
    E = the rows, ``L`` apart): blocks of ``BE`` rows by tiles of up to 256 values, so a program
    holds whole rows in coalesced tiles where one program per row left most of its threads idle
    (a row of 64 values to 128 threads, one scalar access each); 16 by 16 under ``_FORCE_CHUNK``."""
    L, R = rows
    if _FORCE_CHUNK is not None:
        BCC = BE = 16
    else:
        BCC = min(next_power_of_2(L), 256)
        BE = max(1, 2048 // BCC)
        while BE > 1 and cdiv(R, BE) < _programs(device):
            BE //= 2
    return (L, R, 1, 1, L, 0), BCC, BE


def _ln2d_forward(
    x: Tensor, w: Tensor | None, b: Tensor | None, p: Plan, eps: float, stat_shape: list[int],
    rows: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    _kernels = _kern()
    acc, tacc = _acc(x)
    walk, BCC, BE = _rows_walk(rows, x.device) if rows is not None else _ln2d_walk(p, x.device)
    y = torch.empty_like(x)
    stats = torch.empty((core.STAT_ROWS, *stat_shape), dtype=acc, device=x.device)
    _kernels.ln2d_fwd_kernel[(cdiv(walk[1], BE),)](
        x,
        y,
        w if w is not None else x,
        b if b is not None else x,
        stats,
        *walk,
        float(eps),
        _bound(acc),
        HAS_W=w is not None,
        HAS_B=b is not None,
        ACC=tacc,
        BCC=BCC,
        BE=BE,
        WIDE=_wide(walk[1]),
    )
    return y, stats


def _ln2d_backward(
    dy: Tensor, x: Tensor, w: Tensor | None, stats: Tensor, p: Plan, need_x: bool, need_p: bool,
    rows: tuple[int, int] | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # fmt: skip
    _kernels = _kern()
    acc, tacc = _acc(x)
    walk, BCC, BE = _rows_walk(rows, x.device) if rows is not None else _ln2d_walk(p, x.device)
    C, E = walk[0], walk[1]
    nblocks = cdiv(E, BE)
    dx = torch.empty_like(x) if need_x else None
    part = torch.empty((2, nblocks, C), dtype=acc, device=x.device) if need_p else None  # dweight, dbias
    _kernels.ln2d_bwd_kernel[(nblocks,)](
        dy,
        x,
        w if w is not None else x,
        stats,
        dx if dx is not None else x,
        part[0] if part is not None else stats,
        part[1] if part is not None else stats,
        *walk,
        HAS_W=w is not None,
        NEED_DX=need_x,
        NEED_P=need_p,
        ACC=tacc,
        BCC=BCC,
        BE=BE,
        WIDE=_wide(E),
    )
    if part is None:
        return dx, None, None
    sums = part.sum(1)  # one reduction for both
    return dx, sums[0], sums[1]


class _GclWalk(NamedTuple):
    """GroupNorm on channels-last memory (``p.mode == 3``) as the ``gcl_*`` kernels walk it: per
    sample, ``nCB`` blocks of ``BCC`` contiguous channels (across groups) by ``nchunks`` chunks of
    ``CH`` positions, tiles of ``BE`` positions; ``BL`` partials per step of a set's combination,
    ``(BC, BM)`` the tile of a set's own walk (the rare re-read of a set that is not plain); ``tot``
    partials per buffer row (one per sample, channel and chunk), ``grid`` one program per sample's
    channel block and chunk."""

    nCB: int
    BCC: int
    BE: int
    nchunks: int
    CH: int
    BL: int
    BC: int
    BM: int
    tot: int
    grid: tuple[int, int]


def _gcl_walk(p: Plan, device: torch.device) -> _GclWalk:
    C, S, Cg = p.C, p.S, p.C // p.G
    BCC = min(next_power_of_2(C), 64)
    nchunks, ch, BE = _ce_chunks(C, S, BCC, max(1, min(next_power_of_2(S), 2048 // BCC)), device, p.N)
    BC = min(next_power_of_2(Cg), 64)
    nCB = cdiv(C, BCC)
    return _GclWalk(
        nCB,
        BCC,
        BE,
        nchunks,
        ch,
        min(next_power_of_2(Cg * nchunks), 1024),
        BC,
        max(1, min(next_power_of_2(S), 1024 // BC)),
        p.N * C * nchunks,
        (p.N * nCB, nchunks),
    )


def _gcl_forward(
    x: Tensor, w: Tensor | None, b: Tensor | None, p: Plan, eps: float, stat_shape: list[int],
    pn: tuple[list[Tensor], int] | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """GroupNorm (InstanceNorm, LN over (C, H, W) with a per-channel affine) on channels-last memory in
    blocks of channels across groups: three launches (per-channel partials, per-set combination,
    output). ``pn``: ``([m, rstd, slope], act code)`` of Proxy Norm's step after the affine."""
    _kernels = _kern()
    acc, tacc = _acc(x)
    N, C, S, G, Cg = p.N, p.C, p.S, p.G, p.C // p.G
    t = _gcl_walk(p, x.device)
    tot, grid = t.tot, t.grid
    y = torch.empty_like(x)
    stats = torch.empty((core.STAT_ROWS, *stat_shape), dtype=acc, device=x.device)
    hl = torch.empty((2, tot), dtype=acc, device=x.device)
    pm = torch.empty((3, tot), dtype=acc, device=x.device)
    bound = _bound(acc)
    _kernels.gcl_stats_kernel[grid](
        x, hl, pm, C, S, Cg, t.nCB, t.CH, t.nchunks, tot, bound, ACC=tacc, BCC=t.BCC, BE=t.BE
    )
    wide = _wide(N * G)
    _kernels.gcl_combine_kernel[(N * G,)](
        x, hl, pm, stats, C, S, S * C, G, Cg, t.nchunks, tot, float(eps), bound,
        ACC=tacc, BL=t.BL, BC=t.BC, BM=t.BM, WIDE=wide,
    )  # fmt: skip
    mu, r, sl = pn[0] if pn is not None else (x, x, x)
    _kernels.gcl_apply_kernel[grid](
        x, y, w if w is not None else x, b if b is not None else x, stats, mu, r, sl,
        C, S, G, Cg, t.nCB, t.CH, N * G,
        HAS_W=w is not None, HAS_B=b is not None, ACC=tacc, BCC=t.BCC, BE=t.BE,
        PN=pn is not None, ACT=pn[1] if pn is not None else 7, WIDE=wide,
    )  # fmt: skip
    return y, stats


def _gcl_backward(
    dy: Tensor, x: Tensor, w: Tensor | None, stats: Tensor, p: Plan, need_x: bool, need_p: bool,
    pn: tuple[list[Tensor], int] | None = None, reduce: bool = True,
) -> tuple[Tensor | None, Tensor | None]:  # fmt: skip
    """``(dx, sums)`` of :func:`_gcl_forward`: ``sums`` (when ``need_p``) per channel, rows
    ``sum dy * x_hat``, ``sum dy`` (dweight, dbias), and with ``pn`` (``([b, m, rstd, slope], act
    code)``, ``w`` the affine weight before the step) the step's ``sum dout``, ``sum dout * (z - m)``;
    with ``reduce=False`` the ``(rows, N, C, nchunks)`` partial sums as they are."""
    _kernels = _kern()
    acc, tacc = _acc(x)
    N, C, S, G, Cg = p.N, p.C, p.S, p.G, p.C // p.G
    t = _gcl_walk(p, x.device)
    tot, grid = t.tot, t.grid
    part = torch.empty((4 if pn is not None else 2, tot), dtype=acc, device=x.device)
    wt = w if w is not None else x
    bt, mu, r, sl = pn[0] if pn is not None else (x, x, x, x)
    extra = {"PN": pn is not None, "ACT": pn[1] if pn is not None else 7, "WIDE": _wide(N * G)}
    _kernels.gcl_bwd_sums_kernel[grid](
        dy, x, wt, bt, stats, mu, r, sl, part, C, S, G, Cg, t.nCB, t.CH, t.nchunks, tot, N * G,
        ACC=tacc, BCC=t.BCC, BE=t.BE, **extra,
    )  # fmt: skip
    dx = None
    if need_x:
        dx = torch.empty_like(x)
        pa = torch.empty((2, N * G), dtype=acc, device=x.device)
        _kernels.gcl_bwd_combine_kernel[(N * G,)](
            wt, part, pa, G, Cg, t.nchunks, tot, HAS_W=w is not None, ACC=tacc, BL=t.BL
        )
        _kernels.gcl_bwd_dx_kernel[grid](
            dy, x, wt, bt, stats, mu, r, sl, pa, dx, C, S, G, Cg, t.nCB, t.CH, N * G,
            HAS_W=w is not None, ACC=tacc, BCC=t.BCC, BE=t.BE, **extra,
        )  # fmt: skip
    if not need_p:
        return dx, None
    part = part.view(-1, N, C, t.nchunks)
    return dx, part.sum((1, 3)) if reduce else part


@_on_device
def forward(
    x: Tensor, w: Tensor | None, b: Tensor | None, p: Plan, eps: float, stat_shape: list[int]
) -> tuple[Tensor, Tensor]:
    """``(y, stats)`` of a contiguous-per-plan ``x``; ``w`` / ``b`` flat in the plan's channel order.

    Called by :func:`normkit.kernels.norm_forward`; needs triton (and a GPU or its interpreter).
    With few sets (BatchNorm's one per channel, GN on a small batch) each set is cut into chunks,
    one program each: a two-phase reduction (chunk moments; combined per set by the output kernel).

    Example:
        >>> x = torch.randn(2, 4, 3, 3, device="cuda")  # doctest: +SKIP
        >>> p = normkit.kernels.plan(x, (2, 3), None, None)  # doctest: +SKIP
        >>> y, stats = forward(x, None, None, p, 1e-5, [2, 4, 1, 1])  # doctest: +SKIP
    """

    if p.mode == 1:
        return _bn_cl_forward(x, w, b, p, eps, stat_shape)
    if p.mode == 3:
        return _gcl_forward(x, w, b, p, eps, stat_shape)
    if p.mode == 4:
        return _ln2d_forward(x, w, b, p, eps, stat_shape)
    rows = _rows(p, w is not None or b is not None)
    if rows is not None:
        return _ln2d_forward(x, w, b, p, eps, stat_shape, rows)
    _kernels = _kern()

    acc, tacc = _acc(x)
    nsets, walk, nchunks, ch, split_c, BC, BM = _tiling(x, p)
    y = torch.empty_like(x)
    stats = torch.empty((core.STAT_ROWS, *stat_shape), dtype=acc, device=x.device)
    bound = _bound(acc)
    wt = w if w is not None else x
    bt = b if b is not None else x
    if nchunks == 1:
        _kernels.norm_fwd_kernel[(nsets,)](
            x,
            y,
            wt,
            bt,
            stats,
            x,
            x,
            x,
            nsets,
            *walk,
            float(eps),
            bound,
            HAS_W=w is not None,
            HAS_B=b is not None,
            ACC=tacc,
            BC=BC,
            BM=BM,
            WIDE=_wide(nsets),
        )
        return y, stats
    grid = (nsets, nchunks)
    BJ = next_power_of_2(nchunks)
    hl = torch.empty((2, nsets, nchunks), dtype=acc, device=x.device)
    pm = torch.empty((3, nsets, nchunks), dtype=acc, device=x.device)
    mwalk = walk[:9]  # NC, M, M2, s_c, s_m1, s_m2, D1, B1, B2
    _kernels.split_stats_kernel[grid](
        x, hl, pm, nsets, nchunks, ch, *mwalk, bound, SPLIT_C=split_c, ACC=tacc, BC=BC, BM=BM
    )
    _kernels.split_apply_kernel[grid](
        x,
        y,
        wt,
        bt,
        stats,
        hl,
        pm,
        nsets,
        nchunks,
        ch,
        *walk,
        float(eps),
        bound,
        HAS_W=w is not None,
        HAS_B=b is not None,
        SPLIT_C=split_c,
        ACC=tacc,
        BC=BC,
        BM=BM,
        BJ=BJ,
        RBM=max(1, BM // 8),
    )
    return y, stats


@_on_device
def backward(
    dy: Tensor, x: Tensor, w: Tensor | None, stats: Tensor, p: Plan, need_x: bool, need_p: bool
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dweight, dbias)``: ``dweight`` / ``dbias`` flat in the plan's channel order (or ``None``).

    Called by :func:`normkit.kernels.norm_backward` with :func:`forward`'s statistics (or any
    backend's: they share the reference's format); tested in tests/kernels/test_triton.py.

    Example:
        >>> dx, dw, db = backward(torch.randn_like(x), x, None, stats, p, True, False)  # doctest: +SKIP
    """

    if p.mode == 1:
        return _bn_cl_backward(dy, x, w, stats, p, need_x, need_p)
    if p.mode == 3:
        dx, sums = _gcl_backward(dy, x, w, stats, p, need_x, need_p)
        return (dx, sums[0], sums[1]) if sums is not None else (dx, None, None)
    if p.mode == 4:
        return _ln2d_backward(dy, x, w, stats, p, need_x, need_p)
    rows = _rows(p, w is not None or need_p)  # (BATCH_NCHW's affine is per row: not this walk's)
    if rows is not None:
        return _ln2d_backward(dy, x, w, stats, p, need_x, need_p, rows)
    _kernels = _kern()

    acc, tacc = _acc(x)
    nsets, walk, nchunks, ch, split_c, BC, BM = _tiling(x, p)
    NC, D1, CK = walk[0], walk[6], walk[9]
    dx = torch.empty_like(x) if need_x else None
    # (a chunk of channels writes only its own: the rest of its row stays zero)
    alloc = torch.zeros if nchunks > 1 and split_c else torch.empty
    part = alloc((2, nsets, nchunks, NC), dtype=acc, device=x.device) if need_p else None  # dweight, dbias
    pw, pb = (part[0], part[1]) if part is not None else (None, None)
    wt = w if w is not None else x
    if nchunks == 1:
        _kernels.norm_bwd_kernel[(nsets,)](
            dy,
            x,
            wt,
            stats,
            dx if dx is not None else x,
            pw if pw is not None else stats,
            pb if pb is not None else stats,
            x,
            x,
            x,
            x,
            x,
            x,
            nsets,
            *walk,
            HAS_W=w is not None,
            NEED_DX=need_x,
            NEED_P=need_p,
            ACC=tacc,
            BC=BC,
            BM=BM,
            WIDE=_wide(nsets),
        )
    else:
        grid = (nsets, nchunks)
        pa = torch.empty((2, nsets, nchunks), dtype=acc, device=x.device)
        _kernels.split_bwd_sums_kernel[grid](
            dy,
            x,
            wt,
            stats,
            pa,
            pw if pw is not None else stats,
            pb if pb is not None else stats,
            nsets,
            nchunks,
            ch,
            *walk,
            HAS_W=w is not None,
            NEED_P=need_p,
            SPLIT_C=split_c,
            ACC=tacc,
            BC=BC,
            BM=BM,
        )
        if dx is not None:
            _kernels.split_bwd_dx_kernel[grid](
                dy,
                x,
                wt,
                stats,
                pa,
                dx,
                nsets,
                nchunks,
                ch,
                *walk,
                HAS_W=w is not None,
                SPLIT_C=split_c,
                ACC=tacc,
                BC=BC,
                BM=BM,
                BJ=next_power_of_2(nchunks),
            )
    if part is None:
        return dx, None, None
    # per set, chunk and channel-in-set -> per channel: chunks, and sets sharing a channel, are summed,
    # dweight and dbias in one reduction (on a GPU every extra op is a launch)
    dims = (1, 3) if nchunks > 1 else (1,)
    if CK == 0:  # every set holds every channel
        dims = (*dims, 2)
    sums = part.view(2, nsets // D1, D1, nchunks, NC).sum(dims).reshape(2, -1)
    return dx, sums[0], sums[1]


_SLOPES: dict[tuple[float, torch.dtype, torch.device], Tensor] = {}


def _slope(slope: float, acc: torch.dtype, device: torch.device) -> Tensor:
    """leaky_relu's slope as the one-element tensor the kernels read, made once per (value, dtype,
    device): on a GPU each fresh one is a fill kernel launched from the host. The kernels only read it."""
    key = (float(slope), acc, device)
    t = _SLOPES.get(key)
    if t is None:
        if len(_SLOPES) > 64:
            _SLOPES.clear()
        with torch.inference_mode(False):  # (a normal tensor even if first made in inference mode)
            t = _SLOPES[key] = torch.full((1,), key[0], dtype=acc, device=device)
    return t


# --- Proxy Norm's activation step -------------------------------------------------------------------

_ACTS = ("relu", "leaky_relu", "silu", "gelu", "gelu_tanh", "sigmoid", "tanh", "identity")  # kernel codes


def _ce_walk(y: Tensor) -> tuple[int, int, int, int, int, int, int, int] | None:
    """``(C, E, E2, s_c, s_e1, s_e2, BCC, BE)`` of ``y`` as a (channel, element) matrix, or ``None``
    when ``y`` is neither contiguous nor channels-last."""

    N, C = y.shape[0], y.shape[1]
    S = math.prod(y.shape[2:])  # (no view of y: one is a few us of host time)
    E = N * S
    if y.is_contiguous():
        BE = min(next_power_of_2(max(S, 1)), 1024)
        return C, E, S, S, C * S, 1, max(1, min(next_power_of_2(C), 2048 // BE)), BE
    if y.dim() in (4, 5) and y.is_contiguous(
        memory_format=torch.channels_last if y.dim() == 4 else torch.channels_last_3d
    ):
        BCC = min(next_power_of_2(C), 64)
        return C, E, 1, 1, C, 0, BCC, max(1, min(next_power_of_2(E), 2048 // BCC))
    return None


def _ce_chunks(
    C: int, E: int, BCC: int, BE: int, device: torch.device, samples: int = 1
) -> tuple[int, int, int]:
    """``(nchunks, CH, BE)`` along the elements: enough programs to fill the device (with ``samples``
    walks of ``C`` channels by ``E`` elements side by side: GroupNorm channels-last's per sample)."""
    if _FORCE_CHUNK is not None:
        be = min(BE, next_power_of_2(_FORCE_CHUNK))
        ch = cdiv(_FORCE_CHUNK, be) * be
        return cdiv(E, ch), ch, be
    blocks = samples * cdiv(C, BCC)
    per = max(1, min(cdiv(_programs(device), blocks), (E * BCC) // _MIN_CHUNK, 1024))
    ch = cdiv(cdiv(E, per), BE) * BE
    return cdiv(E, ch), ch, BE


def _step_fwd(y: Tensor, walk: tuple[int, ...], vec: list[Tensor], act: str) -> Tensor:
    """The step's output from ``vec`` = ``[w, b, m, rstd, slope]`` (accumulation dtype, contiguous)."""
    C, E, E2, s_c, s_e1, s_e2, BCC, BE = walk
    nchunks, ch, BE = _ce_chunks(C, E, BCC, BE, y.device)
    out = torch.empty_like(y)
    _kern().proxy_act_fwd_kernel[(cdiv(C, BCC), nchunks)](
        y, *vec, out, C, E, E2, s_c, s_e1, s_e2, ch,
        ACT=_ACTS.index(act), ACC=_acc(vec[2])[1], BCC=BCC, BE=BE,
    )  # fmt: skip
    return out


def _step_bwd(
    dout: Tensor, y: Tensor, walk: tuple[int, ...], vec: list[Tensor], act: str, need_dy: bool
) -> tuple[Tensor | None, Tensor]:
    """``(dy, part)``: the step's input gradient (if ``need_dy``) and its ``(4, C, nchunks)`` partial
    sums (rows: of dweight, of dbias, sum dout, sum dout * (z - m)); ``dout`` shares ``y``'s strides."""
    C, E, E2, s_c, s_e1, s_e2, BCC, BE = walk
    nchunks, ch, BE = _ce_chunks(C, E, BCC, BE, y.device)
    dy = torch.empty_like(y) if need_dy else None
    part = torch.empty((4, C, nchunks), dtype=vec[2].dtype, device=y.device)
    _kern().proxy_act_bwd_kernel[(cdiv(C, BCC), nchunks)](
        dout, y, *vec, dy if dy is not None else y, part, C, E, E2, s_c, s_e1, s_e2, ch, nchunks,
        NEED_DY=dy is not None, ACT=_ACTS.index(act), ACC=_acc(vec[2])[1], BCC=BCC, BE=BE,
    )  # fmt: skip
    return dy, part


@_or(None)
@_on_device
def proxy_act_forward(
    y: Tensor, weight: Tensor, bias: Tensor, m: Tensor, rstd: Tensor, act: str, slope: float
) -> Tensor | None:
    """``(act(weight * y + bias) - m) * rstd`` per channel in one pass, or ``None`` where ``y``'s
    layout or the activation is not covered (the caller then runs its composite).

    Called by ``normkit::proxy_norm_act`` (:mod:`normkit.ops.proxy`) on CUDA tensors; the
    per-channel vectors are in ``m``'s dtype, the output in ``y``'s.

    Example:
        >>> out = proxy_act_forward(y, w, b, m, r, "relu", 0.0)  # doctest: +SKIP
    """
    walk = _ce_walk(y) if act in _ACTS else None
    if walk is None:
        return None
    acc = m.dtype
    vec = [_vec(t, acc) for t in (weight, bias, m, rstd)]
    return _step_fwd(y, walk, [*vec, _slope(slope, acc, y.device)], act)


@_or(None)
@_on_device
def proxy_act_backward(
    dout: Tensor,
    y: Tensor,
    weight: Tensor,
    bias: Tensor,
    m: Tensor,
    rstd: Tensor,
    act: str,
    slope: float,
    needs: list[bool],
) -> tuple[Tensor | None, ...] | None:
    """``(dy, dweight, dbias, dm, drstd)`` of :func:`proxy_act_forward` (``None`` where not needed),
    or ``None`` where the layout is not covered; ``dout`` must share ``y``'s strides and dtype.

    Example:
        >>> got = proxy_act_backward(g, y, w, b, m, r, "relu", 0.0, [True] * 5)  # doctest: +SKIP
    """
    walk = _ce_walk(y) if act in _ACTS and dout.stride() == y.stride() and dout.dtype == y.dtype else None
    if walk is None:
        return None
    acc = m.dtype
    vec = [_vec(t, acc) for t in (weight, bias, m, rstd)]
    dy, part = _step_bwd(dout, y, walk, [*vec, _slope(slope, acc, y.device)], act, needs[0])
    sums = part.sum(2)
    return (
        dy,
        sums[0].to(weight.dtype) if needs[1] else None,
        sums[1].to(bias.dtype) if needs[2] else None,
        -(sums[2] * rstd.to(acc)) if needs[3] else None,
        sums[3].clone() if needs[4] else None,
    )


# --- Proxy Norm's statistics: the (C, n) quadrature in one kernel each way -------------------------

#: the quadrature points one program holds in a tile (num_points is 200 by default)
PROXY_MAX_POINTS = 4096


def _vec(t: Tensor, acc: torch.dtype) -> Tensor:
    """A parameter vector as the kernels read it: itself where it already is (no new tensor, no
    host time), else a detached contiguous copy in the accumulation dtype."""
    return t if t.dtype == acc and t.is_contiguous() else t.detach().to(acc).contiguous()


_AS_ACC: dict[int, tuple[Any, int, torch.dtype, Tensor]] = {}


def _points_vec(u: Tensor, acc: torch.dtype) -> Tensor:
    """The quadrature points as the kernels read them. A layer keeps them in float64: converted once
    per (points, version, dtype), not on every call (on a GPU each conversion is a kernel launch)."""
    if u.dtype == acc and u.is_contiguous():
        return u
    got = _AS_ACC.get(id(u))
    if got is not None and got[0]() is u and got[1] == u._version and got[2] == acc:
        return got[3]
    with torch.inference_mode(False):  # (a normal tensor even if first made in inference mode)
        v = u.detach().to(acc).contiguous()
    if len(_AS_ACC) > 64:
        _AS_ACC.clear()
    _AS_ACC[id(u)] = (weakref.ref(u), u._version, acc, v)  # (the weak reference tells a reused id)
    return v


def _proxy_tiles(C: int, n: int) -> tuple[int, int]:
    """``(BCC, BN)``: the proxy statistics kernels' tile of channels by quadrature points."""
    BN = next_power_of_2(n)
    return max(1, min(next_power_of_2(C), 2048 // BN)), BN


def _proxy_stats_fwd(vec: list[Tensor], sl: Tensor, act: str, eps: float) -> tuple[Tensor, Tensor]:
    """``(m, rstd)`` per channel from ``vec`` = ``[w, b, pb, pw, points]`` (accumulation dtype)."""
    w, u = vec[0], vec[4]
    C, n = w.shape[0], u.shape[0]
    BCC, BN = _proxy_tiles(C, n)
    m = torch.empty(C, dtype=w.dtype, device=w.device)
    r = torch.empty_like(m)
    _kern().proxy_stats_fwd_kernel[(cdiv(C, BCC),)](
        *vec, sl, m, r, C, n, float(eps), ACT=_ACTS.index(act), ACC=_acc(w)[1], BCC=BCC, BN=BN
    )
    return m, r


def _proxy_stats_bwd(
    vec: list[Tensor], sl: Tensor, m: Tensor, r: Tensor, act: str, dm: Tensor, dr: Tensor,
    sums: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """``(4, C)``: the gradients of the four parameters in ``vec`` (``[w, b, pb, pw, points]``) from
    ``dm``, ``drstd``; or, with ``sums`` (the fused GroupNorm + step's ``(4, NP, C, NK)`` partial
    sums, see ``proxy_stats_bwd_kernel``), from those, with the step's own dweight and dbias added."""
    C, n = m.shape[0], vec[4].shape[0]
    BCC, BN = _proxy_tiles(C, n)
    g = torch.empty((4, C), dtype=m.dtype, device=m.device)
    P, NP, NK = (sums, sums.shape[1], sums.shape[3]) if sums is not None else (dm, 1, 1)
    _kern().proxy_stats_bwd_kernel[(cdiv(C, BCC),)](
        *vec, sl, m, r, dm, dr, P, NP, NK, g, C, n,
        ACT=_ACTS.index(act), ACC=_acc(m)[1], BCC=BCC, BN=BN, FROM_SUMS=sums is not None,
    )  # fmt: skip
    return g


def _proxy_stats_double_backward(
    ins0: tuple[Tensor, ...], u: Tensor, act: str, slope: float, eps: float
) -> tuple[list[Tensor], Any]:
    """``(ins, outs)``: the four parameters made leaves that require grad where they did not, and
    the composite's ``(m, rstd)`` of them (a graph autograd differentiates, for create_graph=True)."""
    from ...functional.proxy_norm import _proxy_stats_composite

    w, b, pb, pw = ins = [t if t.requires_grad else t.detach().requires_grad_() for t in ins0]
    spec: Any = act if act != "leaky_relu" else f"leaky_relu:{slope}"
    return ins, _proxy_stats_composite(w, b, pb, pw, u, spec, eps)


class _ProxyStats(torch.autograd.Function):
    """``(m, rstd)`` of :func:`normkit.functional.proxy_stats` in one kernel each way (the composite
    is about 15 small ops forward and 25 backward, each a kernel launch and host time on a GPU)."""

    @staticmethod
    def forward(
        ctx: Any, w: Tensor, b: Tensor, pb: Tensor, pw: Tensor, u: Tensor, act: str, slope: float, eps: float
    ) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        acc = _acc(w)[0]
        vec = [*(_vec(t, acc) for t in (w, b, pb, pw)), _points_vec(u, acc)]
        sl = _slope(slope, acc, w.device)
        m, r = _proxy_stats_fwd(vec, sl, act, eps)
        ctx.save_for_backward(w, b, pb, pw, u, m, r, *vec, sl)
        ctx.act, ctx.slope, ctx.eps = act, slope, eps
        return m, r

    @staticmethod
    def backward(ctx: Any, dm: Tensor | None, dr: Tensor | None) -> tuple[Any, ...]:  # type: ignore[override]
        w0, b0, pb0, pw0, u0, m, r, *vec, sl = ctx.saved_tensors
        if not torch.is_grad_enabled():
            try:
                dm_ = torch.zeros_like(m) if dm is None else dm.to(m.dtype).contiguous()
                dr_ = torch.zeros_like(m) if dr is None else dr.to(m.dtype).contiguous()
                with _device_of(m):
                    g = _proxy_stats_bwd(vec, sl, m, r, ctx.act, dm_, dr_)
                return (*(g[i].to(t.dtype) for i, t in enumerate((w0, b0, pb0, pw0))), None, None, None, None)
            except Exception as e:
                if not gave_up(e):
                    raise
        # create_graph=True (or the kernel would not compile): differentiate the composite of plain ops
        again = torch.is_grad_enabled()
        with torch.enable_grad():
            ins, outs = _proxy_stats_double_backward((w0, b0, pb0, pw0), u0, ctx.act, ctx.slope, ctx.eps)
            pairs = [(o, g) for o, g in zip(outs, (dm, dr)) if g is not None]
            grads = torch.autograd.grad(
                [o for o, _ in pairs], ins, [g for _, g in pairs], create_graph=again, allow_unused=True
            )
        return (*grads, None, None, None, None)


@_or(None)
@_on_device
def proxy_stats(
    weight: Tensor,
    bias: Tensor,
    proxy_bias: Tensor,
    proxy_weight: Tensor,
    points: Tensor,
    activation: Any,
    eps: float,
) -> tuple[Tensor, Tensor] | None:
    """``(m, rstd)`` of :func:`normkit.functional.proxy_stats` in one Triton kernel each way, or ``None``
    where it does not apply (an activation outside the kernels' list, more than
    :data:`PROXY_MAX_POINTS` points, tensors on different devices): the caller runs the composite.

    Example:
        >>> m, rstd = proxy_stats(w, b, pb, pw, points, "relu", 0.03)  # doctest: +SKIP
    """
    from ...functional.activations import activation_spec

    spec = activation_spec(activation)
    if (
        spec is None
        or spec[0] not in _ACTS
        or points.dim() != 1
        or not 0 < points.shape[0] <= PROXY_MAX_POINTS
    ):
        return None
    if any(t.device != weight.device for t in (bias, proxy_bias, proxy_weight, points)):
        return None
    return _ProxyStats.apply(
        weight, bias, proxy_bias, proxy_weight, points, spec[0], float(spec[1]), float(eps)
    )  # type: ignore[no-any-return]


def _proxy_norm_act_fwd(
    y: Tensor, walk: tuple[int, ...], params: tuple[Tensor, ...], u: Tensor, act: str, slope: float,
    peps: float,
) -> tuple[Tensor, list[Tensor], Tensor, Tensor]:  # fmt: skip
    """``(out, vec, m, rstd)``: the proxy statistics, then the step (two launches); ``vec`` =
    ``[w, b, pb, pw, points, slope]`` as the kernels read them."""
    acc = _acc(params[0])[0]
    vec = [*(_vec(t, acc) for t in params), _points_vec(u, acc)]
    vec.append(_slope(slope, acc, y.device))
    m, r = _proxy_stats_fwd(vec[:5], vec[5], act, peps)
    return _step_fwd(y, walk, [vec[0], vec[1], m, r, vec[5]], act), vec, m, r


class _ProxyNormAct(torch.autograd.Function):
    """:func:`normkit.functional.proxy_norm_act` (the statistics from the four parameters, then the
    step) as one autograd node, two kernels each way; the step's backward partial sums go straight
    into the statistics' backward kernel (no torch ops between them)."""

    @staticmethod
    def forward(
        ctx: Any,
        y: Tensor,
        w: Tensor,
        b: Tensor,
        pb: Tensor,
        pw: Tensor,
        u: Tensor,
        walk: tuple[int, ...],
        act: str,
        slope: float,
        peps: float,
    ) -> Tensor:  # type: ignore[override]
        out, vec, m, r = _proxy_norm_act_fwd(y, walk, (w, b, pb, pw), u, act, slope, peps)
        # (the originals too: a double backward differentiates them)
        ctx.save_for_backward(y, w, b, pb, pw, m, r, *vec)
        ctx.walk, ctx.act, ctx.slope, ctx.peps = walk, act, slope, peps
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        y, *params, m, r = ctx.saved_tensors[:7]
        vec = list(ctx.saved_tensors[7:])
        none = (None,) * 5
        if not (torch.is_grad_enabled() or type(dout) is not Tensor or not torch._C._has_storage(dout)):
            try:
                if dout.dtype != y.dtype or dout.stride() != y.stride():
                    dout = torch.empty_like(y).copy_(dout)
                need_y = ctx.needs_input_grad[0]
                with _device_of(y):
                    dy, part = _step_bwd(dout, y, ctx.walk, [vec[0], vec[1], m, r, vec[5]], ctx.act, need_y)
                    if not any(ctx.needs_input_grad[1:5]):
                        return (dy, None, None, None, None, *none)
                    C, nchunks = part.shape[1], part.shape[2]
                    pg = _pn_param_grads(ctx.act, params, vec, m, r, part.view(4, 1, C, nchunks))
                return (dy, *pg, *none)
            except Exception as e:
                if not gave_up(e):
                    raise
        # create_graph=True, batched gradients (or a kernel that would not compile): the composite
        return (*_pn_composite_grads(ctx, y, params, vec[4], dout, lambda t: t), *none)


def _pn_composite_grads(
    ctx: Any, x: Tensor, params: list[Tensor], u: Tensor, dout: Tensor, to_y: Any
) -> tuple[Tensor | None, ...]:
    """create_graph=True (or batched gradients) on a Proxy Norm node: the gradients of ``x`` and the
    four parameters from the composite of reference ops (``to_y`` maps ``x`` to the step's input),
    which autograd differentiates again."""
    from ...functional.activations import get_activation
    from ...ops.proxy import proxy_act_composite
    from .. import use

    again = torch.is_grad_enabled()  # (create_graph=True called it: a graph of the gradients)
    with torch.enable_grad(), use("reference"):
        xi = x if x.requires_grad else x.detach().requires_grad_()
        ps, (mc, rc) = _proxy_stats_double_backward(tuple(params), u, ctx.act, ctx.slope, ctx.peps)
        a = get_activation(ctx.act if ctx.act != "leaky_relu" else torch.nn.LeakyReLU(ctx.slope))
        out = proxy_act_composite(to_y(xi), ps[0], ps[1], mc, rc, a)
        return torch.autograd.grad(out, [xi, *ps], dout, create_graph=again, allow_unused=True)


def _pn_param_grads(
    act: str, params: list[Tensor], vec: list[Tensor], m: Tensor, r: Tensor, sums: Tensor
) -> tuple[Tensor, ...]:
    """The four parameters' gradients from the step's backward partial sums ``(4, NP, C, NK)``."""
    g = _proxy_stats_bwd(vec[:5], vec[5], m, r, act, m, r, sums)
    return tuple(g[i].to(t.dtype) for i, t in enumerate(params))


@_or(None)
@_on_device
def proxy_norm_act(
    y: Tensor,
    weight: Tensor,
    bias: Tensor,
    proxy_bias: Tensor,
    proxy_weight: Tensor,
    points: Tensor,
    spec: tuple[str, float],
    eps: float,
) -> Tensor | None:
    """:func:`normkit.functional.proxy_norm_act` (checked arguments; ``spec``: the activation's
    ``(name, slope)``, :func:`~normkit.functional.activations.activation_spec`) on the Triton kernels
    as one autograd node: the proxy statistics (C x 200 values), then the step, one kernel each way; or
    ``None`` where it does not apply (an activation or layout the kernels lack, more than
    :data:`PROXY_MAX_POINTS` points, tensors on different devices, dual tensors): the caller then
    runs the statistics and the registered step.

    Example:
        >>> out = proxy_norm_act(y, w, b, pb, pw, points, ("relu", 0.0), 0.03)  # doctest: +SKIP
    """
    if spec[0] not in _ACTS:
        return None
    params = (weight, bias, proxy_bias, proxy_weight)
    walk = _ce_walk(y)
    if (
        walk is None
        or points.dim() != 1
        or not 0 < points.shape[0] <= PROXY_MAX_POINTS
        or any(t.device != y.device for t in (*params, points))
        or torch.autograd.forward_ad._current_level >= 0  # (dual tensors: the general ops)
    ):
        return None
    act, slope = spec[0], float(spec[1])
    if torch.is_grad_enabled() and any(t.requires_grad for t in (y, *params)):
        return _ProxyNormAct.apply(y, *params, points, walk, act, slope, float(eps))  # type: ignore[no-any-return]
    return _proxy_norm_act_fwd(y, walk, params, points, act, slope, float(eps))[0]


# --- GroupNorm + Proxy Norm's step in one kernel each way ----------------------------------------


@_on_device
def gn_proxy_forward(
    x: Tensor, p: Plan, eps: float, vec: list[Tensor], act: str
) -> tuple[Tensor, Tensor] | None:
    """``(out, stats)``: GroupNorm without affine, then ``(act(w * y + b) - m) * rstd`` per channel,
    in one kernel (the normalized ``y`` is never stored; on channels-last memory the statistics take
    two small launches before it, see :func:`_gcl_forward`); ``vec`` = ``[w, b, m, rstd, slope]`` in
    the accumulation dtype. ``None`` where the fused kernel does not apply (NCHW sets too few to fill
    the device, which need a split reduction, or an activation it lacks): the caller then runs the two ops.

    Example:
        >>> out, stats = gn_proxy_forward(x, p, 1e-5, [w, b, m, r, slope], "relu")  # doctest: +SKIP
    """
    if act not in _ACTS or p.mode not in (2, 3):
        return None
    if p.mode == 3:  # channels-last: blocks of channels across groups (any number of sets)
        return _gcl_forward(x, vec[0], vec[1], p, eps, [p.N, p.G], (vec[2:5], _ACTS.index(act)))
    nsets, walk, nchunks, _, _, BC, BM = _tiling(x, p)
    if nchunks != 1:
        return None
    _kernels = _kern()

    acc, tacc = _acc(x)
    out = torch.empty_like(x)
    stats = torch.empty((core.STAT_ROWS, p.N, p.G), dtype=acc, device=x.device)
    bound = _bound(acc)
    _kernels.norm_fwd_kernel[(nsets,)](
        x,
        out,
        vec[0],
        vec[1],
        stats,
        vec[2],
        vec[3],
        vec[4],
        nsets,
        *walk,
        float(eps),
        bound,
        HAS_W=True,
        HAS_B=True,
        ACC=tacc,
        BC=BC,
        BM=BM,
        PN=True,
        ACT=_ACTS.index(act),
        WIDE=_wide(nsets),
    )
    return out, stats


@_on_device
def gn_proxy_backward(
    dout: Tensor, x: Tensor, stats: Tensor, p: Plan, vec: list[Tensor], act: str, need_x: bool
) -> tuple[Tensor | None, Tensor]:
    """``(dx, sums)`` of :func:`gn_proxy_forward`, recomputing ``y`` from ``x`` and the statistics:
    ``sums`` the per-channel partial sums ``(4, NP, C, NK)`` (summed over NP and NK, rows: dweight,
    dbias, ``sum dout``, ``sum dout * (z - m)``; ``dm = -rstd * sum dout``, ``drstd`` the last), which
    :func:`_proxy_stats_bwd` reduces while it takes the step's gradients on into the parameters.

    Example:
        >>> vec = [w, b, m, r, slope]  # doctest: +SKIP
        >>> dx, sums = gn_proxy_backward(g, x, stats, p, vec, "relu", True)  # doctest: +SKIP
        >>> dweight, dbias, sg, sz = sums.sum((1, 3))  # doctest: +SKIP
    """
    if p.mode == 3:
        dx, part = _gcl_backward(
            dout, x, vec[0], stats, p, need_x, True, (vec[1:5], _ACTS.index(act)), reduce=False
        )
        assert part is not None
        return dx, part
    _kernels = _kern()

    acc, tacc = _acc(x)
    nsets, walk = _walk(p)
    NC, M = walk[0], walk[1]
    BC, BM = _blocks(NC, M)
    dx = torch.empty_like(x) if need_x else None
    part = torch.empty((4, nsets, NC), dtype=acc, device=x.device)
    _kernels.norm_bwd_kernel[(nsets,)](
        dout,
        x,
        vec[0],
        stats,
        dx if dx is not None else x,
        part[0],
        part[1],
        vec[1],
        vec[2],
        vec[3],
        vec[4],
        part[2],
        part[3],
        nsets,
        *walk,
        HAS_W=True,
        NEED_DX=need_x,
        NEED_P=True,
        ACC=tacc,
        BC=BC,
        BM=BM,
        PN=True,
        ACT=_ACTS.index(act),
        WIDE=_wide(nsets),
    )
    return dx, part.view(4, p.N, p.C, 1)  # (the (n, g, channel-in-group) sets are (n, c))


def _gn_plan_of(x: Tensor, groups: int, fused: bool) -> Plan | None:
    from .. import plan

    N, C, k = x.shape[0], x.shape[1], x.dim() - 2
    if k < 1 or C % groups:
        return None
    if x.is_contiguous():
        xv = x.view(N, groups, C // groups, *x.shape[2:])
        pshape, dims = (1, groups, C // groups) + (1,) * k, tuple(range(2, xv.dim()))
    elif x.stride(1) == 1 and x.permute(0, *range(2, 2 + k), 1).is_contiguous():
        xv = x.permute(0, *range(2, 2 + k), 1).reshape(N, *x.shape[2:], groups, C // groups)
        pshape, dims = (1,) * (1 + k) + (groups, C // groups), (*range(1, 1 + k), 2 + k)
    else:
        return None
    p = plan(xv, dims, torch.empty(pshape, device="meta"), None)
    if p is None or p.mode not in (2, 3) or p.order is not None:
        return None
    if fused and p.mode == 2 and _tiling(x, p)[2] != 1:
        return None  # (sets too few for one program each: the two ops' split kernels fill the GPU)
    return p


_GN_PLANS: dict[tuple[object, ...], Plan | None] = {}


def _gn_plan(x: Tensor, groups: int, fused: bool = True) -> Plan | None:
    """The GROUP_NCHW / GROUP_CL plan of ``x`` (``(N, C, *spatial)``, ``*spatial`` not empty)
    normalized in ``groups`` groups with a per-channel affine, else ``None``; ``fused``: only where
    the fused GroupNorm + step takes it (one program per set on NCHW). Kept per (shape, strides,
    groups, device, fused): a training step meets the same few."""
    key = (x.shape, x.stride(), groups, x.device, fused)
    try:
        return _GN_PLANS[key]
    except KeyError:
        pass
    if len(_GN_PLANS) > 1024:
        _GN_PLANS.clear()
    p = _GN_PLANS[key] = _gn_plan_of(x, groups, fused)
    return p


class _Norm(torch.autograd.Function):
    """A norm on the Triton kernels as one autograd node on ``x`` as it lies: no views of ``x``, the
    affine or the output around it (each a node for autograd, about 6 us of host time a call each
    way, which on a GPU is much of a small norm's time). ``pview``: the broadcast shape of the affine
    the plan was made for; ``composite``: ``(name, args)`` of the :mod:`normkit.functional` call
    ``name(x, *args, w, b, eps)`` that a double backward differentiates on the reference path
    (``name`` may be such a function itself); ``want_stats``: also return the saved statistics
    (not differentiable: BatchNorm's running statistics read them)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        w: Tensor | None,
        b: Tensor | None,
        p: Plan,
        pview: tuple[int, ...],
        stat_shape: list[int],
        eps: float,
        composite: Any,
        want_stats: bool = False,
    ) -> Any:  # type: ignore[override]
        wv, bv = _affine(x, w, b, p, pview)
        y, stats = forward(x, wv, bv, p, eps, stat_shape)
        ctx.save_for_backward(x, w, b, stats, wv)
        ctx.p, ctx.pview, ctx.composite, ctx.eps = p, pview, composite, eps
        if want_stats:
            ctx.mark_non_differentiable(stats)
            return y, stats
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor, *_: Any) -> tuple[Any, ...]:  # type: ignore[override]
        x, w, b, stats, wv = ctx.saved_tensors
        if torch.is_grad_enabled() or type(dy) is not Tensor or not torch._C._has_storage(dy):
            # create_graph=True (or batched gradients): differentiate the composite of reference ops
            return _Norm._composite(ctx, dy, x, w, b)
        try:
            return _Norm._kernels(ctx, dy, x, w, b, stats, wv)
        except Exception as e:
            if not gave_up(e):
                raise
            return _Norm._composite(ctx, dy, x, w, b)  # (the same gradients, on the reference path)

    @staticmethod
    def _composite(ctx: Any, dy: Tensor, x: Tensor, w: Tensor | None, b: Tensor | None) -> tuple[Any, ...]:
        """The gradients from the composite of reference ops (autograd differentiates it again under
        create_graph=True)."""
        none = (None,) * 6
        from .. import use

        again = torch.is_grad_enabled()  # (create_graph=True called it: a graph of the gradients)
        with torch.enable_grad(), use("reference"):
            xi = x if x.requires_grad else x.detach().requires_grad_()
            ins = [
                xi,
                *(t if t is None or t.requires_grad else t.detach().requires_grad_() for t in (w, b)),
            ]
            import normkit.functional as nf

            name, args = ctx.composite
            fn: Any = name if callable(name) else getattr(nf, name)
            y: Tensor = fn(xi, *args, ins[1], ins[2], ctx.eps)
            live = [t for t in ins if t is not None]
            got = iter(torch.autograd.grad(y, live, dy, create_graph=again, allow_unused=True))
        return (*(next(got) if t is not None else None for t in ins), *none)

    @staticmethod
    def _kernels(
        ctx: Any, dy: Tensor, x: Tensor, w: Tensor | None, b: Tensor | None, stats: Tensor, wv: Tensor | None
    ) -> tuple[Any, ...]:
        none = (None,) * 6
        if dy.dtype != x.dtype or dy.stride() != x.stride():
            dy = torch.empty_like(x).copy_(dy)
        need_w = ctx.needs_input_grad[1] and w is not None
        need_b = ctx.needs_input_grad[2] and b is not None
        dx, dw, db = backward(dy, x, wv, stats, ctx.p, ctx.needs_input_grad[0], need_w or need_b)
        return (
            dx,
            _affine_grad(dw, w, ctx.pview, ctx.p.order) if need_w else None,  # type: ignore[arg-type]
            _affine_grad(db, b, ctx.pview, ctx.p.order) if need_b else None,  # type: ignore[arg-type]
            *none,
        )


def _affine_grad(g: Tensor, t: Tensor, pview: tuple[int, ...], order: tuple[int, ...] | None) -> Tensor:
    """A flat affine gradient from the kernels (the plan's channel order) as the parameter ``t``."""
    if order is None:
        return g.view(t.shape).to(t.dtype)
    from .. import _unflat

    return _unflat(g, t.view(pview), order).view(t.shape)


def _affine(
    x: Tensor, w: Tensor | None, b: Tensor | None, p: Plan, pview: tuple[int, ...]
) -> tuple[Tensor | None, Tensor | None]:
    """The affine as the kernels read it: flat, in the plan's channel order, accumulation dtype."""
    from .. import _flat

    acc = _acc(x)[0]
    if p.order is None:  # (then the flat order is the parameter's own)
        return (_vec(w, acc) if w is not None else None), (_vec(b, acc) if b is not None else None)
    return (
        _flat(w.view(pview), acc, p.order) if w is not None else None,
        _flat(b.view(pview), acc, p.order) if b is not None else None,
    )


def _norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    p: Plan,
    pview: tuple[int, ...],
    stat_shape: list[int],
    eps: float,
    composite: Any,
    want_stats: bool = False,
) -> Any:
    """``y`` of the norm ``p`` on ``x`` (``(y, stats)`` with ``want_stats``): the one-node Function
    where autograd needs it, else the launches."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _Norm.apply(x, weight, bias, p, pview, stat_shape, float(eps), composite, want_stats)
    wv, bv = _affine(x, weight, bias, p, pview)
    got = forward(x, wv, bv, p, float(eps), stat_shape)
    return got if want_stats else got[0]


def _usable(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether the one-node path may take a call: not dual tensors (the general op has the jvp), and
    the affine on x's device."""
    return torch.autograd.forward_ad._current_level < 0 and all(
        t is None or t.device == x.device for t in (weight, bias)
    )


@_or(None)
@_on_device
def group_norm(
    x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor | None:
    """:func:`normkit.functional.group_norm` (checked arguments, no mask) on the Triton kernels as one
    autograd node, or ``None`` where this path does not take it (the caller then runs the general
    op, which may still reach the same kernels).

    Example:
        >>> y = group_norm(x, 32, weight, bias, 1e-5)  # doctest: +SKIP
    """
    if x.dim() < 3 or not _usable(x, weight, bias):
        return None  # ((N, C) inputs: the general op)
    p = _gn_plan(x, groups, fused=False)
    if p is None:
        return None
    pview = (x.shape[1],)  # (the GN plans have no channel permutation: the flat affine is w itself)
    return _norm(x, weight, bias, p, pview, [p.N, groups], eps, ("group_norm", (groups,)))


_PLANS: dict[tuple[object, ...], tuple[Plan, list[int]] | None] = {}


def _planned_norm(
    x: Tensor,
    dims: tuple[int, ...],
    pview: tuple[int, ...],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    composite: tuple[Any, tuple[Any, ...]],
    want_stats: bool = False,
) -> Any:
    """``x`` normalized over ``dims`` with an affine of broadcast shape ``pview`` on the one-node path
    (``(y, stats)`` with ``want_stats``), its plan kept per (shape, strides, dims, affine): a training
    step meets the same few; ``None`` where no plan takes it."""
    if not _usable(x, weight, bias):
        return None
    key = (x.shape, x.stride(), dims, pview, weight is not None, bias is not None, x.device)
    if key not in _PLANS:
        from .. import plan

        meta = torch.empty(pview, device="meta")
        p = plan(x, dims, meta if weight is not None else None, meta if bias is not None else None)
        if len(_PLANS) > 1024:
            _PLANS.clear()
        _PLANS[key] = (p, core.stat_shape(x, dims)) if p is not None else None
    got = _PLANS[key]
    if got is None:
        return None
    return _norm(x, weight, bias, got[0], pview, got[1], eps, composite, want_stats)


def _bn_composite(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """BatchNorm with batch statistics as reference ops (what a double backward differentiates)."""
    import normkit.functional as nf

    return nf.batch_norm(x, None, None, weight, bias, True, eps=eps).output


@_or(None)
@_on_device
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
    """BatchNorm's training step (batch statistics) on the Triton kernels as one autograd node, or
    ``None`` where this path does not take it (the caller then runs the general op).

    The interface of :func:`normkit.kernels._direct.batch_norm_train`: the running statistics, if
    given, are updated in place by normkit's rule (one Triton launch), from the statistics the
    forward kernel saved; ``num_batches_tracked`` counts finite batches, ``num_skipped_updates`` the
    rest.

    Example:
        >>> y = batch_norm_train(x, w, b, rm, rv, nbt, 0.1, 1e-5, True)  # doctest: +SKIP
    """
    if x.dim() < 2 or not _usable(x, weight, bias):
        return None
    from .._direct import params_fit, store_running

    C = x.shape[1]
    count = x.numel() // C if C else 0
    tracking = running_mean is not None and running_var is not None
    vecs = (weight, bias, running_mean, running_var) if tracking else (weight, bias)
    if count < 2 or any(t is not None and t.shape != (C,) for t in vecs) or not params_fit(x, *vecs):
        return None
    if tracking and momentum is None and num_batches_tracked is None:
        return None  # (the general path says why not)
    dims = (0, *range(2, x.dim()))
    pview = (1, C) + (1,) * (x.dim() - 2)  # (the affine broadcast to x, as plan() reads it)
    got = _planned_norm(x, dims, pview, weight, bias, eps, (_bn_composite, ()), want_stats=tracking)
    if got is None or not tracking:
        return got
    assert running_mean is not None and running_var is not None
    y, stats = got
    args = (num_batches_tracked, num_skipped_updates, momentum, unbiased)
    if bn_running_update_from_stats(stats, count, running_mean, running_var, *args):
        return y
    # buffers the launch does not take (not plain vectors, counters not int64 scalars): torch's ops,
    # without asking the same launch again through store_running's fused branch
    mean, var = core.mean_var(stats)
    mean, var = mean.reshape(C), var.reshape(C) * (count / (count - 1))  # (the unbiased variance)
    store_running(
        mean,
        var,
        count,
        running_mean,
        running_var,
        num_batches_tracked,
        num_skipped_updates,
        momentum,
        unbiased,
        False,
    )
    return y


@_or(None)
@_on_device
def layer_norm(
    x: Tensor, shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor | None:
    """:func:`normkit.functional.layer_norm` over the trailing ``shape`` (checked arguments, no mask)
    on the Triton kernels as one autograd node, or ``None`` where this path does not take it.

    Example:
        >>> y = layer_norm(x, (256, 14, 14), weight, bias, 1e-5)  # doctest: +SKIP
    """
    k = len(shape)
    pview = (1,) * (x.dim() - k) + tuple(shape)
    dims = tuple(range(x.dim() - k, x.dim()))
    return _planned_norm(x, dims, pview, weight, bias, eps, ("layer_norm", (tuple(shape),)))


@_or(None)
@_on_device
def layer_norm_2d(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor | None:
    """:func:`normkit.functional.layer_norm_2d` over the channels (checked arguments) on the Triton
    kernels as one autograd node (a ConvNeXt block under bf16 autocast keeps it there), or ``None``.

    Example:
        >>> y = layer_norm_2d(x, weight, bias, 1e-6)  # doctest: +SKIP
    """
    pview = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    return _planned_norm(x, (1,), pview, weight, bias, eps, ("layer_norm_2d", ()))


def _gn_proxy_fwd(
    x: Tensor, params: tuple[Tensor, ...], u: Tensor, p: Plan, eps: float, act: str, slope: float,
    peps: float,
) -> tuple[Tensor, Tensor, list[Tensor], Tensor, Tensor]:  # fmt: skip
    """``(out, stats, vec, m, rstd)``: the proxy statistics, then GroupNorm and the step (two
    launches, or four on channels-last); ``vec`` = ``[w, b, pb, pw, points, slope]`` as the kernels
    read them."""
    acc = _acc(x)[0]
    vec = [*(_vec(t, acc) for t in params), _points_vec(u, acc)]
    vec.append(_slope(slope, acc, x.device))
    m, r = _proxy_stats_fwd(vec[:5], vec[5], act, peps)
    got = gn_proxy_forward(x, p, eps, [vec[0], vec[1], m, r, vec[5]], act)
    assert got is not None  # (the caller checked that it applies)
    return got[0], got[1], vec, m, r


class _GNProxyAct(torch.autograd.Function):
    """GroupNorm (no affine), then Proxy Norm's step with its statistics from the four parameters:
    one autograd node, two kernels each way (the proxy statistics, GroupNorm + the step); on a GPU
    each node and each small op between kernels is host time a norm this size cannot hide."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        w: Tensor,
        b: Tensor,
        pb: Tensor,
        pw: Tensor,
        u: Tensor,
        p: Plan,
        G: int,
        eps: float,
        act: str,
        slope: float,
        peps: float,
    ) -> Tensor:  # type: ignore[override]
        out, stats, vec, m, r = _gn_proxy_fwd(x, (w, b, pb, pw), u, p, eps, act, slope, peps)
        # (the originals too: a double backward differentiates them)
        ctx.save_for_backward(x, stats, w, b, pb, pw, m, r, *vec)
        ctx.p, ctx.G, ctx.eps, ctx.act, ctx.slope, ctx.peps = p, G, eps, act, slope, peps
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, stats, *params, m, r = ctx.saved_tensors[:8]
        vec = list(ctx.saved_tensors[8:])
        none = (None,) * 7
        if not (torch.is_grad_enabled() or type(dout) is not Tensor or not torch._C._has_storage(dout)):
            try:
                if dout.dtype != x.dtype or dout.stride() != x.stride():
                    dout = torch.empty_like(x).copy_(dout)
                need_x = ctx.needs_input_grad[0]
                vec5 = [vec[0], vec[1], m, r, vec[5]]
                with _device_of(x):
                    dx, sums = gn_proxy_backward(dout, x, stats, ctx.p, vec5, ctx.act, need_x)
                    if not any(ctx.needs_input_grad[1:5]):
                        return (dx, None, None, None, None, *none)
                    pg = _pn_param_grads(ctx.act, params, vec, m, r, sums)
                return (dx, *pg, *none)
            except Exception as e:
                if not gave_up(e):
                    raise
        # create_graph=True, batched gradients (or a kernel that would not compile): the composite
        from ...functional.group_norm import group_norm

        to_y = lambda t: group_norm(t, ctx.G, None, None, ctx.eps)  # noqa: E731
        return (*_pn_composite_grads(ctx, x, params, vec[4], dout, to_y), *none)


@_or(None)
@_on_device
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
    """:class:`~normkit.nn.GroupNormProxyAct2d`'s step on the Triton kernels: the proxy statistics
    (C x 200 values), then GroupNorm and the activation step fused, one kernel each (and one autograd
    node for both); ``None`` where it does not apply (the layer then runs the two ops).

    Example:
        >>> out = gn_proxy_act(x, 4, 1e-3, w, b, pb, pw, points, "relu", 0.03)  # doctest: +SKIP
    """
    from ...functional.activations import activation_spec

    spec = activation_spec(activation)
    if spec is None or spec[0] not in _ACTS:
        return None
    p = _gn_plan(x, groups, fused=True)
    params = (weight, bias, proxy_bias, proxy_weight)
    if (
        p is None
        or points.dim() != 1
        or not 0 < points.shape[0] <= PROXY_MAX_POINTS
        or any(t.device != x.device for t in (*params, points))
    ):
        return None
    act, slope = spec[0], float(spec[1])
    if torch.autograd.forward_ad._current_level >= 0:
        return None  # (dual tensors: the composite, which forward-mode AD differentiates)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params)):
        return _GNProxyAct.apply(x, *params, points, p, groups, float(eps), act, slope, float(proxy_eps))  # type: ignore[no-any-return]
    return _gn_proxy_fwd(x, params, points, p, float(eps), act, slope, float(proxy_eps))[0]


# --- BatchNorm's running statistics in one launch ---------------------------------------------------


@_or(False)
@_on_device
def bn_running_update(
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    num_skipped_updates: Tensor | None,
    momentum: float | None,
    var_scale: float,
) -> bool:
    """normkit's running-statistics rule (:func:`normkit.functional._running.update_running_stats`),
    in place, in one Triton launch instead of about a dozen small ops (each a launch on a GPU):
    ``running <- lerp(running, batch, factor)``, ``factor`` the momentum or (``momentum=None``) the
    cumulative ``1 / num_batches_tracked``; a batch with any non-finite statistic changes nothing but
    ``num_skipped_updates``. ``var`` is the batch's unbiased variance, ``var_scale`` times it the one
    to store. Returns ``False`` (nothing done) where the buffers are not plain contiguous vectors.

    Example:
        >>> ok = bn_running_update(m, v, rm, rv, nbt, None, 0.1, 1.0)  # doctest: +SKIP
    """
    return _bn_running(
        mean,
        var,
        False,
        running_mean,
        running_var,
        num_batches_tracked,
        num_skipped_updates,
        momentum,
        var_scale,
    )


@_on_device
def bn_running_update_from_stats(
    stats: Tensor,
    count: int,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    num_skipped_updates: Tensor | None,
    momentum: float | None,
    unbiased: bool,
) -> bool:
    """:func:`bn_running_update` from the statistics a BatchNorm forward on these kernels saved
    (``core.STAT_ROWS`` rows of ``C`` per-channel values over ``count`` values each): the batch's
    mean and variance are read from them inside the same launch, where
    :func:`normkit.ops.core.mean_var` and the unbiasing took five more. Returns ``False`` (nothing
    done) where ``stats`` is not that contiguous block or the buffers not plain vectors.

    Example:
        >>> ok = bn_running_update_from_stats(stats, 512, rm, rv, nbt, None, 0.1, True)  # doctest: +SKIP
    """
    if stats.numel() != core.STAT_ROWS * running_mean.numel() or not stats.is_contiguous() or count < 2:
        return False
    scale = count / (count - 1) if unbiased else 1.0
    return _bn_running(
        stats,
        stats,
        True,
        running_mean,
        running_var,
        num_batches_tracked,
        num_skipped_updates,
        momentum,
        scale,
    )


def _bn_running(
    mean: Tensor,
    var: Tensor,
    from_stats: bool,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    num_skipped_updates: Tensor | None,
    momentum: float | None,
    var_scale: float,
) -> bool:
    C = running_mean.numel()
    vecs = (running_mean, running_var) if from_stats else (mean, var, running_mean, running_var)
    counters = [t for t in (num_batches_tracked, num_skipped_updates) if t is not None]
    if (
        C == 0
        or any(t.numel() != C or not t.is_contiguous() for t in vecs)
        or any(t.numel() != 1 or t.dtype != torch.int64 for t in counters)
        or (momentum is None and num_batches_tracked is None)
    ):
        return False
    tacc = _acc(running_mean)[1]
    _kern().bn_running_kernel[(1,)](
        mean,
        var,
        running_mean,
        running_var,
        num_batches_tracked if num_batches_tracked is not None else running_mean,
        num_skipped_updates if num_skipped_updates is not None else running_mean,
        C,
        float(momentum) if momentum is not None else 0.0,
        float(var_scale),
        HAS_NBT=num_batches_tracked is not None,
        HAS_SKIP=num_skipped_updates is not None and num_batches_tracked is not None,
        CUMULATIVE=momentum is None,
        FROM_STATS=from_stats,
        ACC=tacc,
        BLOCK=min(next_power_of_2(C), 1024),
    )
    # (written in place by the kernel: autograd's record of in-place changes, as copy_ would leave)
    torch.autograd.graph.increment_version([running_mean, running_var, *counters])
    return True
