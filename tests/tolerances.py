"""The keyword arguments of ``torch.testing.assert_close`` that the tests pass as one ``**TOL`` bundle."""

from __future__ import annotations

from typing import TypedDict


class Tol(TypedDict):
    rtol: float
    atol: float
