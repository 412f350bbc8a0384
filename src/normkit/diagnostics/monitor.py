"""Watch a model's norm layers at work: forward hooks (with their handles) and the train/eval gap of BN."""

from __future__ import annotations

import fnmatch
import inspect
import math
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .._errors import NormError
from ..nn import batch_norm_family as _fam
from ..nn._inspect import BN_KINDS, NormInfo, _own_forward, describe_norm
from ..nn.layer_norm import LayerNorm as _NkLayerNorm
from ..surgery._graph import check_model, compiled_inner
from .stats import (
    _channel_stats,
    batch_running_gap,
    dead_and_collapsed,
    ema_effective_batches,
    power_decomposition,
    values_per_statistic,
)

__all__ = ["NormMonitor", "TrainEvalGap", "train_eval_gap"]

Where = Callable[[str, nn.Module], bool] | str | re.Pattern | None


def _selector(where: Where, op: str) -> Callable[[str, nn.Module], bool]:
    if where is None:
        return lambda name, m: True
    if isinstance(where, str):
        return lambda name, m: fnmatch.fnmatchcase(name, where)
    if isinstance(where, re.Pattern):
        return lambda name, m: where.search(name) is not None
    if callable(where):
        return lambda name, m: bool(where(name, m))
    raise TypeError(
        f"{op}: where must be None, a callable (name, module) -> bool, a glob or a compiled regex, "
        f"got {type(where).__name__}"
    )


#: Kinds the monitor watches beyond :func:`~normkit.nn._inspect.describe_norm`'s (which serves the model
#: tools, whose norms are channels-first): the norms over the trailing ``normalized_shape`` dims, local
#: response normalization, and the BN variants that no other norm can replace.
WATCH_KINDS = ("ln_last", "rms", "lrn", "mean_bn", "keras_bn", "frozen_batch")


def _same_forward(module: nn.Module, *bases: type) -> bool:
    """Whether ``module`` computes what one of ``bases`` computes (it is one, or a subclass that keeps its
    forward)."""
    return any(isinstance(module, b) and not _own_forward(module, b) for b in bases)


