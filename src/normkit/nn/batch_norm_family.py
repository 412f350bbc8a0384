"""The BatchNorm family: Ghost BN, Batch Renorm, Frozen BN, mean-only BN, and Keras's BatchNormalization.

All but the Keras layer keep ``torch.nn.BatchNorm``'s state_dict keys and its momentum convention
(``running = (1 - momentum) * running + momentum * batch``), so they load BN checkpoints and BN
loads theirs. :class:`BatchNormalization` keeps Keras's names, momentum and biased moving
variance instead; :mod:`normkit.convert` maps between the two.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import NormError
from ..functional._autograd import norm
from ..functional._checks import (
    as_int,
    check_eps,
    check_keras_momentum,
    check_momentum,
    check_param,
    check_positive_int,
)
from ..functional._moments import acc_dtype, normalize
from ..functional._running import NormOutput, live_count, update_running_stats
from ..functional.batch_norm import batch_norm
from ..functional.batch_renorm import batch_renorm, mean_only_batch_norm
from ..functional.ghost_batch_norm import MomentumMode, ghost_batch_norm
from ._base import (
    _NormBase,
    buffer_writes,
    check_channels,
    check_tensor,
    fx_leaf,
    not_scriptable,
    torch_norm_init,
)
from ._recompute import LOST, ForwardStates
from .batch_norm import _BatchNorm

__all__ = [
    "BatchNormalization",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "MeanOnlyBatchNorm",
]


# --- Ghost BN ------------------------------------------------------------------------------------


class _GhostBatchNorm(_BatchNorm):
    __prepare_scriptable__ = not_scriptable  # (torch.jit.script: a clear error)
    ghost_batch_size: int
    momentum_mode: MomentumMode

    def __init__(
        self,
        num_features: int,
        ghost_batch_size: int = 32,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        momentum_mode: MomentumMode = "per_chunk",
        bias: bool = True,
        unbiased_running_var: bool = True,
    ) -> None:
        name = type(self).__name__
        self_ghost = check_positive_int(ghost_batch_size, name, "ghost_batch_size")
        if momentum_mode not in ("per_chunk", "averaged"):
            raise NormError(f"{name}: momentum_mode must be 'per_chunk' or 'averaged', got {momentum_mode!r}")
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            unbiased_running_var=unbiased_running_var,
        )
        self.ghost_batch_size = self_ghost
        self.momentum_mode = momentum_mode

    def forward(self, input: Tensor) -> Tensor:
        x = input  # (torch.nn's argument name, so that layer(input=t) works as there)
        leaf = fx_leaf(self, x)
        if leaf is not None:
            return leaf
        self._check_input_dim(x)
        tracking = self._tracking
        out = ghost_batch_norm(
            x,
            self.running_mean if tracking else None,
            self.running_var if tracking else None,
            self.weight,
            self.bias,
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
            num_batches_tracked=self.num_batches_tracked if tracking else None,
            ghost_batch_size=self.ghost_batch_size,
            momentum_mode=self.momentum_mode,
            unbiased_running_var=self.unbiased_running_var,
        )
        return self._store(out)

    def _store(self, out: NormOutput) -> Tensor:
        rm, rv, nbt = self.running_mean, self.running_var, self.num_batches_tracked
        if out.running_mean is not None and out.running_mean is not rm:
            # the statistics were passed in (tracking), so they came back updated, with the buffers
            assert rm is not None and rv is not None and out.running_var is not None
            with buffer_writes():  # (no_grad, but not while exporting: torch.export.save refuses its node)
                rm.copy_(out.running_mean.detach())
                rv.copy_(out.running_var.detach())
                if out.num_batches_tracked is not None:
                    assert nbt is not None and self.num_skipped_updates is not None
                    # per_chunk mode advances the counter by the number of chunks; count only the
                    # skipped *steps* (a non-finite batch leaves the counter where it was).
                    # Branch-free: no host sync.
                    self.num_skipped_updates.add_((out.num_batches_tracked == nbt).long())
                    nbt.copy_(out.num_batches_tracked)
        return out.output

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, ghost_batch_size={self.ghost_batch_size}, "
            f"momentum_mode={self.momentum_mode!r}"
        )


_GHOST_DOC = r"""Ghost batch normalization over a {shape} input: BN per chunk of ``ghost_batch_size`` samples.

    .. math::
        y_i = \frac{{x_i - \mathrm{{E}}_{{k(i)}}[x]}}
                   {{\sqrt{{\mathrm{{Var}}_{{k(i)}}[x] + \epsilon}}}} \gamma + \beta

    In training the batch is split into contiguous ghost chunks of ``ghost_batch_size`` samples
    (``k(i)`` is the chunk of sample i; a ragged last chunk is normalized on its own) and each
    chunk is batch-normalized alone, with shared ``gamma``/``beta``: the regularising noise of a
    small batch at the throughput of a large one. Vectorised (one reshape, no loop over chunks);
    channels_last is kept. In eval the running statistics are used for any batch size (the
    split never applies there). ``ghost_batch_size >= N`` is exactly :class:`BatchNorm{d}d`.
    Running statistics follow PyTorch's convention, updated once per chunk in order
    (``momentum_mode="per_chunk"``, so the old value decays by ``(1-momentum)^K`` per step) or
    once with the averaged chunk statistics (``"averaged"``). state_dict keys are BN's.

    Args:
        num_features: C.
        ghost_batch_size: samples per ghost chunk (the paper used 128 with large batches).
        eps, momentum, affine, track_running_stats: as :class:`BatchNorm{d}d`.
        momentum_mode: ``"per_chunk"`` or ``"averaged"``.
        bias, unbiased_running_var: as :class:`BatchNorm{d}d`.

    Shape:
        Input {shape}; output the same shape, dtype and layout.

    Example:
        >>> import torch, normkit
        >>> gbn = normkit.nn.GhostBatchNorm{d}d(3, ghost_batch_size=4)
        >>> x = torch.randn({example})
        >>> ref = torch.nn.functional.batch_norm(x[:4], None, None, training=True)
        >>> torch.allclose(gbn(x)[:4], ref, atol=1e-5)   # chunk 1 is BN on chunk 1 alone
        True

    Reference: https://arxiv.org/abs/1705.08741
    """


class GhostBatchNorm1d(_GhostBatchNorm, nn.BatchNorm1d):  # (an nn.BatchNorm1d to isinstance, as normkit's BN)
    __doc__ = _GHOST_DOC.format(shape="``(N, C)`` or ``(N, C, L)``", d=1, example="10, 3")
    _dims = (2, 3)


class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d):  # (an nn.BatchNorm2d to isinstance, as normkit's BN)
    __doc__ = _GHOST_DOC.format(shape="``(N, C, H, W)``", d=2, example="10, 3, 4, 4")
    _dims = (4,)


class GhostBatchNorm3d(_GhostBatchNorm, nn.BatchNorm3d):  # (an nn.BatchNorm3d to isinstance, as normkit's BN)
    __doc__ = _GHOST_DOC.format(shape="``(N, C, D, H, W)``", d=3, example="10, 3, 2, 2, 2")
    _dims = (5,)


# --- Batch Renorm --------------------------------------------------------------------------------


class _BatchRenorm(_BatchNorm):
    __prepare_scriptable__ = not_scriptable  # (torch.jit.script: a clear error)
    # Batch Renorm is built with track_running_stats=True only: its buffers always exist.
    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 0,
        bias: bool = True,
        unbiased_running_var: bool = True,
    ) -> None:
        name = type(self).__name__
        if not track_running_stats:
            raise NormError(
                f"{name}: Batch Renorm corrects batch statistics towards the running ones, so it needs "
                "track_running_stats=True; use BatchNorm for batch statistics only"
            )
        for label, value, lowest in (("r_max", r_max, 1.0), ("d_max", d_max, 0.0)):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < lowest
            ):
                raise NormError(f"{name}: {label} must be a finite number >= {lowest}, got {value!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise NormError(f"{name}: warmup_steps must be an int >= 0, got {warmup_steps!r}")
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            unbiased_running_var=unbiased_running_var,
        )
        self.r_max, self.d_max, self.warmup_steps = float(r_max), float(d_max), warmup_steps
        self._forward_states = ForwardStates()  # (for torch.utils.checkpoint: see forward)

    def __getstate__(self) -> dict[str, Any]:
        # The forward states are a cache for a checkpoint's recomputation, not state: left out of
        # pickles and copies (torch.load(weights_only=True) cannot rebuild them, and each would carry
        # up to 16 copies of the running statistics).
        state = dict(super().__getstate__())
        state.pop("_forward_states", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._forward_states = ForwardStates()

    def current_limits(self) -> tuple[Tensor, Tensor]:
        """The ``(r_max, d_max)`` in force now: a linear ramp from ``(1, 0)`` to ``(r_max, d_max)``
        over the first ``warmup_steps`` training steps (counted by ``num_batches_tracked``), then flat.
        Returned as 0-dim tensors (no host sync)."""
        return self._limits(self.num_batches_tracked)

    def _limits(self, num_batches_tracked: Tensor) -> tuple[Tensor, Tensor]:
        t = live_count(num_batches_tracked).to(torch.float64)  # (read through a reduction: see live_count)
        frac = (t / self.warmup_steps).clamp(max=1.0) if self.warmup_steps else torch.ones_like(t)
        return 1.0 + (self.r_max - 1.0) * frac, self.d_max * frac

    def forward(self, input: Tensor) -> Tensor:
        x = input  # (torch.nn's argument name, so that layer(input=t) works as there)
        leaf = fx_leaf(self, x)
        if leaf is not None:
            return leaf
        self._check_input_dim(x)
        if not self._tracking:  # track_running_stats switched off later: plain BN on batch statistics
            return batch_norm(x, None, None, self.weight, self.bias, True, self.momentum, self.eps).output
        # Under torch.utils.checkpoint the forward runs again inside the backward, after it updated
        # the running statistics that r and d read: the recomputation takes the state its forward
        # started from, and updates nothing (docs/differences.md, "Gradient checkpointing").
        states = self.__dict__.get("_forward_states")
        started = None
        if self.training and states is not None:
            started = states.begin(x, (self.running_mean, self.running_var, self.num_batches_tracked))
        if started is LOST:
            warnings.warn(
                f"{type(self).__name__}: a checkpoint recomputed this layer's forward, but the state that "
                "forward started from was not kept (more than 256 checkpointed forwards before their "
                "backward): its gradients use the current running statistics, and nothing is updated",
                RuntimeWarning,
                stacklevel=2,
            )
            started = (self.running_mean, self.running_var, self.num_batches_tracked)
        if started is not None:
            rm, rv, nbt = started
            r_max, d_max = self._limits(nbt)
            return batch_renorm(
                x,
                rm,
                rv,
                self.weight,
                self.bias,
                training=True,
                momentum=self.momentum,
                eps=self.eps,
                num_batches_tracked=nbt,
                r_max=r_max,
                d_max=d_max,
                unbiased_running_var=self.unbiased_running_var,
            ).output
        r_max, d_max = self.current_limits()
        out = batch_renorm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
            num_batches_tracked=self.num_batches_tracked,
            r_max=r_max,
            d_max=d_max,
            unbiased_running_var=self.unbiased_running_var,
        )
        return self._store(out)

    def extra_repr(self) -> str:
        limits = f"r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}"
        return f"{super().extra_repr()}, {limits}"


_RENORM_DOC = r"""Batch Renormalization (Ioffe 2017) over a {shape} input; BN that trains like it infers.

    .. math::
        y = \gamma \Big(\frac{{x - \mu_B}}{{\sigma_B}} r + d\Big) + \beta, \quad
        r = \mathrm{{clip}}_{{[1/r_{{max}}, r_{{max}}]}}(\sigma_B / \sigma), \quad
        d = \mathrm{{clip}}_{{[-d_{{max}}, d_{{max}}]}}((\mu_B - \mu) / \sigma)

    ``mu, sigma`` are the running statistics (``sigma = sqrt(running_var + eps)``), ``r, d`` get
    no gradient. ``r_max=1, d_max=0`` is exactly :class:`BatchNorm{d}d`. ``warmup_steps`` ramps
    the limits linearly from ``(1, 0)`` (plain BN) to ``(r_max, d_max)``, as the paper's schedule
    does. Eval uses the running statistics; state_dict keys are BN's.

    Args:
        num_features: C.
        eps, momentum, affine: as :class:`BatchNorm{d}d` (``track_running_stats`` must stay True).
        r_max, d_max: the clipping limits reached after the warm-up (paper: 3 and 5).
        warmup_steps: length of the linear warm-up, in training steps (0: limits from the start).
        bias, unbiased_running_var: as :class:`BatchNorm{d}d`.

    Raises:
        NormError: ``track_running_stats=False``.

    Example:
        >>> import torch, normkit
        >>> brn = normkit.nn.BatchRenorm{d}d(3, r_max=1.0, d_max=0.0)
        >>> x = torch.randn({example})
        >>> torch.allclose(brn(x), torch.nn.functional.batch_norm(x, None, None, training=True), atol=1e-5)
        True

    Reference: https://arxiv.org/abs/1702.03275
    """


class BatchRenorm1d(_BatchRenorm, nn.BatchNorm1d):  # (an nn.BatchNorm1d to isinstance, as normkit's BN)
    __doc__ = _RENORM_DOC.format(shape="``(N, C)`` or ``(N, C, L)``", d=1, example="8, 3")
    _dims = (2, 3)


class BatchRenorm2d(_BatchRenorm, nn.BatchNorm2d):  # (an nn.BatchNorm2d to isinstance, as normkit's BN)
    __doc__ = _RENORM_DOC.format(shape="``(N, C, H, W)``", d=2, example="8, 3, 4, 4")
    _dims = (4,)


class BatchRenorm3d(_BatchRenorm, nn.BatchNorm3d):  # (an nn.BatchNorm3d to isinstance, as normkit's BN)
    __doc__ = _RENORM_DOC.format(shape="``(N, C, D, H, W)``", d=3, example="4, 3, 2, 2, 2")
    _dims = (5,)


# --- Frozen BN -----------------------------------------------------------------------------------


class _FrozenBatchNorm(_NormBase):
    __prepare_scriptable__ = not_scriptable  # (torch.jit.script: a clear error)
    _dims: tuple[int, ...] = ()
    # built with track_running_stats=True only: its buffers always exist
    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        use_running_stats: bool = True,
        update_running_stats: bool = False,
        unbiased_running_var: bool = True,
    ) -> None:
        torch_norm_init(
            super().__init__, self, num_features, eps, momentum, affine, True, device, dtype, bias=bias
        )
        # The affine is frozen: buffers, not Parameters (no optimizer sees them), same state_dict keys
        # in torch.nn's order (weight, bias, running_mean, running_var, num_batches_tracked): scripts
        # that port checkpoints by position rely on it.
        stats = {key: self._buffers.pop(key) for key in list(self._buffers)}
        for key in ("weight", "bias"):
            p = self._parameters.pop(key)
            self.register_buffer(key, None if p is None else p.detach())
        self._buffers.update(stats)
        self.use_running_stats = bool(use_running_stats)
        self.update_running_stats = bool(update_running_stats)
        self.unbiased_running_var = bool(unbiased_running_var)
        self.training = False

    def train(self, mode: bool = True) -> _FrozenBatchNorm:
        """Frozen layers ignore train/eval: a parent's ``.train()`` leaves this one as it is."""
        return self

    def _check_input_dim(self, x: Tensor) -> None:
        check_tensor(x, type(self).__name__)
        if x.dim() not in self._dims:
            want = " or ".join(f"{d}D" for d in self._dims)
            raise NormError(f"{type(self).__name__}: expected {want} input (N, C, ...), got {x.dim()}D input")
        check_channels(x, self.num_features, type(self).__name__)

    def forward(self, input: Tensor) -> Tensor:
        x = input  # (torch.nn's argument name, so that layer(input=t) works as there)
        leaf = fx_leaf(self, x)
        if leaf is not None:
            return leaf
        self._check_input_dim(x)
        rm, rv, nbt = self.running_mean, self.running_var, self.num_batches_tracked
        mom, eps, unbiased = self.momentum, self.eps, self.unbiased_running_var
        w, b = self.weight, self.bias
        if not self.use_running_stats:
            if self.update_running_stats:
                out = batch_norm(
                    x, rm, rv, w, b, True, mom, eps, num_batches_tracked=nbt, unbiased_running_var=unbiased
                )
                return self._store(out)
            return batch_norm(x, None, None, w, b, True, mom, eps, unbiased_running_var=unbiased).output
        if self.update_running_stats:  # (the output's backward keeps these: the update below writes them)
            rm, rv = rm.clone(), rv.clone()
        y = batch_norm(x, rm, rv, w, b, False, mom, eps, unbiased_running_var=unbiased).output
        if self.update_running_stats:
            rm, rv = self.running_mean, self.running_var
            with buffer_writes():  # (no_grad, but not while exporting; _store copies detached values)
                upd = batch_norm(
                    x,
                    rm,
                    rv,
                    None,
                    None,
                    True,
                    mom,
                    eps,
                    num_batches_tracked=nbt,
                    unbiased_running_var=unbiased,
                )
                self._store(upd)
        return y

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"bias={self.bias is not None}, use_running_stats={self.use_running_stats}, "
            f"update_running_stats={self.update_running_stats}"
            + ("" if self.unbiased_running_var else ", unbiased_running_var=False")
        )


