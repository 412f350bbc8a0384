"""Convert batch-norm layers between Keras's and PyTorch's conventions, without changing what they compute.

The two frameworks store the same layer differently:

===============  ===========================================  =============================================
                 PyTorch (``BatchNorm*d``)                    Keras (``BatchNormalization``)
===============  ===========================================  =============================================
names            ``weight, bias, running_mean, running_var``  ``gamma, beta, moving_mean, moving_variance``
momentum         weight of the *new* batch (0.1)              weight of the *old* value (0.99)
stored variance  unbiased (``* m / (m - 1)``)                 biased (Keras 3, tf.keras 2 non-fused);
                                                              unbiased (tf.keras 2's fused path)
eps              1e-5                                         1e-3
channel axis     1                                            -1
===============  ===========================================  =============================================

``momentum`` converts as ``1 - m``, computed in decimal on the shortest representation of the
float, so ``0.1 <-> 0.9`` and ``0.01 <-> 0.99`` round-trip exactly. The variance has two honest
conversions, chosen with ``count``:

* ``count=None`` (default): copy the stored variance. Inference is then *identical* in both
  frameworks, and the converted PyTorch layer keeps Keras's biased running-variance update
  (``unbiased_running_var=False``), so continued training matches too.
* ``count=m`` (the per-channel count of the batches the statistics came from, ``N*H*W``): apply
  Bessel's factor ``m / (m - 1)`` (Keras -> PyTorch) or its inverse, giving each framework's
  own convention, as if the layer had been trained there.

**tf.keras 2's fused path.** tf.keras 2 (TensorFlow 2.x's ``tf.keras``) runs ``BatchNormalization``
on ``tf.nn.fused_batch_norm`` whenever it can (4-D or 5-D input, the channel axis first or last, no
``virtual_batch_size``, ``renorm`` or ``adjustment``: the usual ``Conv2D`` + BN), and that op
averages the *unbiased* batch variance into ``moving_variance`` (tensorflow#55545); its non-fused
path and Keras 3 average the biased one. :func:`from_keras_bn` reads ``layer.fused`` from a tf.keras
2 layer (``"fused"`` in a mapping) and gives such a layer PyTorch's own unbiased update, the
variance copied as it is (``variance="unbiased"``, or ``"biased"``, overrides what it reads).
normkit's :class:`~normkit.nn.BatchNormalization` is Keras 3's layer (biased update); inference is
the same either way.

**tf.keras 2's ``virtual_batch_size`` and ``renorm``** have no exact counterpart, and
:func:`from_keras_bn` refuses a layer that uses them, naming the option:

* ``virtual_batch_size=v`` is Ghost Batch Normalization
  (:class:`~normkit.nn.GhostBatchNorm2d` with ``ghost_batch_size=v``, ``momentum_mode="averaged"``,
  ``unbiased_running_var=False``), but tf.keras 2 forms its ghost batches from *strided* samples
  (sample ``n`` of a batch of ``N`` is in ghost batch ``n % (N / v)``) where normkit's are
  contiguous chunks: reorder the batch as ``x[order]`` with ``order = arange(N).view(v, N //
  v).t().reshape(-1)`` and the output back as ``y[order.argsort()]`` to get tf.keras's numbers;
* ``renorm=True`` is Batch Renormalization (:class:`~normkit.nn.BatchRenorm2d`), but tf.keras 2
  corrects towards separate ``renorm_mean`` / ``renorm_stddev`` averages with its own
  ``renorm_momentum``, and clips only what ``renorm_clipping`` names (``rmin`` free of ``rmax``):
  start a BatchRenorm2d from the layer's moving statistics (:func:`from_keras_bn` on a mapping of
  them) and expect training to differ.

**A Keras model's config** (``model.to_json()``, or a layer's ``get_config()``) builds normkit's
Keras-convention layer with :meth:`normkit.nn.BatchNormalization.from_config` (pass the feature
count, which Keras learns from the first input); the weights then load with ``set_weights``.
Regularizers and constraints act in Keras's training loop, not in the layer: both functions warn
for them (in PyTorch they are weight decay through a param group, and a projection after each
``optimizer.step()``).

**Keras's other normalization layers** need no conversion, only the channels-first view
(``x.permute(0, 3, 1, 2)`` of an NHWC tensor) and Keras's ``epsilon=1e-3`` (PyTorch's default is
1e-5); their weights load as they are (``gamma`` -> ``weight``, ``beta`` -> ``bias``):

=============================================  ==============================================================
Keras                                          normkit / torch.nn
=============================================  ==============================================================
``LayerNormalization()`` (axis -1)             ``LayerNorm(C, eps=1e-3)`` on the NHWC tensor itself, or
                                               ``LayerNorm2d(C, eps=1e-3)`` on the NCHW view
``LayerNormalization(axis=[1, 2, 3])``         ``LayerNorm((H, W, C), eps=1e-3)`` on NHWC, or
                                               ``LayerNorm2d(C, over="chw", eps=1e-3)`` on NCHW (an affine
                                               per channel: Keras's is per element unless the weights agree)
``GroupNormalization(groups=G)`` (Keras 3)     ``GroupNorm(G, C, eps=1e-3)`` on the NCHW view
``GroupNormalization(groups=-1)``              ``InstanceNorm2d(C, affine=True, eps=1e-3)`` or
                                               ``GroupNorm(C, C, eps=1e-3)`` on the NCHW view
=============================================  ==============================================================

What Keras's layer has no field for is not carried: ``num_batches_tracked`` (a layer from Keras
starts at 0, which matters only with ``momentum=None``) and PyTorch's variance convention itself,
so a PyTorch -> Keras -> PyTorch round trip with ``count=None`` gives a layer with the same
weights, statistics and eval output that updates its running variance as Keras does
(``unbiased_running_var=False``); set ``unbiased_running_var = True`` on it to get PyTorch's update
back.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from ._errors import NormError
from .functional._checks import as_real
from .nn.batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .nn.batch_norm_family import (
    BatchNormalization,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    _FrozenBatchNorm,
    warn_keras_training_options,
)

__all__ = ["from_keras_bn", "keras_to_torch_momentum", "to_keras_bn", "torch_to_keras_momentum"]

_BN = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}
_FROZEN = {1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d}


def _one_minus(value: float, op: str) -> float:
    value = as_real(value, op, "momentum")  # (a numpy scalar or a 0-d tensor too)
    if not 0.0 <= value <= 1.0:
        raise NormError(f"{op}: momentum must be a number in [0, 1], got {value!r}")
    # Decimal arithmetic on the shortest repr: 1 - 0.1 is 0.9 exactly, and back.
    return float(Decimal(1) - Decimal(repr(float(value))))


def torch_to_keras_momentum(momentum: float) -> float:
    """PyTorch momentum (weight of the new batch) to Keras momentum (weight of the old value).

    Example:
        >>> torch_to_keras_momentum(0.1), keras_to_torch_momentum(torch_to_keras_momentum(0.1))
        (0.9, 0.1)
    """
    return _one_minus(momentum, "torch_to_keras_momentum")


def keras_to_torch_momentum(momentum: float) -> float:
    """Keras momentum to PyTorch momentum: ``1 - momentum``, exact for decimal inputs.

    Example:
        >>> keras_to_torch_momentum(0.99)
        0.01
    """
    return _one_minus(momentum, "keras_to_torch_momentum")


def _check_count(count: int | None, op: str) -> None:
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 2):
        raise NormError(
            f"{op}: count must be None or an int >= 2 (values per channel in a batch), got {count!r}"
        )


def _refuse_keras_options(cfg: Mapping[str, Any], layer: Any) -> None:
    """tf.keras 2's options that change what the layer computes and that a BatchNorm cannot carry."""
    op = "from_keras_bn"
    vbs = cfg.get("virtual_batch_size", getattr(layer, "virtual_batch_size", None))
    if vbs is not None:
        raise NormError(
            f"{op}: the layer has virtual_batch_size={vbs!r} (Ghost Batch Normalization), which a BatchNorm "
            "would drop; tf.keras 2 forms its ghost batches from strided samples, normkit's GhostBatchNorm2d "
            "from contiguous chunks, so build one by hand and reorder the batch (normkit.convert's module "
            "docs show how)"
        )
    if cfg.get("renorm", getattr(layer, "renorm", False)):
        raise NormError(
            f"{op}: the layer has renorm=True (Batch Renormalization), which a BatchNorm would drop; "
            "tf.keras 2's renorm keeps its own renorm_mean / renorm_stddev averages, which normkit's "
            "BatchRenorm2d does not, so convert a mapping of its moving statistics into a BatchRenorm2d by "
            "hand (normkit.convert's module docs say what differs)"
        )
    if getattr(layer, "adjustment", None) is not None:
        raise NormError(
            f"{op}: the layer has an adjustment callable, which scales and shifts the normalized output "
            "in training and has no PyTorch counterpart"
        )


