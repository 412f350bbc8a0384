"""``normkit bench``: torch native and every normkit backend, side by side, in one process.

Two parts:

* **ops** (:data:`OPS`): batch_norm (training), group_norm G=32, instance_norm (affine),
  layer_norm over (C, H, W) (torch's ``F.layer_norm(x, x.shape[1:], w, b)``, element-wise affine),
  LayerNorm2d over C (native: permute + ``F.layer_norm`` over C + permute back, as timm does), and
  GN32 + Proxy-Norm activation against native GN + affine + ReLU; on each shape, layout (NCHW,
  channels_last), dtype (fp32, bf16) and pass (forward; forward + backward), for the providers
  ``native`` (``torch.nn.functional``), ``normkit:<backend>`` (every backend of
  :func:`normkit.kernels.available` but ``auto``, each run under :func:`normkit.kernels.use`) and,
  opt-in, ``compiled`` (``torch.compile`` of the naive composite, ~15 s of compile per case).
  Each case also times a same-size ``y.copy_(x)``.
* **e2e**: one SGD training step (forward, cross-entropy, backward, ``step``) of a ResNet-18-style
  net (:class:`ResNet18Style`; 32x32 and 64x64 inputs, batch 32 and 2; BatchNorm, and GroupNorm(32)
  at batch 2) and of the lab's CNN-4 at batch 2 (bn, gn:8), torch.nn's norms against normkit's on
  each backend, eager (and ``torch.compile``'d with ``compile=True``: warmed up first, the first
  step's time reported apart).

Timing: repeats are interleaved (every provider once per repeat, the order rotated each repeat) and
the best-of-repeats median is kept (``torch.utils.benchmark.Timer.blocked_autorange``). Forward runs
under ``no_grad``; forward + backward is the forward then ``torch.autograd.grad`` of
``(x, weight, bias)`` for a fixed ``dy`` (nothing accumulates into ``.grad``, as for an activation in
a network). Effective GB/s counts the bytes an ideal kernel moves: forward 2 x the tensor's bytes
(read x, write y), forward + backward 5 x (plus read dy, read x, write dx); parameters and
statistics are ignored. Ratios below 1 mean normkit is faster. On the CPU, inputs of at least
:data:`COLD_BYTES` are taken in turn from enough copies (x and dy) to fill :data:`ROTATE_BYTES`, so
that every call reads them from memory, as a training step does for an activation that large: one
input reused stays in the last-level cache between calls, which flatters a kernel whose outputs
bypass the cache (non-temporal stores) against one whose outputs evict its input. The copy baseline
rotates the same way. The machine this project runs on drifts 10-30 % between runs: compare
providers within one run only.

Example:
    >>> md, data = run_bench(BenchConfig(shapes=[(2, 32, 4, 4)], dtypes=["fp32"], layouts=["nchw"],
    ...                                  passes=["fwd"], ops=["group_norm"], repeats=1, min_time=0.01,
    ...                                  e2e=False, quiet=True))
    >>> row = data["ops"][0]
    >>> row["op"], list(row["ms"])[0], "normkit:reference" in row["vs_native"]
    ('group_norm G=32', 'native', True)
    >>> "| group_norm G=32 | (2, 32, 4, 4) | nchw | fp32 | fwd |" in md
    True
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as TF
from torch import Tensor, nn
from torch.utils.benchmark import Timer

from . import functional as NF
from . import kernels

__all__ = [
    "BenchConfig",
    "DEFAULT_SHAPES",
    "OPS",
    "OpSpec",
    "ResNet18Style",
    "check_config",
    "config_from_args",
    "format_markdown",
    "main_from_args",
    "run_bench",
    "write_json",
]

#: PERFORMANCE.md's benchmark shapes (a DRAM-sized and a cache-sized feature map).
DEFAULT_SHAPES: list[tuple[int, ...]] = [(32, 64, 56, 56), (8, 256, 28, 28)]
#: ``--device cuda`` adds ResNet-50-sized activations (the first and the third stage's).
CUDA_SHAPES: list[tuple[int, ...]] = [*DEFAULT_SHAPES, (64, 256, 56, 56), (64, 1024, 14, 14)]
#: Peak DRAM bandwidth (GB/s, the vendors' figures) by a substring of ``torch.cuda.get_device_name``,
#: for ``--device cuda``'s "% of peak" (``--peak-gbps`` overrides; an unknown GPU reports none).
GPU_PEAK_GBPS = {
    "H200": 4800.0,
    "H100 PCIe": 2000.0,
    "H100": 3350.0,
    "A100-SXM4-80GB": 2039.0,
    "A100 80GB PCIe": 1935.0,
    "A100": 1555.0,
    "L40S": 864.0,
    "A10G": 600.0,
    "L4": 300.0,
    "RTX 4090": 1008.0,
    "V100": 900.0,
    "T4": 320.0,
}
#: CPU inputs at least this large are read cold: taken in turn from copies filling ROTATE_BYTES.
COLD_BYTES = 16 << 20
ROTATE_BYTES = 64 << 20
#: The shape of ``--quick``.
QUICK_SHAPES: list[tuple[int, ...]] = [(4, 64, 16, 16)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = ("nchw", "cl")
PASSES = ("fwd", "fwdbwd")
#: bytes an ideal kernel moves, in units of the tensor's bytes
TRAFFIC = {"fwd": 2, "fwdbwd": 5}

Op = Callable[[Tensor, Tensor, Tensor], Tensor]


class OpSpec(NamedTuple):
    """One benchmarked norm: torch's version, normkit's (built from a ``normkit.functional``-like
    module, so an older normkit can stand in), the naive composite (for ``torch.compile``), and the
    shape of the affine (``"c"``: ``(C,)``; ``"chw"``: ``(C, H, W)``)."""

    native: Op
    normkit: Callable[[Any], Op]
    naive: Op
    affine: str = "c"
    groups: int = 1  # the channel count must be a multiple of this


def _naive(x: Tensor, w: Tensor, b: Tensor, dims: tuple[int, ...], groups: int | None = None) -> Tensor:
    """mean + mean of squared deviations + normalize + affine, autograd for the backward."""
    xv = x if groups is None else x.reshape(x.shape[0], groups, -1)
    mean = xv.mean(dims, keepdim=True)
    var = (xv - mean).square().mean(dims, keepdim=True)
    y = ((xv - mean) * torch.rsqrt(var + 1e-5)).reshape(x.shape)
    shape = (1, -1, *([1] * (x.dim() - 2))) if w.dim() == 1 else (1, *w.shape)
    return y * w.view(shape) + b.view(shape)


def _ln_c_native(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    return TF.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), w, b).permute(0, 3, 1, 2)


def _pn(nf: Any) -> Op:
    # GroupNormProxyAct2d's step (fused on the cpu backend); proxy_bias / proxy_weight sized from w (the
    # channel count changes between shapes); eps 1e-5 like the native GroupNorm it is compared with
    if hasattr(nf, "group_norm_proxy_act"):
        return lambda x, w, b: nf.group_norm_proxy_act(
            x, 32, w, b, torch.zeros_like(w), torch.zeros_like(w), eps=1e-5
        )
    return lambda x, w, b: nf.proxy_norm_act(
        nf.group_norm(x, 32), w, b, torch.zeros_like(w), torch.zeros_like(w)
    )


#: The benchmarked norms, by the name shown in the tables (``--ops`` matches substrings of it).
OPS: dict[str, OpSpec] = {
    "batch_norm train": OpSpec(
        lambda x, w, b: TF.batch_norm(x, None, None, w, b, True),
        lambda nf: lambda x, w, b: nf.batch_norm(x, None, None, w, b, True).output,
        lambda x, w, b: _naive(x, w, b, (0, 2, 3)),
    ),
    "group_norm G=32": OpSpec(
        lambda x, w, b: TF.group_norm(x, 32, w, b),
        lambda nf: lambda x, w, b: nf.group_norm(x, 32, w, b),
        lambda x, w, b: _naive(x, w, b, (2,), 32),
        groups=32,
    ),
    "instance_norm": OpSpec(
        lambda x, w, b: TF.instance_norm(x, weight=w, bias=b),
        lambda nf: lambda x, w, b: nf.instance_norm(x, weight=w, bias=b).output,
        lambda x, w, b: _naive(x, w, b, (2, 3)),
    ),
    "layer_norm over CHW": OpSpec(
        lambda x, w, b: TF.layer_norm(x, x.shape[1:], w, b),
        lambda nf: lambda x, w, b: nf.layer_norm(x, x.shape[1:], w, b),
        lambda x, w, b: _naive(x, w, b, (2,), 1),
        affine="chw",
    ),
    "layer_norm_2d over C": OpSpec(
        _ln_c_native,
        lambda nf: lambda x, w, b: nf.layer_norm_2d(x, w, b),
        lambda x, w, b: _naive(x, w, b, (1,)),
    ),
    "GN32 + proxy norm (native: GN+affine+ReLU)": OpSpec(
        lambda x, w, b: torch.relu(TF.group_norm(x, 32, w, b)),
        _pn,
        lambda x, w, b: torch.relu(_naive(x, w, b, (2,), 32)),
        groups=32,
    ),
}


@dataclass
class BenchConfig:
    """What :func:`run_bench` measures (the ``normkit bench`` options).

    Attributes:
        shapes: NCHW shapes of the per-op part.
        layouts: ``"nchw"`` and/or ``"cl"`` (channels_last).
        dtypes: ``"fp32"`` and/or ``"bf16"``.
        passes: ``"fwd"`` and/or ``"fwdbwd"``.
        ops: substrings of :data:`OPS`' names; ``None``: all.
        backends: normkit backends; ``None``: every available one but ``"auto"``.
        extra_providers: more ``normkit.functional``-like modules to time as providers of their own
            (``benchmarks/bench_norms.py --baseline`` adds an older normkit as ``"baseline"``).
        repeats: interleaved repeats; the best median is kept.
        min_time: seconds per op measurement (``blocked_autorange``).
        e2e_min_time: seconds of training steps per e2e measurement (at least one step).
        threads: torch intra-op threads.
        device: ``"cpu"`` or ``"cuda"`` (the providers then are native, normkit's ``reference``,
            ``native`` and ``triton`` backends, and ``compiled``).
        peak_gbps: the device's peak bandwidth for the "% of peak" column; ``None``: from
            :data:`GPU_PEAK_GBPS` on CUDA, none on the CPU.
        compile: also the ``compiled`` provider and compiled training steps.
        run_ops, e2e: which parts run.
        quick: the e2e part on its two smallest cases only.
        quiet: no progress bars.
    """

    shapes: list[tuple[int, ...]] = field(default_factory=lambda: list(DEFAULT_SHAPES))
    layouts: list[str] = field(default_factory=lambda: list(LAYOUTS))
    dtypes: list[str] = field(default_factory=lambda: ["fp32", "bf16"])
    passes: list[str] = field(default_factory=lambda: list(PASSES))
    ops: list[str] | None = None
    backends: list[str] | None = None
    extra_providers: dict[str, Any] = field(default_factory=dict)
    repeats: int = 3
    min_time: float = 0.2
    e2e_min_time: float = 1.0
    threads: int = 2
    device: str = "cpu"
    peak_gbps: float | None = None
    compile: bool = False
    run_ops: bool = True
    e2e: bool = True
    quick: bool = False
    quiet: bool = False


# the cpu backend's kernels take CPU tensors only; on CUDA "auto" is a provider of its own (torch's op
# where normkit hands the call to it, the Triton kernels elsewhere: normkit.kernels._direct); on the CPU
# it runs what "cpu" runs.
_CUDA_BACKENDS = ("auto", "reference", "native", "triton")


def _selectable(cfg: BenchConfig) -> tuple[list[str], list[str]]:
    """(known, available here) backends for ``--backends`` on ``cfg.device``."""
    if cfg.device == "cuda":
        return list(_CUDA_BACKENDS), [b for b in kernels.available() if b in _CUDA_BACKENDS]
    return [b for b in kernels.BACKENDS if b != "auto"], [b for b in kernels.available() if b != "auto"]


def _backends(cfg: BenchConfig) -> list[str]:
    return cfg.backends if cfg.backends is not None else _selectable(cfg)[1]


def peak_gbps(cfg: BenchConfig) -> float | None:
    """The peak bandwidth the "% of peak" column reads against (``None``: not known here).

    Example:
        >>> peak_gbps(BenchConfig(peak_gbps=3350.0)), peak_gbps(BenchConfig())
        (3350.0, None)
    """
    if cfg.peak_gbps is not None or cfg.device != "cuda" or not torch.cuda.is_available():
        return cfg.peak_gbps
    name = torch.cuda.get_device_name()
    return next((v for k, v in GPU_PEAK_GBPS.items() if k in name), None)


def _fits(name: str, shape: tuple[int, ...]) -> bool:
    """Whether op ``name`` runs on ``shape`` (a group norm needs C divisible by its groups)."""
    return shape[1] % OPS[name].groups == 0


def _op_names(cfg: BenchConfig) -> list[str]:
    return [n for n in OPS if cfg.ops is None or any(o.lower() in n.lower() for o in cfg.ops)]


def check_config(cfg: BenchConfig) -> None:
    """Raise :class:`ValueError` with a one-line reason when ``cfg`` cannot run here.

    Example:
        >>> check_config(BenchConfig(ops=["nosuchop"]))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: --ops 'nosuchop' matches no op; the ops are: batch_norm train, group_norm G=32, ...
    """
    if not cfg.run_ops and not cfg.e2e:
        raise ValueError(
            "nothing to run: both the per-op part (--no-ops) and the training steps (--no-e2e) are off"
        )
    if cfg.device not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu or cuda, got {cfg.device!r}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda: torch {torch.__version__} sees no CUDA device here")
    if cfg.peak_gbps is not None and not cfg.peak_gbps > 0:
        raise ValueError(f"--peak-gbps must be > 0, got {cfg.peak_gbps}")
    for s in cfg.shapes:
        if len(s) != 4 or not all(isinstance(d, int) and d > 0 for d in s):
            raise ValueError(f"a shape is N x C x H x W with positive sizes, got {s}")
    for name, values, allowed in (
        ("layouts", cfg.layouts, LAYOUTS),
        ("dtypes", cfg.dtypes, tuple(DTYPES)),
        ("passes", cfg.passes, PASSES),
    ):
        if not values:
            raise ValueError(f"--{name}: empty")
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"--{name}: {', '.join(map(repr, bad))} not one of {', '.join(allowed)}")
    for o in cfg.ops or []:
        if not any(o.lower() in n.lower() for n in OPS):
            raise ValueError(f"--ops {o!r} matches no op; the ops are: {', '.join(OPS)}")
    if cfg.run_ops and not cfg.e2e:
        names = _op_names(cfg)
        if not any(_fits(n, s) for n in names for s in cfg.shapes):
            need = sorted({OPS[n].groups for n in names})
            raise ValueError(
                f"nothing to run: no shape fits the ops {', '.join(names)} (their channels must be "
                f"divisible by {' or '.join(map(str, need))}; --shapes has C = "
                f"{', '.join(str(s[1]) for s in cfg.shapes)}) and the training steps are off (--no-e2e)"
            )
    if cfg.backends is not None:
        known, here = _selectable(cfg)
        for b in cfg.backends:
            if b not in known:
                raise ValueError(f"--backends: unknown backend {b!r}; expected one of {', '.join(known)}")
            if b not in here:
                raise ValueError(
                    f"--backends: backend {b!r} is not available here (available: {', '.join(here)}); "
                    "`normkit kernels status` says why"
                )
    if cfg.repeats < 1 or cfg.threads < 1 or cfg.min_time <= 0 or cfg.e2e_min_time <= 0:
        raise ValueError("--repeats and --threads must be >= 1 and the times > 0")


# ---- timing ------------------------------------------------------------------------------------


def _backend(provider: str | None) -> Any:
    """The backend context of a provider name (``normkit:cpu`` ...; anything else: no change)."""
    if provider and provider.startswith("normkit:"):
        return kernels.use(provider.split(":", 1)[1])
    return contextlib.nullcontext()


def _time(stmt: Callable[[], Any], min_time: float) -> float:
    """Median ms of ``stmt`` over about ``min_time`` seconds, after one warm-up call, on this thread count.

    ``Timer`` runs its statement with one intra-op thread unless told otherwise: it gets the count
    ``run_bench`` set, so every provider runs on the same (documented) threads.
    """
    stmt()  # warm-up (and compile)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return _time_cuda(stmt, min_time)
    timer = Timer("stmt()", globals={"stmt": stmt}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_time).median * 1e3


def _time_cuda(stmt: Callable[[], Any], min_time: float, blocks: int = 5) -> float:
    """Median ms per call on the GPU: CUDA events around ``blocks`` blocks of back-to-back calls.

    ``Timer.blocked_autorange`` grows its blocks until a host synchronize is 1e-4 of one, so one
    measurement of a 50 us kernel took over a second there; here a block is sized from a short
    estimate to ``min_time / blocks``, and the launches queue without a host sync inside a block.
    """
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(3):
        stmt()
    end.record()
    end.synchronize()
    per_call = max(start.elapsed_time(end) / 3, 1e-3)  # ms
    n = max(1, min(10_000, round(min_time * 1e3 / blocks / per_call)))
    times = []
    for _ in range(blocks):
        start.record()
        for _ in range(n):
            stmt()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / n)
    return sorted(times)[len(times) // 2]


def _input_copies(x: Tensor) -> list[Tensor]:
    """x, and on the CPU for x of at least COLD_BYTES enough clones (same layout) to fill ROTATE_BYTES."""
    nbytes = x.numel() * x.element_size()
    if x.device.type != "cpu" or nbytes < COLD_BYTES:
        return [x]
    return [x] + [x.clone() for _ in range(math.ceil(ROTATE_BYTES / nbytes) - 1)]


def _turns(n: int) -> Callable[[], int]:
    """0, 1, ..., n - 1, 0, ... on successive calls."""
    state = [n - 1]

    def nxt() -> int:
        state[0] = (state[0] + 1) % n
        return state[0]

    return nxt


def _op_stmt(fn: Op, xs: list[Tensor], w: Tensor, b: Tensor, backward: bool) -> Callable[[], Any]:
    turn = _turns(len(xs))
    if backward:
        xgs = [x.detach().requires_grad_(True) for x in xs]
        dys = [torch.randn_like(x) for x in xs]

        def step() -> Any:
            k = turn()
            return torch.autograd.grad(fn(xgs[k], w, b), (xgs[k], w, b), dys[k])

        return step

    def stmt() -> None:
        k = turn()
        with torch.no_grad():
            fn(xs[k], w, b)

    return stmt


@contextlib.contextmanager
def _progress(total: int, quiet: bool, label: str) -> Iterator[Callable[[str], None]]:
    """A progress bar on stderr (rich; nothing when quiet), advanced by the yielded callback."""
    from .lab.progress import Progress

    with Progress(quiet=quiet) as p:
        task = p.add(label, total=total)
        yield lambda info: p.advance(task, info=info)


def _rotated(items: list[str], r: int) -> list[str]:
    k = r % len(items)
    return items[k:] + items[:k]


# ---- the per-op part ---------------------------------------------------------------------------


def _op_rows(cfg: BenchConfig) -> list[dict[str, Any]]:
    providers = [
        "native",
        *(f"normkit:{b}" for b in _backends(cfg)),
        *cfg.extra_providers,
        *(["compiled"] if cfg.compile else []),
    ]
    cases = [
        (name, shape, layout, dtype, p)
        for name in _op_names(cfg)
        for shape in cfg.shapes
        for layout in cfg.layouts
        for dtype in cfg.dtypes
        for p in cfg.passes
        if _fits(name, shape)
    ]
    rows: list[dict[str, Any]] = []
    copies: dict[tuple[Any, ...], float] = {}
    peak = peak_gbps(cfg)
    with _progress(len(cases), cfg.quiet, "normkit bench: ops") as advance:
        for name, shape, layout, dtype, p in cases:
            spec = OPS[name]
            dt = DTYPES[dtype]
            x = torch.randn(shape, device=cfg.device).to(dt)
            if layout == "cl":
                x = x.to(memory_format=torch.channels_last)
            pshape = tuple(shape[1:]) if spec.affine == "chw" else (shape[1],)
            w = (torch.rand(pshape, device=cfg.device) + 0.5).to(dt).requires_grad_(True)
            b = torch.randn(pshape, device=cfg.device).to(dt).requires_grad_(True)
            xs = _input_copies(x)
            key = (tuple(shape), layout, dtype)
            if key not in copies:
                y, turn = torch.empty_like(x), _turns(len(xs))
                copies[key] = _time(lambda y=y, xs=xs, turn=turn: y.copy_(xs[turn()]), cfg.min_time)
            fns: dict[str, Op] = {}
            for prov in providers:
                if prov == "native":
                    fns[prov] = spec.native
                elif prov == "compiled":
                    fns[prov] = torch.compile(spec.naive)
                elif prov in cfg.extra_providers:
                    fns[prov] = spec.normkit(cfg.extra_providers[prov])
                else:
                    fns[prov] = spec.normkit(NF)
            backward = p == "fwdbwd"
            best: dict[str, float | None] = {prov: math.inf for prov in providers}
            for r in range(cfg.repeats):  # interleaved, the order rotated every repeat
                for prov in _rotated(providers, r):
                    if best[prov] is None:
                        continue
                    try:
                        with _backend(prov):
                            ms = _time(_op_stmt(fns[prov], xs, w, b, backward), cfg.min_time)
                    except Exception:
                        if prov not in cfg.extra_providers:
                            raise
                        best[prov] = None  # e.g. an older normkit without this op
                        continue
                    best[prov] = min(best[prov], ms)  # type: ignore[type-var]
            nbytes = x.numel() * x.element_size() * TRAFFIC[p]
            native: float = best["native"]  # type: ignore[assignment]
            gbps = {k: None if v is None else nbytes / (v * 1e-3) / 1e9 for k, v in best.items()}
            rows.append(
                {
                    "op": name,
                    "shape": list(shape),
                    "layout": layout,
                    "dtype": dtype,
                    "pass": p,
                    "ms": best,
                    "copy_ms": copies[key],
                    "inputs_in_turn": len(xs),
                    "gbps": gbps,
                    "pct_peak": {
                        k: None if v is None or peak is None else 100 * v / peak for k, v in gbps.items()
                    },
                    "copy_gbps": 2 * x.numel() * x.element_size() / (copies[key] * 1e-3) / 1e9,
                    "vs_native": {
                        k: None if v is None else v / native for k, v in best.items() if k != "native"
                    },
                    "vs_copy": {k: None if v is None else v / copies[key] for k, v in best.items()},
                }
            )
            advance(f"{name} {tuple(shape)} {layout} {dtype} {p}")
    return rows


# ---- end-to-end training steps -----------------------------------------------------------------


class _Block(nn.Module):
    """ResNet's BasicBlock: conv3x3-norm-ReLU-conv3x3-norm + shortcut (1x1 conv + norm when the shape
    changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet18Style(nn.Module):
    """ResNet-18's layout (BasicBlocks [2, 2, 2, 2], widths 64-128-256-512, 11.2 M parameters) with a
    given ``norm_layer`` (called as ``norm_layer(num_channels)``, as torchvision does).

    Args:
        norm_layer: e.g. ``torch.nn.BatchNorm2d``, ``normkit.nn.BatchNorm2d``,
            ``normkit.get_norm_layer("gn:32")`` or ``lambda c: torch.nn.GroupNorm(32, c)``.
        small: a 3x3 stride-1 stem for 32x32 inputs (CIFAR style); else torchvision's 7x7 stride-2
            stem and 3x3 stride-2 max-pool (for 64x64 and larger).
        num_classes: outputs.

    Example:
        >>> ResNet18Style(nn.BatchNorm2d)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> import normkit
        >>> ResNet18Style(normkit.get_norm_layer("gn:32"), small=False)(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self, norm_layer: Callable[[int], nn.Module], small: bool = True, num_classes: int = 10
    ) -> None:
        super().__init__()
        if small:
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), norm_layer(64), nn.ReLU())
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(3, 64, 7, 2, 3, bias=False), norm_layer(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
            )
        blocks, cin = [], 64
        for i, width in enumerate((64, 128, 256, 512)):
            for j in range(2):
                blocks.append(_Block(cin, width, 2 if (i > 0 and j == 0) else 1, norm_layer))
                cin = width
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


def _step(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], None]:
    """One SGD training step: forward, cross-entropy, backward, ``step``."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        TF.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _time_steps(step: Callable[[], None], min_time: float) -> float:
    """Median ms of single steps run for about ``min_time`` seconds (at least one, at most 50)."""
    times: list[float] = []
    start = time.perf_counter()
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    while not times or (time.perf_counter() - start < min_time and len(times) < 50):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


