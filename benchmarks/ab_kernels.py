"""A/B timing of two builds of the fused CPU kernels, loaded side by side in one process.

    python benchmarks/ab_kernels.py                      # HEAD's norm_cpu.cpp (A) vs the working tree's (B)
    python benchmarks/ab_kernels.py --base HEAD~3 --modes group_cl,batch_cl --shapes 8x256x28x28

This machine's speed drifts 10-30 % within minutes, more than most kernel changes gain: two runs of
``normkit bench`` minutes apart cannot tell a 10 % improvement from noise. This script builds both
versions of ``src/normkit/kernels/csrc/norm_cpu.cpp`` (each under its own op namespace, through the
source's ``NORMKIT_CPU_NS`` macro, so the two libraries load together), then times the kernels' C
entry points directly (forward, backward, and forward then backward, which is what training pays:
x, y, dy and dx all live), interleaving A and B in a random order each repeat and keeping each one's
best. Builds are cached by content hash under the normkit cache (``NORMKIT_CACHE``). Read ratios
within about 5 % as equal.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import subprocess
import timeit
from pathlib import Path

import torch

from normkit.bench import _turns
from normkit.kernels import _build

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "src/normkit/kernels/csrc/norm_cpu.cpp"
MODES = {
    "batch_nchw": 0,
    "batch_cl": 1,
    "group_nchw": 2,
    "group_cl": 3,
    "channel_nchw": 4,
    "rows": 2,
    "gn_act_nchw": 2,
    "gn_act_cl": 3,
    "act_nchw": 2,
    "act_cl": 3,
}
# "rows": LayerNorm over the last dim (GROUP_NCHW with one group and S = 1): --shapes 6272x256 is
# LayerNorm2d of (8, 256, 28, 28) channels_last; "gn_act_*": GroupNormProxyAct2d's fused GroupNorm +
# ReLU + proxy scaling (normkit_gn_act_forward / _backward); "act_*": Proxy Norm's activation step alone
# (normkit_act_forward / _backward, ReLU)


def source_of(rev: str | None) -> str:
    """norm_cpu.cpp at a git revision, the working tree's (``None``), or a file's (a path ending in .cpp)."""
    if rev is None:
        return (ROOT / SOURCE).read_text()
    if rev.endswith(".cpp"):
        return Path(rev).read_text()
    return subprocess.run(
        ["git", "show", f"{rev}:{SOURCE}"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout


def variant_namespace(text: str) -> str:
    """The op namespace of one variant: unique per source text, a valid C++ identifier."""
    return "nkab_" + hashlib.sha256(text.encode()).hexdigest()[:12]


def build(text: str) -> str:
    """Compile one variant (cached by content) and return the shared library's path."""
    from torch.utils import cpp_extension

    ns = variant_namespace(text)
    d = _build.build_dir() / "ab" / ns
    d.mkdir(parents=True, exist_ok=True)
    src = d / f"{ns}.cpp"
    if not src.exists() or src.read_text() != text:
        src.write_text(text)
    with _build.exclusive(d):
        return str(
            cpp_extension.load(
                name=ns,
                sources=[str(src)],
                extra_cflags=[*_build.CFLAGS, f"-DNORMKIT_CPU_NS={ns}"],
                build_directory=str(d),
                is_python_module=False,
            )
        )


def parse_shape(s: str) -> tuple[int, ...]:
    dims = tuple(int(v) for v in s.lower().split("x"))
    if len(dims) < 2 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected a shape like 8x256x28x28, got {s!r}")
    return dims


def _calls(so, name: str, shape: tuple[int, ...], groups: int):
    mode = MODES[name]
    groups = 1 if name == "rows" else groups
    x = torch.randn(shape)
    if mode in (MODES["batch_cl"], MODES["group_cl"]) and len(shape) == 4:
        x = x.to(memory_format=torch.channels_last)
    N, C = shape[0], shape[1]
    S = x.numel() // (N * C)
    G = groups if mode in (MODES["group_nchw"], MODES["group_cl"]) else 1
    if C % G:
        raise SystemExit(f"--groups {G} does not divide C={C}")
    nsets = C if mode <= 1 else (N * S if mode == 4 else N * G)
    w, b = torch.randn(C), torch.randn(C)
    st, dy = torch.empty(6, nsets), torch.randn_like(x)
    dw, db = torch.empty(C), torch.empty(C)

    m, r, sums = torch.randn(C), torch.rand(C) + 0.5, torch.empty(4, C, dtype=torch.float64)  # the act modes'
    if name.startswith("gn_act"):

        def fwd():
            y = torch.empty_like(x)
            so.normkit_gn_act_forward(
                0, x.data_ptr(), w.data_ptr(), b.data_ptr(), m.data_ptr(), r.data_ptr(), y.data_ptr(),
                st.data_ptr(), mode, N, C, S, G, 1e-5, 0, 0.0,
            )  # fmt: skip

        def bwd():
            dx = torch.empty_like(x)
            so.normkit_gn_act_backward(
                0, dy.data_ptr(), x.data_ptr(), w.data_ptr(), b.data_ptr(), m.data_ptr(), r.data_ptr(),
                st.data_ptr(), dx.data_ptr(), sums.data_ptr(), mode, N, C, S, G, 0, 0.0,
            )  # fmt: skip

    elif name.startswith("act"):
        cl = int(name.endswith("cl"))

        def fwd():
            y = torch.empty_like(x)
            so.normkit_act_forward(
                0, x.data_ptr(), w.data_ptr(), b.data_ptr(), m.data_ptr(), r.data_ptr(), y.data_ptr(),
                0, 0.0, N, C, S, cl,
            )  # fmt: skip

        def bwd():
            dx = torch.empty_like(x)
            so.normkit_act_backward(
                0, dy.data_ptr(), x.data_ptr(), w.data_ptr(), b.data_ptr(), m.data_ptr(), r.data_ptr(),
                dx.data_ptr(), sums.data_ptr(), 0, 0.0, N, C, S, cl,
            )  # fmt: skip

    else:
        # y and dx are fresh each call, as in training (fixed buffers stay cached between calls and hid
        # a 1.5x slower row backward)
        fwd, bwd = _norm_calls(so, x, w, b, st, dy, dw, db, mode, N, C, S, G)

    def both():
        fwd()
        bwd()

    fwd()  # the statistics the backward reads
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}


