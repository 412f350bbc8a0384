"""Stage 0 of ``benchmarks/gpu_check.sh``: every norm once through normkit's Triton kernels on the GPU.

For each op, layout and dtype: forward and forward + backward under ``normkit.kernels.use("triton")``
on a fresh random CUDA input, against torch.nn.functional in float64 on the CPU (an independent
oracle), with the Triton launches counted (so a silent fallback shows), and the output poisoned
first (NaN) so an unwritten element fails. Then one large device-to-device copy, the bandwidth
ceiling the bench's "% of peak" is read against. Prints one line per case and exits non-zero on any
failure; a few seconds on a GPU.

    PYTHONPATH=src python benchmarks/gpu_smoke.py
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as TF

import normkit.functional as NF
from normkit import kernels
from normkit.kernels import triton as nkt

F64 = torch.float64
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1, a local dry run
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # relative L2 error of outputs and gradients
# GN + proxy activation in bf16: the parameter gradients are sums with cancellation over bf16-rounded
# activations; normkit's reference path in bf16 is itself 3-5e-2 off float64 there (seen on (4,64,9,7)),
# the Triton kernels 4-7e-2 (the H200 run of 2026-12-04)
PN_BF16_GRAD_TOL = 1e-1


def _ln_c(x, w, b):
    return TF.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), w, b).permute(0, 3, 1, 2)


def _zeros(w):  # proxy_bias, proxy_weight
    return torch.zeros_like(w), torch.zeros_like(w)


def _pn_ref(x, w, b):
    # normkit's pure-PyTorch reference path (tested against closed forms on the CPU), in float64
    with kernels.use("reference"):
        return NF.group_norm_proxy_act(x, 32, w, b, *_zeros(w), eps=1e-5)


CASES = {
    "batch_norm train": (
        lambda x, w, b: NF.batch_norm(x, None, None, w, b, training=True).output,
        lambda x, w, b: TF.batch_norm(x, None, None, w, b, True),
        1,
    ),
    "group_norm G=32": (
        lambda x, w, b: NF.group_norm(x, 32, w, b),
        lambda x, w, b: TF.group_norm(x, 32, w, b),
        32,
    ),
    "group_norm G=1": (
        lambda x, w, b: NF.group_norm(x, 1, w, b),
        lambda x, w, b: TF.group_norm(x, 1, w, b),
        1,
    ),
    "instance_norm": (
        lambda x, w, b: NF.instance_norm(x, weight=w, bias=b).output,
        lambda x, w, b: TF.instance_norm(x, weight=w, bias=b),
        1,
    ),
    "layer_norm over C": (lambda x, w, b: NF.layer_norm_2d(x, w, b), _ln_c, 1),
    "GN32 + proxy act": (
        lambda x, w, b: NF.group_norm_proxy_act(
            x, 32, w, b, torch.zeros_like(w), torch.zeros_like(w), eps=1e-5
        ),
        _pn_ref,
        32,
    ),
}


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a = a.detach().to("cpu", F64)
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30)) if torch.isfinite(a).all() else float("nan")


def check(name: str, shape: tuple[int, ...], layout: str, dtype: torch.dtype) -> bool:
    ours, oracle, _ = CASES[name]
    x = torch.randn(shape, device=DEV).to(dtype)
    if layout == "cl":
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    w = (torch.rand(c, device=DEV) + 0.5).to(dtype)
    b = (torch.randn(c, device=DEV) * 0.5).to(dtype)
    dy = torch.randn_like(x)
    xs, ws, bs = (t.detach().requires_grad_(True) for t in (x, w, b))
    launches = {"forward": 0, "backward": 0}
    phase = ["forward"]
    real_kern = nkt._kern

    class _Counted:  # every Triton kernel launch of the phase (a silent fallback launches none)
        def __init__(self, kernels_module):
            self._m = kernels_module

        def __getattr__(self, name):
            kernel = getattr(self._m, name)

            class _Grid:
                def __getitem__(self, grid):
                    launches[phase[0]] += 1
                    return kernel[grid]

            return _Grid()

    try:
        nkt._kern = lambda: _Counted(real_kern())
        with kernels.use("triton"):
            y = ours(xs, ws, bs)
            phase[0] = "backward"
            grads = torch.autograd.grad(y, (xs, ws, bs), dy)
        _sync()
    finally:
        nkt._kern = real_kern
    x64, w64, b64 = (t.detach().to("cpu", F64).requires_grad_(True) for t in (x, w, b))
    y64 = oracle(x64, w64, b64)
    g64 = torch.autograd.grad(y64, (x64, w64, b64), dy.to("cpu", F64))
    errs = [_rel(y, y64.detach()), *(_rel(g, r) for g, r in zip(grads, g64))]
    tol = [TOL[dtype]] + [PN_BF16_GRAD_TOL if "proxy" in name and dtype == torch.bfloat16 else TOL[dtype]] * 3
    # the oracle itself in this dtype on the CPU: where the float64 answer is a cancellation (BatchNorm's
    # dx of two values per channel is ~0.1 of dy), its own error sets the scale, and 4x that passes
    xd, wd, bd = (t.detach().cpu().requires_grad_(True) for t in (x, w, b))
    yd = oracle(xd, wd, bd)
    own = [
        _rel(yd, y64.detach()),
        *(_rel(g, r) for g, r in zip(torch.autograd.grad(yd, (xd, wd, bd), dy.cpu()), g64)),
    ]
    tol = [max(t, 4 * o) for t, o in zip(tol, own)]
    ok = all(e <= t for e, t in zip(errs, tol)) and launches["forward"] >= 1 and launches["backward"] >= 1
    ok = ok and (layout != "cl" or y.is_contiguous(memory_format=torch.channels_last))
    print(
        f"{'ok  ' if ok else 'FAIL'} {name:18s} {str(shape):18s} {layout:4s} {str(dtype)[6:]:8s} "
        f"launches {launches['forward']}/{launches['backward']}  rel err y {errs[0]:.1e} "
        f"dx {errs[1]:.1e} dw {errs[2]:.1e} db {errs[3]:.1e}",
        flush=True,
    )
    return ok


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def copy_gbps() -> float:
    x = torch.randn(1 << 30, device=DEV, dtype=torch.bfloat16)  # 2 GiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * x.numel() * x.element_size() / (start.elapsed_time(end) * 1e-3) / 1e9


def check_route() -> bool:
    """``auto`` on CUDA: the calls normkit hands to torch (normkit.kernels._direct) against normkit's
    reference path in float64 on the CPU: outputs, layouts, BatchNorm's buffers (a NaN batch too)."""
    import normkit.nn as nkn
    from normkit.kernels import _direct

    ok = True
    cases = {
        "F.group_norm": lambda x: NF.group_norm(x, 32),
        "F.instance_norm": lambda x: NF.instance_norm(x).output,
        "F.layer_norm": lambda x: NF.layer_norm(x, x.shape[-1]),
        "F.layer_norm_2d": lambda x: NF.layer_norm_2d(x),
    }
    for name, fn in cases.items():
        for layout in ("nchw", "cl"):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(8, 64, 9, 7, device=DEV).to(dtype)
                if layout == "cl":
                    x = x.to(memory_format=torch.channels_last)
                took = _direct.route(x)
                y = fn(x)
                with kernels.use("reference"):
                    ref = fn(x.detach().to("cpu", F64))
                err = _rel(y, ref)
                good = err <= TOL[dtype] and (y.stride() == x.stride() or name == "F.layer_norm")
                ok &= good
                print(
                    f"{'ok  ' if good else 'FAIL'} auto {name:16s} {layout:4s} {str(dtype)[6:]:8s} "
                    f"route {took}  rel err {err:.1e}",
                    flush=True,
                )
    for layout in ("nchw", "cl"):
        bn, ref = nkn.BatchNorm2d(64).to(DEV), nkn.BatchNorm2d(64).double()
        x = torch.randn(8, 64, 9, 7, device=DEV)
        if layout == "cl":
            x = x.to(memory_format=torch.channels_last)
        xn = x.clone()
        xn[0, 0, 0, 0] = float("nan")
        for batch in (x, xn, x):
            bn(batch)
            with kernels.use("reference"):
                ref(batch.detach().to("cpu", F64))
        errs = [_rel(a, b) for a, b in zip(bn.buffers(), ref.buffers()) if a.is_floating_point()]
        counts = [int(a) for a in bn.buffers() if not a.is_floating_point()]
        want = [int(a) for a in ref.buffers() if not a.is_floating_point()]
        good = max(errs) <= 1e-5 and counts == want
        ok &= good
        print(
            f"{'ok  ' if good else 'FAIL'} auto BatchNorm2d {layout:4s} three steps (one NaN batch): "
            f"buffers rel err {max(errs):.1e}, counters {counts} (reference {want})",
            flush=True,
        )
    return ok