def _keras_source(layer: Any) -> dict[str, Any]:
    """gamma/beta/moving stats (tensors or None) and momentum/epsilon/trainable from any Keras-like source."""
    if isinstance(layer, BatchNormalization):
        return {
            "gamma": layer.gamma,
            "beta": layer.beta,
            "moving_mean": layer.moving_mean,
            "moving_variance": layer.moving_variance,
            "momentum": layer.momentum,
            "epsilon": layer.epsilon,
            "trainable": layer.trainable,
            "fused": False,
        }
    if hasattr(layer, "get_weights") and hasattr(layer, "get_config"):  # a real Keras layer
        cfg = layer.get_config()
        _refuse_keras_options(cfg, layer)
        warn_keras_training_options(cfg, "from_keras_bn", stacklevel=4)
        weights = [torch.as_tensor(w) for w in layer.get_weights()]
        names = [n for n, on in (("gamma", cfg.get("scale", True)), ("beta", cfg.get("center", True))) if on]
        names += ["moving_mean", "moving_variance"]
        if len(weights) != len(names):
            raise NormError(
                f"from_keras_bn: expected weights {names} from the layer, got {len(weights)} arrays"
            )
        src: dict[str, Any] = {"gamma": None, "beta": None, **dict(zip(names, weights))}
        src.update(
            momentum=cfg.get("momentum", 0.99),
            epsilon=cfg.get("epsilon", 1e-3),
            trainable=cfg.get("trainable", True),
            # tf.keras 2 resolves `fused` at construction; Keras 3 has no such attribute
            fused=getattr(layer, "fused", None) is True or cfg.get("fused") is True,
        )
        return src
    if isinstance(layer, Mapping):
        _refuse_keras_options(layer, None)
        warn_keras_training_options(layer, "from_keras_bn", stacklevel=4)
        missing = [k for k in ("moving_mean", "moving_variance") if k not in layer]
        if missing:
            raise NormError(f"from_keras_bn: the mapping lacks {missing}; it has {sorted(layer)}")
        src = {
            k: (None if layer.get(k) is None else torch.as_tensor(layer[k]))
            for k in ("gamma", "beta", "moving_mean", "moving_variance")
        }
        src.update(
            momentum=layer.get("momentum", 0.99),
            epsilon=layer.get("epsilon", 1e-3),
            trainable=layer.get("trainable", True),
            fused=layer.get("fused") is True,
        )
        return src
    raise TypeError(
        "from_keras_bn: expected a normkit.nn.BatchNormalization, a Keras layer (get_weights/get_config) "
        f"or a mapping of Keras weight names, got {type(layer).__name__}"
    )


