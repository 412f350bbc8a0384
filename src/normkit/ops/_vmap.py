"""Shared pieces of normkit's ``torch.func`` rules (vmap, and the jvp of a composite).

A rule receives its tensors with the vmapped dim wherever ``in_dims`` says (or none); these put it
first, and turn the vmapped members of a per-channel computation into channels: for a per-channel
step (Proxy Norm's activation, its statistics, GroupNorm's groups) the members' channels are
independent, so ``(B, N, C, *S)`` becomes ``(N, B * C, *S)`` (a view when N = 1), one call of the
unbatched kernel serves per-member parameters, and its per-channel sums are the per-member ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils._python_dispatch  # (a submodule: imported explicitly)
from torch import Tensor

__all__ = [
    "as_channels",
    "batch_first",
    "below_jvp_level",
    "dense_tangents",
    "from_channels",
    "member_vector",
    "register_batched",
    "unwrapped_zero",
]


def batch_first(t: Tensor, bdim: int | None, size: int) -> Tensor:
    """``t`` with its vmapped dim first (an unbatched ``t`` expanded to ``size`` there, no copy).

    Example:
        >>> import torch
        >>> batch_first(torch.zeros(3, 5), 1, 5).shape, batch_first(torch.zeros(3), None, 4).shape
        (torch.Size([5, 3]), torch.Size([4, 3]))
    """
    return t.movedim(bdim, 0) if bdim is not None else t.expand(size, *t.shape)


def member_vector(p: Tensor, bdim: int | None, size: int) -> Tensor:
    """A member's ``(C,)`` vector, vmapped, as the ``(B * C,)`` vector of :func:`as_channels`."""
    return batch_first(p, bdim, size).reshape(-1)


def as_channels(t: Tensor) -> Tensor:
    """``(B, N, C, *S)`` -> ``(N, B * C, *S)``: the vmapped members as channels.

    Example:
        >>> import torch
        >>> t = torch.arange(24.0).reshape(2, 1, 3, 4)      # two members, one sample each
        >>> as_channels(t).shape, as_channels(t).data_ptr() == t.data_ptr()
        (torch.Size([1, 6, 4]), True)
    """
    B, N, C = t.shape[:3]
    return t.movedim(0, 1).reshape(N, B * C, *t.shape[3:])


def from_channels(t: Tensor, shape: Sequence[int]) -> Tensor:
    """The inverse of :func:`as_channels` (``shape``: the ``(B, N, C, *S)`` it came from).

    Example:
        >>> import torch
        >>> t = torch.randn(2, 3, 4, 5)
        >>> torch.equal(from_channels(as_channels(t), t.shape), t)
        True
    """
    B, N, C = shape[:3]
    return t.reshape(N, B, C, *shape[3:]).movedim(0, 1)