class _E2ECase(NamedTuple):
    model: str
    norm: str
    shape: tuple[int, int, int, int]
    build: Callable[[str], nn.Module]  # "torch" or "normkit" -> the model (same seed, same weights)


def _resnet(small: bool, norm: str) -> Callable[[str], nn.Module]:
    def build(kind: str) -> nn.Module:
        from .nn import BatchNorm2d
        from .nn.registry import get_norm_layer

        if norm == "bn":
            layer: Callable[[int], nn.Module] = nn.BatchNorm2d if kind == "torch" else BatchNorm2d
        else:  # "gn:32"
            layer = (lambda c: nn.GroupNorm(32, c)) if kind == "torch" else get_norm_layer(norm)
        torch.manual_seed(0)
        return ResNet18Style(layer, small=small)

    return build


def _cnn4(norm: str) -> Callable[[str], nn.Module]:
    def build(kind: str) -> nn.Module:
        from .lab.models import CNN4

        torch.manual_seed(0)
        if kind == "normkit":
            return CNN4(norm)  # normkit's fused norm + ReLU layers, as the lab trains it
        groups = 1 if norm == "ln+pn" else int(norm.split(":")[1]) if ":" in norm else 0
        torch_norm = (lambda c: nn.GroupNorm(groups, c)) if groups else nn.BatchNorm2d  # ln+pn: vs LN + ReLU
        return CNN4(lambda c: nn.Sequential(torch_norm(c), nn.ReLU()))

    return build


