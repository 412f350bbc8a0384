"""Compile every Triton kernel launch normkit's tests make, for a CUDA GPU, on a machine without one.

Triton's interpreter (tests/kernels/test_triton.py) runs the kernels' arithmetic on CPU tensors, but
it is plain Python: code that the compiler rejects (a name typed differently on two branches, a
loop-carried value that changes type, a constexpr misuse) passes there and fails on the first GPU
launch. This drives the same launchers with CPU tensors while every ``kernel[grid](...)`` launch is
replaced by Triton's own ``warmup`` (specialisation, then compilation through TTIR, TTGIR, LLVM IR,
PTX and ptxas to a cubin) against a stand-in driver that reports an sm_90 (H100 / H200) target.
Nothing runs: the outputs are left unwritten, which the launchers never read back.

It must run in a process without ``TRITON_INTERPRET=1`` (the kernels must be JIT functions, not
interpreted ones)::

    python -m tests.kernels.triton_compile            # every pattern, dtype, layout and activation
    python -m tests.kernels.triton_compile --quick    # float32 and bfloat16 only
    python -m tests.kernels.triton_compile --quick --dtypes bfloat16    # one of them

It prints one line per kernel (variants compiled; vectorised global loads / all global loads in
their PTX, a static view of coalescing; registers per thread and bytes spilled to local memory, from
the cuobjdump that ships with Triton) and exits 1 if any launch failed to compile or spills.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import defaultdict
from typing import Any

import torch

# (triton and normkit's kernels are imported in main(): pytest's doctest collection imports this
# module, with TRITON_INTERPRET=1 and perhaps without triton)
F: Any = None
kernels: Any = None
nkt: Any = None
_kernels: Any = None


def _sm90(arch: int) -> Any:
    """A driver that only names its target: enough for Triton to specialise and compile."""
    from triton.backends import DriverBase
    from triton.backends.compiler import GPUTarget

    class _Target(DriverBase):
        def __init__(self) -> None:
            self.target = GPUTarget("cuda", arch, 32)

        @classmethod
        def is_active(cls) -> bool:
            return True

        def map_python_to_cpp_type(self, ty: str) -> str:
            raise NotImplementedError

        def get_current_target(self) -> Any:
            return self.target

        def get_active_torch_device(self) -> torch.device:
            return torch.device("cpu")

        def get_benchmarker(self) -> Any:
            raise NotImplementedError

        def get_current_device(self) -> int:
            return 0

        def get_current_stream(self, device: int | None = None) -> int:
            return 0

        def set_current_device(self, device: int) -> None:
            pass

        def get_device_capability(self, device: int = 0) -> tuple[int, int]:
            return divmod(arch, 10)

    return _Target()


def setup(arch: int = 90) -> None:
    """Import triton and the kernels (compiled, not interpreted), make every launch a compilation
    against an sm_``arch`` target, and let CPU tensors take the Triton launchers."""
    global F, kernels, nkt, _kernels
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("triton_compile: run without TRITON_INTERPRET=1 (the kernels must be compiled)")
    from triton.runtime.driver import driver

    import normkit.functional as F_
    from normkit import kernels as kernels_
    from normkit.kernels import triton as nkt_
    from normkit.kernels.triton import _kernels as kernels_mod

    F, kernels, nkt, _kernels = F_, kernels_, nkt_, kernels_mod
    driver.set_active(_sm90(arch))
    nkt._kern = _Kernels  # each launch compiles, nothing runs
    nkt.interpreting = lambda: True  # CPU tensors take the Triton launchers


FAILURES: list[str] = []
COMPILED: dict[str, list[Any]] = defaultdict(list)


class _Warm:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __getitem__(self, grid: tuple[int, ...]) -> Any:
        def launch(*args: Any, **kwargs: Any) -> None:
            name = self.fn.__name__
            try:
                k = self.fn.warmup(*args, grid=grid, **kwargs)
            except Exception as e:  # (a compile error: recorded, the launcher goes on)
                FAILURES.append(f"{name}: {type(e).__name__}: {str(e).strip()[:2000]}")
                return
            if all(k is not c for c in COMPILED[name]):
                COMPILED[name].append(k)

        return launch


class _Kernels:
    def __getattr__(self, name: str) -> Any:
        return _Warm(getattr(_kernels, name))


def _run(fn: Any, *args: Any) -> None:
    with kernels.use("triton"):
        out = fn(*args)
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if isinstance(o, torch.Tensor)]
        outs = [o for o in outs if o.requires_grad]
        if outs:
            ins = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
            torch.autograd.grad(outs, ins, [torch.zeros_like(o) for o in outs], allow_unused=True)


def drive(dtypes: list[torch.dtype], acts: list[str]) -> None:
    """Every launch pattern: the norms on both layouts (forward, backward with and without the
    parameters' gradients, with and without an affine), the split reduction, Proxy Norm's step and
    statistics, and GroupNorm + proxy activation fused."""
    from normkit.functional.proxy_norm import proxy_points
    from normkit.nn import GroupNormProxyAct2d

    nkt._programs = lambda device: 4 * 132  # an H100 / H200's chunking policy
    for dtype in dtypes:
        pd = torch.float64 if dtype == torch.float64 else torch.float32
        # (3, 64, 9, 7): ragged tiles, sizes Triton cannot specialise; (2, 64, 32, 32): aligned sizes
        # (vectorised accesses) and sets too few to fill the device (the split reduction); then every
        # set cut into chunks of 16 positions on the first shape
        for shape, force in (((3, 64, 9, 7), None), ((2, 64, 32, 32), None), ((3, 64, 9, 7), 16)):
            nkt._FORCE_CHUNK = force
            for layout in ("nchw", "cl"):
                x = torch.zeros(shape, dtype=dtype)
                if layout == "cl":
                    x = x.to(memory_format=torch.channels_last)
                x.requires_grad_()
                w = torch.ones(64, dtype=pd, requires_grad=True)
                b = torch.zeros(64, dtype=pd, requires_grad=True)
                for affine in ((w, b), (None, None)):
                    _run(lambda x, *p: F.group_norm(x, 32, *p), x, *affine)
                    _run(lambda x, *p: F.group_norm(x, 1, *p), x, *affine)
                    _run(lambda x, *p: F.batch_norm(x, None, None, *p, training=True).output, x, *affine)
                    _run(lambda x, *p: F.instance_norm(x, weight=p[0], bias=p[1]).output, x, *affine)
                    _run(lambda x, *p: F.layer_norm_2d(x, *p), x, *affine)
                _run(lambda w, b, x=x: F.group_norm(x.detach(), 32, w, b), w, b)  # parameters only
                lw = torch.ones(shape[1:], dtype=pd, requires_grad=True)
                _run(lambda x, w: F.layer_norm(x, x.shape[1:], w, None), x, lw)
                _run(lambda x: F.layer_norm(x, x.shape[-1:]), x)
            nkt._FORCE_CHUNK = None
        if dtype == dtypes[0]:  # the WIDE variants (int64 statistic rows, launched past ~358M sets)
            nkt._FORCE_WIDE = True
            for layout in ("nchw", "cl"):
                x = torch.zeros((3, 64, 9, 7), dtype=dtype)
                if layout == "cl":
                    x = x.to(memory_format=torch.channels_last)
                x.requires_grad_()
                w = torch.ones(64, dtype=pd, requires_grad=True)
                b = torch.zeros(64, dtype=pd, requires_grad=True)
                _run(lambda x, *p: F.group_norm(x, 32, *p), x, w, b)
                _run(lambda x, *p: F.layer_norm_2d(x, *p), x, w, b)
                _run(lambda x: F.layer_norm(x, x.shape[-1:]), x)
                layer = GroupNormProxyAct2d(64, num_groups=32, activation=acts[0]).to(dtype)
                _run(layer, x)
            nkt._FORCE_WIDE = False
        for layout in ("nchw", "cl"):
            x = torch.zeros(3, 8, 5, 6, dtype=dtype)
            if layout == "cl":
                x = x.to(memory_format=torch.channels_last)
            x.requires_grad_()
            for act in acts:
                layer = GroupNormProxyAct2d(8, num_groups=2, activation=act).to(dtype)
                _run(layer, x)
                _run(lambda x, *p, a=act: F.proxy_norm_act(x, *p, activation=a), x, *layer.parameters())
        # BatchNorm's running statistics in one launch (the route to torch's op on a GPU)
        z = torch.zeros((), dtype=torch.int64)
        for mom, nbt, skip in ((0.1, z, z), (None, z, None), (0.1, None, None)):
            vecs = [torch.zeros(64, dtype=pd) for _ in range(4)]
            nkt.bn_running_update(*vecs, nbt, skip, mom, 1.0)
            # (the layers' path under use("triton"): from the forward kernels' saved statistics)
            stats = torch.ones(6 * 64, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
            nkt.bn_running_update_from_stats(stats, 16, *vecs[2:], nbt, skip, mom, True)
        u = proxy_points(200, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        for act in acts:  # (on CPU the statistics take the C++ kernels: called directly here)
            ps = [torch.ones(8, dtype=u.dtype, requires_grad=True) for _ in range(4)]
            _run(lambda *p, u=u, a=act: nkt.proxy_stats(*p, u, a, 0.03), *ps)


def _loads(ptx: str) -> tuple[int, int]:
    loads = re.findall(r"\bld\.global(?:\.\w+)*", ptx)
    return sum(".v" in ld for ld in loads), len(loads)


def _resources(cubin: bytes) -> tuple[int, int] | None:
    """``(registers per thread, local memory bytes)`` of a cubin from the cuobjdump that ships with
    Triton (local memory is where registers spill), or ``None`` without it."""
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
    reg, local = re.search(r"REG:(\d+)", out), re.search(r"LOCAL:(\d+)", out)
    return (int(reg.group(1)), int(local.group(1))) if reg and local else None


def _sass(cubin: bytes) -> str:
    """The cubin's SASS (the GPU's own instructions) from Triton's cuobjdump, or "" without it."""
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([tool, "-sass", path], capture_output=True, text=True).stdout


