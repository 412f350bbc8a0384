"""Shared plumbing for the running-statistics norms: parameters, buffers, versioned loading, repr."""

from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch._C._functorch import get_unwrapped, is_batchedtensor, is_functorch_wrapped_tensor
from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

from .._errors import NormError
from ..functional._checks import _layout_message, check_eps, check_momentum, check_positive_int
from ..functional._running import NormOutput
from ..ops.library import exporting

__all__ = ["_NormBase", "_StatsMixin", "buffer_writes", "store_stats"]


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


def torch_norm_init(init: Any, module: nn.Module, *args: Any, bias: bool, **kwargs: Any) -> None:
    """``init(*args, bias=bias, **kwargs)``: a torch.nn norm's ``__init__`` (``super().__init__``) on
    any torch.

    torch's BatchNorm, InstanceNorm and GroupNorm take ``bias`` from torch 2.12; before, the affine
    always had both parameters. There ``init`` makes them and ``bias=False`` then drops the bias as
    torch >= 2.12 leaves it: a ``None`` parameter, no ``bias`` key in the state_dict.

    Example:
        >>> gn = torch.nn.GroupNorm.__new__(torch.nn.GroupNorm)
        >>> torch_norm_init(torch.nn.GroupNorm.__init__.__get__(gn), gn, 2, 4, bias=False)
        >>> gn.bias is None, list(gn.state_dict())
        (True, ['weight'])
    """
    if _takes_bias(init):
        init(*args, bias=bias, **kwargs)
        return
    init(*args, **kwargs)
    if not bias:
        module.register_parameter("bias", None)


_FORWARD_HOOKS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def forward_hook_count(module: nn.Module) -> int:
    """How many forward hooks and pre-hooks ``module`` holds (its own, not the global ones)."""
    return len(module._forward_pre_hooks) + len(module._forward_hooks)


def move_forward_hooks(src: nn.Module, dst: nn.Module) -> int:
    """Give ``dst`` the forward hooks and pre-hooks of ``src`` (the layer it replaces), so that a
    feature extractor or an output hook registered on the old layer still runs; returns how many.
    The handles the user holds still remove them (they key the same dicts).

    Example:
        >>> old, new = torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
        >>> handle = old.register_forward_hook(lambda m, args, out: out * 0)
        >>> move_forward_hooks(old, new), bool((new(torch.randn(2, 3, 2, 2)) == 0).all())
        (1, True)
        >>> handle.remove(); forward_hook_count(new)
        0
    """
    n = forward_hook_count(src)
    if n:
        for key in _FORWARD_HOOKS:
            held = getattr(src, key, None)
            if held is not None:  # (the same dicts: a handle's remove() reaches the hook on dst)
                held.update(getattr(dst, key))
                dst.__dict__[key] = held
    return n


def build_norm(cls: type[nn.Module], *args: Any, bias: bool, **kwargs: Any) -> nn.Module:
    """``cls(*args, bias=bias, **kwargs)``, a torch.nn or normkit norm class, on any torch release
    (:func:`torch_norm_init`: torch's own classes take ``bias`` from 2.12).

    Example:
        >>> bn = build_norm(torch.nn.BatchNorm2d, 4, bias=False, momentum=0.2)
        >>> bn.bias is None, bn.momentum
        (True, 0.2)
    """
    module = cls.__new__(cls)
    torch_norm_init(module.__init__, module, *args, bias=bias, **kwargs)
    return module


_TAKES_BIAS: dict[Any, bool] = {}


def _takes_bias(init: Any) -> bool:
    key = getattr(init, "__func__", init)
    got = _TAKES_BIAS.get(key)
    if got is None:
        import inspect

        got = _TAKES_BIAS[key] = "bias" in inspect.signature(init).parameters
    return got


def reset_affine(module: nn.Module) -> None:
    weight: Tensor | None = getattr(module, "weight", None)
    bias: Tensor | None = getattr(module, "bias", None)
    with torch.no_grad():
        if weight is not None:
            weight.fill_(1.0)
        if bias is not None:
            bias.zero_()


def check_tensor(x: object, name: str) -> None:
    """A ``TypeError`` naming what came for an input that is not a ``torch.Tensor`` (a numpy array)."""
    if not isinstance(x, Tensor):
        hint = "; convert it with torch.from_numpy(x)" if type(x).__module__ == "numpy" else ""
        raise TypeError(
            f"{name}: expected a torch.Tensor input, got {type(x).__module__}.{type(x).__name__}{hint}"
        )
    if x.layout != torch.strided:
        raise TypeError(_layout_message(x, name))


