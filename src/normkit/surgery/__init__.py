"""Model surgery: returns the model, never mutates the caller's copy."""

from .fold import FoldedProxyAct, fold_proxy_norm

__all__ = ["FoldedProxyAct", "fold_proxy_norm"]