def _inner_bodies(sass: str) -> list[list[str]]:
    """The instructions of each innermost loop of a kernel's SASS: the bodies between a backward
    branch and its target that hold no other such loop."""
    code = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    spans = []
    for at, ins in code:
        t = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", ins)
        if t and int(t.group(1), 16) < at:
            spans.append((int(t.group(1), 16), at))
    inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    return [[i for at, i in code if lo <= at <= hi] for lo, hi in inner]


def _inner_loops(sass: str) -> list[tuple[int, int, int]]:
    """``(instructions, barriers, global bytes)`` per thread of each innermost loop of a kernel's
    SASS (:func:`_inner_bodies`). These are the per-tile steps that stream the tensor; a barrier
    there (a shared-memory round trip, e.g. a layout conversion or a reduction across warps) stalls
    every step."""
    return [
        (len(body), sum("BAR.SYNC" in i for i in body), sum(_access_bytes(i) for i in body))
        for body in _inner_bodies(sass)
    ]


def _inner_load_bytes(sass: str) -> list[int]:
    """Global bytes one thread loads (LDG only) in each innermost loop of :func:`_inner_loops`."""
    return [sum(_access_bytes(i) for i in body if "LDG" in i) for body in _inner_bodies(sass)]


def _access_bytes(ins: str) -> int:
    """Bytes one thread moves with a global load or store instruction (0 for any other)."""
    m = re.search(r"\b(?:LDG|STG)\.E(\S*)", ins)
    if not m:
        return 0
    width = re.search(r"\.(128|64|U16|S16|U8|S8)\b", m.group(1))
    return {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}.get(width.group(1), 4) if width else 4


