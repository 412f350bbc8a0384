"""``normkit bench``: torch native and every normkit backend, side by side, in one process.

Two parts:

* **ops**: each norm (batch_norm train, group_norm G=32, instance_norm, layer_norm over (C, H, W)
  as torch's ``group_norm(x, 1)``, LayerNorm2d over C, and GN + Proxy-Norm activation against
  native GN + affine + ReLU) on each shape, layout (NCHW, channels_last), dtype (fp32, bf16) and
  pass (forward, forward + backward), for the providers ``native`` and ``normkit:<backend>`` (every
  backend of :func:`normkit.kernels.available` but ``auto``), and ``compiled`` (``torch.compile`` of
  the naive composite; opt-in, ~15 s per case). Repeats are interleaved (every provider once per
  repeat, the order rotated) and the best median is kept. Reported: ms, effective GB/s (an ideal
  kernel moves 2x the tensor's bytes forward, 5x forward + backward), the ratio to native and to a
  same-size ``copy_``.
* **e2e**: one SGD training step (forward, cross-entropy, backward, step) of a ResNet-18-style net
  (32x32 and 64x64 inputs, batch 32 and 2) and of the lab's CNN-4 at batch 2, with torch.nn's norms
  against normkit's on each backend, eager (and compiled with ``--compile``).

Ratios below 1 mean normkit is faster. The machine this project runs on drifts 10-30 % between
runs: compare providers within one run only.

Example:
    >>> md, data = run_bench(BenchConfig(shapes=[(2, 32, 4, 4)], dtypes=["fp32"], layouts=["nchw"],
    ...                                  passes=["fwd"], ops=["group_norm"], repeats=1, min_time=0.01,
    ...                                  e2e=False, quiet=True))
    >>> data["ops"][0]["op"], sorted(data["ops"][0]["ms"])[0]
    ('group_norm G=32', 'native')
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as TF
from torch import Tensor, nn
from torch.utils.benchmark import Timer

from . import kernels
from . import functional as NF

__all__ = ["BenchConfig", "OPS", "ResNet18Style", "run_bench"]

DEFAULT_SHAPES = [(32, 64, 56, 56), (8, 256, 28, 28)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
Op = Callable[[Tensor, Tensor, Tensor], Tensor]


def _naive(x: Tensor, w: Tensor, b: Tensor, dims: tuple[int, ...], view: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    xv = x if view is None else view(x)
    mean = xv.mean(dims, keepdim=True)
    var = (xv - mean).square().mean(dims, keepdim=True)
    y = ((xv - mean) * torch.rsqrt(var + 1e-5)).reshape(x.shape)
    return y * w.view(1, -1, *([1] * (x.dim() - 2))) + b.view(1, -1, *([1] * (x.dim() - 2)))


def _groups(g: int) -> Callable[[Tensor], Tensor]:
    return lambda x: x.reshape(x.shape[0], g, -1)


# name -> (native, normkit, naive composite for torch.compile)
OPS: dict[str, tuple[Op, Op, Op]] = {
    "batch_norm train": (
        lambda x, w, b: TF.batch_norm(x, None, None, w, b, True),
        lambda x, w, b: NF.batch_norm(x, None, None, w, b, True).output,
        lambda x, w, b: _naive(x, w, b, (0, 2, 3)),
    ),
    "group_norm G=32": (
        lambda x, w, b: TF.group_norm(x, 32, w, b),
        lambda x, w, b: NF.group_norm(x, 32, w, b),
        lambda x, w, b: _naive(x, w, b, (2,), _groups(32)),
    ),
    "instance_norm": (
        lambda x, w, b: TF.instance_norm(x, weight=w, bias=b),
        lambda x, w, b: NF.instance_norm(x, weight=w, bias=b).output,
        lambda x, w, b: _naive(x, w, b, (2, 3)),
    ),
    "layer_norm over CHW": (
        lambda x, w, b: TF.group_norm(x, 1, w, b),
        lambda x, w, b: NF.layer_norm_2d(x, w, b, over="chw"),
        lambda x, w, b: _naive(x, w, b, (2,), _groups(1)),
    ),
    "layer_norm_2d over C": (
        lambda x, w, b: TF.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), w, b).permute(0, 3, 1, 2),
        lambda x, w, b: NF.layer_norm_2d(x, w, b),
        lambda x, w, b: _naive(x, w, b, (1,)),
    ),
    "GN32 + proxy norm (native: GN+ReLU)": (
        lambda x, w, b: torch.relu(TF.group_norm(x, 32, w, b)),
        lambda x, w, b: NF.proxy_norm_act(NF.group_norm(x, 32), w, b, torch.zeros_like(w), torch.zeros_like(w)),
        lambda x, w, b: torch.relu(_naive(x, w, b, (2,), _groups(32))),
    ),
}


@dataclass
class BenchConfig:
    """What :func:`run_bench` measures (the ``normkit bench`` options)."""

    shapes: list[tuple[int, ...]] = field(default_factory=lambda: list(DEFAULT_SHAPES))
    layouts: list[str] = field(default_factory=lambda: ["nchw", "cl"])
    dtypes: list[str] = field(default_factory=lambda: ["fp32", "bf16"])
    passes: list[str] = field(default_factory=lambda: ["fwd", "fwdbwd"])
    ops: list[str] | None = None  # substrings of the op names; None: all
    backends: list[str] | None = None  # normkit backends; None: every available one but "auto"
    repeats: int = 3
    min_time: float = 0.3
    threads: int = 2
    compile: bool = False
    run_ops: bool = True
    e2e: bool = True
    e2e_steps: int = 3
    quick: bool = False
    quiet: bool = False


def _providers(cfg: BenchConfig) -> list[str]:
    backends = cfg.backends if cfg.backends is not None else [b for b in kernels.available() if b != "auto"]
    return ["native", *(f"normkit:{b}" for b in backends), *(["compiled"] if cfg.compile else [])]


def _backend(provider: str | None) -> Any:
    """The backend context of a provider name (``normkit:cpu`` ...; anything else: no change)."""
    if provider and provider.startswith("normkit:"):
        return kernels.use(provider.split(":", 1)[1])
    return contextlib.nullcontext()


def _time(stmt: Callable[[], Any], min_time: float) -> float:
    stmt()  # warm-up (and compile)
    return Timer("stmt()", globals={"stmt": stmt}).blocked_autorange(min_run_time=min_time).median * 1e3


def _op_stmt(fn: Op, x: Tensor, w: Tensor, b: Tensor, backward: bool) -> Callable[[], Any]:
    if backward:
        xg = x.detach().requires_grad_(True)
        dy = torch.randn_like(x)
        return lambda: fn(xg, w, b).backward(dy)

    def stmt() -> None:
        with torch.no_grad():
            fn(x, w, b)

    return stmt


@contextlib.contextmanager
def _progress(total: int, quiet: bool, label: str) -> Iterator[Callable[[str], None]]:
    """A progress bar on stderr (rich; nothing when quiet), advanced by the yielded callback."""
    from .lab.progress import Progress

    with Progress(quiet=quiet) as p:
        task = p.add(label, total=total)
        yield lambda info: p.advance(task, info=info)


def _op_rows(cfg: BenchConfig) -> list[dict[str, Any]]:
    providers = _providers(cfg)
    names = [n for n in OPS if cfg.ops is None or any(o in n for o in cfg.ops)]
    cases = [
        (name, shape, layout, dtype, p)
        for name in names
        for shape in cfg.shapes
        for layout in cfg.layouts
        for dtype in cfg.dtypes
        for p in cfg.passes
        if not ("32" in name and shape[1] % 32)
    ]
    rows: list[dict[str, Any]] = []
    copies: dict[tuple[Any, ...], float] = {}
    with _progress(len(cases), cfg.quiet, "normkit bench: ops") as advance:
        for name, shape, layout, dtype, p in cases:
            native, ours, naive = OPS[name]
            dt = DTYPES[dtype]
            x = torch.randn(shape).to(dt)
            if layout == "cl":
                x = x.to(memory_format=torch.channels_last)
            C = shape[1]
            w = torch.ones(C, requires_grad=True) if dt == torch.float32 else torch.ones(C, dtype=dt, requires_grad=True)
            b = torch.zeros_like(w, requires_grad=True)
            key = (tuple(shape), layout, dtype)
            if key not in copies:
                y = torch.empty_like(x)
                copies[key] = _time(lambda: y.copy_(x), cfg.min_time)
            fns: dict[str, Op] = {}
            for prov in providers:
                fns[prov] = native if prov == "native" else (torch.compile(naive) if prov == "compiled" else ours)
            best = {prov: math.inf for prov in providers}
            backward = p == "fwdbwd"
            for r in range(cfg.repeats):  # interleaved, the order rotated every repeat
                order = providers[r % len(providers):] + providers[: r % len(providers)]
                for prov in order:
                    with _backend(prov):
                        best[prov] = min(best[prov], _time(_op_stmt(fns[prov], x, w, b, backward), cfg.min_time))
            nbytes = x.numel() * x.element_size() * (5 if backward else 2)
            rows.append({
                "op": name, "shape": list(shape), "layout": layout, "dtype": dtype, "pass": p,
                "ms": best, "copy_ms": copies[key],
                "gbps": {k: nbytes / (v * 1e-3) / 1e9 for k, v in best.items()},
                "vs_native": {k: v / best["native"] for k, v in best.items() if k != "native"},
                "vs_copy": {k: v / copies[key] for k, v in best.items()},
            })
            advance(f"{name} {tuple(shape)} {layout} {dtype} {p}")
    return rows


# ---- end-to-end training steps ---------------------------------------------------------------


class _Block(nn.Module):
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
    """ResNet-18's layout (BasicBlocks [2, 2, 2, 2], widths 64-512) with a given ``norm_layer``.

    ``small=True``: a 3x3 stem for 32x32 inputs (CIFAR style); else the 7x7 / 2 stem and max-pool.

    Example:
        >>> ResNet18Style(nn.BatchNorm2d)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, norm_layer: Callable[[int], nn.Module], small: bool = True, num_classes: int = 10) -> None:
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
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        TF.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _time_steps(step: Callable[[], None], steps: int) -> float:
    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps * 1e3