@torch.no_grad()
def from_keras_bn(
    layer: Any,
    *,
    dim: int = 2,
    count: int | None = None,
    variance: Literal["biased", "unbiased"] | None = None,
) -> nn.Module:
    """A PyTorch-convention BN layer (channels first) with the weights and statistics of a Keras BN layer.

    Args:
        layer: a :class:`normkit.nn.BatchNormalization`, a Keras ``BatchNormalization`` layer (read
            through ``get_weights()`` / ``get_config()``), or a mapping with ``moving_mean``,
            ``moving_variance`` and optionally ``gamma``, ``beta``, ``momentum``, ``epsilon``,
            ``trainable``.
        dim: the spatial rank: 1, 2 or 3 for ``BatchNorm1d/2d/3d``.
        count: ``None`` to copy the variance (identical inference, Keras's biased update kept), or
            the per-channel batch count ``m`` to convert it to PyTorch's unbiased convention.
        variance: which batch variance the layer's ``moving_variance`` averages: ``"biased"`` (Keras
            3, tf.keras 2's non-fused path) or ``"unbiased"`` (tf.keras 2's fused path: the variance
            is copied and the result keeps PyTorch's unbiased update, so ``count`` must be None).
            ``None`` (default): ``"unbiased"`` for a tf.keras 2 layer whose ``fused`` is True (or a
            mapping with ``"fused": True``), ``"biased"`` otherwise.

    Returns:
        :class:`normkit.nn.BatchNorm{dim}d` (``eps = epsilon``, ``momentum = 1 - keras_momentum``), or
        :class:`normkit.nn.FrozenBatchNorm{dim}d` for a ``trainable=False`` layer (Keras runs those in
        inference mode). ``scale=False`` / ``center=False`` give ``weight`` / ``bias`` ``None``. Feed
        it ``x.permute(0, 3, 1, 2)`` for a channels-last Keras input (a view, no copy).

    Raises:
        NormError: a tf.keras 2 layer with ``virtual_batch_size``, ``renorm=True`` or an
            ``adjustment`` (no BatchNorm computes those; the module docs say what to build instead),
            ``count`` with an unbiased ``variance``, mismatched weight sizes, a bad ``dim``.

    Example:
        >>> import torch, normkit
        >>> keras_bn = normkit.nn.BatchNormalization(3)
        >>> x = torch.randn(8, 5, 5, 3)
        >>> _ = keras_bn(x)
        >>> bn = normkit.convert.from_keras_bn(keras_bn)
        >>> bn.momentum, bn.eps
        (0.01, 0.001)
        >>> y = bn.eval()(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        >>> torch.allclose(y, keras_bn.eval()(x), atol=1e-6)
        True
    """
    op = "from_keras_bn"
    if isinstance(dim, bool) or not isinstance(dim, int) or dim not in _BN:
        raise NormError(f"{op}: dim must be 1, 2 or 3 (BatchNorm1d/2d/3d), got {dim!r}")
    _check_count(count, op)
    if variance not in (None, "biased", "unbiased"):
        raise NormError(f"{op}: variance must be None, 'biased' or 'unbiased', got {variance!r}")
    src = _keras_source(layer)
    unbiased_source = variance == "unbiased" or (variance is None and src["fused"])
    if unbiased_source and count is not None:
        raise NormError(
            f"{op}: the layer's moving_variance already averages the unbiased batch variance"
            + (" (tf.keras 2's fused path)" if variance is None else "")
            + f", so count={count} would apply Bessel's factor twice; pass count=None"
        )
    mean, var = src["moving_mean"], src["moving_variance"]
    C = mean.numel()
    for k in ("gamma", "beta", "moving_variance"):
        if src[k] is not None and src[k].numel() != C:
            raise NormError(f"{op}: {k} has {src[k].numel()} values but moving_mean has {C}")
    momentum = keras_to_torch_momentum(src["momentum"])
    gamma, beta = src["gamma"], src["beta"]
    affine = gamma is not None or beta is not None
    kwargs: dict[str, Any] = dict(
        eps=float(src["epsilon"]),
        momentum=momentum,
        affine=affine,
        device=mean.device,
        dtype=mean.dtype if mean.is_floating_point() else None,
    )
    kwargs.update(bias=beta is not None, unbiased_running_var=count is not None or unbiased_source)
    frozen = not src["trainable"]
    out = _FROZEN[dim](C, **kwargs) if frozen else _BN[dim](C, **kwargs)
    if affine and gamma is None:  # Keras scale=False, center=True: no weight
        if frozen:
            out.weight = None
        else:
            out.register_parameter("weight", None)
    running_mean, running_var = out.running_mean, out.running_var
    assert running_mean is not None and running_var is not None  # built with track_running_stats=True
    if gamma is not None:
        assert out.weight is not None  # affine
        out.weight.copy_(gamma.reshape(C))
    if beta is not None:
        assert out.bias is not None  # affine, with bias
        out.bias.copy_(beta.reshape(C))
    running_mean.copy_(mean.reshape(C))
    v = var.reshape(C)
    if count is not None:  # biased -> unbiased, in float64 then rounded once
        v = (v.to(torch.float64) * (count / (count - 1))).to(running_var.dtype)
    running_var.copy_(v)
    return out