def _e2e_cases(cfg: BenchConfig) -> list[_E2ECase]:
    if cfg.quick:
        return [
            _E2ECase("ResNet-18-style", "bn", (2, 3, 32, 32), _resnet(True, "bn")),
            _E2ECase("CNN-4", "bn", (2, 1, 8, 8), _cnn4("bn")),
        ]
    return [
        _E2ECase("ResNet-18-style", "bn", (32, 3, 32, 32), _resnet(True, "bn")),
        _E2ECase("ResNet-18-style", "bn", (2, 3, 32, 32), _resnet(True, "bn")),
        _E2ECase("ResNet-18-style", "bn", (32, 3, 64, 64), _resnet(False, "bn")),
        _E2ECase("ResNet-18-style", "bn", (2, 3, 64, 64), _resnet(False, "bn")),
        _E2ECase("ResNet-18-style", "gn:32", (2, 3, 32, 32), _resnet(True, "gn:32")),
        _E2ECase("ResNet-18-style", "gn:32", (2, 3, 64, 64), _resnet(False, "gn:32")),
        _E2ECase("CNN-4", "bn", (2, 1, 8, 8), _cnn4("bn")),
        _E2ECase("CNN-4", "gn:8", (2, 1, 8, 8), _cnn4("gn:8")),
        _E2ECase("CNN-4", "ln+pn", (2, 1, 8, 8), _cnn4("ln+pn")),
    ]