def _watch_more(module: nn.Module) -> NormInfo | str | None:
    """A :class:`NormInfo` for the norm layers only the monitor watches (``WATCH_KINDS``), a reason string for
    one of them it cannot (a subclass with its own forward), else None."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        timm_ln = type(module).__module__.startswith("timm.") and type(module).__name__ == "LayerNorm"
        if not (timm_ln or _same_forward(module, _NkLayerNorm, nn.LayerNorm, nn.RMSNorm)):
            base = "RMSNorm" if isinstance(module, nn.RMSNorm) else "LayerNorm"
            return (
                f"it subclasses torch.nn.{base} with its own forward, so what it computes is unknown; "
                "exclude it with where="
            )
        shape = tuple(int(s) for s in module.normalized_shape)
        if not shape:
            return "its normalized_shape is empty, so it refuses every input (torch builds it all the same)"
        rms = isinstance(module, nn.RMSNorm)
        eps = module.eps if module.eps is not None else torch.finfo(torch.float32).eps
        return NormInfo(
            kind="rms" if rms else "ln_last",
            num_channels=shape[0],
            eps=float(eps),
            weight=module.weight,
            bias=None if rms else module.bias,
            extra={"normalized_shape": shape},
        )
    if isinstance(module, (nn.LocalResponseNorm, nn.CrossMapLRN2d)):
        if not _same_forward(module, nn.LocalResponseNorm, nn.CrossMapLRN2d):
            base = "LocalResponseNorm" if isinstance(module, nn.LocalResponseNorm) else "CrossMapLRN2d"
            return (
                f"it subclasses torch.nn.{base} with its own forward, so what it computes is unknown; "
                "exclude it with where="
            )
        return NormInfo(kind="lrn", num_channels=0, extra={"size": int(module.size)})
    if isinstance(module, _fam.MeanOnlyBatchNorm) and _same_forward(module, _fam.MeanOnlyBatchNorm):
        return NormInfo(  # a running mean, no running variance
            kind="mean_bn",
            num_channels=module.num_features,
            momentum=module.momentum,
            bias=module.bias,
            running_mean=module.running_mean,
            num_batches_tracked=module.num_batches_tracked,
            extra={"track_running_stats": module.track_running_stats},
        )
    if (
        isinstance(module, _fam._FrozenBatchNorm)
        and not module.use_running_stats
        and _same_forward(module, _fam._FrozenBatchNorm)
    ):
        return NormInfo(  # a frozen affine, always the batch's statistics; running ones kept (or updated)
            kind="frozen_batch",
            num_channels=module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            weight=module.weight,
            bias=module.bias,
            running_mean=module.running_mean,
            running_var=module.running_var,
            num_batches_tracked=module.num_batches_tracked,
        )
    if isinstance(module, _fam.BatchNormalization) and _same_forward(module, _fam.BatchNormalization):
        return NormInfo(  # momentum left out: Keras's weights the old value (see ``extra``)
            kind="keras_bn",
            num_channels=module.num_features,
            eps=module.epsilon,
            weight=module.gamma,
            bias=module.beta,
            running_mean=module.moving_mean,
            running_var=module.moving_variance,
            extra={"axis": module.axis, "keras_momentum": module.momentum},
        )
    return None


def _norm_layers(
    model: nn.Module, where: Where, op: str, unwatched: dict[str, str] | None = None
) -> dict[str, tuple[nn.Module, NormInfo]]:
    """The norm layers ``where`` selects, by path; with ``unwatched``, it gets the selected norm-like layers
    that are left out, with why (``"Class: reason"``)."""
    check_model(model, op, lazy="norms")
    selected = _selector(where, op)
    found: dict[str, tuple[nn.Module, NormInfo]] = {}
    inside: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        info = describe_norm(m)
        if not isinstance(info, NormInfo):
            more = _watch_more(m)
            info = more if more is not None else info
        if isinstance(info, NormInfo):
            inside.append(name)
            if selected(name, m):
                found[name or "<root>"] = (m, info)
        elif isinstance(info, str) and unwatched is not None and selected(name, m):
            unwatched[name or "<root>"] = f"{type(m).__name__}: {info}"
    return found


def _channel_dim(info: NormInfo, ndim: int) -> int | None:
    """The input's channel (feature) dim for ``info``'s kind, or None when a call of that rank has none.

    Channels-first norms: 1. LayerNorm / RMSNorm over the trailing ``normalized_shape`` (k dims): the
    first normalized dim, ``ndim - k`` (the features of ``(N, T, C)`` under ``LayerNorm(C)``, the
    channels of ``(N, C, H, W)`` under ``LayerNorm([C, H, W])``; 0 for an unbatched input). Keras's
    BatchNormalization: its ``axis`` (0 for a 1-d input: one unbatched sample).
    """
    if info.kind in ("ln_last", "rms"):
        k = len(info.extra["normalized_shape"])
        return ndim - k if ndim >= k else None
    if info.kind == "keras_bn":
        axis = int(info.extra["axis"])
        return axis % ndim if -ndim <= axis < ndim else None
    return 1 if ndim >= 2 else None


def _reset_compiled() -> None:
    """Drop torch.compile's cached code, so that the next call recompiles and sees (or stops seeing) the
    monitor's hooks: torch does not guard on module hooks (``skip_nnmodule_hook_guards``), so code
    compiled before the hooks were added would never call them."""
    import torch._dynamo

    torch._dynamo.reset()


def _eager(fn: Callable[..., None]) -> Callable[..., None]:
    """``fn`` run eagerly (one graph break) when called from compiled code, instead of traced into it.

    Only once dynamo is loaded (importing it just for this would cost an eager user seconds)."""
    if "torch._dynamo" in sys.modules:
        import torch._dynamo

        return torch._dynamo.disable(fn)  # type: ignore[no-any-return]
    return fn


def _first_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, Tensor)), None)
    return None


def _call_input(args: Any, kwargs: dict[str, Any]) -> Tensor | None:
    """The input tensor of a layer's call: the first positional tensor, else ``input=`` (torch.nn's
    name), else the first keyword tensor."""
    x = _first_tensor(args)
    if x is None:
        x = _first_tensor(kwargs.get("input", tuple(kwargs.values())))
    return x


def _mask_signature(module: nn.Module) -> inspect.Signature | None:
    """The signature of ``module``'s forward when it takes a ``mask`` (normkit's BN, IN, GN, LayerNorm:
    ``layer(x, mask)`` or ``layer(x, mask=mask)``), else None."""
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return None
    return sig if "mask" in sig.parameters else None


def _call_mask(sig: inspect.Signature | None, args: Any, kwargs: dict[str, Any]) -> Tensor | None:
    """The ``mask`` a call passed (positionally or by keyword), or None."""
    if sig is None:
        return None
    try:
        mask = sig.bind(*args, **kwargs).arguments.get("mask")
    except TypeError:
        mask = kwargs.get("mask")
    return mask if isinstance(mask, Tensor) else None


def _expand_mask(mask: Tensor | None, x: Tensor) -> Tensor | None:
    """``mask`` expanded to ``x``'s shape as the layer broadcast it (a leading batch dim of one that an
    unbatched input lacks is dropped), or None without a mask or when it does not fit ``x``."""
    if mask is None:
        return None
    while mask.dim() > x.dim() and mask.shape[0] == 1:
        mask = mask[0]
    try:
        return mask.to(device=x.device, dtype=torch.bool).expand(x.shape)
    except RuntimeError:
        return None


def _stat_counts(info: NormInfo, m: Tensor) -> Tensor | None:
    """How many valid values each statistic of ``info``'s kind pools over, for the expanded mask ``m`` of
    an ``(N, C, *spatial)`` view (None: a kind without pooled statistics, LRN)."""
    kind = info.kind
    nd = m.dim()
    if kind in ("ln_last", "rms"):  # the first normalized dim moved to 1, the others still last
        k = len(info.extra["normalized_shape"])
        return m.sum(dim=(1, *range(nd - k + 1, nd)))
    if kind == "lrn":
        return None
    if kind in (*BN_KINDS, "mean_bn", "keras_bn", "frozen_batch"):
        return m.sum(dim=(0, *range(2, nd)))
    if kind == "in":
        return m.reshape(m.shape[0], m.shape[1], -1).sum(dim=2)
    if kind == "ln2d":
        return m.sum(dim=1)
    if kind == "ln":
        return m.flatten(1).sum(dim=1)
    groups = info.groups or 1  # gn, pn: C / G channels of a sample and its positions
    return m.reshape(m.shape[0], groups, -1).sum(dim=2)


def _no_batch_dim(module: nn.Module) -> int | None:
    """The rank of an unbatched input of an instance norm (torch's ``_get_no_batch_dim``: 2 for
    ``InstanceNorm1d``), else None."""
    get = getattr(module, "_get_no_batch_dim", None)
    try:
        rank = get() if callable(get) else None
    except Exception:
        return None
    return rank if isinstance(rank, int) else None


def _uses(module: nn.Module, info: NormInfo) -> str:
    """Which statistics the layer normalizes with in its current mode: batch, running or per-sample."""
    if info.kind == "frozen_bn":
        return "running"
    if info.kind == "frozen_batch":
        return "batch"
    if info.kind == "mean_bn":
        tracking = info.running_mean is not None and info.extra["track_running_stats"]
        return "batch" if module.training or not tracking else "running"
    if info.kind == "keras_bn":  # Keras's rule: trainable=False runs in inference mode even in training
        return "batch" if module.training and getattr(module, "trainable", True) else "running"
    if info.kind in ("bn", "in"):
        tracking = info.has_running_stats and getattr(module, "track_running_stats", True)
        if module.training or not tracking:
            return "batch" if info.kind == "bn" else "sample"
        return "running"
    return "sample"


def _values_per_stat(info: NormInfo, uses: str, shape: tuple[int, ...]) -> int | None:
    """How many values each statistic pooled over, for an ``(N, C, *spatial)`` ``shape`` (None: running
    statistics)."""
    if uses == "running":
        return None
    if info.kind in ("ln_last", "rms"):
        return math.prod(info.extra["normalized_shape"])
    if info.kind == "lrn":  # the window of channels (zero-padded at the ends, still divided by its size)
        return int(info.extra["size"])
    if info.kind in ("mean_bn", "keras_bn", "frozen_batch"):
        return values_per_statistic("bn", shape)
    ghost = info.extra.get("ghost_batch_size") if uses == "batch" else None
    return values_per_statistic(info.kind, shape, info.groups, ghost)


@dataclass
class LayerRecord:
    """What a :class:`NormMonitor` saw of one layer: the last call in full, scalars of every call."""

    name: str
    cls: str
    kind: str
    calls: int = 0
    last: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


class NormMonitor:
    """Record what every norm layer of a model does, batch after batch (a context manager).

    It watches the norm layers of torch.nn, normkit.nn, timm and torchvision: BN and its variants
    (Sync, Ghost, Renorm, frozen, norm+act, mean-only, Keras's ``BatchNormalization``), GN, IN,
    Proxy Norm, the channels-first LayerNorms (``normkit.nn.LayerNorm2d``, ``LayerNormAct2d``), the
    norms over the trailing ``normalized_shape`` dims (``torch.nn.LayerNorm``, ``normkit.nn.LayerNorm``,
    ``torch.nn.RMSNorm``, one dim or several) and local response normalization. Each record's
    ``kind`` is :class:`~normkit.nn._inspect.NormInfo`'s, or ``ln_last`` / ``rms`` (over the trailing
    dims), ``lrn``, ``mean_bn``, ``keras_bn``, ``frozen_batch`` (a frozen BN with
    ``use_running_stats=False``). A norm layer it cannot watch (a subclass with its own ``forward``,
    whose computation is unknown; ``ProxyNormAct``, an activation that normalizes nothing itself; a
    timm norm+act layer with a drop layer before its activation ...) is never skipped silently: it is
    named, with why, in a ``UserWarning`` and in ``unwatched`` (``where=`` leaves it out). Weight
    normalizations (``weight_norm``, ``StdConv2d``, ``ScaledStdConv2d``) normalize weights, not
    activations, and are not norm layers here.

    On each forward of each watched layer it records, from the layer's input ``x`` and output ``y``
    (float64, no effect on the model):

    * ``uses``: which statistics normalized this batch: ``batch`` (BN in training), ``running``
      (BN in eval, frozen BN) or ``sample`` (GN, LN, IN, RMSNorm, LRN, Proxy Norm: per sample);
    * ``channel_dim``: the dim of ``x`` that holds the channels (features) the per-channel numbers
      below are about: 1 for channels-first layers; for a norm over the trailing ``normalized_shape``
      its first dim (``C`` of ``(N, T, C)`` under ``LayerNorm(C)``, of ``(N, C, H, W)`` under
      ``LayerNorm([C, H, W])``; an unbatched input counts as a batch of one, as for an instance norm's
      unbatched ``(C, *spatial)``, whose channel dim is then 0); Keras's BN: its ``axis``;
    * ``values_per_stat``: how many values each mean / variance pooled over (BN at batch 2 on a
      ``(2, C, 1, 1)`` head: 2; a LayerNorm: the product of its ``normalized_shape``; LRN: its window
      ``size``), and for running statistics ``ema_batches``, the effective number of batches the
      running averages hold (``(2 - m) / m`` in the long run);
    * for layers with running statistics, the **train/eval gap** on this batch:
      :func:`~normkit.diagnostics.stats.batch_running_gap` between the batch's statistics and
      the running ones as they were before the call (``gap``, ``mean_shift``, ``log_std_ratio``);
    * ``dead`` / ``collapsed``: output channels that are 0 everywhere, or constant;
    * ``power_in`` / ``power_out``: the power decomposition (docs/EXPERIMENTS.md, E4) of ``x`` and ``y``
      as fractions of the total, with the total (channels along ``channel_dim``, the dims other than
      the batch's as positions).

    A layer called with a ``mask`` (normkit's BN, SyncBN, IN, GN and LayerNorm take
    ``layer(x, mask)`` or ``layer(x, mask=mask)``: bool, broadcastable to ``x``, True = valid) is
    measured on the values it normalizes with: every number above is over the valid values only
    (the padding, whatever it holds, never enters one). ``values_per_stat`` is then the number of
    valid values of the statistic with fewest (the sets with none, which the layer leaves at its
    bias, left out; 0 when nothing is valid, which counts as a call with no statistics); the gap's
    batch statistics are each channel's over its valid values; ``dead`` / ``collapsed`` look at the
    valid outputs; the power decomposition takes each (sample, channel) over its valid positions and
    weights the samples by their number of valid values
    (:func:`~normkit.diagnostics.stats.power_decomposition`).

    ``drift()`` compares the running statistics now with those when the monitor started.
    ``table()`` prints one table (with rich when installed), ``to_dict()`` returns everything,
    ``plot(path)`` draws it (matplotlib). The hooks are removed on exit (or by ``detach()``), also
    when the block raises. An empty batch counts as a call with no statistics (``values_per_stat``
    0, no gap, no power); non-finite values give NaN (or inf) numbers, never a clean-looking 0.

    A ``torch.compile``'d model: pass what ``torch.compile`` returned. The layers get the eager
    model's names, and its compiled code is reset on entry and on exit (``torch._dynamo.reset()``),
    because torch does not recompile for hooks added later, so code compiled before would never call
    them; while the monitor is attached each hook runs eagerly (a graph break per norm layer).

    Args:
        model: the model (only hooks are added; nothing else changes).
        where: which norm layers: a callable ``(path, module) -> bool``, a glob or a compiled regex.
        power: compute the power decompositions (cheap; turn off for big activations).
        history: keep the scalars of every call (False: only the last call).

    Attributes:
        layers: the watched layers, by path: ``(module, NormInfo)``.
        unwatched: the norm layers ``where`` selects that it cannot watch, by path: ``"Class: why"``.
        records: what it saw, per watched layer.

    Raises:
        NormError: no norm layer to watch (the message names those it cannot watch).

    Warns:
        UserWarning: naming the norm layers it cannot watch, if any.

    Example:
        >>> import torch, normkit
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        >>> with normkit.NormMonitor(net) as monitor:
        ...     _ = net(torch.randn(2, 3, 6, 6))
        >>> rec = monitor.to_dict()["1"]
        >>> rec["calls"], rec["last"]["uses"], rec["last"]["values_per_stat"]
        (1, 'batch', 32)
        >>> len(monitor.handles)                                 # removed on exit
        0
        >>> tf = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16))
        >>> with normkit.NormMonitor(tf) as monitor:             # LayerNorm over the last dim
        ...     _ = tf(torch.randn(4, 10, 8))
        >>> last = monitor.to_dict()["1"]["last"]
        >>> monitor.records["1"].kind, last["uses"], last["values_per_stat"], last["channel_dim"]
        ('ln_last', 'sample', 16, 2)
        >>> bn = normkit.nn.BatchNorm1d(4)                     # padded sequences: 7 of 2 * 5 positions valid
        >>> mask = torch.tensor([[True] * 5, [True] * 2 + [False] * 3])[:, None, :]   # (N, 1, L)
        >>> with normkit.NormMonitor(bn) as monitor:
        ...     _ = bn(torch.randn(2, 4, 5), mask=mask)
        >>> monitor.to_dict()["<root>"]["last"]["values_per_stat"]
        7
    """

    def __init__(
        self, model: nn.Module, *, where: Where = None, power: bool = True, history: bool = True
    ) -> None:
        self.model = model
        inner = compiled_inner(model)
        self._compiled = inner is not None
        self.unwatched: dict[str, str] = {}
        self.layers = _norm_layers(
            inner if inner is not None else model, where, "NormMonitor", self.unwatched
        )
        left_out = "; ".join(f"'{n}' ({why})" for n, why in self.unwatched.items())
        if not self.layers:
            raise NormError(
                "NormMonitor: the model has no norm layer to watch"
                + (" matching where=" if where else "")
                + (f"; it cannot watch {left_out}" if left_out else "")
            )
        if left_out:
            warnings.warn(
                f"NormMonitor: not watching {len(self.unwatched)} norm layer(s): {left_out}",
                UserWarning,
                stacklevel=2,
            )
        self.power = bool(power)
        self.keep_history = bool(history)
        self.records: dict[str, LayerRecord] = {
            name: LayerRecord(name, type(m).__name__, info.kind) for name, (m, info) in self.layers.items()
        }
        self.handles: list[RemovableHandle] = []
        self._start: dict[str, tuple[Tensor, Tensor]] = {}
        self._before: dict[str, tuple[Tensor, Tensor] | None] = {}

    # --- hooks ---------------------------------------------------------------------------------

    def attach(self) -> Self:
        """Register the hooks (what ``with`` does on entry) and remember the running statistics now."""
        if self.handles:
            return self
        for name, (module, info) in self.layers.items():
            if info.has_running_stats:
                self._start[name] = (info.running_mean.detach().clone(), info.running_var.detach().clone())  # type: ignore[union-attr]
            self.handles.append(module.register_forward_pre_hook(self._pre_hook(name, info)))
            self.handles.append(
                module.register_forward_hook(self._hook(name, module, info), with_kwargs=True)
            )
        if self._compiled:
            _reset_compiled()
        return self

    def detach(self) -> None:
        """Remove every hook this monitor added."""
        had = bool(self.handles)
        for h in self.handles:
            h.remove()
        self.handles.clear()
        if had and self._compiled:
            _reset_compiled()

    def __enter__(self) -> Self:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def _pre_hook(self, name: str, info: NormInfo) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if info.has_running_stats:  # the statistics before this call updates them
                self._before[name] = (info.running_mean.detach().clone(), info.running_var.detach().clone())  # type: ignore[union-attr]

        return _eager(hook)

    def _hook(self, name: str, module: nn.Module, info: NormInfo) -> Callable[..., None]:
        sig = _mask_signature(module)

        def hook(mod: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
            x = _call_input(args, kwargs)  # (layer(input=x), as torch.nn names it, too)
            y = _first_tensor(output)
            cd = None if x is None or y is None else _channel_dim(info, x.dim())
            if x is not None and cd is not None and info.kind == "in" and x.dim() == _no_batch_dim(module):
                cd = 0  # an unbatched (C, *spatial) instance norm input, as the layer reads it
            if x is None or y is None or cd is None:
                self._before.pop(name, None)
                return
            with torch.no_grad():
                self._record(name, module, info, x, y, cd, _call_mask(sig, args, kwargs))

        return _eager(hook)

    def _record(
        self,
        name: str,
        module: nn.Module,
        info: NormInfo,
        x: Tensor,
        y: Tensor,
        cd: int,
        mask: Tensor | None = None,
    ) -> None:
        uses = _uses(module, info)
        shape = tuple(x.shape)
        rec: dict[str, Any] = {
            "mode": "train" if module.training else "eval",
            "uses": uses,
            "shape": shape,
            "channel_dim": cd,
        }
        m = _expand_mask(mask, x)
        if mask is not None and m is None:
            warnings.warn(
                f"NormMonitor: layer '{name}' was called with a mask of shape {tuple(mask.shape)} that "
                f"does not broadcast to its input {shape}; its statistics here include every position",
                UserWarning,
                stacklevel=2,
            )
        # (N, C, *spatial) views: the channel dim moved to 1; an unbatched input is a batch of one
        if cd == 0 and (x.dim() == 1 or info.kind in ("ln_last", "rms", "in")):
            x, y = x.unsqueeze(0), y.unsqueeze(0)
            m = None if m is None else m.unsqueeze(0)
        elif cd != 1:
            x, y = x.movedim(cd, 1), y.movedim(cd, 1)
            m = None if m is None else m.movedim(cd, 1)
        rec["values_per_stat"] = _values_per_stat(info, uses, tuple(x.shape))
        if m is not None and uses != "running":  # the valid values of the statistic with fewest
            counts = _stat_counts(info, m)
            if counts is not None:
                counts = counts[counts > 0]
                rec["values_per_stat"] = int(counts.min()) if counts.numel() else 0
        before = self._before.pop(name, None)
        if x.numel() == 0 or (m is not None and not bool(m.any())):
            # an empty batch (or nothing valid): counted, nothing to measure (no gap, no power)
            rec["dead"], rec["collapsed"] = [], []
            self._store(name, rec)
            return
        if info.kind == "mean_bn" and info.running_mean is not None:
            nbt = info.num_batches_tracked
            rec["ema_batches"] = ema_effective_batches(info.momentum, int(nbt) if nbt is not None else 0)
        if info.has_running_stats and before is not None:
            nbt = info.num_batches_tracked
            rec["ema_batches"] = (
                ema_effective_batches(info.momentum, int(nbt) if nbt is not None else 0)
                if info.kind == "bn"
                else None
            )
            if info.kind in (*BN_KINDS, "keras_bn", "frozen_batch"):
                rec.update(_gap(x, m, before[0], before[1], info.eps))
        dead, collapsed = dead_and_collapsed(y, mask=m)
        rec["dead"], rec["collapsed"] = dead, collapsed
        if self.power:
            for key, t in (("power_in", x), ("power_out", y)):
                d = power_decomposition(t, mask=m)
                rec[key] = {**d.fractions(), "total": d.total}
        self._store(name, rec)

    def _store(self, name: str, rec: dict[str, Any]) -> None:
        record = self.records[name]
        record.calls += 1
        record.last = rec
        if self.keep_history:
            record.history.append(
                {k: v for k, v in rec.items() if k not in ("dead", "collapsed")}
                | {"dead": len(rec["dead"]), "collapsed": len(rec["collapsed"])}
            )

    # --- results -------------------------------------------------------------------------------

    def drift(self) -> dict[str, dict[str, float]]:
        """How far each layer's running statistics moved since the monitor started, in the start's units.

        ``mean_shift``: RMS over channels of ``(mean_now - mean_start) / sqrt(var_start + eps)``;
        ``log_std_ratio``: RMS of ``log(std_now / std_start)``.
        """
        out: dict[str, dict[str, float]] = {}
        for name, (rm0, rv0) in self._start.items():
            _, info = self.layers[name]
            if info.running_mean is None or info.running_var is None:
                continue
            g = batch_running_gap(info.running_mean, info.running_var, rm0, rv0, info.eps)
            out[name] = {"mean_shift": g["mean_shift"], "log_std_ratio": g["log_std_ratio"]}
        return out

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Everything recorded, per layer: class, kind, number of calls, the last call, the history, the
        drift."""
        drift = self.drift()
        return {
            name: {
                "class": r.cls,
                "kind": r.kind,
                "calls": r.calls,
                "last": dict(r.last),
                "history": list(r.history),
                "drift": drift.get(name),
            }
            for name, r in self.records.items()
        }

    def _rows(self) -> tuple[list[str], list[list[str]]]:
        head = [
            "layer",
            "kind",
            "mode",
            "stats",
            "values/stat",
            "train/eval gap",
            "mean shift",
            "drift",
            "dead",
            "collapsed",
            "P_mean in",
            "P_mean out",
        ]
        drift = self.drift()
        rows = []
        for name, r in self.records.items():
            last = r.last
            if not last:
                rows.append([name, r.kind, "-", "not called"] + ["-"] * (len(head) - 4))
                continue
            vps = last.get("values_per_stat")
            if vps is None and last.get("ema_batches") is not None:
                vps_s = f"EMA ~{last['ema_batches']:.1f} batches"
            else:
                vps_s = "-" if vps is None else str(vps)
            channels = last["shape"][last["channel_dim"]]
            d = drift.get(name)
            rows.append(
                [
                    name,
                    r.kind,
                    last["mode"],
                    last["uses"],
                    vps_s,
                    _f(last.get("gap")),
                    _f(last.get("mean_shift")),
                    _f(d["mean_shift"]) if d else "-",
                    f"{len(last['dead'])}/{channels}",
                    f"{len(last['collapsed'])}/{channels}",
                    _f(last["power_in"]["P_mean"]) if "power_in" in last else "-",
                    _f(last["power_out"]["P_mean"]) if "power_out" in last else "-",
                ]
            )
        return head, rows

    def table(self, *, print_: bool = True) -> str:
        """One table of the last call of every layer; printed (rich when installed), and returned as text.

        Columns: the layer's kind, mode and the statistics it used, the values behind each
        statistic, the train/eval gap and mean shift of the batch against the running statistics
        (BN), the drift of the running statistics since the start, dead and collapsed channels of
        the output, and the P_mean power fraction before and after the norm.
        """
        head, rows = self._rows()
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:  # rich comes with normkit[lab]; plain text without it
            text = _plain_table(head, rows)
            if print_:
                print(text)
            return text
        table = Table(title="NormMonitor: the last batch each norm layer saw")
        for h in head:
            table.add_column(h, justify="left" if h in ("layer", "kind", "mode", "stats") else "right")
        for row in rows:
            table.add_row(*row)
        width = sum(max(len(h), *(len(r[i]) for r in rows)) + 3 for i, h in enumerate(head)) + 1
        console = Console(width=max(80, width), color_system=None, highlight=False)
        with console.capture() as captured:
            console.print(table)
        text = captured.get()
        if print_:
            print(text, end="")
        return text

    def plot(self, path: str | Path) -> Path:
        """Draw the train/eval gap, the dead/collapsed channels and the P_mean power fractions per layer
        (PNG).

        Needs matplotlib (``pip install 'normkit[lab]'``).
        """
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as exc:  # pragma: no cover - the lab extra installs it
            raise ImportError("NormMonitor.plot needs matplotlib: pip install 'normkit[lab]'") from exc
        names = [n for n, r in self.records.items() if r.last]
        if not names:
            raise NormError("NormMonitor.plot: no layer was called while the monitor was attached")
        last = [self.records[n].last for n in names]
        pos = list(range(len(names)))
        fig, axes = plt.subplots(3, 1, figsize=(max(6.0, 0.5 * len(names) + 2), 9), sharex=True)
        axes[0].bar(pos, [r.get("gap", 0.0) or 0.0 for r in last], color="tab:red")
        axes[0].set_ylabel("train/eval gap")
        width = 0.4
        channels = [max(1, r["shape"][r["channel_dim"]]) for r in last]
        axes[1].bar(
            [p - width / 2 for p in pos],
            [len(r["dead"]) / c for r, c in zip(last, channels)],
            width,
            label="dead",
        )
        axes[1].bar(
            [p + width / 2 for p in pos],
            [len(r["collapsed"]) / c for r, c in zip(last, channels)],
            width,
            label="collapsed",
        )
        axes[1].set_ylabel("fraction of channels")
        axes[1].legend()
        for offset, key in ((-width / 2, "power_in"), (width / 2, "power_out")):
            axes[2].bar(
                [p + offset for p in pos],
                [r[key]["P_mean"] if key in r else 0.0 for r in last],
                width,
                label=f"P_mean {'before' if key == 'power_in' else 'after'} the norm",
            )
        axes[2].set_ylabel("P_mean fraction")
        axes[2].legend()
        axes[2].set_xticks(pos)
        axes[2].set_xticklabels(names, rotation=60, ha="right", fontsize=8)
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out