def _norm_calls(so, x, w, b, st, dy, dw, db, mode, N, C, S, G):
    def fwd():
        y = torch.empty_like(x)
        so.normkit_forward(
            0, x.data_ptr(), w.data_ptr(), b.data_ptr(), y.data_ptr(), st.data_ptr(), mode, N, C, S, G, 1e-5
        )

    def bwd():
        dx = torch.empty_like(x)
        so.normkit_backward(
            0, dy.data_ptr(), x.data_ptr(), w.data_ptr(), st.data_ptr(), dx.data_ptr(), dw.data_ptr(),
            db.data_ptr(), mode, N, C, S, G,
        )  # fmt: skip

    return fwd, bwd


def _rotating(sets: list[dict]) -> dict:
    """Calls that take the next of several independent inputs each time: with enough of them (their x
    and dy together beyond the last-level cache), every call reads its inputs from memory, as a
    training step does; one input reused stays cached when the outputs bypass the cache."""
    turns = {ps: _turns(len(sets)) for ps in sets[0]}
    return {ps: (lambda ps=ps: sets[turns[ps]()][ps]()) for ps in sets[0]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--base", default="HEAD", help="git revision of A, or a .cpp file (default: HEAD)")
    p.add_argument(
        "--other", default=None, help="git revision of B, or a .cpp file (default: the working tree)"
    )
    p.add_argument("--modes", default="group_cl", help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument(
        "--shapes", type=lambda s: [parse_shape(v) for v in s.split(",")], default=[(8, 256, 28, 28)]
    )
    p.add_argument("--groups", type=int, default=32, help="G of the group patterns (default: 32)")
    p.add_argument("--repeats", type=int, default=8, help="interleaved repeats (default: 8)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--rotate",
        type=int,
        default=1,
        help="independent inputs taken in turn (default: 1, one input reused); 4 or more at the "
        "PERFORMANCE.md shapes put every call's inputs out of the cache",
    )
    a = p.parse_args(argv)
    modes = a.modes.split(",")
    for m in modes:
        if m not in MODES:
            p.error(f"--modes: unknown mode {m!r}; expected one of {', '.join(MODES)}")
    torch.set_num_threads(a.threads)
    texts = {"A": source_of(a.base), "B": source_of(a.other)}
    libs = {k: _build._bind(build(t)) for k, t in texts.items()}
    print(
        f"A = {a.base}, B = {a.other or 'working tree'}; {a.threads} threads, "
        f"best of {a.repeats} interleaved, {max(1, a.rotate)} input(s) in turn\n"
    )
    print("| mode | shape | pass | A ms | B ms | B / A |")
    print("|---|---|---|---:|---:|---:|")
    for mode in modes:
        for shape in a.shapes:
            calls = {
                k: _rotating([_calls(so, mode, shape, a.groups) for _ in range(max(1, a.rotate))])
                for k, so in libs.items()
            }
            best = {(k, ps): float("inf") for k in libs for ps in ("fwd", "bwd", "fwd+bwd")}
            for _ in range(a.repeats):
                order = list(libs)
                random.shuffle(order)
                for k in order:
                    for ps, fn in calls[k].items():
                        t = min(timeit.repeat(fn, number=20, repeat=3)) / 20 * 1e3
                        best[(k, ps)] = min(best[(k, ps)], t)
            for ps in ("fwd", "bwd", "fwd+bwd"):
                ta, tb = best[("A", ps)], best[("B", ps)]
                print(f"| {mode} | {shape} | {ps} | {ta:.3f} | {tb:.3f} | {tb / ta:.2f} |")


if __name__ == "__main__":
    main()
