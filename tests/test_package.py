"""Package hygiene: `import normkit` stays light, imports only point downward, the public API resolves."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

import normkit

SRC = Path(normkit.__file__).resolve().parent
HEAVY = ("matplotlib", "sklearn", "rich", "tqdm", "triton")
# What the functional layer may never import (ARCHITECTURE.md §1: nothing imports upward).
UPWARD = (
    "normkit.nn",
    "normkit.lab",
    "normkit.cli",
    "normkit.surgery",
    "normkit.diagnostics",
    "normkit.distributed",
)


def _loaded_after_import(module: str) -> list[str]:
    code = f"import sys, json\nimport {module}\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_normkit_does_not_import_heavy_or_optional_packages():
    loaded = _loaded_after_import("normkit")
    assert "normkit" in loaded and "torch" in loaded  # the probe really imported it
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY)
    assert heavy == [], heavy
    lab = sorted(m for m in loaded if m == "normkit.lab" or m.startswith(("normkit.lab.", "normkit.cli")))
    assert lab == [], lab


def _resolve(module_name: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """Absolute names an ``ImportFrom`` node refers to (the module and, for ``from X import y``, X.y)."""
    if node.level:
        parts = module_name.split(".")
        base = parts if is_package else parts[:-1]
        base = base[: len(base) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    return [mod] + [f"{mod}.{alias.name}" for alias in node.names]


def _imports_of(path: Path, root: Path, package: str) -> list[tuple[int, str]]:
    rel = path.relative_to(root).with_suffix("")
    parts = [package, *rel.parts]
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    module_name = ".".join(parts)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found += [(node.lineno, name) for name in _resolve(module_name, is_package, node)]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
            "import_module",
            "__import__",
        ):
            found += [
                (node.lineno, a.value)
                for a in node.args[:1]
                if isinstance(a, ast.Constant) and isinstance(a.value, str)
            ]
    return found


def _upward(path: Path, root: Path, package: str = "normkit") -> list[str]:
    bad = []
    for lineno, name in _imports_of(path, root, package):
        if any(name == u or name.startswith(u + ".") for u in UPWARD):
            bad.append(f"{path.name}:{lineno}: {name}")
    return bad


def test_functional_never_imports_upward():
    root = SRC
    files = sorted((root / "functional").rglob("*.py"))
    assert len(files) >= 5
    bad = [b for f in files for b in _upward(f, root)]
    assert bad == [], bad


@pytest.mark.parametrize(
    "relpath, source, violates",
    [
        ("functional/x.py", "from .. import nn\n", True),
        ("functional/x.py", "from ..nn.batch_norm import BatchNorm2d\n", True),
        ("functional/x.py", "from ..lab import train\n", True),
        ("functional/__init__.py", "from ..surgery import fold\n", True),
        ("functional/sub/y.py", "from ...diagnostics import stats\n", True),
        ("functional/x.py", "import normkit.cli\n", True),
        ("functional/x.py", "from normkit import nn as _nn\n", True),
        ("functional/x.py", "import importlib\nm = importlib.import_module('normkit.lab.plots')\n", True),
        ("functional/x.py", "def f():\n    from normkit.nn import GroupNorm\n", True),
        ("functional/x.py", "from . import _moments\nfrom ._checks import check_eps\nimport torch\n", False),
        (
            "functional/__init__.py",
            "from ._autograd import norm\nfrom .batch_norm import batch_norm\n",
            False,
        ),
        ("functional/x.py", "from .. import functional\nimport normkit.functional\n", False),
    ],
)
def test_the_import_scanner_itself(tmp_path, relpath, source, violates):
    path = tmp_path / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    assert bool(_upward(path, tmp_path)) is violates


def test_version_matches_the_installed_distribution():
    assert isinstance(normkit.__version__, str) and normkit.__version__
    assert normkit.__version__ == importlib.metadata.version("normkit")


@pytest.mark.parametrize("module", ["normkit", "normkit.nn", "normkit.functional"])
def test_every_name_in_all_resolves(module):
    mod = importlib.import_module(module)
    names = mod.__all__
    assert isinstance(names, (list, tuple)) and names
    assert len(set(names)) == len(names), "duplicates in __all__"
    missing = [n for n in names if not hasattr(mod, n)]
    assert missing == [], missing
    # `from module import *` gives exactly __all__.
    ns: dict[str, object] = {}
    exec(f"from {module} import *", ns)
    assert set(ns) - {"__builtins__"} == set(names)


def test_top_level_api_exposes_the_documented_entry_points():
    for name in ("functional", "nn", "create_norm_layer", "available_norms", "register_norm", "__version__"):
        assert name in normkit.__all__, name
    assert normkit.nn.BatchNorm2d.__module__.startswith("normkit.nn")