def _e2e_cases(cfg: BenchConfig) -> list[tuple[str, Callable[[str], nn.Module], tuple[int, ...]]]:
    from .lab.models import CNN4

    def resnet(small: bool) -> Callable[[str], nn.Module]:
        def build(kind: str) -> nn.Module:
            torch.manual_seed(0)
            return ResNet18Style(nn.BatchNorm2d if kind == "torch" else _nk_bn, small=small)

        return build

    def cnn4(norm: str) -> Callable[[str], nn.Module]:
        def build(kind: str) -> nn.Module:
            torch.manual_seed(0)
            model = CNN4(norm)
            return model if kind == "normkit" else _to_torch_norms(model)

        return build

    cases = [("ResNet-18-style 32x32", resnet(True), (2, 3, 32, 32)), ("CNN-4 bn", cnn4("bn"), (2, 1, 8, 8))]
    if not cfg.quick:
        cases = [
            ("ResNet-18-style 32x32", resnet(True), (32, 3, 32, 32)),
            ("ResNet-18-style 32x32", resnet(True), (2, 3, 32, 32)),
            ("ResNet-18-style 64x64", resnet(False), (32, 3, 64, 64)),
            ("ResNet-18-style 64x64", resnet(False), (2, 3, 64, 64)),
            ("CNN-4 bn", cnn4("bn"), (2, 1, 8, 8)),
            ("CNN-4 gn:8", cnn4("gn:8"), (2, 1, 8, 8)),
        ]
    return cases


