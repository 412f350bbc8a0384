"""What ``torch.compile`` generates for normkit's norms on a GPU, and torch.nn's, read without one.

On CUDA, Inductor writes each normkit norm into its own Triton kernels (``normkit.ops._inductor``,
``LIMITS["cuda"] = None``). Whether those kernels stream at the memory's speed is a GPU
measurement (``benchmarks/inductor_crossover.py``, the device lease's stage 5), but one bound can be
read here: the instructions each streaming loop issues per value. This module has Inductor write
its Triton code for CPU tensors (``cpu_backend="triton"``: the same code generator as for CUDA),
catches each kernel's source instead of compiling it for the CPU, takes the configurations Inductor
would try on an H100 / H200 (its own heuristics, given that GPU's properties), compiles each for
sm_90 against :mod:`tests.kernels.triton_compile`'s stand-in driver, and reads every innermost
loop's instructions and global bytes per value from the SASS, for normkit's layer and the torch.nn
layer it replaces, forward and backward, side by side.

    python -m tests.kernels.inductor_compile [--shape 64x256x56x56] [--dtypes bfloat16,float32]

What the counts are: every SASS instruction one issue slot (the special-function unit's, such as
a reciprocal, take more: the issue times are lower bounds); a loop's body times its trips, and a
loop the compiler unrolled whole counted once, as written out (a loop unrolled in part would be
counted as many times over as it was unrolled: none is, here); the last, partly masked trip
counted in full (at 25088 values a set, 2-6 % more); and "bytes" every global access, the weights
gathered per value and a set read again from the cache included, so an upper bound on the
memory's time, for comparing ways more than for predicting one. Inductor's split of a reduction
over few sets follows the GPU's SM count (its device properties are an H100's here). An
autotuned kernel runs the fastest of its configurations: each row keeps the configuration whose
larger of the two times is least. A kernel that compiles in no configuration is reported, and
makes the command fail.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tests.kernels import triton_compile as tc

#: an H100 / H200 SXM, as Inductor's heuristics read a CUDA device
_H100 = dict(
    type="cuda", index=0, multi_processor_count=132, cc=90, major=9, regs_per_multiprocessor=65536,
    max_threads_per_multi_processor=2048, max_threads_per_block=1024, warp_size=32,
)  # fmt: skip


#: the kernels that compiled in no configuration, as "layer dtype way pass: kernel"
FAILED: list[str] = []


@dataclass
class Kernel:
    """One generated kernel at its best configuration, as an H200 would run it over the whole input:
    the instructions its threads issue and the global bytes they load and store (every access
    counted, cache hits included), from the SASS's static counts times the grid and the loop trips."""

    name: str
    instr: float  # thread-instructions in all
    nbytes: float  # global bytes in all
    loop_instr_per_byte: float  # in its streaming loop (its body if it has none)
    regs: int
    config: str

    @property
    def issue_us(self) -> float:
        """The least time the SMs take to issue its instructions (H200)."""
        return 1e6 * self.instr / tc.ISSUE

    @property
    def bytes_us(self) -> float:
        """The time its global accesses take at peak bandwidth (an over-estimate where they hit a cache)."""
        return 1e6 * self.nbytes / tc.PEAK

    @property
    def loop_share(self) -> float:
        """The share of peak bandwidth instruction issue leaves its streaming loop."""
        return min(1.0, (1 / tc.PEAK) / (self.loop_instr_per_byte / tc.ISSUE))


