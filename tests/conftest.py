"""Test-suite set-up: make the float64 oracle importable as ``tests.reference``; shared fixtures.

pytest runs with ``--import-mode=importlib``, which does not put the test directories on
``sys.path``; put the repository root there so ``from tests.reference import ...`` works from any
test file, under ``python -m pytest`` and a bare ``pytest`` alike.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# (TRITON_INTERPRET for the Triton tests is set in the repository's conftest.py, before torch is imported.)

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for the test (tiny models step faster, steadier on a shared machine, and the
    same on any machine); the count is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