def _nk_bn(c: int) -> nn.Module:
    from .nn import BatchNorm2d

    return BatchNorm2d(c)


def _to_torch_norms(model: nn.Module) -> nn.Module:
    """The same model with torch.nn's BatchNorm2d / GroupNorm in place of normkit's (same weights)."""
    from . import nn as nkn

    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, nkn.BatchNorm2d):
                new: nn.Module = nn.BatchNorm2d(child.num_features, child.eps, child.momentum)
            elif isinstance(child, nkn.GroupNorm):
                new = nn.GroupNorm(child.num_groups, child.num_channels, child.eps)
            else:
                continue
            new.load_state_dict(child.state_dict(), strict=False)
            setattr(mod, name, new)
    return model


def _e2e_rows(cfg: BenchConfig) -> list[dict[str, Any]]:
    backends = cfg.backends if cfg.backends is not None else [b for b in kernels.available() if b != "auto"]
    modes = ["eager", *(["compiled"] if cfg.compile else [])]
    rows: list[dict[str, Any]] = []
    cases = _e2e_cases(cfg)
    with _progress(len(cases) * len(modes), cfg.quiet, "normkit bench: training steps") as advance:
        for name, build, shape in cases:
            x = torch.randn(shape)
            y = torch.randint(0, 10, (shape[0],))
            for mode in modes:
                variants = {"torch.nn": ("torch", None), **{f"normkit:{b}": ("normkit", b) for b in backends}}
                steps: dict[str, Callable[[], None]] = {}
                compile_s: dict[str, float] = {}
                for label, (kind, backend) in variants.items():
                    model = build(kind)
                    if mode == "compiled":
                        model = torch.compile(model)  # type: ignore[assignment]
                    step = _step(model, x, y)
                    t0 = time.perf_counter()
                    with _backend(f"normkit:{backend}" if backend else None):
                        step()  # warm-up (and compile)
                    compile_s[label] = time.perf_counter() - t0
                    steps[label] = step
                best = {k: math.inf for k in steps}
                n = max(1, cfg.e2e_steps if shape[0] > 8 else 4 * cfg.e2e_steps)
                for r in range(cfg.repeats):
                    labels = list(steps)
                    for label in labels[r % len(labels):] + labels[: r % len(labels)]:
                        backend = variants[label][1]
                        with _backend(f"normkit:{backend}" if backend else None):
                            best[label] = min(best[label], _time_steps(steps[label], n))
                rows.append({
                    "model": name, "input": list(shape), "mode": mode, "ms": best,
                    "vs_torch": {k: v / best["torch.nn"] for k, v in best.items() if k != "torch.nn"},
                    "first_step_s": compile_s,
                })
                advance(f"{name} {shape} {mode}")
    return rows


