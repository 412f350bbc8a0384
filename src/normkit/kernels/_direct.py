"""Plain eager calls handed straight to torch's own op, on the devices where that is the fast path.

On a GPU, a norm that torch computes the same way (GroupNorm and LayerNorm on a contiguous input,
LayerNorm2d, BatchNorm's training step) runs fastest as the one torch call: torch's CUDA / cuDNN
kernels beat normkit's Triton kernels on these patterns (docs/PERFORMANCE.md §5, measured on an
H200), and one call costs the least host time, which is most of a small norm's time on a GPU.
So on :data:`DEVICES` (CUDA), with the ``"auto"`` or ``"native"`` backend, in plain eager mode, the
functional ops and the layers call :mod:`torch.nn.functional` directly, after their own argument
checks (so errors stay normkit's typed errors), and keep normkit's contract:

* the output keeps the input's layout (channels-last in, channels-last out);
* BatchNorm's running statistics follow normkit's rule (momentum or the cumulative average, the
  unbiased or biased variance; a batch whose statistics are not finite leaves every buffer
  unchanged and counts a skipped update, with no device sync); the functional op returns new ones
  and never writes the ones passed in, the layers update their buffers in place;
* GroupNorm / LayerNorm under autocast (torch's run in float32 and return float32 there, normkit's
  return the input's dtype) and with float32 parameters on a half input (AMP's usual mix: not yet
  checked against torch's CUDA kernels) stay on normkit's kernels; BatchNorm takes both;
* the one-value-per-set cases, masks, dtype mixes torch does not take, and anything under
  ``torch.compile``, export, tracing or ``torch.func`` return ``None`` here and run normkit's
  general path (which raises its typed errors);
* LayerNorm2d on an NCHW input: the input's gradient comes back channels-last (values equal), as
  from timm's ``LayerNorm2d`` (permute, ``F.layer_norm``, permute back);
* the statistics are torch's (one pass in float32 on CUDA), which overflow on float32 sets beyond
  about 1e17 where normkit's scaled statistics stay finite: ``normkit.kernels.use("triton")`` or
  ``"reference"`` keeps normkit's numerics (docs/differences.md).

Every function returns ``None`` where it does not apply. GroupNorm / InstanceNorm / LayerNorm with
fewer than :data:`MIN_SETS` sets (LayerNorm over (C, H, W) of a few samples), Proxy Norm and the fused
GN + activation stay on normkit's kernels (torch has no fused equivalent, or is slower there).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as TF
import torch.utils._python_dispatch  # the attribute below is a submodule: import it explicitly
from torch import Tensor

__all__ = [
    "DEVICES",
    "batch_norm_train",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "layer_norm_c",
    "params_fit",
    "route",
    "store_running",
]

#: Device types whose plain eager calls go straight to torch (tests add ``"cpu"`` to check the path).
DEVICES: set[str] = {"cuda"}
#: GroupNorm and LayerNorm go to torch from this many sets (groups of all samples, rows): torch's
#: kernels give each set one block of threads, so with fewer (LN or GN(1) over (C, H, W) of a few
#: samples) most of a GPU idles and normkit's split kernels win (PERFORMANCE.md §5: LN over (C,H,W)
#: of 64 samples, torch 1.5 ms, normkit 0.3 ms).
MIN_SETS = 128
_HALF = (torch.float16, torch.bfloat16)

_is_compiling = torch.compiler.is_compiling
_is_exporting = torch.compiler.is_exporting
_functorch_active = torch._C._are_functorch_transforms_active
_dispatch_mode = torch.utils._python_dispatch._get_current_dispatch_mode
_tracing_state = torch._C._get_tracing_state
_fwad = torch.autograd.forward_ad
_backend: list = []  # normkit.kernels.current, bound on first use


def route(x: Tensor, under_autocast: bool = False) -> bool:
    """Whether a call on ``x`` may go straight to torch: a plain tensor on one of :data:`DEVICES`,
    the ``"auto"`` or ``"native"`` backend, plain eager mode, and (unless ``under_autocast``) no
    autocast on ``x``'s device: torch's GroupNorm and LayerNorm run in float32 under autocast and
    return float32, where normkit returns the input's dtype.

    Example:
        >>> route(torch.randn(2, 3))  # a CPU tensor: normkit's own CPU kernels are the fast path
        False
    """
    if type(x) is not Tensor or x.device.type not in DEVICES:  # first: a CPU call pays these checks
        return False
    if not _backend:
        from . import current

        _backend.append(current)
    return (
        x.numel() > 0
        and (under_autocast or not torch.is_autocast_enabled(x.device.type))
        and not _is_compiling()
        and _backend[0]() in ("auto", "native")
        and not _functorch_active()
        and _fwad._current_level < 0
        and _dispatch_mode() is None
        and _tracing_state() is None
        and not _is_exporting()
    )


def _same(x: Tensor, *params: Tensor | None) -> bool:
    """Every given parameter in ``x``'s dtype, on its device."""
    return all(p is None or (p.dtype == x.dtype and p.device == x.device) for p in params)


