"""Make modules parametrized with ``torch.nn.utils.parametrize`` picklable.

torch refuses to pickle a parametrized module ("Serialization of parametrized modules is only
supported through state_dict()"), because its class is created on the fly
(``ParametrizedLinear``) and cannot be found by name. We give that per-module class a
``__reduce_ex__`` that pickles the *original* class plus the instance ``__dict__`` (which holds the
``parametrizations`` ModuleDict with the original tensors), and rebuild the on-the-fly class and
its properties on load with torch's own helpers. deepcopy keeps working through torch's
``__deepcopy__``.
"""

from __future__ import annotations

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


def make_picklable(module: nn.Module) -> nn.Module:
    """Give a parametrized module's on-the-fly class a ``__reduce_ex__`` (idempotent); returns the module."""
    cls = type(module)
    if parametrize.is_parametrized(module) and cls.__dict__.get("__reduce_ex__") is not _reduce_ex:
        cls.__reduce_ex__ = _reduce_ex  # type: ignore[method-assign, assignment]
    return module
