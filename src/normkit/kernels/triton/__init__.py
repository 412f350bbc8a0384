"""normkit's Triton kernels (the optional ``triton`` extra): ``normkit::norm`` on GPU tensors.

``import normkit`` never imports this package; :mod:`normkit.kernels` imports it on the first CUDA
call when triton is installed (or, with ``TRITON_INTERPRET=1``, for CPU tensors under
``normkit.kernels.use("triton")``: Triton's interpreter, for the tests).

Kernels (``_kernels.py``) → launchers here, which return the saved statistics in the reference's
format (so any backend's backward accepts them) → :func:`normkit.kernels.norm_forward` /
:func:`normkit.kernels.norm_backward` dispatch. Every kernel pattern of the CPU kernels is covered
by one parametrised kernel pair; see ``_kernels.py``.

Example:
    >>> import normkit.kernels.triton as nkt
    >>> nkt.available() == (nkt.why_not() is None)   # whether triton imports here
    True
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ...ops import core
from .._plan import Plan

__all__ = ["available", "backward", "forward", "why_not"]

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
        except Exception as e:  # noqa: BLE001 (any import failure means: not available)
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


def _walk(p: Plan) -> tuple[int, tuple[int, ...]]:
    """``nsets`` and ``(NC, M, M2, s_c, s_m1, s_m2, D1, B1, B2, CK)`` of a plan (see ``_kernels.py``)."""
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
    """Tile of a set's ``(NC, M)`` matrix: up to 256 positions by as many channels as fit 1024 values."""
    from triton import next_power_of_2

    BM = min(next_power_of_2(M), 256)
    BC = max(1, min(next_power_of_2(NC), 1024 // BM))
    return BC, BM


def _acc(x: Tensor) -> tuple[torch.dtype, object]:
    import triton.language as tl

    return (torch.float64, tl.float64) if x.dtype == torch.float64 else (torch.float32, tl.float32)


def forward(x: Tensor, w: Tensor | None, b: Tensor | None, p: Plan, eps: float, stat_shape: list[int]) -> tuple[Tensor, Tensor]:
    """``(y, stats)`` of a contiguous-per-plan ``x``; ``w`` / ``b`` flat in the plan's channel order.

    Called by :func:`normkit.kernels.norm_forward`; needs triton (and a GPU or its interpreter).

    Example:
        >>> x = torch.randn(2, 4, 3, 3, device="cuda")  # doctest: +SKIP
        >>> p = normkit.kernels.plan(x, (2, 3), None, None)  # doctest: +SKIP
        >>> y, stats = forward(x, None, None, p, 1e-5, [2, 4, 1, 1])  # doctest: +SKIP
    """
    from . import _kernels

    acc, tacc = _acc(x)
    nsets, walk = _walk(p)
    NC, M = walk[0], walk[1]
    BC, BM = _blocks(NC, M)
    y = torch.empty_like(x)
    stats = torch.empty((core.STAT_ROWS, *stat_shape), dtype=acc, device=x.device)
    bound = 1022.0 if acc == torch.float64 else 126.0
    _kernels.norm_fwd_kernel[(nsets,)](
        x, y, w if w is not None else x, b if b is not None else x, stats, nsets, *walk, float(eps), bound,
        HAS_W=w is not None, HAS_B=b is not None, ACC=tacc, BC=BC, BM=BM,
    )
    return y, stats


def backward(
    dy: Tensor, x: Tensor, w: Tensor | None, stats: Tensor, p: Plan, need_x: bool, need_p: bool
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dweight, dbias)``: ``dweight`` / ``dbias`` flat in the plan's channel order (or ``None``).

    Called by :func:`normkit.kernels.norm_backward` with :func:`forward`'s statistics (or any
    backend's: they share the reference's format); tested in tests/kernels/test_triton.py.

    Example:
        >>> dx, dw, db = backward(torch.randn_like(x), x, None, stats, p, True, False)  # doctest: +SKIP
    """
    from . import _kernels

    acc, tacc = _acc(x)
    nsets, walk = _walk(p)
    NC, M, D1, CK = walk[0], walk[1], walk[6], walk[9]
    BC, BM = _blocks(NC, M)
    dx = torch.empty_like(x) if need_x else None
    pw = torch.empty((nsets, NC), dtype=acc, device=x.device) if need_p else None
    pb = torch.empty_like(pw) if pw is not None else None
    _kernels.norm_bwd_kernel[(nsets,)](
        dy, x, w if w is not None else x, stats, dx if dx is not None else x,
        pw if pw is not None else stats, pb if pb is not None else stats, nsets, *walk,
        HAS_W=w is not None, NEED_DX=need_x, NEED_P=need_p, ACC=tacc, BC=BC, BM=BM,
    )
    if pw is None or pb is None:
        return dx, None, None
    # per set and channel-in-set -> per channel: sets sharing a channel are summed here
    pw, pb = pw.view(nsets // D1, D1, NC), pb.view(nsets // D1, D1, NC)
    if CK == 0:  # every set holds every channel
        return dx, pw.sum((0, 1)), pb.sum((0, 1))
    return dx, pw.sum(0).reshape(-1), pb.sum(0).reshape(-1)