def params_fit(x: Tensor, *params: Tensor | None) -> bool:
    """BatchNorm's parameters and buffers as its fast paths take them: in ``x``'s dtype, or float32
    with a half input (AMP's BatchNorm), on ``x``'s device; the general path checks the rest."""
    return _same(x, *params) or (
        x.dtype in _HALF
        and all(p is None or (p.dtype == torch.float32 and p.device == x.device) for p in params)
    )


def _spatial(x: Tensor) -> int:
    return math.prod(x.shape[2:])


def group_norm(
    x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor | None:
    """``F.group_norm`` of a contiguous or channels-last input with more than one value per group and at
    least :data:`MIN_SETS` (sample, group) sets, in ``x``'s layout (on CUDA torch's GroupNorm takes a
    channels-last input through a contiguous copy, and normkit copies the output back: still faster
    there than the Triton kernels, PERFORMANCE.md §5), or ``None``. InstanceNorm without running
    statistics takes :func:`instance_norm`.

    Example:
        >>> group_norm(torch.randn(2, 4, 3, 3), 2, None, None, 1e-5) is None  # not a CUDA tensor
        True
    """
    cl = _grouped(x, groups, weight, bias)
    if cl is None:
        return None
    return _as_input(TF.group_norm(x, groups, weight, bias, eps), cl, x)


def _grouped(x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None) -> bool | None:
    """For torch's GroupNorm / InstanceNorm: whether ``x`` is channels-last (else contiguous), or ``None``
    where normkit's own path serves (see :func:`group_norm`)."""
    if not (route(x) and x.dim() >= 2 and _same(x, weight, bias)):
        return None
    cl = not x.is_contiguous()
    if cl and not _channels_last(x):
        return None
    C = x.shape[1]
    if C % groups or (C // groups) * _spatial(x) < 2 or x.shape[0] * groups < MIN_SETS:
        return None
    if any(p is not None and p.shape != (C,) for p in (weight, bias)):
        return None
    return cl


def _as_input(y: Tensor, cl: bool, x: Tensor) -> Tensor:
    """torch's contiguous output of a channels-last ``x`` back in ``x``'s layout."""
    if cl:
        return y.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return y


def instance_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor | None:
    """``F.instance_norm`` (batch statistics, no running ones) under :func:`group_norm`'s conditions with
    ``groups = C``, or ``None``: torch.nn's InstanceNorm, a batch norm of the ``(1, N * C, *S)`` view, whose
    backward centres its sums (GroupNorm's works from raw sums of ``dy * x``, which cancel at a large
    mean: 20-45x the gradient error at a mean of 1e4, measured with ATen's CPU kernels).

    Example:
        >>> instance_norm(torch.randn(2, 4, 3, 3), None, None, 1e-5) is None  # not a CUDA tensor
        True
    """
    cl = _grouped(x, x.shape[1], weight, bias) if x.dim() >= 3 else None
    if cl is None:
        return None
    return _as_input(TF.instance_norm(x, None, None, weight, bias, True, 0.0, eps), cl, x)


def layer_norm(
    x: Tensor, shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor | None:
    """``F.layer_norm`` over the trailing ``shape`` of a contiguous input with many rows, or ``None``.

    Example:
        >>> layer_norm(torch.randn(256, 8), (8,), None, None, 1e-5) is None  # not a CUDA tensor
        True
    """
    if not (route(x) and x.is_contiguous() and _same(x, weight, bias)):
        return None
    shape = tuple(shape)
    k = math.prod(shape)
    if x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape) :]) != shape:
        return None
    if k < 2 or x.numel() // k < MIN_SETS or any(p is not None and p.shape != shape for p in (weight, bias)):
        return None
    return TF.layer_norm(x, shape, weight, bias, eps)