def main() -> int:
    import triton

    where = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter)"
    print("torch", torch.__version__, "triton", triton.__version__, where, flush=True)
    print(kernels.status(), flush=True)
    t = time.perf_counter()
    ok = True
    shapes = (
        [(4, 64, 9, 7), (2, 96, 1, 1), (16, 256, 28, 28)] if DEV == "cuda" else [(2, 64, 3, 5), (2, 32, 1, 1)]
    )
    for name in CASES:
        for shape in shapes:
            groups = shape[1] if name == "instance_norm" else CASES[name][2]
            if shape[1] % groups or shape[1] // groups * shape[2] * shape[3] == 1:  # one value per set
                continue
            for layout in ("nchw", "cl"):
                for dtype in (torch.float32, torch.bfloat16):
                    try:
                        ok &= check(name, shape, layout, dtype)
                    except Exception as e:  # report every case, not only the first failure
                        ok = False
                        print(f"FAIL {name} {shape} {layout} {dtype}: {type(e).__name__}: {e}", flush=True)
    if DEV == "cuda":
        try:
            ok &= check_route()
        except Exception as e:
            ok = False
            print(f"FAIL auto route: {type(e).__name__}: {e}", flush=True)
        print(f"copy (2 GiB bf16, read + write): {copy_gbps():.0f} GB/s", flush=True)
    print(f"smoke: {'all ok' if ok else 'FAILURES'} in {time.perf_counter() - t:.1f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
