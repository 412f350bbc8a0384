"""normkit's error type for bad values: a ``ValueError`` that torch code catching ``RuntimeError`` also
catches."""

from __future__ import annotations

__all__ = ["NormError"]


class NormError(ValueError, RuntimeError):
    """A wrong value or shape given to a normkit op or layer (the message names the rule, the values, a fix).

    It derives from both ``ValueError`` (what the value is) and ``RuntimeError`` (what torch.nn raises
    for the same mistakes), so code written around torch's layers keeps catching it.

    Example:
        >>> import torch, normkit
        >>> try:
        ...     normkit.nn.BatchNorm2d(4)(torch.randn(2, 3, 5, 5))
        ... except RuntimeError as e:                      # as with torch.nn.BatchNorm2d
        ...     print(type(e).__name__, isinstance(e, ValueError))
        NormError True
    """