def _e2e_rows(cfg: BenchConfig) -> list[dict[str, Any]]:
    backends = _backends(cfg)
    modes = ["eager", *(["compiled"] if cfg.compile else [])]
    rows: list[dict[str, Any]] = []
    cases = _e2e_cases(cfg)
    variants = {
        "torch.nn": ("torch", None),
        **{f"normkit:{b}": ("normkit", f"normkit:{b}") for b in backends},
    }
    with _progress(len(cases) * len(modes), cfg.quiet, "normkit bench: training steps") as advance:
        for case in cases:
            torch.manual_seed(1)
            x = torch.randn(case.shape, device=cfg.device)
            y = torch.randint(0, 10, (case.shape[0],), device=cfg.device)
            for mode in modes:
                steps: dict[str, Callable[[], None]] = {}
                first_s: dict[str, float] = {}
                for label, (kind, provider) in variants.items():
                    model = case.build(kind).to(cfg.device)
                    if mode == "compiled":
                        model = cast(nn.Module, torch.compile(model))  # (an OptimizedModule)
                    step = _step(model, x, y)
                    with _backend(provider):
                        t0 = time.perf_counter()
                        step()  # warm-up (and the compile; the optimizer's state)
                        first_s[label] = time.perf_counter() - t0
                    steps[label] = step
                best = {k: math.inf for k in steps}
                for r in range(cfg.repeats):  # interleaved, the order rotated every repeat
                    for label in _rotated(list(steps), r):
                        with _backend(variants[label][1]):
                            best[label] = min(best[label], _time_steps(steps[label], cfg.e2e_min_time))
                rows.append(
                    {
                        "model": case.model,
                        "norm": case.norm,
                        "input": list(case.shape),
                        "mode": mode,
                        "ms": best,
                        "vs_torch": {k: v / best["torch.nn"] for k, v in best.items() if k != "torch.nn"},
                        "first_step_s": first_s,
                    }
                )
                advance(f"{case.model} {case.norm} {'x'.join(map(str, case.shape))} {mode}")
    return rows