def _gap(
    x: Tensor, mask: Tensor | None, running_mean: Tensor, running_var: Tensor, eps: float
) -> dict[str, float]:
    """:func:`~normkit.diagnostics.stats.batch_running_gap` of the batch's statistics of ``x``
    ``(N, C, *spatial)`` over its valid values (a channel without any is left out, as the layer keeps
    its running statistics)."""
    count, mean, var = _channel_stats(x, 1, mask)
    keep = count > 0
    return batch_running_gap(mean[keep], var[keep], running_mean[keep], running_var[keep], eps)


def _f(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    return f"{v:.3g}"


def _plain_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]
    )


# --- train/eval gap --------------------------------------------------------------------------------


@dataclass
class TrainEvalGap:
    """:func:`train_eval_gap`'s answer; relative differences ``||y_train - y_eval|| / ||y_eval||``.

    Attributes:
        layers: per BN layer, alone: its output on its (eval-mode) input with batch statistics
            against running statistics (with the mask the model passed it, over the valid positions).
        propagated: per BN layer, its output when *every* BN of the model uses batch statistics
            against all running (the differences of earlier layers included).
        output: the model's output, all BN layers in train mode against eval.
        stats: per BN layer, :func:`~normkit.diagnostics.stats.batch_running_gap` of its input.
    """

    layers: dict[str, float]
    propagated: dict[str, float]
    output: float
    stats: dict[str, dict[str, float]]

    def __str__(self) -> str:
        head = ["layer", "alone", "in the model", "mean shift", "log std ratio"]
        rows = [
            [
                n,
                _f(self.layers[n]),
                _f(self.propagated.get(n)),
                _f(self.stats[n]["mean_shift"]),
                _f(self.stats[n]["log_std_ratio"]),
            ]
            for n in self.layers
        ]
        rows.append(["<model output>", "", _f(self.output), "", ""])
        return "train/eval gap (relative output difference, batch vs running statistics)\n" + _plain_table(
            head, rows
        )