@contextmanager
def _catch_sources() -> Iterator[list[tuple[str, str]]]:
    """Inductor writing Triton code for CPU tensors, each kernel's source recorded and replaced by a
    launcher that does nothing (so a forward's outputs are garbage, and its backward still compiles)."""
    import torch._inductor.async_compile as ac
    import torch._inductor.config as ic

    got: list[tuple[str, str]] = []

    class _NoLaunch:
        def run(self, *args: Any, **kwargs: Any) -> None:
            pass

    def triton(self: Any, kernel_name: str, source_code: str, device_str: str = "cuda") -> Any:
        got.append((kernel_name, source_code))
        return _NoLaunch()

    import torch._inductor.compile_fx as cf
    import torch._inductor.graph as gr
    from torch._inductor.runtime.hints import DeviceProperties
    from torch._inductor.utils import tensor_is_aligned

    old = ac.AsyncCompile.triton, gr.should_assume_input_aligned, cf.should_assume_input_aligned
    old_create = DeviceProperties.__dict__["create"]
    ac.AsyncCompile.triton = triton  # type: ignore[method-assign]
    # (the GPU's SM count, where Inductor sizes the split of a reduction over few sets)
    DeviceProperties.create = classmethod(lambda cls, device: cls(**_H100))  # type: ignore[method-assign,assignment]
    # (inputs aligned as on CUDA, where Inductor takes an input at an aligned offset as aligned,
    # so its loads can be vectors: for CPU tensors it assumes none is)
    gr.should_assume_input_aligned = cf.should_assume_input_aligned = tensor_is_aligned
    try:
        with ic.patch(cpu_backend="triton", fx_graph_cache=False, compile_threads=1):
            import torch._functorch.config as fc

            with fc.patch(enable_autograd_cache=False):
                yield got
    finally:
        ac.AsyncCompile.triton, gr.should_assume_input_aligned, cf.should_assume_input_aligned = old  # type: ignore[method-assign]
        DeviceProperties.create = old_create  # type: ignore[method-assign]


def generated(module: nn.Module, x: torch.Tensor) -> list[tuple[str, str, str]]:
    """``(pass, name, source)`` of every Triton kernel Inductor writes for ``module``'s forward
    (``"fwd"``) and backward (``"bwd"``) on ``x`` (CPU tensors, as for a CUDA device)."""
    torch._dynamo.reset()
    with _catch_sources() as got:
        y = torch.compile(module)(x)
        fwd = len(got)
        y.backward(torch.ones_like(y))
    return [("fwd" if i < fwd else "bwd", name, src) for i, (name, src) in enumerate(got)]


_SCRATCH: Any = None


def _scratch() -> str:
    """A temporary folder for the kernels' sources, removed when the process ends."""
    global _SCRATCH
    if _SCRATCH is None:
        import tempfile

        _SCRATCH = tempfile.TemporaryDirectory(prefix="normkit-inductor-")
    return _SCRATCH.name


def _heuristic(source: str) -> tuple[str, dict[str, Any], Any]:
    """``(kind, arguments, jit function)`` of a generated kernel: the heuristic that decorates it
    (``reduction``, ``pointwise``, ...) with its arguments, and the undecorated ``triton.jit``
    function, from executing its source with the decorator recorded."""
    import tempfile

    import torch._inductor.runtime.triton_helpers as th

    seen: dict[str, Any] = {}

    class _Recorder:
        def __getattr__(self, kind: str) -> Callable[..., Any]:
            def deco(*args: Any, **kwargs: Any) -> Callable[[Any], Any]:
                seen["kind"], seen["args"], seen["kwargs"] = kind, args, kwargs
                return lambda fn: fn

            return deco

    src = source.replace("triton_helpers.set_driver_to_cpu()", "")
    src = src.replace("from torch._inductor.runtime import triton_helpers, triton_heuristics", "")
    # (triton.jit reads its function's source from a file: one in this process's scratch folder)
    with tempfile.NamedTemporaryFile("w", suffix=".py", dir=_scratch(), delete=False) as f:
        f.write(src)
    ns: dict[str, Any] = {"triton_helpers": th, "triton_heuristics": _Recorder(), "__file__": f.name}
    code = compile(src, f.name, "exec")
    exec(code, ns)
    from triton.runtime.jit import JITFunction

    fn = next(v for v in ns.values() if isinstance(v, JITFunction))
    kwargs = dict(seen["kwargs"])
    if seen["args"]:
        kwargs["size_hints"] = seen["args"][0]
    return seen["kind"], kwargs, fn


def _configs(kind: str, kwargs: dict[str, Any]) -> list[Any]:
    """The configurations Inductor's heuristic gives this kernel on an H100 / H200."""
    from torch._inductor.runtime import triton_heuristics
    from torch._inductor.runtime.hints import DeviceProperties

    meta = dict(kwargs["triton_meta"])
    meta["device"] = DeviceProperties(**_H100)
    kw = {k: v for k, v in kwargs.items() if k not in ("filename",)}
    kw["triton_meta"] = meta
    return list(getattr(triton_heuristics, kind)(**kw, return_configs=True))