# ---- report ------------------------------------------------------------------------------------


def _f(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _ms(v: float | None) -> str:
    """Milliseconds with three significant digits below 10 ms (a 6 MB copy takes 0.09 ms)."""
    return "-" if v is None else f"{v:.3g}" if v < 10 else f"{v:.1f}"


def _table(head: list[str], left: int, rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * left + "---:|" * (len(head) - left)]
    out += ["| " + " | ".join(cells) + " |" for cells in rows]
    return out


def format_markdown(data: dict[str, Any]) -> str:
    """The Markdown of :func:`run_bench`'s ``data``: a header, the op table, the training-step table."""
    pin = "pinned" if data.get("allocator_pinned") else "not pinned (fresh outputs may pay page faults)"
    device = data.get("device", "cpu")
    where = f"{data['threads']} threads, allocator {pin}" if device == "cpu" else device
    peak = data.get("peak_gbps")
    out = [
        f"## normkit bench: torch {data['torch']}, {where}"
        + (f", peak bandwidth {peak:.0f} GB/s" if peak else ""),
        "",
        f"ms = best-of-{data['repeats']} median, providers interleaved (order rotated each repeat). "
        "**Ratios < 1: normkit is faster.** This machine drifts 10-30 % between runs (sometimes more): "
        "compare providers within one run only, and read differences under ~10-30 % as noise.",
        "",
    ]
    if data["ops"]:
        provs = list(data["ops"][0]["ms"])
        others = [p for p in provs if p != "native"]
        out += [
            f"### Norms ({len(data['ops'])} cases)",
            "",
            "Effective GB/s = bytes an ideal kernel moves / time: fwd = 2 x tensor bytes (read x, write y), "
            "fwd+bwd = 5 x tensor bytes (+ read dy, read x, write dx); parameters and statistics ignored. "
            "fwd+bwd = forward + `torch.autograd.grad` w.r.t. (x, weight, bias). "
            "copy = `y.copy_(x)` of the same size.",
            "",
        ]
        head = [
            "op",
            "shape",
            "layout",
            "dtype",
            "pass",
            *(f"{p} ms" for p in provs),
            "copy ms",
            *(f"{p} GB/s" for p in provs),
            *((f"{p} % peak" for p in provs) if peak else ()),
            *(f"{p}/native" for p in others),
            "native/copy",
            *(f"{p}/copy" for p in others),
        ]
        body = [
            [
                r["op"],
                str(tuple(r["shape"])),
                r["layout"],
                r["dtype"],
                r["pass"],
                *(_ms(r["ms"][p]) for p in provs),
                _ms(r["copy_ms"]),
                *(_f(r["gbps"][p], 1) for p in provs),
                *((_f(r.get("pct_peak", {}).get(p), 0) for p in provs) if peak else ()),
                *(_f(r["vs_native"][p]) for p in others),
                _f(r["vs_copy"]["native"]),
                *(_f(r["vs_copy"][p]) for p in others),
            ]
            for r in data["ops"]
        ]
        out += _table(head, 5, body) + [""]
    if data["e2e"]:
        labels = list(data["e2e"][0]["ms"])
        others = [k for k in labels if k != "torch.nn"]
        out += [
            "### Training step (forward, cross-entropy, backward, SGD step), torch.nn norms vs normkit's",
            "",
            "ms = best-of-repeats median of single steps. first step s = the first call (for compiled: the "
            "compile), not in ms.",
            "",
        ]
        head = [
            "model",
            "norm",
            "input",
            "mode",
            *(f"{k} ms" for k in labels),
            *(f"{k}/torch.nn" for k in others),
            "first step s (" + " / ".join(labels) + ")",
        ]
        body = [
            [
                r["model"],
                r["norm"],
                "x".join(map(str, r["input"])),
                r["mode"],
                *(_ms(r["ms"][k]) for k in labels),
                *(_f(r["vs_torch"][k]) for k in others),
                " / ".join(_f(r["first_step_s"][k], 1) for k in labels),
            ]
            for r in data["e2e"]
        ]
        out += _table(head, 4, body) + [""]
    parts = [f"norms {data['ops_s']:.0f} s"] if data["ops"] else []
    parts += [f"training steps {data['wall_s'] - data['ops_s']:.0f} s"] if data["e2e"] else []
    out.append(f"Bench time: {data['wall_s']:.0f} s ({', '.join(parts)}).")
    return "\n".join(out)


_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": "17179869184",
    "MALLOC_TRIM_THRESHOLD_": "17179869184",
    "MALLOC_TOP_PAD_": "1073741824",
}


