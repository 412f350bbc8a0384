"""The lab sits on top of the import graph: ``import normkit`` loads none of it, nor its heavy
dependencies."""

from __future__ import annotations

import subprocess
import sys


def test_import_normkit_stays_light() -> None:
    code = (
        "import sys, normkit\n"
        "heavy = [m for m in ('normkit.lab', 'normkit.cli', 'matplotlib', 'sklearn', 'rich') if m in "
        "sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.strip() == ""


def test_lab_modules_import_without_plotting_libraries() -> None:
    code = (
        "import sys\n"
        "import normkit.cli, normkit.lab.experiments.compare, normkit.lab.experiments.power\n"
        "import normkit.lab.experiments.lr_sweep, normkit.lab.experiments.landscape, normkit.lab.report\n"
        "print(','.join(m for m in ('matplotlib', 'sklearn', 'rich') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.strip() == ""
