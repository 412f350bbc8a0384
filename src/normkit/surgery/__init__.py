"""Model surgery: returns the model, never mutates the caller's copy."""

from .fold import FoldedProxyAct, fold_proxy_norm
from .freeze import freeze_bn, unfreeze_bn

__all__ = ["FoldedProxyAct", "fold_proxy_norm", "freeze_bn", "unfreeze_bn"]