def check_channels(x: Tensor, expected: int, name: str, arg: str = "num_features") -> None:
    """The input's channel dim (1) must be ``expected``, the layer's ``arg`` (``num_features``,
    ``num_channels``)."""
    check_tensor(x, name)
    if x.dim() >= 2 and x.shape[1] != expected:
        raise NormError(
            f"{name}: expected {expected} channels (dim 1), got input of shape {tuple(x.shape)} with "
            f"{x.shape[1]} channels; the layer was built with {arg}={expected}"
        )


def buffer_writes() -> contextlib.AbstractContextManager[Any]:
    """The context of a layer's in-place writes to its own buffers: ``torch.no_grad()``, as torch.nn
    does, except while ``torch.export`` (or ONNX, ``torch.jit.trace``) records the model.

    There a ``no_grad`` block becomes a ``wrap_with_set_grad_enabled`` node that
    ``torch.export.save`` refuses ("Node.meta wrap_with_set_grad_enabled is missing val field");
    torch.nn's BatchNorm writes its buffers inside one ATen op, with no such block. So the callers
    copy ``.detach()``-ed values, which keeps gradients out of the buffers without the block.

    Example:
        >>> buf, grad_x = torch.zeros(2), torch.ones(2, requires_grad=True)
        >>> with buffer_writes():
        ...     _ = buf.copy_((grad_x * 2).detach())
        >>> buf, buf.requires_grad
        (tensor([2., 2.]), False)
    """
    return contextlib.nullcontext() if exporting() else torch.no_grad()


def store_stats(
    out: NormOutput,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    num_skipped_updates: Tensor | None,
) -> Tensor:
    """Copy the updated running statistics a functional op returned into a module's buffers; return the
    output.

    The one place a layer writes its buffers (in place, detached values, under ``no_grad`` as
    torch.nn does except while exporting: :func:`buffer_writes`). A step whose update was skipped
    (non-finite statistics) did not advance ``num_batches_tracked`` and is counted in
    ``num_skipped_updates``.
    """
    if out.running_mean is not None and running_mean is not None and out.running_mean is not running_mean:
        assert running_var is not None and out.running_var is not None
        new_mean, new_var, new_count = out.running_mean, out.running_var, out.num_batches_tracked
        outside = contextlib.nullcontext()
        if torch._C._are_functorch_transforms_active() and not is_functorch_wrapped_tensor(running_mean):
            # buffers from outside the transforms (grad / jvp: store the values, outside the transforms, as
            # torch.nn's norms update theirs inside the ATen op, below them; vmap: refused)
            new_mean, new_var, new_count = (_plain(t) for t in (new_mean, new_var, new_count))
            outside = temporarily_clear_interpreter_stack()
        assert new_mean is not None and new_var is not None
        with buffer_writes(), outside:
            running_mean.copy_(new_mean.detach())
            running_var.copy_(new_var.detach())
            if new_count is not None and num_batches_tracked is not None:
                if num_skipped_updates is not None:
                    num_skipped_updates.add_(1 - (new_count - num_batches_tracked))  # (see live_count)
                num_batches_tracked.copy_(new_count)
    return out.output


def _plain(t: Tensor | None) -> Tensor | None:
    """The value of updated running statistics computed under ``torch.func`` transforms, for the module's
    buffers (which live outside them, as torch.nn's norms update theirs inside the ATen op): a
    ``grad`` / ``jvp`` wrapper is unwrapped; a vmapped value has no single one to store."""
    while t is not None and is_functorch_wrapped_tensor(t):
        if is_batchedtensor(t):
            raise NormError(
                "a training step under torch.func.vmap updates the running statistics in place, but the "
                "running statistics are not vmapped (one set for all the members): use "
                "track_running_stats=False, eval mode, or torch.func.replace_all_batch_norm_modules_; for "
                "per-member statistics, vmap over the buffers too (torch.func.stack_module_state)"
            )
        t = get_unwrapped(t)
    return t


def loaded_device(module: nn.Module) -> torch.device | None:
    """The device of ``module``'s own parameters and persistent buffers once a state_dict is loaded,
    ``None`` while they are all on the meta device.

    Its non-persistent buffers (``num_skipped_updates``, Proxy Norm's ``proxy_points``) are not in
    the state_dict, so ``load_state_dict(..., assign=True)`` on a module built on the meta device
    leaves them there (torch.nn's own layers have none); ``_load_from_state_dict`` rebuilds them on
    this device.

    Example:
        >>> with torch.device("meta"):
        ...     bn = torch.nn.BatchNorm1d(2)
        >>> print(loaded_device(bn))
        None
        >>> _ = bn.load_state_dict(torch.nn.BatchNorm1d(2).state_dict(), assign=True)
        >>> loaded_device(bn)
        device(type='cpu')
    """
    skip = module._non_persistent_buffers_set
    own = [*module._parameters.values(), *(b for k, b in module._buffers.items() if k not in skip)]
    return next((t.device for t in own if t is not None and t.device.type != "meta"), None)


