"""A layer whose training output reads its own state, under gradient checkpointing.

``torch.utils.checkpoint`` runs a segment's forward again inside the backward and differentiates
that second run. A layer whose training output depends on state its first run changed (Batch
Renorm's ``r`` and ``d`` read the running statistics, which that run updated, and its warm-up reads
``num_batches_tracked``) then differentiates another function than the one that produced its
output: silently wrong gradients, and a second update of the state. :class:`ForwardStates` keeps
the state each training forward run under a checkpoint started from, keyed by its input, so that the
recomputation (a forward inside a backward) finds it again: the forward on the same input, else the
newest on an input of the same shape. Only forwards inside a checkpoint are kept (``use_reentrant=False``:
its saved-tensors hooks are the innermost; ``use_reentrant=True``: its forward is on the call stack), so
a training forward outside one (a ``no_grad`` pass for train accuracy between a checkpointed forward
and its backward) is never taken for the checkpointed one. A layer called several times inside one
checkpointed segment (weights shared within the segment) is the one case this pairs wrongly: its
recomputed calls come in forward order. A recomputation that finds no saved state (more than
``maxlen`` checkpointed forwards before their backward) says so with a warning and updates nothing.
"""

from __future__ import annotations

import sys
import weakref
from collections import deque
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["LOST", "ForwardStates"]

#: What :meth:`ForwardStates.begin` returns for a recomputation that finds no saved state.
LOST: tuple[Tensor, ...] = ()


def _plain_eager(x: Tensor) -> bool:
    """A plain eager call on a real tensor (not traced, compiled, exported or under a transform)."""
    return (
        not torch.compiler.is_compiling()
        and type(x) is Tensor
        and not torch._C._are_functorch_transforms_active()
        and not torch.jit.is_tracing()  # pyright: ignore[reportPrivateImportUsage]
        and _get_current_dispatch_mode() is None
        and torch._C._has_storage(x)
        and not x.is_inference()  # (no version counter; and no backward to recompute anything for)
    )


def _under_checkpoint() -> bool:
    """Whether this forward runs inside a ``torch.utils.checkpoint`` segment (its first run)."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)  # pyright: ignore[reportAttributeAccessIssue]
    if hooks is not None and getattr(hooks[0], "__qualname__", "").startswith("_checkpoint_hook."):
        return True  # use_reentrant=False: the checkpoint's saved-tensors hooks are the innermost
    if torch.is_grad_enabled():
        return False
    ckpt = sys.modules.get("torch.utils.checkpoint")
    if ckpt is None:
        return False
    code = ckpt.CheckpointFunction.forward.__code__  # use_reentrant=True: its forward runs under no_grad
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def _key(x: Tensor) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """``(what, which)``: the input's device, dtype and shape; and its memory and version. A checkpoint's
    recomputation of a segment's first layer gets the same tensor (``use_reentrant=False``) or a
    detached alias of it (``use_reentrant=True``), same memory and version counter; a layer further
    in gets a recomputed tensor, with only ``what`` in common."""
    what = (x.device, x.dtype, tuple(x.shape))
    return what, (x.data_ptr(), x.storage_offset(), x.stride(), x._version)


class ForwardStates:
    """The state of the last ``maxlen`` training forwards inside a checkpoint, for its recomputation to find.

    ``begin(x, state)`` at the start of a training forward: returns ``None`` in a forward (after saving
    a copy of ``state``, a few ``(C,)`` tensors, when it runs inside a checkpoint), or, when this call
    is a recomputation inside a backward, the state the original forward on ``x`` started from (:data:`LOST`
    if none was kept). The caller then computes with that state and leaves its buffers alone (they
    were updated once, by the original forward).

    Example:
        >>> states = ForwardStates()
        >>> x, state = torch.randn(4, 3), (torch.zeros(3),)
        >>> states.begin(x, state) is None                    # a plain forward: saved
        True
    """

    def __init__(self, maxlen: int = 256) -> None:
        # (input key, a weak reference to the input, the state)
        self._saved: deque[tuple[tuple[Any, ...], weakref.ref[Tensor], tuple[Tensor, ...]]] = deque(
            maxlen=maxlen
        )

    def begin(self, x: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...] | None:
        if not _plain_eager(x):
            return None
        key = _key(x)
        if torch._C._current_graph_task_id() != -1:  # run by a backward: a checkpoint's recomputation
            # the forward on this very input (still alive: a segment's input, which the checkpoint
            # keeps; a dead one's memory may hold another tensor by now, at the same address), else the
            # newest forward on an input like it (the backward recomputes the segments in the reverse
            # of their order)
            for match in (
                lambda k, ref: k == key and ref() is not None,
                lambda k, ref: k[0] == key[0],
            ):
                for i in range(len(self._saved) - 1, -1, -1):
                    if match(*self._saved[i][:2]):
                        found = self._saved[i][2]
                        del self._saved[i]
                        return found
            return LOST
        if _under_checkpoint():
            self._saved.append((key, weakref.ref(x), tuple(t.detach().clone() for t in state)))
        return None

    def clear(self) -> None:
        self._saved.clear()