def _rel(a: Tensor, b: Tensor, mask: Tensor | None = None) -> float:
    """``||a - b|| / ||b||`` in float64, over the positions ``mask`` keeps (all without one)."""
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    m = _expand_mask(mask, a64) if a64.shape == b64.shape else None
    if m is not None:  # padded positions output the bias in both modes: left out, as from the statistics
        a64, b64 = a64[m], b64[m]
    den = b64.norm()
    num = (a64 - b64).norm()
    if not (torch.isfinite(num) and torch.isfinite(den)):
        return math.nan  # non-finite outputs: reported as such, not as an infinite (or zero) gap
    return float(num / den) if den > 0 else (0.0 if num == 0 else float("inf"))


def _describe_batch(args: tuple[Any, ...]) -> str:
    """``the batch of shape (2, 3, 8, 8)``, or the shapes (types) of several inputs."""
    parts = [str(tuple(a.shape)) if isinstance(a, Tensor) else type(a).__name__ for a in args]
    if len(args) == 1 and isinstance(args[0], Tensor):
        return f"the batch of shape {parts[0]}"
    return f"the batch ({', '.join(parts)})"


def _failing_layer(model: nn.Module, args: tuple[Any, ...]) -> str:
    """`` in layer 'conv1' (Conv2d)``: the innermost module running when ``model(*args)`` fails, found by
    running it again with hooks on every module (no grad; the caller restores the buffers), or ""."""
    stack: list[str] = []
    handles: list[RemovableHandle] = []

    def push(name: str) -> Callable[..., None]:
        return lambda mod, a: stack.append(name)

    def pop(mod: nn.Module, a: Any, out: Any) -> None:
        if stack:
            stack.pop()

    modules = dict(model.named_modules())
    try:
        for name, mod in modules.items():
            if name:
                handles.append(mod.register_forward_pre_hook(push(name)))
                handles.append(mod.register_forward_hook(pop))
        with torch.no_grad():
            model(*args)
    except Exception:
        if stack:
            return f" in layer '{stack[-1]}' ({type(modules[stack[-1]]).__name__})"
    finally:
        for h in handles:
            h.remove()
    return ""