# ---- report ----------------------------------------------------------------------------------


def _markdown(data: dict[str, Any]) -> str:
    out = [
        f"normkit bench: torch {data['torch']}, {data['threads']} threads; ms = best-of-{data['repeats']} median "
        "(interleaved repeats). Ratios < 1: normkit faster. GB/s counts 2x the tensor bytes forward, 5x "
        "forward+backward. The machine drifts 10-30 % between runs: compare within one run.",
        "",
    ]
    if data["ops"]:
        provs = list(data["ops"][0]["ms"])
        others = [p for p in provs if p != "native"]
        head = ["op", "shape", "layout", "dtype", "pass", *(f"{p} ms" for p in provs), *(f"{p} GB/s" for p in provs),
                *(f"{p}/native" for p in others), "native/copy", *(f"{p}/copy" for p in others)]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * 5 + "---:|" * (len(head) - 5))
        for r in data["ops"]:
            cells = [r["op"], str(tuple(r["shape"])), r["layout"], r["dtype"], r["pass"],
                     *(f"{r['ms'][p]:.2f}" for p in provs), *(f"{r['gbps'][p]:.1f}" for p in provs),
                     *(f"{r['vs_native'][p]:.2f}" for p in others), f"{r['vs_copy']['native']:.2f}",
                     *(f"{r['vs_copy'][p]:.2f}" for p in others)]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    if data["e2e"]:
        labels = list(data["e2e"][0]["ms"])
        others = [k for k in labels if k != "torch.nn"]
        head = ["model", "input", "mode", *(f"{k} ms" for k in labels), *(f"{k}/torch.nn" for k in others)]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * 3 + "---:|" * (len(head) - 3))
        for r in data["e2e"]:
            cells = [r["model"], "x".join(map(str, r["input"])), r["mode"], *(f"{r['ms'][k]:.2f}" for k in labels),
                     *(f"{r['vs_torch'][k]:.2f}" for k in others)]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def run_bench(cfg: BenchConfig) -> tuple[str, dict[str, Any]]:
    """Run the benchmark; returns ``(markdown, data)`` (``data`` is what ``--json`` writes)."""
    torch.set_num_threads(cfg.threads)
    data: dict[str, Any] = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": cfg.repeats,
        "config": {k: v for k, v in vars(cfg).items()},
        "ops": _op_rows(cfg) if cfg.run_ops else [],
        "e2e": _e2e_rows(cfg) if cfg.e2e else [],
    }
    return _markdown(data), data


def write_json(data: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)