def _tile_per_thread(k: Any) -> int | None:
    """Values of a kernel's tile per thread (its ``BC`` x ``BM`` or ``BCC`` x ``BE`` constexprs over
    its threads), or ``None`` for a kernel without such a tile."""
    try:
        names = k.src.fn.arg_names
        consts = {names[key[0] if isinstance(key, tuple) else key]: v for key, v in k.src.constants.items()}
    except Exception:  # (another Triton's layout of the compiled kernel's source)
        return None
    tile = [consts[n] for n in ("BC", "BM", "BCC", "BE") if isinstance(consts.get(n), int)]
    if len(tile) != 2:
        return None
    return max(1, tile[0] * tile[1] // (32 * k.metadata.num_warps))


# the kernels that stream the tensor for statistics or sums: none may hold a barrier in a loop step
# (measured before: the Welford count in its own layout cost four per step in the per-set walk)
NO_BARRIER = (
    "bn_bwd_sums_kernel", "bn_moments_kernel", "bn_stats_kernel", "gcl_bwd_sums_kernel",
    "gcl_stats_kernel", "ln2d_fwd_kernel", "split_stats_kernel",
)  # fmt: skip


# An H100 / H200 SXM: 132 SMs, four warp schedulers each issuing one instruction a clock at up to
# 1.98 GHz (32 threads each); HBM3e at 4.8 TB/s (the H200's datasheet; 4.23 TB/s measured for a copy)
ISSUE = 132 * 4 * 1.98e9 * 32  # thread-instructions per second
PEAK = 4.8e12  # bytes per second


def roofline(shape: tuple[int, ...] = (64, 256, 56, 56)) -> list[str]:
    """The issue-bound share of peak bandwidth of every streaming loop of the main patterns, forward
    and backward, on ``shape`` (bfloat16 and float32, NCHW and channels-last), read from the compiled
    SASS: each innermost loop's instructions and global bytes per value. A loop of ``i``
    instructions and ``b`` bytes per value cannot run faster than ``max(i / ISSUE, b / PEAK)`` a
    value; ``min(1, (b / PEAK) / (i / ISSUE))`` is the share of peak bandwidth instruction issue
    leaves it (latency, occupancy and the memory system take more: a GPU measures the rest). The
    last columns: the kernel's registers per thread, the warps an SM holds with them
    (:func:`_resident_warps`), and the bytes an SM has in flight when each of those warps waits on
    one loop step's global loads (KiB): by Little's law a loop sustains at most that over the
    memory latency per SM (an H200 at peak needs about 36 B/ns x ~600 ns, ~22 KiB, an assumed
    latency that a GPU measures). Returns the table's lines."""
    from normkit.functional.proxy_norm import proxy_points  # noqa: F401 (Proxy Norm's quadrature, loaded)

    ops = {
        "group_norm G=32": lambda x, w, b: F.group_norm(x, 32, w, b),
        "instance_norm": lambda x, w, b: F.instance_norm(x, weight=w, bias=b).output,
        "group_norm G=1": lambda x, w, b: F.group_norm(x, 1, w, b),
        "batch_norm train": lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True).output,
        "layer_norm_2d": lambda x, w, b: F.layer_norm_2d(x, w, b),
        "GN32 + proxy act": lambda x, w, b: F.group_norm_proxy_act(x, 32, w, b, w * 0, w * 0 + 1),
        "proxy act step": lambda x, w, b: F.proxy_norm_act(x, w, b, w * 0, w * 0 + 1),
    }
    nkt._programs = lambda device: 4 * 132
    lines = [
        f"{'op':18s} {'layout':6s} {'dtype':9s} {'kernel':24s} {'values/thread':>13s} {'instr/value':>11s} "
        f"{'bytes/value':>11s} {'issue-bound % of peak':>21s} {'regs':>5s} {'warps':>5s} {'KiB/SM':>8s}"
    ]
    for name, fn in ops.items():
        for layout in ("nchw", "cl"):
            for dtype in (torch.bfloat16, torch.float32):
                COMPILED.clear()
                x = torch.zeros(shape, dtype=dtype)
                if layout == "cl":
                    x = x.to(memory_format=torch.channels_last)
                w = torch.ones(shape[1], requires_grad=True)
                b = torch.zeros(shape[1], requires_grad=True)
                _run(fn, x.requires_grad_(), w, b)
                for kname in sorted(set(COMPILED) - {"gcl_combine_kernel", "gcl_bwd_combine_kernel"}):
                    for k in COMPILED[kname]:  # (the combining kernels walk per-channel partials)
                        per = _tile_per_thread(k)
                        if not per:
                            continue
                        sass = _sass(k.asm["cubin"])
                        res = _resources(k.asm["cubin"])
                        warps = _resident_warps(res[0], k.metadata.num_warps) if res else 0
                        for (n, _, nbytes), ld in zip(_inner_loops(sass), _inner_load_bytes(sass)):
                            if nbytes == 0:
                                continue
                            i, by = n / per, nbytes / per
                            share = min(1.0, (by / PEAK) / (i / ISSUE))
                            flight = warps * 32 * ld
                            lines.append(
                                f"{name:18s} {layout:6s} {str(dtype)[6:]:9s} {kname:24s} {per:13d} {i:11.1f} "
                                f"{by:11.1f} {100 * share:20.0f}% {res[0] if res else 0:5d} {warps:5d} "
                                f"{flight / 1024:8.1f}"
                            )
    return lines