def _refuse_activation(bn: nn.Module, op: str) -> None:
    """A norm+activation layer (normkit's or timm's ``BatchNormAct2d``) would lose its activation."""
    act = bn._modules.get("act") if isinstance(bn, nn.Module) else None
    if act is None or isinstance(act, nn.Identity):
        act = getattr(bn, "activation", None)
    if act is None or isinstance(act, nn.Identity) or act == "identity":
        return
    name = act if isinstance(act, str) else getattr(act, "__name__", type(act).__name__)
    raise NormError(
        f"{op}: {type(bn).__name__} applies the activation {name} after the norm, and Keras's "
        "BatchNormalization has none, so converting it would drop it; convert a plain BatchNorm with the "
        "same state_dict and add the activation as its own Keras layer"
    )


@torch.no_grad()
def to_keras_bn(bn: nn.Module, *, axis: int = -1, count: int | None = None) -> BatchNormalization:
    """A Keras-convention :class:`normkit.nn.BatchNormalization` with a PyTorch BN's weights and statistics.

    Accepts ``torch.nn.BatchNorm1d/2d/3d`` and normkit's BN-family layers (BatchNorm, Ghost BN,
    Batch Renorm, FrozenBatchNorm: frozen layers become ``trainable=False``). The result's
    :meth:`~normkit.nn.BatchNormalization.get_weights` / ``get_config`` feed a real Keras layer.

    Args:
        bn: the PyTorch-convention layer (with running statistics).
        axis: the feature axis of the Keras layer's input (-1: channels last).
        count: ``None`` to copy the variance (identical inference), or the per-channel batch count
            ``m`` to turn an unbiased running variance into Keras's biased one (``* (m - 1) / m``).
            A layer that already stores biased variances (``unbiased_running_var=False``) is copied.

    Example:
        >>> import torch, normkit
        >>> bn = torch.nn.BatchNorm2d(3)
        >>> _ = bn(torch.randn(8, 3, 4, 4) * 2 + 1)
        >>> k = normkit.convert.to_keras_bn(bn)
        >>> k.momentum, k.epsilon
        (0.9, 1e-05)
        >>> [w.shape for w in k.get_weights()]
        [(3,), (3,), (3,), (3,)]
    """
    op = "to_keras_bn"
    _check_count(count, op)
    if isinstance(bn, BatchNormalization):
        raise TypeError(
            f"{op}: expected a PyTorch-convention batch-norm layer, got a BatchNormalization, which already "
            "has Keras's conventions (copy.deepcopy it for a copy; from_keras_bn converts it to PyTorch's)"
        )
    if isinstance(bn, nn.modules.instancenorm._InstanceNorm):
        # (its running statistics make eval look like BN, but training normalizes per sample)
        raise TypeError(
            f"{op}: expected a batch-norm layer, got {type(bn).__name__}, which normalizes each sample on "
            "its own in training; Keras's BatchNormalization cannot express that"
        )
    _refuse_activation(bn, op)
    rm, rv = getattr(bn, "running_mean", None), getattr(bn, "running_var", None)
    if not isinstance(rm, Tensor) or not isinstance(rv, Tensor):
        raise NormError(
            f"{op}: expected a BatchNorm layer with running statistics, got {type(bn).__name__} without "
            "running_mean/running_var (track_running_stats=False has nothing to convert)"
        )
    # torchvision's FrozenBatchNorm2d (buffers only, no momentum) converts like normkit's frozen BN
    frozen = isinstance(bn, _FrozenBatchNorm) or type(bn).__name__.startswith("FrozenBatchNorm")
    # a layer with running statistics: BN's momentum and eps
    momentum = cast("float | None", bn.momentum if hasattr(bn, "momentum") or not frozen else 0.01)
    eps = cast(float, bn.eps)
    if momentum is None:
        raise NormError(
            f"{op}: momentum=None (cumulative average) has no Keras equivalent; set a momentum first"
        )
    weight, bias = getattr(bn, "weight", None), getattr(bn, "bias", None)
    C = rm.numel()
    trainable = not frozen
    out = BatchNormalization(
        C,
        axis=axis,
        momentum=torch_to_keras_momentum(momentum),
        epsilon=float(eps),
        center=bias is not None,
        scale=weight is not None,
        trainable=trainable,
        device=rm.device,
        dtype=rm.dtype,
    )
    if weight is not None:
        assert out.gamma is not None  # scale=True
        out.gamma.copy_(weight)
    if bias is not None:
        assert out.beta is not None  # center=True
        out.beta.copy_(bias)
    out.moving_mean.copy_(rm)
    v = rv
    if count is not None and getattr(bn, "unbiased_running_var", True):  # unbiased -> biased
        v = (rv.to(torch.float64) * ((count - 1) / count)).to(rv.dtype)
    out.moving_variance.copy_(v)
    return out