def layer_norm_c(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor | None:
    """LayerNorm over dim 1 (the channels) as ``F.layer_norm`` of the channels-last view, in ``x``'s
    layout (a contiguous input costs torch a copy in and normkit one out), or ``None``.

    Example:
        >>> layer_norm_c(torch.randn(2, 8, 4, 4), None, None, 1e-5) is None  # not a CUDA tensor
        True
    """
    if not (route(x) and x.dim() >= 3 and x.shape[1] >= 2 and _same(x, weight, bias)):
        return None
    if any(p is not None and p.shape != (x.shape[1],) for p in (weight, bias)):
        return None
    xl = x.movedim(1, -1)
    if xl.is_contiguous():  # channels-last
        return TF.layer_norm(xl, (x.shape[1],), weight, bias, eps).movedim(-1, 1)
    if x.is_contiguous():
        return TF.layer_norm(xl, (x.shape[1],), weight, bias, eps).movedim(-1, 1).contiguous()
    return None


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
    """BatchNorm's training step (batch statistics) as ``F.batch_norm``, or ``None``.

    The running statistics, if given, are updated in place, as a layer's buffers are, by normkit's
    own rule (:func:`normkit.functional._running.update_running_stats`: momentum or the cumulative
    average, the unbiased or biased variance, and a batch whose statistics are not finite leaves
    every buffer unchanged, branch-free, no device sync: one Triton launch on ``"auto"`` with triton
    installed, else about a dozen small ops, each a kernel launch on a GPU). Torch hands over the
    batch's mean and unbiased variance as the "running" statistics of a momentum-1 update of two
    scratch vectors.
    ``num_batches_tracked`` counts finite batches and ``num_skipped_updates`` the rest.

    Example:
        >>> x, rm, rv = torch.randn(8, 3, 4, 4), torch.zeros(3), torch.ones(3)
        >>> batch_norm_train(x, None, None, rm, rv, None, 0.1, 1e-5, True) is None  # not a CUDA tensor
        True
    """
    # (torch's batch_norm keeps the input's dtype under autocast, as normkit does)
    if not route(x, under_autocast=True) or x.dim() < 2 or not (x.is_contiguous() or _channels_last(x)):
        return None
    C = x.shape[1]
    count = x.shape[0] * _spatial(x)
    if not eps > 0:
        return None  # (torch's training op refuses eps=0, which normkit takes: the general path)
    if count < 2 or any(p is not None and p.shape != (C,) for p in (weight, bias, running_mean, running_var)):
        return None
    tracking = running_mean is not None and running_var is not None
    if not params_fit(x, *((weight, bias, running_mean, running_var) if tracking else (weight, bias))):
        return None
    if not tracking:
        return TF.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    assert running_mean is not None and running_var is not None
    if momentum is None and num_batches_tracked is None:
        return None  # (the general path says why not)
    mean = torch.zeros_like(running_mean)
    var = torch.ones_like(running_var)
    y = TF.batch_norm(x, mean, var, weight, bias, True, 1.0, eps)  # mean, var <- the batch's (var unbiased)
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
        _fused_update(x),
    )
    return y


def store_running(
    mean: Tensor,
    var: Tensor,
    count: int,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    num_skipped_updates: Tensor | None,
    momentum: float | None,
    unbiased: bool,
    fused: bool,
) -> None:
    """Update the running statistics in place from a batch's ``(C,)`` mean and *unbiased* variance
    over ``count`` values per channel, by normkit's rule (``unbiased``: store that variance, else the
    biased one): one Triton launch where ``fused``, else torch's ops.

    Example:
        >>> rm, rv = torch.zeros(2), torch.ones(2)
        >>> store_running(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]), 8, rm, rv, None, None,
        ...               0.5, True, False)
        >>> rm.tolist(), rv.tolist()
        ([0.5, 1.0], [2.0, 2.5])
    """
    if fused:
        from .triton import bn_running_update

        scale = 1.0 if unbiased else (count - 1) / count
        args = (num_batches_tracked, num_skipped_updates, momentum, scale)
        if bn_running_update(mean, var, running_mean, running_var, *args):
            return
    from ..functional._running import update_running_stats

    if not unbiased:
        var = var * ((count - 1) / count)
    rm, rv, nbt = update_running_stats(
        running_mean, running_var, num_batches_tracked, mean, var, count, momentum, False, "batch_norm"
    )
    with torch.no_grad():
        running_mean.copy_(rm)
        running_var.copy_(rv)
        if nbt is not None and num_batches_tracked is not None:
            if num_skipped_updates is not None:  # (as normkit.nn._base.store_stats counts them)
                num_skipped_updates.add_(1 - (nbt - num_batches_tracked))  # (see live_count)
            num_batches_tracked.copy_(nbt)


def _fused_update(x: Tensor) -> bool:
    """Whether the running statistics take the one-launch Triton update: on ``"auto"``, with triton
    installed, on CUDA (or CPU tensors under Triton's interpreter, in tests); the ``"native"`` backend
    keeps torch's ops throughout."""
    if _backend[0]() != "auto":
        return False
    from . import triton as _triton

    return _triton.available() and (x.device.type == "cuda" or _triton.interpreting())


def _channels_last(x: Tensor) -> bool:
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    return x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)