def train_eval_gap(model: nn.Module, batch: Any, *, where: Where = None) -> TrainEvalGap:
    """How much each BN layer's output differs between batch (train-mode) and running (eval-mode) statistics
    on ``batch``.

    A model whose BN layers saw small or unrepresentative batches in training has running
    statistics that disagree with any one batch; this measures by how much, layer by layer,
    and how it adds up at the output. Only the BN layers switch mode (dropout and the rest stay
    in eval). The model is left exactly as it was: running statistics, counters and every
    module's train/eval flag are restored, and no gradient is recorded. A ``torch.compile``'d model
    runs compiled, with the eager model's layer names (its compiled code is reset before and after).

    A BN layer the model calls with a ``mask`` (normkit's ``layer(x, mask)``, True = valid) is run
    alone with that mask, its statistics are over the valid values, and its output differences
    compare the valid positions only (padded positions output the bias in both modes), as the layer
    itself normalizes them.

    Args:
        model: the model.
        batch: a tensor, or a tuple of positional inputs.
        where: which BN layers (as :class:`NormMonitor`'s ``where``).

    Returns:
        :class:`TrainEvalGap` (``print()`` it for a table).

    Raises:
        NormError: no BN layer with running statistics, or the model fails on ``batch`` (the message
            names the batch's shape, the failing layer and the underlying error).

    Example:
        >>> import torch, normkit
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
        >>> gap = normkit.train_eval_gap(net, torch.randn(16, 4) + 3.0)   # running stats still at (0, 1)
        >>> gap.layers["1"] > 0.5, net.training, int(net[1].num_batches_tracked)
        (True, True, 0)
    """
    inner = compiled_inner(model)
    eager_model = inner if inner is not None else model
    bns = {
        n: (m, i)
        for n, (m, i) in _norm_layers(eager_model, where, "train_eval_gap").items()
        if i.kind == "bn" and i.has_running_stats and getattr(m, "track_running_stats", True)
    }
    if not bns:
        raise NormError(
            "train_eval_gap: the model has no BN layer with running statistics"
            + (" matching where=" if where else "")
        )
    args = batch if isinstance(batch, tuple) else (batch,)
    flags = {m: m.training for m in model.modules()}
    saved = {k: v.detach().clone() for k, v in model.named_buffers()}
    buffers = dict(model.named_buffers())
    sigs = {n: _mask_signature(m) for n, (m, _) in bns.items()}
    calls: dict[str, tuple[Tensor, tuple[Any, ...], dict[str, Any]]] = {}
    masks: dict[str, Tensor | None] = {}
    eval_out: dict[str, Tensor] = {}
    train_out: dict[str, Tensor] = {}
    handles: list[RemovableHandle] = []

    def capture(name: str, store: dict[str, Tensor], keep_input: bool) -> Callable[..., None]:
        def hook(mod: nn.Module, a: Any, kw: dict[str, Any], out: Any) -> None:
            x, y = _call_input(a, kw), _first_tensor(out)
            if keep_input and x is not None:  # the call itself (input, mask), to run the layer alone
                calls[name] = (x, tuple(a), dict(kw))
                masks[name] = _call_mask(sigs[name], a, kw)
            if y is not None:
                store[name] = y.detach()

        return hook

    def run(mode: str) -> Any:
        try:
            return model(*args)
        except Exception as exc:
            where_ = _failing_layer(eager_model, args)
            raise NormError(
                f"train_eval_gap: the model failed on {_describe_batch(args)}{mode}{where_}: "
                f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}; "
                "pass a batch the model accepts"
            ) from exc

    try:
        with torch.no_grad():
            model.eval()
            handles = [
                m.register_forward_hook(capture(n, eval_out, True), with_kwargs=True)
                for n, (m, _) in bns.items()
            ]
            if inner is not None:  # code compiled before the hooks would not call them (see NormMonitor)
                _reset_compiled()
            y_eval = run(" in eval mode")
            for h in handles:
                h.remove()
            for m, _ in bns.values():
                m.train()
            handles = [
                m.register_forward_hook(capture(n, train_out, False), with_kwargs=True)
                for n, (m, _) in bns.items()
            ]
            y_train = run(" with its BN layers in train mode")
            for h in handles:
                h.remove()
            handles = []
            _restore(buffers, saved)
            layers: dict[str, float] = {}
            stats: dict[str, dict[str, float]] = {}
            for name, (m, info) in bns.items():
                if name not in calls:
                    continue
                x, a, kw = calls[name]
                m.train()
                y_b = _first_tensor(m(*a, **kw))  # the same call, mask and all
                _restore(buffers, saved)
                mask = masks[name]
                layers[name] = _rel(y_b, eval_out[name], mask) if y_b is not None else math.nan
                xm = _expand_mask(mask, x)
                stats[name] = _gap(x, xm, info.running_mean, info.running_var, info.eps)  # type: ignore[arg-type]
            propagated = {n: _rel(train_out[n], eval_out[n], masks.get(n)) for n in layers if n in train_out}
            from torch.utils._pytree import tree_leaves

            outs = [
                (a, b) for a, b in zip(tree_leaves(y_train), tree_leaves(y_eval)) if isinstance(a, Tensor)
            ]
            output = max((_rel(a, b) for a, b in outs), default=0.0)
    finally:
        for h in handles:
            h.remove()
        _restore(buffers, saved)
        for m, flag in flags.items():
            m.training = flag
        if inner is not None:
            _reset_compiled()
    return TrainEvalGap(layers, propagated, output, stats)


@torch.no_grad()
def _restore(buffers: dict[str, Tensor], saved: dict[str, Tensor]) -> None:
    for k, v in saved.items():
        buffers[k].copy_(v)