@contextlib.contextmanager
def _compile_settings(compile: bool) -> Iterator[None]:
    """Every ``compiled`` row a compiled graph of its own shape: Dynamo recompiles a code object (the
    composite, a model class's ``forward``) only 8 times before it silently runs it eagerly, and makes
    sizes symbolic after the first recompile; a bench compiles each many times (shapes, dtypes,
    models, backends). Hitting the raised limit fails loudly instead."""
    if not compile:
        yield
        return
    import torch._dynamo.config as dynamo_config

    with dynamo_config.patch(
        recompile_limit=4096,
        accumulated_recompile_limit=4096,
        fail_on_recompile_limit_hit=True,
        automatic_dynamic_shapes=False,
    ):
        yield


def run_bench(cfg: BenchConfig) -> tuple[str, dict[str, Any]]:
    """Run the benchmark; returns ``(markdown, data)`` (``data`` is what ``--json`` writes).

    ``data`` holds ``torch``, ``threads``, ``repeats``, ``config``, ``ops`` (one dict per case:
    ``op, shape, layout, dtype, pass, ms{provider}, copy_ms, gbps{provider}, copy_gbps,
    vs_native{provider}, vs_copy{provider}``) and ``e2e`` (``model, norm, input, mode, ms{variant},
    vs_torch{variant}, first_step_s{variant}``). A provider that could not run a case (only an
    extra provider may) has ``None`` there. Raises :class:`ValueError` for a config that cannot run
    (:func:`check_config`).
    """
    check_config(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    try:
        config = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
        config["extra_providers"] = list(cfg.extra_providers)
        data: dict[str, Any] = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "repeats": cfg.repeats,
            "device": cfg.device if cfg.device == "cpu" else f"cuda ({torch.cuda.get_device_name()})",
            "peak_gbps": peak_gbps(cfg),
            "cpu_count": os.cpu_count(),
            "allocator_pinned": all(os.environ.get(k) == v for k, v in _MALLOC.items()),
            "traffic": "fwd: 2 x tensor bytes; fwdbwd: 5 x tensor bytes",
            "config": config,
        }
        with _compile_settings(cfg.compile):
            data["ops"] = _op_rows(cfg) if cfg.run_ops else []
            data["ops_s"] = time.perf_counter() - t0
            data["e2e"] = _e2e_rows(cfg) if cfg.e2e else []
    finally:
        torch.set_num_threads(threads)
    data["wall_s"] = time.perf_counter() - t0
    return format_markdown(data), data


