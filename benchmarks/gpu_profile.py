"""Where the GPU time of each norm goes: per-kernel times under torch.profiler, and the Triton kernels'
registers and spills (a stage of ``benchmarks/gpu_check.sh``).

For each case (op, layout, dtype on ResNet-50's stage-1 activation by default) it runs forward +
backward under ``normkit.kernels.use(backend)`` a few times inside ``torch.profiler`` and prints every
GPU kernel that ran with its mean time per step and the bandwidth that time means for one read + one
write of the tensor, then the register count and spill count of each Triton kernel that case compiled.
Each case's lines are printed (and flushed) as soon as it is measured, so a run cut short by its
stage's time limit keeps every case it finished. Read it next to docs/PERFORMANCE.md §5: it says
which kernel (ours or the torch glue around it) holds the time.

    PYTHONPATH=src python benchmarks/gpu_profile.py [--shape 64x256x56x56] [--backends triton,auto]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import torch
import torch.nn.functional as TF

import normkit.functional as NF
from normkit import kernels

CASES = {
    "gn32": lambda x, w, b: NF.group_norm(x, 32, w, b),
    "bn": lambda x, w, b: NF.batch_norm(x, None, None, w, b, training=True).output,
    "in": lambda x, w, b: NF.instance_norm(x, weight=w, bias=b).output,
    "ln2d": lambda x, w, b: NF.layer_norm_2d(x, w, b),
    "ln_chw": lambda x, w, b: NF.group_norm(x, 1, w, b),
    "gn32+pn": lambda x, w, b: NF.group_norm_proxy_act(x, 32, w, b, torch.zeros_like(w), torch.zeros_like(w)),
    "torch gn32": lambda x, w, b: TF.group_norm(x, 32, w, b),
}


def profile(
    name: str, backend: str, shape: tuple[int, ...], layout: str, dtype: torch.dtype, steps: int
) -> None:
    x = torch.randn(shape, device="cuda").to(dtype)
    if layout == "cl":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    w = (torch.rand(shape[1], device="cuda") + 0.5).requires_grad_()
    b = torch.randn(shape[1], device="cuda").requires_grad_()
    if dtype != torch.float32:
        w, b = (t.detach().to(dtype).requires_grad_() for t in (w, b))
    dy = torch.randn_like(x)
    fn = CASES[name]

    def step() -> None:
        with kernels.use(backend):
            torch.autograd.grad(fn(x, w, b), (x, w, b), dy)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    per: dict[str, float] = defaultdict(float)
    for avg in prof.key_averages():  # the kernels are the entries on the device
        if getattr(avg, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        us = getattr(avg, "device_time_total", None)
        if us is None:  # (older torch)
            us = getattr(avg, "cuda_time_total", 0.0)
        per[avg.key] += us / steps
    nbytes = 2 * x.numel() * x.element_size()
    total = sum(per.values())
    lines = [
        f"\n{name} [{backend}] {tuple(shape)} {layout} {str(dtype)[6:]}: "
        f"{total:.1f} us of GPU kernels per fwd+bwd"
    ]
    for k, us in sorted(per.items(), key=lambda kv: -kv[1])[:12]:
        lines.append(f"  {us:9.1f} us  {nbytes / (us * 1e-6) / 1e9 if us else 0:7.0f} GB/s(1r+1w)  {k[:90]}")
    print("\n".join(lines), flush=True)


def registers(seen: set[int]) -> None:
    """Prints (and flushes) the register and spill counts of the Triton kernels compiled in this
    process that are not in ``seen`` (ids of the compiled kernels already printed), and adds them."""
    from normkit.kernels.triton import _kernels

    lines = []
    for name in dir(_kernels):
        fn = getattr(_kernels, name)
        caches = getattr(fn, "device_caches", None)
        if not caches:
            continue
        for cache in caches.values():
            compiled = cache[0] if isinstance(cache, tuple) else cache
            for kern in getattr(compiled, "values", lambda: [])():
                if id(kern) in seen:
                    continue
                seen.add(id(kern))
                regs, spills = getattr(kern, "n_regs", "?"), getattr(kern, "n_spills", "?")
                lines.append(f"  {name:28s} regs {regs:>4} spills {spills:>4}")
    if lines:
        print("  Triton kernels it compiled: registers, spills\n" + "\n".join(lines), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="64x256x56x56")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--backends", default="triton,auto")
    p.add_argument("--layouts", default="nchw,cl")
    p.add_argument("--dtypes", default="bf16")
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_profile: needs a CUDA device")
        return 2
    shape = tuple(int(v) for v in a.shape.split("x"))
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    seen: set[int] = set()
    for name in a.cases.split(","):
        for backend in a.backends.split(",") if not name.startswith("torch") else ["auto"]:
            for layout in a.layouts.split(","):
                for dt in a.dtypes.split(","):
                    try:
                        profile(name, backend, shape, layout, dtypes[dt], a.steps)
                    except Exception as e:  # report and go on: one broken case must not hide the rest
                        print(f"\n{name} [{backend}] {layout} {dt}: {type(e).__name__}: {e}", flush=True)
                    try:  # (now, not at the end: the stage's time limit may cut the run short)
                        registers(seen)
                    except Exception as e:
                        print(f"  registers: {type(e).__name__}: {e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