class _StatsMixin:
    """Shared behaviour of the layers with optional running statistics (BN, IN, and their family).

    Parameter and buffer names, defaults and state_dict layout follow ``torch.nn``, so a torch
    checkpoint loads as is. Running statistics follow PyTorch's convention ``running = (1 -
    momentum) * running + momentum * batch`` (``momentum=None``: cumulative average). A batch with
    non-finite statistics never reaches the buffers; such skipped updates are counted in the
    non-persistent buffer ``num_skipped_updates`` (reset by ``reset_running_stats`` and by loading
    a state_dict; a layer built on the meta device gets it, 0, on the loaded tensors' device from
    ``load_state_dict(..., assign=True)``, so ``.to(device)`` then works as for torch.nn's BN).
    """

    _stat_keys = ("running_mean", "running_var", "num_batches_tracked")

    if TYPE_CHECKING:  # for type checkers only: TorchScript cannot read these string annotations
        num_features: int
        eps: float
        momentum: float | None
        affine: bool
        track_running_stats: bool
        running_mean: Tensor | None
        running_var: Tensor | None
        num_batches_tracked: Tensor | None
        num_skipped_updates: Tensor | None
        weight: Tensor | None
        bias: Tensor | None

        def register_buffer(self, name: str, tensor: Tensor | None, persistent: bool = True) -> None: ...

    def _init_torch_norm(
        self,
        init: Any,
        num_features: int,
        eps: float,
        momentum: float | None,
        affine: bool,
        track_running_stats: bool,
        device: Any,
        dtype: Any,
        bias: bool,
    ) -> None:
        """Check the arguments, then torch.nn's BatchNorm / InstanceNorm ``__init__`` (``init``, on any
        torch release: :func:`torch_norm_init`), then the skipped-updates counter."""
        name = type(self).__name__
        num_features = check_positive_int(num_features, name, "num_features")
        eps = check_eps(eps, name)
        momentum = check_momentum(momentum, name)
        args = (num_features, eps, momentum, bool(affine), bool(track_running_stats), device, dtype)
        torch_norm_init(init, self, *args, bias=bias)  # type: ignore[arg-type]  # (a mixin of Modules)
        self._register_skip_counter(device)

    def _register_skip_counter(self, device: Any) -> None:
        counter = torch.tensor(0, dtype=torch.long, device=device) if self.running_mean is not None else None
        self.register_buffer("num_skipped_updates", counter, persistent=False)

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, counters 0."""
        if self.running_mean is not None:
            assert self.running_var is not None and self.num_batches_tracked is not None
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()
        skipped = getattr(self, "num_skipped_updates", None)
        if skipped is not None:
            skipped.zero_()

    @property
    def _tracking(self) -> bool:
        """Running statistics are both wanted *now* and present (the flag may be flipped after init)."""
        return self.track_running_stats and self.running_mean is not None

    def _store(self, out: NormOutput) -> Tensor:
        """Copy updated running statistics returned by a functional op into the buffers."""
        return store_stats(
            out,
            self.running_mean,
            self.running_var,
            self.num_batches_tracked,
            getattr(self, "num_skipped_updates", None),
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"bias={getattr(self, 'bias', None) is not None}, track_running_stats={self.track_running_stats}"
            + ("" if getattr(self, "unbiased_running_var", True) else ", unbiased_running_var=False")
        )

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
        nbt = self.num_batches_tracked
        if nbt is not None and (version is None or version < 2) and key not in state_dict:
            # Checkpoints from before num_batches_tracked existed: keep the current counter
            # (a non-strict load of a partial dict must not reset it; pytorch#110361).
            keep = nbt.detach().clone() if nbt.device.type != "meta" else torch.tensor(0, dtype=torch.long)
            state_dict[key] = keep
        if self.running_mean is None:
            found = [prefix + k for k in self._stat_keys if prefix + k in state_dict]
            if found:
                # torch always passes strict=True here and applies strictness afterwards, so we
                # cannot raise only for strict loads: warn with the reason; a strict load then fails
                # on the unexpected keys, a non-strict one reports them.
                warnings.warn(
                    f"{type(self).__name__}: the state_dict has running statistics ({', '.join(found)}) "
                    "but this layer was built with track_running_stats=False, so they are not loaded; build "
                    "it with track_running_stats=True to load them",
                    UserWarning,
                    stacklevel=4,
                )
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        skipped = getattr(self, "num_skipped_updates", None)
        if skipped is None:
            return
        device = loaded_device(self)  # type: ignore[arg-type]  # (a mixin of Modules)
        if device is not None and skipped.device != device:
            # an assign=True load onto a layer built on the meta device (or elsewhere): the counter is
            # not in the state_dict, so it is made anew, on the device of what was loaded
            self.num_skipped_updates = torch.zeros((), dtype=torch.long, device=device)
        elif skipped.device.type != "meta":
            with torch.no_grad():
                skipped.zero_()  # derived, not saved: "skipped since this state was loaded"


class _NormBase(_StatsMixin, nn.Module):
    """Base of normkit's running-statistics layers that are *not* torch.nn BatchNorm (Frozen BN)."""

    _version = 2

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
        self.num_features = num_features = check_positive_int(num_features, name, "num_features")
        self.eps = check_eps(eps, name)
        self.momentum = check_momentum(momentum, name)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        factory = {"device": device, "dtype": dtype}
        make_affine(self, (num_features,), self.affine, self.affine and bias, factory)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self._register_skip_counter(device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reset the running statistics and the affine (weight 1, bias 0)."""
        self.reset_running_stats()
        reset_affine(self)


def not_scriptable(module: nn.Module) -> Any:
    """``__prepare_scriptable__`` of the layers TorchScript cannot compile: ``torch.jit.script`` calls it
    on every submodule first, so a model holding one gets this error, not TorchScript's own about some
    annotation deep in normkit."""
    raise NormError(
        f"{type(module).__name__} cannot be compiled by torch.jit.script (TorchScript, deprecated); "
        "normkit's layers that script are BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm1d/2d/3d, GroupNorm, "
        "LayerNorm and LayerNorm2d. torch.jit.trace, torch.compile, torch.export and ONNX export take every "
        "normkit layer"
    )


def fx_leaf(module: nn.Module, *args: Any, root_traceable: bool = False) -> Any:
    """Under ``torch.fx`` symbolic tracing, record ``module`` as one ``call_module`` node; else ``None``.

    torch.nn's own layers are leaves for fx's default tracer; normkit's are not (their class lives
    outside ``torch.nn``), so each normkit layer's ``forward`` starts with this: a traced model
    keeps the layer itself (train/eval still switch it; fx passes see its torch.nn base class).
    When the layer is the traced root there is no parent to call it from: the core layers
    (``root_traceable=True``) then trace their own body, one ``torch.fx.wrap``-ed call; the others
    raise a clear error. So does a user's subclass that overrides ``forward`` and reaches normkit's
    through ``super().forward()``: fx is then tracing the subclass's own code, and a node calling
    the module would run that code a second time.
    """
    proxy = next((a for a in args if isinstance(a, torch.fx.Proxy)), None)
    if proxy is None:
        return None
    tracer = proxy.tracer
    path = ""
    if isinstance(tracer, torch.fx.Tracer):  # a symbolic trace (not a graph being appended to by hand)
        try:
            path = tracer.path_of_module(module)
        except NameError:
            pass
    forward = type(module).forward
    owner = getattr(forward, "__module__", None) or ""
    extended = not owner.startswith("normkit.")  # (a subclass's forward, tracing through normkit's)
    if not path or extended:
        name = type(module).__name__
        leaf_hint = "trace with a torch.fx.Tracer whose is_leaf_module returns True for it"
        if root_traceable:
            said: set[int] = tracer.__dict__.setdefault("_normkit_fixed_modes", set())
            if (
                isinstance(getattr(module, "running_mean", None), Tensor)
                and not getattr(module, "use_running_stats", False)
                and id(module) not in said  # (once: a norm + act layer reaches the norm's forward too)
            ):
                said.add(id(module))
                mode = "training" if module.training else "eval"
                if extended:
                    how = (
                        f"{name} traced through by torch.fx (its forward, {owner}."
                        f"{getattr(forward, '__qualname__', 'forward')}, extends normkit's)"
                    )
                    fix = f"to keep it one call_module node that follows train/eval, {leaf_hint}"
                else:
                    how = f"{name} traced as the root of torch.fx.symbolic_trace"
                    fix = (
                        "trace a module that contains it (e.g. torch.nn.Sequential(layer)), where it stays "
                        "one call_module node that follows train/eval"
                    )
                warnings.warn(
                    f"{how}: the graph computes its {mode} mode, fixed at trace time (the GraphModule's "
                    f"train() / eval() no longer switch it, as for any module traced through); {fix}",
                    stacklevel=3,
                )
            return None
        if extended:
            raise NormError(
                f"{name}'s forward ({owner}.{getattr(forward, '__qualname__', 'forward')}) extends "
                f"normkit's, which torch.fx.symbolic_trace cannot trace through; {leaf_hint}"
            )
        raise NormError(
            f"{name} cannot be the root of torch.fx.symbolic_trace; trace a module that "
            "contains it (e.g. torch.nn.Sequential(layer)), where it is kept as one call_module node"
        )
    while args and args[-1] is None:  # trailing optional arguments left at their defaults
        args = args[:-1]
    return tracer.create_proxy("call_module", path, args, {})