_FROZEN_DOC = r"""Batch normalization with frozen statistics and affine over a {shape} input.

    .. math::
        y = \frac{{x - \mu_{{run}}}}{{\sqrt{{\sigma^2_{{run}} + \epsilon}}}} \gamma + \beta

    For fine-tuning with small batches (detection, segmentation): the running statistics and the
    affine are constants, and the layer ignores ``.train()`` / ``.eval()`` (a parent's
    ``model.train()`` does not unfreeze it). ``weight`` and ``bias`` are buffers, not Parameters,
    with BN's state_dict keys: a :class:`BatchNorm{d}d` checkpoint loads here and this one loads
    into BN. Two independent switches:

    * ``use_running_stats`` (default True): normalize with the running statistics; False uses
      the batch statistics (still with the frozen affine).
    * ``update_running_stats`` (default False): fold each batch into the running statistics
      (PyTorch's EMA with ``momentum``), e.g. to re-estimate them on new data.

    :func:`normkit.surgery.freeze_bn` swaps every BN of a model for this layer and back.

    Args:
        num_features: C.
        eps, momentum, affine, bias, unbiased_running_var: as :class:`BatchNorm{d}d`.
        use_running_stats, update_running_stats: the two switches above.

    Example:
        >>> import torch, normkit
        >>> bn = torch.nn.BatchNorm{d}d(3).eval()
        >>> frozen = normkit.nn.FrozenBatchNorm{d}d(3)
        >>> _ = frozen.load_state_dict(bn.state_dict())
        >>> x = torch.randn({example})
        >>> torch.allclose(frozen.train()(x), bn(x), atol=1e-6)
        True
        >>> len(list(frozen.parameters()))
        0
    """


