"""Shared plumbing for the running-statistics norms: parameters, buffers, versioned loading, repr."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import NormError
from ..functional._checks import check_eps, check_momentum, check_positive_int
from ..functional._running import NormOutput

__all__ = ["_NormBase"]


def make_affine(
    module: nn.Module, shape: tuple[int, ...], weight: bool, bias: bool, factory: dict[str, Any]
) -> None:
    """Register ``weight`` (ones) and ``bias`` (zeros) Parameters of ``shape``, or ``None`` placeholders."""
    if weight:
        module.weight = nn.Parameter(torch.ones(shape, **factory))
    else:
        module.register_parameter("weight", None)
    if bias:
        module.bias = nn.Parameter(torch.zeros(shape, **factory))
    else:
        module.register_parameter("bias", None)


def reset_affine(module: nn.Module) -> None:
    with torch.no_grad():
        if getattr(module, "weight", None) is not None:
            module.weight.fill_(1.0)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()


def check_channels(x: Tensor, expected: int, name: str) -> None:
    if x.dim() >= 2 and x.shape[1] != expected:
        raise NormError(
            f"{name}: expected {expected} channels (dim 1), got input of shape {tuple(x.shape)} with "
            f"{x.shape[1]} channels; the layer was built with num_features={expected}"
        )


class _NormBase(nn.Module):
    """Base of the layers with optional running statistics (BatchNorm*, InstanceNorm*).

    Parameter and buffer names, defaults and state_dict layout follow ``torch.nn``, so a
    torch checkpoint loads as is. Running statistics follow PyTorch's convention
    ``running = (1 - momentum) * running + momentum * batch`` (``momentum=None``: cumulative
    average). A batch with non-finite statistics never reaches the buffers; such skipped updates
    are counted in the non-persistent buffer ``num_skipped_updates``.
    """

    _version = 2
    # Which running-statistic keys a checkpoint may hold.
    _stat_keys = ("running_mean", "running_var", "num_batches_tracked")

    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool

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
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.num_features = check_positive_int(num_features, name, "num_features")
        self.eps = check_eps(eps, name)
        self.momentum = check_momentum(momentum, name)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        factory = {"device": device, "dtype": dtype}
        make_affine(self, (num_features,), self.affine, self.affine and bias, factory)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, device=device),
            )
            self.register_buffer(
                "num_skipped_updates", torch.tensor(0, dtype=torch.long, device=device), persistent=False
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
            self.register_buffer("num_skipped_updates", None, persistent=False)
        self.reset_parameters()

    # -- torch.nn API ------------------------------------------------------------------------
    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, counters 0."""
        if self.running_mean is not None:
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()
            self.num_skipped_updates.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics and the affine (weight 1, bias 0)."""
        self.reset_running_stats()
        reset_affine(self)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}"
        )

    # -- helpers for subclasses -------------------------------------------------------------
    @property
    def _tracking(self) -> bool:
        """Running statistics are both wanted *now* and present (the flag may be flipped after init)."""
        return self.track_running_stats and self.running_mean is not None

    def _store(self, out: NormOutput) -> Tensor:
        """Copy updated running statistics returned by a functional op into the buffers."""
        if out.running_mean is not None and out.running_mean is not self.running_mean:
            with torch.no_grad():
                self.running_mean.copy_(out.running_mean)
                self.running_var.copy_(out.running_var)
                if out.num_batches_tracked is not None and self.num_batches_tracked is not None:
                    # A step whose update was skipped did not advance the counter.
                    skipped = self.num_batches_tracked + 1 - out.num_batches_tracked
                    self.num_skipped_updates.add_(skipped)
                    self.num_batches_tracked.copy_(out.num_batches_tracked)
        return out.output

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if self.num_batches_tracked is not None and (version is None or version < 2) and key not in state_dict:
            # Checkpoints from before num_batches_tracked existed: keep the current counter
            # (a non-strict load of a partial dict must not reset it; pytorch#110361).
            state_dict[key] = self.num_batches_tracked.detach().clone()
        if self.running_mean is None:
            found = [prefix + k for k in self._stat_keys if prefix + k in state_dict]
            if found:
                # torch always passes strict=True here and applies strictness afterwards, so we
                # cannot raise only for strict loads: warn with the reason; a strict load then fails
                # on the unexpected keys, a non-strict one reports them.
                warnings.warn(
                    f"{type(self).__name__}: the state_dict has running statistics ({', '.join(found)}) but this "
                    "layer was built with track_running_stats=False, so they are not loaded; build it with "
                    "track_running_stats=True to load them",
                    UserWarning,
                    stacklevel=4,
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
