"""Test-suite set-up: make the float64 oracle importable as ``tests.reference``; Triton's interpreter.

pytest runs with ``--import-mode=importlib``, which does not put the test directories on
``sys.path``; put the repository root there so ``from tests.reference import ...`` works from any
test file, under ``python -m pytest`` and a bare ``pytest`` alike.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# normkit's Triton kernels run on CPU tensors in Triton's interpreter (tests/kernels/test_triton.py),
# which Triton enables only when TRITON_INTERPRET=1 is set before it is imported. A GPU run sets
# NORMKIT_TEST_DEVICE=cuda and gets compiled kernels instead.
if os.environ.get("NORMKIT_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
