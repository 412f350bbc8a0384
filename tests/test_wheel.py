"""The distributions: ``python -m build`` makes an sdist and a wheel that carry what they should,
``twine check`` passes, and the wheel installs into a fresh virtual environment and works there.

The fresh environment must not download torch (gigabytes for a CUDA build) nor see the checkout.
It gets torch the way a user's machine has it, installed, by a ``.pth`` file that points at a folder
of links to the distributions normkit depends on (torch and ninja and what they need, found in the
running environment); nothing else of the running environment (not its normkit, not the lab's
packages) is visible. pip then resolves the wheel's requirements against those, offline.

Needs the ``dist`` extra (``build``, ``twine``); without it the module is skipped. CI runs it after
the test suite: ``pip install -e ".[dist]" && python -m pytest tests/test_wheel.py``.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "normkit"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("build") is None,
    reason="the wheel tests need the dist extra: pip install -e '.[dist]'",
)


def _version_in_source() -> str:
    """``__version__`` as written in src/normkit/__init__.py (the one place it is set)."""
    tree = ast.parse((SRC / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", None) == "__version__" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError("src/normkit/__init__.py sets no __version__")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    )
    return proc


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build the sdist, and the wheel from the sdist (``python -m build``'s default), once."""
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)])
    (sdist,) = out.glob("normkit-*.tar.gz")
    (wheel,) = out.glob("normkit-*-py3-none-any.whl")
    return {"sdist": sdist, "wheel": wheel}


def test_version_comes_from_one_place(dists: dict[str, Path]) -> None:
    version = _version_in_source()
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]|rc)?\d*(\.dev\d+)?", version)
    assert dists["wheel"].name == f"normkit-{version}-py3-none-any.whl"
    assert dists["sdist"].name == f"normkit-{version}.tar.gz"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"], (
        "pyproject.toml sets a version of its own"
    )
    with zipfile.ZipFile(dists["wheel"]) as zf:
        metadata = zf.read(f"normkit-{version}.dist-info/METADATA").decode()
    assert f"\nVersion: {version}\n" in metadata


def test_wheel_carries_the_package_and_nothing_else(dists: dict[str, Path]) -> None:
    version = _version_in_source()
    with zipfile.ZipFile(dists["wheel"]) as zf:
        names = set(zf.namelist())
        entry_points = zf.read(f"normkit-{version}.dist-info/entry_points.txt").decode()
        metadata = zf.read(f"normkit-{version}.dist-info/METADATA").decode()
    info = f"normkit-{version}.dist-info/"
    package = {n for n in names if not n.startswith(info)}

    # Every module of the source tree, the typing marker and the C++ sources the kernels build from.
    expected = {
        p.relative_to(SRC.parent).as_posix() for p in SRC.rglob("*.py") if "__pycache__" not in p.parts
    }
    expected |= {p.relative_to(SRC.parent).as_posix() for p in (SRC / "kernels" / "csrc").glob("*.cpp")}
    expected.add("normkit/py.typed")
    assert package == expected, (
        f"missing from the wheel: {sorted(expected - package)}; "
        f"unexpected in it: {sorted(package - expected)}"
    )
    assert {
        "normkit/py.typed",
        "normkit/kernels/csrc/norm_cpu.cpp",
        "normkit/kernels/csrc/autograd.cpp",
    } <= package
    for bad in (
        "tests/",
        "docs/",
        "runs/",
        "benchmarks/",
        "__pycache__",
        ".pyc",
        ".so",
        ".egg-info",
        "build/",
    ):
        assert not any(bad in n for n in names), f"{bad} in the wheel"

    assert {n[len(info) :] for n in names if n.startswith(info)} == {
        "METADATA",
        "WHEEL",
        "RECORD",
        "entry_points.txt",
        "top_level.txt",
    }
    assert re.search(r"(?m)^\[console_scripts\]\nnormkit = normkit\.cli:main$", entry_points)
    assert "Requires-Python: >=3.11" in metadata
    assert "Requires-Dist: torch>=2.11" in metadata
    assert "License-Expression: Apache-2.0" in metadata
    assert "Description-Content-Type: text/markdown" in metadata
    for extra in ("lab", "test", "triton", "docs", "dist"):
        assert f"Provides-Extra: {extra}" in metadata


def test_sdist_carries_the_sources_readme_and_changelog(dists: dict[str, Path]) -> None:
    with tarfile.open(dists["sdist"]) as tf:
        names = [n.split("/", 1)[1] for n in tf.getnames() if "/" in n]
    for need in (
        "pyproject.toml",
        "README.md",
        "CHANGELOG.md",
        "src/normkit/__init__.py",
        "src/normkit/py.typed",
    ):
        assert need in names
    for bad in ("tests/", "docs/", "runs/", "benchmarks/", ".ci/"):
        assert not any(n.startswith(bad) for n in names), f"{bad} in the sdist"
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)


