"""SyncBatchNorm: batch normalization with statistics over every process of a torch.distributed group."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from ..functional._collective import group_size
from ..functional.activations import ActivationLike
from ..functional.sync_batch_norm import _agree_eagerly, sync_batch_norm_train
from ._base import fx_leaf
from .batch_norm import AT_LEAST_2D, _BatchNorm, _check_dims
from .norm_act import _act_repr, _ActMixin

__all__ = ["SyncBatchNorm", "SyncBatchNormAct"]


class SyncBatchNorm(_BatchNorm):
    r"""Batch normalization whose training statistics pool over every process of a torch.distributed group.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    In training, ``E`` and ``Var`` (biased) are per channel over ``(N, *spatial)`` of the
    *concatenated* batches of all processes in ``process_group``, so P processes with batches of
    B normalize, back-propagate and update their running statistics exactly as one process with
    the batch of P*B. Per forward: each process computes its own ``(count, mean, M2)`` per
    channel, one ``all_gather`` exchanges them, and every process merges them with Chan et al.'s
    parallel formula (float64, no ``E[x^2] - E[x]^2`` cancellation); per backward, one
    ``all_reduce`` of the two per-channel sums ``sum dy`` and ``sum dy * x_hat``. Per-process batch
    sizes may differ, and be 0 or 1; a global count of one value per channel, or a bad input on any
    process, raises on *every* process (no hang). The running statistics follow PyTorch
    (``running = (1 - momentum) * running + momentum * batch``, unbiased global variance) and are
    identical on all processes.

    In eval mode, with one process, or without an initialised process group, this is exactly
    :class:`BatchNorm2d` (any rank from 2D to 5D) and issues no collective, so ``torch.compile``,
    ``torch.export`` and single-process tests see plain BN. It runs on gloo (CPU tensors) and
    nccl (CUDA tensors); channels_last is kept.

    It subclasses normkit's (hence ``torch.nn``'s) ``_BatchNorm``, *not*
    ``torch.nn.SyncBatchNorm``: ``isinstance`` tools (``swa_utils.update_bn``,
    ``fuse_conv_bn_eval``, ``normkit.recalibrate_bn``) find it, and ``DistributedDataParallel``
    accepts it on CPU (DDP refuses ``torch.nn.SyncBatchNorm`` layers on CPU modules).
    :func:`normkit.convert_sync_batchnorm` converts a model's BN layers to it and
    :func:`normkit.revert_sync_batchnorm` back.

    Args:
        num_features: C.
        eps: added to the variance inside the square root.
        momentum: weight of the new batch (PyTorch convention), or ``None`` (cumulative average).
        affine: learnable per-channel weight and bias.
        track_running_stats: keep running statistics for eval mode.
        process_group: the group to synchronise over (``None``: the default, whole world).
        bias, unbiased_running_var: as :class:`BatchNorm2d` (keyword-only).

    Shape:
        Input ``(N, C, *)`` with 0 to 3 spatial dims; output the same shape, dtype and layout.
        ``N`` may differ between processes.

    Example:
        >>> import torch, normkit
        >>> sbn = normkit.nn.SyncBatchNorm(4)            # no process group: plain BN
        >>> x = torch.randn(8, 4, 5, 5)
        >>> ref = torch.nn.functional.batch_norm(x, None, None, training=True)
        >>> torch.allclose(sbn(x), ref, atol=1e-5), sbn.num_batches_tracked.item()
        (True, 1)
        >>> isinstance(sbn, torch.nn.modules.batchnorm._BatchNorm)
        True

    Reference: https://arxiv.org/abs/1711.07240 (MegDet: cross-GPU batch normalization)
    """

    _dims = AT_LEAST_2D  # (any rank from 2, as torch's SyncBatchNorm)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        unbiased_running_var: bool = True,
    ) -> None:
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
        self.process_group = process_group

    @torch.jit.unused
    def _forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        if not (self.training and group_size(self.process_group) > 1):
            return super()._forward(x, mask)  # eval, one process, or no process group: plain BN
        leaf = fx_leaf(self, x, mask)
        if leaf is not None:
            return leaf
        tracking = self._tracking
        name = type(self).__name__
        if self.__dict__.get("_agreed_with") != id(self.process_group):
            # Once per group: every process's channel count is the same (mismatched counts made gloo
            # abort one process and hand the others NaN); a small collective, on the first forward only.
            params = (self.weight, self.bias, self.running_mean if tracking else None)
            _agree_eagerly(x, params, self.eps, self.momentum, self.process_group, name)
            self.__dict__["_agreed_with"] = id(self.process_group)
        out = sync_batch_norm_train(
            x,
            self.running_mean if tracking else None,
            self.running_var if tracking else None,
            self.weight,
            self.bias,
            self.momentum,
            self.eps,
            self.num_batches_tracked if tracking else None,
            self.process_group,
            self.unbiased_running_var,
            mask,
            self.num_features,
            name,
            lambda t: _check_dims(t, self._dims, self.num_features, name),
        )
        return self._store(out)

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group: Any = None) -> torch.nn.Module:
        """:func:`normkit.convert_sync_batchnorm` under ``torch.nn.SyncBatchNorm``'s name for it.

        So that code written for torch's class (``SyncBatchNorm.convert_sync_batchnorm(model, group)``)
        runs unchanged with normkit's; the conversion is :func:`normkit.convert_sync_batchnorm`'s.

        Example:
            >>> import torch, normkit
            >>> net = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
            >>> net = normkit.nn.SyncBatchNorm.convert_sync_batchnorm(net)
            >>> type(net[0]).__name__
            'SyncBatchNorm'
        """
        # Imported here, not at the top: normkit.nn never imports normkit.distributed at import time.
        from ..distributed.convert import convert_sync_batchnorm

        return convert_sync_batchnorm(module, process_group)

    def __deepcopy__(self, memo: dict[int, Any]) -> SyncBatchNorm:
        # A process group is a handle to live connections: copies share it instead of copying it.
        group = self.__dict__.get("process_group")
        if group is not None:
            memo[id(group)] = group
        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        return new


class SyncBatchNormAct(_ActMixin, SyncBatchNorm):
    """``act(SyncBatchNorm(x))``: what :func:`normkit.convert_sync_batchnorm` makes of a ``BatchNormAct2d``.

    Same state_dict keys as :class:`SyncBatchNorm` (and :class:`BatchNormAct2d`).

    Args:
        num_features: C.
        activation: name or callable (see :func:`normkit.functional.activations.get_activation`).
        **kwargs: the arguments of :class:`SyncBatchNorm`.

    Example:
        >>> import torch, normkit
        >>> layer = normkit.nn.SyncBatchNormAct(4, activation="relu")
        >>> bool((layer(torch.randn(2, 4, 3, 3)) >= 0).all())
        True
    """

    def __init__(self, num_features: int, activation: ActivationLike = "relu", **kwargs: Any) -> None:
        super().__init__(num_features, **kwargs)
        self._init_act(activation)

    def forward(self, input: Tensor) -> Tensor:  # type: ignore[override]
        x = input  # (torch.nn's argument name, so that layer(input=t) works as there)
        leaf = fx_leaf(self, x, root_traceable=True)
        if leaf is not None:
            return leaf
        return self._apply_act(super().forward(x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={_act_repr(self.activation)}"


class _BatchNormXd(_BatchNorm):
    """normkit's BatchNorm for any rank from 2D to 5D: what a SyncBatchNorm of unknown origin reverts to.

    (A SyncBatchNorm does not know its input rank; one converted from a ``BatchNorm{1,2,3}d``
    reverts to that class instead.)
    """

    _dims = AT_LEAST_2D  # (any rank from 2, as torch's SyncBatchNorm)