def dense_tangents(tangents: Sequence[Tensor | None], primals: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """A Function's jvp tangents for ``torch.func.jvp`` of its composite: zeros where autograd gave none.

    Example:
        >>> import torch
        >>> [t.tolist() for t in dense_tangents([None, torch.ones(2)], [torch.ones(1), torch.ones(2)])]
        [[0.0], [1.0, 1.0]]
    """
    return tuple(t if t is not None else torch.zeros_like(p) for t, p in zip(tangents, primals))


def register_batched(lib: torch.library.Library, name: str, rule: Callable[..., Any]) -> None:
    """Register ``rule(info, in_dims, *args) -> (outputs, out_dims)`` as op ``name``'s vmap kernel.

    What ``torch.library.register_vmap`` registers, without its pytree passes over the arguments and
    outputs (about 50 us a call here, as much as a small norm's kernel): the ops' arguments are flat
    and their outputs a tuple of new tensors (the op's schema returns a tuple). Falls back to
    ``register_vmap`` where the functorch internals it uses are missing.

    Example:
        >>> lib = torch.library.Library("normkit_doc", "DEF")
        >>> _ = lib.define("pair(Tensor x) -> (Tensor, Tensor)")
        >>> lib.impl("pair", lambda x: (x + 1, x.sum(-1)), "CompositeExplicitAutograd")
        >>> def rule(info, in_dims, x):  # the vmapped dim first; the op runs once on the whole batch
        ...     return torch.ops.normkit_doc.pair(batch_first(x, in_dims[0], info.batch_size)), (0, 0)
        >>> register_batched(lib, "pair", rule)
        >>> [t.shape for t in torch.vmap(torch.ops.normkit_doc.pair)(torch.zeros(4, 3))]
        [torch.Size([4, 3]), torch.Size([4])]
    """
    op = getattr(getattr(torch.ops, lib.ns), name).default
    try:
        from torch._C._functorch import _add_batch_dim, _unwrap_batched  # pyright: ignore[reportMissingModuleSource]
        from torch._functorch.autograd_function import VmapInfo
        from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter
    except ImportError:  # pragma: no cover - a torch without these internals
        torch.library.register_vmap(f"{lib.ns}::{name}", rule, lib=lib)
        return
    exclude = torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchBatched)

    def kernel(_keyset: Any, *args: Any) -> Any:
        interpreter = retrieve_current_functorch_interpreter()
        level = interpreter.level()
        flat, in_dims = [], []
        for a in args:
            d = None
            if isinstance(a, Tensor):
                a, d = _unwrap_batched(a, level)
            flat.append(a)
            in_dims.append(d)
        with torch._C._ExcludeDispatchKeyGuard(exclude):
            if all(d is None for d in in_dims):  # nothing batched at this level: the op, one level down
                return op(*args)
            info = VmapInfo(batch_size=interpreter.batch_size(), randomness=interpreter.randomness())  # pyright: ignore[reportAttributeAccessIssue]
            out, out_dims = rule(info, tuple(in_dims), *flat)
        return tuple(o if d is None else _add_batch_dim(o, d, level) for o, d in zip(out, out_dims))

    lib.impl(name, kernel, "FuncTorchBatched", with_keyset=True)


def _wrapped(t: Tensor) -> bool:
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))  # type: ignore[attr-defined]


def unwrapped_zero(t: Tensor | None) -> bool:
    """Whether a jvp rule's tangent is a plain tensor of zeros: functorch hands zeros for the inputs
    that have no tangent, which a rule may skip (small ones: this reads the tensor). A wrapped tangent
    (batched under ``jacfwd``), one being traced (``linearize``, compile) or one on a GPU (no sync for
    it) counts as not zero.

    Example:
        >>> import torch
        >>> unwrapped_zero(torch.zeros(3)), unwrapped_zero(torch.ones(3)), unwrapped_zero(None)
        (True, False, False)
    """
    return (
        t is not None
        and t.device.type == "cpu"  # (no device sync for it)
        and not _wrapped(t)
        and not torch.compiler.is_compiling()
        and torch.utils._python_dispatch._get_current_dispatch_mode() is None  # (make_fx: linearize)
        and not bool(t.any())
    )


def below_jvp_level(fn: Callable[..., Tensor], args: tuple[Any, ...]) -> Tensor:
    """``fn(*args)`` for an autograd.Function's jvp rule, which torch.func runs at the jvp level itself:
    its saved tensors and tangents come wrapped for that level. Where they are plain one level down (a
    ``jvp`` of its own, not under ``jacfwd``'s vmap) ``fn`` runs there on the plain tensors (normkit's
    kernels take them, and no op dispatches through the level) and its result is wrapped back; else
    ``fn`` runs on the wrapped tensors (plain ops). ``args`` may hold tuples of tensors.

    Example:
        >>> import torch
        >>> below_jvp_level(torch.add, (torch.ones(2), torch.ones(2))).tolist()  # (no transform: a call)
        [2.0, 2.0]
    """
    from torch._C import _functorch as ft  # pyright: ignore[reportAttributeAccessIssue]

    if not ft.get_interpreter_stack():
        return fn(*args)
    from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter

    interp = retrieve_current_functorch_interpreter()
    level = interp.level()

    def down(a: Any) -> Any:
        if isinstance(a, tuple):
            return tuple(down(t) for t in a)
        return ft._unwrap_for_grad(a, level) if isinstance(a, Tensor) else a

    flat = down(args)
    leaves = [t for a in flat for t in (a if isinstance(a, tuple) else (a,)) if isinstance(t, Tensor)]
    if any(_wrapped(t) for t in leaves):
        return fn(*args)
    with interp.lower():
        out = fn(*flat)
    return ft._wrap_for_grad(out, level)  # type: ignore[no-any-return]