def test_twine_check_passes(dists: dict[str, Path]) -> None:
    if importlib.util.find_spec("twine") is None:
        pytest.skip("twine is not installed (the dist extra installs it)")
    proc = _run(
        [sys.executable, "-m", "twine", "check", "--strict", str(dists["sdist"]), str(dists["wheel"])]
    )
    assert proc.stdout.count("PASSED") == 2, proc.stdout


def _requirement_closure(names: list[str]) -> list[md.Distribution]:
    """The installed distributions ``names`` need, transitively (extras and inapplicable markers left out)."""
    from packaging.requirements import Requirement

    seen: dict[str, md.Distribution] = {}
    todo = list(names)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            pytest.fail(f"{name}, a requirement of normkit, is not installed here: pip install -e . first")
        seen[name] = dist
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def _link_dependencies(target: Path) -> None:
    """Link the top-level entries (packages, modules, dist-info) of normkit's dependencies into ``target``."""
    target.mkdir()
    for dist in _requirement_closure(["torch", "ninja"]):
        site = Path(str(dist.locate_file("")))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            src = site / top
            if src.exists() and not (target / top).exists():
                (target / top).symlink_to(src)


@pytest.fixture(scope="module")
def installed(dists: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A fresh venv with the wheel installed by pip, torch reachable, nothing of the checkout."""
    root = tmp_path_factory.mktemp("venv")
    env_dir = root / "env"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip()
    )
    deps = root / "deps"
    _link_dependencies(deps)
    (site / "_normkit_test_deps.pth").write_text(f"{deps}\n")

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    }
    env.update(
        PIP_NO_INPUT="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        NORMKIT_NO_BUILD="1",  # the smoke test runs on the reference backend; no compiler needed
        NORMKIT_CACHE=str(root / "cache"),
        PATH=f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}",
    )
    # The venv's own setuptools (Python 3.11's ensurepip) would shadow the linked one that torch asks for.
    _run([str(python), "-m", "pip", "uninstall", "-y", "setuptools"], env=env, cwd=root)
    # --no-index: the requirements (torch, ninja) must be found installed, never downloaded.
    _run([str(python), "-m", "pip", "install", "--no-index", str(dists["wheel"])], env=env, cwd=root)
    _run([str(python), "-m", "pip", "check"], env=env, cwd=root)
    return {"python": python, "env": env, "cwd": root, "bin": env_dir / "bin", "site": site}


def test_console_script_runs_from_the_installed_wheel(installed: dict[str, object]) -> None:
    script = Path(str(installed["bin"])) / "normkit"
    assert script.exists(), "the wheel installed no normkit console script"
    proc = _run([str(script), "--help"], env=installed["env"], cwd=installed["cwd"])
    for command in ("compare", "power", "lr-sweep", "landscape", "report", "kernels", "bench"):
        assert command in proc.stdout, f"{command!r} missing from `normkit --help`:\n{proc.stdout}"
    proc = _run([str(script), "kernels", "status"], env=installed["env"], cwd=installed["cwd"])
    assert proc.stdout.strip()


def test_import_smoke_test_in_the_fresh_venv(installed: dict[str, object]) -> None:
    code = """
import importlib.resources, json, sys
import torch, normkit
bn = normkit.nn.BatchNorm2d(4)
y = bn(torch.randn(8, 4, 5, 5))
ok = bool(torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5))
files = importlib.resources.files("normkit")
print(json.dumps({
    "file": normkit.__file__, "version": normkit.__version__, "ok": ok,
    "typed": files.joinpath("py.typed").is_file(),
    "csrc": sorted(p.name for p in files.joinpath("kernels", "csrc").iterdir()),
    "heavy": sorted(m for m in ("matplotlib", "sklearn", "rich", "normkit.lab") if m in sys.modules),
}))
"""
    import json

    proc = _run([str(installed["python"]), "-c", code], env=installed["env"], cwd=installed["cwd"])
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(got["file"]).is_relative_to(Path(str(installed["site"]))), got[
        "file"
    ]  # the wheel, not the checkout
    assert got["version"] == _version_in_source()
    assert got["ok"] and got["typed"]
    assert {"norm_cpu.cpp", "autograd.cpp"} <= set(got["csrc"])
    assert got["heavy"] == []  # `import normkit` stays light: the lab's packages load only when used
