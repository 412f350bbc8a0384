"""What ``torch.compile`` writes for normkit's GroupNorm on a GPU issues no more instructions than
what it writes for torch.nn's, read from the compiled code here, without a GPU.

``tests/kernels/inductor_compile.py`` has Inductor write its Triton code for both layers, compiles
each kernel for sm_90 and counts the instructions its threads issue over the whole input (the
SASS's static counts times the grid and the loop trips). The measure is the oracle's own code
generator on the layer normkit replaces: a GPU runs the streaming loops at the memory's speed only
if it can issue their instructions as fast (PERFORMANCE.md §5). Before the two-pass moments, the
forward of normkit's generated bfloat16 GroupNorm issued 1.75x torch.nn's (two Welford updates a
value, a division each). It runs in a fresh process, as the kernels must not be the interpreter's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip(
    "triton", reason="triton is not installed here (normkit's optional `triton` extra)"
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_generated_group_norm_issues_about_what_torch_nns_does():
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this triton build has no CUDA backend to compile for")
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        pytest.skip("this triton build ships no cuobjdump to read the compiled code with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run(
        [sys.executable, "-m", "tests.kernels.inductor_compile", "--layers", "GroupNorm(32)",
         "--dtypes", "bfloat16", "--shape", "8x64x32x32", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[
        -6000:
    ]  # (1 also if a kernel compiled in no configuration)
    sums = {
        (d["by"], d["step"]): d
        for d in (json.loads(ln[5:]) for ln in r.stdout.splitlines() if ln.startswith("json "))
    }
    assert set(sums) == {(by, p) for by in ("torch.nn", "normkit") for p in ("fwd", "bwd")}, r.stdout
    for p in ("fwd", "bwd"):
        ours, theirs = sums["normkit", p]["issue_us"], sums["torch.nn", p]["issue_us"]
        assert theirs > 0.1 * sums["torch.nn", p]["least_us"], r.stdout  # (kernels found and counted)
        assert ours <= 1.25 * theirs, (
            f"{p}: normkit {ours:.2f} us of issue, torch.nn {theirs:.2f}\n{r.stdout}"
        )
