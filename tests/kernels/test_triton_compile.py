"""Every Triton kernel launch normkit's patterns make compiles for an sm_90 GPU, here, without one.

The interpreter tests (test_triton.py) check the kernels' arithmetic but not that Triton's compiler
accepts them; tests/kernels/triton_compile.py drives the same launchers with each launch replaced by
Triton's own compilation (to a cubin, through ptxas) against a stand-in sm_90 driver. It runs in a
fresh process: the kernels must not be the interpreter's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip(
    "triton", reason="triton is not installed here (normkit's optional `triton` extra)"
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(1900)  # the cold compile has its own 1800 s limit below
def test_every_triton_launch_compiles_for_a_cuda_gpu():
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this triton build has no CUDA backend to compile for")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run(
        [sys.executable, "-m", "tests.kernels.triton_compile", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    # every kernel of the module compiled at least once, and the GroupNorm channels-last kernels read
    # and write in 16-byte vectors (the point of their blocks across groups)
    lines = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.startswith("  ")}
    assert len(lines) >= 20, r.stdout
    for name in ("gcl_stats_kernel", "gcl_apply_kernel", "gcl_bwd_sums_kernel", "gcl_bwd_dx_kernel"):
        vec = int(lines[name].split("vector loads ")[1].split("/")[0])
        assert vec > 0, lines[name]
