"""InstanceNorm1d/2d/3d: subclasses of torch.nn's, on normkit's functional core."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import NormError
from ..functional.batch_norm import batch_norm as _batch_norm
from ..functional.instance_norm import instance_norm as _instance_norm
from ..kernels import _direct, _fast
from ._base import _StatsMixin, check_tensor, fx_leaf, store_stats

__all__ = ["InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]


def _in_module_forward(
    x: Tensor,
    mask: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    num_skipped_updates: Tensor | None,
    use_input_stats: bool,
    momentum: float | None,
    eps: float,
    ndim: int,
    num_features: int,
    affine: bool,
    name: str,
) -> Tensor:
    """An IN layer's forward on its parameters and buffers (one ``torch.fx`` call, see ``torch.fx.wrap``
    below)."""
    check_tensor(x, name)
    if x.dim() not in (ndim - 1, ndim):
        raise NormError(
            f"{name}: expected {ndim}D (batched) or {ndim - 1}D (unbatched) input, got {x.dim()}D input"
        )
    unbatched = x.dim() == ndim - 1
    if unbatched:  # (C, *spatial), as torch.nn.InstanceNorm accepts
        x = x.unsqueeze(0)
        if mask is not None and mask.dim() == x.dim() - 1:
            mask = mask.unsqueeze(0)
    if x.shape[1] != num_features:
        if affine or running_mean is not None:
            raise NormError(
                f"{name}: expected input's size at dim={0 if unbatched else 1} to match num_features "
                f"({num_features}), but got: {x.shape[1]}; the layer was built with "
                f"num_features={num_features}"
            )
        # torch's behaviour: the channel count is unused without affine or running statistics.
        warnings.warn(
            f"{name}: input's size at dim={0 if unbatched else 1} ({x.shape[1]}) does not match num_features "
            f"({num_features}). You can silence this warning by not passing in num_features, which is not "
            "used because affine=False",
            UserWarning,
            stacklevel=4,
        )
    if not use_input_stats and x.shape[0] == 0 and mask is None:
        # An empty batch normalized by the running statistics: eval IN is then the per-channel affine
        # map of those statistics, i.e. eval BN on them, which takes N=0. (ATen's instance_norm, which
        # the functional op calls here, repeats the statistics N times and then fails to index them:
        # "IndexError: select(): index 0 out of range", torch.nn.InstanceNorm's own behaviour.)
        return _batch_norm(x, running_mean, running_var, weight, bias, False, eps=eps).output
    out = _instance_norm(
        x,
        running_mean,
        running_var,
        weight,
        bias,
        use_input_stats=use_input_stats,
        momentum=momentum,
        eps=eps,
        num_batches_tracked=num_batches_tracked,
        mask=mask,
    )
    y = store_stats(out, running_mean, running_var, num_batches_tracked, num_skipped_updates)
    return y.squeeze(0) if unbatched else y


torch.fx.wrap("_in_module_forward")


class _InstanceNorm(_StatsMixin, nn.modules.instancenorm._InstanceNorm):
    """normkit's IN: torch.nn's class (constructor, parameters, buffers, state_dict) with normkit's
    forward."""

    _ndim = 0

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        # (torch annotates momentum as float, yet takes None: the cumulative average)
        init = super().__init__
        self._init_torch_norm(
            init, num_features, eps, momentum, affine, track_running_stats, device, dtype, bias
        )

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize ``input``; ``mask`` (bool, broadcastable to it, True = valid) limits the statistics."""
        # torch.jit.is_scripting is public API that torch.jit.__all__ leaves out:
        if torch.jit.is_scripting():  # pyright: ignore[reportPrivateImportUsage]
            # TorchScript (deprecated in torch 2.13): the eager layer's semantics on ATen's instance_norm
            # (the step is counted; momentum=None is a cumulative average).
            use_input_stats = self.training or not self.track_running_stats
            factor = 0.0
            if use_input_stats and self.track_running_stats and self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                mom = self.momentum
                factor = 1.0 / float(self.num_batches_tracked) if mom is None else mom
            return torch.nn.functional.instance_norm(
                input,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                use_input_stats,
                factor,
                self.eps,
            )
        return self._forward(input, mask)

    @torch.jit.unused
    def _forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        tracking = self._tracking
        if (  # instance statistics, no running buffers: GroupNorm with one group per channel, one fused call
            mask is None
            and not tracking
            and _fast.eligible(x)
            and x.dim() == self._ndim
            and x.shape[1] == self.num_features
        ):
            y = _fast.group_norm(x, self.num_features, self.weight, self.bias, self.eps)
            if y is not None:
                return y
        elif (
            mask is None
            and not tracking
            and _direct.route(x)
            and x.dim() == self._ndim
            and x.shape[1] == self.num_features
        ):
            y = _direct.instance_norm(x, self.weight, self.bias, self.eps)  # on a GPU: torch's own op
            if y is not None:
                return y
        leaf = fx_leaf(self, x, mask, root_traceable=True)
        if leaf is not None:
            return leaf
        return _in_module_forward(
            x,
            mask,
            self.weight,
            self.bias,
            self.running_mean if tracking else None,
            self.running_var if tracking else None,
            self.num_batches_tracked if tracking else None,
            self.num_skipped_updates if tracking else None,
            self.training or not tracking,
            self.momentum,
            self.eps,
            self._ndim,
            self.num_features,
            self.affine,
            type(self).__name__,
        )


class InstanceNorm1d(_InstanceNorm, nn.InstanceNorm1d):
    r"""Instance normalization over a 3D ``(N, C, L)`` input; a drop-in for ``torch.nn.InstanceNorm1d``.

    .. math::
        y_{nc} = \frac{x_{nc} - \mathrm{E}_{L}[x_{nc}]}{\sqrt{\mathrm{Var}_{L}[x_{nc}] + \epsilon}}
                 \gamma_c + \beta_c

    Defaults follow torch: ``affine=False``, ``track_running_stats=False``. With tracking, the
    batch-averaged instance statistics update the running buffers in training and are used in eval.
    Equivalent to ``GroupNorm(C, C)``. An empty batch (N=0) gives the empty output in training and
    in eval, with or without running statistics (torch.nn's eval with them raises an ``IndexError``).

    Example:
        >>> import torch, normkit
        >>> normkit.nn.InstanceNorm1d(3)(torch.randn(2, 3, 10)).shape
        torch.Size([2, 3, 10])

    Reference: https://arxiv.org/abs/1607.08022
    """

    _ndim = 3


class InstanceNorm2d(_InstanceNorm, nn.InstanceNorm2d):
    r"""Instance normalization over a 4D ``(N, C, H, W)`` input; a drop-in for ``torch.nn.InstanceNorm2d``.

    See :class:`InstanceNorm1d`. Equivalent to ``GroupNorm(C, C)``.

    Example:
        >>> import torch, normkit
        >>> x = torch.randn(2, 3, 6, 6)
        >>> torch.allclose(normkit.nn.InstanceNorm2d(3)(x), torch.nn.InstanceNorm2d(3)(x), atol=1e-5)
        True
    """

    _ndim = 4


class InstanceNorm3d(_InstanceNorm, nn.InstanceNorm3d):
    r"""Instance normalization over a 5D ``(N, C, D, H, W)`` input; a drop-in for ``torch.nn.InstanceNorm3d``.

    See :class:`InstanceNorm1d`.

    Example:
        >>> import torch, normkit
        >>> normkit.nn.InstanceNorm3d(2)(torch.randn(2, 2, 3, 3, 3)).shape
        torch.Size([2, 2, 3, 3, 3])
    """

    _ndim = 5