class FrozenBatchNorm1d(_FrozenBatchNorm):
    __doc__ = _FROZEN_DOC.format(shape="``(N, C)`` or ``(N, C, L)``", d=1, example="4, 3")
    _dims = (2, 3)


class FrozenBatchNorm2d(_FrozenBatchNorm):
    __doc__ = _FROZEN_DOC.format(shape="``(N, C, H, W)``", d=2, example="4, 3, 5, 5")
    _dims = (4,)


class FrozenBatchNorm3d(_FrozenBatchNorm):
    __doc__ = _FROZEN_DOC.format(shape="``(N, C, D, H, W)``", d=3, example="2, 3, 2, 2, 2")
    _dims = (5,)


# --- mean-only BN ----------------------------------------------------------------------------------


class MeanOnlyBatchNorm(nn.Module):
    r"""Mean-only batch normalization (Salimans & Kingma 2016): ``y = x - E_B[x] + beta``, no scaling.

    .. math::
        y = x - \mathrm{E}_{(N, *S)}[x] + \beta

    The paper pairs it with weight normalization (:func:`normkit.nn.weight_norm`): WN fixes each
    unit's scale, this removes the mean, and their combination beat BN in the paper's CIFAR-10
    table. Per channel over ``(N, *spatial)``, any rank >= 2. In eval the running mean is used,
    updated in training as ``running_mean = (1 - momentum) * running_mean + momentum * batch_mean``.

    Args:
        num_features: C.
        momentum: weight of the new batch mean, or ``None`` for a cumulative average.
        bias: learn the per-channel shift ``beta`` (init 0).
        track_running_stats: keep ``running_mean`` for eval; without it the batch mean is used always.

    Shape:
        Input ``(N, C, *)``; output the same.

    Example:
        >>> import torch, normkit
        >>> layer = normkit.nn.MeanOnlyBatchNorm(3)
        >>> x = torch.randn(16, 3, 4) * 5 + 2
        >>> y = layer(x)
        >>> torch.allclose(y.mean((0, 2)), torch.zeros(3), atol=1e-5)
        True
        >>> shift = y - x                                     # a per-channel constant: no scaling
        >>> torch.allclose(shift.amax((0, 2)), shift.amin((0, 2)), atol=1e-5)
        True

    Reference: https://arxiv.org/abs/1602.07868
    """

    __prepare_scriptable__ = not_scriptable  # (torch.jit.script: a clear error)

    bias: Tensor | None
    running_mean: Tensor | None
    num_batches_tracked: Tensor | None

    def __init__(
        self,
        num_features: int,
        momentum: float | None = 0.1,
        bias: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        self.num_features = num_features = check_positive_int(
            num_features, "MeanOnlyBatchNorm", "num_features"
        )
        self.momentum = check_momentum(momentum, "MeanOnlyBatchNorm")
        self.track_running_stats = bool(track_running_stats)
        if bias:
            self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, device=device, dtype=dtype))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        """Running mean 0, counter 0."""
        if self.running_mean is not None:
            assert self.num_batches_tracked is not None  # registered together
            self.running_mean.zero_()
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running mean and the bias (0)."""
        self.reset_running_stats()
        if self.bias is not None:
            with torch.no_grad():
                self.bias.zero_()

    def forward(self, input: Tensor) -> Tensor:
        x = input  # (torch.nn's argument name, so that layer(input=t) works as there)
        leaf = fx_leaf(self, x)
        if leaf is not None:
            return leaf
        check_tensor(x, "MeanOnlyBatchNorm")
        if x.dim() < 2:
            raise NormError(f"MeanOnlyBatchNorm: expected an (N, C, *) input, got shape {tuple(x.shape)}")
        check_channels(x, self.num_features, "MeanOnlyBatchNorm")
        rm, nbt = self.running_mean, self.num_batches_tracked
        tracking = self.track_running_stats and rm is not None
        out = mean_only_batch_norm(
            x,
            rm if tracking else None,
            self.bias,
            training=self.training or not tracking,
            momentum=self.momentum,
            num_batches_tracked=nbt if tracking else None,
        )
        if tracking and out.running_mean is not rm:
            # a training step on the running mean (and its counter, registered with it) returns both
            assert rm is not None and nbt is not None
            assert out.running_mean is not None and out.num_batches_tracked is not None
            with buffer_writes():  # (no_grad, but not while exporting: torch.export.save refuses its node)
                rm.copy_(out.running_mean.detach())
                nbt.copy_(out.num_batches_tracked)
        return out.output

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, momentum={self.momentum}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )


# --- Keras conventions -------------------------------------------------------------------------------


#: The keys of Keras 3's and tf.keras 2's BatchNormalization configs (and this class's ``num_features``).
_KERAS_BN_KEYS = frozenset(
    {
        "name", "trainable", "dtype", "axis", "momentum", "epsilon", "center", "scale",
        "beta_initializer", "gamma_initializer", "moving_mean_initializer", "moving_variance_initializer",
        "beta_regularizer", "gamma_regularizer", "beta_constraint", "gamma_constraint", "synchronized",
        "renorm", "renorm_clipping", "renorm_momentum", "fused", "virtual_batch_size", "adjustment",
        "num_features",
    }
)  # fmt: skip


def warn_keras_training_options(cfg: Any, op: str, stacklevel: int = 2) -> None:
    """Warn for each regularizer or constraint in a Keras BN config: they act in Keras's training loop,
    and a PyTorch layer does not carry them."""
    for key in ("beta_regularizer", "gamma_regularizer", "beta_constraint", "gamma_constraint"):
        if cfg.get(key) is not None:
            how = (
                "weight decay on that parameter through an optimizer param group"
                if key.endswith("regularizer")
                else "a projection of the parameter after each optimizer.step()"
            )
            warnings.warn(
                f"{op}: {key}={cfg[key]!r} acts in Keras's training loop and is not part of the layer "
                f"here; in PyTorch that is {how}",
                stacklevel=stacklevel + 1,
            )


def _keras_constant(spec: Any) -> float | None:
    """The value of a serialized Keras ``Zeros`` / ``Ones`` / ``Constant`` initializer, else ``None``."""
    if isinstance(spec, str):
        return {"zeros": 0.0, "ones": 1.0}.get(spec.lower())
    if isinstance(spec, dict):
        kind = str(spec.get("class_name", "")).lower()
        if kind in ("zeros", "ones"):
            return 0.0 if kind == "zeros" else 1.0
        if kind == "constant":
            value = (spec.get("config") or {}).get("value", 0.0)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
    return None


class BatchNormalization(nn.Module):
    r"""Keras's ``BatchNormalization``, with Keras's conventions, for channels-last (or any-axis) tensors.

    .. math::
        y = \gamma \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} + \beta

    Statistics per feature along ``axis`` (default -1, channels last), pooled over every other
    dim. Keras's conventions, not PyTorch's:

    * ``momentum`` weights the *old* value: ``moving = momentum * moving + (1 - momentum) * batch``
      (Keras 0.99 is PyTorch 0.01);
    * the moving variance stores the *biased* batch variance (Keras 3, ``ops.moments``);
    * ``epsilon`` defaults to 1e-3;
    * ``trainable=False`` freezes ``gamma``/``beta`` *and* runs the layer in inference mode even in
      training (Keras's rule since 2.1.3), so fine-tuning does not disturb the statistics.
    * ``layer(x, training=False)`` / ``training=True`` picks the mode per call, as Keras's call
      argument does (default ``None``: the module's ``train()`` / ``eval()``).

    Parameter and buffer names are Keras's (``gamma``, ``beta``, ``moving_mean``,
    ``moving_variance``); :meth:`get_weights` / :meth:`set_weights` / :meth:`get_config` speak
    Keras's list-of-arrays format. :func:`normkit.convert.to_keras_bn` and
    :func:`normkit.convert.from_keras_bn` convert to and from the PyTorch-convention layers.

    Args:
        num_features: size of the normalized axis.
        axis: the feature axis of the input (negative counts from the end).
        momentum: Keras momentum, in [0, 1].
        epsilon: added to the variance inside the square root.
        center: learn ``beta`` (init 0).
        scale: learn ``gamma`` (init 1).
        trainable: see above.

    Example:
        >>> import torch, normkit
        >>> layer = normkit.nn.BatchNormalization(3)          # (N, H, W, C) input
        >>> x = torch.randn(8, 5, 5, 3) + 2.0
        >>> y = layer(x)
        >>> torch.allclose(layer.moving_mean, 0.01 * x.mean((0, 1, 2)))
        True
        >>> before = layer.moving_mean.clone()
        >>> y = layer(x, training=False)                          # Keras's call argument: no update
        >>> torch.equal(layer.moving_mean, before)
        True
        >>> layer.trainable = False                               # inference mode, even in training
        >>> torch.allclose(layer(x), (x - layer.moving_mean) / torch.sqrt(layer.moving_variance + 1e-3))
        True

    Reference: https://keras.io/api/layers/normalization_layers/batch_normalization/
    """

    __prepare_scriptable__ = not_scriptable  # (torch.jit.script: a clear error)

    gamma: Tensor | None
    beta: Tensor | None
    moving_mean: Tensor
    moving_variance: Tensor

    def __init__(
        self,
        num_features: int,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        trainable: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        name = "BatchNormalization"
        self.num_features = num_features = check_positive_int(num_features, name, "num_features")
        axis = as_int(axis, name, "axis")  # (a numpy integer too, as Keras's int(axis))
        self.axis = axis
        self.momentum = check_keras_momentum(momentum, name)
        self.epsilon = check_eps(epsilon, name)
        self.center, self.scale = bool(center), bool(scale)
        factory = {"device": device, "dtype": dtype}
        if self.scale:
            self.gamma = nn.Parameter(torch.ones(num_features, **factory))
        else:
            self.register_parameter("gamma", None)
        if self.center:
            self.beta = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("beta", None)
        self.register_buffer("moving_mean", torch.zeros(num_features, **factory))
        self.register_buffer("moving_variance", torch.ones(num_features, **factory))
        self.trainable = trainable

    @property
    def trainable(self) -> bool:
        """Keras's flag: False freezes gamma/beta (``requires_grad=False``) and forces inference mode."""
        return self._trainable

    @trainable.setter
    def trainable(self, value: bool) -> None:
        self._trainable = bool(value)
        for p in (self.gamma, self.beta):
            if p is not None:
                p.requires_grad_(self._trainable)

    def _axis(self, x: Tensor) -> int:
        if not isinstance(x, Tensor):
            raise TypeError(f"BatchNormalization: expected a torch.Tensor input, got {type(x).__name__}")
        if not -x.dim() <= self.axis < x.dim():
            raise NormError(
                f"BatchNormalization: axis={self.axis} is out of range for an input of shape {tuple(x.shape)}"
            )
        ax = self.axis % x.dim()
        if x.shape[ax] != self.num_features:
            raise NormError(
                f"BatchNormalization: expected {self.num_features} features along axis {self.axis}, "
                f"got input of shape {tuple(x.shape)} with {x.shape[ax]}; channels-first input needs axis=1"
            )
        return ax

    def forward(self, input: Tensor, training: bool | None = None) -> Tensor:
        """Normalize ``input`` along ``axis``.

        Args:
            input: a floating-point tensor with ``num_features`` values along ``axis``.
            training: Keras's call argument: ``True`` uses the batch's statistics and updates the
                moving ones, ``False`` uses the moving statistics; ``None`` (default) follows the
                module's ``train()`` / ``eval()``. A ``trainable=False`` layer runs in inference mode
                either way, as in Keras.
        """
        x = input  # (torch.nn's argument name, so that layer(input=t) works as there)
        leaf = fx_leaf(self, x, training)
        if leaf is not None:
            return leaf
        if training is not None and not isinstance(training, bool):
            if type(training).__module__ == "numpy" and type(training).__name__ in ("bool", "bool_"):
                training = bool(training)
            else:
                raise TypeError(f"BatchNormalization: training must be True, False or None, got {training!r}")
        ax = self._axis(x)
        if not x.is_floating_point():
            raise TypeError(f"BatchNormalization: expected a floating-point input, got {x.dtype}")
        for name, p in (
            ("gamma", self.gamma),
            ("beta", self.beta),
            ("moving_mean", self.moving_mean),
            ("moving_variance", self.moving_variance),
        ):  # (dtype and device as every other layer: a float64 input into a float32 layer is an error)
            check_param(p, x, (self.num_features,), "BatchNormalization", name)
        nd = x.dim()
        view = [1] * nd
        view[ax] = self.num_features
        g = self.gamma.view(view) if self.gamma is not None else None
        b = self.beta.view(view) if self.beta is not None else None
        dims = tuple(d for d in range(nd) if d != ax)
        if not ((self.training if training is None else training) and self.trainable):
            dtype = acc_dtype(x.dtype)
            mean = self.moving_mean.to(dtype).view(view)
            rstd = torch.rsqrt(self.moving_variance.to(dtype) + self.epsilon).view(view)
            return normalize(x, mean, rstd, g, b)
        m = x.numel() // self.num_features
        if m == 1:
            raise NormError(
                f"BatchNormalization: expected more than 1 value per feature in training, got input of shape "
                f"{tuple(x.shape)}; use a batch of at least 2, or inference mode"
            )
        if x.numel() == 0:
            return norm(x, dims, g, b, self.epsilon)[0]
        y, mean, var = norm(x, dims, g, b, self.epsilon)
        # Keras's update moving*k + batch*(1-k) is PyTorch's EMA with momentum 1 - k, biased variance.
        mm, mv, _ = update_running_stats(
            self.moving_mean,
            self.moving_variance,
            None,
            mean,
            var,
            m,
            1.0 - self.momentum,
            False,
            "BatchNormalization",
        )
        with buffer_writes():  # (no_grad, but not while exporting: torch.export.save refuses its node)
            self.moving_mean.copy_(mm.detach())
            self.moving_variance.copy_(mv.detach())
        return y

    # -- Keras's weight-list API --------------------------------------------------------------------
    def _keras_weights(self) -> list[tuple[str, Tensor]]:
        """``(name, tensor)`` in Keras's order: gamma if scale, beta if center, the moving statistics."""
        names = ("gamma", "beta", "moving_mean", "moving_variance")
        return [(n, t) for n in names if (t := getattr(self, n)) is not None]

    def get_weights(self) -> list[Any]:
        """The weights as numpy arrays in Keras's order: ``[gamma?, beta?, moving_mean, moving_variance]``."""
        return [t.detach().cpu().numpy().copy() for _, t in self._keras_weights()]

    def set_weights(self, weights: list[Any]) -> None:
        """Load ``[gamma?, beta?, moving_mean, moving_variance]`` (numpy arrays or tensors), Keras's order.

        Every array is checked before any is written: a wrong one raises and loads nothing.
        """
        targets = self._keras_weights()
        if len(weights) != len(targets):
            raise NormError(
                f"BatchNormalization.set_weights: expected {len(targets)} arrays (gamma if scale, beta if "
                f"center, moving_mean, moving_variance), got {len(weights)}"
            )
        sources = []
        for (n, t), w in zip(targets, weights):
            try:
                src = torch.as_tensor(w)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise TypeError(
                    f"BatchNormalization.set_weights: {n} must be an array or tensor of shape "
                    f"{tuple(t.shape)}, got {type(w).__name__} ({exc})"
                ) from None
            if tuple(src.shape) != tuple(t.shape):
                raise NormError(
                    f"BatchNormalization.set_weights: expected {n} of shape {tuple(t.shape)}, got "
                    f"{tuple(src.shape)}; nothing was loaded"
                )
            if src.dtype == torch.bool or src.is_complex():
                raise TypeError(
                    f"BatchNormalization.set_weights: {n} must hold real numbers, got {src.dtype}; "
                    "nothing was loaded"
                )
            sources.append(src)
        with torch.no_grad():
            for (_, t), src in zip(targets, sources):
                t.copy_(src)

    def get_config(self) -> dict[str, Any]:
        """Keras's config keys for this layer."""
        return {
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "trainable": self.trainable,
        }

    @classmethod
    def from_config(
        cls,
        config: dict[str, Any],
        num_features: int | None = None,
        *,
        device: Any = None,
        dtype: Any = None,
    ) -> BatchNormalization:
        """The layer a Keras ``BatchNormalization`` config describes (a Keras layer's ``get_config()``, a
        model JSON's ``"config"`` entry, or this class's :meth:`get_config`).

        Keras learns the feature count from the first input; PyTorch allocates the weights now, so pass
        ``num_features`` (or put it in ``config``). ``axis``, ``momentum``, ``epsilon``, ``center``,
        ``scale`` and ``trainable`` are taken; the initializers are applied when they are Keras's
        ``Zeros`` / ``Ones`` / ``Constant`` (a ResNet's zero-initialised last ``gamma``), and another one
        warns (load the trained weights with :meth:`set_weights`). ``name`` and ``dtype`` are
        ignored (pass ``dtype=`` here). Options this layer would drop are errors, by name:
        ``renorm``, ``virtual_batch_size``, ``synchronized=True`` (convert with
        :func:`normkit.convert.from_keras_bn` and use the layers it names); regularizers and
        constraints, which act in Keras's training loop, warn with their PyTorch counterparts, and so
        do ``fused=True`` (tf.keras 2's unbiased moving variance) and keys Keras does not define.

        Example:
            >>> import normkit
            >>> cfg = {"name": "bn", "axis": -1, "momentum": 0.9, "epsilon": 1e-5, "center": True,
            ...        "scale": True, "gamma_initializer": {"class_name": "Zeros", "config": {}}}
            >>> layer = normkit.nn.BatchNormalization.from_config(cfg, num_features=16)
            >>> layer.momentum, layer.epsilon, layer.gamma.abs().max().item()
            (0.9, 1e-05, 0.0)
        """
        name = "BatchNormalization.from_config"
        if not isinstance(config, dict):
            raise TypeError(f"{name}: expected a dict (a Keras get_config()), got {type(config).__name__}")
        cfg = dict(config)
        if "num_features" in cfg:
            if num_features is not None and num_features != cfg["num_features"]:
                raise NormError(
                    f"{name}: num_features={num_features!r} disagrees with the config's "
                    f"{cfg['num_features']!r}"
                )
            num_features = cfg["num_features"]
        if num_features is None:
            raise NormError(
                f"{name}: Keras's config has no feature count (Keras learns it from the first input); pass "
                "num_features=C, the size of the input along axis"
            )
        if cfg.get("renorm"):
            raise NormError(
                f"{name}: renorm=True (Batch Renormalization) is not this layer's algorithm; "
                "normkit.convert.from_keras_bn says what to build"
            )
        if cfg.get("virtual_batch_size") is not None:
            raise NormError(
                f"{name}: virtual_batch_size={cfg['virtual_batch_size']!r} (Ghost Batch Normalization) is "
                "not this layer's algorithm; normkit.convert's module docs show its GhostBatchNorm2d twin"
            )
        if cfg.get("synchronized"):
            raise NormError(
                f"{name}: synchronized=True averages the statistics over processes, which this layer does "
                "not; convert with normkit.convert.from_keras_bn, then normkit.convert_sync_batchnorm"
            )
        warn_keras_training_options(cfg, name, stacklevel=2)
        if cfg.get("fused") is True:
            warnings.warn(
                f"{name}: fused=True (tf.keras 2) averages the unbiased batch variance; this layer averages "
                "the biased one (Keras 3), so continued training drifts slightly; "
                "normkit.convert.from_keras_bn(layer) keeps tf.keras 2's update",
                stacklevel=2,
            )
        unknown = sorted(set(cfg) - _KERAS_BN_KEYS)
        if unknown:
            warnings.warn(
                f"{name}: ignored keys Keras's BatchNormalization does not define: {unknown}", stacklevel=2
            )
        layer = cls(
            num_features,
            axis=cfg.get("axis", -1),
            momentum=cfg.get("momentum", 0.99),
            epsilon=cfg.get("epsilon", 1e-3),
            center=cfg.get("center", True),
            scale=cfg.get("scale", True),
            trainable=cfg.get("trainable", True),
            device=device,
            dtype=dtype,
        )
        targets = (
            ("gamma_initializer", layer.gamma),
            ("beta_initializer", layer.beta),
            ("moving_mean_initializer", layer.moving_mean),
            ("moving_variance_initializer", layer.moving_variance),
        )
        for key, t in targets:
            if t is None or cfg.get(key) is None:
                continue
            value = _keras_constant(cfg[key])
            if value is None:
                warnings.warn(
                    f"{name}: {key}={cfg[key]!r} is not Zeros / Ones / Constant and was not applied (the "
                    "default stands); load the trained weights with set_weights",
                    stacklevel=2,
                )
                continue
            with torch.no_grad():
                t.fill_(value)
        return layer

    def reset_parameters(self) -> None:
        """gamma 1, beta 0, moving mean 0, moving variance 1 (Keras's initialisers)."""
        with torch.no_grad():
            if self.gamma is not None:
                self.gamma.fill_(1.0)
            if self.beta is not None:
                self.beta.zero_()
            self.moving_mean.zero_()
            self.moving_variance.fill_(1.0)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, axis={self.axis}, momentum={self.momentum}, epsilon={self.epsilon}, "
            f"center={self.center}, scale={self.scale}, trainable={self.trainable}"
        )