def _compile(fn: Any, kwargs: dict[str, Any], cfg: Any) -> Any:
    """One generated kernel compiled for sm_90 under one configuration."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    meta = kwargs["triton_meta"]
    sig = {k: v for k, v in meta["signature"].items()}
    constexprs = {}
    for name in fn.arg_names:
        if sig.get(name) == "constexpr":
            if name in cfg.kwargs:
                constexprs[name] = cfg.kwargs[name]
            elif name in meta.get("constants", {}):
                constexprs[name] = meta["constants"][name]
    attrs = {k: v for k, v in meta["configs"][0].items()} if meta.get("configs") else {}
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(
        src,
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
    )


def _sizes(source: str) -> dict[str, int]:
    """The static sizes a generated kernel's body sets (``xnumel = 2048``, ``r0_numel = 25088``, and a
    persistent reduction's ``R0_BLOCK: tl.constexpr = 4096``)."""
    body = source[source.index("@triton.jit") :]
    got = {m.group(1): int(m.group(2)) for m in re.finditer(r"^\s+(\w+numel) = (\d+)$", body, re.M)}
    got |= {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"^\s+(R\d_BLOCK): tl.constexpr = (\d+)$", body, re.M)
    }
    return got


def _code(sass: str) -> list[str]:
    """A kernel's SASS instructions, without the padding after its end (NOPs and a branch to itself)."""
    code = [(m.group(1), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    return [
        i
        for at, i in code
        if i.strip() != "NOP" and not re.fullmatch(rf"BRA 0x0*{int(at, 16):x}\s*", i.strip())
    ]


def estimate(name: str, source: str) -> Kernel | None:
    """One generated kernel over the whole input at the configuration that an H200 would run
    fastest by the larger of its issue time and its bytes' time (the autotuner's likely pick),
    or ``None`` if no configuration compiles."""
    kind, kwargs, fn = _heuristic(source)
    sizes = _sizes(source)
    best: Kernel | None = None
    for cfg in _configs(kind, kwargs):
        try:
            k = _compile(fn, kwargs, cfg)
        except Exception as e:  # (a configuration the compiler rejects: the autotuner skips it too)
            print(f"{name} {cfg}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
            continue
        blocks = {**{k_: v for k_, v in sizes.items() if k_.endswith("BLOCK")}, **cfg.kwargs}
        programs = 1
        for dim in "xyz":
            if f"{dim}numel" in sizes:
                programs *= -(-sizes[f"{dim}numel"] // blocks.get(f"{dim.upper()}BLOCK", 1))
        r = sizes.get("r0_numel", 1)
        trips = -(-r // blocks["R0_BLOCK"]) if "R0_BLOCK" in blocks else 1
        sass = tc._sass(k.asm["cubin"])
        code = _code(sass)
        bodies = tc._inner_bodies(sass)
        loop_i = sum(len(b) for b in bodies)
        loop_b = sum(tc._access_bytes(i) for b in bodies for i in b)
        all_b = sum(tc._access_bytes(i) for i in code)
        per_i = len(code) - loop_i + trips * loop_i
        per_b = all_b - loop_b + trips * loop_b
        threads = programs * 32 * cfg.num_warps
        streams = [b for b in bodies if any(tc._access_bytes(i) for i in b)]
        if streams:
            worst = max(streams, key=lambda b: len(b) / sum(tc._access_bytes(i) for i in b))
            ipb = len(worst) / sum(tc._access_bytes(i) for i in worst)
        else:
            ipb = len(code) / max(1, all_b)
        res = tc._resources(k.asm["cubin"])
        got = Kernel(
            name,
            threads * per_i,
            threads * per_b,
            ipb,
            res[0] if res else 0,
            f"{cfg.kwargs} w{cfg.num_warps}",
        )
        if best is None or max(got.issue_us, got.bytes_us) < max(best.issue_us, best.bytes_us):
            best = got
    return best


def _layers() -> dict[str, tuple[Callable[[int], nn.Module], Callable[[int], nn.Module]]]:
    import normkit.nn as nkn

    class _PermutedLN(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.ln = nn.LayerNorm(c)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    return {
        "GroupNorm(32)": (lambda c: nn.GroupNorm(32, c), lambda c: nkn.GroupNorm(32, c)),
        "BatchNorm2d (train)": (nn.BatchNorm2d, nkn.BatchNorm2d),
        "LayerNorm2d": (_PermutedLN, nkn.LayerNorm2d),
    }


def table(
    shape: tuple[int, ...], dtypes: list[torch.dtype], layers: list[str] | None = None
) -> tuple[list[str], list[dict[str, Any]]]:
    """For each layer and dtype: the generated kernels of torch.nn's layer and normkit's, forward and
    backward, each with its issue time and its bytes' time on an H200 and its streaming loop's
    issue-bound share of peak bandwidth; then each way's sums per pass, next to the least time the
    pass could take at peak bandwidth (forward: read x, write y; backward: read x and dy, write dx).
    Returns the table's lines and the sums as records."""
    from normkit.ops import _inductor, core

    tc.setup(90)
    old = dict(_inductor.LIMITS), set(core.WELFORD_DEVICES)
    # (the CPU tensors stand for CUDA ones: generated, and with the moments, as there)
    _inductor.LIMITS["cpu"] = None
    core.WELFORD_DEVICES.discard("cpu")
    head = f"{'layer':20s} {'dtype':9s} {'by':9s} {'pass':4s} {'kernel':46s}"
    lines = [f"{head} {'issue us':>9s} {'bytes us':>9s} {'loop issue-bound %':>18s} {'regs':>5s}"]
    sums: list[dict[str, Any]] = []
    try:
        for lname, (make_torch, make_nk) in _layers().items():
            if layers and lname not in layers:
                continue
            for dtype in dtypes:
                nbytes = torch.Size(shape).numel() * torch.finfo(dtype).bits / 8
                for by, make in (("torch.nn", make_torch), ("normkit", make_nk)):
                    torch.manual_seed(0)
                    m = make(shape[1]).to(dtype)
                    x = torch.randn(shape, dtype=dtype, requires_grad=True)
                    total = {p: [0.0, 0.0] for p in ("fwd", "bwd")}
                    for p, kname, src in generated(m, x):
                        k = estimate(kname, src)
                        if k is None:
                            FAILED.append(f"{lname} {str(dtype)[6:]} {by} {p}: {kname}")
                            continue
                        total[p][0] += k.issue_us
                        total[p][1] += k.bytes_us
                        lead = f"{lname:20s} {str(dtype)[6:]:9s} {by:9s} {p:4s}"
                        lines.append(
                            f"{lead} {kname[7:53]:46s} {k.issue_us:9.1f} {k.bytes_us:9.1f} "
                            f"{100 * k.loop_share:17.0f}% {k.regs:5d}"
                        )
                    for p, (issue, nb) in total.items():
                        least = 1e6 * (2 if p == "fwd" else 3) * nbytes / tc.PEAK
                        sums.append(
                            dict(
                                layer=lname,
                                dtype=str(dtype)[6:],
                                by=by,
                                step=p,
                                issue_us=issue,
                                bytes_us=nb,
                                least_us=least,
                            )
                        )
                        what = f"= in all (least at peak: {least:.0f} us)"
                        lead = f"{lname:20s} {str(dtype)[6:]:9s} {by:9s} {p:4s}"
                        lines.append(f"{lead} {what:46s} {issue:9.1f} {nb:9.1f}")
    finally:
        _inductor.LIMITS.clear()
        _inductor.LIMITS.update(old[0])
        core.WELFORD_DEVICES.clear()
        core.WELFORD_DEVICES.update(old[1])
    return lines, sums


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="64x256x56x56")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--layers", default="", help="comma-separated names from the table (default: all)")
    ap.add_argument(
        "--json", action="store_true", help="also print each way's sums per pass, a JSON line each"
    )
    a = ap.parse_args(argv)
    shape = tuple(int(v) for v in a.shape.split("x"))
    dtypes = [getattr(torch, d.strip()) for d in a.dtypes.split(",")]
    lines, sums = table(shape, dtypes, [s for s in a.layers.split(",") if s] or None)
    print("\n".join(lines))
    if a.json:
        for r in sums:
            print("json " + json.dumps(r))
    if FAILED:
        print("compiled in no configuration (left out of the sums above):\n  " + "\n  ".join(FAILED))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