def check_output_path(path: str | None, flag: str) -> None:
    """Raise :class:`ValueError` naming ``flag`` when a file cannot be written at ``path`` (a folder, or
    in a folder that does not exist or is not writable); ``None`` passes.

    Example:
        >>> check_output_path("/no/such/folder/b.json", "--json")
        Traceback (most recent call last):
        ...
        ValueError: --json '/no/such/folder/b.json': the folder '/no/such/folder' does not exist
    """
    if path is None:
        return
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a folder; give a file path")
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path!r}: the folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"{flag} {path!r}: not writable")


def write_json(data: dict[str, Any], path: str) -> None:
    """Write ``data`` as JSON (``inf``/``nan`` cannot occur: failed measurements are ``null``)."""
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)


# ---- the command -------------------------------------------------------------------------------


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` of parsed ``normkit bench`` options (see :mod:`normkit.cli`)."""
    device = getattr(args, "device", "cpu")
    cfg = BenchConfig(
        device=device,
        peak_gbps=getattr(args, "peak_gbps", None),
        layouts=args.layouts,
        dtypes=args.dtypes,
        passes=args.passes,
        ops=args.ops,
        backends=args.backends,
        repeats=args.repeats if args.repeats is not None else 1 if args.quick else 3,
        min_time=args.min_time if args.min_time is not None else 0.05 if args.quick else 0.2,
        e2e_min_time=0.2 if args.quick else 1.0,
        threads=args.threads,
        compile=args.compile,
        run_ops=not args.no_ops,
        e2e=args.e2e,
        quick=args.quick,
        quiet=args.quiet,
    )
    default = CUDA_SHAPES if device == "cuda" else DEFAULT_SHAPES
    cfg.shapes = args.shapes or (list(QUICK_SHAPES) if args.quick else list(default))
    return cfg


def pin_allocator(argv: list[str]) -> None:
    """Re-exec this process with glibc's allocator pinned (the ``MALLOC_*`` settings) unless it already is.

    glibc returns large freed blocks to the OS, so every fresh output of a benchmarked op pays page
    faults (both sides, but it drowns the kernels' time; PERFORMANCE.md §6). ``argv``: the new
    process's command line after the interpreter.
    """
    if any(os.environ.get(k) != v for k, v in _MALLOC.items()):
        os.environ.update(_MALLOC)
        os.execv(sys.executable, [sys.executable, *argv])


def main_from_args(args: argparse.Namespace, extra_providers: dict[str, Any] | None = None) -> int:
    """Run ``normkit bench`` for parsed options: Markdown on stdout, ``--md`` / ``--json``; exit code."""
    cfg = config_from_args(args)
    cfg.extra_providers = dict(extra_providers or {})
    for flag, path in (("--md", args.md), ("--json", args.json)):
        check_output_path(path, flag)  # before measuring, not after
    md, data = run_bench(cfg)
    print(md)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md + "\n")
    if args.json:
        write_json(data, args.json)
    return 0


def load_baseline(path: str) -> types.ModuleType:
    """Import the normkit package at ``path`` as ``normkit_baseline``; returns its ``functional`` module.

    For timing an earlier normkit (e.g. ``git worktree add /tmp/old <commit>``, then
    ``/tmp/old/src/normkit``) in the same process as the current one. The baseline must not register
    the same ``torch.library`` ops as the current one.
    """
    import importlib
    import importlib.util

    init = os.path.join(path, "__init__.py")
    spec = importlib.util.spec_from_file_location("normkit_baseline", init, submodule_search_locations=[path])
    if spec is None or spec.loader is None or not os.path.exists(init):
        raise ValueError(f"--baseline: no package at {path!r} (expected {init})")
    module = importlib.util.module_from_spec(spec)
    sys.modules["normkit_baseline"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("normkit_baseline.functional")
