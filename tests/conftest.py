"""Test-suite set-up: make the float64 oracle importable as ``tests.reference``.

pytest runs with ``--import-mode=importlib``, which does not put the test directories on
``sys.path``; put the repository root there so ``from tests.reference import ...`` works from any
test file, under ``python -m pytest`` and a bare ``pytest`` alike.
"""

from __future__ import annotations

import sys
from pathlib import Path

# (TRITON_INTERPRET for the Triton tests is set in the repository's conftest.py, before torch is imported.)

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
