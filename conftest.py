"""Shared pytest set-up: the doctest namespace; Triton's interpreter; modules that need an optional extra."""

from __future__ import annotations

import importlib.util
import os

# normkit's Triton kernels run on CPU tensors in Triton's interpreter (tests/kernels/test_triton.py),
# which Triton enables only when TRITON_INTERPRET=1 is set before it is imported: set it before
# anything imports torch or triton. A GPU run sets NORMKIT_TEST_DEVICE=cuda and gets compiled kernels.
if os.environ.get("NORMKIT_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

# Imported before collection: pytest's importlib mode returns a module already in sys.modules, but
# executes a package's __init__.py a second time when the doctest collector reaches it first, and
# the layers would then hold the first normkit.kernels while the tests patch and select backends on
# the second (a spy-based test then fails depending on the order of the paths given to pytest).
import normkit

# The kernels' module imports triton (the optional `triton` extra): no doctest collection without it.
collect_ignore = [] if importlib.util.find_spec("triton") else ["src/normkit/kernels/triton/_kernels.py"]


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    """pyproject.toml sets pytest-timeout's per-test ``timeout`` (the test extra installs it); without
    the plugin, an older environment still runs the tests, with no per-test limit, instead of stopping
    on an unknown option."""
    if not pluginmanager.has_plugin("timeout"):
        parser.addini("timeout", "per-test limit in seconds (pytest-timeout is not installed: unused)")


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("timeout"):
        config.addinivalue_line("markers", "timeout(seconds): pytest-timeout's limit (not installed: unused)")


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace: dict) -> None:

    doctest_namespace["torch"] = torch
    doctest_namespace["normkit"] = normkit


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A docstring whose every example is marked ``+SKIP`` (the Triton launchers' examples, which need
    CUDA tensors) is reported as skipped with that reason, not pytest's generic "all tests skipped"."""
    import doctest

    from _pytest.doctest import DoctestItem

    for item in items:
        if not isinstance(item, DoctestItem) or item.dtest is None or not item.dtest.examples:
            continue
        if all(ex.options.get(doctest.SKIP) for ex in item.dtest.examples):
            where = "a GPU with triton" if "kernels.triton" in item.name else "what the example names"
            item.add_marker(pytest.mark.skip(reason=f"the example needs {where}: shown, not run"))
