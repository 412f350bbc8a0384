"""Shared pytest set-up: the doctest namespace."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace: dict) -> None:
    import normkit

    doctest_namespace["torch"] = torch
    doctest_namespace["normkit"] = normkit
