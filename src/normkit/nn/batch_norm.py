"""BatchNorm1d/2d/3d: subclasses of torch.nn's, on normkit's functional core."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._errors import NormError
from ..functional._moments import aten_batch_norm, aten_eval_dtypes
from ..functional._running import live_count
from ..functional.batch_norm import batch_norm as _batch_norm
from ..functional.batch_norm import train_step
from ..kernels import _fast
from ..ops.library import exporting
from ._base import _StatsMixin, buffer_writes, check_channels, check_tensor, fx_leaf, store_stats

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


#: the ranks of a layer that takes any input of 2 dims or more, as torch's SyncBatchNorm does
AT_LEAST_2D: tuple[int, ...] = tuple(range(2, 65))


def _check_dims(x: Tensor, dims: tuple[int, ...], num_features: int, name: str) -> None:
    check_tensor(x, name)
    if x.dim() not in dims:
        got = f"{x.dim()}D input"
        want = "at least 2D" if dims == AT_LEAST_2D else " or ".join(f"{d}D" for d in dims)
        raise NormError(f"{name}: expected {want} input (N, C, ...), got {got}")
    check_channels(x, num_features, name)


def _bn_module_forward(
    x: Tensor,
    mask: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    num_skipped_updates: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    unbiased_running_var: bool,
    dims: tuple[int, ...],
    num_features: int,
    name: str,
) -> Tensor:
    """A BN layer's forward on its parameters and buffers: check the input, normalize, store the statistics.

    A module-level function that ``torch.fx`` records as one call (``torch.fx.wrap`` below), so
    symbolic tracing sees through normkit's layers; Dynamo and export trace into it.
    """
    _check_dims(x, dims, num_features, name)
    if _exported_as_torch(
        x, mask, weight, bias, running_mean, running_var, training, momentum, unbiased_running_var
    ):
        # Exporters record torch.nn's own op, ATen's batch_norm in training, updating the buffers in
        # place: tools find a BN by that node and its buffers (torchao's QAT conv + BN fusion,
        # move_exported_model_to_eval, convert_pt2e's folding). As torch.nn's, it also updates them from
        # a non-finite batch (docs/differences.md).
        y = aten_batch_norm(x, weight, bias, running_mean, running_var, True, momentum or 0.0, eps)
        if num_batches_tracked is not None and running_mean is not None and training:
            with buffer_writes():  # (through a reduction: AOTInductor folds an add_ on it, see live_count)
                num_batches_tracked.copy_(live_count(num_batches_tracked) + 1)
        return y
    out = _batch_norm(
        x,
        running_mean,
        running_var,
        weight,
        bias,
        training=training,
        momentum=momentum,
        eps=eps,
        num_batches_tracked=num_batches_tracked,
        unbiased_running_var=unbiased_running_var,
        mask=mask,
    )
    return store_stats(out, running_mean, running_var, num_batches_tracked, num_skipped_updates)


torch.fx.wrap("_bn_module_forward")


def _exported_as_torch(
    x: Tensor,
    mask: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float | None,
    unbiased_running_var: bool,
) -> bool:
    """Whether a BN layer's batch-statistics step is exported as ATen's ``batch_norm`` (torch.nn's op):
    while exporting, without a mask, where that op computes normkit's step (the running statistics at
    a fixed momentum with the unbiased variance, in dtypes it takes)."""
    if mask is not None or not exporting():
        return False
    m = x.numel() // x.shape[1] if x.shape[1] else 0
    if isinstance(m, int) and m <= 1:
        return False  # (normkit's error: one value per channel)
    if training and running_mean is not None and torch.onnx.is_in_onnx_export():
        # (torch.onnx turns ATen's training batch_norm into ONNX's inference BatchNormalization, on the
        # running statistics: wrong output; normkit's ops export the step itself)
        return False
    if running_mean is None or running_var is None:
        return True  # (batch statistics in both modes, no buffers)
    return (
        training
        and momentum is not None
        and unbiased_running_var
        and aten_eval_dtypes(x, weight, bias, running_mean, running_var)
    )


class _BatchNorm(_StatsMixin, nn.modules.batchnorm._BatchNorm):
    """normkit's BN: torch.nn's class (constructor, parameters, buffers, state_dict) with normkit's
    forward."""

    _dims: tuple[int, ...] = ()

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
        bias: bool = True,
        unbiased_running_var: bool = True,
    ) -> None:
        init = super().__init__
        self._init_torch_norm(
            init, num_features, eps, momentum, affine, track_running_stats, device, dtype, bias
        )
        self.unbiased_running_var = bool(unbiased_running_var)

    def _check_input_dim(self, x: Tensor) -> None:
        _check_dims(x, self._dims, self.num_features, type(self).__name__)

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize ``input``; ``mask`` (bool, broadcastable to it, True = valid) limits the statistics."""
        # torch.jit.is_scripting is public API that torch.jit.__all__ leaves out:
        if torch.jit.is_scripting():  # pyright: ignore[reportPrivateImportUsage]
            # TorchScript (deprecated in torch 2.13) runs torch.nn's semantics on ATen's batch_norm.
            factor = 0.0
            if self.training and self.track_running_stats and self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                mom = self.momentum
                factor = 1.0 / float(self.num_batches_tracked) if mom is None else mom
            use_batch = self.training or (self.running_mean is None and self.running_var is None)
            keep = not self.training or self.track_running_stats
            return torch.nn.functional.batch_norm(
                input,
                self.running_mean if keep else None,
                self.running_var if keep else None,
                self.weight,
                self.bias,
                use_batch,
                factor,
                self.eps,
            )
        return self._forward(input, mask)

    @torch.jit.unused
    def _forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        dims = self._dims
        if type(self)._check_input_dim is not _BatchNorm._check_input_dim:
            # a subclass's own check (torch.nn's idiom for a BN of another rank): it runs, and the rest
            # takes any rank from 2 as the functional op does (super()._check_input_dim keeps _dims)
            self._check_input_dim(x)
            dims = AT_LEAST_2D
        tracking = self._tracking
        step = None  # a fast path: one call with the same interface either way
        batch_stats = self.training or not tracking
        if mask is None and batch_stats:
            # plain eager on a CPU tensor: one fused call (and one for the backward); on a GPU: torch's
            # own kernel, buffers guarded, or under use("triton") normkit's Triton kernels, one node
            step = train_step(x, _fast.eligible(x))
        if step is not None and x.dim() in dims and x.shape[1] == self.num_features:
            train = tracking and self.training
            y = step(
                x,
                self.weight,
                self.bias,
                self.running_mean if train else None,
                self.running_var if train else None,
                self.num_batches_tracked if train else None,
                self.momentum,
                self.eps,
                self.unbiased_running_var,
                self.num_skipped_updates if train else None,
            )
            if y is not None:
                return y
        if mask is None and not batch_stats and _fast.eligible(x) and x.dim() in dims:
            # eval with running statistics, plain eager on a CPU tensor: checks and ATen's batch_norm in C++
            out = _fast.checked(
                "batch_norm",
                x,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                False,
                self.momentum,
                self.eps,
                self.num_batches_tracked,
                self.unbiased_running_var,
            )
            if out is not None:
                return out[0]
        leaf = fx_leaf(self, x, mask, root_traceable=True)
        if leaf is not None:
            return leaf
        return _bn_module_forward(
            x,
            mask,
            self.weight,
            self.bias,
            self.running_mean if tracking else None,
            self.running_var if tracking else None,
            self.num_batches_tracked if tracking else None,
            self.num_skipped_updates if tracking else None,
            self.training,
            self.momentum,
            self.eps,
            self.unbiased_running_var,
            dims,
            self.num_features,
            type(self).__name__,
        )


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    r"""Batch normalization over a 2D ``(N, C)`` or 3D ``(N, C, L)`` input; a drop-in for
    ``torch.nn.BatchNorm1d``.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    Statistics per channel over ``N`` (and ``L``). In training the batch statistics (biased
    variance) are used and the running ones updated as ``running = (1 - momentum) * running +
    momentum * batch`` with the unbiased variance (``momentum=None``: cumulative average). In
    eval the running statistics are used. With ``track_running_stats=False`` (at construction or
    set later) batch statistics are used in both modes and the buffers are never touched.

    Args:
        num_features: C.
        eps: added to the variance inside the square root.
        momentum: weight of the new batch (PyTorch convention; Keras's 0.99 is 0.01 here), or ``None``.
        affine: learnable per-channel weight and bias.
        track_running_stats: keep running statistics for eval mode.
        bias: with ``affine``, whether to learn the bias (keyword-only; normkit extension).
        unbiased_running_var: store the unbiased batch variance (PyTorch) or the biased one (Keras 3).

    Shape:
        Input ``(N, C)`` or ``(N, C, L)``; output the same shape, dtype and layout.

    Example:
        >>> import torch, normkit
        >>> bn = normkit.nn.BatchNorm1d(16)
        >>> y = bn(torch.randn(8, 16))
        >>> bn.num_batches_tracked.item()
        1

    Reference: https://arxiv.org/abs/1502.03167
    """

    _dims = (2, 3)


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    r"""Batch normalization over a 4D ``(N, C, H, W)`` input; a drop-in for ``torch.nn.BatchNorm2d``.

    Each channel's statistics pool over N, H and W (``m = N*H*W``). Same arguments, defaults,
    state_dict keys and running-statistics rule as :class:`BatchNorm1d` and ``torch.nn``;
    channels_last inputs give channels_last outputs and input gradients.

    Example:
        >>> import torch, normkit
        >>> ours, ref = normkit.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)
        >>> _ = ours.load_state_dict(ref.state_dict())
        >>> x = torch.randn(8, 4, 5, 5)
        >>> torch.allclose(ours(x), ref(x), atol=1e-5)
        True
        >>> torch.allclose(ours.running_var, ref.running_var)
        True

    Reference: https://arxiv.org/abs/1502.03167
    """

    _dims = (4,)


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    r"""Batch normalization over a 5D ``(N, C, D, H, W)`` input; a drop-in for ``torch.nn.BatchNorm3d``.

    See :class:`BatchNorm1d` for the maths and the running statistics.

    Example:
        >>> import torch, normkit
        >>> normkit.nn.BatchNorm3d(2)(torch.randn(2, 2, 3, 3, 3)).shape
        torch.Size([2, 2, 3, 3, 3])
    """

    _dims = (5,)
