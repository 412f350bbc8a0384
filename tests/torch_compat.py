"""What the tests need to know about the torch release they run under (CI runs torch 2.13; the
GPU machine brings its own, 2.11 on 2026-12-04)."""

from __future__ import annotations

import inspect
import re
from typing import Any

import pytest
import torch

#: torch.nn's BatchNorm, InstanceNorm and GroupNorm take ``bias`` from torch 2.12.
TORCH_NORMS_TAKE_BIAS = "bias" in inspect.signature(torch.nn.GroupNorm.__init__).parameters
NO_TORCH_BIAS = (
    "torch < 2.12: torch.nn's BatchNorm / InstanceNorm / GroupNorm have no bias argument (the oracle)"
)

needs_torch_bias = pytest.mark.skipif(not TORCH_NORMS_TAKE_BIAS, reason=NO_TORCH_BIAS)


def torch_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    """``kw`` for a torch.nn norm class as the oracle; skips the test where torch cannot take them."""
    if "bias" in kw and not TORCH_NORMS_TAKE_BIAS:
        pytest.skip(NO_TORCH_BIAS)
    return kw


def assert_same_repr(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    """normkit's repr is torch's; before torch 2.12 torch's leaves out ``bias=``, which normkit's shows."""
    got, want = repr(ours), repr(ref)
    if "bias=" not in want:
        got = re.sub(r", bias=(True|False)", "", got)
    assert got == want