def _resident_warps(regs: int, num_warps: int) -> int:
    """Warps one SM of a Hopper GPU holds for a kernel with ``regs`` registers per thread, as the
    register file allows (65536 per SM, allocated 256 per warp; at most 64 warps): a bandwidth-bound
    kernel with few resident warps has few loads in flight."""
    per_warp = -(-regs * 32 // 256) * 256
    return min(64, 65536 // (per_warp * num_warps) * num_warps)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="float32 and bfloat16, two activations")
    ap.add_argument("--arch", type=int, default=90, help="the CUDA compute capability (default 90)")
    ap.add_argument(
        "--roofline",
        action="store_true",
        help="only the issue-bound share of peak bandwidth of each loop on a ResNet-50 activation",
    )
    ap.add_argument(
        "--dtypes",
        help="only these input dtypes, comma-separated (e.g. float32,bfloat16): the test splits the "
        "work between processes this way",
    )
    a = ap.parse_args(argv)
    setup(a.arch)
    if a.roofline:
        print("\n".join(roofline()))
        return 0
    import triton

    t0 = time.perf_counter()
    dtypes = [torch.float32, torch.bfloat16] + ([] if a.quick else [torch.float16, torch.float64])
    if a.dtypes:
        dtypes = [getattr(torch, d.strip()) for d in a.dtypes.split(",")]
    if a.quick:
        drive(dtypes, ["relu", "silu"])
    else:
        drive(
            dtypes,
            ["relu", torch.nn.LeakyReLU(0.2), "silu", "gelu", "gelu_tanh", "sigmoid", "tanh", "identity"],
        )
    print(f"triton {triton.__version__}, target sm_{a.arch}: {time.perf_counter() - t0:.0f} s")
    spills, barriers = [], []
    for name in sorted(COMPILED):
        vec, tot = map(sum, zip(*(_loads(k.asm["ptx"]) for k in COMPILED[name])))
        res = [(r, k.metadata.num_warps) for k in COMPILED[name] if (r := _resources(k.asm["cubin"]))]
        use = ""
        if res:
            regs, local = [r[0] for r, _ in res], max(r[1] for r, _ in res)
            warps = min(_resident_warps(r[0], nw) for r, nw in res)
            use = f", registers {min(regs)}-{max(regs)} (>= {warps} warps / SM), spilled {local} B"
            if local:
                spills.append(name)
        # (instructions per value on the test's small shapes say little: --roofline reads them on
        # a ResNet-50 activation)
        with_bar = sum(any(b for _, b, _ in _inner_loops(_sass(k.asm["cubin"]))) for k in COMPILED[name])
        if with_bar:
            use += f", barriers in loop steps of {with_bar} variants"
            if name in NO_BARRIER:
                barriers.append(name)
        print(f"  {name:28s} {len(COMPILED[name]):3d} variants, vector loads {vec}/{tot}{use}")
    for name in spills:  # a spill is local-memory traffic inside a bandwidth-bound loop
        print("SPILLS", name)
    for name in barriers:
        print("BARRIER IN LOOP", name)
    for f in FAILURES:
        print("FAILED", f)
    missing = sorted(
        n for n in dir(_kernels) if n.endswith("_kernel") and n not in COMPILED
    )  # every kernel the module defines was launched at least once
    for n in missing:
        print("NOT LAUNCHED", n)
    return 1 if FAILURES or missing or spills or barriers else 0


if __name__ == "__main__":
    sys.exit(main())
