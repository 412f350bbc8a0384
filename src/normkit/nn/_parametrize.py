"""Make modules parametrized with ``torch.nn.utils.parametrize`` picklable.

torch refuses to pickle a parametrized module ("Serialization of parametrized modules is only
supported through state_dict()"), because its class is created on the fly
(``ParametrizedLinear``) and cannot be found by name. We give that per-module class a
``__reduce_ex__`` that pickles the *original* class plus the instance ``__dict__`` (which holds the
``parametrizations`` ModuleDict with the original tensors), and rebuild the on-the-fly class and
its properties on load with torch's own helpers. ``copy.deepcopy`` likewise gives the copy a class
of its own (torch's ``__deepcopy__`` shares the original's, so removing the parametrization from
the copy deleted the original's weight property).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

__all__ = ["make_picklable"]


def _new(base_cls: type[nn.Module]) -> nn.Module:
    return base_cls.__new__(base_cls)


def _set_state(module: nn.Module, state: dict[str, Any]) -> None:
    module.__dict__.update(state)
    parametrize._inject_new_class(module)  # type: ignore[attr-defined]
    for name in module.parametrizations:  # type: ignore[union-attr]
        parametrize._inject_property(module, name)  # type: ignore[attr-defined]
    make_picklable(module)


def _reduce_ex(self: nn.Module, protocol: int) -> tuple[Any, ...]:
    # (constructor, args, state, listitems, dictitems, state_setter): the bare object is memoized
    # before its state is pickled, so cycles through hooks that hold the module still work.
    return (_new, (type(self).__bases__[0],), dict(self.__dict__), None, None, _set_state)


def _deepcopy(self: nn.Module, memo: dict[int, Any]) -> nn.Module:
    # torch's own __deepcopy__ gives the copy the *same* on-the-fly class, whose properties are shared:
    # removing (or adding) a parametrization on the copy then deletes (or adds) the property on the
    # original too, which loses its weight. The copy gets its own class, as after unpickling.
    replica = memo.get(id(self))
    if replica is not None:
        return replica  # type: ignore[no-any-return]
    replica = _new(type(self).__bases__[0])
    memo[id(self)] = replica
    _set_state(replica, copy.deepcopy(self.__dict__, memo))
    return replica


def make_picklable(module: nn.Module) -> nn.Module:
    """Give a parametrized module's on-the-fly class a ``__reduce_ex__`` and a ``__deepcopy__`` that gives
    the copy a class of its own (idempotent); returns the module."""
    cls = type(module)
    if parametrize.is_parametrized(module) and cls.__dict__.get("__reduce_ex__") is not _reduce_ex:
        cls.__reduce_ex__ = _reduce_ex  # type: ignore[method-assign, assignment]
        cls.__deepcopy__ = _deepcopy  # type: ignore[attr-defined]
    return module
